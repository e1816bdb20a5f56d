//! Builders for the backend messages pgtether sends to clients on its own behalf: written
//! straight into a `BytesMut`, no intermediate structs. Also the one field pgtether reads from
//! a server's ErrorResponse (`fatal_message`).

use bytes::{BufMut, BytesMut};

/// Severity of an ErrorResponse: `Error` keeps the session, `Fatal` ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// Writes a message: type byte, length placeholder, body by `f`, then the real length.
#[inline]
fn message(buf: &mut BytesMut, tag: u8, f: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    f(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside would end the string early on the client side; drop it instead.
    buf.extend(s.bytes().filter(|b| *b != 0));
    buf.put_u8(0);
}

/// ErrorResponse with severity, SQLSTATE, message and an optional hint.
pub fn error_response(
    buf: &mut BytesMut,
    severity: Severity,
    code: &str,
    msg: &str,
    hint: Option<&str>,
) {
    message(buf, b'E', |b| {
        b.put_u8(b'S');
        cstr(b, severity.as_str());
        b.put_u8(b'V');
        cstr(b, severity.as_str());
        b.put_u8(b'C');
        cstr(b, code);
        b.put_u8(b'M');
        cstr(b, msg);
        if let Some(h) = hint {
            b.put_u8(b'H');
            cstr(b, h);
        }
        b.put_u8(0);
    });
}

/// NoticeResponse (severity NOTICE or WARNING) with SQLSTATE and message.
pub fn notice_response(buf: &mut BytesMut, severity: &str, code: &str, msg: &str) {
    message(buf, b'N', |b| {
        b.put_u8(b'S');
        cstr(b, severity);
        b.put_u8(b'V');
        cstr(b, severity);
        b.put_u8(b'C');
        cstr(b, code);
        b.put_u8(b'M');
        cstr(b, msg);
        b.put_u8(0);
    });
}

/// RowDescription for text-format columns given as (name, type oid).
pub fn row_description(buf: &mut BytesMut, columns: &[(&str, u32)]) {
    message(buf, b'T', |b| {
        b.put_i16(columns.len() as i16);
        for (name, oid) in columns {
            cstr(b, name);
            b.put_u32(0); // table oid
            b.put_i16(0); // column number
            b.put_u32(*oid);
            b.put_i16(-1); // type size: variable
            b.put_i32(-1); // type modifier
            b.put_i16(0); // text format
        }
    });
}

/// DataRow of text values; `None` is SQL NULL.
pub fn data_row<'a>(buf: &mut BytesMut, values: impl ExactSizeIterator<Item = Option<&'a str>>) {
    message(buf, b'D', |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v.as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
    });
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    message(buf, b'C', |b| cstr(b, tag));
}

pub fn empty_query_response(buf: &mut BytesMut) {
    message(buf, b'I', |_| {});
}

pub fn authentication_ok(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(0));
}

pub fn authentication_cleartext(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(3));
}

pub fn authentication_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    message(buf, b'R', |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    });
}

pub fn authentication_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    message(buf, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            cstr(b, m);
        }
        b.put_u8(0);
    });
}

pub fn authentication_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn authentication_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    message(buf, b'S', |b| {
        cstr(b, name);
        cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, key: i32) {
    message(buf, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(key);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    message(buf, b'Z', |b| b.put_u8(status));
}

/// One field of an ErrorResponse or NoticeResponse (`C` the SQLSTATE, `R` the routine, …).
pub fn error_field(msg: &[u8], wanted: u8) -> Option<&[u8]> {
    let mut rest = msg.get(5..)?;
    while let Some((&field, after)) = rest.split_first() {
        if field == 0 {
            return None;
        }
        let end = after.iter().position(|b| *b == 0)?;
        if field == wanted {
            return Some(&after[..end]);
        }
        rest = &after[end + 1..];
    }
    None
}

/// The message of an ErrorResponse with severity FATAL or PANIC (the server is closing).
pub fn fatal_message(msg: &[u8]) -> Option<String> {
    let mut rest = msg.get(5..)?;
    let mut fatal = false;
    let mut message = String::new();
    while let Some((&field, after)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = after.iter().position(|b| *b == 0)?;
        let value = &after[..end];
        match field {
            b'V' | b'S' => fatal |= value == b"FATAL" || value == b"PANIC",
            b'M' => message = String::from_utf8_lossy(value).into_owned(),
            _ => {}
        }
        rest = &after[end + 1..];
    }
    fatal.then_some(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fallible_iterator::FallibleIterator;
    use postgres_protocol::message::backend::{ErrorFields, Message};

    fn parse_one(buf: &mut BytesMut) -> Message {
        Message::parse(buf).unwrap().expect("a whole message")
    }

    #[test]
    fn error_response_round_trips() {
        let mut buf = BytesMut::new();
        error_response(
            &mut buf,
            Severity::Fatal,
            "08P01",
            "bad\0message",
            Some("do x"),
        );
        let Message::ErrorResponse(body) = parse_one(&mut buf) else {
            panic!("not an error")
        };
        let mut fields: ErrorFields<'_> = body.fields();
        let mut seen = Vec::new();
        while let Some(f) = fields.next().unwrap() {
            seen.push((
                f.type_(),
                String::from_utf8_lossy(f.value_bytes()).into_owned(),
            ));
        }
        assert!(seen.contains(&(b'S', "FATAL".into())));
        assert!(seen.contains(&(b'C', "08P01".into())));
        assert!(seen.contains(&(b'M', "badmessage".into())));
        assert!(seen.contains(&(b'H', "do x".into())));
        assert!(buf.is_empty());
    }

    #[test]
    fn startup_replies_round_trip() {
        let mut buf = BytesMut::new();
        authentication_ok(&mut buf);
        parameter_status(&mut buf, "server_version", "15.1");
        backend_key_data(&mut buf, 42, -7);
        ready_for_query(&mut buf, b'I');
        assert!(matches!(parse_one(&mut buf), Message::AuthenticationOk));
        let Message::ParameterStatus(p) = parse_one(&mut buf) else {
            panic!()
        };
        assert_eq!(
            (p.name().unwrap(), p.value().unwrap()),
            ("server_version", "15.1")
        );
        let Message::BackendKeyData(k) = parse_one(&mut buf) else {
            panic!()
        };
        assert_eq!((k.process_id(), k.secret_key()), (42, -7));
        let Message::ReadyForQuery(r) = parse_one(&mut buf) else {
            panic!()
        };
        assert_eq!(r.status(), b'I');
    }

    #[test]
    fn result_messages_round_trip() {
        use fallible_iterator::FallibleIterator;
        let mut buf = BytesMut::new();
        row_description(&mut buf, &[("database", 25), ("cl_active", 20)]);
        data_row(&mut buf, [Some("app"), None].into_iter());
        command_complete(&mut buf, "SHOW");
        notice_response(&mut buf, "WARNING", "01000", "careful");
        empty_query_response(&mut buf);
        let Message::RowDescription(d) = parse_one(&mut buf) else {
            panic!()
        };
        let fields: Vec<_> = d.fields().collect().unwrap();
        assert_eq!(fields[0].name(), "database");
        assert_eq!(fields[1].type_oid(), 20);
        let Message::DataRow(r) = parse_one(&mut buf) else {
            panic!()
        };
        let mut ranges = r.ranges();
        assert_eq!(
            &r.buffer()[ranges.next().unwrap().unwrap().unwrap()],
            b"app"
        );
        assert_eq!(ranges.next().unwrap(), Some(None));
        let Message::CommandComplete(c) = parse_one(&mut buf) else {
            panic!()
        };
        assert_eq!(c.tag().unwrap(), "SHOW");
        assert!(matches!(parse_one(&mut buf), Message::NoticeResponse(_)));
        assert!(matches!(parse_one(&mut buf), Message::EmptyQueryResponse));
        assert!(buf.is_empty());
    }

    #[test]
    fn auth_requests_round_trip() {
        let mut buf = BytesMut::new();
        authentication_md5(&mut buf, [1, 2, 3, 4]);
        authentication_sasl(&mut buf, &["SCRAM-SHA-256"]);
        authentication_sasl_continue(&mut buf, b"r=abc");
        authentication_sasl_final(&mut buf, b"v=xyz");
        let Message::AuthenticationMd5Password(m) = parse_one(&mut buf) else {
            panic!()
        };
        assert_eq!(m.salt(), [1, 2, 3, 4]);
        let Message::AuthenticationSasl(s) = parse_one(&mut buf) else {
            panic!()
        };
        assert_eq!(s.mechanisms().next().unwrap(), Some("SCRAM-SHA-256"));
        let Message::AuthenticationSaslContinue(c) = parse_one(&mut buf) else {
            panic!()
        };
        assert_eq!(c.data(), b"r=abc");
        let Message::AuthenticationSaslFinal(f) = parse_one(&mut buf) else {
            panic!()
        };
        assert_eq!(f.data(), b"v=xyz");
    }
}
