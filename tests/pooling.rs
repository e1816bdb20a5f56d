//! Pooling behaviour: sharing in transaction mode, exhaustion, session reset, statement mode,
//! dirty disconnects, broken server connections, cancel forwarding.

mod common;

use std::time::{Duration, Instant};

use common::{
    cancel_running_sleep, direct_sql, server_connections, sqlstate, value, Opts, Pgtether,
};

/// pgtether with a pool of one server connection, held by the returned client inside an open
/// transaction: everyone else waits for it.
async fn pool_of_one_held(acquire_timeout: &'static str) -> (Pgtether, tokio_postgres::Client) {
    let p = Pgtether::start(Opts {
        size: 1,
        acquire_timeout,
        ..Opts::default()
    });
    let holder = p.connect().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    (p, holder)
}

#[tokio::test]
async fn transaction_mode_shares_few_server_connections() {
    let p = Pgtether::start(Opts {
        size: 2,
        ..Opts::default()
    });
    // A user no other test in this binary uses, so pg_stat_activity counts only this pool.
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(p.connect_as("tether_trust", "trustpw").await.unwrap());
    }
    let mut tasks = Vec::new();
    for c in clients.iter() {
        tasks.push(async move {
            for _ in 0..20 {
                // Unnamed statement, pipelined Parse/Bind/Describe/Execute/Sync.
                let rows = c
                    .query_typed(
                        "SELECT 1 + $1::int",
                        &[(&1i32, tokio_postgres::types::Type::INT4)],
                    )
                    .await
                    .unwrap();
                assert_eq!(rows[0].get::<_, i32>(0), 2);
            }
        });
    }
    futures_util::future::join_all(tasks).await;
    let n = server_connections("tether_trust");
    assert!(
        (1..=2).contains(&n),
        "expected at most 2 server connections, saw {n}"
    );
    p.metric_settles(
        r#"pgtether_transactions_total{database="app",user="tether_trust"}"#,
        |tx| tx >= 200.0,
    )
    .await;
}

#[tokio::test]
async fn a_transaction_stays_on_one_server_connection() {
    let p = Pgtether::start(Opts {
        size: 3,
        ..Opts::default()
    });
    let a = p.connect().await;
    let b = p.connect().await;
    a.batch_execute("BEGIN").await.unwrap();
    let pid1: String = value(&a, "SELECT pg_backend_pid()").await.unwrap();
    // Another client's work in between must not take a's connection.
    for _ in 0..5 {
        value(&b, "SELECT 1").await.unwrap();
    }
    let pid2: String = value(&a, "SELECT pg_backend_pid()").await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(pid1, pid2);
}

#[tokio::test]
async fn full_pool_waits_then_answers_53300_naming_the_pool() {
    let (p, holder) = pool_of_one_held("300ms").await;
    let waiter = p.connect().await;
    let started = Instant::now();
    let err = value(&waiter, "SELECT 1").await.unwrap_err();
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "did not wait"
    );
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err:?}");
    let text = err.as_db_error().unwrap().message().to_string();
    assert!(text.contains("app.app"), "message names the pool: {text}");
    // Once the holder commits, new clients get through.
    holder.batch_execute("COMMIT").await.unwrap();
    let c = p.connect().await;
    value(&c, "SELECT 1").await.unwrap();
    assert!(p
        .metric(r#"pgtether_pool_acquire_timeouts_total{database="app",user="app"}"#)
        .await
        .is_some_and(|v| v >= 1.0));
}

#[tokio::test]
async fn waiting_client_gets_the_connection_when_it_frees_up() {
    let (p, holder) = pool_of_one_held("5s").await;
    let waiter = p.connect().await;
    let q = tokio::spawn(async move { value(&waiter, "SELECT 42").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(q.await.unwrap().unwrap(), "42");
}

#[tokio::test]
async fn a_waiting_client_gets_the_room_of_a_closed_connection() {
    let (p, holder) = pool_of_one_held("10s").await;
    let pid: String = value(&holder, "SELECT pg_backend_pid()").await.unwrap();
    let waiter = p.connect().await;
    let started = Instant::now();
    let q = tokio::spawn(async move { value(&waiter, "SELECT 42").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The holder's connection dies and is closed: its room goes to the waiting client,
    // which opens a new connection instead of waiting out acquire_timeout.
    direct_sql(&format!("SELECT pg_terminate_backend({pid})"));
    assert_eq!(q.await.unwrap().unwrap(), "42");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the waiter waited {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn waiting_clients_are_served_in_turn_when_one_gives_up() {
    let (p, holder) = pool_of_one_held("10s").await;
    // The first waiter leaves while waiting; the second must not be left behind.
    let (quitter, conn) = tokio_postgres::connect(&p.url("app", "app"), tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let gone = tokio::spawn(async move { value(&quitter, "SELECT pg_sleep(0.5)").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    gone.abort();
    conn.abort();
    let waiter = p.connect().await;
    let started = Instant::now();
    let q = tokio::spawn(async move { value(&waiter, "SELECT 42").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(q.await.unwrap().unwrap(), "42");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn session_mode_resets_the_connection_with_discard_all() {
    let p = Pgtether::start(Opts {
        mode: "session",
        size: 1,
        ..Opts::default()
    });
    let a = p.connect().await;
    a.batch_execute("CREATE TEMP TABLE leftover(x int); SET statement_timeout = '123s'")
        .await
        .unwrap();
    let pid_a: String = value(&a, "SELECT pg_backend_pid()").await.unwrap();
    drop(a);
    // The next client gets the same (only) server connection, without a's state.
    let b = loop {
        let b = p.connect().await;
        match value(&b, "SELECT pg_backend_pid()").await {
            Ok(_) => break b,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let pid_b: String = value(&b, "SELECT pg_backend_pid()").await.unwrap();
    assert_eq!(pid_a, pid_b, "pool of one reuses the connection");
    let timeout: String = value(&b, "SHOW statement_timeout").await.unwrap();
    assert_eq!(timeout, "0");
    let err = value(&b, "SELECT * FROM leftover").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42P01"));
}

#[tokio::test]
async fn session_mode_keeps_the_connection_for_the_whole_session() {
    let p = Pgtether::start(Opts {
        mode: "session",
        size: 2,
        ..Opts::default()
    });
    let a = p.connect().await;
    a.batch_execute("SET application_name = 'mine'")
        .await
        .unwrap();
    let b = p.connect().await;
    value(&b, "SELECT 1").await.unwrap();
    let name: String = value(&a, "SHOW application_name").await.unwrap();
    assert_eq!(name, "mine");
}

#[tokio::test]
async fn statement_mode_refuses_transaction_blocks() {
    let p = Pgtether::start(Opts {
        mode: "statement",
        size: 1,
        ..Opts::default()
    });
    let c = p.connect().await;
    assert_eq!(value(&c, "SELECT 7").await.unwrap(), "7");
    let err = c.batch_execute("BEGIN").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"), "{err:?}");
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("statement pooling mode"));
    // The connection was rolled back: a write is not inside a leftover transaction block.
    let other = p.connect().await;
    let in_block = value(&other, "SELECT count(*) FROM pg_stat_activity WHERE pid = pg_backend_pid() AND xact_start < statement_timestamp()").await.unwrap();
    assert_eq!(in_block, "0", "server connection still in a transaction");
    assert_eq!(value(&c, "SELECT 8").await.unwrap(), "8");
}

#[tokio::test]
async fn disconnect_mid_transaction_rolls_back() {
    let p = Pgtether::start(Opts {
        size: 1,
        ..Opts::default()
    });
    let setup = p.connect().await;
    setup
        .batch_execute("DROP TABLE IF EXISTS dirty_tx; CREATE TABLE dirty_tx(x int)")
        .await
        .unwrap();
    drop(setup);
    let a = p.connect().await;
    a.batch_execute("BEGIN; INSERT INTO dirty_tx VALUES (1)")
        .await
        .unwrap();
    drop(a);
    let b = p.connect().await;
    let n: String = value(&b, "SELECT count(*) FROM dirty_tx").await.unwrap();
    assert_eq!(
        n, "0",
        "the abandoned insert must not be visible or committed"
    );
    // b is not inside a's transaction: its own BEGIN works without a warning state.
    b.batch_execute("BEGIN; INSERT INTO dirty_tx VALUES (2); COMMIT")
        .await
        .unwrap();
    let n: String = value(&b, "SELECT count(*) FROM dirty_tx").await.unwrap();
    assert_eq!(n, "1");
}

#[tokio::test]
async fn broken_server_connection_is_replaced() {
    let p = Pgtether::start(Opts {
        size: 1,
        ..Opts::default()
    });
    let c = p.connect().await;
    let pid: String = value(&c, "SELECT pg_backend_pid()").await.unwrap();
    direct_sql(&format!("SELECT pg_terminate_backend({pid})"));
    // Idle longer than server_check_delay (1s), so pgtether checks it before reuse.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The idle client still works; it gets a fresh server connection.
    let pid2: String = value(&c, "SELECT pg_backend_pid()").await.unwrap();
    assert_ne!(pid, pid2);
}

#[tokio::test]
async fn cancel_reaches_the_running_query() {
    let p = Pgtether::start(Opts::default());
    let c = p.connect().await;
    cancel_running_sleep(c).await;
}

#[tokio::test]
async fn cancel_for_an_idle_client_does_nothing() {
    let p = Pgtether::start(Opts {
        size: 1,
        ..Opts::default()
    });
    let idle = p.connect().await;
    value(&idle, "SELECT 1").await.unwrap();
    let busy = p.connect().await;
    let q = tokio::spawn(async move { value(&busy, "SELECT pg_sleep(0.5)::text").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // idle holds no server connection; its cancel must not hit busy's query on that connection.
    idle.cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .unwrap();
    q.await.unwrap().expect("busy's query was not cancelled");
}

/// A cancel that reaches pgtether while its client's query runs, but reaches PostgreSQL only
/// after that query ended, must not cancel the next client's query on the same connection.
#[tokio::test]
async fn a_late_cancel_never_hits_the_next_client() {
    let p = Pgtether::start(Opts {
        size: 1,
        ..Opts::default()
    });
    let a = p.connect().await;
    let b = p.connect().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let b_stop = stop.clone();
    // b keeps the single server connection busy with short sleeps whenever a releases it.
    let b_task = tokio::spawn(async move {
        let (mut ok, mut cancelled) = (0, 0);
        while !b_stop.load(std::sync::atomic::Ordering::Relaxed) {
            match b.batch_execute("SELECT pg_sleep(0.005)").await {
                Ok(()) => ok += 1,
                Err(e) if sqlstate(&e).as_deref() == Some("57014") => cancelled += 1,
                Err(e) => panic!("b: {e:?}"),
            }
        }
        (ok, cancelled)
    });
    let token = a.cancel_token();
    let mut a_cancelled = 0;
    for i in 0..60u64 {
        let query = a.batch_execute("SELECT pg_sleep(0.01)");
        let cancel = async {
            // Sent around the end of a's query, so that some land after it is over.
            tokio::time::sleep(Duration::from_micros(9_000 + i % 12 * 500)).await;
            token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        };
        let (r, ()) = tokio::join!(query, cancel);
        if let Err(e) = r {
            assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "a: {e:?}");
            a_cancelled += 1;
        }
    }
    // Some cancels must have reached a running query of a, or the test proves nothing.
    assert!(a_cancelled > 0, "no cancel reached a's queries");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, cancelled) = b_task.await.unwrap();
    assert!(ok > 0, "b never ran");
    assert_eq!(
        cancelled, 0,
        "a's cancels hit b's queries ({ok} ran to the end)"
    );
}

/// Thirty clients at once over a pool of 3 (sessions, prepared statements, a cancel): what
/// every runtime configuration must serve.
async fn serve_thirty_clients(p: &Pgtether) {
    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(p.connect().await);
    }
    let mut tasks = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        tasks.push(async move {
            c.batch_execute(&format!("SET application_name = 'thirty_{i}'"))
                .await
                .unwrap();
            let st = c.prepare("SELECT $1::int * 3").await.unwrap();
            for n in 0..20 {
                let row = c.query_one(&st, &[&n]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), n * 3);
            }
            assert_eq!(
                value(c, "SHOW application_name").await.unwrap(),
                format!("thirty_{i}")
            );
        });
    }
    futures_util::future::join_all(tasks).await;
    let c = clients.pop().unwrap();
    cancel_running_sleep(c).await;
}

/// The process's threads, by name.
fn thread_names(p: &Pgtether) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{}/task", p.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

/// `worker_threads = 1` runs tokio's current-thread runtime: everything on one thread, the
/// relay's deferred replies and hand-offs included.
#[tokio::test]
async fn one_worker_thread_serves_many_clients_on_one_thread() {
    let p = Pgtether::start(Opts {
        size: 3,
        extra: "[runtime]\nworker_threads = 1\n".into(),
        ..Opts::default()
    });
    serve_thirty_clients(&p).await;
    assert_eq!(thread_names(&p), ["pgtether"], "one thread in all");
}

/// `scheduler = "work-stealing"`: one tokio multi-thread runtime for all worker threads.
#[tokio::test]
async fn a_work_stealing_runtime_serves_many_clients() {
    let p = Pgtether::start(Opts {
        size: 3,
        extra: "[runtime]\nworker_threads = 2\nscheduler = \"work-stealing\"\n".into(),
        ..Opts::default()
    });
    serve_thirty_clients(&p).await;
    let threads = thread_names(&p);
    assert!(
        threads
            .iter()
            .filter(|t| t.as_str() == "tokio-rt-worker")
            .count()
            == 2
            && !threads.iter().any(|t| t.starts_with("pgtether-w")),
        "tokio's workers, no per-thread runtimes: {threads:?}"
    );
}

/// Two worker threads, each with its own runtime: clients are spread over both, and a pool of
/// one connection serves clients of both in turn, so the connection moves to each client's
/// thread (its socket re-registered there) with its prepared statements and settings.
#[tokio::test]
async fn one_server_connection_serves_clients_of_both_worker_threads() {
    let p = Pgtether::start(Opts {
        size: 1,
        extra: "[runtime]\nworker_threads = 2\n".into(),
        ..Opts::default()
    });
    let mut backends = std::collections::HashSet::new();
    for _ in 0..4 {
        let c = p.connect().await;
        backends.insert(value(&c, "SELECT pg_backend_pid()").await.unwrap());
    }
    assert_eq!(backends.len(), 1, "one server connection for all");
    // All at once: nearly every transaction is a hand-off, many to the other thread.
    serve_thirty_clients(&p).await;
    let threads = thread_names(&p);
    assert!(
        threads.iter().any(|t| t == "pgtether-w1"),
        "no second worker thread: {threads:?}"
    );
}

/// A pool of two over two worker threads is two shards of one connection each: clients of
/// one thread borrow the other thread's connection when theirs is in use, and a connection
/// released where nobody waits goes to a client waiting on the other thread.
#[tokio::test]
async fn clients_of_one_thread_use_the_whole_pool_and_waiters_cross_shards() {
    let p = Pgtether::start(Opts {
        size: 2,
        acquire_timeout: "3s",
        extra: "[runtime]\nworker_threads = 2\n".into(),
        ..Opts::default()
    });
    // Clients are dealt to the threads in turn: the first and third share a thread.
    let mut c = Vec::new();
    for _ in 0..4 {
        c.push(p.connect().await);
    }
    let started = Instant::now();
    c[0].batch_execute("BEGIN").await.unwrap();
    let first: String = value(&c[0], "SELECT pg_backend_pid()").await.unwrap();
    c[2].batch_execute("BEGIN").await.unwrap();
    let third: String = value(&c[2], "SELECT pg_backend_pid()").await.unwrap();
    assert_ne!(first, third, "two transactions, two server connections");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the second transaction of one thread waited for the other thread's connection"
    );
    // Both connections are in use; clients of the other thread wait in its shard. The first
    // client's connection is its own thread's (the third's is borrowed): released where nobody
    // waits, it must reach the waiters of the other shard, one after the other, while the
    // borrowed one stays in use.
    let waiters: Vec<_> = [c.remove(3), c.remove(1)]
        .into_iter()
        .map(|w| tokio::spawn(async move { value(&w, "SELECT 42").await }))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    c[0].batch_execute("COMMIT").await.unwrap();
    for w in waiters {
        let got = tokio::time::timeout(Duration::from_secs(2), w)
            .await
            .expect("a waiter was left behind while a connection was free");
        assert_eq!(got.unwrap().unwrap(), "42");
    }
    c[1].batch_execute("COMMIT").await.unwrap();
}
