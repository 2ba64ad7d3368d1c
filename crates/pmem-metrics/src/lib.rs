//! What the daemon reports about itself, as one serde type that the daemon writes and every
//! test and script reads, and the latency arithmetic (log2 buckets, nearest-rank percentiles)
//! that the daemon, the guest suite and the host benchmark share so their figures compare.
//!
//! The metrics JSON is the daemon's test API: a VM test decides from these fields, never from
//! the daemon's log text. Any change of a field's name or meaning bumps [`FORMAT_VERSION`]; a
//! new field with a serde default, which old files and old readers both get along without,
//! does not (see [`schema`]).

pub mod buckets;
pub mod schema;

pub use buckets::{buckets_from_counts, log2_buckets_ns, log2_index, median, percentile, Bucket};
pub use schema::{
    BackingSpace, ConnectionCounters, Counters, FlushRateLimitSetting, LatencySummary, Metrics,
    ReadError, FORMAT_VERSION,
};
