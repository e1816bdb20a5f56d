//! The database restarts (`pg_ctl restart -m fast`) under pgtether: clients between
//! transactions keep their connections and session state; under load, only the transactions
//! in flight fail and no client connection is lost. One test, because it restarts the cluster
//! this test binary shares.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{cluster, value, Opts, Pgtether};

fn restart_upstream() {
    cluster()
        .pg_ctl(&["restart", "-m", "fast"])
        .unwrap_or_else(|e| panic!("pg_ctl restart: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_database_restarts() {
    let p = Pgtether::start(Opts {
        size: 10,
        acquire_timeout: "20s",
        ..Opts::default()
    });

    // 50 idle clients with settings and prepared statements.
    let mut clients = Vec::new();
    for i in 0..50 {
        let c = p.connect().await;
        c.batch_execute(&format!("SET application_name = 'idle{i}'"))
            .await
            .unwrap();
        let st = c.prepare(&format!("SELECT $1::int * {i}")).await.unwrap();
        clients.push((c, st));
    }
    let series = "pgtether_server_connects_total{database=\"app\",user=\"app\"}";
    let opened_before = p.metric(series).await.unwrap_or(0.0);
    restart_upstream();
    // Connections the restart killed are noticed before reuse (their sockets became
    // readable), so no statement meets one.
    let mut first_failures = 0;
    for (i, (c, st)) in clients.iter().enumerate() {
        let name = match value(c, "SHOW application_name").await {
            Ok(name) => name,
            Err(e) => {
                assert_eq!(common::sqlstate(&e).as_deref(), Some("08006"), "{e:?}");
                first_failures += 1;
                value(c, "SHOW application_name").await.unwrap()
            }
        };
        assert_eq!(name, format!("idle{i}"));
        let row = c.query_one(st, &[&2i32]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 2 * i as i32);
        assert!(!c.is_closed());
    }
    assert!(
        first_failures == 0,
        "{first_failures} clients met a dead connection"
    );
    assert!(
        p.metric(series).await.unwrap_or(0.0) > opened_before,
        "the reconnects are counted"
    );

    // Under load: 20 clients run transactions in a loop while the database restarts.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for (c, _) in clients.into_iter().take(20) {
        let stop = stop.clone();
        let failed = failed.clone();
        workers.push(tokio::spawn(async move {
            let mut ok = 0usize;
            while !stop.load(Ordering::Relaxed) {
                match c
                    .batch_execute("BEGIN; SELECT pg_sleep(0.005); COMMIT")
                    .await
                {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        let code = common::sqlstate(&e);
                        assert!(
                            matches!(code.as_deref(), Some("08006" | "57P01" | "25P02")),
                            "unexpected error: {e:?}"
                        );
                        failed.fetch_add(1, Ordering::Relaxed);
                        // The failed transaction block (if any) is ended by the client.
                        let _ = c.batch_execute("ROLLBACK").await;
                    }
                }
            }
            (c, ok)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    restart_upstream();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let (c, ok) = w.await.expect("worker ran without panicking");
        assert!(!c.is_closed(), "no client connection is lost");
        assert_eq!(value(&c, "SELECT 1::text").await.unwrap(), "1");
        total += ok;
    }
    let failed = failed.load(Ordering::Relaxed);
    assert!(total > 100, "transactions ran: {total}");
    assert!(
        failed <= 21,
        "only the transactions in flight fail (one per client, and one that met a dead pooled connection): {failed}"
    );

    // Leave a server this binary's process owns no more: stop what pg_ctl started.
    let _ = cluster().pg_ctl(&["stop", "-m", "fast"]);
}
