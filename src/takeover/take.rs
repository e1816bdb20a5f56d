//! The taking side of a takeover: a new process (`--takeover`, SIGUSR2) or a peer adopts the
//! giver's listening sockets, clients and server connections, acknowledging each only once
//! it owns it.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::state::{ListenerKind, Msg, STATE_VERSION};
use super::wire::{self, Reader, WireError};
use crate::app::App;
use crate::config::Config;
use crate::listener::{self, Bound};
use crate::server::ServerConn;
use crate::session;

#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    #[error("--takeover needs [runtime] control_socket in the configuration (the running process's control socket)")]
    NoControlSocket,
    #[error("cannot reach the running pgtether at {path}: {source}; is it running with this control_socket?")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("the running pgtether refused the takeover: {0}; it goes on serving")]
    Refused(String),
    #[error("takeover failed: {0}; the running pgtether goes on serving")]
    Wire(#[from] WireError),
    #[error("cannot listen on the inherited sockets: {0}")]
    Listen(std::io::Error),
}

/// `pgtether --takeover`: asks the running process for its sessions and starts serving with
/// its listening sockets. The sessions arrive in the background.
pub async fn takeover(config: Config) -> Result<(Arc<App>, Bound), TakeError> {
    let path = config
        .runtime
        .control_socket
        .clone()
        .ok_or(TakeError::NoControlSocket)?;
    let stream = UnixStream::connect(&path)
        .await
        .map_err(|source| TakeError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    let hello = Msg::Hello {
        version: STATE_VERSION,
        pid: std::process::id(),
        release: super::release(),
    };
    wire::send(&stream, &wire::encode(&hello, 0)?, &[]).await?;
    let mut reader = Reader::default();
    let (kinds, fds) = match reader.recv(&stream).await? {
        (Msg::Listeners { kinds }, fds) => (kinds, fds),
        (Msg::Refuse { reason }, _) => return Err(TakeError::Refused(reason)),
        (other, _) => {
            return Err(WireError::Malformed(format!("expected Listeners, got {other:?}")).into())
        }
    };
    fault("after-listeners");
    let inherited = kinds.into_iter().zip(fds).collect();
    let (app, bound) = listener::start_with(config, inherited)
        .await
        .map_err(TakeError::Listen)?;
    wire::send(&stream, &wire::encode(&Msg::ListenersTaken, 0)?, &[]).await?;
    info!("takeover: serving on the inherited sockets; receiving sessions");
    tokio::spawn(receive(app.clone(), stream, reader, true));
    Ok((app, bound))
}

/// Test hook: `PGTETHER_TAKEOVER_FAULT=<point>` makes a taking process die at that point, as
/// a crash would, so tests can show the giver keeps serving.
fn fault(point: &str) {
    if std::env::var("PGTETHER_TAKEOVER_FAULT").is_ok_and(|v| v == point) {
        eprintln!("pgtether: PGTETHER_TAKEOVER_FAULT={point}: exiting as if crashed");
        std::process::exit(70);
    }
}

/// Adopts what the giver sends until it says it is done (or goes away).
/// `owns_control_socket`: this process replaces the giver on its control socket (a takeover,
/// not a peer hand-off).
pub async fn receive(
    app: Arc<App>,
    stream: UnixStream,
    mut reader: Reader,
    owns_control_socket: bool,
) {
    let (cancel_tx, mut cancels) = mpsc::unbounded_channel();
    app.takeover.set_taking(Some(cancel_tx));
    let mut clients = 0u64;
    let result = loop {
        tokio::select! {
            msg = reader.recv(&stream) => {
                let (msg, fds) = match msg {
                    Ok(m) => m,
                    Err(e) => break Err(e),
                };
                let reply = match msg {
                    Msg::Done => break Ok(()),
                    Msg::Listeners { kinds } => {
                        // A peer's sockets (SO_REUSEPORT): accept on them too, so connections
                        // already queued there are served.
                        adopt_listeners(&app, kinds, fds);
                        Msg::ListenersTaken
                    }
                    Msg::Client { id, client, server } => {
                        fault("before-client-ack");
                        let mut fds = fds.into_iter();
                        let client_fd = fds.next();
                        let server = match (server, fds.next()) {
                            (Some(record), Some(fd)) => Some((record, fd)),
                            _ => None,
                        };
                        match client_fd.map(|fd| session::adopt(&app, client, fd, server)) {
                            Some(Ok(())) => {
                                clients += 1;
                                count(&app, "client");
                                Msg::Ack { id }
                            }
                            Some(Err(e)) => Msg::Nack { id, reason: e.to_string() },
                            None => Msg::Nack { id, reason: "no socket came with the client".into() },
                        }
                    }
                    Msg::Server { id, database, user, server } => {
                        adopt_server(&app, &database, &user, *server, fds);
                        Msg::Ack { id }
                    }
                    other => {
                        warn!(message = ?other, "takeover: unexpected message ignored");
                        continue;
                    }
                };
                if let Err(e) = send(&stream, &reply).await {
                    break Err(e);
                }
            }
            Some((pid, key)) = cancels.recv() => {
                if let Err(e) = send(&stream, &Msg::Cancel { pid, key }).await {
                    break Err(e);
                }
            }
        }
    };
    app.takeover.set_taking(None);
    match result {
        Ok(()) => {
            app.metrics
                .takeovers
                .with_label_values(&["took", "completed"])
                .inc();
            info!(
                clients,
                "takeover complete: the previous process has exited"
            );
        }
        Err(e) => {
            app.metrics
                .takeovers
                .with_label_values(&["took", "failed"])
                .inc();
            warn!(error = %e, clients, "takeover: the previous process went away before it was done; it serves whatever it did not hand over");
        }
    }
    // The control socket is ours now (the giver kept it until it was done).
    if owns_control_socket {
        if let Err(e) = super::control::listen_replacing(&app) {
            warn!(error = %e, "cannot listen on the control socket; later takeovers will fail");
        }
    }
}

async fn send(stream: &UnixStream, msg: &Msg) -> Result<(), WireError> {
    wire::send(stream, &wire::encode(msg, 0)?, &[]).await
}

fn count(app: &App, kind: &str) {
    app.metrics
        .handed_over
        .with_label_values(&[kind, "received"])
        .inc();
}

fn adopt_listeners(app: &Arc<App>, kinds: Vec<ListenerKind>, fds: Vec<OwnedFd>) {
    for (kind, fd) in kinds.into_iter().zip(fds) {
        if kind != ListenerKind::Postgres {
            continue;
        }
        match listener::Listener::adopt(fd) {
            Ok(l) => listener::spawn_accept_loop(app, Arc::new(l)),
            Err(e) => warn!(error = %e, "takeover: cannot accept on a peer's socket"),
        }
    }
}

fn adopt_server(
    app: &App,
    database: &str,
    user: &str,
    record: super::state::ServerRecord,
    fds: Vec<OwnedFd>,
) {
    let (Some(pool), Some(fd)) = (app.pools.get(database, user), fds.into_iter().next()) else {
        // Not a pool of this configuration: the connection closes with our copy.
        return;
    };
    let max = pool.settings().max_prepared_statements;
    match ServerConn::adopt(record, fd, &app.statements, max) {
        Ok(conn) => {
            count(app, "server");
            pool.adopt_idle(conn);
        }
        Err(e) => warn!(error = %e, "takeover: cannot adopt a server connection"),
    }
}
