//! The console's control commands: PAUSE, RESUME, RECONNECT, KILL and SHUTDOWN. They act
//! through the pause gate, the client registry's kill requests and the pools; nothing here
//! touches a client's socket directly.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::Reply;
use crate::app::App;
use crate::clients::Kill;
use crate::config::ADMIN_DATABASE;
use crate::pause::ResumeError;
use crate::protocol::sqlstate;

/// How long PAUSE waits for transactions in progress before it answers anyway.
pub const PAUSE_WAIT: Duration = Duration::from_secs(30);
/// How long SHUTDOWN lets transactions in progress finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

fn unknown_database(db: &str) -> Reply {
    Reply::Error {
        code: sqlstate::INVALID_CATALOG_NAME,
        message: format!("database \"{db}\" is not configured in pgtether"),
    }
}

/// Whether `db` names a configured database or one that still has pools.
fn known(app: &App, db: &str) -> bool {
    app.current().config.databases.contains_key(db)
        || app.pools.all().iter().any(|p| *p.database == *db)
}

/// PAUSE [db]: holds new transactions, then waits (up to [`PAUSE_WAIT`]) until no client of
/// the paused databases is in one.
pub async fn pause(app: &App, db: Option<String>) -> Reply {
    if let Some(db) = &db {
        if !known(app, db) {
            return unknown_database(db);
        }
    }
    app.pause.pause(db.as_deref());
    info!(
        database = db.as_deref().unwrap_or("(all)"),
        "PAUSE: new transactions are held"
    );
    let started = Instant::now();
    loop {
        let busy = app
            .clients
            .list()
            .iter()
            .filter(|c| !c.admin && db.as_ref().is_none_or(|d| **d == *c.database))
            .filter(|c| c.in_transaction())
            .count();
        if busy == 0 {
            return Reply::done("PAUSE");
        }
        if started.elapsed() >= PAUSE_WAIT {
            let message = format!(
                "{busy} client(s) still in a transaction after {}s; new transactions stay held until RESUME",
                PAUSE_WAIT.as_secs()
            );
            warn!("PAUSE: {message}");
            return Reply::Done {
                tag: "PAUSE",
                notices: vec![message],
            };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// RESUME [db]: lets held transactions go on.
pub fn resume(app: &App, db: Option<String>) -> Reply {
    match app.pause.resume(db.as_deref()) {
        Ok(()) => {
            info!(database = db.as_deref().unwrap_or("(all)"), "RESUME");
            Reply::done("RESUME")
        }
        Err(
            e @ (ResumeError::NotPaused(_) | ResumeError::AllPaused | ResumeError::NothingPaused),
        ) => Reply::Error {
            code: sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
            message: e.to_string(),
        },
    }
}

/// RECONNECT [db]: closes idle server connections now and the others when released.
pub fn reconnect(app: &App, db: Option<String>) -> Reply {
    if let Some(db) = &db {
        if !known(app, db) {
            return unknown_database(db);
        }
    }
    let mut closed = 0;
    for pool in app.pools.all() {
        if db.as_ref().is_none_or(|d| **d == *pool.database) {
            closed += pool.reconnect();
        }
    }
    info!(
        database = db.as_deref().unwrap_or("(all)"),
        closed, "RECONNECT: server connections will be replaced"
    );
    Reply::Done {
        tag: "RECONNECT",
        notices: vec![format!(
            "{closed} idle server connection(s) closed; connections in use close when released"
        )],
    }
}

/// KILL db: disconnects the database's clients now (FATAL 57P01) and closes its server
/// connections.
pub fn kill(app: &App, db: String) -> Reply {
    if db == ADMIN_DATABASE {
        return Reply::Error {
            code: sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
            message: "KILL does not apply to the admin console".to_string(),
        };
    }
    if !known(app, &db) {
        return unknown_database(&db);
    }
    let killed = app
        .clients
        .kill_where(Kill::Terminate, |c| !c.admin && *c.database == *db);
    for pool in app.pools.all() {
        if *pool.database == *db {
            pool.reconnect();
        }
    }
    warn!(database = %db, clients = killed, "KILL: clients disconnected");
    Reply::Done {
        tag: "KILL",
        notices: vec![format!(
            "{killed} client(s) of database \"{db}\" disconnected"
        )],
    }
}

/// SHUTDOWN: stops the process gracefully in the background (see [`drain_and_exit`]).
pub fn shutdown(app: Arc<App>) {
    tokio::spawn(drain_and_exit(app, SHUTDOWN_GRACE));
}

/// Refuses new clients (57P01) and reports not ready, closes idle clients with 57P01, lets
/// transactions in progress finish within `grace`, closes whoever is left, and exits with
/// status 0.
pub async fn drain_and_exit(app: Arc<App>, grace: Duration) {
    app.shutting_down.store(true, Ordering::SeqCst);
    app.accept.send_replace(crate::app::Accept::Closed);
    // The client listeners close (their accept loops and this list held them); HTTP goes on
    // answering /readyz with 503 until the process exits.
    app.listeners
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|(kind, _)| *kind == crate::takeover::state::ListenerKind::Http);
    info!(grace = ?grace, "shutting down: closing idle clients, letting transactions finish");
    app.clients.kill_where(Kill::ShutdownWhenIdle, |_| true);
    let started = Instant::now();
    while !app.clients.is_empty() && started.elapsed() < grace {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !app.clients.is_empty() {
        warn!(
            clients = app.clients.len(),
            "shutdown grace period over; closing the remaining clients"
        );
        app.clients.kill_where(Kill::ShutdownNow, |_| true);
        let started = Instant::now();
        while !app.clients.is_empty() && started.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    info!("pgtether stopped");
    std::process::exit(0);
}
