//! Real PostgreSQL tools through pgtether, run as subprocesses: psql (one command, and a
//! script with a COPY FROM STDIN block on stdin) and pgbench (initialization in session mode,
//! select-only runs in transaction mode with the simple and extended protocols).

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

use common::{Opts, Pgtether};

/// Runs `program` against pgtether as user `app`, with `stdin` fed in; returns its output.
fn run(program: &str, p: &Pgtether, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(program)
        .args(["-h", "127.0.0.1", "-p", &p.port.to_string(), "-U", "app"])
        .args(args)
        .env("PGPASSWORD", "app")
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} starts: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// Asserts the tool exited 0, showing its output and pgtether's log otherwise.
fn assert_success(what: &str, out: &Output, p: &Pgtether) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}\npgtether log tail:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        tail(&p.log(), 40)
    );
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn psql_runs_a_command() {
    let p = Pgtether::start(Opts::default());
    let out = run(
        "psql",
        &p,
        &["-X", "-A", "-t", "-d", "app", "-c", "select 40+2"],
        "",
    );
    assert_success("psql -c", &out, &p);
    assert_eq!(text(&out.stdout).trim(), "42");
}

#[test]
fn psql_script_with_copy_from_stdin() {
    let p = Pgtether::start(Opts::default());
    let script = "\
DROP TABLE IF EXISTS tools_copy;
CREATE TABLE tools_copy(id int, name text);
COPY tools_copy FROM STDIN;
1\tone
2\ttwo
3\tthree
\\.
INSERT INTO tools_copy VALUES (4, 'four');
SELECT count(*) || ':' || string_agg(name, ',' ORDER BY id) FROM tools_copy;
";
    let out = run(
        "psql",
        &p,
        &["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", "app"],
        script,
    );
    assert_success("psql script", &out, &p);
    assert_eq!(text(&out.stdout).trim(), "4:one,two,three,four");
}

/// pgbench's tables exist in database `app`: initialized once per test binary, through
/// pgtether in session mode.
fn pgbench_initialized() {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return;
    }
    let p = Pgtether::start(Opts {
        mode: "session",
        ..Opts::default()
    });
    let out = run("pgbench", &p, &["-i", "-s", "1", "app"], "");
    assert_success("pgbench -i", &out, &p);
    *done = true;
}

#[test]
fn pgbench_initializes_through_session_mode() {
    pgbench_initialized();
    assert_eq!(
        common::direct_sql("SELECT count(*) FROM pgbench_accounts"),
        "100000"
    );
    assert_eq!(
        common::direct_sql("SELECT count(*) FROM pgbench_branches"),
        "1"
    );
}

/// Runs a 3-second select-only pgbench with 8 clients through a transaction-mode pool of 4
/// and returns (transactions processed, failed transactions).
fn pgbench_select_only(protocol: &str) -> (u64, u64) {
    pgbench_initialized();
    let p = Pgtether::start(Opts {
        size: 4,
        ..Opts::default()
    });
    let out = run(
        "pgbench",
        &p,
        &[
            "-n", "-S", "-T", "3", "-c", "8", "-j", "2", "-M", protocol, "app",
        ],
        "",
    );
    assert_success(&format!("pgbench -M {protocol}"), &out, &p);
    let report = text(&out.stdout);
    let number = |label: &str| -> u64 {
        report
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no `{label}` in pgbench output:\n{report}"))
    };
    (
        number("number of transactions actually processed:"),
        number("number of failed transactions:"),
    )
}

#[test]
fn pgbench_extended_protocol_in_transaction_mode() {
    let (processed, failed) = pgbench_select_only("extended");
    assert!(processed > 0, "no transactions processed");
    assert_eq!(failed, 0);
}

#[test]
fn pgbench_simple_protocol_in_transaction_mode() {
    let (processed, failed) = pgbench_select_only("simple");
    assert!(processed > 0, "no transactions processed");
    assert_eq!(failed, 0);
}
