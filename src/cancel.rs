//! Cancel keys: each client gets its own BackendKeyData from pgtether; a CancelRequest carrying
//! it is forwarded to whichever server connection that client holds at that moment.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::server::{send_cancel, CancelTarget};

/// The server connection a client is using right now, if any. Written by the client's own task
/// at attach and release; read by cancel requests.
#[derive(Default)]
pub struct CancelSlot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    target: Option<CancelTarget>,
    /// Cancels forwarded to `target` (or to the target before it) that have not yet reached
    /// the server.
    in_flight: u32,
}

/// How long a released server connection waits for cancels on their way to it.
const SETTLE_LIMIT: Duration = Duration::from_secs(6);

impl CancelSlot {
    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set(&self, target: Option<CancelTarget>) {
        self.state().target = target;
    }

    /// Clears the target as the client releases its server connection. True if a cancel for
    /// it is still on its way: PostgreSQL cancels whatever its backend runs when the signal
    /// lands, so until then the connection must not run another client's query.
    pub fn clear(&self) -> bool {
        let mut s = self.state();
        s.target = None;
        s.in_flight > 0
    }

    /// Waits until the cancels forwarded for the released connection have reached the server;
    /// false if they did not within the time `send_cancel` allows itself (the connection is
    /// then closed rather than reused). Polls: cancels are rare, and a waker would cost every
    /// client memory.
    pub async fn settle(&self) -> bool {
        let deadline = Instant::now() + SETTLE_LIMIT;
        while self.state().in_flight > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        true
    }

    /// The target to cancel now, counted in flight until [`CancelSlot::done`].
    fn start(&self) -> Option<CancelTarget> {
        let mut s = self.state();
        if s.target.is_some() {
            s.in_flight += 1;
        }
        s.target
    }

    fn done(&self) {
        let mut s = self.state();
        s.in_flight = s.in_flight.saturating_sub(1);
    }
}

/// Every live client's cancel key. Locked only at login, logout and cancel, never per query.
#[derive(Default)]
pub struct CancelRegistry {
    keys: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
}

/// A client's registration; dropping it retires the key.
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub key: i32,
    pub slot: Arc<CancelSlot>,
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        self.registry
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(self.pid, self.key));
    }
}

impl CancelRegistry {
    /// Issues a fresh, unused (pid, key) pair for a client.
    pub fn register(self: &Arc<Self>) -> CancelHandle {
        let mut rng = rand::thread_rng();
        loop {
            // Positive pids look like real backend pids to tools that print them.
            if let Some(handle) = self.try_register(rng.gen_range(1..i32::MAX), rng.gen()) {
                return handle;
            }
        }
    }

    /// Registers the key a client was given by another pgtether process (takeover), so that
    /// it keeps cancelling with the key it has. A fresh key if it is taken here (unlikely).
    pub fn register_exact(self: &Arc<Self>, pid: i32, key: i32) -> CancelHandle {
        self.try_register(pid, key)
            .unwrap_or_else(|| self.register())
    }

    /// Registers `(pid, key)` unless it is taken.
    fn try_register(self: &Arc<Self>, pid: i32, key: i32) -> Option<CancelHandle> {
        let slot = Arc::new(CancelSlot::default());
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let std::collections::hash_map::Entry::Vacant(v) = keys.entry((pid, key)) else {
            return None;
        };
        v.insert(slot.clone());
        Some(CancelHandle {
            registry: self.clone(),
            pid,
            key,
            slot,
        })
    }

    /// Forwards a client's CancelRequest. Idle clients are ignored, as PostgreSQL ignores
    /// cancels that match nothing. Returns whether the key belongs to a client here.
    pub async fn cancel(&self, pid: i32, key: i32) -> bool {
        let slot = {
            let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            keys.get(&(pid, key)).cloned()
        };
        let Some(slot) = slot else {
            return false;
        };
        if let Some(target) = slot.start() {
            // Counted in flight until the server has it, whatever happens to this task.
            struct Done<'a>(&'a CancelSlot);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.done();
                }
            }
            let _done = Done(&slot);
            if let Err(e) = send_cancel(target).await {
                tracing::warn!(error = %e, "could not forward cancel request");
            }
        }
        true
    }

    pub fn len(&self) -> usize {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_retired_on_drop() {
        let reg = Arc::new(CancelRegistry::default());
        let a = reg.register();
        let b = reg.register();
        assert_ne!((a.pid, a.key), (b.pid, b.key));
        assert_eq!(reg.len(), 2);
        drop(a);
        assert_eq!(reg.len(), 1);
    }
}
