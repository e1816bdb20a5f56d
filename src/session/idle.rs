//! A logged-in client between transactions: it holds no server connection and no buffers,
//! and waits for its next message, an admin's or a takeover's request, or its idle timeout.

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;

use super::{aborted, protocol_error, Client, SessionError};
use crate::clients::Kill;

/// What woke an idle client.
enum Woken {
    Kill,
    Readable(std::io::Result<()>),
    Deadline,
}

/// What an idle client does next.
pub(super) enum Work {
    /// A message arrived: start a transaction.
    Go,
    /// The client left (Terminate, EOF or a socket error).
    Done,
    /// A takeover asked it to move to the other process.
    HandOver,
    /// An admin command or shutdown asked it to end.
    Killed(Kill),
    /// It sent nothing for `limits.client_idle_timeout`.
    IdleTimeout(Duration),
}

impl Client<'_> {
    /// Answers buffered client messages of a failed transaction. False on Terminate.
    pub(super) fn answer_aborted(&mut self) -> Result<bool, SessionError> {
        let mut out = BytesMut::new();
        let mut go_on = true;
        while let Some(aborted) = self.aborted.as_mut() {
            let Some(msg) = self
                .c2s
                .next_message(self.max_message as usize)
                .map_err(protocol_error)?
            else {
                break;
            };
            match aborted.answer(&msg, &mut out) {
                aborted::After::StillAborted => {}
                aborted::After::Ended => self.aborted = None,
                aborted::After::Terminate => {
                    go_on = false;
                    break;
                }
            }
        }
        self.s2c.push_ready(&out);
        Ok(go_on)
    }

    /// Idle: flushes what the client is owed, drops buffers, and waits for the start of the
    /// client's next message (or an admin's request to end).
    pub(super) async fn wait_for_work(&mut self) -> Work {
        if self.s2c.has_ready() {
            // A reply the relay held back because others wait for a server connection (or
            // one the client's socket had no room for): it goes out after the other tasks
            // ready on this thread ran, with theirs. A client reading from many connections
            // at once (pgbench, an application server's event loop) then finds several
            // replies per wakeup instead of one.
            tokio::task::yield_now().await;
        }
        if self.s2c.flush(self.stream).await.is_err() {
            return Work::Done;
        }
        self.c2s.shrink_if_empty();
        self.s2c.shrink_if_empty();
        // A client answering a failed transaction itself moves once that ends.
        let movable = self.aborted.is_none();
        let wake_on = if movable {
            Kill::HandOver
        } else {
            Kill::ShutdownWhenIdle
        };
        let idle_limit = self.idle.for_status(b'I').map(|(_, limit)| limit);
        let mut deadline = idle_limit.map(|limit| std::time::Instant::now() + limit);
        let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            match self.entry.kill_requested() {
                Kill::None => {}
                Kill::HandOver if movable => return Work::HandOver,
                Kill::HandOver => {}
                kill => return Work::Killed(kill),
            }
            // Whether the next message is one to drop unanswered.
            let drop_next = match self.c2s.next_tag() {
                Some(b'X') => return Work::Done,
                // pgtether answers a failed transaction itself, a whole message at a time.
                Some(_) if self.aborted.is_some() && !self.c2s.has_whole_message() => false,
                // Outside COPY PostgreSQL ignores CopyData, CopyDone and CopyFail (a client
                // whose COPY failed may still be sending): they take no server connection.
                Some(b'c' | b'd' | b'f')
                    if self.aborted.is_none() && self.c2s.has_whole_message() =>
                {
                    true
                }
                // Nor does a Flush between transactions: the server has nothing to send. (One
                // with a body goes on, for PostgreSQL's 08P01.)
                Some(b'H') if self.aborted.is_none() && self.c2s.next_is_bodiless() => true,
                Some(_) => return Work::Go,
                None => false,
            };
            if drop_next {
                match self.c2s.next_message(self.max_message as usize) {
                    Ok(_) => continue,
                    // The relay reports the violation.
                    Err(_) => return Work::Go,
                }
            }
            if let Some(at) = deadline {
                crate::limits::arm_timer(&mut timer, at);
            }
            let (entry, stream) = (&self.entry, self.stream);
            // Polled by hand: an idle client keeps no futures, only a waker in each slot.
            let woken = std::future::poll_fn(|cx| {
                if entry.poll_killed(cx, wake_on).is_ready() {
                    return Poll::Ready(Woken::Kill);
                }
                if let Poll::Ready(r) = stream.poll_readable(cx) {
                    return Poll::Ready(Woken::Readable(r));
                }
                if let Some(t) = timer.as_mut() {
                    if t.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Woken::Deadline);
                    }
                }
                Poll::Pending
            })
            .await;
            match woken {
                Woken::Kill => continue,
                Woken::Readable(Ok(())) => {}
                Woken::Readable(Err(_)) => return Work::Done,
                Woken::Deadline => return Work::IdleTimeout(idle_limit.unwrap_or_default()),
            }
            match self.c2s.try_read_idle(self.stream) {
                Ok(0) => return Work::Done,
                Ok(n) => {
                    self.tracker.counts.received += n as u64;
                    deadline = idle_limit.map(|limit| std::time::Instant::now() + limit);
                }
                // Readiness was stale: give back the read buffer before waiting again.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.c2s.shrink_if_empty(),
                Err(_) => return Work::Done,
            }
        }
    }
}
