//! The startup phase, driven by hand: SSL and GSS encryption requests, protocol versions,
//! malformed startup packets, missing user, the startup timeout, listen.max_clients, and the
//! welcome sequence after a login.

mod common;

use std::time::{Duration, Instant};

use bytes::BufMut;
use common::{error_fields, msg, Opts, Pgtether, Raw};
use postgres_protocol::message::backend::Message;

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;

/// A startup-phase packet: length, code, rest.
fn packet(code: i32, rest: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_i32(8 + rest.len() as i32);
    v.put_i32(code);
    v.extend_from_slice(rest);
    v
}

fn trust() -> Opts {
    Opts {
        auth: "trust",
        ..Opts::default()
    }
}

/// Reads the rest of a login up to ReadyForQuery; panics on an ErrorResponse.
async fn finish_login(raw: &mut Raw) -> Vec<Message> {
    let mut seen = Vec::new();
    loop {
        let m = raw.recv().await;
        match m {
            Message::ErrorResponse(body) => panic!("login refused: {:?}", error_fields(&body)),
            Message::ReadyForQuery(_) => {
                seen.push(m);
                return seen;
            }
            _ => seen.push(m),
        }
    }
}

/// Runs a simple query on a logged-in raw client and returns the first column of its row.
async fn raw_value(raw: &mut Raw, sql: &str) -> String {
    raw.send(&msg(b'Q', format!("{sql}\0").as_bytes())).await;
    let mut out = None;
    loop {
        match raw.recv().await {
            Message::DataRow(row) => {
                use fallible_iterator::FallibleIterator;
                let buf = row.buffer();
                let range = row.ranges().next().unwrap().unwrap().expect("not NULL");
                out = Some(String::from_utf8(buf[range].to_vec()).unwrap());
            }
            Message::ErrorResponse(body) => panic!("query failed: {:?}", error_fields(&body)),
            Message::ReadyForQuery(_) => return out.expect("a row"),
            _ => {}
        }
    }
}

/// Expects a FATAL ErrorResponse with `code`, then the connection closing; returns the message.
async fn expect_fatal(raw: &mut Raw, code: &str) -> String {
    let (severity, got, message) = raw.expect_error().await;
    assert_eq!(
        (severity.as_str(), got.as_str()),
        ("FATAL", code),
        "{message}"
    );
    expect_closed(raw).await;
    message
}

async fn expect_closed(raw: &mut Raw) {
    match raw.try_recv(Duration::from_secs(10)).await {
        Ok(None) => {}
        Ok(Some(m)) => panic!("expected the connection to close, got {:?}", tag_of(&m)),
        Err(()) => panic!("connection still open after 10 s"),
    }
}

fn tag_of(m: &Message) -> &'static str {
    match m {
        Message::ErrorResponse(_) => "ErrorResponse",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::AuthenticationOk => "AuthenticationOk",
        Message::ParameterStatus(_) => "ParameterStatus",
        Message::BackendKeyData(_) => "BackendKeyData",
        _ => "other",
    }
}

/// Logs in as `app` with trust; retries while the server answers 53300 (a just-closed
/// connection may not have given its slot back yet).
async fn login_within_limit(port: u16) -> Raw {
    let started = Instant::now();
    loop {
        let mut raw = Raw::connect(port).await;
        raw.startup(&[("user", "app"), ("database", "app")]).await;
        match raw.recv().await {
            Message::ErrorResponse(body) => {
                let (_, code, message) = error_fields(&body);
                assert_eq!(code, "53300", "{message}");
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "no client slot freed up"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => {
                finish_login(&mut raw).await;
                return raw;
            }
        }
    }
}

#[tokio::test]
async fn ssl_request_is_answered_n_then_login_works() {
    let p = Pgtether::start(trust());
    let mut raw = Raw::connect(p.port).await;
    raw.send(&packet(SSL_REQUEST, b"")).await;
    assert_eq!(raw.recv_byte().await, b'N');
    raw.startup(&[("user", "app"), ("database", "app")]).await;
    finish_login(&mut raw).await;
    assert_eq!(raw_value(&mut raw, "SELECT 7").await, "7");
}

#[tokio::test]
async fn gssenc_request_is_answered_n_then_login_works() {
    let p = Pgtether::start(trust());
    let mut raw = Raw::connect(p.port).await;
    raw.send(&packet(GSSENC_REQUEST, b"")).await;
    assert_eq!(raw.recv_byte().await, b'N');
    raw.startup(&[("user", "app"), ("database", "app")]).await;
    finish_login(&mut raw).await;
    assert_eq!(raw_value(&mut raw, "SELECT 8").await, "8");
}

#[tokio::test]
async fn protocol_2_is_refused_with_0a000() {
    let p = Pgtether::start(trust());
    let mut raw = Raw::connect(p.port).await;
    raw.send(&packet(2 << 16, b"user\0app\0\0")).await;
    let message = expect_fatal(&mut raw, "0A000").await;
    assert!(message.contains("3.0"), "{message}");
}

#[tokio::test]
async fn startup_length_3_is_08p01() {
    let p = Pgtether::start(trust());
    let mut raw = Raw::connect(p.port).await;
    raw.send(&3i32.to_be_bytes()).await;
    expect_fatal(&mut raw, "08P01").await;
}

#[tokio::test]
async fn startup_length_20000_is_08p01() {
    let p = Pgtether::start(trust());
    let mut raw = Raw::connect(p.port).await;
    // Only the length: pgtether must refuse it without waiting for 20000 bytes.
    raw.send(&20_000i32.to_be_bytes()).await;
    expect_fatal(&mut raw, "08P01").await;
}

#[tokio::test]
async fn startup_without_user_is_28000() {
    let p = Pgtether::start(trust());
    let mut raw = Raw::connect(p.port).await;
    raw.startup(&[("database", "app")]).await;
    expect_fatal(&mut raw, "28000").await;
}

#[tokio::test]
async fn silent_client_is_dropped_after_startup_timeout() {
    let p = Pgtether::start(Opts {
        extra: "[limits]\nstartup_timeout = \"300ms\"\n".into(),
        ..trust()
    });
    let started = Instant::now();
    let mut silent = Raw::connect(p.port).await;
    // Another client connecting meanwhile is not held up by the silent one.
    let mut other = Raw::connect(p.port).await;
    other.startup(&[("user", "app"), ("database", "app")]).await;
    finish_login(&mut other).await;
    assert_eq!(raw_value(&mut other, "SELECT 1").await, "1");

    let message = expect_fatal(&mut silent, "08P01").await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "dropped before the timeout"
    );
    assert!(message.contains("startup_timeout"), "{message}");
    // The logged-in client is past startup: the timeout does not apply to it.
    assert_eq!(raw_value(&mut other, "SELECT 2").await, "2");
}

#[tokio::test]
async fn max_clients_refuses_the_third_client_with_53300() {
    let p = Pgtether::start(Opts {
        max_clients: 2,
        ..trust()
    });
    let mut a = login_within_limit(p.port).await;
    let mut b = login_within_limit(p.port).await;

    let mut third = Raw::connect(p.port).await;
    third.startup(&[("user", "app"), ("database", "app")]).await;
    let message = expect_fatal(&mut third, "53300").await;
    assert!(message.contains("max_clients"), "{message}");

    assert_eq!(raw_value(&mut a, "SELECT 1").await, "1");
    assert_eq!(raw_value(&mut b, "SELECT 2").await, "2");
    assert!(p
        .metric(r#"pgtether_clients_rejected_total{reason="max_clients"}"#)
        .await
        .is_some_and(|v| v >= 1.0));

    // A client leaving frees its slot.
    a.send(&msg(b'X', b"")).await;
    expect_closed(&mut a).await;
    let mut c = login_within_limit(p.port).await;
    assert_eq!(raw_value(&mut c, "SELECT 3").await, "3");
}

#[tokio::test]
async fn welcome_sequence() {
    let p = Pgtether::start(trust());
    let mut raw = Raw::connect(p.port).await;
    raw.startup(&[("user", "app"), ("database", "app")]).await;
    let seen = finish_login(&mut raw).await;

    assert!(
        matches!(seen.first(), Some(Message::AuthenticationOk)),
        "first message: {:?}",
        seen.first().map(tag_of)
    );
    let server_version = seen.iter().find_map(|m| match m {
        Message::ParameterStatus(ps) if ps.name().unwrap() == "server_version" => {
            Some(ps.value().unwrap().to_string())
        }
        _ => None,
    });
    let server_version = server_version.expect("ParameterStatus server_version");
    assert_eq!(server_version, common::direct_sql("SHOW server_version"));
    let key_data = seen
        .iter()
        .position(|m| matches!(m, Message::BackendKeyData(_)))
        .expect("BackendKeyData");
    assert_eq!(
        key_data,
        seen.len() - 2,
        "BackendKeyData right before ReadyForQuery"
    );
    match seen.last() {
        Some(Message::ReadyForQuery(r)) => assert_eq!(r.status(), b'I'),
        _ => unreachable!(),
    }
}
