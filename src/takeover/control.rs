//! The control sockets: `[runtime] control_socket`, where a new process (`--takeover`,
//! SIGUSR2) asks this one for its sessions, and this process's socket in `[runtime]
//! peer_dir`, where a peer that is stopping offers its sessions. Also the two ways this
//! process starts a takeover itself: re-executing its binary (SIGUSR2) and offering its
//! sessions to a peer (SIGTERM).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use super::state::{Msg, STATE_VERSION};
use super::wire::{self, Reader};
use super::{give, take};
use crate::app::App;

/// Listens on `[runtime] control_socket`, if configured.
pub fn listen(app: &Arc<App>) -> io::Result<()> {
    listen_on(app, false)
}

/// Listens on `[runtime] control_socket` in place of the process just taken over, whose
/// socket file is still there.
pub fn listen_replacing(app: &Arc<App>) -> io::Result<()> {
    listen_on(app, true)
}

fn listen_on(app: &Arc<App>, replace: bool) -> io::Result<()> {
    let Some(path) = app.current().config.runtime.control_socket.clone() else {
        return Ok(());
    };
    if replace {
        let _ = std::fs::remove_file(&path);
    }
    let listener = bind(&path)?;
    info!(path = %path.display(), "control socket ready for takeovers");
    tokio::spawn(accept(app.clone(), listener));
    Ok(())
}

/// Listens on a socket of our own in `[runtime] peer_dir`, if configured.
pub fn listen_peer(app: &Arc<App>) -> io::Result<()> {
    let Some(dir) = app.current().config.runtime.peer_dir.clone() else {
        return Ok(());
    };
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("pgtether-{:016x}.sock", rand::random::<u64>()));
    let listener = bind(&path)?;
    let _ = app.takeover.peer_path.set(path.clone());
    info!(path = %path.display(), "peer socket ready");
    tokio::spawn(accept(app.clone(), listener));
    Ok(())
}

/// Fails when a live pgtether already listens on the configured control socket: starting a
/// second one there needs `--takeover`.
pub fn check_not_running(config: &crate::config::Config) -> io::Result<()> {
    match &config.runtime.control_socket {
        Some(path) if std::os::unix::net::UnixStream::connect(path).is_ok() => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "a running pgtether listens on {}; start the new process with --takeover to replace it",
                path.display()
            ),
        )),
        _ => Ok(()),
    }
}

/// Binds a Unix socket only this user may connect to (it hands out client connections). A
/// stale socket file is replaced; a live one belongs to a running pgtether and is an error.
fn bind(path: &Path) -> io::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "a running pgtether listens on {}; start the new process with --takeover to replace it",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn accept(app: Arc<App>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_one(app.clone(), stream));
            }
            Err(e) => {
                warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Why this process will not take part in a takeover now, if it will not.
fn refusal(app: &App, version: u32) -> Option<String> {
    if version != STATE_VERSION {
        return Some(format!(
            "state version {version} is incompatible with this process's version {STATE_VERSION} ({})",
            super::release()
        ));
    }
    if app.takeover.is_giving() || app.takeover.is_taking() {
        return Some("a takeover is already in progress".into());
    }
    if app.shutting_down.load(Ordering::SeqCst) || app.takeover.stopping.load(Ordering::SeqCst) {
        return Some("this process is shutting down".into());
    }
    None
}

async fn serve_one(app: Arc<App>, stream: UnixStream) {
    let mut reader = Reader::default();
    let first = match reader.recv(&stream).await {
        Ok((msg, _)) => msg,
        Err(e) => {
            warn!(error = %e, "control connection failed before its greeting");
            return;
        }
    };
    match first {
        Msg::Hello {
            version,
            pid,
            release,
        } => {
            if let Some(reason) = refusal(&app, version) {
                refuse(&app, &stream, "gave", reason).await;
                return;
            }
            info!(pid, %release, "takeover requested by a new process");
            give::give(app, stream, reader).await;
        }
        Msg::Offer {
            version,
            pid,
            release,
        } => {
            if let Some(reason) = refusal(&app, version) {
                refuse(&app, &stream, "took", reason).await;
                return;
            }
            info!(pid, %release, "a stopping peer offers its sessions");
            let accept = Msg::Accept {
                version: STATE_VERSION,
                pid: std::process::id(),
            };
            let sent = match wire::encode(&accept, 0) {
                Ok(frame) => wire::send(&stream, &frame, &[]).await,
                Err(e) => Err(e),
            };
            if sent.is_ok() {
                take::receive(app, stream, reader, false).await;
            }
        }
        other => {
            refuse(
                &app,
                &stream,
                "gave",
                format!("expected Hello or Offer, got {other:?}"),
            )
            .await
        }
    }
}

async fn refuse(app: &App, stream: &UnixStream, role: &str, reason: String) {
    warn!(%reason, "takeover refused");
    app.metrics
        .takeovers
        .with_label_values(&[role, "refused"])
        .inc();
    if let Ok(frame) = wire::encode(&Msg::Refuse { reason }, 0) {
        let _ = wire::send(stream, &frame, &[]).await;
    }
}

/// SIGTERM with `[runtime] peer_dir`: offers this process's sessions to each live peer in
/// turn. Exits the process once one took everything; returns if none would.
pub async fn hand_to_peer(app: &Arc<App>) {
    let Some(dir) = app.current().config.runtime.peer_dir.clone() else {
        return;
    };
    app.takeover.stopping.store(true, Ordering::SeqCst);
    let own = app.takeover.peer_path.get().cloned();
    if let Some(own) = &own {
        // No peer should offer us anything now.
        let _ = std::fs::remove_file(own);
    }
    for path in peers(&dir, own.as_deref()) {
        let Ok(stream) = UnixStream::connect(&path).await else {
            continue;
        };
        let offer = Msg::Offer {
            version: STATE_VERSION,
            pid: std::process::id(),
            release: super::release(),
        };
        let Ok(frame) = wire::encode(&offer, 0) else {
            return;
        };
        if wire::send(&stream, &frame, &[]).await.is_err() {
            continue;
        }
        let mut reader = Reader::default();
        match reader.recv(&stream).await {
            Ok((Msg::Accept { pid, .. }, _)) => {
                info!(peer = pid, path = %path.display(), "handing sessions to a peer");
                // Returns only if the hand-off failed.
                give::give(app.clone(), stream, reader).await;
            }
            Ok((Msg::Refuse { reason }, _)) => {
                info!(path = %path.display(), %reason, "peer refused our sessions")
            }
            Ok(_) | Err(_) => {}
        }
    }
    info!("no peer took the sessions; shutting down");
}

fn peers(dir: &Path, own: Option<&Path>) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sock") && Some(p.as_path()) != own)
        .collect()
}

/// SIGUSR2: starts this binary again with `--takeover`; the new process takes everything
/// over and this one exits. The binary on disk may be a newer version.
pub fn reexec(app: &Arc<App>) {
    if app.current().config.runtime.control_socket.is_none() {
        warn!("SIGUSR2 ignored: re-executing needs [runtime] control_socket");
        return;
    }
    let exe = match std::env::current_exe() {
        // An upgrade replaced the file: start what is at the path now.
        Ok(p) => PathBuf::from(p.to_string_lossy().trim_end_matches(" (deleted)")),
        Err(e) => {
            warn!(error = %e, "SIGUSR2: cannot find this binary");
            return;
        }
    };
    let mut args: Vec<_> = std::env::args_os().skip(1).collect();
    if !args.iter().any(|a| a == "--takeover") {
        args.push("--takeover".into());
    }
    match tokio::process::Command::new(&exe).args(&args).spawn() {
        Ok(mut child) => {
            info!(exe = %exe.display(), pid = child.id(), "SIGUSR2: started a new process to take over");
            tokio::spawn(async move {
                if let Ok(status) = child.wait().await {
                    warn!(%status, "the process started for the takeover exited; this one goes on serving");
                }
            });
        }
        Err(e) => warn!(error = %e, exe = %exe.display(), "SIGUSR2: cannot start a new process"),
    }
}
