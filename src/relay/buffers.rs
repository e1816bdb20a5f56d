//! Spare relay buffers, kept per worker thread.
//!
//! A client gives its buffers back every time it goes idle (idle clients hold no buffers) and
//! needs them again for its next transaction. Keeping the memory on a per-thread free list
//! turns that into a pop and a push, instead of a malloc, a free and a chain of reallocs as
//! an empty buffer grows, on every transaction.
//!
//! Two sizes: an idle client reads the start of its next transaction into a small buffer, so
//! that the many clients that may then wait for a server connection hold little; the relay
//! reads into full-size ones.
//!
//! Clients move between worker threads, so one thread may give back more than it takes: what
//! its own list has no room for goes to a shared list that the other threads draw on before
//! they allocate.

use std::cell::RefCell;
use std::sync::Mutex;

use bytes::BytesMut;

/// The size of a spare buffer (also the relay's read granularity).
pub const SIZE: usize = 16 * 1024;
/// The size of the buffer an idle client reads its next message into; most messages fit.
pub const SMALL: usize = 1024;
/// Spare buffers kept per thread: enough for the clients that go idle and come back between
/// two turns of a busy thread, little memory when they do not.
const KEEP: usize = 64;
/// Small ones: one per client waiting for a server connection, for many such clients.
const KEEP_SMALL: usize = 256;

thread_local! {
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    static SPARE_SMALL: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// The spares of threads that had no room for them.
static SHARED: Mutex<Vec<BytesMut>> = Mutex::new(Vec::new());
static SHARED_SMALL: Mutex<Vec<BytesMut>> = Mutex::new(Vec::new());

type Local = std::thread::LocalKey<RefCell<Vec<BytesMut>>>;

/// Gives an empty, unallocated `buf` a spare buffer (or a new one) of [`SIZE`] bytes.
pub fn fill(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        *buf = take(&SPARE, &SHARED).unwrap_or_else(|| BytesMut::with_capacity(SIZE));
    }
}

/// Gives an empty, unallocated `buf` a spare buffer (or a new one) of [`SMALL`] bytes.
pub fn fill_small(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        *buf = take(&SPARE_SMALL, &SHARED_SMALL).unwrap_or_else(|| BytesMut::with_capacity(SMALL));
    }
}

#[inline(always)]
fn take(local: &'static Local, shared: &Mutex<Vec<BytesMut>>) -> Option<BytesMut> {
    match local.try_with(|s| s.borrow_mut().pop()) {
        Ok(Some(spare)) => Some(spare),
        _ => take_shared(shared),
    }
}

#[cold]
fn take_shared(shared: &Mutex<Vec<BytesMut>>) -> Option<BytesMut> {
    shared.lock().ok()?.pop()
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
    let (local, shared, keep) = if spare.try_reclaim(SIZE) {
        if spare.capacity() > 4 * SIZE {
            return;
        }
        (&SPARE, &SHARED, KEEP)
    } else if spare.try_reclaim(SMALL) {
        (&SPARE_SMALL, &SHARED_SMALL, KEEP_SMALL)
    } else {
        return;
    };
    put(spare, local, shared, keep);
}

/// Keeps `spare` on this thread's list, else on the shared one, else frees it.
#[inline(always)]
fn put(spare: BytesMut, local: &'static Local, shared: &Mutex<Vec<BytesMut>>, keep: usize) {
    let spare = local
        .try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < keep {
                s.push(spare);
                None
            } else {
                Some(spare)
            }
        })
        .unwrap_or(None);
    if let Some(spare) = spare {
        put_shared(spare, shared, keep);
    }
}

#[cold]
fn put_shared(spare: BytesMut, shared: &Mutex<Vec<BytesMut>>, keep: usize) {
    if let Ok(mut s) = shared.lock() {
        if s.len() < keep {
            s.push(spare);
        }
    }
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
    fn small_buffers_go_round_apart() {
        let mut a = BytesMut::new();
        fill_small(&mut a);
        assert!(a.capacity() >= SMALL && a.capacity() < SIZE);
        let memory = a.as_ptr();
        a.extend_from_slice(b"Q");
        let _ = a.split_to(1);
        give_back(&mut a);
        assert_eq!(a.capacity(), 0);
        let mut big = BytesMut::new();
        fill(&mut big);
        assert!(
            big.capacity() >= SIZE,
            "a small buffer never serves a full-size need"
        );
        let mut b = BytesMut::new();
        fill_small(&mut b);
        assert_eq!(b.as_ptr(), memory, "the same small memory comes back");
    }

    #[test]
    fn spares_a_thread_has_no_room_for_serve_another() {
        // Lists of this test's own, so that other tests cannot take from them.
        thread_local! {
            static MINE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
        }
        static OURS: Mutex<Vec<BytesMut>> = Mutex::new(Vec::new());
        const KEEP: usize = 4;
        let given = std::thread::spawn(|| {
            let bufs: Vec<BytesMut> = (0..2 * KEEP).map(|_| BytesMut::with_capacity(64)).collect();
            let memory: Vec<usize> = bufs.iter().map(|b| b.as_ptr() as usize).collect();
            bufs.into_iter().for_each(|b| put(b, &MINE, &OURS, KEEP));
            // This thread keeps the first KEEP; the others go to the shared list.
            memory[KEEP..].to_vec()
        })
        .join()
        .unwrap();
        let taken: Vec<usize> = std::thread::spawn(|| {
            (0..KEEP)
                .map(|_| take(&MINE, &OURS).map_or(0, |b| b.as_ptr() as usize))
                .collect()
        })
        .join()
        .unwrap();
        assert_eq!(taken.iter().rev().copied().collect::<Vec<_>>(), given);
        assert!(OURS.lock().unwrap().is_empty());
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
