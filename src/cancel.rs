//! Cancel keys: each client gets its own BackendKeyData from pgtether; a CancelRequest carrying
//! it is forwarded to whichever server connection that client holds at that moment.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::Rng;

use crate::server::{send_cancel, CancelTarget};

/// The server connection a client is using right now, if any. Written by the client's own task
/// at attach and release; read by cancel requests.
#[derive(Default)]
pub struct CancelSlot {
    target: Mutex<Option<CancelTarget>>,
}

impl CancelSlot {
    pub fn set(&self, target: Option<CancelTarget>) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
    }

    fn get(&self) -> Option<CancelTarget> {
        *self.target.lock().unwrap_or_else(|e| e.into_inner())
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
        let slot = Arc::new(CancelSlot::default());
        let mut rng = rand::thread_rng();
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // Positive pids look like real backend pids to tools that print them.
            let pid = rng.gen_range(1..i32::MAX);
            let key: i32 = rng.gen();
            if let std::collections::hash_map::Entry::Vacant(v) = keys.entry((pid, key)) {
                v.insert(slot.clone());
                return CancelHandle {
                    registry: self.clone(),
                    pid,
                    key,
                    slot,
                };
            }
        }
    }

    /// Registers the key a client was given by another pgtether process (takeover), so that
    /// it keeps cancelling with the key it has. A fresh key if it is taken here (unlikely).
    pub fn register_exact(self: &Arc<Self>, pid: i32, key: i32) -> CancelHandle {
        let slot = Arc::new(CancelSlot::default());
        {
            let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            if let std::collections::hash_map::Entry::Vacant(v) = keys.entry((pid, key)) {
                v.insert(slot.clone());
                return CancelHandle {
                    registry: self.clone(),
                    pid,
                    key,
                    slot,
                };
            }
        }
        self.register()
    }

    /// Forwards a client's CancelRequest. Idle clients are ignored, as PostgreSQL ignores
    /// cancels that match nothing. Returns whether the key belongs to a client here.
    pub async fn cancel(&self, pid: i32, key: i32) -> bool {
        let (known, target) = {
            let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            let slot = keys.get(&(pid, key));
            (slot.is_some(), slot.and_then(|slot| slot.get()))
        };
        if let Some(target) = target {
            if let Err(e) = send_cancel(target).await {
                tracing::warn!(error = %e, "could not forward cancel request");
            }
        }
        known
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
