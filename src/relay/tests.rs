use super::*;
use crate::config::{OnPin, PoolMode};
use crate::metrics::Metrics;
use crate::session::state::ClientSession;
use crate::statements::Registry;
use bytes::BufMut;

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.put_i32(4 + body.len() as i32);
    v.extend_from_slice(body);
    v
}

struct Fixture {
    registry: Registry,
    metrics: crate::metrics::PoolMetrics,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            registry: Registry::default(),
            metrics: Metrics::new().pool("d", "u"),
        }
    }
    fn ctx(&self, mode: PoolMode, tracking: bool) -> Ctx<'_> {
        Ctx {
            registry: &self.registry,
            metrics: &self.metrics,
            mode,
            on_pin: OnPin::Pin,
            tracking,
            prepare_unnamed: false,
        }
    }
}

fn to_server(bytes: &[u8]) -> ToServer {
    let mut c = ToServer::default();
    c.input.extend_from_slice(bytes);
    c
}

fn flow_with(bytes: &[u8]) -> Flow {
    let mut f = Flow::default();
    f.buf.extend_from_slice(bytes);
    f
}

#[test]
fn client_pipeline_counts_syncs() {
    let fx = Fixture::new();
    let ctx = fx.ctx(PoolMode::Transaction, true);
    let mut bytes = msg(b'P', b"\0SELECT 1\0\0\0");
    bytes.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
    bytes.extend(msg(b'E', b"\0\0\0\0\0"));
    bytes.extend(msg(b'S', b""));
    bytes.extend(msg(b'Q', b"SELECT 1\0"));
    let mut c = to_server(&bytes);
    let mut t = Tracker::default();
    let mut server = ServerSession::new(10);
    assert_eq!(
        scan_client(&mut c, &mut t, &mut server, &ctx, 1 << 20),
        Ok(ClientEvent::NeedMore)
    );
    assert_eq!(&c.out[..], &bytes[..], "unnamed statements pass unchanged");
    assert_eq!(t.tx.pending, 2);
    assert!(!t.tx.unsynced);
    assert_eq!(t.counts.queries, 2);
}

#[test]
fn client_partial_header_and_streamed_body() {
    let fx = Fixture::new();
    let ctx = fx.ctx(PoolMode::Transaction, true);
    let big = msg(b'd', &[7u8; 1000]);
    let mut c = to_server(&big[..3]);
    let mut t = Tracker::default();
    let mut server = ServerSession::new(10);
    assert_eq!(
        scan_client(&mut c, &mut t, &mut server, &ctx, 1 << 20),
        Ok(ClientEvent::NeedMore)
    );
    assert!(c.out.is_empty());
    c.input.extend_from_slice(&big[3..500]);
    scan_client(&mut c, &mut t, &mut server, &ctx, 1 << 20).unwrap();
    assert_eq!(c.out.len(), 500);
    c.input.extend_from_slice(&big[500..]);
    c.input.extend_from_slice(&msg(b'X', b""));
    assert_eq!(
        scan_client(&mut c, &mut t, &mut server, &ctx, 1 << 20),
        Ok(ClientEvent::Terminate)
    );
    assert_eq!(&c.out[..], &big[..]);
}

#[test]
fn client_garbage_is_refused() {
    let fx = Fixture::new();
    let ctx = fx.ctx(PoolMode::Transaction, true);
    let mut t = Tracker::default();
    let mut server = ServerSession::new(10);
    let mut c = to_server(&msg(b'Z', b"I"));
    assert_eq!(
        scan_client(&mut c, &mut t, &mut server, &ctx, 1 << 20),
        Err(ProtocolError::UnknownType('Z'))
    );
    let mut c = to_server(b"Q\0\0\0\x02");
    assert_eq!(
        scan_client(&mut c, &mut t, &mut server, &ctx, 1 << 20),
        Err(ProtocolError::BadLength(2))
    );
    let mut c = to_server(&msg(b'Q', &[b'x'; 2000]));
    assert!(matches!(
        scan_client(&mut c, &mut t, &mut server, &ctx, 1024),
        Err(ProtocolError::TooLarge { .. })
    ));
}

#[test]
fn named_statement_is_rewritten_and_shared() {
    let fx = Fixture::new();
    let ctx = fx.ctx(PoolMode::Transaction, true);
    let mut server = ServerSession::new(10);
    let mut a = Tracker::new(ClientSession::default());
    let mut bytes = msg(b'P', b"s1\0SELECT 1\0\0\0");
    bytes.extend(msg(b'B', b"\0s1\0\0\0\0\0\0\0"));
    bytes.extend(msg(b'S', b""));
    let mut c = to_server(&bytes);
    scan_client(&mut c, &mut a, &mut server, &ctx, 1 << 20).unwrap();
    let out = String::from_utf8_lossy(&c.out).into_owned();
    assert!(out.contains("pgtether_") && !out.contains("s1"), "{out:?}");
    // A second client preparing the same text gets ParseComplete from pgtether.
    let mut b = Tracker::new(ClientSession::default());
    let mut c2 = to_server(&msg(b'P', b"other\0SELECT 1\0\0\0"));
    scan_client(&mut c2, &mut b, &mut server, &ctx, 1 << 20).unwrap();
    assert!(c2.out.is_empty(), "nothing sent to the server");
    let mut s2c = Flow::default();
    emit_synthesized(&mut s2c, &mut b);
    assert_eq!(&s2c.buf[..], crate::session::replies::PARSE_COMPLETE);
}

#[test]
fn server_release_only_when_clean() {
    let fx = Fixture::new();
    let ctx = fx.ctx(PoolMode::Transaction, false);
    let mut t = Tracker::default();
    t.tx.pending = 2;
    let mut server = ServerSession::new(10);
    let mut bytes = msg(b'C', b"SELECT 1\0");
    bytes.extend(msg(b'Z', b"I"));
    let mut f = flow_with(&bytes);
    assert_eq!(
        scan_server(&mut f, &mut t, &mut server, &ctx),
        ServerEvent::NeedMore
    );
    assert_eq!(t.tx.pending, 1);
    f.buf.extend_from_slice(&msg(b'Z', b"T")[..4]);
    assert_eq!(
        scan_server(&mut f, &mut t, &mut server, &ctx),
        ServerEvent::NeedMore
    );
    f.buf.extend_from_slice(&msg(b'Z', b"T")[4..]);
    assert_eq!(
        scan_server(&mut f, &mut t, &mut server, &ctx),
        ServerEvent::NeedMore
    );
    assert_eq!(t.tx.status, b'T');
    t.tx.pending = 1;
    f.buf.extend_from_slice(&msg(b'Z', b"I"));
    assert_eq!(
        scan_server(&mut f, &mut t, &mut server, &ctx),
        ServerEvent::Release
    );
    assert_eq!(f.ready, f.buf.len());
    assert_eq!(t.counts.transactions, 2);
}

#[test]
fn session_mode_never_releases_and_statement_mode_refuses_blocks() {
    let fx = Fixture::new();
    let mut server = ServerSession::new(10);
    let mut t = Tracker::default();
    t.tx.pending = 1;
    let mut f = flow_with(&msg(b'Z', b"I"));
    let ctx = fx.ctx(PoolMode::Session, false);
    assert_eq!(
        scan_server(&mut f, &mut t, &mut server, &ctx),
        ServerEvent::NeedMore
    );
    t.tx.pending = 1;
    let mut f = flow_with(&msg(b'Z', b"T"));
    let ctx = fx.ctx(PoolMode::Statement, false);
    assert_eq!(
        scan_server(&mut f, &mut t, &mut server, &ctx),
        ServerEvent::TransactionInStatementMode
    );
    assert_eq!(f.ready, 0);
}

#[test]
fn swallow_and_insert_keep_the_rest() {
    let mut bytes = msg(b'C', b"BEGIN\0");
    let first = bytes.len();
    bytes.extend(msg(b'Z', b"T"));
    bytes.extend(msg(b'N', b"x\0"));
    let mut f = flow_with(&bytes);
    f.ready = first;
    f.remove_next(6);
    assert_eq!(&f.buf[first..], &msg(b'N', b"x\0")[..]);
    f.insert_ready(b"3\0\0\0\x04");
    assert_eq!(f.ready, first + 5);
    assert_eq!(&f.buf[first + 5..], &msg(b'N', b"x\0")[..]);
}
