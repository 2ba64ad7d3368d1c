//! Metrics: JSON on stderr at SIGUSR1, the --metrics-path file (at start, periodically, on
//! SIGUSR1, at exit), the summary at exit, and an idle daemon that does not wake up.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, Env, MIB, TIMEOUT};
use serde_json::Value;

fn sigusr1(d: &Daemon) {
    // SAFETY: kill(2) on the pid of our own child, which has not been reaped.
    assert_eq!(unsafe { libc::kill(d.pid(), libc::SIGUSR1) }, 0);
}

fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a metrics line is JSON"))
        .collect()
}

fn read_json(path: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}")))
}

/// Waits until the file at `path` holds JSON for which `pred` is true.
fn wait_file(d: &Daemon, path: &Path, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = read_json(path) {
            if pred(&v) {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never matched; last: {:?}; log:\n{}",
            path.display(),
            read_json(path),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn requests(v: &Value) -> u64 {
    v["counters"]["requests"].as_u64().unwrap()
}

#[test]
fn sigusr1_prints_json_on_stderr_and_keeps_serving() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let mut d = env.start(&[]);
    let mut fe = d.connect();
    fe.start().unwrap();
    for _ in 0..3 {
        assert_eq!(fe.flush().unwrap(), 0);
    }
    assert_eq!(fe.request(9).unwrap().status, -1);

    sigusr1(&d);
    let deadline = Instant::now() + TIMEOUT;
    while json_lines(&d.log()).is_empty() {
        assert!(Instant::now() < deadline, "no JSON; log:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let m = &json_lines(&d.log())[0];
    assert_eq!(m["version"], 1);
    assert_eq!(m["flush_mode"], "group");
    assert_eq!(m["flush_failure"], Value::Null);
    let c = &m["counters"];
    assert_eq!(c["requests"], 3, "{m}");
    assert_eq!(c["fdatasyncs"], 3, "one at a time, so none coalesced");
    assert_eq!(c["coalesced"], 0);
    assert_eq!(c["unknown"], 1);
    assert_eq!(c["malformed"], 0);
    assert_eq!(c["errors"], 0);
    assert_eq!(c["maps"], 1);
    assert_eq!(c["order_violations"], 0);
    for h in ["fdatasync_latency_us", "request_latency_us"] {
        assert_eq!(m[h]["count"], 3, "{h}: {m}");
        let (min, p50, max) = (
            m[h]["min"].as_u64().unwrap(),
            m[h]["p50"].as_u64().unwrap(),
            m[h]["max"].as_u64().unwrap(),
        );
        assert!(min <= p50 && p50 <= max, "{h}: {m}");
    }
    // A request's latency includes its fdatasync's.
    assert!(m["request_latency_us"]["max"].as_u64() >= m["fdatasync_latency_us"]["min"].as_u64());

    // SIGUSR1 does not end the daemon, and the next report counts on.
    assert_eq!(fe.flush().unwrap(), 0);
    sigusr1(&d);
    let deadline = Instant::now() + TIMEOUT;
    while json_lines(&d.log()).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no second JSON; log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(json_lines(&d.log())[1]["counters"]["requests"], 4);
    assert!(d.is_running());
}

#[test]
fn metrics_path_is_written_at_start_on_sigusr1_and_at_exit() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let path = env.path("metrics.json");
    let p = path.display().to_string();
    let mut d = env.start(&["--metrics-path", &p, "--metrics-interval", "0"]);
    // Written before the daemon serves.
    let start = read_json(&path).expect("metrics file written at start");
    assert_eq!(requests(&start), 0);

    let mut fe = d.connect();
    fe.start().unwrap();
    for _ in 0..2 {
        assert_eq!(fe.flush().unwrap(), 0);
    }
    // No periodic writes with interval 0.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(requests(&read_json(&path).unwrap()), 0);

    sigusr1(&d);
    let v = wait_file(&d, &path, TIMEOUT, |v| requests(v) == 2);
    assert_eq!(v["counters"]["maps"], 1);
    assert!(
        json_lines(&d.log()).is_empty(),
        "with --metrics-path the JSON goes to the file only"
    );

    assert_eq!(fe.flush().unwrap(), 0);
    let status = d.signal_and_wait(libc::SIGTERM);
    assert_eq!(status.code(), Some(0));
    assert_eq!(requests(&read_json(&path).unwrap()), 3, "written at exit");
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
    let path = env.path("metrics.json");
    let p = path.display().to_string();
    let d = env.start(&["--metrics-path", &p, "--metrics-interval", "1"]);
    let mut fe = d.connect();
    fe.start().unwrap();
    for _ in 0..4 {
        assert_eq!(fe.flush().unwrap(), 0);
    }
    let v = wait_file(&d, &path, Duration::from_secs(5), |v| requests(v) == 4);
    assert!(v["uptime_s"].as_f64().unwrap() > 0.0);
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

/// Context switches of every thread of `pid` so far.
fn context_switches(pid: i32) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status =
            std::fs::read_to_string(task.unwrap().path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if line.starts_with("voluntary_ctxt_switches:")
                || line.starts_with("nonvoluntary_ctxt_switches:")
            {
                total += line
                    .split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap();
            }
        }
    }
    total
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
