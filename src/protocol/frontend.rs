//! Reading the frontend messages pgtether rewrites (Parse, Bind, Describe, Close) and writing
//! their rewritten forms. Only the leading name fields are decoded; the rest is copied as is.

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

pub fn parse(body: &[u8]) -> Option<Parse<'_>> {
    let (name, n) = cstr(body)?;
    let (query, q) = cstr(&body[n..])?;
    let param_types = &body[n + q..];
    if param_types.len() < 2 {
        return None;
    }
    let count = i16::from_be_bytes([param_types[0], param_types[1]]);
    if count < 0 || param_types.len() != 2 + 4 * count as usize {
        return None;
    }
    Some(Parse {
        name,
        query,
        param_types,
    })
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
        assert!(parse(b"noterminator").is_none());
        assert!(parse(b"s\0q\0\0\x01").is_none());
        assert!(parse(b"s\0q\0\xff\xff").is_none());
        assert!(bind(b"p\0").is_none());
        assert!(target(b"X\0").is_none());
        assert!(target(b"Sab").is_none());
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
