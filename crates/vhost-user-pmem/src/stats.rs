//! What the daemon measures about its work: counters, and latency histograms of fdatasync, of
//! whole requests (pop to answer) and of the shared-memory map. They feed the exit summary,
//! the line logged at each disconnect, and the metrics JSON (see `metrics.rs`); tests use them
//! to match guest flushes with host fdatasyncs.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
pub use pmem_metrics::LatencySummary;
use pmem_metrics::{buckets_from_counts, log2_index, Bucket, ConnectionCounters, Counters};

use crate::logging;
use crate::sync::lock;

/// Latencies are kept in microseconds: a flush never takes less than one, and a histogram with
/// three significant digits up to an hour is a few hundred KiB of mostly untouched memory.
const HIST_MAX_US: u64 = 3_600_000_000;
const HIST_SIGFIG: u8 = 3;

/// The meaning of each counter is documented once, on [`pmem_metrics::Counters`].
#[derive(Debug)]
pub struct Stats {
    pub requests: AtomicU64,
    pub fdatasyncs: AtomicU64,
    pub coalesced: AtomicU64,
    pub errors: AtomicU64,
    pub malformed: AtomicU64,
    pub unknown: AtomicU64,
    pub maps: AtomicU64,
    pub map_refusals: AtomicU64,
    pub connections: AtomicU64,
    /// The flush engine's design makes this impossible; it is counted anyway so that tests
    /// and operators can see the promise kept rather than take it on trust. Always 0.
    pub order_violations: AtomicU64,
    /// The most requests one fdatasync has answered.
    pub largest_batch: AtomicU64,
    pub flush_delayed: AtomicU64,
    pub flush_delay_us: AtomicU64,
    /// The connection being served (or the last one), and the one being set up. Behind a lock
    /// so that a count for an older connection, whose flush finishes after the next one
    /// began, is told apart.
    connection: Mutex<Connections>,
    /// Time taken by each fdatasync (or refusal), in microseconds.
    pub sync_latency: Mutex<Histogram<u64>>,
    /// Time from a flush request being taken off the queue to its answer, in microseconds.
    pub request_latency: Mutex<Histogram<u64>>,
    /// Time from a device start to the frontend's acceptance of SHMEM_MAP, in microseconds.
    pub map_latency: Mutex<Histogram<u64>>,
    /// When the daemon started counting; the origin of the times in debug logs.
    pub epoch: Instant,
    /// The daemon's process id, taken here because getpid is not on the seccomp allow-list.
    pub pid: u32,
}

#[derive(Debug, Default)]
struct Connections {
    /// Shown in the metrics.
    current: Option<ConnectionCounters>,
    /// Being accepted or connected: counted from before its first message, shown once made.
    next: Option<ConnectionCounters>,
}

/// Which per-connection counter [`Stats::add_for`] moves.
#[derive(Debug, Clone, Copy)]
pub enum PerConnection {
    Requests,
    Errors,
    Maps,
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
            map_refusals: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            order_violations: AtomicU64::new(0),
            largest_batch: AtomicU64::new(0),
            flush_delayed: AtomicU64::new(0),
            flush_delay_us: AtomicU64::new(0),
            connection: Mutex::new(Connections::default()),
            sync_latency: Mutex::new(histogram()),
            request_latency: Mutex::new(histogram()),
            map_latency: Mutex::new(histogram()),
            epoch: Instant::now(),
            pid: std::process::id(),
        }
    }
}

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The figures of `h`, in microseconds.
pub fn summary(h: &Histogram<u64>) -> LatencySummary {
    if h.is_empty() {
        return LatencySummary::default();
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

/// The non-empty log2 buckets of `h`, bucketed as everywhere else in the project.
pub fn log2_buckets(h: &Histogram<u64>) -> Vec<Bucket> {
    let mut counts = [0u64; 64];
    for v in h.iter_recorded() {
        counts[log2_index(h.lowest_equivalent(v.value_iterated_to()))] += v.count_at_value();
    }
    buckets_from_counts(&counts)
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Starts counting for connection `conn_id`, with its counts at 0. Called before the
    /// accept or connect, since the connection's first message can be served before
    /// `start()` returns; the metrics go on showing the previous connection until
    /// [`Self::connection_made`].
    pub fn begin_connection(&self, conn_id: u64) {
        lock(&self.connection).next = Some(ConnectionCounters {
            id: conn_id,
            ..ConnectionCounters::default()
        });
    }

    /// Connection `conn_id` (begun with [`Self::begin_connection`]) is accepted or made.
    pub fn connection_made(&self, conn_id: u64) {
        Self::add(&self.connections, 1);
        let mut c = lock(&self.connection);
        if c.next.is_some_and(|n| n.id == conn_id) {
            c.current = c.next.take();
        }
    }

    /// Adds `n` to the `which` count of connection `conn_id`, if it is the current one or the
    /// one being set up.
    pub fn add_for(&self, conn_id: u64, which: PerConnection, n: u64) {
        self.add_for_each(std::iter::repeat_n(conn_id, n as usize), which);
    }

    /// One count of `which` for the connection of each id in `conn_ids`, under one lock: the
    /// flush path counts a whole batch at once.
    pub fn add_for_each(&self, conn_ids: impl IntoIterator<Item = u64>, which: PerConnection) {
        let mut guard = lock(&self.connection);
        let Connections { current, next } = &mut *guard;
        for conn_id in conn_ids {
            let matching = next
                .as_mut()
                .filter(|c| c.id == conn_id)
                .or(current.as_mut().filter(|c| c.id == conn_id));
            if let Some(c) = matching {
                *match which {
                    PerConnection::Requests => &mut c.requests,
                    PerConnection::Errors => &mut c.errors,
                    PerConnection::Maps => &mut c.maps,
                } += 1;
            }
        }
    }

    pub fn connection(&self) -> Option<ConnectionCounters> {
        lock(&self.connection).current
    }

    /// Records that one fdatasync answered `n` requests.
    pub fn record_batch(&self, n: usize) {
        self.largest_batch.fetch_max(n as u64, Ordering::Relaxed);
    }

    /// Records that the rate limit held back the start of an fdatasync that answered `n`
    /// requests, by `held`.
    pub fn record_delay(&self, n: usize, held: Duration) {
        Self::add(&self.flush_delayed, n as u64);
        Self::add(&self.flush_delay_us, micros(held));
    }

    /// Records how long one fdatasync took.
    pub fn record_sync(&self, took: Duration) {
        lock(&self.sync_latency).saturating_record(micros(took));
    }

    /// Records how long the frontend took to accept a map, counted from the device start.
    pub fn record_map(&self, took: Duration) {
        lock(&self.map_latency).saturating_record(micros(took));
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
        let (log_warnings, log_errors) = logging::counts();
        Counters {
            requests: Self::get(&self.requests),
            fdatasyncs: Self::get(&self.fdatasyncs),
            coalesced: Self::get(&self.coalesced),
            errors: Self::get(&self.errors),
            malformed: Self::get(&self.malformed),
            unknown: Self::get(&self.unknown),
            maps: Self::get(&self.maps),
            map_refusals: Self::get(&self.map_refusals),
            connections: Self::get(&self.connections),
            order_violations: Self::get(&self.order_violations),
            flush_delayed: Self::get(&self.flush_delayed),
            flush_delay_us: Self::get(&self.flush_delay_us),
            memory_faults: crate::memory_guard::faults(),
            log_warnings,
            log_errors,
        }
    }

    pub fn sync_summary(&self) -> LatencySummary {
        summary(&lock(&self.sync_latency))
    }

    pub fn request_summary(&self) -> LatencySummary {
        summary(&lock(&self.request_latency))
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

    #[test]
    fn buckets_are_log2() {
        let mut h = histogram();
        for v in [0, 1, 2, 3, 16, 31, 31, 32, 1000, 5000] {
            h.saturating_record(v);
        }
        let got: Vec<(u64, u64, u64)> = log2_buckets(&h)
            .iter()
            .map(|b| (b.from, b.to, b.count))
            .collect();
        assert_eq!(
            got,
            [
                (0, 1, 2),
                (2, 3, 2),
                (16, 31, 3),
                (32, 63, 1),
                (512, 1023, 1),
                (4096, 8191, 1)
            ]
        );
    }

    #[test]
    fn per_connection_counts_go_to_the_current_connection_only() {
        let s = Stats::default();
        s.add_for(1, PerConnection::Requests, 1);
        assert_eq!(s.connection(), None, "nothing before the first connection");
        s.begin_connection(1);
        s.add_for(1, PerConnection::Requests, 3);
        s.connection_made(1);
        s.add_for(1, PerConnection::Maps, 1);
        s.begin_connection(2);
        s.add_for(2, PerConnection::Errors, 2);
        assert_eq!(s.connection().map(|c| (c.id, c.maps)), Some((1, 1)));
        s.connection_made(2);
        // A late answer for connection 1 is not connection 2's.
        s.add_for(1, PerConnection::Errors, 1);
        assert_eq!(Stats::get(&s.connections), 2);
        assert_eq!(
            s.connection(),
            Some(ConnectionCounters {
                id: 2,
                requests: 0,
                errors: 2,
                maps: 0
            })
        );
        s.record_batch(3);
        s.record_batch(2);
        assert_eq!(Stats::get(&s.largest_batch), 3);
    }
}
