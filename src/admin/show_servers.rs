//! SHOW SERVERS: one row per open server connection, with the client using it now (found by
//! matching the backend pid each client publishes; no per-query bookkeeping on servers).

use std::collections::HashMap;
use std::sync::Arc;

use super::result::{row, timestamp, Kind, ResultSet};
use crate::app::App;
use crate::clients::ClientInfo;

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
];

pub fn run(app: &App) -> ResultSet {
    let mut users: HashMap<(Arc<str>, Arc<str>, i32), Arc<ClientInfo>> = HashMap::new();
    for c in app.clients.list() {
        let pid = c.server_pid();
        if pid != 0 {
            users.insert((c.database.clone(), c.user.clone(), pid), c);
        }
    }
    let mut rs = ResultSet::new(COLUMNS);
    for pool in app.pools.all() {
        for (server, close_needed) in pool.servers() {
            let client = users.get(&(pool.database.clone(), pool.user.clone(), server.pid));
            let request = client.map(|c| c.request_us()).filter(|us| *us != 0);
            rs.push(row![
                "S",
                &*pool.user,
                &*pool.database,
                if client.is_some() { "active" } else { "idle" },
                server.addr.host(),
                server.addr.port(),
                server.local_addr.map(|a| a.ip().to_string()),
                server.local_addr.map(|a| a.port()),
                timestamp(server.connected_at),
                request.map(|us| timestamp(app.clients.to_system_time(us))),
                0u64,
                0u64,
                close_needed,
                format!("{:x}", server.pid),
                client.map(|c| format!("{:x}", c.id)),
                server.pid,
                "",
                "",
            ]);
        }
    }
    rs
}
