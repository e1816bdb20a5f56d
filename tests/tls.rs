//! TLS both ways, with a test CA made here: psql with sslmode=require and verify-full against
//! pgtether, plaintext refused under client_mode = "require", certificates reloaded on
//! SIGHUP, and pgtether's own connections to a PostgreSQL with TLS on (verify-full).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{cluster, direct_sql, value, Opts, Pgtether};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A CA and a certificate it signed for `localhost` and 127.0.0.1, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_pki(dir: &Path, name: &str) -> Pki {
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("pgtether test CA {name}"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let pki = Pki {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}-cert.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&pki.ca, ca.pem()).unwrap();
    std::fs::write(&pki.cert, cert.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    pki
}

fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!("pgtether-tls-{}", std::process::id()))
}

fn tls_opts(pki: &Pki, mode: &str) -> Opts {
    Opts {
        extra: format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_mode = \"{mode}\"\n",
            pki.cert.display(),
            pki.key.display()
        ),
        ..Opts::default()
    }
}

/// Runs psql with `conninfo` (password `app`) and `sql`.
fn psql(conninfo: &str, sql: &str) -> Output {
    Command::new("psql")
        .args(["-X", "-At", "-d", conninfo, "-c", sql])
        .env("PGPASSWORD", "app")
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .expect("psql runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn conninfo(p: &Pgtether, ssl: &str) -> String {
    format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=app dbname=app {ssl}",
        p.port
    )
}

#[test]
fn psql_over_tls_require_and_verify_full_and_plaintext_refused() {
    let pki = make_pki(&scratch().join("a"), "a");
    let p = Pgtether::start(tls_opts(&pki, "require"));

    let out = psql(&conninfo(&p, "sslmode=require"), "SELECT 40 + 2");
    assert!(out.status.success(), "{}\n{}", text(&out), p.log());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");

    let full = format!("sslmode=verify-full sslrootcert={}", pki.ca.display());
    let out = psql(&conninfo(&p, &full), "\\conninfo");
    assert!(out.status.success(), "{}\n{}", text(&out), p.log());
    assert!(text(&out).contains("SSL connection"), "{}", text(&out));

    // A long result crosses many TLS records both ways.
    let out = psql(
        &conninfo(&p, "sslmode=require"),
        "SELECT sum(length(repeat('x', i))) FROM generate_series(1, 2000) i",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2001000");

    let out = psql(&conninfo(&p, "sslmode=disable"), "SELECT 1");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("pgtether accepts only TLS connections"),
        "{}",
        text(&out)
    );

    let other = make_pki(&scratch().join("b"), "b");
    let wrong = format!("sslmode=verify-full sslrootcert={}", other.ca.display());
    let out = psql(&conninfo(&p, &wrong), "SELECT 1");
    assert!(
        !out.status.success(),
        "a certificate from another CA must fail"
    );
    assert!(
        text(&out).contains("certificate verify failed"),
        "{}",
        text(&out)
    );
}

#[test]
fn plaintext_still_works_when_tls_is_allowed() {
    let pki = make_pki(&scratch().join("c"), "c");
    let p = Pgtether::start(tls_opts(&pki, "allow"));
    let out = psql(&conninfo(&p, "sslmode=disable"), "SELECT 1");
    assert!(out.status.success(), "{}", text(&out));
    let out = psql(&conninfo(&p, "sslmode=require"), "\\conninfo");
    assert!(text(&out).contains("SSL connection"), "{}", text(&out));
}

#[test]
fn sighup_reloads_the_certificate() {
    let first = make_pki(&scratch().join("d"), "d");
    let second = make_pki(&scratch().join("e"), "e");
    // pgtether reads the files named in its config; they are replaced in place.
    let dir = scratch().join("live");
    std::fs::create_dir_all(&dir).unwrap();
    let live = Pki {
        ca: first.ca.clone(),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::copy(&first.cert, &live.cert).unwrap();
    std::fs::copy(&first.key, &live.key).unwrap();
    let p = Pgtether::start(tls_opts(&live, "require"));
    let trusts_second = format!("sslmode=verify-full sslrootcert={}", second.ca.display());
    assert!(!psql(&conninfo(&p, &trusts_second), "SELECT 1")
        .status
        .success());

    std::fs::copy(&second.cert, &live.cert).unwrap();
    std::fs::copy(&second.key, &live.key).unwrap();
    p.signal(1); // SIGHUP
    let started = Instant::now();
    loop {
        let out = psql(&conninfo(&p, &trusts_second), "SELECT 1");
        if out.status.success() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the new certificate was not used: {}\n{}",
            text(&out),
            p.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Turns TLS on in the test cluster, with a certificate from `pki`.
fn enable_cluster_tls(pki: &Pki) {
    let pg = cluster();
    let cert = pg.dir.join("server.crt");
    let key = pg.dir.join("server.key");
    std::fs::copy(&pki.cert, &cert).unwrap();
    std::fs::copy(&pki.key, &key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The cluster runs as `postgres` when the tests run as root: it must own the key.
    let owner = std::fs::metadata(&pg.dir).unwrap();
    use std::os::unix::fs::MetadataExt;
    std::os::unix::fs::chown(&cert, Some(owner.uid()), Some(owner.gid())).unwrap();
    std::os::unix::fs::chown(&key, Some(owner.uid()), Some(owner.gid())).unwrap();
    direct_sql(&format!(
        "ALTER SYSTEM SET ssl_cert_file = '{}'",
        cert.display()
    ));
    direct_sql(&format!(
        "ALTER SYSTEM SET ssl_key_file = '{}'",
        key.display()
    ));
    direct_sql("ALTER SYSTEM SET ssl = on");
    direct_sql("SELECT pg_reload_conf()");
    let started = Instant::now();
    while direct_sql("SHOW ssl") != "on" {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "ssl did not turn on"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_use_tls_with_verify_full() {
    let pki = make_pki(&scratch().join("f"), "f");
    enable_cluster_tls(&pki);
    let p = Pgtether::start(Opts {
        database_extra: format!(
            "sslmode = \"verify-full\"\nsslrootcert = \"{}\"\n",
            pki.ca.display()
        ),
        ..Opts::default()
    });
    let c = p.connect().await;
    assert_eq!(
        value(
            &c,
            "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        .await
        .unwrap(),
        "true"
    );

    // A server certificate from a CA pgtether does not trust: no server connection.
    let stranger = make_pki(&scratch().join("g"), "g");
    let refused = Pgtether::start(Opts {
        acquire_timeout: "1s",
        database_extra: format!(
            "sslmode = \"verify-full\"\nsslrootcert = \"{}\"\n",
            stranger.ca.display()
        ),
        ..Opts::default()
    });
    // The login itself needs a server connection (for the server's parameters).
    let Err(err) = refused.connect_as("app", "app").await else {
        panic!("an untrusted server certificate must fail the login");
    };
    assert_eq!(common::sqlstate(&err).as_deref(), Some("08001"), "{err:?}");
    assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");
    assert!(refused.log().contains("certificate"), "{}", refused.log());
}
