//! Counters the daemon keeps about its work, for the exit summary and for tests that match guest
//! flushes with host fdatasyncs.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    /// Flush requests taken off the queue.
    pub requests: AtomicU64,
    /// fdatasync calls made (or refused because of an earlier failure).
    pub fdatasyncs: AtomicU64,
    /// Requests answered by an fdatasync that also answered an earlier request in its batch.
    pub coalesced: AtomicU64,
    /// Flush requests answered with -1.
    pub errors: AtomicU64,
    /// Chains that did not have the shape of a request.
    pub malformed: AtomicU64,
    /// Requests of a type other than FLUSH.
    pub unknown: AtomicU64,
    /// SHMEM_MAP messages that the frontend accepted.
    pub maps: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "requests={} fdatasyncs={} coalesced={} errors={} malformed={} unknown={} maps={}",
            get(&self.requests),
            get(&self.fdatasyncs),
            get(&self.coalesced),
            get(&self.errors),
            get(&self.malformed),
            get(&self.unknown),
            get(&self.maps),
        )
    }
}
