//! Authentication: the methods clients use to log in to pgtether (SCRAM, md5, trust), the
//! methods pgtether uses upstream (SCRAM, md5, trust), refused logins and their SQLSTATEs, libpq
//! through psql, and SCRAM verifiers in the config with forced upstream credentials.

mod common;

use std::process::{Command, Output};

use common::{cluster, direct_sql, server_connections, sqlstate, value, Opts, Pgtether};
use tokio_postgres::NoTls;

/// Connects with a hand-built connection string (for cases `Pgtether::url` cannot express).
async fn connect_str(conn_str: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(conn_str, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The SQLSTATE a failed login was refused with.
fn refused_with(r: Result<tokio_postgres::Client, tokio_postgres::Error>) -> String {
    match r {
        Ok(_) => panic!("login unexpectedly succeeded"),
        Err(e) => sqlstate(&e).unwrap_or_else(|| panic!("no SQLSTATE in {e:?}")),
    }
}

/// Sum of every series of a metric (0 when it has none).
async fn metric_sum(p: &Pgtether, name: &str) -> f64 {
    let (_, body) = p.http_get("/metrics").await;
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// Runs psql against pgtether with `password` in PGPASSWORD; never prompts.
fn psql(p: &Pgtether, user: &str, password: &str, sql: &str) -> Output {
    Command::new("psql")
        .args(["-X", "-w", "-At", "-c", sql])
        .arg(format!(
            "host=127.0.0.1 port={} user={user} dbname=app",
            p.port
        ))
        .env("PGPASSWORD", password)
        .env("PGPASSFILE", "/dev/null")
        .env_remove("PGSERVICE")
        .env_remove("PGSERVICEFILE")
        .output()
        .expect("psql runs")
}

// --- client-side methods ---

#[tokio::test]
async fn scram_sha_256_login() {
    let p = Pgtether::start(Opts::default());
    let c = p.connect_as("app", "app").await.unwrap();
    assert_eq!(value(&c, "SELECT 1").await.unwrap(), "1");
}

#[tokio::test]
async fn md5_login() {
    let p = Pgtether::start(Opts {
        auth: "md5",
        ..Opts::default()
    });
    let c = p.connect_as("app", "app").await.unwrap();
    assert_eq!(value(&c, "SELECT 1").await.unwrap(), "1");
}

#[tokio::test]
async fn md5_login_with_wrong_password_is_28p01() {
    let p = Pgtether::start(Opts {
        auth: "md5",
        ..Opts::default()
    });
    assert_eq!(refused_with(p.connect_as("app", "nope").await), "28P01");
}

#[tokio::test]
async fn trust_login_needs_no_password() {
    let p = Pgtether::start(Opts {
        auth: "trust",
        ..Opts::default()
    });
    // No password at all: tokio-postgres fails if pgtether asks for one.
    let c = connect_str(&format!(
        "host=127.0.0.1 port={} user=app dbname=app",
        p.port
    ))
    .await
    .expect("trust login without a password");
    assert_eq!(value(&c, "SELECT 1").await.unwrap(), "1");
}

// --- upstream methods ---

async fn upstream_login_as(user: &str, password: &str) {
    let p = Pgtether::start(Opts::default());
    let c = p.connect_as(user, password).await.unwrap();
    assert_eq!(value(&c, "SELECT current_user").await.unwrap(), user);
}

#[tokio::test]
async fn upstream_scram() {
    upstream_login_as("app", "app").await;
}

#[tokio::test]
async fn upstream_md5() {
    upstream_login_as("tether_md5", "md5pw").await;
}

#[tokio::test]
async fn upstream_trust() {
    upstream_login_as("tether_trust", "trustpw").await;
}

// --- refused logins ---

#[tokio::test]
async fn wrong_password_is_28p01_and_opens_no_server_connection() {
    // A role of its own, so no other test's server connections are counted. It can log in
    // upstream with the configured password, so a server connection opened by mistake would
    // show in pg_stat_activity.
    direct_sql("CREATE ROLE tether_wrongpw LOGIN PASSWORD 'rightpw'");
    let p = Pgtether::start(Opts {
        extra: "[users.tether_wrongpw]\npassword = \"rightpw\"\n".into(),
        ..Opts::default()
    });
    assert_eq!(server_connections("tether_wrongpw"), 0);
    let r = p.connect_as("tether_wrongpw", "wrongpw").await;
    assert_eq!(refused_with(r), "28P01");
    assert_eq!(server_connections("tether_wrongpw"), 0);
    assert_eq!(metric_sum(&p, "pgtether_server_connections").await, 0.0);
    assert_eq!(
        p.metric(r#"pgtether_client_login_failures_total{reason="wrong_password"}"#)
            .await,
        Some(1.0)
    );
    // The right password works, so the refusal was about the password alone.
    let c = p.connect_as("tether_wrongpw", "rightpw").await.unwrap();
    assert_eq!(
        value(&c, "SELECT current_user").await.unwrap(),
        "tether_wrongpw"
    );
}

#[tokio::test]
async fn unknown_database_is_3d000() {
    let p = Pgtether::start(Opts::default());
    let r = connect_str(&format!(
        "host=127.0.0.1 port={} user=app password=app dbname=nosuchdb",
        p.port
    ))
    .await;
    assert_eq!(refused_with(r), "3D000");
}

#[tokio::test]
async fn unknown_user_is_28000() {
    let p = Pgtether::start(Opts::default());
    assert_eq!(refused_with(p.connect_as("nosuchuser", "x").await), "28000");
}

// --- libpq ---

#[tokio::test]
async fn psql_logs_in_with_scram() {
    let p = Pgtether::start(Opts::default());
    let out = psql(&p, "app", "app", "SELECT current_user, 6 * 7");
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app|42");
}

#[tokio::test]
async fn psql_with_wrong_password_fails() {
    let p = Pgtether::start(Opts::default());
    let out = psql(&p, "app", "wrong", "SELECT 1");
    assert!(
        !out.status.success(),
        "psql succeeded with a wrong password"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("password authentication failed"),
        "stderr: {stderr}"
    );
}

// --- SCRAM verifier in the config ---

/// A user whose config password is a SCRAM verifier (of `app`), on a database that logs in
/// upstream as `app` with its own password: pgtether cannot derive upstream credentials from
/// a verifier.
fn verifier_opts() -> Opts {
    let verifier = postgres_protocol::password::scram_sha_256(b"app");
    Opts {
        extra: format!(
            "[users.scram_verifier]\npassword = \"{verifier}\"\n\
             [databases.forced]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"app\"\n\
             user = \"app\"\npassword = \"app\"\n",
            cluster().port
        ),
        ..Opts::default()
    }
}

fn forced_url(p: &Pgtether, password: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user=scram_verifier password={password} dbname=forced",
        p.port
    )
}

#[tokio::test]
async fn scram_verifier_in_config_accepts_the_password() {
    let p = Pgtether::start(verifier_opts());
    let c = connect_str(&forced_url(&p, "app")).await.unwrap();
    assert_eq!(value(&c, "SELECT current_user").await.unwrap(), "app");
}

#[tokio::test]
async fn scram_verifier_in_config_refuses_a_wrong_password() {
    let p = Pgtether::start(verifier_opts());
    assert_eq!(
        refused_with(connect_str(&forced_url(&p, "nope")).await),
        "28P01"
    );
}
