//! Moving a client between pgtether processes (a takeover or a peer hand-off): handing a
//! client (and the server connection it is pinned to) to the giver's queue at a transaction
//! boundary, and serving a client another process handed over.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

use super::state::ClientSession;
use super::{application_name, report, Client, Seat, SessionError};
use crate::app::App;
use crate::clients::NewClient;
use crate::pool::Lease;
use crate::server::ServerConn;
use crate::socket::Socket;
use crate::takeover::state::{ClientRecord, ServerRecord, UpstreamKeys};
use crate::takeover::Handoff;

/// Serves a client handed over by another pgtether process (a takeover): its socket, its
/// session, and the server connection it is pinned to, if any. Called once the taker owns
/// the sockets; never fails, a client that cannot be served here is told why.
pub fn adopt(
    app: &Arc<App>,
    state: Box<ClientRecord>,
    client_fd: OwnedFd,
    server: Option<(Box<ServerRecord>, OwnedFd)>,
) -> std::io::Result<()> {
    let stream = Socket::adopt(client_fd)?;
    let max_statements = app.current().config.pool.max_prepared_statements;
    let server = server
        .map(|(st, fd)| ServerConn::adopt(*st, fd, &app.statements, max_statements))
        .transpose()?;
    let permit = app.client_slots.clone().try_acquire_owned().ok();
    // Spread over the worker threads like accepted clients; a pinned server connection
    // moves to its client's thread when the client first uses it.
    let app = app.clone();
    crate::workers::spawn_client(stream, move |stream| {
        run_adopted(stream, app, permit, state, server)
    });
    Ok(())
}

async fn run_adopted(
    stream: Socket,
    app: Arc<App>,
    permit: Option<OwnedSemaphorePermit>,
    state: Box<ClientRecord>,
    server: Option<ServerConn>,
) {
    let peer = state.peer;
    let result = if state.admin {
        // Boxed: a console's future must not enlarge every adopted client's task.
        Box::pin(crate::admin::serve_adopted(&stream, &app, state)).await
    } else {
        adopted_client(&stream, &app, state, server).await
    };
    if let Err(e) = result {
        let phase = Box::pin(report(&stream, peer, &app, e));
        phase.await;
    }
    drop(permit);
}

/// A client session another process handed over, served to its end.
async fn adopted_client(
    stream: &Socket,
    app: &Arc<App>,
    mut state: Box<ClientRecord>,
    server: Option<ServerConn>,
) -> Result<(), SessionError> {
    let peer = state.peer;
    match app.pools.get(&state.database, &state.user) {
        None => Err(SessionError::UnknownDatabase(state.database.clone())),
        Some(pool) => {
            if let Some(keys) = state.upstream_keys.take().and_then(UpstreamKeys::into_keys) {
                pool.offer_scram_keys(keys);
            }
            let snapshot = app.current();
            let cancel = app
                .cancel
                .register_exact(state.cancel_pid, state.cancel_key);
            let entry = app.clients.register(NewClient {
                application_name: application_name(&state.params),
                database: pool.database.clone(),
                user: pool.user.clone(),
                addr: peer,
                local_addr: stream.local_addr(),
                admin: false,
                cancel_pid: cancel.pid,
            });
            let mut session = ClientSession::import(state.session, &app.statements);
            session.published = Some(entry.info.clone());
            entry.info.set_pins(&session.pins().reasons());
            if session.pins().is_pinned() {
                pool.metrics.pinned_clients.inc();
            }
            entry.set_prepared(session.statements.len());
            let held = server.map(|conn| Box::new(pool.adopt_leased(conn)));
            let seat = Seat {
                cancel,
                entry,
                admission: app.limits.adopt(peer.ip(), &state.user),
            };
            let mut client = Client::new(stream, app, pool, seat, session, &snapshot);
            client.c2s.restore_input(&state.pending_input);
            debug!(%peer, "client taken over from another pgtether process");
            client.start();
            let r = client.serve(held).await;
            client.finish(r)
        }
    }
}

impl Client<'_> {
    /// Moves this client (and the server connection it is pinned to) to the process taking
    /// over. On failure the client stays here and gets its connection back.
    pub(super) async fn hand_over(
        &mut self,
        server: Option<Box<Lease>>,
    ) -> Result<(), Option<Box<Lease>>> {
        self.entry.info.cancel_hand_over();
        let server_part = match &server {
            Some(conn) => match conn.stream.as_fd().try_clone_to_owned() {
                Ok(fd) => Some((Box::new(conn.export(&self.app.statements)), fd)),
                Err(_) => return Err(server),
            },
            None => None,
        };
        let info = &self.entry.info;
        let state = Box::new(ClientRecord {
            user: self.pool.user.to_string(),
            database: self.pool.database.to_string(),
            peer: info.addr,
            params: vec![("application_name".into(), info.application_name.clone())],
            cancel_pid: self.cancel.pid,
            cancel_key: self.cancel.key,
            session: self.tracker.session.export(),
            pending_input: self.c2s.input_bytes().to_vec(),
            upstream_keys: self.pool.scram_keys().as_ref().map(UpstreamKeys::from),
            admin: false,
        });
        if !send_to_taker(self.app, self.stream, state, server_part).await {
            return Err(server);
        }
        if let Some(conn) = server {
            // The other process owns the connection now: close this copy without a word.
            conn.discard();
        }
        Ok(())
    }
}

/// Queues a client's socket and record (with its server connection's, if pinned) for the
/// process taking over; true once that process owns them, and this one then closes its
/// copies without a word.
pub async fn send_to_taker(
    app: &App,
    stream: &Socket,
    record: Box<ClientRecord>,
    server: Option<(Box<ServerRecord>, OwnedFd)>,
) -> bool {
    let Ok(client_fd) = stream.as_fd().try_clone_to_owned() else {
        return false;
    };
    let (done, moved) = tokio::sync::oneshot::channel();
    let handoff = Handoff {
        client: record,
        client_fd,
        server,
        done,
    };
    if app.takeover.submit(handoff).is_err() {
        return false;
    }
    moved.await == Ok(true)
}
