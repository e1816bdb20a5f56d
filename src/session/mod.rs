//! One client connection, from accept to close: startup and login, then the idle ↔ active
//! cycle. Idle, the client holds no server connection; its first message acquires one, and the
//! relay gives it back when the transaction (transaction, statement mode) or the client
//! (session mode) ends.

pub mod replies;
mod startup;
pub mod state;
pub mod tracker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, info, warn};

use crate::app::App;
use crate::auth::AuthError;
use crate::cancel::CancelHandle;
use crate::config::OnPin;
use crate::config::PoolMode;
use crate::metrics::{ClientGauge, ClientState};
use crate::pool::{AcquireError, Pool, ServerObject};
use crate::protocol::backend::{self, Severity};
use crate::protocol::sqlstate;
use crate::protocol::startup::StartupError;
use crate::relay::{drop_held_ready_for_query, Flow, Outcome, ProtocolError, Relay, ToServer};
use crate::server::ServerConn;
use crate::server::ServerError;
use crate::statements::Registry;
pub use startup::Login;
use startup::{authenticate, negotiate, Hello};
use state::ClientSession;
use tracker::{Ctx, Tracker};

/// How long cleaning a server connection after its client left may take before it is closed.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a client connection ended abnormally. Each maps to the SQLSTATE the client is told.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client went away")]
    ClientGone,
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
}

impl SessionError {
    /// The SQLSTATE to report, or `None` when the client cannot be told anything.
    fn sqlstate(&self) -> Option<&'static str> {
        use SessionError::*;
        Some(match self {
            ClientGone | Startup(StartupError::Closed) | Startup(StartupError::Io(_)) => {
                return None
            }
            Auth(AuthError::Closed) | Auth(AuthError::Io(_)) => return None,
            Startup(_) | Protocol(_) => sqlstate::PROTOCOL_VIOLATION,
            UnsupportedVersion { .. } => sqlstate::FEATURE_NOT_SUPPORTED,
            NoUser | UnknownUser(_) => sqlstate::INVALID_AUTHORIZATION,
            UnknownDatabase(_) => sqlstate::INVALID_CATALOG_NAME,
            Auth(AuthError::WrongPassword(_)) => sqlstate::INVALID_PASSWORD,
            Auth(AuthError::NoSecret(..)) => sqlstate::INVALID_AUTHORIZATION,
            Auth(_) => sqlstate::PROTOCOL_VIOLATION,
            StartupTimeout(_) => sqlstate::PROTOCOL_VIOLATION,
            TooManyClients(_) => sqlstate::TOO_MANY_CONNECTIONS,
            Acquire(AcquireError::Exhausted { .. }) => sqlstate::TOO_MANY_CONNECTIONS,
            Acquire(AcquireError::Server {
                source: ServerError::Postgres { .. },
                ..
            }) => return self.upstream_code(),
            Acquire(_) => sqlstate::CLIENT_CANNOT_CONNECT,
            ServerLost(_) => sqlstate::CONNECTION_FAILURE,
        })
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

    fn hint(&self) -> Option<&'static str> {
        use SessionError::*;
        match self {
            UnknownDatabase(_) => {
                Some("Connect to a database listed under [databases] in pgtether's config.")
            }
            UnknownUser(_) => Some("Add the user under [users] in pgtether's config."),
            Acquire(AcquireError::Exhausted { .. }) => {
                Some("Raise pool.size or acquire_timeout, or shorten transactions; then retry.")
            }
            Acquire(_) => Some(
                "Check that the upstream PostgreSQL is running and the [databases] entry is right.",
            ),
            ServerLost(_) => Some("Reconnect and retry the transaction."),
            TooManyClients(_) => Some("Retry later or raise listen.max_clients."),
            _ => None,
        }
    }
}

/// Serves one accepted client connection until it ends.
pub async fn run(
    mut stream: TcpStream,
    peer: SocketAddr,
    app: Arc<App>,
    permit: Option<OwnedSemaphorePermit>,
) {
    // Only what an idle client needs lives in this task's own state; the login phase, like
    // the acquire and relay phases below, runs in a boxed future that is freed when done.
    // (Each boxed future is made in its own statement: a temporary in the awaiting statement
    // would keep its full size reserved in this task's state.)
    // The permit (a max_clients slot) is held until the connection ends.
    let phase = Box::pin(login(&mut stream, peer, &app, permit.is_some()));
    let result = match phase.await {
        Ok(Some(mut client)) => {
            let r = client.serve_queries().await;
            client.tracker.on_disconnect(&client.pool.metrics);
            info!(%peer, user = %client.pool.user, database = %client.pool.database, "client disconnected");
            r
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        let phase = Box::pin(report(&stream, peer, &app, e));
        phase.await;
    }
    drop(permit);
}

/// Tells the client why its connection ends, when the protocol still allows it.
async fn report(stream: &TcpStream, peer: SocketAddr, app: &App, e: SessionError) {
    let Some(code) = e.sqlstate() else {
        debug!(%peer, error = %e, "client connection closed");
        return;
    };
    if matches!(e, SessionError::Protocol(_) | SessionError::Startup(_)) {
        app.metrics.protocol_errors.inc();
    }
    info!(%peer, error = %e, sqlstate = code, "client connection closed with error");
    let mut out = BytesMut::with_capacity(256);
    backend::error_response(&mut out, Severity::Fatal, code, &e.to_string(), e.hint());
    let _ = tokio::time::timeout(Duration::from_secs(1), write_all(stream, &out)).await;
}

/// Startup, authentication and the welcome; returns the logged-in client, or `None` for a
/// connection that only carried a CancelRequest.
async fn login<'a>(
    stream: &'a mut TcpStream,
    peer: SocketAddr,
    app: &'a Arc<App>,
    has_slot: bool,
) -> Result<Option<Box<Client<'a>>>, SessionError> {
    let limit = app.config.limits.startup_timeout;
    let login = tokio::time::timeout(limit, async {
        let login = match negotiate(stream).await? {
            Hello::Cancel { pid, key } => {
                app.cancel.cancel(pid, key).await;
                return Ok(None);
            }
            Hello::Login(login) => login,
        };
        if !has_slot {
            app.metrics
                .clients_rejected
                .with_label_values(&["max_clients"])
                .inc();
            return Err(SessionError::TooManyClients(app.config.listen.max_clients));
        }
        if let Err(e) = authenticate(stream, app, &login).await {
            let reason = match &e {
                SessionError::UnknownDatabase(_) => "unknown_database",
                SessionError::UnknownUser(_) => "unknown_user",
                SessionError::Auth(AuthError::WrongPassword(_)) => "wrong_password",
                _ => "other",
            };
            app.metrics
                .login_failures
                .with_label_values(&[reason])
                .inc();
            return Err(e);
        }
        Ok(Some(login))
    })
    .await
    .map_err(|_| SessionError::StartupTimeout(limit))??;
    let Some(login) = login else { return Ok(None) };

    let password = app
        .secrets
        .get(&login.user)
        .and_then(|s| s.plain.as_deref());
    let pool = app
        .pools
        .get(&app.config, &login.database, &login.user, password);
    let params = pool.startup_params().await?;
    let cancel = app.cancel.register();

    let mut out = BytesMut::with_capacity(512);
    backend::authentication_ok(&mut out);
    // What a dedicated connection would report: the server's values, except where the
    // client's own startup parameters (replayed onto every server connection it uses) differ.
    let own = state::startup_overrides(&login.params);
    for (name, value) in params {
        let value = own
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .unwrap_or(if name == "application_name" {
                ""
            } else {
                value.as_str()
            });
        backend::parameter_status(&mut out, name, value);
    }
    backend::backend_key_data(&mut out, cancel.pid, cancel.key);
    backend::ready_for_query(&mut out, b'I');
    write_all(stream, &out)
        .await
        .map_err(|_| SessionError::ClientGone)?;
    info!(%peer, user = %login.user, database = %login.database, mode = pool.mode().as_str(), "client logged in");

    let settings = &pool.settings;
    Ok(Some(Box::new(Client {
        gauge: ClientGauge::new(pool.metrics.clone()),
        registry: &app.statements,
        on_pin: settings.on_pin,
        tracking: settings.track_session_state,
        max_message: app.config.limits.max_message_size,
        tracker: Tracker::new(ClientSession::from_startup(&login.params)),
        stream,
        pool,
        cancel,
        c2s: ToServer::default(),
        s2c: Flow::default(),
    })))
}

/// A logged-in client and what it holds.
struct Client<'a> {
    stream: &'a TcpStream,
    pool: Arc<Pool>,
    registry: &'a Registry,
    on_pin: OnPin,
    tracking: bool,
    gauge: ClientGauge,
    cancel: CancelHandle,
    max_message: usize,
    c2s: ToServer,
    s2c: Flow,
    tracker: Tracker,
}

impl Client<'_> {
    async fn serve_queries(&mut self) -> Result<(), SessionError> {
        loop {
            if !self.wait_for_work().await {
                return Ok(());
            }
            // Everything about a server connection lives in the active phase, boxed, so an
            // idle client's state is only what it keeps between transactions.
            let phase = Box::pin(self.active());
            if let Some(end) = phase.await {
                return end;
            }
        }
    }

    /// Holds a server connection from acquire to release. Returns `None` when the client
    /// goes back to idle, or how the session ended.
    async fn active(&mut self) -> Option<Result<(), SessionError>> {
        let mut conn = match self.attach().await {
            Ok(conn) => conn,
            Err(e) => return Some(Err(e)),
        };
        let ctx = Ctx {
            registry: self.registry,
            metrics: &self.pool.metrics,
            mode: self.pool.mode(),
            on_pin: self.on_pin,
            tracking: self.tracking,
        };
        let server: &mut ServerConn = &mut conn;
        let outcome = Relay {
            client: self.stream,
            server: &server.stream,
            server_session: &mut server.session,
            c2s: &mut self.c2s,
            s2c: &mut self.s2c,
            tracker: &mut self.tracker,
            ctx: &ctx,
            max_message: self.max_message,
        }
        .run()
        .await;
        self.publish_counts();
        match outcome {
            Outcome::Released => {
                self.detach(conn);
                None
            }
            Outcome::Terminated | Outcome::ClientGone => {
                self.finish_server(conn).await;
                Some(Ok(()))
            }
            Outcome::ClientProtocol(e) => {
                self.finish_server(conn).await;
                Some(Err(protocol_error(e)))
            }
            Outcome::ServerGone => {
                drop(deadpool::managed::Object::take(conn));
                self.tracker.detach();
                // Whatever the server said last (often a FATAL) goes to the client first.
                let _ = self.s2c.flush(self.stream).await;
                Some(Err(SessionError::ServerLost(
                    "the server closed the connection",
                )))
            }
            Outcome::TransactionInStatementMode => {
                match self.refuse_transaction_block(conn).await {
                    Ok(()) => None,
                    Err(e) => Some(Err(e)),
                }
            }
        }
    }

    /// Idle: flushes what the client is owed, drops buffers, and waits for the start of the
    /// client's next message. Returns false when the client is done.
    async fn wait_for_work(&mut self) -> bool {
        if self.s2c.flush(self.stream).await.is_err() {
            return false;
        }
        self.c2s.shrink_if_empty();
        self.s2c.shrink_if_empty();
        loop {
            match self.c2s.next_tag() {
                Some(b'X') => return false,
                Some(_) => return true,
                None => {}
            }
            if self.stream.readable().await.is_err() {
                return false;
            }
            match self.c2s.try_read(self.stream) {
                Ok(0) => return false,
                Ok(n) => self.tracker.counts.received += n as u64,
                // Readiness was stale: give back the read buffer before waiting again.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.c2s.shrink_if_empty(),
                Err(_) => return false,
            }
        }
    }

    async fn attach(&mut self) -> Result<ServerObject, SessionError> {
        self.gauge.set(ClientState::Waiting);
        let mut conn = self.pool.acquire().await?;
        self.gauge.set(ClientState::Active);
        self.cancel.slot.set(Some(conn.cancel));
        let ctx = Ctx {
            registry: self.registry,
            metrics: &self.pool.metrics,
            mode: self.pool.mode(),
            on_pin: self.on_pin,
            tracking: self.tracking,
        };
        self.tracker.attach(&mut conn.session, self.c2s.out(), &ctx);
        Ok(conn)
    }

    /// Gives a clean server connection back to the pool.
    fn detach(&mut self, conn: ServerObject) {
        self.tracker.release_memory();
        self.cancel.slot.set(None);
        self.gauge.set(ClientState::Idle);
        if self.s2c.has_unscanned() || self.tracker.server_dirty {
            // The server sent more after its final ReadyForQuery, or pgtether's own settings
            // failed to apply: it is not in a known state.
            drop(deadpool::managed::Object::take(conn));
        }
    }

    /// The client left while holding `conn`: make the connection clean for the next client
    /// (roll back, and DISCARD ALL in session mode) or close it.
    async fn finish_server(&mut self, mut conn: ServerObject) {
        self.cancel.slot.set(None);
        let session = self.pool.mode() == PoolMode::Session;
        let tx = self.tracker.tx;
        // State that cannot move (temp tables, locks, LISTEN …) must not reach the next
        // client: a pinned session is discarded like a session-mode one.
        let discard = session || self.tracker.session.pins.is_pinned();
        let owes_nothing = tx.pending == 0
            && !tx.unsynced
            && self.tracker.replies.is_empty()
            && !self.s2c.has_unscanned()
            && !self.tracker.server_dirty;
        let clean = owes_nothing && {
            let cleanup = async {
                if tx.status != b'I' && conn.run_discarding("ROLLBACK").await.is_err() {
                    return false;
                }
                !discard || conn.run_discarding("DISCARD ALL").await.is_ok()
            };
            tokio::time::timeout(CLEANUP_TIMEOUT, cleanup)
                .await
                .unwrap_or(false)
        };
        self.tracker.detach();
        if discard {
            conn.session.reset();
        }
        if !clean {
            debug!(pool = %self.pool.name(), "closing server connection left dirty by its client");
            drop(deadpool::managed::Object::take(conn));
        }
    }

    /// Statement mode: the client opened a transaction block. Roll it back, tell the client,
    /// and hand the connection back.
    async fn refuse_transaction_block(
        &mut self,
        mut conn: ServerObject,
    ) -> Result<(), SessionError> {
        // Everything before the offending ReadyForQuery goes out; that message does not.
        let _ = self.s2c.flush(self.stream).await;
        drop_held_ready_for_query(&mut self.s2c);
        self.tracker.tx.pending = self.tracker.tx.pending.saturating_sub(1);
        let pipelined = self.tracker.tx.pending > 0 || self.tracker.tx.unsynced;
        let rolled_back = !pipelined
            && tokio::time::timeout(CLEANUP_TIMEOUT, conn.run_discarding("ROLLBACK"))
                .await
                .is_ok_and(|r| r.is_ok());
        self.tracker.detach();
        self.cancel.slot.set(None);
        self.gauge.set(ClientState::Idle);
        if !rolled_back {
            drop(deadpool::managed::Object::take(conn));
        }
        let message = format!(
            "transaction blocks are not allowed in statement pooling mode (pool \"{}\"); the transaction was rolled back",
            self.pool.name()
        );
        let hint =
            "Run each statement on its own, or use mode = \"transaction\" for this database.";
        let mut out = BytesMut::with_capacity(256);
        if pipelined {
            return Err(SessionError::Protocol(message));
        }
        backend::error_response(
            &mut out,
            Severity::Error,
            sqlstate::FEATURE_NOT_SUPPORTED,
            &message,
            Some(hint),
        );
        backend::ready_for_query(&mut out, b'I');
        write_all(self.stream, &out)
            .await
            .map_err(|_| SessionError::ClientGone)?;
        warn!(pool = %self.pool.name(), "refused a transaction block in statement mode");
        Ok(())
    }

    fn publish_counts(&mut self) {
        let m = self.gauge.metrics();
        let c = std::mem::take(&mut self.tracker.counts);
        if c.queries > 0 {
            m.queries.inc_by(c.queries);
        }
        if c.transactions > 0 {
            m.transactions.inc_by(c.transactions);
        }
        if c.received > 0 {
            m.received_bytes.inc_by(c.received);
        }
        if c.sent > 0 {
            m.sent_bytes.inc_by(c.sent);
        }
    }
}

fn protocol_error(e: ProtocolError) -> SessionError {
    SessionError::Protocol(e.to_string())
}

/// Writes all of `bytes` to a socket shared by reference.
async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
#[cfg(test)]
mod tests {
    /// Every idle client keeps a `Client` on the heap: guard the per-client memory budget
    /// (README: about 2 kB per idle client in all).
    #[test]
    fn idle_client_state_stays_small() {
        let size = std::mem::size_of::<super::Client<'static>>();
        assert!(size <= 640, "Client grew to {size} bytes");
    }
}
