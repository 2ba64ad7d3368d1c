//! The metrics JSON: what SIGUSR1, the periodic --metrics-path writes and the exit write
//! produce. One object, format version 1:
//!
//! ```json
//! {"version":1,"flush_mode":"group","uptime_s":12.5,"in_flight":0,"flush_failure":null,
//!  "counters":{"requests":..,"fdatasyncs":..,"coalesced":..,"errors":..,"malformed":..,
//!              "unknown":..,"maps":..,"order_violations":0},
//!  "fdatasync_latency_us":{"count":..,"min":..,"mean":..,"p50":..,"p90":..,"p99":..,"p999":..,"max":..},
//!  "request_latency_us":{..same..},
//!  "fdatasync_latency_log2_us":[{"from":16,"to":31,"count":506},..],
//!  "request_latency_log2_us":[..]}
//! ```
//!
//! `order_violations` counts requests answered by an fdatasync that started before they were
//! taken off the queue; it is always 0.

use std::io;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::backend::Device;
use crate::flush::FlushMode;
use crate::stats::{Counters, LatencySummary};

pub const FORMAT_VERSION: u32 = 1;

/// One log2 bucket: `count` values in `from..=to` microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Bucket {
    pub from: u64,
    pub to: u64,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub version: u32,
    pub flush_mode: FlushMode,
    pub uptime_s: f64,
    pub in_flight: usize,
    /// Why flushes are refused, once an fdatasync has failed.
    pub flush_failure: Option<String>,
    pub counters: Counters,
    pub fdatasync_latency_us: LatencySummary,
    pub request_latency_us: LatencySummary,
    pub fdatasync_latency_log2_us: Vec<Bucket>,
    pub request_latency_log2_us: Vec<Bucket>,
}

/// The non-empty buckets `[0, 1], [2, 3], [4, 7], ..` of `h`.
pub fn log2_buckets(h: &Histogram<u64>) -> Vec<Bucket> {
    let mut counts = [0u64; 64];
    for v in h.iter_recorded() {
        counts[log2_index(h.lowest_equivalent(v.value_iterated_to()))] += v.count_at_value();
    }
    buckets_from_counts(&counts)
}

/// The bucket that holds `value`: bucket 0 is `[0, 1]`, bucket `i > 0` is `[2^i, 2^(i+1) - 1]`.
/// Shared with the host benchmark, so that the daemon's and the benchmark's figures bucket alike.
pub fn log2_index(value: u64) -> usize {
    ((64 - value.leading_zeros()) as usize).saturating_sub(1)
}

/// The non-empty buckets, given the count in each bucket index (see [`log2_index`]).
pub fn buckets_from_counts(counts: &[u64; 64]) -> Vec<Bucket> {
    counts
        .iter()
        .enumerate()
        .filter(|(_, &c)| c > 0)
        .map(|(i, &count)| Bucket {
            from: if i == 0 { 0 } else { 1u64 << i },
            to: if i == 63 {
                u64::MAX
            } else {
                (1u64 << (i + 1)) - 1
            },
            count,
        })
        .collect()
}

impl Metrics {
    pub fn of(device: &Device) -> Metrics {
        let stats = &device.stats;
        let (fdatasync_latency_log2_us, fdatasync_latency_us) = {
            let h = stats.sync_latency.lock().unwrap_or_else(|e| e.into_inner());
            (log2_buckets(&h), LatencySummary::of(&h))
        };
        let (request_latency_log2_us, request_latency_us) = {
            let h = stats
                .request_latency
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            (log2_buckets(&h), LatencySummary::of(&h))
        };
        Metrics {
            version: FORMAT_VERSION,
            flush_mode: device.flush_mode(),
            uptime_s: (stats.epoch.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
            in_flight: device.flushes_in_flight(),
            flush_failure: device.backing.failure().map(|f| f.0.clone()),
            counters: stats.counters(),
            fdatasync_latency_us,
            request_latency_us,
            fdatasync_latency_log2_us,
            request_latency_log2_us,
        }
    }

    pub fn to_json(&self) -> String {
        // Serializing plain structs of numbers and strings cannot fail.
        serde_json::to_string(self).expect("metrics serialize")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write the metrics to {path}: {source}")]
pub struct WriteError {
    pub path: PathBuf,
    pub source: io::Error,
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Checks, before anything else is set up, that [`write_file`] will be able to write `path`:
/// its directory takes new files, and `path` is not a directory.
pub fn check_writable(path: &Path) -> Result<(), WriteError> {
    let err = |source| WriteError {
        path: path.to_path_buf(),
        source,
    };
    if path.is_dir() {
        return Err(err(io::Error::from(io::ErrorKind::IsADirectory)));
    }
    let tmp = tmp_path(path);
    std::fs::File::create(&tmp).map_err(err)?;
    std::fs::remove_file(&tmp).map_err(err)
}

/// Writes `metrics` to `path` by way of `path.tmp` and a rename, so that a reader sees the
/// previous file or the new one, never a partial one.
pub fn write_file(path: &Path, metrics: &Metrics) -> Result<(), WriteError> {
    let tmp = tmp_path(path);
    let mut json = metrics.to_json();
    json.push('\n');
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| WriteError {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for v in [0, 1, 2, 3, 16, 31, 31, 32, 1000, 5000] {
            h.record(v).unwrap();
        }
        let b = log2_buckets(&h);
        let got: Vec<(u64, u64, u64)> = b.iter().map(|b| (b.from, b.to, b.count)).collect();
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
    fn log2_bucket_edges() {
        let idx: Vec<usize> = [0, 1, 2, 3, 4, 15, 16, 31, 32, u64::MAX]
            .iter()
            .map(|&v| log2_index(v))
            .collect();
        assert_eq!(idx, [0, 0, 1, 1, 2, 3, 4, 4, 5, 63]);
        let mut counts = [0u64; 64];
        counts[0] = 2;
        counts[4] = 3;
        counts[63] = 1;
        let b: Vec<(u64, u64, u64)> = buckets_from_counts(&counts)
            .iter()
            .map(|b| (b.from, b.to, b.count))
            .collect();
        assert_eq!(b, [(0, 1, 2), (16, 31, 3), (1 << 63, u64::MAX, 1)]);
    }
}
