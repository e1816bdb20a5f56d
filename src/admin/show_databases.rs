//! SHOW DATABASES: one row per configured database (and the admin console's own), with its
//! upstream, effective pool settings, open server connections and pause state.

use super::result::{row, Kind, ResultSet};
use crate::app::App;
use crate::config::ADMIN_DATABASE;

const COLUMNS: &[(&str, Kind)] = &[
    ("name", Kind::Text),
    ("host", Kind::Text),
    ("port", Kind::Int),
    ("database", Kind::Text),
    ("force_user", Kind::Text),
    ("pool_size", Kind::Int),
    ("min_pool_size", Kind::Int),
    ("reserve_pool", Kind::Int),
    ("pool_mode", Kind::Text),
    ("max_connections", Kind::Int),
    ("current_connections", Kind::Int),
    ("paused", Kind::Int),
    ("disabled", Kind::Int),
];

pub fn run(app: &App) -> ResultSet {
    let snapshot = app.current();
    let config = &snapshot.config;
    let paused = app.pause.current();
    let pools = app.pools.all();
    let mut rs = ResultSet::new(COLUMNS);
    for (name, db) in &config.databases {
        let settings = config.pool_settings(name);
        let current: usize = pools
            .iter()
            .filter(|p| *p.database == **name)
            .map(|p| {
                let c = p.server_counts();
                c.idle + c.active
            })
            .sum();
        rs.push(row![
            name.as_str(),
            db.host.as_str(),
            db.port,
            db.dbname.as_deref().unwrap_or(name),
            db.user.as_deref(),
            settings.size,
            settings.min_idle,
            0u64,
            settings.mode.as_str(),
            0u64,
            current,
            paused.covers(name),
            false,
        ]);
    }
    if !config.admin.users.is_empty() {
        rs.push(row![
            ADMIN_DATABASE,
            None::<String>,
            config.listen.addr.port(),
            ADMIN_DATABASE,
            None::<String>,
            0u64,
            0u64,
            0u64,
            "statement",
            0u64,
            0u64,
            false,
            false,
        ]);
    }
    rs
}
