//! `lock()`: the one way the guest suite takes a mutex. A case thread that panicked while
//! holding one must not hide its finding from the thread that reports it, so a poisoned lock
//! is taken as it is.

use std::sync::{Mutex, MutexGuard};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
