//! Test harness: one throwaway PostgreSQL cluster per test binary (the same code as
//! `pgtether demo`), and a pgtether process per test with its own generated config.
#![allow(dead_code)]

pub mod admin;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use pgtether::embedded::{free_port, EmbeddedPostgres, Setup};
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

static CLUSTER: OnceLock<EmbeddedPostgres> = OnceLock::new();
static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

/// This test process's directory for the files its tests write (configs, logs, sockets,
/// scripts): `$TMPDIR/pgtether-tests-<pid>`. The test harness has no end-of-run hook and
/// killed pgtether processes leave their sockets, so the directories of test processes that
/// are gone are removed when the next one starts.
pub fn scratch() -> &'static std::path::Path {
    SCRATCH.get_or_init(|| {
        let tmp = std::env::temp_dir();
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("pgtether-tests-"))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = tmp.join(format!("pgtether-tests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

/// The shared cluster, started on first use. Roles: `app` (SCRAM, password `app`),
/// `tether_md5` (md5, password `md5pw`), `tether_trust` (trusted); database `app`.
pub fn cluster() -> &'static EmbeddedPostgres {
    CLUSTER.get_or_init(|| {
        let setup = Setup {
            sql: vec![
                "CREATE ROLE app LOGIN PASSWORD 'app'".into(),
                "CREATE DATABASE app OWNER app".into(),
                "SET password_encryption = 'md5'; CREATE ROLE tether_md5 LOGIN PASSWORD 'md5pw'"
                    .into(),
                "CREATE ROLE tether_trust LOGIN".into(),
            ],
            hba: vec![
                "host all tether_md5 127.0.0.1/32 md5".into(),
                "host all tether_trust 127.0.0.1/32 trust".into(),
            ],
        };
        // The server gets a parent-death signal from the thread that starts it, so that
        // thread must live as long as the test process: it parks forever.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(EmbeddedPostgres::start(&setup));
            loop {
                std::thread::park();
            }
        });
        match rx.recv().expect("cluster thread reports") {
            Ok(pg) => pg,
            Err(e) => panic!("cannot start the test PostgreSQL cluster: {e}"),
        }
    })
}

/// Creates an auth_query lookup role `role` with password `password` and its SECURITY DEFINER
/// function `<role>.user_lookup($1)`, the setup the README's Security section recommends.
pub fn create_auth_lookup(role: &str, password: &str) {
    direct_sql(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD '{password}';
         CREATE SCHEMA {role};
         CREATE FUNCTION {role}.user_lookup(p_user text)
           RETURNS TABLE (usename name, passwd text)
           LANGUAGE sql STABLE SECURITY DEFINER
           SET search_path = pg_catalog, pg_temp
           AS $$ SELECT rolname, rolpassword FROM pg_authid
                 WHERE rolname = p_user AND rolcanlogin
                   AND (rolvaliduntil IS NULL OR rolvaliduntil > now()) $$;
         REVOKE ALL ON FUNCTION {role}.user_lookup(text) FROM PUBLIC;
         GRANT USAGE ON SCHEMA {role} TO {role};
         GRANT EXECUTE ON FUNCTION {role}.user_lookup(text) TO {role};"
    ));
}

/// Runs SQL on the cluster directly (as the superuser, database `app`), returning the output.
pub fn direct_sql(sql: &str) -> String {
    cluster()
        .psql_as("postgres", "app", sql)
        .unwrap_or_else(|e| panic!("direct SQL failed: {sql}: {e}"))
}

/// Server connections pgtether holds for `user`, from pg_stat_activity.
pub fn server_connections(user: &str) -> usize {
    direct_sql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}' AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    ))
    .parse()
    .expect("a count")
}

/// Knobs for the generated config; `extra` is appended verbatim.
#[derive(Clone)]
pub struct Opts {
    pub mode: &'static str,
    pub size: usize,
    pub acquire_timeout: &'static str,
    pub auth: &'static str,
    /// `[listen] max_clients`.
    pub max_clients: usize,
    pub extra: String,
    /// Lines added to `[listen]`.
    pub listen_extra: &'static str,
    /// Lines added to `[databases.app]`.
    pub database_extra: String,
    /// Lines added to `[auth]`.
    pub auth_extra: String,
    /// Environment variables for the pgtether process (`${VAR}` in the config, overrides).
    pub env: Vec<(String, String)>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            mode: "transaction",
            size: 5,
            acquire_timeout: "5s",
            auth: "scram-sha-256",
            max_clients: 10_000,
            extra: String::new(),
            listen_extra: "",
            database_extra: String::new(),
            auth_extra: String::new(),
            env: Vec::new(),
        }
    }
}

/// A running pgtether process, killed when dropped.
pub struct Pgtether {
    child: Child,
    pub port: u16,
    pub http_port: u16,
    pub config_path: PathBuf,
}

impl Pgtether {
    pub fn start(opts: Opts) -> Pgtether {
        // A port found free can be taken by another test (or as a connection's source port)
        // before pgtether binds it: then it is started again on other ports.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match Pgtether::try_start(&opts) {
                Ok(p) => return p,
                Err(log) if attempts < 3 && log.contains("already in use") => {}
                Err(log) => panic!("pgtether exited: {log}"),
            }
        }
    }

    fn try_start(opts: &Opts) -> Result<Pgtether, String> {
        let pg = cluster();
        let port = free_port().unwrap();
        let http_port = free_port().unwrap();
        let text = format!(
            r#"
[listen]
addr = "127.0.0.1:{port}"
max_clients = {max_clients}
{listen_extra}
[http]
addr = "127.0.0.1:{http_port}"
[pool]
mode = "{mode}"
size = {size}
acquire_timeout = "{acquire}"
[auth]
method = "{auth}"
{auth_extra}
[databases.app]
host = "127.0.0.1"
port = {pg_port}
{database_extra}
[users.app]
password = "app"
[users.tether_md5]
password = "md5pw"
[users.tether_trust]
password = "trustpw"
{extra}
"#,
            mode = opts.mode,
            size = opts.size,
            acquire = opts.acquire_timeout,
            auth = opts.auth,
            max_clients = opts.max_clients,
            pg_port = pg.port,
            extra = opts.extra,
            listen_extra = opts.listen_extra,
            database_extra = opts.database_extra,
            auth_extra = opts.auth_extra,
        );
        Pgtether::start_config(&text, port, http_port, &opts.env)
    }

    /// Starts pgtether with the config `text`, which listens on `port` (and `http_port`);
    /// its log if it exits instead of listening.
    pub fn start_config(
        text: &str,
        port: u16,
        http_port: u16,
        env: &[(String, String)],
    ) -> Result<Pgtether, String> {
        let n = TAKEOVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let config_path = scratch().join(format!("pgtether-{port}-{n}.toml"));
        std::fs::File::create(&config_path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .expect("config written");
        let log = std::fs::File::create(config_path.with_extension("log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_pgtether"))
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "pgtether=debug")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("pgtether starts");
        let mut p = Pgtether {
            child,
            port,
            http_port,
            config_path,
        };
        p.wait_listening()?;
        Ok(p)
    }

    /// Waits until pgtether accepts connections; its log if it exited instead. The port
    /// answering is not enough: a Unix-domain socket is bound after it (its name carries the
    /// port's number), and a port inherited in a takeover answers before this process does.
    fn wait_listening(&mut self) -> Result<(), String> {
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
            || !self.log().contains("is accepting connections")
        {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("status {status}: {}", self.log()));
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "pgtether did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts `pgtether --takeover` with this instance's config (which must set
    /// `[runtime] control_socket`); the returned handle serves the same ports once the
    /// takeover is done. `env` adds variables (e.g. a fault to inject).
    pub fn takeover(&self, env: &[(&str, &str)]) -> Pgtether {
        let n = TAKEOVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let config_path = self.config_path.with_extension(format!("t{n}.toml"));
        std::fs::copy(&self.config_path, &config_path).expect("config copied");
        let log = std::fs::File::create(config_path.with_extension("log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_pgtether"))
            .arg("--config")
            .arg(&config_path)
            .arg("--takeover")
            .env("RUST_LOG", "pgtether=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("pgtether --takeover starts");
        Pgtether {
            child,
            port: self.port,
            http_port: self.http_port,
            config_path,
        }
    }

    /// Starts a second process with this config on the same client port (the config must
    /// set `reuse_port`), with its own HTTP port: a peer in the same pod.
    pub fn start_peer(&self) -> Pgtether {
        let n = TAKEOVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let config_path = self.config_path.with_extension(format!("p{n}.toml"));
        let http_port = free_port().unwrap();
        let text = std::fs::read_to_string(&self.config_path).unwrap().replace(
            &format!("127.0.0.1:{}", self.http_port),
            &format!("127.0.0.1:{http_port}"),
        );
        std::fs::write(&config_path, text).expect("config written");
        let log = std::fs::File::create(config_path.with_extension("log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_pgtether"))
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "pgtether=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("peer pgtether starts");
        Pgtether {
            child,
            port: self.port,
            http_port,
            config_path,
        }
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: i32) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// The pgtether process id (for /proc measurements).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `limit` for the process to exit by itself; its status if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// pgtether's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config_path.with_extension("log")).unwrap_or_default()
    }

    pub fn url(&self, user: &str, password: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname=app",
            self.port
        )
    }

    /// Connects as `app` with tokio-postgres.
    pub async fn connect(&self) -> tokio_postgres::Client {
        self.connect_as("app", "app")
            .await
            .expect("connect through pgtether")
    }

    pub async fn connect_as(
        &self,
        user: &str,
        password: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(&self.url(user, password), NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Connects as `user` from the local address `src` (any 127.x.y.z works on Linux's
    /// loopback), so tests can play clients from different addresses.
    pub async fn connect_from(
        &self,
        src: &str,
        user: &str,
        password: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let stream = connect_from(self.port, src).await;
        let config: tokio_postgres::Config = self.url(user, password).parse().expect("a config");
        let (client, conn) = config.connect_raw(stream, NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// GETs a path on the HTTP port; returns (status code, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.http_port))
            .await
            .expect("http connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().expect("status code");
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// The value of one metric series line (exact name and labels as rendered).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Polls a metric until `ok` holds (5 s at most): gauges and the counts a client's run
    /// adds move just after the client sees its answer.
    pub async fn metric_settles(&self, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let started = Instant::now();
        loop {
            let v = self.metric(series).await;
            if let Some(v) = v.filter(|v| ok(*v)) {
                return v;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{series} is {v:?}:\n{}",
                self.http_get("/metrics").await.1
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

static TAKEOVERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Drop for Pgtether {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config_path);
        let _ = std::fs::remove_file(self.config_path.with_extension("log"));
    }
}

/// The SQLSTATE of a tokio-postgres error, if the server (pgtether) sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

/// A TCP connection to pgtether's `port` from the local address `src`.
pub async fn connect_from(port: u16, src: &str) -> TcpStream {
    let src: std::net::IpAddr = src.parse().expect("a source address");
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind(std::net::SocketAddr::new(src, 0))
        .expect("bind the source address");
    socket
        .connect(([127, 0, 0, 1], port).into())
        .await
        .expect("connect")
}

/// A hand-driven protocol client for what drivers will not send (garbage, raw pipelines).
pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub async fn connect(port: u16) -> Raw {
        Raw {
            stream: TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
            buf: BytesMut::new(),
        }
    }

    /// Connects from the local address `src` (see [`connect_from`]).
    pub async fn connect_from(port: u16, src: &str) -> Raw {
        Raw {
            stream: connect_from(port, src).await,
            buf: BytesMut::new(),
        }
    }

    /// Connects and logs in with trust/cleartext-free SCRAM via a startup as `user`.
    /// Only for configs with `auth = "trust"`.
    pub async fn login_trust(port: u16, user: &str) -> Raw {
        let mut raw = Raw::connect(port).await;
        raw.startup(&[("user", user), ("database", "app")]).await;
        loop {
            match raw.recv().await {
                Message::ReadyForQuery(_) => return raw,
                Message::ErrorResponse(_) => panic!("login refused"),
                _ => {}
            }
        }
    }

    pub async fn startup(&mut self, params: &[(&str, &str)]) {
        let mut out = BytesMut::new();
        postgres_protocol::message::frontend::startup_message(params.iter().copied(), &mut out)
            .unwrap();
        self.send(&out).await;
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Next backend message; panics on EOF or after 10 s.
    pub async fn recv(&mut self) -> Message {
        self.try_recv(Duration::from_secs(10))
            .await
            .expect("a message before timeout")
            .expect("a message before EOF")
    }

    /// Next message, `Ok(None)` at EOF, `Err(())` on timeout.
    pub async fn try_recv(&mut self, limit: Duration) -> Result<Option<Message>, ()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(m) = Message::parse(&mut self.buf).expect("well-formed backend message") {
                return Ok(Some(m));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Reads one raw byte (for SSLRequest answers).
    pub async fn recv_byte(&mut self) -> u8 {
        self.stream.read_u8().await.expect("a byte")
    }

    /// Reads until an ErrorResponse and returns its (severity, code, message).
    pub async fn expect_error(&mut self) -> (String, String, String) {
        loop {
            if let Message::ErrorResponse(body) = self.recv().await {
                return error_fields(&body);
            }
        }
    }
}

/// (severity, code, message) of an ErrorResponse body.
pub fn error_fields(
    body: &postgres_protocol::message::backend::ErrorResponseBody,
) -> (String, String, String) {
    use fallible_iterator::FallibleIterator;
    let (mut s, mut c, mut m) = (String::new(), String::new(), String::new());
    let mut fields = body.fields();
    while let Some(f) = fields.next().unwrap() {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'S' => s = v,
            b'C' => c = v,
            b'M' => m = v,
            _ => {}
        }
    }
    (s, c, m)
}

/// A regular message: type byte, length, body.
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.put_i32(4 + body.len() as i32);
    v.extend_from_slice(body);
    v
}

/// First column of the first row of a simple-protocol query, as text. Simple protocol uses no
/// named statements, so it works in transaction mode whichever server runs it.
pub async fn value(c: &tokio_postgres::Client, sql: &str) -> Result<String, tokio_postgres::Error> {
    let msgs = c.simple_query(sql).await?;
    Ok(msgs
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some(r.get(0).unwrap_or("NULL").to_string())
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no row from {sql}")))
}

/// Runs `pg_sleep(20)` on `c`, cancels it with the client's cancel key after 300 ms, and
/// checks that the query ends with 57014 well before the sleep would have.
pub async fn cancel_running_sleep(c: tokio_postgres::Client) {
    let token = c.cancel_token();
    let started = Instant::now();
    let q = tokio::spawn(async move { c.batch_execute("SELECT pg_sleep(20)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(NoTls).await.unwrap();
    let err = q.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}
