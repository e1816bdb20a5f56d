//! Micro-benchmarks of the relay's hot path: message framing and the client-side scan.
//!
//! `cargo bench --bench codec` (add `-- scan_client` to run one group).
//!
//! `ToServer` has no public way to put bytes in its input buffer other than reading them from
//! a socket, so the scan benchmarks feed each input through a loopback TCP connection in the
//! (unmeasured) setup of `iter_batched`; only `scan_client` itself is timed.

use std::hint::black_box;
use std::io::Write;
use std::net::{TcpListener, TcpStream as StdStream};

use bytes::BufMut;
use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkGroup, Criterion, Throughput,
};
use pgtether::socket::Socket;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

use pgtether::config::{OnPin, PoolMode};
use pgtether::metrics::{Metrics, PoolMetrics};
use pgtether::protocol::frame;
use pgtether::relay::{scan_client, ClientEvent, ToServer};
use pgtether::session::state::ServerSession;
use pgtether::session::tracker::{Ctx, Tracker};
use pgtether::statements::Registry;

fn msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.put_i32(4 + body.len() as i32);
    out.extend_from_slice(body);
}

/// A server → client stream: RowDescription, 1000 DataRows of varying width,
/// CommandComplete, ReadyForQuery.
fn result_stream() -> (Vec<u8>, usize) {
    let mut v = Vec::new();
    msg(
        &mut v,
        b'T',
        b"\0\x01abalance\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
    );
    for i in 0..1000usize {
        let val = format!("{}", i * 7919);
        let mut body = Vec::new();
        body.put_i16(1);
        body.put_i32(val.len() as i32);
        body.extend_from_slice(val.as_bytes());
        msg(&mut v, b'D', &body);
    }
    msg(&mut v, b'C', b"SELECT 1000\0");
    msg(&mut v, b'Z', b"I");
    (v, 1003)
}

fn bench_header(c: &mut Criterion) {
    let (buf, count) = result_stream();
    let mut g = c.benchmark_group("frame_header");
    g.throughput(Throughput::Elements(count as u64));
    g.bench_function("walk_1003_messages", |b| {
        b.iter(|| {
            let buf = black_box(&buf[..]);
            let mut pos = 0;
            let mut n = 0u32;
            while let Some((tag, total)) = frame::header(&buf[pos..]) {
                let total = total.expect("valid length");
                n = n.wrapping_add(tag as u32);
                pos += total;
            }
            black_box((n, pos))
        })
    });
    g.finish();
}

// ---------------------------------------------------------------- scan_client

const QUERY: &[u8] = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;";

fn parse(out: &mut Vec<u8>, name: &[u8]) {
    let mut body = Vec::new();
    body.extend_from_slice(name);
    body.push(0);
    body.extend_from_slice(QUERY);
    body.push(0);
    body.put_i16(0); // no parameter types: the server infers them
    msg(out, b'P', &body);
}

fn bind(out: &mut Vec<u8>, statement: &[u8]) {
    let mut body = Vec::new();
    body.push(0); // unnamed portal
    body.extend_from_slice(statement);
    body.push(0);
    body.put_i16(0); // parameter formats: all text
    body.put_i16(1);
    body.put_i32(5);
    body.extend_from_slice(b"48213");
    body.put_i16(0); // result formats: all text
    msg(out, b'B', &body);
}

fn describe_execute_sync(out: &mut Vec<u8>) {
    msg(out, b'D', b"P\0");
    msg(out, b'E', b"\0\0\0\0\0");
    msg(out, b'S', b"");
}

/// What pgbench -M extended sends per transaction: Parse/Bind/Describe/Execute/Sync of the
/// unnamed statement.
fn extended_txn(out: &mut Vec<u8>) {
    parse(out, b"");
    bind(out, b"");
    describe_execute_sync(out);
}

/// pgbench -M prepared, first use on a connection: Parse of a named statement, then Bind.
fn prepared_first_txn(out: &mut Vec<u8>) {
    parse(out, b"P_0");
    bind(out, b"P_0");
    describe_execute_sync(out);
}

/// pgbench -M prepared, steady state: Bind/Describe/Execute/Sync of the named statement.
fn prepared_txn(out: &mut Vec<u8>) {
    bind(out, b"P_0");
    describe_execute_sync(out);
}

/// Loopback connection through which setup fills a `ToServer`'s input buffer.
struct Feeder {
    rt: Runtime,
    tx: StdStream,
    rx: Socket,
}

impl Feeder {
    fn new() -> Feeder {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("tokio runtime");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let tx = StdStream::connect(listener.local_addr().unwrap()).expect("connect");
        tx.set_nodelay(true).unwrap();
        let (rx, _) = listener.accept().expect("accept");
        rx.set_nonblocking(true).unwrap();
        let rx = {
            let _guard = rt.enter();
            Socket::plain(TcpStream::from_std(rx).expect("register socket"))
        };
        Feeder { rt, tx, rx }
    }

    /// Appends `bytes` to the input of `c2s`, exactly as the relay reads them.
    fn feed(&mut self, c2s: &mut ToServer, bytes: &[u8]) {
        self.tx.write_all(bytes).expect("write loopback");
        let rx = &self.rx;
        self.rt.block_on(async {
            let mut got = 0;
            while got < bytes.len() {
                rx.readable().await.expect("readable");
                match c2s.try_read(rx) {
                    Ok(0) => panic!("loopback closed"),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("read loopback: {e}"),
                }
            }
            assert_eq!(got, bytes.len(), "read past the fed bytes");
        });
    }
}

struct Fixture {
    registry: Registry,
    metrics: PoolMetrics,
}

impl Fixture {
    fn ctx(&self, tracking: bool) -> Ctx<'_> {
        Ctx {
            registry: &self.registry,
            metrics: &self.metrics,
            mode: PoolMode::Transaction,
            on_pin: OnPin::Pin,
            tracking,
            prepare_unnamed: false,
        }
    }
}

const MAX_MESSAGE: usize = 1 << 30;
/// Transactions pipelined in one client read.
const PIPELINE: usize = 16;

type Input = (ToServer, Tracker, ServerSession);

/// One scan benchmark: `bytes` scanned by a fresh tracker and server record, after `warm`
/// (if any) was scanned by them (the client prepared a statement earlier on this server
/// connection).
fn scan_case(
    g: &mut BenchmarkGroup<'_, WallTime>,
    feeder: &mut Feeder,
    fx: &Fixture,
    name: &str,
    tracking: bool,
    warm: Option<&[u8]>,
    bytes: &[u8],
) {
    let ctx = fx.ctx(tracking);
    let ctx = &ctx;
    g.bench_function(name, |b| {
        b.iter_batched(
            || -> Input {
                let mut c2s = ToServer::default();
                let mut tracker = Tracker::default();
                let mut server = ServerSession::new(100);
                if let Some(warm) = warm {
                    feeder.feed(&mut c2s, warm);
                    scan_client(&mut c2s, &mut tracker, &mut server, ctx, MAX_MESSAGE)
                        .expect("scan warm-up");
                    c2s.out().clear();
                }
                feeder.feed(&mut c2s, bytes);
                (c2s, tracker, server)
            },
            |(mut c2s, mut tracker, mut server): Input| {
                let ev = scan_client(&mut c2s, &mut tracker, &mut server, ctx, MAX_MESSAGE);
                assert_eq!(ev, Ok(ClientEvent::NeedMore));
                (c2s, tracker, server)
            },
            BatchSize::SmallInput,
        )
    });
}

fn bench_scan_client(c: &mut Criterion) {
    let fx = Fixture {
        registry: Registry::default(),
        metrics: Metrics::new().pool("app", "app"),
    };
    let mut feeder = Feeder::new();

    let mut extended = Vec::new();
    let mut prepared_first = Vec::new();
    let mut prepared = Vec::new();
    for _ in 0..PIPELINE {
        extended_txn(&mut extended);
        prepared_txn(&mut prepared);
    }
    prepared_first_txn(&mut prepared_first);
    for _ in 1..PIPELINE {
        prepared_txn(&mut prepared_first);
    }
    let mut prepare_only = Vec::new();
    parse(&mut prepare_only, b"P_0");
    msg(&mut prepare_only, b'S', b"");

    let mut g = c.benchmark_group("scan_client");
    g.throughput(Throughput::Elements(PIPELINE as u64));

    scan_case(
        &mut g,
        &mut feeder,
        &fx,
        "extended_16_tracking",
        true,
        None,
        &extended,
    );
    scan_case(
        &mut g,
        &mut feeder,
        &fx,
        "extended_16_notrack",
        false,
        None,
        &extended,
    );
    scan_case(
        &mut g,
        &mut feeder,
        &fx,
        "prepared_first_16_tracking",
        true,
        None,
        &prepared_first,
    );
    scan_case(
        &mut g,
        &mut feeder,
        &fx,
        "prepared_16_tracking",
        true,
        Some(&prepare_only),
        &prepared,
    );
    scan_case(
        &mut g,
        &mut feeder,
        &fx,
        "prepared_16_notrack",
        false,
        Some(&prepare_only),
        &prepared,
    );
    g.finish();
}

criterion_group!(benches, bench_header, bench_scan_client);
criterion_main!(benches);
