//! What the relay learns from the messages it moves, and the rewrites that let a client's
//! session follow it across server connections.
//!
//! Client → server: Query and Parse texts go through the lexer (settings, pins); named
//! statements are mapped to pgtether's shared names, prepared lazily on servers that lack
//! them; Close of a statement is answered locally. Server → client: every message is matched
//! against the [`Replies`] queue, so pgtether's own replies are swallowed and synthesized ones
//! are put in their place; ReadyForQuery confirms or discards the effects of a transaction.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::BytesMut;

use super::replies::{Forget, Kind, Replies, Slot, SynthMsg};
use super::state::{pin_of, ClientSession, ServerSession};
use crate::config::{OnPin, PoolMode};
use crate::lexer::{self, Effect};
use crate::metrics::PoolMetrics;
use crate::protocol::backend;
use crate::protocol::frontend as fe;
use crate::protocol::sqlstate;
use crate::statements::{Registry, Statement};

mod prepared;

/// What the server owes the client: the transaction state as seen on the wire.
#[derive(Debug, Clone, Copy)]
pub struct TxState {
    /// ReadyForQuery messages still due to the client (one per Query, Sync, FunctionCall).
    pub pending: u32,
    /// Extended-protocol messages were sent after the last Sync.
    pub unsynced: bool,
    /// Transaction status of the last ReadyForQuery: b'I', b'T' or b'E'.
    pub status: u8,
}

impl Default for TxState {
    fn default() -> Self {
        TxState {
            pending: 0,
            unsynced: false,
            status: b'I',
        }
    }
}

impl TxState {
    /// The server owes nothing and is outside a transaction.
    pub fn is_clean(&self) -> bool {
        self.pending == 0 && !self.unsynced && self.status == b'I'
    }
}

/// Counters the relay feeds, published into Prometheus by the session.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub queries: u64,
    pub transactions: u64,
    /// Bytes read from the client.
    pub received: u64,
    /// Bytes written to the client.
    pub sent: u64,
}

/// Read-only context of one client's pool.
pub struct Ctx<'a> {
    pub registry: &'a Registry,
    pub metrics: &'a PoolMetrics,
    pub mode: PoolMode,
    pub on_pin: OnPin,
    pub tracking: bool,
    /// `pool.prepare_unnamed`: the client's unnamed statement is one of the shared ones.
    pub prepare_unnamed: bool,
}

/// What to do with one server message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Forward,
    Swallow,
    /// Forward it; the transaction is over and the server connection may be released.
    ForwardAndRelease,
    /// Statement mode: the server entered a transaction block (this ReadyForQuery is held).
    TransactionInStatementMode,
}

impl Step {
    fn forward_if(forward: bool) -> Step {
        if forward {
            Step::Forward
        } else {
            Step::Swallow
        }
    }
}

/// A client's session plus what is in flight on its current server connection.
#[derive(Default)]
pub struct Tracker {
    pub tx: TxState,
    pub counts: Counts,
    pub replies: Replies,
    pub session: ClientSession,
    /// Bookkeeping of statements that change session state, while any are in flight.
    pending: Option<Box<Pending>>,
    /// An error or ROLLBACK since the last idle ReadyForQuery: the transaction did not commit.
    failed: bool,
    /// An error answered pgtether's own statements: the server's state is not what we think.
    pub server_dirty: bool,
    /// A statement on this server failed because a table changed under its plan: its
    /// statements are closed before the next one is used, so they are prepared afresh.
    stale_plans: bool,
    sent_z: u64,
    recv_z: u64,
    /// The server is in COPY IN and the client has not ended it: Sync and Flush are ignored.
    in_copy_in: bool,
    /// The unnamed statement of the server connection held now is one this client parsed
    /// (`prepare_unnamed` off): only then may the client bind or describe it.
    unnamed_parsed: bool,
}

/// What only a transaction with session effects (or a Close, or a dying server) in flight
/// needs. Allocated when first needed and freed at release, so that the plain queries of most
/// transactions never allocate it and an idle client carries one pointer.
#[derive(Default)]
struct Pending {
    /// Effects sent but not yet answered, tagged with the ReadyForQuery number ending them.
    inflight: VecDeque<(u64, Effect)>,
    /// Effects of the open transaction, applied if it commits.
    txn: Vec<Effect>,
    /// The server sent a FATAL error (it is going away): kept for the client, not forwarded,
    /// so the client's connection survives the server's.
    server_fatal: Option<String>,
    /// Statements the client closed whose CloseComplete pgtether has not yet given: if the
    /// server skips the Close's position after an error, the statement is the client's again.
    closed: Vec<(String, Arc<Statement>)>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.inflight.is_empty()
            && self.txn.is_empty()
            && self.server_fatal.is_none()
            && self.closed.is_empty()
    }
}

/// "cached plan must not change result type", told by its SQLSTATE and routine (the message
/// may be translated).
fn is_stale_plan(msg: &[u8]) -> bool {
    backend::error_field(msg, b'C') == Some(b"0A000")
        && backend::error_field(msg, b'R') == Some(b"RevalidateCachedQuery")
}

/// A Parse or Bind pgtether cannot read goes on as an empty message of its type: the server
/// refuses that with its own 08P01 error before doing anything, so the error, the aborted
/// transaction and the skip to Sync are PostgreSQL's, and nothing pgtether could not track
/// reaches the server.
fn refuse_unreadable(tag: u8, why: &dyn std::fmt::Display, out: &mut BytesMut) {
    tracing::debug!(message = %(tag as char), %why, "malformed client message refused");
    fe::write_empty(out, tag);
}

/// Client messages whose body pgtether reads (and may rewrite) when tracking.
pub fn needs_body(tag: u8) -> bool {
    matches!(tag, b'Q' | b'P' | b'B' | b'D' | b'C')
}

impl Tracker {
    pub fn new(session: ClientSession) -> Tracker {
        Tracker {
            session,
            ..Tracker::default()
        }
    }

    /// Called when a server connection is attached, before any client byte is forwarded:
    /// queues the settings that make it match this client.
    pub fn attach(&mut self, server: &mut ServerSession, out: &mut BytesMut, ctx: &Ctx<'_>) {
        self.server_dirty = false;
        self.stale_plans = false;
        self.unnamed_parsed = false;
        if !ctx.tracking {
            return;
        }
        if let Some(sql) = self.session.sync_sql(server) {
            fe::write_query(out, &sql);
            self.replies.push(Slot::Ours(Kind::Query));
            ctx.metrics.state_syncs.inc();
        }
    }

    /// Whether the server connection may go back to the pool now.
    pub fn can_release(&self, mode: PoolMode) -> bool {
        mode != PoolMode::Session
            && self.tx.is_clean()
            && self.replies.is_empty()
            && !self.session.pins().is_pinned()
    }

    /// Bookkeeping for a client message forwarded verbatim (the relay copies its bytes).
    pub fn client_header(&mut self, tag: u8, _ctx: &Ctx<'_>) {
        if self.in_copy_in {
            match tag {
                // The server ignores these until the copy ends.
                b'S' | b'H' => return,
                b'c' | b'f' => self.in_copy_in = false,
                _ => {}
            }
        } else if (tag == b'c' || tag == b'f') && self.replies.may_start_copy() {
            // The client ended a COPY its statement has not started yet (it pipelines). With
            // no statement in flight it is no COPY's end: the server ignores it.
            self.replies.push(Slot::CopyEnd);
        }
        let slot = match tag {
            b'Q' => {
                self.note_z();
                self.counts.queries += 1;
                Some(Kind::Query)
            }
            b'F' => {
                self.note_z();
                Some(Kind::Function)
            }
            b'S' => {
                self.note_z();
                self.tx.unsynced = false;
                Some(Kind::Sync)
            }
            b'E' => {
                self.tx.unsynced = true;
                self.counts.queries += 1;
                Some(Kind::Execute)
            }
            b'P' => {
                self.tx.unsynced = true;
                Some(Kind::Parse(None))
            }
            b'B' => {
                self.tx.unsynced = true;
                Some(Kind::Bind)
            }
            b'D' => {
                self.tx.unsynced = true;
                Some(Kind::Describe)
            }
            b'C' => {
                self.tx.unsynced = true;
                Some(Kind::Close(None))
            }
            b'H' => {
                self.tx.unsynced = true;
                None
            }
            _ => None,
        };
        if let Some(kind) = slot {
            self.replies.push(Slot::Client(kind));
        }
    }

    fn note_z(&mut self) {
        self.tx.pending += 1;
        self.sent_z += 1;
    }

    /// A whole client message of a type in [`needs_body`] (tracking on): writes what the
    /// server gets into `out`.
    pub fn client_message(
        &mut self,
        tag: u8,
        msg: &[u8],
        out: &mut BytesMut,
        server: &mut ServerSession,
        ctx: &Ctx<'_>,
    ) {
        let body = &msg[5..];
        match tag {
            b'Q' => self.query(msg, out, ctx),
            b'P' => self.parse(msg, body, out, server, ctx),
            b'B' => {
                self.tx.unsynced = true;
                match fe::bind(body) {
                    Some(b) if self.foreign_unnamed(b.statement, ctx) => {
                        self.refuse_foreign_unnamed(out);
                        return;
                    }
                    Some(b) => match self.mapped_statement(b.statement, ctx) {
                        Some(stmt) => {
                            // The effects of a Bind the server refuses must not count (a
                            // truncated Bind of a LISTEN statement would pin): its layout is
                            // read when there are effects, so not on the usual path.
                            let unreadable = if stmt.effects.is_empty() {
                                None
                            } else {
                                fe::check_bind_rest(b.rest).err()
                            };
                            match unreadable {
                                Some(e) => refuse_unreadable(b'B', &e, out),
                                None => {
                                    if !stmt.effects.is_empty() {
                                        let mut effects = stmt.effects.clone();
                                        self.take_effects(&mut effects, self.sent_z + 1, ctx);
                                    }
                                    self.ensure_prepared(&stmt, out, server, ctx);
                                    fe::write_bind(out, &b, &stmt.server_name);
                                }
                            }
                        }
                        // Unknown: the server answers with PostgreSQL's own 26000 error.
                        None => out.extend_from_slice(msg),
                    },
                    None => out.extend_from_slice(msg),
                }
                self.replies.push(Slot::Client(Kind::Bind));
            }
            b'D' => {
                self.tx.unsynced = true;
                match fe::target(body).filter(|(kind, _)| *kind == b'S') {
                    Some((_, name)) if self.foreign_unnamed(name, ctx) => {
                        self.refuse_foreign_unnamed(out);
                        return;
                    }
                    Some((_, name)) => match self.mapped_statement(name, ctx) {
                        Some(stmt) => {
                            self.ensure_prepared(&stmt, out, server, ctx);
                            fe::write_target(out, b'D', b'S', &stmt.server_name);
                        }
                        None => out.extend_from_slice(msg),
                    },
                    None => out.extend_from_slice(msg),
                }
                self.replies.push(Slot::Client(Kind::Describe));
            }
            b'C' => {
                self.tx.unsynced = true;
                let statement = fe::target(body).filter(|(kind, _)| *kind == b'S');
                match statement.and_then(|(_, name)| prepared::mapped_name(name, ctx)) {
                    Some(name) => {
                        // Other clients may share the server's statement: close only the
                        // client's name for it, and answer for the server.
                        let forget = self.session.statements.remove(name).map(|stmt| {
                            let f = Forget {
                                client_name: name.to_string(),
                                id: stmt.id,
                            };
                            self.pending().closed.push((name.to_string(), stmt));
                            f
                        });
                        let forget = forget.map(Box::new);
                        self.replies
                            .push(Slot::Synth(SynthMsg::CloseComplete, forget));
                    }
                    None => {
                        out.extend_from_slice(msg);
                        self.replies.push(Slot::Client(Kind::Close(None)));
                    }
                }
            }
            _ => {
                out.extend_from_slice(msg);
                self.client_header(tag, ctx);
            }
        }
    }

    fn query(&mut self, msg: &[u8], out: &mut BytesMut, ctx: &Ctx<'_>) {
        let Some(text) = fe::query_text(&msg[5..]) else {
            // PostgreSQL refuses it (08P01) without running any of it: nothing to track.
            out.extend_from_slice(msg);
            self.client_header(b'Q', ctx);
            return;
        };
        let mut effects = Vec::new();
        lexer::analyze_bytes(text, &mut effects);
        if let Some(message) = self.rejection(&effects, text, ctx) {
            fe::write_query(
                out,
                &fe::raise_sql(sqlstate::FEATURE_NOT_SUPPORTED, &message),
            );
        } else {
            out.extend_from_slice(msg);
            self.take_effects(&mut effects, self.sent_z + 1, ctx);
        }
        if ctx.prepare_unnamed {
            // As in PostgreSQL, a simple query ends the unnamed statement.
            self.session.statements.remove(prepared::UNNAMED);
        }
        self.client_header(b'Q', ctx);
    }

    /// Whether `statement` names the unnamed statement of a server connection this client has
    /// not parsed it on (`prepare_unnamed` off). It belongs to whichever client parsed it last
    /// there: binding it would run that client's query. In session mode, and while pinned,
    /// the server connection is the client's own (a takeover attaches it afresh, statements
    /// and all).
    fn foreign_unnamed(&self, statement: &[u8], ctx: &Ctx<'_>) -> bool {
        statement.is_empty()
            && !self.unnamed_parsed
            && !ctx.prepare_unnamed
            && ctx.mode != PoolMode::Session
            && !self.session.pins().is_pinned()
    }

    /// The error for [`Tracker::foreign_unnamed`], in place of the client's Bind or Describe.
    fn refuse_foreign_unnamed(&mut self, out: &mut BytesMut) {
        self.raise(
            out,
            sqlstate::INVALID_SQL_STATEMENT_NAME,
            "unnamed prepared statement does not exist: with transaction pooling the unnamed \
             statement lasts only while the client holds its server connection (until its \
             transaction ends); parse it again before each use, use a named statement, or set \
             the pool's prepare_unnamed = true",
        );
    }

    /// Makes the server raise `code`/`message` as the reply to the client's current message:
    /// the error, the failed transaction and the skip to Sync then follow PostgreSQL's rules.
    /// The server's unnamed statement is replaced by the one raising it.
    fn raise(&mut self, out: &mut BytesMut, code: &str, message: &str) {
        self.unnamed_parsed = false;
        fe::write_unnamed_parse(out, &fe::raise_sql(code, message));
        fe::write_unnamed_bind(out);
        fe::write_unnamed_execute(out);
        self.replies.push(Slot::Ours(Kind::Parse(None)));
        self.replies.push(Slot::Ours(Kind::Bind));
        self.replies.push(Slot::Client(Kind::Execute));
    }

    /// Under `on_pin = "reject"`, the error for a statement that would pin.
    fn rejection(&self, effects: &[Effect], text: &[u8], ctx: &Ctx<'_>) -> Option<String> {
        if ctx.on_pin != OnPin::Reject || ctx.mode == PoolMode::Session {
            return None;
        }
        let reason = effects.iter().find_map(pin_of)?;
        ctx.metrics.pin_rejections.inc();
        let text = String::from_utf8_lossy(text);
        let mut shown: String = text.chars().take(60).collect();
        if shown.len() < text.len() {
            shown.push('…');
        }
        Some(format!(
            "statement refused because it would pin the session to one server connection ({}): {shown}; \
             pool on_pin = \"reject\" — use session mode for this work",
            reason.explain()
        ))
    }

    /// Pins take effect now; everything else waits for its transaction to commit.
    fn take_effects(&mut self, effects: &mut Vec<Effect>, z: u64, ctx: &Ctx<'_>) {
        for e in effects.drain(..) {
            if let Some(reason) = pin_of(&e) {
                if !self.session.pins().is_pinned() {
                    ctx.metrics.pinned_clients.inc();
                }
                ctx.metrics.pin(reason);
                self.session.pin(&e);
            } else {
                self.pending().inflight.push_back((z, e));
            }
        }
    }

    /// Whether the relay must buffer the whole server message before calling
    /// [`Tracker::server_message`].
    pub fn server_needs_body(&self, tag: u8) -> bool {
        tag == b'Z' || tag == b'C' || tag == b'E' || self.replies.head_is_ours()
    }

    /// Decides about one server message. `msg` is whole when [`Self::server_needs_body`]
    /// said so, otherwise at least its header.
    pub fn server_message(
        &mut self,
        tag: u8,
        msg: &[u8],
        server: &mut ServerSession,
        ctx: &Ctx<'_>,
    ) -> Step {
        if tag == b'C' && msg.get(5..13) == Some(&b"ROLLBACK"[..]) {
            self.failed = true;
        }
        // Most messages only continue or end a reply the client is owed.
        if !matches!(tag, b'E' | b'A' | b'N' | b'S' | b'Z' | b'G') {
            if let Some(forward) = self.replies.on_reply(tag) {
                return Step::forward_if(forward);
            }
        }
        if tag == b'E' {
            if let Some(message) = backend::fatal_message(msg) {
                self.pending().server_fatal = Some(message);
                return Step::Swallow;
            }
        }
        let in_our_query = matches!(self.replies.head(), Some(Slot::Ours(Kind::Query)));
        let v = self.replies.on_message(tag);
        match tag {
            b'E' if in_our_query => {
                // pgtether's settings sync failed: this server's state is unknown.
                self.server_dirty = true;
            }
            b'E' => {
                self.failed = true;
                if is_stale_plan(msg) {
                    // A table under a prepared statement changed its result columns (DDL):
                    // the statement fails on this server until re-prepared. The connection
                    // is replaced at release; until then its statements are closed before
                    // the next is used.
                    self.server_dirty = true;
                    self.stale_plans = true;
                }
                // Latest first: a skipped Parse that reused a name is undone before the skipped
                // Close that freed the name is.
                for slot in v.completed.iter().chain(v.skipped.iter().rev()) {
                    self.undo(slot, server);
                }
            }
            b'G' => {
                let (removed, ended) = self.replies.on_copy_in();
                self.tx.pending = self.tx.pending.saturating_sub(removed);
                self.sent_z = self.sent_z.saturating_sub(u64::from(removed));
                if let Some(p) = self.pending.as_deref_mut() {
                    for (z, _) in p.inflight.iter_mut().filter(|(z, _)| *z > self.recv_z + 1) {
                        *z -= u64::from(removed);
                    }
                }
                self.in_copy_in = !ended;
            }
            b'Z' => return self.ready_for_query(msg[5], v.forward, server, ctx),
            _ => {}
        }
        Step::forward_if(v.forward)
    }

    /// Undoes the optimistic bookkeeping of a message that failed or that the server skipped.
    fn undo(&mut self, slot: &Slot, server: &mut ServerSession) {
        let forget = match slot {
            Slot::Synth(SynthMsg::CloseComplete, Some(f)) => {
                // The client's Close did not happen: it still has the statement.
                if let Some(stmt) = self.take_closed(f) {
                    self.session
                        .statements
                        .entry(f.client_name.clone())
                        .or_insert(stmt);
                }
                return;
            }
            Slot::Client(Kind::Parse(Some(f))) | Slot::Ours(Kind::Parse(Some(f))) => {
                server.statements.remove(f.id);
                f
            }
            Slot::Synth(_, Some(f)) => f,
            Slot::Ours(Kind::Close(Some(closed))) => {
                let (id, name) = &**closed;
                server.statements.restore(*id, name.clone());
                return;
            }
            _ => return,
        };
        if !forget.client_name.is_empty()
            && self
                .session
                .statements
                .get(&forget.client_name)
                .map(|s| s.id)
                == Some(forget.id)
        {
            self.session.statements.remove(&forget.client_name);
        }
    }

    fn ready_for_query(
        &mut self,
        status: u8,
        ours_or_client: bool,
        server: &mut ServerSession,
        ctx: &Ctx<'_>,
    ) -> Step {
        if !ours_or_client {
            // The end of pgtether's own sync query.
            return Step::Swallow;
        }
        if ctx.mode == PoolMode::Statement && status != b'I' {
            return Step::TransactionInStatementMode;
        }
        self.tx.pending = self.tx.pending.saturating_sub(1);
        self.tx.status = status;
        self.recv_z += 1;
        if let Some(p) = self.pending.as_deref_mut() {
            while let Some((z, _)) = p.inflight.front() {
                if *z > self.recv_z {
                    break;
                }
                let (_, e) = p.inflight.pop_front().expect("front exists");
                p.txn.push(e);
            }
        }
        if status == b'I' {
            self.counts.transactions += 1;
            let was_pinned = self.session.pins().is_pinned();
            if let Some(p) = self.pending.as_deref_mut() {
                if !self.failed {
                    for e in p.txn.drain(..) {
                        self.session.commit(&e, server);
                    }
                }
                p.txn.clear();
            }
            self.failed = false;
            if was_pinned && !self.session.pins().is_pinned() {
                ctx.metrics.pinned_clients.dec();
            }
            if self.can_release(ctx.mode) {
                return Step::ForwardAndRelease;
            }
        }
        Step::Forward
    }

    /// The client's pin gauge contribution ends with the client.
    pub fn on_disconnect(&self, ctx_metrics: &PoolMetrics) {
        if self.session.pins().is_pinned() {
            ctx_metrics.pinned_clients.dec();
        }
    }

    /// Between transactions with nothing outstanding: the session can move to another
    /// process together with its server connection.
    pub fn at_rest(&self) -> bool {
        self.tx.is_clean()
            && self.replies.is_empty()
            && self.pending.as_ref().is_none_or(|p| p.is_empty())
            && !self.in_copy_in
            && !self.server_dirty
    }

    /// Forgets in-flight bookkeeping when the server connection is gone or reset.
    pub fn detach(&mut self) {
        self.replies.clear();
        if let Some(p) = self.pending.as_deref_mut() {
            p.inflight.clear();
            p.txn.clear();
            p.closed.clear();
        }
        self.failed = false;
        self.in_copy_in = false;
        self.tx = TxState::default();
    }

    /// The FATAL error the server sent before going away, if any.
    pub fn take_server_fatal(&mut self) -> Option<String> {
        self.pending.as_deref_mut()?.server_fatal.take()
    }

    fn pending(&mut self) -> &mut Pending {
        self.pending.get_or_insert_with(Box::default)
    }

    /// Between transactions nothing is in flight: give back the queues' memory, so an idle
    /// client holds no buffers.
    pub fn release_memory(&mut self) {
        self.replies.release();
        if self.pending.as_ref().is_some_and(|p| p.is_empty()) {
            self.pending = None;
        }
    }

    /// Writes a synthesized reply that is now due, if any, into `to_client`.
    #[inline]
    pub fn pop_synth(&mut self) -> Option<&'static [u8]> {
        // Asked before every server message: most often nothing is queued.
        if !self.replies.has_synth() {
            return None;
        }
        let Some(Slot::Synth(msg, forget)) = self.replies.head() else {
            return None;
        };
        if let (SynthMsg::CloseComplete, Some(f)) = (msg, forget) {
            let f = f.clone();
            // The Close is answered: it happened.
            self.take_closed(&f);
        }
        self.replies.pop_synth()
    }

    /// Removes and returns the statement a pending Close took from the client.
    fn take_closed(&mut self, f: &Forget) -> Option<Arc<Statement>> {
        let closed = &mut self.pending.as_deref_mut()?.closed;
        let i = closed
            .iter()
            .position(|(name, stmt)| *name == f.client_name && stmt.id == f.id)?;
        Some(closed.remove(i).1)
    }
}
