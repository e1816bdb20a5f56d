//! Limits on what one client (or one user, or one address) may take: connections per user and
//! per address (53300), the back-off after failed logins from an address (28P01), and the idle
//! timeouts (FATAL 57P05 outside a transaction block, 25P03 inside one, with the transaction
//! rolled back). Each test checks that another client connected at the same time keeps working.

mod common;

use std::time::{Duration, Instant};

use common::{direct_sql, msg, sqlstate, value, Opts, Pgtether, Raw};
use postgres_protocol::message::backend::Message;

/// The SQLSTATE and message of a refused login.
fn refusal(r: Result<tokio_postgres::Client, tokio_postgres::Error>) -> (String, String) {
    match r {
        Ok(_) => panic!("login was accepted"),
        Err(e) => (
            sqlstate(&e).unwrap_or_else(|| panic!("no SQLSTATE in {e}")),
            e.as_db_error().map(|d| d.message().to_string()).unwrap(),
        ),
    }
}

/// Expects FATAL `code` (returning its message), then the connection closing.
async fn expect_fatal(raw: &mut Raw, code: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match raw.try_recv(left).await {
            Ok(Some(Message::ErrorResponse(body))) => {
                let (severity, c, message) = common::error_fields(&body);
                assert_eq!(
                    (severity.as_str(), c.as_str()),
                    ("FATAL", code),
                    "{message}"
                );
                match raw.try_recv(Duration::from_secs(10)).await {
                    Ok(None) => return message,
                    Ok(Some(_)) => panic!("a message after the FATAL error"),
                    Err(()) => panic!("connection still open 10 s after the FATAL error"),
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("connection closed without an error"),
            Err(()) => panic!("no FATAL {code} within {within:?}"),
        }
    }
}

/// Sends a simple query and reads up to its ReadyForQuery; returns that status.
async fn simple(raw: &mut Raw, sql: &str) -> u8 {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    raw.send(&msg(b'Q', &body)).await;
    loop {
        match raw.recv().await {
            Message::ReadyForQuery(r) => return r.status(),
            Message::ErrorResponse(body) => panic!("{sql}: {:?}", common::error_fields(&body)),
            _ => {}
        }
    }
}

/// Retries a login for a few seconds (a closed client's slot comes back asynchronously).
async fn eventually_connects(p: &Pgtether, src: &str) -> tokio_postgres::Client {
    let started = Instant::now();
    loop {
        match p.connect_from(src, "app", "app").await {
            Ok(c) => return c,
            Err(e) if started.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("still refused after 10 s: {e}"),
        }
    }
}

#[tokio::test]
async fn max_clients_per_user_refuses_with_53300() {
    let p = Pgtether::start(Opts {
        extra: "[limits]\nmax_clients_per_user = 2\n".into(),
        ..Opts::default()
    });
    let a = p.connect().await;
    let b = p.connect().await;
    let (code, message) = refusal(p.connect_as("app", "app").await);
    assert_eq!(code, "53300", "{message}");
    assert!(
        message.contains("user \"app\"") && message.contains("max_clients_per_user = 2"),
        "{message}"
    );
    // Another user logs in meanwhile, and the two connected clients keep working.
    let other = p.connect_as("tether_trust", "trustpw").await.unwrap();
    assert_eq!(value(&other, "SELECT 1").await.unwrap(), "1");
    assert_eq!(value(&a, "SELECT 2").await.unwrap(), "2");
    assert_eq!(value(&b, "SELECT 3").await.unwrap(), "3");
    assert_eq!(
        p.metric("pgtether_clients_rejected_total{reason=\"max_clients_per_user\"}")
            .await,
        Some(1.0)
    );
    // The password is checked before the user's slots are counted: a wrong one is told so.
    let (code, message) = refusal(p.connect_as("app", "wrong").await);
    assert_eq!(code, "28P01", "{message}");
    // A slot comes back when a client leaves.
    drop(a);
    let c = eventually_connects(&p, "127.0.0.1").await;
    assert_eq!(value(&c, "SELECT 4").await.unwrap(), "4");
}

#[tokio::test]
async fn max_clients_per_addr_refuses_with_53300() {
    let p = Pgtether::start(Opts {
        extra: "[limits]\nmax_clients_per_addr = 2\n".into(),
        ..Opts::default()
    });
    let a = p.connect_from("127.0.0.2", "app", "app").await.unwrap();
    // A connection that has not logged in yet counts too.
    let half_open = Raw::connect_from(p.port, "127.0.0.2").await;
    // Give pgtether the time to see the half-open connection: it is counted once its startup
    // packet is in, so send one and let it wait for the password.
    let mut half_open = half_open;
    half_open
        .startup(&[("user", "app"), ("database", "app")])
        .await;
    assert!(matches!(
        half_open.recv().await,
        Message::AuthenticationSasl(_)
    ));
    let (code, message) = refusal(p.connect_from("127.0.0.2", "app", "app").await);
    assert_eq!(code, "53300", "{message}");
    assert!(
        message.contains("127.0.0.2") && message.contains("max_clients_per_addr = 2"),
        "{message}"
    );
    // Other addresses are not limited by it, and the connected client keeps working.
    let mut others = Vec::new();
    for src in ["127.0.0.1", "127.0.0.1", "127.0.0.3"] {
        others.push(p.connect_from(src, "app", "app").await.unwrap());
    }
    for (i, c) in others.iter().enumerate() {
        assert_eq!(
            value(c, &format!("SELECT {i}")).await.unwrap(),
            i.to_string()
        );
    }
    assert_eq!(value(&a, "SELECT 5").await.unwrap(), "5");
    assert_eq!(
        p.metric("pgtether_clients_rejected_total{reason=\"max_clients_per_addr\"}")
            .await,
        Some(1.0)
    );
    // The slot comes back when the half-open connection goes away.
    drop(half_open);
    let b = eventually_connects(&p, "127.0.0.2").await;
    assert_eq!(value(&b, "SELECT 6").await.unwrap(), "6");
}

#[tokio::test]
async fn failed_logins_make_an_address_back_off() {
    let p = Pgtether::start(Opts {
        extra: "[limits]\nauth_failures_before_backoff = 3\nauth_failure_window = \"1m\"\nauth_backoff = \"2s\"\n".into(),
        ..Opts::default()
    });
    let bystander = p.connect().await;
    for _ in 0..3 {
        let (code, message) = refusal(p.connect_from("127.0.0.2", "app", "wrong").await);
        assert_eq!(code, "28P01", "{message}");
        assert!(
            message.contains("password authentication failed"),
            "{message}"
        );
    }
    // Now even the right password is refused, without being checked, and says why.
    let (code, message) = refusal(p.connect_from("127.0.0.2", "app", "app").await);
    assert_eq!(code, "28P01", "{message}");
    assert!(
        message.contains("too many failed logins from address 127.0.0.2")
            && message.contains("auth_failures_before_backoff = 3"),
        "{message}"
    );
    // Other addresses are not held back, and connected clients keep working.
    let other = p.connect_from("127.0.0.1", "app", "app").await.unwrap();
    assert_eq!(value(&other, "SELECT 1").await.unwrap(), "1");
    assert_eq!(value(&bystander, "SELECT 2").await.unwrap(), "2");
    assert_eq!(
        p.metric("pgtether_client_login_failures_total{reason=\"auth_backoff\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        p.metric("pgtether_client_login_failures_total{reason=\"wrong_password\"}")
            .await,
        Some(3.0)
    );
    // The back-off ends; a successful login clears the record.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let c = p.connect_from("127.0.0.2", "app", "app").await.unwrap();
    assert_eq!(value(&c, "SELECT 3").await.unwrap(), "3");
}

#[tokio::test]
async fn idle_client_is_closed_with_57p05() {
    let p = Pgtether::start(Opts {
        auth: "trust",
        extra: "[limits]\nclient_idle_timeout = \"2s\"\n".into(),
        ..Opts::default()
    });
    let busy = p.connect_as("app", "unused").await.unwrap();
    let mut idle = Raw::login_trust(p.port, "app").await;
    assert_eq!(simple(&mut idle, "SELECT 1").await, b'I');
    let started = Instant::now();
    // The busy client keeps working meanwhile (it is never idle for long).
    let keep_busy = async {
        while started.elapsed() < Duration::from_secs(3) {
            assert_eq!(value(&busy, "SELECT 1").await.unwrap(), "1");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let (message, ()) = tokio::join!(
        expect_fatal(&mut idle, "57P05", Duration::from_secs(15)),
        keep_busy
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "closed after {:?}",
        started.elapsed()
    );
    assert!(message.contains("client_idle_timeout = 2s"), "{message}");
    assert_eq!(value(&busy, "SELECT 2").await.unwrap(), "2");
    assert_eq!(
        p.metric("pgtether_client_idle_timeouts_total{reason=\"client_idle\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn idle_session_mode_client_holding_a_server_is_closed_with_57p05() {
    let p = Pgtether::start(Opts {
        auth: "trust",
        mode: "session",
        size: 2,
        extra: "[limits]\nclient_idle_timeout = \"1s\"\n".into(),
        ..Opts::default()
    });
    let mut idle = Raw::login_trust(p.port, "app").await;
    // In session mode the client holds its server connection from the first query: it waits
    // in the relay, not in the idle loop.
    assert_eq!(
        simple(&mut idle, "SET application_name = 'idler'").await,
        b'I'
    );
    let message = expect_fatal(&mut idle, "57P05", Duration::from_secs(15)).await;
    assert!(message.contains("client_idle_timeout = 1s"), "{message}");
    // Its server connection was cleaned and serves the next client.
    let c = p.connect_as("app", "unused").await.unwrap();
    assert_eq!(value(&c, "SELECT 1").await.unwrap(), "1");
}

#[tokio::test]
async fn idle_in_transaction_is_closed_with_25p03_and_rolled_back() {
    let table = "limits_idle_tx";
    direct_sql(&format!(
        "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (n int); GRANT ALL ON {table} TO app"
    ));
    let p = Pgtether::start(Opts {
        auth: "trust",
        size: 1,
        extra: "[limits]\nidle_transaction_timeout = \"1s\"\n".into(),
        ..Opts::default()
    });
    // Idle outside a transaction: this limit does not apply.
    let bystander = p.connect_as("app", "unused").await.unwrap();
    let mut idle = Raw::login_trust(p.port, "app").await;
    assert_eq!(simple(&mut idle, "BEGIN").await, b'T');
    assert_eq!(
        simple(&mut idle, &format!("INSERT INTO {table} VALUES (1)")).await,
        b'T'
    );
    let message = expect_fatal(&mut idle, "25P03", Duration::from_secs(15)).await;
    assert!(
        message.contains("idle_transaction_timeout = 1s") && message.contains("rolled back"),
        "{message}"
    );
    // The only server connection came back clean: the insert was rolled back, nothing is left
    // idle in transaction, and the bystander (idle for longer than the limit, but outside a
    // transaction) gets it.
    assert_eq!(
        value(&bystander, &format!("SELECT count(*) FROM {table}"))
            .await
            .unwrap(),
        "0"
    );
    assert_eq!(
        direct_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND state LIKE 'idle in transaction%'"
        ),
        "0"
    );
    assert_eq!(value(&bystander, "SELECT 1").await.unwrap(), "1");
    assert_eq!(
        p.metric("pgtether_client_idle_timeouts_total{reason=\"idle_in_transaction\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn a_failed_transaction_left_idle_is_closed_too() {
    let p = Pgtether::start(Opts {
        auth: "trust",
        size: 2,
        extra: "[limits]\nidle_transaction_timeout = \"1s\"\n".into(),
        ..Opts::default()
    });
    let busy = p.connect_as("app", "unused").await.unwrap();
    let mut idle = Raw::login_trust(p.port, "app").await;
    assert_eq!(simple(&mut idle, "BEGIN").await, b'T');
    // An error inside the block: status E.
    idle.send(&msg(b'Q', b"SELECT 1/0\0")).await;
    loop {
        if let Message::ReadyForQuery(r) = idle.recv().await {
            assert_eq!(r.status(), b'E');
            break;
        }
    }
    let (message, busy_result) = tokio::join!(
        expect_fatal(&mut idle, "25P03", Duration::from_secs(15)),
        async {
            // A transaction of the other client runs meanwhile.
            let t = busy.simple_query("BEGIN; SELECT 1; COMMIT").await;
            t.map(|_| ())
        }
    );
    busy_result.unwrap();
    assert!(message.contains("idle_transaction_timeout"), "{message}");
    assert_eq!(value(&busy, "SELECT 2").await.unwrap(), "2");
}

#[tokio::test]
async fn timeouts_are_off_by_default() {
    let p = Pgtether::start(Opts {
        auth: "trust",
        ..Opts::default()
    });
    let mut idle = Raw::login_trust(p.port, "app").await;
    assert_eq!(simple(&mut idle, "BEGIN").await, b'T');
    assert!(
        idle.try_recv(Duration::from_secs(2)).await.is_err(),
        "something arrived on an idle connection"
    );
    assert_eq!(simple(&mut idle, "COMMIT").await, b'I');
}
