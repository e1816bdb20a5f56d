//! SHOW CLIENTS: one row per connected client (admin console sessions included), with what it
//! is doing now, the server connection it holds, and pgtether's pins and statement count.

use super::result::{row, split_us, timestamp, Kind, ResultSet};
use crate::app::App;
use crate::clients::Activity;

const COLUMNS: &[(&str, Kind)] = &[
    ("type", Kind::Text),
    ("user", Kind::Text),
    ("database", Kind::Text),
    ("state", Kind::Text),
    ("addr", Kind::Text),
    ("port", Kind::Int),
    ("local_addr", Kind::Text),
    ("local_port", Kind::Int),
    ("connect_time", Kind::Text),
    ("request_time", Kind::Text),
    ("wait", Kind::Int),
    ("wait_us", Kind::Int),
    ("close_needed", Kind::Int),
    ("ptr", Kind::Text),
    ("link", Kind::Text),
    ("remote_pid", Kind::Int),
    ("tls", Kind::Text),
    ("application_name", Kind::Text),
    ("prepared_statements", Kind::Int),
    ("pinned", Kind::Int),
    ("pin_reasons", Kind::Text),
];

pub fn run(app: &App) -> ResultSet {
    let now = app.clients.now_us();
    let mut rs = ResultSet::new(COLUMNS);
    for c in app.clients.list() {
        let activity = c.activity();
        let since = c.wait_since_us();
        let waiting = since != 0 && matches!(activity, Activity::Waiting | Activity::Paused);
        let (wait_s, wait_us) = split_us(if waiting {
            now.saturating_sub(since)
        } else {
            0
        });
        let request = c.request_us();
        let server = c.server_pid();
        let reasons: Vec<&str> = c.pin_reasons().iter().map(|r| r.as_str()).collect();
        rs.push(row![
            "C",
            &*c.user,
            &*c.database,
            activity.as_str(),
            // PgBouncer's way of showing a Unix-socket client.
            c.addr
                .ip()
                .map_or_else(|| "unix".to_string(), |ip| ip.to_string()),
            c.addr.port(),
            c.local_addr.map(|a| a.ip().to_string()),
            c.local_addr.map(|a| a.port()),
            timestamp(c.connected_at()),
            (request != 0).then(|| timestamp(app.clients.to_system_time(request))),
            wait_s,
            wait_us,
            false,
            format!("{:x}", c.id),
            (server != 0).then(|| server.to_string()),
            c.cancel_pid,
            "",
            c.application_name.as_str(),
            c.prepared(),
            !reasons.is_empty(),
            reasons.join(","),
        ]);
    }
    rs
}
