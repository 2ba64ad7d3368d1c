//! Latency statistics and their two printed forms: the human block in the style of the
//! MAP_SYNC series cover letter, and the machine line the runner compares across devices.

/// Summary of one op at one concurrency. Times are nanoseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub min_ns: u64,
    pub avg_ns: f64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

/// The buckets, the percentile and the median are the project's one implementation, shared
/// with the daemon's metrics and the host benchmark, so the three report alike.
pub use pmem_metrics::{log2_buckets_ns as log2_buckets, median, percentile, Bucket};

pub fn summarize(samples_ns: &[u64]) -> Option<Summary> {
    if samples_ns.is_empty() {
        return None;
    }
    let mut sorted = samples_ns.to_vec();
    sorted.sort_unstable();
    let sum: u128 = sorted.iter().map(|&s| s as u128).sum();
    Some(Summary {
        n: sorted.len(),
        min_ns: sorted[0],
        avg_ns: sum as f64 / sorted.len() as f64,
        p50_ns: percentile(&sorted, 50.0),
        p99_ns: percentile(&sorted, 99.0),
        max_ns: sorted[sorted.len() - 1],
    })
}

/// A `VUP-METRIC` line for a measurement that cannot be made on this device (`n=0
/// status=n/a`), so the runner can show it as n/a rather than as missing. `reason` is one
/// word (an errno name, or words joined by `_`).
pub fn format_na(op: &str, labels: Labels, threads: usize, reason: &str) -> String {
    let reason: String = reason
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect();
    format!(
        "VUP-METRIC op={op}{} threads={threads} n=0 status=n/a reason={reason}",
        label_text(labels)
    )
}

pub fn ops_per_sec(ops: usize, wall_ns: u64) -> f64 {
    if wall_ns == 0 {
        return 0.0;
    }
    ops as f64 * 1e9 / wall_ns as f64
}

/// The human block, without the `# ` prefix (the TAP writer adds it).
pub fn format_human(
    op: &str,
    threads: usize,
    s: &Summary,
    ops_s: f64,
    buckets: &[Bucket],
) -> String {
    let mut out = format!(
        "{op}, {threads} thread(s), {n} ops, {ops_s:.0} ops/s:\nmin={} avg={} p50={} p99={} max={} (us)\n",
        s.min_ns / 1000,
        (s.avg_ns / 1000.0).round() as u64,
        s.p50_ns / 1000,
        s.p99_ns / 1000,
        s.max_ns / 1000,
        n = s.n,
    );
    for b in buckets {
        out.push_str(&format!("{} - {} us: {}\n", b.from, b.to, b.count));
    }
    out
}

/// The catalogue's cover-letter block for one cell, without the `# ` prefix:
/// `File empty, background load, MAP_SHARED:`, `min=21 avg=23 max=67`, then the buckets.
pub fn format_cover_letter(title: &str, s: &Summary, buckets: &[Bucket]) -> String {
    let mut out = format!(
        "{title}:\nmin={} avg={} max={}\n",
        s.min_ns / 1000,
        (s.avg_ns / 1000.0).round() as u64,
        s.max_ns / 1000,
    );
    for b in buckets {
        out.push_str(&format!("{} - {} us: {}\n", b.from, b.to, b.count));
    }
    out
}

/// `key=value` pairs that say which measurement a `VUP-METRIC` line is, beyond `op` and
/// `threads` (the fault-latency cell, for example). Keys and values must be single words.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

fn label_text(labels: Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!(" {k}={v}"))
        .collect::<String>()
}

/// One `VUP-METRIC` line: space-separated `key=value` fields. `op` comes first, then any
/// labels, then `threads`, then the figures; readers key a row by every field that is not
/// a figure, and must ignore fields they do not know.
pub fn format_metric(op: &str, threads: usize, s: &Summary, ops_s: f64) -> String {
    format_metric_labeled(op, &[], threads, s, ops_s)
}

/// [`format_metric`] with labels.
pub fn format_metric_labeled(
    op: &str,
    labels: Labels,
    threads: usize,
    s: &Summary,
    ops_s: f64,
) -> String {
    format!(
        "VUP-METRIC op={op}{} threads={threads} n={} min_us={:.1} avg_us={:.1} p50_us={:.1} p99_us={:.1} max_us={:.1} ops_per_s={ops_s:.1}",
        label_text(labels),
        s.n,
        s.min_ns as f64 / 1000.0,
        s.avg_ns / 1000.0,
        s.p50_ns as f64 / 1000.0,
        s.p99_ns as f64 / 1000.0,
        s.max_ns as f64 / 1000.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarize_unsorted_input() {
        let s = summarize(&[3000, 1000, 2000, 10_000]).unwrap();
        assert_eq!(s.n, 4);
        assert_eq!(s.min_ns, 1000);
        assert_eq!(s.max_ns, 10_000);
        assert_eq!(s.avg_ns, 4000.0);
        assert_eq!(s.p50_ns, 2000);
        assert_eq!(s.p99_ns, 10_000);
        assert!(summarize(&[]).is_none());
    }

    #[test]
    fn buckets_are_log2_in_microseconds() {
        let ns = [
            0, 999, 1_500, 2_000, 3_999, 16_000, 31_999, 32_000, 1_000_000,
        ];
        let b = log2_buckets(&ns);
        let rows: Vec<(u64, u64, u64)> = b.iter().map(|b| (b.from, b.to, b.count)).collect();
        assert_eq!(
            rows,
            vec![
                (0, 1, 3),
                (2, 3, 2),
                (16, 31, 2),
                (32, 63, 1),
                (512, 1023, 1)
            ]
        );
        assert_eq!(b.iter().map(|b| b.count).sum::<u64>(), ns.len() as u64);
    }

    #[test]
    fn huge_sample_lands_in_last_bucket() {
        let b = log2_buckets(&[u64::MAX]);
        assert_eq!(b.len(), 1);
        assert_eq!((b[0].from, b[0].to), (1u64 << 54, (1u64 << 55) - 1));
    }

    #[test]
    fn human_block_matches_cover_letter_form() {
        let s = summarize(&[21_000, 23_000, 67_000]).unwrap();
        let text = format_human(
            "mmap_msync",
            1,
            &s,
            100.0,
            &log2_buckets(&[21_000, 23_000, 67_000]),
        );
        assert_eq!(
            text,
            "mmap_msync, 1 thread(s), 3 ops, 100 ops/s:\n\
             min=21 avg=37 p50=23 p99=67 max=67 (us)\n\
             16 - 31 us: 2\n\
             64 - 127 us: 1\n"
        );
    }

    #[test]
    fn metric_line_fields() {
        let s = summarize(&[1_000, 2_000]).unwrap();
        assert_eq!(
            format_metric("deep_flush", 4, &s, 1234.56),
            "VUP-METRIC op=deep_flush threads=4 n=2 min_us=1.0 avg_us=1.5 p50_us=1.0 p99_us=2.0 max_us=2.0 ops_per_s=1234.6"
        );
    }

    #[test]
    fn labeled_and_na_lines() {
        let s = summarize(&[21_000, 23_000, 67_000]).unwrap();
        let labels = [("file", "empty"), ("load", "copy"), ("map", "map_shared")];
        assert_eq!(
            format_metric_labeled("fault_latency", &labels, 1, &s, 10.0),
            "VUP-METRIC op=fault_latency file=empty load=copy map=map_shared threads=1 n=3 min_us=21.0 avg_us=37.0 p50_us=23.0 p99_us=67.0 max_us=67.0 ops_per_s=10.0"
        );
        assert_eq!(
            format_na("deep_flush", &[], 4, "no deep_flush attribute"),
            "VUP-METRIC op=deep_flush threads=4 n=0 status=n/a reason=no_deep_flush_attribute"
        );
        assert_eq!(
            format_na("fault_latency", &labels[..1], 1, "EOPNOTSUPP"),
            "VUP-METRIC op=fault_latency file=empty threads=1 n=0 status=n/a reason=EOPNOTSUPP"
        );
    }

    #[test]
    fn cover_letter_block() {
        let ns = [21_000, 23_000, 67_000];
        let s = summarize(&ns).unwrap();
        assert_eq!(
            format_cover_letter("File empty, background load, MAP_SHARED", &s, &log2_buckets(&ns)),
            "File empty, background load, MAP_SHARED:\nmin=21 avg=37 max=67\n16 - 31 us: 2\n64 - 127 us: 1\n"
        );
    }

    #[test]
    fn ops_per_sec_math() {
        assert_eq!(ops_per_sec(1000, 1_000_000_000), 1000.0);
        assert_eq!(ops_per_sec(5, 0), 0.0);
    }
}
