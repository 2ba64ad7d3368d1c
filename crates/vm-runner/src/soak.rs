//! `vmrun soak`: one daemon and one image for --minutes while QEMU boots the guest again and
//! again. Each QEMU reboots the guest (`reboot -f`) --reboots times or, every --crash-every'th
//! QEMU, boots it once and ends it hard: alternately a kernel crash right after the load (the
//! file system still mounted) and a SIGKILL of QEMU halfway through the load (every writer
//! busy). Every boot runs the guest suite `soak`: it checks that everything the previous boot
//! acknowledged is there, runs the writers, and reports where its files' final bytes lie
//! (`VUP-SOAKCHECK`), which this command compares with the image before the next QEMU runs.
//!
//! Meanwhile the daemon's RSS, threads and fds are sampled every 5 s (`samples.tsv`). The
//! soak fails if a boot fails, a write is missing, the daemon logged a warning or an error
//! (its metrics count them), it did not map the region once per boot, its idle RSS at the end
//! exceeds its idle RSS after the first boot by more than --rss-limit-kib, its idle thread or
//! fd count changed, or it did not exit 0 on SIGTERM.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Args;

use crate::cli::{Defaults, EndArg, RunArgs};
use crate::hostcheck;
use crate::one_daemon::{OneDaemon, OneDaemonArgs};
use crate::run;

#[derive(Args, Debug)]
pub struct SoakArgs {
    /// Keep starting QEMUs until N minutes have passed.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    pub minutes: u64,
    /// Writer threads in the guest.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: u32,
    /// Seconds of load per boot.
    #[arg(long, value_name = "SEC", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub load: u64,
    /// `reboot -f` per QEMU process (2: three boots per QEMU).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub reboots: u32,
    /// Every K-th QEMU after the first ends its one boot hard instead (kernel crash and QEMU
    /// SIGKILL in turn; 0: never).
    #[arg(long, value_name = "K", default_value_t = 3)]
    pub crash_every: u32,
    /// Allowed growth of the daemon's idle RSS, in KiB.
    #[arg(long, value_name = "KIB", default_value_t = 4096)]
    pub rss_limit_kib: u64,
    #[command(flatten)]
    pub common: OneDaemonArgs,
}

fn info(msg: impl AsRef<str>) {
    eprintln!("soak: {}", msg.as_ref());
}

pub fn main(a: SoakArgs, d: &Defaults) -> i32 {
    crate::one_daemon::closing_line("soak", soak(a, d))
}

/// What /proc says about a process: resident KiB, threads, open fds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Usage {
    rss_kib: u64,
    threads: u64,
    fds: u64,
}

fn usage(pid: u32) -> Option<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Usage {
        rss_kib: field("VmRSS:")?,
        threads: field("Threads:")?,
        fds,
    })
}

/// Usage once threads and fds read the same twice in a row, 1 s apart: a connection's
/// threads and fds are gone some time after QEMU exits.
fn quiet_usage(pid: u32) -> Option<Usage> {
    let mut a = usage(pid)?;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(1));
        let b = usage(pid)?;
        let settled = (a.threads, a.fds) == (b.threads, b.fds);
        a = b;
        if settled {
            break;
        }
    }
    Some(a)
}

/// Samples the daemon every 5 s into `samples.tsv` until stopped; returns the peak.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Usage>,
}

impl Sampler {
    fn start(pid: u32, file: &Path, t0: Instant) -> Result<Sampler, String> {
        let mut out =
            std::fs::File::create(file).map_err(|e| format!("create {}: {e}", file.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            use std::io::Write;
            let _ = writeln!(out, "seconds\trss_kib\tthreads\tfds");
            let mut peak = Usage::default();
            while !flag.load(Ordering::Relaxed) {
                let Some(u) = usage(pid) else { break };
                let _ = writeln!(
                    out,
                    "{}\t{}\t{}\t{}",
                    t0.elapsed().as_secs(),
                    u.rss_kib,
                    u.threads,
                    u.fds
                );
                peak.rss_kib = peak.rss_kib.max(u.rss_kib);
                peak.threads = peak.threads.max(u.threads);
                peak.fds = peak.fds.max(u.fds);
                // 5 s in short naps, so that stopping is prompt.
                for _ in 0..50 {
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            peak
        });
        Ok(Sampler { stop, thread })
    }

    fn finish(self) -> Usage {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// How one QEMU process of the soak ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Power off after one boot.
    Once,
    /// Reboot inside QEMU, then power off.
    Reboots(u32),
    /// One boot, then a kernel crash with the file system mounted.
    Crash,
    /// One boot, QEMU SIGKILLed halfway through the load.
    Kill,
}

/// The running totals.
#[derive(Debug, Default)]
struct Tally {
    passed: usize,
    failed: usize,
    qemus: u32,
    boots: u64,
    reboots: u32,
    crashes: u32,
    kills: u32,
    hostchecks: usize,
    writes: u64,
    mapped: u64,
}

impl Tally {
    fn fail(&mut self, why: impl AsRef<str>) {
        self.failed += 1;
        info(why);
    }
}

/// The value of `key=` in a `VUP-SOAK boot=.. writes=.. mapped=..` line.
fn soak_field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

struct Soak<'a> {
    a: &'a SoakArgs,
    d: &'a Defaults,
    one: OneDaemon,
    t: Tally,
}

impl Soak<'_> {
    /// One QEMU process; counts its boots and, unless it was killed mid-load, compares the
    /// bytes its last boot left with the image before the next QEMU changes them.
    fn qemu(&mut self, name: &str, ending: Ending, guest_args: String) {
        self.t.qemus += 1;
        let reboots = match ending {
            Ending::Reboots(n) => n,
            _ => 0,
        };
        let mut args = RunArgs {
            timeout: (self.a.load + 120) * (u64::from(reboots) + 1) + 120,
            ..self.one.run_args(&self.a.common, name, guest_args)
        };
        match ending {
            Ending::Once => {}
            Ending::Reboots(n) => {
                args.end = EndArg::Reboot;
                args.reboots = Some(n);
            }
            Ending::Crash => args.end = EndArg::Crash,
            Ending::Kill => args.kill_after_marker = Some("VUP-SOAK-HALFWAY".into()),
        }
        let result = args
            .spec(self.d)
            .map_err(|e| e.to_string())
            .and_then(|spec| run::run(&spec).map_err(|e| e.to_string()));
        let out = std::fs::read_to_string(self.one.log_dir(name).join("guest-out.txt"))
            .unwrap_or_default();
        let soak_lines: Vec<&str> = out
            .lines()
            .filter_map(|l| l.strip_prefix("VUP-SOAK "))
            .collect();
        for l in &soak_lines {
            self.t.writes += soak_field(l, "writes").unwrap_or(0);
            self.t.mapped += soak_field(l, "mapped").unwrap_or(0);
        }
        self.t.boots += out.lines().filter(|l| l.starts_with("VUP-BEGIN")).count() as u64;
        match result {
            Ok(o) if o.ok() => {
                self.t.passed += 1;
                info(format!(
                    "{name}: ok ({}; {})",
                    o.summary_line(),
                    soak_lines.join(" ")
                ));
            }
            Ok(o) => self.t.fail(format!(
                "{name}: FAILED ({}; see {})",
                o.summary_line(),
                o.log_dir.display()
            )),
            Err(e) => self.t.fail(format!("{name}: FAILED: {e}")),
        }
        if ending != Ending::Kill {
            self.soakchecks(name, &out);
        }
    }

    /// The `VUP-SOAKCHECK`s after the last `VUP-BEGIN`: the final bytes of the last boot's
    /// files. Earlier boots' bytes were checked by the boot after them, in the guest.
    fn soakchecks(&mut self, name: &str, out: &str) {
        let last_boot = out.rsplit_once("VUP-BEGIN").map_or("", |(_, rest)| rest);
        let (mut n, mut bad) = (0usize, 0usize);
        for line in last_boot
            .lines()
            .filter(|l| l.starts_with("VUP-SOAKCHECK "))
        {
            n += 1;
            let same = hostcheck::parse(line).ok().and_then(|c| {
                let got = hostcheck::sha256_of(&self.one.image, c.offset, c.len).ok()?;
                Some(got == c.sha256)
            });
            if same != Some(true) {
                bad += 1;
                info(format!("{name}: the image differs from {line}"));
            }
        }
        self.t.hostchecks += n;
        if bad > 0 || n == 0 {
            self.t.fail(format!(
                "{name}: {bad} of {n} extents of the last boot's files differ in the image"
            ));
        }
    }
}

fn soak(a: SoakArgs, d: &Defaults) -> Result<(usize, usize), String> {
    let one = OneDaemon::start(&a.common, d, "soak")?;
    let pid = one.daemon.pid();
    let t0 = Instant::now();
    let sampler = Sampler::start(pid, &one.out.join("samples.tsv"), t0)?;
    let mut s = Soak {
        a: &a,
        d,
        one,
        t: Tally::default(),
    };
    let load = format!("--threads {} --stress {} soak", a.threads, a.load);

    // Boot 1: a fresh file system, nothing to check yet.
    s.qemu(
        "boot1",
        Ending::Once,
        format!("--mkfs --expect-gen 0 {load}"),
    );
    let idle_first = quiet_usage(pid).ok_or("the daemon is gone after the first boot")?;
    info(format!(
        "daemon idle after the first boot: RSS {} KiB, {} threads, {} fds",
        idle_first.rss_kib, idle_first.threads, idle_first.fds
    ));
    let mut gen = 1u64; // the last boot that finished
    let deadline = t0 + Duration::from_secs(a.minutes * 60);
    while s.t.failed == 0 && Instant::now() < deadline {
        if let Some(sig) = crate::children::stop_requested() {
            return Err(format!("interrupted by signal {sig}"));
        }
        let q = s.t.qemus;
        let name = format!("qemu{}", q + 1);
        if a.crash_every > 0 && q % a.crash_every == 0 && s.t.crashes % 2 == 0 {
            // The next boot replays the journal (fsck_clean) before it checks.
            let args = format!("--expect-gen {gen} --crash-at-end {load}");
            s.qemu(&format!("{name}-crash"), Ending::Crash, args);
            s.t.crashes += 1;
            gen += 1;
        } else if a.crash_every > 0 && q % a.crash_every == 0 {
            let args = format!("--expect-gen {gen} {load}");
            s.qemu(&format!("{name}-kill"), Ending::Kill, args);
            s.t.kills += 1;
            s.t.crashes += 1;
            gen += 1;
        } else {
            // boot+N: this QEMU's boot b (1-based) checks global boot gen+b-1.
            let args = format!("--expect-gen boot+{} {load}", gen - 1);
            s.qemu(&name, Ending::Reboots(a.reboots), args);
            s.t.reboots += a.reboots;
            gen += u64::from(a.reboots) + 1;
        }
    }
    // The final check of everything the last boot acknowledged, with a short load of its own.
    if s.t.failed == 0 {
        let args = format!("--expect-gen {gen} --threads {} --stress 1 soak", a.threads);
        s.qemu("final", Ending::Once, args);
    }
    let elapsed = t0.elapsed().as_secs();
    let idle_last = quiet_usage(pid).unwrap_or_default();
    let peak = sampler.finish();

    let Soak { mut one, mut t, .. } = s;
    match one.daemon.stop(Duration::from_secs(15)) {
        Ok(st) if st.success() => {}
        Ok(st) => t.fail(format!("the daemon exited with {st} after SIGTERM")),
        Err(e) => t.fail(e.to_string()),
    }
    let growth = idle_last.rss_kib.saturating_sub(idle_first.rss_kib);
    if growth > a.rss_limit_kib {
        t.fail(format!(
            "idle RSS grew by {growth} KiB (limit {} KiB)",
            a.rss_limit_kib
        ));
    }
    if (idle_first.threads, idle_first.fds) != (idle_last.threads, idle_last.fds) {
        t.fail(format!(
            "idle threads/fds changed: {}/{} after boot 1, {}/{} at the end",
            idle_first.threads, idle_first.fds, idle_last.threads, idle_last.fds
        ));
    }
    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "soak: {elapsed} s, {} QEMU processes (connections), {} guest boots, {} reboots inside \
         QEMU, {} kernel crashes, {} QEMU SIGKILLs mid-load",
        t.qemus,
        t.boots,
        t.reboots,
        t.crashes - t.kills,
        t.kills
    );
    let _ = writeln!(
        summary,
        "acknowledged writes: {} ({} through DAX mappings), {} writer threads + 1 truncator, {} s \
         of load per boot",
        t.writes, t.mapped, a.threads, a.load
    );
    let _ = writeln!(
        summary,
        "daemon idle after boot 1: RSS {} KiB, {} threads, {} fds; at the end: RSS {} KiB, {} \
         threads, {} fds (growth {growth} KiB); peak while running: RSS {} KiB, {} threads",
        idle_first.rss_kib,
        idle_first.threads,
        idle_first.fds,
        idle_last.rss_kib,
        idle_last.threads,
        idle_last.fds,
        peak.rss_kib,
        peak.threads
    );
    let _ = writeln!(
        summary,
        "host checks of the last boot of each QEMU: {} extents, compared with the image",
        t.hostchecks
    );
    match one.daemon.metrics() {
        Ok(Some(m)) => {
            let c = &m.counters;
            if c.log_warnings != 0 || c.log_errors != 0 {
                t.fail(format!(
                    "the daemon logged {} warnings and {} errors (see daemon.log)",
                    c.log_warnings, c.log_errors
                ));
            }
            if c.maps != t.boots {
                t.fail(format!("{} SHMEM_MAPs for {} boots", c.maps, t.boots));
            }
            if c.connections != u64::from(t.qemus) {
                t.fail(format!(
                    "the daemon counted {} connections for {} QEMU processes",
                    c.connections, t.qemus
                ));
            }
            let _ = writeln!(
                summary,
                "daemon: requests={} fdatasyncs={} errors={} order_violations={} connections={} \
                 maps={}",
                c.requests, c.fdatasyncs, c.errors, c.order_violations, c.connections, c.maps
            );
        }
        Ok(None) => t.fail("the daemon wrote no metrics at exit"),
        Err(e) => t.fail(e.to_string()),
    }
    eprint!("{summary}");
    let _ = std::fs::write(one.out.join("summary.txt"), &summary);
    Ok((t.passed, t.failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soak_fields_are_read_by_name() {
        let l = "boot=3 writes=120 mapped=40 seconds=20.1";
        assert_eq!(soak_field(l, "writes"), Some(120));
        assert_eq!(soak_field(l, "mapped"), Some(40));
        assert_eq!(soak_field(l, "boot"), Some(3));
        assert_eq!(soak_field(l, "seconds"), None);
        assert_eq!(soak_field("writesx=3", "writes"), None);
    }

    #[test]
    fn usage_of_this_process_is_read() {
        let u = usage(std::process::id()).expect("own /proc entry");
        assert!(u.rss_kib > 0 && u.threads >= 1 && u.fds >= 3, "{u:?}");
    }
}
