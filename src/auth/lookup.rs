//! auth_query: the password verifiers of users who are not under `[users]`, looked up on the
//! upstream (as PgBouncer's and PgCat's `auth_query`).
//!
//! This module owns the lookups and nothing else: a small pool of tokio-postgres connections
//! per lookup target (the database's upstream, logged in as the lookup role), and a bounded
//! cache of answers, found and not found, so that a login storm costs the upstream one query
//! per user and TTL. Deciding when to look up (only for users not in the config) and what a
//! miss means for the client (a wrong-password refusal) is the login path's job
//! (`session::startup`).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics as ObjectMetrics, RecycleError, RecycleResult};
use lru::LruCache;
use prometheus::IntCounterVec;
use rand::RngCore;
use tokio_postgres::NoTls;

use super::Secret;
use crate::app::Snapshot;

/// Answers remembered at most, least recently used forgotten first.
pub const CACHE_CAPACITY: usize = 10_000;
/// Lookup connections per target: lookups are rare (the cache answers most), so few suffice.
const POOL_SIZE: usize = 2;
/// A lookup connection unused this long is closed.
const IDLE_CLOSE: Duration = Duration::from_secs(60);

/// What a lookup found.
#[derive(Clone, Debug)]
pub enum Found {
    /// The user's password material, parsed like a config password.
    User(Arc<Secret>),
    /// No such user, or one without a password: the login fails like a wrong password.
    NoUser,
}

/// Why a lookup could not answer. The client is told only that the lookup failed; the log
/// gets this.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("cannot log in to {addr} as lookup role \"{role}\": {source}")]
    Connect {
        addr: String,
        role: String,
        source: tokio_postgres::Error,
    },
    #[error("logging in to {addr} as lookup role \"{role}\" timed out")]
    ConnectTimeout { addr: String, role: String },
    #[error("no lookup connection to {addr} became free in time")]
    Busy { addr: String },
    #[error("the auth_query failed: {0}")]
    Query(tokio_postgres::Error),
    #[error("the auth_query must return (user name, password) and returned {0} column(s)")]
    Shape(usize),
    #[error("no auth_query is configured for database \"{0}\"")]
    NotConfigured(String),
}

/// Where one database's lookups run: its upstream, logged in as the lookup role.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Target {
    host: String,
    port: u16,
    dbname: String,
    role: String,
    password: Option<String>,
    connect_timeout: Duration,
}

impl Target {
    fn addr(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.dbname)
    }
}

/// Opens and vets lookup connections for one [`Target`].
struct LookupManager {
    target: Target,
}

impl managed::Manager for LookupManager {
    type Type = tokio_postgres::Client;
    type Error = LookupError;

    async fn create(&self) -> Result<tokio_postgres::Client, LookupError> {
        let t = &self.target;
        let mut config = tokio_postgres::Config::new();
        config
            .host(&t.host)
            .port(t.port)
            .dbname(&t.dbname)
            .user(&t.role)
            .application_name("pgtether auth_query")
            .connect_timeout(t.connect_timeout);
        if let Some(p) = &t.password {
            config.password(p);
        }
        let connected = tokio::time::timeout(t.connect_timeout, config.connect(NoTls))
            .await
            .map_err(|_| LookupError::ConnectTimeout {
                addr: t.addr(),
                role: t.role.clone(),
            })?;
        let (client, connection) = connected.map_err(|source| LookupError::Connect {
            addr: t.addr(),
            role: t.role.clone(),
            source,
        })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "auth_query connection ended");
            }
        });
        Ok(client)
    }

    async fn recycle(
        &self,
        client: &mut tokio_postgres::Client,
        _: &ObjectMetrics,
    ) -> RecycleResult<LookupError> {
        if client.is_closed() {
            return Err(RecycleError::message("auth_query connection closed"));
        }
        Ok(())
    }
}

type LookupPool = managed::Pool<LookupManager>;

struct Cached {
    found: Found,
    until: Instant,
}

/// The lookups of a running pgtether: pools per target and the answer cache. A reload
/// ([`Lookups::reset`]) forgets both, so changed roles, queries or TTLs apply at once.
pub struct Lookups {
    pools: Mutex<HashMap<Target, LookupPool>>,
    /// (database, user) → answer.
    cache: Mutex<LruCache<(String, String), Cached>>,
    /// `pgtether_auth_query_total{result}`: `found`, `not_found`, `error` (the query ran or
    /// failed), `cached` (answered without the upstream).
    counter: IntCounterVec,
    /// Derives the salts of mock verifiers for users that do not exist.
    mock_key: [u8; 32],
}

impl Lookups {
    pub fn new(counter: IntCounterVec) -> Lookups {
        let mut mock_key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut mock_key);
        Lookups {
            pools: Mutex::new(HashMap::new()),
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(CACHE_CAPACITY).expect("non-zero"),
            )),
            counter,
            mock_key,
        }
    }

    /// The key that derives mock verifiers (see [`Secret::mock`]).
    pub fn mock_key(&self) -> &[u8; 32] {
        &self.mock_key
    }

    /// The password material of `user` for logins to `database`, from the cache or the
    /// upstream. Call only when the config has an auth_query for `database`.
    pub async fn lookup(
        &self,
        snapshot: &Snapshot,
        database: &str,
        user: &str,
    ) -> Result<Found, LookupError> {
        let key = (database.to_string(), user.to_string());
        if let Some(found) = self.cached(&key) {
            return Ok(found);
        }
        let config = &snapshot.config;
        let how = config
            .auth_lookup(database)
            .ok_or_else(|| LookupError::NotConfigured(database.to_string()))?;
        let db = &config.databases[database];
        let target = Target {
            host: db.host.clone(),
            port: db.port,
            dbname: db.dbname.clone().unwrap_or_else(|| database.to_string()),
            role: how.user.to_string(),
            password: snapshot.plain_password(how.user).map(str::to_string),
            connect_timeout: config.pool_settings(database).connect_timeout,
        };
        let pool = self.pool(&target);
        let client = pool.get().await.map_err(|e| {
            self.count("error");
            match e {
                managed::PoolError::Backend(e) => e,
                _ => LookupError::Busy {
                    addr: target.addr(),
                },
            }
        })?;
        // Other logins of the same user may have waited for the connection too: the first
        // one's answer serves them all.
        if let Some(found) = self.cached(&key) {
            return Ok(found);
        }
        let row = match client.query_opt(how.query, &[&user]).await {
            Ok(row) => row,
            Err(e) => {
                self.count("error");
                if client.is_closed() {
                    drop(managed::Object::take(client));
                }
                return Err(LookupError::Query(e));
            }
        };
        drop(client);
        let password = match row {
            None => None,
            Some(row) if row.len() < 2 => {
                self.count("error");
                return Err(LookupError::Shape(row.len()));
            }
            Some(row) => row.try_get::<_, Option<String>>(1).map_err(|e| {
                self.count("error");
                LookupError::Query(e)
            })?,
        };
        let (found, ttl) = match password.filter(|p| !p.is_empty()) {
            Some(p) => {
                self.count("found");
                let secret = Secret::from_config(user, &p);
                (Found::User(Arc::new(secret)), config.auth.cache_ttl)
            }
            None => {
                self.count("not_found");
                (Found::NoUser, config.auth.negative_cache_ttl)
            }
        };
        if !ttl.is_zero() {
            self.cache.lock().unwrap_or_else(|e| e.into_inner()).put(
                key,
                Cached {
                    found: found.clone(),
                    until: Instant::now() + ttl,
                },
            );
        }
        Ok(found)
    }

    fn cached(&self, key: &(String, String)) -> Option<Found> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let hit = cache.get(key)?;
        if hit.until <= Instant::now() {
            cache.pop(key);
            return None;
        }
        let found = hit.found.clone();
        drop(cache);
        self.count("cached");
        Some(found)
    }

    fn count(&self, result: &str) {
        self.counter.with_label_values(&[result]).inc();
    }

    fn pool(&self, target: &Target) -> LookupPool {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pools.get(target) {
            return p.clone();
        }
        let pool = managed::Pool::builder(LookupManager {
            target: target.clone(),
        })
        .max_size(POOL_SIZE)
        .runtime(deadpool::Runtime::Tokio1)
        // A login waits at most this long for a lookup connection to be opened or freed.
        .wait_timeout(Some(target.connect_timeout))
        .create_timeout(Some(target.connect_timeout))
        .build()
        .expect("a runtime is configured");
        pools.insert(target.clone(), pool.clone());
        pool
    }

    /// Forgets cached answers and lookup connections (after a reload).
    pub fn reset(&self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.pools.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Closes lookup connections idle longer than a minute.
    pub fn maintain(&self) {
        let pools: Vec<LookupPool> = self
            .pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for pool in pools {
            pool.retain(|_, m| m.last_used() < IDLE_CLOSE);
        }
    }
}
