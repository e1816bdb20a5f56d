//! Soak: thousands of clients connect through pgtether (transaction mode, pool of 10), run
//! simple and extended queries, cancel running queries, and drop their sockets mid-query and
//! mid-transaction, while the database restarts once. Every error must be one that the
//! restart or a cancel explains; afterwards no server connection, client slot or memory may
//! have leaked, and pgtether still serves. One test, in its own binary, because it restarts
//! the cluster this binary shares.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::admin::{admin, show, ADMIN_EXTRA};
use common::{cluster, direct_sql, msg, value, Opts, Pgtether};
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

const POOL_SIZE: usize = 10;
/// `pool.acquire_timeout`; errors of a database that is down may arrive this long after it
/// came back (a client that began waiting just before).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
const WARMUP_ATTEMPTS: usize = 600;
const ATTEMPTS: usize = 3000;
const CONCURRENCY: usize = 250;
/// How long one client's whole script may take before it counts as a hang.
const CLIENT_LIMIT: Duration = Duration::from_secs(60);
/// RSS growth over the warm-up baseline that fails the test: a leak of 4 kB per client over
/// the run's 3,000 clients (and their cancel connections) would exceed it.
const RSS_MARGIN_KB: u64 = 10 * 1024;

/// Errors a database restart explains: the server connection lost under a query (08006, or
/// the server's own 57P01), the transaction that was on it (25P02), and no server connection
/// while it is down (08001, 53300).
const RESTART_CODES: &[&str] = &["08006", "57P01", "25P02", "08001", "53300"];

/// When the upstream was down: errors with [`RESTART_CODES`] are expected only then.
#[derive(Default)]
struct Window {
    started: Mutex<Option<Instant>>,
    ended: Mutex<Option<Instant>>,
}

impl Window {
    fn covers(&self, at: Instant) -> bool {
        let Some(started) = *self.started.lock().unwrap() else {
            return false;
        };
        at >= started
            && self
                .ended
                .lock()
                .unwrap()
                .is_none_or(|ended| at <= ended + ACQUIRE_TIMEOUT + Duration::from_secs(5))
    }
}

/// What happened, by class, and what should not have.
#[derive(Default)]
struct Tally {
    counts: Mutex<BTreeMap<String, usize>>,
    unexpected: Mutex<Vec<String>>,
}

impl Tally {
    fn count(&self, class: &str) {
        *self
            .counts
            .lock()
            .unwrap()
            .entry(class.to_string())
            .or_default() += 1;
    }

    fn fail(&self, what: String) {
        self.unexpected.lock().unwrap().push(what);
    }
}

struct Soak {
    port: u16,
    window: Window,
    tally: Tally,
    /// Queries left running by clients that then vanished.
    abandoned: AtomicUsize,
}

type PgResult<T> = Result<T, tokio_postgres::Error>;

/// An error that ends a client's script: expected (counted) or not (recorded).
struct Stop;

impl Soak {
    fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=app password=app dbname=app sslmode=disable",
            self.port
        )
    }

    /// Checks a statement's result. `allowed` are codes expected here whenever they occur;
    /// [`RESTART_CODES`] are expected while the database restarts. Anything else (also an
    /// error without SQLSTATE, like a lost connection) is recorded as unexpected.
    fn check<T>(
        &self,
        c: &Client,
        what: &str,
        r: PgResult<T>,
        allowed: &[&str],
    ) -> Result<T, Stop> {
        let e = match r {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let now = Instant::now();
        let Some(db) = e.as_db_error() else {
            self.tally
                .fail(format!("{what}: error without SQLSTATE: {e:?}"));
            return Err(Stop);
        };
        let code = db.code().code();
        if allowed.contains(&code) {
            self.tally.count(code);
        } else if RESTART_CODES.contains(&code) && self.window.covers(now) {
            self.tally.count(&format!("{code} (restart)"));
        } else {
            self.tally
                .fail(format!("{what}: unexpected {code}: {db:?}"));
            return Err(Stop);
        }
        // In transaction mode a client keeps its connection through every one of these.
        if c.is_closed() {
            self.tally
                .fail(format!("{what}: client connection closed after {code}"));
        }
        Err(Stop)
    }

    /// Checks that a statement failed with `code` (then the script goes on), or with an
    /// error the restart explains (then it stops).
    fn expect_code<T>(
        &self,
        c: &Client,
        what: &str,
        r: PgResult<T>,
        code: &str,
    ) -> Result<(), Stop> {
        match r {
            Ok(_) => {
                self.tally
                    .fail(format!("{what}: succeeded, expected {code}"));
                Err(Stop)
            }
            Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == code) => {
                self.tally.count(code);
                Ok(())
            }
            Err(e) => self.check(c, what, Err::<T, _>(e), &[]).map(|_| ()),
        }
    }

    fn expect_eq(&self, what: &str, got: String, want: String) -> Result<(), Stop> {
        if got == want {
            Ok(())
        } else {
            self.tally
                .fail(format!("{what}: wrong result {got:?}, expected {want:?}"));
            Err(Stop)
        }
    }

    async fn connect(&self) -> Result<(Client, JoinHandle<()>), Stop> {
        match tokio_postgres::connect(&self.url(), NoTls).await {
            Ok((c, conn)) => Ok((
                c,
                tokio::spawn(async move {
                    let _ = conn.await;
                }),
            )),
            Err(e) => {
                // Logging in needs no server connection once pgtether knows the server's
                // parameters; no login may fail.
                self.tally.fail(format!("connect: {e:?}"));
                Err(Stop)
            }
        }
    }

    /// One client's whole life, by kind.
    async fn client(&self, i: usize) {
        let kind = i % 10;
        let variant = (i / 10) % 3;
        let script = async {
            match kind {
                0..=2 => self.simple(i).await,
                3..=5 => self.extended(i).await,
                6 => self.cancel_autocommit().await,
                7 => self.cancel_in_transaction().await,
                8 => self.vanish(variant).await,
                _ => self.vanish_raw(variant).await,
            }
        };
        match tokio::time::timeout(CLIENT_LIMIT, script).await {
            Ok(Ok(())) => self.tally.count(&format!("ok kind {kind}")),
            Ok(Err(Stop)) => {}
            Err(_) => self.tally.fail(format!(
                "client {i} (kind {kind}) hung for {CLIENT_LIMIT:?}"
            )),
        }
    }

    /// Simple protocol: statements, a transaction block, results checked.
    async fn simple(&self, i: usize) -> Result<(), Stop> {
        let (c, _conn) = self.connect().await?;
        let one = value(&c, "SELECT 1").await;
        self.expect_eq("simple", self.check(&c, "simple", one, &[])?, "1".into())?;
        let r = c
            .batch_execute("BEGIN; SELECT txid_current(); SELECT 2; COMMIT")
            .await;
        if let Err(Stop) = self.check(&c, "simple transaction", r, &[]) {
            // A failed block stays failed until the client ends it.
            let r = c.batch_execute("ROLLBACK").await;
            let _ = self.check(&c, "rollback", r, &[]);
            return Err(Stop);
        }
        let got = value(&c, &format!("SELECT {i}")).await;
        self.expect_eq("simple", self.check(&c, "simple", got, &[])?, i.to_string())
    }

    /// Extended protocol: a prepared statement used across transactions, a transaction.
    async fn extended(&self, i: usize) -> Result<(), Stop> {
        let (c, _conn) = self.connect().await?;
        let n = i as i32;
        let st = c.prepare("SELECT $1::int + 1").await;
        let st = self.check(&c, "prepare", st, &[])?;
        let row = c.query_one(&st, &[&n]).await;
        let got: i32 = self.check(&c, "execute", row, &[])?.get(0);
        self.expect_eq("execute", got.to_string(), (n + 1).to_string())?;
        {
            let mut c2 = c;
            let tx = c2.transaction().await;
            let tx = self.check_tx(tx)?;
            let row = tx.query_one("SELECT $1::text || 'x'", &[&"a"]).await;
            let row = match row {
                Ok(row) => row,
                Err(e) => return self.check_plain("extended transaction", e),
            };
            self.expect_eq("extended transaction", row.get(0), "ax".into())?;
            if let Err(e) = tx.commit().await {
                return self.check_plain("commit", e);
            }
            let row = c2.query_one(&st, &[&(n + 1)]).await;
            let got: i32 = self.check(&c2, "execute again", row, &[])?.get(0);
            self.expect_eq("execute again", got.to_string(), (n + 2).to_string())
        }
    }

    fn check_tx<T>(&self, r: PgResult<T>) -> Result<T, Stop> {
        r.map_err(|e| {
            let _ = self.check_plain::<()>("begin", e);
            Stop
        })
    }

    /// [`Soak::check`] for an error where the client is borrowed elsewhere (inside a
    /// `Transaction`, which rolls back when dropped).
    fn check_plain<T>(&self, what: &str, e: tokio_postgres::Error) -> Result<T, Stop> {
        let now = Instant::now();
        match e.as_db_error().map(|d| d.code().code()) {
            Some(code) if RESTART_CODES.contains(&code) && self.window.covers(now) => {
                self.tally.count(&format!("{code} (restart)"));
            }
            _ => self.tally.fail(format!("{what}: unexpected error: {e:?}")),
        }
        Err(Stop)
    }

    /// `pg_sleep` cancelled outside a transaction block: 57014, then the client goes on.
    async fn cancel_autocommit(&self) -> Result<(), Stop> {
        let (c, _conn) = self.connect().await?;
        let r = self.sleep_cancelled(&c).await?;
        self.expect_code(&c, "cancelled sleep", r, "57014")?;
        let one = value(&c, "SELECT 1").await;
        self.expect_eq(
            "after cancel",
            self.check(&c, "after cancel", one, &[])?,
            "1".into(),
        )
    }

    /// `pg_sleep` cancelled inside a transaction block: 57014, the block is failed (25P02)
    /// until ROLLBACK, then the client goes on.
    async fn cancel_in_transaction(&self) -> Result<(), Stop> {
        let (c, _conn) = self.connect().await?;
        let r = c.batch_execute("BEGIN; SELECT 1").await;
        if self.check(&c, "begin", r, &[]).is_err() {
            let r = c.batch_execute("ROLLBACK").await;
            let _ = self.check(&c, "rollback", r, &[]);
            return Err(Stop);
        }
        let r = self.sleep_cancelled(&c).await?;
        let failed_block = match self.expect_code(&c, "cancelled sleep in transaction", r, "57014")
        {
            Ok(()) => {
                let r = value(&c, "SELECT 1").await;
                self.expect_code(&c, "in the cancelled transaction", r, "25P02")
            }
            Err(Stop) => Err(Stop),
        };
        let r = c.batch_execute("ROLLBACK").await;
        self.check(&c, "rollback", r, &[])?;
        failed_block?;
        let one = value(&c, "SELECT 1").await;
        self.expect_eq(
            "after rollback",
            self.check(&c, "after rollback", one, &[])?,
            "1".into(),
        )
    }

    /// Runs `pg_sleep(30)` and cancels it until it ends. Each cancel is delivered (pgtether
    /// closes the cancel connection once PostgreSQL has it) before the next is sent, so
    /// none is left over once the query ended. A sleep that completes is an error.
    async fn sleep_cancelled(&self, c: &Client) -> Result<PgResult<()>, Stop> {
        let request = cancel_request(c).await;
        let query = c.simple_query("SELECT pg_sleep(30)");
        tokio::pin!(query);
        loop {
            tokio::select! {
                r = &mut query => {
                    return match r {
                        Ok(_) => {
                            self.tally.fail("pg_sleep(30) was not cancelled".into());
                            Err(Stop)
                        }
                        Err(e) => Ok(Err(e)),
                    };
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    let mut s = match TcpStream::connect(("127.0.0.1", self.port)).await {
                        Ok(s) => s,
                        Err(e) => {
                            self.tally.fail(format!("cancel connect: {e}"));
                            return Err(Stop);
                        }
                    };
                    let delivered = async {
                        s.write_all(&request).await?;
                        let mut rest = Vec::new();
                        s.read_to_end(&mut rest).await
                    };
                    match tokio::time::timeout(Duration::from_secs(15), delivered).await {
                        Ok(Ok(0)) => self.tally.count("cancel requests"),
                        other => {
                            self.tally.fail(format!("cancel request: {other:?}"));
                            return Err(Stop);
                        }
                    }
                }
            }
        }
    }

    /// A tokio-postgres client whose socket is dropped without Terminate: inside a
    /// transaction block (0), during a simple-protocol `pg_sleep` (1), during an
    /// extended-protocol one (2).
    async fn vanish(&self, variant: usize) -> Result<(), Stop> {
        let (c, conn) = self.connect().await?;
        let c = Arc::new(c);
        match variant {
            0 => {
                let r = c.batch_execute("BEGIN; SELECT txid_current()").await;
                if self.check(&c, "begin before vanishing", r, &[]).is_err() {
                    conn.abort();
                    return Err(Stop);
                }
            }
            _ => {
                let c2 = c.clone();
                let q = tokio::spawn(async move {
                    if variant == 1 {
                        c2.simple_query("SELECT pg_sleep(60)").await.map(|_| ())
                    } else {
                        c2.query("SELECT pg_sleep($1)", &[&60f64]).await.map(|_| ())
                    }
                });
                tokio::time::sleep(Duration::from_millis(150)).await;
                if q.is_finished() {
                    // Only the restart may have ended it.
                    let r = q.await.expect("query task");
                    conn.abort();
                    if r.is_ok() {
                        self.tally.fail("pg_sleep(60) returned".into());
                    }
                    return self.check(&c, "sleep before vanishing", r, &[]);
                }
                self.abandoned.fetch_add(1, Ordering::Relaxed);
            }
        }
        conn.abort();
        Ok(())
    }

    /// A hand-driven client that logs in and leaves mid-protocol: after Parse/Bind/Execute
    /// of a `pg_sleep` without Sync (0), in the middle of a message (1), right after sending
    /// a transaction block with a `pg_sleep` in it (2).
    async fn vanish_raw(&self, variant: usize) -> Result<(), Stop> {
        let mut s = match self.raw_login().await {
            Ok(s) => s,
            Err(e) => {
                self.tally.fail(format!("raw login: {e}"));
                return Err(Stop);
            }
        };
        let bytes = match variant {
            0 => {
                let mut b = msg(b'P', b"\0SELECT pg_sleep(60)\0\0\0");
                b.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
                b.extend(msg(b'E', b"\0\0\0\0\0"));
                b.extend(msg(b'H', b""));
                b
            }
            1 => {
                let mut b = msg(b'Q', b"SELECT 1\0");
                // A header announcing 1000 bytes, and 10 of them.
                b.extend(b"Q\0\0\x03\xe8SELECT 123");
                b
            }
            _ => msg(b'Q', b"BEGIN; SELECT pg_sleep(60)\0"),
        };
        if s.write_all(&bytes).await.is_err() {
            self.tally.fail("raw client could not send".into());
            return Err(Stop);
        }
        if variant != 1 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            self.abandoned.fetch_add(1, Ordering::Relaxed);
        }
        drop(s);
        Ok(())
    }

    /// Logs in as `app` with md5 over a plain socket; returns it after ReadyForQuery.
    async fn raw_login(&self) -> Result<TcpStream, String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .map_err(|e| e.to_string())?;
        let mut out = BytesMut::new();
        postgres_protocol::message::frontend::startup_message(
            [("user", "app"), ("database", "app")],
            &mut out,
        )
        .unwrap();
        s.write_all(&out).await.map_err(|e| e.to_string())?;
        let mut buf = BytesMut::new();
        loop {
            let m = match Message::parse(&mut buf).map_err(|e| e.to_string())? {
                Some(m) => m,
                None => {
                    let n = tokio::time::timeout(Duration::from_secs(20), s.read_buf(&mut buf))
                        .await
                        .map_err(|_| "login timed out".to_string())?
                        .map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("EOF during login".into());
                    }
                    continue;
                }
            };
            match m {
                Message::AuthenticationMd5Password(body) => {
                    let hash =
                        postgres_protocol::authentication::md5_hash(b"app", b"app", body.salt());
                    let mut out = BytesMut::new();
                    postgres_protocol::message::frontend::password_message(
                        hash.as_bytes(),
                        &mut out,
                    )
                    .unwrap();
                    s.write_all(&out).await.map_err(|e| e.to_string())?;
                }
                Message::ErrorResponse(body) => {
                    return Err(format!("login refused: {:?}", common::error_fields(&body)))
                }
                Message::ReadyForQuery(_) => return Ok(s),
                _ => {}
            }
        }
    }

    /// Runs `attempts` clients, at most [`CONCURRENCY`] at once; `midway` is signalled when
    /// half of them have started.
    async fn round(
        self: &Arc<Self>,
        first: usize,
        attempts: usize,
        mut midway: Option<tokio::sync::oneshot::Sender<()>>,
    ) {
        let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
        let mut tasks = Vec::with_capacity(attempts);
        for i in first..first + attempts {
            let permit = permits.clone().acquire_owned().await.unwrap();
            if i - first == attempts / 2 {
                if let Some(go) = midway.take() {
                    let _ = go.send(());
                }
            }
            let soak = self.clone();
            tasks.push(tokio::spawn(async move {
                soak.client(i).await;
                drop(permit);
            }));
        }
        for t in tasks {
            t.await.expect("a client task ran without panicking");
        }
    }
}

/// The CancelRequest tokio-postgres would send for `c` (its BackendKeyData from pgtether),
/// captured from an in-memory stream so the test can wait for it to be delivered.
async fn cancel_request(c: &Client) -> Vec<u8> {
    let (ours, mut theirs) = tokio::io::duplex(64);
    c.cancel_token()
        .cancel_query_raw(ours, NoTls)
        .await
        .expect("cancel request written");
    let mut request = Vec::new();
    theirs.read_to_end(&mut request).await.unwrap();
    assert_eq!(request.len(), 16, "a CancelRequest");
    request
}

/// pgtether's resident set size in kB.
fn rss_kb(p: &Pgtether) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Why pgtether and the database are not yet back to idle, or `None` once they are: no
/// client in SHOW POOLS, SHOW CLIENTS or the client gauges, at most the pool's size of
/// server connections, none of them in a transaction or running anything.
async fn not_drained(p: &Pgtether, a: &Client) -> Option<String> {
    let pools = show(a, "SHOW POOLS").await;
    let rows = pools.rows_where("database", "app");
    if rows.len() != 1 {
        return Some(format!("SHOW POOLS: {pools:?}"));
    }
    let row = rows[0];
    let clients: i64 = ["cl_active", "cl_waiting", "cl_idle"]
        .iter()
        .map(|c| pools.int(row, c))
        .sum();
    let servers: i64 = ["sv_active", "sv_idle", "sv_used", "sv_login"]
        .iter()
        .map(|c| pools.int(row, c))
        .sum();
    if clients != 0 || pools.int(row, "sv_active") != 0 || servers > POOL_SIZE as i64 {
        return Some(format!("SHOW POOLS: {:?} {row:?}", pools.columns));
    }
    let listed = show(a, "SHOW CLIENTS").await;
    let app_clients = listed
        .rows
        .iter()
        .filter(|r| listed.get(r, "database") != Some("pgtether"))
        .count();
    if app_clients != 0 {
        return Some(format!("SHOW CLIENTS lists {app_clients} clients"));
    }
    let (_, body) = p.http_get("/metrics").await;
    let gauges: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("pgtether_client_connections{") && l.contains("database=\"app\""))
        .collect();
    if gauges.is_empty() {
        return Some("no pgtether_client_connections series for app".into());
    }
    if gauges
        .iter()
        .any(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) != Some(0.0))
    {
        return Some(format!("client gauges: {gauges:?}"));
    }
    let backends = direct_sql(
        "SELECT count(*) || ' ' || count(*) FILTER (WHERE state <> 'idle') \
         || ' ' || string_agg(state || ':' || left(query, 40), '; ') \
         FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'",
    );
    let mut parts = backends.splitn(3, ' ');
    let total: usize = parts.next().unwrap().parse().expect("a count");
    let busy: usize = parts.next().unwrap_or("0").parse().expect("a count");
    if total > POOL_SIZE || busy > 0 {
        return Some(format!(
            "pg_stat_activity: {total} backends of app, {busy} not idle: {}",
            parts.next().unwrap_or("")
        ));
    }
    None
}

/// Polls [`not_drained`] until it passes or `limit` ends (then panics with the last reason).
async fn wait_drained(p: &Pgtether, a: &Client, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        match not_drained(p, a).await {
            None => return,
            Some(why) if Instant::now() > deadline => {
                panic!(
                    "not back to idle after {limit:?}: {why}\n{}",
                    tail(&p.log())
                )
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains("admin command"))
        .collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn report(name: &str, soak: &Soak) -> BTreeMap<String, usize> {
    let counts = soak.tally.counts.lock().unwrap().clone();
    println!("{name}: {counts:?}");
    let unexpected = soak.tally.unexpected.lock().unwrap();
    assert!(
        unexpected.is_empty(),
        "{name}: {} unexpected outcomes, first ones:\n{}",
        unexpected.len(),
        unexpected
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_cancels_disconnects_and_a_database_restart() {
    let started = Instant::now();
    let p = Pgtether::start(Opts {
        size: POOL_SIZE,
        acquire_timeout: "10s",
        auth: "md5",
        extra: ADMIN_EXTRA.to_string(),
        ..Opts::default()
    });
    let a = admin(&p).await;
    let rss_start = rss_kb(&p);

    // Warm-up: the same mix without a restart, so that buffers, allocator arenas and
    // the pool reach their working size before the baseline is taken.
    let warm = Arc::new(Soak {
        port: p.port,
        window: Window::default(),
        tally: Tally::default(),
        abandoned: AtomicUsize::new(0),
    });
    warm.round(0, WARMUP_ATTEMPTS, None).await;
    let warm_counts = report("warm-up", &warm);
    wait_drained(&p, &a, Duration::from_secs(30)).await;
    let rss_baseline = rss_kb(&p);
    println!(
        "warm-up: {WARMUP_ATTEMPTS} clients in {:?}, RSS {rss_start} kB at start, {rss_baseline} kB after",
        started.elapsed()
    );
    assert!(warm_counts.get("57014").copied().unwrap_or(0) > 0);

    // The run: the database restarts when half the clients have started.
    let soak = Arc::new(Soak {
        port: p.port,
        window: Window::default(),
        tally: Tally::default(),
        abandoned: AtomicUsize::new(0),
    });
    let run_started = Instant::now();
    let (go, go_rx) = tokio::sync::oneshot::channel::<()>();
    let restarter = {
        let soak = soak.clone();
        tokio::spawn(async move {
            go_rx.await.expect("the round reaches its middle");
            *soak.window.started.lock().unwrap() = Some(Instant::now());
            tokio::task::spawn_blocking(|| {
                cluster()
                    .pg_ctl(&["restart", "-m", "fast"])
                    .unwrap_or_else(|e| panic!("pg_ctl restart: {e}"))
            })
            .await
            .expect("pg_ctl restart ran");
            *soak.window.ended.lock().unwrap() = Some(Instant::now());
        })
    };
    soak.round(WARMUP_ATTEMPTS, ATTEMPTS, Some(go)).await;
    restarter.await.expect("the restart task ran");
    let run_time = run_started.elapsed();
    let counts = report("run", &soak);
    let window = (
        soak.window.started.lock().unwrap().expect("restarted"),
        soak.window.ended.lock().unwrap().expect("restart finished"),
    );
    println!(
        "run: {ATTEMPTS} clients in {run_time:?}; restart took {:?}; {} queries abandoned by vanishing clients",
        window.1 - window.0,
        soak.abandoned.load(Ordering::Relaxed)
    );
    for kind in 0..=9 {
        assert!(
            counts.get(&format!("ok kind {kind}")).copied().unwrap_or(0) > 0,
            "no client of kind {kind} completed: {counts:?}"
        );
    }
    assert!(
        counts.get("57014").copied().unwrap_or(0) > 100,
        "{counts:?}"
    );
    assert!(counts.get("25P02").copied().unwrap_or(0) > 50, "{counts:?}");

    // (1), (2): no server connection or client slot left behind.
    wait_drained(&p, &a, Duration::from_secs(30)).await;
    // (3): memory back to the warm-up baseline (the minimum over a short settle).
    let mut rss_after = rss_kb(&p);
    let settle = Instant::now() + Duration::from_secs(5);
    while rss_after > rss_baseline + RSS_MARGIN_KB && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(250)).await;
        rss_after = rss_after.min(rss_kb(&p));
    }
    println!(
        "RSS: {rss_start} kB at start, {rss_baseline} kB after warm-up, {rss_after} kB after the run ({:+} kB)",
        rss_after as i64 - rss_baseline as i64
    );
    assert!(
        rss_after <= rss_baseline + RSS_MARGIN_KB,
        "pgtether grew from {rss_baseline} kB to {rss_after} kB over {ATTEMPTS} clients"
    );
    // (4): still serving.
    let c = p.connect().await;
    assert_eq!(value(&c, "SELECT 41 + 1").await.unwrap(), "42");
    drop(c);
    println!("soak took {:?}", started.elapsed());

    // Leave a server this binary's process owns no more: stop what pg_ctl started.
    drop(a);
    let _ = cluster().pg_ctl(&["stop", "-m", "fast"]);
}
