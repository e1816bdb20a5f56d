//! A small fuzzing driver that runs on the stable toolchain as part of `cargo test`: random
//! inputs and mutations of seed inputs (bit flips, byte edits, splices, insertions of
//! boundary values) fed to a target for a bounded time. It finds panics and broken invariants
//! in the decoders that face clients; the optional `fuzz/` directory runs the same kind of
//! targets under cargo-fuzz (nightly) for longer, coverage-guided runs.
//!
//! Each run is seeded (printed when a target fails) so a failure can be replayed with
//! `PGTETHER_FUZZ_SEED=<seed>`; `PGTETHER_FUZZ_MS` changes the time per target.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Time per target unless `PGTETHER_FUZZ_MS` says otherwise.
const DEFAULT_BUDGET: Duration = Duration::from_secs(4);

/// Values that often sit on a decoder's boundaries.
const INTERESTING: &[u8] = &[
    0, 1, 3, 4, 5, 0x7f, 0x80, 0xfe, 0xff, b';', b'\'', b'"', b'$',
];

/// Runs `target` on random and mutated inputs for the time budget; panics (naming the seed
/// and the input) if the target panics. Returns how many inputs ran.
pub fn run(name: &str, seeds: &[Vec<u8>], max_len: usize, target: impl Fn(&[u8])) -> u64 {
    let budget = std::env::var("PGTETHER_FUZZ_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(DEFAULT_BUDGET, Duration::from_millis);
    let seed = std::env::var("PGTETHER_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().next_u64());
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut runs = 0u64;
    // Seeds first, as they are, then until the budget is spent.
    let mut next = seeds.iter().cloned();
    loop {
        let input = match next.next() {
            Some(s) => s,
            None if started.elapsed() >= budget => break,
            None => generate(&mut rng, seeds, max_len),
        };
        if catch_unwind(AssertUnwindSafe(|| target(&input))).is_err() {
            panic!(
                "fuzz target {name} failed (PGTETHER_FUZZ_SEED={seed}, run {runs}) on input {input:?}"
            );
        }
        runs += 1;
    }
    runs
}

/// A fresh random input (a quarter of the time) or a mutated seed.
fn generate(rng: &mut StdRng, seeds: &[Vec<u8>], max_len: usize) -> Vec<u8> {
    if seeds.is_empty() || rng.gen_ratio(1, 4) {
        let len = rng.gen_range(0..=max_len.min(256));
        let mut v = vec![0u8; len];
        rng.fill_bytes(&mut v);
        return v;
    }
    let mut v = seeds[rng.gen_range(0..seeds.len())].clone();
    for _ in 0..rng.gen_range(1..=4) {
        mutate(rng, &mut v, seeds);
    }
    v.truncate(max_len);
    v
}

fn mutate(rng: &mut StdRng, v: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    let at = |rng: &mut StdRng, len: usize| rng.gen_range(0..=len);
    match rng.gen_range(0..7) {
        0 if !v.is_empty() => {
            let i = rng.gen_range(0..v.len());
            v[i] ^= 1 << rng.gen_range(0..8);
        }
        1 if !v.is_empty() => {
            let i = rng.gen_range(0..v.len());
            v[i] = INTERESTING[rng.gen_range(0..INTERESTING.len())];
        }
        2 => {
            let i = at(rng, v.len());
            v.insert(i, INTERESTING[rng.gen_range(0..INTERESTING.len())]);
        }
        3 if !v.is_empty() => {
            let i = rng.gen_range(0..v.len());
            let n = rng.gen_range(1..=(v.len() - i).min(8));
            v.drain(i..i + n);
        }
        4 => {
            // A 32-bit field set to a boundary value: lengths are where framers break.
            if v.len() >= 4 {
                let i = rng.gen_range(0..=v.len() - 4);
                let x: i32 = [0, 1, 3, 4, 5, 8, -1, i32::MAX, i32::MIN, 10_000, 10_001]
                    [rng.gen_range(0..11)];
                v[i..i + 4].copy_from_slice(&x.to_be_bytes());
            }
        }
        5 => {
            // Splice: a piece of another seed.
            let other = &seeds[rng.gen_range(0..seeds.len())];
            if !other.is_empty() {
                let from = rng.gen_range(0..other.len());
                let to = rng.gen_range(from..=other.len());
                let i = at(rng, v.len());
                v.splice(i..i, other[from..to].iter().copied());
            }
        }
        _ => {
            let i = at(rng, v.len());
            v.truncate(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, BytesMut};

    use crate::lexer;
    use crate::protocol::startup::{self, StartupPacket};

    fn startup_seeds() -> Vec<Vec<u8>> {
        let mut seeds = Vec::new();
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::startup_message(
            [("user", "app"), ("database", "app"), ("options", "-c x=1")],
            &mut buf,
        )
        .unwrap();
        seeds.push(buf.to_vec());
        for code in [80_877_103i32, 80_877_104] {
            let mut v = Vec::new();
            v.put_i32(8);
            v.put_i32(code);
            seeds.push(v);
        }
        let mut v = Vec::new();
        v.put_i32(16);
        v.put_i32(80_877_102);
        v.put_i32(42);
        v.put_i32(-7);
        seeds.push(v);
        seeds
    }

    /// The startup packet parser, as a connection feeds it: any bytes give a packet or an
    /// error, never a panic, and a decoded StartupMessage has sane parameters.
    #[test]
    fn fuzz_startup_packet() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let runs = super::run("startup packet", &startup_seeds(), 512, |input| {
            let mut r = input;
            if let Ok(StartupPacket::Startup { params }) = rt.block_on(startup::read_packet(&mut r))
            {
                for (k, v) in params {
                    assert!(!k.is_empty() && !k.contains('\0') && !v.contains('\0'));
                }
            }
            // The body decoder alone, on any length (including ones read_packet refuses).
            let _ = startup::decode(BytesMut::from(input));
        });
        assert!(runs > 100, "only {runs} inputs ran");
    }

    fn sql_seeds() -> Vec<Vec<u8>> {
        [
            "SET search_path TO a, \"B\"; SELECT 1",
            "select set_config('x', 'y', false); RESET ALL",
            "DO $$ BEGIN PERFORM 1; END $$; LISTEN ch",
            "/* c /* nested */ */ CREATE TEMP TABLE t (a int) -- x\n; DISCARD ALL",
            "PREPARE p AS SELECT $1; DEALLOCATE ALL; DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "SELECT pg_advisory_lock(1), E'\\'', U&\"x\"; UNLISTEN *; SET LOCAL a = 1",
            "SET TIME ZONE 'UTC'; SET x.y = $tag$v$tag$; select currval('s'); LOAD 'x'",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect()
    }

    /// The session-state lexer on any text: no panic, statements are pieces of the input,
    /// and the statement iterator ends.
    #[test]
    fn fuzz_session_state_lexer() {
        let runs = super::run("session-state lexer", &sql_seeds(), 1024, |input| {
            let sql = String::from_utf8_lossy(input);
            let mut effects = Vec::new();
            lexer::analyze(&sql, &mut effects);
            let mut n = 0;
            for stmt in lexer::Statements::new(&sql) {
                assert!(sql.contains(stmt));
                n += 1;
                assert!(n <= sql.len(), "more statements than bytes");
            }
        });
        assert!(runs > 100, "only {runs} inputs ran");
    }

    #[test]
    fn mutations_stay_within_max_len() {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
        for _ in 0..1000 {
            assert!(super::generate(&mut rng, &sql_seeds(), 64).len() <= 64);
        }
    }
}
