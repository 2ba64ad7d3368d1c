//! Host CPU that QEMU and the daemon spend during a run, per thread name.
//!
//! A background thread reads `/proc/PID/task/TID/schedstat` (its first field: nanoseconds on
//! a CPU) and `comm` of every thread of each watched process every [`EVERY`], and keeps the
//! last value seen per thread. A thread that exits between two samples loses at most its last
//! interval; QEMU's thread-pool workers, the ones that run the built-in device's fdatasync,
//! exit only after 10 s idle, so their whole CPU is seen. QEMU names its threads
//! (`-name debug-threads=on`): `worker` for the pool, `CPU N/TCG` for the vCPUs; the main loop
//! (the first thread) is reported as `main`. The run writes the totals to LOGDIR/cpu.txt, one
//! `VUP-CPU proc=P comm=C threads=N cpu_us=U` line per process and thread name, plus a
//! `comm=*` line per process with its utime+stime from `/proc/PID/stat` at the last sample,
//! which also counts threads that had exited (at clock-tick resolution).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Sampling interval.
pub const EVERY: Duration = Duration::from_millis(200);

/// One watched process: the last CPU time seen of each of its threads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcCpu {
    pub label: String,
    pub pid: u32,
    /// tid -> (thread name, ns on a CPU)
    pub threads: BTreeMap<u32, (String, u64)>,
    /// utime + stime of the whole process (all threads, exited ones too), in µs.
    pub stat_us: Option<u64>,
}

impl ProcCpu {
    /// CPU per thread name, in µs, with the number of threads of that name. The process's
    /// first thread is `main` whatever its name (QEMU's main loop is named after the
    /// executable, the dynamic loader when QEMU runs through the fetched launcher).
    pub fn by_comm(&self) -> BTreeMap<String, (usize, u64)> {
        let mut m: BTreeMap<String, (usize, u64)> = BTreeMap::new();
        for (tid, (comm, ns)) in &self.threads {
            let name = if *tid == self.pid { "main" } else { comm };
            let e = m.entry(name.to_string()).or_default();
            e.0 += 1;
            e.1 += ns / 1000;
        }
        m
    }

    /// Read every thread's CPU now; false once the process is gone.
    fn sample(&mut self) -> bool {
        let dir = format!("/proc/{}/task", self.pid);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return false;
        };
        for e in entries.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let p = e.path();
            let (Ok(comm), Ok(sched)) = (
                std::fs::read_to_string(p.join("comm")),
                std::fs::read_to_string(p.join("schedstat")),
            ) else {
                continue;
            };
            if let Some(ns) = parse_schedstat(&sched) {
                let slot = self.threads.entry(tid).or_default();
                slot.0 = comm.trim_end().to_string();
                slot.1 = slot.1.max(ns);
            }
        }
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            if let Some(us) = parse_stat_us(&stat, clock_ticks()) {
                self.stat_us = Some(us);
            }
        }
        true
    }
}

/// The first field of a schedstat line: nanoseconds spent on a CPU.
pub fn parse_schedstat(s: &str) -> Option<u64> {
    s.split_whitespace().next()?.parse().ok()
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line, in µs.
pub fn parse_stat_us(s: &str, ticks_per_s: u64) -> Option<u64> {
    // comm may hold spaces and parentheses: the fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state), so field N is f[N - 3].
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) * 1_000_000 / ticks_per_s.max(1))
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions and only reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// The sampling thread; [`Sampler::finish`] takes a last sample and returns the totals.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<ProcCpu>>>,
}

impl Sampler {
    /// Watch these processes (label, pid) until `finish`.
    pub fn start(procs: Vec<(String, u32)>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut ps: Vec<ProcCpu> = procs
                .into_iter()
                .map(|(label, pid)| ProcCpu {
                    label,
                    pid,
                    ..ProcCpu::default()
                })
                .collect();
            let mut alive = vec![true; ps.len()];
            loop {
                for (p, a) in ps.iter_mut().zip(alive.iter_mut()) {
                    if *a {
                        *a = p.sample();
                    }
                }
                if flag.load(Ordering::Acquire) {
                    return ps;
                }
                std::thread::sleep(EVERY);
            }
        });
        Sampler {
            stop,
            handle: Some(handle),
        }
    }

    /// Take a last sample of the processes still there and stop.
    pub fn finish(mut self) -> Vec<ProcCpu> {
        self.stop.store(true, Ordering::Release);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// The cpu.txt text.
pub fn render(procs: &[ProcCpu]) -> String {
    let mut s = format!(
        "# host CPU per process and thread name over the run (schedstat, sampled every {} ms; \
         comm=* is the process's utime+stime, exited threads included)\n",
        EVERY.as_millis()
    );
    for p in procs {
        let by = p.by_comm();
        let total: u64 = by.values().map(|v| v.1).sum();
        let _ = writeln!(
            s,
            "VUP-CPU proc={} comm=* threads={} cpu_us={} stat_us={}",
            p.label,
            p.threads.len(),
            total,
            p.stat_us.map_or("-".into(), |u| u.to_string())
        );
        for (comm, (n, us)) in by {
            let _ = writeln!(
                s,
                "VUP-CPU proc={} comm={} threads={n} cpu_us={us}",
                p.label,
                comm.replace(char::is_whitespace, "_")
            );
        }
    }
    s
}

/// Write LOGDIR/cpu.txt.
pub fn write(log_dir: &Path, procs: &[ProcCpu]) {
    let _ = std::fs::write(log_dir.join("cpu.txt"), render(procs));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_and_stat() {
        assert_eq!(parse_schedstat("123456 789 10\n"), Some(123456));
        assert_eq!(parse_schedstat(""), None);
        // pid (comm with ) and spaces) state ppid ... utime=field 14, stime=field 15
        let stat = "42 (a) b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(parse_stat_us(stat, 100), Some(3_000_000));
        assert_eq!(parse_stat_us("42 (x) S 1", 100), None);
    }

    #[test]
    fn groups_threads_by_name() {
        let mut p = ProcCpu {
            label: "qemu".into(),
            pid: 1,
            ..ProcCpu::default()
        };
        p.threads.insert(10, ("worker".into(), 2_000_000));
        p.threads.insert(11, ("worker".into(), 3_000_000));
        p.threads.insert(12, ("CPU 0/TCG".into(), 9_000_000));
        p.threads.insert(1, ("qemu-system-x86".into(), 1_000_000));
        p.stat_us = Some(15_000);
        let t = render(&[p]);
        assert!(t.contains("VUP-CPU proc=qemu comm=* threads=4 cpu_us=15000 stat_us=15000\n"));
        assert!(t.contains("VUP-CPU proc=qemu comm=main threads=1 cpu_us=1000\n"));
        assert!(t.contains("VUP-CPU proc=qemu comm=worker threads=2 cpu_us=5000\n"));
        assert!(t.contains("VUP-CPU proc=qemu comm=CPU_0/TCG threads=1 cpu_us=9000\n"));
    }

    #[test]
    fn samples_this_process() {
        let s = Sampler::start(vec![("self".into(), std::process::id())]);
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        let ps = s.finish();
        assert_eq!(ps.len(), 1);
        assert!(!ps[0].threads.is_empty());
        assert!(ps[0].by_comm().values().map(|v| v.1).sum::<u64>() > 0);
        assert!(ps[0].stat_us.is_some());
    }
}
