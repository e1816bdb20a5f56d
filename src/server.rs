//! One upstream PostgreSQL connection: connecting, logging in (trust, cleartext, md5,
//! SCRAM-SHA-256 via postgres-protocol), and the record of what pgtether knows about it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::auth::scram::KeyClient;
use crate::session::state::ServerSession;
use crate::socket::Socket;
use crate::takeover::state::ServerRecord;
use crate::tls::SslMode;

/// Where and as whom to connect upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    /// Plain password for upstream login; `None` works only if the server trusts us, or
    /// with `scram_keys`.
    pub password: Option<String>,
    /// Without a password: the ClientKey a client proved at its SCRAM login (a user whose
    /// password pgtether only knows as a verifier), which answers the server's SCRAM.
    pub scram_keys: Option<crate::auth::ScramKeys>,
    pub connect_timeout: Duration,
    pub max_prepared_statements: usize,
    pub sslmode: SslMode,
    /// How the server's certificate is checked; `None` for sslmode disable.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connecting to {0} timed out")]
    ConnectTimeout(String),
    #[error("server i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("server closed the connection")]
    Closed,
    #[error("server {0} does not accept TLS, but sslmode requires it")]
    TlsRefused(String),
    #[error("TLS with server {addr} failed: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("server error {code}: {message}")]
    Postgres { code: String, message: String },
    #[error("server asks for a password but none is configured for user \"{0}\"")]
    NoPassword(String),
    #[error("unsupported upstream authentication request {0}")]
    UnsupportedAuth(i32),
    #[error("SCRAM with the server failed: {0}")]
    Scram(String),
    #[error("unexpected message from server: {0}")]
    Unexpected(&'static str),
}

/// Where a server connection goes: a TCP address, or a Unix-domain socket (an upstream
/// `host` that is a directory, as in libpq). `Copy`, like the cancel target holding it,
/// which every transaction hands to its client's cancel slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerAddr {
    Tcp(SocketAddr),
    Unix(&'static Path),
}

/// A Unix-domain socket path made to last for the process. There is one per configured
/// upstream (a reload adds one per changed database at most), so each distinct path is kept
/// once.
fn intern(path: &Path) -> &'static Path {
    static PATHS: std::sync::Mutex<Vec<&'static Path>> = std::sync::Mutex::new(Vec::new());
    let mut paths = PATHS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = paths.iter().find(|p| **p == path) {
        return p;
    }
    let p: &'static Path = Box::leak(path.to_path_buf().into_boxed_path());
    paths.push(p);
    p
}

impl ServerAddr {
    /// The IP address, or `unix` (PgBouncer's way of showing a Unix-domain server).
    pub fn host(&self) -> String {
        match self {
            ServerAddr::Tcp(a) => a.ip().to_string(),
            ServerAddr::Unix(_) => "unix".to_string(),
        }
    }

    /// The TCP port, or the one in a Unix-domain socket's name (`.s.PGSQL.<port>`).
    pub fn port(&self) -> Option<u16> {
        match self {
            ServerAddr::Tcp(a) => Some(a.port()),
            ServerAddr::Unix(p) => p.extension()?.to_str()?.parse().ok(),
        }
    }

    async fn connect(&self) -> std::io::Result<Socket> {
        match self {
            ServerAddr::Tcp(a) => {
                let stream = TcpStream::connect(a).await?;
                stream.set_nodelay(true)?;
                Ok(Socket::plain(stream))
            }
            ServerAddr::Unix(p) => Ok(Socket::unix(UnixStream::connect(p).await?)),
        }
    }
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddr::Tcp(a) => a.fmt(f),
            ServerAddr::Unix(p) => p.display().fmt(f),
        }
    }
}

/// As the string shown: a TCP address is written exactly as a `SocketAddr` was before Unix
/// sockets existed, so an older process's takeover records still read.
impl serde::Serialize for ServerAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ServerAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ServerAddr, D::Error> {
        let s = String::deserialize(d)?;
        if s.starts_with('/') {
            return Ok(ServerAddr::Unix(intern(Path::new(&s))));
        }
        s.parse()
            .map(ServerAddr::Tcp)
            .map_err(serde::de::Error::custom)
    }
}

/// The backend's cancel key, with the address it is valid at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelTarget {
    pub addr: ServerAddr,
    pub pid: i32,
    pub key: i32,
}

/// A logged-in server connection, ready for queries (it last sent ReadyForQuery 'I').
#[derive(Debug)]
pub struct ServerConn {
    pub stream: Socket,
    pub cancel: CancelTarget,
    /// ParameterStatus values the server reported at login, in order.
    pub params: Vec<(String, String)>,
    pub created: Instant,
    /// The pool's suspicion epoch when this connection was last known alive (see
    /// `Pool::suspect_all`).
    pub checked_epoch: u64,
    /// The settings and prepared statements pgtether gave this connection.
    pub session: ServerSession,
    /// When it last went from one client straight to another, past deadpool (which then
    /// does not see it used).
    pub handed_off: Option<Instant>,
    /// The worker thread whose runtime the socket is registered with (see `workers`).
    pub home: u8,
}

impl ServerConn {
    /// Moves the socket's registration to the calling thread's runtime if it is another's.
    /// On failure it stays where it is: it still works, through the other thread's runtime.
    pub fn come_home(&mut self) {
        let here = crate::workers::current();
        if self.home == here {
            return;
        }
        match self.stream.rebind() {
            Ok(()) => self.home = here,
            Err(e) => tracing::debug!(error = %e, "server connection stays on its worker thread"),
        }
    }

    /// Connects and logs in; returns once the server is ready for queries.
    pub async fn connect(up: &Upstream) -> Result<ServerConn, ServerError> {
        let label = format!("{}:{}", up.host, up.port);
        tokio::time::timeout(up.connect_timeout, Self::connect_inner(up))
            .await
            .map_err(|_| ServerError::ConnectTimeout(label))?
    }

    async fn connect_inner(up: &Upstream) -> Result<ServerConn, ServerError> {
        let (mut stream, addr, label) = if up.host.starts_with('/') {
            // libpq's rule: a host that is a directory names a Unix-domain socket.
            let path = crate::socket::unix_socket_path(Path::new(&up.host), up.port);
            let addr = ServerAddr::Unix(intern(&path));
            let label = addr.to_string();
            let stream = addr
                .connect()
                .await
                .map_err(|source| ServerError::Connect {
                    addr: label.clone(),
                    source,
                })?;
            (stream, addr, label)
        } else {
            let label = format!("{}:{}", up.host, up.port);
            // Resolved on every connect so that a DNS name follows failovers.
            let stream = TcpStream::connect((up.host.as_str(), up.port))
                .await
                .map_err(|source| ServerError::Connect {
                    addr: label.clone(),
                    source,
                })?;
            stream.set_nodelay(true)?;
            set_keepalive(&stream);
            let addr = ServerAddr::Tcp(stream.peer_addr()?);
            (Socket::plain(stream), addr, label)
        };
        // Like libpq, sslmode does not apply to Unix-domain sockets (PostgreSQL offers no
        // TLS on them).
        if let (Some(tls), ServerAddr::Tcp(_)) = (&up.tls, &addr) {
            negotiate_tls(&mut stream, up, tls.clone(), &label).await?;
        }
        let mut conn = ServerConn {
            stream,
            cancel: CancelTarget {
                addr,
                pid: 0,
                key: 0,
            },
            params: Vec::new(),
            created: Instant::now(),
            checked_epoch: 0,
            session: ServerSession::new(up.max_prepared_statements),
            handed_off: None,
            home: crate::workers::current(),
        };
        conn.login(up).await?;
        Ok(conn)
    }

    async fn login(&mut self, up: &Upstream) -> Result<(), ServerError> {
        let mut out = BytesMut::with_capacity(256);
        // No application_name: a client that sets none must see '' as on a dedicated
        // connection, also after a RESET.
        let params = [("user", up.user.as_str()), ("database", up.dbname.as_str())];
        frontend::startup_message(params.iter().copied(), &mut out)?;
        self.stream.write_all(&out).await?;
        out.clear();

        let mut buf = BytesMut::with_capacity(1024);
        let mut scram: Option<UpstreamScram> = None;
        loop {
            let msg = read_message(&mut self.stream, &mut buf).await?;
            match msg {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    let pw = password(up)?;
                    frontend::password_message(pw.as_bytes(), &mut out)?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let pw = password(up)?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        up.user.as_bytes(),
                        pw.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut out)?;
                }
                Message::AuthenticationSasl(body) => {
                    let s = match (&up.password, &up.scram_keys) {
                        (Some(pw), _) => UpstreamScram::Password(ScramSha256::new(
                            pw.as_bytes(),
                            ChannelBinding::unsupported(),
                        )),
                        (None, Some(keys)) => UpstreamScram::Keys(KeyClient::new(keys.clone())),
                        (None, None) => return Err(ServerError::NoPassword(up.user.clone())),
                    };
                    let mut mechanisms = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = mechanisms.next()? {
                        has_scram |= m == "SCRAM-SHA-256";
                    }
                    if !has_scram {
                        return Err(ServerError::Scram("server offers no SCRAM-SHA-256".into()));
                    }
                    frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or(ServerError::Unexpected("SASL continue"))?;
                    s.update(body.data())?;
                    frontend::sasl_response(s.message(), &mut out)?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram.take().ok_or(ServerError::Unexpected("SASL final"))?;
                    s.finish(body.data())?;
                }
                Message::ParameterStatus(p) => {
                    self.params
                        .push((p.name()?.to_string(), p.value()?.to_string()));
                }
                Message::BackendKeyData(k) => {
                    self.cancel.pid = k.process_id();
                    self.cancel.key = k.secret_key();
                }
                Message::ErrorResponse(body) => return Err(postgres_error(body.fields())?),
                Message::NoticeResponse(_) => {}
                Message::ReadyForQuery(_) => return Ok(()),
                Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGss
                | Message::AuthenticationSspi
                | Message::AuthenticationGssContinue(_) => {
                    return Err(ServerError::UnsupportedAuth(0))
                }
                _ => return Err(ServerError::Unexpected("message during login")),
            }
            if !out.is_empty() {
                self.stream.write_all(&out).await?;
                out.clear();
            }
        }
    }

    /// Runs one simple-protocol query whose results pgtether discards (resets, rollbacks).
    /// Fails if the server reports an error or is not idle afterwards.
    pub async fn run_discarding(&mut self, sql: &str) -> Result<(), ServerError> {
        let mut out = BytesMut::with_capacity(sql.len() + 8);
        frontend::query(sql, &mut out)?;
        self.stream.write_all(&out).await?;
        let mut buf = BytesMut::with_capacity(256);
        let mut failure = None;
        loop {
            match read_message(&mut self.stream, &mut buf).await? {
                Message::ErrorResponse(body) => failure = Some(postgres_error(body.fields())?),
                Message::ReadyForQuery(r) => {
                    return match (failure, r.status()) {
                        (Some(e), _) => Err(e),
                        (None, b'I') => Ok(()),
                        (None, _) => Err(ServerError::Unexpected("server still in a transaction")),
                    }
                }
                _ => {}
            }
        }
    }

    /// Ends the backend of a connection that may be running a statement no one waits for
    /// (its client left): Terminate, then CancelRequests until the server closes the
    /// connection. Closing the socket alone would not stop a running statement (PostgreSQL
    /// notices only when it next reads or writes), and one cancel is not enough: a cancel
    /// that arrives before the backend has read the statement is dropped. Gives up after
    /// `limit` (the socket is then closed, which ends a backend waiting for input).
    pub async fn stop_backend(&mut self, limit: Duration) {
        let mut out = BytesMut::with_capacity(5);
        frontend::terminate(&mut out);
        let _ = self.stream.write_all(&out).await;
        let deadline = Instant::now() + limit;
        let mut sink = vec![0u8; 8192];
        while Instant::now() < deadline {
            if let Err(e) = send_cancel(self.cancel).await {
                tracing::debug!(error = %e, "could not cancel the work of a closing server connection");
            }
            let round = (Instant::now() + Duration::from_millis(500)).min(deadline);
            loop {
                match tokio::time::timeout_at(round.into(), self.stream.read(&mut sink)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    Ok(Ok(_)) => continue,
                    Err(_) => break,
                }
            }
        }
    }

    /// This connection's state, for the process taking over.
    pub fn export(&self, registry: &crate::statements::Registry) -> ServerRecord {
        let (settings, statements) = self.session.export(registry);
        ServerRecord {
            pid: self.cancel.pid,
            key: self.cancel.key,
            addr: self.cancel.addr,
            params: self.params.clone(),
            age_ms: self.created.elapsed().as_millis() as u64,
            settings,
            statements,
        }
    }

    /// A connection another pgtether process handed over, with the state it recorded.
    pub fn adopt(
        state: ServerRecord,
        fd: std::os::fd::OwnedFd,
        registry: &crate::statements::Registry,
        max_statements: usize,
    ) -> std::io::Result<ServerConn> {
        let stream = Socket::adopt(fd)?;
        let now = Instant::now();
        Ok(ServerConn {
            stream,
            cancel: CancelTarget {
                addr: state.addr,
                pid: state.pid,
                key: state.key,
            },
            params: state.params,
            created: now
                .checked_sub(Duration::from_millis(state.age_ms))
                .unwrap_or(now),
            checked_epoch: 0,
            handed_off: None,
            home: crate::workers::current(),
            session: ServerSession::import(
                state.settings,
                state.statements,
                registry,
                max_statements,
            ),
        })
    }

    /// Cheap liveness check without a round trip: an idle server sends nothing, so readable
    /// data (a FATAL before close) or EOF means the connection is no longer usable.
    pub fn looks_alive(&self) -> bool {
        self.stream.looks_idle()
    }
}

/// Asks the server for TLS (SSLRequest) and, if it agrees, upgrades the connection, checking
/// its certificate as `sslmode` says.
async fn negotiate_tls(
    stream: &mut Socket,
    up: &Upstream,
    tls: Arc<rustls::ClientConfig>,
    label: &str,
) -> Result<(), ServerError> {
    let mut request = BytesMut::with_capacity(8);
    frontend::ssl_request(&mut request);
    stream.write_all(&request).await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            let name = crate::tls::server_name(&up.host).ok_or_else(|| ServerError::Tls {
                addr: label.to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("\"{}\" is not a valid TLS server name", up.host),
                ),
            })?;
            stream
                .connect_tls(tls, name)
                .await
                .map_err(|source| ServerError::Tls {
                    addr: label.to_string(),
                    source,
                })
        }
        b'N' if up.sslmode == SslMode::Prefer => Ok(()),
        b'N' => Err(ServerError::TlsRefused(label.to_string())),
        _ => Err(ServerError::Unexpected("answer to SSLRequest")),
    }
}

/// TCP keepalive, so a server that vanished without closing (host down, network partition)
/// is noticed even while its connection sits idle in the pool.
pub fn set_keepalive(stream: &TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "could not set TCP keepalive");
    }
}

/// The client side of an upstream SCRAM exchange: with the plain password, or with the keys
/// a client proved (see [`crate::auth::scram::KeyClient`]).
enum UpstreamScram {
    Password(ScramSha256),
    Keys(KeyClient),
}

impl UpstreamScram {
    fn message(&self) -> &[u8] {
        match self {
            UpstreamScram::Password(s) => s.message(),
            UpstreamScram::Keys(k) => k.message(),
        }
    }

    fn update(&mut self, data: &[u8]) -> Result<(), ServerError> {
        match self {
            UpstreamScram::Password(s) => s
                .update(data)
                .map_err(|e| ServerError::Scram(e.to_string())),
            UpstreamScram::Keys(k) => k
                .update(data)
                .map_err(|e| ServerError::Scram(e.to_string())),
        }
    }

    fn finish(self, data: &[u8]) -> Result<(), ServerError> {
        match self {
            UpstreamScram::Password(mut s) => s
                .finish(data)
                .map_err(|e| ServerError::Scram(e.to_string())),
            UpstreamScram::Keys(k) => k
                .finish(data)
                .map_err(|e| ServerError::Scram(e.to_string())),
        }
    }
}

fn password(up: &Upstream) -> Result<&str, ServerError> {
    up.password
        .as_deref()
        .ok_or_else(|| ServerError::NoPassword(up.user.clone()))
}

/// Reads one whole backend message during login or internal queries (not the hot path).
async fn read_message(stream: &mut Socket, buf: &mut BytesMut) -> Result<Message, ServerError> {
    loop {
        if let Some(msg) = Message::parse(buf)? {
            return Ok(msg);
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(4096);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(ServerError::Closed);
        }
    }
}

/// Turns ErrorResponse fields into a `ServerError::Postgres`.
fn postgres_error(
    mut fields: postgres_protocol::message::backend::ErrorFields<'_>,
) -> Result<ServerError, std::io::Error> {
    let mut code = String::new();
    let mut message = String::new();
    while let Some(f) = fields.next()? {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            _ => {}
        }
    }
    Ok(ServerError::Postgres { code, message })
}

/// Sends a CancelRequest for `target` on a fresh connection, as PostgreSQL expects.
pub async fn send_cancel(target: CancelTarget) -> Result<(), ServerError> {
    let mut stream = target
        .addr
        .connect()
        .await
        .map_err(|source| ServerError::Connect {
            addr: target.addr.to_string(),
            source,
        })?;
    let mut out = BytesMut::with_capacity(16);
    frontend::cancel_request(target.pid, target.key, &mut out);
    stream.write_all(&out).await?;
    // The server closes the connection without a reply; wait for that so the cancel is
    // delivered before we return.
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut sink)).await;
    Ok(())
}
