//! A pool's connections split into one shard per worker thread, and the hand-off between
//! clients: each shard is a deadpool holding its share of the pool's size and a queue of its
//! thread's clients waiting while every connection is in use. A released connection goes
//! straight to the longest-waiting client of its shard instead of back through deadpool's
//! idle queue and semaphore, and one sweeper task per shard (not a timer per waiter) ends the
//! waits that reach `acquire_timeout`.
//!
//! Why shards: with one deadpool and one queue, both threads locked the same mutexes and wrote
//! the same cache lines several times per transaction; each thread now works in its own shard
//! and reaches into another only when its own has nothing to give (benches/HISTORY.md). Why
//! the hand-off: at 100 clients over 20 connections most transactions wait. Through deadpool
//! each wait cost a semaphore waiter, a timer armed and cancelled, and a second round through
//! the idle queue once woken: a quarter of pgtether's instructions per transaction.
//!
//! The invariant that keeps a waiter from sleeping next to an idle connection: a client is
//! queued only after checking, under its shard's lock, that no connection can be had in any
//! shard; a connection goes back to its deadpool only while, under its shard's lock, nobody
//! is queued there, and then (see [`Handoff::release`]) is offered to another shard's waiting
//! clients. Each side announces itself before it looks at the other (the queue's length in
//! `Shard::waiting`, the connection in deadpool), with a fence between: one of them sees the
//! other.

use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use deadpool::managed;
use tokio::sync::oneshot;

use super::manager::ShardManager;
use super::ServerObject;

/// What a waiting client is sent.
pub(super) enum Offered {
    /// A connection another client released, of the given shard; the receiver vets it as
    /// deadpool would.
    Conn(ServerObject, usize),
    /// Room was made (a connection was closed, the pool was resized): ask the pool again.
    Retry,
}

/// An [`Offered`] on its way. One that is never opened (its client stopped waiting after it
/// was sent) is passed on, so neither a connection nor room is lost.
pub(super) struct Offer {
    what: Option<Offered>,
    /// Moved, not cloned, from the releasing client's lease into the receiving client's: both
    /// worker threads share this reference count, and a clone and a drop per transaction
    /// would each take its cache line from the other core.
    home: Option<Arc<Handoff>>,
    /// The shard whose room a [`Offered::Retry`] is.
    shard: usize,
}

impl Offer {
    /// What was offered, and the pool's hand-off for the receiver's lease; the receiver owns
    /// them from now on.
    pub(super) fn open(mut self) -> (Offered, Arc<Handoff>) {
        (
            self.what.take().expect("opened once"),
            self.home.take().expect("opened once"),
        )
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        let (Some(what), Some(home)) = (self.what.take(), self.home.take()) else {
            return;
        };
        match what {
            Offered::Conn(conn, shard) => home.release(shard, conn),
            Offered::Retry => home.room_made(self.shard),
        }
    }
}

/// Where [`Handoff::offer_in`] left what it was given, and the hand-off it was given, unless
/// that went with the offer.
enum Outcome {
    /// A waiting client has it.
    Sent,
    /// Nobody waits: the connection is back in its deadpool.
    Pooled(Arc<Handoff>),
    /// Nobody waits, and it is not a connection of that shard: the caller's again.
    Unsent(Offered, Arc<Handoff>),
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
/// one in a hundred. (With a shard per thread, a queue holds clients of other threads only
/// with tokio's work-stealing runtime.)
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

/// One worker thread's share of a pool. Aligned so that two threads locking their own
/// shard's queue do not write the same cache line (128: the adjacent-line prefetcher pairs
/// lines).
#[repr(align(128))]
struct Shard {
    pool: managed::Pool<ShardManager>,
    queue: Mutex<Queue>,
    /// How many clients are queued: read by other shards without the lock.
    waiting: AtomicUsize,
}

/// The shards of one pool.
pub(super) struct Handoff {
    shards: Box<[Shard]>,
}

impl Handoff {
    pub(super) fn new(pools: Vec<managed::Pool<ShardManager>>) -> Handoff {
        Handoff {
            shards: pools
                .into_iter()
                .map(|pool| Shard {
                    pool,
                    queue: Mutex::default(),
                    waiting: AtomicUsize::new(0),
                })
                .collect(),
        }
    }

    /// How many shards; at least one.
    pub(super) fn len(&self) -> usize {
        self.shards.len()
    }

    /// The shard of the calling worker thread.
    pub(super) fn here(&self) -> usize {
        crate::workers::current() as usize % self.shards.len()
    }

    pub(super) fn pool(&self, shard: usize) -> &managed::Pool<ShardManager> {
        &self.shards[shard].pool
    }

    /// Every shard's deadpool.
    pub(super) fn pools(&self) -> impl Iterator<Item = &managed::Pool<ShardManager>> {
        self.shards.iter().map(|s| &s.pool)
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Queue> {
        self.shards[shard]
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a client in `shard` until `deadline`, unless `can_take_now` (asked under the
    /// shard's lock, after announcing the client) says a connection can be had at once in
    /// some shard: then `None`, and the caller asks the pool again.
    pub(super) fn wait(
        self: &Arc<Self>,
        shard: usize,
        deadline: Instant,
        can_take_now: impl FnOnce() -> bool,
    ) -> Option<oneshot::Receiver<Offer>> {
        let mut q = self.lock(shard);
        let waiting = &self.shards[shard].waiting;
        waiting.store(q.waiters.len() + 1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if can_take_now() {
            waiting.store(q.waiters.len(), Ordering::Relaxed);
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
            tokio::spawn(self.clone().sweep(shard));
        }
        Some(rx)
    }

    /// Sends `what` to the next client waiting in `shard` (`Queue::next_for`); with nobody
    /// waiting there, a connection of this shard goes back to its deadpool, dropped under the
    /// lock (see the module doc), and anything else comes back.
    ///
    /// The send happens outside the lock: an offer whose receiver vanished during the send
    /// may be dropped right there, and its drop passes it on, which takes the lock.
    fn offer_in(self: Arc<Self>, shard: usize, what: Offered, room_of: usize) -> Outcome {
        let mut offer = Offer {
            what: Some(what),
            home: Some(self),
            shard: room_of,
        };
        let here = crate::workers::current();
        loop {
            let this = offer.home.as_deref().expect("held until sent");
            let mut q = this.lock(shard);
            let next = q.next_for(here);
            this.shards[shard]
                .waiting
                .store(q.waiters.len(), Ordering::Relaxed);
            let Some(w) = next else {
                let unsent = match offer.what.take().expect("held until sent") {
                    Offered::Conn(conn, owner) if owner == shard => {
                        drop(conn);
                        None
                    }
                    other => Some(other),
                };
                drop(q);
                let home = offer.home.take().expect("held until sent");
                return match unsent {
                    None => Outcome::Pooled(home),
                    Some(other) => Outcome::Unsent(other, home),
                };
            };
            drop(q);
            match w.tx.send(offer) {
                Ok(()) => return Outcome::Sent,
                Err(back) => offer = back,
            }
        }
    }

    /// A released connection of `shard`: to a client waiting there, else back to its
    /// deadpool, and then to a client waiting in another shard if one is.
    pub(super) fn release(self: Arc<Self>, shard: usize, conn: ServerObject) {
        let Outcome::Pooled(home) = self.offer_in(shard, Offered::Conn(conn, shard), shard) else {
            return;
        };
        if home.shards.len() == 1 {
            return;
        }
        fence(Ordering::SeqCst);
        for other in home.others(shard) {
            if home.shards[other].waiting.load(Ordering::SeqCst) == 0 {
                continue;
            }
            // Taken back out: it may have gone to a client of this shard meanwhile.
            let Some(Ok(conn)) = super::acquire::idle_now(&home.shards[shard].pool) else {
                return;
            };
            if let Outcome::Unsent(Offered::Conn(conn, _), home) =
                home.offer_in(other, Offered::Conn(conn, shard), shard)
            {
                // They stopped waiting: back through the whole protocol, as a client of
                // this shard may have queued while the connection was out.
                home.release(shard, conn);
            }
            return;
        }
    }

    /// A connection of `shard` was closed: its room goes to a client waiting there, else to
    /// one waiting in another shard.
    pub(super) fn room_made(self: Arc<Self>, shard: usize) {
        let Outcome::Unsent(_, mut home) = self.offer_in(shard, Offered::Retry, shard) else {
            return;
        };
        if home.shards.len() == 1 {
            return;
        }
        fence(Ordering::SeqCst);
        for other in home.others(shard) {
            if home.shards[other].waiting.load(Ordering::SeqCst) == 0 {
                continue;
            }
            home = match home.offer_in(other, Offered::Retry, shard) {
                Outcome::Sent => return,
                Outcome::Pooled(home) | Outcome::Unsent(_, home) => home,
            };
        }
    }

    /// Whether clients wait in `shard`: then whatever it has goes to them, and a client of
    /// another shard need not look there (it is served when that queue empties, see
    /// [`Handoff::release`]).
    pub(super) fn busy(&self, shard: usize) -> bool {
        self.shards[shard].waiting.load(Ordering::SeqCst) > 0
    }

    /// Where a client of this thread looks for a connection: its own shard, then the others
    /// where nobody waits.
    pub(super) fn lookup_order(&self) -> impl Iterator<Item = usize> + '_ {
        let here = self.here();
        std::iter::once(here).chain(self.others(here).filter(|&s| !self.busy(s)))
    }

    /// The other shards, the next one first.
    pub(super) fn others(&self, shard: usize) -> impl Iterator<Item = usize> {
        let n = self.shards.len();
        (1..n).map(move |i| (shard + i) % n)
    }

    /// The pool was resized: every waiter asks the pool again. `before_waking` runs under
    /// every shard's lock, so a client queueing concurrently either sees its effect or is
    /// woken.
    pub(super) fn retry_all(self: &Arc<Self>, before_waking: impl FnOnce()) {
        let waiters: Vec<Waiter> = {
            // In shard order, the only place more than one lock is held.
            let mut locked: Vec<_> = (0..self.shards.len()).map(|i| self.lock(i)).collect();
            before_waking();
            let mut all = Vec::new();
            for (i, q) in locked.iter_mut().enumerate() {
                all.extend(q.waiters.drain(..));
                self.shards[i].waiting.store(0, Ordering::Relaxed);
            }
            all
        };
        for w in waiters {
            let retry = Offer {
                what: Some(Offered::Retry),
                home: Some(self.clone()),
                shard: 0,
            };
            if let Err(back) = w.tx.send(retry) {
                // Gone: no one to tell.
                let _ = back.open();
            }
        }
    }

    /// Ends the waits in `shard` past their deadline and forgets clients that stopped
    /// waiting; sleeps until the earliest deadline left, and stops when nobody waits.
    async fn sweep(self: Arc<Self>, shard: usize) {
        // A sweeper dropped unfinished (its runtime shut down) lets the next waiter start one.
        struct Stopped<'a>(&'a Handoff, usize);
        impl Drop for Stopped<'_> {
            fn drop(&mut self) {
                self.0.lock(self.1).sweeping = false;
            }
        }
        let stopped = Stopped(&self, shard);
        loop {
            let next = {
                let mut q = self.lock(shard);
                let now = Instant::now();
                q.waiters.retain(|w| w.deadline > now && !w.tx.is_closed());
                self.shards[shard]
                    .waiting
                    .store(q.waiters.len(), Ordering::Relaxed);
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

    /// The hand-off of a pool split into `n` shards.
    fn shards(n: usize) -> Arc<Handoff> {
        let app = crate::app::App::for_tests();
        let pool = app.pools.get("app", "app").expect("the pool exists");
        let settings = pool.settings();
        let manager = Arc::new(crate::pool::ServerManager::new(
            pool.upstream(),
            &settings,
            &pool.metrics,
        ));
        Arc::new(Handoff::new(crate::pool::shard_pools(
            &manager,
            settings.size,
            n,
        )))
    }

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

    /// Waits for `rx` to be offered room; `what` says whose offer it should be.
    async fn expect_retry(rx: oneshot::Receiver<Offer>, what: &str) {
        let got = tokio::time::timeout(Duration::from_secs(1), rx)
            .await
            .expect(what)
            .expect("sent");
        assert!(
            matches!(got.open(), (Offered::Retry, _)),
            "{what}: not room"
        );
    }

    #[tokio::test]
    async fn an_offer_its_client_never_opened_goes_to_the_next() {
        let h = shards(1);
        let first = h.wait(0, far(), || false).expect("queued");
        let second = h.wait(0, far(), || false).expect("queued");
        h.clone().room_made(0);
        // The first client stops waiting with the offer unopened.
        drop(first);
        expect_retry(second, "the room went on to the second client").await;
    }

    #[tokio::test]
    async fn room_made_in_a_shard_nobody_waits_in_goes_to_another_shard() {
        let h = shards(2);
        assert!(!h.busy(1));
        let waiting = h.wait(1, far(), || false).expect("queued");
        assert!(h.busy(1), "shard 0 can see that clients wait in shard 1");
        h.clone().room_made(0);
        expect_retry(waiting, "the room went to the client of shard 1").await;
        assert!(!h.busy(1));
        // A client of shard 0 is served first by its own shard.
        let other = h.wait(1, far(), || false).expect("queued");
        let own = h.wait(0, far(), || false).expect("queued");
        h.clone().room_made(0);
        expect_retry(own, "its own shard's client first").await;
        assert!(h.busy(1), "the client of shard 1 still waits");
        drop(other);
    }

    #[tokio::test]
    async fn clients_that_stopped_waiting_are_skipped() {
        let h = shards(1);
        drop(h.wait(0, far(), || false));
        let waiting = h.wait(0, far(), || false).expect("queued");
        h.clone().room_made(0);
        let got = waiting.await.expect("sent");
        assert!(matches!(got.open(), (Offered::Retry, _)));
    }

    #[tokio::test]
    async fn a_wait_ends_at_its_deadline_and_room_now_queues_nobody() {
        let h = shards(1);
        assert!(h.wait(0, far(), || true).is_none());
        let started = Instant::now();
        let waiting = h
            .wait(0, started + Duration::from_millis(50), || false)
            .expect("queued");
        let ended = tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("the sweeper ended the wait");
        assert!(ended.is_err(), "ended without an offer");
        assert!(started.elapsed() >= Duration::from_millis(50));
        // The sweeper stopped with the queue empty; the next waiter starts another.
        let again = h
            .wait(0, Instant::now() + Duration::from_millis(20), || false)
            .expect("queued");
        let ended = tokio::time::timeout(Duration::from_secs(2), again).await;
        assert!(ended.expect("swept again").is_err());
    }
}
