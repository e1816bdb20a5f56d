//! The startup phase packets, which have no type byte: StartupMessage, SSLRequest,
//! GSSENCRequest and CancelRequest, distinguished by the code after the length.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest startup packet accepted, as in PostgreSQL (MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP_LEN: usize = 10_000;

const CODE_PROTOCOL_3: i32 = 196_608; // 3 << 16
const CODE_CANCEL: i32 = 80_877_102;
const CODE_SSL: i32 = 80_877_103;
const CODE_GSSENC: i32 = 80_877_104;

/// A decoded startup-phase packet.
#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    Cancel {
        pid: i32,
        key: i32,
    },
    /// Protocol 3.0 StartupMessage with its parameters in order.
    Startup {
        params: Vec<(String, String)>,
    },
    /// A StartupMessage for a protocol version pgtether does not speak.
    UnsupportedVersion {
        major: u16,
        minor: u16,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("connection closed during startup")]
    Closed,
    #[error("i/o error during startup: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid startup packet length {0}")]
    BadLength(i32),
    #[error("invalid startup packet: {0}")]
    Malformed(&'static str),
}

/// Reads one startup-phase packet.
pub async fn read_packet<R: AsyncRead + Unpin>(r: &mut R) -> Result<StartupPacket, StartupError> {
    let len = match r.read_i32().await {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(StartupError::Closed)
        }
        Err(e) => return Err(e.into()),
    };
    if len < 8 || len as usize > MAX_STARTUP_LEN {
        return Err(StartupError::BadLength(len));
    }
    let mut body = BytesMut::zeroed(len as usize - 4);
    r.read_exact(&mut body).await?;
    decode(body)
}

/// Decodes a startup packet body (everything after the length field).
pub fn decode(mut body: BytesMut) -> Result<StartupPacket, StartupError> {
    // read_packet never passes fewer than 4 bytes, but a short body must not panic here.
    if body.len() < 4 {
        return Err(StartupError::Malformed("no protocol code"));
    }
    let code = body.get_i32();
    match code {
        CODE_SSL if body.is_empty() => Ok(StartupPacket::Ssl),
        CODE_GSSENC if body.is_empty() => Ok(StartupPacket::GssEnc),
        CODE_CANCEL if body.len() == 8 => Ok(StartupPacket::Cancel {
            pid: body.get_i32(),
            key: body.get_i32(),
        }),
        CODE_SSL | CODE_GSSENC | CODE_CANCEL => Err(StartupError::Malformed("unexpected length")),
        CODE_PROTOCOL_3 => Ok(StartupPacket::Startup {
            params: decode_params(&body)?,
        }),
        other => Ok(StartupPacket::UnsupportedVersion {
            major: (other >> 16) as u16,
            minor: (other & 0xffff) as u16,
        }),
    }
}

fn decode_params(body: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params = Vec::new();
    let mut rest = body;
    loop {
        let (name, after) = take_cstr(rest)?;
        if name.is_empty() {
            if !after.is_empty() {
                return Err(StartupError::Malformed("data after the final terminator"));
            }
            return Ok(params);
        }
        let (value, after) = take_cstr(after)?;
        params.push((name.to_string(), value.to_string()));
        rest = after;
    }
}

fn take_cstr(buf: &[u8]) -> Result<(&str, &[u8]), StartupError> {
    let end = buf
        .iter()
        .position(|b| *b == 0)
        .ok_or(StartupError::Malformed("missing terminator"))?;
    let s = std::str::from_utf8(&buf[..end])
        .map_err(|_| StartupError::Malformed("parameter is not UTF-8"))?;
    Ok((s, &buf[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn packet(code: i32, rest: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_i32(8 + rest.len() as i32);
        v.put_i32(code);
        v.extend_from_slice(rest);
        v
    }

    async fn read(bytes: Vec<u8>) -> Result<StartupPacket, StartupError> {
        read_packet(&mut bytes.as_slice()).await
    }

    #[tokio::test]
    async fn decodes_startup_message() {
        let p = read(packet(CODE_PROTOCOL_3, b"user\0bob\0database\0app\0\0"))
            .await
            .unwrap();
        assert_eq!(
            p,
            StartupPacket::Startup {
                params: vec![
                    ("user".into(), "bob".into()),
                    ("database".into(), "app".into())
                ]
            }
        );
    }

    #[tokio::test]
    async fn decodes_negotiation_and_cancel() {
        assert_eq!(
            read(packet(CODE_SSL, b"")).await.unwrap(),
            StartupPacket::Ssl
        );
        assert_eq!(
            read(packet(CODE_GSSENC, b"")).await.unwrap(),
            StartupPacket::GssEnc
        );
        let mut rest = Vec::new();
        rest.put_i32(7);
        rest.put_i32(-9);
        assert_eq!(
            read(packet(CODE_CANCEL, &rest)).await.unwrap(),
            StartupPacket::Cancel { pid: 7, key: -9 }
        );
    }

    #[tokio::test]
    async fn reports_other_versions() {
        let p = read(packet(2 << 16, b"\0")).await.unwrap();
        assert_eq!(p, StartupPacket::UnsupportedVersion { major: 2, minor: 0 });
    }

    #[tokio::test]
    async fn rejects_malformed() {
        assert!(matches!(
            read(vec![0, 0, 0, 2]).await,
            Err(StartupError::BadLength(2))
        ));
        assert!(matches!(
            read(vec![0x7f, 0, 0, 0]).await,
            Err(StartupError::BadLength(_))
        ));
        assert!(matches!(read(vec![0, 0]).await, Err(StartupError::Closed)));
        assert!(matches!(
            read(packet(CODE_PROTOCOL_3, b"user\0bob")).await,
            Err(StartupError::Malformed(_))
        ));
        assert!(matches!(
            read(packet(CODE_PROTOCOL_3, b"user\0bob\0\0extra")).await,
            Err(StartupError::Malformed(_))
        ));
        assert!(matches!(
            read(packet(CODE_SSL, b"xx")).await,
            Err(StartupError::Malformed(_))
        ));
    }
}
