//! What every task of a running pgtether shares: the current configuration (swapped whole by a
//! reload), pools, cancel keys, connected clients, the pause gate and metrics.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::SystemTime;

use std::os::fd::AsRawFd;
use tokio::sync::Semaphore;

use crate::auth::Secret;
use crate::cancel::CancelRegistry;
use crate::clients::Clients;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pause::Pause;
use crate::pool::Pools;
use crate::statements::Registry;
use crate::takeover::state::ListenerKind;
use crate::takeover::Hub;
use crate::tls::ClientTls;

/// What the accept loops do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    Open,
    /// Another process accepts on the same sockets (a takeover in progress); this one waits.
    Paused,
    /// Shutting down: the listening sockets are closed.
    Closed,
}

/// One loaded configuration with what is derived from it. Read once per login (never per
/// query); a reload replaces it whole, so a login sees either the old or the new one.
pub struct Snapshot {
    pub config: Config,
    /// Per-user password material, derived once at load so logins never pay for it.
    pub secrets: HashMap<String, Secret>,
    /// The certificate shown to clients that ask for TLS, with its SCRAM channel binding
    /// data (read at load and reload).
    pub tls: Option<crate::tls::ServerTls>,
}

impl Snapshot {
    /// Derives the secrets of `config`, reusing those of `previous` whose password is
    /// unchanged (deriving a SCRAM verifier is deliberately slow).
    pub fn new(config: Config, previous: Option<&Snapshot>) -> Snapshot {
        let secrets = config
            .users
            .iter()
            .filter_map(|(name, u)| {
                let password = u.password.as_deref()?;
                let unchanged = previous.and_then(|p| {
                    let old = p.config.users.get(name)?.password.as_deref()?;
                    (old == password).then(|| p.secrets.get(name).cloned())?
                });
                Some((
                    name.clone(),
                    unchanged.unwrap_or_else(|| Secret::from_config(name, password)),
                ))
            })
            .collect();
        let tls = match (&config.tls.cert_file, &config.tls.key_file) {
            (Some(cert), Some(key)) if config.tls.client_mode != ClientTls::Disable => {
                match crate::tls::server_config(cert, key) {
                    Ok(tls) => {
                        if let Err(e) = &tls.channel_binding {
                            tracing::warn!(cert = %cert.display(), error = %e,
                                "no SCRAM channel binding with this certificate: SCRAM-SHA-256-PLUS is not offered, and clients with channel_binding=require cannot log in; use an RSA or ECDSA certificate");
                        }
                        Some(tls)
                    }
                    Err(e) => {
                        // Validation read the files a moment ago; they changed since.
                        tracing::error!(error = %e, "TLS certificate unusable; clients asking for TLS are refused");
                        None
                    }
                }
            }
            _ => None,
        };
        Snapshot {
            config,
            secrets,
            tls,
        }
    }

    /// The plain password of `user`, when the config gives one (needed to log in upstream).
    pub fn plain_password(&self, user: &str) -> Option<&str> {
        self.secrets.get(user).and_then(|s| s.plain.as_deref())
    }
}

pub struct App {
    current: RwLock<Arc<Snapshot>>,
    /// The file the configuration came from; RELOAD and SIGHUP read it again.
    pub config_path: OnceLock<PathBuf>,
    pub pools: Arc<Pools>,
    pub cancel: Arc<CancelRegistry>,
    pub metrics: Arc<Metrics>,
    /// Password lookups for users not in the config (auth_query).
    pub lookups: crate::auth::lookup::Lookups,
    /// Connections per user and address, failed-login back-off (see [`crate::limits`]).
    pub limits: Arc<crate::limits::Limits>,
    /// One permit per client connection (`listen.max_clients`).
    pub client_slots: Arc<Semaphore>,
    /// Named statements shared by all clients and server connections.
    pub statements: Registry,
    /// Whether /readyz reports ready (PAUSE of everything also makes it report not ready).
    pub ready: AtomicBool,
    /// Every logged-in client, for the admin console, KILL and shutdown.
    pub clients: Arc<Clients>,
    /// PAUSE / RESUME.
    pub pause: Pause,
    /// Set once shutdown began: new logins are refused with 57P01.
    pub shutting_down: AtomicBool,
    /// Whether the accept loops accept, wait (a takeover in progress), or close their sockets.
    pub accept: tokio::sync::watch::Sender<Accept>,
    /// The listening sockets, for a takeover to hand over.
    pub listeners: Mutex<Vec<(ListenerKind, Arc<dyn AsRawFd + Send + Sync>)>>,
    /// Sessions moving to or from another pgtether process.
    pub takeover: Hub,
    /// One reload at a time.
    pub reload_lock: tokio::sync::Mutex<()>,
    pub started_at: SystemTime,
}

impl App {
    /// An app with one database and user, `app`, whose upstream is never dialled: for unit
    /// tests of what is built around it.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Arc<App> {
        let config = Config::parse(
            "[databases.app]\nhost = \"127.0.0.1\"\n[users.app]\npassword = \"x\"\n",
            "t",
        )
        .expect("the test config parses");
        App::new(config)
    }

    pub fn new(config: Config) -> Arc<App> {
        let metrics = Arc::new(Metrics::new());
        let max_clients = config.listen.max_clients;
        let snapshot = Arc::new(Snapshot::new(config, None));
        Arc::new(App {
            client_slots: Arc::new(Semaphore::new(max_clients)),
            limits: Arc::default(),
            lookups: crate::auth::lookup::Lookups::new(metrics.auth_query.clone()),
            pools: Arc::new(Pools::new(metrics.clone(), snapshot.clone())),
            cancel: Arc::new(CancelRegistry::default()),
            statements: Registry::default(),
            metrics,
            current: RwLock::new(snapshot),
            config_path: OnceLock::new(),
            ready: AtomicBool::new(false),
            clients: Arc::new(Clients::default()),
            pause: Pause::default(),
            shutting_down: AtomicBool::new(false),
            accept: tokio::sync::watch::Sender::new(Accept::Open),
            listeners: Mutex::new(Vec::new()),
            takeover: Hub::default(),
            reload_lock: tokio::sync::Mutex::new(()),
            started_at: SystemTime::now(),
        })
    }

    /// The configuration in force now. Take it once per login or admin command.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts a new configuration in force (see [`crate::reload`]).
    pub fn install(&self, snapshot: Arc<Snapshot>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = snapshot;
    }

    /// Whether /readyz should answer ready: accepting, not shutting down, not paused, and some
    /// upstream reachable.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
            && !self.shutting_down.load(Ordering::Relaxed)
            && !self.pause.all()
            && self.upstream_reachable()
    }

    /// False only when pools exist and every one of them failed its last connection attempt.
    fn upstream_reachable(&self) -> bool {
        let pools = self.pools.all();
        pools.is_empty() || pools.iter().any(|p| p.upstream_up())
    }
}
