//! Opening server connections for one pool and vetting them at checkout: deadpool's
//! [`managed::Manager`], the record of open connections for `SHOW SERVERS`, and connections
//! adopted from another process at a takeover.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use deadpool::managed::{self, Metrics as ObjectMetrics, RecycleError, RecycleResult};

use crate::config::PoolSettings;
use crate::metrics::PoolMetrics;
use crate::server::{ServerConn, ServerError, Upstream};

pub(super) fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

impl ServerManager {
    pub(super) fn new(upstream: Upstream, settings: &PoolSettings, metrics: &PoolMetrics) -> Self {
        ServerManager {
            upstream: RwLock::new(upstream),
            lifetime_ms: AtomicU64::new(millis(settings.server_lifetime)),
            check_delay_ms: AtomicU64::new(millis(settings.server_check_delay)),
            close_before_ns: AtomicU64::new(0),
            base: Instant::now(),
            logging_in: AtomicUsize::new(0),
            servers: Mutex::new(HashMap::new()),
            connect_errors: metrics.server_connect_errors.clone(),
            connects: metrics.server_connects.clone(),
            upstream_up: metrics.upstream_up.clone(),
            adopted: Arc::default(),
            suspect_epoch: AtomicU64::new(0),
        }
    }
}

/// What `SHOW SERVERS` knows of a server connection; registered at connect, removed when
/// deadpool lets the connection go.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub pid: i32,
    pub addr: crate::server::ServerAddr,
    pub local_addr: Option<SocketAddr>,
    pub connected_at: SystemTime,
    pub created: Instant,
}

/// Opens server connections for one pool and vets them at checkout.
pub struct ServerManager {
    /// Where new connections go; a reload may change it.
    pub(super) upstream: RwLock<Upstream>,
    pub(super) lifetime_ms: AtomicU64,
    pub(super) check_delay_ms: AtomicU64,
    /// Connections created before `base` + this many nanoseconds are closed at their next
    /// release or checkout (RECONNECT, KILL, an upstream changed by a reload). 0: none.
    pub(super) close_before_ns: AtomicU64,
    pub(super) base: Instant,
    /// Connections being opened now (`sv_login`).
    pub(super) logging_in: AtomicUsize,
    /// Open connections by (backend pid, cancel key).
    pub(super) servers: Mutex<HashMap<(i32, i32), ServerInfo>>,
    pub(super) connect_errors: prometheus::IntCounter,
    pub(super) connects: prometheus::IntCounter,
    pub(super) upstream_up: prometheus::IntGauge,
    /// Connections handed over by another pgtether process, used before opening new ones.
    pub(super) adopted: Arc<Mutex<Vec<ServerConn>>>,
    /// Raised when a connection of this pool died under a client (a database restart kills
    /// them all at once): every connection checked before is checked again at checkout.
    pub(super) suspect_epoch: AtomicU64,
}

impl ServerManager {
    pub(super) fn servers(&self) -> std::sync::MutexGuard<'_, HashMap<(i32, i32), ServerInfo>> {
        self.servers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether RECONNECT (or an upstream change) asked for `conn` to be replaced.
    pub(super) fn outdated(&self, conn: &ServerConn) -> bool {
        let before = self.close_before_ns.load(Ordering::Relaxed);
        before != 0
            && conn
                .created
                .checked_duration_since(self.base)
                .is_some_and(|d| (d.as_nanos() as u64) < before)
    }

    fn register(&self, conn: &ServerConn) {
        let info = ServerInfo {
            pid: conn.cancel.pid,
            addr: conn.cancel.addr,
            local_addr: conn.stream.local_addr(),
            connected_at: SystemTime::now(),
            created: conn.created,
        };
        self.servers()
            .insert((conn.cancel.pid, conn.cancel.key), info);
    }

    /// Whether `conn`, unused for `idle_for`, may serve another client (checked at checkout):
    /// not too old, not replaced by RECONNECT, and alive.
    pub(super) fn vet(
        &self,
        conn: &mut ServerConn,
        now: Instant,
        idle_for: Duration,
    ) -> Result<(), &'static str> {
        let lifetime = Duration::from_millis(self.lifetime_ms.load(Ordering::Relaxed));
        if now.saturating_duration_since(conn.created) > lifetime {
            return Err("server_lifetime reached");
        }
        if self.outdated(conn) {
            return Err("replaced by RECONNECT or a reload");
        }
        // The check costs a syscall; a connection used a moment ago is trusted, unless a
        // sibling just died (a restart kills every backend at once).
        let check_delay = Duration::from_millis(self.check_delay_ms.load(Ordering::Relaxed));
        let suspect = self.suspect_epoch.load(Ordering::Relaxed);
        // The reactor's readiness is free to ask: an idle server that became readable sent
        // something (a FATAL from a restart) or closed.
        if idle_for >= check_delay || conn.checked_epoch < suspect || conn.stream.input_arrived() {
            if !conn.looks_alive() {
                return Err("closed by the server");
            }
            conn.checked_epoch = suspect;
        }
        Ok(())
    }

    pub(super) fn take_adopted(&self) -> Option<ServerConn> {
        self.adopted.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    pub(super) fn close_existing(&self) {
        let now = (self.base.elapsed().as_nanos() as u64).max(1);
        self.close_before_ns.store(now, Ordering::Relaxed);
    }
}

struct LoginGuard<'a>(&'a AtomicUsize);

impl Drop for LoginGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A pool's [`ServerManager`] as deadpool's manager of one of its shards (see `handoff.rs`):
/// every shard of a pool opens and vets connections with the same one.
pub struct ShardManager(pub(super) Arc<ServerManager>);

impl std::ops::Deref for ShardManager {
    type Target = ServerManager;

    fn deref(&self) -> &ServerManager {
        &self.0
    }
}

impl managed::Manager for ShardManager {
    // Boxed: deadpool moves connections by value (into its queue, out to a client and back)
    // on every acquire and release; a pointer is cheaper to move than the connection.
    type Type = Box<ServerConn>;
    type Error = ServerError;

    async fn create(&self) -> Result<Box<ServerConn>, ServerError> {
        while let Some(conn) = self.take_adopted() {
            if conn.looks_alive() {
                self.register(&conn);
                return Ok(Box::new(conn));
            }
        }
        let upstream = self
            .upstream
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.logging_in.fetch_add(1, Ordering::Relaxed);
        let guard = LoginGuard(&self.logging_in);
        // Boxed: the login future is large and rare; inline it would enlarge every acquire.
        let r = Box::pin(ServerConn::connect(&upstream)).await.map(Box::new);
        drop(guard);
        self.upstream_up.set(i64::from(r.is_ok()));
        match &r {
            Ok(conn) => {
                self.connects.inc();
                self.register(conn);
            }
            Err(e) => {
                self.connect_errors.inc();
                tracing::warn!(host = %upstream.host, port = upstream.port,
                    database = %upstream.dbname, user = %upstream.user, error = %e,
                    "server connection failed");
            }
        }
        r
    }

    async fn recycle(
        &self,
        conn: &mut Box<ServerConn>,
        metrics: &ObjectMetrics,
    ) -> RecycleResult<ServerError> {
        // One clock read for both ages.
        let now = Instant::now();
        let checked_out = metrics.recycled.unwrap_or(metrics.created);
        let last_used = conn
            .handed_off
            .map_or(checked_out, |at| at.max(checked_out));
        self.vet(conn, now, now.saturating_duration_since(last_used))
            .map_err(RecycleError::message)
    }

    fn detach(&self, conn: &mut Box<ServerConn>) {
        self.servers().remove(&(conn.cancel.pid, conn.cancel.key));
    }
}

pub type ServerObject = managed::Object<ShardManager>;
