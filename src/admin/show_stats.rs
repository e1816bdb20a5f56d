//! SHOW STATS: per database, the totals pgtether counts (summed over the database's pools):
//! transactions, queries, bytes, time waited for a server connection, and its own counters.

use std::collections::BTreeMap;

use super::result::{row, Kind, ResultSet};
use crate::app::App;

const COLUMNS: &[(&str, Kind)] = &[
    ("database", Kind::Text),
    ("total_xact_count", Kind::Int),
    ("total_query_count", Kind::Int),
    ("total_received", Kind::Int),
    ("total_sent", Kind::Int),
    ("total_wait_time", Kind::Int),
    ("total_wait_count", Kind::Int),
    ("acquire_timeouts", Kind::Int),
    ("server_connect_errors", Kind::Int),
    ("pin_rejections", Kind::Int),
    ("prepared_hits", Kind::Int),
    ("prepared_misses", Kind::Int),
    ("prepared_evictions", Kind::Int),
    ("state_syncs", Kind::Int),
];

#[derive(Default)]
struct Totals {
    xacts: u64,
    queries: u64,
    received: u64,
    sent: u64,
    wait_us: u64,
    waits: u64,
    timeouts: u64,
    connect_errors: u64,
    pin_rejections: u64,
    hits: u64,
    misses: u64,
    evictions: u64,
    syncs: u64,
}

pub fn run(app: &App) -> ResultSet {
    let mut by_db: BTreeMap<String, Totals> = app
        .current()
        .config
        .databases
        .keys()
        .map(|db| (db.clone(), Totals::default()))
        .collect();
    for pool in app.pools.all() {
        let m = &pool.metrics;
        m.sync();
        let t = by_db.entry(pool.database.to_string()).or_default();
        t.xacts += m.transactions.get();
        t.queries += m.queries.get();
        t.received += m.received_bytes.get();
        t.sent += m.sent_bytes.get();
        t.wait_us += (m.wait_seconds.get_sample_sum() * 1e6) as u64;
        t.waits += m.wait_seconds.get_sample_count();
        t.timeouts += m.acquire_timeouts.get();
        t.connect_errors += m.server_connect_errors.get();
        t.pin_rejections += m.pin_rejections.get();
        t.hits += m.prepared_hits.get();
        t.misses += m.prepared_misses.get();
        t.evictions += m.prepared_evictions.get();
        t.syncs += m.state_syncs.get();
    }
    let mut rs = ResultSet::new(COLUMNS);
    for (db, t) in by_db {
        rs.push(row![
            db,
            t.xacts,
            t.queries,
            t.received,
            t.sent,
            t.wait_us,
            t.waits,
            t.timeouts,
            t.connect_errors,
            t.pin_rejections,
            t.hits,
            t.misses,
            t.evictions,
            t.syncs,
        ]);
    }
    rs
}
