//! SHOW POOLS: one row per (database, user) pool: clients by state, server connections by
//! state, the longest current wait, and pgtether's own pin and prepared-statement counters.

use std::collections::HashMap;
use std::sync::Arc;

use super::result::{row, split_us, Kind, ResultSet};
use crate::app::App;

const COLUMNS: &[(&str, Kind)] = &[
    ("database", Kind::Text),
    ("user", Kind::Text),
    ("cl_active", Kind::Int),
    ("cl_waiting", Kind::Int),
    ("cl_active_cancel_req", Kind::Int),
    ("cl_waiting_cancel_req", Kind::Int),
    ("sv_active", Kind::Int),
    ("sv_active_cancel", Kind::Int),
    ("sv_being_canceled", Kind::Int),
    ("sv_idle", Kind::Int),
    ("sv_used", Kind::Int),
    ("sv_tested", Kind::Int),
    ("sv_login", Kind::Int),
    ("maxwait", Kind::Int),
    ("maxwait_us", Kind::Int),
    ("pool_mode", Kind::Text),
    ("cl_idle", Kind::Int),
    ("pinned", Kind::Int),
    ("prepared_hits", Kind::Int),
    ("prepared_misses", Kind::Int),
    ("prepared_evictions", Kind::Int),
    ("state_syncs", Kind::Int),
];

pub fn run(app: &App) -> ResultSet {
    // The longest wait going on now, per pool, from the clients' own timestamps.
    let now = app.clients.now_us();
    let mut maxwait: HashMap<(Arc<str>, Arc<str>), u64> = HashMap::new();
    for c in app.clients.list() {
        let since = c.wait_since_us();
        if since != 0 {
            let w = maxwait
                .entry((c.database.clone(), c.user.clone()))
                .or_default();
            *w = (*w).max(now.saturating_sub(since));
        }
    }
    let mut rs = ResultSet::new(COLUMNS);
    for pool in app.pools.all() {
        let m = &pool.metrics;
        m.sync();
        let servers = pool.server_counts();
        let wait = maxwait
            .get(&(pool.database.clone(), pool.user.clone()))
            .copied()
            .unwrap_or(0);
        let (wait_s, wait_us) = split_us(wait);
        rs.push(row![
            &*pool.database,
            &*pool.user,
            m.clients_active.get(),
            m.clients_waiting.get(),
            0u64,
            0u64,
            servers.active,
            0u64,
            0u64,
            servers.idle,
            0u64,
            0u64,
            servers.logging_in,
            wait_s,
            wait_us,
            pool.settings().mode.as_str(),
            m.clients_idle.get(),
            m.pinned_clients.get(),
            m.prepared_hits.get(),
            m.prepared_misses.get(),
            m.prepared_evictions.get(),
            m.state_syncs.get(),
        ]);
    }
    rs
}
