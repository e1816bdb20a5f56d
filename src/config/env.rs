//! Configuration from the environment: `${VAR}` substitution in the file's text before it is
//! parsed, and `PGTETHER_*` overrides of the keys most often varied between deployments,
//! applied after parsing (and validated like the file's own values).

use std::net::SocketAddr;

use super::{Config, ConfigError, LogFormat, PoolMode};

/// The overrides, each with the key it replaces.
pub const OVERRIDES: &[(&str, &str)] = &[
    ("PGTETHER_LISTEN_ADDR", "listen.addr"),
    ("PGTETHER_HTTP_ADDR", "http.addr"),
    ("PGTETHER_POOL_MODE", "pool.mode"),
    ("PGTETHER_POOL_SIZE", "pool.size"),
    ("PGTETHER_LOG_FORMAT", "log.format"),
];

/// Replaces every `${NAME}` with the variable's value. `$${` stands for a literal `${`;
/// lines that are comments (first non-blank character `#`) are left alone. An unset
/// variable is an error naming it and the line.
pub fn substitute(
    text: &str,
    origin: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    if !text.contains("${") {
        return Ok(text.to_string());
    }
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let err = |var: &str, message: String| ConfigError::Env {
            path: origin.to_string(),
            line: i + 1,
            var: var.to_string(),
            message,
        };
        let mut rest = line;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let tail = &rest[at..];
            if let Some(after) = tail.strip_prefix("$${") {
                out.push_str("${");
                rest = after;
            } else if let Some(after) = tail.strip_prefix("${") {
                let Some(end) = after.find('}') else {
                    return Err(err(after.trim_end(), "has no closing `}`".into()));
                };
                let name = &after[..end];
                let valid = name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err(err(name, "is not a valid environment variable name".into()));
                }
                let value = lookup(name).ok_or_else(|| {
                    err(
                        name,
                        "is not set; set it or remove the reference (write $${ for a literal ${)"
                            .into(),
                    )
                })?;
                out.push_str(&value);
                rest = &after[end + 1..];
            } else {
                out.push('$');
                rest = &tail[1..];
            }
        }
        out.push_str(rest);
    }
    Ok(out)
}

/// Applies the `PGTETHER_*` overrides that are set; returns the variables used.
pub fn apply_overrides(
    config: &mut Config,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<&'static str>, ConfigError> {
    let mut used = Vec::new();
    for (var, key) in OVERRIDES {
        let Some(value) = lookup(var) else { continue };
        let value = value.trim();
        let bad = |message: String| ConfigError::Override {
            var: var.to_string(),
            key: key.to_string(),
            message,
        };
        match *var {
            "PGTETHER_LISTEN_ADDR" => {
                config.listen.addr = parse_addr(value).map_err(bad)?;
            }
            "PGTETHER_HTTP_ADDR" => {
                config.http.addr = if value.is_empty() || value.eq_ignore_ascii_case("off") {
                    None
                } else {
                    Some(parse_addr(value).map_err(bad)?)
                };
            }
            "PGTETHER_POOL_MODE" => {
                config.pool.mode = match value.to_ascii_lowercase().as_str() {
                    "session" => PoolMode::Session,
                    "transaction" => PoolMode::Transaction,
                    "statement" => PoolMode::Statement,
                    _ => {
                        return Err(bad(format!(
                            "`{value}` is not one of session, transaction, statement"
                        )))
                    }
                };
            }
            "PGTETHER_POOL_SIZE" => {
                config.pool.size = value
                    .parse()
                    .map_err(|_| bad(format!("`{value}` is not a whole number")))?;
            }
            "PGTETHER_LOG_FORMAT" => {
                config.log.format = match value.to_ascii_lowercase().as_str() {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    _ => return Err(bad(format!("`{value}` is not one of text, json"))),
                };
            }
            _ => unreachable!("every override is handled"),
        }
        used.push(*var);
    }
    Ok(used)
}

fn parse_addr(value: &str) -> Result<SocketAddr, String> {
    value
        .parse()
        .map_err(|_| format!("`{value}` is not an address such as 0.0.0.0:6432"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn variables_are_substituted_and_escapes_kept() {
        let lookup = env(&[("HOST", "db.internal"), ("PW", "s3cret$x")]);
        let text =
            "host = \"${HOST}\"\npassword = \"${PW}\"\nliteral = \"$${HOST} $5\"\n# ${UNSET}\n";
        let out = substitute(text, "t", &lookup).unwrap();
        assert_eq!(
            out,
            "host = \"db.internal\"\npassword = \"s3cret$x\"\nliteral = \"${HOST} $5\"\n# ${UNSET}\n"
        );
    }

    #[test]
    fn an_unset_variable_is_named_with_its_line() {
        let lookup = env(&[]);
        let err = substitute("a = 1\nb = \"${NOPE}\"\n", "f.toml", &lookup)
            .unwrap_err()
            .to_string();
        assert!(err.contains("NOPE") && err.contains("line 2"), "{err}");
        let err = substitute("b = \"${OPEN\"\n", "f.toml", &lookup)
            .unwrap_err()
            .to_string();
        assert!(err.contains("closing"), "{err}");
        let err = substitute("b = \"${1X}\"\n", "f.toml", &lookup)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a valid"), "{err}");
    }

    #[test]
    fn overrides_replace_keys_and_name_bad_values() {
        let mut c = Config::parse("[databases.a]\nhost = \"h\"\n", "t").unwrap();
        let lookup = env(&[
            ("PGTETHER_LISTEN_ADDR", "0.0.0.0:7000"),
            ("PGTETHER_HTTP_ADDR", "off"),
            ("PGTETHER_POOL_MODE", "Session"),
            ("PGTETHER_POOL_SIZE", "3"),
            ("PGTETHER_LOG_FORMAT", "json"),
        ]);
        let used = apply_overrides(&mut c, &lookup).unwrap();
        assert_eq!(used.len(), 5);
        assert_eq!(c.listen.addr.port(), 7000);
        assert_eq!(c.http.addr, None);
        assert_eq!(c.pool.mode, PoolMode::Session);
        assert_eq!(c.pool.size, 3);
        assert_eq!(c.log.format, LogFormat::Json);
        let err = apply_overrides(&mut c, &env(&[("PGTETHER_POOL_SIZE", "many")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("PGTETHER_POOL_SIZE") && err.contains("pool.size"),
            "{err}"
        );
    }
}
