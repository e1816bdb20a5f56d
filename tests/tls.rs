//! TLS both ways, with a test CA made here: psql with sslmode=require and verify-full against
//! pgtether, plaintext refused under client_mode = "require", certificates reloaded on
//! SIGHUP, SCRAM channel binding (SCRAM-SHA-256-PLUS) with libpq and a hand-driven client,
//! and pgtether's own connections to a PostgreSQL with TLS on (verify-full).

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{cluster, direct_sql, value, Opts, Pgtether};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SignatureAlgorithm};

/// A CA and a certificate it signed for `localhost` and 127.0.0.1, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_pki(dir: &Path, name: &str) -> Pki {
    make_pki_with(dir, name, &rcgen::PKCS_ECDSA_P256_SHA256)
}

/// [`make_pki`] with keys and signatures of algorithm `alg`.
fn make_pki_with(dir: &Path, name: &str, alg: &'static SignatureAlgorithm) -> Pki {
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate_for(alg).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("pgtether test CA {name}"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate_for(alg).unwrap();
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
    common::scratch().join("tls")
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
    // A 100 kB query (many records and reads from the client) and a 100 kB row back.
    let big = format!(
        "SELECT length('{}'), repeat('y', 100000)",
        "x".repeat(100_000)
    );
    let out = psql(&conninfo(&p, "sslmode=require"), &big);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim(), format!("100000|{}", "y".repeat(100_000)));

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
    // channel_binding=require: the binding data must follow the new certificate too.
    let trusts_second = format!(
        "sslmode=verify-full sslrootcert={} channel_binding=require",
        second.ca.display()
    );
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

#[test]
fn channel_binding_with_libpq() {
    let pki = make_pki(&scratch().join("cb"), "cb");
    let p = Pgtether::start(tls_opts(&pki, "allow"));

    // libpq then insists on SCRAM-SHA-256-PLUS with matching binding data.
    let out = psql(
        &conninfo(&p, "sslmode=require channel_binding=require"),
        "SELECT 40 + 2",
    );
    assert!(out.status.success(), "{}\n{}", text(&out), p.log());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    let full = format!(
        "sslmode=verify-full sslrootcert={} channel_binding=require",
        pki.ca.display()
    );
    let out = psql(&conninfo(&p, &full), "SELECT 1");
    assert!(out.status.success(), "{}", text(&out));

    // Without channel_binding (libpq's default, prefer), and with it disabled.
    for ssl in ["sslmode=require", "sslmode=require channel_binding=disable"] {
        let out = psql(&conninfo(&p, ssl), "SELECT 1");
        assert!(out.status.success(), "{ssl}: {}", text(&out));
    }

    // Over plaintext only SCRAM-SHA-256 is offered: libpq refuses to go on.
    let out = psql(
        &conninfo(&p, "sslmode=disable channel_binding=require"),
        "SELECT 1",
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("channel binding"), "{}", text(&out));
}

/// A certificate signed with ECDSA P-384 / SHA-384 binds with SHA-384: libpq (OpenSSL)
/// computes the same data.
#[test]
fn channel_binding_uses_the_signature_hash() {
    let pki = make_pki_with(
        &scratch().join("cb384"),
        "cb384",
        &rcgen::PKCS_ECDSA_P384_SHA384,
    );
    let p = Pgtether::start(tls_opts(&pki, "require"));
    let out = psql(
        &conninfo(&p, "sslmode=require channel_binding=require"),
        "SELECT 1",
    );
    assert!(out.status.success(), "{}\n{}", text(&out), p.log());
}

// --- a hand-driven client, for what libpq never sends ---

/// Sends a StartupMessage for `app` and reads AuthenticationSASL: the mechanisms offered.
fn startup_sasl(s: &mut (impl Read + Write)) -> Vec<String> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608i32.to_be_bytes());
    for kv in ["user", "app", "database", "app"] {
        body.extend_from_slice(kv.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    s.write_all(&packet).unwrap();
    s.flush().unwrap();
    let (tag, body) = read_message(s);
    assert_eq!(tag, b'R', "{}", String::from_utf8_lossy(&body));
    assert_eq!(&body[..4], &10i32.to_be_bytes(), "AuthenticationSASL");
    body[4..]
        .split(|b| *b == 0)
        .filter(|m| !m.is_empty())
        .map(|m| String::from_utf8(m.to_vec()).unwrap())
        .collect()
}

fn read_message(s: &mut impl Read) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).unwrap();
    let len = i32::from_be_bytes(head[1..].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).unwrap();
    (head[0], body)
}

/// Sends SASLInitialResponse (`mechanism`, `first`) and returns the ErrorResponse's SQLSTATE
/// and message.
fn sasl_refused(s: &mut (impl Read + Write), mechanism: &str, first: &str) -> (String, String) {
    let mut body = mechanism.as_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(&(first.len() as i32).to_be_bytes());
    body.extend_from_slice(first.as_bytes());
    let mut msg = vec![b'p'];
    msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    msg.extend_from_slice(&body);
    s.write_all(&msg).unwrap();
    s.flush().unwrap();
    let (tag, body) = read_message(s);
    assert_eq!(tag, b'E', "{}", String::from_utf8_lossy(&body));
    let field = |code: u8| {
        body.split(|b| *b == 0)
            .find(|f| f.first() == Some(&code))
            .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
            .unwrap_or_default()
    };
    (field(b'C'), field(b'M'))
}

/// A TLS connection to pgtether, trusting `pki`'s CA.
fn tls_connect(p: &Pgtether, pki: &Pki) -> impl Read + Write {
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .unwrap(); // SSLRequest
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"S");
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&pki.ca).unwrap();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), "localhost".try_into().unwrap())
            .unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

#[test]
fn channel_binding_negotiation_is_checked() {
    let pki = make_pki(&scratch().join("cbraw"), "cbraw");
    let p = Pgtether::start(tls_opts(&pki, "allow"));

    // Over TLS: PLUS first, as PostgreSQL lists them.
    let mut s = tls_connect(&p, &pki);
    assert_eq!(
        startup_sasl(&mut s),
        ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    );
    // 'y': the client believes the server cannot bind, yet PLUS was offered: a downgrade.
    let (code, message) = sasl_refused(&mut s, "SCRAM-SHA-256", "y,,n=,r=abcdef");
    assert_eq!(code, "28000", "{message}");
    assert!(message.contains("channel binding negotiation"), "{message}");

    // PLUS selected but the header carries no binding: malformed, as in PostgreSQL.
    let mut s = tls_connect(&p, &pki);
    startup_sasl(&mut s);
    let (code, message) = sasl_refused(&mut s, "SCRAM-SHA-256-PLUS", "n,,n=,r=abcdef");
    assert_eq!(code, "08P01", "{message}");
    // Binding data with the plain mechanism.
    let mut s = tls_connect(&p, &pki);
    startup_sasl(&mut s);
    let (code, message) = sasl_refused(
        &mut s,
        "SCRAM-SHA-256",
        "p=tls-server-end-point,,n=,r=abcdef",
    );
    assert_eq!(code, "08P01", "{message}");

    // Over plaintext: only SCRAM-SHA-256, and PLUS cannot be selected.
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(startup_sasl(&mut tcp), ["SCRAM-SHA-256"]);
    let (code, message) = sasl_refused(
        &mut tcp,
        "SCRAM-SHA-256-PLUS",
        "p=tls-server-end-point,,n=,r=abcdef",
    );
    assert_eq!(code, "08P01", "{message}");
    // 'y' is fine there: the server really offers no binding (the exchange goes on).
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    startup_sasl(&mut tcp);
    let first = "y,,n=,r=abcdef";
    let mut body = b"SCRAM-SHA-256\0".to_vec();
    body.extend_from_slice(&(first.len() as i32).to_be_bytes());
    body.extend_from_slice(first.as_bytes());
    let mut msg = vec![b'p'];
    msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    msg.extend_from_slice(&body);
    tcp.write_all(&msg).unwrap();
    let (tag, body) = read_message(&mut tcp);
    assert_eq!(tag, b'R', "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        &body[..4],
        &11i32.to_be_bytes(),
        "AuthenticationSASLContinue"
    );
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
