//! The queue of clients waiting for a full pool, and the hand-off to them: a released
//! connection goes straight to the longest-waiting client instead of back through deadpool's
//! idle queue and semaphore, and one sweeper task per pool (not a timer per waiter) ends the
//! waits that reach `acquire_timeout`.
//!
//! Why: at 100 clients over 20 connections most transactions wait. Through deadpool each wait
//! cost a semaphore waiter, a timer armed and cancelled, and a second round through the idle
//! queue once woken: a quarter of pgtether's instructions per transaction.
//!
//! With a runtime per worker thread, a connection released on one thread goes to a client of
//! that thread first, within a bounded unfairness (see `HOME_PREFERENCE`).
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
pub(super) enum Offered {
    /// A connection another client released; the receiver vets it as deadpool would.
    Conn(ServerObject),
    /// Room was made (a connection was closed, the pool was resized): ask the pool again.
    Retry,
}

/// An [`Offered`] on its way. One that is never opened (its client stopped waiting after it
/// was sent) is passed on to the next waiter, so neither a connection nor room is lost.
pub(super) struct Offer {
    what: Option<Offered>,
    home: Arc<Handoff>,
}

impl Offer {
    /// What was offered; the receiver owns it from now on.
    pub(super) fn open(mut self) -> Offered {
        self.what.take().expect("opened once")
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        match self.what.take() {
            Some(Offered::Conn(conn)) => self.home.release(conn),
            Some(Offered::Retry) => self.home.room_made(),
            None => {}
        }
    }
}

/// A waiting client: dropping `tx` (the sweeper does, at `deadline`) ends its wait in a
/// timeout; a client that stops waiting (KILL, disconnect) drops its receiver and is skipped.
struct Waiter {
    deadline: Instant,
    tx: oneshot::Sender<Offer>,
    /// The client's worker thread (see `workers`).
    home: u8,
}

/// How much later than the longest-waiting client a client of the releasing thread may have
/// started to wait and still be served first: the connection then stays on its thread (see
/// `workers`); past it, fairness wins and the connection moves. At 100 clients over 20
/// connections the queue spans a few milliseconds: with 1 ms a quarter of the hand-offs
/// still moved a connection (two epoll_ctl calls and a cross-thread wakeup each), with 10 ms
/// one in a hundred.
const HOME_PREFERENCE: std::time::Duration = std::time::Duration::from_millis(10);
/// How far down the queue a client of the releasing thread is looked for.
const HOME_SCAN: usize = 64;

#[derive(Default)]
struct Queue {
    waiters: VecDeque<Waiter>,
    /// Whether a sweeper task runs (it stops when the queue empties).
    sweeping: bool,
}

impl Queue {
    /// The next client to offer a connection released on worker `here`: the longest-waiting
    /// one, unless a client of `here` queued at most [`HOME_PREFERENCE`] after it.
    fn next_for(&mut self, here: u8) -> Option<Waiter> {
        let first = self.waiters.front()?;
        if first.home == here {
            return self.waiters.pop_front();
        }
        let limit = first.deadline + HOME_PREFERENCE;
        let local = self
            .waiters
            .iter()
            .take(HOME_SCAN)
            .position(|w| w.home == here && w.deadline <= limit);
        match local {
            Some(i) => self.waiters.remove(i),
            None => self.waiters.pop_front(),
        }
    }
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
        q.waiters.push_back(Waiter {
            deadline,
            tx,
            home: crate::workers::current(),
        });
        if !q.sweeping {
            q.sweeping = true;
            tokio::spawn(self.clone().sweep());
        }
        Some(rx)
    }

    /// Sends `what` to the longest-waiting client still waiting, or to one of this thread's
    /// (`Queue::next_for`). With nobody waiting, a connection goes back to deadpool, dropped
    /// under the lock (see the module doc).
    ///
    /// The send happens outside the lock: an offer whose receiver vanished during the send
    /// may be dropped right there, and its drop passes it on, which takes the lock.
    fn offer(self: &Arc<Self>, what: Offered) {
        let mut offer = Offer {
            what: Some(what),
            home: self.clone(),
        };
        let here = crate::workers::current();
        loop {
            let mut q = self.lock();
            let Some(w) = q.next_for(here) else {
                drop(offer.open());
                return;
            };
            drop(q);
            match w.tx.send(offer) {
                Ok(()) => return,
                Err(back) => offer = back,
            }
        }
    }

    /// A released connection: to the longest-waiting client, or back to deadpool.
    pub(super) fn release(self: &Arc<Self>, conn: ServerObject) {
        self.offer(Offered::Conn(conn));
    }

    /// A connection was closed: its room goes to the longest-waiting client.
    pub(super) fn room_made(self: &Arc<Self>) {
        self.offer(Offered::Retry);
    }

    /// The pool was resized: every waiter asks the pool again. `before_waking` runs under the
    /// lock, so a client queueing concurrently either sees its effect or is woken.
    pub(super) fn retry_all(self: &Arc<Self>, before_waking: impl FnOnce()) {
        let waiters: Vec<Waiter> = {
            let mut q = self.lock();
            before_waking();
            q.waiters.drain(..).collect()
        };
        for w in waiters {
            let retry = Offer {
                what: Some(Offered::Retry),
                home: self.clone(),
            };
            if let Err(back) = w.tx.send(retry) {
                // Gone: no one to tell.
                let _ = back.open();
            }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    /// A queue of clients of workers `homes`, each queued `step` after the one before.
    fn queue(homes: &[u8], step: Duration) -> (Queue, Vec<oneshot::Receiver<Offer>>) {
        let start = far();
        let mut q = Queue::default();
        let mut receivers = Vec::new();
        for (i, &home) in homes.iter().enumerate() {
            let (tx, rx) = oneshot::channel();
            receivers.push(rx);
            q.waiters.push_back(Waiter {
                deadline: start + step * i as u32,
                tx,
                home,
            });
        }
        (q, receivers)
    }

    #[test]
    fn a_connection_goes_to_a_client_of_its_own_thread_first() {
        let (mut q, _rx) = queue(&[1, 1, 0, 1, 0], Duration::from_micros(100));
        let first = q.next_for(0).unwrap();
        assert_eq!(first.home, 0);
        assert_eq!(q.waiters.len(), 4);
        // The clients of worker 1 keep their order.
        assert_eq!(q.next_for(1).unwrap().home, 1);
        assert_eq!(
            q.waiters.iter().map(|w| w.home).collect::<Vec<_>>(),
            [1, 1, 0]
        );
    }

    #[test]
    fn past_the_preference_the_longest_waiting_client_wins() {
        // The only client of worker 0 queued 20 ms after the first: fairness first.
        let (mut q, _rx) = queue(&[1, 1, 0], Duration::from_millis(10));
        let next = q.next_for(0).unwrap();
        assert_eq!(
            next.home, 1,
            "the longest-waiting client, of the other thread"
        );
        // With nobody of this thread waiting at all, the longest-waiting one too.
        let (mut q, _rx) = queue(&[1, 1], Duration::from_micros(1));
        assert_eq!(q.next_for(0).unwrap().home, 1);
        assert_eq!(q.waiters.len(), 1);
        let mut empty = Queue::default();
        assert!(empty.next_for(0).is_none());
    }

    #[tokio::test]
    async fn an_offer_its_client_never_opened_goes_to_the_next() {
        let h = Arc::new(Handoff::default());
        let first = h.wait(far(), || false).expect("queued");
        let second = h.wait(far(), || false).expect("queued");
        h.room_made();
        // The first client stops waiting with the offer unopened.
        drop(first);
        let got = tokio::time::timeout(Duration::from_secs(1), second)
            .await
            .expect("the room went on to the second client")
            .expect("sent");
        assert!(matches!(got.open(), Offered::Retry));
    }

    #[tokio::test]
    async fn clients_that_stopped_waiting_are_skipped() {
        let h = Arc::new(Handoff::default());
        drop(h.wait(far(), || false));
        let waiting = h.wait(far(), || false).expect("queued");
        h.room_made();
        let got = waiting.await.expect("sent");
        assert!(matches!(got.open(), Offered::Retry));
    }

    #[tokio::test]
    async fn a_wait_ends_at_its_deadline_and_room_now_queues_nobody() {
        let h = Arc::new(Handoff::default());
        assert!(h.wait(far(), || true).is_none());
        let started = Instant::now();
        let waiting = h
            .wait(started + Duration::from_millis(50), || false)
            .expect("queued");
        let ended = tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("the sweeper ended the wait");
        assert!(ended.is_err(), "ended without an offer");
        assert!(started.elapsed() >= Duration::from_millis(50));
        // The sweeper stopped with the queue empty; the next waiter starts another.
        let again = h
            .wait(Instant::now() + Duration::from_millis(20), || false)
            .expect("queued");
        let ended = tokio::time::timeout(Duration::from_secs(2), again).await;
        assert!(ended.expect("swept again").is_err());
    }
}
