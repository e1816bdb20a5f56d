//! Named prepared statements across server connections: a client's statement is one of
//! pgtether's shared statements, prepared on a server connection the first time it is used
//! there, and closed again when the connection's LRU list is full.

use bytes::BytesMut;

use super::{Ctx, Tracker};
use crate::lexer;
use crate::protocol::frontend as fe;
use crate::protocol::sqlstate;
use crate::session::replies::{Forget, Kind, Slot, SynthMsg};
use crate::session::state::ServerSession;
use crate::statements::Statement;

impl Tracker {
    pub(super) fn parse(
        &mut self,
        msg: &[u8],
        body: &[u8],
        out: &mut BytesMut,
        server: &mut ServerSession,
        ctx: &Ctx<'_>,
    ) {
        self.tx.unsynced = true;
        let Some(p) = fe::parse(body) else {
            out.extend_from_slice(msg);
            self.replies.push(Slot::Client(Kind::Parse(None)));
            return;
        };
        let name = std::str::from_utf8(p.name).unwrap_or("");
        if name.is_empty() {
            // The unnamed statement is executed right after (drivers re-parse it each time),
            // so its effects count from here.
            let text = std::str::from_utf8(p.query).unwrap_or("");
            let mut effects = Vec::new();
            lexer::analyze(text, &mut effects);
            if let Some(message) = self.rejection(&effects, text, ctx) {
                self.raise(out, sqlstate::FEATURE_NOT_SUPPORTED, &message);
                return;
            }
            self.take_effects(&mut effects, self.sent_z + 1, ctx);
            out.extend_from_slice(msg);
            self.replies.push(Slot::Client(Kind::Parse(None)));
            return;
        }
        if self.session.statements.contains_key(name) {
            self.raise(
                out,
                "42P05",
                &format!("prepared statement \"{name}\" already exists"),
            );
            return;
        }
        let stmt = ctx.registry.intern(p.query, p.param_types);
        // A named statement's effects count at each Bind; only the policy is checked here.
        if let Some(message) = self.rejection(
            &stmt.effects,
            std::str::from_utf8(p.query).unwrap_or(""),
            ctx,
        ) {
            self.raise(out, sqlstate::FEATURE_NOT_SUPPORTED, &message);
            return;
        }
        self.session
            .statements
            .insert(name.to_string(), stmt.clone());
        if server.statements.touch(stmt.id) {
            ctx.metrics.prepared_hits.inc();
            self.replies.push(Slot::Synth(
                SynthMsg::ParseComplete,
                Some(Box::new(Forget {
                    client_name: name.to_string(),
                    id: stmt.id,
                })),
            ));
        } else {
            ctx.metrics.prepared_misses.inc();
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
        if server.statements.touch(stmt.id) {
            ctx.metrics.prepared_hits.inc();
            return;
        }
        ctx.metrics.prepared_misses.inc();
        self.evict_for(stmt, out, server, ctx);
        out.extend_from_slice(&stmt.parse_message);
        self.replies
            .push(Slot::Ours(Kind::Parse(Some(Box::new(Forget {
                client_name: String::new(),
                id: stmt.id,
            })))));
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
