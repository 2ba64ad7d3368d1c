//! Catalogue F19: what a DAX write fault costs, as in the MAP_SYNC series' cover letter.
//! 512 stores, one to each 4 KiB page of a fresh 2 MiB file, each timed with
//! CLOCK_MONOTONIC_RAW, in every cell of {preallocated, empty file} x {idle, a background
//! file copy} x {MAP_SHARED, MAP_SYNC, MAP_SHARED + fdatasync per page}. The figures are
//! measurements; a cell fails only if a store is lost, a flush fails, the background copy
//! never ran, or MAP_SYNC is refused with anything but EOPNOTSUPP.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::common;
use super::fs_state::{catalogue_setup, NEEDS_DAX};
use super::suites::SuiteDef;
use super::{Ctx, Env, Verdict};
use crate::error::{describe, fail, Context, Result};
use crate::isolate::{self, Child};
use crate::stats;
use crate::sys::{self, Mapping, MAP_SHARED, MAP_SHARED_VALIDATE, MAP_SYNC, PAGE};

/// Faults per cell: one 2 MiB huge page's worth, as in the cover letter.
pub const FAULTS: usize = 512;
const LEN: usize = FAULTS * PAGE;
/// A cell takes a few seconds under TCG even with an fdatasync per page and the copy
/// running; this only catches a hang.
pub const LIMIT: Duration = Duration::from_secs(180);
/// The copy's source. The copy loops over it, rewriting a new destination each pass, so
/// its size only sets how often blocks are freed and allocated again.
const COPY_SRC_LEN: usize = 16 << 20;
const COPY_CHUNK: usize = 256 << 10;
/// How long a cell waits for the background copy to have copied its first chunk.
const COPY_START_LIMIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// fallocate()d: blocks allocated but unwritten, so a write fault converts the extent.
    Preallocated,
    /// ftruncate()d only: every write fault allocates a block.
    Empty,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    Idle,
    /// Another process copies a 16 MiB file on the same file system, over and over.
    Copy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Shared,
    /// MAP_SHARED_VALIDATE|MAP_SYNC: refused (EOPNOTSUPP) on virtio-pmem, reported n/a.
    Sync,
    /// MAP_SHARED, and each sample is the store plus the fdatasync that makes it durable:
    /// what an application pays per page without MAP_SYNC.
    SharedFdatasync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cell {
    pub file: FileKind,
    pub load: Load,
    pub map: MapKind,
}

impl Cell {
    /// The cover letter's heading, without the colon: `File empty, background load, MAP_SHARED`.
    pub fn title(&self) -> String {
        let file = match self.file {
            FileKind::Preallocated => "File preallocated",
            FileKind::Empty => "File empty",
        };
        let load = match self.load {
            Load::Idle => "no load",
            Load::Copy => "background load",
        };
        let map = match self.map {
            MapKind::Shared => "MAP_SHARED",
            MapKind::Sync => "MAP_SYNC",
            MapKind::SharedFdatasync => "MAP_SHARED + fdatasync per page",
        };
        format!("{file}, {load}, {map}")
    }

    /// The `VUP-METRIC` labels that name this cell.
    pub fn labels(&self) -> [(&'static str, &'static str); 3] {
        [
            (
                "file",
                match self.file {
                    FileKind::Preallocated => "preallocated",
                    FileKind::Empty => "empty",
                },
            ),
            (
                "load",
                match self.load {
                    Load::Idle => "idle",
                    Load::Copy => "copy",
                },
            ),
            (
                "map",
                match self.map {
                    MapKind::Shared => "map_shared",
                    MapKind::Sync => "map_sync",
                    MapKind::SharedFdatasync => "map_shared_fdatasync",
                },
            ),
        ]
    }

    /// TAP name: `fault_latency preallocated idle map_shared`.
    pub fn case_name(&self) -> String {
        let l = self.labels();
        format!("fault_latency {} {} {}", l[0].1, l[1].1, l[2].1)
    }
}

/// The whole matrix, file kind outermost, as the catalogue lists it.
pub fn cells() -> Vec<Cell> {
    let mut v = Vec::new();
    for file in [FileKind::Preallocated, FileKind::Empty] {
        for load in [Load::Idle, Load::Copy] {
            for map in [MapKind::Shared, MapKind::Sync, MapKind::SharedFdatasync] {
                v.push(Cell { file, load, map });
            }
        }
    }
    v
}

/// The word stored into page `i`: differs per page and per cell, so a store that
/// reached the wrong page, or no page, shows in the read-back.
fn stamp(cell: &Cell, i: usize) -> u64 {
    let c = (cell.file as u64) << 8 | (cell.load as u64) << 4 | cell.map as u64;
    0xFA17_0000_0000_0000 | c << 32 | i as u64
}

/// Runs the copy in a helper process until dropped: read the source, write a new
/// destination file (so blocks are allocated and freed all the time), over and over.
/// `copied` (shared memory) counts the bytes it wrote.
struct BackgroundCopy {
    proc: isolate::Proc,
    copied: Mapping,
}

impl BackgroundCopy {
    fn start(dir: &Path) -> Result<BackgroundCopy> {
        let src = dir.join("fault_latency.copy-src");
        let dst = dir.join("fault_latency.copy-dst");
        let f = common::create(&src)?;
        let chunk = crate::pattern::seeded(0xC0B1, COPY_CHUNK);
        for i in 0..COPY_SRC_LEN / COPY_CHUNK {
            f.write_all_at(&chunk, (i * COPY_CHUNK) as u64)
                .ctx("write the copy's source")?;
        }
        f.sync_all().ctx("fsync the copy's source")?;
        drop(f);
        let copied = Mapping::shared_anonymous(PAGE).ctx("shared counter")?;
        // The helper is a fork: it has its own copy of this borrow, pointing at the same
        // shared page, which stays mapped until the helper exits.
        let counter = &copied.words()[0];
        let proc = isolate::spawn(move || {
            let mut buf = vec![0u8; COPY_CHUNK];
            loop {
                let (Ok(s), Ok(d)) = (File::open(&src), File::create(&dst)) else {
                    return 2;
                };
                for i in 0..COPY_SRC_LEN / COPY_CHUNK {
                    let off = (i * COPY_CHUNK) as u64;
                    if s.read_exact_at(&mut buf, off).is_err() || d.write_all_at(&buf, off).is_err()
                    {
                        return 3;
                    }
                    counter.fetch_add(COPY_CHUNK as u64, Ordering::Relaxed);
                }
            }
        })
        .ctx("fork the background copy")?;
        let mut bc = BackgroundCopy { proc, copied };
        let t0 = Instant::now();
        while bc.bytes() == 0 {
            if let Some(exit) = bc.proc.try_wait() {
                fail!("the background copy ended before copying anything: {exit:?}");
            }
            if t0.elapsed() > COPY_START_LIMIT {
                fail!("the background copy copied nothing in {COPY_START_LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(bc)
    }

    fn bytes(&self) -> u64 {
        self.copied.words()[0].load(Ordering::Relaxed)
    }

    /// Stops the copy and removes its files; fails if it had stopped on its own.
    fn stop(mut self, dir: &Path) -> Result<()> {
        let exited = self.proc.try_wait();
        self.proc.kill();
        let _ = std::fs::remove_file(dir.join("fault_latency.copy-src"));
        let _ = std::fs::remove_file(dir.join("fault_latency.copy-dst"));
        if let Some(e) = exited {
            fail!("the background copy stopped during the measurement: {e:?}");
        }
        Ok(())
    }
}

/// Page faults of this process so far, minor plus major, from /proc/self/stat. A DAX
/// write fault that allocates or converts a block counts as major, one into an already
/// written block as minor: the cells differ in exactly that, so count both.
fn page_faults() -> Option<u64> {
    parse_faults(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// Fields 10 (minflt) and 12 (majflt) of a /proc/PID/stat line; the command name (field
/// 2) may hold spaces and parentheses, so count from the last ')'.
fn parse_faults(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): minflt is field 10, majflt field 12.
    let minflt: u64 = f.get(7)?.parse().ok()?;
    let majflt: u64 = f.get(9)?.parse().ok()?;
    Some(minflt + majflt)
}

/// One cell, in the case's forked child.
pub fn run_cell(cell: Cell, child: &Child, env: &Env) -> Result<Verdict> {
    let labels = cell.labels();
    let path = env.mnt.join("fault_latency.dat");
    let f = common::create(&path)?;
    match cell.file {
        FileKind::Preallocated => sys::fallocate(&f, 0, LEN as u64).ctx("fallocate 2 MiB")?,
        FileKind::Empty => f.set_len(LEN as u64).ctx("ftruncate 2 MiB")?,
    }
    // The file's creation is committed now, so the first fault does not pay for it.
    f.sync_all().ctx("fsync the new file")?;

    let flags = match cell.map {
        MapKind::Sync => MAP_SHARED_VALIDATE | MAP_SYNC,
        MapKind::Shared | MapKind::SharedFdatasync => MAP_SHARED,
    };
    let map = match Mapping::new(&f, LEN, sys::PROT_READ | sys::PROT_WRITE, flags, 0) {
        Ok(m) => m,
        Err(e) if cell.map == MapKind::Sync && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            let why =
                "MAP_SYNC refused with EOPNOTSUPP: virtio-pmem is an asynchronous-flush device";
            child.diag(&format!("{}:\nn/a ({why})", cell.title()));
            child.raw(&stats::format_na("fault_latency", &labels, 1, "EOPNOTSUPP"));
            drop(f);
            let _ = std::fs::remove_file(&path);
            return Ok(Verdict::Skip(format!("n/a: {why}")));
        }
        Err(e) if cell.map == MapKind::Sync => fail!(
            "mmap MAP_SHARED_VALIDATE|MAP_SYNC failed with {}, want EOPNOTSUPP",
            describe(&e)
        ),
        Err(e) => return Err(e).ctx("mmap MAP_SHARED"),
    };
    if cell.map == MapKind::Sync {
        child.diag("MAP_SYNC was accepted: this device is synchronous; measuring it");
    }
    // One fault per 4 KiB page: without this a 2 MiB-aligned extent may be served by a
    // single PMD fault and the other 511 stores would not fault at all.
    map.advise(0, LEN, libc::MADV_NOHUGEPAGE)
        .ctx("madvise MADV_NOHUGEPAGE")?;

    let copy = match cell.load {
        Load::Copy => Some(BackgroundCopy::start(&env.mnt)?),
        Load::Idle => None,
    };
    let copied_before = copy.as_ref().map_or(0, |c| c.bytes());

    let words = map.words();
    let mut samples = Vec::with_capacity(FAULTS);
    let faults_before = page_faults();
    let began = sys::monotonic_raw_ns();
    for i in 0..FAULTS {
        let v = stamp(&cell, i);
        let t0 = sys::monotonic_raw_ns();
        words[i * PAGE / 8].store(v, Ordering::Relaxed);
        if cell.map == MapKind::SharedFdatasync {
            f.sync_data().ctx(format!("fdatasync after page {i}"))?;
        }
        samples.push(sys::monotonic_raw_ns() - t0);
    }
    let wall = sys::monotonic_raw_ns() - began;
    let faults = faults_before
        .zip(page_faults())
        .map(|(before, after)| after - before);

    let copied = match copy {
        Some(c) => {
            let during = c.bytes() - copied_before;
            c.stop(&env.mnt)?;
            if during == 0 {
                fail!("the background copy made no progress during the measurement");
            }
            Some(during)
        }
        None => None,
    };
    drop(map);

    // Every store must have reached its page of the file.
    let mut word = [0u8; 8];
    for i in 0..FAULTS {
        f.read_exact_at(&mut word, (i * PAGE) as u64)
            .ctx(format!("read back page {i}"))?;
        let got = u64::from_ne_bytes(word);
        if got != stamp(&cell, i) {
            fail!(
                "page {i} reads {got:#x} after the store of {:#x}",
                stamp(&cell, i)
            );
        }
    }
    drop(f);
    let _ = std::fs::remove_file(&path);

    let Some(summary) = stats::summarize(&samples) else {
        fail!("no samples");
    };
    let buckets = stats::log2_buckets(&samples);
    child.diag(&stats::format_cover_letter(
        &cell.title(),
        &summary,
        &buckets,
    ));
    let mut notes = match faults {
        Some(n) => format!("{n} page faults (minor + major) for {FAULTS} pages"),
        None => "page faults: /proc/self/stat unreadable".to_string(),
    };
    if faults.is_some_and(|n| n < FAULTS as u64 / 2) {
        notes.push_str(" (fewer than one per page: the kernel mapped larger pages)");
    }
    if let Some(n) = copied {
        notes.push_str(&format!(
            "; background copy wrote {:.1} MiB meanwhile",
            n as f64 / (1 << 20) as f64
        ));
    }
    child.diag(&notes);
    let ops_s = stats::ops_per_sec(samples.len(), wall);
    child.raw(&stats::format_metric_labeled(
        "fault_latency",
        &labels,
        1,
        &summary,
        ops_s,
    ));
    Ok(Verdict::Pass)
}

pub const SUITE: SuiteDef = SuiteDef {
    name: "faultlat",
    help: &[
        "catalogue F19 fault_latency: 512 timed write faults per cell of",
        "{preallocated, empty file} x {idle, background copy} x {MAP_SHARED,",
        "MAP_SYNC (n/a where refused), MAP_SHARED + fdatasync per page}",
    ],
    run: suite,
};

/// Catalogue F19: one isolated case per cell of the fault-latency matrix.
fn suite(ctx: &mut Ctx) {
    catalogue_setup(ctx);
    for cell in cells() {
        ctx.case_isolated(&cell.case_name(), NEEDS_DAX, LIMIT, move |child, env| {
            run_cell(cell, child, env)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_has_twelve_distinct_cells() {
        let c = cells();
        assert_eq!(c.len(), 12);
        let mut names: Vec<String> = c.iter().map(|c| c.case_name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 12);
        assert_eq!(
            c.iter().filter(|c| c.map == MapKind::Sync).count(),
            4,
            "one MAP_SYNC cell per file kind and load"
        );
    }

    #[test]
    fn faults_from_proc_stat() {
        let line = "42 (a) b (c)) S 1 42 42 0 -1 4194560 123 0 7 0 5 6 0 0 20 0 1 0 100 0 0";
        assert_eq!(parse_faults(line), Some(130));
        assert_eq!(parse_faults("garbage"), None);
        assert!(page_faults().is_some());
    }

    #[test]
    fn titles_follow_the_cover_letter() {
        let c = Cell {
            file: FileKind::Empty,
            load: Load::Copy,
            map: MapKind::Shared,
        };
        assert_eq!(c.title(), "File empty, background load, MAP_SHARED");
        assert_eq!(c.case_name(), "fault_latency empty copy map_shared");
    }

    #[test]
    fn stamps_differ_per_page_and_cell() {
        let mut all: Vec<u64> = cells()
            .iter()
            .flat_map(|c| (0..FAULTS).map(move |i| stamp(c, i)))
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
