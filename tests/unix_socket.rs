//! Unix-domain sockets: clients connecting through `[listen] unix_socket_dir`, and server
//! connections to an upstream whose `host` is a socket directory (libpq's convention).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::admin::{admin, show, ADMIN_EXTRA};
use common::{cancel_running_sleep, cluster, sqlstate, value, Opts, Pgtether};
use tokio_postgres::NoTls;

/// A fresh directory for one test's socket.
fn socket_dir() -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = common::scratch().join(format!("uds-{n}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn listen_in(dir: &Path) -> &'static str {
    Box::leak(format!("unix_socket_dir = \"{}\"", dir.display()).into_boxed_str())
}

async fn connect_unix(
    dir: &Path,
    port: u16,
    user: &str,
    password: &str,
    dbname: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(dir)
        .port(port)
        .user(user)
        .password(password)
        .dbname(dbname);
    let (client, conn) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

#[tokio::test]
async fn clients_on_the_unix_socket_get_full_sessions() {
    let dir = socket_dir();
    let p = Pgtether::start(Opts {
        listen_extra: listen_in(&dir),
        size: 2,
        extra: ADMIN_EXTRA.into(),
        ..Opts::default()
    });
    let path = dir.join(format!(".s.PGSQL.{}", p.port));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o777, "socket file mode {mode:o}");

    let c = connect_unix(&dir, p.port, "app", "app", "app")
        .await
        .unwrap();
    // Session state follows the client across transactions, as over TCP.
    c.batch_execute("SET application_name = 'over_unix'")
        .await
        .unwrap();
    let st = c.prepare("SELECT $1::int * 2").await.unwrap();
    for i in 0..20 {
        let row = c.query_one(&st, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i * 2);
    }
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("CREATE TEMP TABLE u (x int); INSERT INTO u VALUES (7)")
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(value(&c, "SELECT x::text FROM u").await.unwrap(), "7");
    assert_eq!(
        value(&c, "SHOW application_name").await.unwrap(),
        "over_unix"
    );
    // A wrong password is refused over the socket too.
    let e = connect_unix(&dir, p.port, "app", "wrong", "app")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e:?}");

    // The admin console (over TCP) shows the client as PgBouncer does.
    let a = admin(&p).await;
    let clients = show(&a, "SHOW CLIENTS").await;
    let rows = clients.rows_where("addr", "unix");
    assert_eq!(rows.len(), 1, "{:?}", clients.rows);
    assert_eq!(clients.get(rows[0], "database"), Some("app"));
    assert_eq!(clients.get(rows[0], "port"), None);
}

#[tokio::test]
async fn a_cancel_over_the_unix_socket_reaches_the_query() {
    let dir = socket_dir();
    let p = Pgtether::start(Opts {
        listen_extra: listen_in(&dir),
        ..Opts::default()
    });
    let c = connect_unix(&dir, p.port, "app", "app", "app")
        .await
        .unwrap();
    cancel_running_sleep(c).await;
}

#[tokio::test]
async fn hba_local_rules_match_unix_clients_only() {
    let dir = socket_dir();
    let p = Pgtether::start(Opts {
        listen_extra: listen_in(&dir),
        extra: "[[hba]]\ndatabase = \"all\"\nuser = \"all\"\naddress = \"local\"\nmethod = \"trust\"\n\
                [[hba]]\ndatabase = \"all\"\nuser = \"all\"\naddress = \"all\"\nmethod = \"reject\"\n"
            .into(),
        ..Opts::default()
    });
    // Trusted on the socket: any password will do.
    let c = connect_unix(&dir, p.port, "app", "not-the-password", "app")
        .await
        .unwrap();
    assert_eq!(value(&c, "SELECT 1::text").await.unwrap(), "1");
    let e = p.connect_as("app", "app").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e:?}");
    let message = e.as_db_error().map(|d| d.message().to_string());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("\"127.0.0.1\"")),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_stale_socket_file_is_replaced() {
    let dir = socket_dir();
    let mut first = Pgtether::start(Opts {
        listen_extra: listen_in(&dir),
        ..Opts::default()
    });
    // Killed hard, as a crash would: its socket file stays behind.
    first.signal(9);
    first.wait_exit(Duration::from_secs(10)).expect("killed");
    let path = dir.join(format!(".s.PGSQL.{}", first.port));
    assert!(path.exists(), "the killed process left its socket file");
    let config = std::fs::read_to_string(&first.config_path).unwrap();
    let second = Pgtether::start_config(&config, first.port, first.http_port, &[])
        .unwrap_or_else(|log| panic!("restart over a stale socket file failed: {log}"));
    let c = connect_unix(&dir, second.port, "app", "app", "app")
        .await
        .unwrap();
    assert_eq!(value(&c, "SELECT 2::text").await.unwrap(), "2");
}

#[tokio::test]
async fn a_socket_another_process_serves_is_not_taken() {
    let dir = socket_dir();
    let p = Pgtether::start(Opts {
        listen_extra: listen_in(&dir),
        ..Opts::default()
    });
    // Another process on the same port number at another loopback address: the TCP port is
    // free for it, the socket path is not.
    let config = std::fs::read_to_string(&p.config_path)
        .unwrap()
        .replace(
            &format!("127.0.0.1:{}\"", p.port),
            &format!("127.0.0.2:{}\"", p.port),
        )
        .replace(&format!("127.0.0.1:{}\"", p.http_port), "127.0.0.2:0\"");
    let config_path = p.config_path.with_extension("second.toml");
    std::fs::write(&config_path, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgtether"))
        .arg("--config")
        .arg(&config_path)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second process started: {log}");
    assert!(log.contains("in use by another process"), "{log}");
    // The running process still serves its socket.
    let c = connect_unix(&dir, p.port, "app", "app", "app")
        .await
        .unwrap();
    assert_eq!(value(&c, "SELECT 3::text").await.unwrap(), "3");
}

#[tokio::test]
async fn server_connections_over_the_unix_socket() {
    let pg = cluster();
    let p = Pgtether::start(Opts {
        size: 2,
        extra: format!(
            "{ADMIN_EXTRA}[databases.viaunix]\nhost = \"{}\"\nport = {}\ndbname = \"app\"\n",
            pg.dir.display(),
            pg.port
        ),
        ..Opts::default()
    });
    let c = connect_tcp(&p, "viaunix").await;
    // PostgreSQL reports no client address for a Unix-domain connection.
    assert_eq!(
        value(&c, "SELECT coalesce(inet_client_addr()::text, 'local')")
            .await
            .unwrap(),
        "local"
    );
    let st = c.prepare("SELECT $1::text || 'x'").await.unwrap();
    for _ in 0..10 {
        let row = c.query_one(&st, &[&"a"]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "ax");
    }
    let a = admin(&p).await;
    let servers = show(&a, "SHOW SERVERS").await;
    let rows = servers.rows_where("database", "viaunix");
    assert!(!rows.is_empty(), "{:?}", servers.rows);
    assert_eq!(servers.get(rows[0], "addr"), Some("unix"));
    assert_eq!(
        servers.get(rows[0], "port"),
        Some(pg.port.to_string().as_str())
    );

    // A cancel goes to the server over the socket as well.
    cancel_running_sleep(c).await;
}

async fn connect_tcp(p: &Pgtether, dbname: &str) -> tokio_postgres::Client {
    let url = p
        .url("app", "app")
        .replace("dbname=app", &format!("dbname={dbname}"));
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_keeps_unix_clients_and_the_socket() {
    let dir = socket_dir();
    let control = dir.join("control.sock");
    let pg = cluster();
    let mut old = Pgtether::start(Opts {
        listen_extra: listen_in(&dir),
        extra: format!(
            "[runtime]\ncontrol_socket = \"{}\"\nshutdown_timeout = \"20s\"\n\
             [databases.viaunix]\nhost = \"{}\"\nport = {}\ndbname = \"app\"\n",
            control.display(),
            pg.dir.display(),
            pg.port
        ),
        ..Opts::default()
    });
    let c = connect_unix(&dir, old.port, "app", "app", "app")
        .await
        .unwrap();
    c.batch_execute("SET application_name = 'moved_over_unix'")
        .await
        .unwrap();
    let st = c.prepare("SELECT $1::int + 1").await.unwrap();
    // Pinned by a temp table to a server connection over PostgreSQL's socket: that
    // connection moves too.
    let pinned = connect_unix(&dir, old.port, "app", "app", "viaunix")
        .await
        .unwrap();
    pinned
        .batch_execute("CREATE TEMP TABLE moved (x int); INSERT INTO moved VALUES (9)")
        .await
        .unwrap();
    let new = old.takeover(&[]);
    let status = old
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the old process did not exit: {}", old.log()));
    assert!(status.success(), "old process: {status}: {}", old.log());

    // The client kept its connection and its session…
    assert_eq!(
        value(&c, "SHOW application_name").await.unwrap(),
        "moved_over_unix"
    );
    assert_eq!(c.query_one(&st, &[&41]).await.unwrap().get::<_, i32>(0), 42);
    assert_eq!(
        value(&pinned, "SELECT x::text FROM moved").await.unwrap(),
        "9"
    );
    // …and the new process accepts on the socket it inherited.
    let fresh = connect_unix(&dir, new.port, "app", "app", "app")
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", new.log()));
    assert_eq!(value(&fresh, "SELECT 4::text").await.unwrap(), "4");
    assert!(new.log().contains("receiving sessions"), "{}", new.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_receives_the_socket_and_its_clients_at_sigterm() {
    let dir = socket_dir();
    let peers = dir.join("peers");
    let listen = format!("reuse_port = true\n{}", listen_in(&dir));
    let mut first = Pgtether::start(Opts {
        listen_extra: Box::leak(listen.into_boxed_str()),
        extra: format!("[runtime]\npeer_dir = \"{}\"\n", peers.display()),
        ..Opts::default()
    });
    let c = connect_unix(&dir, first.port, "app", "app", "app")
        .await
        .unwrap();
    c.batch_execute("SET application_name = 'peer_over_unix'")
        .await
        .unwrap();
    // The peer finds the socket served and does not take it…
    let peer = first.start_peer();
    let started = Instant::now();
    while std::fs::read_dir(&peers).map_or(0, |d| d.count()) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "peer did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        peer.log().contains("a peer serves the Unix-domain socket"),
        "{}",
        peer.log()
    );
    // …until the first one stops and hands it over with its clients.
    first.signal(15);
    let status = first
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the first peer did not exit: {}", first.log()));
    assert!(status.success(), "{status}: {}", first.log());
    assert_eq!(
        value(&c, "SHOW application_name").await.unwrap(),
        "peer_over_unix"
    );
    let fresh = connect_unix(&dir, peer.port, "app", "app", "app")
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", peer.log()));
    assert_eq!(value(&fresh, "SELECT 5::text").await.unwrap(), "5");
}

#[test]
fn libpq_finds_the_socket_by_directory_and_port() {
    let dir = socket_dir();
    let p = Pgtether::start(Opts {
        listen_extra: listen_in(&dir),
        ..Opts::default()
    });
    let out = std::process::Command::new("psql")
        .arg("-h")
        .arg(&dir)
        .args([
            "-p",
            &p.port.to_string(),
            "-U",
            "app",
            "-d",
            "app",
            "-X",
            "-A",
            "-t",
        ])
        .args([
            "-c",
            "SELECT 40 + 2",
            "-c",
            "SELECT current_setting('application_name')",
        ])
        .env("PGPASSWORD", "app")
        .env("PGAPPNAME", "psql_over_unix")
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("psql starts: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), "42\npsql_over_unix");
}
