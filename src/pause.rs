//! PAUSE and RESUME: holding back new transactions, for everything or for one database.
//!
//! A client checks the gate at the start of each transaction, after it marked itself as
//! waiting for a server connection. PAUSE sets its flag first and then waits until no client
//! of the paused databases is waiting or active. Both sides use sequentially consistent
//! operations, so either the client sees the flag and stops, or PAUSE sees the client and waits
//! for its transaction. While nothing is paused the gate costs one atomic load.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tokio::sync::watch;

/// What is paused now.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Paused {
    pub all: bool,
    pub databases: BTreeSet<String>,
}

impl Paused {
    pub fn covers(&self, database: &str) -> bool {
        self.all || self.databases.contains(database)
    }

    fn is_empty(&self) -> bool {
        !self.all && self.databases.is_empty()
    }
}

pub struct Pause {
    /// Fast path: false while nothing at all is paused.
    any: AtomicBool,
    state: Mutex<Paused>,
    /// Bumped on every RESUME, waking held clients to look again.
    resumed: watch::Sender<u64>,
}

impl Default for Pause {
    fn default() -> Self {
        Pause {
            any: AtomicBool::new(false),
            state: Mutex::new(Paused::default()),
            resumed: watch::channel(0).0,
        }
    }
}

/// Why RESUME was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResumeError {
    #[error("database \"{0}\" is not paused")]
    NotPaused(String),
    #[error("everything is paused; RESUME without a database name resumes it")]
    AllPaused,
    #[error("nothing is paused")]
    NothingPaused,
}

impl Pause {
    fn lock(&self) -> std::sync::MutexGuard<'_, Paused> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of what is paused now.
    pub fn current(&self) -> Paused {
        self.lock().clone()
    }

    /// Whether every database is paused (what `/readyz` reports).
    pub fn all(&self) -> bool {
        self.any.load(Ordering::Relaxed) && self.lock().all
    }

    pub fn is_paused(&self, database: &str) -> bool {
        self.any.load(Ordering::SeqCst) && self.lock().covers(database)
    }

    /// Pauses one database, or everything with `None`.
    pub fn pause(&self, database: Option<&str>) {
        let mut s = self.lock();
        match database {
            None => s.all = true,
            Some(db) => {
                s.databases.insert(db.to_string());
            }
        }
        self.any.store(true, Ordering::SeqCst);
    }

    /// Resumes one database, or everything with `None`; held clients go on.
    pub fn resume(&self, database: Option<&str>) -> Result<(), ResumeError> {
        let mut s = self.lock();
        match database {
            None if s.is_empty() => return Err(ResumeError::NothingPaused),
            None => *s = Paused::default(),
            Some(_) if s.all => return Err(ResumeError::AllPaused),
            Some(db) => {
                if !s.databases.remove(db) {
                    return Err(ResumeError::NotPaused(db.to_string()));
                }
            }
        }
        self.any.store(!s.is_empty(), Ordering::SeqCst);
        drop(s);
        self.resumed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Waits while `database` is paused. Returns at once when it is not.
    pub async fn wait_until_resumed(&self, database: &str) {
        if !self.any.load(Ordering::SeqCst) {
            return;
        }
        // Subscribed before looking, so a RESUME in between is seen as a change.
        let mut rx = self.resumed.subscribe();
        while self.is_paused(database) {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn pause_and_resume_one_database_or_all() {
        let p = Pause::default();
        assert!(!p.is_paused("a"));
        p.pause(Some("a"));
        assert!(p.is_paused("a"));
        assert!(!p.is_paused("b"));
        assert!(!p.all());
        assert_eq!(p.resume(Some("b")), Err(ResumeError::NotPaused("b".into())));
        p.pause(None);
        assert!(p.all() && p.is_paused("b"));
        assert_eq!(p.resume(Some("a")), Err(ResumeError::AllPaused));
        p.resume(None).unwrap();
        assert!(!p.is_paused("a") && !p.all());
        assert_eq!(p.resume(None), Err(ResumeError::NothingPaused));
    }

    #[tokio::test]
    async fn held_clients_go_on_at_resume() {
        let p = Arc::new(Pause::default());
        p.pause(Some("a"));
        let held = tokio::spawn({
            let p = p.clone();
            async move { p.wait_until_resumed("a").await }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!held.is_finished());
        p.resume(Some("a")).unwrap();
        tokio::time::timeout(Duration::from_secs(1), held)
            .await
            .expect("released")
            .unwrap();
    }
}
