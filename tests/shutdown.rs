//! Stopping: SIGTERM lets transactions in progress finish, closes idle clients with 57P01 and
//! stops accepting; SIGINT stops at once.

mod common;

use std::time::{Duration, Instant};

use common::{sqlstate, value, Opts, Pgtether};

fn signal(p: &Pgtether, sig: i32) {
    // SAFETY: kill(2) on the pgtether child this test started.
    unsafe {
        libc::kill(p.pid() as i32, sig);
    }
}

#[tokio::test]
async fn sigterm_drains_transactions_and_closes_idle_clients() {
    let mut p = Pgtether::start(Opts {
        size: 2,
        extra: "[runtime]\nshutdown_timeout = \"10s\"\n".into(),
        ..Opts::default()
    });
    let busy = p.connect().await;
    let idle = p.connect().await;
    value(&idle, "SELECT 1").await.unwrap();
    busy.batch_execute("DROP TABLE IF EXISTS drained; CREATE TABLE drained(x int)")
        .await
        .unwrap();
    busy.batch_execute("BEGIN; INSERT INTO drained VALUES (1)")
        .await
        .unwrap();

    signal(&p, libc::SIGTERM);
    // Not ready any more, and no new clients.
    let started = Instant::now();
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", p.port)).is_err() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still accepting after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The idle client was told to reconnect.
    let err = value(&idle, "SELECT 1").await.unwrap_err();
    assert!(
        sqlstate(&err).as_deref() == Some("57P01") || err.is_closed(),
        "idle client: {err:?}"
    );
    // The transaction in progress finishes and commits.
    busy.batch_execute("INSERT INTO drained VALUES (2); COMMIT")
        .await
        .unwrap();
    let rows = common::direct_sql("SELECT count(*) FROM drained");
    assert_eq!(rows, "2");
    let status = p
        .wait_exit(Duration::from_secs(10))
        .expect("pgtether exits after draining");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn sigint_stops_at_once() {
    let mut p = Pgtether::start(Opts::default());
    let c = p.connect().await;
    c.batch_execute("BEGIN").await.unwrap();
    let started = Instant::now();
    signal(&p, libc::SIGINT);
    let status = p.wait_exit(Duration::from_secs(5)).expect("pgtether exits");
    assert!(status.success());
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(c.batch_execute("COMMIT").await.is_err());
}
