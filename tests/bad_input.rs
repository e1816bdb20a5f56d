//! Protocol violations after login: garbage, a bad length field, an unknown message type and an
//! over-large message each close that client with FATAL 08P01, leave other clients and the
//! process unharmed, and are counted; Terminate closes cleanly. Well-framed messages with
//! malformed bodies (`malformed_message_bodies`, one table line per case) get PostgreSQL's own
//! answer, and the one server connection goes on serving others, clean.

mod common;

use std::time::Duration;

use bytes::BufMut;
use common::{msg, value, Opts, Pgtether, Raw};
use postgres_protocol::message::backend::Message;

const MAX_MESSAGE: usize = 4096;
const PROTOCOL_ERRORS: &str = "pgtether_client_protocol_errors_total";

fn start() -> Pgtether {
    Pgtether::start(Opts {
        auth: "trust",
        extra: format!("[limits]\nmax_message_size = {MAX_MESSAGE}\n"),
        ..Opts::default()
    })
}

/// A logged-in tokio-postgres client that must not notice others' violations.
async fn bystander(p: &Pgtether) -> tokio_postgres::Client {
    // Trust: pgtether asks for no password, so the one given is never used.
    let c = p.connect_as("app", "unused").await.unwrap();
    assert_eq!(value(&c, "SELECT 1").await.unwrap(), "1");
    c
}

/// Expects FATAL 08P01 and then the connection closing.
async fn expect_fatal_08p01(raw: &mut Raw) {
    let (severity, code, message) = raw.expect_error().await;
    assert_eq!(
        (severity.as_str(), code.as_str()),
        ("FATAL", "08P01"),
        "{message}"
    );
    match raw.try_recv(Duration::from_secs(10)).await {
        Ok(None) => {}
        Ok(Some(_)) => panic!("a message after the FATAL error"),
        Err(()) => panic!("connection still open after 10 s"),
    }
}

/// Logs in, sends `bytes`, and checks the violation's consequences for everyone.
async fn violation_closes_only_that_client(bytes: &[u8]) {
    let p = start();
    let other = bystander(&p).await;
    let mut raw = Raw::login_trust(p.port, "app").await;
    raw.send(bytes).await;
    expect_fatal_08p01(&mut raw).await;
    assert_eq!(value(&other, "SELECT 2").await.unwrap(), "2");
    assert_eq!(p.metric(PROTOCOL_ERRORS).await, Some(1.0));
}

fn garbage() -> Vec<u8> {
    b"GET / HTTP/1.1\r\nHost: example\r\n\r\n".to_vec()
}

fn length_2() -> Vec<u8> {
    let mut v = vec![b'Q'];
    v.put_i32(2);
    v
}

fn unknown_type() -> Vec<u8> {
    // 'Z' is ReadyForQuery, a backend message; no frontend sends it.
    msg(b'Z', b"I")
}

fn too_large() -> Vec<u8> {
    let mut sql = vec![b'x'; MAX_MESSAGE + 100];
    sql.push(0);
    msg(b'Q', &sql)
}

#[tokio::test]
async fn garbage_bytes() {
    violation_closes_only_that_client(&garbage()).await;
}

#[tokio::test]
async fn length_field_of_2() {
    violation_closes_only_that_client(&length_2()).await;
}

#[tokio::test]
async fn unknown_message_type() {
    violation_closes_only_that_client(&unknown_type()).await;
}

#[tokio::test]
async fn unknown_message_type_0x01() {
    violation_closes_only_that_client(&msg(0x01, b"")).await;
}

#[tokio::test]
async fn message_over_max_message_size() {
    violation_closes_only_that_client(&too_large()).await;
}

#[tokio::test]
async fn message_at_max_message_size_is_accepted() {
    let p = start();
    let c = bystander(&p).await;
    // A query whose Query message body (length field included) is exactly the limit.
    let padding = MAX_MESSAGE - 4 - "SELECT 1 -- ".len() - 1;
    let sql = format!("SELECT 1 -- {}", "x".repeat(padding));
    assert_eq!(value(&c, &sql).await.unwrap(), "1");
    assert_eq!(p.metric(PROTOCOL_ERRORS).await, Some(0.0));
}

#[tokio::test]
async fn terminate_closes_cleanly() {
    let p = start();
    let other = bystander(&p).await;
    let mut raw = Raw::login_trust(p.port, "app").await;
    raw.send(&msg(b'X', b"")).await;
    match raw.try_recv(Duration::from_secs(10)).await {
        Ok(None) => {}
        Ok(Some(Message::ErrorResponse(body))) => {
            panic!("error on Terminate: {:?}", common::error_fields(&body))
        }
        Ok(Some(_)) => panic!("a message after Terminate"),
        Err(()) => panic!("connection still open after 10 s"),
    }
    assert_eq!(value(&other, "SELECT 2").await.unwrap(), "2");
    assert_eq!(p.metric(PROTOCOL_ERRORS).await, Some(0.0));
}

#[tokio::test]
async fn pgtether_survives_every_violation_and_counts_them() {
    let p = start();
    let other = bystander(&p).await;
    let violations = [
        garbage(),
        length_2(),
        unknown_type(),
        msg(0x01, b""),
        too_large(),
    ];
    for bytes in &violations {
        let mut raw = Raw::login_trust(p.port, "app").await;
        raw.send(bytes).await;
        expect_fatal_08p01(&mut raw).await;
        assert_eq!(value(&other, "SELECT 1").await.unwrap(), "1");
    }
    assert_eq!(
        p.metric(PROTOCOL_ERRORS).await,
        Some(violations.len() as f64)
    );
    // New clients still get in, by either driver.
    let fresh = bystander(&p).await;
    assert_eq!(value(&fresh, "SELECT 3").await.unwrap(), "3");
    let mut raw = Raw::login_trust(p.port, "app").await;
    raw_query_rows(&mut raw, b"SELECT 4\0").await;
}

/// Sends a simple Query (`sql` NUL-terminated) on `raw` and reads up to its ReadyForQuery,
/// failing on an error; returns how many rows came.
async fn raw_query_rows(raw: &mut Raw, sql: &[u8]) -> usize {
    raw.send(&msg(b'Q', sql)).await;
    let mut rows = 0;
    loop {
        match raw.recv().await {
            Message::DataRow(_) => rows += 1,
            Message::ReadyForQuery(_) => return rows,
            Message::ErrorResponse(body) => {
                panic!("query failed: {:?}", common::error_fields(&body))
            }
            _ => {}
        }
    }
}

/// Outside COPY PostgreSQL ignores CopyData, CopyDone and CopyFail, and a Flush between
/// transactions has nothing to flush. A client sending them between transactions takes no
/// server connection for them: with a pool of one, another client is served at once, and the
/// first one's next query works.
#[tokio::test]
async fn stray_copy_and_flush_messages_take_no_server_connection() {
    let p = Pgtether::start(Opts {
        auth: "trust",
        size: 1,
        acquire_timeout: "2s",
        ..Opts::default()
    });
    let other = bystander(&p).await;
    let mut stray = Raw::login_trust(p.port, "app").await;
    stray
        .send(
            &[
                msg(b'H', b""),
                msg(b'd', b"1\t2\n"),
                msg(b'c', b""),
                msg(b'H', b""),
                msg(b'f', b"gave up\0"),
            ]
            .concat(),
        )
        .await;
    // Let pgtether read them before the other client asks for the connection.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(value(&other, "SELECT 2").await.unwrap(), "2");
    assert_eq!(raw_query_rows(&mut stray, b"SELECT 3\0").await, 1);
    assert_eq!(value(&other, "SELECT 4").await.unwrap(), "4");
}

// ---------------------------------------------------------------------------------------------
// Well-framed messages with malformed bodies, after a normal login, outside and inside a
// transaction block. PostgreSQL answers most of them with ERROR 08P01 and goes on; pgtether
// must answer as PostgreSQL does (or close that client with FATAL 08P01), never panic, and
// never hand the server connection to the next client dirty. The pool has one server
// connection, so the bystander's checks run on the very connection the case used.

/// What a case's client is told.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// ERROR with this SQLSTATE; the client goes on (after the Sync that ends the batch).
    Error(&'static str),
    /// No error: PostgreSQL ignores the message (or it is valid after all).
    Fine,
    /// FATAL 08P01, and the connection closes.
    Fatal,
}

struct Case {
    name: &'static str,
    /// Startup parameters besides user and database.
    startup: &'static [(&'static str, &'static str)],
    /// What the client sends after its login (and BEGIN); a Sync and two queries follow.
    send: Vec<u8>,
    expect: Expect,
    /// Also run inside a transaction block.
    in_block_too: bool,
}

fn case(name: &'static str, send: Vec<u8>, expect: Expect) -> Case {
    Case {
        name,
        startup: &[],
        send,
        expect,
        in_block_too: true,
    }
}

/// A case that only makes sense outside a transaction block.
fn outside(c: Case) -> Case {
    Case {
        in_block_too: false,
        ..c
    }
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

fn i16b(v: i16) -> [u8; 2] {
    v.to_be_bytes()
}

fn i32b(v: i32) -> [u8; 4] {
    v.to_be_bytes()
}

/// A body from pieces.
fn body(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Parse of the statement `s1` (no parameters) and `s2` (one int4 parameter).
fn parse_s1() -> Vec<u8> {
    msg(b'P', b"s1\0SELECT 1\0\0\0")
}

fn parse_s2() -> Vec<u8> {
    msg(b'P', b"s2\0SELECT $1::int4\0\0\0")
}

fn parse_unnamed() -> Vec<u8> {
    msg(b'P', b"\0SELECT 1\0\0\0")
}

/// The table. `abs_oid` is the OID of `abs(int4)`, for FunctionCall.
fn malformed_bodies(abs_oid: i32) -> Vec<Case> {
    use Expect::*;
    const PV: Expect = Error("08P01");
    let oid = i32b(abs_oid);
    let many_types: Vec<u8> = {
        // 0x8000 parameter types: a count PostgreSQL reads as unsigned.
        let mut b = b"s9\0SELECT 1\0".to_vec();
        b.extend_from_slice(&0x8000u16.to_be_bytes());
        for _ in 0..0x8000 {
            b.extend_from_slice(&i32b(23));
        }
        b
    };
    vec![
        // Parse
        case("parse: no NUL at all", msg(b'P', b"s1"), PV),
        case("parse: query without NUL", msg(b'P', b"s1\0SELECT 1"), PV),
        case("parse: truncated after the name", msg(b'P', b"s1\0"), PV),
        case(
            "parse: no parameter count",
            msg(b'P', b"s1\0SELECT 1\0"),
            PV,
        ),
        case(
            "parse: half a parameter count",
            msg(b'P', b"s1\0SELECT 1\0\0"),
            PV,
        ),
        case(
            "parse: huge parameter-type count, no data",
            msg(b'P', &body(&[b"s1\0SELECT 1\0", &i16b(0x7fff)])),
            PV,
        ),
        case(
            "parse: count -1, no data",
            msg(b'P', &body(&[b"s1\0SELECT 1\0", &i16b(-1)])),
            PV,
        ),
        case(
            "parse: parameter types cut short",
            msg(b'P', &body(&[b"s1\0SELECT 1\0", &i16b(2), &i32b(23)])),
            PV,
        ),
        case(
            "parse: bytes after the parameter types",
            msg(b'P', b"s1\0SELECT 1\0\0\0xx"),
            PV,
        ),
        case(
            "parse: unnamed, query without NUL",
            msg(b'P', b"\0SELECT 1"),
            PV,
        ),
        case(
            "parse: unnamed LISTEN, bytes after",
            msg(b'P', b"\0LISTEN c\0\0\0xx"),
            PV,
        ),
        case(
            "parse: named LISTEN, bytes after",
            msg(b'P', b"s1\0LISTEN c\0\0\0xx"),
            PV,
        ),
        case(
            "parse: 0x8000 parameter types (valid)",
            msg(b'P', &many_types),
            Fine,
        ),
        case(
            "parse: statement name not UTF-8",
            msg(b'P', b"\xff\0SELECT 1\0\0\0"),
            Error("22021"),
        ),
        Case {
            name: "parse: statement name not UTF-8, client_encoding LATIN1",
            startup: &[("client_encoding", "LATIN1")],
            send: msg(b'P', b"\xff\0SELECT 1\0\0\0"),
            expect: Error("22021"),
            in_block_too: true,
        },
        case(
            "parse: duplicate of a prepared name",
            cat(&[parse_s1(), parse_s1()]),
            Error("42P05"),
        ),
        // Bind
        case("bind: portal name without NUL", msg(b'B', b"p"), PV),
        case(
            "bind: statement name without NUL",
            cat(&[parse_s1(), msg(b'B', b"\0s1")]),
            PV,
        ),
        case(
            "bind: statement never prepared",
            msg(b'B', b"\0nope\0\0\0\0\0\0\0"),
            Error("26000"),
        ),
        case(
            "bind: unnamed statement never prepared",
            msg(b'B', b"\0\0\0\0\0\0\0\0"),
            Error("26000"),
        ),
        case(
            "bind: nothing after the names",
            cat(&[parse_s1(), msg(b'B', b"\0s1\0")]),
            PV,
        ),
        case(
            "bind: format count beyond the body",
            cat(&[parse_s1(), msg(b'B', &body(&[b"\0s1\0", &i16b(100)]))]),
            PV,
        ),
        case(
            "bind: format count -1",
            cat(&[parse_s1(), msg(b'B', &body(&[b"\0s1\0", &i16b(-1)]))]),
            PV,
        ),
        case(
            "bind: parameter count beyond the body",
            cat(&[
                parse_s2(),
                msg(b'B', &body(&[b"\0s2\0", &i16b(0), &i16b(0x7fff)])),
            ]),
            PV,
        ),
        case(
            "bind: parameter count not the statement's",
            cat(&[
                parse_s1(),
                msg(
                    b'B',
                    &body(&[b"\0s1\0", &i16b(0), &i16b(1), &i32b(1), b"1", &i16b(0)]),
                ),
            ]),
            PV,
        ),
        case(
            "bind: parameter length -2",
            cat(&[
                parse_s2(),
                msg(
                    b'B',
                    &body(&[b"\0s2\0", &i16b(0), &i16b(1), &i32b(-2), &i16b(0)]),
                ),
            ]),
            PV,
        ),
        case(
            "bind: parameter length beyond the body",
            cat(&[
                parse_s2(),
                msg(
                    b'B',
                    &body(&[b"\0s2\0", &i16b(0), &i16b(1), &i32b(1000), b"1"]),
                ),
            ]),
            PV,
        ),
        case(
            "bind: result-format count beyond the body",
            cat(&[
                parse_s1(),
                msg(b'B', &body(&[b"\0s1\0", &i16b(0), &i16b(0), &i16b(0x7fff)])),
            ]),
            PV,
        ),
        case(
            "bind: result-format count -1",
            cat(&[
                parse_s1(),
                msg(b'B', &body(&[b"\0s1\0", &i16b(0), &i16b(0), &i16b(-1)])),
            ]),
            PV,
        ),
        case(
            "bind: bytes after the result formats",
            cat(&[
                parse_s1(),
                msg(
                    b'B',
                    &body(&[b"\0s1\0", &i16b(0), &i16b(0), &i16b(0), b"xx"]),
                ),
            ]),
            PV,
        ),
        case(
            "bind: statement name not UTF-8",
            msg(b'B', b"\0\xff\0\0\0\0\0\0\0"),
            Error("22021"),
        ),
        case(
            "bind: a SET statement, truncated",
            cat(&[
                msg(b'P', b"s3\0SET application_name = 'evil'\0\0\0"),
                msg(b'B', b"\0s3\0\0"),
            ]),
            PV,
        ),
        case(
            "bind: a LISTEN statement, truncated",
            cat(&[msg(b'P', b"s4\0LISTEN c\0\0\0"), msg(b'B', b"\0s4\0\0")]),
            PV,
        ),
        case(
            "bind: unnamed statement, truncated",
            cat(&[parse_unnamed(), msg(b'B', b"\0\0\0")]),
            PV,
        ),
        // Describe
        case("describe: empty body", msg(b'D', b""), PV),
        case(
            "describe: kind 'X'",
            cat(&[parse_s1(), msg(b'D', b"Xs1\0")]),
            PV,
        ),
        case(
            "describe: name without NUL",
            cat(&[parse_s1(), msg(b'D', b"Ss1")]),
            PV,
        ),
        case(
            "describe: bytes after the name",
            cat(&[parse_s1(), msg(b'D', b"Ss1\0xx")]),
            PV,
        ),
        case("describe: kind only", msg(b'D', b"S"), PV),
        case(
            "describe: statement name not UTF-8",
            msg(b'D', b"S\xff\0"),
            Error("22021"),
        ),
        case(
            "describe: statement never prepared",
            msg(b'D', b"Snope\0"),
            Error("26000"),
        ),
        case(
            "describe: portal that does not exist",
            msg(b'D', b"Pnope\0"),
            Error("34000"),
        ),
        // Close
        case("close: empty body", msg(b'C', b""), PV),
        case(
            "close: kind 'X'",
            cat(&[parse_s1(), msg(b'C', b"Xs1\0")]),
            PV,
        ),
        case(
            "close: name without NUL",
            cat(&[parse_s1(), msg(b'C', b"Ss1")]),
            PV,
        ),
        case(
            "close: bytes after the name",
            cat(&[parse_s1(), msg(b'C', b"Ss1\0xx")]),
            PV,
        ),
        case(
            "close: statement name not UTF-8",
            msg(b'C', b"S\xff\0"),
            Error("22021"),
        ),
        // Execute
        case("execute: empty body", msg(b'E', b""), PV),
        case("execute: portal name without NUL", msg(b'E', b"p"), PV),
        case(
            "execute: truncated row limit",
            cat(&[
                parse_s1(),
                msg(b'B', b"\0s1\0\0\0\0\0\0\0"),
                msg(b'E', b"\0\0\0"),
            ]),
            PV,
        ),
        case(
            "execute: portal that does not exist",
            msg(b'E', b"nope\0\0\0\0\0"),
            Error("34000"),
        ),
        // Query
        case("query: empty body", msg(b'Q', b""), PV),
        case("query: no NUL", msg(b'Q', b"SELECT 1"), PV),
        case("query: only a NUL", msg(b'Q', b"\0"), Fine),
        case(
            "query: invalid UTF-8",
            msg(b'Q', b"SELECT '\xff'\0"),
            Error("22021"),
        ),
        case("query: bytes after the NUL", msg(b'Q', b"SELECT 1\0xx"), PV),
        case("query: LISTEN without NUL", msg(b'Q', b"LISTEN c"), PV),
        case(
            "query: LISTEN, a second NUL",
            msg(b'Q', b"LISTEN c\0\0"),
            PV,
        ),
        case(
            "query: SET without NUL",
            msg(b'Q', b"SET application_name = 'evil'"),
            PV,
        ),
        // In a block, the Bind would meet the failed transaction.
        outside(case(
            "query: malformed, the unnamed statement stays",
            cat(&[
                parse_unnamed(),
                msg(b'S', b""),
                msg(b'Q', b"SELECT 1"),
                msg(b'B', b"\0\0\0\0\0\0\0\0"),
                msg(b'E', b"\0\0\0\0\0"),
            ]),
            PV,
        )),
        // FunctionCall
        case("function call: empty body", msg(b'F', b""), PV),
        case("function call: only the OID", msg(b'F', &oid), PV),
        case(
            "function call: argument count beyond the body",
            msg(b'F', &body(&[&oid, &i16b(0), &i16b(0x7fff)])),
            PV,
        ),
        case(
            "function call: wrong argument count",
            msg(
                b'F',
                &body(&[&oid, &i16b(0), &i16b(2), &i32b(-1), &i32b(-1), &i16b(0)]),
            ),
            PV,
        ),
        case(
            "function call: argument length beyond the body",
            msg(b'F', &body(&[&oid, &i16b(0), &i16b(1), &i32b(100), b"1"])),
            PV,
        ),
        case(
            "function call: no result format",
            msg(b'F', &body(&[&oid, &i16b(0), &i16b(1), &i32b(1), b"1"])),
            PV,
        ),
        // COPY messages outside COPY: PostgreSQL ignores them.
        case("copy data outside COPY", msg(b'd', b"1\t2\n"), Fine),
        case("copy done outside COPY", msg(b'c', b""), Fine),
        case("copy done with a body", msg(b'c', b"xx"), Fine),
        case("copy fail outside COPY", msg(b'f', b"oops\0"), Fine),
        case("copy fail without NUL", msg(b'f', b"oops"), Fine),
        // Flush and Sync carry no body.
        case("flush with a body", msg(b'H', b"x"), PV),
        case("sync with a body", msg(b'S', b"x"), PV),
        // Not a message a logged-in client sends.
        case(
            "password message after login",
            msg(b'p', b"secret\0"),
            Fatal,
        ),
    ]
}

/// A raw client logged in with `extra` startup parameters.
async fn login(port: u16, extra: &[(&str, &str)]) -> Result<Raw, String> {
    let mut raw = Raw::connect(port).await;
    let mut params = vec![("user", "app"), ("database", "app")];
    params.extend_from_slice(extra);
    raw.startup(&params).await;
    loop {
        match raw.try_recv(Duration::from_secs(10)).await {
            Ok(Some(Message::ReadyForQuery(_))) => return Ok(raw),
            Ok(Some(Message::ErrorResponse(body))) => {
                return Err(format!("login refused: {:?}", common::error_fields(&body)))
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err("closed during login".into()),
            Err(()) => return Err("no login within 10 s".into()),
        }
    }
}

/// What a client saw up to the probe's answer (or the end of its connection).
struct Seen {
    errors: Vec<(String, String, String)>,
    /// The probe's row arrived and its ReadyForQuery said idle.
    probe_answered: bool,
    closed: bool,
}

/// Reads until the probe query's ReadyForQuery (or EOF).
async fn read_to_probe(raw: &mut Raw) -> Result<Seen, String> {
    let mut seen = Seen {
        errors: Vec::new(),
        probe_answered: false,
        closed: false,
    };
    let mut probe_row = false;
    loop {
        match raw.try_recv(Duration::from_secs(10)).await {
            Ok(Some(Message::ErrorResponse(body))) => seen.errors.push(common::error_fields(&body)),
            Ok(Some(Message::DataRow(row))) => {
                probe_row = row.buffer().windows(5).any(|w| w == b"probe");
            }
            Ok(Some(Message::ReadyForQuery(r))) if probe_row => {
                if r.status() != b'I' {
                    return Err(format!(
                        "ReadyForQuery {:?} after the probe",
                        r.status() as char
                    ));
                }
                seen.probe_answered = true;
                return Ok(seen);
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                seen.closed = true;
                return Ok(seen);
            }
            Err(()) => {
                return Err(format!(
                    "no answer to the probe within 10 s (errors so far: {:?})",
                    seen.errors
                ))
            }
        }
    }
}

/// Queries that show a server connection is clean, each with its expected value.
const CLEAN: &[(&str, &str)] = &[
    ("SELECT 1", "1"),
    // Outside any transaction block: a block's now() is its start, not this statement's.
    (
        "SELECT txid_current_if_assigned() IS NULL AND now() = statement_timestamp()",
        "t",
    ),
    ("SHOW transaction_isolation", "read committed"),
    (
        "SELECT count(*) FROM pg_prepared_statements WHERE name NOT LIKE 'pgtether\\_%'",
        "0",
    ),
    ("SELECT count(*) FROM pg_cursors", "0"),
    ("SELECT count(*) FROM pg_listening_channels()", "0"),
    ("SHOW application_name", ""),
    ("SHOW client_encoding", "UTF8"),
];

async fn check_clean(other: &tokio_postgres::Client, when: &str) -> Result<(), String> {
    for (sql, want) in CLEAN {
        let got = tokio::time::timeout(Duration::from_secs(10), value(other, sql))
            .await
            .map_err(|_| format!("{when}: bystander's {sql:?} hung"))?
            .map_err(|e| format!("{when}: bystander's {sql:?} failed: {e}"))?;
        if got != *want {
            return Err(format!(
                "{when}: bystander's {sql:?} gave {got:?}, not {want:?}"
            ));
        }
    }
    Ok(())
}

/// Runs one case; what went wrong, if anything.
async fn run_case(
    p: &Pgtether,
    other: &tokio_postgres::Client,
    c: &Case,
    in_block: bool,
) -> Result<(), String> {
    let mut raw = login(p.port, c.startup).await?;
    if in_block {
        raw.send(&msg(b'Q', b"BEGIN\0")).await;
        loop {
            match raw.try_recv(Duration::from_secs(10)).await {
                Ok(Some(Message::ReadyForQuery(r))) if r.status() == b'T' => break,
                Ok(Some(Message::ReadyForQuery(r))) => {
                    return Err(format!("BEGIN left status {:?}", r.status() as char))
                }
                Ok(Some(_)) => {}
                _ => return Err("no answer to BEGIN".into()),
            }
        }
    }
    let mut bytes = c.send.clone();
    // End the batch, leave any block, and ask for a row that says the client is served.
    bytes.extend(msg(b'S', b""));
    bytes.extend(msg(b'Q', b"ROLLBACK\0"));
    bytes.extend(msg(b'Q', b"SELECT 'probe'\0"));
    // A client pgtether closed may not take all of it.
    let _ = tokio::io::AsyncWriteExt::write_all(&mut raw.stream, &bytes).await;
    let seen = read_to_probe(&mut raw).await?;
    let first = seen
        .errors
        .first()
        .map(|(s, c, _)| (s.as_str(), c.as_str()));
    match c.expect {
        Expect::Fatal => {
            if first != Some(("FATAL", "08P01")) || !seen.closed {
                return Err(format!(
                    "expected FATAL 08P01 and the connection closed; got {:?}, closed: {}",
                    seen.errors, seen.closed
                ));
            }
        }
        Expect::Error(code) => {
            if first != Some(("ERROR", code)) || seen.errors.len() != 1 || !seen.probe_answered {
                return Err(format!(
                    "expected one ERROR {code} and the client served on; got {:?}, closed: {}",
                    seen.errors, seen.closed
                ));
            }
        }
        Expect::Fine => {
            if !seen.errors.is_empty() || !seen.probe_answered {
                return Err(format!(
                    "expected no error and the client served on; got {:?}, closed: {}",
                    seen.errors, seen.closed
                ));
            }
        }
    }
    // The server connection (there is one) serves another client, cleanly, while this one is
    // still connected and idle, and again after it left.
    check_clean(other, "with the client idle").await?;
    if !seen.closed {
        raw.send(&msg(b'X', b"")).await;
        let _ = raw.try_recv(Duration::from_secs(10)).await;
    }
    drop(raw);
    check_clean(other, "after the client left").await
}

async fn malformed_bodies_table(extra: &str) {
    let start = || {
        Pgtether::start(Opts {
            auth: "trust",
            size: 1,
            acquire_timeout: "3s",
            extra: extra.to_string(),
            ..Opts::default()
        })
    };
    let mut p = start();
    let mut other = bystander(&p).await;
    let abs_oid: i32 = common::direct_sql("SELECT 'abs(int4)'::regprocedure::oid")
        .parse()
        .expect("an OID");
    let mut failures = Vec::new();
    let mut panics = Vec::new();
    let mut runs = 0;
    let cases = malformed_bodies(abs_oid);
    for c in &cases {
        for in_block in [false, true] {
            if in_block && !c.in_block_too {
                continue;
            }
            runs += 1;
            let label = format!(
                "{} ({})",
                c.name,
                if in_block {
                    "in a transaction block"
                } else {
                    "outside a transaction"
                }
            );
            let mut failed = false;
            if let Err(e) = run_case(&p, &other, c, in_block).await {
                failures.push(format!("{label}: {e}"));
                failed = true;
            }
            let log = p.log();
            if log.contains("panicked") {
                panics.extend(
                    log.lines()
                        .filter(|l| l.contains("panicked"))
                        .map(String::from),
                );
                failures.push(format!("{label}: pgtether panicked"));
                failed = true;
            }
            if failed {
                // A fresh process and server connection, so that one failure does not
                // spill into the next cases.
                p = start();
                other = bystander(&p).await;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} runs failed:\n{}\n--- pgtether log (panics) ---\n{}",
        failures.len(),
        runs,
        failures.join("\n"),
        panics.join("\n")
    );
}

#[tokio::test]
async fn malformed_message_bodies() {
    malformed_bodies_table("").await;
}

#[tokio::test]
async fn malformed_message_bodies_with_prepare_unnamed() {
    malformed_bodies_table("[databases.app.pool]\nprepare_unnamed = true\n").await;
}
