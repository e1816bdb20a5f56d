//! Server connection pools, one per (database, user), built on deadpool.
//!
//! deadpool owns the idle connections and the wait queue; [`ServerManager`] opens connections
//! and checks them at checkout. A connection that is dirty or broken must leave with
//! `Object::take`, never be dropped back into the pool.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use deadpool::managed::{
    self, Metrics as ObjectMetrics, PoolError, RecycleError, RecycleResult, TimeoutType, Timeouts,
};
use tokio::sync::OnceCell;

use crate::config::{Config, PoolMode, PoolSettings};
use crate::metrics::{Metrics, PoolMetrics};
use crate::server::{ServerConn, ServerError, Upstream};

/// Opens server connections for one pool and vets them at checkout.
pub struct ServerManager {
    upstream: Upstream,
    lifetime: Duration,
    check_delay: Duration,
    connect_errors: prometheus::IntCounter,
}

impl managed::Manager for ServerManager {
    type Type = ServerConn;
    type Error = ServerError;

    async fn create(&self) -> Result<ServerConn, ServerError> {
        let r = ServerConn::connect(&self.upstream).await;
        if let Err(e) = &r {
            self.connect_errors.inc();
            tracing::warn!(host = %self.upstream.host, port = self.upstream.port,
                database = %self.upstream.dbname, user = %self.upstream.user, error = %e,
                "server connection failed");
        }
        r
    }

    async fn recycle(
        &self,
        conn: &mut ServerConn,
        metrics: &ObjectMetrics,
    ) -> RecycleResult<ServerError> {
        if conn.created.elapsed() > self.lifetime {
            return Err(RecycleError::message("server_lifetime reached"));
        }
        // The check costs a syscall; a connection used a moment ago is trusted.
        if metrics.last_used() >= self.check_delay && !conn.looks_alive() {
            return Err(RecycleError::message("closed by the server"));
        }
        Ok(())
    }
}

pub type ServerObject = managed::Object<ServerManager>;

/// Why a client got no server connection.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("no server connection available in pool \"{pool}\" within {timeout:?} (pool size {size}); the pool is exhausted")]
    Exhausted {
        pool: String,
        timeout: Duration,
        size: usize,
    },
    #[error("cannot open a server connection for pool \"{pool}\": {source}")]
    Server { pool: String, source: ServerError },
    #[error("pool \"{0}\" is closed")]
    Closed(String),
}

/// The pool of server connections for one (database, user).
pub struct Pool {
    pub database: String,
    pub user: String,
    pub settings: PoolSettings,
    pub metrics: Arc<PoolMetrics>,
    inner: managed::Pool<ServerManager>,
    /// ParameterStatus values sent to clients at login, learned from the first connection.
    startup_params: OnceCell<Vec<(String, String)>>,
}

impl Pool {
    fn new(
        database: &str,
        user: &str,
        upstream: Upstream,
        settings: PoolSettings,
        metrics: PoolMetrics,
    ) -> Pool {
        let manager = ServerManager {
            upstream,
            lifetime: settings.server_lifetime,
            check_delay: settings.server_check_delay,
            connect_errors: metrics.server_connect_errors.clone(),
        };
        let inner = managed::Pool::builder(manager)
            .max_size(settings.size)
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .expect("a runtime is configured");
        Pool {
            database: database.to_string(),
            user: user.to_string(),
            settings,
            metrics: Arc::new(metrics),
            inner,
            startup_params: OnceCell::new(),
        }
    }

    /// `database.user`, how errors and logs name a pool.
    pub fn name(&self) -> String {
        format!("{}.{}", self.database, self.user)
    }

    pub fn mode(&self) -> PoolMode {
        self.settings.mode
    }

    /// Takes a server connection, waiting up to `acquire_timeout` for one.
    pub async fn acquire(&self) -> Result<ServerObject, AcquireError> {
        let started = Instant::now();
        let timeouts = Timeouts {
            wait: Some(self.settings.acquire_timeout),
            create: Some(self.settings.connect_timeout),
            recycle: Some(Duration::from_secs(1)),
        };
        let r = self.inner.timeout_get(&timeouts).await;
        self.metrics
            .wait_seconds
            .observe(started.elapsed().as_secs_f64());
        r.map_err(|e| match e {
            PoolError::Timeout(TimeoutType::Wait) => {
                self.metrics.acquire_timeouts.inc();
                AcquireError::Exhausted {
                    pool: self.name(),
                    timeout: self.settings.acquire_timeout,
                    size: self.settings.size,
                }
            }
            PoolError::Timeout(_) => AcquireError::Server {
                pool: self.name(),
                source: ServerError::ConnectTimeout(self.name()),
            },
            PoolError::Backend(source) => AcquireError::Server {
                pool: self.name(),
                source,
            },
            PoolError::Closed | PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
                AcquireError::Closed(self.name())
            }
        })
    }

    /// The ParameterStatus set a client receives at login. The first call opens (and returns
    /// to the pool) a server connection to learn them, as PgBouncer does.
    pub async fn startup_params(&self) -> Result<&[(String, String)], AcquireError> {
        let params = self
            .startup_params
            .get_or_try_init(|| async {
                let conn = self.acquire().await?;
                Ok::<_, AcquireError>(conn.params.clone())
            })
            .await?;
        Ok(params)
    }

    /// Closes idle connections past `server_idle_timeout` or `server_lifetime`, then opens
    /// connections until `min_idle` are idle; run periodically.
    pub async fn maintain(&self) {
        let idle_timeout = self.settings.server_idle_timeout;
        let lifetime = self.settings.server_lifetime;
        self.inner
            .retain(|conn, m| m.last_used() < idle_timeout && conn.created.elapsed() < lifetime);
        let status = self.inner.status();
        let missing = self.settings.min_idle.saturating_sub(status.available);
        let room = status.max_size.saturating_sub(status.size);
        let mut opened = Vec::new();
        for _ in 0..missing.min(room) {
            match self.inner.get().await {
                Ok(c) => opened.push(c),
                Err(_) => break,
            }
        }
    }

    /// Refreshes the server connection gauges from deadpool's own counts.
    pub fn refresh_gauges(&self) {
        let s = self.inner.status();
        self.metrics.servers_idle.set(s.available as i64);
        self.metrics
            .servers_active
            .set(s.size.saturating_sub(s.available) as i64);
    }
}

/// Every pool, created on the first login to a (database, user).
pub struct Pools {
    pools: RwLock<HashMap<(String, String), Arc<Pool>>>,
    metrics: Arc<Metrics>,
}

impl Pools {
    pub fn new(metrics: Arc<Metrics>) -> Pools {
        Pools {
            pools: RwLock::new(HashMap::new()),
            metrics,
        }
    }

    /// The pool for (database, user), created if needed. `database` must be configured.
    pub fn get(
        &self,
        config: &Config,
        database: &str,
        user: &str,
        password: Option<&str>,
    ) -> Arc<Pool> {
        let key = (database.to_string(), user.to_string());
        if let Some(p) = self
            .pools
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return p.clone();
        }
        let mut pools = self.pools.write().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(key)
            .or_insert_with(|| {
                let db = &config.databases[database];
                let upstream = Upstream {
                    host: db.host.clone(),
                    port: db.port,
                    dbname: db.dbname.clone().unwrap_or_else(|| database.to_string()),
                    user: db.user.clone().unwrap_or_else(|| user.to_string()),
                    password: if db.user.is_some() {
                        db.password.clone()
                    } else {
                        password.map(str::to_string)
                    },
                    connect_timeout: config.pool_settings(database).connect_timeout,
                    max_prepared_statements: config.pool_settings(database).max_prepared_statements,
                };
                let settings = config.pool_settings(database);
                let metrics = self.metrics.pool(database, user);
                Arc::new(Pool::new(database, user, upstream, settings, metrics))
            })
            .clone()
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.pools
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
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
