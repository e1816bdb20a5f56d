//! Spare relay buffers, kept per worker thread.
//!
//! A client gives its buffers back every time it goes idle (idle clients hold no buffers) and
//! needs them again for its next transaction. Keeping the memory on a per-thread free list
//! turns that into a pop and a push, instead of a malloc, a free and a chain of reallocs as
//! an empty buffer grows, on every transaction.

use std::cell::RefCell;

use bytes::BytesMut;

/// The size of a spare buffer (also the relay's read granularity).
pub const SIZE: usize = 16 * 1024;
/// Spare buffers kept per thread: enough for the clients that go idle and come back between
/// two turns of a busy thread, little memory when they do not.
const KEEP: usize = 64;

thread_local! {
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// Gives an empty, unallocated `buf` a spare buffer (or a new one) of [`SIZE`] bytes.
pub fn fill(buf: &mut BytesMut) {
    if buf.capacity() > 0 {
        return;
    }
    let spare = SPARE.try_with(|s| s.borrow_mut().pop()).ok().flatten();
    *buf = spare.unwrap_or_else(|| BytesMut::with_capacity(SIZE));
}

/// Takes the memory of an empty `buf` back, leaving it unallocated. Buffers that grew for a
/// large message are freed rather than kept.
pub fn give_back(buf: &mut BytesMut) {
    if !buf.is_empty() {
        return;
    }
    let mut spare = std::mem::take(buf);
    // Reclaims the room before the read position (no copy, no allocation: the buffer is
    // empty). A buffer read to its very end has no room left but still holds its memory.
    if !spare.try_reclaim(SIZE) || spare.capacity() > 4 * SIZE {
        return;
    }
    let _ = SPARE.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < KEEP {
            s.push(spare);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;

    #[test]
    fn buffers_go_round() {
        let mut a = BytesMut::new();
        fill(&mut a);
        assert!(a.capacity() >= SIZE);
        a.extend_from_slice(b"hello");
        let _ = a.split_to(5);
        give_back(&mut a);
        assert_eq!(a.capacity(), 0, "the client keeps nothing");
        let mut b = BytesMut::new();
        fill(&mut b);
        assert!(b.capacity() >= SIZE && b.is_empty());
    }

    #[test]
    fn a_buffer_read_to_its_end_goes_back_too() {
        let mut a = BytesMut::new();
        fill(&mut a);
        let memory = a.as_ptr();
        let cap = a.capacity();
        a.resize(cap, 7);
        a.advance(cap);
        assert_eq!(a.capacity(), 0);
        give_back(&mut a);
        let mut b = BytesMut::new();
        fill(&mut b);
        assert_eq!(b.as_ptr(), memory, "the same memory comes back");
        assert!(b.capacity() >= SIZE);
    }

    #[test]
    fn large_and_busy_buffers_are_not_kept() {
        let mut big = BytesMut::with_capacity(8 * SIZE);
        give_back(&mut big);
        assert_eq!(big.capacity(), 0);
        let mut busy = BytesMut::from(&b"unsent"[..]);
        give_back(&mut busy);
        assert_eq!(&busy[..], b"unsent");
    }
}
