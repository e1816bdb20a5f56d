//! Ending an attachment other than by a clean release: the client left or broke off mid-way,
//! the server connection died, or statement mode refused a transaction block. A server
//! connection goes back to the pool only in a known, clean state; otherwise it is closed.

use std::time::Duration;

use bytes::BytesMut;
use tracing::{debug, warn};

use super::{aborted, write_all, Client, SessionError};
use crate::config::PoolMode;
use crate::pool::Lease;
use crate::protocol::backend::{self, Severity};
use crate::protocol::sqlstate;
use crate::relay::drop_held_ready_for_query;

/// How long cleaning a server connection after its client left may take before it is closed.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes a server connection that may still be running its client's work, after stopping
/// that work (see [`ServerConn::stop_backend`]): otherwise a `pg_sleep(3600)` or a lock wait
/// would go on outside the pool's size, and clients that vanish mid-query could pile up
/// backends until the server's `max_connections`. The connection counts against the pool
/// until its backend is gone. The cancels can reach no one else: it is never reused.
pub(super) fn discard_busy(mut conn: Lease) {
    tokio::spawn(async move {
        conn.stop_backend(CLEANUP_TIMEOUT).await;
        conn.discard();
    });
}

impl Client<'_> {
    /// The server connection died under this client (database restart, failover, a killed
    /// backend). A transaction-mode client keeps its connection and session: the work in
    /// flight fails with 08006 and, inside a transaction block, the transaction stays failed
    /// until the client ends it. State that lived only on that server (session mode, pins)
    /// is gone, which the client is told with FATAL.
    pub(super) async fn server_lost(&mut self) -> Option<Result<(), SessionError>> {
        let tx = self.tracker.tx;
        let reason = self
            .tracker
            .take_server_fatal()
            .unwrap_or_else(|| "the server closed the connection".to_string());
        let pins = self.tracker.session.pins().reasons();
        self.tracker.detach();
        self.cancel.slot.set(None);
        self.set_idle();
        warn!(pool = %self.pool.name(), %reason, "server connection lost while attached");
        if self.policy.mode == PoolMode::Session || !pins.is_empty() {
            let lost = if pins.is_empty() {
                "the session (session pooling)".to_string()
            } else {
                pins.iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Some(Err(SessionError::StateLost(format!(
                "server connection lost ({reason}); session state that lived on it is gone: {lost}"
            ))));
        }
        let in_block = tx.status != b'I';
        if tx.pending > 0 || tx.unsynced {
            let mut out = BytesMut::with_capacity(256);
            backend::error_response(
                &mut out,
                Severity::Error,
                sqlstate::CONNECTION_FAILURE,
                &format!("server connection lost during the transaction ({reason}); the transaction was rolled back"),
                Some("Run ROLLBACK if inside a transaction block, then retry; the connection remains usable."),
            );
            for _ in 0..tx.pending {
                backend::ready_for_query(&mut out, if in_block { b'E' } else { b'I' });
            }
            self.s2c.push_ready(&out);
            if tx.unsynced {
                self.aborted = Some(Box::new(aborted::Aborted::skipping_to_sync(in_block)));
                return None;
            }
        }
        if in_block {
            self.aborted = Some(Box::new(if tx.pending > 0 || tx.unsynced {
                aborted::Aborted::default()
            } else {
                aborted::Aborted::lost(reason)
            }));
        }
        None
    }

    /// The client left while holding `conn`: make the connection clean for the next client
    /// (roll back, and DISCARD ALL in session mode) or close it.
    pub(super) async fn finish_server(&mut self, mut conn: Lease) {
        self.cancel.slot.set(None);
        let session = self.pool.mode() == PoolMode::Session;
        let tx = self.tracker.tx;
        // State that cannot move (temp tables, locks, LISTEN …) must not reach the next
        // client: a pinned session is discarded like a session-mode one.
        let discard = session || self.tracker.session.pins().is_pinned();
        let owes_nothing = tx.pending == 0
            && !tx.unsynced
            && self.tracker.replies.is_empty()
            && !self.s2c.has_unscanned()
            && !self.tracker.server_dirty;
        let clean = owes_nothing && {
            let cleanup = async {
                if tx.status != b'I' && conn.run_discarding("ROLLBACK").await.is_err() {
                    return false;
                }
                !discard || conn.run_discarding("DISCARD ALL").await.is_ok()
            };
            tokio::time::timeout(CLEANUP_TIMEOUT, cleanup)
                .await
                .unwrap_or(false)
        };
        self.tracker.detach();
        if discard {
            conn.session.reset();
        }
        let clean = clean && (!self.cancel.slot.clear() || self.cancel.slot.settle().await);
        if !clean {
            debug!(pool = %self.pool.name(), "closing server connection left dirty by its client");
            discard_busy(conn);
        }
    }

    /// Statement mode: the client opened a transaction block. Roll it back, tell the client,
    /// and hand the connection back.
    pub(super) async fn refuse_transaction_block(
        &mut self,
        mut conn: Lease,
    ) -> Result<(), SessionError> {
        // Everything before the offending ReadyForQuery goes out; that message does not.
        let _ = self.s2c.flush(self.stream).await;
        drop_held_ready_for_query(&mut self.s2c);
        self.tracker.tx.pending = self.tracker.tx.pending.saturating_sub(1);
        let pipelined = self.tracker.tx.pending > 0 || self.tracker.tx.unsynced;
        let rolled_back = !pipelined
            && tokio::time::timeout(CLEANUP_TIMEOUT, conn.run_discarding("ROLLBACK"))
                .await
                .is_ok_and(|r| r.is_ok());
        self.tracker.detach();
        let rolled_back =
            rolled_back && (!self.cancel.slot.clear() || self.cancel.slot.settle().await);
        self.set_idle();
        if !rolled_back {
            conn.discard();
        }
        let message = format!(
            "transaction blocks are not allowed in statement pooling mode (pool \"{}\"); the transaction was rolled back",
            self.pool.name()
        );
        let hint =
            "Run each statement on its own, or use mode = \"transaction\" for this database.";
        let mut out = BytesMut::with_capacity(256);
        if pipelined {
            return Err(SessionError::Protocol(message));
        }
        backend::error_response(
            &mut out,
            Severity::Error,
            sqlstate::FEATURE_NOT_SUPPORTED,
            &message,
            Some(hint),
        );
        backend::ready_for_query(&mut out, b'I');
        write_all(self.stream, &out)
            .await
            .map_err(|_| SessionError::ClientGone)?;
        warn!(pool = %self.pool.name(), "refused a transaction block in statement mode");
        Ok(())
    }
}
