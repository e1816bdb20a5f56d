//! Running pgtether: bind the sockets, accept clients, start the background tasks, stop on a
//! signal.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::app::App;
use crate::config::Config;
use crate::{http, session};

/// Addresses actually bound (the config may ask for port 0).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub listen: SocketAddr,
    pub http: Option<SocketAddr>,
}

/// Binds the listeners and spawns the accept loops; returns at once.
pub async fn start(config: Config) -> std::io::Result<(Arc<App>, Bound)> {
    let listener = TcpListener::bind(config.listen.addr).await?;
    let http_listener = match config.http.addr {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let bound = Bound {
        listen: listener.local_addr()?,
        http: http_listener.as_ref().map(|l| l.local_addr()).transpose()?,
    };
    let app = App::new(config);
    tokio::spawn(app.pools.clone().maintenance_loop());
    tokio::spawn(accept_loop(listener, app.clone()));
    app.ready.store(true, Ordering::Relaxed);
    // Serve HTTP only once ready is set: the client port already accepts (it is bound above),
    // so a /readyz probe must not see 503 while clients are being served.
    if let Some(l) = http_listener {
        tokio::spawn(http::serve(l, app.clone()));
    }
    info!(listen = %bound.listen, http = ?bound.http, "pgtether is accepting connections");
    Ok((app, bound))
}

async fn accept_loop(listener: TcpListener, app: Arc<App>) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = app.stop_accepting.notified() => {
                info!("no longer accepting connections");
                return; // drops the listening socket: new connections are refused
            }
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

/// Stops the process the way `stop` asks; does not return.
pub async fn stop(app: Arc<App>, stop: Stop) -> ! {
    let grace = match stop {
        Stop::Graceful => app.current().config.runtime.shutdown_timeout,
        Stop::Fast => Duration::ZERO,
    };
    crate::admin::control::drain_and_exit(app, grace).await;
    unreachable!("drain_and_exit exits the process")
}
