//! The admin console: each SHOW command's columns and rows, who may connect, errors for
//! unknown commands and the extended protocol, PAUSE/RESUME (with /readyz), KILL, RECONNECT
//! and SHUTDOWN.

mod common;

use std::time::Duration;

use common::admin::{admin, admin_as, run, show, show_until, ADMIN_EXTRA};
use common::{sqlstate, value, Opts, Pgtether, Raw};

fn opts() -> Opts {
    Opts {
        extra: ADMIN_EXTRA.to_string(),
        ..Opts::default()
    }
}

const POOLS_COLUMNS: &[&str] = &[
    "database",
    "user",
    "cl_active",
    "cl_waiting",
    "cl_active_cancel_req",
    "cl_waiting_cancel_req",
    "sv_active",
    "sv_active_cancel",
    "sv_being_canceled",
    "sv_idle",
    "sv_used",
    "sv_tested",
    "sv_login",
    "maxwait",
    "maxwait_us",
    "pool_mode",
    "cl_idle",
    "pinned",
    "prepared_hits",
    "prepared_misses",
    "prepared_evictions",
    "state_syncs",
];

#[tokio::test]
async fn show_pools_counts_a_connected_client() {
    let p = Pgtether::start(opts());
    let c = p.connect_as("tether_trust", "trustpw").await.unwrap();
    value(&c, "SELECT 1").await.unwrap();
    let a = admin(&p).await;
    let t = show_until(&a, "SHOW POOLS", |t| {
        let rows = t.rows_where("user", "tether_trust");
        rows.len() == 1 && t.int(rows[0], "cl_idle") == 1
    })
    .await;
    assert_eq!(t.columns, POOLS_COLUMNS);
    let rows = t.rows_where("user", "tether_trust");
    assert_eq!(rows.len(), 1, "{t:?}");
    let row = rows[0];
    assert_eq!(t.get(row, "database"), Some("app"));
    assert_eq!(t.int(row, "cl_idle"), 1);
    assert_eq!(t.int(row, "cl_active") + t.int(row, "cl_waiting"), 0);
    assert_eq!(t.int(row, "sv_idle") + t.int(row, "sv_active"), 1);
    assert_eq!(t.get(row, "pool_mode"), Some("transaction"));
    // A client inside a transaction is active and holds a server connection.
    c.batch_execute("BEGIN").await.unwrap();
    value(&c, "SELECT 1").await.unwrap();
    let t = show(&a, "show pools;").await;
    let row = t.rows_where("user", "tether_trust")[0];
    assert_eq!(t.int(row, "cl_active"), 1);
    assert_eq!(t.int(row, "sv_active"), 1);
    c.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn show_clients_lists_clients_with_their_pin_reasons() {
    let p = Pgtether::start(opts());
    let url = format!(
        "{} application_name=pinned_one",
        p.url("tether_trust", "trustpw")
    );
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute("LISTEN admin_test_channel").await.unwrap();
    c.batch_execute("CREATE TEMP TABLE admin_test_tmp (x int)")
        .await
        .unwrap();
    let a = admin(&p).await;
    let t = show(&a, "SHOW CLIENTS").await;
    for col in [
        "type",
        "user",
        "database",
        "state",
        "addr",
        "port",
        "connect_time",
        "request_time",
        "wait",
        "wait_us",
        "ptr",
        "link",
        "remote_pid",
        "application_name",
        "prepared_statements",
        "pinned",
        "pin_reasons",
    ] {
        t.col(col);
    }
    let rows = t.rows_where("application_name", "pinned_one");
    assert_eq!(rows.len(), 1, "{t:?}");
    let row = rows[0];
    assert_eq!(t.get(row, "type"), Some("C"));
    assert_eq!(t.get(row, "user"), Some("tether_trust"));
    assert_eq!(t.get(row, "database"), Some("app"));
    assert_eq!(t.get(row, "addr"), Some("127.0.0.1"));
    assert_eq!(t.int(row, "pinned"), 1);
    assert_eq!(t.get(row, "pin_reasons"), Some("listen,temp_table"));
    // Pinned in transaction mode: it keeps its server connection, linked by backend pid.
    let pid = value(&c, "SELECT pg_backend_pid()").await.unwrap();
    let t = show(&a, "SHOW CLIENTS").await;
    let row = t.rows_where("application_name", "pinned_one")[0];
    assert_eq!(t.get(row, "link"), Some(pid.as_str()));
    // The admin session lists itself.
    assert_eq!(t.rows_where("database", "pgtether").len(), 1);
    let pools = show(&a, "SHOW POOLS").await;
    let prow = pools.rows_where("user", "tether_trust")[0];
    assert_eq!(pools.int(prow, "pinned"), 1);
    // Unpinning clears the reasons.
    c.batch_execute("UNLISTEN *; DISCARD TEMP").await.unwrap();
    let t = show(&a, "SHOW CLIENTS").await;
    let row = t.rows_where("application_name", "pinned_one")[0];
    assert_eq!(t.int(row, "pinned"), 0);
    assert_eq!(t.get(row, "pin_reasons"), Some(""));
}

#[tokio::test]
async fn show_servers_stats_databases_config_and_version() {
    let p = Pgtether::start(opts());
    let c = p.connect_as("tether_trust", "trustpw").await.unwrap();
    let pid = value(&c, "SELECT pg_backend_pid()").await.unwrap();
    let a = admin(&p).await;

    let t = show_until(&a, "SHOW SERVERS", |t| {
        let rows = t.rows_where("remote_pid", &pid);
        rows.len() == 1 && t.get(rows[0], "state") == Some("idle")
    })
    .await;
    for col in [
        "type",
        "user",
        "database",
        "state",
        "addr",
        "port",
        "connect_time",
        "close_needed",
        "link",
        "remote_pid",
    ] {
        t.col(col);
    }
    let rows = t.rows_where("remote_pid", &pid);
    assert_eq!(rows.len(), 1, "{t:?}");
    assert_eq!(t.get(rows[0], "type"), Some("S"));
    assert_eq!(t.get(rows[0], "user"), Some("tether_trust"));
    assert_eq!(t.get(rows[0], "state"), Some("idle"));
    assert_eq!(
        t.get(rows[0], "port").map(str::to_string),
        Some(common::cluster().port.to_string())
    );

    let t = show(&a, "SHOW STATS").await;
    for col in [
        "database",
        "total_xact_count",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_wait_time",
    ] {
        t.col(col);
    }
    let row = t.rows_where("database", "app")[0];
    assert!(t.int(row, "total_query_count") >= 1);
    assert!(t.int(row, "total_xact_count") >= 1);
    assert!(t.int(row, "total_received") > 0 && t.int(row, "total_sent") > 0);

    let t = show(&a, "SHOW DATABASES").await;
    assert_eq!(
        t.columns,
        [
            "name",
            "host",
            "port",
            "database",
            "force_user",
            "pool_size",
            "min_pool_size",
            "reserve_pool",
            "pool_mode",
            "max_connections",
            "current_connections",
            "paused",
            "disabled"
        ]
    );
    let row = t.rows_where("name", "app")[0];
    assert_eq!(t.int(row, "pool_size"), 5);
    assert_eq!(t.int(row, "current_connections"), 1);
    assert_eq!(t.int(row, "paused"), 0);
    assert_eq!(t.rows_where("name", "pgtether").len(), 1);

    let t = show(&a, "SHOW CONFIG").await;
    assert_eq!(t.columns, ["key", "value", "default", "changeable"]);
    let row = t.rows_where("key", "pool.size")[0];
    assert_eq!(t.get(row, "value"), Some("5"));
    assert_eq!(t.get(row, "default"), Some("20"));
    assert_eq!(t.get(row, "changeable"), Some("1"));
    let row = t.rows_where("key", "listen.addr")[0];
    assert_eq!(t.get(row, "changeable"), Some("0"));
    assert!(
        !t.rows
            .iter()
            .flatten()
            .any(|v| v.as_deref() == Some("trustpw")),
        "no password is shown"
    );

    let t = show(&a, "SHOW VERSION").await;
    assert_eq!(t.columns, ["version"]);
    assert!(t.rows[0][0].as_deref().unwrap().starts_with("pgtether "));
}

#[tokio::test]
async fn non_admin_users_are_refused_with_42501() {
    let p = Pgtether::start(opts());
    let err = admin_as(&p, "tether_md5", "md5pw").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err:?}");
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("tether_md5") && msg.contains("admin"), "{msg}");
    // The password is checked first.
    let err = admin_as(&p, "app", "wrong").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{err:?}");
    // Without [admin] users the console is off.
    let off = Pgtether::start(Opts::default());
    let err = admin_as(&off, "app", "app").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err:?}");
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("disabled"), "{msg}");
}

#[tokio::test]
async fn unknown_commands_and_the_extended_protocol_are_errors() {
    let p = Pgtether::start(opts());
    let a = admin(&p).await;
    let err = run(&a, "SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42601"), "{err:?}");
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(
        msg.contains("SHOW POOLS") && msg.contains("RELOAD"),
        "lists the commands: {msg}"
    );
    // tokio-postgres prepares statements with Parse: the extended protocol.
    let err = a.query("SHOW POOLS", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"), "{err:?}");
    // The session goes on.
    let t = show(&a, "SHOW VERSION").await;
    assert_eq!(t.rows.len(), 1);
    a.simple_query("")
        .await
        .expect("an empty query is answered");
}

#[tokio::test]
async fn psql_runs_admin_commands() {
    let p = Pgtether::start(opts());
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-p",
            &p.port.to_string(),
            "-U",
            "app",
            "-c",
            "SHOW VERSION",
            "pgtether",
        ])
        .env("PGPASSWORD", "app")
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pgtether "));
}

#[tokio::test]
async fn pause_holds_new_transactions_until_resume() {
    let p = Pgtether::start(opts());
    let c = p.connect().await;
    let holder = p.connect().await;
    value(&c, "SELECT 1").await.unwrap();
    let a = admin(&p).await;

    // PAUSE waits for a transaction in progress.
    holder.batch_execute("BEGIN").await.unwrap();
    value(&holder, "SELECT 1").await.unwrap();
    let pause = tokio::spawn(async move {
        run(&a, "PAUSE").await.unwrap();
        a
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pause.is_finished(), "PAUSE returned during a transaction");
    holder.batch_execute("COMMIT").await.unwrap();
    let a = tokio::time::timeout(Duration::from_secs(5), pause)
        .await
        .expect("PAUSE returns once the transaction ended")
        .unwrap();
    assert_eq!(p.http_get("/readyz").await.0, 503);

    // A new transaction waits, connected, until RESUME.
    let q = tokio::spawn(async move { value(&c, "SELECT 42").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!q.is_finished(), "a query ran while paused");
    let t = show(&a, "SHOW POOLS").await;
    let row = t.rows_where("user", "app")[0];
    assert_eq!(t.int(row, "cl_waiting"), 1);
    let t = show(&a, "SHOW DATABASES").await;
    assert_eq!(t.int(t.rows_where("name", "app")[0], "paused"), 1);
    run(&a, "RESUME").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), q)
        .await
        .expect("query runs after RESUME")
        .unwrap()
        .unwrap();
    assert_eq!(got, "42");
    assert_eq!(p.http_get("/readyz").await.0, 200);
    let err = run(&a, "RESUME").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("55000"), "{err:?}");
}

#[tokio::test]
async fn pause_of_one_database_leaves_the_others() {
    let extra = format!(
        "{ADMIN_EXTRA}[databases.other]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"app\"\n",
        common::cluster().port
    );
    let p = Pgtether::start(Opts {
        extra,
        ..Opts::default()
    });
    let a = admin(&p).await;
    run(&a, "PAUSE other").await.unwrap();
    // /readyz stays ready: only everything paused takes pgtether out of service.
    assert_eq!(p.http_get("/readyz").await.0, 200);
    let c = p.connect().await;
    assert_eq!(value(&c, "SELECT 7").await.unwrap(), "7");
    let err = run(&a, "PAUSE nosuchdb").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("3D000"), "{err:?}");
    run(&a, "RESUME other").await.unwrap();
}

#[tokio::test]
async fn kill_disconnects_the_databases_clients_with_57p01() {
    let p = Pgtether::start(Opts {
        auth: "trust",
        ..opts()
    });
    let mut idle = Raw::login_trust(p.port, "tether_trust").await;
    let mut busy = Raw::login_trust(p.port, "tether_trust").await;
    busy.send(&common::msg(b'Q', b"SELECT pg_sleep(30)\0"))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = admin(&p).await;
    run(&a, "KILL app").await.unwrap();
    for raw in [&mut idle, &mut busy] {
        let (severity, code, message) = raw.expect_error().await;
        assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "57P01"));
        assert!(message.contains("administrator command"), "{message}");
        assert!(matches!(
            raw.try_recv(Duration::from_secs(5)).await,
            Ok(None)
        ));
    }
    // The sleeping backend was closed with its connection; new clients are served.
    let c = p.connect_as("tether_trust", "x").await.unwrap();
    assert_eq!(value(&c, "SELECT 1").await.unwrap(), "1");
    let err = run(&a, "KILL").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42601"), "{err:?}");
}

#[tokio::test]
async fn reconnect_replaces_server_connections() {
    let p = Pgtether::start(Opts { size: 1, ..opts() });
    let c = p.connect().await;
    let before = value(&c, "SELECT pg_backend_pid()").await.unwrap();
    let a = admin(&p).await;
    // A connection in use is closed at release.
    c.batch_execute("BEGIN").await.unwrap();
    run(&a, "RECONNECT app").await.unwrap();
    let t = show(&a, "SHOW SERVERS").await;
    let row = t.rows_where("remote_pid", &before)[0];
    assert_eq!(t.get(row, "close_needed"), Some("1"));
    assert_eq!(t.get(row, "state"), Some("active"));
    c.batch_execute("COMMIT").await.unwrap();
    let after = value(&c, "SELECT pg_backend_pid()").await.unwrap();
    assert_ne!(before, after);
    // An idle one is closed at once.
    show_until(&a, "SHOW SERVERS", |t| {
        let rows = t.rows_where("remote_pid", &after);
        rows.len() == 1 && t.get(rows[0], "state") == Some("idle")
    })
    .await;
    run(&a, "RECONNECT").await.unwrap();
    let t = show(&a, "SHOW SERVERS").await;
    assert!(t.rows_where("remote_pid", &after).is_empty(), "{t:?}");
}

#[tokio::test]
async fn shutdown_closes_clients_with_57p01_and_exits_0() {
    let mut p = Pgtether::start(Opts {
        auth: "trust",
        ..opts()
    });
    let mut idle = Raw::login_trust(p.port, "tether_trust").await;
    let a = admin(&p).await;
    run(&a, "SHUTDOWN").await.unwrap();
    let (severity, code, _) = idle.expect_error().await;
    assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "57P01"));
    let status = p
        .wait_exit(Duration::from_secs(10))
        .expect("pgtether exits after SHUTDOWN");
    assert!(status.success(), "{status}");
    // The admin session was told too.
    assert!(a.simple_query("SHOW VERSION").await.is_err());
}
