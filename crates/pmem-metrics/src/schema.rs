//! The metrics JSON, format version 2. One object, written whole (by way of a temporary file
//! and a rename) at every `--metrics-interval`, on SIGUSR1 and at exit:
//!
//! ```json
//! {"version":2,"seq":7,"pid":4242,"flush_mode":"group","read_only":false,"uptime_s":12.5,
//!  "in_flight":0,"flush_failure":null,"largest_batch":1,
//!  "flush_rate_limit":{"ops_per_s":20,"burst":20},
//!  "counters":{"requests":..,"fdatasyncs":..,"coalesced":..,"errors":..,"malformed":..,
//!              "unknown":..,"maps":..,"map_refusals":..,"connections":..,
//!              "order_violations":0,"flush_delayed":..,"flush_delay_us":..,
//!              "log_warnings":0,"log_errors":0},
//!  "connection":{"id":3,"requests":..,"errors":..,"maps":..},
//!  "backing":{"allocation":"full","size_bytes":..,"unallocated_bytes":0,"fs_free_bytes":..},
//!  "fdatasync_latency_us":{"count":..,"min":..,"mean":..,"p50":..,"p90":..,"p99":..,"p999":..,"max":..},
//!  "request_latency_us":{..same..},
//!  "map_latency_us":{..same..},
//!  "fdatasync_latency_log2_us":[{"from":16,"to":31,"count":506},..],
//!  "request_latency_log2_us":[..]}
//! ```
//!
//! Version 2 added `seq`, `pid`, `read_only`, `largest_batch`, `map_latency_us`, the
//! `connection` object and the counters `map_refusals`, `connections`, `log_warnings` and
//! `log_errors`.
//!
//! Fields added since, within version 2 (`backing`, `flush_rate_limit`,
//! `counters.flush_delayed`, `counters.flush_delay_us`, `counters.memory_faults`), are optional or carry a serde
//! default: a file written before them still parses (as not measured, no limit and no delay),
//! and a reader built before them ignores them. No reader can misread them, so they leave the
//! number alone.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::buckets::Bucket;

pub const FORMAT_VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub version: u32,
    /// 1 for the first file the daemon writes, one more for each file after it: a reader that
    /// asked for a write (SIGUSR1) waits for a `seq` above the one it saw before.
    pub seq: u64,
    pub pid: u32,
    /// `group`, `serial` or `parallel` (the daemon's `--flush-mode`).
    pub flush_mode: String,
    pub read_only: bool,
    pub uptime_s: f64,
    /// Requests taken off the queue and not yet answered.
    pub in_flight: u64,
    /// Why flushes are refused, once an fdatasync has failed (the failure is sticky).
    pub flush_failure: Option<String>,
    /// The most requests one fdatasync has answered since the daemon started.
    pub largest_batch: u64,
    /// The daemon's `--flush-rate-limit`; `None` without one.
    #[serde(default)]
    pub flush_rate_limit: Option<FlushRateLimitSetting>,
    pub counters: Counters,
    /// The frontend connection being served, or the last one; `None` before the first.
    pub connection: Option<ConnectionCounters>,
    /// The backing file's holes against its file system's free space, measured at each
    /// write; `None` when they could not be measured.
    pub backing: Option<BackingSpace>,
    pub fdatasync_latency_us: LatencySummary,
    /// From a request being taken off the queue to its answer.
    pub request_latency_us: LatencySummary,
    /// From the device start (SET_FEATURES) to the frontend's answer to SHMEM_MAP.
    pub map_latency_us: LatencySummary,
    pub fdatasync_latency_log2_us: Vec<Bucket>,
    pub request_latency_log2_us: Vec<Bucket>,
}

/// Counts since the daemon started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Flush requests taken off the queue.
    pub requests: u64,
    /// fdatasync calls made (or refused because of an earlier failure).
    pub fdatasyncs: u64,
    /// Requests answered by an fdatasync that also answered an earlier request in its batch.
    pub coalesced: u64,
    /// Flush requests answered with -1.
    pub errors: u64,
    /// Chains that did not have the shape of a request.
    pub malformed: u64,
    /// Requests of a type other than FLUSH.
    pub unknown: u64,
    /// SHMEM_MAP messages that the frontend accepted.
    pub maps: u64,
    /// SHMEM_MAP messages that the frontend refused or failed to answer.
    pub map_refusals: u64,
    /// Frontend connections accepted (listening) or made (`--connect`).
    pub connections: u64,
    /// Requests answered by an fdatasync that started before they were taken off the queue.
    /// The flush engine makes this impossible; it is counted so that the promise can be seen
    /// kept. Always 0.
    pub order_violations: u64,
    /// Requests answered by an fdatasync whose start `--flush-rate-limit` held back (in group
    /// mode every request of the batch, those that arrived during the wait too).
    #[serde(default)]
    pub flush_delayed: u64,
    /// Microseconds by which `--flush-rate-limit` held fdatasync starts back, summed over the
    /// fdatasyncs (not over their requests).
    #[serde(default)]
    pub flush_delay_us: u64,
    /// Pages of guest memory that faulted with SIGBUS (a frontend cut its memory file short
    /// under the daemon) and were replaced with zeros so that the daemon lived on.
    #[serde(default)]
    pub memory_faults: u64,
    /// Log records at warning and at error level.
    pub log_warnings: u64,
    pub log_errors: u64,
}

/// What a full host file system would do to the device: every unallocated byte is one a guest
/// store may need a new block for, and with none free QEMU gets SIGBUS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingSpace {
    /// `full` or `sparse` (the daemon's `--allocate`), or `read-only`.
    pub allocation: String,
    pub size_bytes: u64,
    /// Bytes of the device with no block behind them (0 after `--allocate full`).
    pub unallocated_bytes: u64,
    /// Bytes the file system can still allocate (statvfs f_bavail).
    pub fs_free_bytes: u64,
}

/// `--flush-rate-limit OPS/s,burst=N`: fdatasyncs a second, and how many may start at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushRateLimitSetting {
    pub ops_per_s: u32,
    pub burst: u32,
}

/// Counts of one frontend connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionCounters {
    /// 1 for the first connection, counting up.
    pub id: u64,
    pub requests: u64,
    pub errors: u64,
    pub maps: u64,
}

/// A latency distribution reduced to the figures people compare, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
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

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "requests={} fdatasyncs={} coalesced={} errors={} malformed={} unknown={} maps={} \
             map_refusals={} connections={} order_violations={} flush_delayed={} \
             flush_delay_us={}",
            self.requests,
            self.fdatasyncs,
            self.coalesced,
            self.errors,
            self.malformed,
            self.unknown,
            self.maps,
            self.map_refusals,
            self.connections,
            self.order_violations,
            self.flush_delayed,
            self.flush_delay_us,
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read the metrics file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the metrics file {path} is not metrics JSON: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "the metrics file {path} has format version {found}; this reader knows {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u64 },
}

impl Metrics {
    pub fn to_json(&self) -> String {
        // Plain structs of numbers and strings always serialize.
        serde_json::to_string(self).expect("metrics serialize")
    }

    /// Parses one metrics file, refusing other format versions by name rather than by a
    /// missing field.
    pub fn parse(path: &Path, text: &str) -> Result<Metrics, ReadError> {
        let parse_err = |source| ReadError::Parse {
            path: path.to_path_buf(),
            source,
        };
        let value: serde_json::Value = serde_json::from_str(text).map_err(parse_err)?;
        let found = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if found != u64::from(FORMAT_VERSION) {
            return Err(ReadError::Version {
                path: path.to_path_buf(),
                found,
            });
        }
        serde_json::from_value(value).map_err(parse_err)
    }

    pub fn read(path: &Path) -> Result<Metrics, ReadError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Metrics::parse(path, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Metrics {
        Metrics {
            version: FORMAT_VERSION,
            seq: 3,
            pid: 42,
            flush_mode: "group".into(),
            read_only: false,
            uptime_s: 1.5,
            in_flight: 0,
            flush_failure: None,
            largest_batch: 2,
            flush_rate_limit: Some(FlushRateLimitSetting {
                ops_per_s: 20,
                burst: 1,
            }),
            counters: Counters {
                requests: 10,
                maps: 1,
                connections: 1,
                ..Counters::default()
            },
            connection: Some(ConnectionCounters {
                id: 1,
                requests: 10,
                errors: 0,
                maps: 1,
            }),
            backing: Some(BackingSpace {
                allocation: "sparse".into(),
                size_bytes: 1 << 30,
                unallocated_bytes: 1 << 29,
                fs_free_bytes: 1 << 28,
            }),
            fdatasync_latency_us: LatencySummary::default(),
            request_latency_us: LatencySummary::default(),
            map_latency_us: LatencySummary::default(),
            fdatasync_latency_log2_us: vec![Bucket {
                from: 16,
                to: 31,
                count: 10,
            }],
            request_latency_log2_us: vec![],
        }
    }

    #[test]
    fn round_trips() {
        let m = sample();
        let back = Metrics::parse(Path::new("m.json"), &m.to_json()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn other_versions_are_refused_by_name() {
        let text = sample().to_json().replace("\"version\":2", "\"version\":1");
        let e = Metrics::parse(Path::new("m.json"), &text).unwrap_err();
        assert!(matches!(e, ReadError::Version { found: 1, .. }), "{e}");
        assert!(e.to_string().contains("format version 1"), "{e}");
    }

    #[test]
    fn files_from_before_the_rate_limit_still_parse() {
        let mut m = sample();
        m.flush_rate_limit = None;
        let mut v: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("flush_rate_limit");
        let c = o["counters"].as_object_mut().unwrap();
        c.remove("flush_delayed");
        c.remove("flush_delay_us");
        let back = Metrics::parse(Path::new("m.json"), &v.to_string()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn a_missing_field_is_a_parse_error() {
        let e = Metrics::parse(Path::new("m.json"), r#"{"version":2,"seq":1}"#).unwrap_err();
        assert!(matches!(e, ReadError::Parse { .. }), "{e}");
    }
}
