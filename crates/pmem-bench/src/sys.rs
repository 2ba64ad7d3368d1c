//! What the benchmark reads from the system: the machine it runs on, a process's memory, CPU
//! time and context switches, and a raw shared mapping of the file for the fdatasync baseline.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    /// File system type of the benchmark file (from /proc/self/mountinfo), and its source.
    pub fs_type: String,
    pub fs_source: String,
    pub mount_point: String,
}

pub fn machine(file_dir: &Path) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let (mount_point, fs_type, fs_source) = mount_of(file_dir).unwrap_or_default();
    Machine {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        kernel,
        fs_type,
        fs_source,
        mount_point,
    }
}

/// The mount holding `path`: (mount point, file system type, source).
fn mount_of(path: &Path) -> Option<(String, String, String)> {
    let path = path.canonicalize().ok()?;
    let path = path.to_str()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(String, String, String)> = None;
    for line in info.lines() {
        // id parent major:minor root mountpoint options [optional...] - fstype source superopts
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mp) = pre.split(' ').nth(4).map(|m| m.replace("\\040", " ")) else {
            continue;
        };
        let mut post = post.split(' ');
        let (Some(fs), Some(src)) = (post.next(), post.next()) else {
            continue;
        };
        let inside = path == mp
            || mp == "/"
            || path
                .strip_prefix(mp.as_str())
                .is_some_and(|r| r.starts_with('/'));
        // Later lines mount over earlier ones at the same point.
        if inside && best.as_ref().is_none_or(|b| mp.len() >= b.0.len()) {
            best = Some((mp, fs.to_string(), src.to_string()));
        }
    }
    best
}

/// 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The number in a `/proc/PID/status` line `name value [kB]`, e.g. `status_field(s, "VmRSS:")`.
fn status_field(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(name))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// (VmRSS, VmHWM) of `pid` in KiB.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some((
        status_field(&status, "VmRSS:")?,
        status_field(&status, "VmHWM:")?,
    ))
}

/// Voluntary plus involuntary context switches of every thread of `pid`, and the thread count.
pub fn context_switches(pid: u32) -> io::Result<(u64, usize)> {
    let mut total = 0;
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        threads += 1;
        total += status_field(&status, "voluntary_ctxt_switches:").unwrap_or(0)
            + status_field(&status, "nonvoluntary_ctxt_switches:").unwrap_or(0);
    }
    Ok((total, threads))
}

/// CPU time (user + system) a process has used, read two ways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuTime {
    /// Sum over its live threads of /proc/PID/task/TID/schedstat's first field (time on a CPU,
    /// ns, exact); `None` where the kernel has no schedstat.
    pub sched_ns: Option<u64>,
    /// Those threads, sorted: a thread that ends takes its schedstat time with it, so two
    /// readings compare only over the same threads.
    pub tids: Vec<u32>,
    /// utime + stime of /proc/PID/stat, in ns: every thread, ended ones included, but counted
    /// in clock ticks (10 ms at USER_HZ 100).
    pub stat_ns: u64,
}

impl CpuTime {
    /// CPU ns used between `self` and `later`: schedstat's when both have it over the same
    /// threads, else the clock-tick figure. The flag says which (true: schedstat).
    pub fn since(&self, later: &CpuTime) -> (u64, bool) {
        match (self.sched_ns, later.sched_ns) {
            (Some(a), Some(b)) if self.tids == later.tids => (b.saturating_sub(a), true),
            _ => (later.stat_ns.saturating_sub(self.stat_ns), false),
        }
    }
}

/// The first field of a schedstat file: ns on a CPU.
fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// utime + stime, in clock ticks, from a /proc/PID/stat line. The command name (field 2) is in
/// parentheses and may itself hold spaces and parentheses, so fields count from the last ')'.
fn parse_stat_ticks(text: &str) -> Option<u64> {
    let (_, rest) = text.rsplit_once(')')?;
    // After the name: state is field 3, utime field 14 and stime field 15.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_tick_ns() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1_000_000_000 / u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100)
}

/// The CPU time of `pid` so far (all its threads).
pub fn cpu_time(pid: u32) -> io::Result<CpuTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = parse_stat_ticks(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat: {stat}"),
        )
    })?;
    let mut sched_ns = Some(0u64);
    let mut tids = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread that ended meanwhile shows as a changed thread list, and the tick figure
        // is used instead.
        let ns = std::fs::read_to_string(task.path().join("schedstat"))
            .ok()
            .and_then(|t| parse_schedstat(&t));
        sched_ns = sched_ns.zip(ns).map(|(a, b)| a + b);
        tids.push(tid);
    }
    tids.sort_unstable();
    Ok(CpuTime {
        sched_ns,
        tids,
        stat_ns: ticks * clock_tick_ns(),
    })
}

/// CPU time of the calling thread, ns (the clock schedstat reads).
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Bytes an unprivileged process may still allocate on the file system holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: all-zero is a valid statvfs (plain integers), and it is only read after
    // statvfs has filled it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statvfs, both live for the
    // call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The benchmark file mapped MAP_SHARED by the benchmark itself, for the raw-fdatasync
/// baseline: stores reach the same page cache a guest's DAX stores reach through the daemon.
pub struct RawMapping {
    file: File,
    ptr: *mut u8,
    len: usize,
}

impl RawMapping {
    pub fn open(path: &Path, len: usize) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        // SAFETY: a fresh shared mapping of `len` bytes of an open file; the kernel picks the
        // address, and the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(RawMapping {
            file,
            ptr: ptr.cast(),
            len,
        })
    }

    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len, "write outside the mapping");
        // SAFETY: the range is inside our live, writable mapping (asserted above).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) };
    }

    pub fn fdatasync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl Drop for RawMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `open`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a busy child of one thread: this test binary's own sum moves with the other tests'
    /// threads, which take their time with them when they end.
    #[test]
    fn reads_cpu_time_in_ns() {
        use std::time::{Duration, Instant};
        let started = Instant::now();
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let deadline = started + Duration::from_secs(10);
        let spent = loop {
            let ns = cpu_time(child.id()).unwrap().sched_ns.expect("schedstat");
            if ns >= 20_000_000 || Instant::now() > deadline {
                break ns;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let wall = started.elapsed();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            spent >= 20_000_000,
            "a busy loop ran {spent} ns in {wall:?}"
        );
        // One thread cannot run longer than the wall clock: a figure in another unit would.
        assert!(
            spent <= wall.as_nanos() as u64,
            "{spent} ns of CPU in {wall:?}"
        );
    }

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        let (rss, hwm) = memory_kib(pid).unwrap();
        assert!(rss > 0 && hwm >= rss);
        let (cs, threads) = context_switches(pid).unwrap();
        assert!(threads >= 1);
        let _ = cs;
        let cpu = cpu_time(pid).unwrap();
        assert!(cpu.tids.contains(&pid));
        // Spin until the thread has used some CPU, then both readings must have grown.
        let t0 = thread_cpu_ns();
        while thread_cpu_ns() - t0 < 30_000_000 {}
        let later = cpu_time(pid).unwrap();
        if cpu.tids == later.tids {
            let (ns, exact) = cpu.since(&later);
            assert!(exact == cpu.sched_ns.is_some());
            assert!(ns >= 20_000_000, "{ns} ns");
        }
        assert!(free_bytes(Path::new("/")).unwrap() > 0);
        assert!(free_bytes(Path::new("/no/such/dir")).is_err());
        let m = machine(Path::new("/"));
        assert!(m.nproc >= 1);
        assert_eq!(m.mount_point, "/");
        assert!(!m.fs_type.is_empty());
    }

    #[test]
    fn parses_proc_files() {
        let status = "Name:\tvhost-user-pmem\nVmHWM:\t    4712 kB\nVmRSS:\t    4600 kB\nvoluntary_ctxt_switches:\t12\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(status_field(status, "VmRSS:"), Some(4600));
        assert_eq!(status_field(status, "VmHWM:"), Some(4712));
        assert_eq!(status_field(status, "voluntary_ctxt_switches:"), Some(12));
        assert_eq!(status_field(status, "nonvoluntary_ctxt_switches:"), Some(3));
        assert_eq!(status_field(status, "VmSwap:"), None);

        assert_eq!(parse_schedstat("62455475 93317946 137\n"), Some(62455475));
        assert_eq!(parse_schedstat(""), None);

        // Fields 14 and 15 (utime 7, stime 5); the name holds a space and a parenthesis.
        let stat = "2993 (a) b) R 2989 2989 16561 0 -1 4194304 102 0 0 0 7 5 0 0 20 0 1 0 2440586";
        assert_eq!(parse_stat_ticks(stat), Some(12));
        assert_eq!(parse_stat_ticks("2993 (cat) R 1 2"), None);
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn cpu_time_prefers_schedstat_over_the_same_threads() {
        let a = CpuTime {
            sched_ns: Some(1_000),
            tids: vec![1, 2],
            stat_ns: 10_000_000,
        };
        let b = CpuTime {
            sched_ns: Some(4_500),
            tids: vec![1, 2],
            stat_ns: 20_000_000,
        };
        assert_eq!(a.since(&b), (3_500, true));
        let other_threads = CpuTime {
            tids: vec![1, 3],
            ..b.clone()
        };
        assert_eq!(a.since(&other_threads), (10_000_000, false));
        let no_schedstat = CpuTime {
            sched_ns: None,
            ..b
        };
        assert_eq!(a.since(&no_schedstat), (10_000_000, false));
    }

    #[test]
    fn raw_mapping_writes_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let m = RawMapping::open(&path, 8192).unwrap();
        m.write(4096, b"abc");
        m.fdatasync().unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[4096..4099], b"abc");
    }
}
