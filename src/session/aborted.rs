//! A transaction whose server connection died: pgtether answers for PostgreSQL until the
//! client ends the transaction, exactly as a failed transaction behaves on a dedicated
//! connection — every statement gets 25P02, and COMMIT, ROLLBACK, END or ABORT answer
//! ROLLBACK and leave the client idle, its connection and session state intact.

use bytes::BytesMut;

use crate::protocol::backend::{self, Severity};
use crate::protocol::frontend as fe;
use crate::protocol::sqlstate;

const IN_FAILED_TRANSACTION: &str = "25P02";

/// Local answers for one client in a failed transaction.
#[derive(Debug, Default)]
pub struct Aborted {
    /// In an extended-protocol batch: an error was sent, skip to Sync.
    skipping: bool,
    /// In an extended-protocol batch: its statement ends the transaction.
    ending: bool,
    /// Only the rest of an extended batch outside a transaction block is left: its Sync
    /// ends the failure (ReadyForQuery 'I').
    implicit: bool,
    /// The error for the client's first statement (why it failed); later ones get 25P02.
    first_error: Option<(&'static str, String)>,
}

/// What one client message led to.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Still in the failed transaction.
    StillAborted,
    /// The client ended the transaction; it is idle again.
    Ended,
    /// Terminate.
    Terminate,
}

impl Aborted {
    /// After the connection-lost error was sent mid-way through an extended batch: skip to
    /// its Sync; `in_block` says whether a transaction block stays failed after it.
    pub fn skipping_to_sync(in_block: bool) -> Aborted {
        Aborted {
            skipping: true,
            implicit: !in_block,
            ..Aborted::default()
        }
    }

    /// The server went away while the client sat in a transaction block; the client's next
    /// statement learns why.
    pub fn lost(reason: String) -> Aborted {
        Aborted {
            first_error: Some((
                sqlstate::CONNECTION_FAILURE,
                format!("server connection lost during the transaction ({reason}); the transaction was rolled back"),
            )),
            ..Aborted::default()
        }
    }

    /// No server connection could be had for the client's next statement (outside any
    /// transaction): that statement, up to its Sync, fails with `code`; the client stays.
    pub fn unavailable(code: &'static str, message: String) -> Aborted {
        Aborted {
            first_error: Some((code, message)),
            implicit: true,
            ..Aborted::default()
        }
    }

    /// Answers one whole client message into `out`.
    pub fn answer(&mut self, msg: &[u8], out: &mut BytesMut) -> After {
        let body = &msg[5..];
        match msg[0] {
            b'X' => return After::Terminate,
            b'Q' if self.implicit => {
                self.failed(out);
                backend::ready_for_query(out, b'I');
                return After::Ended;
            }
            b'Q' => {
                let text =
                    std::str::from_utf8(body.strip_suffix(b"\0").unwrap_or(body)).unwrap_or("");
                if ends_transaction(text) {
                    backend::command_complete(out, "ROLLBACK");
                    backend::ready_for_query(out, b'I');
                    return After::Ended;
                }
                self.failed(out);
                backend::ready_for_query(out, b'E');
            }
            b'P' if !self.skipping => match fe::parse(body) {
                Ok(p) if ends_transaction(std::str::from_utf8(p.query).unwrap_or("")) => {
                    self.ending = true;
                    out.extend_from_slice(b"1\0\0\0\x04");
                }
                _ => self.fail(out),
            },
            b'B' if !self.skipping && self.ending => out.extend_from_slice(b"2\0\0\0\x04"),
            b'D' if !self.skipping && self.ending => out.extend_from_slice(b"n\0\0\0\x04"),
            b'E' if !self.skipping && self.ending => backend::command_complete(out, "ROLLBACK"),
            b'C' if !self.skipping => out.extend_from_slice(b"3\0\0\0\x04"),
            b'H' => {}
            b'S' => {
                let ended = (self.ending && !self.skipping) || self.implicit;
                *self = Aborted {
                    first_error: self.first_error.take(),
                    ..Aborted::default()
                };
                if ended {
                    backend::ready_for_query(out, b'I');
                    return After::Ended;
                }
                backend::ready_for_query(out, b'E');
            }
            _ if self.skipping => {}
            _ => self.fail(out),
        }
        After::StillAborted
    }

    fn fail(&mut self, out: &mut BytesMut) {
        self.failed(out);
        self.skipping = true;
        self.ending = false;
    }

    fn failed(&mut self, out: &mut BytesMut) {
        let hint = if self.implicit {
            "Retry; the connection remains usable."
        } else {
            "The server connection was lost during this transaction; run ROLLBACK, then retry it."
        };
        match self.first_error.take() {
            Some((code, message)) => {
                backend::error_response(out, Severity::Error, code, &message, Some(hint))
            }
            None => backend::error_response(
                out,
                Severity::Error,
                IN_FAILED_TRANSACTION,
                "current transaction is aborted, commands ignored until end of transaction block",
                Some(hint),
            ),
        }
    }
}

/// COMMIT, ROLLBACK, END or ABORT (a failed transaction can only end by rolling back).
fn ends_transaction(sql: &str) -> bool {
    let word: String = sql
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_lowercase();
    matches!(word.as_str(), "commit" | "rollback" | "end" | "abort")
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use postgres_protocol::message::backend::Message;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.put_i32(4 + body.len() as i32);
        v.extend_from_slice(body);
        v
    }

    fn tags(out: &mut BytesMut) -> Vec<u8> {
        let mut t = Vec::new();
        while let Some(m) = Message::parse(out).unwrap() {
            t.push(match m {
                Message::ErrorResponse(_) => b'E',
                Message::ReadyForQuery(r) => r.status(),
                Message::CommandComplete(_) => b'C',
                Message::ParseComplete => b'1',
                Message::BindComplete => b'2',
                Message::NoData => b'n',
                _ => b'?',
            });
        }
        t
    }

    #[test]
    fn simple_queries_fail_until_rollback() {
        let mut a = Aborted::default();
        let mut out = BytesMut::new();
        assert_eq!(
            a.answer(&msg(b'Q', b"SELECT 1\0"), &mut out),
            After::StillAborted
        );
        assert_eq!(tags(&mut out), b"EE");
        assert_eq!(a.answer(&msg(b'Q', b"commit\0"), &mut out), After::Ended);
        assert_eq!(tags(&mut out), b"CI");
    }

    #[test]
    fn extended_batch_errors_once_and_skips_to_sync() {
        let mut a = Aborted::default();
        let mut out = BytesMut::new();
        for m in [
            msg(b'P', b"\0SELECT 1\0\0\0"),
            msg(b'B', b"\0\0\0\0\0\0\0\0"),
            msg(b'E', b"\0\0\0\0\0"),
        ] {
            assert_eq!(a.answer(&m, &mut out), After::StillAborted);
        }
        assert_eq!(a.answer(&msg(b'S', b""), &mut out), After::StillAborted);
        assert_eq!(tags(&mut out), b"EE");
    }

    #[test]
    fn unavailable_fails_one_statement_and_leaves_the_client_idle() {
        let mut a = Aborted::unavailable("53300", "pool exhausted".into());
        let mut out = BytesMut::new();
        assert_eq!(a.answer(&msg(b'Q', b"SELECT 1\0"), &mut out), After::Ended);
        assert_eq!(tags(&mut out), b"EI");
        let mut a = Aborted::unavailable("08001", "down".into());
        a.answer(&msg(b'P', b"\0SELECT 1\0\0\0"), &mut out);
        a.answer(&msg(b'B', b"\0\0\0\0\0\0\0\0"), &mut out);
        assert_eq!(a.answer(&msg(b'S', b""), &mut out), After::Ended);
        assert_eq!(tags(&mut out), b"EI");
    }

    #[test]
    fn extended_rollback_ends_it() {
        let mut a = Aborted::default();
        let mut out = BytesMut::new();
        for m in [
            msg(b'P', b"\0ROLLBACK\0\0\0"),
            msg(b'B', b"\0\0\0\0\0\0\0\0"),
            msg(b'D', b"P\0"),
            msg(b'E', b"\0\0\0\0\0"),
        ] {
            a.answer(&m, &mut out);
        }
        assert_eq!(a.answer(&msg(b'S', b""), &mut out), After::Ended);
        assert_eq!(tags(&mut out), b"12nCI");
    }
}
