//! A resizable limit on server connections in use: a semaphore whose size a reload can
//! change while connections are out.
//!
//! deadpool's own `resize` cannot take back permits of a pool that holds fewer connections
//! than its old size, so after a shrink the pool could still open up to the old size once.
//! This limit is taken before deadpool is asked, and shrinks exactly: permits that are free
//! are removed at once, permits in use are removed as they come back (the debt).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

pub struct Limit {
    sem: Semaphore,
    /// Permits still to be removed when they come back.
    debt: AtomicUsize,
    size: Mutex<usize>,
}

/// One connection's worth of the limit; given back on drop.
pub struct Slot(Arc<Limit>);

impl Limit {
    pub fn new(size: usize) -> Arc<Limit> {
        Arc::new(Limit {
            sem: Semaphore::new(size),
            debt: AtomicUsize::new(0),
            size: Mutex::new(size),
        })
    }

    pub async fn acquire(self: &Arc<Self>) -> Slot {
        let permit = self.sem.acquire().await.expect("the limit is never closed");
        permit.forget();
        Slot(self.clone())
    }

    pub fn size(&self) -> usize {
        *self.size.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn resize(&self, new: usize) {
        let mut size = self.size.lock().unwrap_or_else(|e| e.into_inner());
        if new > *size {
            let grow = new - *size;
            let paid = self.take_debt(grow);
            self.sem.add_permits(grow - paid);
        } else if new < *size {
            let shrink = *size - new;
            let removed = self.sem.forget_permits(shrink);
            self.debt.fetch_add(shrink - removed, Ordering::SeqCst);
        }
        *size = new;
    }

    /// Cancels up to `n` units of debt; returns how many.
    fn take_debt(&self, n: usize) -> usize {
        let mut current = self.debt.load(Ordering::SeqCst);
        loop {
            let take = current.min(n);
            if take == 0 {
                return 0;
            }
            match self.debt.compare_exchange(
                current,
                current - take,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return take,
                Err(now) => current = now,
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.0.take_debt(1) == 0 {
            self.0.sem.add_permits(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn available(l: &Limit) -> usize {
        l.sem.available_permits()
    }

    #[tokio::test]
    async fn shrinking_takes_free_permits_now_and_busy_ones_on_return() {
        let l = Limit::new(4);
        let a = l.acquire().await;
        let b = l.acquire().await;
        let c = l.acquire().await;
        l.resize(1);
        assert_eq!(available(&l), 0);
        drop(a);
        drop(b);
        assert_eq!(available(&l), 0, "returned permits pay the debt");
        drop(c);
        assert_eq!(available(&l), 1);
    }

    #[tokio::test]
    async fn growing_pays_debt_first() {
        let l = Limit::new(3);
        let a = l.acquire().await;
        let b = l.acquire().await;
        l.resize(1); // one free permit removed, one owed
        l.resize(2); // the debt is forgiven instead of adding a permit
        assert_eq!(available(&l), 0);
        drop(a);
        drop(b);
        assert_eq!(available(&l), 2);
        l.resize(5);
        assert_eq!(available(&l), 5);
        assert_eq!(l.size(), 5);
    }
}
