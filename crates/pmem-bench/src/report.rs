//! Latency samples reduced to what the report shows: min, avg, percentiles, max, and log2
//! buckets in the form of the kernel's MAP_SYNC cover letter (`16 - 31 us: 506`).

use std::fmt::Write as _;

use serde::Serialize;

/// Figures of one latency distribution, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub count: usize,
    pub min: f64,
    pub avg: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

use pmem_metrics::percentile;
/// `count` latencies in `from..=to` microseconds, bucketed exactly as the daemon's metrics.
pub use pmem_metrics::Bucket;

fn us(ns: u64) -> f64 {
    // One decimal: sub-100 ns differences are below what the clock and scheduler resolve.
    (ns as f64 / 100.0).round() / 10.0
}

impl Summary {
    /// Summarises latencies given in nanoseconds; `sorted` must be sorted.
    pub fn of(sorted: &[u64]) -> Summary {
        if sorted.is_empty() {
            return Summary {
                count: 0,
                min: 0.0,
                avg: 0.0,
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
            };
        }
        let sum: u128 = sorted.iter().map(|&v| u128::from(v)).sum();
        Summary {
            count: sorted.len(),
            min: us(sorted[0]),
            avg: us((sum / sorted.len() as u128) as u64),
            p50: us(percentile(sorted, 50.0)),
            p90: us(percentile(sorted, 90.0)),
            p99: us(percentile(sorted, 99.0)),
            p999: us(percentile(sorted, 99.9)),
            max: us(sorted[sorted.len() - 1]),
        }
    }
}

/// The buckets as lines `   16 -    31 us: 506`, indented by `indent`.
pub fn format_buckets(buckets: &[Bucket], indent: &str) -> String {
    let mut s = String::new();
    for b in buckets {
        let _ = writeln!(s, "{indent}{:>6} - {:>6} us: {}", b.from, b.to, b.count);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_quantiles() {
        let v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        let s = Summary::of(&v);
        assert_eq!(
            (s.count, s.min, s.p50, s.p99, s.max),
            (100, 1.0, 50.0, 99.0, 100.0)
        );
        assert_eq!(s.avg, 50.5);
        assert_eq!(Summary::of(&[]).count, 0);
        assert_eq!(Summary::of(&[1234]).p50, 1.2);
    }

    #[test]
    fn buckets_in_cover_letter_form() {
        let ns: Vec<u64> = [0, 1_500, 16_000, 31_999, 32_000, 1_000_000]
            .into_iter()
            .collect();
        let b = pmem_metrics::log2_buckets_ns(&ns);
        assert_eq!(
            b.iter()
                .map(|b| (b.from, b.to, b.count))
                .collect::<Vec<_>>(),
            [(0, 1, 2), (16, 31, 2), (32, 63, 1), (512, 1023, 1)]
        );
        let text = format_buckets(&b, "");
        assert!(text.contains("    16 -     31 us: 2\n"), "{text}");
    }
}
