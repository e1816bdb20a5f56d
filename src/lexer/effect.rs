//! What the lexer reports: the effects of a statement on session state, and the reasons a
//! client must stay on its server connection.

/// Why a client must stay on its server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PinReason {
    Listen,
    AdvisoryLock,
    TempTable,
    HeldCursor,
    SqlPrepare,
    Load,
    Sequence,
    /// State pgtether cannot track precisely (e.g. set_config with computed arguments).
    Untracked,
}

impl PinReason {
    pub const ALL: [PinReason; 8] = [
        PinReason::Listen,
        PinReason::AdvisoryLock,
        PinReason::TempTable,
        PinReason::HeldCursor,
        PinReason::SqlPrepare,
        PinReason::Load,
        PinReason::Sequence,
        PinReason::Untracked,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PinReason::Listen => "listen",
            PinReason::AdvisoryLock => "advisory_lock",
            PinReason::TempTable => "temp_table",
            PinReason::HeldCursor => "held_cursor",
            PinReason::SqlPrepare => "sql_prepare",
            PinReason::Load => "load",
            PinReason::Sequence => "sequence",
            PinReason::Untracked => "untracked",
        }
    }

    /// Why the state cannot follow the client, for errors under `on_pin = "reject"`.
    pub fn explain(self) -> &'static str {
        match self {
            PinReason::Listen => "LISTEN registers the channel on one server connection",
            PinReason::AdvisoryLock => "a session advisory lock is held by one server connection",
            PinReason::TempTable => "a temporary table exists only on one server connection",
            PinReason::HeldCursor => "a WITH HOLD cursor lives on one server connection",
            PinReason::SqlPrepare => {
                "an SQL-level prepared statement lives on one server connection"
            }
            PinReason::Load => "LOAD changes one server process for its lifetime",
            PinReason::Sequence => "currval/lastval read state of one server connection",
            PinReason::Untracked => "the session change cannot be tracked and replayed",
        }
    }
}

/// One effect of a statement on session state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// `key` (a lower-case setting name) now has the value `replay` restores.
    Set {
        key: String,
        replay: String,
    },
    Reset {
        key: String,
    },
    ResetAll,
    /// DISCARD ALL: settings, prepared statements, temp tables, listens, locks, cursors.
    DiscardAll,
    DiscardTemp,
    DiscardSequences,
    Pin(PinReason),
    Unlisten {
        channel: Option<String>,
    },
    UnlockAll,
    Unlock,
    CloseCursor {
        name: Option<String>,
    },
    Deallocate {
        name: Option<String>,
    },
    Listen {
        channel: String,
    },
    HeldCursor {
        name: String,
    },
    SqlPrepare {
        name: String,
    },
}

impl Effect {
    /// Whether a name or value in it holds U+FFFD, the stand-in for bytes of a client
    /// encoding other than UTF-8 (see `analyze_bytes`).
    pub fn names_replaced_text(&self) -> bool {
        let replaced = |s: &str| s.contains(char::REPLACEMENT_CHARACTER);
        match self {
            Effect::Set { key, replay } => replaced(key) || replaced(replay),
            Effect::Reset { key } => replaced(key),
            Effect::Unlisten {
                channel: Some(name),
            }
            | Effect::CloseCursor { name: Some(name) }
            | Effect::Deallocate { name: Some(name) }
            | Effect::Listen { channel: name }
            | Effect::HeldCursor { name }
            | Effect::SqlPrepare { name } => replaced(name),
            Effect::ResetAll
            | Effect::DiscardAll
            | Effect::DiscardTemp
            | Effect::DiscardSequences
            | Effect::Pin(_)
            | Effect::Unlisten { channel: None }
            | Effect::CloseCursor { name: None }
            | Effect::Deallocate { name: None }
            | Effect::UnlockAll
            | Effect::Unlock => false,
        }
    }
}
