//! The two directions' buffers while a client holds a server connection: [`Flow`] (server →
//! client, written as scanned) and [`ToServer`] (client → server, possibly rewritten). The
//! scanners in the parent module decide what is ready; these own the bytes, the reads and
//! writes, and giving memory back when the client goes idle.

use std::io;

use bytes::{Buf, BytesMut};

use super::buffers;
use super::{client_header, ProtocolError};
use crate::protocol::frame;
use crate::socket::Socket;

/// Read granularity; also the smallest spare room kept before a read.
const READ_CHUNK: usize = buffers::SIZE;
/// A direction stops reading from its source while this many bytes wait to be written.
const HIGH_WATER: usize = 256 * 1024;

/// Server → client bytes: the leading `ready` bytes are scanned and may be written.
#[derive(Default)]
pub struct Flow {
    pub(super) buf: BytesMut,
    pub(super) ready: usize,
    /// Body bytes of a pass-through message still to arrive; forwarded as they come.
    pub(super) skip: usize,
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

    pub(super) fn has_room(&self) -> bool {
        self.buf.len() < HIGH_WATER
    }

    /// Reads what the socket has without waiting. `Ok(0)` means end of stream.
    pub(super) fn try_read(&mut self, from: &Socket) -> io::Result<usize> {
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
    pub(super) fn remove_next(&mut self, n: usize) {
        let len = self.buf.len();
        self.buf.copy_within(self.ready + n..len, self.ready);
        self.buf.truncate(len - n);
    }

    /// Inserts a message pgtether synthesizes right after the ready region, ready to go.
    pub(super) fn insert_ready(&mut self, msg: &[u8]) {
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
    pub(super) fn pass_through(&mut self) -> bool {
        if self.skip > 0 {
            let n = self.skip.min(self.buf.len() - self.ready);
            self.ready += n;
            self.skip -= n;
        }
        self.skip == 0
    }

    /// Marks the message of `total` bytes at the scan position as forwarded.
    pub(super) fn forward(&mut self, total: usize) {
        let have = total.min(self.buf.len() - self.ready);
        self.ready += have;
        self.skip = total - have;
    }
}

/// Client → server: bytes read from the client, and the (possibly rewritten) bytes for the
/// server.
#[derive(Default)]
pub struct ToServer {
    pub(super) input: BytesMut,
    pub(super) out: BytesMut,
    /// Bytes of a streamed message still to copy from `input` as they arrive.
    pub(super) skip: usize,
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

    /// Whether the next client message is whole and has no body (just its header).
    pub fn next_is_bodiless(&self) -> bool {
        matches!(frame::header(&self.input), Some((_, Ok(frame::HEADER_LEN))))
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

    pub(super) fn has_room(&self) -> bool {
        self.input.len() + self.out.len() < HIGH_WATER
    }

    pub fn try_read(&mut self, from: &Socket) -> io::Result<usize> {
        // An empty buffer consumed up to here gets its room back in place; the small buffer
        // of an idle read, now empty, is traded for a full-size one.
        if self.input.is_empty()
            && self.input.capacity() < READ_CHUNK
            && !self.input.try_reclaim(READ_CHUNK)
        {
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

    pub(super) fn try_write(&mut self, to: &Socket) -> io::Result<()> {
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
