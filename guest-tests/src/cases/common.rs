//! Helpers the catalogue cases share: scratch files, patterns that say where they
//! belong, stop flags and progress watchdogs for racing threads.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{fail, Context, Result};
use crate::isolate::Child;
use crate::pattern;
use crate::sys::{self, Mapping, PAGE, PMD};
use crate::trace::{PmdFault, PmdTrace};

pub fn create(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .ctx(format!("create {}", path.display()))
}

pub fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .ctx(format!("open {}", path.display()))
}

pub fn compare(what: &str, got: &[u8], want: &[u8]) -> Result<()> {
    if let Some(at) = pattern::first_difference(got, want) {
        fail!(
            "{what}: data differs at byte {at} (got {:#04x?}, want {:#04x?})",
            got.get(at),
            want.get(at)
        );
    }
    Ok(())
}

pub fn read_at(file: &File, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)
        .ctx(format!("read {len} bytes at {offset}"))?;
    Ok(buf)
}

/// A shared read-write mapping of [offset, offset+len) at a 2 MiB-aligned address, so the
/// kernel may use PMDs wherever the file allows.
pub fn map_pmd_aligned(file: &File, len: usize, offset: u64) -> Result<Mapping> {
    Mapping::new_aligned(
        file,
        len,
        sys::PROT_READ | sys::PROT_WRITE,
        sys::MAP_SHARED,
        offset,
        PMD,
        0,
    )
    .ctx(format!(
        "mmap {len} bytes at file offset {offset}, 2 MiB-aligned"
    ))
}

/// The word a writer stores at byte `offset` of a file: never 0, never contains a 0xA5
/// byte (the stale-data marker), and names its offset, so a word read from the wrong
/// place is caught.
pub fn word_for(offset: u64) -> u64 {
    // 0x5A in the top byte; the offset (in words) below, with 0xA5 bytes masked away.
    let mut w = 0x5A00_0000_0000_0000 | (((offset >> 3) << 1) & 0x00FF_FFFF_FFFF_FFFE) | 1;
    for shift in (0..56).step_by(8) {
        if (w >> shift) & 0xFF == 0xA5 {
            w ^= 0x02 << shift;
        }
    }
    w
}

/// Where the first 0xA5 byte of `buf` is, if any.
pub fn find_a5(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == 0xA5)
}

/// Like `find_a5` over a word of memory.
pub fn word_has_a5(w: u64) -> bool {
    w.to_le_bytes().contains(&0xA5)
}

/// A stop flag plus a deadline, shared by a case's threads.
pub struct Clock {
    stop: AtomicBool,
    until: Instant,
}

impl Clock {
    pub fn new(run_for: Duration) -> Clock {
        Clock {
            stop: AtomicBool::new(false),
            until: Instant::now() + run_for,
        }
    }

    pub fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && Instant::now() < self.until
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Per-worker progress counters, watched by the case's main thread: a worker whose
/// counter stops moving for `stall` is hung.
pub struct Progress {
    counters: Vec<AtomicU64>,
}

impl Progress {
    pub fn new(n: usize) -> Progress {
        Progress {
            counters: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn tick(&self, i: usize) {
        self.counters[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Vec<u64> {
        self.counters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

/// Watch `progress` of `names` until `done()` or a stall. Returns Err(description) if
/// some worker made no progress for `stall` while the case still ran, after telling the
/// parent (which kills this process).
pub fn watch(
    child: &Child,
    names: &[&str],
    progress: &Progress,
    stall: Duration,
    mut done: impl FnMut() -> bool,
) -> std::result::Result<(), String> {
    let mut last = progress.snapshot();
    let mut since: Vec<Instant> = vec![Instant::now(); last.len()];
    loop {
        if done() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
        let now = progress.snapshot();
        for i in 0..now.len() {
            if now[i] != last[i] {
                last[i] = now[i];
                since[i] = Instant::now();
            } else if since[i].elapsed() >= stall && !done() {
                let what = format!(
                    "{} made no progress for {:.0}s (counts {:?})",
                    names.get(i).copied().unwrap_or("worker"),
                    stall.as_secs_f64(),
                    now
                );
                child.hung(&what);
                return Err(what);
            }
        }
    }
}

/// At most this many minor faults for 512 pages still counts as PMD-served (the fault
/// itself, a write-protect fault after a read, a page-table page).
pub const PMD_MAX_FAULTS: u64 = 8;
/// At least this many for 512 pages counts as 4 KiB pages (DAX has no fault-around).
pub const PTE_MIN_FAULTS: u64 = 256;
const PAGES: usize = PMD / PAGE;

/// What a run of accesses cost: minor faults and, if tracing works, PMD fault events.
pub struct Observed {
    pub faults: u64,
    pub events: std::result::Result<Vec<PmdFault>, String>,
}

impl Observed {
    pub fn pmd_events(&self) -> usize {
        self.events
            .as_ref()
            .map(|e| e.iter().filter(|f| f.is_pmd()).count())
            .unwrap_or(0)
    }

    pub fn fallback_events(&self) -> usize {
        self.events
            .as_ref()
            .map(|e| e.iter().filter(|f| f.is_fallback()).count())
            .unwrap_or(0)
    }

    pub fn text(&self) -> String {
        match &self.events {
            Ok(_) => format!(
                "{} minor faults; dax_pmd_fault_done NOPAGE {} FALLBACK {}",
                self.faults,
                self.pmd_events(),
                self.fallback_events()
            ),
            Err(e) => format!("{} minor faults; tracepoint unavailable ({e})", self.faults),
        }
    }

    /// Served by PMDs: the tracepoint says NOPAGE, or (without tracing) few faults.
    pub fn was_pmd(&self, ranges: usize) -> bool {
        match &self.events {
            Ok(_) => self.pmd_events() >= 1 && self.faults <= PMD_MAX_FAULTS * ranges as u64,
            Err(_) => self.faults <= PMD_MAX_FAULTS * ranges as u64,
        }
    }

    /// Served by 4 KiB pages: no NOPAGE PMD event, and a fault per page.
    pub fn was_pte(&self, pages: usize) -> bool {
        self.pmd_events() == 0 && self.faults >= (pages as u64 * PTE_MIN_FAULTS / PAGES as u64)
    }
}

/// Run `f` with the tracepoint on (events of inode `ino` only) and count minor faults.
pub fn observe(ino: u64, f: impl FnOnce()) -> Observed {
    let trace = PmdTrace::start();
    let before = sys::minor_faults();
    f();
    let faults = sys::minor_faults() - before;
    let events = trace
        .and_then(|t| t.finish())
        .map(|ev| ev.into_iter().filter(|e| e.ino == ino).collect());
    Observed { faults, events }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_nonzero_and_never_a5() {
        for off in (0..1u64 << 24)
            .step_by(4096 + 8)
            .chain([0xA5A5_A5A5 << 3, u64::MAX])
        {
            let w = word_for(off);
            assert_ne!(w, 0);
            assert!(!word_has_a5(w), "{off:#x} -> {w:#x}");
        }
        assert_ne!(word_for(0), word_for(8));
        assert_eq!(word_for(4096), word_for(4096));
    }

    #[test]
    fn a5_search() {
        assert_eq!(find_a5(&[0, 1, 0xA5]), Some(2));
        assert_eq!(find_a5(&[0x5A; 8]), None);
        assert!(word_has_a5(0xA5 << 40));
    }

    #[test]
    fn progress_counts() {
        let p = Progress::new(2);
        p.tick(1);
        p.tick(1);
        assert_eq!(p.snapshot(), vec![0, 2]);
    }

    #[test]
    fn clock_stops() {
        let c = Clock::new(Duration::from_secs(60));
        assert!(c.running());
        c.stop();
        assert!(!c.running());
        assert!(!Clock::new(Duration::ZERO).running());
    }
}
