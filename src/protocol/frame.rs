//! Message framing: every regular message is a type byte and a big-endian length that counts
//! itself but not the type byte. pgtether reads only this header on the hot path.

/// Bytes in a regular message header (type byte + length).
pub const HEADER_LEN: usize = 5;

/// The header of a message at the start of `buf`: its type byte and total size on the wire
/// (header included). `None` when fewer than [`HEADER_LEN`] bytes are buffered.
#[inline]
pub fn header(buf: &[u8]) -> Option<(u8, Result<usize, BadLength>)> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let total = if len < 4 {
        Err(BadLength(len))
    } else {
        Ok(len as usize + 1)
    };
    Some((buf[0], total))
}

/// A length field below the minimum of 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadLength(pub i32);

/// Message types a frontend may send in the normal phase (after startup). PasswordMessage
/// (`p`) belongs to authentication only: PostgreSQL answers it later with FATAL, which would
/// look like a lost server connection.
#[inline]
pub fn is_frontend_type(tag: u8) -> bool {
    matches!(
        tag,
        b'B' | b'C' | b'c' | b'd' | b'D' | b'E' | b'f' | b'F' | b'H' | b'P' | b'Q' | b'S' | b'X'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_needs_five_bytes() {
        assert_eq!(header(b"Q\0\0\0"), None);
        assert_eq!(header(b"Q\0\0\0\x0dSELECT"), Some((b'Q', Ok(14))));
    }

    #[test]
    fn short_length_is_rejected() {
        assert_eq!(header(b"Q\0\0\0\x03"), Some((b'Q', Err(BadLength(3)))));
        assert_eq!(
            header(b"Q\xff\xff\xff\xff"),
            Some((b'Q', Err(BadLength(-1))))
        );
    }

    #[test]
    fn frontend_types() {
        for t in b"BCcdDEfFHPQSX" {
            assert!(is_frontend_type(*t));
        }
        for t in b"ZTKRzqp\0" {
            assert!(!is_frontend_type(*t));
        }
    }
}
