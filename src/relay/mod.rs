//! Moving messages both ways while a client holds a server connection.
//!
//! Server → client bytes wait in a [`Flow`] and go out untouched (only message headers are
//! read, plus the few bodies the [`Tracker`] needs); large messages stream through without
//! being buffered whole. Client → server messages are copied into an outgoing buffer
//! ([`ToServer`]), where the tracker may rewrite or add messages. The loop waits on both
//! sockets at once, so server messages (NOTIFY, notices, Flush replies) reach the client the
//! moment they arrive, and a full buffer stops reading from its source (backpressure).
//! Buffers come from a per-thread spare list ([`buffers`]) and go back to it when the
//! client goes idle.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Buf;
use tokio::time::Sleep;

use crate::clients::{ClientEntry, Kill};
use crate::limits::{IdleKind, IdleTimeouts};
use crate::protocol::frame::{self, HEADER_LEN};
use crate::session::state::ServerSession;
use crate::session::tracker::{needs_body, Ctx, Step, Tracker};
use crate::socket::Socket;

mod buffers;
mod flow;

pub use flow::{Flow, ToServer};

/// Why a client's message stream was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid message length {0}")]
    BadLength(i32),
    #[error(
        "message of {size} bytes exceeds the limit of {limit} bytes (limits.max_message_size)"
    )]
    TooLarge { size: usize, limit: usize },
    #[error("invalid frontend message type {0:?}")]
    UnknownType(char),
}

/// What scanning the client's bytes found.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// Everything complete is scanned; wait for more bytes.
    NeedMore,
    /// Terminate is next; it and anything after it are not forwarded.
    Terminate,
}

/// The validated header of the client message at the start of `buf`: type and total size.
/// `Ok(None)` until the header has arrived.
fn client_header(buf: &[u8], max_message: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    let Some((tag, total)) = frame::header(buf) else {
        return Ok(None);
    };
    let total = total.map_err(|e| ProtocolError::BadLength(e.0))?;
    if !frame::is_frontend_type(tag) {
        return Err(ProtocolError::UnknownType(tag as char));
    }
    if total - 1 > max_message {
        return Err(ProtocolError::TooLarge {
            size: total - 1,
            limit: max_message,
        });
    }
    Ok(Some((tag, total)))
}

/// Scans client bytes into `c2s.out`: validates headers; the tracker reads (and may rewrite)
/// the messages that matter to session state, everything else is copied as it arrives.
pub fn scan_client(
    c2s: &mut ToServer,
    tracker: &mut Tracker,
    server: &mut ServerSession,
    ctx: &Ctx<'_>,
    max_message: usize,
) -> Result<ClientEvent, ProtocolError> {
    buffers::fill(&mut c2s.out);
    loop {
        if c2s.skip > 0 {
            let n = c2s.skip.min(c2s.input.len());
            c2s.out.extend_from_slice(&c2s.input[..n]);
            c2s.input.advance(n);
            c2s.skip -= n;
            if c2s.skip > 0 {
                return Ok(ClientEvent::NeedMore);
            }
        }
        let Some((tag, total)) = client_header(&c2s.input, max_message)? else {
            return Ok(ClientEvent::NeedMore);
        };
        if tag == b'X' {
            return Ok(ClientEvent::Terminate);
        }
        if ctx.tracking && needs_body(tag) {
            if c2s.input.len() < total {
                c2s.input.reserve(total - c2s.input.len());
                return Ok(ClientEvent::NeedMore);
            }
            tracker.client_message(tag, &c2s.input[..total], &mut c2s.out, server, ctx);
            c2s.input.advance(total);
            continue;
        }
        tracker.client_header(tag, ctx);
        let n = total.min(c2s.input.len());
        c2s.out.extend_from_slice(&c2s.input[..n]);
        c2s.input.advance(n);
        c2s.skip = total - n;
    }
}

/// What scanning the server's bytes found.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerEvent {
    NeedMore,
    /// The transaction ended; the server connection may go back to the pool once the ready
    /// bytes reach the client.
    Release,
    /// Statement mode: the server entered a transaction block. The offending ReadyForQuery is
    /// the next unscanned message.
    TransactionInStatementMode,
    /// The server sent a malformed header; the connection cannot be trusted.
    Corrupt,
}

/// Scans server bytes: asks the tracker about each message, swallows pgtether's own replies
/// and puts synthesized ones in their place.
pub fn scan_server(
    s2c: &mut Flow,
    tracker: &mut Tracker,
    server: &mut ServerSession,
    ctx: &Ctx<'_>,
) -> ServerEvent {
    loop {
        emit_synthesized(s2c, tracker);
        if !s2c.pass_through() {
            return ServerEvent::NeedMore;
        }
        let rest = &s2c.buf[s2c.ready..];
        let Some((tag, total)) = frame::header(rest) else {
            return ServerEvent::NeedMore;
        };
        let Ok(total) = total else {
            return ServerEvent::Corrupt;
        };
        if tag == b'Z' && total != HEADER_LEN + 1 {
            return ServerEvent::Corrupt;
        }
        if tracker.server_needs_body(tag) && rest.len() < total {
            s2c.buf.reserve(total - rest.len());
            return ServerEvent::NeedMore;
        }
        let step = tracker.server_message(tag, &rest[..total.min(rest.len())], server, ctx);
        match step {
            Step::Forward => s2c.forward(total),
            Step::Swallow => s2c.remove_next(total),
            Step::ForwardAndRelease => {
                s2c.forward(total);
                emit_synthesized(s2c, tracker);
                return ServerEvent::Release;
            }
            Step::TransactionInStatementMode => return ServerEvent::TransactionInStatementMode,
        }
    }
}

/// Puts every synthesized reply that is now due into the client's stream.
///
/// Asked before every server message, and most often nothing is queued: that check is inlined
/// into the scan loop, and the insertion (which needs many registers, so a call to it saves
/// and restores them) is called only when there is something to insert.
#[inline(always)]
fn emit_synthesized(s2c: &mut Flow, tracker: &mut Tracker) {
    if tracker.replies.has_synth() {
        insert_synthesized(s2c, tracker);
    }
}

#[inline(never)]
fn insert_synthesized(s2c: &mut Flow, tracker: &mut Tracker) {
    while let Some(msg) = tracker.pop_synth() {
        s2c.insert_ready(msg);
    }
}

/// How a relay session ended.
#[derive(Debug)]
pub enum Outcome {
    /// The transaction ended; the server connection is clean and can be released.
    Released,
    /// The client sent Terminate.
    Terminated,
    /// The client's socket closed or failed.
    ClientGone,
    /// The client broke the protocol.
    ClientProtocol(ProtocolError),
    /// The server closed, failed, or sent garbage.
    ServerGone,
    /// Statement mode refused a transaction block.
    TransactionInStatementMode,
    /// A takeover asked this client (pinned, or in session mode) to move with its server
    /// connection, and it is between transactions with nothing in flight.
    HandOver,
    /// The client sent nothing for longer than its idle timeout while the server waited for
    /// it (`Transaction`: inside a transaction block).
    IdleTimeout(IdleKind, Duration),
    /// KILL, or a shutdown out of time: the relay stopped wherever it was.
    Killed,
}

/// The two sockets and their buffers for one attachment.
pub struct Relay<'a> {
    pub client: &'a Socket,
    pub server: &'a Socket,
    pub server_session: &'a mut ServerSession,
    pub c2s: &'a mut ToServer,
    pub s2c: &'a mut Flow,
    pub tracker: &'a mut Tracker,
    pub ctx: &'a Ctx<'a>,
    pub max_message: usize,
    /// Whose hand-over requests stop the relay at the next transaction boundary.
    pub entry: &'a ClientEntry,
    pub idle: IdleTimeouts,
    /// The ready bytes are only replies pgtether gave itself, held until the server's reply
    /// they precede arrives (see `after_client_read`).
    pub held: bool,
}

impl Relay<'_> {
    /// Relays until the server can be released or either side ends.
    pub async fn run(&mut self) -> Outcome {
        // The client bytes that made us acquire the server are already buffered.
        if let Some(out) = self.after_client_read() {
            return out;
        }
        let mut hand_over = false;
        // Bytes from either side were last seen then; only kept while an idle timeout is on.
        let mut last_seen = (!self.idle.is_off()).then(Instant::now);
        // Armed only while an idle timeout runs, and re-armed rather than rebuilt.
        let mut timer: Option<Pin<Box<Sleep>>> = None;
        loop {
            if hand_over && self.at_rest() {
                match self.entry.kill_requested() {
                    Kill::HandOver => return Outcome::HandOver,
                    // The takeover was called off: listen for the next one.
                    Kill::None => hand_over = false,
                    // Stronger requests are handled around the relay.
                    _ => {}
                }
            }
            let idle = last_seen.and_then(|since| self.idle_deadline(since));
            if let Some((_, _, at)) = idle {
                crate::limits::arm_timer(&mut timer, at);
            }
            let mut ticking = if idle.is_some() { timer.as_mut() } else { None };
            let wants = Wants {
                server_in: self.s2c.has_room(),
                client_out: (self.s2c.ready > 0 && !self.held) || self.client.has_pending_output(),
                server_out: self.c2s.has_output() || self.server.has_pending_output(),
                // Once a hand-over is due, only a kill that ends the relay now still matters.
                kill: if hand_over {
                    Kill::Terminate
                } else {
                    Kill::HandOver
                },
                client_in: self.c2s.has_room(),
            };
            let (client, server, entry) = (self.client, self.server, self.entry);
            let event = std::future::poll_fn(|cx| {
                poll_event(cx, &wants, client, server, entry, ticking.as_deref_mut())
            })
            .await;
            match event {
                Event::ServerReadable(r) => {
                    if r.is_err() {
                        return Outcome::ServerGone;
                    }
                    match self.s2c.try_read(self.server) {
                        Ok(0) => return Outcome::ServerGone,
                        Ok(_) => {
                            touch(&mut last_seen);
                            if let Some(out) = self.after_server_read() {
                                return out;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return Outcome::ServerGone,
                    }
                }
                Event::ClientWritable(r) => {
                    if r.is_err() || !self.write_client() {
                        return Outcome::ClientGone;
                    }
                }
                Event::ServerWritable(r) => {
                    if r.is_err() || self.c2s.try_write(self.server).is_err() {
                        return Outcome::ServerGone;
                    }
                }
                Event::HandOver => hand_over = true,
                Event::Killed => return Outcome::Killed,
                Event::ClientReadable(r) => {
                    if r.is_err() {
                        return Outcome::ClientGone;
                    }
                    match self.c2s.try_read(self.client) {
                        Ok(0) => return Outcome::ClientGone,
                        Ok(n) => {
                            touch(&mut last_seen);
                            self.tracker.counts.received += n as u64;
                            if let Some(out) = self.after_client_read() {
                                return out;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return Outcome::ClientGone,
                    }
                }
                Event::Deadline => {
                    if let Some((kind, limit, _)) = idle {
                        return Outcome::IdleTimeout(kind, limit);
                    }
                }
            }
        }
    }

    /// Between transactions, every byte delivered both ways, nothing half-read.
    fn at_rest(&self) -> bool {
        self.tracker.at_rest()
            && self.s2c.buf.is_empty()
            && self.s2c.skip == 0
            && self.c2s.out.is_empty()
            && self.c2s.skip == 0
    }

    /// When the client's idle timeout runs out, if the server is waiting for the client now:
    /// it answered everything (no ReadyForQuery due, no unsynced extended messages, as
    /// PostgreSQL's own idle timeouts count from ReadyForQuery) and nothing waits to go to it.
    fn idle_deadline(&self, since: Instant) -> Option<(IdleKind, Duration, Instant)> {
        let tx = self.tracker.tx;
        if tx.pending > 0 || tx.unsynced || self.c2s.has_output() {
            return None;
        }
        let (kind, limit) = self.idle.for_status(tx.status)?;
        Some((kind, limit, since + limit))
    }

    fn after_client_read(&mut self) -> Option<Outcome> {
        let event = scan_client(
            self.c2s,
            self.tracker,
            self.server_session,
            self.ctx,
            self.max_message,
        );
        // Forward at once; the socket is almost always writable, which saves a poll.
        if self.c2s.try_write(self.server).is_err() {
            return Some(Outcome::ServerGone);
        }
        // Replies pgtether gives itself may be due right away (e.g. Close with nothing
        // outstanding before it).
        if !self.s2c.has_unscanned() {
            let before = self.s2c.ready;
            emit_synthesized(self.s2c, self.tracker);
            // Sent alone, they would cost a send here and a wakeup of the client, which
            // cannot act before the server's reply anyway: while the server owes a
            // ReadyForQuery (a Sync or Query follows them), they go out with its reply.
            let only_ours = before == 0 || self.held;
            if only_ours && self.s2c.ready > 0 && self.tracker.tx.pending > 0 {
                self.held = true;
            } else if !self.write_client() {
                return Some(Outcome::ClientGone);
            }
        }
        match event {
            Ok(ClientEvent::NeedMore) => None,
            Ok(ClientEvent::Terminate) => Some(Outcome::Terminated),
            Err(e) => Some(Outcome::ClientProtocol(e)),
        }
    }

    /// Writes what the client is owed without waiting; false if the client socket failed.
    fn write_client(&mut self) -> bool {
        match self.s2c.try_write(self.client) {
            Ok(n) => {
                self.tracker.counts.sent += n as u64;
                true
            }
            Err(_) => false,
        }
    }

    fn after_server_read(&mut self) -> Option<Outcome> {
        self.held = false;
        let event = scan_server(self.s2c, self.tracker, self.server_session, self.ctx);
        // While other clients of this thread wait for a server connection, the reply that ends
        // a transaction goes out after the release (the idle client flushes it first, batched
        // with other replies: see `wait_for_work`), so the next client need not wait for this
        // write. (Only this thread's waiting clients are counted: reading the other threads'
        // counts would take their cache lines from the cores that write them.)
        let defer = matches!(event, ServerEvent::Release) && self.ctx.metrics.waiting_here();
        if !defer && !self.write_client() {
            return Some(Outcome::ClientGone);
        }
        match event {
            ServerEvent::NeedMore => None,
            ServerEvent::Release => Some(Outcome::Released),
            ServerEvent::TransactionInStatementMode => Some(Outcome::TransactionInStatementMode),
            ServerEvent::Corrupt => Some(Outcome::ServerGone),
        }
    }
}

/// What the relay waits for in one turn of its loop.
struct Wants {
    server_in: bool,
    client_out: bool,
    server_out: bool,
    /// The least urgent kill request that wakes the relay.
    kill: Kill,
    client_in: bool,
}

/// What woke the relay.
enum Event {
    ServerReadable(io::Result<()>),
    ClientWritable(io::Result<()>),
    ServerWritable(io::Result<()>),
    HandOver,
    Killed,
    ClientReadable(io::Result<()>),
    Deadline,
}

/// One poll of everything the relay waits for, in priority order: the server's reply is
/// handled before a client readiness that may be stale, so a transaction usually ends (and
/// releases) without a wasted read. Polled by hand rather than through `select!`: the sockets'
/// single waker slots cost no futures to build, register and tear down on every turn.
fn poll_event(
    cx: &mut Context<'_>,
    wants: &Wants,
    client: &Socket,
    server: &Socket,
    entry: &ClientEntry,
    timer: Option<&mut Pin<Box<Sleep>>>,
) -> Poll<Event> {
    if wants.server_in {
        if let Poll::Ready(r) = server.poll_readable(cx) {
            return Poll::Ready(Event::ServerReadable(r));
        }
    }
    if wants.client_out {
        if let Poll::Ready(r) = client.poll_writable(cx) {
            return Poll::Ready(Event::ClientWritable(r));
        }
    }
    if wants.server_out {
        if let Poll::Ready(r) = server.poll_writable(cx) {
            return Poll::Ready(Event::ServerWritable(r));
        }
    }
    if let Poll::Ready(kill) = entry.poll_killed(cx, wants.kill) {
        return Poll::Ready(if kill >= Kill::Terminate {
            Event::Killed
        } else {
            Event::HandOver
        });
    }
    if wants.client_in {
        if let Poll::Ready(r) = client.poll_readable(cx) {
            return Poll::Ready(Event::ClientReadable(r));
        }
    }
    if let Some(timer) = timer {
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Event::Deadline);
        }
    }
    Poll::Pending
}

/// Marks activity now, when idle timeouts are on.
#[inline]
fn touch(last_seen: &mut Option<Instant>) {
    if let Some(t) = last_seen {
        *t = Instant::now();
    }
}

/// Drops the held ReadyForQuery (statement mode) from the front of the unscanned bytes.
pub fn drop_held_ready_for_query(s2c: &mut Flow) {
    s2c.remove_next(HEADER_LEN + 1);
}

#[cfg(test)]
mod hostile;
#[cfg(test)]
mod tests;
