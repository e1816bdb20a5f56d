//! Running pgtether: bind the sockets, accept clients, start the background tasks, stop on a
//! signal.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::app::{Accept, App};
use crate::config::Config;
use crate::takeover::state::ListenerKind;
use crate::{http, session};

/// Addresses actually bound (the config may ask for port 0).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub listen: SocketAddr,
    pub http: Option<SocketAddr>,
}

/// Binds the listeners and spawns the accept loops; returns at once.
pub async fn start(config: Config) -> std::io::Result<(Arc<App>, Bound)> {
    start_with(config, Vec::new()).await
}

/// Like [`start`], with listening sockets inherited from a process being taken over: one
/// whose address is the configured one is used instead of binding, and every inherited one
/// is accepted on, so that connections already queued on it are served.
pub async fn start_with(
    config: Config,
    inherited: Vec<(ListenerKind, std::net::TcpListener)>,
) -> std::io::Result<(Arc<App>, Bound)> {
    let mut inherited_pg = Vec::new();
    let mut inherited_http = Vec::new();
    for (kind, l) in inherited {
        l.set_nonblocking(true)?;
        let l = Arc::new(TcpListener::from_std(l)?);
        match kind {
            ListenerKind::Postgres => inherited_pg.push(l),
            ListenerKind::Http => inherited_http.push(l),
        }
    }
    let listener = match take_matching(&mut inherited_pg, config.listen.addr) {
        Some(l) => l,
        None => Arc::new(bind(config.listen.addr, config.listen.reuse_port)?),
    };
    let http_listener = match config.http.addr {
        Some(addr) => Some(match take_matching(&mut inherited_http, addr) {
            Some(l) => l,
            None => Arc::new(bind(addr, false)?),
        }),
        None => None,
    };
    let bound = Bound {
        listen: listener.local_addr()?,
        http: http_listener.as_ref().map(|l| l.local_addr()).transpose()?,
    };
    let app = App::new(config);
    tokio::spawn(app.pools.clone().maintenance_loop());
    {
        let app = Arc::downgrade(&app);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(15));
            loop {
                tick.tick().await;
                let Some(app) = app.upgrade() else { return };
                app.lookups.maintain();
            }
        });
    }
    for l in std::iter::once(listener).chain(inherited_pg) {
        spawn_accept_loop(&app, l);
    }
    app.ready.store(true, Ordering::Relaxed);
    // Serve HTTP only once ready is set: the client port already accepts (it is bound above),
    // so a /readyz probe must not see 503 while clients are being served.
    for l in http_listener.into_iter().chain(inherited_http) {
        spawn_http(&app, l);
    }
    info!(listen = %bound.listen, http = ?bound.http, "pgtether is accepting connections");
    Ok((app, bound))
}

/// Accepts clients on `listener` (also one received from a peer) and offers it to later
/// takeovers.
pub fn spawn_accept_loop(app: &Arc<App>, listener: Arc<TcpListener>) {
    lock(&app.listeners).push((ListenerKind::Postgres, listener.clone()));
    tokio::spawn(accept_loop(listener, app.clone()));
}

/// Serves HTTP on `listener` and offers it to later takeovers.
pub fn spawn_http(app: &Arc<App>, listener: Arc<TcpListener>) {
    lock(&app.listeners).push((ListenerKind::Http, listener.clone()));
    tokio::spawn(http::serve(listener, app.clone()));
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn take_matching(list: &mut Vec<Arc<TcpListener>>, addr: SocketAddr) -> Option<Arc<TcpListener>> {
    let i = list
        .iter()
        .position(|l| l.local_addr().is_ok_and(|a| a == addr))?;
    Some(list.remove(i))
}

/// Binds a listening socket; with `reuse_port`, several processes (peers in one pod) may
/// listen on the same port and the kernel spreads connections between them.
fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Waits until the accept loops may accept; false once they must close.
pub async fn accepting(state: &mut tokio::sync::watch::Receiver<Accept>) -> bool {
    loop {
        let now = *state.borrow_and_update();
        match now {
            Accept::Open => return true,
            Accept::Closed => return false,
            Accept::Paused => {
                if state.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}

async fn accept_loop(listener: Arc<TcpListener>, app: Arc<App>) {
    let mut state = app.accept.subscribe();
    loop {
        if !accepting(&mut state).await {
            info!("no longer accepting connections");
            // The socket closes once the takeover's copy (if any) is gone too.
            return;
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = state.changed() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        crate::server::set_keepalive(&stream);
        let permit = app.client_slots.clone().try_acquire_owned().ok();
        tokio::spawn(session::run(stream, peer, app.clone(), permit));
    }
}

/// How the process was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: stop accepting, let transactions finish, close idle clients with 57P01.
    Graceful,
    /// SIGINT: stop now.
    Fast,
}

/// Waits for SIGINT or SIGTERM.
pub async fn shutdown_signal() -> Stop {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handlers can be installed");
    let mut int = signal(SignalKind::interrupt()).expect("signal handlers can be installed");
    tokio::select! {
        _ = term.recv() => {
            info!("SIGTERM received, shutting down gracefully");
            Stop::Graceful
        }
        _ = int.recv() => {
            info!("SIGINT received, shutting down");
            Stop::Fast
        }
    }
}

/// SIGUSR2 starts a new process of this binary that takes everything over.
pub fn reexec_on_usr2(app: &Arc<App>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
        return;
    };
    let app = app.clone();
    tokio::spawn(async move {
        while usr2.recv().await.is_some() {
            info!("SIGUSR2 received: re-executing to take over");
            crate::takeover::control::reexec(&app);
        }
    });
}

/// Stops the process the way `stop` asks; does not return. A graceful stop first offers
/// the sessions to a live peer (`[runtime] peer_dir`).
pub async fn stop(app: Arc<App>, stop: Stop) -> ! {
    if stop == Stop::Graceful {
        crate::takeover::control::hand_to_peer(&app).await;
    }
    let grace = match stop {
        Stop::Graceful => app.current().config.runtime.shutdown_timeout,
        Stop::Fast => Duration::ZERO,
    };
    crate::admin::control::drain_and_exit(app, grace).await;
    unreachable!("drain_and_exit exits the process")
}
