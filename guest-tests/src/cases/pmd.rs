//! Catalogue D12-D14: huge-page (PMD) DAX mappings. A 2 MiB range of a file is mapped
//! with one PMD when the mapping address and file offset are 2 MiB-aligned, the extent
//! behind it is physically 2 MiB-aligned and contiguous, and the region starts 2 MiB-
//! aligned. Evidence that a PMD served a fault: the fs_dax:dax_pmd_fault_done tracepoint
//! reports NOPAGE, and the minor-fault count rises by about 1 per 2 MiB instead of 512.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::common::{self, observe, Observed};
use super::fs_state::{catalogue_setup, NEEDS_DAX};
use super::suites::SuiteDef;
use super::{Ctx, Env, Verdict};
use crate::error::{describe, fail, Context, Result};
use crate::fiemap::{self, Segment};
use crate::isolate::{self, Child, End, Exit};
use crate::nd;
use crate::pattern;
use crate::sys::{self, Mapping, PAGE, PMD};

pub const LIMIT: Duration = Duration::from_secs(180);
const PAGES: usize = PMD / PAGE;

/// File offsets of the 2 MiB-aligned windows of [0, len) that lie physically contiguous
/// and 2 MiB-aligned on the device, given the file's segments (as FIEMAP reports them).
pub fn pmd_windows(segs: &[Segment], len: u64) -> Vec<u64> {
    // Merge segments that continue each other both in the file and on the device.
    let mut merged: Vec<Segment> = Vec::new();
    for s in segs {
        match merged.last_mut() {
            Some(m)
                if m.file_offset + m.len == s.file_offset
                    && m.dev_offset + m.len == s.dev_offset =>
            {
                m.len += s.len
            }
            _ => merged.push(*s),
        }
    }
    let pmd = PMD as u64;
    (0..len / pmd)
        .map(|i| i * pmd)
        .filter(|&w| {
            merged.iter().any(|s| {
                w >= s.file_offset
                    && w + pmd <= s.file_offset + s.len
                    && (s.dev_offset + (w - s.file_offset)) % pmd == 0
            })
        })
        .collect()
}

/// A file of pseudo-random data, written (no unwritten extents) and synced.
struct PmdFile {
    file: File,
    data: Vec<u8>,
    segs: Vec<Segment>,
    windows: Vec<u64>,
}

impl PmdFile {
    fn create(path: &Path, len: usize, seed: u64) -> Result<PmdFile> {
        // Blocks freed by earlier cases stay busy until their transaction commits; without
        // the sync the allocator works around them in whatever fragments are left.
        sys::sync();
        let file = common::create(path)?;
        // One fallocate per 2 MiB: a request exactly the stripe's size (the suite's mkfs sets a
        // 2 MiB stripe on ext4, su=2m on xfs) is placed only on a stripe boundary, while ext4
        // may put one large request at an unaligned goal (seen in a CI run: a single 64 MiB
        // extent 0x0e0000 past a 2 MiB boundary).
        for off in (0..len).step_by(PMD) {
            sys::fallocate(&file, off as u64, PMD.min(len - off) as u64)
                .ctx(format!("fallocate 2 MiB at {off:#x}"))?;
        }
        let data = pattern::seeded(seed, len);
        file.write_all_at(&data, 0).ctx("write pattern")?;
        file.sync_all().ctx("fsync")?;
        let ext = fiemap::extents(&file).ctx("FIEMAP")?;
        let segs = fiemap::segments(&ext, len as u64).map_err(crate::error::Error::Failed)?;
        let windows = pmd_windows(&segs, len as u64);
        Ok(PmdFile {
            file,
            data,
            segs,
            windows,
        })
    }

    fn ino(&self) -> u64 {
        self.file.metadata().map(|m| m.ino()).unwrap_or(0)
    }

    fn describe_layout(&self) -> String {
        let segs: Vec<String> = self
            .segs
            .iter()
            .map(|s| {
                format!(
                    "{:#x}+{:#x}@dev {:#x}{}",
                    s.file_offset,
                    s.len,
                    s.dev_offset,
                    if s.dev_offset % PMD as u64 == 0 {
                        " (2M-aligned)"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        format!(
            "extents {}; PMD-capable windows {:x?}",
            segs.join(", "),
            self.windows
        )
    }

    /// The word the file holds at byte `off`.
    fn word(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.data[off..off + 8].try_into().unwrap_or_default())
    }
}

/// Create a file with at least `need` PMD-capable windows, trying a larger allocation if
/// the first has too few (ext4 without stripe hints aligns only some allocations).
fn pmd_file(child: &Child, path: &Path, need: usize, seed: u64) -> Result<PmdFile> {
    let mut last = String::new();
    for len in [8 * PMD, 32 * PMD] {
        let f = PmdFile::create(path, len, seed)?;
        child.diag(&format!("{}: {}", path.display(), f.describe_layout()));
        if f.windows.len() >= need {
            return Ok(f);
        }
        last = f.describe_layout();
    }
    fail!(
        "no {need} physically 2 MiB-aligned 2 MiB extents in {}: {last}",
        path.display()
    )
}

/// Read every page of a mapping of `f`'s bytes [file_off, +map.len()) and compare one
/// word per page with the file's pattern. Returns the first mismatch.
fn check_pages(map: &Mapping, f: &PmdFile, file_off: usize) -> Option<String> {
    let w = map.words();
    for page in 0..map.len() / PAGE {
        let o = page * PAGE + 8 * (page % 64);
        let got = w[o / 8].load(Ordering::Acquire);
        let want = f.word(file_off + o);
        if got != want {
            return Some(format!(
                "mapping offset {o:#x} reads {got:#x}, file holds {want:#x}"
            ));
        }
    }
    None
}

fn region_check(child: &Child, env: &Env) -> Result<()> {
    let dev_name = env
        .dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some(region) = nd::region_dir(&dev_name) else {
        fail!("no nd region for {dev_name}");
    };
    let Some(start) = nd::region_start(&region) else {
        fail!("{}/resource unreadable", region.display());
    };
    child.diag(&format!(
        "{} starts at {start:#x}: {}",
        region.display(),
        if start % PMD as u64 == 0 {
            "2 MiB-aligned"
        } else {
            "NOT 2 MiB-aligned"
        }
    ));
    if start % PMD as u64 != 0 {
        fail!("region start {start:#x} is not 2 MiB-aligned: no PMD mapping is possible");
    }
    Ok(())
}

/// Catalogue D12: a 2 MiB-aligned mapping of a physically aligned extent, all 512 pages
/// touched (reads, then writes in a fresh mapping), served by a PMD each time.
pub fn pmd_fault(child: &Child, env: &Env) -> Result<Verdict> {
    region_check(child, env)?;
    let path = env.mnt.join("pmd_fault.dat");
    let f = pmd_file(child, &path, 1, 0xD12)?;
    let w = f.windows[0] as usize;
    let ino = f.ino();

    let map = common::map_pmd_aligned(&f.file, PMD, w as u64)?;
    let mut bad = None;
    let reads = observe(ino, || bad = check_pages(&map, &f, w));
    if let Some(b) = bad {
        fail!("read through the PMD mapping: {b}");
    }
    drop(map);
    let map = common::map_pmd_aligned(&f.file, PMD, w as u64)?;
    let writes = observe(ino, || {
        for page in 0..PAGES {
            let o = page * PAGE + 16;
            map.words()[o / 8].store(common::word_for((w + o) as u64), Ordering::Release);
        }
    });
    sys::msync(map.as_slice(), libc::MS_SYNC).ctx("msync")?;
    drop(map);
    for page in 0..PAGES {
        let o = page * PAGE + 16;
        let got = common::read_at(&f.file, (w + o) as u64, 8)?;
        if got != common::word_for((w + o) as u64).to_le_bytes() {
            fail!("store at window offset {o:#x} not seen by read(2)");
        }
    }
    child.diag(&format!(
        "window at file offset {w:#x}, 512 pages read: {}",
        reads.text()
    ));
    child.diag(&format!(
        "fresh mapping, 512 pages written: {}",
        writes.text()
    ));
    let _ = std::fs::remove_file(&path);
    let mut wrong = Vec::new();
    if !reads.was_pmd(1) {
        wrong.push(format!("reads not served by a PMD ({})", reads.text()));
    }
    if !writes.was_pmd(1) {
        wrong.push(format!("writes not served by a PMD ({})", writes.text()));
    }
    if !wrong.is_empty() {
        fail!("{}", wrong.join("; "));
    }
    Ok(Verdict::Pass)
}

/// Catalogue D13: each case must fall back to 4 KiB pages, with correct data.
pub fn pmd_fallback(child: &Child, env: &Env) -> Result<Verdict> {
    let path = env.mnt.join("pmd_fallback.dat");
    let f = pmd_file(child, &path, 2, 0xD13)?;
    let ino = f.ino();
    let w = f.windows[0] as usize;
    let mut j = Judge::default();

    // Control: the same window, mapped normally, is served by a PMD.
    let map = common::map_pmd_aligned(&f.file, PMD, w as u64)?;
    let mut bad = None;
    let control = observe(ino, || bad = check_pages(&map, &f, w));
    drop(map);
    child.diag(&format!(
        "control (aligned shared mapping of window {w:#x}): {}",
        control.text()
    ));
    if !control.was_pmd(1) || bad.is_some() {
        fail!("control mapping was not a correct PMD mapping ({}; {bad:?}): the fallbacks would prove nothing", control.text());
    }

    // A private write: copy-on-write cannot use the device's PMD.
    let map = Mapping::new_aligned(
        &f.file,
        PMD,
        sys::PROT_READ | sys::PROT_WRITE,
        sys::MAP_PRIVATE,
        w as u64,
        PMD,
        0,
    )
    .ctx("mmap MAP_PRIVATE")?;
    let obs = observe(ino, || {
        for page in 0..PAGES {
            map.words()[page * PAGE / 8].store(0x5052_4956, Ordering::Release);
        }
    });
    let mut data = None;
    if map.words()[PAGE / 8].load(Ordering::Acquire) != 0x5052_4956 {
        data = Some("private mapping lost its own store".to_string());
    }
    if common::read_at(&f.file, w as u64, 8)? != f.data[w..w + 8] {
        data = Some("a private store reached the file".to_string());
    }
    drop(map);
    j.pte("private write", &obs, PAGES, data);

    // A file offset 4 KiB off the 2 MiB grid, at an aligned address.
    let map = common::map_pmd_aligned(&f.file, PMD, (w + PAGE) as u64)?;
    let mut bad = None;
    let obs = observe(ino, || bad = check_pages(&map, &f, w + PAGE));
    drop(map);
    j.pte("file offset 4 KiB off alignment", &obs, PAGES, bad);

    // A mapping shorter than 2 MiB.
    let map = common::map_pmd_aligned(&f.file, PMD - PAGE, w as u64)?;
    let mut bad = None;
    let obs = observe(ino, || bad = check_pages(&map, &f, w));
    drop(map);
    j.pte("mapping of 2 MiB - 4 KiB", &obs, PAGES - 1, bad);

    // MADV_NOHUGEPAGE on the mapping.
    let map = common::map_pmd_aligned(&f.file, PMD, w as u64)?;
    map.advise(0, PMD, libc::MADV_NOHUGEPAGE)
        .ctx("madvise MADV_NOHUGEPAGE")?;
    let mut bad = None;
    let obs = observe(ino, || bad = check_pages(&map, &f, w));
    drop(map);
    j.pte("MADV_NOHUGEPAGE", &obs, PAGES, bad);

    // EOF inside the second window: cut the file 1 MiB into it. Its first half keeps
    // its (aligned) blocks, so EOF is the only reason left to fall back.
    let w2 = f.windows[1] as usize;
    let eof = w2 + PMD / 2;
    let map = common::map_pmd_aligned(&f.file, PMD, w2 as u64)?;
    f.file
        .set_len(eof as u64)
        .ctx("truncate into the second window")?;
    let mut bad = None;
    let obs = observe(ino, || {
        for page in 0..PAGES / 2 {
            let o = page * PAGE + 8 * (page % 64);
            let got = map.words()[o / 8].load(Ordering::Acquire);
            if got != f.word(w2 + o) && bad.is_none() {
                bad = Some(format!("window offset {o:#x} reads {got:#x}"));
            }
        }
    });
    drop(map);
    j.pte("EOF 1 MiB into the 2 MiB range", &obs, PAGES / 2, bad);
    // Restore the file's length and data for the last case.
    f.file.set_len(f.data.len() as u64).ctx("extend back")?;
    f.file
        .write_all_at(&f.data[eof..], eof as u64)
        .ctx("rewrite tail")?;

    // A fragmented extent: punch one page out of the window and write it back; the new
    // block lies elsewhere, so the window is no longer one contiguous extent.
    let mid = w + PMD / 2;
    sys::fallocate_mode(&f.file, sys::FALLOC_PUNCH_HOLE, mid as u64, PAGE as u64).ctx("punch")?;
    f.file
        .write_all_at(&f.data[mid..mid + PAGE], mid as u64)
        .ctx("refill punched page")?;
    f.file.sync_all().ctx("fsync")?;
    let ext = fiemap::extents(&f.file).ctx("FIEMAP")?;
    let segs = fiemap::segments(&ext, f.data.len() as u64).map_err(crate::error::Error::Failed)?;
    if pmd_windows(&segs, f.data.len() as u64).contains(&(w as u64)) {
        j.seen.push(
            "fragmented extent: the refilled page went back to its old block; case not exercised"
                .into(),
        );
        j.wrong
            .push("could not fragment the window (the refilled block is contiguous again)".into());
    } else {
        let map = common::map_pmd_aligned(&f.file, PMD, w as u64)?;
        let mut bad = None;
        let obs = observe(ino, || bad = check_pages(&map, &f, w));
        drop(map);
        j.pte(
            "fragmented extent (page refilled elsewhere)",
            &obs,
            PAGES,
            bad,
        );
    }
    child.diag(&j.seen.join("\n"));
    let _ = std::fs::remove_file(&path);
    if !j.wrong.is_empty() {
        fail!("{}", j.wrong.join("; "));
    }
    Ok(Verdict::Pass)
}

/// Collects what each fallback case did and which were wrong.
#[derive(Default)]
struct Judge {
    seen: Vec<String>,
    wrong: Vec<String>,
}

impl Judge {
    /// The access must have used 4 KiB pages, and `data` (a mismatch) must be None.
    fn pte(&mut self, what: &str, obs: &Observed, pages: usize, data: Option<String>) {
        self.seen.push(format!("{what}: {}", obs.text()));
        if !obs.was_pte(pages) {
            self.wrong
                .push(format!("{what}: not 4 KiB pages ({})", obs.text()));
        }
        if let Some(d) = data {
            self.wrong.push(format!("{what}: {d}"));
        }
    }
}

/// Catalogue D14: mremap, fork, mprotect and O_DIRECT (to and from an unfaulted PMD) on
/// PMD mappings; the data must stay right.
pub fn pmd_ops(child: &Child, env: &Env) -> Result<Verdict> {
    let path = env.mnt.join("pmd_ops.dat");
    let f = pmd_file(child, &path, 2, 0xD14)?;
    let ino = f.ino();
    let (w1, w2) = (f.windows[0] as usize, f.windows[1] as usize);
    let mut notes = Vec::new();

    let map = common::map_pmd_aligned(&f.file, PMD, w1 as u64)?;
    let mut bad = None;
    let first = observe(ino, || bad = check_pages(&map, &f, w1));
    if let Some(b) = bad {
        fail!("first touch: {b}");
    }
    if !first.was_pmd(1) {
        fail!(
            "the mapping is not PMD-mapped, nothing to test ({})",
            first.text()
        );
    }
    notes.push(format!("first touch of window {w1:#x}: {}", first.text()));

    // mremap to another 2 MiB-aligned address.
    let mut bad = None;
    let mut moved = None;
    let obs = observe(ino, || match map.mremap_aligned(PMD) {
        Ok(m) => {
            bad = check_pages(&m, &f, w1);
            moved = Some(m);
        }
        Err(e) => bad = Some(format!("mremap: {}", describe(&e))),
    });
    let Some(mut map) = moved else {
        fail!("{}", bad.unwrap_or_default());
    };
    if let Some(b) = bad {
        fail!("after mremap: {b}");
    }
    notes.push(format!(
        "mremap to {:#x} and re-read: {}",
        map.addr(),
        obs.text()
    ));

    // fork: the child sees the same data and its store reaches the parent.
    let probe_map = &map;
    let end = isolate::probe(Duration::from_secs(60), || {
        if check_pages(probe_map, &f, w1).is_some() {
            return 10;
        }
        probe_map.words()[7 * PAGE / 8].store(0xF0F0_F0F0, Ordering::Release);
        0
    })
    .ctx("fork")?;
    if end != End::Done(Exit::Code(0)) {
        fail!(
            "fork: the child {}",
            if end == End::Done(Exit::Code(10)) {
                "read wrong data".to_string()
            } else {
                end.describe()
            }
        );
    }
    if map.words()[7 * PAGE / 8].load(Ordering::Acquire) != 0xF0F0_F0F0
        || common::read_at(&f.file, (w1 + 7 * PAGE) as u64, 8)? != 0xF0F0_F0F0u64.to_le_bytes()
    {
        fail!("fork: the child's store through the shared PMD mapping is not visible");
    }
    notes.push(
        "fork: child read all 512 pages right; its store visible to the parent and read(2)".into(),
    );

    // mprotect read-only: reads work, a store is SIGSEGV; then read-write again.
    map.protect(sys::PROT_READ).ctx("mprotect PROT_READ")?;
    if let Some(b) = check_pages(&map, &f, w1) {
        fail!("read through the read-only mapping: {b}");
    }
    let ro_map = &map;
    let end = isolate::probe(Duration::from_secs(60), || {
        ro_map.words()[0].store(1, Ordering::Release);
        0
    })
    .ctx("fork")?;
    if end != End::Done(Exit::Signal(libc::SIGSEGV)) {
        fail!(
            "store into the read-only PMD mapping: {}, want SIGSEGV",
            end.describe()
        );
    }
    map.protect(sys::PROT_READ | sys::PROT_WRITE)
        .ctx("mprotect PROT_READ|PROT_WRITE")?;
    let obs = observe(ino, || {
        for page in 0..PAGES {
            let o = page * PAGE + 24;
            map.words()[o / 8].store(common::word_for((w1 + o) as u64), Ordering::Release);
        }
    });
    sys::msync(map.as_slice(), libc::MS_SYNC).ctx("msync")?;
    for page in (0..PAGES).step_by(17) {
        let o = page * PAGE + 24;
        if common::read_at(&f.file, (w1 + o) as u64, 8)?
            != common::word_for((w1 + o) as u64).to_le_bytes()
        {
            fail!("after mprotect read-write: store at {o:#x} not in the file");
        }
    }
    notes.push(format!(
        "mprotect read-only: store gets SIGSEGV; read-write again, 512 stores: {}",
        obs.text()
    ));
    drop(map);

    // O_DIRECT into and out of an unfaulted PMD-capable mapping (window 2), through a
    // DAX file (copy) and through the block device (pinned pages).
    let yp = env.mnt.join("pmd_ops_y.dat");
    let py = pattern::seeded(0xD14F, PMD);
    let y = common::create(&yp)?;
    y.write_all_at(&py, 0).ctx("write Y")?;
    y.sync_all().ctx("fsync Y")?;
    let y_direct = sys::open_direct(&yp, true).ctx("open Y O_DIRECT")?;
    let dev =
        sys::open_direct(&env.dev, true).ctx(format!("open {} O_DIRECT", env.dev.display()))?;
    let y_segs = fiemap::segments(&fiemap::extents(&y).ctx("FIEMAP Y")?, PMD as u64)
        .map_err(crate::error::Error::Failed)?;
    let expect_window = |what: &str, want: &[u8]| -> Result<()> {
        common::compare(what, &common::read_at(&f.file, w2 as u64, PMD)?, want)
    };

    // DAX file -> unfaulted mapping.
    let m = common::map_pmd_aligned(&f.file, PMD, w2 as u64)?;
    let mut r = Ok(0);
    let obs = observe(ino, || r = m.pread_into(&y_direct, 0, PMD, 0));
    if r.as_ref().ok() != Some(&PMD) {
        fail!("O_DIRECT pread from a DAX file into an unfaulted PMD mapping: {r:?}");
    }
    expect_window("window 2 after O_DIRECT read from a DAX file", &py)?;
    notes.push(format!(
        "O_DIRECT pread (DAX file) into an unfaulted mapping: {}",
        obs.text()
    ));
    drop(m);

    // Unfaulted mapping -> DAX file.
    f.file
        .write_all_at(&f.data[w2..w2 + PMD], w2 as u64)
        .ctx("restore window 2")?;
    let m = common::map_pmd_aligned(&f.file, PMD, w2 as u64)?;
    let r = m.pwrite_from(&y_direct, 0, PMD, 0);
    if r.as_ref().ok() != Some(&PMD) {
        fail!("O_DIRECT pwrite from an unfaulted PMD mapping to a DAX file: {r:?}");
    }
    common::compare(
        "Y after O_DIRECT write from window 2",
        &common::read_at(&y, 0, PMD)?,
        &f.data[w2..w2 + PMD],
    )?;
    drop(m);

    // Block device (pins the pages): device -> unfaulted mapping, and back.
    y.write_all_at(&py, 0).ctx("rewrite Y")?;
    y.sync_all().ctx("fsync Y")?;
    let m = common::map_pmd_aligned(&f.file, PMD, w2 as u64)?;
    let mut res: std::result::Result<(), String> = Ok(());
    let obs = observe(ino, || {
        for s in &y_segs {
            match m.pread_into(&dev, s.file_offset as usize, s.len as usize, s.dev_offset) {
                Ok(n) if n == s.len as usize => {}
                other => {
                    res = Err(format!("{other:?}"));
                    return;
                }
            }
        }
    });
    res.map_err(|e| {
        crate::error::Error::Failed(format!(
            "O_DIRECT pread from the device into an unfaulted mapping: {e}"
        ))
    })?;
    expect_window("window 2 after block-device O_DIRECT read", &py)?;
    notes.push(format!(
        "O_DIRECT pread ({}) into an unfaulted mapping: {}",
        env.dev.display(),
        obs.text()
    ));
    drop(m);
    f.file
        .write_all_at(&f.data[w2..w2 + PMD], w2 as u64)
        .ctx("restore window 2")?;
    let m = common::map_pmd_aligned(&f.file, PMD, w2 as u64)?;
    for s in &y_segs {
        let r = m.pwrite_from(&dev, s.file_offset as usize, s.len as usize, s.dev_offset);
        if r.as_ref().ok() != Some(&(s.len as usize)) {
            fail!("O_DIRECT pwrite to the device from an unfaulted mapping: {r:?}");
        }
    }
    common::compare(
        "Y after block-device O_DIRECT write from window 2",
        &common::read_at(&y, 0, PMD)?,
        &f.data[w2..w2 + PMD],
    )?;
    drop(m);
    notes.push("O_DIRECT to and from unfaulted PMD-capable mappings (DAX file and block device): data right".into());

    child.diag(&notes.join("\n"));
    drop(y);
    let _ = std::fs::remove_file(&yp);
    let _ = std::fs::remove_file(&path);
    Ok(Verdict::Pass)
}

pub const SUITE: SuiteDef = SuiteDef {
    name: "pmd",
    help: &[
        "catalogue D: pmd_fault, pmd_fallback, pmd_ops (run it with --fs ext4 and",
        "with --fs xfs)",
    ],
    run: suite,
};

/// Catalogue D, on whichever filesystem --fs names.
fn suite(ctx: &mut Ctx) {
    catalogue_setup(ctx);
    ctx.case_isolated("pmd_fault", NEEDS_DAX, LIMIT, pmd_fault);
    ctx.case_isolated("pmd_fallback", NEEDS_DAX, LIMIT, pmd_fallback);
    ctx.case_isolated("pmd_ops", NEEDS_DAX, LIMIT, pmd_ops);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(file_offset: u64, dev_offset: u64, len: u64) -> Segment {
        Segment {
            file_offset,
            dev_offset,
            len,
        }
    }

    #[test]
    fn aligned_windows() {
        let m = 1u64 << 20;
        // One extent, physically 2 MiB-aligned: every window.
        assert_eq!(
            pmd_windows(&[seg(0, 64 * m, 8 * m)], 8 * m),
            vec![0, 2 * m, 4 * m, 6 * m]
        );
        // Physically 1 MiB off: none.
        assert!(pmd_windows(&[seg(0, 65 * m, 8 * m)], 8 * m).is_empty());
        // Starts 1 MiB off but the file's second window lines up once shifted: the file
        // offset 2M maps to device 67M: not aligned either.
        assert!(pmd_windows(&[seg(0, 65 * m, 4 * m)], 4 * m).is_empty());
        // Two extents that continue each other merge; a break in the middle kills the
        // window it falls in.
        assert_eq!(
            pmd_windows(&[seg(0, 64 * m, 3 * m), seg(3 * m, 67 * m, m)], 4 * m),
            vec![0, 2 * m]
        );
        assert_eq!(
            pmd_windows(&[seg(0, 64 * m, 3 * m), seg(3 * m, 100 * m, m)], 4 * m),
            vec![0]
        );
        // The file's window at 2M sits at an aligned device offset within a larger
        // misaligned-start extent.
        assert_eq!(
            pmd_windows(&[seg(m, 66 * m + m, 3 * m)], 4 * m),
            vec![2 * m]
        );
    }
}
