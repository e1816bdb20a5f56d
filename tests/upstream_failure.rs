//! When the server connection dies under a client (a restarted or failed-over database, a
//! killed backend): transaction-mode clients keep their connection and session, the work in
//! flight fails with 08006, a failed transaction block stays failed until the client ends it;
//! state that lived only on that server is reported lost with FATAL.

mod common;

use std::time::Duration;

use common::{direct_sql, msg, sqlstate, value, Opts, Pgtether, Raw};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::Message;

fn kill_backend(pid: &str) {
    direct_sql(&format!("SELECT pg_terminate_backend({pid})"));
}

#[tokio::test]
async fn transaction_block_fails_then_the_client_carries_on() {
    let p = Pgtether::start(Opts::default());
    let c = p.connect().await;
    c.batch_execute("SET myapp.kept = 'yes'").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    let pid = value(&c, "SELECT pg_backend_pid()").await.unwrap();
    kill_backend(&pid);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let err = value(&c, "SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err:?}");
    let err = value(&c, "SELECT 2").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("25P02"), "{err:?}");
    // COMMIT of a failed transaction rolls back, as on PostgreSQL.
    let msgs = c.simple_query("COMMIT").await.unwrap();
    assert!(matches!(
        msgs.last(),
        Some(tokio_postgres::SimpleQueryMessage::CommandComplete(_))
    ));
    // The same client connection goes on, with its session state, on a new server connection.
    assert_eq!(
        value(&c, "SELECT current_setting('myapp.kept')")
            .await
            .unwrap(),
        "yes"
    );
    assert_ne!(value(&c, "SELECT pg_backend_pid()").await.unwrap(), pid);
}

#[tokio::test]
async fn query_in_flight_fails_with_08006_and_the_connection_stays() {
    let p = Pgtether::start(Opts::default());
    let c = p.connect().await;
    let pid = value(&c, "SELECT pg_backend_pid()").await.unwrap();
    let probe = p.connect().await;
    let q = tokio::spawn(async move {
        let r = c.simple_query("SELECT pg_sleep(5)").await;
        (c, r)
    });
    // Find the backend running the sleep and kill it.
    let started = std::time::Instant::now();
    let sleeping = loop {
        let pid = direct_sql(
            "SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(5)' AND state = 'active' LIMIT 1",
        );
        if !pid.is_empty() {
            break pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "the sleeping backend never showed in pg_stat_activity"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    kill_backend(&sleeping);
    let (c, r) = q.await.unwrap();
    let err = r.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err:?}");
    assert_eq!(value(&c, "SELECT 40 + 2").await.unwrap(), "42");
    let _ = (pid, probe);
}

/// Runs `setup` on a raw client (trust auth) holding a server connection, kills that
/// connection's backend, and returns the (severity, code, message) pgtether then sends.
async fn fatal_after_backend_dies(mode: &'static str, setup: &str) -> (String, String, String) {
    let p = Pgtether::start(Opts {
        mode,
        auth: "trust",
        ..Opts::default()
    });
    let mut raw = Raw::login_trust(p.port, "app").await;
    let sql = format!("{setup}; SELECT pg_backend_pid()\0");
    raw.send(&msg(b'Q', sql.as_bytes())).await;
    let mut pid = None;
    loop {
        match raw.recv().await {
            Message::DataRow(row) => {
                let mut it = row.ranges();
                let r = it.next().unwrap().unwrap().unwrap();
                pid = Some(String::from_utf8_lossy(&row.buffer()[r]).into_owned());
            }
            Message::ReadyForQuery(_) => break,
            Message::ErrorResponse(_) => panic!("setup failed"),
            _ => {}
        }
    }
    kill_backend(&pid.expect("a backend pid"));
    // pgtether tells the client on its own, without waiting for its next query.
    raw.expect_error().await
}

#[tokio::test]
async fn session_mode_client_is_told_its_session_is_gone() {
    let (severity, code, message) = fatal_after_backend_dies("session", "SELECT 1").await;
    assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "08006"));
    assert!(message.contains("session"), "{message}");
}

#[tokio::test]
async fn pinned_client_is_told_what_was_lost() {
    let (severity, code, message) =
        fatal_after_backend_dies("transaction", "LISTEN lost_channel").await;
    assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "08006"));
    assert!(message.contains("listen"), "{message}");
}

#[tokio::test]
async fn readiness_follows_upstream_reachability() {
    let p = Pgtether::start(Opts {
        extra: "[databases.down]\nhost = \"127.0.0.1\"\nport = 1\n".into(),
        ..Opts::default()
    });
    assert_eq!(
        p.http_get("/readyz").await.0,
        200,
        "ready before any upstream was tried"
    );
    let url = format!(
        "host=127.0.0.1 port={} user=app password=app dbname=down",
        p.port
    );
    let Err(err) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
        panic!("login to an unreachable upstream succeeded");
    };
    assert_eq!(sqlstate(&err).as_deref(), Some("08001"), "{err:?}");
    assert_eq!(
        p.metric(r#"pgtether_upstream_up{database="down",user="app"}"#)
            .await,
        Some(0.0)
    );
    assert_eq!(p.http_get("/readyz").await.0, 503, "no upstream reachable");
    // Once a reachable upstream is in use, pgtether is ready again.
    let c = p.connect().await;
    value(&c, "SELECT 1").await.unwrap();
    assert_eq!(p.http_get("/readyz").await.0, 200);
    // And the time clients hold server connections is measured.
    let (_, body) = p.http_get("/metrics").await;
    assert!(body.contains("pgtether_transaction_seconds_count{database=\"app\",user=\"app\"}"));
}

/// A TCP proxy in front of the test cluster that can take the "database" down and bring it
/// back on the same port, as a restart or failover does.
struct Proxy {
    port: u16,
    up: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    async fn start() -> Proxy {
        let port = pgtether::embedded::free_port().unwrap();
        let target = common::cluster().port;
        let (up, mut rx) = tokio::sync::watch::channel(true);
        tokio::spawn(async move {
            loop {
                while !*rx.borrow() {
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .unwrap();
                let mut conns = Vec::new();
                loop {
                    tokio::select! {
                        r = listener.accept() => {
                            let (mut client, _) = r.unwrap();
                            conns.push(tokio::spawn(async move {
                                if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                                }
                            }));
                        }
                        _ = rx.changed() => {
                            if !*rx.borrow() {
                                // Down: refuse new connections, cut the open ones.
                                for c in conns.drain(..) {
                                    c.abort();
                                }
                                break;
                            }
                        }
                    }
                }
            }
        });
        Proxy { port, up }
    }

    fn set_up(&self, up: bool) {
        self.up.send(up).unwrap();
    }
}

fn proxied_opts(proxy: &Proxy, acquire_timeout: &'static str) -> Opts {
    Opts {
        acquire_timeout,
        extra: format!(
            "[databases.proxied]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"app\"\n",
            proxy.port
        ),
        ..Opts::default()
    }
}

async fn connect_proxied(p: &Pgtether) -> tokio_postgres::Client {
    let url = format!(
        "host=127.0.0.1 port={} user=app password=app dbname=proxied",
        p.port
    );
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

#[tokio::test]
async fn new_transactions_wait_for_the_upstream_to_come_back() {
    let proxy = Proxy::start().await;
    let p = Pgtether::start(proxied_opts(&proxy, "10s"));
    let c = connect_proxied(&p).await;
    c.batch_execute("SET myapp.v = 'kept'").await.unwrap();
    assert_eq!(value(&c, "SELECT 1").await.unwrap(), "1");

    proxy.set_up(false);
    // Idle longer than server_check_delay, so the dead pooled connection is noticed.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let started = std::time::Instant::now();
    let q = tokio::spawn(async move {
        let r = value(&c, "SELECT current_setting('myapp.v')").await;
        (c, r)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.set_up(true);
    let (_c, r) = q.await.unwrap();
    assert_eq!(
        r.unwrap(),
        "kept",
        "the client's setting was replayed on the new connection"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "the query waited for the upstream"
    );
}

#[tokio::test]
async fn upstream_down_past_acquire_timeout_fails_the_statement_not_the_client() {
    let proxy = Proxy::start().await;
    let p = Pgtether::start(proxied_opts(&proxy, "800ms"));
    let c = connect_proxied(&p).await;
    assert_eq!(value(&c, "SELECT 1").await.unwrap(), "1");
    proxy.set_up(false);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let err = value(&c, "SELECT 2").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("08001"), "{err:?}");
    assert_eq!(err.as_db_error().unwrap().severity(), "ERROR");
    proxy.set_up(true);
    let r = value(&c, "SELECT 3").await;
    assert!(r.is_ok(), "{r:?}\n{}", p.log());
    assert_eq!(r.unwrap(), "3", "the same client goes on");
}
