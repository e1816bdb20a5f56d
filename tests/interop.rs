//! Real client drivers through transaction pooling: psycopg 3, asyncpg, node-postgres and pgjdbc
//! each run 50 clients over a pool of 4 with named prepared statements and per-client SET
//! values, then LISTEN/NOTIFY, temp tables, session advisory locks, WITH HOLD cursors and
//! SQL-level PREPARE across transactions (tests/interop/*: one program per driver, exit 0 when
//! everything held). Plus pgbench with `-M prepared`, 50 clients on 4 server connections.
//!
//! A missing driver or runtime fails the test with how to install it: `.ci/run` installs them.
//!
//! psycopg, node-postgres and pgjdbc run once more with `prepare_unnamed` on.
//!
//! `INTEROP_TARGET=session` runs the driver programs through session mode (pool of 60) and
//! `INTEROP_TARGET=direct` against the cluster itself: the baselines that tell a wrong program
//! from a pooler bug. `INTEROP_TARGET=prepare_unnamed` runs all of them with that setting.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Opts, Pgtether};

/// How long one driver program may run before it is killed (its own watchdog fires at 100 s).
const DRIVER_TIMEOUT: Duration = Duration::from_secs(120);

const PIP_HINT: &str = "run .ci/run, or: python3 -m pip install 'psycopg[binary]' asyncpg";
const NPM_HINT: &str = "run .ci/run, or: npm ci --prefix tests/interop";
const JDBC_HINT: &str =
    "run .ci/run, or: apt-get install -y libpostgresql-jdbc-java (and a JDK 11+ for `java File.java`)";
const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

/// One driver program at a time: each runs 50 clients, and two at once on a small machine
/// only make both slower.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// What the driver programs connect to.
enum Target {
    Pooler(Pgtether),
    Direct,
}

impl Target {
    /// pgtether in transaction mode with a pool of 4, unless `INTEROP_TARGET` says otherwise.
    fn start() -> Target {
        match std::env::var("INTEROP_TARGET").as_deref() {
            Err(_) | Ok("") | Ok("transaction") => Target::Pooler(Pgtether::start(Opts {
                size: 4,
                mode: "transaction",
                ..Default::default()
            })),
            Ok("prepare_unnamed") => Target::prepare_unnamed(),
            Ok("session") => Target::Pooler(Pgtether::start(Opts {
                size: 60,
                mode: "session",
                ..Default::default()
            })),
            Ok("direct") => Target::Direct,
            Ok(other) => panic!(
                "INTEROP_TARGET={other}: expected transaction, session, prepare_unnamed or direct"
            ),
        }
    }

    /// Transaction mode, pool of 4, unnamed statements prepared on the server.
    fn prepare_unnamed() -> Target {
        Target::Pooler(Pgtether::start(Opts {
            size: 4,
            mode: "transaction",
            extra: "[databases.app.pool]\nprepare_unnamed = true\n".into(),
            ..Default::default()
        }))
    }

    fn port(&self) -> u16 {
        match self {
            Target::Pooler(p) => p.port,
            Target::Direct => common::cluster().port,
        }
    }

    fn log(&self) -> String {
        match self {
            Target::Pooler(p) => log_excerpt(&p.log()),
            Target::Direct => "(direct to the cluster: no pgtether)".into(),
        }
    }
}

struct Outcome {
    /// `None` when the program was killed at the timeout.
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Runs `cmd` with a time limit, collecting its output.
fn run_with_timeout(mut cmd: Command, limit: Duration) -> Outcome {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the driver program") {
            break Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Outcome {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: started.elapsed(),
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The end of pgtether's log without colour codes, warnings and errors first: with 50 clients
/// the plain tail is all logins and logouts.
fn log_excerpt(log: &str) -> String {
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI sequence: ESC [ parameters final-letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let notable: Vec<&str> = plain
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    format!(
        "warnings and errors (last 30 of {}):\n{}\nlast lines:\n{}",
        notable.len(),
        notable[notable.len().saturating_sub(30)..].join("\n"),
        tail(&plain, 15)
    )
}

/// Runs one driver program (`program` then `args`, then the port) against the target and
/// asserts it exited 0, showing its output and pgtether's log otherwise.
fn run_driver(what: &str, program: &str, args: &[&str]) {
    run_driver_on(what, program, args, Target::start);
}

fn run_driver_on(what: &str, program: &str, args: &[&str], start: fn() -> Target) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let target = start();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .arg(target.port().to_string())
        .current_dir(interop_dir());
    let out = run_with_timeout(cmd, DRIVER_TIMEOUT);
    let verdict = match out.status {
        Some(s) if s.success() => {
            println!(
                "{what}: passed in {:.1} s\n{}",
                out.elapsed.as_secs_f64(),
                out.stdout
            );
            return;
        }
        Some(s) => format!("exited with {s}"),
        None => format!("killed after {} s", DRIVER_TIMEOUT.as_secs()),
    };
    panic!(
        "{what} {verdict}:\n--- stdout:\n{}\n--- stderr:\n{}\n--- pgtether log:\n{}",
        out.stdout,
        tail(&out.stderr, 60),
        tail(&target.log(), 40)
    );
}

/// Fails (never skips) when `python3` cannot import `module`.
fn require_python_module(module: &str) {
    let out = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "python3 cannot import {module}: {}\n{PIP_HINT}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("python3 is not runnable ({e}): install Python 3, then {PIP_HINT}"),
    }
}

fn require_runs(program: &str, arg: &str, hint: &str) {
    match Command::new(program).arg(arg).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!("`{program} {arg}` failed ({}): {hint}", o.status),
        Err(e) => panic!("{program} is not runnable ({e}): {hint}"),
    }
}

#[test]
fn psycopg_prepared_statements_and_session_state() {
    require_python_module("psycopg");
    run_driver("psycopg", "python3", &["psycopg_test.py"]);
}

#[test]
fn asyncpg_statement_cache_and_session_state() {
    require_python_module("asyncpg");
    run_driver("asyncpg", "python3", &["asyncpg_test.py"]);
}

#[test]
fn node_postgres_named_queries_and_session_state() {
    require_runs(
        "node",
        "--version",
        "install Node.js (apt-get install -y nodejs npm)",
    );
    assert!(
        interop_dir().join("node_modules/pg/package.json").exists(),
        "node-postgres is not installed in tests/interop/node_modules: {NPM_HINT}"
    );
    run_driver("node-postgres", "node", &["node_pg_test.js"]);
}

#[test]
fn pgjdbc_server_prepared_statements_and_session_state() {
    require_runs("java", "-version", JDBC_HINT);
    assert!(
        Path::new(JDBC_JAR).exists(),
        "{JDBC_JAR} is missing (pgjdbc): {JDBC_HINT}"
    );
    run_driver("pgjdbc", "java", &["-cp", JDBC_JAR, "JdbcTest.java"]);
}

/// The drivers that send most queries as unnamed statements (psycopg, node-postgres, and
/// pgjdbc below its prepareThreshold), with `prepare_unnamed` on.
#[test]
fn drivers_with_unnamed_statements_prepared_on_the_server() {
    require_python_module("psycopg");
    require_runs(
        "node",
        "--version",
        "install Node.js (apt-get install -y nodejs npm)",
    );
    require_runs("java", "-version", JDBC_HINT);
    run_driver_on(
        "psycopg",
        "python3",
        &["psycopg_test.py"],
        Target::prepare_unnamed,
    );
    run_driver_on(
        "node-postgres",
        "node",
        &["node_pg_test.js"],
        Target::prepare_unnamed,
    );
    run_driver_on(
        "pgjdbc",
        "java",
        &["-cp", JDBC_JAR, "JdbcTest.java"],
        Target::prepare_unnamed,
    );
}

/// Runs pgbench against pgtether as user `app`; returns (status, stdout, stderr).
fn pgbench(p: &Pgtether, args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &p.port.to_string(), "-U", "app"])
        .args(args)
        .arg("app")
        .env("PGPASSWORD", "app")
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("pgbench starts: {e}"));
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn pgbench_prepared_50_clients_over_a_pool_of_4() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    {
        let init = Pgtether::start(Opts {
            mode: "session",
            ..Opts::default()
        });
        let (status, out, err) = pgbench(&init, &["-i", "-s", "1", "-q"]);
        assert!(
            status.success(),
            "pgbench -i failed ({status}):\n{out}\n{err}"
        );
    }
    let p = Pgtether::start(Opts {
        size: 4,
        mode: "transaction",
        ..Default::default()
    });
    let args = [
        "-n", "-M", "prepared", "-c", "50", "-j", "50", "-T", "5", "-S",
    ];
    let (status, report, err) = pgbench(&p, &args);
    assert!(
        status.success(),
        "pgbench {} failed ({status}):\n--- stdout:\n{report}\n--- stderr:\n{}\n--- pgtether log:\n{}",
        args.join(" "),
        tail(&err, 40),
        log_excerpt(&p.log())
    );
    let number = |label: &str| -> u64 {
        report
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no `{label}` in pgbench output:\n{report}"))
    };
    let processed = number("number of transactions actually processed:");
    let failed = number("number of failed transactions:");
    assert_eq!(failed, 0, "failed transactions:\n{report}\n{err}");
    assert!(processed > 0, "no transactions processed:\n{report}");
    // pgbench reports a failed Parse ("prepared statement \"P_0\" already exists") on stderr and
    // carries on with the statement it finds on the server: the exit status alone misses it.
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| {
            l.contains("error") || l.contains("aborted") || l.contains("prepared statement")
        })
        .collect();
    assert!(
        errors.is_empty(),
        "pgbench reported {} error line(s), e.g.:\n{}",
        errors.len(),
        errors[..errors.len().min(10)].join("\n")
    );
}
