//! Micro-benchmarks of the keyword lexer that runs on every simple Query and unnamed Parse
//! when session state is tracked.
//!
//! `cargo bench --bench lexer`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use pgtether::lexer::{analyze, Effect};

/// The hot case: a query with no session effect (pgbench -S). Its text repeats, so after the
/// first scan the lexer finds it among the plain texts it remembers per thread.
const SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;";

/// A candidate word ("SET") without a session effect: analyzed once, then remembered too.
const UPDATE: &str = "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2";

/// A setting that is tracked and replayed.
const SET: &str = "SET application_name = 'bench client 7'";

/// A long multi-statement text: pgbench's tpcb-like transaction with comments, quoted text
/// containing semicolons, a dollar-quoted body and a SET LOCAL, repeated.
fn long_text() -> String {
    let one = "\
BEGIN;
-- tpcb-like; comments and literals must not split statements
UPDATE pgbench_accounts SET abalance = abalance + -2170 WHERE aid = 412;
SELECT abalance FROM pgbench_accounts WHERE aid = 412;
UPDATE pgbench_tellers SET tbalance = tbalance + -2170 WHERE tid = 37;
UPDATE pgbench_branches SET bbalance = bbalance + -2170 WHERE bid = 4;
/* a block comment; with a semicolon */
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime, filler)
    VALUES (37, 4, 412, -2170, CURRENT_TIMESTAMP, 'x;y ''quoted''; z');
SET LOCAL statement_timeout = '5s';
DO $body$ BEGIN PERFORM 1; PERFORM 2; END $body$;
END;
";
    one.repeat(20)
}

fn bench_analyze(c: &mut Criterion) {
    let long = long_text();
    let mut g = c.benchmark_group("lexer_analyze");
    let mut out: Vec<Effect> = Vec::with_capacity(64);
    for (name, sql) in [
        ("select", SELECT),
        ("update", UPDATE),
        ("set", SET),
        ("multi_statement_180", long.as_str()),
    ] {
        g.throughput(Throughput::Bytes(sql.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                analyze(black_box(sql), &mut out);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_analyze);
criterion_main!(benches);
