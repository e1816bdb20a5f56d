//! Authenticating clients to pgtether (trust, md5, SCRAM-SHA-256, and SCRAM-SHA-256-PLUS with
//! channel binding over TLS), and finding the password material to check them against: the
//! config's (`[users]`, derived once per load into [`Secret`]s) or the upstream's (`lookup`,
//! auth_query). Upstream authentication, where pgtether is the client, lives with the server
//! connection in `server.rs`.

pub mod lookup;
pub mod scram;

use bytes::{Buf, BytesMut};
use md5::{Digest, Md5};
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::AuthMethod;
use crate::protocol::backend;
pub use scram::{ClientKey, ScramKeys, Verifier};

const SCRAM: &str = "SCRAM-SHA-256";
const SCRAM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Longest password message accepted from a client.
const MAX_PASSWORD_MESSAGE: usize = 8192;

/// What pgtether knows of a user's password, prepared once when the config is loaded so that
/// no login pays for key derivation.
#[derive(Clone)]
pub struct Secret {
    /// The plain password, when the config gives it; needed to log in upstream.
    pub plain: Option<String>,
    /// PostgreSQL's md5 form, `md5` + hex(md5(password + user)), when derivable.
    pub md5: Option<String>,
    pub scram: Option<Verifier>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// Interprets a config password: a SCRAM verifier, an md5 hash, or plain text.
    pub fn from_config(user: &str, password: &str) -> Secret {
        if let Some(v) = Verifier::parse(password) {
            return Secret {
                plain: None,
                md5: None,
                scram: Some(v),
            };
        }
        if password.len() == 35 && password.starts_with("md5") {
            return Secret {
                plain: None,
                md5: Some(password.to_string()),
                scram: None,
            };
        }
        Secret {
            plain: Some(password.to_string()),
            md5: Some(md5_stored(user, password)),
            scram: Some(Verifier::from_password(password)),
        }
    }
}

impl Secret {
    /// Password material for a user that does not exist, so that a login for it goes through
    /// the same exchange as a real one and fails like a wrong password. The salt is derived
    /// from the name and a per-process key, so repeated attempts see the same salt, as for a
    /// real user (PostgreSQL's "mock authentication").
    pub fn mock(user: &str, key: &[u8; 32]) -> Secret {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
        mac.update(user.as_bytes());
        let derived: [u8; 32] = mac.finalize().into_bytes().into();
        let mut stored_key = [0u8; 32];
        let mut server_key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut stored_key);
        rand::thread_rng().fill_bytes(&mut server_key);
        let mut md5 = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut md5);
        Secret {
            plain: None,
            md5: Some(format!(
                "md5{}",
                md5.iter().map(|b| format!("{b:02x}")).collect::<String>()
            )),
            scram: Some(Verifier {
                iterations: 4096,
                salt: derived[..16].to_vec(),
                stored_key,
                server_key,
            }),
        }
    }
}

/// `md5` + hex(md5(password + user)): what PostgreSQL stores for md5 passwords.
pub fn md5_stored(user: &str, password: &str) -> String {
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    format!("md5{:x}", h.finalize())
}

fn md5_response(stored: &str, salt: [u8; 4]) -> String {
    let mut h = Md5::new();
    h.update(&stored.as_bytes()[3..]);
    h.update(salt);
    format!("md5{:x}", h.finalize())
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password authentication failed for user \"{0}\"")]
    WrongPassword(String),
    #[error("no password is configured for user \"{0}\" that method {1:?} can check")]
    NoSecret(String, AuthMethod),
    #[error("protocol violation during authentication: {0}")]
    Protocol(String),
    /// A channel binding check failed (downgrade or wrong binding data): reported with 28000,
    /// as PostgreSQL does.
    #[error("{0}")]
    ChannelBinding(scram::ScramError),
    #[error("client closed the connection during authentication")]
    Closed,
    #[error("i/o error during authentication: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the exchange for `method` on a client stream. On success nothing has been sent beyond
/// the method's own messages; the caller sends AuthenticationOk. A SCRAM login returns the
/// client's ClientKey (see [`ScramKeys`]). `channel_binding` is the connection's
/// `tls-server-end-point` data: given, SCRAM-SHA-256-PLUS is offered too.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    method: AuthMethod,
    user: &str,
    secret: Option<&Secret>,
    channel_binding: Option<&[u8]>,
) -> Result<Option<ClientKey>, AuthError> {
    let mut out = BytesMut::with_capacity(128);
    match method {
        AuthMethod::Trust => Ok(None),
        AuthMethod::Md5 => {
            let stored = secret
                .and_then(|s| s.md5.as_deref())
                .ok_or(AuthError::NoSecret(user.to_string(), method))?;
            let mut salt = [0u8; 4];
            rand::thread_rng().fill_bytes(&mut salt);
            backend::authentication_md5(&mut out, salt);
            stream.write_all(&out).await?;
            let body = read_password_message(stream).await?;
            let given = body.strip_suffix(b"\0").unwrap_or(&body);
            let expected = md5_response(stored, salt);
            if scram::constant_time_eq(given, expected.as_bytes()) {
                Ok(None)
            } else {
                Err(AuthError::WrongPassword(user.to_string()))
            }
        }
        AuthMethod::ScramSha256 => {
            let verifier = secret
                .and_then(|s| s.scram.as_ref())
                .ok_or(AuthError::NoSecret(user.to_string(), method))?;
            scram_exchange(stream, user, verifier, channel_binding, &mut out)
                .await
                .map(Some)
        }
    }
}

async fn scram_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    user: &str,
    verifier: &Verifier,
    channel_binding: Option<&[u8]>,
    out: &mut BytesMut,
) -> Result<ClientKey, AuthError> {
    // PLUS first, as PostgreSQL lists them: libpq takes the first it supports.
    if channel_binding.is_some() {
        backend::authentication_sasl(out, &[SCRAM_PLUS, SCRAM]);
    } else {
        backend::authentication_sasl(out, &[SCRAM]);
    }
    stream.write_all(out).await?;
    out.clear();

    // SASLInitialResponse: mechanism name, then an Int32 length and the client-first-message.
    let mut body = read_password_message(stream).await?;
    let nul = body
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| AuthError::Protocol("SASL mechanism name is not terminated".into()))?;
    let binding = match (&body[..nul], channel_binding) {
        (m, Some(data)) if m == SCRAM_PLUS.as_bytes() => scram::Binding::Selected(data),
        (m, Some(_)) if m == SCRAM.as_bytes() => scram::Binding::Declined,
        (m, None) if m == SCRAM.as_bytes() => scram::Binding::NotOffered,
        (m, None) if m == SCRAM_PLUS.as_bytes() => {
            return Err(AuthError::Protocol(
                "client selected an invalid SASL authentication mechanism: SCRAM-SHA-256-PLUS was not offered on this connection (it needs TLS)".into(),
            ))
        }
        (m, _) => {
            return Err(AuthError::Protocol(format!(
                "unsupported SASL mechanism {:?}",
                String::from_utf8_lossy(m)
            )))
        }
    };
    body.advance(nul + 1);
    if body.len() < 4 {
        return Err(AuthError::Protocol(
            "SASLInitialResponse is truncated".into(),
        ));
    }
    let len = body.get_i32();
    if len < 0 || len as usize != body.len() {
        return Err(AuthError::Protocol(
            "SASLInitialResponse length is wrong".into(),
        ));
    }
    let first = std::str::from_utf8(&body)
        .map_err(|_| AuthError::Protocol("SCRAM message is not UTF-8".into()))?;
    let (exchange, server_first) =
        scram::ServerExchange::start(first, verifier, binding).map_err(scram_error)?;
    backend::authentication_sasl_continue(out, server_first.as_bytes());
    stream.write_all(out).await?;
    out.clear();

    let body = read_password_message(stream).await?;
    let client_final = std::str::from_utf8(&body)
        .map_err(|_| AuthError::Protocol("SCRAM message is not UTF-8".into()))?;
    match exchange.finish(client_final, verifier) {
        Ok((server_final, client_key)) => {
            backend::authentication_sasl_final(out, server_final.as_bytes());
            stream.write_all(out).await?;
            Ok(client_key)
        }
        Err(scram::ScramError::WrongPassword) => Err(AuthError::WrongPassword(user.to_string())),
        Err(e) => Err(scram_error(e)),
    }
}

fn scram_error(e: scram::ScramError) -> AuthError {
    match e {
        e @ (scram::ScramError::Downgrade | scram::ScramError::BindingMismatch) => {
            AuthError::ChannelBinding(e)
        }
        other => AuthError::Protocol(other.to_string()),
    }
}

/// Reads one 'p' message (PasswordMessage / SASLInitialResponse / SASLResponse) body.
async fn read_password_message<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<BytesMut, AuthError> {
    let tag = match stream.read_u8().await {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(AuthError::Closed),
        Err(e) => return Err(e.into()),
    };
    if tag != b'p' {
        return Err(AuthError::Protocol(format!(
            "expected a password message, got message type {:?}",
            tag as char
        )));
    }
    let len = stream.read_i32().await?;
    if len < 4 || len as usize - 4 > MAX_PASSWORD_MESSAGE {
        return Err(AuthError::Protocol(format!(
            "invalid password message length {len}"
        )));
    }
    let mut body = BytesMut::zeroed(len as usize - 4);
    stream.read_exact(&mut body).await?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_matches_postgres_protocol() {
        let salt = [9, 8, 7, 6];
        let ours = md5_response(&md5_stored("bob", "pw"), salt);
        let theirs = postgres_protocol::authentication::md5_hash(b"bob", b"pw", salt);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn secret_forms() {
        let plain = Secret::from_config("u", "pw");
        assert!(plain.plain.is_some() && plain.md5.is_some() && plain.scram.is_some());
        let md5 = Secret::from_config("u", &md5_stored("u", "pw"));
        assert!(md5.plain.is_none() && md5.md5.is_some() && md5.scram.is_none());
        let v = postgres_protocol::password::scram_sha_256(b"pw");
        let scram = Secret::from_config("u", &v);
        assert!(scram.plain.is_none() && scram.scram.is_some());
        assert_eq!(format!("{plain:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn mock_secrets_keep_their_salt_and_match_nothing() {
        let key = [7u8; 32];
        let a = Secret::mock("ghost", &key);
        let b = Secret::mock("ghost", &key);
        let (va, vb) = (a.scram.unwrap(), b.scram.unwrap());
        assert_eq!((va.salt.clone(), va.iterations), (vb.salt, vb.iterations));
        assert_ne!(va.salt, Secret::mock("other", &key).scram.unwrap().salt);
        assert_ne!(va.stored_key, vb.stored_key);
        assert!(a.plain.is_none() && a.md5.unwrap().len() == 35);
    }
}
