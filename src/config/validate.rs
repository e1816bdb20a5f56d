//! Validation of a parsed configuration: the checks serde cannot express (ranges, cross-key
//! rules, auth_query roles), each error naming the key at fault.

use super::{AuthMethod, Config, ConfigError, PoolSettings, ADMIN_DATABASE};
use crate::tls::{ClientTls, SslMode};

impl Config {
    pub(super) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: String, message: &str| ConfigError::Invalid {
            path: origin.to_string(),
            key,
            message: message.to_string(),
        };
        if self.listen.max_clients == 0 {
            return Err(invalid("listen.max_clients".into(), "must be at least 1"));
        }
        if self.limits.max_message_size < 1024 {
            return Err(invalid(
                "limits.max_message_size".into(),
                "must be at least 1024 bytes",
            ));
        }
        if self.databases.is_empty() {
            return Err(invalid(
                "databases".into(),
                "no database is configured; add a [databases.NAME] table",
            ));
        }
        check_pool(&self.pool, "pool").map_err(|(k, m)| invalid(k, m))?;
        for (name, db) in &self.databases {
            if db.host.is_empty() {
                return Err(invalid(
                    format!("databases.{name}.host"),
                    "must not be empty",
                ));
            }
            if db.password.is_some() && db.user.is_none() {
                return Err(invalid(
                    format!("databases.{name}.password"),
                    "is only used together with `user`; add `user` or remove `password`",
                ));
            }
            let settings = self.pool_settings(name);
            check_pool(&settings, &format!("databases.{name}.pool"))
                .map_err(|(k, m)| invalid(k, m))?;
            let verify = matches!(db.sslmode, SslMode::VerifyCa | SslMode::VerifyFull);
            if verify && db.sslrootcert.is_none() {
                return Err(invalid(
                    format!("databases.{name}.sslrootcert"),
                    "is needed for sslmode verify-ca and verify-full: the CA certificates (PEM) the server's certificate must chain to",
                ));
            }
            if let Err(e) = crate::tls::client_config(db.sslmode, db.sslrootcert.as_deref()) {
                return Err(invalid(
                    format!("databases.{name}.sslrootcert"),
                    &e.to_string(),
                ));
            }
        }
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(cert), Some(key)) => {
                if let Err(e) = crate::tls::server_config(cert, key) {
                    return Err(invalid("tls.cert_file".into(), &e.to_string()));
                }
            }
            (Some(_), None) => {
                return Err(invalid(
                    "tls.key_file".into(),
                    "is needed with tls.cert_file: the certificate's private key (PEM)",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls.cert_file".into(),
                    "is needed with tls.key_file: the certificate chain (PEM)",
                ))
            }
            (None, None) if self.tls.client_mode == ClientTls::Require => {
                return Err(invalid(
                    "tls.client_mode".into(),
                    "\"require\" needs tls.cert_file and tls.key_file",
                ))
            }
            (None, None) => {}
        }
        for (i, name) in self.admin.users.iter().enumerate() {
            if !self.users.contains_key(name) {
                return Err(invalid(
                    format!("admin.users[{i}]"),
                    &format!("user \"{name}\" is not under [users]; add [users.{name}] with its password"),
                ));
            }
        }
        if !self.admin.users.is_empty() && self.databases.contains_key(ADMIN_DATABASE) {
            return Err(invalid(
                format!("databases.{ADMIN_DATABASE}"),
                "is the admin console's name while admin.users is set; rename the database",
            ));
        }
        let l = &self.limits;
        if l.auth_failures_before_backoff > 0 {
            for (key, d) in [
                ("limits.auth_failure_window", l.auth_failure_window),
                ("limits.auth_backoff", l.auth_backoff),
            ] {
                if d.is_zero() {
                    return Err(invalid(
                        key.into(),
                        "must be greater than zero while limits.auth_failures_before_backoff is set (0 turns the back-off off)",
                    ));
                }
            }
        }
        self.validate_auth_query()
            .map_err(|(k, m)| invalid(k, &m))?;
        let looks_up =
            self.auth.user.is_some() || self.databases.values().any(|d| d.auth_user.is_some());
        for (i, rule) in self.hba.iter().enumerate() {
            let known_db = rule.database == "all"
                || rule.database == ADMIN_DATABASE
                || self.databases.contains_key(&rule.database);
            if !known_db {
                return Err(invalid(
                    format!("hba[{i}].database"),
                    &format!("database \"{}\" is not under [databases]; use a configured name, \"{ADMIN_DATABASE}\" or \"all\"", rule.database),
                ));
            }
            // With auth_query, users need not be under [users].
            if rule.user != "all" && !looks_up && !self.users.contains_key(&rule.user) {
                return Err(invalid(
                    format!("hba[{i}].user"),
                    &format!(
                        "user \"{}\" is not under [users]; use a configured name or \"all\"",
                        rule.user
                    ),
                ));
            }
        }
        for (name, user) in &self.users {
            // Every method that can apply to this user's logins: the global one, or those of
            // the rules naming it (or all users).
            let methods: Vec<(AuthMethod, String)> = if self.hba.is_empty() {
                vec![(
                    self.auth.method,
                    format!("auth.method = \"{}\"", self.auth.method.as_str()),
                )]
            } else {
                self.hba
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.user == "all" || r.user == *name)
                    .filter_map(|(i, r)| {
                        Some((
                            r.method.auth()?,
                            format!("hba[{i}].method = \"{}\"", r.method.as_str()),
                        ))
                    })
                    .collect()
            };
            for (method, source) in methods {
                if method == AuthMethod::Trust {
                    continue;
                }
                let Some(p) = &user.password else {
                    return Err(invalid(
                        format!("users.{name}.password"),
                        &format!("is required by {source}; add a password or use method \"trust\""),
                    ));
                };
                if method == AuthMethod::Md5 && p.starts_with("SCRAM-SHA-256$") {
                    return Err(invalid(
                        format!("users.{name}.password"),
                        &format!("is a SCRAM verifier, which cannot check md5 logins ({source}); give the plain password or use method \"scram-sha-256\""),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The auth_query checks: every lookup role is a configured user with a plain password (it
    /// logs in upstream), and every query takes the user name as `$1`.
    fn validate_auth_query(&self) -> Result<(), (String, String)> {
        let mut roles: Vec<(String, &str)> = Vec::new();
        if let Some(u) = &self.auth.user {
            roles.push(("auth.user".into(), u));
        }
        for (name, db) in &self.databases {
            if let Some(u) = &db.auth_user {
                roles.push((format!("databases.{name}.auth_user"), u));
            }
            if db.auth_query.is_some() && db.auth_user.is_none() && self.auth.user.is_none() {
                return Err((
                    format!("databases.{name}.auth_query"),
                    "needs a lookup role; set auth.user or databases.NAME.auth_user".into(),
                ));
            }
        }
        if self.auth.query.is_some() && roles.is_empty() {
            return Err((
                "auth.query".into(),
                "needs a lookup role; set auth.user (the upstream role that runs the query)".into(),
            ));
        }
        for (key, role) in roles {
            if role.is_empty() {
                return Err((key, "must not be empty".into()));
            }
            let Some(user) = self.users.get(role) else {
                return Err((
                    key,
                    format!("user \"{role}\" is not under [users]; add [users.{role}] with its plain password (pgtether logs in upstream as this role)"),
                ));
            };
            if let Some(p) = &user.password {
                if p.starts_with("SCRAM-SHA-256$") || (p.len() == 35 && p.starts_with("md5")) {
                    return Err((
                        format!("users.{role}.password"),
                        format!("is a verifier or md5 hash, but {key} logs in upstream as \"{role}\" and needs the plain password"),
                    ));
                }
            }
        }
        let queries = std::iter::once(("auth.query".to_string(), self.auth.query.as_deref()))
            .chain(self.databases.iter().map(|(name, db)| {
                (
                    format!("databases.{name}.auth_query"),
                    db.auth_query.as_deref(),
                )
            }));
        for (key, query) in queries {
            if let Some(q) = query {
                if !q.contains("$1") {
                    return Err((
                        key,
                        "must take the user name as $1, e.g. \"SELECT usename, passwd FROM pg_shadow WHERE usename = $1\"".into(),
                    ));
                }
            }
        }
        if self.auth.cache_ttl < self.auth.negative_cache_ttl {
            return Err((
                "auth.negative_cache_ttl".into(),
                "must not exceed auth.cache_ttl".into(),
            ));
        }
        Ok(())
    }
}

fn check_pool(p: &PoolSettings, prefix: &str) -> Result<(), (String, &'static str)> {
    if p.size == 0 {
        return Err((format!("{prefix}.size"), "must be at least 1"));
    }
    if p.min_idle > p.size {
        return Err((format!("{prefix}.min_idle"), "must not exceed size"));
    }
    if p.acquire_timeout.is_zero() {
        return Err((
            format!("{prefix}.acquire_timeout"),
            "must be greater than zero",
        ));
    }
    if p.max_prepared_statements == 0 {
        return Err((
            format!("{prefix}.max_prepared_statements"),
            "must be at least 1",
        ));
    }
    if p.connect_timeout.is_zero() {
        return Err((
            format!("{prefix}.connect_timeout"),
            "must be greater than zero",
        ));
    }
    Ok(())
}
