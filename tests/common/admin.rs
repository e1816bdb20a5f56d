//! Helpers for talking to pgtether's admin console (tests/admin.rs, tests/reload.rs).

use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use super::Pgtether;

/// Config text that makes `app` an admin console user.
pub const ADMIN_EXTRA: &str = "[admin]\nusers = [\"app\"]\n";

/// Connects to the admin console as `app`.
pub async fn admin(p: &Pgtether) -> Client {
    admin_as(p, "app", "app")
        .await
        .expect("admin console login")
}

pub async fn admin_as(
    p: &Pgtether,
    user: &str,
    password: &str,
) -> Result<Client, tokio_postgres::Error> {
    let url = format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname=pgtether",
        p.port
    );
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A result set as text.
#[derive(Debug)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl Table {
    pub fn col(&self, name: &str) -> usize {
        self.columns
            .iter()
            .position(|c| c == name)
            .unwrap_or_else(|| panic!("no column {name} in {:?}", self.columns))
    }

    /// Rows whose column `name` equals `value`.
    pub fn rows_where(&self, name: &str, value: &str) -> Vec<&Vec<Option<String>>> {
        let i = self.col(name);
        self.rows
            .iter()
            .filter(|r| r[i].as_deref() == Some(value))
            .collect()
    }

    pub fn get<'a>(&self, row: &'a [Option<String>], name: &str) -> Option<&'a str> {
        row[self.col(name)].as_deref()
    }

    /// An integer column of a row.
    pub fn int(&self, row: &[Option<String>], name: &str) -> i64 {
        self.get(row, name)
            .unwrap_or_else(|| panic!("{name} is NULL"))
            .parse()
            .unwrap_or_else(|_| panic!("{name} is not an integer"))
    }
}

/// Runs a SHOW command and returns its result set.
pub async fn show(c: &Client, command: &str) -> Table {
    let messages = c
        .simple_query(command)
        .await
        .unwrap_or_else(|e| panic!("{command}: {e:?}"));
    let mut table = Table {
        columns: Vec::new(),
        rows: Vec::new(),
    };
    for m in messages {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                table.columns = cols.iter().map(|c| c.name().to_string()).collect();
            }
            SimpleQueryMessage::Row(r) => {
                table
                    .rows
                    .push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
            }
            _ => {}
        }
    }
    table
}

/// Repeats a SHOW command until `ready` holds for its result (5 s at most).
/// A client has its reply before its server connection is back in the pool,
/// so counts that change at release are read this way.
pub async fn show_until(c: &Client, command: &str, ready: impl Fn(&Table) -> bool) -> Table {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let t = show(c, command).await;
        if ready(&t) {
            return t;
        }
        assert!(std::time::Instant::now() < deadline, "{command}: {t:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Runs a command that returns no rows.
pub async fn run(c: &Client, command: &str) -> Result<(), tokio_postgres::Error> {
    c.simple_query(command).await.map(|_| ())
}

/// Rewrites the config file of `p`, replacing `from` with `to` (which must occur).
pub fn edit_config(p: &Pgtether, from: &str, to: &str) {
    let text = std::fs::read_to_string(&p.config_path).expect("config readable");
    assert!(text.contains(from), "config has no {from:?}:\n{text}");
    std::fs::write(&p.config_path, text.replacen(from, to, 1)).expect("config written");
}
