//! Protocol violations after login: garbage, a bad length field, an unknown message type and an
//! over-large message each close that client with FATAL 08P01, leave other clients and the
//! process unharmed, and are counted; Terminate closes cleanly.

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
    raw.send(&msg(b'Q', b"SELECT 4\0")).await;
    loop {
        match raw.recv().await {
            Message::ReadyForQuery(_) => break,
            Message::ErrorResponse(body) => {
                panic!("query failed: {:?}", common::error_fields(&body))
            }
            _ => {}
        }
    }
}
