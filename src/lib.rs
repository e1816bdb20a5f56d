//! pgtether: a PostgreSQL connection pooler speaking the wire protocol.
//!
//! The path of a client message: [`listener`] accepts, [`session`] runs the startup and login
//! ([`protocol::startup`], [`auth`]) and then the idle ↔ active cycle, taking server connections
//! from [`pool`] (each a [`server::ServerConn`]) and moving bytes with [`relay`].
//!
//! Operators reach a running process through the [`admin`] console (a virtual database),
//! [`reload`] (RELOAD, SIGHUP) and [`http`]; [`clients`] and [`pause`] hold what those act on.
//!
//! Who may log in is decided by [`access`] (the `[[hba]]` rules) and [`limits`] (connections per
//! user and address, failed-login back-off, idle timeouts).

pub mod access;
pub mod admin;
pub mod app;
pub mod auth;
pub mod cancel;
pub mod clients;
pub mod config;
pub mod embedded;
#[cfg(test)]
pub(crate) mod fuzz;
pub mod http;
pub mod lexer;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod pause;
pub mod peer;
pub mod pool;
pub mod protocol;
pub mod relay;
pub mod reload;
pub mod server;
pub mod session;
pub mod socket;
pub mod statements;
pub mod takeover;
pub mod tls;
pub mod workers;
