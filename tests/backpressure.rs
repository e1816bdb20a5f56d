//! Large results and slow readers: pgtether keeps a bounded buffer per connection and lets
//! TCP backpressure slow the server down, instead of buffering the result.

mod common;

use std::time::{Duration, Instant};

use common::{msg, Opts, Pgtether, Raw};
use tokio::io::AsyncReadExt;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn slow_reader_of_a_large_result_keeps_memory_bounded() {
    let p = Pgtether::start(Opts {
        auth: "trust",
        ..Opts::default()
    });
    let mut raw = Raw::login_trust(p.port, "app").await;
    // Warm up: one small query so pools and buffers that exist once are allocated.
    raw.send(&msg(b'Q', b"SELECT 1\0")).await;
    loop {
        if let postgres_protocol::message::backend::Message::ReadyForQuery(_) = raw.recv().await {
            break;
        }
    }
    let before = rss_kib(p.pid());

    // About 1 GB of rows, read in small sips with pauses: the server produces far faster.
    let rows: u64 = 1_000_000;
    let sql = format!("SELECT repeat('x', 1000) FROM generate_series(1, {rows})\0");
    raw.send(&msg(b'Q', sql.as_bytes())).await;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    let mut tail: Vec<u8> = Vec::new();
    let mut peak = before;
    let started = Instant::now();
    let mut reads = 0u64;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), raw.stream.read(&mut buf))
            .await
            .expect("result keeps flowing")
            .expect("read");
        assert!(n > 0, "pgtether closed the connection mid-result");
        total += n as u64;
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 6 {
            tail.drain(..tail.len() - 6);
        }
        if tail == b"Z\0\0\0\x05I" {
            break;
        }
        reads += 1;
        if reads == 256 {
            // A reader that stops for a second: PostgreSQL could send hundreds of MB meanwhile,
            // and only backpressure keeps them out of pgtether.
            tokio::time::sleep(Duration::from_secs(1)).await;
            peak = peak.max(rss_kib(p.pid()));
        }
        if reads.is_multiple_of(16) {
            peak = peak.max(rss_kib(p.pid()));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let expected_min = rows * 1000;
    assert!(
        total > expected_min,
        "got {total} bytes, expected more than {expected_min}"
    );
    let growth = peak.saturating_sub(before);
    // About 0.6 MB here; with the relay's high-water mark lifted, 978 MB.
    assert!(
        growth < 4 * 1024,
        "pgtether grew by {growth} KiB while relaying {total} bytes to a slow reader (in {:?})",
        started.elapsed()
    );
    // And the connection is still good.
    raw.send(&msg(b'Q', b"SELECT 42\0")).await;
    let mut saw_row = false;
    loop {
        match raw.recv().await {
            postgres_protocol::message::backend::Message::DataRow(_) => saw_row = true,
            postgres_protocol::message::backend::Message::ReadyForQuery(_) => break,
            _ => {}
        }
    }
    assert!(saw_row);
}
