//! Log2 latency buckets in whole microseconds (`[0, 1], [2, 3], [4, 7], ..`, the form of the
//! kernel's MAP_SYNC series cover letter) and the nearest-rank percentile.

use serde::{Deserialize, Serialize};

/// `count` values in `from..=to` microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    pub from: u64,
    pub to: u64,
    pub count: u64,
}

/// The bucket that holds `value`: bucket 0 is `[0, 1]`, bucket `i > 0` is `[2^i, 2^(i+1) - 1]`.
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

/// The non-empty buckets of latencies given in nanoseconds, bucketed in whole microseconds.
pub fn log2_buckets_ns(samples_ns: &[u64]) -> Vec<Bucket> {
    let mut counts = [0u64; 64];
    for &ns in samples_ns {
        counts[log2_index(ns / 1000)] += 1;
    }
    buckets_from_counts(&counts)
}

/// Nearest-rank percentile of sorted samples: the smallest sample such that at least `p`
/// percent of all samples are <= it. It never interpolates, so it is always an observed value.
/// 0 for no samples.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let exact = p / 100.0 * sorted.len() as f64;
    // `p / 100.0` is inexact (99.9 / 100 * 1000 is 999.0000000000001), and the ceiling of an
    // error above a whole rank would pick the next sample; a few ulps below it are no real
    // fraction of a sample.
    let rank = (exact - exact * 4.0 * f64::EPSILON).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median of `v` (the mean of the middle two for an even count); 0 for none.
pub fn median(v: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.into_iter().collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_none() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(Vec::<f64>::new()), 0.0);
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

    #[test]
    fn nanoseconds_bucket_in_whole_microseconds() {
        let b = log2_buckets_ns(&[999, 1_000, 16_999, 31_999, 32_000]);
        let got: Vec<(u64, u64, u64)> = b.iter().map(|b| (b.from, b.to, b.count)).collect();
        assert_eq!(got, [(0, 1, 2), (16, 31, 2), (32, 63, 1)]);
    }

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[5], 99.0), 5);
        assert_eq!(percentile(&[], 50.0), 0);
        let w: Vec<u64> = (1..=20).collect();
        assert_eq!(percentile(&w, 99.0), 20);
        assert_eq!(percentile(&w, 50.0), 10);
        // A rank that is whole in decimal but not in binary floating point.
        let k: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&k, 99.9), 999);
        let k: Vec<u64> = (1..=41_000).collect();
        assert_eq!(percentile(&k, 99.9), 40_959);
        let k: Vec<u64> = (1..=1001).collect();
        assert_eq!(percentile(&k, 99.9), 1000, "999.999 rounds up");
    }
}
