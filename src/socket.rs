//! A connection's socket: TCP or Unix-domain, plain or TLS (rustls), behind one interface.
//!
//! The relay works by readiness: it waits for `readable`/`writable` and then moves what it
//! can with `try_read_buf`/`try_write`, never blocking. For a plain socket these are the
//! socket calls themselves, so the hot path pays a branch for TLS and one for the transport.
//! For TLS, reads pull
//! records from the socket and hand out plaintext; writes encrypt into rustls's buffer and
//! push what the socket takes. Encrypted bytes that did not fit wait in rustls:
//! [`Socket::has_pending_output`] tells the relay to wait for writability until they are out.
//! The startup and login phases use the `AsyncRead`/`AsyncWrite` implementations.

use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Where the Unix-domain socket for `port` lives in `dir`: PostgreSQL's naming (what
/// `psql -h DIR -p PORT` connects to).
pub fn unix_socket_path(dir: &std::path::Path, port: u16) -> std::path::PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

/// Whether a socket handed over by another process is a Unix-domain one (else TCP).
pub fn is_unix(fd: &impl std::os::fd::AsFd) -> bool {
    socket2::SockRef::from(fd)
        .local_addr()
        .is_ok_and(|a| a.is_unix())
}

/// Plaintext handed out per read on a TLS connection.
const TLS_READ_CHUNK: usize = 16 * 1024;

pub struct Socket {
    stream: Stream,
    /// Boxed: a plaintext socket (every idle client) stays the size of a TCP stream.
    tls: Option<Box<Mutex<Tls>>>,
}

/// The transport under a [`Socket`]: two tokio stream types with the same calls, which
/// [`on_stream!`] dispatches.
#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    /// A Unix-domain socket: the sidecar's and the co-located server's cheaper path (no
    /// TCP stack per message). Boxed so that the enum needs no tag of its own (the box fits
    /// beside the TCP stream's niche): every idle client's task state keeps its size.
    Unix(Box<UnixStream>),
}

/// Calls the same method on whichever stream it is.
macro_rules! on_stream {
    ($stream:expr, $s:ident => $call:expr) => {
        match $stream {
            Stream::Tcp($s) => $call,
            Stream::Unix($s) => $call,
        }
    };
}

impl Stream {
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        on_stream!(self, s => s.try_read(buf))
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        on_stream!(self, s => s.try_write(buf))
    }

    fn try_io<R>(
        &self,
        interest: tokio::io::Interest,
        f: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        on_stream!(self, s => s.try_io(interest, f))
    }

    async fn readable(&self) -> io::Result<()> {
        on_stream!(self, s => s.readable().await)
    }

    async fn writable(&self) -> io::Result<()> {
        on_stream!(self, s => s.writable().await)
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(self, s => s.poll_read_ready(cx))
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(self, s => s.poll_write_ready(cx))
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        on_stream!(self, s => s.as_fd())
    }
}

struct Tls {
    conn: rustls::Connection,
    /// Decrypted bytes not yet handed out (so readiness is known without the socket).
    plaintext: usize,
    /// Server side: the `tls-server-end-point` data of the certificate this handshake
    /// presented. Kept here because a reload may install another certificate before the
    /// client's SCRAM exchange, which must be checked against the one the client saw.
    channel_binding: Option<Arc<[u8]>>,
}

/// `io::Read`/`io::Write` on a non-blocking tokio socket, for rustls.
struct StreamIo<'a>(&'a Stream);

impl Read for StreamIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for StreamIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Tls {
    /// Sends buffered TLS records; `WouldBlock` if the socket took only part of them.
    fn flush(&mut self, stream: &Stream) -> io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut StreamIo(stream))?;
        }
        Ok(())
    }

    fn process(&mut self) -> io::Result<()> {
        match self.conn.process_new_packets() {
            Ok(state) => {
                self.plaintext = state.plaintext_bytes_to_read();
                Ok(())
            }
            Err(e) => Err(tls_error(e)),
        }
    }

    /// Plaintext already decrypted, if any, copied into `out`; `Ok(Some(0))` after the peer's
    /// close_notify.
    fn read_plaintext(&mut self, out: &mut [u8]) -> io::Result<Option<usize>> {
        self.take_plaintext(|chunk| {
            let n = chunk.len().min(out.len());
            out[..n].copy_from_slice(&chunk[..n]);
            n
        })
    }

    /// [`Tls::read_plaintext`] appended to `buf`, at most [`TLS_READ_CHUNK`] bytes.
    fn read_plaintext_into(&mut self, buf: &mut BytesMut) -> io::Result<Option<usize>> {
        self.take_plaintext(|chunk| {
            let n = chunk.len().min(TLS_READ_CHUNK);
            buf.extend_from_slice(&chunk[..n]);
            n
        })
    }

    /// Hands rustls's next chunk of plaintext to `copy`, which returns how much it took
    /// (read straight from rustls's buffer: nothing is zeroed or copied twice).
    fn take_plaintext(&mut self, copy: impl FnOnce(&[u8]) -> usize) -> io::Result<Option<usize>> {
        let mut reader = self.conn.reader();
        let n = match reader.fill_buf() {
            Ok(chunk) => copy(chunk),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        };
        reader.consume(n);
        self.plaintext = self.plaintext.saturating_sub(n);
        Ok(Some(n))
    }
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("stream", &self.stream)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.as_fd().as_raw_fd()
    }
}

impl Socket {
    pub fn plain(tcp: TcpStream) -> Socket {
        Socket {
            stream: Stream::Tcp(tcp),
            tls: None,
        }
    }

    pub fn unix(stream: UnixStream) -> Socket {
        Socket {
            stream: Stream::Unix(Box::new(stream)),
            tls: None,
        }
    }

    /// A connected socket handed over by another process: TCP or Unix-domain, whichever
    /// the fd is.
    pub fn adopt(fd: std::os::fd::OwnedFd) -> io::Result<Socket> {
        if is_unix(&fd) {
            let stream = std::os::unix::net::UnixStream::from(fd);
            stream.set_nonblocking(true)?;
            Ok(Socket::unix(UnixStream::from_std(stream)?))
        } else {
            let stream = std::net::TcpStream::from(fd);
            stream.set_nonblocking(true)?;
            Ok(Socket::plain(TcpStream::from_std(stream)?))
        }
    }

    /// The plain socket's fd, no longer registered with this thread's runtime (for another
    /// thread to adopt). A TLS session cannot leave its `Socket`.
    pub fn into_fd(self) -> io::Result<std::os::fd::OwnedFd> {
        if self.tls.is_some() {
            return Err(io::Error::other("a TLS session stays with its socket"));
        }
        Ok(match self.stream {
            Stream::Tcp(s) => s.into_std()?.into(),
            Stream::Unix(s) => s.into_std()?.into(),
        })
    }

    /// Registers the socket with the runtime of the calling thread instead of the one it was
    /// registered with (a connection that moves to a client of another worker thread; see
    /// `workers`). The connection, its TLS session and its buffered bytes stay as they are:
    /// a duplicate of the fd is registered here, then the old one is deregistered and closed.
    /// Until the new registration's first readiness event, reads and writes report
    /// WouldBlock, so the caller waits for readiness before its first attempt succeeds.
    pub fn rebind(&mut self) -> io::Result<()> {
        let fd = self.stream.as_fd().try_clone_to_owned()?;
        let stream = match &self.stream {
            Stream::Tcp(_) => Stream::Tcp(TcpStream::from_std(std::net::TcpStream::from(fd))?),
            Stream::Unix(_) => Stream::Unix(Box::new(UnixStream::from_std(
                std::os::unix::net::UnixStream::from(fd),
            )?)),
        };
        self.stream = stream;
        Ok(())
    }

    /// The local TCP address; `None` on a Unix-domain socket.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.stream {
            Stream::Tcp(s) => s.local_addr().ok(),
            Stream::Unix(_) => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    fn tls(&self) -> Option<MutexGuard<'_, Tls>> {
        self.tls
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Upgrades to TLS as the server side (after answering a client's SSLRequest with 'S').
    /// `channel_binding` is the `tls-server-end-point` data of the certificate in `config`
    /// (none: SCRAM-SHA-256-PLUS is not offered on this connection).
    pub async fn accept_tls(
        &mut self,
        config: Arc<rustls::ServerConfig>,
        channel_binding: Option<Arc<[u8]>>,
    ) -> io::Result<()> {
        let conn = rustls::ServerConnection::new(config).map_err(tls_error)?;
        self.start_tls(rustls::Connection::Server(conn), channel_binding)
            .await
    }

    /// The `tls-server-end-point` data of the certificate this (server-side TLS) connection
    /// presented; `None` on plaintext or when the certificate has none.
    pub fn channel_binding(&self) -> Option<Arc<[u8]>> {
        self.tls().and_then(|t| t.channel_binding.clone())
    }

    /// Upgrades to TLS as the client side (after the server accepted our SSLRequest).
    pub async fn connect_tls(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    ) -> io::Result<()> {
        let conn = rustls::ClientConnection::new(config, name).map_err(tls_error)?;
        self.start_tls(rustls::Connection::Client(conn), None).await
    }

    async fn start_tls(
        &mut self,
        conn: rustls::Connection,
        channel_binding: Option<Arc<[u8]>>,
    ) -> io::Result<()> {
        self.tls = Some(Box::new(Mutex::new(Tls {
            conn,
            plaintext: 0,
            channel_binding,
        })));
        enum Wait {
            Read,
            Write,
        }
        loop {
            let wait = {
                let mut tls = self.tls().expect("set above");
                match tls.flush(&self.stream) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if tls.conn.wants_write() {
                    Wait::Write
                } else if !tls.conn.is_handshaking() {
                    return Ok(());
                } else {
                    match tls.conn.read_tls(&mut StreamIo(&self.stream)) {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(_) => {
                            if let Err(e) = tls.process() {
                                // Tell the peer why (the alert is queued) before failing.
                                let _ = tls.flush(&self.stream);
                                return Err(e);
                            }
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Wait::Read,
                        Err(e) => return Err(e),
                    }
                }
            };
            match wait {
                Wait::Read => self.stream.readable().await?,
                Wait::Write => self.stream.writable().await?,
            }
        }
    }

    /// Waits until a read may make progress.
    pub async fn readable(&self) -> io::Result<()> {
        if self.tls().is_some_and(|t| t.plaintext > 0) {
            return Ok(());
        }
        self.stream.readable().await
    }

    pub async fn writable(&self) -> io::Result<()> {
        self.stream.writable().await
    }

    /// Readiness to write, for hand-written poll loops (see [`Socket::poll_readable`]).
    pub fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.poll_write_ready(cx)
    }

    /// Reads what is available without waiting. `Ok(0)` is the end of the stream.
    pub fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        match self.tls() {
            None => self.try_read_plain(buf),
            // Plaintext is copied from rustls's buffer: no room is zeroed first.
            Some(tls) => self.read_tls(tls, |tls| tls.read_plaintext_into(buf)),
        }
    }

    /// One recv(2) into the spare capacity of `buf`. A read that returns less than the room
    /// it had drained the socket, so the readiness is cleared right away (as tokio's own
    /// `AsyncRead` does): the next wait goes to epoll instead of costing a recv that
    /// returns EAGAIN. Readiness that arrived after the recv has a newer tick and is kept.
    fn try_read_plain(&self, buf: &mut BytesMut) -> io::Result<usize> {
        if buf.capacity() == buf.len() {
            buf.reserve(TLS_READ_CHUNK);
        }
        let room = buf.capacity() - buf.len();
        let fd = self.stream.as_fd().as_raw_fd();
        let mut read = None;
        let r = self.stream.try_io(tokio::io::Interest::READABLE, || {
            let spare = buf.spare_capacity_mut();
            // SAFETY: recv(2) writes at most `room` bytes into the spare capacity, which is
            // valid for writes of that many bytes.
            let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), room, libc::MSG_DONTWAIT) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            read = Some(n);
            if n > 0 && n < room {
                // Drained: report WouldBlock to tokio so it clears the readiness.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match read {
            Some(n) => {
                // SAFETY: recv initialized the first `n` bytes of the spare capacity.
                unsafe { buf.set_len(buf.len() + n) };
                Ok(n)
            }
            None => r,
        }
    }

    /// Reads into `out` without waiting. `Ok(0)` is the end of the stream.
    pub fn try_read(&self, out: &mut [u8]) -> io::Result<usize> {
        match self.tls() {
            None => self.stream.try_read(out),
            Some(tls) => self.read_tls(tls, |tls| tls.read_plaintext(out)),
        }
    }

    /// Plaintext through `take` (`None`: nothing decrypted yet), reading and decrypting
    /// records from the socket until there is some, or the socket has no more.
    fn read_tls(
        &self,
        mut tls: MutexGuard<'_, Tls>,
        mut take: impl FnMut(&mut Tls) -> io::Result<Option<usize>>,
    ) -> io::Result<usize> {
        loop {
            if let Some(n) = take(&mut tls)? {
                return Ok(n);
            }
            match tls.conn.read_tls(&mut StreamIo(&self.stream))? {
                0 => return Ok(0),
                _ => {
                    tls.process()?;
                    // Alerts, key updates or handshake replies may be due.
                    match tls.flush(&self.stream) {
                        Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                        _ => {}
                    }
                }
            }
        }
    }

    /// Writes without waiting; returns how many bytes were taken (0: try again when
    /// writable).
    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        let Some(mut tls) = self.tls() else {
            return self.stream.try_write(data);
        };
        // Take new plaintext only once earlier records are out, so buffering stays bounded.
        tls.flush(&self.stream)?;
        let n = tls.conn.writer().write(data)?;
        match tls.flush(&self.stream) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }

    /// Encrypted bytes wait for the socket (the caller must wait for writability and call
    /// [`Socket::flush_pending`]).
    pub fn has_pending_output(&self) -> bool {
        self.tls().is_some_and(|t| t.conn.wants_write())
    }

    /// Pushes waiting encrypted bytes without blocking.
    pub fn flush_pending(&self) -> io::Result<()> {
        match self.tls() {
            Some(mut tls) => match tls.flush(&self.stream) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                r => r,
            },
            None => Ok(()),
        }
    }

    /// Whether the reactor has seen the socket become readable since the last read that
    /// drained it: for an idle connection, data (a FATAL before a restart) or EOF arrived.
    /// Costs no syscall; may say `true` spuriously after a read that filled its buffer.
    pub fn input_arrived(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.stream.poll_read_ready(&mut cx).is_ready()
    }

    /// An idle connection's peer sent nothing and has not closed (without consuming data).
    pub fn looks_idle(&self) -> bool {
        let mut probe = [0u8; 1];
        // SAFETY: recv(2) with MSG_PEEK into a valid one-byte buffer; the fd is ours.
        let n = unsafe {
            libc::recv(
                self.stream.as_fd().as_raw_fd(),
                probe.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Readiness to read (decrypted bytes waiting count), for hand-written poll loops. Only
    /// the last task to poll is woken (one waker slot per direction, no waiter list to join
    /// and leave on every wait).
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.tls().is_some_and(|t| t.plaintext > 0) {
            return Poll::Ready(Ok(()));
        }
        self.stream.poll_read_ready(cx)
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Bytes we wrote may still sit encrypted in rustls (a login reply before its read).
        self.flush_pending()?;
        loop {
            ready!(self.poll_readable(cx))?;
            match self.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.try_write(data) {
                Ok(n) if n > 0 || data.is_empty() => return Poll::Ready(Ok(n)),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            ready!(self.stream.poll_write_ready(cx))?;
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            self.flush_pending()?;
            if !self.has_pending_output() {
                return Poll::Ready(Ok(()));
            }
            ready!(self.stream.poll_write_ready(cx))?;
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(mut tls) = self.tls() {
            tls.conn.send_close_notify();
        }
        ready!(self.as_mut().poll_flush(cx))?;
        match &mut self.stream {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
