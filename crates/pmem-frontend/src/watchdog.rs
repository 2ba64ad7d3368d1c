//! A deadline for blocking requests on the vhost-user socket.
//!
//! The socket's read timeout alone does not bound a request: the vhost crate retries a read that
//! fails with EAGAIN (which is how SO_RCVTIMEO expires) for as long as it keeps failing, so a
//! backend that never answers would hang the caller forever. The watchdog thread shuts the
//! socket down once an armed deadline passes; the blocked read then sees EOF and the request
//! fails, and the caller reports a timeout instead of hanging the test.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

#[derive(Default)]
struct State {
    deadline: Option<Instant>,
    fired: bool,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Shuts a socket down when an armed deadline passes.
pub(crate) struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Disarms the watchdog when dropped.
pub(crate) struct Armed {
    shared: Arc<Shared>,
}

impl Drop for Armed {
    fn drop(&mut self) {
        self.shared.lock().deadline = None;
        self.shared.wake.notify_all();
    }
}

impl Watchdog {
    /// Watches `sock` (a duplicate of the connection's socket: shutting it down shuts the
    /// connection down).
    pub(crate) fn new(sock: UnixStream) -> Result<Self> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-watchdog".into())
            .spawn(move || run(&s, &sock))
            .map_err(Error::io("spawn watchdog thread"))?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    /// Arms the deadline `timeout` from now, until the returned guard is dropped.
    pub(crate) fn arm(&self, timeout: Duration) -> Armed {
        self.shared.lock().deadline = Some(Instant::now() + timeout);
        self.shared.wake.notify_all();
        Armed {
            shared: self.shared.clone(),
        }
    }

    /// Whether the deadline passed (the connection is shut down since).
    pub(crate) fn fired(&self) -> bool {
        self.shared.lock().fired
    }

    /// The error for a failed request `op`: a timeout if the watchdog cut the connection.
    pub(crate) fn error(&self, op: &'static str, timeout: Duration, source: vhost::Error) -> Error {
        if self.fired() {
            Error::Timeout { what: op, timeout }
        } else {
            Error::Vhost { op, source }
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared, sock: &UnixStream) {
    let mut state = shared.lock();
    loop {
        if state.stop {
            return;
        }
        state = match state.deadline {
            None => shared.wake.wait(state).unwrap_or_else(|e| e.into_inner()),
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let _ = sock.shutdown(Shutdown::Both);
                    state.fired = true;
                    state.deadline = None;
                    continue;
                }
                shared
                    .wake
                    .wait_timeout(state, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        };
    }
}
