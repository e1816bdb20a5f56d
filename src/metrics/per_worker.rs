//! The counters and gauges every transaction writes, kept per worker thread and folded into the
//! exported Prometheus metrics when someone reads them.
//!
//! Why: a Prometheus counter or gauge is an atomic shared by every thread. With every worker
//! thread adding to a pool's client gauges and its transaction, query and byte counters,
//! each transaction wrote about a dozen cache lines the other cores had just written. Here each
//! worker thread writes only its own slot, alone on its cache lines. Readers (the `/metrics`
//! scrape, `SHOW POOLS`, `SHOW STATS`) call [`PerWorker::sync`] first, so what they read is
//! exact, not a sample. On the 2-core development machine neither way is measurably faster
//! (benches/HISTORY.md); the slots are for machines with more cores.
//!
//! The wait and transaction histograms stay shared: kept per thread behind a lock (Prometheus'
//! local histograms are not thread-safe), an observation cost about 100 instructions more.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use prometheus::{IntCounter, IntGauge};

use super::ClientState;

/// The counters kept per thread, as indexes into [`Slot::counts`].
#[derive(Debug, Clone, Copy)]
pub enum Count {
    Transactions,
    Queries,
    ReceivedBytes,
    SentBytes,
    PreparedHits,
    PreparedMisses,
}

const COUNTS: usize = 6;
const STATES: usize = 3;

fn state_index(state: ClientState) -> usize {
    match state {
        ClientState::Idle => 0,
        ClientState::Waiting => 1,
        ClientState::Active => 2,
    }
}

/// One worker thread's share. Aligned so that no two threads' slots share a cache line (128:
/// the adjacent-line prefetcher pairs lines).
#[repr(align(128))]
struct Slot {
    /// Clients entering minus clients leaving each state on this thread. A client stays on
    /// its thread, so this is the thread's count; summed over the slots it is the pool's.
    clients: [AtomicI64; STATES],
    /// Added since the last [`PerWorker::sync`].
    counts: [AtomicU64; COUNTS],
}

/// The exported metrics a [`PerWorker`] folds its slots into.
pub struct Exported {
    pub clients: [IntGauge; STATES],
    pub counts: [IntCounter; COUNTS],
}

/// One pool's per-thread metrics.
pub struct PerWorker {
    slots: Box<[Slot]>,
    exported: Exported,
    /// The client counts the gauges were last given: a gauge may be fed by several pools of
    /// the same database and user (the old one drains after a reload), so each adds the
    /// change since its own last sync.
    synced: Mutex<[i64; STATES]>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PerWorker {
    /// One slot per worker thread (`workers::count()`; a thread outside them uses slot 0).
    pub fn new(exported: Exported) -> PerWorker {
        let slots = (0..crate::workers::count().max(1))
            .map(|_| Slot {
                clients: Default::default(),
                counts: Default::default(),
            })
            .collect();
        PerWorker {
            slots,
            exported,
            synced: Mutex::new([0; STATES]),
        }
    }

    fn here(&self) -> &Slot {
        let i = crate::workers::current() as usize;
        self.slots.get(i).unwrap_or(&self.slots[0])
    }

    /// A client moved from state `from` to `to` (`None`: it logged in, or it left).
    pub fn client_moved(&self, from: Option<ClientState>, to: Option<ClientState>) {
        let slot = self.here();
        if let Some(from) = from {
            slot.clients[state_index(from)].fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(to) = to {
            slot.clients[state_index(to)].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether clients of this thread wait for a server connection. Only this thread's slot
    /// is read: reading another's would take its line from the core that writes it.
    pub fn waiting_here(&self) -> bool {
        self.here().clients[state_index(ClientState::Waiting)].load(Ordering::Relaxed) > 0
    }

    pub fn add(&self, count: Count, n: u64) {
        self.here().counts[count as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Folds every slot into the exported metrics.
    pub fn sync(&self) {
        let mut synced = lock(&self.synced);
        for (i, gauge) in self.exported.clients.iter().enumerate() {
            let now: i64 = self
                .slots
                .iter()
                .map(|s| s.clients[i].load(Ordering::Relaxed))
                .sum();
            gauge.add(now - synced[i]);
            synced[i] = now;
        }
        let mut counts = [0u64; COUNTS];
        for slot in self.slots.iter() {
            for (total, c) in counts.iter_mut().zip(&slot.counts) {
                *total += c.swap(0, Ordering::Relaxed);
            }
        }
        for (counter, n) in self.exported.counts.iter().zip(counts) {
            if n > 0 {
                counter.inc_by(n);
            }
        }
    }
}

impl Drop for PerWorker {
    /// The last counts of a pool that goes away (a reload replaced it) are not lost, and its
    /// clients (all gone by now) leave the gauges.
    fn drop(&mut self) {
        self.sync();
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ClientGauge, ClientState, Count, Metrics};
    use std::sync::Arc;

    /// What a reader sees after `sync` is exact: every count and client move made before it,
    /// whichever thread made it.
    #[test]
    fn sync_folds_every_thread_into_the_exported_metrics() {
        let metrics = Metrics::new();
        let pool = Arc::new(metrics.pool("db", "u"));
        let mut gauges: Vec<ClientGauge> = (0..3).map(|_| ClientGauge::new(pool.clone())).collect();
        gauges[0].set(ClientState::Waiting);
        gauges[1].set(ClientState::Active);
        assert!(pool.waiting_here(), "read live, without a sync");
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        pool.add(Count::Transactions, 1);
                        pool.add(Count::SentBytes, 10);
                    }
                });
            }
        });
        assert_eq!(pool.transactions.get(), 0, "not folded in before a sync");
        pool.sync();
        assert_eq!(pool.transactions.get(), 2000);
        assert_eq!(pool.sent_bytes.get(), 20_000);
        let states = [
            &pool.clients_idle,
            &pool.clients_waiting,
            &pool.clients_active,
        ];
        assert_eq!(states.map(|g| g.get()), [1, 1, 1]);
        // A second sync adds nothing twice.
        pool.sync();
        assert_eq!(pool.transactions.get(), 2000);
        gauges[0].set(ClientState::Active);
        assert!(!pool.waiting_here());
        pool.sync();
        assert_eq!(states.map(|g| g.get()), [1, 0, 2]);
    }

    /// Two pools of one database and user (the old one drains after a reload) feed the same
    /// exported gauges and counters; the one that goes away leaves its last counts behind and
    /// takes its clients with it.
    #[test]
    fn pools_sharing_labels_add_up_and_a_dropped_one_syncs() {
        let metrics = Metrics::new();
        let old = Arc::new(metrics.pool("db", "u"));
        let new = Arc::new(metrics.pool("db", "u"));
        let a = ClientGauge::new(old.clone());
        let b = ClientGauge::new(new.clone());
        old.add(Count::Queries, 5);
        new.add(Count::Queries, 7);
        new.sync();
        old.sync();
        assert_eq!(new.clients_idle.get(), 2);
        assert_eq!(new.queries.get(), 12);
        old.add(Count::Queries, 1);
        drop(a);
        drop(old);
        assert_eq!(
            new.queries.get(),
            13,
            "the dropped pool's last count was folded in"
        );
        assert_eq!(new.clients_idle.get(), 1);
        drop(b);
        new.sync();
        assert_eq!(new.clients_idle.get(), 0);
    }
}
