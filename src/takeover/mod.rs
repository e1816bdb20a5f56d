//! Takeover: moving live sessions from one pgtether process to another, so that restarts,
//! upgrades and pod evictions go unnoticed by clients.
//!
//! Two processes meet on a control Unix socket ([`control`]). The giver ([`give`]) sends its
//! listening sockets, then each client at its next transaction boundary (its socket, its
//! session state and cancel key, and its server connection if it is pinned or in session
//! mode), then its idle server connections; the taker ([`take`]) adopts each and
//! acknowledges it. The giver closes its copy of a socket only after the acknowledgement, so
//! a taker that dies mid-way leaves the giver serving everyone it has not yet handed over.
//!
//! This module owns the hub through which a giver's client tasks submit themselves.

pub mod control;
pub mod give;
pub mod state;
pub mod take;
pub mod wire;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, OnceLock};

use tokio::sync::{mpsc, oneshot};

use state::{ClientRecord, ServerRecord};

/// What a client task gives the giver: its state and duplicates of its sockets.
pub struct Handoff {
    pub client: Box<ClientRecord>,
    pub client_fd: OwnedFd,
    pub server: Option<(Box<ServerRecord>, OwnedFd)>,
    /// True once the taker owns the client: the task then ends without a word to it.
    pub done: oneshot::Sender<bool>,
}

/// Takeover state shared by every task of the process.
#[derive(Default)]
pub struct Hub {
    /// Set while this process hands its sessions over.
    giving: Mutex<Option<mpsc::UnboundedSender<Handoff>>>,
    /// Set while this process takes sessions over: cancel requests for clients the giver
    /// still serves go there.
    taking: Mutex<Option<mpsc::UnboundedSender<(i32, i32)>>>,
    /// SIGTERM arrived: offers from peers are refused.
    pub stopping: AtomicBool,
    /// This process's socket in `[runtime] peer_dir`.
    pub peer_path: OnceLock<PathBuf>,
}

impl Hub {
    pub fn is_giving(&self) -> bool {
        self.giving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    pub fn is_taking(&self) -> bool {
        self.taking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Queues a client for the taker; gives it back when no takeover is under way.
    pub fn submit(&self, handoff: Handoff) -> Result<(), Handoff> {
        let giving = self.giving.lock().unwrap_or_else(|e| e.into_inner());
        match giving.as_ref() {
            Some(tx) => tx.send(handoff).map_err(|e| e.0),
            None => Err(handoff),
        }
    }

    /// Forwards a cancel request for a key this process does not know to the process it is
    /// taking over from. False when there is none.
    pub fn forward_cancel(&self, pid: i32, key: i32) -> bool {
        let taking = self.taking.lock().unwrap_or_else(|e| e.into_inner());
        taking
            .as_ref()
            .is_some_and(|tx| tx.send((pid, key)).is_ok())
    }

    fn set_giving(&self, tx: Option<mpsc::UnboundedSender<Handoff>>) {
        *self.giving.lock().unwrap_or_else(|e| e.into_inner()) = tx;
    }

    fn set_taking(&self, tx: Option<mpsc::UnboundedSender<(i32, i32)>>) {
        *self.taking.lock().unwrap_or_else(|e| e.into_inner()) = tx;
    }
}

/// Name and version of this build, exchanged in the greeting.
pub fn release() -> String {
    format!("pgtether {}", env!("CARGO_PKG_VERSION"))
}
