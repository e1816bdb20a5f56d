//! Parsing admin console commands: case-insensitive keywords, an optional trailing
//! semicolon, database names as given (double quotes allowed).

/// The SHOW families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Pools,
    Clients,
    Servers,
    Stats,
    Databases,
    Config,
    Version,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Show(Show),
    Pause(Option<String>),
    Resume(Option<String>),
    Reconnect(Option<String>),
    Kill(String),
    Reload,
    Shutdown,
}

/// Every command, for the error that answers an unknown one.
pub const HELP: &str = "SHOW POOLS|CLIENTS|SERVERS|STATS|DATABASES|CONFIG|VERSION, PAUSE [db], RESUME [db], RECONNECT [db], KILL db, RELOAD, SHUTDOWN";

/// Parses one command (no semicolons inside). `Err` carries the message for ERROR 42601.
pub fn parse(text: &str) -> Result<Command, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let keyword = |i: usize| words.get(i).map(|w| w.to_ascii_uppercase());
    let unknown = || {
        format!(
            "unknown admin command \"{}\"; the admin console understands: {HELP}",
            text.trim()
        )
    };
    let database = |i: usize| -> Result<Option<String>, String> {
        match words.len() {
            n if n == i => Ok(None),
            n if n == i + 1 => Ok(Some(unquote(words[i]))),
            _ => Err(format!(
                "too many arguments to {}; the admin console understands: {HELP}",
                words[0].to_ascii_uppercase()
            )),
        }
    };
    let Some(first) = keyword(0) else {
        return Err(unknown());
    };
    Ok(match first.as_str() {
        "SHOW" => {
            if words.len() != 2 {
                return Err(unknown());
            }
            Command::Show(match keyword(1).as_deref() {
                Some("POOLS") => Show::Pools,
                Some("CLIENTS") => Show::Clients,
                Some("SERVERS") => Show::Servers,
                Some("STATS") => Show::Stats,
                Some("DATABASES") => Show::Databases,
                Some("CONFIG") => Show::Config,
                Some("VERSION") => Show::Version,
                _ => return Err(unknown()),
            })
        }
        "PAUSE" => Command::Pause(database(1)?),
        "RESUME" => Command::Resume(database(1)?),
        "RECONNECT" => Command::Reconnect(database(1)?),
        "KILL" => match database(1)? {
            Some(db) => Command::Kill(db),
            None => return Err("KILL needs a database name: KILL db".to_string()),
        },
        "RELOAD" if words.len() == 1 => Command::Reload,
        "SHUTDOWN" if words.len() == 1 => Command::Shutdown,
        _ => return Err(unknown()),
    })
}

fn unquote(word: &str) -> String {
    word.strip_prefix('"')
        .and_then(|w| w.strip_suffix('"'))
        .unwrap_or(word)
        .to_string()
}

/// Splits a Query text into commands at semicolons, dropping empty ones.
pub fn split(query: &str) -> Vec<&str> {
    query
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_are_case_insensitive() {
        assert_eq!(parse("show pools"), Ok(Command::Show(Show::Pools)));
        assert_eq!(parse("  Show   Clients "), Ok(Command::Show(Show::Clients)));
        assert_eq!(parse("pause"), Ok(Command::Pause(None)));
        assert_eq!(parse("PAUSE app"), Ok(Command::Pause(Some("app".into()))));
        assert_eq!(
            parse("resume \"App\""),
            Ok(Command::Resume(Some("App".into())))
        );
        assert_eq!(parse("kill app"), Ok(Command::Kill("app".into())));
        assert_eq!(parse("reload"), Ok(Command::Reload));
        assert_eq!(parse("RECONNECT"), Ok(Command::Reconnect(None)));
    }

    #[test]
    fn unknown_commands_list_the_known_ones() {
        for bad in ["SHOW LISTS", "SELECT 1", "SHOW", "RELOAD now", "KILL"] {
            let err = parse(bad).unwrap_err();
            assert!(
                err.contains("SHOW POOLS") || err.contains("KILL db"),
                "{bad}: {err}"
            );
        }
        assert!(parse("PAUSE a b").unwrap_err().contains("too many"));
    }

    #[test]
    fn queries_split_at_semicolons() {
        assert_eq!(split("SHOW POOLS;"), vec!["SHOW POOLS"]);
        assert_eq!(
            split("show pools; show clients ;;"),
            vec!["show pools", "show clients"]
        );
        assert!(split(" ; ").is_empty());
    }
}
