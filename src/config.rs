//! The TOML configuration: its schema and defaults (validation: `validate.rs`).
//!
//! Every key is declared here; unknown keys are errors (`deny_unknown_fields`), and every error
//! names the key it is about, so `pgtether check` can tell an operator exactly what to fix.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::tls::{ClientTls, SslMode};

pub mod env;
pub mod flat;
mod load;
mod validate;

/// The virtual database name clients connect to for the admin console.
pub const ADMIN_DATABASE: &str = "pgtether";

/// Why a configuration could not be used. Each variant names the file or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: key `{key}`: {message}")]
    Parse {
        path: String,
        key: String,
        message: String,
    },
    #[error("{path}: key `{key}`: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
    #[error("{path}: line {line}: environment variable `{var}` {message}")]
    Env {
        path: String,
        line: usize,
        var: String,
        message: String,
    },
    #[error("environment variable {var} (overrides key `{key}`): {message}")]
    Override {
        var: String,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listen: Listen,
    #[serde(default)]
    pub http: Http,
    #[serde(default)]
    pub pool: PoolSettings,
    #[serde(default)]
    pub auth: Auth,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub runtime: RuntimeSettings,
    #[serde(default)]
    pub tls: TlsSettings,
    #[serde(default)]
    pub databases: BTreeMap<String, Database>,
    #[serde(default)]
    pub users: BTreeMap<String, User>,
    /// `[[hba]]`: access rules, first match wins. Empty: every address may log in with
    /// `auth.method`.
    #[serde(default)]
    pub hba: Vec<HbaRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    #[serde(default = "default_listen_addr")]
    pub addr: SocketAddr,
    /// Client connections accepted at once; the next one is refused with 53300.
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    /// SO_REUSEPORT: peers in one pod listen on the same port (see Deployment).
    #[serde(default)]
    pub reuse_port: bool,
    /// Also listen on a Unix-domain socket in this directory (`.s.PGSQL.<port>`, the port
    /// of `addr`), as PostgreSQL and PgBouncer do: the cheaper path for a sidecar.
    #[serde(default)]
    pub unix_socket_dir: Option<std::path::PathBuf>,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            addr: default_listen_addr(),
            max_clients: default_max_clients(),
            reuse_port: false,
            unix_socket_dir: None,
        }
    }
}

fn default_listen_addr() -> SocketAddr {
    "127.0.0.1:6432".parse().expect("valid literal")
}
fn default_max_clients() -> usize {
    10_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    /// Where /metrics, /healthz and /readyz are served; omit the key to serve none.
    pub addr: Option<SocketAddr>,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            addr: Some("127.0.0.1:9930".parse().expect("valid literal")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A client holds a server connection from its first query until it disconnects.
    Session,
    /// A client holds a server connection only while inside a transaction.
    Transaction,
    /// A client holds a server connection for one statement; transaction blocks are refused.
    Statement,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
            PoolMode::Statement => "statement",
        }
    }
}

/// Pool settings: `[pool]` gives the defaults, `[databases.NAME.pool]` overrides them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    #[serde(default = "default_mode")]
    pub mode: PoolMode,
    #[serde(default = "default_size")]
    pub size: usize,
    #[serde(default)]
    pub min_idle: usize,
    #[serde(default = "default_acquire_timeout", with = "humantime_serde")]
    pub acquire_timeout: Duration,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "default_server_idle_timeout", with = "humantime_serde")]
    pub server_idle_timeout: Duration,
    #[serde(default = "default_server_lifetime", with = "humantime_serde")]
    pub server_lifetime: Duration,
    /// A server connection idle at least this long is checked for liveness before reuse
    /// (without a round trip); recently used ones are trusted, as PgBouncer's
    /// server_check_delay does.
    #[serde(default = "default_server_check_delay", with = "humantime_serde")]
    pub server_check_delay: Duration,
    /// Prepared statements kept per server connection; the least recently used are closed.
    #[serde(default = "default_max_prepared_statements")]
    pub max_prepared_statements: usize,
    /// What to do with a statement whose state cannot follow the client (transaction and
    /// statement modes): keep the client on its server connection, or refuse it (0A000).
    #[serde(default)]
    pub on_pin: OnPin,
    /// Track settings and prepared statements so they follow clients across server
    /// connections. Off, pgtether only forwards bytes (for comparisons).
    #[serde(default = "default_true")]
    pub track_session_state: bool,
    /// Prepare clients' unnamed extended-protocol statements on the server under pgtether's
    /// shared names, as named ones are, so that PostgreSQL parses and plans a repeated query
    /// once per server connection. Off by default: see the README for what changes.
    #[serde(default)]
    pub prepare_unnamed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPin {
    #[default]
    Pin,
    Reject,
}

fn default_server_check_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_max_prepared_statements() -> usize {
    100
}
fn default_true() -> bool {
    true
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            mode: default_mode(),
            size: default_size(),
            min_idle: 0,
            acquire_timeout: default_acquire_timeout(),
            connect_timeout: default_connect_timeout(),
            server_idle_timeout: default_server_idle_timeout(),
            server_lifetime: default_server_lifetime(),
            server_check_delay: default_server_check_delay(),
            max_prepared_statements: default_max_prepared_statements(),
            on_pin: OnPin::Pin,
            track_session_state: true,
            prepare_unnamed: false,
        }
    }
}

fn default_mode() -> PoolMode {
    PoolMode::Transaction
}
fn default_size() -> usize {
    20
}
fn default_acquire_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_server_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_server_lifetime() -> Duration {
    Duration::from_secs(3600)
}

/// `[databases.NAME.pool]`: any key left out falls back to `[pool]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolOverrides {
    pub mode: Option<PoolMode>,
    pub size: Option<usize>,
    pub min_idle: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub acquire_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub server_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub server_lifetime: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub server_check_delay: Option<Duration>,
    pub max_prepared_statements: Option<usize>,
    pub on_pin: Option<OnPin>,
    pub track_session_state: Option<bool>,
    pub prepare_unnamed: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthMethod {
    #[serde(rename = "trust")]
    Trust,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

/// The query `auth.user` runs when `auth.query` is left out, as PgBouncer's default.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// How clients prove who they are to pgtether.
    #[serde(default = "default_auth_method")]
    pub method: AuthMethod,
    /// auth_query: the upstream role that looks up the password verifier of users not under
    /// `[users]`. Its own password is under `[users.NAME]`, like the admin console's users.
    pub user: Option<String>,
    /// The lookup, with the user name as `$1`, returning (user name, password verifier).
    /// Default [`DEFAULT_AUTH_QUERY`] when a lookup user is set.
    pub query: Option<String>,
    /// How long a looked-up verifier is reused before the upstream is asked again.
    #[serde(default = "default_auth_cache_ttl", with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// How long "no such user" is remembered (shorter: a role just created should not wait).
    #[serde(default = "default_auth_negative_cache_ttl", with = "humantime_serde")]
    pub negative_cache_ttl: Duration,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            method: default_auth_method(),
            user: None,
            query: None,
            cache_ttl: default_auth_cache_ttl(),
            negative_cache_ttl: default_auth_negative_cache_ttl(),
        }
    }
}

fn default_auth_cache_ttl() -> Duration {
    Duration::from_secs(30)
}
fn default_auth_negative_cache_ttl() -> Duration {
    Duration::from_secs(5)
}

/// Where and how the password of a user not under `[users]` is looked up for one database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthLookup<'a> {
    /// The upstream role that runs the query (its password is under `[users]`).
    pub user: &'a str,
    pub query: &'a str,
}

fn default_auth_method() -> AuthMethod {
    AuthMethod::ScramSha256
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Trust => "trust",
            AuthMethod::Md5 => "md5",
            AuthMethod::ScramSha256 => "scram-sha-256",
        }
    }
}

/// What an `[[hba]]` rule does with the logins it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum HbaMethod {
    #[serde(rename = "trust")]
    Trust,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// Refuse the login (28000).
    #[serde(rename = "reject")]
    Reject,
}

impl HbaMethod {
    /// The authentication method, or `None` for `reject`.
    pub fn auth(self) -> Option<AuthMethod> {
        match self {
            HbaMethod::Trust => Some(AuthMethod::Trust),
            HbaMethod::Md5 => Some(AuthMethod::Md5),
            HbaMethod::ScramSha256 => Some(AuthMethod::ScramSha256),
            HbaMethod::Reject => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.auth().map_or("reject", AuthMethod::as_str)
    }
}

/// One `[[hba]]` access rule, like a line of PostgreSQL's pg_hba.conf.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HbaRule {
    /// A database name (the admin console is `pgtether`) or `all`.
    pub database: String,
    /// A user name or `all`.
    pub user: String,
    /// The client addresses it covers: a CIDR block, a single address, or `all`.
    pub address: crate::access::AddressMatch,
    pub method: HbaMethod,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest protocol message a client may send, in bytes; bigger ones close that client (08P01).
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    /// A client must finish its startup and authentication within this time.
    #[serde(default = "default_startup_timeout", with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Logged-in clients per user name; the next login is refused with 53300. 0: no limit.
    #[serde(default)]
    pub max_clients_per_user: usize,
    /// Clients per client IP address (counted from the startup packet on); more are refused
    /// with 53300. 0: no limit.
    #[serde(default)]
    pub max_clients_per_addr: usize,
    /// Failed logins (wrong password, unknown user) from one address within
    /// `auth_failure_window` after which that address is refused for `auth_backoff`. 0: off.
    #[serde(default = "default_auth_failures_before_backoff")]
    pub auth_failures_before_backoff: u32,
    /// The window in which an address's failed logins are counted.
    #[serde(default = "default_auth_failure_window", with = "humantime_serde")]
    pub auth_failure_window: Duration,
    /// How long an address is refused once it reached the failure count; doubles with each
    /// further failure after a back-off ended (up to 16 times), until a login succeeds or the
    /// window passes without failures.
    #[serde(default = "default_auth_backoff", with = "humantime_serde")]
    pub auth_backoff: Duration,
    /// A logged-in client that sends nothing for this long outside a transaction block is
    /// closed with FATAL 57P05. 0: never.
    #[serde(default, with = "humantime_serde")]
    pub client_idle_timeout: Duration,
    /// A client that sends nothing for this long inside a transaction block (holding a server
    /// connection) is closed with FATAL 25P03 and its transaction rolled back. 0: never.
    #[serde(default, with = "humantime_serde")]
    pub idle_transaction_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: default_max_message_size(),
            startup_timeout: default_startup_timeout(),
            max_clients_per_user: 0,
            max_clients_per_addr: 0,
            auth_failures_before_backoff: default_auth_failures_before_backoff(),
            auth_failure_window: default_auth_failure_window(),
            auth_backoff: default_auth_backoff(),
            client_idle_timeout: Duration::ZERO,
            idle_transaction_timeout: Duration::ZERO,
        }
    }
}

fn default_auth_failures_before_backoff() -> u32 {
    5
}
fn default_auth_failure_window() -> Duration {
    Duration::from_secs(60)
}
fn default_auth_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_max_message_size() -> usize {
    // PostgreSQL's own ceiling for a single allocation (MaxAllocSize).
    0x3fff_ffff
}
fn default_startup_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `[runtime]`: how the process runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSettings {
    /// Threads relaying client traffic; 0 means one per CPU core.
    #[serde(default)]
    pub worker_threads: usize,
    /// How the worker threads share the work (see [`Scheduler`]).
    #[serde(default)]
    pub scheduler: Scheduler,
    /// On SIGTERM, how long transactions in progress may run before their clients are closed.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Unix socket where a new process (`--takeover`, SIGUSR2) asks this one for its sessions.
    #[serde(default)]
    pub control_socket: Option<std::path::PathBuf>,
    /// Directory shared by peer processes (one pod): each listens there, and a process that
    /// receives SIGTERM hands its sessions to a live peer.
    #[serde(default)]
    pub peer_dir: Option<std::path::PathBuf>,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings {
            worker_threads: 0,
            scheduler: Scheduler::default(),
            shutdown_timeout: default_shutdown_timeout(),
            control_socket: None,
            peer_dir: None,
        }
    }
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}

impl RuntimeSettings {
    /// The number of worker threads to start.
    pub fn threads(&self) -> usize {
        if self.worker_threads > 0 {
            self.worker_threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// `runtime.scheduler`: how worker threads share clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// Each thread runs its own event loop and serves the clients given to it in turn; a
    /// released server connection goes to a client of the same thread when one waits.
    #[default]
    PerThread,
    /// One shared event loop whose idle threads take work from busy ones (tokio's
    /// multi-thread runtime): clients and connections move between threads freely.
    WorkStealing,
}

impl Scheduler {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::PerThread => "per-thread",
            Scheduler::WorkStealing => "work-stealing",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter such as `info` or `pgtether=debug`; RUST_LOG overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::Text,
            level: default_log_level(),
        }
    }
}

fn default_log_level() -> String {
    "info".to_string()
}

/// `[admin]`: the admin console, a virtual database named [`ADMIN_DATABASE`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Users who may connect to the admin console; each must also be under `[users]`, where
    /// its password is. Empty: the console is disabled.
    #[serde(default)]
    pub users: Vec<String>,
}

impl Admin {
    pub fn is_admin(&self, user: &str) -> bool {
        self.users.iter().any(|u| u == user)
    }
}

/// `[databases.NAME]`: clients connect with `dbname=NAME`; pgtether connects upstream here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// Upstream database name; defaults to NAME.
    pub dbname: Option<String>,
    /// Log in upstream as this user instead of the client's user name.
    pub user: Option<String>,
    /// Password for `user` upstream; needs `user`.
    pub password: Option<String>,
    /// This database's auth_query role, instead of `auth.user`.
    pub auth_user: Option<String>,
    /// This database's auth_query, instead of `auth.query`.
    pub auth_query: Option<String>,
    #[serde(default)]
    pub pool: PoolOverrides,
    /// TLS to this database, as libpq's sslmode.
    #[serde(default)]
    pub sslmode: SslMode,
    /// CA certificates (PEM) for sslmode verify-ca and verify-full.
    pub sslrootcert: Option<PathBuf>,
}

/// `[tls]`: TLS for client connections.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// Certificate chain (PEM) shown to clients; with `key_file`, enables TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// `disable`, `allow` (TLS when the client asks) or `require` (plaintext refused).
    #[serde(default)]
    pub client_mode: ClientTls,
}

fn default_pg_port() -> u16 {
    5432
}

/// `[users.NAME]`: who may connect, and the password pgtether checks and uses upstream.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Plain text, `md5…` (PostgreSQL's md5 format) or a `SCRAM-SHA-256$…` verifier.
    pub password: Option<String>,
}

impl Config {
    /// How users of `database` who are not under `[users]` are looked up; `None` when they
    /// cannot log in (no auth_query for it).
    pub fn auth_lookup(&self, database: &str) -> Option<AuthLookup<'_>> {
        let db = self.databases.get(database)?;
        let user = db.auth_user.as_deref().or(self.auth.user.as_deref())?;
        let query = db
            .auth_query
            .as_deref()
            .or(self.auth.query.as_deref())
            .unwrap_or(DEFAULT_AUTH_QUERY);
        Some(AuthLookup { user, query })
    }

    /// The effective pool settings of a database: its overrides on top of `[pool]`.
    pub fn pool_settings(&self, database: &str) -> PoolSettings {
        let base = &self.pool;
        let Some(db) = self.databases.get(database) else {
            return base.clone();
        };
        let o = &db.pool;
        PoolSettings {
            mode: o.mode.unwrap_or(base.mode),
            size: o.size.unwrap_or(base.size),
            min_idle: o.min_idle.unwrap_or(base.min_idle),
            acquire_timeout: o.acquire_timeout.unwrap_or(base.acquire_timeout),
            connect_timeout: o.connect_timeout.unwrap_or(base.connect_timeout),
            server_idle_timeout: o.server_idle_timeout.unwrap_or(base.server_idle_timeout),
            server_lifetime: o.server_lifetime.unwrap_or(base.server_lifetime),
            server_check_delay: o.server_check_delay.unwrap_or(base.server_check_delay),
            max_prepared_statements: o
                .max_prepared_statements
                .unwrap_or(base.max_prepared_statements),
            on_pin: o.on_pin.unwrap_or(base.on_pin),
            track_session_state: o.track_session_state.unwrap_or(base.track_session_state),
            prepare_unnamed: o.prepare_unnamed.unwrap_or(base.prepare_unnamed),
        }
    }
}

#[cfg(test)]
mod tests;
