//! The server side of SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL speaks it, without channel
//! binding. postgres-protocol implements only the client side; its verifier builder is reused.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// A stored SCRAM-SHA-256 verifier, as in `pg_authid.rolpassword`.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier(<redacted>)")
    }
}

impl Verifier {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(s: &str) -> Option<Verifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iter, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Verifier {
            iterations: iter.parse().ok().filter(|i| *i > 0)?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// Derives a verifier from a plain password with a fresh random salt.
    pub fn from_password(password: &str) -> Verifier {
        let text = postgres_protocol::password::scram_sha_256(password.as_bytes());
        Verifier::parse(&text).expect("postgres-protocol builds well-formed verifiers")
    }
}

/// Why a SCRAM exchange failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported on this connection")]
    ChannelBinding,
    #[error("password authentication failed")]
    WrongPassword,
}

/// One server-side exchange: created from the client-first message, finished with the
/// client-final message.
pub struct ServerExchange {
    client_first_bare: String,
    server_first: String,
    gs2_header: String,
    nonce: String,
}

impl ServerExchange {
    /// Reads client-first-message and returns the exchange plus server-first-message.
    pub fn start(
        client_first: &str,
        verifier: &Verifier,
    ) -> Result<(ServerExchange, String), ScramError> {
        let (gs2_header, bare) = split_gs2(client_first)?;
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or(ScramError::Malformed("client nonce"))?;
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            ServerExchange {
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                gs2_header: gs2_header.to_string(),
                nonce,
            },
            server_first,
        ))
    }

    /// Checks client-final-message; on success returns server-final-message.
    pub fn finish(self, client_final: &str, verifier: &Verifier) -> Result<String, ScramError> {
        let (without_proof, proof) = client_final
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("missing proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(v) = attr.strip_prefix("c=") {
                channel = Some(v);
            } else if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        let channel = B64
            .decode(channel.ok_or(ScramError::Malformed("missing channel binding"))?)
            .map_err(|_| ScramError::Malformed("channel binding is not base64"))?;
        if channel != self.gs2_header.as_bytes() {
            return Err(ScramError::Malformed("channel binding does not match"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::Malformed("proof length"));
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&stored, &verifier.stored_key) {
            return Err(ScramError::WrongPassword);
        }
        let server_signature = hmac(&verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// Splits the GS2 header (`n,,` or `y,,`) from client-first-message-bare.
fn split_gs2(client_first: &str) -> Result<(&str, &str), ScramError> {
    let flag = client_first.as_bytes().first().copied();
    match flag {
        Some(b'n') | Some(b'y') => {}
        Some(b'p') => return Err(ScramError::ChannelBinding),
        _ => return Err(ScramError::Malformed("GS2 header")),
    }
    // gs2-header = cb-flag "," [authzid] ","
    let first = client_first
        .find(',')
        .ok_or(ScramError::Malformed("GS2 header"))?;
    let second = client_first[first + 1..]
        .find(',')
        .ok_or(ScramError::Malformed("GS2 header"))?
        + first
        + 1;
    Ok((&client_first[..=second], &client_first[second + 1..]))
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs postgres-protocol's client against our server side.
    fn exchange(client_password: &str, verifier: &Verifier) -> Result<(), ScramError> {
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let first = std::str::from_utf8(client.message()).unwrap().to_string();
        let (server, server_first) = ServerExchange::start(&first, verifier)?;
        client.update(server_first.as_bytes()).unwrap();
        let client_final = std::str::from_utf8(client.message()).unwrap().to_string();
        let server_final = server.finish(&client_final, verifier)?;
        client
            .finish(server_final.as_bytes())
            .expect("client accepts server signature");
        Ok(())
    }

    #[test]
    fn right_password_passes_both_ways() {
        let v = Verifier::from_password("s3cret");
        exchange("s3cret", &v).unwrap();
    }

    #[test]
    fn wrong_password_fails() {
        let v = Verifier::from_password("s3cret");
        assert_eq!(exchange("guess", &v), Err(ScramError::WrongPassword));
    }

    #[test]
    fn verifier_text_round_trips() {
        let text = postgres_protocol::password::scram_sha_256(b"pw");
        let v = Verifier::parse(&text).unwrap();
        assert_eq!(v.iterations, 4096);
        exchange("pw", &v).unwrap();
        assert!(Verifier::parse("SCRAM-SHA-256$0:AA==$AA==:AA==").is_none());
        assert!(Verifier::parse("md5abc").is_none());
    }

    #[test]
    fn rejects_channel_binding_and_garbage() {
        let v = Verifier::from_password("pw");
        assert_eq!(
            ServerExchange::start("p=tls-server-end-point,,n=,r=abc", &v).err(),
            Some(ScramError::ChannelBinding)
        );
        assert!(ServerExchange::start("x", &v).is_err());
        assert!(ServerExchange::start("n,,n=,r=", &v).is_err());
        let (s, _) = ServerExchange::start("n,,n=,r=abc", &v).unwrap();
        assert!(s.finish("c=biws,r=wrong,p=AAAA", &v).is_err());
    }
}
