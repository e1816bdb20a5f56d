//! Session state: what a client carries from one server connection to the next (settings,
//! prepared statements, pins), and the record of what a server connection currently has.
//!
//! Settings are kept as `key → replay SQL` in small sorted vectors (most clients have one or
//! two entries, and every idle client keeps its map): the statement that recreates the value on another
//! connection. Syncing a client onto a server is the difference of the two maps, sent as one
//! simple Query.

use std::collections::{BTreeSet, HashMap};

use litemap::LiteMap;
use std::sync::{Arc, Mutex};

use crate::clients::ClientInfo;
use crate::lexer::{quote_ident_path, replay_set_config, Effect, PinReason};
use crate::statements::{Registry, ServerStatements, Statement};
use crate::takeover::state::{SessionState, StatementState};

/// Setting name (lower case) → the SQL that recreates its value.
pub type Settings = LiteMap<String, String>;

/// What a server connection has, as far as pgtether set it up.
#[derive(Debug)]
pub struct ServerSession {
    pub settings: Settings,
    pub statements: ServerStatements,
}

impl ServerSession {
    pub fn new(max_statements: usize) -> Self {
        ServerSession {
            settings: Settings::new(),
            statements: ServerStatements::new(max_statements),
        }
    }

    /// Settings and statements in their serialized form (for a takeover).
    pub fn export(&self, registry: &Registry) -> (Vec<(String, String)>, Vec<StatementState>) {
        let settings = pairs(&self.settings);
        let statements = self
            .statements
            .ids()
            .into_iter()
            .filter_map(|id| registry.get(id))
            .map(|s| statement_state(&s))
            .collect();
        (settings, statements)
    }

    /// The record of a server connection handed over by another process. A statement whose
    /// id this process gives to other text is left out: the server keeps it unused.
    pub fn import(
        settings: Vec<(String, String)>,
        statements: Vec<StatementState>,
        registry: &Registry,
        max_statements: usize,
    ) -> ServerSession {
        let mut server = ServerSession::new(max_statements);
        server.settings = settings.into_iter().collect();
        for st in statements {
            let stmt = registry.adopt(st.id, &st.query, &st.param_types);
            if stmt.id == st.id {
                server.statements.insert(&stmt);
            }
        }
        server
    }

    /// After DISCARD ALL the server is back to how pgtether opened it.
    pub fn reset(&mut self) {
        self.settings.clear();
        self.statements.clear();
    }
}

/// State that pins a client to its server connection.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pins {
    pub listen: BTreeSet<String>,
    /// Session advisory lock calls minus unlock calls; > 0 keeps the pin.
    pub advisory: u32,
    pub temp: bool,
    pub held_cursors: BTreeSet<String>,
    pub sql_prepared: BTreeSet<String>,
    pub load: bool,
    pub sequence: bool,
    pub untracked: bool,
}

impl Pins {
    pub fn is_pinned(&self) -> bool {
        !self.listen.is_empty()
            || self.advisory > 0
            || self.temp
            || !self.held_cursors.is_empty()
            || !self.sql_prepared.is_empty()
            || self.load
            || self.sequence
            || self.untracked
    }

    pub fn reasons(&self) -> Vec<PinReason> {
        let mut r = Vec::new();
        if !self.listen.is_empty() {
            r.push(PinReason::Listen);
        }
        if self.advisory > 0 {
            r.push(PinReason::AdvisoryLock);
        }
        if self.temp {
            r.push(PinReason::TempTable);
        }
        if !self.held_cursors.is_empty() {
            r.push(PinReason::HeldCursor);
        }
        if !self.sql_prepared.is_empty() {
            r.push(PinReason::SqlPrepare);
        }
        if self.load {
            r.push(PinReason::Load);
        }
        if self.sequence {
            r.push(PinReason::Sequence);
        }
        if self.untracked {
            r.push(PinReason::Untracked);
        }
        r
    }
}

/// The pin an effect creates, if it creates one.
pub fn pin_of(effect: &Effect) -> Option<PinReason> {
    match effect {
        Effect::Pin(r) => Some(*r),
        Effect::Listen { .. } => Some(PinReason::Listen),
        Effect::HeldCursor { .. } => Some(PinReason::HeldCursor),
        Effect::SqlPrepare { .. } => Some(PinReason::SqlPrepare),
        _ => None,
    }
}

/// A client's session, independent of any server connection.
#[derive(Debug, Default)]
pub struct ClientSession {
    /// Settings from the startup packet: what RESET returns to.
    startup: Arc<Settings>,
    /// Current settings (startup values overridden by committed SETs); shares the startup
    /// map until the client changes something.
    pub settings: Arc<Settings>,
    /// Protocol-level prepared statements by client name.
    pub statements: HashMap<String, Arc<Statement>, foldhash::fast::RandomState>,
    /// Boxed when any: few clients ever pin, and every idle client carries this.
    pins: Option<Box<Pins>>,
    /// Where the pins are shown (`SHOW CLIENTS`); updated whenever they change, which is rare.
    pub published: Option<Arc<ClientInfo>>,
}

fn pairs(settings: &Settings) -> Vec<(String, String)> {
    settings
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn statement_state(s: &Statement) -> StatementState {
    let (query, param_types) = s.query_and_types();
    StatementState {
        id: s.id,
        query: query.to_vec(),
        param_types: param_types.to_vec(),
    }
}

/// Startup parameters that are connection properties, not settings to replay.
const NOT_SETTINGS: &[&str] = &["user", "database", "replication", "options"];

/// The startup settings last built in a pool. Most clients of a pool send the same startup
/// parameters; sharing one map saves every idle client a few hundred bytes.
#[derive(Default)]
pub struct SharedStartup(Mutex<Option<(StartupParams, Arc<Settings>)>>);

type StartupParams = Vec<(String, String)>;

impl SharedStartup {
    fn get(&self, params: &[(String, String)]) -> Arc<Settings> {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((p, settings)) = last.as_ref() {
            if p.as_slice() == params {
                return settings.clone();
            }
        }
        let settings = Arc::new(ClientSession::startup_settings(params));
        *last = Some((params.to_vec(), settings.clone()));
        settings
    }
}

impl ClientSession {
    /// Builds the session from startup parameters (`options=-c name=value` included),
    /// sharing the settings map with earlier clients that sent the same.
    pub fn from_startup(params: &[(String, String)], shared: &SharedStartup) -> ClientSession {
        let startup = shared.get(params);
        ClientSession {
            settings: startup.clone(),
            startup,
            ..ClientSession::default()
        }
    }

    fn startup_settings(params: &[(String, String)]) -> Settings {
        let mut startup: Settings = startup_overrides(params)
            .into_iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), replay_set(&n, &v)))
            .collect();
        // A dedicated connection without application_name reports an empty one; pgtether's
        // server connections have their own, which must not show through.
        startup
            .entry("application_name".into())
            .or_insert_with(|| replay_set("application_name", ""));
        startup
    }

    /// The session in its serialized form (for a takeover).
    pub fn export(&self) -> SessionState {
        SessionState {
            startup: pairs(&self.startup),
            settings: pairs(&self.settings),
            statements: self
                .statements
                .iter()
                .map(|(name, s)| (name.clone(), statement_state(s)))
                .collect(),
            pins: self.pins().clone(),
        }
    }

    /// A session handed over by another process.
    pub fn import(state: SessionState, registry: &Registry) -> ClientSession {
        let startup: Arc<Settings> = Arc::new(state.startup.into_iter().collect());
        let settings: Settings = state.settings.into_iter().collect();
        ClientSession {
            settings: if settings == *startup {
                startup.clone()
            } else {
                Arc::new(settings)
            },
            startup,
            statements: state
                .statements
                .into_iter()
                .map(|(name, st)| (name, registry.adopt(st.id, &st.query, &st.param_types)))
                .collect(),
            pins: (state.pins != Pins::default()).then(|| Box::new(state.pins)),
            published: None,
        }
    }

    /// The SQL that makes `server` match this client's settings, or `None` if it already
    /// does. Updates `server`'s record as if the SQL succeeded.
    pub fn sync_sql(&self, server: &mut ServerSession) -> Option<String> {
        if server.settings == *self.settings {
            return None;
        }
        let mut sql = String::new();
        for (key, replay) in self.settings.iter() {
            if server.settings.get(key) != Some(replay) {
                sql.push_str(replay);
                sql.push_str("; ");
            }
        }
        for key in server.settings.keys() {
            if !self.settings.contains_key(key) {
                sql.push_str("RESET ");
                sql.push_str(&quote_ident_path(key));
                sql.push_str("; ");
            }
        }
        server.settings = (*self.settings).clone();
        Some(sql)
    }

    /// Applies a pin immediately (pins err on the safe side: they start when the statement is
    /// sent, whether or not it commits).
    pub fn pin(&mut self, effect: &Effect) {
        match effect {
            Effect::Pin(PinReason::AdvisoryLock) => self.pins_mut().advisory += 1,
            Effect::Pin(PinReason::TempTable) => self.pins_mut().temp = true,
            Effect::Pin(PinReason::Load) => self.pins_mut().load = true,
            Effect::Pin(PinReason::Sequence) => self.pins_mut().sequence = true,
            Effect::Pin(PinReason::Untracked) => self.pins_mut().untracked = true,
            Effect::Pin(PinReason::Listen)
            | Effect::Pin(PinReason::HeldCursor)
            | Effect::Pin(PinReason::SqlPrepare) => self.pins_mut().untracked = true,
            Effect::Listen { channel } => {
                self.pins_mut().listen.insert(channel.clone());
            }
            Effect::HeldCursor { name } => {
                self.pins_mut().held_cursors.insert(name.clone());
            }
            Effect::SqlPrepare { name } => {
                self.pins_mut().sql_prepared.insert(name.clone());
            }
            _ => {}
        }
        self.publish_pins();
    }

    /// What pins this client to its server connection.
    pub fn pins(&self) -> &Pins {
        static NONE: Pins = Pins {
            listen: BTreeSet::new(),
            advisory: 0,
            temp: false,
            held_cursors: BTreeSet::new(),
            sql_prepared: BTreeSet::new(),
            load: false,
            sequence: false,
            untracked: false,
        };
        self.pins.as_deref().unwrap_or(&NONE)
    }

    fn pins_mut(&mut self) -> &mut Pins {
        self.pins.get_or_insert_with(Box::default)
    }

    /// Applies an effect that can only remove pins; frees them when none is left.
    fn unpin(&mut self, f: impl FnOnce(&mut Pins)) {
        if let Some(pins) = self.pins.as_deref_mut() {
            f(pins);
            if !pins.is_pinned() {
                self.pins = None;
            }
        }
    }

    fn publish_pins(&self) {
        if let Some(info) = &self.published {
            info.set_pins(&self.pins().reasons());
        }
    }

    /// Applies a committed effect to the client and to the server that ran it.
    pub fn commit(&mut self, effect: &Effect, server: &mut ServerSession) {
        match effect {
            Effect::Set { key, replay } => {
                Arc::make_mut(&mut self.settings).insert(key.clone(), replay.clone());
                server.settings.insert(key.clone(), replay.clone());
            }
            Effect::Reset { key } => {
                // A dedicated connection goes back to the client's startup value; the shared one
                // went back to pgtether's, so the next sync re-applies the client's.
                self.reset_key(key);
                server.settings.remove(key);
            }
            Effect::ResetAll => {
                self.settings = self.startup.clone();
                server.settings.clear();
            }
            Effect::DiscardAll => {
                self.settings = self.startup.clone();
                self.statements.clear();
                // LOAD cannot be undone: its pin stays.
                let load = self.pins().load;
                self.pins = load.then(|| {
                    Box::new(Pins {
                        load,
                        ..Pins::default()
                    })
                });
                server.reset();
            }
            Effect::DiscardTemp => self.unpin(|p| p.temp = false),
            Effect::DiscardSequences => self.unpin(|p| p.sequence = false),
            Effect::Unlisten { channel: None } => self.unpin(|p| p.listen.clear()),
            Effect::Unlisten { channel: Some(c) } => self.unpin(|p| {
                p.listen.remove(c);
            }),
            Effect::UnlockAll => self.unpin(|p| p.advisory = 0),
            Effect::Unlock => self.unpin(|p| p.advisory = p.advisory.saturating_sub(1)),
            Effect::CloseCursor { name: None } => self.unpin(|p| p.held_cursors.clear()),
            Effect::CloseCursor { name: Some(n) } => self.unpin(|p| {
                p.held_cursors.remove(n);
            }),
            Effect::Deallocate { name: None } => {
                // DEALLOCATE ALL drops protocol-level statements too.
                self.unpin(|p| p.sql_prepared.clear());
                self.statements.clear();
                server.statements.clear();
            }
            Effect::Deallocate { name: Some(n) } => self.unpin(|p| {
                p.sql_prepared.remove(n);
            }),
            _ => {}
        }
        if !matches!(
            effect,
            Effect::Set { .. } | Effect::Reset { .. } | Effect::ResetAll
        ) {
            self.publish_pins();
        }
    }

    fn reset_key(&mut self, key: &str) {
        if self.settings.get(key) == self.startup.get(key) {
            return;
        }
        let settings = Arc::make_mut(&mut self.settings);
        match self.startup.get(key) {
            Some(v) => {
                settings.insert(key.to_string(), v.clone());
            }
            None => {
                settings.remove(key);
            }
        }
    }
}

/// The settings a client's startup packet asks for (options included), as (name, value).
pub fn startup_overrides(params: &[(String, String)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, value) in params {
        if name == "options" {
            out.extend(parse_options(value));
        } else if !NOT_SETTINGS.contains(&name.as_str()) {
            out.push((name.clone(), value.clone()));
        }
    }
    out
}

/// What gives setting `name` the startup value `value` (a raw string, as PostgreSQL takes
/// startup parameters, so `search_path=a,public` stays a list of two schemas).
fn replay_set(name: &str, value: &str) -> String {
    replay_set_config(&name.to_ascii_lowercase(), value)
}

/// `-c name=value` and `--name=value` pairs of the `options` startup parameter
/// (backslash escapes a space, as libpq documents).
pub fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let pair = if w == "-c" {
            it.next()
        } else if let Some(rest) = w.strip_prefix("-c") {
            Some(rest.to_string())
        } else {
            w.strip_prefix("--").map(str::to_string)
        };
        if let Some((n, v)) = pair.as_deref().and_then(|p| p.split_once('=')) {
            out.push((n.replace('-', "_"), v.to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(pairs: &[(&str, &str)]) -> ClientSession {
        let params: Vec<_> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        ClientSession::from_startup(&params, &SharedStartup::default())
    }

    #[test]
    fn options_parse() {
        assert_eq!(
            parse_options(
                "-c search_path=a,b --statement-timeout=5s -csynchronous_commit=off -c x=a\\ b"
            ),
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("synchronous_commit".into(), "off".into()),
                ("x".into(), "a b".into()),
            ]
        );
    }

    #[test]
    fn startup_params_become_settings() {
        let c = startup(&[
            ("user", "u"),
            ("database", "d"),
            ("TimeZone", "UTC"),
            ("options", "-c work_mem=8MB"),
        ]);
        assert_eq!(
            c.settings.get("timezone").unwrap(),
            "SELECT pg_catalog.set_config('timezone', 'UTC', false)"
        );
        assert_eq!(
            c.settings.get("work_mem").unwrap(),
            "SELECT pg_catalog.set_config('work_mem', '8MB', false)"
        );
        assert_eq!(
            c.settings.get("application_name").unwrap(),
            "SELECT pg_catalog.set_config('application_name', '', false)"
        );
        assert!(!c.settings.contains_key("user"));
    }

    #[test]
    fn sync_is_the_difference_and_then_nothing() {
        let mut c = startup(&[("application_name", "a")]);
        let mut server = ServerSession::new(10);
        server
            .settings
            .insert("search_path".into(), "SET search_path TO x".into());
        let sql = c.sync_sql(&mut server).unwrap();
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config('application_name', 'a', false); RESET \"search_path\"; "
        );
        assert_eq!(c.sync_sql(&mut server), None);
        c.commit(
            &Effect::Set {
                key: "search_path".into(),
                replay: "SET search_path TO y".into(),
            },
            &mut server,
        );
        assert_eq!(
            c.sync_sql(&mut server),
            None,
            "the server that ran the SET has it"
        );
    }

    #[test]
    fn reset_returns_to_startup_value() {
        let mut c = startup(&[("application_name", "a")]);
        let mut server = ServerSession::new(10);
        let set = Effect::Set {
            key: "application_name".into(),
            replay: "SET application_name TO b".into(),
        };
        c.commit(&set, &mut server);
        c.commit(
            &Effect::Reset {
                key: "application_name".into(),
            },
            &mut server,
        );
        assert_eq!(
            c.settings.get("application_name").unwrap(),
            "SELECT pg_catalog.set_config('application_name', 'a', false)"
        );
        // The server went back to its own default, so a sync re-applies the startup value.
        assert!(c.sync_sql(&mut server).unwrap().contains("'a'"));
        c.commit(&set, &mut server);
        c.commit(&Effect::ResetAll, &mut server);
        assert_eq!(*c.settings, *startup(&[("application_name", "a")]).settings);
    }

    #[test]
    fn pins_come_and_go() {
        let mut c = startup(&[]);
        let mut server = ServerSession::new(10);
        c.pin(&Effect::Listen {
            channel: "x".into(),
        });
        c.pin(&Effect::Pin(PinReason::AdvisoryLock));
        c.pin(&Effect::Pin(PinReason::AdvisoryLock));
        assert_eq!(
            c.pins().reasons(),
            vec![PinReason::Listen, PinReason::AdvisoryLock]
        );
        c.commit(&Effect::Unlisten { channel: None }, &mut server);
        c.commit(&Effect::Unlock, &mut server);
        assert!(c.pins().is_pinned());
        c.commit(&Effect::Unlock, &mut server);
        assert!(!c.pins().is_pinned());
        c.pin(&Effect::Pin(PinReason::Load));
        c.pin(&Effect::Pin(PinReason::TempTable));
        c.commit(&Effect::DiscardAll, &mut server);
        assert_eq!(
            c.pins().reasons(),
            vec![PinReason::Load],
            "LOAD lasts until disconnect"
        );
    }
}
