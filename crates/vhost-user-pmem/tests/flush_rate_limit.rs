//! `--flush-rate-limit` against the real daemon over a real socket: under a continuous load of
//! several flushes in flight, the daemon makes fdatasyncs at the limit's rate in every flush
//! mode, answers every request with success, keeps the ordering rule, counts the delays, and
//! goes back to sleeping once the load stops. The same load without the limit makes many more
//! fdatasyncs, which shows the limited figure is the limit's doing.

mod common;

use std::time::{Duration, Instant};

use common::{context_switches, keep_flushing, Env, TIMEOUT};
use pmem_metrics::{FlushRateLimitSetting, Metrics};

/// The limit under test. A burst of 1 makes every fdatasync after the first wait for its own
/// token, so the expected count is exact (1 + rate x time) rather than depending on how the
/// load's start lines up with the burst.
const RATE: u32 = 20;
const LIMIT: &str = "20/s,burst=1";
/// Flushes kept in flight: enough that every fdatasync finds requests waiting for it.
const DEPTH: usize = 8;

/// What one run of the load gave. The daemon and its frontend stay up until it is dropped.
struct Run {
    daemon: common::Daemon,
    frontend: pmem_frontend::Frontend,
    metrics: Metrics,
    /// From just before the first submission to the last answer.
    elapsed: Duration,
    completed: usize,
}

/// Drives `DEPTH` flushes in flight for `secs` against a daemon in `mode` with `extra`
/// options, waits for every answer, and reads the daemon's metrics.
fn load(env: &Env, mode: &str, extra: &[&str], secs: u64) -> Run {
    let mut args = vec!["--size", "4M", "--flush-mode", mode];
    args.extend_from_slice(extra);
    let d = env.start_with_metrics(&args);
    let mut fe = d.connect();
    fe.start().unwrap();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(secs);
    let completed = keep_flushing(&mut fe, DEPTH, |_| Instant::now() < end);
    let elapsed = t0.elapsed();
    Run {
        metrics: d.report(&env.metrics_path()),
        daemon: d,
        frontend: fe,
        elapsed,
        completed,
    }
}

/// The load under the limit in `mode`: the fdatasync count within 10% of what the limit
/// allows, every request answered and none failed, no order violation, delays counted; then
/// an idle second without a single wakeup.
fn holds_the_rate(mode: &str, secs: u64) {
    let env = Env::new();
    let run = load(&env, mode, &["--flush-rate-limit", LIMIT], secs);
    let m = &run.metrics;
    let c = m.counters;
    let allowed = 1.0 + f64::from(RATE) * run.elapsed.as_secs_f64();
    let rate = c.fdatasyncs as f64 / run.elapsed.as_secs_f64();
    eprintln!(
        "{mode} {LIMIT}: {} fdatasyncs in {:.2} s ({rate:.1}/s, {allowed:.0} allowed), {} \
         requests, flush_delayed={} flush_delay_us={}",
        c.fdatasyncs,
        run.elapsed.as_secs_f64(),
        c.requests,
        c.flush_delayed,
        c.flush_delay_us
    );
    assert_eq!(
        m.flush_rate_limit,
        Some(FlushRateLimitSetting {
            ops_per_s: RATE,
            burst: 1
        })
    );
    // Never more than the limit allows. And never fewer than it allows in the time the disk
    // left it: a slow fdatasync (a busy shared disk) delays the next start by its own length,
    // which is the disk's doing, not the limiter's. In `parallel` mode up to DEPTH of them
    // overlap.
    let sync_s = m.fdatasync_latency_us.mean * m.fdatasync_latency_us.count as f64 / 1e6;
    let overlap = if mode == "parallel" {
        DEPTH as f64
    } else {
        1.0
    };
    let left_s = (run.elapsed.as_secs_f64() - sync_s / overlap).max(0.0);
    let floor = 1.0 + f64::from(RATE) * left_s;
    assert!(
        c.fdatasyncs as f64 <= 1.1 * allowed && c.fdatasyncs as f64 >= 0.9 * floor,
        "{mode}: {} fdatasyncs in {:?}, the limit allows {allowed:.0}, and at least {floor:.0} \
         in the {left_s:.2} s its fdatasyncs left: {m:?}",
        c.fdatasyncs,
        run.elapsed
    );
    assert_eq!(c.requests, run.completed as u64, "every request answered");
    assert_eq!(m.in_flight, 0);
    assert_eq!(c.errors, 0, "a held-back flush is late, never failed");
    assert_eq!(c.order_violations, 0, "{m:?}");
    assert_eq!(c.fdatasyncs + c.coalesced, c.requests, "{m:?}");
    assert!(c.flush_delayed > 0, "{m:?}");
    assert!(c.flush_delayed <= c.requests, "{m:?}");
    assert!(c.flush_delay_us > 0, "{m:?}");
    if mode == "group" {
        // One worker: its waits never overlap, so they add up to less than the run.
        assert!(c.flush_delay_us <= run.elapsed.as_micros() as u64, "{m:?}");
    }

    // No waiter is left behind: an idle daemon with a limit sleeps like one without.
    std::thread::sleep(Duration::from_millis(200));
    let before = context_switches(run.daemon.pid());
    std::thread::sleep(Duration::from_secs(1));
    let woke = context_switches(run.daemon.pid()) - before;
    assert_eq!(woke, 0, "{mode}: {woke} context switches in 1 s of idling");

    // The disconnect's log line carries the delay counters beside the others.
    drop(run.frontend);
    let want = format!(
        "flush_delayed={} flush_delay_us={}",
        c.flush_delayed, c.flush_delay_us
    );
    let deadline = Instant::now() + TIMEOUT;
    while !run
        .daemon
        .log()
        .lines()
        .any(|l| l.contains("frontend disconnected") && l.contains(&want))
    {
        assert!(
            Instant::now() < deadline,
            "{mode}: no disconnect line with {want}; log:\n{}",
            run.daemon.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn group_commit_holds_the_rate() {
    holds_the_rate("group", 5);
}

#[test]
fn serial_holds_the_rate() {
    holds_the_rate("serial", 2);
}

#[test]
fn parallel_holds_the_rate() {
    holds_the_rate("parallel", 2);
}

/// The control: the same load with no limit makes fdatasyncs several times faster than the
/// limit, so a daemon that ignored the limit would fail the tests above.
#[test]
fn without_the_limit_the_same_load_syncs_far_more() {
    let env = Env::new();
    let run = load(&env, "group", &[], 2);
    let c = run.metrics.counters;
    let rate = c.fdatasyncs as f64 / run.elapsed.as_secs_f64();
    eprintln!(
        "group, no limit: {} fdatasyncs in {:.2} s ({rate:.1}/s), {} requests",
        c.fdatasyncs,
        run.elapsed.as_secs_f64(),
        c.requests
    );
    assert_eq!(run.metrics.flush_rate_limit, None);
    assert_eq!((c.flush_delayed, c.flush_delay_us), (0, 0));
    assert_eq!(c.errors, 0);
    assert!(
        rate > 3.0 * f64::from(RATE),
        "{rate:.1} fdatasyncs/s without a limit is too close to the {RATE}/s limit for the \
         limited runs to show anything"
    );
}
