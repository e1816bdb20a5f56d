//! The queue of replies the server owes, in order, and whose they are: the client's (forward),
//! pgtether's own (swallow), or replies pgtether gives itself in place of the server
//! (synthesize). Plain data, no I/O; the relay asks it about each server message.

use std::cell::RefCell;
use std::collections::VecDeque;

use bytes::Bytes;

/// What a frontend message makes the server answer, and how the answer ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Parse; for a client's named statement, what to undo if it fails. (Rare payloads are
    /// boxed: a slot is queued and moved for every message of every transaction.)
    Parse(Option<Box<Forget>>),
    Bind,
    Describe,
    Execute,
    /// Close; for pgtether's own eviction, the statement to restore if it is skipped.
    Close(Option<Box<(u64, Bytes)>>),
    Sync,
    Query,
    Function,
}

/// A client statement registered optimistically, undone if its Parse fails or is skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forget {
    pub client_name: String,
    pub id: u64,
}

impl Kind {
    /// Whether `tag` is the last message of this reply (ErrorResponse handled apart).
    fn ends_with(&self, tag: u8) -> bool {
        match self {
            Kind::Parse(_) => tag == b'1',
            Kind::Bind => tag == b'2',
            Kind::Close(_) => tag == b'3',
            Kind::Describe => tag == b'T' || tag == b'n',
            Kind::Execute => matches!(tag, b'C' | b'I' | b's'),
            Kind::Sync | Kind::Query | Kind::Function => tag == b'Z',
        }
    }

    /// Extended-protocol messages are skipped by the server after an error until Sync.
    fn is_extended(&self) -> bool {
        !matches!(self, Kind::Sync | Kind::Query | Kind::Function)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    Client(Kind),
    Ours(Kind),
    /// A complete backend message pgtether sends in this position; for a ParseComplete, the
    /// client statement to forget if the server skips this position after an error.
    Synth(SynthMsg, Option<Box<Forget>>),
    /// Where the client ended a COPY IN (CopyDone/CopyFail) before the server started it.
    CopyEnd,
}

pub const PARSE_COMPLETE: &[u8] = b"1\0\0\0\x04";
pub const CLOSE_COMPLETE: &[u8] = b"3\0\0\0\x04";

/// The replies pgtether gives in the server's place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthMsg {
    ParseComplete,
    CloseComplete,
}

impl SynthMsg {
    pub fn bytes(self) -> &'static [u8] {
        match self {
            SynthMsg::ParseComplete => PARSE_COMPLETE,
            SynthMsg::CloseComplete => CLOSE_COMPLETE,
        }
    }
}

/// What to do with one server message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Send it to the client (otherwise pgtether swallows it).
    pub forward: bool,
    /// The slot this message completed.
    pub completed: Option<Slot>,
    /// Slots the server will now skip (after an error, up to the next Sync).
    pub skipped: Vec<Slot>,
}

#[derive(Debug, Default)]
pub struct Replies {
    q: VecDeque<Slot>,
    /// How many of `q` are `Synth`: asked before every server message, and most often zero.
    synths: u32,
}

/// Spare queue memory per worker thread: every transaction fills a queue that is given back
/// when the client goes idle (idle clients hold no buffers), so its memory is kept for the
/// next transaction on the thread instead of going through malloc twice per transaction.
const SPARE_QUEUES: usize = 64;
/// Queues that grew beyond this (long pipelines) are freed rather than kept.
const SPARE_MAX_SLOTS: usize = 32;

thread_local! {
    static SPARE: RefCell<Vec<VecDeque<Slot>>> = const { RefCell::new(Vec::new()) };
}

impl Replies {
    pub fn push(&mut self, slot: Slot) {
        if self.q.capacity() == 0 {
            if let Some(q) = SPARE.try_with(|s| s.borrow_mut().pop()).ok().flatten() {
                self.q = q;
            }
        }
        self.synths += u32::from(matches!(slot, Slot::Synth(..)));
        self.q.push_back(slot);
    }

    /// Gives the queue's memory back when nothing is owed.
    pub fn release(&mut self) {
        if !self.q.is_empty() || self.q.capacity() == 0 {
            return;
        }
        let q = std::mem::take(&mut self.q);
        if q.capacity() <= SPARE_MAX_SLOTS {
            let _ = SPARE.try_with(|s| {
                let mut s = s.borrow_mut();
                if s.len() < SPARE_QUEUES {
                    s.push(q);
                }
            });
        }
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    pub fn clear(&mut self) {
        self.q.clear();
        self.synths = 0;
    }

    /// Whether the next message belongs to pgtether's own request, so it must be buffered
    /// whole before it can be swallowed.
    pub fn head(&self) -> Option<&Slot> {
        self.q.front()
    }

    pub fn head_is_ours(&self) -> bool {
        matches!(self.q.front(), Some(Slot::Ours(_)))
    }

    /// A synthesized reply now due (everything before it has been answered).
    pub fn pop_synth(&mut self) -> Option<&'static [u8]> {
        match self.q.front() {
            Some(Slot::Synth(msg, _)) => {
                let msg = msg.bytes();
                self.q.pop_front();
                self.synths -= 1;
                Some(msg)
            }
            _ => None,
        }
    }

    /// Whether any synthesized reply is queued (due or not).
    #[inline]
    pub fn has_synth(&self) -> bool {
        self.synths > 0
    }

    /// Whether a statement in flight could still start a COPY (a query or an Execute).
    pub fn may_start_copy(&self) -> bool {
        self.q
            .iter()
            .any(|s| matches!(s, Slot::Client(Kind::Query | Kind::Execute)))
    }

    /// The server entered COPY IN. It ignores Sync until the copy ends, so Syncs the client
    /// sent after the COPY and before its CopyDone/CopyFail owe nothing. Returns how many were
    /// removed and whether the client's end of the copy was already queued.
    pub fn on_copy_in(&mut self) -> (u32, bool) {
        let mut removed = 0;
        let mut i = 1;
        while i < self.q.len() {
            match self.q[i] {
                Slot::Client(Kind::Sync) => {
                    self.q.remove(i);
                    removed += 1;
                }
                Slot::CopyEnd => {
                    self.q.remove(i);
                    return (removed, true);
                }
                _ => i += 1,
            }
        }
        (removed, false)
    }

    /// [`Replies::on_message`] for the common case, without building a verdict: a message
    /// that is neither an error, nor asynchronous, nor a ReadyForQuery or CopyInResponse, in a
    /// reply owed to the client or to pgtether. Whether to forward it; `None` when the queue
    /// holds anything else at its head (`on_message` decides then).
    pub fn on_reply(&mut self, tag: u8) -> Option<bool> {
        debug_assert!(!matches!(tag, b'E' | b'A' | b'N' | b'S' | b'Z' | b'G'));
        let (ours, request) = self.head_request()?;
        if request.ends_with(tag) {
            self.q.pop_front();
        }
        Some(!ours)
    }

    /// The request whose reply comes next, and whether it is pgtether's own; `None` when the
    /// head is a synthesized reply or a COPY end (or nothing is owed).
    fn head_request(&self) -> Option<(bool, &Kind)> {
        match self.q.front() {
            Some(Slot::Client(k)) => Some((false, k)),
            Some(Slot::Ours(k)) => Some((true, k)),
            _ => None,
        }
    }

    /// Decides about a server message with type `tag`.
    pub fn on_message(&mut self, tag: u8) -> Verdict {
        while matches!(self.q.front(), Some(Slot::CopyEnd)) {
            self.q.pop_front();
        }
        let ours = self.head_is_ours();
        match tag {
            // Asynchronous: notifications always reach the client; notices and parameter
            // reports caused by pgtether's own statements do not.
            b'A' => Verdict {
                forward: true,
                ..Verdict::default()
            },
            b'N' | b'S' => Verdict {
                forward: !ours,
                ..Verdict::default()
            },
            b'E' => {
                let mut v = Verdict {
                    // Errors always reach the client, whoever caused them.
                    forward: true,
                    ..Verdict::default()
                };
                let extended = self.head_request().is_some_and(|(_, k)| k.is_extended());
                if extended {
                    v.completed = self.q.pop_front();
                    while let Some(slot) = self.q.front() {
                        if matches!(slot, Slot::Client(Kind::Sync) | Slot::Ours(Kind::Sync)) {
                            break;
                        }
                        let slot = self.q.pop_front().expect("front exists");
                        self.synths -= u32::from(matches!(slot, Slot::Synth(..)));
                        v.skipped.push(slot);
                    }
                }
                v
            }
            _ => {
                let ends = self.head_request().is_some_and(|(_, k)| k.ends_with(tag));
                let completed = if ends { self.q.pop_front() } else { None };
                // A COPY end queued behind a statement that ended without starting a COPY is
                // no COPY's end: the server ignored it, and it must not keep the server
                // connection from going back to the pool.
                if tag == b'Z' {
                    while matches!(self.q.front(), Some(Slot::CopyEnd)) {
                        self.q.pop_front();
                    }
                }
                Verdict {
                    forward: !ours,
                    completed,
                    skipped: Vec::new(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_three_words() {
        // Queued and moved for every message of every transaction: rare payloads stay boxed.
        assert!(
            std::mem::size_of::<Slot>() <= 24,
            "{}",
            std::mem::size_of::<Slot>()
        );
    }

    fn run(r: &mut Replies, tags: &[u8]) -> Vec<(u8, bool)> {
        tags.iter()
            .map(|t| (*t, r.on_message(*t).forward))
            .collect()
    }

    #[test]
    fn lazy_prepare_is_swallowed_and_client_replies_pass() {
        let mut r = Replies::default();
        r.push(Slot::Ours(Kind::Parse(None)));
        r.push(Slot::Client(Kind::Bind));
        r.push(Slot::Client(Kind::Execute));
        r.push(Slot::Client(Kind::Sync));
        assert_eq!(
            run(&mut r, b"12DDCZ"),
            vec![
                (b'1', false),
                (b'2', true),
                (b'D', true),
                (b'D', true),
                (b'C', true),
                (b'Z', true)
            ]
        );
        assert!(r.is_empty());
    }

    #[test]
    fn synthesized_replies_come_out_in_order() {
        let mut r = Replies::default();
        r.push(Slot::Client(Kind::Bind));
        r.push(Slot::Synth(SynthMsg::CloseComplete, None));
        r.push(Slot::Client(Kind::Sync));
        assert_eq!(r.pop_synth(), None);
        assert!(r.on_message(b'2').forward);
        assert_eq!(r.pop_synth(), Some(CLOSE_COMPLETE));
        assert_eq!(r.pop_synth(), None);
        assert!(r.on_message(b'Z').forward);
    }

    #[test]
    fn sync_query_replies_are_swallowed_but_errors_pass() {
        let mut r = Replies::default();
        r.push(Slot::Ours(Kind::Query));
        r.push(Slot::Client(Kind::Query));
        assert_eq!(
            run(&mut r, b"CSCNEZ"),
            vec![
                (b'C', false),
                (b'S', false),
                (b'C', false),
                (b'N', false),
                (b'E', true),
                (b'Z', false)
            ]
        );
        assert_eq!(
            run(&mut r, b"TDCZ"),
            vec![(b'T', true), (b'D', true), (b'C', true), (b'Z', true)]
        );
    }

    #[test]
    fn error_skips_to_sync_and_reports_what_was_skipped() {
        let mut r = Replies::default();
        let forget = Forget {
            client_name: "s1".into(),
            id: 7,
        };
        r.push(Slot::Client(Kind::Parse(None)));
        r.push(Slot::Client(Kind::Parse(Some(Box::new(forget.clone())))));
        r.push(Slot::Synth(SynthMsg::CloseComplete, None));
        r.push(Slot::Client(Kind::Execute));
        r.push(Slot::Client(Kind::Sync));
        let v = r.on_message(b'E');
        assert!(v.forward);
        assert_eq!(v.completed, Some(Slot::Client(Kind::Parse(None))));
        assert_eq!(
            v.skipped,
            vec![
                Slot::Client(Kind::Parse(Some(Box::new(forget)))),
                Slot::Synth(SynthMsg::CloseComplete, None),
                Slot::Client(Kind::Execute)
            ]
        );
        assert_eq!(r.pop_synth(), None);
        assert!(r.on_message(b'Z').forward);
        assert!(r.is_empty());
    }

    #[test]
    fn error_inside_a_query_does_not_skip() {
        let mut r = Replies::default();
        r.push(Slot::Client(Kind::Query));
        r.push(Slot::Client(Kind::Query));
        let v = r.on_message(b'E');
        assert!(v.completed.is_none() && v.skipped.is_empty());
        assert!(r.on_message(b'Z').completed.is_some());
        assert!(!r.is_empty());
    }

    #[test]
    fn describe_ends_with_row_description_or_no_data() {
        let mut r = Replies::default();
        r.push(Slot::Client(Kind::Describe));
        r.push(Slot::Client(Kind::Describe));
        assert!(r.on_message(b't').completed.is_none());
        assert!(r.on_message(b'T').completed.is_some());
        assert!(r.on_message(b'n').completed.is_some());
        assert!(r.is_empty());
    }

    #[test]
    fn syncs_sent_during_copy_in_are_not_owed() {
        let mut r = Replies::default();
        r.push(Slot::Client(Kind::Bind));
        r.push(Slot::Client(Kind::Execute));
        r.push(Slot::Client(Kind::Sync));
        r.push(Slot::CopyEnd);
        r.push(Slot::Client(Kind::Sync));
        assert!(r.on_message(b'2').forward);
        assert_eq!(r.on_copy_in(), (1, true));
        assert!(r.on_message(b'C').completed.is_some());
        assert!(r.on_message(b'Z').completed.is_some());
        assert!(r.is_empty());
    }

    #[test]
    fn copy_ends_no_copy_started_are_dropped() {
        let mut r = Replies::default();
        assert!(!r.may_start_copy());
        r.push(Slot::Client(Kind::Query));
        assert!(r.may_start_copy());
        r.push(Slot::CopyEnd);
        // The query was no COPY: its ReadyForQuery leaves nothing owed.
        assert!(r.on_message(b'C').forward);
        assert!(r.on_message(b'Z').completed.is_some());
        assert!(r.is_empty());
    }

    #[test]
    fn on_reply_decides_as_on_message_does() {
        let fill = |r: &mut Replies| {
            r.push(Slot::Ours(Kind::Parse(None)));
            r.push(Slot::Client(Kind::Bind));
            r.push(Slot::Client(Kind::Describe));
            r.push(Slot::Client(Kind::Execute));
            r.push(Slot::Client(Kind::Sync));
        };
        let (mut fast, mut slow) = (Replies::default(), Replies::default());
        fill(&mut fast);
        fill(&mut slow);
        for &tag in b"12TDDC" {
            assert_eq!(fast.on_reply(tag), Some(slow.on_message(tag).forward));
            assert_eq!(fast.q, slow.q);
        }
        // Only the Sync's slot is left: ReadyForQuery is for on_message.
        assert_eq!(fast.q, vec![Slot::Client(Kind::Sync)]);
        let mut copy = Replies::default();
        copy.push(Slot::CopyEnd);
        assert_eq!(copy.on_reply(b'C'), None);
    }

    #[test]
    fn queued_synthesized_replies_are_counted() {
        let mut r = Replies::default();
        assert!(!r.has_synth());
        r.push(Slot::Client(Kind::Bind));
        r.push(Slot::Synth(SynthMsg::CloseComplete, None));
        r.push(Slot::Synth(SynthMsg::ParseComplete, None));
        r.push(Slot::Client(Kind::Sync));
        assert!(r.has_synth());
        assert!(r.on_message(b'2').forward);
        assert_eq!(r.pop_synth(), Some(CLOSE_COMPLETE));
        assert!(r.has_synth());
        assert_eq!(r.pop_synth(), Some(PARSE_COMPLETE));
        assert!(!r.has_synth());
        // Skipped after an error, or cleared: no longer queued either.
        r.clear();
        r.push(Slot::Client(Kind::Bind));
        r.push(Slot::Synth(SynthMsg::CloseComplete, None));
        r.push(Slot::Client(Kind::Sync));
        assert_eq!(
            r.on_message(b'E').skipped,
            vec![Slot::Synth(SynthMsg::CloseComplete, None)]
        );
        assert!(!r.has_synth());
        r.push(Slot::Synth(SynthMsg::CloseComplete, None));
        r.clear();
        assert!(!r.has_synth());
    }

    #[test]
    fn notifications_always_forwarded() {
        let mut r = Replies::default();
        r.push(Slot::Ours(Kind::Query));
        assert!(r.on_message(b'A').forward);
    }
}
