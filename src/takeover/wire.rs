//! The control connection's framing: length-prefixed JSON messages over a Unix stream
//! socket, each carrying its file descriptors as SCM_RIGHTS ancillary data.
//!
//! A frame is `u32 length | u16 fd count | JSON`. The kernel delivers a frame's descriptors
//! with the read that returns the frame's first bytes, never later, so received descriptors
//! wait in a FIFO and each frame takes its count from the front.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use bytes::{Buf, BufMut, BytesMut};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use tokio::io::Interest;
use tokio::net::UnixStream;

use super::state::Msg;

/// Frames larger than this are refused (a client's state is a few kB).
const MAX_FRAME: usize = 64 * 1024 * 1024;
const FRAME_HEADER: usize = 6;
/// Descriptors one read may carry: the kernel hands over those of one send at most.
const MAX_FDS_PER_READ: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("control connection: {0}")]
    Io(#[from] io::Error),
    #[error("control connection closed by the other process")]
    Closed,
    #[error("control connection: malformed message: {0}")]
    Malformed(String),
    #[error("control connection: a message announced {want} file descriptors but {have} arrived")]
    MissingFds { want: usize, have: usize },
}

/// Encodes `msg` as one frame announcing `fds` descriptors.
pub fn encode(msg: &Msg, fds: usize) -> Result<Vec<u8>, WireError> {
    let json = serde_json::to_vec(msg).map_err(|e| WireError::Malformed(e.to_string()))?;
    let mut frame = Vec::with_capacity(FRAME_HEADER + json.len());
    frame.put_u32(json.len() as u32);
    frame.put_u16(fds as u16);
    frame.extend_from_slice(&json);
    Ok(frame)
}

/// Writes whole frames; the descriptors go with the frame's first byte.
pub async fn send(stream: &UnixStream, frame: &[u8], fds: &[RawFd]) -> Result<(), WireError> {
    let mut sent = 0;
    while sent < frame.len() {
        stream.writable().await?;
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if sent == 0 && !fds.is_empty() {
            &rights
        } else {
            &[]
        };
        let r = stream.try_io(Interest::WRITABLE, || {
            sendmsg::<()>(
                stream.as_raw_fd(),
                &[IoSlice::new(&frame[sent..])],
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match r {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads frames and the descriptors that came with them.
#[derive(Default)]
pub struct Reader {
    buf: BytesMut,
    fds: VecDeque<OwnedFd>,
}

impl Reader {
    /// The next message with its descriptors.
    pub async fn recv(&mut self, stream: &UnixStream) -> Result<(Msg, Vec<OwnedFd>), WireError> {
        loop {
            if let Some(frame) = self.take_frame()? {
                return Ok(frame);
            }
            stream.readable().await?;
            match self.try_read(stream) {
                Ok(0) => return Err(WireError::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn take_frame(&mut self) -> Result<Option<(Msg, Vec<OwnedFd>)>, WireError> {
        if self.buf.len() < FRAME_HEADER {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
        let nfds = u16::from_be_bytes(self.buf[4..6].try_into().expect("2 bytes")) as usize;
        if len > MAX_FRAME {
            return Err(WireError::Malformed(format!("frame of {len} bytes")));
        }
        if self.buf.len() < FRAME_HEADER + len {
            self.buf.reserve(FRAME_HEADER + len - self.buf.len());
            return Ok(None);
        }
        if self.fds.len() < nfds {
            return Err(WireError::MissingFds {
                want: nfds,
                have: self.fds.len(),
            });
        }
        self.buf.advance(FRAME_HEADER);
        let body = self.buf.split_to(len);
        let msg = serde_json::from_slice(&body).map_err(|e| WireError::Malformed(e.to_string()))?;
        Ok(Some((msg, self.fds.drain(..nfds).collect())))
    }

    fn try_read(&mut self, stream: &UnixStream) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 64 * 1024 {
            self.buf.reserve(64 * 1024);
        }
        let start = self.buf.len();
        let room = self.buf.capacity() - start;
        self.buf.resize(start + room, 0);
        let fds = &mut self.fds;
        let buf = &mut self.buf;
        let r = stream.try_io(Interest::READABLE, || {
            let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_READ]);
            let mut iov = [IoSliceMut::new(&mut buf[start..])];
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            let n = msg.bytes;
            let cmsgs = msg.cmsgs().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "file descriptors were truncated in transit",
                )
            })?;
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(received) = c {
                    for fd in received {
                        // SAFETY: the kernel just installed `fd` in this process for us; nothing
                        // else owns it.
                        fds.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            Ok(n)
        });
        let n = *r.as_ref().unwrap_or(&0);
        self.buf.truncate(start + n);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[tokio::test]
    async fn frames_carry_their_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut p1, p2) = std::os::unix::net::UnixStream::pair().unwrap();
        let msg = Msg::Ack { id: 7 };
        let frame = encode(&msg, 1).unwrap();
        send(&a, &frame, &[p2.as_raw_fd()]).await.unwrap();
        send(&a, &encode(&Msg::Done, 0).unwrap(), &[])
            .await
            .unwrap();
        let mut reader = Reader::default();
        let (got, fds) = reader.recv(&b).await.unwrap();
        assert!(matches!(got, Msg::Ack { id: 7 }));
        assert_eq!(fds.len(), 1);
        // The received descriptor is the same socket.
        let mut passed = std::os::unix::net::UnixStream::from(fds.into_iter().next().unwrap());
        passed.write_all(b"hi").unwrap();
        let mut two = [0u8; 2];
        p1.read_exact(&mut two).unwrap();
        assert_eq!(&two, b"hi");
        drop(p2);
        let (got, fds) = reader.recv(&b).await.unwrap();
        assert!(matches!(got, Msg::Done));
        assert!(fds.is_empty());
        drop(a);
        assert!(matches!(reader.recv(&b).await, Err(WireError::Closed)));
    }
}
