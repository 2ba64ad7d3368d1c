//! Catalogue A4 and A5: block allocation under DAX. A new block must read as zeros
//! whatever it held before (there is no page cache to hide old contents), and a write
//! fault that hits ENOSPC only because freed blocks are not yet committed must retry,
//! not raise SIGBUS. Both fill the filesystem, so they run last in their suite.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::common::{self, find_a5, word_for, word_has_a5, Clock, Progress};
use super::{Env, Verdict};
use crate::error::{describe, fail, Context, Result};
use crate::isolate::{self, Child, End, Exit};
use crate::pattern::XorShift64;
use crate::sys::{self, Mapping, PAGE, PMD};

/// Free bytes for root and the block size, from statvfs.
fn free_bytes(dir: &Path) -> Result<(u64, u64)> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| crate::error::Error::Failed("path with NUL".into()))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: c is a valid path and st a writable statvfs buffer.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).ctx("statvfs");
    }
    // SAFETY: statvfs succeeded and filled the buffer.
    let st = unsafe { st.assume_init() };
    Ok((st.f_bfree * st.f_frsize, st.f_frsize))
}

fn is_enospc(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC)
}

/// Write `byte` into `path` with write(2) until the filesystem is full. Returns bytes
/// written.
fn fill_with_writes(path: &Path, byte: u8) -> Result<u64> {
    let f = common::create(path)?;
    let mut written = 0u64;
    for chunk in [1usize << 20, 64 << 10, PAGE] {
        let buf = vec![byte; chunk];
        loop {
            match f.write_at(&buf, written) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if is_enospc(&e) => break,
                Err(e) => return Err(e).ctx(format!("fill: write at {written}")),
            }
        }
    }
    f.sync_all().ctx("fsync filler")?;
    Ok(written)
}

/// fallocate `path` until the filesystem is full, in shrinking chunks. Returns bytes.
fn fill_with_fallocate(path: &Path, dir: &Path) -> Result<u64> {
    let f = common::create(path)?;
    let (free, _) = free_bytes(dir)?;
    let mut size = 0u64;
    for chunk in [
        free & !((1 << 20) - 1),
        64 << 20,
        1 << 20,
        64 << 10,
        PAGE as u64,
    ] {
        if chunk == 0 {
            continue;
        }
        loop {
            match sys::fallocate(&f, size, chunk) {
                Ok(()) => size += chunk,
                Err(e) if is_enospc(&e) => {
                    // A partial allocation may have extended the file.
                    size = f.metadata().map(|m| m.len()).unwrap_or(size).max(size);
                    break;
                }
                Err(e) => return Err(e).ctx(format!("fallocate {chunk} at {size}")),
            }
        }
    }
    Ok(size)
}

/// Duration of the race part without --stress.
const STALE_RACE: Duration = Duration::from_secs(12);

pub fn stale_limit(env: &Env) -> Duration {
    env.duration(STALE_RACE) + Duration::from_secs(300)
}

const STALE_FILE: usize = 16 << 20;
const STALE_ROUNDS_SPLIT: u32 = 4;

struct Stale {
    map: Mapping,
    file: File,
    clock: Clock,
    progress: Progress,
    bad: Mutex<Option<String>>,
}

impl Stale {
    fn found(&self, what: String) {
        let mut b = crate::sync::lock(&self.bad);
        if b.is_none() {
            *b = Some(what);
        }
        self.clock.stop();
    }
}

/// One racing thread of A4; `role` picks what it does.
fn stale_worker(s: Arc<Stale>, role: usize, seed: u64) {
    let mut rng = XorShift64::new(seed);
    let pages = STALE_FILE / PAGE;
    let mut buf = vec![0u8; 64 << 10];
    while s.clock.running() {
        let page = rng.below(pages as u64) as usize;
        match role {
            // write faults: one word somewhere in a page, the rest must stay zero
            0 => {
                let w = page * PAGE / 8 + rng.below(512) as usize;
                s.map.words()[w].store(word_for(w as u64 * 8), Ordering::Release);
            }
            // mmap reads of a whole page
            1 => {
                let words = &s.map.words()[page * 512..page * 512 + 512];
                if let Some((i, v)) = words
                    .iter()
                    .map(|w| w.load(Ordering::Acquire))
                    .enumerate()
                    .find(|(_, v)| word_has_a5(*v))
                {
                    s.found(format!(
                        "mmap read at {:#x} returned {v:#x}: old 0xA5 data in a new block",
                        page * PAGE + i * 8
                    ));
                }
            }
            // read(2) of 64 KiB
            2 => {
                let off = (page * PAGE).min(STALE_FILE - buf.len()) as u64;
                match s.file.read_at(&mut buf, off) {
                    Ok(n) => {
                        if let Some(i) = find_a5(&buf[..n]) {
                            s.found(format!(
                                "read(2) at {:#x} returned 0xA5: old data in a new block",
                                off + i as u64
                            ));
                        }
                    }
                    Err(e) => s.found(format!("read(2) at {off:#x}: {}", describe(&e))),
                }
            }
            // write(2) of a few bytes inside a block: the rest of a new block must be zero
            _ => {
                let off = page * PAGE + rng.below((PAGE - 300) as u64) as usize;
                if let Err(e) = s.file.write_all_at(&[0x5A; 300], off as u64) {
                    s.found(format!("pwrite at {off:#x}: {}", describe(&e)));
                }
            }
        }
        s.progress.tick(role);
    }
}

/// Catalogue A4: fill the filesystem with 0xA5, delete the filler, then race write
/// faults, mmap reads, read(2) and write(2) in freshly allocated (sparse) and
/// fallocated (unwritten) ranges of new files. 0xA5 must never be seen.
pub fn stale_block_exposure(child: &Child, env: &Env) -> Result<Verdict> {
    let fill = env.mnt.join("stale_fill.dat");
    let (free, _) = free_bytes(&env.mnt)?;
    let t = Instant::now();
    let filled = fill_with_writes(&fill, 0xA5)?;
    let secs = t.elapsed().as_secs_f64();
    child.diag(&format!(
        "filled {} MiB of {} MiB free with 0xA5 by write(2) in {secs:.1} s ({:.0} MiB/s)",
        filled >> 20,
        free >> 20,
        (filled >> 20) as f64 / secs.max(0.001)
    ));
    std::fs::remove_file(&fill).ctx("unlink filler")?;
    // Commit the unlink, so the 0xA5 blocks are free for the allocations below.
    sys::sync();

    let run_for = env.duration(STALE_RACE);
    let started = Instant::now();
    let mut round = 0u32;
    let mut ops = [0u64; 4];
    let path = env.mnt.join("stale_race.dat");
    while started.elapsed() < run_for {
        round += 1;
        let file = common::create(&path)?;
        file.set_len(STALE_FILE as u64).ctx("ftruncate")?;
        // Second half: fallocated, i.e. unwritten extents; first half: holes.
        sys::fallocate(&file, (STALE_FILE / 2) as u64, (STALE_FILE / 2) as u64)
            .ctx("fallocate second half")?;
        let map = common::map_pmd_aligned(&file, STALE_FILE, 0)?;
        let slice = (run_for / STALE_ROUNDS_SPLIT).max(Duration::from_secs(1));
        let s = Arc::new(Stale {
            map,
            file,
            clock: Clock::new(slice),
            progress: Progress::new(4),
            bad: Mutex::new(None),
        });
        let threads: Vec<_> = (0..4)
            .map(|role| {
                let s = s.clone();
                let seed = (round as u64) << 8 | role as u64;
                std::thread::spawn(move || stale_worker(s, role, seed))
            })
            .collect();
        let names = ["write-fault", "mmap-read", "read(2)", "write(2)"];
        if let Err(what) =
            common::watch(child, &names, &s.progress, Duration::from_secs(30), || {
                !s.clock.running()
            })
        {
            fail!("{what}");
        }
        for t in threads {
            let _ = t.join();
        }
        for (o, n) in ops.iter_mut().zip(s.progress.snapshot()) {
            *o += n;
        }
        if let Some(bad) = crate::sync::lock(&s.bad).take() {
            fail!("round {round}: {bad}");
        }
        // The whole file, after the race: no 0xA5 anywhere.
        let all = common::read_at(&s.file, 0, STALE_FILE)?;
        if let Some(i) = find_a5(&all) {
            fail!("round {round}: read(2) after the race finds 0xA5 at {i:#x}");
        }
        drop(s);
        std::fs::remove_file(&path).ctx("unlink race file")?;
    }
    child.diag(&format!(
        "{round} files in {:.1} s; ops: write faults {}, mmap page reads {}, read(2) {}, write(2) {}",
        started.elapsed().as_secs_f64(),
        ops[0],
        ops[1],
        ops[2],
        ops[3]
    ));
    if env.stress.is_none() {
        child.diag("race time: 12 s by default; --stress SECS races for SECS seconds");
    }
    Ok(Verdict::Pass)
}

pub const ENOSPC_LIMIT: Duration = Duration::from_secs(300);

/// Bigger than the slack a full ext4 keeps: its reserved clusters (2% or 4096 blocks,
/// 16 MiB here) are free in the bitmap, so once the unlink makes the free count positive
/// again the allocator hands them out first. Only faults beyond them need the unlinked
/// blocks, and so the retry.
const ENOSPC_TARGET: usize = 64 << 20;
const ENOSPC_THREADS: usize = 4;

/// Write-fault holes of `path` from several threads at once; exit 0 if every store
/// returned (a SIGBUS kills the process).
fn fault_holes(path: &Path) -> i32 {
    let Ok(f) = common::open_rw(path) else {
        return 3;
    };
    let Ok(map) = common::map_pmd_aligned(&f, ENOSPC_TARGET, 0) else {
        return 4;
    };
    let map = Arc::new(map);
    let threads: Vec<_> = (0..ENOSPC_THREADS)
        .map(|k| {
            let map = map.clone();
            std::thread::spawn(move || {
                // Each thread: every 4th 2 MiB range, its first page first (a PMD-sized
                // allocation), then every page.
                for range in (k..ENOSPC_TARGET / PMD).step_by(ENOSPC_THREADS) {
                    for page in 0..PMD / PAGE {
                        let off = range * PMD + page * PAGE;
                        map.words()[off / 8].store(word_for(off as u64), Ordering::Release);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        if t.join().is_err() {
            return 5;
        }
    }
    0
}

/// Removes its files when dropped, on every exit path of a case.
struct RemoveOnDrop(Vec<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
        sys::sync();
    }
}

/// Catalogue A5: fill the filesystem (fallocate), unlink the filler without syncing, and
/// at once write-fault holes from several threads: no SIGBUS, because the filesystem
/// must commit the unlink and retry. First, with the filler still there, one write fault
/// must raise SIGBUS (truly full).
pub fn enospc_retry(child: &Child, env: &Env) -> Result<Verdict> {
    let target = env.mnt.join("enospc_target.dat");
    let fill = env.mnt.join("enospc_fill.dat");
    let top = env.mnt.join("enospc_top.dat");
    // Whatever happens below, the fillers must go: a full filesystem would fail every
    // later case of the suite.
    let _cleanup = RemoveOnDrop(vec![fill.clone(), top.clone(), target.clone()]);
    let f = common::create(&target)?;
    f.set_len(ENOSPC_TARGET as u64).ctx("ftruncate target")?;
    f.sync_all().ctx("fsync target")?;
    drop(f);
    // Created while there is room: xfs cannot allocate an inode for it once full.
    drop(common::create(&top)?);

    let t = Instant::now();
    let filled = fill_with_fallocate(&fill, &env.mnt)?;
    let topped = fill_with_writes(&top, 0x5A)?;
    let (free_after, bsize) = free_bytes(&env.mnt)?;
    child.diag(&format!(
        "{} filled: fallocate {} MiB + write(2) {} KiB in {:.1} s; statvfs free now {} blocks of {bsize}",
        env.fs.name(),
        filled >> 20,
        topped >> 10,
        t.elapsed().as_secs_f64(),
        free_after / bsize
    ));

    // Truly full: a write fault on a hole has nowhere to go.
    let full_target = target.clone();
    let full = isolate::probe(Duration::from_secs(60), move || {
        let Ok(f) = common::open_rw(&full_target) else {
            return 3;
        };
        let Ok(map) = common::map_pmd_aligned(&f, ENOSPC_TARGET, 0) else {
            return 4;
        };
        map.words()[0].store(1, Ordering::Release);
        0
    })
    .ctx("fork full-filesystem probe")?;
    let full_ok = matches!(full, End::Done(Exit::Signal(libc::SIGBUS)));
    child.diag(&format!(
        "write fault on a hole of the full filesystem: {} (expected: killed by SIGBUS)",
        full.describe()
    ));
    if let End::Hung { .. } = full {
        fail!("write fault on the full filesystem {}", full.describe());
    }

    // Unlink the fillers, no sync: their blocks are freed in the running transaction
    // and cannot be reused until it commits.
    std::fs::remove_file(&fill).ctx("unlink filler")?;
    std::fs::remove_file(&top).ctx("unlink top-up")?;
    let (free_unlinked, _) = free_bytes(&env.mnt)?;
    let t = Instant::now();
    let retry_target = target.clone();
    // A journal commit during the faults is the trace of the retry (ext4 forces one to
    // free the blocks the unlink released); informational.
    let commits = crate::trace::Trace::start(&["jbd2/jbd2_start_commit"]);
    let after = isolate::probe(Duration::from_secs(120), move || fault_holes(&retry_target))
        .ctx("fork fault probe")?;
    let commits = commits.and_then(|c| c.finish()).map(|lines| lines.len());
    match &commits {
        Ok(n) => child.diag(&format!(
            "journal commits started while the faults ran: {n} (jbd2_start_commit)"
        )),
        Err(e) => child.diag(&format!("jbd2 tracepoint unavailable: {e}")),
    }
    child.diag(&format!(
        "{} threads write-faulting all {} pages of a {} MiB hole right after the unlink (statvfs free {} MiB): {} in {:.1} s",
        ENOSPC_THREADS,
        ENOSPC_TARGET / PAGE,
        ENOSPC_TARGET >> 20,
        free_unlinked >> 20,
        after.describe(),
        t.elapsed().as_secs_f64()
    ));
    match after {
        End::Done(Exit::Code(0)) => {}
        End::Done(Exit::Signal(libc::SIGBUS)) => {
            fail!("SIGBUS from a write fault after the filler was unlinked: no ENOSPC retry")
        }
        other => fail!("write faults after the unlink: {}", other.describe()),
    }
    // Every store must be in the file.
    let f = common::open_rw(&target)?;
    let all = common::read_at(&f, 0, ENOSPC_TARGET)?;
    for off in (0..ENOSPC_TARGET).step_by(PAGE) {
        let got = u64::from_le_bytes(all[off..off + 8].try_into().unwrap_or_default());
        if got != word_for(off as u64) {
            fail!("store at {off:#x} not in the file: read(2) gives {got:#x}");
        }
    }
    drop(f);
    // ext4 forces a journal commit when a fault's allocation fails while freed blocks
    // are pending (ext4_should_retry_alloc); none means the faults never needed the
    // unlinked blocks and the retry path went untested.
    if env.fs == crate::args::FsType::Ext4 && commits == Ok(0) {
        fail!("no journal commit while the faults ran: they never needed the unlinked blocks, the ENOSPC retry was not exercised");
    }
    if !full_ok {
        fail!(
            "a write fault on a truly full filesystem did not raise SIGBUS ({})",
            full.describe()
        );
    }
    Ok(Verdict::Pass)
}
