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

use bytes::{Buf, BytesMut};
use tokio::time::Sleep;

use crate::clients::{ClientEntry, Kill};
use crate::limits::{IdleKind, IdleTimeouts};
use crate::protocol::frame::{self, HEADER_LEN};
use crate::session::state::ServerSession;
use crate::session::tracker::{needs_body, Ctx, Step, Tracker};
use crate::socket::Socket;

mod buffers;

/// Read granularity; also the smallest spare room kept before a read.
const READ_CHUNK: usize = buffers::SIZE;
/// A direction stops reading from its source while this many bytes wait to be written.
const HIGH_WATER: usize = 256 * 1024;

/// Server → client bytes: the leading `ready` bytes are scanned and may be written.
#[derive(Default)]
pub struct Flow {
    buf: BytesMut,
    ready: usize,
    /// Body bytes of a pass-through message still to arrive; forwarded as they come.
    skip: usize,
}

impl Flow {
    /// Whether scanned bytes wait to be written.
    pub fn has_ready(&self) -> bool {
        self.ready > 0
    }

    /// Whether unscanned bytes are buffered (a partial or unprocessed message).
    pub fn has_unscanned(&self) -> bool {
        self.buf.len() > self.ready
    }

    fn has_room(&self) -> bool {
        self.buf.len() < HIGH_WATER
    }

    /// Reads what the socket has without waiting. `Ok(0)` means end of stream.
    fn try_read(&mut self, from: &Socket) -> io::Result<usize> {
        buffers::fill(&mut self.buf);
        if self.buf.capacity() - self.buf.len() < READ_CHUNK {
            self.buf.reserve(READ_CHUNK);
        }
        from.try_read_buf(&mut self.buf)
    }

    /// Writes ready bytes without waiting; returns how many went out.
    pub fn try_write(&mut self, to: &Socket) -> io::Result<usize> {
        if self.ready == 0 {
            // Encrypted bytes of earlier writes may still wait (TLS).
            to.flush_pending()?;
            return Ok(0);
        }
        match to.try_write(&self.buf[..self.ready]) {
            Ok(n) => {
                self.buf.advance(n);
                self.ready -= n;
                if self.buf.is_empty() && self.buf.capacity() > HIGH_WATER {
                    // A huge message grew the buffer; do not keep that memory around.
                    self.buf = BytesMut::new();
                }
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Writes every ready byte, waiting for the socket as needed.
    pub async fn flush(&mut self, to: &Socket) -> io::Result<()> {
        while self.ready > 0 || to.has_pending_output() {
            // Polled by hand: this wait is part of every idle client's state, and a readiness
            // future would enlarge it.
            std::future::poll_fn(|cx| to.poll_writable(cx)).await?;
            self.try_write(to)?;
        }
        Ok(())
    }

    /// Removes `n` unscanned bytes right after the ready region (a swallowed message).
    fn remove_next(&mut self, n: usize) {
        let len = self.buf.len();
        self.buf.copy_within(self.ready + n..len, self.ready);
        self.buf.truncate(len - n);
    }

    /// Inserts a message pgtether synthesizes right after the ready region, ready to go.
    fn insert_ready(&mut self, msg: &[u8]) {
        // A spare buffer: one grown from nothing here would be reallocated by the next read.
        buffers::fill(&mut self.buf);
        let len = self.buf.len();
        self.buf.resize(len + msg.len(), 0);
        self.buf
            .copy_within(self.ready..len, self.ready + msg.len());
        self.buf[self.ready..self.ready + msg.len()].copy_from_slice(msg);
        self.ready += msg.len();
    }

    /// Appends a message pgtether sends on its own (when nothing unscanned is buffered).
    pub fn push_ready(&mut self, msg: &[u8]) {
        self.insert_ready(msg);
    }

    /// Releases the buffer's memory when nothing is buffered; idle clients hold no buffers.
    pub fn shrink_if_empty(&mut self) {
        buffers::give_back(&mut self.buf);
    }

    /// Advances over pass-through body bytes that have arrived. False if more are due.
    fn pass_through(&mut self) -> bool {
        if self.skip > 0 {
            let n = self.skip.min(self.buf.len() - self.ready);
            self.ready += n;
            self.skip -= n;
        }
        self.skip == 0
    }

    /// Marks the message of `total` bytes at the scan position as forwarded.
    fn forward(&mut self, total: usize) {
        let have = total.min(self.buf.len() - self.ready);
        self.ready += have;
        self.skip = total - have;
    }
}

/// Client → server: bytes read from the client, and the (possibly rewritten) bytes for the
/// server.
#[derive(Default)]
pub struct ToServer {
    input: BytesMut,
    out: BytesMut,
    /// Bytes of a streamed message still to copy from `input` as they arrive.
    skip: usize,
}

impl ToServer {
    /// Type byte of the next unscanned client message, once its header has arrived.
    pub fn next_tag(&self) -> Option<u8> {
        if self.skip > 0 {
            return None;
        }
        frame::header(&self.input).map(|(tag, _)| tag)
    }

    /// Takes the next whole client message, when pgtether answers it itself (no server).
    /// `Ok(None)` while it has not fully arrived.
    pub fn next_message(&mut self, max_message: usize) -> Result<Option<BytesMut>, ProtocolError> {
        let Some((_, total)) = client_header(&self.input, max_message)? else {
            return Ok(None);
        };
        if self.input.len() < total {
            self.input.reserve(total - self.input.len());
            return Ok(None);
        }
        Ok(Some(self.input.split_to(total)))
    }

    /// Client bytes read but not yet handled (for a takeover).
    pub fn input_bytes(&self) -> &[u8] {
        &self.input
    }

    /// Puts back client bytes another process had read but not handled.
    pub fn restore_input(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    /// Whether a whole client message is buffered.
    pub fn has_whole_message(&self) -> bool {
        matches!(frame::header(&self.input), Some((_, Ok(total))) if self.input.len() >= total)
    }

    /// Whether bytes for the server are still waiting.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// The buffer pgtether's own messages go into, ahead of anything the client sends next.
    pub fn out(&mut self) -> &mut BytesMut {
        buffers::fill(&mut self.out);
        &mut self.out
    }

    fn has_room(&self) -> bool {
        self.input.len() + self.out.len() < HIGH_WATER
    }

    pub fn try_read(&mut self, from: &Socket) -> io::Result<usize> {
        if self.input.is_empty() && self.input.capacity() < READ_CHUNK {
            // The small buffer of an idle read, now empty: trade it for a full-size one.
            buffers::give_back(&mut self.input);
        }
        buffers::fill(&mut self.input);
        if self.input.capacity() - self.input.len() < READ_CHUNK {
            self.input.reserve(READ_CHUNK);
        }
        from.try_read_buf(&mut self.input)
    }

    /// Reads as an idle client: into a small buffer (a client that then waits for a server
    /// connection holds little), grown only for a message that does not fit.
    pub fn try_read_idle(&mut self, from: &Socket) -> io::Result<usize> {
        buffers::fill_small(&mut self.input);
        if self.input.capacity() == self.input.len() {
            self.input.reserve(READ_CHUNK);
        }
        from.try_read_buf(&mut self.input)
    }

    fn try_write(&mut self, to: &Socket) -> io::Result<()> {
        if self.out.is_empty() {
            return to.flush_pending();
        }
        match to.try_write(&self.out) {
            Ok(n) => {
                self.out.advance(n);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Releases memory when nothing is buffered.
    pub fn shrink_if_empty(&mut self) {
        buffers::give_back(&mut self.input);
        buffers::give_back(&mut self.out);
    }
}

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
fn emit_synthesized(s2c: &mut Flow, tracker: &mut Tracker) {
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
        // While other clients wait for a server connection, the reply that ends a transaction
        // goes out after the release (the idle client flushes it first, batched with other
        // replies: see `wait_for_work`), so the next client need not wait for this write.
        let defer = matches!(event, ServerEvent::Release) && self.ctx.metrics.has_waiting();
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
