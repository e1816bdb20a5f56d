//! What every task of a running pgtether shares: the config, user secrets, pools, cancel keys
//! and metrics.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::auth::Secret;
use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pool::Pools;
use crate::statements::Registry;

pub struct App {
    pub config: Config,
    /// Per-user password material, derived once at load so logins never pay for it.
    pub secrets: HashMap<String, Secret>,
    pub pools: Arc<Pools>,
    pub cancel: Arc<CancelRegistry>,
    pub metrics: Arc<Metrics>,
    /// One permit per client connection (`listen.max_clients`).
    pub client_slots: Arc<Semaphore>,
    /// Named statements shared by all clients and server connections.
    pub statements: Registry,
    /// Whether /readyz reports ready.
    pub ready: AtomicBool,
}

impl App {
    pub fn new(config: Config) -> Arc<App> {
        let secrets = config
            .users
            .iter()
            .filter_map(|(name, u)| {
                u.password
                    .as_deref()
                    .map(|p| (name.clone(), Secret::from_config(name, p)))
            })
            .collect();
        let metrics = Arc::new(Metrics::new());
        Arc::new(App {
            client_slots: Arc::new(Semaphore::new(config.listen.max_clients)),
            pools: Arc::new(Pools::new(metrics.clone())),
            cancel: Arc::new(CancelRegistry::default()),
            statements: Registry::default(),
            secrets,
            metrics,
            config,
            ready: AtomicBool::new(false),
        })
    }
}
