//! Query traffic through pgtether: simple and extended protocol, pipelining, Flush, COPY in
//! both directions (including messages larger than the relay's buffers), asynchronous server
//! messages (notices, parameter status, notifications), Terminate, large results, and error
//! recovery inside a transaction.

mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{direct_sql, sqlstate, value, Opts, Pgtether, Raw};
use futures_util::{SinkExt, StreamExt};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};

/// Connects as `app` and forwards the connection's asynchronous messages (notices,
/// notifications) to the returned channel.
async fn connect_with_messages(
    p: &Pgtether,
) -> (tokio_postgres::Client, UnboundedReceiver<AsyncMessage>) {
    let (client, mut conn) = tokio_postgres::connect(&p.url("app", "app"), NoTls)
        .await
        .expect("connect through pgtether");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            let _ = tx.send(m);
        }
    });
    (client, rx)
}

/// A pgtether whose clients log in without a password, for the raw protocol client.
fn trusting(mode: &'static str) -> Pgtether {
    Pgtether::start(Opts {
        mode,
        auth: "trust",
        ..Opts::default()
    })
}

#[tokio::test]
async fn simple_query_with_several_statements_returns_every_result() {
    let p = Pgtether::start(Opts::default());
    let c = p.connect().await;
    let msgs = c
        .simple_query("SELECT 1 AS one; SELECT 'a', 'b'; SELECT generate_series(1, 3)")
        .await
        .unwrap();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut completions = Vec::new();
    for m in &msgs {
        match m {
            SimpleQueryMessage::Row(r) => rows.push(
                (0..r.len())
                    .map(|i| r.get(i).unwrap().to_string())
                    .collect(),
            ),
            SimpleQueryMessage::CommandComplete(n) => completions.push(*n),
            _ => {}
        }
    }
    assert_eq!(
        rows,
        vec![
            vec!["1".to_string()],
            vec!["a".to_string(), "b".to_string()],
            vec!["1".to_string()],
            vec!["2".to_string()],
            vec!["3".to_string()],
        ]
    );
    assert_eq!(completions, vec![1, 1, 3]);
}

#[tokio::test]
async fn pipelined_extended_queries_on_one_client_all_answer_right() {
    let p = Pgtether::start(Opts {
        size: 2,
        ..Opts::default()
    });
    let c = p.connect().await;
    // tokio-postgres writes every query's Parse/Bind/Describe/Execute/Sync without waiting
    // for the previous answers, so pgtether sees one long pipeline.
    let queries = (0..200i32).map(|i| {
        let c = &c;
        async move {
            let rows = c
                .query_typed(
                    "SELECT $1::int * 2, repeat('y', $1::int)",
                    &[(&i, Type::INT4)],
                )
                .await
                .unwrap();
            assert_eq!(rows.len(), 1);
            (
                i,
                rows[0].get::<_, i32>(0),
                rows[0].get::<_, String>(1).len(),
            )
        }
    });
    let answers = futures_util::future::join_all(queries).await;
    for (i, doubled, len) in answers {
        assert_eq!(doubled, i * 2);
        assert_eq!(len, i as usize);
    }
}

#[tokio::test]
async fn session_mode_prepared_statement_runs_repeatedly_with_parameters() {
    let p = Pgtether::start(Opts {
        mode: "session",
        ..Opts::default()
    });
    let c = p.connect().await;
    let stmt = c
        .prepare("SELECT $1::int + $2::int, $3::text")
        .await
        .unwrap();
    for i in 0..50i32 {
        let label = format!("row {i}");
        let row = c.query_one(&stmt, &[&i, &1000i32, &label]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i + 1000);
        assert_eq!(row.get::<_, String>(1), label);
    }
}

#[tokio::test]
async fn flush_delivers_parse_complete_before_sync() {
    let p = trusting("transaction");
    let mut raw = Raw::login_trust(p.port, "app").await;
    let mut out = BytesMut::new();
    frontend::parse("", "SELECT 1", std::iter::empty(), &mut out).unwrap();
    frontend::flush(&mut out);
    raw.send(&out).await;
    match raw.try_recv(Duration::from_secs(5)).await {
        Ok(Some(Message::ParseComplete)) => {}
        Ok(Some(other)) => panic!("expected ParseComplete, got message {:?}", tag(&other)),
        Ok(None) => panic!("connection closed instead of ParseComplete"),
        Err(()) => panic!("no ParseComplete after Parse + Flush: Flush was not honoured"),
    }
    let mut out = BytesMut::new();
    frontend::sync(&mut out);
    raw.send(&out).await;
    match raw.recv().await {
        Message::ReadyForQuery(b) => assert_eq!(b.status(), b'I'),
        other => panic!("expected ReadyForQuery, got {:?}", tag(&other)),
    }
}

/// A short name for a backend message in assertion output.
fn tag(m: &Message) -> &'static str {
    match m {
        Message::ParseComplete => "ParseComplete",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::ErrorResponse(_) => "ErrorResponse",
        Message::NoticeResponse(_) => "NoticeResponse",
        Message::ParameterStatus(_) => "ParameterStatus",
        Message::CommandComplete(_) => "CommandComplete",
        Message::RowDescription(_) => "RowDescription",
        Message::DataRow(_) => "DataRow",
        _ => "another message",
    }
}

#[tokio::test]
async fn copy_in_and_copy_out_round_trip_in_transaction_mode() {
    // tokio-postgres prepares COPY as a named statement; with one server connection it
    // always finds it (named statements do not follow clients across connections yet).
    let p = Pgtether::start(Opts {
        size: 1,
        ..Opts::default()
    });
    let c = p.connect().await;
    c.batch_execute("DROP TABLE IF EXISTS copy_rt; CREATE TABLE copy_rt(id int, name text)")
        .await
        .unwrap();
    let sink = c
        .copy_in::<_, Bytes>("COPY copy_rt FROM STDIN")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    for chunk in 0..10 {
        let mut data = String::new();
        for i in chunk * 1000..(chunk + 1) * 1000 {
            data.push_str(&format!("{i}\tname {i}\n"));
        }
        sink.send(Bytes::from(data)).await.unwrap();
    }
    let written = sink.finish().await.unwrap();
    assert_eq!(written, 10_000);
    assert_eq!(
        value(&c, "SELECT count(DISTINCT id) FROM copy_rt")
            .await
            .unwrap(),
        "10000"
    );

    let stream = c
        .copy_out("COPY (SELECT * FROM copy_rt ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(bytes).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 10_000);
    assert_eq!(lines[0], "0\tname 0");
    assert_eq!(lines[9_999], "9999\tname 9999");
    // The connection is usable afterwards.
    assert_eq!(value(&c, "SELECT 5").await.unwrap(), "5");
}

#[tokio::test]
async fn copy_of_more_than_a_megabyte_streams_through() {
    let p = Pgtether::start(Opts {
        size: 1,
        ..Opts::default()
    });
    let c = p.connect().await;
    c.batch_execute("DROP TABLE IF EXISTS copy_big; CREATE TABLE copy_big(t text)")
        .await
        .unwrap();
    // One CopyData message of 3 MB (bigger than any relay buffer), then many smaller rows.
    let big_row = "z".repeat(3 << 20);
    let sink = c
        .copy_in::<_, Bytes>("COPY copy_big FROM STDIN")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from(format!("{big_row}\n")))
        .await
        .unwrap();
    let small: String = (0..2000).map(|i| format!("{i:0>1000}\n")).collect();
    sink.send(Bytes::from(small)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2001);
    assert_eq!(
        value(&c, "SELECT sum(length(t))::text FROM copy_big")
            .await
            .unwrap(),
        ((3 << 20) + 2000 * 1000).to_string()
    );

    let stream = c.copy_out("COPY copy_big TO STDOUT").await.unwrap();
    futures_util::pin_mut!(stream);
    let mut total = 0usize;
    let mut newlines = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        total += chunk.len();
        newlines += chunk.iter().filter(|b| **b == b'\n').count();
    }
    assert_eq!(newlines, 2001);
    assert_eq!(total, (3 << 20) + 2000 * 1000 + 2001);
}

#[tokio::test]
async fn notice_reaches_the_client() {
    let p = Pgtether::start(Opts::default());
    let (c, mut messages) = connect_with_messages(&p).await;
    c.batch_execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), messages.recv())
        .await
        .expect("a notice within 5 s")
        .expect("message stream open");
    match m {
        AsyncMessage::Notice(n) => {
            assert_eq!(n.message(), "hello");
            assert_eq!(n.severity(), "NOTICE");
        }
        other => panic!("expected a notice, got {other:?}"),
    }
}

#[tokio::test]
async fn parameter_status_reaches_the_client_before_ready_for_query() {
    let p = trusting("transaction");
    let mut raw = Raw::login_trust(p.port, "app").await;
    let mut out = BytesMut::new();
    frontend::query("SET application_name = 'x'", &mut out).unwrap();
    raw.send(&out).await;
    let mut seen = None;
    loop {
        match raw.recv().await {
            Message::ParameterStatus(b) if b.name().unwrap() == "application_name" => {
                seen = Some(b.value().unwrap().to_string());
            }
            Message::ReadyForQuery(_) => break,
            Message::ErrorResponse(b) => panic!("SET failed: {:?}", common::error_fields(&b)),
            _ => {}
        }
    }
    assert_eq!(
        seen.as_deref(),
        Some("x"),
        "no ParameterStatus application_name=x"
    );
}

#[tokio::test]
async fn notify_reaches_an_idle_session_mode_client() {
    let p = Pgtether::start(Opts {
        mode: "session",
        ..Opts::default()
    });
    let (c, mut messages) = connect_with_messages(&p).await;
    c.batch_execute("LISTEN tether_ch").await.unwrap();
    // The client now sends nothing; the notification must arrive on its own.
    direct_sql("NOTIFY tether_ch, 'payload'");
    let m = tokio::time::timeout(Duration::from_secs(5), messages.recv())
        .await
        .expect("a notification within 5 s while idle")
        .expect("message stream open");
    match m {
        AsyncMessage::Notification(n) => {
            assert_eq!(n.channel(), "tether_ch");
            assert_eq!(n.payload(), "payload");
        }
        other => panic!("expected a notification, got {other:?}"),
    }
}

#[tokio::test]
async fn terminate_closes_the_connection_cleanly() {
    let p = Pgtether::start(Opts {
        mode: "session",
        size: 1,
        auth: "trust",
        ..Opts::default()
    });
    let mut raw = Raw::login_trust(p.port, "app").await;
    let mut out = BytesMut::new();
    frontend::query("SELECT pg_backend_pid()", &mut out).unwrap();
    raw.send(&out).await;
    let mut pid = String::new();
    loop {
        match raw.recv().await {
            Message::DataRow(row) => {
                use fallible_iterator::FallibleIterator;
                let buf = row.buffer();
                let range = row.ranges().next().unwrap().unwrap().unwrap();
                pid = String::from_utf8(buf[range].to_vec()).unwrap();
            }
            Message::ReadyForQuery(_) => break,
            _ => {}
        }
    }
    let mut out = BytesMut::new();
    frontend::terminate(&mut out);
    raw.send(&out).await;
    // pgtether closes the socket without answering (no ErrorResponse).
    match raw.try_recv(Duration::from_secs(5)).await {
        Ok(None) => {}
        Ok(Some(m)) => panic!("expected EOF after Terminate, got {:?}", tag(&m)),
        Err(()) => panic!("connection still open 5 s after Terminate"),
    }
    // The only server connection went back to the pool and serves the next client.
    let c = p.connect().await;
    assert_eq!(value(&c, "SELECT pg_backend_pid()").await.unwrap(), pid);
    assert!(
        !p.log().contains("left dirty"),
        "server connection was closed as dirty"
    );
}

#[tokio::test]
async fn large_result_arrives_complete() {
    let p = Pgtether::start(Opts::default());
    let c = p.connect().await;
    let msgs = c
        .simple_query("SELECT repeat('x', 1000) FROM generate_series(1, 20000)")
        .await
        .unwrap();
    let mut rows = 0;
    for m in &msgs {
        if let SimpleQueryMessage::Row(r) = m {
            assert_eq!(r.get(0).unwrap().len(), 1000);
            rows += 1;
        }
    }
    assert_eq!(rows, 20_000);
    // And through the extended protocol.
    let rows = c
        .query_typed(
            "SELECT repeat('x', 1000) FROM generate_series(1, 20000)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 20_000);
    assert!(rows.iter().all(|r| r.get::<_, &str>(0).len() == 1000));
}

#[tokio::test]
async fn error_in_a_transaction_fails_it_until_rollback() {
    let p = Pgtether::start(Opts {
        size: 1,
        ..Opts::default()
    });
    let a = p.connect().await;
    a.batch_execute("BEGIN").await.unwrap();
    let pid_a = value(&a, "SELECT pg_backend_pid()").await.unwrap();
    let err = value(&a, "SELECT 1/0").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("22012"), "{err:?}");
    let err = value(&a, "SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("25P02"), "{err:?}");
    a.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(value(&a, "SELECT 2").await.unwrap(), "2");

    // Another client gets the same server connection, outside any transaction.
    let b = p.connect().await;
    assert_eq!(value(&b, "SELECT pg_backend_pid()").await.unwrap(), pid_a);
    assert_eq!(
        value(&b, "SELECT now() = statement_timestamp()")
            .await
            .unwrap(),
        "t",
        "b runs inside a transaction left open on the server connection"
    );
    b.batch_execute("BEGIN; SELECT 1; COMMIT").await.unwrap();
}
