//! Takeover: a new pgtether process takes the sockets and sessions of the running one;
//! clients notice nothing. Also: refusals, and a new process that dies mid-way.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{value, Opts, Pgtether, Raw};
use postgres_protocol::message::backend::Message;
use tokio_postgres::NoTls;

fn control_socket() -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    common::scratch().join(format!("ctl-{n}.sock"))
}

fn opts(auth: &'static str, size: usize) -> Opts {
    Opts {
        auth,
        size,
        extra: format!(
            "[runtime]\ncontrol_socket = \"{}\"\nshutdown_timeout = \"20s\"\n",
            control_socket().display()
        ),
        ..Opts::default()
    }
}

/// Waits for the old process to exit after handing everything over.
fn wait_handed_over(old: &mut Pgtether) {
    let status = old
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the old process did not exit: {}", old.log()));
    assert!(status.success(), "old process: {status}: {}", old.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_pinned_clients_keep_their_sessions_and_cancel_keys() {
    let mut old = Pgtether::start(opts("scram-sha-256", 5));
    let mut clients = Vec::new();
    for i in 0..50 {
        let c = old.connect().await;
        c.batch_execute(&format!(
            "SET application_name = 'client{i}'; SET statement_timeout = '{}ms'",
            100_001 + i
        ))
        .await
        .unwrap();
        let st = c.prepare(&format!("SELECT $1::int + {i}")).await.unwrap();
        clients.push((c, st));
    }
    // A temp table pins its client to one server connection, which must move with it.
    let pinned = old.connect().await;
    pinned
        .batch_execute("CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (42)")
        .await
        .unwrap();
    let backend = value(&pinned, "SELECT pg_backend_pid()::text")
        .await
        .unwrap();

    let new = old.takeover(&[]);
    wait_handed_over(&mut old);

    for (i, (c, st)) in clients.iter().enumerate() {
        assert_eq!(
            value(c, "SHOW application_name").await.unwrap(),
            format!("client{i}")
        );
        assert_eq!(
            value(c, "SHOW statement_timeout").await.unwrap(),
            format!("{}ms", 100_001 + i)
        );
        let row = c.query_one(st, &[&1i32]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 1 + i as i32);
    }
    assert_eq!(value(&pinned, "SELECT x::text FROM t").await.unwrap(), "42");
    assert_eq!(
        value(&pinned, "SELECT pg_backend_pid()::text")
            .await
            .unwrap(),
        backend,
        "the pinned client kept its server connection"
    );
    // The cancel key a client got from the old process works on the new one.
    let c0 = &clients[0].0;
    let token = c0.cancel_token();
    let (slept, cancelled) = tokio::join!(c0.simple_query("SELECT pg_sleep(30)"), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(NoTls).await
    });
    cancelled.unwrap();
    let err = slept.expect_err("the sleep was cancelled");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("57014"));
    assert!(
        new.metric("pgtether_handed_over_total{direction=\"received\",kind=\"client\"}")
            .await
            .unwrap_or(0.0)
            >= 51.0,
        "{}",
        new.log()
    );
    // New clients are served by the new process.
    let fresh = new.connect().await;
    assert_eq!(value(&fresh, "SELECT 1::text").await.unwrap(), "1");
}

/// A server connection can reach the new process after the last client holding one of its
/// statements did (here it was inside another client's transaction meanwhile). It must still
/// come with that statement: otherwise the client prepares it again there and gets 42P05.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_connection_moved_after_its_statements_client_still_has_them() {
    let mut old = Pgtether::start(opts("trust", 1));
    let a = old.connect().await;
    let st = a.prepare("SELECT $1::int * 2").await.unwrap();
    assert_eq!(a.query_one(&st, &[&21]).await.unwrap().get::<_, i32>(0), 42);
    // b holds the only server connection, with a's statement on it, across the move of a.
    let b = old.connect().await;
    b.batch_execute("BEGIN").await.unwrap();
    let new = old.takeover(&[]);
    let received = "pgtether_handed_over_total{direction=\"received\",kind=\"client\"}";
    let deadline = Instant::now() + Duration::from_secs(20);
    while new.metric(received).await.unwrap_or(0.0) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "a was not handed over: {}",
            new.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.batch_execute("COMMIT").await.unwrap();
    wait_handed_over(&mut old);
    assert_eq!(a.query_one(&st, &[&21]).await.unwrap().get::<_, i32>(0), 42);
    assert_eq!(value(&b, "SELECT 1::text").await.unwrap(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taken_over_clients_count_against_per_user_and_per_address_limits() {
    let mut o = opts("scram-sha-256", 5);
    o.extra
        .push_str("[limits]\nmax_clients_per_user = 2\nmax_clients_per_addr = 3\n");
    let mut old = Pgtether::start(o);
    let a = old.connect().await;
    let b = old.connect().await;
    let other = old.connect_as("tether_trust", "trustpw").await.unwrap();
    let new = old.takeover(&[]);
    wait_handed_over(&mut old);
    assert_eq!(value(&a, "SELECT 1").await.unwrap(), "1");
    // The two clients of app moved and count here: a third is refused.
    let err = new.connect_as("app", "app").await.expect_err("refused");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("53300"), "{err:?}");
    // So do all three from this address, whatever their user.
    let err = new
        .connect_as("tether_md5", "md5pw")
        .await
        .expect_err("refused");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("53300"), "{err:?}");
    // A client that leaves gives its slots back.
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(10);
    let c = loop {
        match new.connect_as("app", "app").await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(common::sqlstate(&e).as_deref(), Some("53300"), "{e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the slot was not given back: {e:?}"),
        }
    };
    assert_eq!(value(&c, "SELECT 2").await.unwrap(), "2");
    assert_eq!(value(&other, "SELECT 3").await.unwrap(), "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_users_open_server_connections_after_a_takeover() {
    // A user pgtether knows only through auth_query: it logs in upstream with the ClientKey of
    // the user's SCRAM login, which the taking process never saw.
    common::create_auth_lookup("tk_lookup", "lookpw");
    common::direct_sql(
        "CREATE ROLE tk_carol LOGIN PASSWORD 'carolpw';
         GRANT CONNECT ON DATABASE app TO tk_carol;",
    );
    let mut o = opts("scram-sha-256", 5);
    o.auth_extra = "user = \"tk_lookup\"\n\
                    query = \"SELECT usename, passwd FROM tk_lookup.user_lookup($1)\"\n"
        .into();
    o.extra
        .push_str("[users.tk_lookup]\npassword = \"lookpw\"\n");
    let mut old = Pgtether::start(o);
    let a = old.connect_as("tk_carol", "carolpw").await.unwrap();
    let b = old.connect_as("tk_carol", "carolpw").await.unwrap();
    assert_eq!(value(&a, "SELECT current_user").await.unwrap(), "tk_carol");
    let new = old.takeover(&[]);
    wait_handed_over(&mut old);
    // One transaction holds the server connection that moved; the other client's statement
    // needs a new one, opened with the keys that moved along.
    a.batch_execute("BEGIN").await.unwrap();
    let backend = value(&a, "SELECT pg_backend_pid()::text").await.unwrap();
    assert_eq!(value(&b, "SELECT current_user").await.unwrap(), "tk_carol");
    let other = value(&b, "SELECT pg_backend_pid()::text").await.unwrap();
    assert_ne!(backend, other);
    a.batch_execute("COMMIT").await.unwrap();
    drop(new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_sessions_move_too() {
    let mut o = opts("scram-sha-256", 5);
    o.extra.push_str(common::admin::ADMIN_EXTRA);
    let mut old = Pgtether::start(o);
    let console = common::admin::admin(&old).await;
    let before = common::admin::show(&console, "SHOW VERSION").await;
    let client = old.connect().await;
    let new = old.takeover(&[]);
    wait_handed_over(&mut old);
    // The old process is gone: the same console connection answers from the new one, which
    // lists it among its clients.
    let after = common::admin::show(&console, "SHOW VERSION").await;
    assert_eq!(before.rows, after.rows);
    let clients = common::admin::show(&console, "SHOW CLIENTS").await;
    assert_eq!(
        clients.rows_where("database", "pgtether").len(),
        1,
        "{clients:?}"
    );
    assert_eq!(
        clients.rows_where("database", "app").len(),
        1,
        "{clients:?}"
    );
    assert_eq!(value(&client, "SELECT 1").await.unwrap(), "1");
    drop(new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_clients_move_with_their_server_connection() {
    let mut o = opts("scram-sha-256", 5);
    o.mode = "session";
    let mut old = Pgtether::start(o);
    let c = old.connect().await;
    c.batch_execute("SET search_path = pg_catalog; LISTEN moved")
        .await
        .unwrap();
    let backend = value(&c, "SELECT pg_backend_pid()::text").await.unwrap();
    let _new = old.takeover(&[]);
    wait_handed_over(&mut old);
    assert_eq!(
        value(&c, "SELECT pg_backend_pid()::text").await.unwrap(),
        backend
    );
    assert_eq!(value(&c, "SHOW search_path").await.unwrap(), "pg_catalog");
}

fn pgbench_script() -> PathBuf {
    let path = common::scratch().join("takeover.sql");
    std::fs::write(
        &path,
        "\\set x random(1, 1000)\nBEGIN;\nSELECT :x;\nSELECT pg_sleep(0.001);\nEND;\n",
    )
    .unwrap();
    path
}

/// The process started by SIGUSR2 is not our child: find it by its command line.
fn takeover_pids(config: &std::path::Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains(&*config.to_string_lossy()) && cmdline.contains("--takeover") {
            pids.push(pid);
        }
    }
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_by_sigusr2_during_pgbench_fails_nothing() {
    let mut old = Pgtether::start(opts("scram-sha-256", 10));
    let script = pgbench_script();
    let bench = Command::new("pgbench")
        .args([
            "-n", "-c", "50", "-j", "2", "-T", "20", "-M", "extended", "-f",
        ])
        .arg(&script)
        .arg(format!(
            "host=127.0.0.1 port={} user=app password=app dbname=app",
            old.port
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pgbench runs");
    tokio::time::sleep(Duration::from_secs(6)).await;
    old.signal(12); // SIGUSR2
    let exited = old.wait_exit(Duration::from_secs(25));
    let new_pids = takeover_pids(&old.config_path);
    let out = tokio::task::spawn_blocking(move || bench.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    for pid in &new_pids {
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(exited.is_some_and(|s| s.success()), "{}", old.log());
    assert_eq!(new_pids.len(), 1, "one new process took over");
    assert!(
        out.status.success(),
        "pgbench failed: {stdout}\n{stderr}\n{}",
        old.log()
    );
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}"
    );
    assert!(!stderr.contains("error"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_clients_move() {
    let mut old = Pgtether::start(opts("trust", 5));
    let mut raws = Vec::new();
    for _ in 0..20 {
        let batch = (0..100).map(|_| Raw::login_trust(old.port, "app"));
        raws.extend(futures_util::future::join_all(batch).await);
    }
    let _new = old.takeover(&[]);
    wait_handed_over(&mut old);
    let queries = raws.iter_mut().map(|raw| async move {
        raw.send(&common::msg(b'Q', b"SELECT 1\0")).await;
        loop {
            match raw.recv().await {
                Message::ReadyForQuery(_) => return true,
                Message::ErrorResponse(_) => return false,
                _ => {}
            }
        }
    });
    let ok = futures_util::future::join_all(queries).await;
    assert_eq!(ok.iter().filter(|ok| **ok).count(), 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_of_another_state_version_is_refused_and_the_old_process_serves_on() {
    use pgtether::takeover::state::Msg;
    use pgtether::takeover::wire;
    let o = opts("scram-sha-256", 5);
    let path = o
        .extra
        .split('"')
        .nth(1)
        .map(PathBuf::from)
        .expect("control socket path");
    let mut old = Pgtether::start(o);
    let c = old.connect().await;
    c.batch_execute("SET application_name = 'stays'")
        .await
        .unwrap();
    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    let hello = Msg::Hello {
        version: 999,
        pid: 1,
        release: "pgtether from the future".into(),
    };
    wire::send(&stream, &wire::encode(&hello, 0).unwrap(), &[])
        .await
        .unwrap();
    let mut reader = wire::Reader::default();
    match reader.recv(&stream).await.unwrap() {
        (Msg::Refuse { reason }, _) => assert!(reason.contains("version 999"), "{reason}"),
        (other, _) => panic!("expected Refuse, got {other:?}"),
    }
    assert!(old.wait_exit(Duration::from_millis(300)).is_none());
    assert_eq!(value(&c, "SHOW application_name").await.unwrap(), "stays");
    assert_eq!(
        value(&old.connect().await, "SELECT 1::text").await.unwrap(),
        "1"
    );
    assert_eq!(
        old.metric("pgtether_takeovers_total{result=\"refused\",role=\"gave\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_dies_mid_takeover_leaves_the_old_one_serving_everyone() {
    let mut old = Pgtether::start(opts("scram-sha-256", 5));
    let mut clients = Vec::new();
    for i in 0..20 {
        let c = old.connect().await;
        c.batch_execute(&format!("SET application_name = 'c{i}'"))
            .await
            .unwrap();
        clients.push(c);
    }
    // One client is inside a transaction the whole time.
    let busy = old.connect().await;
    busy.batch_execute("BEGIN; CREATE TEMP TABLE during (x int)")
        .await
        .unwrap();

    let mut dying = old.takeover(&[("PGTETHER_TAKEOVER_FAULT", "before-client-ack")]);
    let status = dying
        .wait_exit(Duration::from_secs(20))
        .expect("the faulty new process exits");
    assert_eq!(status.code(), Some(70), "{}", dying.log());
    let started = Instant::now();
    // The old process takes everything back and serves everyone, old and new clients.
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(
            value(c, "SHOW application_name").await.unwrap(),
            format!("c{i}")
        );
    }
    busy.batch_execute("INSERT INTO during VALUES (1); COMMIT")
        .await
        .unwrap();
    assert!(old.wait_exit(Duration::from_millis(100)).is_none());
    let fresh = old.connect().await;
    assert_eq!(value(&fresh, "SELECT 1::text").await.unwrap(), "1");
    assert!(started.elapsed() < Duration::from_secs(10));

    // A later takeover still works.
    let _new = old.takeover(&[]);
    wait_handed_over(&mut old);
    assert_eq!(
        value(&clients[3], "SHOW application_name").await.unwrap(),
        "c3"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_sessions_to_a_live_peer() {
    let dir = common::scratch().join("peers");
    let _ = std::fs::remove_dir_all(&dir);
    let o = Opts {
        extra: format!("[runtime]\npeer_dir = \"{}\"\n", dir.display()),
        ..Opts::default()
    };
    let mut first = Pgtether::start(Opts {
        listen_extra: "reuse_port = true",
        ..o
    });
    let mut clients = Vec::new();
    for i in 0..20 {
        let c = first.connect().await;
        c.batch_execute(&format!("SET application_name = 'peer{i}'"))
            .await
            .unwrap();
        clients.push(c);
    }
    let peer = first.start_peer();
    let started = Instant::now();
    while std::fs::read_dir(&dir).map_or(0, |d| d.count()) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "peer socket did not appear"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.signal(15); // SIGTERM
    wait_handed_over(&mut first);
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(
            value(c, "SHOW application_name").await.unwrap(),
            format!("peer{i}")
        );
    }
    assert!(
        peer.metric("pgtether_handed_over_total{direction=\"received\",kind=\"client\"}")
            .await
            .unwrap_or(0.0)
            >= 20.0,
        "{}",
        peer.log()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
