//! What the benchmark reads from the system: the machine it runs on, a process's memory and
//! context switches, and a raw shared mapping of the file for the fdatasync baseline.

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

/// (VmRSS, VmHWM) of `pid` in KiB.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
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
        for line in status.lines() {
            if line.starts_with("voluntary_ctxt_switches:")
                || line.starts_with("nonvoluntary_ctxt_switches:")
            {
                total += line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    Ok((total, threads))
}

/// CPU time every thread of `pid` has run so far, in ns: the first field of each thread's
/// `/proc/PID/task/TID/schedstat` (time on the CPU, kept by the scheduler in ns, unlike the
/// clock-tick granularity of `stat`).
pub fn cpu_ns(pid: u32) -> io::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(text) = std::fs::read_to_string(task?.path().join("schedstat")) else {
            continue; // the thread ended meanwhile
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
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
            let ns = cpu_ns(child.id()).unwrap();
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
        let m = machine(Path::new("/"));
        assert!(m.nproc >= 1);
        assert_eq!(m.mount_point, "/");
        assert!(!m.fs_type.is_empty());
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
