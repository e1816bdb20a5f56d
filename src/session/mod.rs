//! One client connection, from accept to close: startup and login, then the idle ↔ active
//! cycle. Idle, the client holds no server connection; its first message acquires one, and the
//! relay gives it back when the transaction (transaction, statement mode) or the client
//! (session mode) ends.

pub mod aborted;
mod attach;
mod cleanup;
mod error;
mod handover;
mod idle;
pub mod replies;
mod startup;
pub mod state;
pub mod tracker;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, info};

use crate::app::{App, Snapshot};
use crate::cancel::CancelHandle;
use crate::clients::{ClientEntry, Kill, NewClient};
use crate::config::OnPin;
use crate::config::PoolMode;
use crate::limits::{Admission, IdleTimeouts};
use crate::metrics::{ClientGauge, Count};
use crate::peer::Peer;
use crate::pool::{Lease, Pool};
use crate::protocol::backend::{self, Severity};
use crate::relay::{Flow, Outcome, ProtocolError, Relay, ToServer};
use crate::server::ServerConn;
use crate::socket::Socket;
use cleanup::discard_busy;
pub use error::SessionError;
pub use handover::{adopt, send_to_taker};
use idle::Work;
pub use startup::Login;
use startup::{authenticate, is_admin_database, negotiate, Hello};
use state::ClientSession;
use tracker::{Ctx, Tracker};

/// Serves one accepted client connection until it ends.
///
/// The returned future is every idle client's task state, so it is kept small: only what an
/// idle client needs lives in it. The login phase, like the acquire and relay phases, runs in
/// a boxed future that is freed when done. (Each boxed future is made in its own statement: a
/// temporary in the awaiting statement would keep its full size reserved in this state.)
/// The permit (a max_clients slot) is held until the connection ends.
pub fn run(
    stream: Socket,
    peer: Peer,
    app: Arc<App>,
    permit: Option<OwnedSemaphorePermit>,
) -> impl std::future::Future<Output = ()> + Send {
    // Not an async fn (which keeps a copy of each argument beside the locals made from it:
    // 392 bytes instead of 288 in a debug build); the rebinding is what makes this a plain fn to clippy.
    let mut stream = stream;
    async move {
        let phase = Box::pin(login(&mut stream, peer, &app, permit.is_some()));
        // Settled before anything is awaited again, so that no large value stays reserved
        // beside the idle client's state.
        let next = phase.await.unwrap_or_else(|e| Next::Fail(Box::new(e)));
        // Errors are boxed: a large value here would stay reserved in every client's state.
        let failure = match next {
            Next::Serve(mut client) => {
                client.start();
                let r = client.serve(None).await;
                client.finish(r).err().map(Box::new)
            }
            Next::Admin(admin) => {
                let (login, admission) = *admin;
                let phase = Box::pin(crate::admin::serve(&stream, peer, &app, login));
                let r = phase.await;
                drop(admission);
                r.err().map(Box::new)
            }
            Next::Done => None,
            Next::Fail(e) => Some(e),
        };
        if let Some(e) = failure {
            let phase = Box::pin(report(&stream, peer, &app, *e));
            phase.await;
        }
        drop(permit);
    }
}

/// What follows a login, in a form small enough to keep beside a serving client.
enum Next<'a> {
    /// A logged-in client.
    Serve(Box<Client<'a>>),
    /// The admin console (it sends its own welcome), with its connection slots.
    Admin(Box<(Login, Admission)>),
    /// The login failed: the client is told why.
    Fail(Box<SessionError>),
    /// A connection that only carried a CancelRequest.
    Done,
}

/// The `application_name` startup parameter, empty when not given.
pub(crate) fn application_name(params: &[(String, String)]) -> String {
    params
        .iter()
        .find(|(k, _)| k == "application_name")
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// Tells the client why its connection ends, when the protocol still allows it.
async fn report(stream: &Socket, peer: Peer, app: &App, e: SessionError) {
    let Some(code) = e.sqlstate() else {
        debug!(%peer, error = %e, "client connection closed");
        return;
    };
    if matches!(e, SessionError::Protocol(_) | SessionError::Startup(_)) {
        app.metrics.protocol_errors.inc();
    }
    e.count_idle_timeout(&app.metrics);
    info!(%peer, error = %e, sqlstate = code, "client connection closed with error");
    let mut out = BytesMut::with_capacity(256);
    backend::error_response(&mut out, Severity::Fatal, code, &e.to_string(), e.hint());
    let _ = tokio::time::timeout(Duration::from_secs(1), write_all(stream, &out)).await;
}

/// Startup, authentication and the welcome; returns the logged-in client (or admin), or
/// `Next::Done` for a connection that only carried a CancelRequest.
async fn login<'a>(
    stream: &'a mut Socket,
    peer: Peer,
    app: &'a Arc<App>,
    has_slot: bool,
) -> Result<Next<'a>, SessionError> {
    // The per-user and per-address slots this client takes; held until the connection ends.
    let mut admission = Admission::default();
    // The configuration is read once per login; a reload swaps it for later logins.
    let snapshot = app.current();
    let limit = snapshot.config.limits.startup_timeout;
    let login = tokio::time::timeout(limit, async {
        let require = snapshot.config.tls.client_mode == crate::tls::ClientTls::Require;
        let login = match negotiate(stream, snapshot.tls.as_ref(), require).await? {
            Hello::Cancel { pid, key } => {
                // A key unknown here may belong to a client the process being taken over
                // still serves.
                if !app.cancel.cancel(pid, key).await {
                    app.takeover.forward_cancel(pid, key);
                }
                return Ok(None);
            }
            Hello::Login(login) => login,
        };
        if !has_slot {
            app.metrics
                .clients_rejected
                .with_label_values(&["max_clients"])
                .inc();
            return Err(SessionError::TooManyClients(
                snapshot.config.listen.max_clients,
            ));
        }
        if app.shutting_down.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(SessionError::Killed(Kill::ShutdownWhenIdle));
        }
        match authenticate(
            stream,
            &snapshot,
            &login,
            peer,
            &app.limits,
            &app.lookups,
            &mut admission,
        )
        .await
        {
            Ok(keys) => Ok(Some((login, keys))),
            Err(e) => {
                e.count_refusal(&app.metrics);
                Err(e)
            }
        }
    })
    .await
    .map_err(|_| SessionError::StartupTimeout(limit))??;
    let Some((login, keys)) = login else {
        return Ok(Next::Done);
    };
    if is_admin_database(&snapshot, &login) {
        if snapshot.config.admin.users.is_empty() {
            return Err(SessionError::AdminDisabled);
        }
        if !snapshot.config.admin.is_admin(&login.user) {
            return Err(SessionError::NotAdmin(login.user));
        }
        return Ok(Next::Admin(Box::new((login, admission))));
    }

    let pool = app
        .pools
        .get(&login.database, &login.user)
        .ok_or_else(|| SessionError::UnknownDatabase(login.database.clone()))?;
    if let Some(keys) = keys {
        pool.offer_scram_keys(keys);
    }
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
    // Registered before the client can act on ReadyForQuery: a SHUTDOWN, KILL or takeover
    // that follows must find it. One that began before registration is seen through the
    // flag it set first.
    let entry = app.clients.register(NewClient {
        application_name: application_name(&login.params),
        database: pool.database.clone(),
        user: pool.user.clone(),
        addr: peer,
        local_addr: stream.local_addr(),
        admin: false,
        cancel_pid: cancel.pid,
    });
    if app.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
        entry.request_kill(Kill::ShutdownWhenIdle);
    }
    write_all(stream, &out)
        .await
        .map_err(|_| SessionError::ClientGone)?;
    // Mode and tracking are fixed for the client's life; a reload changes them for later logins.
    let settings = pool.settings();
    info!(%peer, user = %login.user, database = %login.database, mode = settings.mode.as_str(), "client logged in");

    let mut session = ClientSession::from_startup(&login.params, &pool.startup_settings);
    session.published = Some(entry.info.clone());
    let seat = Seat {
        cancel,
        entry,
        admission,
    };
    Ok(Next::Serve(Box::new(Client::new(
        stream, app, pool, seat, session, &snapshot,
    ))))
}

/// A logged-in client and what it holds.
struct Client<'a> {
    stream: &'a Socket,
    pool: Arc<Pool>,
    app: &'a App,
    /// This client's line in `SHOW CLIENTS`, kept current through atomics.
    entry: ClientEntry,
    /// The pool's settings this client was admitted under (fixed for its life).
    policy: Policy,
    gauge: ClientGauge,
    cancel: CancelHandle,
    /// `limits.max_message_size` (at most 1 GB: 32 bits keep the client's state smaller).
    max_message: u32,
    /// Idle timeouts, fixed at login like the pool mode.
    idle: IdleTimeouts,
    c2s: ToServer,
    s2c: Flow,
    tracker: Tracker,
    /// The server connection died inside this client's transaction: pgtether answers until
    /// the client ends it.
    aborted: Option<Box<aborted::Aborted>>,
    /// When the current server connection was attached (for the transaction-time histogram).
    attached_at: Option<std::time::Instant>,
    /// The per-user and per-address slots, given back when the client ends.
    _admission: Admission,
}

/// How an active phase ended.
enum Active {
    /// Back to idle.
    Idle,
    /// The session ended.
    End(Result<Ended, SessionError>),
    /// A takeover asked to move the client with its server connection, and it may now.
    HandOver(Box<Lease>),
}

/// How a session ended without error.
#[derive(PartialEq, Eq)]
enum Ended {
    /// The client left.
    Left,
    /// Another pgtether process serves the client now.
    HandedOver,
}

/// What a client is given when it logs in, and gives back when it ends.
struct Seat {
    cancel: CancelHandle,
    entry: ClientEntry,
    admission: Admission,
}

impl<'a> Client<'a> {
    fn new(
        stream: &'a Socket,
        app: &'a App,
        pool: Arc<Pool>,
        seat: Seat,
        session: ClientSession,
        snapshot: &Snapshot,
    ) -> Client<'a> {
        // Mode and tracking are fixed for the client's life; a reload changes them for later
        // logins.
        let settings = pool.settings();
        Client {
            gauge: ClientGauge::new(pool.metrics.clone()),
            app,
            entry: seat.entry,
            policy: Policy {
                mode: settings.mode,
                on_pin: settings.on_pin,
                tracking: settings.track_session_state,
                prepare_unnamed: settings.prepare_unnamed,
            },
            max_message: u32::try_from(snapshot.config.limits.max_message_size).unwrap_or(u32::MAX),
            idle: IdleTimeouts::from_config(&snapshot.config.limits),
            tracker: Tracker::new(session),
            stream,
            pool,
            cancel: seat.cancel,
            c2s: ToServer::default(),
            s2c: Flow::default(),
            aborted: None,
            attached_at: None,
            _admission: seat.admission,
        }
    }
}

impl Client<'_> {
    /// Called before `serve`: a client that logged in while a takeover was starting moves too.
    fn start(&self) {
        if self.app.takeover.is_giving() {
            self.entry.info.request_kill(Kill::HandOver);
        }
    }

    /// Accounts for and logs the end of the session `serve` returned.
    fn finish(&mut self, r: Result<Ended, SessionError>) -> Result<(), SessionError> {
        self.tracker.on_disconnect(&self.pool.metrics);
        let (user, database) = (&self.pool.user, &self.pool.database);
        let peer = self.entry.info.addr;
        match r {
            Ok(Ended::HandedOver) => {
                debug!(%peer, %user, %database, "client handed over to another pgtether process");
                Ok(())
            }
            r => {
                info!(%peer, %user, %database, "client disconnected");
                r.map(|_| ())
            }
        }
    }

    /// Serves the client until it leaves or moves to another process; `held` is the server
    /// connection a client taken over with its session is pinned to. Awaited directly by the
    /// connection's task (no wrapper future): this future is every idle client's state, and
    /// a server connection is always boxed here.
    async fn serve(&mut self, mut held: Option<Box<Lease>>) -> Result<Ended, SessionError> {
        loop {
            if held.is_none() {
                match self.wait_for_work().await {
                    Work::Go => {}
                    Work::Done => return Ok(Ended::Left),
                    // rustls cannot move a TLS session to another process: such a client is
                    // told to reconnect.
                    Work::HandOver if self.stream.is_tls() => {
                        return Err(SessionError::Killed(Kill::ShutdownWhenIdle))
                    }
                    // Rare paths are boxed, so that their futures do not enlarge every idle
                    // client's task.
                    Work::HandOver => match Box::pin(self.hand_over(None)).await {
                        Ok(()) => return Ok(Ended::HandedOver),
                        Err(_) => continue,
                    },
                    Work::Killed(kill) => return Err(SessionError::Killed(kill)),
                    Work::IdleTimeout(limit) => return Err(SessionError::IdleTimeout(limit)),
                }
                if self.aborted.is_some() {
                    if !self.answer_aborted()? {
                        return Ok(Ended::Left);
                    }
                    continue;
                }
            }
            let phase = self.phase(held.take());
            // Taken apart before the next await, so that the (large) outcome is not kept in
            // every idle client's state.
            let conn = match phase.await {
                Active::Idle => continue,
                Active::End(end) => return end,
                Active::HandOver(conn) => conn,
            };
            if self.stream.is_tls() || conn.stream.is_tls() {
                Box::pin(self.finish_server(*conn)).await;
                return Err(SessionError::Killed(Kill::ShutdownWhenIdle));
            }
            match Box::pin(self.hand_over(Some(conn))).await {
                Ok(()) => return Ok(Ended::HandedOver),
                Err(conn) => held = conn,
            }
        }
    }

    /// Everything about a server connection lives in the active phase, boxed, so an idle
    /// client's state is only what it keeps between transactions. A client that must wait for
    /// its connection boxes the wait with the relay (one allocation); one that finds a
    /// connection at once boxes only the (smaller) relay. (A plain function, so that nothing of
    /// this choice is kept in `serve`'s state.)
    fn phase(
        &mut self,
        held: Option<Box<Lease>>,
    ) -> Pin<Box<dyn Future<Output = Active> + Send + '_>> {
        let attached = match held {
            Some(mut conn) => {
                self.attached(&mut conn, std::time::Instant::now());
                Some(Ok(*conn))
            }
            None => self.attach_now(),
        };
        match attached {
            Some(Ok(conn)) => Box::pin(self.active(conn)),
            Some(Err(e)) => Box::pin(std::future::ready(self.attach_failed(e))),
            None => Box::pin(self.attach_and_relay()),
        }
    }

    /// Waits for a server connection, then relays with it.
    async fn attach_and_relay(&mut self) -> Active {
        match self.attach().await {
            Ok(conn) => self.active(conn).await,
            Err(e) => self.attach_failed(e),
        }
    }

    /// Holds an attached server connection until its release.
    async fn active(&mut self, mut conn: Lease) -> Active {
        let ctx = tracker_ctx(self.app, &self.pool, self.policy);
        let server: &mut ServerConn = &mut conn;
        let mut relay = Relay {
            client: self.stream,
            server: &server.stream,
            server_session: &mut server.session,
            c2s: &mut self.c2s,
            s2c: &mut self.s2c,
            tracker: &mut self.tracker,
            ctx: &ctx,
            max_message: self.max_message as usize,
            entry: &self.entry,
            idle: self.idle,
            held: false,
        };
        // KILL ends the relay wherever it is; a shutdown waits for the transaction to end.
        let outcome = relay.run().await;
        self.publish_counts();
        self.publish_session();
        match outcome {
            Outcome::Released => {
                // A cancel on its way would hit the next client's query: wait for it to land.
                let settled = !self.cancel.slot.clear() || self.cancel.slot.settle().await;
                self.detach(conn, settled);
                Active::Idle
            }
            Outcome::HandOver => {
                self.cancel.slot.set(None);
                self.set_idle();
                Active::HandOver(Box::new(conn))
            }
            Outcome::Terminated | Outcome::ClientGone => {
                self.finish_server(conn).await;
                Active::End(Ok(Ended::Left))
            }
            Outcome::ClientProtocol(e) => {
                self.finish_server(conn).await;
                Active::End(Err(protocol_error(e)))
            }
            Outcome::IdleTimeout(kind, limit) => {
                // Rolled back (or closed if replies are outstanding), never returned dirty.
                self.finish_server(conn).await;
                Active::End(Err(SessionError::idle(kind, limit)))
            }
            Outcome::ServerGone => {
                conn.discard();
                self.pool.suspect_all();
                match self.server_lost().await {
                    None => Active::Idle,
                    Some(r) => Active::End(r.map(|()| Ended::Left)),
                }
            }
            Outcome::Killed => {
                // What the relay already passed on goes out; the server connection is mid-way
                // through something and is closed.
                let flush = self.s2c.flush(self.stream);
                let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
                discard_busy(conn);
                self.tracker.detach();
                self.cancel.slot.set(None);
                Active::End(Err(SessionError::Killed(self.entry.kill_requested())))
            }
            Outcome::TransactionInStatementMode => {
                match self.refuse_transaction_block(conn).await {
                    Ok(()) => Active::Idle,
                    Err(e) => Active::End(Err(e)),
                }
            }
        }
    }

    /// Refreshes this client's statement count in `SHOW CLIENTS` after a relay run (its pins
    /// are published by the session record as they change).
    fn publish_session(&self) {
        self.entry
            .set_prepared(self.tracker.session.statements.len());
    }

    fn publish_counts(&mut self) {
        let m = self.gauge.metrics();
        let c = std::mem::take(&mut self.tracker.counts);
        for (count, n) in [
            (Count::Queries, c.queries),
            (Count::Transactions, c.transactions),
            (Count::ReceivedBytes, c.received),
            (Count::SentBytes, c.sent),
        ] {
            if n > 0 {
                m.add(count, n);
            }
        }
    }
}

/// The pool settings a client keeps from its login on.
#[derive(Clone, Copy)]
struct Policy {
    mode: PoolMode,
    on_pin: OnPin,
    tracking: bool,
    prepare_unnamed: bool,
}

/// What the relay and the tracker read about the client's pool. Built from single fields, so
/// that the client's buffers and tracker stay free to borrow mutably beside it.
fn tracker_ctx<'a>(app: &'a App, pool: &'a Pool, policy: Policy) -> Ctx<'a> {
    Ctx {
        registry: &app.statements,
        metrics: &pool.metrics,
        mode: policy.mode,
        on_pin: policy.on_pin,
        tracking: policy.tracking,
        prepare_unnamed: policy.prepare_unnamed,
    }
}

fn protocol_error(e: ProtocolError) -> SessionError {
    SessionError::Protocol(e.to_string())
}

/// Writes all of `bytes` to a socket shared by reference.
pub(crate) async fn write_all(stream: &Socket, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() || stream.has_pending_output() {
        stream.writable().await?;
        if bytes.is_empty() {
            stream.flush_pending()?;
            continue;
        }
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
        assert!(size <= 480, "Client grew to {size} bytes");
    }

    /// The connection's task state is every idle client's other large part: tokio rounds its
    /// cell (this state plus 96 bytes) up to a multiple of 128 bytes, so 288 bytes keep the
    /// cell at 384 (it is 280 in release builds, 288 in debug ones). Past it, look for a value
    /// held across an await (see `run`).
    #[tokio::test]
    async fn idle_client_task_state_stays_small() {
        let app = crate::app::App::for_tests();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let task = super::run(crate::socket::Socket::plain(stream), peer.into(), app, None);
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= 288,
            "the connection's task state grew to {size} bytes"
        );
    }
}
