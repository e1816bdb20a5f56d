//! Named prepared statements across server connections: a client's statement is one of
//! pgtether's shared statements, prepared on a server connection the first time it is used
//! there, and closed again when the connection's LRU list is full. With `prepare_unnamed`, the
//! client's unnamed statement is one of them too.

use std::sync::Arc;

use bytes::BytesMut;

use super::{Ctx, Tracker};
use crate::lexer;
use crate::metrics::Count;
use crate::protocol::frontend as fe;
use crate::protocol::sqlstate;
use crate::session::replies::{Forget, Kind, Slot, SynthMsg};
use crate::session::state::ServerSession;
use crate::statements::Statement;

/// The key of the client's unnamed statement among its statements (`pool.prepare_unnamed`):
/// no name a client sends can contain a NUL.
pub(super) const UNNAMED: &str = "\0";

/// The key of a statement name pgtether maps (see [`Tracker::mapped_statement`]). Names that
/// are not UTF-8 are never mapped: the server answers for them.
pub(super) fn mapped_name<'a>(name: &'a [u8], ctx: &Ctx<'_>) -> Option<&'a str> {
    match std::str::from_utf8(name) {
        Ok("") if ctx.prepare_unnamed => Some(UNNAMED),
        Ok("") | Err(_) => None,
        Ok(name) => Some(name),
    }
}

impl Tracker {
    /// The shared statement a client's statement name stands for, if pgtether maps it.
    pub(super) fn mapped_statement(&self, name: &[u8], ctx: &Ctx<'_>) -> Option<Arc<Statement>> {
        self.session
            .statements
            .get(mapped_name(name, ctx)?)
            .cloned()
    }

    pub(super) fn parse(
        &mut self,
        msg: &[u8],
        body: &[u8],
        out: &mut BytesMut,
        server: &mut ServerSession,
        ctx: &Ctx<'_>,
    ) {
        self.tx.unsynced = true;
        // What pgtether cannot read is not passed on: the server could read it differently
        // and prepare a statement pgtether does not know of, which the next client would find.
        let p = match fe::parse(body) {
            Ok(p) => p,
            Err(e) => {
                super::refuse_unreadable(b'P', &e, out);
                self.replies.push(Slot::Client(Kind::Parse(None)));
                return;
            }
        };
        let Ok(name) = std::str::from_utf8(p.name) else {
            // Statement names are kept as UTF-8 (as PostgreSQL sees them with client_encoding
            // UTF8, which refuses such a name as well).
            self.raise(
                out,
                sqlstate::CHARACTER_NOT_IN_REPERTOIRE,
                "invalid byte sequence for encoding \"UTF8\" in the prepared statement name",
            );
            return;
        };
        if name.is_empty() && !ctx.prepare_unnamed {
            // The unnamed statement is executed right after (drivers re-parse it each time),
            // so its effects count from here.
            let mut effects = Vec::new();
            lexer::analyze_bytes(p.query, &mut effects);
            if let Some(message) = self.rejection(&effects, p.query, ctx) {
                self.raise(out, sqlstate::FEATURE_NOT_SUPPORTED, &message);
                return;
            }
            self.take_effects(&mut effects, self.sent_z + 1, ctx);
            out.extend_from_slice(msg);
            self.replies.push(Slot::Client(Kind::Parse(None)));
            self.unnamed_parsed = true;
            return;
        }
        // The unnamed statement is replaced by each Parse; a named one must be closed first.
        let name = if name.is_empty() { UNNAMED } else { name };
        if name != UNNAMED && self.session.statements.contains_key(name) {
            self.raise(
                out,
                "42P05",
                &format!("prepared statement \"{name}\" already exists"),
            );
            return;
        }
        let same = match self.session.statements.get(UNNAMED) {
            Some(s) if name == UNNAMED && s.is_parsed_by(&body[p.name.len() + 1..]) => {
                Some(s.clone())
            }
            _ => None,
        };
        let fresh = same.is_none();
        let stmt = same.unwrap_or_else(|| ctx.registry.intern(p.query, p.param_types));
        // A named statement's effects count at each Bind; only the policy is checked here.
        if let Some(message) = self.rejection(&stmt.effects, p.query, ctx) {
            self.raise(out, sqlstate::FEATURE_NOT_SUPPORTED, &message);
            return;
        }
        if fresh {
            self.session
                .statements
                .insert(name.to_string(), stmt.clone());
        }
        self.close_stale(out, server);
        if server.statements.touch(stmt.id) {
            ctx.metrics.add(Count::PreparedHits, 1);
            // The same unnamed statement again: were this Parse skipped after an error, the
            // client would still have it, so there is nothing to undo.
            let forget = fresh.then(|| {
                Box::new(Forget {
                    client_name: name.to_string(),
                    id: stmt.id,
                })
            });
            self.replies
                .push(Slot::Synth(SynthMsg::ParseComplete, forget));
        } else {
            ctx.metrics.add(Count::PreparedMisses, 1);
            self.evict_for(&stmt, out, server, ctx);
            out.extend_from_slice(&stmt.parse_message);
            self.replies
                .push(Slot::Client(Kind::Parse(Some(Box::new(Forget {
                    client_name: name.to_string(),
                    id: stmt.id,
                })))));
        }
    }

    /// Makes sure the server has `stmt` before a Bind or Describe that uses it.
    pub(super) fn ensure_prepared(
        &mut self,
        stmt: &Statement,
        out: &mut BytesMut,
        server: &mut ServerSession,
        ctx: &Ctx<'_>,
    ) {
        self.close_stale(out, server);
        if server.statements.touch(stmt.id) {
            ctx.metrics.add(Count::PreparedHits, 1);
            return;
        }
        ctx.metrics.add(Count::PreparedMisses, 1);
        self.evict_for(stmt, out, server, ctx);
        out.extend_from_slice(&stmt.parse_message);
        self.replies
            .push(Slot::Ours(Kind::Parse(Some(Box::new(Forget {
                client_name: String::new(),
                id: stmt.id,
            })))));
    }

    /// After a stale-plan error, closes every statement the server has.
    fn close_stale(&mut self, out: &mut BytesMut, server: &mut ServerSession) {
        if !std::mem::take(&mut self.stale_plans) {
            return;
        }
        for (id, name) in server.statements.take_all() {
            fe::write_target(out, b'C', b'S', &name);
            self.replies
                .push(Slot::Ours(Kind::Close(Some(Box::new((id, name))))));
        }
    }

    /// Records `stmt` on the server, closing the least recently used statement if full.
    fn evict_for(
        &mut self,
        stmt: &Statement,
        out: &mut BytesMut,
        server: &mut ServerSession,
        ctx: &Ctx<'_>,
    ) {
        if let Some((old_id, old_name)) = server.statements.insert(stmt) {
            ctx.metrics.prepared_evictions.inc();
            fe::write_target(out, b'C', b'S', &old_name);
            self.replies
                .push(Slot::Ours(Kind::Close(Some(Box::new((old_id, old_name))))));
        }
    }
}
