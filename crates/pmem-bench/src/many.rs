//! Many daemons on one host (`--daemons 1,4,16`): for each count N, N daemons at once, each on
//! its own file and driven by a frontend thread of its own, against N raw fdatasync loops at
//! once (N threads, each on its own file). A host that gives every guest its own daemon needs
//! the total throughput to keep up with the raw loops, each daemon to stay small and start
//! fast, and idle daemons to stay asleep; this measures each of those.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, OnceLock};
use std::time::{Duration, Instant};

use pmem_frontend::{Frontend, Options};
use pmem_metrics::median;
use serde::Serialize;

use crate::daemon::Daemon;
use crate::report::Summary;
use crate::{
    idle_window, prepare_file, raw_loop, run_depth, svg, sys, BenchError, Dirtier, Plan, Samples,
    Until, PAGE,
};

/// Time every daemon of a run gets to listen, counted from the last spawn: 16 start-ups on
/// 2 busy CPUs are slower than one.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the start-up wait tries the sockets: the resolution of the start-up time.
const LISTEN_POLL: Duration = Duration::from_millis(1);

fn file(plan: &Plan, i: usize) -> PathBuf {
    plan.dir.join(format!("pmem-bench-{i}.img"))
}

fn socket(plan: &Plan, i: usize) -> PathBuf {
    plan.dir.join(format!("bench-{i}.sock"))
}

/// The steps every driver thread and the coordinating thread pass together. A thread that
/// fails still passes its remaining steps (on drop), so no one is left waiting at a barrier;
/// the others see the failure at their next step and skip the rest of their work.
struct Steps<'a> {
    barrier: &'a Barrier,
    failed: &'a AtomicBool,
    passed: usize,
    total: usize,
}

impl<'a> Steps<'a> {
    fn new(barrier: &'a Barrier, failed: &'a AtomicBool, total: usize) -> Self {
        Steps {
            barrier,
            failed,
            passed: 0,
            total,
        }
    }

    /// Waits for everyone; false if someone has failed.
    fn pass(&mut self) -> bool {
        debug_assert!(self.passed < self.total);
        self.barrier.wait();
        self.passed += 1;
        !self.failed.load(Ordering::SeqCst)
    }

    /// Runs `body` with these steps; an error marks the run failed for everyone.
    fn run<T>(
        mut self,
        body: impl FnOnce(&mut Self) -> Result<Option<T>, BenchError>,
    ) -> Result<Option<T>, BenchError> {
        let r = body(&mut self);
        if r.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        r
    }
}

impl Drop for Steps<'_> {
    fn drop(&mut self) {
        while self.passed < self.total {
            self.barrier.wait();
            self.passed += 1;
        }
    }
}

/// One side (daemons or raw loops) of one round at one N.
#[derive(Debug, Clone, Serialize)]
struct Side {
    /// Measured flushes of all threads over the span from the common start to the last
    /// completion.
    flushes_per_s: f64,
    flushes: usize,
    /// Over the requests of every thread together.
    p50_us: f64,
    p99_us: f64,
    /// Daemons: CPU of all daemons per measured flush; raw: the loop threads' CPU inside
    /// fdatasync per fdatasync.
    cpu_us_per_flush: Option<f64>,
    cpu_from_clock_ticks: bool,
}

impl Side {
    fn of(start: Instant, mut s: Samples) -> Side {
        s.ns.sort_unstable();
        let l = Summary::of(&s.ns);
        let span = s.ended.map_or(0.0, |e| (e - start).as_secs_f64());
        Side {
            flushes_per_s: if span > 0.0 {
                (s.ns.len() as f64 / span).round()
            } else {
                0.0
            },
            flushes: s.ns.len(),
            p50_us: l.p50,
            p99_us: l.p99,
            cpu_us_per_flush: s.cpu_us_per_flush(),
            cpu_from_clock_ticks: s.cpu_from_ticks,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Round {
    round: usize,
    daemons: usize,
    /// Which side ran first in this round.
    first: &'static str,
    daemon: Side,
    raw: Side,
    ratio: f64,
    #[serde(flatten)]
    resources: Resources,
}

/// What the daemons of one run cost besides CPU.
#[derive(Debug, Clone, Serialize)]
struct Resources {
    /// Of each daemon after its measured flushes, KiB.
    vm_rss_kib: Vec<u64>,
    vm_hwm_kib: Vec<u64>,
    /// Of each daemon: spawn until its socket took a connection.
    startup_ms: Vec<f64>,
    /// Summed over every thread of every daemon during the idle window.
    idle_context_switches: u64,
    idle_threads: usize,
    /// From the daemons' own counters: warm-up and the idle flush included.
    fdatasyncs_per_request: f64,
}

/// Round `round` of `n` daemons: start them all, count their wakeups while idle, then drive
/// every one from its own thread for the same `plan.run_secs`.
fn run_daemons(plan: &Plan, n: usize) -> Result<(Side, Resources), BenchError> {
    let mode = plan.modes[0].as_str();
    let mut daemons = Vec::with_capacity(n);
    let mut spawned = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        daemons.push(Daemon::spawn(
            &plan.daemon,
            mode,
            &[],
            &file(plan, i),
            &socket(plan, i),
            Some(&plan.dir.join(format!("metrics-{i}.json"))),
            &plan.out.join(format!("daemon-many-{i}.log")),
        )?);
        spawned.push(t);
    }
    // All sockets are tried in turn, so no daemon's start-up waits on another's.
    let mut startup: Vec<Option<Duration>> = vec![None; n];
    let give_up = Instant::now() + LISTEN_TIMEOUT;
    while startup.iter().any(Option::is_none) {
        for (i, d) in daemons.iter_mut().enumerate() {
            if startup[i].is_none() {
                if d.accepts() {
                    startup[i] = Some(spawned[i].elapsed());
                } else {
                    d.check_running()?;
                }
            }
        }
        if Instant::now() > give_up {
            return Err(BenchError::Daemon(format!(
                "{} of {n} daemons did not listen within {LISTEN_TIMEOUT:?}",
                startup.iter().filter(|s| s.is_none()).count()
            )));
        }
        std::thread::sleep(LISTEN_POLL);
    }
    for d in &mut daemons {
        d.wait_serving()?;
    }

    let barrier = Barrier::new(n + 1);
    let failed = AtomicBool::new(false);
    let deadline = OnceLock::new();
    let (coord, drivers) = std::thread::scope(|scope| {
        let (barrier, failed, deadline) = (&barrier, &failed, &deadline);
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let socket = socket(plan, i);
                scope.spawn(move || {
                    Steps::new(barrier, failed, DAEMON_STEPS)
                        .run(|steps| drive_daemon(plan, &socket, steps, deadline))
                })
            })
            .collect();
        let pids: Vec<u32> = daemons.iter().map(Daemon::pid).collect();
        let coord = Steps::new(barrier, failed, DAEMON_STEPS)
            .run(|steps| coordinate(plan, &pids, steps, deadline));
        let drivers: Vec<_> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(BenchError::Daemon("a driver thread panicked".into())))
            })
            .collect();
        (coord, drivers)
    });
    let mut per_daemon = Vec::with_capacity(n);
    for d in drivers {
        per_daemon.push(d?);
    }
    let coord = coord?;
    let (Some(coord), Some(per_daemon)) =
        (coord, per_daemon.into_iter().collect::<Option<Vec<_>>>())
    else {
        return Err(BenchError::Daemon(
            "a driver failed without an error".into(),
        ));
    };

    let mut pooled = Samples::default();
    let (mut syncs, mut requests) = (0, 0);
    for (d, s) in daemons.iter_mut().zip(per_daemon) {
        let m = d.metrics(s.requests)?;
        syncs += m.counters.fdatasyncs;
        requests += s.requests;
        pooled.add(s);
    }
    pooled.cpu_ns = coord.cpu_ns;
    pooled.cpu_flushes = if coord.cpu_complete {
        pooled.ns.len() as u64
    } else {
        0
    };
    pooled.cpu_from_ticks = coord.cpu_from_ticks;
    for (i, d) in daemons.into_iter().enumerate() {
        let status = d.stop()?;
        if !status.success() {
            return Err(BenchError::Daemon(format!(
                "daemon {i} exited with {status}; see {}",
                plan.out.join(format!("daemon-many-{i}.log")).display()
            )));
        }
    }
    let resources = Resources {
        vm_rss_kib: coord.memory.iter().map(|m| m.0).collect(),
        vm_hwm_kib: coord.memory.iter().map(|m| m.1).collect(),
        startup_ms: startup
            .iter()
            .map(|s| s.map_or(0.0, |d| (d.as_secs_f64() * 10_000.0).round() / 10.0))
            .collect(),
        idle_context_switches: coord.idle_switches,
        idle_threads: coord.idle_threads,
        fdatasyncs_per_request: if requests > 0 {
            (syncs as f64 / requests as f64 * 1000.0).round() / 1000.0
        } else {
            0.0
        },
    };
    Ok((Side::of(coord.start, pooled), resources))
}

/// Barrier steps of a daemon run: 1 every device started and flushed once, 2 idle window
/// over, 3 warmed up, 4 deadline set, 5 measured, 6 the coordinator's readings done.
const DAEMON_STEPS: usize = 6;

/// One frontend thread of a daemon run: its measured samples, with every request it made
/// counted (the idle flush and the warm-up too) for the check against the daemon's counters.
fn drive_daemon(
    plan: &Plan,
    socket: &Path,
    steps: &mut Steps,
    deadline: &OnceLock<Instant>,
) -> Result<Option<Samples>, BenchError> {
    let opts = Options {
        timeout: Duration::from_secs(30),
        ..Options::default()
    };
    let mut fe = Frontend::connect_with(socket, opts).map_err(BenchError::fe("connect"))?;
    let map = fe.start().map_err(BenchError::fe("start the device"))?;
    let status = fe.flush().map_err(BenchError::fe("flush"))?;
    if status != 0 {
        return Err(BenchError::Daemon(format!("first flush answered {status}")));
    }
    if !steps.pass() || !steps.pass() {
        return Ok(None);
    }
    let depth = plan.depths[0];
    let mut dirt = Dirtier::new(plan);
    let warm = run_depth(
        &mut fe,
        &map,
        &mut dirt,
        depth,
        0,
        Until::Count(plan.warmup(depth)),
        &mut || {},
    )?;
    if !steps.pass() || !steps.pass() {
        return Ok(None);
    }
    let until = Until::Deadline(*deadline.get().expect("set before step 4"));
    let mut s = run_depth(&mut fe, &map, &mut dirt, depth, 0, until, &mut || {})?;
    s.requests += warm.requests + 1;
    // The frontend stays connected until the coordinator has read the daemons' memory.
    steps.pass();
    steps.pass();
    Ok(Some(s))
}

struct Coordinated {
    start: Instant,
    cpu_ns: u64,
    /// Every daemon's CPU was read before and after.
    cpu_complete: bool,
    cpu_from_ticks: bool,
    idle_switches: u64,
    idle_threads: usize,
    /// (VmRSS, VmHWM) KiB of each daemon.
    memory: Vec<(u64, u64)>,
}

fn coordinate(
    plan: &Plan,
    pids: &[u32],
    steps: &mut Steps,
    deadline: &OnceLock<Instant>,
) -> Result<Option<Coordinated>, BenchError> {
    if !steps.pass() {
        return Ok(None);
    }
    let (idle_switches, idle_threads) = idle_window(pids, plan.idle_secs)?;
    if !steps.pass() || !steps.pass() {
        return Ok(None);
    }
    // Every driver waits at step 4, so the daemons are quiet while they are read.
    let before: Vec<_> = pids.iter().map(|&p| sys::cpu_time(p).ok()).collect();
    let start = Instant::now();
    let _ = deadline.set(start + Duration::from_secs_f64(plan.run_secs));
    if !steps.pass() || !steps.pass() {
        return Ok(None);
    }
    let after: Vec<_> = pids.iter().map(|&p| sys::cpu_time(p).ok()).collect();
    let memory = pids
        .iter()
        .map(|&p| sys::memory_kib(p).unwrap_or((0, 0)))
        .collect();
    steps.pass();
    let (mut cpu_ns, mut cpu_complete, mut cpu_from_ticks) = (0, true, false);
    for (b, a) in before.iter().zip(&after) {
        match (b, a) {
            (Some(b), Some(a)) => {
                let (ns, exact) = b.since(a);
                cpu_ns += ns;
                cpu_from_ticks |= !exact;
            }
            _ => cpu_complete = false,
        }
    }
    Ok(Some(Coordinated {
        start,
        cpu_ns,
        cpu_complete,
        cpu_from_ticks,
        idle_switches,
        idle_threads,
        memory,
    }))
}

/// Barrier steps of a raw run: 1 every loop warmed up, 2 deadline set.
const RAW_STEPS: usize = 2;

/// `n` raw fdatasync loops at once, each on its own file, for `plan.run_secs`.
fn run_raw(plan: &Plan, n: usize) -> Result<Side, BenchError> {
    let barrier = Barrier::new(n + 1);
    let failed = AtomicBool::new(false);
    let deadline = OnceLock::new();
    let (start, loops) = std::thread::scope(|scope| {
        let (barrier, failed, deadline) = (&barrier, &failed, &deadline);
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let path = file(plan, i);
                scope.spawn(move || {
                    Steps::new(barrier, failed, RAW_STEPS).run(|steps| {
                        let map = sys::RawMapping::open(&path, plan.working_pages * PAGE)
                            .map_err(BenchError::io(format!("map {}", path.display())))?;
                        let mut dirt = Dirtier::new(plan);
                        raw_loop(&map, &mut dirt, 0, Until::Count(plan.warmup(1)))?;
                        if !steps.pass() || !steps.pass() {
                            return Ok(None);
                        }
                        let until = Until::Deadline(*deadline.get().expect("set before step 2"));
                        raw_loop(&map, &mut dirt, 0, until).map(Some)
                    })
                })
            })
            .collect();
        let start = Steps::new(barrier, failed, RAW_STEPS).run(|steps| {
            if !steps.pass() {
                return Ok(None);
            }
            let start = Instant::now();
            let _ = deadline.set(start + Duration::from_secs_f64(plan.run_secs));
            steps.pass();
            Ok(Some(start))
        });
        let loops: Vec<_> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(BenchError::Daemon("a raw loop panicked".into())))
            })
            .collect();
        (start, loops)
    });
    let mut pooled = Samples::default();
    for l in loops {
        if let Some(s) = l? {
            pooled.add(s);
        }
    }
    match start? {
        Some(start) => Ok(Side::of(start, pooled)),
        None => Err(BenchError::Daemon(
            "a raw loop failed without an error".into(),
        )),
    }
}

fn mib(kib: f64) -> f64 {
    (kib / 1024.0 * 100.0).round() / 100.0
}

/// One N over all rounds: medians of the rounds' figures, except where said.
#[derive(Debug, Serialize)]
struct Row {
    daemons: usize,
    daemon_flushes_per_s: f64,
    raw_fdatasyncs_per_s: f64,
    /// Of the two medians.
    ratio: f64,
    /// Each round's daemons / raw, whose two runs followed each other, and their median: a
    /// load that changes between rounds moves both runs of a round alike.
    round_ratios: Vec<f64>,
    median_round_ratio: f64,
    daemon_p50_us: f64,
    daemon_p99_us: f64,
    raw_p50_us: f64,
    raw_p99_us: f64,
    daemon_cpu_us_per_flush: Option<f64>,
    raw_cpu_us_per_fdatasync: Option<f64>,
    cpu_from_clock_ticks: bool,
    vm_rss_sum_mib: f64,
    vm_hwm_sum_mib: f64,
    vm_rss_per_daemon_mib: f64,
    /// The largest of any one daemon in any round.
    vm_hwm_max_mib: f64,
    /// Over every daemon of every round.
    startup_ms_median: f64,
    startup_ms_max: f64,
    /// Each round's.
    idle_context_switches: Vec<u64>,
    idle_threads: usize,
    fdatasyncs_per_request: f64,
}

fn row(n: usize, rounds: &[&Round]) -> Row {
    let med = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(|r| f(r)));
    let med_opt = |f: &dyn Fn(&Round) -> Option<f64>| {
        let v: Vec<f64> = rounds.iter().filter_map(|r| f(r)).collect();
        (v.len() == rounds.len() && !v.is_empty()).then(|| (median(v) * 10.0).round() / 10.0)
    };
    let daemon_rate = med(&|r| r.daemon.flushes_per_s);
    let raw_rate = med(&|r| r.raw.flushes_per_s);
    let startups: Vec<f64> = rounds
        .iter()
        .flat_map(|r| r.resources.startup_ms.clone())
        .collect();
    let sum = |v: &[u64]| v.iter().sum::<u64>() as f64;
    Row {
        daemons: n,
        daemon_flushes_per_s: daemon_rate,
        raw_fdatasyncs_per_s: raw_rate,
        ratio: if raw_rate > 0.0 {
            (daemon_rate / raw_rate * 100.0).round() / 100.0
        } else {
            0.0
        },
        round_ratios: rounds.iter().map(|r| r.ratio).collect(),
        median_round_ratio: med(&|r| r.ratio),
        daemon_p50_us: med(&|r| r.daemon.p50_us),
        daemon_p99_us: med(&|r| r.daemon.p99_us),
        raw_p50_us: med(&|r| r.raw.p50_us),
        raw_p99_us: med(&|r| r.raw.p99_us),
        daemon_cpu_us_per_flush: med_opt(&|r| r.daemon.cpu_us_per_flush),
        raw_cpu_us_per_fdatasync: med_opt(&|r| r.raw.cpu_us_per_flush),
        cpu_from_clock_ticks: rounds.iter().any(|r| r.daemon.cpu_from_clock_ticks),
        vm_rss_sum_mib: mib(med(&|r| sum(&r.resources.vm_rss_kib))),
        vm_hwm_sum_mib: mib(med(&|r| sum(&r.resources.vm_hwm_kib))),
        vm_rss_per_daemon_mib: mib(med(&|r| sum(&r.resources.vm_rss_kib) / n as f64)),
        vm_hwm_max_mib: mib(rounds
            .iter()
            .flat_map(|r| r.resources.vm_hwm_kib.iter().copied())
            .max()
            .unwrap_or(0) as f64),
        startup_ms_median: median(startups.iter().copied()),
        startup_ms_max: startups.iter().copied().fold(0.0, f64::max),
        idle_context_switches: rounds
            .iter()
            .map(|r| r.resources.idle_context_switches)
            .collect(),
        idle_threads: rounds.first().map_or(0, |r| r.resources.idle_threads),
        fdatasyncs_per_request: med(&|r| r.resources.fdatasyncs_per_request),
    }
}

#[derive(Serialize)]
struct Target {
    target: String,
    measured: String,
    met: bool,
}

/// The targets, at the largest N run (16 in the issue).
fn targets(rows: &[Row], idle_secs: u64) -> Vec<Target> {
    let mut t = Vec::new();
    let Some(top) = rows.last() else {
        return t;
    };
    let n = top.daemons;
    t.push(Target {
        target: format!(
            "{n} daemons at once: total flushes/s >= 0.9 x {n} raw fdatasync loops at once"
        ),
        measured: format!(
            "{:.0} vs {:.0} /s = {:.2} x; median of the rounds' ratios {:.2} x ({})",
            top.daemon_flushes_per_s,
            top.raw_fdatasyncs_per_s,
            top.ratio,
            top.median_round_ratio,
            join(&top.round_ratios, |r| format!("{r:.2}"))
        ),
        // Both ways of reading the rounds must meet it.
        met: top.ratio.min(top.median_round_ratio) >= 0.9,
    });
    if idle_secs > 0 {
        t.push(Target {
            target: format!("{n} idle daemons: 0 wakeups"),
            measured: format!(
                "{} context switches in {idle_secs} s over {} threads, each round",
                join(&top.idle_context_switches, u64::to_string),
                top.idle_threads
            ),
            met: top.idle_context_switches.iter().all(|&c| c == 0),
        });
    }
    let hwm = rows.iter().map(|r| r.vm_hwm_max_mib).fold(0.0, f64::max);
    t.push(Target {
        target: "RSS <= 8 MiB per daemon".into(),
        measured: format!("largest VmHWM of any daemon {hwm:.2} MiB"),
        met: hwm <= 8.0,
    });
    t
}

fn join<T>(v: &[T], f: impl Fn(&T) -> String) -> String {
    v.iter().map(f).collect::<Vec<_>>().join(", ")
}

#[derive(Serialize)]
struct Results {
    command: String,
    machine: sys::Machine,
    loadavg_start: f64,
    loadavg_end: f64,
    mode: String,
    depth: usize,
    pages_per_flush: usize,
    file_size: u64,
    working_set_bytes: usize,
    rounds: usize,
    run_secs: f64,
    idle_secs: u64,
    quick: bool,
    duration_s: f64,
    rows: Vec<Row>,
    each_round: Vec<Round>,
    targets: Vec<Target>,
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |c| format!("{c:.1}"))
}

fn markdown(res: &Results) -> String {
    let mut s = String::new();
    let m = &res.machine;
    let _ = writeln!(s, "Command: `{}`\n", res.command);
    let _ = writeln!(
        s,
        "Machine: {} CPUs ({}), kernel {}, files on {} ({} mounted at {}); load average {:.2} at start, {:.2} at end; {:.0} s.\n",
        m.nproc, m.cpu_model, m.kernel, m.fs_type, m.fs_source, m.mount_point, res.loadavg_start, res.loadavg_end, res.duration_s
    );
    let _ = writeln!(
        s,
        "For each N: N daemons (`--flush-mode {}`) at once, each on its own {} MiB file (which it allocates at start), each driven by its own frontend thread at depth {} with {} dirty page(s) per flush, for {} s; against N raw fdatasync loops at once (N threads, each on one of the same files, dirtying the same pages through its own mapping). {} rounds, raw and daemons alternating which goes first; medians over the rounds. Latency percentiles are over the requests of all N threads together.\n",
        res.mode,
        res.file_size >> 20,
        res.depth,
        res.pages_per_flush,
        res.run_secs,
        res.rounds
    );
    let _ = writeln!(
        s,
        "| daemons | daemons flushes/s (total) | raw fdatasyncs/s (total) | daemons / raw | each round (median) | daemons p50 / p99 us | raw p50 / p99 us | daemon CPU us per flush | raw CPU us per fdatasync | fdatasyncs/request |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|");
    for r in &res.rows {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.2} | {} ({:.2}) | {:.0} / {:.0} | {:.0} / {:.0} | {}{} | {} | {:.3} |",
            r.daemons,
            r.daemon_flushes_per_s,
            r.raw_fdatasyncs_per_s,
            r.ratio,
            join(&r.round_ratios, |x| format!("{x:.2}")),
            r.median_round_ratio,
            r.daemon_p50_us,
            r.daemon_p99_us,
            r.raw_p50_us,
            r.raw_p99_us,
            opt(r.daemon_cpu_us_per_flush),
            if r.cpu_from_clock_ticks { " (ticks)" } else { "" },
            opt(r.raw_cpu_us_per_fdatasync),
            r.fdatasyncs_per_request,
        );
    }
    let _ = writeln!(
        s,
        "\nDaemon CPU: user + system time of all daemons (/proc/PID/task/*/schedstat), per measured flush; raw: the loop threads' own CPU time inside fdatasync.\n"
    );
    let _ = writeln!(
        s,
        "| daemons | VmRSS sum MiB | VmHWM sum MiB | VmRSS per daemon MiB | largest VmHWM of one daemon MiB | start-up ms median / max | idle context switches (each round) | daemon threads |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---|---:|");
    for r in &res.rows {
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} / {:.1} | {} | {} |",
            r.daemons,
            r.vm_rss_sum_mib,
            r.vm_hwm_sum_mib,
            r.vm_rss_per_daemon_mib,
            r.vm_hwm_max_mib,
            r.startup_ms_median,
            r.startup_ms_max,
            join(&r.idle_context_switches, u64::to_string),
            r.idle_threads,
        );
    }
    let _ = writeln!(
        s,
        "\nMemory after the measured flushes, with the frontends still connected. Start-up: spawn until the socket took a connection (tried every {} ms), over every daemon of every round. Idle: context switches summed over every thread of every daemon during {} s after the device was started and one flush done.\n",
        LISTEN_POLL.as_millis(),
        res.idle_secs
    );
    let _ = writeln!(s, "Targets:\n");
    let _ = writeln!(s, "| target | measured | met |");
    let _ = writeln!(s, "|---|---|---|");
    for t in &res.targets {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            t.target,
            t.measured,
            if t.met { "yes" } else { "**no**" }
        );
    }
    s
}

/// Space that must stay free beside the daemons' files: the file system is shared with
/// everything else on the host.
const SPARE_SPACE: u64 = 4 << 30;

/// Refuses a run whose files would fill the file system. Each daemon allocates every block of
/// its file at start (its default `--allocate full`), and each checks only its own need, so
/// `n` of them at once could together take more than is free.
fn check_space(plan: &Plan, n: usize) -> Result<(), BenchError> {
    std::fs::create_dir_all(&plan.dir)
        .map_err(BenchError::io(format!("create {}", plan.dir.display())))?;
    let free = sys::free_bytes(&plan.dir)
        .map_err(BenchError::io(format!("statvfs {}", plan.dir.display())))?;
    // Files left by an earlier run count as free: they are replaced.
    let old: u64 = (0..n)
        .filter_map(|i| std::fs::metadata(file(plan, i)).ok())
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .sum();
    let need = n as u64 * plan.size;
    if need + SPARE_SPACE > free + old {
        return Err(BenchError::Usage(format!(
            "{n} daemons allocate {n} x {} MiB = {} MiB in {}, which has {} MiB free and must keep {} MiB: give a smaller --size-mib",
            plan.size >> 20,
            need >> 20,
            plan.dir.display(),
            (free + old) >> 20,
            SPARE_SPACE >> 20
        )));
    }
    Ok(())
}

/// The many-daemons comparison: every N in `plan.daemons`, `plan.rounds` rounds.
pub fn run(plan: &Plan, command: String) -> Result<(), BenchError> {
    let max = plan.daemons.iter().copied().max().unwrap_or(1);
    for i in 0..max {
        let _ = std::fs::remove_file(plan.out.join(format!("daemon-many-{i}.log")));
    }
    let loadavg_start = sys::loadavg();
    if loadavg_start > 1.5 {
        eprintln!("pmem-bench: warning: load average is {loadavg_start:.2}; results will be noisy");
    }
    check_space(plan, max)?;
    let t0 = Instant::now();
    for i in 0..max {
        prepare_file(plan, &file(plan, i))?;
    }
    let machine = sys::machine(&plan.dir);
    let mut each_round = Vec::new();
    for round in 0..plan.rounds {
        eprintln!("pmem-bench: round {}/{}", round + 1, plan.rounds);
        // N descending every other round, and the side that goes first alternating, so that
        // a load that rises or falls favours neither.
        let mut counts = plan.daemons.clone();
        if round % 2 == 1 {
            counts.reverse();
        }
        for (k, &n) in counts.iter().enumerate() {
            let raw_first = (round + k) % 2 == 0;
            let mut raw = None;
            if raw_first {
                raw = Some(run_raw(plan, n)?);
            }
            let (daemon, resources) = run_daemons(plan, n)?;
            let raw = match raw {
                Some(raw) => raw,
                None => run_raw(plan, n)?,
            };
            let r = Round {
                round: round + 1,
                daemons: n,
                first: if raw_first { "raw" } else { "daemons" },
                ratio: if raw.flushes_per_s > 0.0 {
                    (daemon.flushes_per_s / raw.flushes_per_s * 100.0).round() / 100.0
                } else {
                    0.0
                },
                daemon,
                raw,
                resources,
            };
            eprintln!(
                "pmem-bench:   {n} daemons {:.0}/s, {n} raw loops {:.0}/s ({:.2} x)",
                r.daemon.flushes_per_s, r.raw.flushes_per_s, r.ratio
            );
            each_round.push(r);
        }
    }
    let rows: Vec<Row> = plan
        .daemons
        .iter()
        .map(|&n| {
            let rounds: Vec<&Round> = each_round.iter().filter(|r| r.daemons == n).collect();
            row(n, &rounds)
        })
        .collect();
    let targets = targets(&rows, plan.idle_secs);
    let res = Results {
        command,
        machine,
        loadavg_start,
        loadavg_end: sys::loadavg(),
        mode: plan.modes[0].as_str().to_string(),
        depth: plan.depths[0],
        pages_per_flush: plan.pages,
        file_size: plan.size,
        working_set_bytes: plan.working_pages * PAGE,
        rounds: plan.rounds,
        run_secs: plan.run_secs,
        idle_secs: plan.idle_secs,
        quick: plan.quick,
        duration_s: t0.elapsed().as_secs_f64().round(),
        rows,
        each_round,
        targets,
    };
    let write = |name: &str, text: &str| {
        let p = plan.out.join(name);
        std::fs::write(&p, text).map_err(BenchError::io(format!("write {}", p.display())))
    };
    write(
        "results.json",
        &serde_json::to_string_pretty(&res).expect("results serialize"),
    )?;
    let md = markdown(&res);
    write("summary.md", &md)?;
    let labels: Vec<String> = res.rows.iter().map(|r| r.daemons.to_string()).collect();
    let series = [
        svg::Line {
            name: format!("N daemons at once ({} mode)", res.mode),
            color: "#1f77b4",
            dashed: false,
            values: res.rows.iter().map(|r| r.daemon_flushes_per_s).collect(),
            notes: res
                .rows
                .iter()
                .map(|r| format!("{:.2} x", r.ratio))
                .collect(),
        },
        svg::Line {
            name: "N raw fdatasync loops at once".into(),
            color: "#555555",
            dashed: true,
            values: res.rows.iter().map(|r| r.raw_fdatasyncs_per_s).collect(),
            notes: Vec::new(),
        },
    ];
    let subtitle = format!(
        "depth {}, {} dirty page(s) per flush; medians of {} rounds of {} s; files on {}; {} CPUs, kernel {}",
        res.depth,
        res.pages_per_flush,
        res.rounds,
        res.run_secs,
        res.machine.fs_type,
        res.machine.nproc,
        res.machine.kernel
    );
    write(
        "daemons.svg",
        &svg::render_lines(
            "total flushes/s of N daemons at once vs N raw fdatasync loops (host, no VM)",
            &subtitle,
            "N (daemons or loops at once)",
            "total flushes/s",
            &labels,
            &series,
        ),
    )?;
    for i in 0..max {
        let _ = std::fs::remove_file(file(plan, i));
    }
    println!("{md}");
    eprintln!(
        "pmem-bench: wrote {}/results.json, summary.md and daemons.svg",
        plan.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_step_releases_everyone() {
        let barrier = Barrier::new(3);
        let failed = AtomicBool::new(false);
        let results: Vec<Result<Option<u32>, BenchError>> = std::thread::scope(|scope| {
            let (b, f) = (&barrier, &failed);
            let bad = scope.spawn(move || {
                Steps::new(b, f, 3).run(|_| -> Result<Option<u32>, BenchError> {
                    Err(BenchError::Usage("no".into()))
                })
            });
            let good = scope.spawn(move || {
                Steps::new(b, f, 3).run(|steps| {
                    let mut passed = 0;
                    while passed < 3 && steps.pass() {
                        passed += 1;
                    }
                    Ok((passed == 3).then_some(1))
                })
            });
            let main = Steps::new(b, f, 3).run(|steps| Ok(steps.pass().then_some(2)));
            vec![bad.join().unwrap(), good.join().unwrap(), main]
        });
        assert!(results[0].is_err());
        // Whoever passed the first step before the failure was seen may go on once, but no
        // one finishes the run as if nothing had happened, and no one hangs.
        assert!(matches!(results[1], Ok(None)));
    }

    fn round(n: usize, daemon: f64, raw: f64, hwm: u64, idle: u64) -> Round {
        let side = |rate| Side {
            flushes_per_s: rate,
            flushes: 100,
            p50_us: 300.0,
            p99_us: 900.0,
            cpu_us_per_flush: Some(20.0),
            cpu_from_clock_ticks: false,
        };
        Round {
            round: 1,
            daemons: n,
            first: "raw",
            daemon: side(daemon),
            raw: side(raw),
            ratio: daemon / raw,
            resources: Resources {
                vm_rss_kib: vec![4096; n],
                vm_hwm_kib: vec![hwm; n],
                startup_ms: vec![5.0; n],
                idle_context_switches: idle,
                idle_threads: 6 * n,
                fdatasyncs_per_request: 1.0,
            },
        }
    }

    #[test]
    fn rows_take_medians_and_targets_judge_the_largest_n() {
        let rounds = [
            round(16, 900.0, 1000.0, 5000, 0),
            round(16, 950.0, 1000.0, 9000, 0),
            round(16, 800.0, 1100.0, 5000, 2),
        ];
        let refs: Vec<&Round> = rounds.iter().collect();
        let r = row(16, &refs);
        assert_eq!(
            (r.daemon_flushes_per_s, r.raw_fdatasyncs_per_s),
            (900.0, 1000.0)
        );
        assert_eq!(r.ratio, 0.9);
        assert_eq!(r.median_round_ratio, 0.9);
        assert_eq!(r.vm_rss_sum_mib, 64.0);
        assert_eq!(r.vm_rss_per_daemon_mib, 4.0);
        assert_eq!(r.vm_hwm_max_mib, 8.79);
        assert_eq!(r.idle_context_switches, [0, 0, 2]);
        assert_eq!(r.daemon_cpu_us_per_flush, Some(20.0));
        let t = targets(&[r], 3);
        assert_eq!(t.len(), 3);
        assert!(t[0].met, "0.90 x meets >= 0.9");
        let mut skewed = row(16, &refs);
        skewed.median_round_ratio = 0.85;
        assert!(!targets(&[skewed], 3)[0].met, "both readings must meet it");
        assert!(!t[1].met, "one round woke up");
        assert!(!t[2].met, "8.79 MiB > 8 MiB");
        assert!(t[0].target.starts_with("16 daemons"));
    }
}
