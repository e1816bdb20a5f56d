//! Worker threads that each run their own event loop (`runtime.scheduler = "per-thread"`), and
//! which of them a client and a server connection belong to.
//!
//! Why: with one shared work-stealing runtime, a client's task runs on whichever thread woke
//! it, so its state and sockets (and its server connection's) crossed between cores on most
//! transactions; on a machine whose cores PostgreSQL and the application share, that cost
//! more CPU per transaction than the second thread gained (benches/HISTORY.md). Here each
//! thread keeps the clients it was given, and each pool keeps a shard of its connections per
//! thread (see `pool::handoff`). A client borrows another thread's connection only when its
//! own thread's shard has none to give; the connection then moves its registration to the
//! client's thread (see `Socket::rebind`), so that moves are rare.
//!
//! The main thread is worker 0: it also runs the accept loops, the HTTP endpoint and the
//! pools' maintenance. Threads never stop; the process ends with them.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::runtime::Handle;
use tracing::warn;

use crate::socket::Socket;

thread_local! {
    static INDEX: Cell<u8> = const { Cell::new(0) };
}

/// The runtimes of workers 1.. (worker 0 is the caller of [`start`]).
static OTHERS: OnceLock<Vec<Handle>> = OnceLock::new();
/// Whose turn the next client is.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The worker this thread is (0 on the main thread and on any thread not started here).
pub fn current() -> u8 {
    INDEX.with(Cell::get)
}

/// How many workers run their own runtime: 1 until [`start`] started more, and with tokio's
/// work-stealing runtime (its threads are not workers here).
pub fn count() -> usize {
    OTHERS.get().map_or(1, |others| others.len() + 1)
}

/// Starts workers 1..`threads`, each a thread with its own current-thread runtime. Called
/// once, before clients are accepted.
pub fn start(threads: usize) -> std::io::Result<()> {
    // A worker's number is a byte (it is kept in every server connection and waiter).
    let threads = threads.min(u8::MAX as usize);
    let mut handles = Vec::with_capacity(threads.saturating_sub(1));
    for i in 1..threads {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        handles.push(rt.handle().clone());
        std::thread::Builder::new()
            // Thread names are cut at 15 bytes in /proc and in top.
            .name(format!("pgtether-w{i}"))
            .spawn(move || {
                INDEX.with(|c| c.set(i as u8));
                rt.block_on(std::future::pending::<()>());
            })?;
    }
    let _ = OTHERS.set(handles);
    Ok(())
}

/// Serves an accepted client on the next worker in turn: `serve` is spawned there with the
/// socket registered on that worker's runtime.
pub fn spawn_client<F, Fut>(stream: Socket, serve: F)
where
    F: FnOnce(Socket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let others = match OTHERS.get() {
        Some(others) if !others.is_empty() => others,
        _ => {
            tokio::spawn(serve(stream));
            return;
        }
    };
    let turn = NEXT.fetch_add(1, Ordering::Relaxed) % (others.len() + 1);
    if turn == 0 {
        tokio::spawn(serve(stream));
        return;
    }
    let fd = match stream.into_fd() {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot pass a client connection to a worker thread");
            return;
        }
    };
    // A small task adopts the socket there and spawns the client's own, so that the client's
    // task state (every idle client's memory) holds no wrapper around `serve`.
    others[turn - 1].spawn(async move {
        match Socket::adopt(fd) {
            Ok(stream) => {
                tokio::spawn(serve(stream));
            }
            Err(e) => warn!(error = %e, "a worker thread cannot register a client connection"),
        }
    });
}
