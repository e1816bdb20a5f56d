//! Who is connected: one [`ClientInfo`] per logged-in client (admin console sessions included),
//! for `SHOW CLIENTS`, `SHOW POOLS`, `PAUSE`, `KILL` and shutdown.
//!
//! The registry's lock is taken only at login, logout and by admin commands. While a client
//! runs, its own task keeps its entry current through atomics (state, attached server, pins),
//! so the data path never touches a shared lock. The same entry carries the kill request an
//! admin command sends to the client's task.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::peer::Peer;
use std::sync::atomic::{AtomicI32, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use atomic_waker::AtomicWaker;

use crate::lexer::PinReason;

/// What a client is doing, as `SHOW CLIENTS` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Activity {
    /// Logged in, holding no server connection.
    Idle = 0,
    /// Its next transaction is held back by PAUSE.
    Paused = 1,
    /// Waiting for a server connection from the pool.
    Waiting = 2,
    /// Holding a server connection (or, for the admin console, connected to it).
    Active = 3,
}

impl Activity {
    fn from_u8(v: u8) -> Activity {
        match v {
            1 => Activity::Paused,
            2 => Activity::Waiting,
            3 => Activity::Active,
            _ => Activity::Idle,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Activity::Idle => "idle",
            Activity::Paused => "waiting",
            Activity::Waiting => "waiting",
            Activity::Active => "active",
        }
    }
}

/// How urgently a client's task is asked to end. Higher values include the lower ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Kill {
    None = 0,
    /// Takeover: move to the other process at the next transaction boundary.
    HandOver = 1,
    /// Shutdown: end at the next transaction boundary (an idle client ends at once).
    ShutdownWhenIdle = 2,
    /// KILL: end now, whatever the client is doing.
    Terminate = 3,
    /// Shutdown whose grace period ran out: end now.
    ShutdownNow = 4,
}

impl Kill {
    fn from_u8(v: u8) -> Kill {
        match v {
            1 => Kill::HandOver,
            2 => Kill::ShutdownWhenIdle,
            3 => Kill::Terminate,
            4 => Kill::ShutdownNow,
            _ => Kill::None,
        }
    }

    /// The FATAL message the client is sent.
    pub fn message(self) -> &'static str {
        match self {
            Kill::Terminate => "terminating connection due to administrator command",
            _ => "pgtether is shutting down",
        }
    }
}

/// One connected client. Written by its own task (atomics), read by admin commands.
#[derive(Debug)]
pub struct ClientInfo {
    /// Process-unique id, shown as `ptr` and used to link servers to clients.
    pub id: u64,
    pub user: Arc<str>,
    pub database: Arc<str>,
    pub addr: Peer,
    pub local_addr: Option<SocketAddr>,
    pub application_name: String,
    /// An admin console session (not a client of any pool).
    pub admin: bool,
    /// When it connected, in microseconds since the Unix epoch (8 bytes rather than 16:
    /// every client carries this entry).
    connected_at_us: u64,
    /// The cancel key pid pgtether gave this client.
    pub cancel_pid: i32,
    state: AtomicU8,
    kill: AtomicU8,
    /// `PinReason` bitmask (bit i = `PinReason::ALL[i]`).
    pins: AtomicU16,
    prepared: AtomicU32,
    /// Microseconds since the registry started when the current wait began (0: not waiting).
    wait_since_us: AtomicU64,
    /// Microseconds since the registry started when the last transaction began.
    request_us: AtomicU64,
    /// Backend pid of the server connection held now (0: none).
    server_pid: AtomicI32,
    /// The client's task, woken by kill requests. Every wait for one happens in that task,
    /// so one waker slot serves them all.
    wake: AtomicWaker,
}

/// What a new entry is made of.
pub struct NewClient {
    pub user: Arc<str>,
    pub database: Arc<str>,
    pub addr: Peer,
    pub local_addr: Option<SocketAddr>,
    pub application_name: String,
    pub admin: bool,
    pub cancel_pid: i32,
}

impl ClientInfo {
    pub fn connected_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(self.connected_at_us)
    }

    pub fn activity(&self) -> Activity {
        Activity::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Sets the activity. Entering `Waiting` is sequentially consistent so that PAUSE, which
    /// sets its flag and then looks for waiting clients, cannot miss a client that checked the
    /// flag just before (see [`crate::pause`]).
    pub fn set_activity(&self, a: Activity) {
        let order = if a == Activity::Waiting {
            Ordering::SeqCst
        } else {
            Ordering::Relaxed
        };
        self.state.store(a as u8, order);
    }

    /// Whether PAUSE must wait for this client: it holds or is about to take a server.
    pub fn in_transaction(&self) -> bool {
        matches!(
            Activity::from_u8(self.state.load(Ordering::SeqCst)),
            Activity::Waiting | Activity::Active
        )
    }

    pub fn set_pins(&self, reasons: &[PinReason]) {
        let mask = reasons.iter().fold(0u16, |m, r| m | pin_bit(*r));
        self.pins.store(mask, Ordering::Relaxed);
    }

    pub fn clear_pins(&self) {
        if self.pins.load(Ordering::Relaxed) != 0 {
            self.pins.store(0, Ordering::Relaxed);
        }
    }

    pub fn pin_reasons(&self) -> Vec<PinReason> {
        let mask = self.pins.load(Ordering::Relaxed);
        PinReason::ALL
            .iter()
            .copied()
            .filter(|r| mask & pin_bit(*r) != 0)
            .collect()
    }

    pub fn set_prepared(&self, n: usize) {
        self.prepared
            .store(n.min(u32::MAX as usize) as u32, Ordering::Relaxed);
    }

    pub fn prepared(&self) -> u32 {
        self.prepared.load(Ordering::Relaxed)
    }

    pub fn set_wait_since(&self, us: u64) {
        self.wait_since_us.store(us, Ordering::Relaxed);
    }

    pub fn wait_since_us(&self) -> u64 {
        self.wait_since_us.load(Ordering::Relaxed)
    }

    pub fn set_request(&self, us: u64) {
        self.request_us.store(us, Ordering::Relaxed);
    }

    pub fn request_us(&self) -> u64 {
        self.request_us.load(Ordering::Relaxed)
    }

    pub fn set_server_pid(&self, pid: i32) {
        self.server_pid.store(pid, Ordering::Relaxed);
    }

    pub fn server_pid(&self) -> i32 {
        self.server_pid.load(Ordering::Relaxed)
    }

    /// Asks the client's task to end (never lowers an earlier, more urgent request).
    pub fn request_kill(&self, kill: Kill) {
        self.kill.fetch_max(kill as u8, Ordering::SeqCst);
        self.wake.wake();
    }

    /// Withdraws a hand-over request (the takeover failed); stronger requests stay.
    pub fn cancel_hand_over(&self) {
        let _ = self.kill.compare_exchange(
            Kill::HandOver as u8,
            Kill::None as u8,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    pub fn kill_requested(&self) -> Kill {
        Kill::from_u8(self.kill.load(Ordering::SeqCst))
    }

    /// Resolves once a kill at least as urgent as `at_least` has been requested. Only the
    /// client's own task may wait (see `wake`).
    pub async fn killed(&self, at_least: Kill) -> Kill {
        std::future::poll_fn(|cx| self.poll_killed(cx, at_least)).await
    }

    /// [`ClientInfo::killed`] for hand-written poll loops.
    pub fn poll_killed(
        &self,
        cx: &mut std::task::Context<'_>,
        at_least: Kill,
    ) -> std::task::Poll<Kill> {
        let k = self.kill_requested();
        if k >= at_least {
            return std::task::Poll::Ready(k);
        }
        // Registered before the second look, so a request made in between is not lost.
        self.wake.register(cx.waker());
        let k = self.kill_requested();
        if k >= at_least {
            std::task::Poll::Ready(k)
        } else {
            std::task::Poll::Pending
        }
    }
}

fn pin_bit(r: PinReason) -> u16 {
    let i = PinReason::ALL
        .iter()
        .position(|x| *x == r)
        .expect("every reason is listed");
    1 << i
}

/// Every connected client, by id.
pub struct Clients {
    map: Mutex<HashMap<u64, Arc<ClientInfo>>>,
    next_id: AtomicU64,
    started: Instant,
}

impl Default for Clients {
    fn default() -> Self {
        Clients {
            map: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            started: Instant::now(),
        }
    }
}

impl Clients {
    /// Registers a client; the entry leaves the registry when the returned guard drops.
    pub fn register(self: &Arc<Self>, c: NewClient) -> ClientEntry {
        let info = Arc::new(ClientInfo {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            user: c.user,
            database: c.database,
            addr: c.addr,
            local_addr: c.local_addr,
            application_name: c.application_name,
            admin: c.admin,
            connected_at_us: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            cancel_pid: c.cancel_pid,
            state: AtomicU8::new(Activity::Idle as u8),
            kill: AtomicU8::new(0),
            pins: AtomicU16::new(0),
            prepared: AtomicU32::new(0),
            wait_since_us: AtomicU64::new(0),
            request_us: AtomicU64::new(0),
            server_pid: AtomicI32::new(0),
            wake: AtomicWaker::new(),
        });
        self.lock().insert(info.id, info.clone());
        ClientEntry {
            clients: self.clone(),
            info,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ClientInfo>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the current entries, ordered by id (login order).
    pub fn list(&self) -> Vec<Arc<ClientInfo>> {
        let mut v: Vec<_> = self.lock().values().cloned().collect();
        v.sort_by_key(|c| c.id);
        v
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Microseconds since the registry started: the clock of the per-client timestamps.
    pub fn now_us(&self) -> u64 {
        self.us_at(Instant::now())
    }

    /// `at` on the clock of the per-client timestamps, for callers that read the time anyway.
    pub fn us_at(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.started).as_micros() as u64).max(1)
    }

    /// Wall-clock time of a registry timestamp.
    pub fn to_system_time(&self, us: u64) -> SystemTime {
        let ago = std::time::Duration::from_micros(self.now_us().saturating_sub(us));
        SystemTime::now() - ago
    }

    /// Asks every client matching `filter` to end; returns how many were asked.
    pub fn kill_where(&self, kill: Kill, filter: impl Fn(&ClientInfo) -> bool) -> usize {
        let mut n = 0;
        for c in self.lock().values() {
            if filter(c) {
                c.request_kill(kill);
                n += 1;
            }
        }
        n
    }

    /// Withdraws every pending hand-over request.
    pub fn cancel_hand_over(&self) {
        for c in self.lock().values() {
            c.cancel_hand_over();
        }
    }

    /// Clients that are not admin console sessions.
    pub fn sessions(&self) -> usize {
        self.lock().values().filter(|c| !c.admin).count()
    }
}

/// A client's registration; dropping it removes the entry.
pub struct ClientEntry {
    clients: Arc<Clients>,
    pub info: Arc<ClientInfo>,
}

impl std::ops::Deref for ClientEntry {
    type Target = ClientInfo;

    fn deref(&self) -> &ClientInfo {
        &self.info
    }
}

impl ClientEntry {
    pub fn clients(&self) -> &Clients {
        &self.clients
    }
}

impl Drop for ClientEntry {
    fn drop(&mut self) {
        self.clients.lock().remove(&self.info.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_client(db: &str) -> NewClient {
        NewClient {
            user: "u".into(),
            database: db.into(),
            addr: "127.0.0.1:5000".parse().unwrap(),
            local_addr: None,
            application_name: String::new(),
            admin: false,
            cancel_pid: 1,
        }
    }

    #[test]
    fn entries_come_and_go_with_their_guard() {
        let clients = Arc::new(Clients::default());
        let a = clients.register(new_client("a"));
        let b = clients.register(new_client("b"));
        assert_eq!(clients.len(), 2);
        assert!(a.id < b.id);
        drop(a);
        let left = clients.list();
        assert_eq!(left.len(), 1);
        assert_eq!(&*left[0].database, "b");
    }

    #[test]
    fn pins_round_trip_as_a_bitmask() {
        let clients = Arc::new(Clients::default());
        let a = clients.register(new_client("a"));
        a.set_pins(&[PinReason::Listen, PinReason::TempTable]);
        assert_eq!(
            a.pin_reasons(),
            vec![PinReason::Listen, PinReason::TempTable]
        );
        a.clear_pins();
        assert!(a.pin_reasons().is_empty());
    }

    #[tokio::test]
    async fn a_kill_request_wakes_the_waiter_and_never_lowers() {
        let clients = Arc::new(Clients::default());
        let a = clients.register(new_client("a"));
        let b = clients.register(new_client("b"));
        assert_eq!(
            clients.kill_where(Kill::Terminate, |c| &*c.database == "a"),
            1
        );
        assert_eq!(a.killed(Kill::Terminate).await, Kill::Terminate);
        a.request_kill(Kill::ShutdownWhenIdle);
        assert_eq!(a.kill_requested(), Kill::Terminate);
        assert_eq!(b.kill_requested(), Kill::None);
        // A request below the threshold does not end the wait.
        b.request_kill(Kill::ShutdownWhenIdle);
        let waited = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            b.killed(Kill::Terminate),
        )
        .await;
        assert!(waited.is_err());
        assert_eq!(
            b.killed(Kill::ShutdownWhenIdle).await,
            Kill::ShutdownWhenIdle
        );
    }
}
