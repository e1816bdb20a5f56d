//! Reading the frontend messages pgtether rewrites (Parse, Bind, Describe, Close) and writing
//! their rewritten forms. Only the leading name fields are decoded and the rest is copied as
//! is, but a Parse's and a mapped statement's Bind's layout is checked first, as PostgreSQL
//! reads it: what pgtether passes on is never read differently by the server.

use bytes::{BufMut, BytesMut};

/// A NUL-terminated string at the start of `b`: (contents, bytes consumed including NUL).
fn cstr(b: &[u8]) -> Option<(&[u8], usize)> {
    let end = b.iter().position(|c| *c == 0)?;
    Some((&b[..end], end + 1))
}

/// Parse: statement name, query text, and the raw parameter-type section.
pub struct Parse<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    /// Int16 count followed by that many Int32 type oids.
    pub param_types: &'a [u8],
}

/// Why a Parse body cannot be read. PostgreSQL refuses such a message with 08P01 too, so
/// pgtether refuses it rather than pass on what it cannot track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadParse {
    #[error("the statement name is not NUL-terminated")]
    UnterminatedName,
    #[error("the query text is not NUL-terminated")]
    UnterminatedQuery,
    #[error("the parameter-type count is missing")]
    NoCount,
    #[error("{count} parameter types announced, {bytes} bytes of them sent")]
    ParamTypes { count: u16, bytes: usize },
}

pub fn parse(body: &[u8]) -> Result<Parse<'_>, BadParse> {
    let (name, n) = cstr(body).ok_or(BadParse::UnterminatedName)?;
    let (query, q) = cstr(&body[n..]).ok_or(BadParse::UnterminatedQuery)?;
    let param_types = &body[n + q..];
    let [hi, lo, ref types @ ..] = *param_types else {
        return Err(BadParse::NoCount);
    };
    // PostgreSQL reads the count as unsigned: 0x8000 and more are valid counts.
    let count = u16::from_be_bytes([hi, lo]);
    if types.len() != 4 * usize::from(count) {
        return Err(BadParse::ParamTypes {
            count,
            bytes: types.len(),
        });
    }
    Ok(Parse {
        name,
        query,
        param_types,
    })
}

/// The text of a Query body: a string whose NUL is the body's last byte (PostgreSQL refuses
/// any other body with 08P01, before running any of it).
pub fn query_text(body: &[u8]) -> Option<&[u8]> {
    let (text, used) = cstr(body)?;
    (used == body.len()).then_some(text)
}

/// Bind: portal name, statement name, and everything after them.
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    pub rest: &'a [u8],
}

pub fn bind(body: &[u8]) -> Option<Bind<'_>> {
    let (portal, p) = cstr(body)?;
    let (statement, s) = cstr(&body[p..])?;
    Some(Bind {
        portal,
        statement,
        rest: &body[p + s..],
    })
}

/// Why the part of a Bind after its names cannot be read. PostgreSQL refuses such a message
/// with 08P01 before running anything (after looking up the statement).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadBind {
    #[error("the {0} are cut short")]
    Truncated(&'static str),
    #[error("parameter {index} has length {length}")]
    BadLength { index: u16, length: i32 },
    #[error("{0} bytes follow the result formats")]
    TrailingBytes(usize),
}

/// Checks the layout of a Bind's `rest` as PostgreSQL reads it: parameter formats, parameter
/// values (length -1 is NULL), result formats, and nothing after them. Counts are unsigned.
pub fn check_bind_rest(rest: &[u8]) -> Result<(), BadBind> {
    fn take<'a>(b: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], BadBind> {
        if b.len() < n {
            return Err(BadBind::Truncated(what));
        }
        let (head, tail) = b.split_at(n);
        *b = tail;
        Ok(head)
    }
    fn count(b: &mut &[u8], what: &'static str) -> Result<u16, BadBind> {
        let c = take(b, 2, what)?;
        Ok(u16::from_be_bytes([c[0], c[1]]))
    }
    let mut b = rest;
    let formats = count(&mut b, "parameter formats")?;
    take(&mut b, 2 * usize::from(formats), "parameter formats")?;
    let params = count(&mut b, "parameter values")?;
    for index in 0..params {
        let l = take(&mut b, 4, "parameter values")?;
        match i32::from_be_bytes([l[0], l[1], l[2], l[3]]) {
            -1 => {}
            length if length < 0 => return Err(BadBind::BadLength { index, length }),
            length => {
                take(&mut b, length as usize, "parameter values")?;
            }
        }
    }
    let results = count(&mut b, "result formats")?;
    take(&mut b, 2 * usize::from(results), "result formats")?;
    match b.len() {
        0 => Ok(()),
        n => Err(BadBind::TrailingBytes(n)),
    }
}

/// Describe or Close: target kind (`S` statement, `P` portal) and name.
pub fn target(body: &[u8]) -> Option<(u8, &[u8])> {
    let kind = *body.first()?;
    let (name, used) = cstr(&body[1..])?;
    if 1 + used != body.len() || !(kind == b'S' || kind == b'P') {
        return None;
    }
    Some((kind, name))
}

fn header(out: &mut BytesMut, tag: u8, body_len: usize) {
    out.put_u8(tag);
    out.put_i32((body_len + 4) as i32);
}

/// Bind with the statement name replaced (`statement` is NUL-terminated).
pub fn write_bind(out: &mut BytesMut, b: &Bind<'_>, statement: &[u8]) {
    header(
        out,
        b'B',
        b.portal.len() + 1 + statement.len() + b.rest.len(),
    );
    out.put_slice(b.portal);
    out.put_u8(0);
    out.put_slice(statement);
    out.put_slice(b.rest);
}

/// A message of type `tag` with an empty body. For Parse and Bind, PostgreSQL answers it with
/// ERROR 08P01 ("invalid string in message") before doing anything else.
pub fn write_empty(out: &mut BytesMut, tag: u8) {
    header(out, tag, 0);
}

/// Describe or Close of a statement by (NUL-terminated) name.
pub fn write_target(out: &mut BytesMut, tag: u8, kind: u8, name: &[u8]) {
    header(out, tag, 1 + name.len());
    out.put_u8(kind);
    out.put_slice(name);
}

/// Parse of `query` as the unnamed statement with no parameter types.
pub fn write_unnamed_parse(out: &mut BytesMut, query: &str) {
    header(out, b'P', 1 + query.len() + 1 + 2);
    out.put_u8(0);
    out.put_slice(query.as_bytes());
    out.put_u8(0);
    out.put_i16(0);
}

/// Bind of the unnamed statement to the unnamed portal, no parameters, text results.
pub fn write_unnamed_bind(out: &mut BytesMut) {
    header(out, b'B', 1 + 1 + 2 + 2 + 2);
    out.put_slice(&[0, 0]);
    out.put_i16(0);
    out.put_i16(0);
    out.put_i16(0);
}

/// Execute of the unnamed portal, all rows.
pub fn write_unnamed_execute(out: &mut BytesMut) {
    header(out, b'E', 1 + 4);
    out.put_u8(0);
    out.put_i32(0);
}

/// Query message.
pub fn write_query(out: &mut BytesMut, sql: &str) {
    header(out, b'Q', sql.len() + 1);
    out.put_slice(sql.as_bytes());
    out.put_u8(0);
}

/// A statement that fails on the server with `code` and `message`, so that the error, the
/// aborted transaction and the skip-to-Sync all happen exactly as PostgreSQL does them.
pub fn raise_sql(code: &str, message: &str) -> String {
    let literal = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let body = format!(
        "BEGIN RAISE EXCEPTION USING ERRCODE = {}, MESSAGE = {}; END",
        literal(code),
        literal(message)
    );
    // Pick a dollar-quote tag that cannot occur in the body.
    let mut tag = String::from("$pgtether$");
    while body.contains(&tag) {
        tag.insert(1, 'x');
    }
    format!("DO {tag}{body}{tag}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::frontend as fe;

    fn body(msg: &[u8]) -> &[u8] {
        &msg[5..]
    }

    #[test]
    fn reads_what_postgres_protocol_writes() {
        let mut buf = BytesMut::new();
        fe::parse("s1", "SELECT $1", [23u32], &mut buf).unwrap();
        let p = parse(body(&buf)).unwrap();
        assert_eq!((p.name, p.query), (&b"s1"[..], &b"SELECT $1"[..]));
        assert_eq!(p.param_types, b"\0\x01\0\0\0\x17");

        buf.clear();
        fe::describe(b'S', "s1", &mut buf).unwrap();
        assert_eq!(target(body(&buf)), Some((b'S', &b"s1"[..])));
        buf.clear();
        fe::close(b'P', "", &mut buf).unwrap();
        assert_eq!(target(body(&buf)), Some((b'P', &b""[..])));
    }

    #[test]
    fn query_text_is_one_terminated_string() {
        assert_eq!(query_text(b"SELECT 1\0"), Some(&b"SELECT 1"[..]));
        assert_eq!(query_text(b"\0"), Some(&b""[..]));
        assert_eq!(query_text(b""), None);
        assert_eq!(query_text(b"SELECT 1"), None);
        assert_eq!(query_text(b"LISTEN c\0\0"), None);
    }

    #[test]
    fn parameter_type_count_is_unsigned() {
        let mut body = b"s\0q\0\x80\0".to_vec();
        body.extend(std::iter::repeat_n(0u8, 4 * 0x8000));
        assert_eq!(
            parse(&body).map(|p| p.param_types.len()),
            Ok(2 + 4 * 0x8000)
        );
    }

    #[test]
    fn bind_rewrite_keeps_the_rest() {
        let mut buf = BytesMut::new();
        fe::bind(
            "p",
            "s1",
            [1i16],
            [7i32],
            |v, out| {
                out.put_i32(v);
                Ok(postgres_protocol::IsNull::No)
            },
            [1i16],
            &mut buf,
        )
        .map_err(|_| ())
        .unwrap();
        let b = bind(body(&buf)).unwrap();
        assert_eq!((b.portal, b.statement), (&b"p"[..], &b"s1"[..]));
        let mut out = BytesMut::new();
        write_bind(&mut out, &b, b"pgtether_9\0");
        let again = bind(body(&out)).unwrap();
        assert_eq!(again.statement, b"pgtether_9");
        assert_eq!(again.rest, b.rest);
        let len = i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        assert_eq!(len + 1, out.len());
    }

    #[test]
    fn malformed_bodies_are_refused() {
        assert_eq!(
            parse(b"noterminator").err(),
            Some(BadParse::UnterminatedName)
        );
        assert_eq!(parse(b"s\0q").err(), Some(BadParse::UnterminatedQuery));
        assert_eq!(parse(b"s\0q\0\0").err(), Some(BadParse::NoCount));
        assert_eq!(
            parse(b"s\0q\0\0\x01").err(),
            Some(BadParse::ParamTypes { count: 1, bytes: 0 })
        );
        assert_eq!(
            parse(b"s\0q\0\xff\xff").err(),
            Some(BadParse::ParamTypes {
                count: 0xffff,
                bytes: 0
            })
        );
        assert!(parse(b"s\0q\0\0\0x").is_err());
        assert!(bind(b"p\0").is_none());
        assert!(target(b"X\0").is_none());
        assert!(target(b"Sab").is_none());
    }

    #[test]
    fn bind_rest_layout() {
        let ok: &[&[u8]] = &[
            b"\0\0\0\0\0\0",
            b"\0\x01\0\x01\0\x02\xff\xff\xff\xff\0\0\0\x011\0\x01\0\0",
        ];
        for rest in ok {
            assert_eq!(check_bind_rest(rest), Ok(()), "{rest:?}");
        }
        let bad: &[(&[u8], BadBind)] = &[
            (b"", BadBind::Truncated("parameter formats")),
            (b"\0\x05\0\0", BadBind::Truncated("parameter formats")),
            (b"\xff\xff", BadBind::Truncated("parameter formats")),
            (
                b"\0\0\0\x01\0\0\x03\xe81",
                BadBind::Truncated("parameter values"),
            ),
            (
                b"\0\0\0\x01\xff\xff\xff\xfe\0\0",
                BadBind::BadLength {
                    index: 0,
                    length: -2,
                },
            ),
            (b"\0\0\0\0\x7f\xff", BadBind::Truncated("result formats")),
            (b"\0\0\0\0\0\0xx", BadBind::TrailingBytes(2)),
        ];
        for (rest, why) in bad {
            assert_eq!(check_bind_rest(rest), Err(*why), "{rest:?}");
        }
    }

    #[test]
    fn raise_sql_escapes() {
        let sql = raise_sql(
            "42P05",
            "prepared statement \"a'$pgtether$\" already exists",
        );
        assert!(sql.starts_with("DO $xpgtether$"));
        assert!(sql.contains("'prepared statement \"a''$pgtether$\" already exists'"));
    }
}
