//! The PostgreSQL wire protocol as pgtether needs it: message framing, the startup-phase
//! packets, and builders for the backend messages pgtether itself sends to clients.
//!
//! Messages pgtether sends upstream are built with `postgres_protocol::message::frontend`.

pub mod backend;
pub mod frame;
pub mod frontend;
pub mod startup;

#[cfg(test)]
mod proptests;

/// SQLSTATE codes pgtether produces itself, in one place so each situation maps to one code.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const CLIENT_CANNOT_CONNECT: &str = "08001";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const CHARACTER_NOT_IN_REPERTOIRE: &str = "22021";
    pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
    pub const CONFIG_FILE_ERROR: &str = "F0000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
    pub const IDLE_IN_TRANSACTION_SESSION_TIMEOUT: &str = "25P03";
    pub const INTERNAL_ERROR: &str = "XX000";
}
