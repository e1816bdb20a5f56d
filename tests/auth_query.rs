//! auth_query: users who are not in pgtether's config log in with the password the upstream
//! stores, looked up by a lookup role through a SECURITY DEFINER function (the setup the
//! README recommends), and pgtether logs in upstream as them with the ClientKey of their SCRAM
//! login. Unknown users and wrong passwords look alike; a broken lookup role is an 08001 and a
//! clear log line; answers are cached.

mod common;

use std::sync::Once;

use common::{direct_sql, sqlstate, value, Opts, Pgtether};

/// The lookup role and its function, as in the README's Security section, created once per
/// test binary.
fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        common::create_auth_lookup("pgtether_auth", "authpw");
        direct_sql(
            "CREATE ROLE aq_alice LOGIN PASSWORD 'alicepw';
             CREATE ROLE aq_bob LOGIN PASSWORD 'bobpw';
             GRANT CONNECT ON DATABASE app TO aq_alice, aq_bob;",
        );
    });
}

/// pgtether with auth_query through the function; the lookup role's password is `auth_pw`.
fn start(auth_pw: &str) -> Pgtether {
    setup();
    Pgtether::start(Opts {
        auth_extra: "user = \"pgtether_auth\"\n\
                     query = \"SELECT usename, passwd FROM pgtether_auth.user_lookup($1)\"\n"
            .into(),
        extra: format!("[users.pgtether_auth]\npassword = \"{auth_pw}\"\n"),
        ..Opts::default()
    })
}

/// (SQLSTATE, message) of a refused login.
fn refusal(r: Result<tokio_postgres::Client, tokio_postgres::Error>) -> (String, String) {
    match r {
        Ok(_) => panic!("login unexpectedly succeeded"),
        Err(e) => (
            sqlstate(&e).unwrap_or_else(|| panic!("no SQLSTATE in {e:?}")),
            e.as_db_error().map(|d| d.message().to_string()).unwrap(),
        ),
    }
}

#[tokio::test]
async fn unlisted_user_logs_in_with_its_upstream_password() {
    let p = start("authpw");
    let c = p.connect_as("aq_alice", "alicepw").await.unwrap();
    // The server connection is aq_alice's own: pgtether logged in upstream with the ClientKey
    // of her SCRAM login.
    assert_eq!(value(&c, "SELECT current_user").await.unwrap(), "aq_alice");
    assert_eq!(value(&c, "SELECT 6 * 7").await.unwrap(), "42");
    // Several transactions, so more than one server connection may be opened.
    let c2 = p.connect_as("aq_alice", "alicepw").await.unwrap();
    let tx = c.simple_query("BEGIN; SELECT pg_backend_pid()");
    let (a, b) = tokio::join!(tx, value(&c2, "SELECT current_user"));
    a.unwrap();
    assert_eq!(b.unwrap(), "aq_alice");
}

#[tokio::test]
async fn wrong_password_and_unknown_user_are_the_same_28p01() {
    let p = start("authpw");
    let (code, wrong) = refusal(p.connect_as("aq_bob", "nope").await);
    assert_eq!(code, "28P01");
    let (code, unknown) = refusal(p.connect_as("aq_nobody", "nope").await);
    assert_eq!(code, "28P01");
    assert_eq!(
        wrong.replace("aq_bob", "X"),
        unknown.replace("aq_nobody", "X")
    );
    assert!(wrong.contains("password authentication failed"), "{wrong}");
    assert_eq!(
        p.metric(r#"pgtether_client_login_failures_total{reason="unknown_user"}"#)
            .await,
        Some(1.0)
    );
    // The right password still works: the refusal was about the password alone.
    let c = p.connect_as("aq_bob", "bobpw").await.unwrap();
    assert_eq!(value(&c, "SELECT current_user").await.unwrap(), "aq_bob");
}

#[tokio::test]
async fn broken_lookup_role_is_08001_and_logged() {
    let p = start("wrong-lookup-pw");
    let (code, message) = refusal(p.connect_as("aq_alice", "alicepw").await);
    assert_eq!(code, "08001");
    assert!(message.contains("auth_query"), "{message}");
    assert_eq!(
        p.metric(r#"pgtether_client_login_failures_total{reason="auth_query"}"#)
            .await,
        Some(1.0)
    );
    assert_eq!(
        p.metric(r#"pgtether_auth_query_total{result="error"}"#)
            .await,
        Some(1.0)
    );
    let log = p.log();
    assert!(
        log.contains("auth_query lookup failed") && log.contains("pgtether_auth"),
        "{log}"
    );
    for secret in ["wrong-lookup-pw", "alicepw", "SCRAM-SHA-256$"] {
        assert!(!log.contains(secret), "the log shows {secret}: {log}");
    }
}

#[tokio::test]
async fn answers_are_cached() {
    let p = start("authpw");
    for _ in 0..3 {
        let c = p.connect_as("aq_alice", "alicepw").await.unwrap();
        assert_eq!(value(&c, "SELECT 1").await.unwrap(), "1");
    }
    assert_eq!(
        p.metric(r#"pgtether_auth_query_total{result="found"}"#)
            .await,
        Some(1.0)
    );
    assert_eq!(
        p.metric(r#"pgtether_auth_query_total{result="cached"}"#)
            .await,
        Some(2.0)
    );
    // A wrong password is checked against the cached verifier too.
    assert_eq!(refusal(p.connect_as("aq_alice", "bad").await).0, "28P01");
    // Unknown users are remembered as well.
    for _ in 0..2 {
        assert_eq!(refusal(p.connect_as("aq_ghost", "x").await).0, "28P01");
    }
    assert_eq!(
        p.metric(r#"pgtether_auth_query_total{result="not_found"}"#)
            .await,
        Some(1.0)
    );
    assert_eq!(
        p.metric(r#"pgtether_auth_query_total{result="found"}"#)
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn users_in_the_config_are_not_looked_up() {
    let p = start("authpw");
    let c = p.connect_as("app", "app").await.unwrap();
    assert_eq!(value(&c, "SELECT current_user").await.unwrap(), "app");
    let (_, body) = p.http_get("/metrics").await;
    assert!(
        !body
            .lines()
            .any(|l| l.starts_with("pgtether_auth_query_total{")),
        "{body}"
    );
}

#[tokio::test]
async fn scram_verifier_cannot_check_an_md5_login() {
    setup();
    let p = Pgtether::start(Opts {
        auth: "md5",
        auth_extra: "user = \"pgtether_auth\"\n\
                     query = \"SELECT usename, passwd FROM pgtether_auth.user_lookup($1)\"\n"
            .into(),
        extra: "[users.pgtether_auth]\npassword = \"authpw\"\n".into(),
        ..Opts::default()
    });
    // As PostgreSQL does: the md5 exchange runs and fails like a wrong password.
    let (code, message) = refusal(p.connect_as("aq_alice", "alicepw").await);
    assert_eq!(code, "28P01");
    assert_eq!(
        message,
        "password authentication failed for user \"aq_alice\""
    );
}

/// A database reached over PostgreSQL's Unix-domain socket: the lookup (tokio-postgres) and
/// the user's own server connections go through the socket. (The test cluster trusts local
/// connections, so this checks the path, not the upstream password exchange.)
#[tokio::test]
async fn lookups_and_logins_use_the_upstream_unix_socket() {
    setup();
    let pg = common::cluster();
    let p = Pgtether::start(Opts {
        auth_extra: "user = \"pgtether_auth\"\n\
                     query = \"SELECT usename, passwd FROM pgtether_auth.user_lookup($1)\"\n"
            .into(),
        extra: format!(
            "[users.pgtether_auth]\npassword = \"authpw\"\n\
             [databases.viaunix]\nhost = \"{}\"\nport = {}\ndbname = \"app\"\n",
            pg.dir.display(),
            pg.port
        ),
        ..Opts::default()
    });
    let url = p
        .url("aq_alice", "alicepw")
        .replace("dbname=app", "dbname=viaunix");
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(value(&c, "SELECT current_user").await.unwrap(), "aq_alice");
    assert_eq!(
        value(&c, "SELECT coalesce(inet_client_addr()::text, 'local')")
            .await
            .unwrap(),
        "local"
    );
    // The wrong password is still refused: the lookup found the real one.
    let bad = p
        .url("aq_alice", "nope")
        .replace("dbname=app", "dbname=viaunix");
    let e = tokio_postgres::connect(&bad, tokio_postgres::NoTls)
        .await
        .err()
        .expect("refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e:?}");
    let found = p
        .metric(r#"pgtether_auth_query_total{result="found"}"#)
        .await
        .unwrap_or(0.0);
    assert!(found >= 1.0, "lookups that found the user: {found}");
}
