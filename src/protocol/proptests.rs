//! Property tests: what pgtether encodes, a standard decoder (`postgres-protocol`) reads back
//! unchanged, and what a standard encoder writes, pgtether's decoders read back unchanged.

use bytes::{BufMut, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend as fe;
use proptest::collection::vec;
use proptest::prelude::*;

use super::backend::{self, Severity};
use super::frame;
use super::frontend;
use super::startup::{self, StartupPacket};

/// Text without NUL (which the protocol's C strings cannot carry).
fn text() -> impl Strategy<Value = String> {
    vec(any::<char>().prop_filter("no NUL", |c| *c != '\0'), 0..40)
        .prop_map(|v| v.into_iter().collect())
}

fn name() -> impl Strategy<Value = String> {
    text().prop_filter("non-empty", |s| !s.is_empty())
}

fn parse_one(buf: &mut BytesMut) -> Message {
    Message::parse(buf)
        .expect("a well-formed message")
        .expect("a whole message")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn startup_message_round_trips(params in vec((name(), text()), 0..8)) {
        let mut buf = BytesMut::new();
        fe::startup_message(params.iter().map(|(k, v)| (k.as_str(), v.as_str())), &mut buf)
            .unwrap();
        let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        prop_assert_eq!(len, buf.len());
        let decoded = startup::decode(buf.split_off(4)).unwrap();
        prop_assert_eq!(decoded, StartupPacket::Startup { params });
    }

    #[test]
    fn cancel_request_round_trips(pid in any::<i32>(), key in any::<i32>()) {
        let mut buf = BytesMut::new();
        fe::cancel_request(pid, key, &mut buf);
        prop_assert_eq!(
            startup::decode(buf.split_off(4)).unwrap(),
            StartupPacket::Cancel { pid, key }
        );
    }

    #[test]
    fn startup_decode_never_panics(body in vec(any::<u8>(), 0..64)) {
        let _ = startup::decode(BytesMut::from(&body[..]));
    }

    #[test]
    fn frame_header_round_trips(tag in any::<u8>(), body in vec(any::<u8>(), 0..64)) {
        let mut buf = vec![tag];
        buf.put_i32(4 + body.len() as i32);
        buf.extend_from_slice(&body);
        prop_assert_eq!(frame::header(&buf), Some((tag, Ok(buf.len()))));
        prop_assert_eq!(frame::header(&buf[..4]), None);
    }

    #[test]
    fn frame_header_refuses_short_lengths(tag in any::<u8>(), len in i32::MIN..4) {
        let mut buf = vec![tag];
        buf.put_i32(len);
        prop_assert_eq!(frame::header(&buf), Some((tag, Err(frame::BadLength(len)))));
    }

    #[test]
    fn error_response_round_trips(
        fatal in any::<bool>(),
        code in "[0-9A-Z]{5}",
        msg in text(),
        hint in proptest::option::of(text()),
    ) {
        let severity = if fatal { Severity::Fatal } else { Severity::Error };
        let mut buf = BytesMut::new();
        backend::error_response(&mut buf, severity, &code, &msg, hint.as_deref());
        let Message::ErrorResponse(body) = parse_one(&mut buf) else {
            panic!("not an ErrorResponse")
        };
        let mut fields = Vec::new();
        let mut it = body.fields();
        while let Some(f) = it.next().unwrap() {
            fields.push((f.type_(), String::from_utf8(f.value_bytes().to_vec()).unwrap()));
        }
        let mut want = vec![
            (b'S', if fatal { "FATAL" } else { "ERROR" }.to_string()),
            (b'V', if fatal { "FATAL" } else { "ERROR" }.to_string()),
            (b'C', code),
            (b'M', msg),
        ];
        if let Some(h) = hint {
            want.push((b'H', h));
        }
        prop_assert_eq!(fields, want);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn startup_replies_round_trip(
        params in vec((name(), text()), 0..6),
        pid in any::<i32>(),
        key in any::<i32>(),
        status in prop::sample::select(vec![b'I', b'T', b'E']),
    ) {
        let mut buf = BytesMut::new();
        backend::authentication_ok(&mut buf);
        for (k, v) in &params {
            backend::parameter_status(&mut buf, k, v);
        }
        backend::backend_key_data(&mut buf, pid, key);
        backend::ready_for_query(&mut buf, status);
        prop_assert!(matches!(parse_one(&mut buf), Message::AuthenticationOk));
        for (k, v) in &params {
            let Message::ParameterStatus(p) = parse_one(&mut buf) else { panic!() };
            prop_assert_eq!((p.name().unwrap(), p.value().unwrap()), (k.as_str(), v.as_str()));
        }
        let Message::BackendKeyData(k) = parse_one(&mut buf) else { panic!() };
        prop_assert_eq!((k.process_id(), k.secret_key()), (pid, key));
        let Message::ReadyForQuery(r) = parse_one(&mut buf) else { panic!() };
        prop_assert_eq!(r.status(), status);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn result_messages_round_trip(
        columns in vec((name(), any::<u32>()), 0..6),
        values in vec(proptest::option::of(text()), 0..6),
        tag in text(),
    ) {
        let mut buf = BytesMut::new();
        let cols: Vec<(&str, u32)> = columns.iter().map(|(n, o)| (n.as_str(), *o)).collect();
        backend::row_description(&mut buf, &cols);
        backend::data_row(&mut buf, values.iter().map(|v| v.as_deref()).collect::<Vec<_>>().into_iter());
        backend::command_complete(&mut buf, &tag);
        let Message::RowDescription(d) = parse_one(&mut buf) else { panic!() };
        let fields: Vec<(String, u32)> = d
            .fields()
            .map(|f| Ok((f.name().to_string(), f.type_oid())))
            .collect()
            .unwrap();
        prop_assert_eq!(fields, columns);
        let Message::DataRow(r) = parse_one(&mut buf) else { panic!() };
        let got: Vec<Option<String>> = r
            .ranges()
            .map(|range| Ok(range.map(|x| String::from_utf8(r.buffer()[x].to_vec()).unwrap())))
            .collect()
            .unwrap();
        prop_assert_eq!(got, values);
        let Message::CommandComplete(c) = parse_one(&mut buf) else { panic!() };
        prop_assert_eq!(c.tag().unwrap(), tag.as_str());
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn auth_requests_round_trip(salt in any::<[u8; 4]>(), data in vec(any::<u8>(), 0..64)) {
        let mut buf = BytesMut::new();
        backend::authentication_md5(&mut buf, salt);
        backend::authentication_sasl_continue(&mut buf, &data);
        backend::authentication_sasl_final(&mut buf, &data);
        let Message::AuthenticationMd5Password(m) = parse_one(&mut buf) else { panic!() };
        prop_assert_eq!(m.salt(), salt);
        let Message::AuthenticationSaslContinue(c) = parse_one(&mut buf) else { panic!() };
        prop_assert_eq!(c.data(), &data[..]);
        let Message::AuthenticationSaslFinal(f) = parse_one(&mut buf) else { panic!() };
        prop_assert_eq!(f.data(), &data[..]);
    }

    #[test]
    fn parse_bind_describe_round_trip(
        stmt in text(),
        portal in text(),
        query in text(),
        types in vec(any::<u32>(), 0..8),
        kind in prop::sample::select(vec![b'S', b'P']),
    ) {
        let mut buf = BytesMut::new();
        fe::parse(&stmt, &query, types.iter().copied(), &mut buf).unwrap();
        let p = frontend::parse(&buf[5..]).expect("parses");
        prop_assert_eq!(p.name, stmt.as_bytes());
        prop_assert_eq!(p.query, query.as_bytes());
        prop_assert_eq!(p.param_types.len(), 2 + 4 * types.len());

        buf.clear();
        fe::bind(
            &portal,
            &stmt,
            [0i16],
            [1i32],
            |v, out| {
                out.put_i32(v);
                Ok(postgres_protocol::IsNull::No)
            },
            [0i16],
            &mut buf,
        )
        .map_err(|_| ())
        .unwrap();
        let b = frontend::bind(&buf[5..]).expect("binds");
        prop_assert_eq!((b.portal, b.statement), (portal.as_bytes(), stmt.as_bytes()));
        // pgtether's rewrite keeps everything but the name, and a correct length.
        let mut out = BytesMut::new();
        frontend::write_bind(&mut out, &b, b"pgtether_1\0");
        prop_assert_eq!(frame::header(&out), Some((b'B', Ok(out.len()))));
        let again = frontend::bind(&out[5..]).unwrap();
        prop_assert_eq!(again.statement, &b"pgtether_1"[..]);
        prop_assert_eq!(again.rest, b.rest);

        buf.clear();
        fe::describe(kind, &stmt, &mut buf).unwrap();
        prop_assert_eq!(frontend::target(&buf[5..]), Some((kind, stmt.as_bytes())));
        let mut out = BytesMut::new();
        let mut named = stmt.as_bytes().to_vec();
        named.push(0);
        frontend::write_target(&mut out, b'C', kind, &named);
        prop_assert_eq!(frame::header(&out), Some((b'C', Ok(out.len()))));
        prop_assert_eq!(frontend::target(&out[5..]), Some((kind, stmt.as_bytes())));
    }

    #[test]
    fn frontend_decoders_never_panic(body in vec(any::<u8>(), 0..64)) {
        let _ = frontend::parse(&body);
        let _ = frontend::bind(&body);
        let _ = frontend::target(&body);
    }
}
