//! The server side of SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (RFC 5802/7677, channel binding
//! type `tls-server-end-point` of RFC 5929) as PostgreSQL speaks it, including its checks of
//! the GS2 header and the `c=` attribute. postgres-protocol implements only the client side;
//! its verifier builder is reused.
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

/// The only channel binding type pgtether (like PostgreSQL) supports.
pub const TLS_SERVER_END_POINT: &str = "tls-server-end-point";

/// Why a SCRAM exchange failed. The messages follow PostgreSQL's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("malformed SCRAM message: the client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel binding data")]
    BindingMissing,
    #[error("malformed SCRAM message: the client selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes channel binding data")]
    BindingUnexpected,
    #[error(
        "unsupported SCRAM channel-binding type {0:?}: pgtether supports only tls-server-end-point"
    )]
    UnsupportedBindingType(String),
    /// GS2 flag `y` although SCRAM-SHA-256-PLUS was offered: something between the client
    /// and pgtether removed the PLUS mechanism from the list (RFC 5802 §6).
    #[error("SCRAM channel binding negotiation error: the client supports channel binding but thinks the server does not, yet pgtether offered SCRAM-SHA-256-PLUS on this connection")]
    Downgrade,
    /// The client's `c=` does not carry the certificate pgtether presented: the client's TLS
    /// session ends somewhere else (an intercepting proxy).
    #[error("SCRAM channel binding check failed: the client's channel binding data does not match the certificate pgtether presented")]
    BindingMismatch,
    #[error("password authentication failed")]
    WrongPassword,
}

/// Channel binding on the connection an exchange runs over, as the mechanisms offered and
/// the one the client selected make it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding<'a> {
    /// Only SCRAM-SHA-256 was offered (plaintext, or a certificate without binding data).
    NotOffered,
    /// SCRAM-SHA-256-PLUS was offered but the client selected SCRAM-SHA-256.
    Declined,
    /// The client selected SCRAM-SHA-256-PLUS; the connection's `tls-server-end-point` data.
    Selected(&'a [u8]),
}

/// One server-side exchange: created from the client-first message, finished with the
/// client-final message.
pub struct ServerExchange {
    client_first_bare: String,
    server_first: String,
    /// What the client's `c=` must be: base64 of the GS2 header, followed by the channel
    /// binding data when SCRAM-SHA-256-PLUS was selected.
    expected_channel: String,
    plus: bool,
    nonce: String,
}

impl ServerExchange {
    /// Reads client-first-message and returns the exchange plus server-first-message.
    pub fn start(
        client_first: &str,
        verifier: &Verifier,
        binding: Binding<'_>,
    ) -> Result<(ServerExchange, String), ScramError> {
        let (gs2_header, bare) = check_gs2(client_first, binding)?;
        let mut channel_input = gs2_header.as_bytes().to_vec();
        if let Binding::Selected(data) = binding {
            channel_input.extend_from_slice(data);
        }
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
                expected_channel: B64.encode(channel_input),
                plus: matches!(binding, Binding::Selected(_)),
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
        // Compared in base64, as PostgreSQL does: one encoding is valid. Checked before the
        // proof, so a man in the middle learns nothing about the password.
        let channel = channel.ok_or(ScramError::Malformed("missing channel binding"))?;
        if channel != self.expected_channel {
            return Err(if self.plus {
                ScramError::BindingMismatch
            } else {
                ScramError::Malformed(
                    "unexpected SCRAM channel-binding attribute in client-final-message",
                )
            });
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

/// Checks the GS2 header's channel binding flag against the mechanism and what was offered,
/// as PostgreSQL does, and splits the header (`n,,`, `y,,` or `p=tls-server-end-point,,`)
/// from client-first-message-bare.
fn check_gs2<'m>(
    client_first: &'m str,
    binding: Binding<'_>,
) -> Result<(&'m str, &'m str), ScramError> {
    // gs2-header = cb-flag "," [authzid] ","
    let first = client_first
        .find(',')
        .ok_or(ScramError::Malformed("GS2 header"))?;
    let flag = &client_first[..first];
    match (flag, binding) {
        // The client does not support channel binding, or chose not to use it.
        ("n", Binding::Selected(_)) => return Err(ScramError::BindingMissing),
        ("n", _) => {}
        // The client supports channel binding and believes the server does not.
        ("y", Binding::Selected(_)) => return Err(ScramError::BindingMissing),
        ("y", Binding::Declined) => return Err(ScramError::Downgrade),
        ("y", Binding::NotOffered) => {}
        (p, Binding::Selected(_)) if p.starts_with("p=") => {
            if &p[2..] != TLS_SERVER_END_POINT {
                // Echoed to the client and the log: printable and short only.
                let name = p[2..]
                    .chars()
                    .take(64)
                    .map(|c| if c.is_ascii_graphic() { c } else { '?' })
                    .collect();
                return Err(ScramError::UnsupportedBindingType(name));
            }
        }
        (p, _) if p.starts_with("p=") => return Err(ScramError::BindingUnexpected),
        _ => return Err(ScramError::Malformed("unexpected channel-binding flag")),
    }
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
        let (server, server_first) = ServerExchange::start(&first, verifier, Binding::NotOffered)?;
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
        let (server, server_first) =
            ServerExchange::start(&first, &v, Binding::NotOffered).unwrap();
        client.update(server_first.as_bytes()).unwrap();
        let client_final = std::str::from_utf8(client.message()).unwrap().to_string();
        let (_, client_key) = server.finish(&client_final, &v).unwrap();

        let keys = ScramKeys {
            client_key,
            verifier: v.clone(),
        };
        let mut ours = KeyClient::new(keys.clone());
        let first = std::str::from_utf8(ours.message()).unwrap().to_string();
        let (server, server_first) =
            ServerExchange::start(&first, &v, Binding::NotOffered).unwrap();
        ours.update(server_first.as_bytes()).unwrap();
        let client_final = std::str::from_utf8(ours.message()).unwrap().to_string();
        let (server_final, _) = server.finish(&client_final, &v).unwrap();
        ours.finish(server_final.as_bytes()).unwrap();

        // Another verifier of the same password has another salt: refused before any proof.
        let other = Verifier::from_password("s3cret");
        let mut ours = KeyClient::new(keys.clone());
        let first = std::str::from_utf8(ours.message()).unwrap().to_string();
        let (_, server_first) = ServerExchange::start(&first, &other, Binding::NotOffered).unwrap();
        assert_eq!(
            ours.update(server_first.as_bytes()),
            Err(KeyClientError::OtherVerifier)
        );
        // A forged server signature is refused.
        let mut ours = KeyClient::new(keys);
        let first = std::str::from_utf8(ours.message()).unwrap().to_string();
        let (_, server_first) = ServerExchange::start(&first, &v, Binding::NotOffered).unwrap();
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
    fn rejects_garbage() {
        let v = Verifier::from_password("pw");
        let none = Binding::NotOffered;
        assert!(ServerExchange::start("x", &v, none).is_err());
        assert!(ServerExchange::start("n,,n=,r=", &v, none).is_err());
        let (s, _) = ServerExchange::start("n,,n=,r=abc", &v, none).unwrap();
        assert!(s.finish("c=biws,r=wrong,p=AAAA", &v).is_err());
    }

    /// A full exchange with postgres-protocol's client set up with `client_binding`, against
    /// our server side told `server_binding`.
    fn exchange_with_binding(
        client_binding: ChannelBinding,
        server_binding: Binding<'_>,
    ) -> Result<(), ScramError> {
        let v = Verifier::from_password("pw");
        let mut client = ScramSha256::new(b"pw", client_binding);
        let first = std::str::from_utf8(client.message()).unwrap().to_string();
        let (server, server_first) = ServerExchange::start(&first, &v, server_binding)?;
        client.update(server_first.as_bytes()).unwrap();
        let client_final = std::str::from_utf8(client.message()).unwrap().to_string();
        let (server_final, _) = server.finish(&client_final, &v)?;
        client.finish(server_final.as_bytes()).unwrap();
        Ok(())
    }

    #[test]
    fn plus_checks_the_binding_data() {
        let data = [7u8; 32];
        let cb = || ChannelBinding::tls_server_end_point(data.to_vec());
        exchange_with_binding(cb(), Binding::Selected(&data)).unwrap();
        // The client saw another certificate (a proxy terminating its TLS).
        assert_eq!(
            exchange_with_binding(cb(), Binding::Selected(&[8u8; 32])),
            Err(ScramError::BindingMismatch)
        );
        // p= when only SCRAM-SHA-256 was selected or offered.
        for server in [Binding::Declined, Binding::NotOffered] {
            assert_eq!(
                exchange_with_binding(cb(), server),
                Err(ScramError::BindingUnexpected)
            );
        }
    }

    #[test]
    fn gs2_flags_are_checked_as_postgres_does() {
        let data = [7u8; 32];
        let plus = Binding::Selected(&data);
        // 'n': fine without PLUS, offered or not.
        exchange_with_binding(ChannelBinding::unsupported(), Binding::NotOffered).unwrap();
        exchange_with_binding(ChannelBinding::unsupported(), Binding::Declined).unwrap();
        // 'y' (client supports binding, believes the server does not): fine only when PLUS
        // was really not offered; otherwise the list was tampered with.
        exchange_with_binding(ChannelBinding::unrequested(), Binding::NotOffered).unwrap();
        assert_eq!(
            exchange_with_binding(ChannelBinding::unrequested(), Binding::Declined),
            Err(ScramError::Downgrade)
        );
        // PLUS selected but no binding data in the header.
        for first in ["n,,n=,r=abc", "y,,n=,r=abc"] {
            let v = Verifier::from_password("pw");
            assert_eq!(
                ServerExchange::start(first, &v, plus).err(),
                Some(ScramError::BindingMissing)
            );
        }
        let v = Verifier::from_password("pw");
        assert_eq!(
            ServerExchange::start("p=tls-unique,,n=,r=abc", &v, plus).err(),
            Some(ScramError::UnsupportedBindingType("tls-unique".into()))
        );
        assert_eq!(
            ServerExchange::start("q,,n=,r=abc", &v, plus).err(),
            Some(ScramError::Malformed("unexpected channel-binding flag"))
        );
        // c= must repeat the header's flag: "y,," (eSws) after "n,," is refused.
        let (s, _) = ServerExchange::start("n,,n=,r=abc", &v, Binding::Declined).unwrap();
        assert!(matches!(
            s.finish("c=eSws,r=abc,p=AAAA", &v),
            Err(ScramError::Malformed(_))
        ));
        // With PLUS, c= without the binding data is a failed check.
        let (s, _) = ServerExchange::start("p=tls-server-end-point,,n=,r=abc", &v, plus).unwrap();
        assert_eq!(
            s.finish(
                &format!("c={},r=abc,p=AAAA", B64.encode("p=tls-server-end-point,,")),
                &v
            )
            .err(),
            Some(ScramError::BindingMismatch)
        );
    }
}
