//! The startup phase of a client connection: SSL/GSS negotiation, the StartupMessage or a
//! CancelRequest, then the login checks (limits, access rules, database, user, password).

use std::sync::Arc;

use crate::socket::Socket;
use tokio::io::AsyncWriteExt;

use super::SessionError;
use crate::app::Snapshot;
use crate::auth::lookup::{Found, Lookups};
use crate::auth::{self, AuthError, ScramKeys, Secret};
use crate::config::{AuthMethod, ADMIN_DATABASE};
use crate::limits::{Admission, Limits};
use crate::peer::Peer;
use crate::protocol::startup::{read_packet, StartupPacket};
use crate::tls::ServerTls;

/// A client that passed authentication.
#[derive(Debug)]
pub struct Login {
    pub user: String,
    pub database: String,
    /// Startup parameters other than user and database, in the order sent.
    pub params: Vec<(String, String)>,
}

/// What a new connection asked for.
pub enum Hello {
    Login(Login),
    Cancel { pid: i32, key: i32 },
}

/// Reads startup packets until a StartupMessage or CancelRequest. An SSLRequest is answered
/// 'S' and the connection upgraded when `tls` has a certificate, else 'N'; GSS encryption is
/// refused ('N'). With `require`, a login without TLS is refused. The socket keeps the
/// channel binding data of the certificate its handshake used.
pub async fn negotiate(
    stream: &mut Socket,
    tls: Option<&ServerTls>,
    require: bool,
) -> Result<Hello, SessionError> {
    let mut negotiations = 0;
    loop {
        match read_packet(stream).await? {
            StartupPacket::Ssl if !stream.is_tls() && tls.is_some() => {
                stream
                    .write_all(b"S")
                    .await
                    .map_err(|_| SessionError::ClientGone)?;
                let tls = tls.expect("checked above");
                stream
                    .accept_tls(tls.config.clone(), tls.channel_binding.clone().ok())
                    .await
                    .map_err(SessionError::TlsHandshake)?;
            }
            StartupPacket::Ssl if stream.is_tls() => {
                return Err(SessionError::Protocol("SSLRequest inside TLS".into()))
            }
            StartupPacket::Ssl | StartupPacket::GssEnc if negotiations < 2 => {
                negotiations += 1;
                stream
                    .write_all(b"N")
                    .await
                    .map_err(|_| SessionError::ClientGone)?;
            }
            StartupPacket::Ssl | StartupPacket::GssEnc => {
                return Err(SessionError::Protocol(
                    "repeated encryption negotiation".into(),
                ))
            }
            StartupPacket::Cancel { pid, key } => return Ok(Hello::Cancel { pid, key }),
            StartupPacket::UnsupportedVersion { major, minor } => {
                return Err(SessionError::UnsupportedVersion { major, minor })
            }
            StartupPacket::Startup { .. } if require && !stream.is_tls() => {
                return Err(SessionError::TlsRequired)
            }
            StartupPacket::Startup { params } => return Ok(Hello::Login(split_params(params)?)),
        }
    }
}

fn split_params(params: Vec<(String, String)>) -> Result<Login, SessionError> {
    let mut user = None;
    let mut database = None;
    let mut rest = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "user" => user = Some(v),
            "database" => database = Some(v),
            _ => rest.push((k, v)),
        }
    }
    let user = user.filter(|u| !u.is_empty()).ok_or(SessionError::NoUser)?;
    let database = database
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    Ok(Login {
        user,
        database,
        params: rest,
    })
}

/// The login checks, cheapest and least revealing first: connections from the address
/// (`max_clients_per_addr`), the address's failed-login back-off, the `[[hba]]` rules, then
/// that the database and user exist and the client knows the password, and last the user's
/// connections (`max_clients_per_user`). No server connection is opened before this succeeds.
/// The admin console's database passes here; whether the user may use it is checked after
/// the password. The slots taken are recorded in `admission` and held by the caller.
///
/// A user not under `[users]` is looked up upstream when the database has an auth_query; one
/// the lookup does not find goes through the same exchange against a mock verifier and is
/// refused exactly like a wrong password. A SCRAM login returns the keys that let pgtether
/// log in upstream as the user without its password.
pub async fn authenticate(
    stream: &mut Socket,
    snapshot: &Snapshot,
    login: &Login,
    peer: Peer,
    limits: &Arc<Limits>,
    lookups: &Lookups,
    admission: &mut Admission,
) -> Result<Option<ScramKeys>, SessionError> {
    let config = &snapshot.config;
    limits.admit_addr(peer.ip(), &config.limits, admission)?;
    limits.check_backoff(peer.ip(), &config.limits)?;
    let method = crate::access::decide(
        &config.hba,
        config.auth.method,
        &login.database,
        &login.user,
        peer,
    )?;
    // Failed logins count against the address (Unix-socket clients have none).
    let peer = peer.ip();
    if !config.databases.contains_key(&login.database) && !is_admin_database(snapshot, login) {
        return Err(SessionError::UnknownDatabase(login.database.clone()));
    }
    let looked_up: Arc<Secret>;
    // Whether the user exists with password material the method can check; if not, the
    // exchange runs against a mock verifier and fails like a wrong password.
    let mut real = true;
    let secret = if config.users.contains_key(&login.user) {
        snapshot.secrets.get(&login.user)
    } else if config.auth_lookup(&login.database).is_some() && !is_admin_database(snapshot, login) {
        // Boxed: the lookup's future (a query upstream) is large, and only these logins need it.
        let lookup = Box::pin(lookups.lookup(snapshot, &login.database, &login.user));
        looked_up = match lookup.await {
            Ok(Found::User(secret)) => {
                let usable = match method {
                    AuthMethod::Trust => true,
                    AuthMethod::Md5 => secret.md5.is_some(),
                    AuthMethod::ScramSha256 => secret.scram.is_some(),
                };
                if usable {
                    secret
                } else {
                    real = false;
                    Arc::new(Secret::mock(&login.user, lookups.mock_key()))
                }
            }
            Ok(Found::NoUser) => {
                real = false;
                Arc::new(Secret::mock(&login.user, lookups.mock_key()))
            }
            Err(e) => {
                tracing::error!(user = %login.user, database = %login.database, error = %e,
                    "auth_query lookup failed; check the lookup role's password under [users], the query and the upstream");
                return Err(SessionError::LookupFailed(login.user.clone()));
            }
        };
        Some(&*looked_up)
    } else {
        // Guessing user names counts like guessing passwords.
        limits.record_auth(peer, false, &config.limits);
        return Err(SessionError::UnknownUser(login.user.clone()));
    };
    // SCRAM-SHA-256-PLUS is offered on TLS connections whose certificate has binding data.
    let channel_binding = stream.channel_binding();
    let client_key = match auth::authenticate(
        stream,
        method,
        &login.user,
        secret,
        channel_binding.as_deref(),
    )
    .await
    {
        Ok(_) | Err(AuthError::WrongPassword(_)) if !real => {
            limits.record_auth(peer, false, &config.limits);
            tracing::debug!(user = %login.user, database = %login.database,
                "no usable password for this user (auth_query); refused like a wrong password");
            return Err(SessionError::NoSuchUser(login.user.clone()));
        }
        Ok(key) => {
            limits.record_auth(peer, true, &config.limits);
            key
        }
        Err(e) => {
            if matches!(e, AuthError::WrongPassword(_)) {
                limits.record_auth(peer, false, &config.limits);
            }
            return Err(e.into());
        }
    };
    limits.admit_user(&login.user, &config.limits, admission)?;
    let keys = client_key.and_then(|client_key| {
        Some(ScramKeys {
            client_key,
            verifier: secret?.scram.clone()?,
        })
    });
    Ok(keys)
}

/// Whether the client asked for the admin console (a configured database of the same name
/// wins only while the console is disabled).
pub fn is_admin_database(snapshot: &Snapshot, login: &Login) -> bool {
    let config = &snapshot.config;
    login.database == ADMIN_DATABASE
        && (!config.admin.users.is_empty() || !config.databases.contains_key(ADMIN_DATABASE))
}
