//! Reloading the configuration without a restart (RELOAD and SIGHUP): pool sizes under load,
//! databases and passwords, refused invalid files, settings that need a restart; and the
//! environment: `${VAR}` substitution and `PGTETHER_*` overrides.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::admin::{admin, edit_config, run, show, ADMIN_EXTRA};
use common::{cluster, server_connections, sqlstate, value, Opts, Pgtether};

fn opts(size: usize) -> Opts {
    Opts {
        size,
        extra: ADMIN_EXTRA.to_string(),
        ..Opts::default()
    }
}

async fn pool_size(a: &tokio_postgres::Client, db: &str) -> i64 {
    let t = show(a, "SHOW DATABASES").await;
    t.int(t.rows_where("name", db)[0], "pool_size")
}

#[tokio::test]
async fn reload_resizes_the_pool_under_load_without_errors() {
    let p = Pgtether::start(opts(2));
    let a = admin(&p).await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        // A user no other test in this binary uses, so pg_stat_activity counts only this pool.
        let c = p.connect_as("tether_md5", "md5pw").await.unwrap();
        let (stop, done) = (stop.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                value(&c, "SELECT 1")
                    .await
                    .expect("no error during reloads");
                c.batch_execute("BEGIN; SELECT pg_sleep(0.001); COMMIT")
                    .await
                    .expect("no error during reloads");
                done.fetch_add(1, Ordering::Relaxed);
            }
            c
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for size in [4, 1, 3] {
        edit_config(&p, "size = ", &format!("size = {size} #"));
        run(&a, "RELOAD").await.expect("reload accepted");
        assert_eq!(pool_size(&a, "app").await, size);
        let t = show(&a, "SHOW CONFIG").await;
        assert_eq!(
            t.get(t.rows_where("key", "pool.size")[0], "value"),
            Some(size.to_string().as_str())
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Never more server connections than the size in force (a moment for closes).
        let started = Instant::now();
        loop {
            let n = server_connections("tether_md5") as i64;
            if n <= size || started.elapsed() > Duration::from_secs(3) {
                assert!(n <= size, "{n} server connections with size {size}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let c = w.await.expect("worker saw no error");
        // Still connected.
        assert_eq!(value(&c, "SELECT 2").await.unwrap(), "2");
    }
    assert!(done.load(Ordering::Relaxed) > 20, "the load ran");
    assert!(p.log().contains("configuration reloaded"));
}

#[tokio::test]
async fn a_grown_pool_serves_waiting_clients_at_once() {
    let mut o = opts(1);
    o.acquire_timeout = "10s";
    let p = Pgtether::start(o);
    let a = admin(&p).await;
    let holder = p.connect().await;
    holder.batch_execute("BEGIN").await.unwrap();
    let waiter = p.connect().await;
    let started = Instant::now();
    let q = tokio::spawn(async move { value(&waiter, "SELECT 42").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    edit_config(&p, "size = ", "size = 2 #");
    run(&a, "RELOAD").await.expect("reload accepted");
    assert_eq!(q.await.unwrap().unwrap(), "42");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the waiter waited {:?} for the new room",
        started.elapsed()
    );
    holder.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn an_invalid_file_is_refused_and_the_old_config_stays() {
    let p = Pgtether::start(opts(5));
    let a = admin(&p).await;
    let c = p.connect().await;
    edit_config(&p, "size = 5", "size = 0");
    let err = run(&a, "RELOAD").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("F0000"), "{err:?}");
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("pool.size"), "names the key: {msg}");
    assert!(p.log().contains("reload refused"), "{}", p.log());
    assert_eq!(pool_size(&a, "app").await, 5);
    assert_eq!(value(&c, "SELECT 1").await.unwrap(), "1");
    // An unknown key is named too.
    edit_config(&p, "size = 0", "size = 5\nsizee = 3");
    let err = run(&a, "RELOAD").await.unwrap_err();
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("pool.sizee"), "{msg}");
    // A fixed file is accepted.
    edit_config(&p, "\nsizee = 3", "");
    run(&a, "RELOAD").await.unwrap();
    let fresh = p.connect().await;
    assert_eq!(value(&fresh, "SELECT 1").await.unwrap(), "1");
}

#[tokio::test]
async fn sighup_reloads() {
    let p = Pgtether::start(opts(5));
    let a = admin(&p).await;
    edit_config(&p, "size = 5", "size = 7");
    // SAFETY: kill only sends a signal to the pgtether child this test started.
    let rc = unsafe { libc::kill(p.pid() as i32, libc::SIGHUP) };
    assert_eq!(rc, 0);
    let started = Instant::now();
    while pool_size(&a, "app").await != 7 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "SIGHUP did not reload: {}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(p.log().contains("SIGHUP received"));
}

#[tokio::test]
async fn databases_and_passwords_change_without_dropping_clients() {
    let p = Pgtether::start(opts(5));
    let a = admin(&p).await;
    let old = p.connect_as("tether_trust", "trustpw").await.unwrap();
    value(&old, "SELECT 1").await.unwrap();
    // Add a database.
    let added = format!(
        "[databases.second]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"app\"\n",
        cluster().port
    );
    let text = std::fs::read_to_string(&p.config_path).unwrap();
    std::fs::write(&p.config_path, format!("{text}\n{added}")).unwrap();
    run(&a, "RELOAD").await.unwrap();
    let url = format!(
        "host=127.0.0.1 port={} user=tether_trust password=trustpw dbname=second",
        p.port
    );
    let (c2, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("the new database takes logins");
    tokio::spawn(conn);
    assert_eq!(value(&c2, "SELECT 3").await.unwrap(), "3");

    // Remove `app` and change a password: connected clients go on, new logins follow the file.
    edit_config(&p, "[databases.app]", "[databases.gone]");
    edit_config(&p, "password = \"trustpw\"", "password = \"newpw\"");
    run(&a, "RELOAD").await.unwrap();
    assert_eq!(value(&old, "SELECT 4").await.unwrap(), "4");
    let err = p.connect_as("tether_trust", "newpw").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("3D000"), "{err:?}");
    let url = format!(
        "host=127.0.0.1 port={} user=tether_trust password=trustpw dbname=second",
        p.port
    );
    let err = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .err()
        .expect("the old password is refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{err:?}");
    let url = url.replace("trustpw", "newpw");
    let (c3, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("the new password works");
    tokio::spawn(conn);
    assert_eq!(value(&c3, "SELECT 5").await.unwrap(), "5");
    let t = show(&a, "SHOW DATABASES").await;
    assert!(t.rows_where("name", "app").is_empty());
    assert_eq!(t.rows_where("name", "gone").len(), 1);
}

#[tokio::test]
async fn settings_that_need_a_restart_are_logged_and_kept() {
    let p = Pgtether::start(opts(5));
    let a = admin(&p).await;
    let listen = format!("addr = \"127.0.0.1:{}\"", p.port);
    edit_config(&p, &listen, "addr = \"127.0.0.1:1\"");
    run(&a, "RELOAD").await.unwrap();
    let log = p.log();
    assert!(
        log.contains("listen.addr") && log.contains("needs a restart"),
        "{log}"
    );
    let t = show(&a, "SHOW CONFIG").await;
    let shown = t.get(t.rows_where("key", "listen.addr")[0], "value");
    assert_eq!(shown, Some(format!("127.0.0.1:{}", p.port).as_str()));
    // Still serving on the old address.
    let c = p.connect().await;
    assert_eq!(value(&c, "SELECT 1").await.unwrap(), "1");
}

#[tokio::test]
async fn environment_variables_fill_the_file_and_override_keys() {
    let extra = format!(
        "{ADMIN_EXTRA}[databases.viaenv]\nhost = \"${{PGT_TEST_HOST}}\"\nport = ${{PGT_TEST_PORT}}\ndbname = \"app\"\n"
    );
    let env = [
        ("PGT_TEST_HOST", "127.0.0.1".to_string()),
        ("PGT_TEST_PORT", cluster().port.to_string()),
        ("PGTETHER_POOL_SIZE", "3".to_string()),
        ("PGTETHER_POOL_MODE", "session".to_string()),
    ];
    let p = Pgtether::start(Opts {
        extra,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        ..Opts::default()
    });
    let url = format!(
        "host=127.0.0.1 port={} user=tether_trust password=trustpw dbname=viaenv",
        p.port
    );
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("the database from the environment takes logins");
    tokio::spawn(conn);
    assert_eq!(value(&c, "SELECT 1").await.unwrap(), "1");
    let a = admin(&p).await;
    let t = show(&a, "SHOW DATABASES").await;
    let row = t.rows_where("name", "viaenv")[0];
    assert_eq!(t.get(row, "host"), Some("127.0.0.1"));
    assert_eq!(t.int(row, "pool_size"), 3);
    assert_eq!(t.get(row, "pool_mode"), Some("session"));
    // RELOAD reads the same environment.
    run(&a, "RELOAD").await.unwrap();
    assert_eq!(pool_size(&a, "viaenv").await, 3);
}

#[test]
fn an_unset_variable_is_named_with_its_line() {
    let path = common::scratch().join("reload.toml");
    std::fs::write(
        &path,
        "[databases.app]\nhost = \"${PGT_TEST_SURELY_UNSET}\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgtether"))
        .args(["check", "--config", path.to_str().unwrap()])
        .env_remove("PGT_TEST_SURELY_UNSET")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PGT_TEST_SURELY_UNSET") && err.contains("line 2"),
        "{err}"
    );
}
