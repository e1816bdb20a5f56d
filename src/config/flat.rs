//! The configuration as flat `key = value` pairs: what `SHOW CONFIG` lists and what a reload
//! compares to say which changes need a restart. A new top-level key belongs here too.

use std::time::Duration;

use super::{Config, LogFormat, OnPin, PoolSettings};

/// Keys a reload cannot change in a running process.
pub const RESTART_KEYS: &[&str] = &[
    "listen.addr",
    "listen.reuse_port",
    "listen.unix_socket_dir",
    "http.addr",
    "log.format",
    "log.level",
    "runtime.worker_threads",
    "runtime.scheduler",
];

fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn pool_entries(prefix: &str, p: &PoolSettings, out: &mut Vec<(String, String)>) {
    let mut put = |k: &str, v: String| out.push((format!("{prefix}.{k}"), v));
    put("mode", p.mode.as_str().to_string());
    put("size", p.size.to_string());
    put("min_idle", p.min_idle.to_string());
    put("acquire_timeout", duration(p.acquire_timeout));
    put("connect_timeout", duration(p.connect_timeout));
    put("server_idle_timeout", duration(p.server_idle_timeout));
    put("server_lifetime", duration(p.server_lifetime));
    put("server_check_delay", duration(p.server_check_delay));
    put(
        "max_prepared_statements",
        p.max_prepared_statements.to_string(),
    );
    put(
        "on_pin",
        match p.on_pin {
            OnPin::Pin => "pin",
            OnPin::Reject => "reject",
        }
        .to_string(),
    );
    put("track_session_state", p.track_session_state.to_string());
    put("prepare_unnamed", p.prepare_unnamed.to_string());
}

/// Every general key with its value (databases and users are listed by name only; no
/// password ever appears).
pub fn entries(c: &Config) -> Vec<(String, String)> {
    let mut out = vec![
        ("listen.addr".to_string(), c.listen.addr.to_string()),
        (
            "listen.max_clients".to_string(),
            c.listen.max_clients.to_string(),
        ),
        (
            "listen.reuse_port".to_string(),
            c.listen.reuse_port.to_string(),
        ),
        (
            "listen.unix_socket_dir".to_string(),
            c.listen
                .unix_socket_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
        ),
        (
            "http.addr".to_string(),
            c.http.addr.map(|a| a.to_string()).unwrap_or_default(),
        ),
    ];
    pool_entries("pool", &c.pool, &mut out);
    out.push((
        "auth.method".to_string(),
        c.auth.method.as_str().to_string(),
    ));
    out.push((
        "auth.user".to_string(),
        c.auth.user.clone().unwrap_or_default(),
    ));
    out.push((
        "auth.query".to_string(),
        match (&c.auth.user, &c.auth.query) {
            (_, Some(q)) => q.clone(),
            (Some(_), None) => super::DEFAULT_AUTH_QUERY.to_string(),
            (None, None) => String::new(),
        },
    ));
    out.push(("auth.cache_ttl".to_string(), duration(c.auth.cache_ttl)));
    out.push((
        "auth.negative_cache_ttl".to_string(),
        duration(c.auth.negative_cache_ttl),
    ));
    out.push((
        "limits.max_message_size".to_string(),
        c.limits.max_message_size.to_string(),
    ));
    out.push((
        "limits.startup_timeout".to_string(),
        duration(c.limits.startup_timeout),
    ));
    let l = &c.limits;
    for (key, value) in [
        ("max_clients_per_user", l.max_clients_per_user.to_string()),
        ("max_clients_per_addr", l.max_clients_per_addr.to_string()),
        (
            "auth_failures_before_backoff",
            l.auth_failures_before_backoff.to_string(),
        ),
        ("auth_failure_window", duration(l.auth_failure_window)),
        ("auth_backoff", duration(l.auth_backoff)),
        ("client_idle_timeout", duration(l.client_idle_timeout)),
        (
            "idle_transaction_timeout",
            duration(l.idle_transaction_timeout),
        ),
    ] {
        out.push((format!("limits.{key}"), value));
    }
    out.push((
        "log.format".to_string(),
        match c.log.format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
        .to_string(),
    ));
    out.push(("log.level".to_string(), c.log.level.clone()));
    out.push((
        "runtime.worker_threads".to_string(),
        c.runtime.worker_threads.to_string(),
    ));
    out.push((
        "runtime.scheduler".to_string(),
        c.runtime.scheduler.as_str().to_string(),
    ));
    out.push(("admin.users".to_string(), c.admin.users.join(",")));
    out.push((
        "databases".to_string(),
        c.databases.keys().cloned().collect::<Vec<_>>().join(","),
    ));
    out.push((
        "users".to_string(),
        c.users.keys().cloned().collect::<Vec<_>>().join(","),
    ));
    // One line per rule, in order: "database user address method".
    let rules: Vec<String> = c
        .hba
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {}",
                r.database,
                r.user,
                r.address,
                r.method.as_str()
            )
        })
        .collect();
    out.push(("hba".to_string(), rules.join("; ")));
    out
}

/// Keys whose value differs between `old` and `new` and that only a restart applies.
pub fn restart_needed(old: &Config, new: &Config) -> Vec<(String, String, String)> {
    let before = entries(old);
    let after = entries(new);
    let mut v: Vec<_> = before
        .into_iter()
        .zip(after)
        .filter(|((k, a), (_, b))| a != b && RESTART_KEYS.contains(&k.as_str()))
        .map(|((k, a), (_, b))| (k, a, b))
        .collect();
    if new.listen.max_clients < old.listen.max_clients {
        v.push((
            "listen.max_clients".to_string(),
            old.listen.max_clients.to_string(),
            new.listen.max_clients.to_string(),
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[databases.a]\nhost = \"h\"\n[users.u]\npassword = \"secret\"\n";

    #[test]
    fn entries_list_keys_without_passwords() {
        let c = Config::parse(BASE, "t").unwrap();
        let e = entries(&c);
        assert!(e.iter().any(|(k, v)| k == "pool.size" && v == "20"));
        assert!(e.iter().any(|(k, v)| k == "users" && v == "u"));
        assert!(!e.iter().any(|(_, v)| v.contains("secret")));
    }

    #[test]
    fn only_restart_keys_are_reported() {
        let old = Config::parse(BASE, "t").unwrap();
        let text = format!(
            "[listen]\naddr = \"127.0.0.1:7000\"\nmax_clients = 5\n[pool]\nsize = 3\n{BASE}"
        );
        let new = Config::parse(&text, "t").unwrap();
        let keys: Vec<_> = restart_needed(&old, &new)
            .into_iter()
            .map(|(k, _, _)| k)
            .collect();
        assert_eq!(keys, vec!["listen.addr", "listen.max_clients"]);
    }
}
