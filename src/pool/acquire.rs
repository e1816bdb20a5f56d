//! Taking a server connection from a pool: at once when one is idle (no timer, no future kept),
//! a new one while the pool has room, otherwise waiting up to `acquire_timeout` for one to be
//! handed over (see `handoff.rs`), retrying while the upstream is down. Each step looks in the
//! client's own thread's shard first, then in the shards where no client waits.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use deadpool::managed::{self, PoolError, TimeoutType, Timeouts};

use super::handoff::{Offer, Offered};
use super::limit::Slot;
use super::manager::ShardManager;
use super::{Held, Lease, Pool, ServerObject};
use crate::server::ServerError;

/// Asks deadpool for an idle connection only: no waiting, no connecting.
const AT_ONCE: Timeouts = Timeouts {
    wait: Some(Duration::ZERO),
    create: None,
    recycle: None,
};

/// How many idle connections a client looks at for one of its own worker thread's before it
/// takes one of another thread's (see [`Pool::prefer_home`]).
const HOME_LOOKS: usize = 3;

/// A wait for a server connection at least this long is logged (rate-limited).
const SLOW_ACQUIRE: Duration = Duration::from_secs(1);

/// Why a client got no server connection.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("no server connection available in pool \"{pool}\" within {timeout:?} (pool size {size}); the pool is exhausted")]
    Exhausted {
        pool: String,
        timeout: Duration,
        size: usize,
    },
    #[error("cannot open a server connection for pool \"{pool}\": {source}")]
    Server { pool: String, source: ServerError },
    #[error("pool \"{0}\" is closed")]
    Closed(String),
}

impl Pool {
    pub(super) fn lease(&self, conn: ServerObject, shard: usize, slot: Option<Slot>) -> Lease {
        Lease {
            conn: Some(Held::Pooled(conn, self.handoff.clone(), shard)),
            _slot: slot,
        }
    }

    /// A connection taken at once if one is idle in the pool: no waiting, no connecting, no
    /// future to keep. `None` when the caller must [`Pool::acquire`] instead.
    pub fn try_acquire_now(&self) -> Option<Result<Lease, AcquireError>> {
        if self.limited.load(Ordering::Relaxed) {
            return None;
        }
        let (conn, shard) = match self.idle_anywhere()? {
            Ok(got) => got,
            Err(e) => {
                let wait = Duration::from_millis(self.acquire_timeout_ms.load(Ordering::Relaxed));
                return Some(Err(self.acquire_error(e, wait)));
            }
        };
        self.metrics.wait_seconds.observe(0.0);
        let conn = self.prefer_home(conn, shard);
        Some(Ok(self.lease(conn, shard, None)))
    }

    /// An idle connection of this thread's shard, else of another shard where nobody waits.
    fn idle_anywhere(&self) -> Option<Result<(ServerObject, usize), PoolError<ServerError>>> {
        self.handoff
            .lookup_order()
            .find_map(|shard| Some(idle_now(self.handoff.pool(shard))?.map(|c| (c, shard))))
    }

    /// `conn`, or another idle connection of `shard` registered with this worker thread's
    /// runtime: one of another thread's must move here (two epoll_ctl calls, and a turn of
    /// the event loop before its first write), while looking at a few more idle ones costs a
    /// pool lookup each. Deadpool's idle queue does not know threads; a shard holds another
    /// thread's connections after that thread borrowed them, and every shard does with
    /// tokio's work-stealing runtime. Those passed over go back through the hand-off, so a
    /// client that started to wait meanwhile gets them.
    fn prefer_home(&self, conn: ServerObject, shard: usize) -> ServerObject {
        let here = crate::workers::current();
        if conn.home == here {
            return conn;
        }
        // Held until the look ends: the idle queue is last-in first-out, so one given back at
        // once would be the next one taken.
        let mut passed: [Option<ServerObject>; HOME_LOOKS - 1] = std::array::from_fn(|_| None);
        let mut chosen = conn;
        for slot in passed.iter_mut() {
            let Some(Ok(other)) = idle_now(self.handoff.pool(shard)) else {
                break;
            };
            if other.home == here {
                *slot = Some(std::mem::replace(&mut chosen, other));
                break;
            }
            *slot = Some(other);
        }
        for conn in passed.into_iter().flatten() {
            self.handoff.clone().release(shard, conn);
        }
        chosen
    }

    /// Takes a server connection, waiting up to `acquire_timeout` for one: for a connection
    /// another client releases, for the size limit of a shrinking pool, or for an upstream
    /// that is down (retrying with backoff). `started`: when the client began to wait;
    /// returned with the connection is when it ended (the caller's clock reads, shared).
    pub async fn acquire(&self, started: Instant) -> Result<(Lease, Instant), AcquireError> {
        let wait = Duration::from_millis(self.acquire_timeout_ms.load(Ordering::Relaxed));
        let connect = Duration::from_millis(self.connect_timeout_ms.load(Ordering::Relaxed));
        let r = self.take(started, wait, connect).await;
        let done = match &r {
            Ok((_, done)) => *done,
            Err(_) => Instant::now(),
        };
        let waited = done.saturating_duration_since(started);
        self.metrics.wait_seconds.observe(waited.as_secs_f64());
        if waited >= SLOW_ACQUIRE {
            self.warn_slow_acquire(waited);
        }
        r.map_err(|e| self.acquire_error(e, wait))
    }

    async fn take(
        &self,
        started: Instant,
        wait: Duration,
        connect: Duration,
    ) -> Result<(Lease, Instant), PoolError<ServerError>> {
        let deadline = started + wait;
        let mut backoff = Duration::from_millis(50);
        // Clients already queued in this thread's shard get whatever it has (see handoff.rs),
        // so a newcomer queues behind them at once: the queueing asks every shard again, under
        // the lock. Only the first round: one sent back from there must look for itself.
        let mut queue_first = self.handoff.busy(self.handoff.here());
        loop {
            // The rare paths are boxed: the future of a client waiting for a hand-off (every
            // client's, under load) stays small enough for the allocator's fast path.
            if self.limited.load(Ordering::Relaxed) {
                return Box::pin(self.take_limited(started, wait, connect)).await;
            }
            // An idle connection, or a new one where a shard has room.
            let got = if std::mem::take(&mut queue_first) {
                Err(PoolError::Timeout(TimeoutType::Wait))
            } else {
                match self.idle_anywhere() {
                    Some(got) => got,
                    None => match self.shard_with_room() {
                        Some(shard) => Box::pin(self.open_in(shard, connect))
                            .await
                            .map(|c| (c, shard)),
                        None => Err(PoolError::Timeout(TimeoutType::Wait)),
                    },
                }
            };
            let e = match got {
                Ok((conn, shard)) => return Ok((self.lease(conn, shard, None), Instant::now())),
                Err(e) => e,
            };
            match e {
                PoolError::Timeout(TimeoutType::Wait) => {
                    // Every connection is in use: wait for one to be handed over.
                    let here = self.handoff.here();
                    let Some(offer) = self
                        .handoff
                        .wait(here, deadline, || self.shard_with_room().is_some())
                    else {
                        // One came back in the meantime.
                        tokio::task::yield_now().await;
                        continue;
                    };
                    match offer.await.map(Offer::open) {
                        Ok((Offered::Conn(mut conn, shard), home)) => {
                            let now = Instant::now();
                            match self.manager().vet(&mut conn, now, Duration::ZERO) {
                                Ok(()) => {
                                    conn.handed_off = Some(now);
                                    let lease = Lease {
                                        conn: Some(Held::Pooled(conn, home, shard)),
                                        _slot: None,
                                    };
                                    return Ok((lease, now));
                                }
                                // Its room is this client's: the next round opens a new one,
                                // unless it is another shard's whose own clients wait.
                                Err(_) => {
                                    drop(managed::Object::take(conn));
                                    if shard != here {
                                        home.room_made(shard);
                                    }
                                }
                            }
                        }
                        Ok((Offered::Retry, _)) => {}
                        // The sweeper ended the wait at its deadline.
                        Err(_) => return Err(PoolError::Timeout(TimeoutType::Wait)),
                    }
                }
                // While the upstream is down (restart, failover) new transactions wait here,
                // retrying with backoff, until acquire_timeout.
                e if is_transient(&e) && started.elapsed() + backoff < wait => {
                    Box::pin(tokio::time::sleep(backoff)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                e => return Err(e),
            }
        }
    }

    /// An idle connection of `shard`, or a new one; never waits for one to come back.
    pub(super) async fn open_in(
        &self,
        shard: usize,
        connect: Duration,
    ) -> Result<ServerObject, PoolError<ServerError>> {
        let now_or_new = Timeouts {
            wait: Some(Duration::ZERO),
            create: Some(connect),
            // Recycling never waits (the checks are non-blocking): no timer for it.
            recycle: None,
        };
        self.handoff.pool(shard).timeout_get(&now_or_new).await
    }

    /// A shard where a connection could be taken or opened now: this thread's first, then
    /// those where nobody waits. Clients inside `timeout_get` count as holding one: a false
    /// "no" is corrected by them (they ask again under the lock).
    fn shard_with_room(&self) -> Option<usize> {
        if self.limited.load(Ordering::Relaxed) {
            return Some(self.handoff.here());
        }
        self.handoff
            .lookup_order()
            .find(|&shard| has_room(self.handoff.pool(shard)))
    }

    /// [`Pool::take`] once a reload has shrunk the pool: the size limit first, then a shard
    /// with room, asking them in turn (the hand-off cannot tell whose slot a connection
    /// holds, so these clients wait in deadpool's own queues, a short while in each).
    async fn take_limited(
        &self,
        started: Instant,
        wait: Duration,
        connect: Duration,
    ) -> Result<(Lease, Instant), PoolError<ServerError>> {
        let slot =
            tokio::time::timeout(wait.saturating_sub(started.elapsed()), self.limit.acquire())
                .await
                .map_err(|_| PoolError::Timeout(TimeoutType::Wait))?;
        let mut backoff = Duration::from_millis(50);
        let mut shard = self.handoff.here();
        loop {
            let left = wait.saturating_sub(started.elapsed());
            // With several shards, each in turn gets a moment until the wait is over.
            let turn = if self.handoff.len() > 1 {
                left.min(Duration::from_millis(10))
            } else {
                left
            };
            let timeouts = Timeouts {
                wait: Some(turn),
                create: Some(connect),
                recycle: None,
            };
            match self.handoff.pool(shard).timeout_get(&timeouts).await {
                Ok(conn) => return Ok((self.lease(conn, shard, Some(slot)), Instant::now())),
                Err(PoolError::Timeout(TimeoutType::Wait)) if started.elapsed() < wait => {
                    shard = (shard + 1) % self.handoff.len();
                }
                Err(e) if is_transient(&e) && started.elapsed() + backoff < wait => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn acquire_error(&self, e: PoolError<ServerError>, wait: Duration) -> AcquireError {
        match e {
            PoolError::Timeout(TimeoutType::Wait) => {
                self.metrics.acquire_timeouts.inc();
                AcquireError::Exhausted {
                    pool: self.name(),
                    timeout: wait,
                    size: self.size(),
                }
            }
            PoolError::Timeout(_) => AcquireError::Server {
                pool: self.name(),
                source: ServerError::ConnectTimeout(self.name()),
            },
            PoolError::Backend(source) => AcquireError::Server {
                pool: self.name(),
                source,
            },
            PoolError::Closed | PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
                AcquireError::Closed(self.name())
            }
        }
    }

    /// Logs that clients wait long for a server connection, at most once a second.
    fn warn_slow_acquire(&self, waited: Duration) {
        let now = self.slow_epoch.elapsed().as_millis() as u64 + 1000;
        let last = self.last_slow_warning_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .last_slow_warning_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(pool = %self.name(), waited_ms = waited.as_millis() as u64,
                size = self.size(), "slow acquire: a client waited long for a server connection");
        }
    }
}

/// An idle connection of `pool`, taken in one poll: `None` when none is idle (or the last one
/// went to another client meanwhile).
pub(super) fn idle_now(
    pool: &managed::Pool<ShardManager>,
) -> Option<Result<ServerObject, PoolError<ServerError>>> {
    if pool.status().available == 0 {
        return None;
    }
    // Taking an idle connection completes in one poll (the permit is tried, the recycle
    // checks do not block). Pending means another client took the last idle one in the
    // meantime and this one started to open a connection: dropped, the caller waits.
    // A free permit is never one a waiting client is owed: this does not jump the queue.
    let mut get = std::pin::pin!(pool.timeout_get(&AT_ONCE));
    let polled = get
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
    match polled {
        std::task::Poll::Ready(Ok(conn)) => Some(Ok(conn)),
        std::task::Poll::Pending
        | std::task::Poll::Ready(Err(PoolError::Timeout(TimeoutType::Wait))) => None,
        std::task::Poll::Ready(Err(e)) if is_transient(&e) => None,
        std::task::Poll::Ready(Err(e)) => Some(Err(e)),
    }
}

/// Whether a connection could be taken or opened now in `pool`.
fn has_room(pool: &managed::Pool<ShardManager>) -> bool {
    let s = pool.status();
    s.size - s.available + s.waiting < s.max_size
}

/// Failures worth retrying while a client waits: the upstream is unreachable or restarting.
fn is_transient(e: &PoolError<ServerError>) -> bool {
    match e {
        PoolError::Timeout(TimeoutType::Create) => true,
        PoolError::Backend(e) => match e {
            ServerError::Connect { .. }
            | ServerError::ConnectTimeout(_)
            | ServerError::Closed
            | ServerError::Io(_) => true,
            // the database system is starting up / shutting down / in recovery
            ServerError::Postgres { code, .. } => {
                matches!(code.as_str(), "57P01" | "57P02" | "57P03")
            }
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    /// Under load nearly every client waits here, inside a boxed phase future: past 1,032 bytes
    /// that box leaves glibc's per-thread cache and costs several hundred instructions per
    /// transaction (benches/HISTORY.md, "Where the CPU goes"). Connecting, shrunk pools and
    /// backoff are boxed apart to keep this small: 464 bytes in debug builds, 1,816 before.
    #[tokio::test]
    async fn a_waiting_clients_acquire_stays_small() {
        let app = crate::app::App::for_tests();
        let pool = app.pools.get("app", "app").expect("the pool exists");
        let wait = pool.acquire(std::time::Instant::now());
        let size = std::mem::size_of_val(&wait);
        assert!(size <= 512, "Pool::acquire's future grew to {size} bytes");
    }
}
