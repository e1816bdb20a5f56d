//! Running pgtether: bind the sockets, accept clients, start the background tasks, stop on a
//! signal.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tracing::{info, warn};

use crate::app::{Accept, App};
use crate::config::Config;
use crate::peer::Peer;
use crate::socket::Socket;
use crate::takeover::state::ListenerKind;
use crate::{http, session};

/// Addresses actually bound (the config may ask for port 0).
#[derive(Debug, Clone)]
pub struct Bound {
    pub listen: SocketAddr,
    pub http: Option<SocketAddr>,
    /// The Unix-domain socket's path, when `[listen] unix_socket_dir` is set.
    pub unix: Option<PathBuf>,
}

/// A socket clients connect to: TCP, or Unix-domain (`[listen] unix_socket_dir`).
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// A listening socket handed over by another process; its address family says which.
    pub fn adopt(fd: OwnedFd) -> io::Result<Listener> {
        if crate::socket::is_unix(&fd) {
            let l = std::os::unix::net::UnixListener::from(fd);
            l.set_nonblocking(true)?;
            Ok(Listener::Unix(UnixListener::from_std(l)?))
        } else {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)?;
            Ok(Listener::Tcp(TcpListener::from_std(l)?))
        }
    }

    /// The next client, with its socket options set.
    async fn accept(&self) -> io::Result<(Socket, Peer)> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                crate::server::set_keepalive(&stream);
                Ok((Socket::plain(stream), Peer::Tcp(peer)))
            }
            Listener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                Ok((Socket::unix(stream), Peer::Unix))
            }
        }
    }

    fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(_) => None,
        }
    }

    fn unix_path(&self) -> Option<PathBuf> {
        match self {
            Listener::Tcp(_) => None,
            Listener::Unix(l) => l.local_addr().ok()?.as_pathname().map(Path::to_path_buf),
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }
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
    inherited: Vec<(ListenerKind, OwnedFd)>,
) -> std::io::Result<(Arc<App>, Bound)> {
    let mut inherited_pg = Vec::new();
    let mut inherited_http = Vec::new();
    for (kind, fd) in inherited {
        match (kind, Listener::adopt(fd)?) {
            (ListenerKind::Postgres, l) => inherited_pg.push(Arc::new(l)),
            (ListenerKind::Http, Listener::Tcp(l)) => inherited_http.push(Arc::new(l)),
            (ListenerKind::Http, Listener::Unix(_)) => {
                warn!("takeover: ignoring a Unix-domain socket handed over as the HTTP listener")
            }
        }
    }
    let listen = config.listen.addr;
    let listener = match take_matching(&mut inherited_pg, |l| l.tcp_addr() == Some(listen)) {
        Some(l) => l,
        None => Arc::new(Listener::Tcp(bind(listen, config.listen.reuse_port)?)),
    };
    let http_listener = match config.http.addr {
        Some(addr) => Some(
            match take_matching(&mut inherited_http, |l| l.local_addr().ok() == Some(addr)) {
                Some(l) => l,
                None => Arc::new(bind(addr, false)?),
            },
        ),
        None => None,
    };
    let listen = listener.tcp_addr().ok_or(io::ErrorKind::AddrNotAvailable)?;
    let unix_listener = match &config.listen.unix_socket_dir {
        Some(dir) => {
            let path = crate::socket::unix_socket_path(dir, listen.port());
            match take_matching(&mut inherited_pg, |l| l.unix_path().as_ref() == Some(&path)) {
                Some(l) => Some(l),
                None => {
                    bind_unix(&path, config.listen.reuse_port)?.map(|l| Arc::new(Listener::Unix(l)))
                }
            }
        }
        None => None,
    };
    let bound = Bound {
        listen,
        http: http_listener.as_ref().map(|l| l.local_addr()).transpose()?,
        unix: unix_listener.as_ref().and_then(|l| l.unix_path()),
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
    for l in std::iter::once(listener)
        .chain(unix_listener)
        .chain(inherited_pg)
    {
        spawn_accept_loop(&app, l);
    }
    app.ready.store(true, Ordering::Relaxed);
    // Serve HTTP only once ready is set: the client port already accepts (it is bound above),
    // so a /readyz probe must not see 503 while clients are being served.
    for l in http_listener.into_iter().chain(inherited_http) {
        spawn_http(&app, l);
    }
    info!(listen = %bound.listen, unix = ?bound.unix, http = ?bound.http, "pgtether is accepting connections");
    Ok((app, bound))
}

/// Accepts clients on `listener` (also one received from a peer) and offers it to later
/// takeovers.
pub fn spawn_accept_loop(app: &Arc<App>, listener: Arc<Listener>) {
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

fn take_matching<L>(list: &mut Vec<Arc<L>>, matches: impl Fn(&L) -> bool) -> Option<Arc<L>> {
    let i = list.iter().position(|l| matches(l))?;
    Some(list.remove(i))
}

/// Binds the Unix-domain socket at `path`, readable and writable by everyone (like
/// PostgreSQL's default; the login decides who gets in). A socket file left by a process
/// that is gone is replaced; one a live process answers on is an error, except for peers
/// (`reuse_port`): the peer serving it hands it over when it stops, so `None` is returned.
fn bind_unix(path: &Path, reuse_port: bool) -> io::Result<Option<UnixListener>> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            if reuse_port {
                info!(path = %path.display(), "a peer serves the Unix-domain socket; it hands it over when it stops");
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by another process; stop it or choose another [listen] unix_socket_dir or port", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    use std::os::unix::fs::PermissionsExt;
    let bound = UnixListener::bind(path).and_then(|l| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
        Ok(l)
    });
    // The bare error ("No such file or directory") would not say which path.
    bound
        .map(Some)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
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

async fn accept_loop(listener: Arc<Listener>, app: Arc<App>) {
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
        let permit = app.client_slots.clone().try_acquire_owned().ok();
        let app = app.clone();
        crate::workers::spawn_client(stream, move |stream| {
            session::run(stream, peer, app, permit)
        });
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
