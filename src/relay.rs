//! Moving bytes both ways while a client holds a server connection.
//!
//! Each direction is a [`Flow`]: bytes read from one socket wait in its buffer until written to
//! the other, untouched. Only message headers are read, plus the body of ReadyForQuery; large
//! messages stream through without being buffered whole. The loop waits on both sockets at
//! once, so server messages (NOTIFY, notices, Flush replies) reach the client the moment they
//! arrive, and a full buffer stops reading from its source (backpressure) instead of growing.

use std::io;

use bytes::BytesMut;
use tokio::net::TcpStream;

use crate::config::PoolMode;
use crate::protocol::frame::{self, HEADER_LEN};

/// Read granularity; also the smallest spare room kept before a read.
const READ_CHUNK: usize = 16 * 1024;
/// A flow stops reading from its source while this many bytes wait to be written.
const HIGH_WATER: usize = 256 * 1024;

/// Bytes on their way from one socket to the other.
#[derive(Default)]
pub struct Flow {
    buf: BytesMut,
    /// Leading bytes of `buf` scanned and cleared for forwarding.
    ready: usize,
    /// Body bytes of a pass-through message still to arrive; they are forwarded as they come.
    skip: usize,
}

impl Flow {
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes scanned and waiting to be written.
    pub fn ready(&self) -> usize {
        self.ready
    }

    /// Type byte of the first unscanned message, if its header has arrived.
    pub fn next_tag(&self) -> Option<u8> {
        frame::header(&self.buf[self.ready..]).map(|(tag, _)| tag)
    }

    /// Whether unscanned bytes are buffered (a partial or unprocessed message).
    pub fn has_unscanned(&self) -> bool {
        self.buf.len() > self.ready
    }

    fn has_room(&self) -> bool {
        self.buf.len() < HIGH_WATER
    }

    /// Reads what the socket has without waiting. `Ok(0)` means end of stream.
    pub fn try_read(&mut self, from: &TcpStream) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK {
            self.buf.reserve(READ_CHUNK);
        }
        from.try_read_buf(&mut self.buf)
    }

    /// Writes ready bytes without waiting; returns how many went out.
    pub fn try_write(&mut self, to: &TcpStream) -> io::Result<usize> {
        if self.ready == 0 {
            return Ok(0);
        }
        match to.try_write(&self.buf[..self.ready]) {
            Ok(n) => {
                self.consume(n);
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Writes every ready byte, waiting for the socket as needed.
    pub async fn flush(&mut self, to: &TcpStream) -> io::Result<()> {
        while self.ready > 0 {
            to.writable().await?;
            self.try_write(to)?;
        }
        Ok(())
    }

    /// Drops `n` ready bytes from the front (written or deliberately discarded).
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.ready);
        let _ = self.buf.split_to(n);
        self.ready -= n;
        if self.buf.is_empty() && self.buf.capacity() > HIGH_WATER {
            // A huge message grew the buffer; do not keep that memory around.
            self.buf = BytesMut::new();
        }
    }

    /// Removes `n` unscanned bytes right after the ready region (a message pgtether swallows).
    pub fn drop_unscanned(&mut self, n: usize) {
        let tail = self.buf.split_off(self.ready);
        let mut tail = tail;
        let _ = tail.split_to(n.min(tail.len()));
        self.buf.unsplit(tail);
    }

    /// Releases the buffer's memory when nothing is buffered; idle clients hold no buffers.
    pub fn shrink_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    /// Advances over pass-through body bytes that have arrived. Returns false if more are due.
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

/// What the server owes the client: the transaction state as seen on the wire.
#[derive(Debug, Clone, Copy)]
pub struct TxState {
    /// ReadyForQuery messages still due (one per Query, Sync and FunctionCall sent).
    pub pending: u32,
    /// Extended-protocol messages were sent after the last Sync.
    pub unsynced: bool,
    /// Transaction status of the last ReadyForQuery: b'I', b'T' or b'E'.
    pub status: u8,
}

impl Default for TxState {
    fn default() -> Self {
        TxState {
            pending: 0,
            unsynced: false,
            status: b'I',
        }
    }
}

impl TxState {
    /// The server owes nothing and is outside a transaction: safe to hand to someone else.
    pub fn is_clean(&self) -> bool {
        self.pending == 0 && !self.unsynced && self.status == b'I'
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

/// Counters the scanners feed, flushed into Prometheus by the caller.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub queries: u64,
    pub transactions: u64,
    /// Bytes read from the client.
    pub received: u64,
    /// Bytes written to the client.
    pub sent: u64,
}

/// Scans client bytes: validates headers and tracks what the server will owe.
pub fn scan_client(
    flow: &mut Flow,
    tx: &mut TxState,
    counts: &mut Counts,
    max_message: usize,
) -> Result<ClientEvent, ProtocolError> {
    loop {
        if !flow.pass_through() {
            return Ok(ClientEvent::NeedMore);
        }
        let Some((tag, total)) = frame::header(&flow.buf[flow.ready..]) else {
            return Ok(ClientEvent::NeedMore);
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
        match tag {
            b'X' => return Ok(ClientEvent::Terminate),
            b'Q' | b'F' => {
                tx.pending += 1;
                counts.queries += 1;
            }
            b'S' => {
                tx.pending += 1;
                tx.unsynced = false;
            }
            b'E' => {
                tx.unsynced = true;
                counts.queries += 1;
            }
            b'P' | b'B' | b'D' | b'C' | b'H' => tx.unsynced = true,
            _ => {}
        }
        flow.forward(total);
    }
}

/// What scanning the server's bytes found.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerEvent {
    NeedMore,
    /// ReadyForQuery left the server clean; the connection may go back to the pool once the
    /// ready bytes reach the client.
    Release,
    /// Statement mode: the server entered a transaction block. The offending ReadyForQuery is
    /// the next unscanned message.
    TransactionInStatementMode,
    /// The server sent a malformed header; the connection cannot be trusted.
    Corrupt,
}

/// Scans server bytes: finds ReadyForQuery and decides when the server can be released.
pub fn scan_server(
    flow: &mut Flow,
    tx: &mut TxState,
    counts: &mut Counts,
    mode: PoolMode,
) -> ServerEvent {
    loop {
        if !flow.pass_through() {
            return ServerEvent::NeedMore;
        }
        let rest = &flow.buf[flow.ready..];
        let Some((tag, total)) = frame::header(rest) else {
            return ServerEvent::NeedMore;
        };
        let Ok(total) = total else {
            return ServerEvent::Corrupt;
        };
        if tag != b'Z' {
            flow.forward(total);
            continue;
        }
        if total != HEADER_LEN + 1 {
            return ServerEvent::Corrupt;
        }
        if rest.len() < total {
            return ServerEvent::NeedMore;
        }
        let status = rest[HEADER_LEN];
        if mode == PoolMode::Statement && status != b'I' {
            return ServerEvent::TransactionInStatementMode;
        }
        tx.pending = tx.pending.saturating_sub(1);
        tx.status = status;
        if status == b'I' {
            counts.transactions += 1;
        }
        flow.forward(total);
        if mode != PoolMode::Session && tx.is_clean() {
            return ServerEvent::Release;
        }
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
}

/// The two sockets and their flows for one attachment.
pub struct Relay<'a> {
    pub client: &'a TcpStream,
    pub server: &'a TcpStream,
    pub c2s: &'a mut Flow,
    pub s2c: &'a mut Flow,
    pub tx: &'a mut TxState,
    pub counts: &'a mut Counts,
    pub mode: PoolMode,
    pub max_message: usize,
}

impl Relay<'_> {
    /// Relays until the server can be released or either side ends.
    pub async fn run(&mut self) -> Outcome {
        // The client bytes that made us acquire the server are already buffered.
        if let Some(out) = self.after_client_read() {
            return out;
        }
        loop {
            let want_client = self.c2s.has_room();
            let want_server = self.s2c.has_room();
            let to_server = self.c2s.ready > 0;
            let to_client = self.s2c.ready > 0;
            tokio::select! {
                r = self.server.readable(), if want_server => {
                    if r.is_err() { return Outcome::ServerGone; }
                    match self.s2c.try_read(self.server) {
                        Ok(0) => return Outcome::ServerGone,
                        Ok(_) => if let Some(out) = self.after_server_read() { return out; },
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return Outcome::ServerGone,
                    }
                }
                r = self.client.readable(), if want_client => {
                    if r.is_err() { return Outcome::ClientGone; }
                    match self.c2s.try_read(self.client) {
                        Ok(0) => return Outcome::ClientGone,
                        Ok(n) => {
                            self.counts.received += n as u64;
                            if let Some(out) = self.after_client_read() { return out; }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return Outcome::ClientGone,
                    }
                }
                r = self.server.writable(), if to_server => {
                    if r.is_err() || self.c2s.try_write(self.server).is_err() {
                        return Outcome::ServerGone;
                    }
                }
                r = self.client.writable(), if to_client => {
                    if r.is_err() || !self.write_client() {
                        return Outcome::ClientGone;
                    }
                }
            }
        }
    }

    fn after_client_read(&mut self) -> Option<Outcome> {
        let event = scan_client(self.c2s, self.tx, self.counts, self.max_message);
        // Forward at once; the socket is almost always writable, which saves a poll.
        if self.c2s.try_write(self.server).is_err() {
            return Some(Outcome::ServerGone);
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
                self.counts.sent += n as u64;
                true
            }
            Err(_) => false,
        }
    }

    fn after_server_read(&mut self) -> Option<Outcome> {
        let event = scan_server(self.s2c, self.tx, self.counts, self.mode);
        if !self.write_client() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.put_i32(4 + body.len() as i32);
        v.extend_from_slice(body);
        v
    }

    fn flow_with(bytes: &[u8]) -> Flow {
        let mut f = Flow::default();
        f.buf.extend_from_slice(bytes);
        f
    }

    #[test]
    fn client_pipeline_counts_syncs() {
        let mut bytes = msg(b'P', b"\0SELECT 1\0\0\0");
        bytes.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
        bytes.extend(msg(b'E', b"\0\0\0\0\0"));
        bytes.extend(msg(b'S', b""));
        bytes.extend(msg(b'Q', b"SELECT 1\0"));
        let mut f = flow_with(&bytes);
        let (mut tx, mut c) = (TxState::default(), Counts::default());
        assert_eq!(
            scan_client(&mut f, &mut tx, &mut c, 1 << 20),
            Ok(ClientEvent::NeedMore)
        );
        assert_eq!(f.ready, bytes.len());
        assert_eq!(tx.pending, 2);
        assert!(!tx.unsynced);
        assert_eq!(c.queries, 2);
    }

    #[test]
    fn client_partial_header_and_streamed_body() {
        let big = msg(b'd', &vec![7u8; 1000]);
        let mut f = flow_with(&big[..3]);
        let (mut tx, mut c) = (TxState::default(), Counts::default());
        assert_eq!(
            scan_client(&mut f, &mut tx, &mut c, 1 << 20),
            Ok(ClientEvent::NeedMore)
        );
        assert_eq!(f.ready, 0);
        f.buf.extend_from_slice(&big[3..500]);
        scan_client(&mut f, &mut tx, &mut c, 1 << 20).unwrap();
        assert_eq!(f.ready, 500);
        assert_eq!(f.skip, big.len() - 500);
        f.buf.extend_from_slice(&big[500..]);
        f.buf.extend_from_slice(&msg(b'X', b""));
        assert_eq!(
            scan_client(&mut f, &mut tx, &mut c, 1 << 20),
            Ok(ClientEvent::Terminate)
        );
        assert_eq!(f.ready, big.len());
    }

    #[test]
    fn client_garbage_is_refused() {
        let (mut tx, mut c) = (TxState::default(), Counts::default());
        let mut f = flow_with(&msg(b'Z', b"I"));
        assert_eq!(
            scan_client(&mut f, &mut tx, &mut c, 1 << 20),
            Err(ProtocolError::UnknownType('Z'))
        );
        let mut f = flow_with(b"Q\0\0\0\x02");
        assert_eq!(
            scan_client(&mut f, &mut tx, &mut c, 1 << 20),
            Err(ProtocolError::BadLength(2))
        );
        let mut f = flow_with(&msg(b'Q', &[b'x'; 2000]));
        assert!(matches!(
            scan_client(&mut f, &mut tx, &mut c, 1024),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn server_release_only_when_clean() {
        let mut tx = TxState {
            pending: 2,
            ..TxState::default()
        };
        let mut c = Counts::default();
        let mut bytes = msg(b'C', b"SELECT 1\0");
        bytes.extend(msg(b'Z', b"I"));
        let mut f = flow_with(&bytes);
        assert_eq!(
            scan_server(&mut f, &mut tx, &mut c, PoolMode::Transaction),
            ServerEvent::NeedMore
        );
        assert_eq!(tx.pending, 1);
        f.buf.extend_from_slice(&msg(b'Z', b"T")[..4]);
        assert_eq!(
            scan_server(&mut f, &mut tx, &mut c, PoolMode::Transaction),
            ServerEvent::NeedMore
        );
        f.buf.extend_from_slice(&msg(b'Z', b"T")[4..]);
        assert_eq!(
            scan_server(&mut f, &mut tx, &mut c, PoolMode::Transaction),
            ServerEvent::NeedMore
        );
        assert_eq!(tx.status, b'T');
        tx.pending = 1;
        f.buf.extend_from_slice(&msg(b'Z', b"I"));
        assert_eq!(
            scan_server(&mut f, &mut tx, &mut c, PoolMode::Transaction),
            ServerEvent::Release
        );
        assert_eq!(f.ready, f.buf.len());
        assert_eq!(c.transactions, 2);
    }

    #[test]
    fn session_mode_never_releases_and_statement_mode_refuses_blocks() {
        let mut tx = TxState {
            pending: 1,
            ..TxState::default()
        };
        let mut c = Counts::default();
        let mut f = flow_with(&msg(b'Z', b"I"));
        assert_eq!(
            scan_server(&mut f, &mut tx, &mut c, PoolMode::Session),
            ServerEvent::NeedMore
        );
        tx.pending = 1;
        let mut f = flow_with(&msg(b'Z', b"T"));
        assert_eq!(
            scan_server(&mut f, &mut tx, &mut c, PoolMode::Statement),
            ServerEvent::TransactionInStatementMode
        );
        assert_eq!(f.ready, 0);
    }

    #[test]
    fn drop_unscanned_removes_one_message() {
        let mut bytes = msg(b'C', b"BEGIN\0");
        let first = bytes.len();
        bytes.extend(msg(b'Z', b"T"));
        bytes.extend(msg(b'N', b"x\0"));
        let mut f = flow_with(&bytes);
        f.ready = first;
        f.drop_unscanned(6);
        assert_eq!(&f.buf[first..], &msg(b'N', b"x\0")[..]);
    }
}
