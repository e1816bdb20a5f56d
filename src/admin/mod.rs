//! The admin console: a virtual database (`pgtether`) that admin users reach with psql. It
//! speaks the simple query protocol only and answers PgBouncer-style commands.
//!
//! This file owns the console session (welcome, reading messages, refusing the extended
//! protocol) and the dispatch of a command to its module: one module per SHOW family
//! (`show_*.rs`), the control commands in [`control`], RELOAD in [`crate::reload`].

pub mod command;
pub mod control;
pub mod result;
mod show_clients;
mod show_config;
mod show_databases;
mod show_pools;
mod show_servers;
mod show_stats;
mod show_version;

use std::sync::Arc;

use crate::socket::Socket;
use bytes::BytesMut;
use tracing::{info, warn};

use crate::app::App;
use crate::cancel::CancelHandle;
use crate::clients::{Activity, ClientEntry, Kill, NewClient};
use crate::config::ADMIN_DATABASE;
use crate::peer::Peer;
use crate::protocol::backend::{self, Severity};
use crate::protocol::{frame, sqlstate};
use crate::session::{application_name, write_all, Login, SessionError};
use crate::takeover::state::{ClientRecord, SessionState};
use command::{Command, Show};
use result::ResultSet;

/// Longest message the console accepts; its commands are short.
const MAX_MESSAGE: usize = 64 * 1024;

/// What a command answers.
pub enum Reply {
    Rows(ResultSet),
    /// CommandComplete with `tag`, after NOTICEs.
    Done {
        tag: &'static str,
        notices: Vec<String>,
    },
    Error {
        code: &'static str,
        message: String,
    },
}

impl Reply {
    fn done(tag: &'static str) -> Reply {
        Reply::Done {
            tag,
            notices: Vec::new(),
        }
    }

    fn write(&self, out: &mut BytesMut) {
        match self {
            Reply::Rows(rs) => rs.write(out),
            Reply::Done { tag, notices } => {
                for n in notices {
                    backend::notice_response(out, "NOTICE", "00000", n);
                }
                backend::command_complete(out, tag);
            }
            Reply::Error { code, message } => {
                backend::error_response(out, Severity::Error, code, message, None)
            }
        }
    }
}

/// Runs one command.
pub async fn execute(app: &Arc<App>, command: Command) -> Reply {
    match command {
        Command::Show(what) => Reply::Rows(match what {
            Show::Pools => show_pools::run(app),
            Show::Clients => show_clients::run(app),
            Show::Servers => show_servers::run(app),
            Show::Stats => show_stats::run(app),
            Show::Databases => show_databases::run(app),
            Show::Config => show_config::run(app),
            Show::Version => show_version::run(),
        }),
        Command::Pause(db) => control::pause(app, db).await,
        Command::Resume(db) => control::resume(app, db),
        Command::Reconnect(db) => control::reconnect(app, db),
        Command::Kill(db) => control::kill(app, db),
        Command::Reload => match crate::reload::reload(app).await {
            Ok(done) => Reply::Done {
                tag: "RELOAD",
                notices: done.notices(),
            },
            Err(message) => Reply::Error {
                code: sqlstate::CONFIG_FILE_ERROR,
                message: format!(
                    "configuration not reloaded, the previous one stays in force: {message}"
                ),
            },
        },
        // Answered first; the process stops after the reply is sent.
        Command::Shutdown => Reply::done("SHUTDOWN"),
    }
}

/// Runs the commands of one Query message into `out`; returns whether SHUTDOWN was among
/// them. Stops at the first error, as a failed statement ends a simple Query.
async fn run_query(app: &Arc<App>, user: &str, text: &str, out: &mut BytesMut) -> bool {
    let commands = command::split(text);
    if commands.is_empty() {
        backend::empty_query_response(out);
        return false;
    }
    for text in commands {
        let command = match command::parse(text) {
            Ok(c) => c,
            Err(message) => {
                backend::error_response(
                    out,
                    Severity::Error,
                    sqlstate::SYNTAX_ERROR,
                    &message,
                    None,
                );
                return false;
            }
        };
        info!(%user, command = %text, "admin command");
        let shutdown = command == Command::Shutdown;
        let reply = execute(app, command).await;
        reply.write(out);
        if shutdown {
            return true;
        }
        if matches!(reply, Reply::Error { .. }) {
            return false;
        }
    }
    false
}

/// The ParameterStatus set a psql session expects.
fn welcome(out: &mut BytesMut, application_name: &str, pid: i32, key: i32) {
    backend::authentication_ok(out);
    let version = format!("16 (pgtether {})", env!("CARGO_PKG_VERSION"));
    for (name, value) in [
        ("server_version", version.as_str()),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", application_name),
    ] {
        backend::parameter_status(out, name, value);
    }
    backend::backend_key_data(out, pid, key);
    backend::ready_for_query(out, b'I');
}

/// Serves an admin console session after the login checks passed.
pub async fn serve(
    stream: &Socket,
    peer: Peer,
    app: &Arc<App>,
    login: Login,
) -> Result<(), SessionError> {
    let application_name = application_name(&login.params);
    let cancel = app.cancel.register();
    let entry = register(
        stream,
        peer,
        app,
        &login,
        application_name.clone(),
        cancel.pid,
    );
    info!(%peer, user = %login.user, "admin console login");

    let mut out = BytesMut::with_capacity(512);
    welcome(&mut out, &application_name, cancel.pid, cancel.key);
    write_all(stream, &out)
        .await
        .map_err(|_| SessionError::ClientGone)?;
    console(
        stream,
        app,
        &login,
        &entry,
        &cancel,
        BytesMut::with_capacity(1024),
    )
    .await
}

/// Serves a console session another pgtether process handed over (a takeover): no login and
/// no welcome, the same cancel key, and the bytes it had read of the next command. This
/// process's config decides whether the user may still use the console.
pub async fn serve_adopted(
    stream: &Socket,
    app: &Arc<App>,
    record: Box<ClientRecord>,
) -> Result<(), SessionError> {
    {
        let snapshot = app.current();
        if snapshot.config.admin.users.is_empty() {
            return Err(SessionError::AdminDisabled);
        }
        if !snapshot.config.admin.is_admin(&record.user) {
            return Err(SessionError::NotAdmin(record.user));
        }
    }
    let _admission = app.limits.adopt(record.peer.ip(), &record.user);
    let cancel = app
        .cancel
        .register_exact(record.cancel_pid, record.cancel_key);
    let login = Login {
        user: record.user,
        database: ADMIN_DATABASE.to_string(),
        params: record.params,
    };
    let application_name = application_name(&login.params);
    let entry = register(
        stream,
        record.peer,
        app,
        &login,
        application_name,
        cancel.pid,
    );
    let input = BytesMut::from(&record.pending_input[..]);
    console(stream, app, &login, &entry, &cancel, input).await
}

fn register(
    stream: &Socket,
    peer: Peer,
    app: &Arc<App>,
    login: &Login,
    application_name: String,
    cancel_pid: i32,
) -> ClientEntry {
    let entry = app.clients.register(NewClient {
        user: login.user.as_str().into(),
        database: ADMIN_DATABASE.into(),
        addr: peer,
        local_addr: stream.local_addr(),
        application_name,
        admin: true,
        cancel_pid,
    });
    entry.set_activity(Activity::Active);
    entry
}

/// The command loop of a console session.
async fn console(
    stream: &Socket,
    app: &Arc<App>,
    login: &Login,
    entry: &ClientEntry,
    cancel: &CancelHandle,
    mut input: BytesMut,
) -> Result<(), SessionError> {
    let mut out = BytesMut::with_capacity(512);
    // After an error in an extended-protocol exchange, messages are skipped until Sync.
    let mut skipping = false;
    loop {
        out.clear();
        let mut shutdown = false;
        while let Some((tag, total)) = frame::header(&input) {
            let total = total
                .map_err(|e| SessionError::Protocol(format!("invalid message length {}", e.0)))?;
            if total > MAX_MESSAGE {
                return Err(SessionError::Protocol(format!(
                    "admin console message of {total} bytes exceeds {MAX_MESSAGE} bytes"
                )));
            }
            if input.len() < total {
                break;
            }
            let message = input.split_to(total);
            let body = &message[frame::HEADER_LEN..];
            match tag {
                b'Q' => {
                    let text = String::from_utf8_lossy(body.strip_suffix(b"\0").unwrap_or(body));
                    shutdown |= run_query(app, &login.user, &text, &mut out).await;
                    backend::ready_for_query(&mut out, b'I');
                }
                b'X' => return Ok(()),
                b'S' => {
                    skipping = false;
                    backend::ready_for_query(&mut out, b'I');
                }
                b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => {
                    if !skipping {
                        skipping = true;
                        backend::error_response(
                            &mut out,
                            Severity::Error,
                            sqlstate::FEATURE_NOT_SUPPORTED,
                            "the admin console supports only the simple query protocol",
                            Some("Send commands as plain queries, e.g. psql's default mode; drivers' prepared statements are not supported here."),
                        );
                    }
                }
                b'F' => {
                    backend::error_response(
                        &mut out,
                        Severity::Error,
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the admin console supports only the simple query protocol",
                        None,
                    );
                    backend::ready_for_query(&mut out, b'I');
                }
                // COPY data with no COPY in progress, as PostgreSQL does: ignored.
                b'd' | b'c' | b'f' => {}
                other => {
                    return Err(SessionError::Protocol(format!(
                        "invalid frontend message type {:?}",
                        other as char
                    )))
                }
            }
        }
        if !out.is_empty() {
            write_all(stream, &out)
                .await
                .map_err(|_| SessionError::ClientGone)?;
        }
        if shutdown {
            warn!(user = %login.user, "SHUTDOWN requested from the admin console");
            control::shutdown(app.clone());
        }
        let readable = tokio::select! {
            biased;
            kill = entry.killed(Kill::HandOver) => {
                // A takeover moves the session between commands. TLS cannot move, and one
                // skipping to a Sync would lose that: they are told to reconnect.
                if kill != Kill::HandOver {
                    return Err(SessionError::Killed(kill));
                }
                if skipping || stream.is_tls() {
                    return Err(SessionError::Killed(Kill::ShutdownWhenIdle));
                }
                entry.info.cancel_hand_over();
                let record = Box::new(ClientRecord {
                    user: login.user.clone(),
                    database: ADMIN_DATABASE.to_string(),
                    peer: entry.info.addr,
                    params: login.params.clone(),
                    cancel_pid: cancel.pid,
                    cancel_key: cancel.key,
                    session: SessionState::default(),
                    pending_input: input.to_vec(),
                    upstream_keys: None,
                    admin: true,
                });
                if crate::session::send_to_taker(app, stream, record, None).await {
                    info!(user = %login.user, "admin console session handed over");
                    return Ok(());
                }
                continue;
            }
            r = stream.readable() => r,
        };
        if readable.is_err() {
            return Ok(());
        }
        if input.capacity() - input.len() < 1024 {
            input.reserve(4096);
        }
        match stream.try_read_buf(&mut input) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Ok(()),
        }
    }
}
