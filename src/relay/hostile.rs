//! Fuzz-style tests of the message framer (see `crate::fuzz`): hostile client and server
//! byte streams, cut into arbitrary pieces, through the scanners the relay runs.

use super::*;
use crate::config::{OnPin, PoolMode};
use crate::metrics::Metrics;
use crate::statements::Registry;
use bytes::BufMut;

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.put_i32(4 + body.len() as i32);
    v.extend_from_slice(body);
    v
}

fn seeds() -> Vec<Vec<u8>> {
    let mut pipeline = vec![0u8];
    pipeline.extend(msg(b'P', b"s1\0SELECT $1\0\0\x01\0\0\0\x17"));
    pipeline.extend(msg(b'B', b"\0s1\0\0\0\0\x01\0\0\0\x011\0\0"));
    pipeline.extend(msg(b'D', b"P\0"));
    pipeline.extend(msg(b'E', b"\0\0\0\0\0"));
    pipeline.extend(msg(b'C', b"Ss1\0"));
    pipeline.extend(msg(b'S', b""));
    let mut simple = vec![3u8];
    simple.extend(msg(b'Q', b"BEGIN; SET x.y = 1; LISTEN c\0"));
    simple.extend(msg(b'd', b"copy data"));
    simple.extend(msg(b'c', b""));
    simple.extend(msg(b'X', b""));
    let mut server = vec![0x81u8];
    server.extend(msg(b'1', b""));
    server.extend(msg(b'2', b""));
    server.extend(msg(
        b'T',
        b"\0\x01a\0\0\0\0\0\0\x01\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
    ));
    server.extend(msg(b'D', b"\0\x01\0\0\0\x011"));
    server.extend(msg(b'C', b"SELECT 1\0"));
    server.extend(msg(b'E', b"SERROR\0C42601\0Mbad\0\0"));
    server.extend(msg(b'Z', b"T"));
    server.extend(msg(b'Z', b"I"));
    vec![pipeline, simple, server]
}

/// The first byte picks the setup: bit 0 tracking, bit 1 mode, bits 2–5 the chunk size, bit 6
/// `prepare_unnamed`, bit 7 feeds the bytes to the server-side scanner instead.
fn framer_target(input: &[u8]) {
    let Some((&setup, stream)) = input.split_first() else {
        return;
    };
    let registry = Registry::default();
    let metrics = Metrics::new().pool("d", "u");
    let ctx = Ctx {
        registry: &registry,
        metrics: &metrics,
        mode: if setup & 2 == 0 {
            PoolMode::Transaction
        } else {
            PoolMode::Session
        },
        on_pin: OnPin::Pin,
        tracking: setup & 1 == 1,
        prepare_unnamed: setup & 0x40 != 0,
    };
    let chunk = 1 + usize::from((setup >> 2) & 0x0f) * 3;
    let mut tracker = Tracker::default();
    let mut server = ServerSession::new(10);
    let max_message = 4096;
    if setup & 0x80 != 0 {
        let mut s2c = Flow::default();
        for piece in stream.chunks(chunk) {
            s2c.buf.extend_from_slice(piece);
            let event = scan_server(&mut s2c, &mut tracker, &mut server, &ctx);
            assert!(s2c.ready <= s2c.buf.len(), "ready past the buffer");
            if event != ServerEvent::NeedMore {
                return;
            }
            // The client takes everything ready.
            s2c.buf.advance(s2c.ready);
            s2c.ready = 0;
        }
        return;
    }
    let mut c2s = ToServer::default();
    let mut fed = Vec::new();
    let mut forwarded = Vec::new();
    for piece in stream.chunks(chunk) {
        c2s.input.extend_from_slice(piece);
        fed.extend_from_slice(piece);
        let event = scan_client(&mut c2s, &mut tracker, &mut server, &ctx, max_message);
        forwarded.extend_from_slice(&c2s.out);
        c2s.out.clear();
        match event {
            Ok(ClientEvent::NeedMore) => {}
            Ok(ClientEvent::Terminate) => {
                assert_eq!(c2s.input.first(), Some(&b'X'));
                break;
            }
            Err(_) => return,
        }
        if !ctx.tracking {
            // Without tracking the framer only forwards: nothing lost, added or reordered.
            let mut seen = forwarded.clone();
            seen.extend_from_slice(&c2s.input);
            assert_eq!(seen, fed, "untracked bytes changed on the way");
        }
    }
    // The local framer (answers without a server) on the same bytes: whole messages within
    // the limit, or an error.
    let mut local = ToServer::default();
    local.input.extend_from_slice(stream);
    while let Ok(Some(m)) = local.next_message(max_message) {
        let (_, total) = frame::header(&m).expect("a header");
        assert_eq!(total, Ok(m.len()));
        assert!(m.len() - 1 <= max_message);
    }
}

#[test]
fn fuzz_message_framer() {
    let runs = crate::fuzz::run("message framer", &seeds(), 2048, framer_target);
    assert!(runs > 100, "only {runs} inputs ran");
}
