//! Server connection pools, one per (database, user), built on deadpool.
//!
//! A pool is split into a shard per worker thread, each a deadpool owning its share of the
//! size and of the idle connections; clients waiting while every connection is in use queue
//! in their shard, which gives them released connections directly (`handoff.rs`). A client
//! takes from its own thread's shard first and borrows from the others when it has nothing.
//! [`ServerManager`] (in `manager.rs`) opens connections and checks them at checkout, for
//! every shard. A connection that is dirty or broken must leave with [`Lease::discard`],
//! never be dropped back into the pool. A reload changes a pool in place
//! ([`Pool::apply`]): its size, timeouts and upstream, without touching connected clients.

mod acquire;
mod handoff;
mod limit;
mod manager;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use deadpool::managed;
use tokio::sync::OnceCell;

use crate::app::Snapshot;
use crate::config::{PoolMode, PoolSettings};
use crate::metrics::{Metrics, PoolMetrics};
use crate::server::{ServerConn, Upstream};
pub use acquire::AcquireError;
use handoff::Handoff;
use limit::{Limit, Slot};
use manager::millis;
use manager::ShardManager;
pub use manager::{ServerInfo, ServerManager, ServerObject};

/// A server connection taken from a pool, with its share of the pool's size limit. Dropping it
/// gives the connection back; [`Lease::discard`] closes it instead.
pub struct Lease {
    // Field order matters: the connection goes back to deadpool before the slot frees up,
    // so the next client finds it there. `None` only once discarded.
    conn: Option<Held>,
    _slot: Option<Slot>,
}

enum Held {
    /// Released through the pool's hand-off queue: to a waiting client, else to deadpool.
    /// `usize`: the shard it belongs to.
    Pooled(ServerObject, Arc<Handoff>, usize),
    /// A pinned client's connection that came with it from another process: when released
    /// it joins the pool's adopted connections.
    Adopted(Box<ServerConn>, Arc<Mutex<Vec<ServerConn>>>),
}

impl Drop for Lease {
    fn drop(&mut self) {
        match self.conn.take() {
            Some(Held::Pooled(conn, handoff, shard)) => handoff.release(shard, conn),
            Some(Held::Adopted(conn, into)) => {
                into.lock().unwrap_or_else(|e| e.into_inner()).push(*conn)
            }
            None => {}
        }
    }
}

impl Lease {
    /// Closes the connection instead of returning it (dirty, broken or outdated).
    pub fn discard(mut self) {
        match self.conn.take() {
            Some(Held::Pooled(conn, handoff, shard)) => {
                drop(managed::Object::take(conn));
                handoff.room_made(shard);
            }
            Some(Held::Adopted(conn, _)) => drop(conn),
            None => {}
        }
    }
}

impl std::ops::Deref for Lease {
    type Target = ServerConn;

    fn deref(&self) -> &ServerConn {
        match self.conn.as_ref().expect("present until discarded") {
            Held::Pooled(c, _, _) => c,
            Held::Adopted(c, _) => c,
        }
    }
}

impl std::ops::DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut ServerConn {
        match self.conn.as_mut().expect("present until discarded") {
            Held::Pooled(c, _, _) => c,
            Held::Adopted(c, _) => c,
        }
    }
}

/// Server connection counts of a pool, for `SHOW POOLS` and the gauges.
#[derive(Debug, Clone, Copy)]
pub struct ServerCounts {
    pub idle: usize,
    pub active: usize,
    pub logging_in: usize,
}

/// The pool of server connections for one (database, user).
pub struct Pool {
    /// Shared with the `SHOW CLIENTS` entries of its clients.
    pub database: Arc<str>,
    pub user: Arc<str>,
    settings: RwLock<Arc<PoolSettings>>,
    /// When the last slow-acquire warning was logged (ms since `slow_epoch`), to log at most
    /// one a second per pool.
    last_slow_warning_ms: AtomicU64,
    slow_epoch: Instant,
    /// `acquire_timeout` and `connect_timeout` in milliseconds, read on every acquire.
    acquire_timeout_ms: AtomicU64,
    connect_timeout_ms: AtomicU64,
    /// Taken before deadpool is asked, once a reload has shrunk this pool (deadpool alone
    /// could then still open up to the old size); until then deadpool alone limits the size
    /// and acquiring costs nothing extra.
    limit: Arc<Limit>,
    limited: AtomicBool,
    pub metrics: Arc<PoolMetrics>,
    /// The shards: their deadpools and the clients waiting in each.
    handoff: Arc<Handoff>,
    /// ParameterStatus values sent to clients at login, learned from the first connection.
    startup_params: OnceCell<Vec<(String, String)>>,
    /// The startup settings its clients share.
    pub startup_settings: crate::session::state::SharedStartup,
}

impl Pool {
    fn new(
        database: &str,
        user: &str,
        upstream: Upstream,
        settings: PoolSettings,
        metrics: PoolMetrics,
    ) -> Pool {
        let manager = Arc::new(ServerManager::new(upstream, &settings, &metrics));
        // A shard per worker thread, each with room for one connection at least.
        let shards = crate::workers::count().min(settings.size).max(1);
        let pools = shard_pools(&manager, settings.size, shards);
        Pool {
            database: database.into(),
            user: user.into(),
            last_slow_warning_ms: AtomicU64::new(0),
            slow_epoch: Instant::now(),
            acquire_timeout_ms: AtomicU64::new(millis(settings.acquire_timeout)),
            connect_timeout_ms: AtomicU64::new(millis(settings.connect_timeout)),
            limit: Limit::new(settings.size),
            limited: AtomicBool::new(false),
            settings: RwLock::new(Arc::new(settings)),
            metrics: Arc::new(metrics),
            handoff: Arc::new(Handoff::new(pools)),
            startup_params: OnceCell::new(),
            startup_settings: Default::default(),
        }
    }

    /// Opens and vets the connections of every shard (each shard's deadpool holds it).
    fn manager(&self) -> &ServerManager {
        self.handoff.pool(0).manager()
    }

    /// `database.user`, how errors and logs name a pool.
    pub fn name(&self) -> String {
        format!("{}.{}", self.database, self.user)
    }

    /// The settings in force (a reload may replace them). Not for the per-query path.
    pub fn settings(&self) -> Arc<PoolSettings> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn mode(&self) -> PoolMode {
        self.settings().mode
    }

    /// The size limit in force.
    pub fn size(&self) -> usize {
        self.limit.size()
    }

    /// The ParameterStatus set a client receives at login. The first call opens (and returns
    /// to the pool) a server connection to learn them, as PgBouncer does.
    pub async fn startup_params(&self) -> Result<&[(String, String)], AcquireError> {
        let params = self
            .startup_params
            .get_or_try_init(|| async {
                let (conn, _) = self.acquire(std::time::Instant::now()).await?;
                Ok::<_, AcquireError>(conn.params.clone())
            })
            .await?;
        Ok(params)
    }

    /// Whether a connection should be closed at release instead of reused (RECONNECT).
    pub fn is_outdated(&self, conn: &ServerConn) -> bool {
        self.manager().outdated(conn)
    }

    /// A connection of this pool died under its client: check every idle one before reuse.
    pub fn suspect_all(&self) {
        self.manager().suspect_epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes every idle connection out of the pool (to hand them to another process).
    pub fn take_idle(&self) -> Vec<ServerConn> {
        let mut conns: Vec<ServerConn> = self
            .handoff
            .pools()
            .flat_map(|p| p.retain(|_, _| false).removed)
            .map(|c| *c)
            .collect();
        while let Some(conn) = self.manager().take_adopted() {
            conns.push(conn);
        }
        conns
    }

    /// An idle connection handed over by another process: used before opening new ones.
    pub fn adopt_idle(&self, conn: ServerConn) {
        self.manager()
            .adopted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
    }

    /// A pinned client's connection handed over with it by another process.
    pub fn adopt_leased(&self, conn: ServerConn) -> Lease {
        Lease {
            conn: Some(Held::Adopted(
                Box::new(conn),
                self.manager().adopted.clone(),
            )),
            _slot: None,
        }
    }

    /// RECONNECT: closes idle connections now; those in use are closed at release.
    pub fn reconnect(&self) -> usize {
        let manager = self.manager();
        manager.close_existing();
        self.handoff
            .pools()
            .map(|p| p.retain(|conn, _| !manager.outdated(conn)).removed.len())
            .sum()
    }

    /// Closes idle connections past `server_idle_timeout` or `server_lifetime`, then opens
    /// connections until `min_idle` are idle; run periodically.
    pub async fn maintain(&self) {
        let settings = self.settings();
        let idle_timeout = settings.server_idle_timeout;
        let lifetime = settings.server_lifetime;
        let manager = self.manager();
        for pool in self.handoff.pools() {
            pool.retain(|conn, m| {
                let idle_for = conn
                    .handed_off
                    .map_or(m.last_used(), |at| at.elapsed().min(m.last_used()));
                idle_for < idle_timeout
                    && conn.created.elapsed() < lifetime
                    && !manager.outdated(conn)
            });
        }
        let shards = self.handoff.len();
        let mut opened = Vec::new();
        'shards: for shard in 0..shards {
            let pool = self.handoff.pool(shard);
            let status = pool.status();
            let missing = share(settings.min_idle, shards, shard).saturating_sub(status.available);
            let room = status.max_size.saturating_sub(status.size);
            for _ in 0..missing.min(room) {
                // Never waits for a permit: released connections go to waiting clients first,
                // so this loop (shared by every pool) could wait for as long as clients do.
                match self.open_in(shard, settings.connect_timeout).await {
                    // As leases: given back through the hand-off, like any connection.
                    Ok(c) => opened.push(self.lease(c, shard, None)),
                    Err(_) => break 'shards,
                }
            }
        }
    }

    /// Server connections idle, in use, and being opened.
    pub fn server_counts(&self) -> ServerCounts {
        let mut counts = ServerCounts {
            idle: 0,
            active: 0,
            logging_in: self.manager().logging_in.load(Ordering::Relaxed),
        };
        for pool in self.handoff.pools() {
            let s = pool.status();
            counts.idle += s.available;
            counts.active += s.size.saturating_sub(s.available);
        }
        counts
    }

    /// The open server connections, oldest first, each with whether it awaits closing.
    pub fn servers(&self) -> Vec<(ServerInfo, bool)> {
        let manager = self.manager();
        let before = manager.close_before_ns.load(Ordering::Relaxed);
        let mut v: Vec<_> = manager
            .servers()
            .values()
            .map(|s| {
                let outdated = before != 0
                    && s.created
                        .checked_duration_since(manager.base)
                        .is_some_and(|d| (d.as_nanos() as u64) < before);
                (s.clone(), outdated)
            })
            .collect();
        v.sort_by_key(|(s, _)| s.created);
        v
    }

    /// The upstream new connections go to.
    pub fn upstream(&self) -> Upstream {
        self.manager()
            .upstream
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts reloaded settings and upstream in force. Connected clients keep their server
    /// connections; a changed upstream replaces connections as they are released. Returns
    /// what changed, for the log.
    pub fn apply(&self, settings: PoolSettings, mut upstream: Upstream) -> Vec<String> {
        let mut changes = Vec::new();
        let old = self.settings();
        if old.size != settings.size {
            changes.push(format!("size {} -> {}", old.size, settings.size));
            if settings.size < old.size {
                // Connections in use now hold no slot: until they are back, up to that many
                // more may be open than the new size. Waiting clients move to the limited path.
                self.handoff
                    .retry_all(|| self.limited.store(true, Ordering::Relaxed));
                // Close surplus idle connections here so deadpool's resize, which drops them
                // without telling the manager, finds none to drop.
                let shards = self.handoff.len();
                for (i, pool) in self.handoff.pools().enumerate() {
                    let status = pool.status();
                    let mut surplus = status.size.saturating_sub(share(settings.size, shards, i));
                    pool.retain(|_, _| {
                        if surplus > 0 {
                            surplus -= 1;
                            false
                        } else {
                            true
                        }
                    });
                }
            }
            self.limit.resize(settings.size);
            let shards = self.handoff.len();
            for (i, pool) in self.handoff.pools().enumerate() {
                pool.resize(share(settings.size, shards, i));
            }
            if settings.size > old.size {
                // Room to open more: waiting clients ask again.
                self.handoff.retry_all(|| {});
            }
        }
        self.acquire_timeout_ms
            .store(millis(settings.acquire_timeout), Ordering::Relaxed);
        self.connect_timeout_ms
            .store(millis(settings.connect_timeout), Ordering::Relaxed);
        let manager = self.manager();
        manager
            .lifetime_ms
            .store(millis(settings.server_lifetime), Ordering::Relaxed);
        manager
            .check_delay_ms
            .store(millis(settings.server_check_delay), Ordering::Relaxed);
        {
            let mut current = manager.upstream.write().unwrap_or_else(|e| e.into_inner());
            let moved = current.host != upstream.host
                || current.port != upstream.port
                || current.dbname != upstream.dbname
                || current.user != upstream.user;
            if moved {
                changes.push(format!(
                    "upstream {}:{}/{} as {} -> {}:{}/{} as {}",
                    current.host,
                    current.port,
                    current.dbname,
                    current.user,
                    upstream.host,
                    upstream.port,
                    upstream.dbname,
                    upstream.user
                ));
            }
            // Keys a client proved stay usable while the role stays the same and no password
            // replaces them.
            if upstream.password.is_none() && upstream.user == current.user {
                upstream.scram_keys = current.scram_keys.take();
            }
            *current = upstream;
            drop(current);
            if moved {
                self.reconnect();
            }
        }
        if old.mode != settings.mode {
            changes.push(format!(
                "mode {} -> {} (for clients that log in from now on)",
                old.mode.as_str(),
                settings.mode.as_str()
            ));
        }
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(settings);
        changes
    }

    /// Keys from a client's SCRAM login, for an upstream login without a password (auth_query
    /// users, users whose config password is a verifier). Taken only while the pool logs in
    /// upstream as the client's own role and has no password for it; the newest replace older
    /// ones (the password may have changed).
    pub fn offer_scram_keys(&self, keys: crate::auth::ScramKeys) {
        let mut current = self
            .manager()
            .upstream
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if current.password.is_none()
            && *current.user == *self.user
            && current.scram_keys.as_ref() != Some(&keys)
        {
            current.scram_keys = Some(keys);
        }
    }

    /// The keys [`Pool::offer_scram_keys`] took, if any.
    pub fn scram_keys(&self) -> Option<crate::auth::ScramKeys> {
        let current = self
            .manager()
            .upstream
            .read()
            .unwrap_or_else(|e| e.into_inner());
        current.scram_keys.clone()
    }

    /// Brings the pool's metrics up to date: the per-thread ones (see `metrics::PoolMetrics::sync`)
    /// and the server connection gauges, from deadpool's own counts.
    pub fn refresh_gauges(&self) {
        self.metrics.sync();
        let c = self.server_counts();
        self.metrics.servers_idle.set(c.idle as i64);
        self.metrics.servers_active.set(c.active as i64);
        self.metrics.servers_login.set(c.logging_in as i64);
    }

    /// Whether the upstream accepted pgtether's last connection attempt.
    pub fn upstream_up(&self) -> bool {
        self.metrics.upstream_up.get() == 1
    }
}

/// The deadpools of `shards` shards sharing `size` connections.
fn shard_pools(
    manager: &Arc<ServerManager>,
    size: usize,
    shards: usize,
) -> Vec<managed::Pool<ShardManager>> {
    (0..shards)
        .map(|i| {
            managed::Pool::builder(ShardManager(manager.clone()))
                .max_size(share(size, shards, i))
                // Most recently released first: a client's next transaction usually gets the
                // connection that already has its settings and statements, and idle surplus
                // connections age out (server_idle_timeout) instead of all staying warm.
                .queue_mode(deadpool::managed::QueueMode::Lifo)
                .runtime(deadpool::Runtime::Tokio1)
                .build()
                .expect("a runtime is configured")
        })
        .collect()
}

/// Shard `i`'s part of `total` split over `shards`: the first ones take the remainder.
fn share(total: usize, shards: usize, i: usize) -> usize {
    total / shards + usize::from(i < total % shards)
}

/// Where a pool for (database, user) connects, by the given configuration.
fn upstream_of(snapshot: &Snapshot, database: &str, user: &str) -> Option<Upstream> {
    let config = &snapshot.config;
    let db = config.databases.get(database)?;
    let settings = config.pool_settings(database);
    Some(Upstream {
        host: db.host.clone(),
        port: db.port,
        dbname: db.dbname.clone().unwrap_or_else(|| database.to_string()),
        user: db.user.clone().unwrap_or_else(|| user.to_string()),
        password: if db.user.is_some() {
            db.password.clone()
        } else {
            snapshot.plain_password(user).map(str::to_string)
        },
        scram_keys: None,
        connect_timeout: settings.connect_timeout,
        max_prepared_statements: settings.max_prepared_statements,
        sslmode: db.sslmode,
        // Validated at load; a CA file broken since then means no TLS, and the log says so.
        tls: crate::tls::client_config(db.sslmode, db.sslrootcert.as_deref()).unwrap_or_else(|e| {
            tracing::error!(database, error = %e, "upstream TLS configuration unusable");
            None
        }),
    })
}

struct PoolsInner {
    map: HashMap<(String, String), Arc<Pool>>,
    /// The configuration new pools are made from; replaced by [`Pools::reconfigure`] under
    /// the same lock, so no pool is ever made from a configuration older than a reload.
    snapshot: Arc<Snapshot>,
}

/// Every pool, created on the first login to a (database, user).
pub struct Pools {
    inner: RwLock<PoolsInner>,
    metrics: Arc<Metrics>,
}

impl Pools {
    pub fn new(metrics: Arc<Metrics>, snapshot: Arc<Snapshot>) -> Pools {
        Pools {
            inner: RwLock::new(PoolsInner {
                map: HashMap::new(),
                snapshot,
            }),
            metrics,
        }
    }

    /// The pool for (database, user), created if needed; `None` when the database is not (or
    /// no longer) configured.
    pub fn get(&self, database: &str, user: &str) -> Option<Arc<Pool>> {
        let key = (database.to_string(), user.to_string());
        if let Some(p) = self
            .inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .get(&key)
        {
            return Some(p.clone());
        }
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = inner.map.get(&key) {
            return Some(p.clone());
        }
        let upstream = upstream_of(&inner.snapshot, database, user)?;
        let settings = inner.snapshot.config.pool_settings(database);
        let metrics = self.metrics.pool(database, user);
        let pool = Arc::new(Pool::new(database, user, upstream, settings, metrics));
        inner.map.insert(key, pool.clone());
        Some(pool)
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        let mut v: Vec<_> = self
            .inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| (&a.database, &a.user).cmp(&(&b.database, &b.user)));
        v
    }

    /// Puts a reloaded configuration in force: existing pools take their new settings, pools
    /// of removed databases or users are forgotten (their connected clients keep them until
    /// they leave). Returns what changed, for the log.
    pub fn reconfigure(&self, snapshot: Arc<Snapshot>) -> Vec<String> {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let mut changes = Vec::new();
        inner.map.retain(|(database, user), pool| {
            let config = &snapshot.config;
            let keep = config.databases.contains_key(database)
                && (config.users.contains_key(user) || config.auth_lookup(database).is_some());
            if !keep {
                changes.push(format!(
                    "pool {}: removed from the configuration; its clients stay until they disconnect",
                    pool.name()
                ));
            }
            keep
        });
        for ((database, user), pool) in &inner.map {
            let settings = snapshot.config.pool_settings(database);
            let Some(upstream) = upstream_of(&snapshot, database, user) else {
                continue;
            };
            for change in pool.apply(settings, upstream) {
                changes.push(format!("pool {}: {change}", pool.name()));
            }
        }
        inner.snapshot = snapshot;
        changes
    }

    /// Runs [`Pool::maintain`] on every pool forever.
    pub async fn maintenance_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            for pool in self.all() {
                pool.maintain().await;
            }
        }
    }
}
