//! SHOW CONFIG: every general setting with its value, its default, and whether RELOAD can
//! change it (`changeable` = 1) or it needs a restart.

use super::result::{row, Kind, ResultSet};
use crate::app::App;
use crate::config::flat::{entries, RESTART_KEYS};
use crate::config::Config;

const COLUMNS: &[(&str, Kind)] = &[
    ("key", Kind::Text),
    ("value", Kind::Text),
    ("default", Kind::Text),
    ("changeable", Kind::Int),
];

pub fn run(app: &App) -> ResultSet {
    let snapshot = app.current();
    // The defaults are what an otherwise empty file gives.
    let defaults = Config::parse("[databases.x]\nhost = \"x\"\n", "defaults")
        .map(|c| entries(&c))
        .unwrap_or_default();
    let mut rs = ResultSet::new(COLUMNS);
    for (key, value) in entries(&snapshot.config) {
        let default = defaults
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
            .filter(|_| !matches!(key.as_str(), "databases" | "users"));
        let changeable = !RESTART_KEYS.contains(&key.as_str());
        rs.push(row![key, value, default, changeable]);
    }
    rs
}
