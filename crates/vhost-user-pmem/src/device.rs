//! The device: the state that outlives every frontend connection — the backing file, its flush
//! engine and the statistics. Each connection's `backend::PmemBackend` serves it.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backing::BackingFile;
use crate::flush::{FlushEngine, FlushJob};
use crate::flush_limit::FlushRateLimit;
use crate::modes::FlushMode;
use crate::stats::Stats;

pub struct Device {
    pub backing: Arc<BackingFile>,
    pub stats: Arc<Stats>,
    /// `--poll-us`: how long a thread that just answered watches the queue for the next
    /// request (zero: never).
    pub poll: Duration,
    engine: FlushEngine,
}

impl Device {
    pub fn new(
        backing: BackingFile,
        mode: FlushMode,
        limit: Option<FlushRateLimit>,
    ) -> io::Result<Self> {
        let backing = Arc::new(backing);
        let stats = Arc::new(Stats::default());
        Ok(Device {
            engine: FlushEngine::new(mode, limit, backing.clone(), stats.clone())?,
            backing,
            stats,
            poll: Duration::ZERO,
        })
    }

    /// The device with `--poll-us` set to `poll`.
    pub fn with_poll(self, poll: Duration) -> Self {
        Device { poll, ..self }
    }

    pub fn flush_mode(&self) -> FlushMode {
        self.engine.mode()
    }

    pub fn flush_rate_limit(&self) -> Option<FlushRateLimit> {
        self.engine.rate_limit()
    }

    /// Flush requests taken off the queue and not answered yet.
    pub fn flushes_in_flight(&self) -> usize {
        self.engine.in_flight()
    }

    /// Hands the flush requests popped in one pass, at `popped`, to the flush engine.
    pub fn submit(&self, jobs: Vec<FlushJob>, popped: Instant) {
        self.engine.submit_all(jobs, popped);
    }

    /// Blocks until every request handed over has been answered.
    pub fn wait_idle(&self) {
        self.engine.wait_idle();
    }
}
