//! The versioned messages of a takeover and the serialized form of what moves: a client's
//! session and a server connection's state. Bump [`STATE_VERSION`] whenever any of these
//! shapes changes; a process refuses a peer of another version and keeps serving. (An
//! optional field that a process without it may ignore, and that a process with it may miss,
//! needs no bump: unknown fields are ignored and missing ones default.)

use crate::peer::Peer;

use serde::{Deserialize, Serialize};

use crate::auth::{ClientKey, ScramKeys, Verifier};
use crate::session::state::Pins;

/// The version of everything in this module.
pub const STATE_VERSION: u32 = 1;

/// One message on the control connection.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Msg {
    /// From a new process (`--takeover`, SIGUSR2): hand me your sessions.
    Hello {
        version: u32,
        pid: u32,
        release: String,
    },
    /// From a process that is stopping (SIGTERM with a peer alive): take my sessions.
    Offer {
        version: u32,
        pid: u32,
        release: String,
    },
    /// The answer to an Offer from a peer that takes the sessions.
    Accept { version: u32, pid: u32 },
    /// The other process will not take part; the sender goes on as before.
    Refuse { reason: String },
    /// The giver's listening sockets, one descriptor each, in this order.
    Listeners { kinds: Vec<ListenerKind> },
    /// The taker accepts on the listeners now; the giver stops accepting.
    ListenersTaken,
    /// A client between transactions (descriptor: its socket), with its server connection
    /// when it is pinned to one or in session mode (second descriptor).
    Client {
        id: u64,
        client: Box<ClientRecord>,
        server: Option<Box<ServerRecord>>,
    },
    /// An idle server connection of the pool (database, user).
    Server {
        id: u64,
        database: String,
        user: String,
        server: Box<ServerRecord>,
    },
    /// The taker owns what message `id` carried; the giver closes its copies.
    Ack { id: u64 },
    /// The taker could not take it; the giver keeps serving it.
    Nack { id: u64, reason: String },
    /// A CancelRequest the taker received for a client the giver still serves.
    Cancel { pid: i32, key: i32 },
    /// The giver holds nothing more and exits.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListenerKind {
    Postgres,
    Http,
}

/// A logged-in client between transactions.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClientRecord {
    pub user: String,
    pub database: String,
    pub peer: Peer,
    /// Startup parameters other than user and database.
    pub params: Vec<(String, String)>,
    pub cancel_pid: i32,
    pub cancel_key: i32,
    pub session: SessionState,
    /// Bytes of the client's next message already read from its socket.
    #[serde(with = "b64")]
    pub pending_input: Vec<u8>,
    /// The keys its pool logs in upstream with when it has no password for the role (auth_query
    /// users, users configured with a verifier): the taker's pool has none until a client of
    /// the role logs in again, and may need to open connections before that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_keys: Option<UpstreamKeys>,
    /// An admin console session (`session` is empty).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
}

/// [`ScramKeys`]: a ClientKey and the verifier it was proved against.
#[derive(Serialize, Deserialize)]
pub struct UpstreamKeys {
    #[serde(with = "b64")]
    client_key: Vec<u8>,
    iterations: u32,
    #[serde(with = "b64")]
    salt: Vec<u8>,
    #[serde(with = "b64")]
    stored_key: Vec<u8>,
    #[serde(with = "b64")]
    server_key: Vec<u8>,
}

impl std::fmt::Debug for UpstreamKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamKeys(<redacted>)")
    }
}

impl From<&ScramKeys> for UpstreamKeys {
    fn from(k: &ScramKeys) -> Self {
        UpstreamKeys {
            client_key: k.client_key.0.to_vec(),
            iterations: k.verifier.iterations,
            salt: k.verifier.salt.clone(),
            stored_key: k.verifier.stored_key.to_vec(),
            server_key: k.verifier.server_key.to_vec(),
        }
    }
}

impl UpstreamKeys {
    /// The keys, or `None` if a key has the wrong length.
    pub fn into_keys(self) -> Option<ScramKeys> {
        Some(ScramKeys {
            client_key: ClientKey(self.client_key.try_into().ok()?),
            verifier: Verifier {
                iterations: self.iterations,
                salt: self.salt,
                stored_key: self.stored_key.try_into().ok()?,
                server_key: self.server_key.try_into().ok()?,
            },
        })
    }
}

/// What [`crate::session::state::ClientSession`] carries.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SessionState {
    pub startup: Vec<(String, String)>,
    pub settings: Vec<(String, String)>,
    /// Protocol-level prepared statements by the client's name.
    pub statements: Vec<(String, StatementState)>,
    pub pins: Pins,
}

/// A prepared statement, as a client's Parse defined it.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatementState {
    /// pgtether's id: server connections know it as `pgtether_<id>`.
    pub id: u64,
    #[serde(with = "b64")]
    pub query: Vec<u8>,
    #[serde(with = "b64")]
    pub param_types: Vec<u8>,
}

/// A server connection between transactions.
#[derive(Debug, Serialize, Deserialize)]
pub struct ServerRecord {
    /// Backend pid and cancel key, and where cancel requests go.
    pub pid: i32,
    pub key: i32,
    pub addr: crate::server::ServerAddr,
    /// ParameterStatus values from its login.
    pub params: Vec<(String, String)>,
    /// How long ago it was opened (for `server_lifetime`).
    pub age_ms: u64,
    pub settings: Vec<(String, String)>,
    /// Statements it has prepared, least recently used first.
    pub statements: Vec<StatementState>,
}

/// Byte strings as base64 (query text may be in any server encoding).
mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}
