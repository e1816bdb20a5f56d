//! Every Prometheus metric pgtether exports, declared in one place.
//!
//! Label sets are resolved once per pool into [`PoolMetrics`] handles, so the data path only
//! touches atomics, never the registry's label maps.

mod per_worker;

pub use per_worker::Count;
use per_worker::{Exported, PerWorker};

use crate::lexer::PinReason;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// States a client connection can be in, as the `state` label of `pgtether_client_connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Logged in, holding no server connection.
    Idle,
    /// Waiting for a server connection from the pool.
    Waiting,
    /// Holding a server connection.
    Active,
}

pub struct Metrics {
    registry: Registry,
    client_connections: IntGaugeVec,
    server_connections: IntGaugeVec,
    transactions: IntCounterVec,
    queries: IntCounterVec,
    wait_seconds: HistogramVec,
    received_bytes: IntCounterVec,
    sent_bytes: IntCounterVec,
    acquire_timeouts: IntCounterVec,
    server_connect_errors: IntCounterVec,
    server_connects: IntCounterVec,
    pins: IntCounterVec,
    pinned_clients: IntGaugeVec,
    prepared_hits: IntCounterVec,
    prepared_misses: IntCounterVec,
    prepared_evictions: IntCounterVec,
    state_syncs: IntCounterVec,
    pin_rejections: IntCounterVec,
    transaction_seconds: HistogramVec,
    upstream_up: IntGaugeVec,
    pub login_failures: IntCounterVec,
    pub protocol_errors: IntCounter,
    pub clients_rejected: IntCounterVec,
    /// Takeovers by role (gave, took) and result (completed, failed, refused).
    pub takeovers: IntCounterVec,
    /// Clients and server connections moved between processes, by kind and direction.
    pub handed_over: IntCounterVec,
    /// Clients closed by `limits.client_idle_timeout` / `idle_transaction_timeout`.
    pub idle_timeouts: IntCounterVec,
    /// auth_query lookups by result (found, not_found, error, cached).
    pub auth_query: IntCounterVec,
}

/// A pool's resolved metric handles. The counters and gauges every transaction writes are
/// written through [`PerWorker`] (see its module): read them after [`PoolMetrics::sync`].
#[derive(Clone)]
pub struct PoolMetrics {
    per_worker: std::sync::Arc<PerWorker>,
    pub clients_idle: IntGauge,
    pub clients_waiting: IntGauge,
    pub clients_active: IntGauge,
    pub servers_idle: IntGauge,
    pub servers_active: IntGauge,
    pub servers_login: IntGauge,
    /// How long a client held a server connection (one transaction in transaction mode).
    pub transaction_seconds: Histogram,
    /// 1 while the last attempt to open a server connection succeeded.
    pub upstream_up: IntGauge,
    pub transactions: IntCounter,
    pub queries: IntCounter,
    pub wait_seconds: Histogram,
    /// Bytes received from clients.
    pub received_bytes: IntCounter,
    /// Bytes sent to clients.
    pub sent_bytes: IntCounter,
    pub acquire_timeouts: IntCounter,
    pub server_connect_errors: IntCounter,
    /// Server connections opened (after a database restart: the reconnects).
    pub server_connects: IntCounter,
    /// Pins taken, indexed like `PinReason::ALL`.
    pub pins: Vec<IntCounter>,
    pub pinned_clients: IntGauge,
    pub prepared_hits: IntCounter,
    pub prepared_misses: IntCounter,
    pub prepared_evictions: IntCounter,
    pub state_syncs: IntCounter,
    pub pin_rejections: IntCounter,
}

impl PoolMetrics {
    pub fn pin(&self, reason: PinReason) {
        let i = PinReason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("listed");
        self.pins[i].inc();
    }

    /// Whether clients of the calling worker thread wait for a server connection of this
    /// pool: they wait in this thread's shard of it (see `pool::handoff`), so a connection
    /// released here goes to one of them.
    pub fn waiting_here(&self) -> bool {
        self.per_worker.waiting_here()
    }

    /// Adds to a per-thread counter (exported as the field of the same name).
    pub fn add(&self, count: Count, n: u64) {
        self.per_worker.add(count, n);
    }

    /// Brings the client gauges and the transaction, query, byte and prepared statement
    /// counters up to date.
    pub fn sync(&self) {
        self.per_worker.sync();
    }
}

const POOL_LABELS: &[&str] = &["database", "user"];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let client_connections = gauge(
            "pgtether_client_connections",
            "Client connections by pool and state (idle, waiting, active).",
            &["database", "user", "state"],
        );
        let server_connections = gauge(
            "pgtether_server_connections",
            "Server connections by pool and state (idle, active).",
            &["database", "user", "state"],
        );
        let transactions = counter(
            "pgtether_transactions_total",
            "Transactions completed (ReadyForQuery idle after client work).",
            POOL_LABELS,
        );
        let queries = counter(
            "pgtether_queries_total",
            "Queries sent by clients (simple Query and extended Execute messages).",
            POOL_LABELS,
        );
        let received_bytes = counter(
            "pgtether_client_received_bytes_total",
            "Bytes received from clients.",
            POOL_LABELS,
        );
        let sent_bytes = counter(
            "pgtether_client_sent_bytes_total",
            "Bytes sent to clients.",
            POOL_LABELS,
        );
        let acquire_timeouts = counter(
            "pgtether_pool_acquire_timeouts_total",
            "Clients that found no server connection within acquire_timeout.",
            POOL_LABELS,
        );
        let server_connects = counter(
            "pgtether_server_connects_total",
            "Server connections opened, by pool (after a database restart: the reconnects).",
            POOL_LABELS,
        );
        let server_connect_errors = counter(
            "pgtether_server_connect_errors_total",
            "Failed attempts to open a server connection.",
            POOL_LABELS,
        );
        let pins = counter(
            "pgtether_pins_total",
            "Times a client was pinned to its server connection, by reason.",
            &["database", "user", "reason"],
        );
        let pinned_clients = gauge(
            "pgtether_pinned_clients",
            "Clients currently pinned to a server connection.",
            POOL_LABELS,
        );
        let prepared_hits = counter(
            "pgtether_prepared_statement_hits_total",
            "Client Parse/Bind/Describe of a named statement the server connection already had.",
            POOL_LABELS,
        );
        let prepared_misses = counter(
            "pgtether_prepared_statement_misses_total",
            "Named statements pgtether had to prepare on a server connection.",
            POOL_LABELS,
        );
        let prepared_evictions = counter(
            "pgtether_prepared_statement_evictions_total",
            "Statements closed on a server connection to stay within max_prepared_statements.",
            POOL_LABELS,
        );
        let state_syncs = counter(
            "pgtether_state_syncs_total",
            "Times a client's settings were replayed onto a server connection.",
            POOL_LABELS,
        );
        let pin_rejections = counter(
            "pgtether_pin_rejections_total",
            "Statements refused because they would pin (on_pin = \"reject\").",
            POOL_LABELS,
        );
        let transaction_seconds = HistogramVec::new(
            HistogramOpts::new(
                "pgtether_transaction_seconds",
                "Time a client held a server connection: one transaction in transaction mode, the session in session mode.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ]),
            POOL_LABELS,
        )
        .expect("valid metric");
        registry
            .register(Box::new(transaction_seconds.clone()))
            .expect("unique metric");
        let upstream_up = gauge(
            "pgtether_upstream_up",
            "1 while the upstream accepts pgtether's connections (the last attempt succeeded), else 0.",
            POOL_LABELS,
        );
        let wait_seconds = HistogramVec::new(
            HistogramOpts::new(
                "pgtether_client_wait_seconds",
                "Time clients waited for a server connection.",
            )
            .buckets(vec![
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            POOL_LABELS,
        )
        .expect("valid metric");
        registry
            .register(Box::new(wait_seconds.clone()))
            .expect("unique metric");
        let login_failures = counter(
            "pgtether_client_login_failures_total",
            "Client logins refused, by reason.",
            &["reason"],
        );
        let clients_rejected = counter(
            "pgtether_clients_rejected_total",
            "Client connections refused by a connection limit, by reason.",
            &["reason"],
        );
        let idle_timeouts = counter(
            "pgtether_client_idle_timeouts_total",
            "Clients closed for idling longer than an idle timeout, by reason.",
            &["reason"],
        );
        let takeovers = counter(
            "pgtether_takeovers_total",
            "Takeovers (restart, upgrade, peer hand-off) by role (gave, took) and result (completed, failed, refused).",
            &["role", "result"],
        );
        let handed_over = counter(
            "pgtether_handed_over_total",
            "Sessions moved between pgtether processes, by kind (client, server) and direction (sent, received).",
            &["kind", "direction"],
        );
        let auth_query = counter(
            "pgtether_auth_query_total",
            "Password lookups for users not in the config (auth_query), by result: found, not_found, error (the query ran or failed), cached (answered without asking the upstream).",
            &["result"],
        );
        let protocol_errors = IntCounter::new(
            "pgtether_client_protocol_errors_total",
            "Clients closed for violating the protocol.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(protocol_errors.clone()))
            .expect("unique metric");
        Metrics {
            registry,
            client_connections,
            server_connections,
            transactions,
            queries,
            wait_seconds,
            received_bytes,
            sent_bytes,
            acquire_timeouts,
            server_connect_errors,
            server_connects,
            pins,
            pinned_clients,
            prepared_hits,
            prepared_misses,
            prepared_evictions,
            state_syncs,
            pin_rejections,
            transaction_seconds,
            upstream_up,
            login_failures,
            protocol_errors,
            clients_rejected,
            takeovers,
            handed_over,
            idle_timeouts,
            auth_query,
        }
    }

    /// Resolves the label values of one pool once.
    pub fn pool(&self, database: &str, user: &str) -> PoolMetrics {
        let l = [database, user];
        let clients = ["idle", "waiting", "active"].map(|state| {
            self.client_connections
                .with_label_values(&[database, user, state])
        });
        let transactions = self.transactions.with_label_values(&l);
        let queries = self.queries.with_label_values(&l);
        let received_bytes = self.received_bytes.with_label_values(&l);
        let sent_bytes = self.sent_bytes.with_label_values(&l);
        let prepared_hits = self.prepared_hits.with_label_values(&l);
        let prepared_misses = self.prepared_misses.with_label_values(&l);
        let wait_seconds = self.wait_seconds.with_label_values(&l);
        let transaction_seconds = self.transaction_seconds.with_label_values(&l);
        let per_worker = PerWorker::new(Exported {
            clients: clients.clone(),
            // In the order of `Count`.
            counts: [
                transactions.clone(),
                queries.clone(),
                received_bytes.clone(),
                sent_bytes.clone(),
                prepared_hits.clone(),
                prepared_misses.clone(),
            ],
        });
        let [clients_idle, clients_waiting, clients_active] = clients;
        PoolMetrics {
            per_worker: std::sync::Arc::new(per_worker),
            clients_idle,
            clients_waiting,
            clients_active,
            servers_idle: self
                .server_connections
                .with_label_values(&[database, user, "idle"]),
            servers_active: self
                .server_connections
                .with_label_values(&[database, user, "active"]),
            servers_login: self
                .server_connections
                .with_label_values(&[database, user, "login"]),
            transaction_seconds,
            upstream_up: {
                let g = self.upstream_up.with_label_values(&l);
                // Unknown until the first attempt: assume reachable.
                g.set(1);
                g
            },
            transactions,
            queries,
            wait_seconds,
            received_bytes,
            sent_bytes,
            acquire_timeouts: self.acquire_timeouts.with_label_values(&l),
            server_connect_errors: self.server_connect_errors.with_label_values(&l),
            server_connects: self.server_connects.with_label_values(&l),
            pins: PinReason::ALL
                .iter()
                .map(|r| self.pins.with_label_values(&[database, user, r.as_str()]))
                .collect(),
            pinned_clients: self.pinned_clients.with_label_values(&l),
            prepared_hits,
            prepared_misses,
            prepared_evictions: self.prepared_evictions.with_label_values(&l),
            state_syncs: self.state_syncs.with_label_values(&l),
            pin_rejections: self.pin_rejections.with_label_values(&l),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding to a Vec cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Keeps one client counted in exactly one state of its pool's gauge, for as long as it lives.
pub struct ClientGauge {
    metrics: std::sync::Arc<PoolMetrics>,
    state: ClientState,
}

impl ClientGauge {
    pub fn new(metrics: std::sync::Arc<PoolMetrics>) -> ClientGauge {
        metrics
            .per_worker
            .client_moved(None, Some(ClientState::Idle));
        ClientGauge {
            metrics,
            state: ClientState::Idle,
        }
    }

    pub fn set(&mut self, state: ClientState) {
        if state != self.state {
            self.metrics
                .per_worker
                .client_moved(Some(self.state), Some(state));
            self.state = state;
        }
    }

    pub fn metrics(&self) -> &PoolMetrics {
        &self.metrics
    }
}

impl Drop for ClientGauge {
    fn drop(&mut self) {
        self.metrics.per_worker.client_moved(Some(self.state), None);
    }
}
