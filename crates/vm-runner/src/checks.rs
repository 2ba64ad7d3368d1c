//! Checks of a finished run that are more than counting TAP results: kernel trouble on the
//! console, what the guest did after its daemon was killed, QEMU's vhost trace, and the
//! read-only scenario.

use pmem_metrics::Metrics;

use crate::tap::{Boot, Directive};

const KERNEL_TROUBLE: [&str; 6] = [
    "WARNING: ",
    "BUG: ",
    "Oops",
    "general protection fault",
    "Call Trace:",
    "Kernel panic",
];

/// Console lines that show kernel trouble. With `crashed` (the guest's sysrq crash), only the
/// lines before the crash count: the crash itself prints a panic with a call trace.
pub fn kernel_warnings(console: &str, crashed: bool) -> Vec<String> {
    let lines: Box<dyn Iterator<Item = &str>> = if crashed {
        Box::new(
            console
                .lines()
                .take_while(|l| !l.contains("sysrq: Trigger a crash")),
        )
    } else {
        Box::new(console.lines())
    };
    lines
        .filter(|l| KERNEL_TROUBLE.iter().any(|k| l.contains(k)))
        .filter(|l| {
            !l.contains("sysrq triggered crash") && !l.contains("Kernel panic - not syncing: sysrq")
        })
        .map(str::to_string)
        .collect()
}

/// What the guest's fsync loop printed after its daemon was killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AfterKill {
    pub fsync_ok: usize,
    pub fsync_errors: usize,
    /// The loop said its fsync is waiting (`VUP-FSYNC-WAIT`).
    pub waiting: bool,
}

/// Lines `VUP-FSYNC n=N ok|error ...` and `VUP-FSYNC-WAIT` of the guest suite `fsyncloop`.
pub fn after_kill(out: &str) -> AfterKill {
    let mut a = AfterKill {
        fsync_ok: 0,
        fsync_errors: 0,
        waiting: false,
    };
    for l in out.lines() {
        if l.starts_with("VUP-FSYNC-WAIT") {
            a.waiting = true;
        }
        let mut w = l.split_whitespace();
        if w.next() != Some("VUP-FSYNC") {
            continue;
        }
        let numbered = w
            .next()
            .and_then(|n| n.strip_prefix("n="))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        match (numbered, w.next()) {
            (true, Some("ok")) => a.fsync_ok += 1,
            (true, Some("error")) => a.fsync_errors += 1,
            _ => {}
        }
    }
    a
}

/// The failures of a daemon kill: the guest may have had one fsync in flight and one answer
/// on its way to the console when the daemon died; any more successes were answered by
/// nobody. And the guest must have seen its fsync hang or fail.
pub fn after_kill_failures(a: AfterKill) -> Vec<String> {
    let mut f = Vec::new();
    if a.fsync_ok > 2 {
        f.push(format!(
            "{} fsyncs reported success after the daemon was killed",
            a.fsync_ok
        ));
    }
    if !a.waiting && a.fsync_errors == 0 {
        f.push("the guest reported neither a pending nor a failed fsync after the kill".into());
    }
    f
}

/// vhost device starts and SET_FEATURES messages in QEMU's trace (`--trace-vhost`).
pub fn device_starts(qemu_log: &str) -> (u64, u64) {
    let starts = qemu_log.matches("vhost_dev_start_in").count() as u64;
    let features = qemu_log
        .matches("vhost_user_write req:2 (SET_FEATURES)")
        .count() as u64;
    (starts, features)
}

/// QEMU 11.1.3's message when it cannot map a read-only file (docs/qemu.md).
pub const QEMU_READONLY_MAP_ERROR: &str =
    "unable to map backing store for guest RAM: Permission denied";

fn result<'a>(boots: &'a [Boot], name: &str) -> Option<&'a crate::tap::TapResult> {
    boots
        .iter()
        .flat_map(|b| &b.results)
        .find(|r| r.name == name)
}

/// The read-only scenario: the daemon must be read-only; when QEMU mapped the region the
/// guest must have read the file system (`ro_mount_read` passed, not skipped); when QEMU
/// refused the read-only map with its known error, the guest must have found the region
/// blank (`ro_region` skipped as zeros). Returns the outcome or what is wrong.
pub fn readonly_outcome(
    metrics: &Metrics,
    boots: &[Boot],
    qemu_log: &str,
) -> Result<String, String> {
    if !metrics.read_only {
        return Err("the daemon is not read-only (pass --daemon-arg=--read-only)".into());
    }
    if metrics.counters.maps > 0 {
        return match result(boots, "ro_mount_read") {
            Some(r) if r.ok && r.directive == Directive::None => {
                Ok("QEMU mapped the read-only region; the guest read it".into())
            }
            _ => Err("QEMU mapped the region, but ro_mount_read did not pass".into()),
        };
    }
    if !qemu_log.contains(QEMU_READONLY_MAP_ERROR) {
        return Err(format!(
            "the daemon's map was not accepted ({} refusals), and not for the known reason (see qemu.log)",
            metrics.counters.map_refusals
        ));
    }
    match result(boots, "ro_region") {
        Some(r) if matches!(&r.directive, Directive::Skip(why) if why.starts_with("the region reads as zeros")) => {
            Ok("QEMU 11.1.3 refused the read-only map (known, docs/qemu.md); the guest saw a blank region".into())
        }
        _ => Err("the map failed, but the guest did not report a blank region (ro_region)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::split_boots;

    #[test]
    fn kernel_trouble_but_not_the_crash_we_asked_for() {
        let c = "boot\n[ 1.0] WARNING: CPU: 0 at x\nfine\nsysrq: Trigger a crash\nKernel panic - not syncing: sysrq triggered crash\nCall Trace:\n";
        assert_eq!(kernel_warnings(c, true), ["[ 1.0] WARNING: CPU: 0 at x"]);
        assert_eq!(
            kernel_warnings(c, false).len(),
            2,
            "the call trace counts without a crash"
        );
        assert!(kernel_warnings("all quiet\n", false).is_empty());
    }

    #[test]
    fn after_a_daemon_kill() {
        let a = after_kill("VUP-FSYNC n=10 ok\nVUP-FSYNC n=11 ok\nVUP-FSYNC-WAIT n=12 5s\n");
        assert_eq!((a.fsync_ok, a.waiting), (2, true));
        assert!(after_kill_failures(a).is_empty());
        let late = after_kill("VUP-FSYNC n=1 ok\nVUP-FSYNC n=2 ok\nVUP-FSYNC n=3 ok\n");
        let f = after_kill_failures(late);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(after_kill_failures(after_kill("VUP-FSYNC n=4 error EIO\n")).is_empty());
        assert_eq!(
            after_kill("VUP-FSYNC n=x ok\nVUP-FSYNCS n=1 ok\n").fsync_ok,
            0
        );
    }

    #[test]
    fn vhost_trace_counts() {
        let log = "1 vhost_dev_start_in dev 0x1\n2 vhost_user_write req:2 (SET_FEATURES) flags:0x1\n3 vhost_dev_start_in\n";
        assert_eq!(device_starts(log), (2, 1));
    }

    fn metrics(read_only: bool, maps: u64) -> Metrics {
        let mut m: Metrics = serde_json::from_str(&format!(
            r#"{{"version":2,"seq":1,"pid":1,"flush_mode":"group","read_only":{read_only},"uptime_s":1.0,
            "in_flight":0,"flush_failure":null,"largest_batch":0,
            "counters":{{"requests":0,"fdatasyncs":0,"coalesced":0,"errors":0,"malformed":0,"unknown":0,
              "maps":0,"map_refusals":1,"connections":1,"order_violations":0,"log_warnings":0,"log_errors":0}},
            "connection":null,
            "fdatasync_latency_us":{{"count":0,"min":0,"mean":0.0,"p50":0,"p90":0,"p99":0,"p999":0,"max":0}},
            "request_latency_us":{{"count":0,"min":0,"mean":0.0,"p50":0,"p90":0,"p99":0,"p999":0,"max":0}},
            "map_latency_us":{{"count":0,"min":0,"mean":0.0,"p50":0,"p90":0,"p99":0,"p999":0,"max":0}},
            "fdatasync_latency_log2_us":[],"request_latency_log2_us":[]}}"#
        ))
        .unwrap();
        m.counters.maps = maps;
        m
    }

    #[test]
    fn the_readonly_scenario() {
        let blank = split_boots("VUP-BEGIN\n1..1\nok 1 - ro_region # SKIP the region reads as zeros (QEMU)\nVUP-END rc=0\n");
        let read = split_boots("VUP-BEGIN\n1..1\nok 1 - ro_mount_read\nVUP-END rc=0\n");
        assert!(readonly_outcome(&metrics(true, 0), &blank, QEMU_READONLY_MAP_ERROR).is_ok());
        assert!(readonly_outcome(&metrics(true, 0), &blank, "other")
            .unwrap_err()
            .contains("known reason"));
        assert!(readonly_outcome(&metrics(true, 0), &read, QEMU_READONLY_MAP_ERROR).is_err());
        assert!(readonly_outcome(&metrics(true, 1), &read, "").is_ok());
        assert!(readonly_outcome(&metrics(true, 1), &blank, "").is_err());
        assert!(readonly_outcome(&metrics(false, 1), &read, "")
            .unwrap_err()
            .contains("not read-only"));
    }
}
