//! The giving side of a takeover: this process hands its listening sockets, then each client
//! at its next transaction boundary, then its idle server connections to the taker, and exits
//! once it holds nothing. Should the taker fail or vanish, everything not yet acknowledged
//! stays here and this process goes on serving as before.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::state::{ListenerKind, Msg};
use super::wire::{self, Reader, WireError};
use super::Handoff;
use crate::app::{Accept, App};
use crate::clients::Kill;
use crate::pool::Pool;
use crate::server::ServerConn;
use crate::statements::Statement;

/// What the taker has not yet acknowledged.
enum Pending {
    Client(oneshot::Sender<bool>),
    Server(Box<ServerConn>, Arc<Pool>),
}

/// Gives everything to the taker at the other end of `stream`, then exits the process.
/// Returns only if the takeover failed, with this process serving again.
pub async fn give(app: Arc<App>, stream: UnixStream, mut reader: Reader) -> WireError {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut giver = Giver {
        app: app.clone(),
        stream,
        next_id: 0,
        pending: HashMap::new(),
        rx,
        moved_statements: Vec::new(),
    };
    let err = match giver.send_listeners(&mut reader).await {
        Ok(()) => {
            app.accept.send_replace(Accept::Paused);
            app.takeover.set_giving(Some(tx));
            info!("takeover: listeners handed over; moving clients at their next transaction boundary");
            app.clients.kill_where(Kill::HandOver, |_| true);
            giver.run(&mut reader).await
        }
        Err(e) => e,
    };
    giver.abort().await;
    warn!(error = %err, "takeover failed; this process goes on serving");
    app.metrics
        .takeovers
        .with_label_values(&["gave", "failed"])
        .inc();
    err
}

struct Giver {
    app: Arc<App>,
    stream: UnixStream,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    rx: mpsc::UnboundedReceiver<Handoff>,
    /// The prepared statements of the clients sent so far. The registry keeps a statement
    /// only while someone holds it, and an idle server connection sent after its last client
    /// left would otherwise be recorded without it: the taker would prepare it again on that
    /// server, and get 42P05 (it already exists there).
    moved_statements: Vec<Arc<Statement>>,
}

impl Giver {
    async fn send_listeners(&mut self, reader: &mut Reader) -> Result<(), WireError> {
        let listeners = self
            .app
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let kinds: Vec<ListenerKind> = listeners.iter().map(|(k, _)| *k).collect();
        let fds: Vec<RawFd> = listeners.iter().map(|(_, l)| l.as_raw_fd()).collect();
        let frame = wire::encode(&Msg::Listeners { kinds }, fds.len())?;
        wire::send(&self.stream, &frame, &fds).await?;
        match reader.recv(&self.stream).await? {
            (Msg::ListenersTaken, _) => Ok(()),
            (Msg::Refuse { reason }, _) => Err(WireError::Malformed(format!("refused: {reason}"))),
            (other, _) => Err(WireError::Malformed(format!(
                "expected ListenersTaken, got {other:?}"
            ))),
        }
    }

    /// Moves clients as they reach a boundary and idle server connections as they appear,
    /// until nothing is left; then exits the process.
    async fn run(&mut self, reader: &mut Reader) -> WireError {
        let started = Instant::now();
        let grace = self.app.current().config.runtime.shutdown_timeout;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut forced = false;
        loop {
            tokio::select! {
                biased;
                msg = reader.recv(&self.stream) => match msg {
                    Ok((msg, _)) => self.answer(msg),
                    Err(e) => return e,
                },
                Some(handoff) = self.rx.recv() => {
                    if let Err(e) = self.send_client(handoff).await {
                        return e;
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = self.send_idle_servers().await {
                        return e;
                    }
                    if self.app.clients.is_empty() && self.pending.is_empty() {
                        return self.finish().await;
                    }
                    if !forced && started.elapsed() >= grace {
                        // Clients still inside a transaction after shutdown_timeout are
                        // closed, as a graceful shutdown would.
                        forced = true;
                        let n = self.app.clients.kill_where(Kill::ShutdownNow, |_| true);
                        warn!(clients = n, "takeover: closing clients still in a transaction after shutdown_timeout");
                    }
                }
            }
        }
    }

    fn answer(&mut self, msg: Msg) {
        match msg {
            Msg::Ack { id } => match self.pending.remove(&id) {
                Some(Pending::Client(done)) => {
                    self.count("client");
                    let _ = done.send(true);
                }
                Some(Pending::Server(conn, _)) => {
                    self.count("server");
                    // The taker has its own copy now; closing ours does not close the socket.
                    drop(conn);
                }
                None => {}
            },
            Msg::Nack { id, reason } => {
                warn!(%reason, "takeover: the new process could not take a session; it stays here");
                match self.pending.remove(&id) {
                    Some(Pending::Client(done)) => {
                        let _ = done.send(false);
                    }
                    Some(Pending::Server(conn, pool)) => pool.adopt_idle(*conn),
                    None => {}
                }
            }
            Msg::Cancel { pid, key } => {
                let app = self.app.clone();
                tokio::spawn(async move { app.cancel.cancel(pid, key).await });
            }
            other => warn!(message = ?other, "takeover: unexpected message ignored"),
        }
    }

    fn count(&self, kind: &str) {
        self.app
            .metrics
            .handed_over
            .with_label_values(&[kind, "sent"])
            .inc();
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    async fn send_client(&mut self, h: Handoff) -> Result<(), WireError> {
        let registry = &self.app.statements;
        self.moved_statements.extend(
            h.client
                .session
                .statements
                .iter()
                .filter_map(|(_, st)| registry.get(st.id)),
        );
        let id = self.id();
        let mut fds: Vec<OwnedFd> = vec![h.client_fd];
        let server = h.server.map(|(record, fd)| {
            fds.push(fd);
            record
        });
        let msg = Msg::Client {
            id,
            client: h.client,
            server,
        };
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let frame = match wire::encode(&msg, raw.len()) {
            Ok(f) => f,
            Err(_) => {
                let _ = h.done.send(false);
                return Ok(());
            }
        };
        self.pending.insert(id, Pending::Client(h.done));
        // Our duplicates close once sent; the client's task keeps its own until the Ack.
        wire::send(&self.stream, &frame, &raw).await
    }

    async fn send_idle_servers(&mut self) -> Result<(), WireError> {
        for pool in self.app.pools.all() {
            for conn in pool.take_idle() {
                if conn.stream.is_tls() {
                    // rustls cannot move a TLS session to another process: closed here.
                    continue;
                }
                let id = self.id();
                let msg = Msg::Server {
                    id,
                    database: pool.database.to_string(),
                    user: pool.user.to_string(),
                    server: Box::new(conn.export(&self.app.statements)),
                };
                let frame = wire::encode(&msg, 1)?;
                let fd = conn.stream.as_raw_fd();
                self.pending
                    .insert(id, Pending::Server(Box::new(conn), pool.clone()));
                wire::send(&self.stream, &frame, &[fd]).await?;
            }
        }
        Ok(())
    }

    /// Everything moved: tell the taker and exit.
    async fn finish(&mut self) -> WireError {
        let frame = match wire::encode(&Msg::Done, 0) {
            Ok(f) => f,
            Err(e) => return e,
        };
        if let Err(e) = wire::send(&self.stream, &frame, &[]).await {
            return e;
        }
        self.app
            .metrics
            .takeovers
            .with_label_values(&["gave", "completed"])
            .inc();
        info!("takeover complete: the new process serves every session; exiting");
        std::process::exit(0);
    }

    /// The taker failed: keep or take back everything it did not acknowledge.
    async fn abort(&mut self) {
        self.app.takeover.set_giving(None);
        self.app.clients.cancel_hand_over();
        while let Ok(h) = self.rx.try_recv() {
            let _ = h.done.send(false);
        }
        for (_, p) in self.pending.drain() {
            match p {
                Pending::Client(done) => {
                    let _ = done.send(false);
                }
                Pending::Server(conn, pool) => pool.adopt_idle(*conn),
            }
        }
        if *self.app.accept.borrow() == Accept::Paused {
            self.app.accept.send_replace(Accept::Open);
        }
    }
}
