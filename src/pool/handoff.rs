//! The queue of clients waiting for a full pool, and the hand-off to them: a released
//! connection goes straight to the longest-waiting client instead of back through deadpool's
//! idle queue and semaphore, and one sweeper task per pool (not a timer per waiter) ends the
//! waits that reach `acquire_timeout`.
//!
//! Why: at 100 clients over 20 connections most transactions wait. Through deadpool each wait
//! cost a semaphore waiter, a timer armed and cancelled, and a second round through the idle
//! queue once woken: a quarter of pgtether's instructions per transaction.
//!
//! The invariant that keeps a waiter from sleeping next to an idle connection: a client is
//! queued only after checking, under the queue's lock, that no connection can be had; a
//! connection goes back to deadpool only while, under the same lock, nobody is queued.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::oneshot;

use super::ServerObject;

/// What a waiting client is sent.
pub(super) enum Offer {
    /// A connection another client released; the receiver vets it as deadpool would.
    Conn(ServerObject),
    /// Room was made (a connection was closed, the pool was resized): ask the pool again.
    Retry,
}

/// A waiting client: dropping `tx` (the sweeper does, at `deadline`) ends its wait in a
/// timeout; a client that stops waiting (KILL, disconnect) drops its receiver and is skipped.
struct Waiter {
    deadline: Instant,
    tx: oneshot::Sender<Offer>,
}

#[derive(Default)]
struct Queue {
    waiters: VecDeque<Waiter>,
    /// Whether a sweeper task runs (it stops when the queue empties).
    sweeping: bool,
}

#[derive(Default)]
pub(super) struct Handoff {
    queue: Mutex<Queue>,
}

impl Handoff {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a client until `deadline`, unless `can_take_now` (asked under the lock) says a
    /// connection can be had at once: then `None`, and the caller asks the pool again.
    pub(super) fn wait(
        self: &Arc<Self>,
        deadline: Instant,
        can_take_now: impl FnOnce() -> bool,
    ) -> Option<oneshot::Receiver<Offer>> {
        let mut q = self.lock();
        if can_take_now() {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        q.waiters.push_back(Waiter { deadline, tx });
        if !q.sweeping {
            q.sweeping = true;
            tokio::spawn(self.clone().sweep());
        }
        Some(rx)
    }

    /// A released connection: to the longest-waiting client, or back to deadpool (dropped
    /// under the lock, see the module doc) when nobody waits.
    pub(super) fn release(&self, conn: ServerObject) {
        let mut q = self.lock();
        let mut offer = Offer::Conn(conn);
        while let Some(w) = q.waiters.pop_front() {
            match w.tx.send(offer) {
                Ok(()) => return,
                Err(back) => offer = back,
            }
        }
        drop(offer);
    }

    /// A connection was closed: its room goes to the longest-waiting client.
    pub(super) fn room_made(&self) {
        let mut q = self.lock();
        while let Some(w) = q.waiters.pop_front() {
            if w.tx.send(Offer::Retry).is_ok() {
                return;
            }
        }
    }

    /// The pool was resized: every waiter asks the pool again. `before_waking` runs under the
    /// lock, so a client queueing concurrently either sees its effect or is woken.
    pub(super) fn retry_all(&self, before_waking: impl FnOnce()) {
        let mut q = self.lock();
        before_waking();
        for w in q.waiters.drain(..) {
            let _ = w.tx.send(Offer::Retry);
        }
    }

    /// Ends the waits past their deadline and forgets clients that stopped waiting; sleeps
    /// until the earliest deadline left, and stops when nobody waits.
    async fn sweep(self: Arc<Self>) {
        // A sweeper dropped unfinished (its runtime shut down) lets the next waiter start one.
        struct Stopped<'a>(&'a Handoff);
        impl Drop for Stopped<'_> {
            fn drop(&mut self) {
                self.0.lock().sweeping = false;
            }
        }
        let stopped = Stopped(&self);
        loop {
            let next = {
                let mut q = self.lock();
                let now = Instant::now();
                q.waiters.retain(|w| w.deadline > now && !w.tx.is_closed());
                match q.waiters.iter().map(|w| w.deadline).min() {
                    Some(next) => next,
                    None => {
                        // Under the lock: a client queued after this starts a new sweeper.
                        q.sweeping = false;
                        drop(q);
                        std::mem::forget(stopped);
                        return;
                    }
                }
            };
            tokio::time::sleep_until(next.into()).await;
        }
    }
}
