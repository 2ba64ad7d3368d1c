//! What the daemon measures about its work: counters, and latency histograms of fdatasync and of
//! whole requests (pop to answer). They feed the exit summary, the line logged at each
//! disconnect, and the metrics JSON (see `metrics.rs`); tests use them to match guest flushes
//! with host fdatasyncs.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are kept in microseconds: a flush never takes less than one, and a histogram with
/// three significant digits up to an hour is a few hundred KiB of mostly untouched memory.
const HIST_MAX_US: u64 = 3_600_000_000;
const HIST_SIGFIG: u8 = 3;

#[derive(Debug)]
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
    /// Requests answered by an fdatasync that started before the request was taken off the
    /// queue. The flush engine's design makes this impossible; it is counted anyway so that
    /// tests and operators can see the promise kept rather than take it on trust. Always 0.
    pub order_violations: AtomicU64,
    /// Time taken by each fdatasync (or refusal), in microseconds.
    pub sync_latency: Mutex<Histogram<u64>>,
    /// Time from a flush request being taken off the queue to its answer, in microseconds.
    pub request_latency: Mutex<Histogram<u64>>,
    /// When the daemon started counting; the origin of the times in debug logs.
    pub epoch: Instant,
}

fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts (low 1 <= high / 2, sigfig <= 5).
    Histogram::new_with_bounds(1, HIST_MAX_US, HIST_SIGFIG).expect("valid histogram bounds")
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            requests: AtomicU64::new(0),
            fdatasyncs: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            unknown: AtomicU64::new(0),
            maps: AtomicU64::new(0),
            order_violations: AtomicU64::new(0),
            sync_latency: Mutex::new(histogram()),
            request_latency: Mutex::new(histogram()),
            epoch: Instant::now(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Records how long one fdatasync took.
    pub fn record_sync(&self, took: Duration) {
        lock(&self.sync_latency).saturating_record(micros(took));
    }

    /// Records the pop-to-answer latency of every request in `latencies`, under one lock.
    pub fn record_requests(&self, latencies: impl IntoIterator<Item = Duration>) {
        let mut h = lock(&self.request_latency);
        for l in latencies {
            h.saturating_record(micros(l));
        }
    }

    /// Microseconds from [`Self::epoch`] to `t` (0 for times before it).
    pub fn since_epoch_us(&self, t: Instant) -> u64 {
        micros(t.saturating_duration_since(self.epoch))
    }

    pub fn counters(&self) -> Counters {
        Counters {
            requests: Self::get(&self.requests),
            fdatasyncs: Self::get(&self.fdatasyncs),
            coalesced: Self::get(&self.coalesced),
            errors: Self::get(&self.errors),
            malformed: Self::get(&self.malformed),
            unknown: Self::get(&self.unknown),
            maps: Self::get(&self.maps),
            order_violations: Self::get(&self.order_violations),
        }
    }

    pub fn sync_summary(&self) -> LatencySummary {
        LatencySummary::of(&lock(&self.sync_latency))
    }

    pub fn request_summary(&self) -> LatencySummary {
        LatencySummary::of(&lock(&self.request_latency))
    }

    /// The several-line summary printed at exit.
    pub fn report(&self) -> String {
        format!(
            "{}\n  fdatasync latency:                 {}\n  request latency (pop to answer):   {}",
            self.counters(),
            self.sync_summary(),
            self.request_summary()
        )
    }
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub requests: u64,
    pub fdatasyncs: u64,
    pub coalesced: u64,
    pub errors: u64,
    pub malformed: u64,
    pub unknown: u64,
    pub maps: u64,
    pub order_violations: u64,
}

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "requests={} fdatasyncs={} coalesced={} errors={} malformed={} unknown={} maps={} \
             order_violations={}",
            self.requests,
            self.fdatasyncs,
            self.coalesced,
            self.errors,
            self.malformed,
            self.unknown,
            self.maps,
            self.order_violations,
        )
    }
}

/// A latency distribution reduced to the figures people compare, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary {
                count: 0,
                min: 0,
                mean: 0.0,
                p50: 0,
                p90: 0,
                p99: 0,
                p999: 0,
                max: 0,
            };
        }
        LatencySummary {
            count: h.len(),
            min: h.min(),
            // Rounded to 0.1 us: more digits would only be noise in the JSON.
            mean: (h.mean() * 10.0).round() / 10.0,
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

impl fmt::Display for LatencySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.count == 0 {
            return write!(f, "n=0");
        }
        write!(
            f,
            "n={} min={} avg={:.1} p50={} p99={} max={} us",
            self.count, self.min, self.mean, self.p50, self.p99, self.max
        )
    }
}

impl fmt::Display for Stats {
    /// One line: the counters and the request latency's median and tail, for the log line at
    /// each disconnect.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.request_summary();
        write!(f, "{}", self.counters())?;
        if r.count > 0 {
            write!(f, " request_p50={}us request_p99={}us", r.p50, r.p99)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        let s = Stats::default();
        assert_eq!(s.request_summary().count, 0);
        assert!(!s.to_string().contains("request_p50"), "{s}");
        s.record_requests((1..=100).map(Duration::from_micros));
        s.record_sync(Duration::from_micros(250));
        let r = s.request_summary();
        assert_eq!((r.count, r.min, r.p50, r.p99, r.max), (100, 1, 50, 99, 100));
        assert_eq!(s.sync_summary().p50, 250);
        assert!(s.to_string().contains("request_p50=50us"), "{s}");
        assert!(s.report().contains("fdatasync latency"), "{}", s.report());
        // Beyond the histogram's range is clamped, not lost.
        s.record_sync(Duration::from_secs(100_000));
        assert_eq!(s.sync_summary().count, 2);
    }
}
