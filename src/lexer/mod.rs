//! The cheap keyword lexer that spots statements touching session state.
//!
//! No SQL parser: statements are split at top-level semicolons (comments, quoted identifiers,
//! string literals and dollar quotes skipped), and each is classified by its leading keywords.
//! Statements that usually cannot touch session state (SELECT, INSERT, …) cost one keyword
//! check plus one pass of a case-insensitive substring search for the few functions and
//! clauses that can (advisory locks, set_config, currval/lastval, INTO TEMP).

use std::cell::RefCell;
use std::sync::OnceLock;

use aho_corasick::AhoCorasick;

mod effect;
pub use effect::{Effect, PinReason};

/// Appends the session-state effects of every statement in `sql` to `out`.
pub fn analyze(sql: &str, out: &mut Vec<Effect>) {
    analyze_bytes(sql.as_bytes(), out);
}

/// [`analyze`] of a text still in its message's bytes: a remembered text skips the UTF-8
/// check as well. A text that is not UTF-8 has no effects (PostgreSQL refuses it).
pub fn analyze_bytes(sql: &[u8], out: &mut Vec<Effect>) {
    // Hot path: a text seen before without effects (see `Plain`), or one without any word
    // that can start or hide a session-state change (most SELECT/INSERT texts), is done
    // after a comparison or one case-insensitive scan.
    let Some(slot) = Plain::unseen(sql) else {
        return;
    };
    let before = out.len();
    if candidate_words().is_match(sql) {
        match std::str::from_utf8(sql) {
            Ok(text) => {
                for stmt in Statements::new(text) {
                    analyze_statement(stmt, out);
                }
            }
            // Text in another client encoding (LATIN1, EUC, …): its ASCII, where keywords,
            // quotes and semicolons are, reads the same, so it is lexed with the other bytes
            // replaced. An effect naming replaced text cannot be replayed as sent: the client
            // is pinned instead, and its server connection keeps the exact state.
            // In the client-only encodings (SJIS, BIG5, GBK, UHC, GB18030, JOHAB) the second
            // byte of a character can be a backslash, which would end or extend an E'' string
            // where PostgreSQL does not: where one follows a non-ASCII byte, the lexing is not
            // to be trusted, and the client is pinned.
            Err(_) if sql.windows(2).any(|w| w[0] >= 0x80 && w[1] == b'\\') => {
                out.push(Effect::Pin(PinReason::Untracked));
            }
            Err(_) => {
                let text = String::from_utf8_lossy(sql);
                for stmt in Statements::new(&text) {
                    analyze_statement(stmt, out);
                }
                for e in &mut out[before..] {
                    if e.names_replaced_text() {
                        *e = Effect::Pin(PinReason::Untracked);
                    }
                }
            }
        }
    }
    // An UPDATE … SET has a candidate word and no effect: remembered as well.
    if out.len() == before {
        slot.remember(sql);
    }
}

/// Splits SQL text into statements at top-level semicolons.
pub struct Statements<'a> {
    sql: &'a str,
    pos: usize,
}

impl<'a> Statements<'a> {
    pub fn new(sql: &'a str) -> Self {
        Statements { sql, pos: 0 }
    }
}

impl<'a> Iterator for Statements<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        loop {
            if self.pos >= self.sql.len() {
                return None;
            }
            let start = self.pos;
            let mut lx = Lexer::at(self.sql, start);
            let mut end = self.sql.len();
            while let Some(tok) = lx.next_token() {
                if tok == Token::Punct(b';') {
                    end = lx.pos - 1;
                    break;
                }
            }
            self.pos = if end == self.sql.len() { end } else { end + 1 };
            let stmt = self.sql[start..end].trim();
            if !stmt.is_empty() && Lexer::at(stmt, 0).next_token().is_some() {
                return Some(stmt);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    /// An unquoted word (keyword or identifier), as written.
    Word(&'a str),
    /// A double-quoted identifier, without quotes (doubled quotes not undone).
    Quoted(&'a str),
    /// A string literal's raw text including quotes / prefix.
    Str(&'a str),
    Punct(u8),
    /// Numbers, parameters ($1) and other operands.
    Other,
}

struct Lexer<'a> {
    s: &'a str,
    b: &'a [u8],
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn at(s: &'a str, pos: usize) -> Self {
        Lexer {
            s,
            b: s.as_bytes(),
            pos,
        }
    }

    fn skip_space_and_comments(&mut self) {
        loop {
            while self.pos < self.b.len() && self.b[self.pos].is_ascii_whitespace() {
                self.pos += 1;
            }
            if self.b[self.pos..].starts_with(b"--") {
                while self.pos < self.b.len() && self.b[self.pos] != b'\n' {
                    self.pos += 1;
                }
            } else if self.b[self.pos..].starts_with(b"/*") {
                // Block comments nest in PostgreSQL.
                let mut depth = 0usize;
                while self.pos < self.b.len() {
                    if self.b[self.pos..].starts_with(b"/*") {
                        depth += 1;
                        self.pos += 2;
                    } else if self.b[self.pos..].starts_with(b"*/") {
                        depth -= 1;
                        self.pos += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        self.pos += 1;
                    }
                }
            } else {
                return;
            }
        }
    }

    fn next_token(&mut self) -> Option<Token<'a>> {
        self.skip_space_and_comments();
        let start = self.pos;
        let c = *self.b.get(self.pos)?;
        match c {
            b'\'' => {
                self.quoted_string(false);
                Some(Token::Str(&self.s[start..self.pos]))
            }
            b'e' | b'E' if self.b.get(self.pos + 1) == Some(&b'\'') => {
                self.pos += 1;
                self.quoted_string(true);
                Some(Token::Str(&self.s[start..self.pos]))
            }
            b'"' => {
                self.pos += 1;
                // An unterminated identifier runs to the end of the text. (Cutting one byte
                // off the end instead could split a multi-byte character: a panic.)
                let mut end = self.b.len();
                loop {
                    match self.b.get(self.pos) {
                        None => break,
                        Some(b'"') if self.b.get(self.pos + 1) == Some(&b'"') => self.pos += 2,
                        Some(b'"') => {
                            end = self.pos;
                            self.pos += 1;
                            break;
                        }
                        Some(_) => self.pos += 1,
                    }
                }
                self.pos = self.pos.min(self.b.len());
                Some(Token::Quoted(&self.s[start + 1..end]))
            }
            b'$' => {
                if let Some(tag_len) = self.dollar_tag() {
                    let tag = &self.b[start..start + tag_len];
                    self.pos = start + tag_len;
                    match find(&self.b[self.pos..], tag) {
                        Some(i) => self.pos += i + tag_len,
                        None => self.pos = self.b.len(),
                    }
                    Some(Token::Str(&self.s[start..self.pos]))
                } else {
                    self.pos += 1;
                    while self.pos < self.b.len() && self.b[self.pos].is_ascii_digit() {
                        self.pos += 1;
                    }
                    Some(Token::Other)
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                while self.pos < self.b.len() {
                    let c = self.b[self.pos];
                    if c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80 {
                        self.pos += 1;
                    } else {
                        break;
                    }
                }
                Some(Token::Word(&self.s[start..self.pos]))
            }
            c if c.is_ascii_digit() => {
                while self.pos < self.b.len()
                    && (self.b[self.pos].is_ascii_alphanumeric() || self.b[self.pos] == b'.')
                {
                    self.pos += 1;
                }
                Some(Token::Other)
            }
            c => {
                self.pos += 1;
                Some(Token::Punct(c))
            }
        }
    }

    /// At a `$`: the length of a dollar-quote tag (`$$` or `$name$`), if this is one.
    fn dollar_tag(&self) -> Option<usize> {
        let mut i = self.pos + 1;
        while i < self.b.len() {
            let c = self.b[i];
            if c == b'$' {
                return Some(i - self.pos + 1);
            }
            let ok = if i == self.pos + 1 {
                c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
            } else {
                c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
            };
            if !ok {
                return None;
            }
            i += 1;
        }
        None
    }

    fn quoted_string(&mut self, backslash_escapes: bool) {
        self.pos += 1;
        while self.pos < self.b.len() {
            match self.b[self.pos] {
                b'\\' if backslash_escapes => self.pos += 2,
                b'\'' if self.b.get(self.pos + 1) == Some(&b'\'') => self.pos += 2,
                b'\'' => {
                    self.pos += 1;
                    return;
                }
                _ => self.pos += 1,
            }
        }
        self.pos = self.pos.min(self.b.len());
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn is_kw(tok: Option<Token<'_>>, kw: &str) -> bool {
    matches!(tok, Some(Token::Word(w)) if w.eq_ignore_ascii_case(kw))
}

/// A name token (word or quoted identifier) as PostgreSQL folds it.
fn name_of(tok: Option<Token<'_>>) -> Option<String> {
    match tok? {
        Token::Word(w) => Some(w.to_ascii_lowercase()),
        Token::Quoted(q) => Some(q.replace("\"\"", "\"")),
        _ => None,
    }
}

/// The value of a simple string literal ('…' with doubled quotes), if the token is one.
fn literal_value(tok: Option<Token<'_>>) -> Option<String> {
    match tok? {
        Token::Str(s) if s.starts_with('\'') && s.ends_with('\'') && s.len() >= 2 => {
            Some(s[1..s.len() - 1].replace("''", "'"))
        }
        _ => None,
    }
}

/// Texts recently found to have no session-state effect, per thread. Applications send the
/// same few texts over and over (every unnamed Parse repeats its text), and comparing a text
/// with the one last seen in its slot costs a fraction of the scan, and far less than
/// splitting and lexing a text that has a candidate word (an UPDATE … SET) but no effect.
/// The analysis depends on nothing but the text, so a remembered verdict stays true.
struct Plain(usize);

/// Two ways per set, the newer first: two texts of one application that share a set (as
/// likely as not among seven texts in 32 sets) both stay.
type Ways = [Option<Box<[u8]>>; 2];

thread_local! {
    static PLAIN: RefCell<[Ways; Plain::SETS]> = const { RefCell::new([const { [None, None] }; Plain::SETS]) };
}

impl Plain {
    const SETS: usize = 32;
    /// Longer texts are analyzed every time, which bounds the memory to 32 kB per thread.
    const MAX_REMEMBERED: usize = 512;

    /// `None` when `sql` is remembered as plain; otherwise its set, to remember it in.
    fn unseen(sql: &[u8]) -> Option<Plain> {
        use std::hash::BuildHasher;
        // The whole text is hashed: the texts of one application often differ in a word or
        // two (pgbench's three UPDATEs differ in a table and a column name).
        let hash = foldhash::fast::FixedState::with_seed(0).hash_one(sql);
        let set = (hash >> 59) as usize % Self::SETS;
        let seen = PLAIN
            .try_with(|p| p.borrow()[set].iter().any(|w| w.as_deref() == Some(sql)))
            .unwrap_or(false);
        (!seen).then_some(Plain(set))
    }

    fn remember(self, sql: &[u8]) {
        if sql.len() <= Self::MAX_REMEMBERED {
            let _ = PLAIN.try_with(|p| {
                let ways = &mut p.borrow_mut()[self.0];
                ways[1] = ways[0].replace(sql.into());
            });
        }
    }
}

/// Every word whose presence makes a text worth splitting and classifying: the leading
/// keywords handled in `analyze_statement` and the substrings of [`risky_words`].
fn candidate_words() -> &'static AhoCorasick {
    static AC: OnceLock<AhoCorasick> = OnceLock::new();
    AC.get_or_init(|| {
        AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build([
                "set",
                "discard",
                "listen",
                "load",
                "declare",
                "close",
                "prepare",
                "deallocate",
                "create",
                "advisory",
                "currval",
                "lastval",
                "temp",
            ])
            .expect("static patterns build")
    })
}

/// Substrings that can make an otherwise plain statement touch session state.
fn risky_words() -> &'static AhoCorasick {
    static AC: OnceLock<AhoCorasick> = OnceLock::new();
    AC.get_or_init(|| {
        AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(["advisory", "set_config", "currval", "lastval", "temp"])
            .expect("static patterns build")
    })
}

fn analyze_statement(stmt: &str, out: &mut Vec<Effect>) {
    let mut lx = Lexer::at(stmt, 0);
    let Some(Token::Word(first)) = lx.next_token() else {
        return;
    };
    // The common case: one keyword comparison decides the statement needs nothing more.
    match first.to_ascii_lowercase().as_str() {
        "set" => set_statement(stmt, lx, out),
        "reset" => reset_statement(lx, out),
        "discard" => match name_of(lx.next_token()).as_deref() {
            Some("all") => out.push(Effect::DiscardAll),
            Some("temp") | Some("temporary") => out.push(Effect::DiscardTemp),
            Some("sequences") => out.push(Effect::DiscardSequences),
            _ => {}
        },
        "listen" => {
            if let Some(channel) = name_of(lx.next_token()) {
                out.push(Effect::Listen { channel });
            }
        }
        "unlisten" => match lx.next_token() {
            Some(Token::Punct(b'*')) => out.push(Effect::Unlisten { channel: None }),
            t => {
                if let Some(channel) = name_of(t) {
                    out.push(Effect::Unlisten {
                        channel: Some(channel),
                    });
                }
            }
        },
        "load" => out.push(Effect::Pin(PinReason::Load)),
        "declare" => {
            let name = name_of(lx.next_token()).unwrap_or_default();
            // DECLARE name [BINARY] [ASENSITIVE|INSENSITIVE] [[NO] SCROLL] CURSOR [{WITH|WITHOUT} HOLD] FOR …
            let mut prev_with = false;
            while let Some(t) = lx.next_token() {
                if is_kw(Some(t), "for") {
                    break;
                }
                if is_kw(Some(t), "hold") && prev_with {
                    out.push(Effect::HeldCursor { name });
                    break;
                }
                prev_with = is_kw(Some(t), "with");
            }
        }
        "close" => match lx.next_token() {
            t if is_kw(t, "all") => out.push(Effect::CloseCursor { name: None }),
            t => {
                if let Some(name) = name_of(t) {
                    out.push(Effect::CloseCursor { name: Some(name) });
                }
            }
        },
        "prepare" => {
            let t = lx.next_token();
            if !is_kw(t, "transaction") {
                if let Some(name) = name_of(t) {
                    out.push(Effect::SqlPrepare { name });
                }
            }
        }
        "deallocate" => {
            let mut t = lx.next_token();
            if is_kw(t, "prepare") {
                t = lx.next_token();
            }
            if is_kw(t, "all") {
                out.push(Effect::Deallocate { name: None });
            } else if let Some(name) = name_of(t) {
                out.push(Effect::Deallocate { name: Some(name) });
            }
        }
        "create" => create_statement(stmt, lx, out),
        _ => {
            if risky_words().is_match(stmt) {
                function_effects(stmt, out);
            }
        }
    }
}

fn set_statement(stmt: &str, mut lx: Lexer<'_>, out: &mut Vec<Effect>) {
    let mut t = lx.next_token();
    if is_kw(t, "local") {
        return; // SET LOCAL never outlives the transaction.
    }
    if is_kw(t, "session") {
        t = lx.next_token();
        if is_kw(t, "authorization") {
            out.push(set(stmt, "session_authorization"));
            return;
        }
        if is_kw(t, "characteristics") {
            out.push(Effect::Pin(PinReason::Untracked));
            return;
        }
    }
    let key = match name_of(t).as_deref() {
        Some("transaction") | Some("constraints") => return,
        Some("time") => "timezone".to_string(),
        Some("schema") => "search_path".to_string(),
        Some("names") => "client_encoding".to_string(),
        Some(name) => dotted_name(name, &mut lx),
        None => return,
    };
    out.push(set(stmt, &key));
}

/// A setting name that may continue with `.part` (custom settings such as `myapp.setting`).
fn dotted_name(first: &str, lx: &mut Lexer<'_>) -> String {
    let mut key = first.to_string();
    while lx.b.get(lx.pos) == Some(&b'.') {
        lx.pos += 1;
        match name_of(lx.next_token()) {
            Some(part) => {
                key.push('.');
                key.push_str(&part);
            }
            None => break,
        }
    }
    key
}

fn set(stmt: &str, key: &str) -> Effect {
    Effect::Set {
        key: key.to_string(),
        replay: without_trailing_comments(stmt).to_string(),
    }
}

/// The statement up to the end of its last token: a trailing `-- comment` would otherwise
/// swallow whatever pgtether appends after the statement when it replays it.
fn without_trailing_comments(stmt: &str) -> &str {
    let mut lx = Lexer::at(stmt, 0);
    let mut end = 0;
    while lx.next_token().is_some() {
        end = lx.pos.min(stmt.len());
    }
    &stmt[..end]
}

fn reset_statement(mut lx: Lexer<'_>, out: &mut Vec<Effect>) {
    let t = lx.next_token();
    let key = match name_of(t).as_deref() {
        Some("all") => {
            out.push(Effect::ResetAll);
            return;
        }
        Some("time") => "timezone".to_string(),
        Some("session") => "session_authorization".to_string(),
        Some(name) => dotted_name(name, &mut lx),
        None => return,
    };
    out.push(Effect::Reset { key });
}

fn create_statement(stmt: &str, mut lx: Lexer<'_>, out: &mut Vec<Effect>) {
    let mut t = lx.next_token();
    if is_kw(t, "or") {
        lx.next_token(); // REPLACE
        t = lx.next_token();
    }
    if is_kw(t, "global") || is_kw(t, "local") {
        t = lx.next_token();
    }
    let temp = is_kw(t, "temp") || is_kw(t, "temporary");
    // CREATE TABLE pg_temp.x …
    let in_pg_temp = !temp
        && (is_kw(t, "table") || is_kw(t, "view") || is_kw(t, "sequence"))
        && matches!(name_of(lx.next_token()).as_deref(), Some("pg_temp"));
    if (temp || in_pg_temp) && !contains_words(stmt, &["on", "commit", "drop"]) {
        out.push(Effect::Pin(PinReason::TempTable));
    }
}

/// Whether the statement contains the words in sequence (tokens, so strings do not count).
fn contains_words(stmt: &str, words: &[&str]) -> bool {
    let mut lx = Lexer::at(stmt, 0);
    let mut matched = 0;
    while let Some(t) = lx.next_token() {
        if is_kw(Some(t), words[matched]) {
            matched += 1;
            if matched == words.len() {
                return true;
            }
        } else {
            matched = usize::from(is_kw(Some(t), words[0]));
        }
    }
    false
}

/// Function calls and clauses inside otherwise plain statements.
fn function_effects(stmt: &str, out: &mut Vec<Effect>) {
    let mut lx = Lexer::at(stmt, 0);
    let mut prev: Option<Token<'_>> = None;
    while let Some(t) = lx.next_token() {
        if let Token::Word(w) = t {
            let w = w.to_ascii_lowercase();
            match w.as_str() {
                "pg_advisory_lock"
                | "pg_try_advisory_lock"
                | "pg_advisory_lock_shared"
                | "pg_try_advisory_lock_shared" => out.push(Effect::Pin(PinReason::AdvisoryLock)),
                "pg_advisory_unlock" | "pg_advisory_unlock_shared" => out.push(Effect::Unlock),
                "pg_advisory_unlock_all" => out.push(Effect::UnlockAll),
                "currval" | "lastval" => out.push(Effect::Pin(PinReason::Sequence)),
                "set_config" => out.extend(set_config(&mut lx)),
                "temp" | "temporary" if is_kw(prev, "into") => {
                    out.push(Effect::Pin(PinReason::TempTable))
                }
                _ => {}
            }
        }
        prev = Some(t);
    }
}

/// `set_config('name', 'value', is_local)` with literal arguments; computed arguments pin.
/// A transaction-local call has no lasting effect.
fn set_config(lx: &mut Lexer<'_>) -> Option<Effect> {
    let mut args = || -> Option<(String, String, bool)> {
        if lx.next_token() != Some(Token::Punct(b'(')) {
            return None;
        }
        let name = literal_value(lx.next_token())?.to_ascii_lowercase();
        if lx.next_token() != Some(Token::Punct(b',')) {
            return None;
        }
        let value = literal_value(lx.next_token())?;
        if lx.next_token() != Some(Token::Punct(b',')) {
            return None;
        }
        let local = match lx.next_token() {
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("true") => true,
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("false") => false,
            _ => return None,
        };
        (lx.next_token() == Some(Token::Punct(b')'))).then_some((name, value, local))
    };
    match args() {
        Some((_, _, true)) => None,
        Some((name, value, false)) => Some(Effect::Set {
            replay: replay_set_config(&name, &value),
            key: name,
        }),
        None => Some(Effect::Pin(PinReason::Untracked)),
    }
}

/// SQL that gives setting `name` the raw string `value` for the session, as a startup
/// parameter or `set_config` would. Not `SET name TO 'value'`: for list settings such as
/// search_path that makes the whole string one quoted element (`"a,public"`).
pub fn replay_set_config(name: &str, value: &str) -> String {
    format!(
        "SELECT pg_catalog.set_config({}, {}, false)",
        quote_literal(name),
        quote_literal(value)
    )
}

/// `name` or `a.b` as identifiers safe to splice into SQL.
pub fn quote_ident_path(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

/// A standard-conforming string literal.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests;
