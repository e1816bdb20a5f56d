//! The server side of SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL speaks it, without channel
//! binding. postgres-protocol implements only the client side; its verifier builder is reused.
//!
//! Also [`KeyClient`]: the client side for a user whose plain password pgtether never sees
//! (auth_query). A client's successful exchange reveals its ClientKey (proof XOR signature);
//! with that key and the verifier, pgtether can prove itself to an upstream that stores the
//! same verifier, as PgBouncer does.

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

    /// Checks client-final-message; on success returns server-final-message and the client's
    /// ClientKey (what lets pgtether log in upstream for this user without the password).
    pub fn finish(
        self,
        client_final: &str,
        verifier: &Verifier,
    ) -> Result<(String, ClientKey), ScramError> {
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
        Ok((
            format!("v={}", B64.encode(server_signature)),
            ClientKey(client_key),
        ))
    }
}

/// A user's SCRAM ClientKey (H(ClientKey) is the verifier's StoredKey). As good as the
/// password for logging in wherever that verifier is stored; never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientKey(pub [u8; 32]);

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKey(<redacted>)")
    }
}

/// What logs a user in upstream with SCRAM without its password: the ClientKey a client
/// proved, and the verifier it was proved against (its salt and iteration count must be the
/// upstream's, which holds when the verifier came from the upstream's pg_authid).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ScramKeys {
    pub client_key: ClientKey,
    pub verifier: Verifier,
}

/// The client side of SCRAM-SHA-256 from [`ScramKeys`] instead of a password, used like
/// postgres-protocol's `ScramSha256`: `message()` to send, `update()` with server-first,
/// `finish()` with server-final.
pub struct KeyClient {
    keys: ScramKeys,
    client_first_bare: String,
    nonce: String,
    message: String,
    auth_message: String,
}

impl KeyClient {
    pub fn new(keys: ScramKeys) -> KeyClient {
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = B64.encode(raw);
        // PostgreSQL takes the user from the startup packet and ignores SCRAM's.
        let client_first_bare = format!("n=,r={nonce}");
        KeyClient {
            keys,
            message: format!("n,,{client_first_bare}"),
            client_first_bare,
            nonce,
            auth_message: String::new(),
        }
    }

    /// The message to send next.
    pub fn message(&self) -> &[u8] {
        self.message.as_bytes()
    }

    /// Reads server-first-message and prepares client-final-message.
    pub fn update(&mut self, server_first: &[u8]) -> Result<(), KeyClientError> {
        let text = std::str::from_utf8(server_first)
            .map_err(|_| KeyClientError::Malformed("server-first is not UTF-8"))?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for attr in text.split(',') {
            if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            } else if let Some(v) = attr.strip_prefix("s=") {
                salt = Some(v);
            } else if let Some(v) = attr.strip_prefix("i=") {
                iterations = Some(v);
            }
        }
        let nonce = nonce
            .filter(|n| n.starts_with(&self.nonce) && n.len() > self.nonce.len())
            .ok_or(KeyClientError::Malformed("server nonce"))?;
        let salt = salt
            .and_then(|s| B64.decode(s).ok())
            .ok_or(KeyClientError::Malformed("salt"))?;
        let iterations: u32 = iterations
            .and_then(|i| i.parse().ok())
            .ok_or(KeyClientError::Malformed("iteration count"))?;
        if salt != self.keys.verifier.salt || iterations != self.keys.verifier.iterations {
            return Err(KeyClientError::OtherVerifier);
        }
        let without_proof = format!("c=biws,r={nonce}");
        self.auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let signature = hmac(&self.keys.verifier.stored_key, self.auth_message.as_bytes());
        let mut proof = [0u8; 32];
        for (i, p) in proof.iter_mut().enumerate() {
            *p = self.keys.client_key.0[i] ^ signature[i];
        }
        self.message = format!("{without_proof},p={}", B64.encode(proof));
        Ok(())
    }

    /// Checks server-final-message: the server must prove it knows the ServerKey.
    pub fn finish(self, server_final: &[u8]) -> Result<(), KeyClientError> {
        let text = std::str::from_utf8(server_final)
            .map_err(|_| KeyClientError::Malformed("server-final is not UTF-8"))?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(KeyClientError::Server(e.to_string()));
        }
        let given = text
            .strip_prefix("v=")
            .and_then(|v| B64.decode(v).ok())
            .ok_or(KeyClientError::Malformed("server signature"))?;
        let expected = hmac(&self.keys.verifier.server_key, self.auth_message.as_bytes());
        if constant_time_eq(&given, &expected) {
            Ok(())
        } else {
            Err(KeyClientError::BadServerSignature)
        }
    }
}

/// Why a [`KeyClient`] exchange failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyClientError {
    #[error("malformed SCRAM message from the server: {0}")]
    Malformed(&'static str),
    #[error("the server's SCRAM salt or iteration count differs from the verifier the client logged in with (the password changed?); the client's next login picks up the new one")]
    OtherVerifier,
    #[error("the server refused the SCRAM exchange: {0}")]
    Server(String),
    #[error("the server's SCRAM signature is wrong")]
    BadServerSignature,
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
        let (server_final, _) = server.finish(&client_final, verifier)?;
        client
            .finish(server_final.as_bytes())
            .expect("client accepts server signature");
        Ok(())
    }

    /// A client logs in with its password; its ClientKey then logs pgtether in against the
    /// same verifier.
    #[test]
    fn client_key_logs_in_like_the_password() {
        let v = Verifier::from_password("s3cret");
        let mut client = ScramSha256::new(b"s3cret", ChannelBinding::unsupported());
        let first = std::str::from_utf8(client.message()).unwrap().to_string();
        let (server, server_first) = ServerExchange::start(&first, &v).unwrap();
        client.update(server_first.as_bytes()).unwrap();
        let client_final = std::str::from_utf8(client.message()).unwrap().to_string();
        let (_, client_key) = server.finish(&client_final, &v).unwrap();

        let keys = ScramKeys {
            client_key,
            verifier: v.clone(),
        };
        let mut ours = KeyClient::new(keys.clone());
        let first = std::str::from_utf8(ours.message()).unwrap().to_string();
        let (server, server_first) = ServerExchange::start(&first, &v).unwrap();
        ours.update(server_first.as_bytes()).unwrap();
        let client_final = std::str::from_utf8(ours.message()).unwrap().to_string();
        let (server_final, _) = server.finish(&client_final, &v).unwrap();
        ours.finish(server_final.as_bytes()).unwrap();

        // Another verifier of the same password has another salt: refused before any proof.
        let other = Verifier::from_password("s3cret");
        let mut ours = KeyClient::new(keys.clone());
        let first = std::str::from_utf8(ours.message()).unwrap().to_string();
        let (_, server_first) = ServerExchange::start(&first, &other).unwrap();
        assert_eq!(
            ours.update(server_first.as_bytes()),
            Err(KeyClientError::OtherVerifier)
        );
        // A forged server signature is refused.
        let mut ours = KeyClient::new(keys);
        let first = std::str::from_utf8(ours.message()).unwrap().to_string();
        let (_, server_first) = ServerExchange::start(&first, &v).unwrap();
        ours.update(server_first.as_bytes()).unwrap();
        assert_eq!(
            ours.finish(format!("v={}", B64.encode([0u8; 32])).as_bytes()),
            Err(KeyClientError::BadServerSignature)
        );
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
