//! Protocol-level prepared statements as pgtether shares them between clients.
//!
//! A client's named statement is interned by (query text, parameter types) into a
//! [`Statement`] with a process-wide id; every server connection prepares it at most once,
//! under pgtether's own name `pgtether_<id>`, however many clients use it. Each server keeps
//! its statements in an LRU bounded by `max_prepared_statements`.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, Weak};

use bytes::{BufMut, Bytes, BytesMut};
use lru::LruCache;

use crate::lexer::{self, Effect};

/// One distinct statement (query text + parameter types).
#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    /// `pgtether_<id>`, NUL-terminated, ready to splice into Bind/Describe/Close messages.
    pub server_name: Bytes,
    /// The whole Parse message that prepares it under `server_name`.
    pub parse_message: Bytes,
    /// What executing it does to session state (usually nothing), found once by the lexer.
    pub effects: Vec<Effect>,
}

impl Statement {
    /// Whether a Parse body whose statement name ends at `after_name` (query text, NUL,
    /// parameter types) prepares this statement: a client re-parsing its unnamed statement
    /// with the same text is matched without the registry's lock and copies.
    pub fn is_parsed_by(&self, after_name: &[u8]) -> bool {
        self.parse_message.get(5 + self.server_name.len()..) == Some(after_name)
    }
}

#[derive(Hash, PartialEq, Eq)]
struct Key {
    query: Bytes,
    param_types: Bytes,
}

/// Interns statements; shared by every pool.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    by_key: HashMap<Key, Weak<Statement>>,
    /// The same statements by id: a takeover exports what a server connection holds by id
    /// and must not reuse an id that is still alive.
    by_id: HashMap<u64, Weak<Statement>>,
    next_id: u64,
    /// Size after the last sweep of dead entries; the next sweep runs at twice this.
    swept_at: usize,
}

impl Registry {
    /// The statement for this query text and raw parameter-type section (Int16 count and
    /// Int32 oids, as in the Parse message). Called once per client Parse, not per execution.
    pub fn intern(&self, query: &[u8], param_types: &[u8]) -> Arc<Statement> {
        let key = Key {
            query: Bytes::copy_from_slice(query),
            param_types: Bytes::copy_from_slice(param_types),
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = inner.by_key.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        let id = inner.fresh_id();
        inner.insert(key, build(id, query, param_types))
    }

    /// A statement another pgtether process handed over under `id`: the same statement if
    /// this process knows the text, else a new one that keeps `id` (the server connections
    /// that came along know it by that name) unless the id is taken here.
    pub fn adopt(&self, id: u64, query: &[u8], param_types: &[u8]) -> Arc<Statement> {
        let key = Key {
            query: Bytes::copy_from_slice(query),
            param_types: Bytes::copy_from_slice(param_types),
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = inner.by_key.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        let taken = inner.by_id.get(&id).is_some_and(|w| w.strong_count() > 0);
        let id = if taken || id == 0 {
            inner.fresh_id()
        } else {
            id
        };
        inner.insert(key, build(id, query, param_types))
    }

    /// The live statement with this id.
    pub fn get(&self, id: u64) -> Option<Arc<Statement>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.by_id.get(&id).and_then(Weak::upgrade)
    }
}

impl RegistryInner {
    fn fresh_id(&mut self) -> u64 {
        if self.next_id == 0 {
            // Each process numbers from its own random base, so that statements handed over
            // from another process (whose servers know them as pgtether_<id>) rarely collide.
            self.next_id = u64::from(rand::random::<u32>()) << 24;
        }
        loop {
            self.next_id += 1;
            if !self.by_id.contains_key(&self.next_id) {
                return self.next_id;
            }
        }
    }

    fn insert(&mut self, key: Key, stmt: Statement) -> Arc<Statement> {
        let stmt = Arc::new(stmt);
        self.by_key.insert(key, Arc::downgrade(&stmt));
        self.by_id.insert(stmt.id, Arc::downgrade(&stmt));
        if self.by_key.len() > (self.swept_at * 2).max(1024) {
            // Statements no client holds any more are forgotten; servers may keep theirs
            // until evicted, under names that are never reused.
            self.by_key.retain(|_, w| w.strong_count() > 0);
            self.by_id.retain(|_, w| w.strong_count() > 0);
            self.swept_at = self.by_key.len();
        }
        stmt
    }
}

impl Statement {
    /// The query text and the raw parameter-type section, as the client's Parse had them.
    pub fn query_and_types(&self) -> (&[u8], &[u8]) {
        // P, length, name NUL, query NUL, types.
        let rest = &self.parse_message[5 + self.server_name.len()..];
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        (&rest[..end], rest.get(end + 1..).unwrap_or(&[]))
    }
}

fn build(id: u64, query: &[u8], param_types: &[u8]) -> Statement {
    let mut name = BytesMut::with_capacity(24);
    name.put_slice(format!("pgtether_{id}").as_bytes());
    name.put_u8(0);
    let name = name.freeze();
    let mut msg = BytesMut::with_capacity(5 + name.len() + query.len() + 1 + param_types.len());
    msg.put_u8(b'P');
    msg.put_i32((4 + name.len() + query.len() + 1 + param_types.len()) as i32);
    msg.put_slice(&name);
    msg.put_slice(query);
    msg.put_u8(0);
    msg.put_slice(param_types);
    let mut effects = Vec::new();
    if let Ok(text) = std::str::from_utf8(query) {
        lexer::analyze(text, &mut effects);
    }
    Statement {
        id,
        server_name: name,
        parse_message: msg.freeze(),
        effects,
    }
}

/// The statements one server connection holds, most recently used last.
#[derive(Debug)]
pub struct ServerStatements {
    lru: LruCache<u64, Bytes>,
}

impl ServerStatements {
    pub fn new(capacity: usize) -> Self {
        ServerStatements {
            lru: LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("at least one")),
        }
    }

    /// Whether the server has the statement; marks it used.
    pub fn touch(&mut self, id: u64) -> bool {
        self.lru.get(&id).is_some()
    }

    /// Records that the server now has `stmt`. Returns the id and server name of a statement
    /// that must be closed on the server to stay within capacity.
    pub fn insert(&mut self, stmt: &Statement) -> Option<(u64, Bytes)> {
        match self.lru.push(stmt.id, stmt.server_name.clone()) {
            Some((old, name)) if old != stmt.id => Some((old, name)),
            _ => None,
        }
    }

    /// Re-records a statement whose Close did not run (e.g. skipped after an error).
    pub fn restore(&mut self, id: u64, server_name: Bytes) {
        if self.lru.len() < self.lru.cap().get() {
            self.lru.put(id, server_name);
        }
    }

    pub fn remove(&mut self, id: u64) {
        self.lru.pop(&id);
    }

    pub fn clear(&mut self) {
        self.lru.clear();
    }

    /// Forgets every statement, returning their ids and server names (to close them).
    pub fn take_all(&mut self) -> Vec<(u64, Bytes)> {
        let mut all = Vec::with_capacity(self.lru.len());
        while let Some(entry) = self.lru.pop_lru() {
            all.push(entry);
        }
        all
    }

    /// Statement ids, least recently used first.
    pub fn ids(&self) -> Vec<u64> {
        self.lru.iter().rev().map(|(id, _)| *id).collect()
    }

    pub fn len(&self) -> usize {
        self.lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_and_types_share_one_statement() {
        let r = Registry::default();
        let a = r.intern(b"SELECT $1", b"\0\x01\0\0\0\x17");
        let b = r.intern(b"SELECT $1", b"\0\x01\0\0\0\x17");
        let c = r.intern(b"SELECT $1", b"\0\0");
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(
            &a.server_name[..],
            format!("pgtether_{}\0", a.id).as_bytes()
        );
    }

    #[test]
    fn adopted_statements_keep_their_id_unless_taken() {
        let r = Registry::default();
        let mine = r.intern(b"SELECT 1", b"\0\0");
        let same = r.adopt(mine.id + 1000, b"SELECT 1", b"\0\0");
        assert_eq!(same.id, mine.id, "known text: this process's statement");
        let kept = r.adopt(12345, b"SELECT 2", b"\0\0");
        assert_eq!(kept.id, 12345);
        assert_eq!(kept.query_and_types(), (&b"SELECT 2"[..], &b"\0\0"[..]));
        let clash = r.adopt(12345, b"SELECT 3", b"\0\0");
        assert_ne!(clash.id, 12345, "a live id is never reused for other text");
        assert_eq!(r.get(12345).map(|s| s.id), Some(12345));
    }

    #[test]
    fn parse_message_is_well_formed() {
        let r = Registry::default();
        let s = r.intern(b"SELECT 1", b"\0\0");
        let m = &s.parse_message;
        assert_eq!(m[0], b'P');
        let len = i32::from_be_bytes([m[1], m[2], m[3], m[4]]) as usize;
        assert_eq!(len + 1, m.len());
        assert!(m.ends_with(b"SELECT 1\0\0\0"));
    }

    #[test]
    fn lru_evicts_least_recently_used() {
        let r = Registry::default();
        let s: Vec<_> = (0..3)
            .map(|i| r.intern(format!("SELECT {i}").as_bytes(), b"\0\0"))
            .collect();
        let mut lru = ServerStatements::new(2);
        assert_eq!(lru.insert(&s[0]), None);
        assert_eq!(lru.insert(&s[1]), None);
        assert!(lru.touch(s[0].id));
        assert_eq!(lru.insert(&s[2]), Some((s[1].id, s[1].server_name.clone())));
        assert!(!lru.touch(s[1].id));
        assert!(lru.touch(s[0].id) && lru.touch(s[2].id));
    }
}
