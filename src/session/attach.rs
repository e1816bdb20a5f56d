//! A server connection becoming a client's and going back: the pool, the PAUSE gate, the
//! gauges and `SHOW CLIENTS`, and the cancel target follow each change.

use std::time::Instant;

use tracing::warn;

use super::{aborted, tracker_ctx, Active, Client, SessionError};
use crate::clients::{Activity, Kill};
use crate::metrics::ClientState;
use crate::pool::Lease;
use crate::protocol::sqlstate;

impl Client<'_> {
    /// A client that got no server connection.
    pub(super) fn attach_failed(&mut self, e: SessionError) -> Active {
        if !matches!(e, SessionError::Acquire(_)) {
            return Active::End(Err(e));
        }
        // No server connection (pool exhausted, upstream down): the statement fails, the
        // client stays connected and can retry.
        self.set_idle();
        let code = e.sqlstate().unwrap_or(sqlstate::CLIENT_CANNOT_CONNECT);
        warn!(pool = %self.pool.name(), error = %e, "no server connection for a client");
        self.aborted = Some(Box::new(aborted::Aborted::unavailable(code, e.to_string())));
        Active::Idle
    }

    pub(super) async fn attach(&mut self) -> Result<Lease, SessionError> {
        self.gauge.set(ClientState::Waiting);
        let started = Instant::now();
        let started_us = self.entry.clients().us_at(started);
        self.entry.set_wait_since(started_us);
        // PAUSE holds new transactions here. Marking this client as waiting before looking at
        // the gate lets PAUSE see it if it does not see the pause (see crate::pause).
        self.entry.set_activity(Activity::Waiting);
        if self.app.pause.is_paused(&self.pool.database) {
            // Boxed: a rare wait, kept out of every waiting client's future.
            Box::pin(self.paused()).await?;
        }
        let acquired = tokio::select! {
            biased;
            r = self.pool.acquire(started) => r,
            kill = self.entry.killed(Kill::ShutdownWhenIdle) => return Err(SessionError::Killed(kill)),
        };
        let (mut conn, now) = acquired?;
        self.entry.set_request(started_us);
        self.attached(&mut conn, now);
        Ok(conn)
    }

    /// Waits while PAUSE holds this client's database.
    async fn paused(&self) -> Result<(), SessionError> {
        loop {
            self.entry.set_activity(Activity::Paused);
            tokio::select! {
                _ = self.app.pause.wait_until_resumed(&self.pool.database) => {}
                kill = self.entry.killed(Kill::ShutdownWhenIdle) => return Err(SessionError::Killed(kill)),
            }
            self.entry.set_activity(Activity::Waiting);
            if !self.app.pause.is_paused(&self.pool.database) {
                return Ok(());
            }
        }
    }

    /// [`Client::attach`] when nothing makes the client wait: it is not asked to stop, its
    /// database is not paused and the pool has an idle connection. `None`: call `attach`.
    pub(super) fn attach_now(&mut self) -> Option<Result<Lease, SessionError>> {
        // Clients of this thread waiting means its shard has no idle connection: skip the look.
        if self.pool.metrics.waiting_here() || self.entry.kill_requested() >= Kill::ShutdownWhenIdle
        {
            return None;
        }
        // As in `attach`: waiting is published before the gate is looked at.
        self.entry.set_activity(Activity::Waiting);
        if self.app.pause.is_paused(&self.pool.database) {
            return None;
        }
        let mut conn = match self.pool.try_acquire_now()? {
            Ok(conn) => conn,
            Err(e) => return Some(Err(e.into())),
        };
        let now = Instant::now();
        self.entry.set_request(self.entry.clients().us_at(now));
        self.attached(&mut conn, now);
        Some(Ok(conn))
    }

    /// Bookkeeping of a server connection becoming this client's (`now`), and the settings
    /// that make it match the client's session.
    pub(super) fn attached(&mut self, conn: &mut Lease, now: Instant) {
        conn.come_home();
        self.gauge.set(ClientState::Active);
        self.attached_at = Some(now);
        self.entry.set_wait_since(0);
        self.entry.set_server_pid(conn.cancel.pid);
        self.entry.set_activity(Activity::Active);
        self.cancel.slot.set(Some(conn.cancel));
        let ctx = tracker_ctx(self.app, &self.pool, self.policy);
        self.tracker.attach(&mut conn.session, self.c2s.out(), &ctx);
    }

    /// Back to idle in the gauges and in `SHOW CLIENTS`.
    pub(super) fn set_idle(&mut self) {
        if let Some(since) = self.attached_at.take() {
            self.pool
                .metrics
                .transaction_seconds
                .observe(since.elapsed().as_secs_f64());
        }
        self.gauge.set(ClientState::Idle);
        self.entry.set_server_pid(0);
        self.entry.set_activity(Activity::Idle);
    }

    /// Gives a clean server connection back to the pool.
    /// (`settled`: no cancel is on its way to it; the caller cleared the cancel target.)
    pub(super) fn detach(&mut self, conn: Lease, settled: bool) {
        self.tracker.release_memory();
        self.set_idle();
        if !settled
            || self.s2c.has_unscanned()
            || self.tracker.server_dirty
            || self.pool.is_outdated(&conn)
        {
            // The server sent more after its final ReadyForQuery, or pgtether's own settings
            // failed to apply: it is not in a known state. Or RECONNECT asked for a new one,
            // or a cancel sent for this client did not reach the server in time.
            conn.discard();
        }
    }
}
