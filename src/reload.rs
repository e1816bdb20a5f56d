//! Reloading the configuration without a restart: the RELOAD command and SIGHUP read the
//! file again (with `${VAR}` substitution and the `PGTETHER_*` overrides) and put it in force.
//!
//! A file with an error is refused whole: the error (naming the key) is logged and the old
//! configuration stays. Otherwise new logins see the new databases, users, passwords, auth
//! method, limits and admin users; existing pools take their new size and timeouts in place
//! (see [`crate::pool::Pool::apply`]); connected clients keep their connections. Settings
//! only a restart can change keep their old value, and the log says so.

use std::path::PathBuf;
use std::sync::Arc;

use tracing::{error, info, warn};

use crate::app::{App, Snapshot};
use crate::config::flat::restart_needed;
use crate::config::Config;

/// What a successful reload did.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Changes put in force, one line each.
    pub changes: Vec<String>,
    /// `key: old -> new` for changes that need a restart (not in force).
    pub restart_needed: Vec<String>,
}

impl Reloaded {
    /// The lines the admin console sends as NOTICEs.
    pub fn notices(&self) -> Vec<String> {
        let mut v = self.changes.clone();
        v.extend(
            self.restart_needed
                .iter()
                .map(|r| format!("{r} needs a restart; the old value stays in force")),
        );
        v
    }
}

/// Remembers the config file and reloads on SIGHUP. Call once, inside the runtime.
pub fn install(app: &Arc<App>, path: PathBuf) {
    let _ = app.config_path.set(path);
    let app = app.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot handle SIGHUP; reload with the admin console's RELOAD");
                return;
            }
        };
        while hup.recv().await.is_some() {
            info!("SIGHUP received, reloading the configuration");
            let _ = reload(&app).await;
        }
    });
}

/// Reads the config file again and puts it in force. `Err` is the reason it was refused.
pub async fn reload(app: &Arc<App>) -> Result<Reloaded, String> {
    let _one_at_a_time = app.reload_lock.lock().await;
    let Some(path) = app.config_path.get().cloned() else {
        let message = "this process has no configuration file to reload".to_string();
        error!("configuration reload refused: {message}");
        return Err(message);
    };
    let old = app.current();
    // Reading the file and deriving SCRAM verifiers take a while: off the async threads.
    let prepared = tokio::task::spawn_blocking({
        let old = old.clone();
        move || {
            let new = Config::load(&path).map_err(|e| e.to_string())?;
            Ok::<_, String>(prepare(&old, new))
        }
    })
    .await
    .map_err(|e| format!("reload task failed: {e}"))
    .and_then(|r| r);
    let (snapshot, mut done) = match prepared {
        Ok(p) => p,
        Err(message) => {
            error!(error = %message, "configuration reload refused; the previous configuration stays in force");
            return Err(message);
        }
    };
    let snapshot = Arc::new(snapshot);
    let more_clients = snapshot
        .config
        .listen
        .max_clients
        .saturating_sub(old.config.listen.max_clients);
    if more_clients > 0 {
        app.client_slots.add_permits(more_clients);
        done.changes.push(format!(
            "listen.max_clients {} -> {}",
            old.config.listen.max_clients, snapshot.config.listen.max_clients
        ));
    }
    app.install(snapshot.clone());
    // Looked-up passwords are asked for again under the new auth_query settings.
    app.lookups.reset();
    done.changes.extend(app.pools.reconfigure(snapshot));
    for change in &done.changes {
        info!("reload: {change}");
    }
    for r in &done.restart_needed {
        warn!("reload: {r} needs a restart; the old value stays in force");
    }
    info!(
        changes = done.changes.len(),
        restart_needed = done.restart_needed.len(),
        "configuration reloaded"
    );
    Ok(done)
}

/// Builds the snapshot to install: `new`, except that settings only a restart can change
/// keep their running values (so SHOW CONFIG shows what is in force).
fn prepare(old: &Snapshot, mut new: Config) -> (Snapshot, Reloaded) {
    let mut done = Reloaded::default();
    for (key, before, after) in restart_needed(&old.config, &new) {
        done.restart_needed
            .push(format!("{key}: {before} -> {after}"));
    }
    new.listen.addr = old.config.listen.addr;
    new.listen.reuse_port = old.config.listen.reuse_port;
    new.listen.unix_socket_dir = old.config.listen.unix_socket_dir.clone();
    new.http.addr = old.config.http.addr;
    new.log = old.config.log.clone();
    new.runtime = old.config.runtime.clone();
    new.listen.max_clients = new.listen.max_clients.max(old.config.listen.max_clients);
    let (o, n) = (&old.config, &new);
    for db in n.databases.keys().filter(|d| !o.databases.contains_key(*d)) {
        done.changes.push(format!("database {db} added"));
    }
    for db in o.databases.keys().filter(|d| !n.databases.contains_key(*d)) {
        done.changes.push(format!(
            "database {db} removed (its connected clients stay until they disconnect)"
        ));
    }
    for user in n.users.keys().filter(|u| !o.users.contains_key(*u)) {
        done.changes.push(format!("user {user} added"));
    }
    for user in o.users.keys().filter(|u| !n.users.contains_key(*u)) {
        done.changes.push(format!("user {user} removed"));
    }
    for (user, u) in &n.users {
        if o.users
            .get(user)
            .is_some_and(|old| old.password != u.password)
        {
            done.changes.push(format!("user {user}: password changed"));
        }
    }
    if o.admin.users != n.admin.users {
        done.changes.push(format!(
            "admin.users [{}] -> [{}]",
            o.admin.users.join(","),
            n.admin.users.join(",")
        ));
    }
    let snapshot = Snapshot::new(new, Some(old));
    (snapshot, done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(text: &str) -> Snapshot {
        Snapshot::new(Config::parse(text, "t").unwrap(), None)
    }

    #[test]
    fn restart_settings_keep_their_running_values() {
        let old = snapshot("[databases.a]\nhost = \"h\"\n[users.u]\npassword = \"p\"\n");
        let new = Config::parse(
            "[listen]\naddr = \"127.0.0.1:1\"\n[databases.b]\nhost = \"h\"\n[users.u]\npassword = \"q\"\n",
            "t",
        )
        .unwrap();
        let (s, done) = prepare(&old, new);
        assert_eq!(s.config.listen.addr, old.config.listen.addr);
        assert_eq!(done.restart_needed.len(), 1, "{done:?}");
        assert!(done.restart_needed[0].starts_with("listen.addr"));
        let text = done.changes.join("\n");
        assert!(text.contains("database b added"), "{text}");
        assert!(text.contains("database a removed"), "{text}");
        assert!(text.contains("user u: password changed"), "{text}");
        assert_eq!(s.plain_password("u"), Some("q"));
    }
}
