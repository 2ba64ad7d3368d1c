//! Metrics: JSON on stderr at SIGUSR1, the --metrics-path file (at start, periodically, on
//! SIGUSR1, at exit), the summary at exit, and an idle daemon that does not wake up.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{context_switches, read_metrics, Daemon, Env, MIB, TIMEOUT};
use pmem_metrics::{ConnectionCounters, Metrics, FORMAT_VERSION};

/// The metrics lines on the daemon's stderr (log lines start with `[`).
fn json_lines(log: &str) -> Vec<Metrics> {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| Metrics::parse(Path::new("stderr"), l).expect("a metrics line"))
        .collect()
}

/// The `connection` object a report should hold.
fn conn(id: u64, requests: u64, errors: u64, maps: u64) -> Option<ConnectionCounters> {
    Some(ConnectionCounters {
        id,
        requests,
        errors,
        maps,
    })
}

/// Waits for the `n`th metrics line on stderr.
fn nth_line(d: &Daemon, n: usize) -> Metrics {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(m) = json_lines(&d.log()).into_iter().nth(n - 1) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "no JSON line {n}; log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sigusr1_prints_json_on_stderr_and_keeps_serving() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let d = env.start(&[]);
    let mut fe = d.connect();
    fe.start().unwrap();
    for _ in 0..3 {
        assert_eq!(fe.flush().unwrap(), 0);
    }
    assert_eq!(fe.request(9).unwrap().status, -1);

    d.sigusr1();
    let m = nth_line(&d, 1);
    assert_eq!(m.version, FORMAT_VERSION);
    assert_eq!(m.seq, 1);
    assert_eq!(m.pid, d.pid() as u32);
    assert_eq!(m.flush_mode, "group");
    assert!(!m.read_only);
    assert_eq!(m.flush_failure, None);
    assert_eq!(m.in_flight, 0);
    assert_eq!(m.largest_batch, 1, "one flush at a time");
    let c = m.counters;
    assert_eq!(c.requests, 3, "{m:?}");
    assert_eq!(c.fdatasyncs, 3, "one at a time, so none coalesced");
    assert_eq!(c.coalesced, 0);
    assert_eq!(c.unknown, 1);
    assert_eq!(c.malformed, 0);
    assert_eq!(c.errors, 0);
    assert_eq!(c.maps, 1);
    assert_eq!(c.map_refusals, 0);
    // The start-up probe, then this frontend.
    assert_eq!(c.connections, 2);
    assert_eq!(c.order_violations, 0);
    assert_eq!(c.log_errors, 0, "log:\n{}", d.log());
    // The unknown request's warning.
    assert_eq!(c.log_warnings, 1, "log:\n{}", d.log());
    assert_eq!(m.connection, conn(2, 3, 0, 1));
    for (name, h) in [
        ("fdatasync", m.fdatasync_latency_us),
        ("request", m.request_latency_us),
    ] {
        assert_eq!(h.count, 3, "{name}: {m:?}");
        assert!(h.min <= h.p50 && h.p50 <= h.max, "{name}: {m:?}");
    }
    assert_eq!(m.map_latency_us.count, 1, "{m:?}");
    assert_eq!(
        m.fdatasync_latency_log2_us
            .iter()
            .map(|b| b.count)
            .sum::<u64>(),
        3
    );
    // A request's latency includes its fdatasync's.
    assert!(m.request_latency_us.max >= m.fdatasync_latency_us.min);

    // SIGUSR1 does not end the daemon, and the next report counts on.
    assert_eq!(fe.flush().unwrap(), 0);
    d.sigusr1();
    let m2 = nth_line(&d, 2);
    assert_eq!(m2.seq, 2);
    assert_eq!(m2.counters.requests, 4);
    assert_eq!(m2.connection.unwrap().requests, 4);
    let mut d = d;
    assert!(d.is_running());
}

#[test]
fn metrics_path_is_written_at_start_on_sigusr1_and_at_exit() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let path = env.metrics_path();
    let mut d = env.start_with_metrics(&[]);
    // Written before the daemon serves.
    let start = read_metrics(&path).expect("metrics file written at start");
    assert_eq!((start.seq, start.counters.requests), (1, 0));
    assert_eq!(start.connection, None, "no frontend yet");
    assert_eq!(start.map_latency_us.count, 0);

    let mut fe = d.connect();
    fe.start().unwrap();
    for _ in 0..2 {
        assert_eq!(fe.flush().unwrap(), 0);
    }
    // No periodic writes with interval 0.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(read_metrics(&path).unwrap().seq, 1);

    let v = d.report(&path);
    assert_eq!(v.seq, 2, "the next write after the first");
    assert_eq!(v.counters.requests, 2);
    assert_eq!(v.counters.maps, 1);
    assert!(
        json_lines(&d.log()).is_empty(),
        "with --metrics-path the JSON goes to the file only"
    );
    let v = d.report(&path);
    assert_eq!(v.seq, 3, "a second SIGUSR1 writes the next number");

    assert_eq!(fe.flush().unwrap(), 0);
    let status = d.signal_and_wait(libc::SIGTERM);
    assert_eq!(status.code(), Some(0));
    let last = read_metrics(&path).unwrap();
    assert_eq!(
        (last.seq, last.counters.requests),
        (4, 3),
        "written at exit"
    );
    assert!(
        !env.path("metrics.json.tmp").exists(),
        "the temporary file is renamed"
    );
    let log = d.log();
    assert!(log.contains("final stats: requests=3"), "log:\n{log}");
    assert!(log.contains("fdatasync latency:"), "log:\n{log}");
    assert!(
        log.contains("request latency (pop to answer):"),
        "log:\n{log}"
    );
}

#[test]
fn metrics_path_is_rewritten_periodically() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let path = env.metrics_path();
    let p = path.display().to_string();
    let d = env.start(&["--metrics-path", &p, "--metrics-interval", "1"]);
    let mut fe = d.connect();
    fe.start().unwrap();
    for _ in 0..4 {
        assert_eq!(fe.flush().unwrap(), 0);
    }
    let v = d.wait_metrics(&path, |m| m.counters.requests == 4);
    assert!(v.uptime_s > 0.0);
    // Each periodic write numbers on.
    let later = d.wait_metrics_seq_above(&path, v.seq);
    assert_eq!(later.seq, v.seq + 1);
}

/// Every frontend connection is counted, and `connection` follows the newest one with its own
/// counts.
#[test]
fn connections_and_per_connection_counts_follow_reconnects() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let path = env.metrics_path();
    let d = env.start_with_metrics(&[]);
    let first = d.report(&path);
    // The harness's start-up probe is connection 1.
    assert_eq!(first.counters.connections, 1, "{first:?}");
    assert_eq!(first.connection.map(|c| c.id), Some(1));

    let mut fe = d.connect();
    fe.start().unwrap();
    for _ in 0..3 {
        assert_eq!(fe.flush().unwrap(), 0);
    }
    let m = d.report(&path);
    assert_eq!(m.counters.connections, 2);
    assert_eq!(m.connection, conn(2, 3, 0, 1));
    fe.disconnect();

    let mut fe = d.connect();
    fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
    let m = d.report(&path);
    assert_eq!(m.counters.connections, 3);
    assert_eq!((m.counters.requests, m.counters.maps), (4, 2));
    assert_eq!(m.connection, conn(3, 1, 0, 1));
    assert_eq!(m.map_latency_us.count, 2, "one per accepted map");
}

/// A read-only device answers every flush with -1: the daemon says so in `read_only`, and the
/// per-connection counts see the errors.
#[test]
fn read_only_and_errors_are_reported() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let path = env.metrics_path();
    let d = env.start_with_metrics(&["--read-only"]);
    let mut fe = d.connect();
    fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), -1);
    let m = d.report(&path);
    assert!(m.read_only);
    assert_eq!((m.counters.requests, m.counters.errors), (1, 1));
    let c = m.connection.unwrap();
    assert_eq!((c.requests, c.errors), (1, 1));
    assert_eq!(
        m.counters.log_warnings, 1,
        "the refused flush is warned about"
    );
}

#[test]
fn disconnect_logs_a_brief_summary() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let d = env.start(&[]);
    let mut fe = d.connect();
    fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
    fe.disconnect();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let log = d.log();
        // The readiness probe's connection ended with no request; ours had one.
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("frontend disconnected") && l.contains("requests=1"))
        {
            assert!(line.contains("request_p50="), "{line}");
            break;
        }
        assert!(Instant::now() < deadline, "no disconnect line; log:\n{log}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_idle_daemon_does_not_wake_up() {
    for mode in ["group", "serial", "parallel"] {
        let env = Env::new();
        env.create_file(2 * MIB);
        let d = env.start(&["--flush-mode", mode]);
        let mut fe = d.connect();
        fe.start().unwrap();
        assert_eq!(fe.flush().unwrap(), 0);
        // Let the threads settle after the flush and the map.
        std::thread::sleep(Duration::from_millis(200));
        let before = context_switches(d.pid());
        std::thread::sleep(Duration::from_secs(1));
        let woke = context_switches(d.pid()) - before;
        assert_eq!(woke, 0, "{mode}: {woke} context switches in 1 s of idling");
    }
}
