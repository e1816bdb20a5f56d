//! Per-client limits that protect pgtether and the upstream from a few clients: connections per
//! user and per client address, the back-off after repeated failed logins from one address,
//! and the idle timeouts of logged-in clients.
//!
//! This module owns the shared tables (connection counts, failed-login records) and the
//! decisions; the login path calls [`Limits::admit_addr`], [`Limits::admit_user`],
//! [`Limits::check_backoff`] and [`Limits::record_auth`], and the client task reads its
//! [`IdleTimeouts`]. The tables are touched only at login and logout, never per query.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::config;

/// Addresses whose failed logins are remembered at most. The least recently seen address is
/// forgotten first, so a scan from many addresses costs bounded memory (about 100 bytes per
/// entry) and can at worst make pgtether forget an older address's failures early.
pub const AUTH_FAILURE_TABLE_SIZE: usize = 10_000;

/// The most an address's back-off is doubled to (2^4 = 16 times `auth_backoff`).
const MAX_BACKOFF_DOUBLINGS: u32 = 4;

/// Why a login was refused by a limit. Each maps to one SQLSTATE in `session::error`.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    #[error("too many connections for user \"{user}\" (limits.max_clients_per_user = {limit})")]
    PerUser { user: String, limit: usize },
    #[error("too many connections from address {addr} (limits.max_clients_per_addr = {limit})")]
    PerAddr { addr: IpAddr, limit: usize },
    #[error("too many failed logins from address {addr}: logins from it are refused for another {}s (limits.auth_failures_before_backoff = {failures})", .remaining.as_secs().max(1))]
    Backoff {
        addr: IpAddr,
        remaining: Duration,
        failures: u32,
    },
}

impl LimitError {
    /// The `reason` label this refusal is counted under.
    pub fn reason(&self) -> &'static str {
        match self {
            LimitError::PerUser { .. } => "max_clients_per_user",
            LimitError::PerAddr { .. } => "max_clients_per_addr",
            LimitError::Backoff { .. } => "auth_backoff",
        }
    }
}

/// What one address's failed logins look like now.
#[derive(Debug, Clone, Copy)]
struct Failures {
    /// Failures counted since `window_start`.
    count: u32,
    window_start: Instant,
    /// Logins are refused until then.
    blocked_until: Option<Instant>,
    /// Back-offs this address earned without a successful login in between.
    strikes: u32,
}

/// The shared tables. One per process, in [`crate::app::App`].
pub struct Limits {
    per_user: Mutex<HashMap<Arc<str>, usize>>,
    per_addr: Mutex<HashMap<IpAddr, usize>>,
    failures: Mutex<LruCache<IpAddr, Failures>>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::with_table_size(AUTH_FAILURE_TABLE_SIZE)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes one slot of `key` if fewer than `limit` are taken (0: unlimited, still counted so a
/// reload that sets a limit sees the clients already connected).
fn take<K: std::hash::Hash + Eq + Clone>(
    map: &mut HashMap<K, usize>,
    key: &K,
    limit: usize,
) -> bool {
    let n = map.entry(key.clone()).or_insert(0);
    if limit > 0 && *n >= limit {
        return false;
    }
    *n += 1;
    true
}

fn give_back<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Limits {
    pub fn with_table_size(size: usize) -> Limits {
        Limits {
            per_user: Mutex::default(),
            per_addr: Mutex::default(),
            failures: Mutex::new(LruCache::new(
                NonZeroUsize::new(size).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    /// Counts a connection from `addr` against `max_clients_per_addr`. Called once the startup
    /// packet is in, so that the client can be told why it is refused. `None` is a
    /// Unix-socket client: a local process, which per-address limits do not apply to.
    pub fn admit_addr(
        self: &Arc<Self>,
        addr: Option<IpAddr>,
        limits: &config::Limits,
        admission: &mut Admission,
    ) -> Result<(), LimitError> {
        let Some(addr) = addr else { return Ok(()) };
        let limit = limits.max_clients_per_addr;
        if !self.count_addr(addr, limit, admission) {
            return Err(LimitError::PerAddr { addr, limit });
        }
        Ok(())
    }

    fn count_addr(self: &Arc<Self>, addr: IpAddr, limit: usize, admission: &mut Admission) -> bool {
        if !take(&mut lock(&self.per_addr), &addr, limit) {
            return false;
        }
        admission.owner = Some(self.clone());
        admission.addr = Some(addr);
        true
    }

    /// Counts a client taken over from another pgtether process against both limits. It is
    /// connected and logged in already, so it is never refused, even over a limit (the other
    /// process may have had a higher one); new logins see it counted.
    pub fn adopt(self: &Arc<Self>, addr: Option<IpAddr>, user: &str) -> Admission {
        let mut admission = Admission::default();
        if let Some(addr) = addr {
            self.count_addr(addr, 0, &mut admission);
        }
        self.count_user(user, 0, &mut admission);
        admission
    }

    /// Counts a logged-in client of `user` against `max_clients_per_user`. Called after the
    /// password, so that clients who cannot log in never use up a user's connections.
    pub fn admit_user(
        self: &Arc<Self>,
        user: &str,
        limits: &config::Limits,
        admission: &mut Admission,
    ) -> Result<(), LimitError> {
        let limit = limits.max_clients_per_user;
        if !self.count_user(user, limit, admission) {
            return Err(LimitError::PerUser {
                user: user.to_string(),
                limit,
            });
        }
        Ok(())
    }

    fn count_user(self: &Arc<Self>, user: &str, limit: usize, admission: &mut Admission) -> bool {
        let mut counts = lock(&self.per_user);
        // The clients of one user share one copy of the name.
        let key = match counts.get_key_value(user) {
            Some((key, _)) => key.clone(),
            None => Arc::from(user),
        };
        if !take(&mut counts, &key, limit) {
            return false;
        }
        drop(counts);
        admission.owner = Some(self.clone());
        admission.user = Some(key);
        true
    }

    /// Refuses a login from an address that is backing off after failed logins (`None`, a
    /// Unix-socket client, never is).
    pub fn check_backoff(
        &self,
        addr: Option<IpAddr>,
        limits: &config::Limits,
    ) -> Result<(), LimitError> {
        match addr {
            Some(addr) => self.check_backoff_at(addr, limits, Instant::now()),
            None => Ok(()),
        }
    }

    fn check_backoff_at(
        &self,
        addr: IpAddr,
        limits: &config::Limits,
        now: Instant,
    ) -> Result<(), LimitError> {
        if limits.auth_failures_before_backoff == 0 {
            return Ok(());
        }
        // `peek`: a refused attempt does not make the entry look recently used, so a blocked
        // address hammering pgtether cannot keep others from ageing out… nor itself from being
        // evicted under a scan, which only shortens its back-off.
        match lock(&self.failures).peek(&addr) {
            Some(Failures {
                blocked_until: Some(until),
                ..
            }) if *until > now => Err(LimitError::Backoff {
                addr,
                remaining: *until - now,
                failures: limits.auth_failures_before_backoff,
            }),
            _ => Ok(()),
        }
    }

    /// Records how a password check from `addr` ended: success forgets the address's failures,
    /// a failure counts towards its back-off.
    pub fn record_auth(&self, addr: Option<IpAddr>, ok: bool, limits: &config::Limits) {
        if let Some(addr) = addr {
            self.record_auth_at(addr, ok, limits, Instant::now());
        }
    }

    fn record_auth_at(&self, addr: IpAddr, ok: bool, limits: &config::Limits, now: Instant) {
        let threshold = limits.auth_failures_before_backoff;
        if threshold == 0 {
            return;
        }
        let mut table = lock(&self.failures);
        if ok {
            table.pop(&addr);
            return;
        }
        let f = table.get_or_insert_mut(addr, || Failures {
            count: 0,
            window_start: now,
            blocked_until: None,
            strikes: 0,
        });
        if now.duration_since(f.window_start) > limits.auth_failure_window {
            // A quiet window: start counting afresh, and forget earlier back-offs unless the
            // address is still serving one.
            f.count = 0;
            f.window_start = now;
            if f.blocked_until.is_none_or(|u| u <= now) {
                f.strikes = 0;
            }
        }
        f.count = f.count.saturating_add(1);
        if f.count >= threshold {
            let factor = 1u32 << f.strikes.min(MAX_BACKOFF_DOUBLINGS);
            f.blocked_until = Some(now + limits.auth_backoff.saturating_mul(factor));
            f.strikes = f.strikes.saturating_add(1);
            // The next back-off needs another full count of failures.
            f.count = 0;
            f.window_start = now;
        }
    }

    /// Addresses with recorded failures (for tests and the bound).
    pub fn tracked_addresses(&self) -> usize {
        lock(&self.failures).len()
    }
}

/// The connection slots one client holds (its user's and its address's); given back when
/// dropped, whichever way the connection ends.
#[derive(Default)]
pub struct Admission {
    owner: Option<Arc<Limits>>,
    addr: Option<IpAddr>,
    user: Option<Arc<str>>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let Some(owner) = self.owner.take() else {
            return;
        };
        if let Some(addr) = self.addr.take() {
            give_back(&mut lock(&owner.per_addr), &addr);
        }
        if let Some(user) = self.user.take() {
            give_back(&mut lock(&owner.per_user), &user);
        }
    }
}

/// A client's idle timeouts, fixed at login, in milliseconds (0: off). Kept this small because
/// every idle client carries it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdleTimeouts {
    client_ms: u32,
    transaction_ms: u32,
}

/// Which idle timeout ended a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleKind {
    /// `client_idle_timeout`: idle outside a transaction block (FATAL 57P05).
    Session,
    /// `idle_transaction_timeout`: idle inside a transaction block (FATAL 25P03).
    Transaction,
}

fn millis(d: Duration) -> u32 {
    // A non-zero duration below a millisecond still means "on".
    u32::try_from(d.as_millis())
        .unwrap_or(u32::MAX)
        .max(u32::from(!d.is_zero()))
}

impl IdleTimeouts {
    pub fn from_config(limits: &config::Limits) -> IdleTimeouts {
        IdleTimeouts {
            client_ms: millis(limits.client_idle_timeout),
            transaction_ms: millis(limits.idle_transaction_timeout),
        }
    }

    pub fn is_off(self) -> bool {
        self.client_ms == 0 && self.transaction_ms == 0
    }

    /// The timeout that applies to a client waiting with transaction status `status`
    /// (`b'I'`, `b'T'` or `b'E'`), if any.
    pub fn for_status(self, status: u8) -> Option<(IdleKind, Duration)> {
        let (kind, ms) = if status == b'I' {
            (IdleKind::Session, self.client_ms)
        } else {
            (IdleKind::Transaction, self.transaction_ms)
        };
        (ms > 0).then(|| (kind, Duration::from_millis(u64::from(ms))))
    }
}

/// Points an idle-timeout timer at `at`, allocating it the first time and re-arming it
/// after: the waits that use it poll it by hand, only while a timeout is on.
pub fn arm_timer(timer: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>, at: Instant) {
    match timer {
        Some(t) if t.deadline() != at.into() => t.as_mut().reset(at.into()),
        Some(_) => {}
        None => *timer = Some(Box::pin(tokio::time::sleep_until(at.into()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> config::Limits {
        config::Limits {
            max_clients_per_user: 2,
            max_clients_per_addr: 1,
            auth_failures_before_backoff: 3,
            auth_failure_window: Duration::from_secs(60),
            auth_backoff: Duration::from_secs(10),
            ..config::Limits::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn slots_are_counted_and_given_back() {
        let t = Arc::new(Limits::default());
        let l = limits();
        let mut a = Admission::default();
        t.admit_addr(Some(ip("10.0.0.1")), &l, &mut a).unwrap();
        t.admit_user("u", &l, &mut a).unwrap();
        let mut b = Admission::default();
        assert!(matches!(
            t.admit_addr(Some(ip("10.0.0.1")), &l, &mut b),
            Err(LimitError::PerAddr { limit: 1, .. })
        ));
        t.admit_addr(Some(ip("10.0.0.2")), &l, &mut b).unwrap();
        t.admit_user("u", &l, &mut b).unwrap();
        let mut c = Admission::default();
        assert!(matches!(
            t.admit_user("u", &l, &mut c),
            Err(LimitError::PerUser { limit: 2, .. })
        ));
        drop(a);
        t.admit_addr(Some(ip("10.0.0.1")), &l, &mut c).unwrap();
        t.admit_user("u", &l, &mut c).unwrap();
        drop((b, c));
        assert!(lock(&t.per_user).is_empty() && lock(&t.per_addr).is_empty());
    }

    #[test]
    fn zero_means_unlimited() {
        let t = Arc::new(Limits::default());
        let l = config::Limits::default();
        let held: Vec<_> = (0..100)
            .map(|_| {
                let mut a = Admission::default();
                t.admit_addr(Some(ip("10.0.0.1")), &l, &mut a).unwrap();
                t.admit_user("u", &l, &mut a).unwrap();
                a
            })
            .collect();
        assert_eq!(lock(&t.per_addr)[&ip("10.0.0.1")], 100);
        drop(held);
        assert!(lock(&t.per_addr).is_empty());
    }

    #[test]
    fn backoff_after_failures_then_doubles_and_success_resets() {
        let t = Limits::default();
        let l = limits();
        let a = ip("10.0.0.1");
        let t0 = Instant::now();
        for _ in 0..2 {
            t.record_auth_at(a, false, &l, t0);
        }
        assert!(t.check_backoff_at(a, &l, t0).is_ok());
        t.record_auth_at(a, false, &l, t0);
        let e = t.check_backoff_at(a, &l, t0).unwrap_err();
        assert!(e.to_string().contains("another 10s"), "{e}");
        // Another address is not affected.
        assert!(t.check_backoff_at(ip("10.0.0.2"), &l, t0).is_ok());
        let after = t0 + Duration::from_secs(11);
        assert!(t.check_backoff_at(a, &l, after).is_ok());
        for _ in 0..3 {
            t.record_auth_at(a, false, &l, after);
        }
        assert!(matches!(
            t.check_backoff_at(a, &l, after + Duration::from_secs(15)),
            Err(LimitError::Backoff { .. })
        ));
        assert!(t
            .check_backoff_at(a, &l, after + Duration::from_secs(21))
            .is_ok());
        t.record_auth_at(a, true, &l, after + Duration::from_secs(21));
        assert_eq!(t.tracked_addresses(), 0);
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let t = Limits::default();
        let l = limits();
        let a = ip("10.0.0.1");
        let t0 = Instant::now();
        for i in 0..10u64 {
            t.record_auth_at(a, false, &l, t0 + Duration::from_secs(61 * i));
            assert!(t
                .check_backoff_at(a, &l, t0 + Duration::from_secs(61 * i))
                .is_ok());
        }
    }

    #[test]
    fn the_failure_table_is_bounded() {
        let t = Limits::with_table_size(100);
        let l = limits();
        for i in 0..10_000u32 {
            t.record_auth(Some(IpAddr::from(i.to_be_bytes())), false, &l);
        }
        assert_eq!(t.tracked_addresses(), 100);
    }

    #[test]
    fn off_records_nothing() {
        let t = Limits::default();
        let l = config::Limits {
            auth_failures_before_backoff: 0,
            ..limits()
        };
        for _ in 0..10 {
            t.record_auth(Some(ip("10.0.0.1")), false, &l);
        }
        assert_eq!(t.tracked_addresses(), 0);
        assert!(t.check_backoff(Some(ip("10.0.0.1")), &l).is_ok());
    }

    #[test]
    fn idle_timeouts_by_status() {
        let off = IdleTimeouts::from_config(&config::Limits::default());
        assert!(off.is_off());
        assert_eq!(off.for_status(b'I'), None);
        let on = IdleTimeouts::from_config(&config::Limits {
            client_idle_timeout: Duration::from_secs(2),
            idle_transaction_timeout: Duration::from_micros(10),
            ..config::Limits::default()
        });
        assert_eq!(
            on.for_status(b'I'),
            Some((IdleKind::Session, Duration::from_secs(2)))
        );
        assert_eq!(
            on.for_status(b'E'),
            Some((IdleKind::Transaction, Duration::from_millis(1)))
        );
    }
}
