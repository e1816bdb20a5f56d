//! Why a client connection ends abnormally, and what the client is told: one place maps each
//! situation to its SQLSTATE and hint.

use crate::access;
use crate::auth::AuthError;
use crate::clients::Kill;
use crate::limits::{IdleKind, LimitError};
use crate::metrics::Metrics;
use crate::pool::AcquireError;
use crate::protocol::sqlstate;
use crate::protocol::startup::StartupError;
use crate::server::ServerError;
use std::time::Duration;

/// Why a client connection ended abnormally. Each maps to the SQLSTATE the client is told.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client went away")]
    ClientGone,
    #[error("TLS handshake with the client failed: {0}")]
    TlsHandshake(std::io::Error),
    #[error("pgtether accepts only TLS connections (tls.client_mode = \"require\")")]
    TlsRequired,
    #[error("{0}")]
    Startup(#[from] StartupError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("unsupported frontend protocol {major}.{minor}: pgtether supports 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    #[error("database \"{0}\" does not exist in pgtether's configuration")]
    UnknownDatabase(String),
    #[error("user \"{0}\" is not configured in pgtether")]
    UnknownUser(String),
    /// auth_query found no such user (or none the method can check): worded exactly like a
    /// wrong password, so a client cannot tell which users exist.
    #[error("password authentication failed for user \"{0}\"")]
    NoSuchUser(String),
    /// The auth_query lookup itself failed (the log has the cause).
    #[error("cannot check the password of user \"{0}\": pgtether's password lookup on the upstream (auth_query) failed")]
    LookupFailed(String),
    #[error("{0}")]
    Auth(#[from] AuthError),
    #[error("startup and authentication did not finish within limits.startup_timeout ({0:?})")]
    StartupTimeout(Duration),
    #[error("sorry, too many clients already (listen.max_clients = {0})")]
    TooManyClients(usize),
    #[error("{0}")]
    Acquire(#[from] AcquireError),
    #[error("server connection lost: {0}")]
    ServerLost(&'static str),
    #[error("{0}")]
    StateLost(String),
    #[error(
        "permission denied for the admin console: user \"{0}\" is not listed under [admin] users"
    )]
    NotAdmin(String),
    #[error("the admin console is disabled: no users are listed under [admin] users")]
    AdminDisabled,
    #[error("{}", .0.message())]
    Killed(Kill),
    #[error("{0}")]
    Limit(#[from] LimitError),
    #[error("{0}")]
    Access(#[from] access::Refused),
    #[error("terminating connection due to idle-session timeout (limits.client_idle_timeout = {})", humantime::format_duration(*.0))]
    IdleTimeout(Duration),
    #[error("terminating connection due to idle-in-transaction timeout (limits.idle_transaction_timeout = {}); the transaction was rolled back", humantime::format_duration(*.0))]
    IdleInTransactionTimeout(Duration),
}

impl SessionError {
    /// The SQLSTATE to report, or `None` when the client cannot be told anything.
    pub(super) fn sqlstate(&self) -> Option<&'static str> {
        use SessionError::*;
        Some(match self {
            ClientGone
            | TlsHandshake(_)
            | Startup(StartupError::Closed)
            | Startup(StartupError::Io(_)) => return None,
            TlsRequired => sqlstate::INVALID_AUTHORIZATION,
            Auth(AuthError::Closed) | Auth(AuthError::Io(_)) => return None,
            Startup(_) | Protocol(_) => sqlstate::PROTOCOL_VIOLATION,
            UnsupportedVersion { .. } => sqlstate::FEATURE_NOT_SUPPORTED,
            NoUser | UnknownUser(_) => sqlstate::INVALID_AUTHORIZATION,
            UnknownDatabase(_) => sqlstate::INVALID_CATALOG_NAME,
            Auth(AuthError::WrongPassword(_)) | NoSuchUser(_) => sqlstate::INVALID_PASSWORD,
            LookupFailed(_) => sqlstate::CLIENT_CANNOT_CONNECT,
            Auth(AuthError::NoSecret(..)) => sqlstate::INVALID_AUTHORIZATION,
            // PostgreSQL's code for a failed channel binding check or a downgrade.
            Auth(AuthError::ChannelBinding(_)) => sqlstate::INVALID_AUTHORIZATION,
            Auth(_) => sqlstate::PROTOCOL_VIOLATION,
            StartupTimeout(_) => sqlstate::PROTOCOL_VIOLATION,
            TooManyClients(_) => sqlstate::TOO_MANY_CONNECTIONS,
            Acquire(AcquireError::Exhausted { .. }) => sqlstate::TOO_MANY_CONNECTIONS,
            Acquire(AcquireError::Server {
                source: ServerError::Postgres { .. },
                ..
            }) => return self.upstream_code(),
            Acquire(_) => sqlstate::CLIENT_CANNOT_CONNECT,
            ServerLost(_) | StateLost(_) => sqlstate::CONNECTION_FAILURE,
            NotAdmin(_) | AdminDisabled => sqlstate::INSUFFICIENT_PRIVILEGE,
            Killed(_) => sqlstate::ADMIN_SHUTDOWN,
            Limit(LimitError::Backoff { .. }) => sqlstate::INVALID_PASSWORD,
            Limit(_) => sqlstate::TOO_MANY_CONNECTIONS,
            Access(_) => sqlstate::INVALID_AUTHORIZATION,
            IdleTimeout(_) => sqlstate::IDLE_SESSION_TIMEOUT,
            IdleInTransactionTimeout(_) => sqlstate::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
        })
    }

    /// Counts a refused login under its reason: refusals by a connection limit in
    /// `pgtether_clients_rejected_total`, every other in `pgtether_client_login_failures_total`.
    pub(super) fn count_refusal(&self, metrics: &Metrics) {
        use SessionError::*;
        let reason = match self {
            Limit(e @ (LimitError::PerUser { .. } | LimitError::PerAddr { .. })) => {
                metrics
                    .clients_rejected
                    .with_label_values(&[e.reason()])
                    .inc();
                return;
            }
            Limit(e) => e.reason(),
            Access(access::Refused::NoRule { .. }) => "no_hba_entry",
            Access(access::Refused::Rejected { .. }) => "hba_reject",
            UnknownDatabase(_) => "unknown_database",
            UnknownUser(_) | NoSuchUser(_) => "unknown_user",
            LookupFailed(_) => "auth_query",
            Auth(AuthError::WrongPassword(_)) => "wrong_password",
            Auth(AuthError::ChannelBinding(_)) => "channel_binding",
            _ => "other",
        };
        metrics.login_failures.with_label_values(&[reason]).inc();
    }

    /// Counts a client closed by an idle timeout.
    pub(super) fn count_idle_timeout(&self, metrics: &Metrics) {
        let reason = match self {
            SessionError::IdleTimeout(_) => "client_idle",
            SessionError::IdleInTransactionTimeout(_) => "idle_in_transaction",
            _ => return,
        };
        metrics.idle_timeouts.with_label_values(&[reason]).inc();
    }

    /// The error for an idle timeout of `kind` and length `limit`.
    pub(super) fn idle(kind: IdleKind, limit: Duration) -> SessionError {
        match kind {
            IdleKind::Session => SessionError::IdleTimeout(limit),
            IdleKind::Transaction => SessionError::IdleInTransactionTimeout(limit),
        }
    }

    /// The upstream's own SQLSTATE, passed on when the upstream refused a login.
    fn upstream_code(&self) -> Option<&'static str> {
        match self {
            SessionError::Acquire(AcquireError::Server {
                source: ServerError::Postgres { code, .. },
                ..
            }) => Some(match code.as_str() {
                "28P01" => sqlstate::INVALID_PASSWORD,
                "28000" => sqlstate::INVALID_AUTHORIZATION,
                "3D000" => sqlstate::INVALID_CATALOG_NAME,
                "53300" => sqlstate::TOO_MANY_CONNECTIONS,
                "57P03" => "57P03",
                _ => sqlstate::CLIENT_CANNOT_CONNECT,
            }),
            _ => None,
        }
    }

    pub(super) fn hint(&self) -> Option<&'static str> {
        use SessionError::*;
        match self {
            UnknownDatabase(_) => {
                Some("Connect to a database listed under [databases] in pgtether's config.")
            }
            UnknownUser(_) => Some("Add the user under [users] in pgtether's config."),
            TlsRequired => Some("Connect with sslmode=require (or verify-ca, verify-full)."),
            Auth(AuthError::ChannelBinding(_)) => Some(
                "Something between the client and pgtether ends or alters its TLS connection (a TLS-intercepting proxy?): connect to pgtether directly, with sslmode=verify-full.",
            ),
            LookupFailed(_) => Some(
                "Retry in a moment. If it persists, pgtether's log names the cause (the lookup role's password under [users], auth.query, or the upstream).",
            ),
            Acquire(AcquireError::Exhausted { .. }) => {
                Some("Raise pool.size or acquire_timeout, or shorten transactions; then retry.")
            }
            Acquire(_) => Some(
                "Check that the upstream PostgreSQL is running and the [databases] entry is right.",
            ),
            ServerLost(_) | StateLost(_) => Some("Reconnect and retry the transaction."),
            TooManyClients(_) => Some("Retry later or raise listen.max_clients."),
            NotAdmin(_) | AdminDisabled => Some(
                "Add the user to admin.users in pgtether's config, then RELOAD or send SIGHUP.",
            ),
            Killed(_) => Some("Reconnect; pgtether or another instance will serve you."),
            Limit(LimitError::PerUser { .. }) => Some(
                "Close some of this user's connections or raise limits.max_clients_per_user; then retry.",
            ),
            Limit(LimitError::PerAddr { .. }) => Some(
                "Close some connections from this address or raise limits.max_clients_per_addr; then retry.",
            ),
            Limit(LimitError::Backoff { .. }) => Some(
                "Check the user name and password, then retry after the back-off; a successful login from this address clears it.",
            ),
            Access(access::Refused::NoRule { .. }) => Some(
                "Add an [[hba]] rule for this database, user and address in pgtether's config, then RELOAD.",
            ),
            Access(access::Refused::Rejected { .. }) => Some(
                "Connect from an allowed address, or change the [[hba]] rules in pgtether's config.",
            ),
            IdleTimeout(_) => Some("Reconnect; keep idle connections shorter than limits.client_idle_timeout (or raise it)."),
            IdleInTransactionTimeout(_) => Some(
                "Reconnect and retry the transaction; do not leave transactions open while the application waits.",
            ),
            _ => None,
        }
    }
}
