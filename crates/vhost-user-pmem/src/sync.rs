//! Locks that outlive a panic. A thread that panicked while holding one of the daemon's locks
//! left counters or a queue that are still consistent (every update is a single step), and the
//! daemon must keep answering the guest, so a poisoned lock is taken as it is.

use std::sync::{LockResult, Mutex, MutexGuard, PoisonError};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    unpoison(m.lock())
}

/// The guard of any lock result (a condition variable's wait, vm-memory's update lock),
/// poisoned or not.
pub fn unpoison<G>(r: LockResult<G>) -> G {
    r.unwrap_or_else(PoisonError::into_inner)
}
