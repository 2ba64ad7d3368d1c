//! Catalogue C9 and C10: truncate and punch-hole against faults. Touching a page past
//! EOF must raise SIGBUS (and nothing else may); a punched hole reads as zeros and can be
//! written again; and faults racing truncate must neither hang nor show stale data.

use std::cell::Cell;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::common::{self, word_for};
use super::fs_state::{catalogue_setup, NEEDS_DAX};
use super::suites::SuiteDef;
use super::{dio, Ctx, Env, Verdict};
use crate::error::{fail, Context, Result};
use crate::fiemap;
use crate::isolate::{self, Child, End, Exit, Proc};
use crate::pattern::XorShift64;
use crate::sys::{self, Mapping, PAGE, PMD};

pub const SIGBUS_LIMIT: Duration = Duration::from_secs(180);

/// Exit status of a probe whose read returned the wrong byte.
const WRONG_DATA: i32 = 10;
/// Exit status of a probe that could not set up (open, mmap, truncate).
const SETUP: i32 = 3;

#[derive(Clone, Copy)]
enum Access {
    /// Read one byte; it must equal the given value.
    Read(u8),
    Write,
}

fn touch(map: &Mapping, off: usize, access: Access) -> i32 {
    let b = &map.atomic_bytes()[off];
    match access {
        Access::Read(want) => {
            if b.load(Ordering::Acquire) == want {
                0
            } else {
                WRONG_DATA
            }
        }
        Access::Write => {
            b.store(0xEE, Ordering::Release);
            0
        }
    }
}

/// In a child: map `map_len` bytes of `path` (2 MiB-aligned), fault every page in
/// (reads), optionally ftruncate to `cut`, then do `access` at `off`.
fn probe(path: &Path, map_len: usize, cut: Option<u64>, off: usize, access: Access) -> Result<End> {
    let path = path.to_path_buf();
    isolate::probe(Duration::from_secs(60), move || {
        let Ok(f) = common::open_rw(&path) else {
            return SETUP;
        };
        let Ok(map) = common::map_pmd_aligned(&f, map_len, 0) else {
            return SETUP;
        };
        if let Some(size) = cut {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0) as usize;
            for page in (0..len.min(map_len)).step_by(PAGE) {
                std::hint::black_box(map.atomic_bytes()[page].load(Ordering::Relaxed));
            }
            if f.set_len(size).is_err() {
                return SETUP;
            }
        }
        touch(&map, off, access)
    })
    .ctx("fork probe")
}

/// Records each probe's expectation and outcome.
#[derive(Default)]
struct Tally {
    seen: Vec<String>,
    wrong: Vec<String>,
}

impl Tally {
    fn expect(&mut self, what: &str, end: End, sigbus: bool) {
        let got = match &end {
            End::Done(Exit::Code(0)) => "ok".to_string(),
            End::Done(Exit::Code(WRONG_DATA)) => "wrong data".to_string(),
            e => e.describe(),
        };
        let ok = match end {
            End::Done(Exit::Signal(libc::SIGBUS)) => sigbus,
            End::Done(Exit::Code(0)) => !sigbus,
            _ => false,
        };
        let want = if sigbus { "SIGBUS" } else { "ok" };
        self.seen.push(format!("{what}: {got} (want {want})"));
        if !ok {
            self.wrong.push(format!("{what}: {got}, want {want}"));
        }
    }
}

fn fill_file(path: &Path, len: usize, byte: u8) -> Result<File> {
    let f = common::create(path)?;
    f.write_all_at(&vec![byte; len], 0).ctx("write file")?;
    f.sync_all().ctx("fsync")?;
    Ok(f)
}

/// Whether [off, off+len) of the file has any extent (FIEMAP).
fn allocated(f: &File, off: u64, len: u64) -> Result<bool> {
    let ext = fiemap::extents(f).ctx("FIEMAP")?;
    Ok(ext
        .iter()
        .any(|e| e.logical < off + len && off < e.logical + e.length))
}

/// Catalogue C9.
pub fn sigbus_rules(child: &Child, env: &Env) -> Result<Verdict> {
    let path = env.mnt.join("sigbus.dat");
    let mut t = Tally::default();

    // Past EOF, 4 KiB pages: a file of 2 pages + 100 bytes, mapped as 4 pages.
    fill_file(&path, 2 * PAGE + 100, 0x33)?;
    t.expect(
        "read page 3 of a 2-page+100-byte file",
        probe(&path, 4 * PAGE, None, 3 * PAGE, Access::Read(0))?,
        true,
    );
    t.expect(
        "write page 3 of a 2-page+100-byte file",
        probe(&path, 4 * PAGE, None, 3 * PAGE + 8, Access::Write)?,
        true,
    );
    t.expect(
        "read past EOF inside the EOF page (zero)",
        probe(&path, 4 * PAGE, None, 2 * PAGE + 200, Access::Read(0))?,
        false,
    );
    t.expect(
        "read before EOF",
        probe(&path, 4 * PAGE, None, PAGE + 5, Access::Read(0x33))?,
        false,
    );

    // Pages cut off by a truncate, after they were faulted in (PTE).
    fill_file(&path, 4 * PAGE, 0x44)?;
    t.expect(
        "read page 2 after truncate to 1 page",
        probe(
            &path,
            4 * PAGE,
            Some(PAGE as u64),
            2 * PAGE,
            Access::Read(0),
        )?,
        true,
    );
    fill_file(&path, 4 * PAGE, 0x44)?;
    t.expect(
        "write page 3 after truncate to 1 page",
        probe(&path, 4 * PAGE, Some(PAGE as u64), 3 * PAGE, Access::Write)?,
        true,
    );
    fill_file(&path, 4 * PAGE, 0x44)?;
    t.expect(
        "read page 0 after truncate to 1 page",
        probe(&path, 4 * PAGE, Some(PAGE as u64), 10, Access::Read(0x44))?,
        false,
    );

    // The same inside a 4 MiB mapping whose first 2 MiB may be a PMD: cut at 2 MiB + 4 KiB.
    let cut = (PMD + PAGE) as u64;
    for (what, off, access, sigbus) in [
        (
            "read at 3 MiB after truncate of a 4 MiB mapping to 2 MiB+4 KiB",
            3 * PMD / 2,
            Access::Read(0),
            true,
        ),
        (
            "write at 2 MiB+8 KiB after the same truncate",
            PMD + 2 * PAGE,
            Access::Write,
            true,
        ),
        (
            "read at 2 MiB+100 (inside EOF) after the same truncate",
            PMD + 100,
            Access::Read(0x55),
            false,
        ),
        (
            "read at 1 MiB (PMD range before EOF) after the same truncate",
            PMD / 2,
            Access::Read(0x55),
            false,
        ),
    ] {
        fill_file(&path, 2 * PMD, 0x55)?;
        t.expect(what, probe(&path, 2 * PMD, Some(cut), off, access)?, sigbus);
    }

    // Punched holes read as zeros, and writing allocates again (4 KiB and 2 MiB).
    let f = fill_file(&path, 2 * PMD, 0x66)?;
    let map = common::map_pmd_aligned(&f, 2 * PMD, 0)?;
    for (off, len) in [(PAGE, PAGE), (PMD, PMD)] {
        // Fault the range in first, so the punch has mappings to zap.
        std::hint::black_box(map.atomic_bytes()[off].load(Ordering::Relaxed));
        sys::fallocate_mode(&f, sys::FALLOC_PUNCH_HOLE, off as u64, len as u64)
            .ctx(format!("punch {len} at {off}"))?;
        if allocated(&f, off as u64, len as u64)? {
            child.diag(&format!(
                "FIEMAP still shows an extent in the punched range {off:#x}+{len:#x}"
            ));
        }
        let via_map = map.atomic_bytes()[off..off + len]
            .iter()
            .position(|b| b.load(Ordering::Acquire) != 0);
        let via_read = common::read_at(&f, off as u64, len)?
            .iter()
            .position(|&b| b != 0);
        if via_map.is_some() || via_read.is_some() {
            t.wrong.push(format!(
                "punched hole at {off:#x}+{len:#x} not zero: mapping at {via_map:?}, read(2) at {via_read:?}"
            ));
        }
        map.atomic_bytes()[off + 64].store(0x67, Ordering::Release);
        if !allocated(&f, off as u64, len as u64)? {
            t.wrong.push(format!(
                "store into the punched hole at {off:#x} allocated no extent"
            ));
        }
        if common::read_at(&f, (off + 64) as u64, 1)?[0] != 0x67 {
            t.wrong.push(format!(
                "store into the punched hole at {off:#x} not seen by read(2)"
            ));
        }
        t.seen.push(format!(
            "punch {len:#x} at {off:#x}: zeros, then a store allocated it again"
        ));
    }
    drop(map);

    // Truncate into the middle of a block, then extend: the new range reads as zeros,
    // through a mapping made before the truncate and through read(2).
    let f = fill_file(&path, 4 * PAGE, 0x77)?;
    let map = common::map_pmd_aligned(&f, 4 * PAGE, 0)?;
    std::hint::black_box(map.atomic_bytes()[3 * PAGE].load(Ordering::Relaxed));
    f.set_len((PAGE + 100) as u64)
        .ctx("truncate to 1 page + 100")?;
    f.set_len((4 * PAGE) as u64).ctx("extend to 4 pages")?;
    let mut want = vec![0u8; 4 * PAGE];
    want[..PAGE + 100].fill(0x77);
    let got_read = common::read_at(&f, 0, 4 * PAGE)?;
    let got_map: Vec<u8> = map
        .atomic_bytes()
        .iter()
        .map(|b| b.load(Ordering::Acquire))
        .collect();
    for (how, got) in [("read(2)", &got_read), ("the old mapping", &got_map)] {
        if let Some(at) = crate::pattern::first_difference(got, &want) {
            t.wrong.push(format!(
                "after truncate to {} and extend to {}: {how} gives {:#04x} at {at}, want {:#04x}",
                PAGE + 100,
                4 * PAGE,
                got[at],
                want[at]
            ));
        }
    }
    t.seen.push(
        "truncate to 1 page+100 bytes, extend to 4 pages: tail zero (read(2) and old mapping)"
            .into(),
    );
    drop(map);
    drop(f);
    let _ = std::fs::remove_file(&path);

    child.diag(&t.seen.join("\n"));
    if !t.wrong.is_empty() {
        fail!("{}", t.wrong.join("; "));
    }
    Ok(Verdict::Pass)
}

// ---- C10 -------------------------------------------------------------------------------

const RACE_DEFAULT: Duration = Duration::from_secs(15);
const RACE_LEN: usize = 2 * PMD;
const WORKERS: usize = 3;
const THREADS_PER_WORKER: usize = 2;
/// Exit status of a worker whose SIGBUS handler could not recover (it records first).
const SIGBUS_EXIT: i32 = 77;

pub fn race_limit(env: &Env) -> Duration {
    env.duration(RACE_DEFAULT) + Duration::from_secs(120)
}

/// Slots of the shared page (u64 each).
mod slot {
    pub const STOP: usize = 0;
    /// Odd while the file may be shorter than RACE_LEN (between a shrink and the regrow).
    pub const EPOCH: usize = 1;
    pub const SIGBUS_PAST_EOF: usize = 2;
    pub const SIGBUS_INSIDE: usize = 3;
    pub const SIGBUS_INSIDE_OFF: usize = 4;
    pub const BAD_DATA: usize = 5;
    pub const BAD_OFF: usize = 6;
    pub const BAD_VALUE: usize = 7;
    pub const TRUNCATOR_OPS: usize = 8;
    pub const TRUNCATOR_ERRNO: usize = 9;
    pub const READS: usize = 10;
    pub const WRITES: usize = 11;
    pub const SWEEPS: usize = 12;
    pub const DONTNEED: usize = 13;
    /// Per worker thread progress from here on.
    pub const THREAD_OPS: usize = 16;
}

/// The shared page, the mapping and its file, and per thread the epoch at the start of
/// its current access and the pages the SIGBUS handler patched: what a worker's SIGBUS
/// handler needs.
static SHARED: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());
static MAP_BASE: AtomicUsize = AtomicUsize::new(0);
static MAP_FD: AtomicI32 = AtomicI32::new(-1);
thread_local! {
    // Const-initialised and without destructors: a signal handler may read and write
    // them (plain TLS accesses).
    static START_EPOCH: Cell<u64> = const { Cell::new(0) };
    /// Lowest and one-past-highest address patched by the handler (0, 0: none).
    static PATCH_LO: Cell<usize> = const { Cell::new(0) };
    static PATCH_HI: Cell<usize> = const { Cell::new(0) };
}

fn shared_slot(i: usize) -> Option<&'static AtomicU64> {
    let p = SHARED.load(Ordering::Acquire);
    if p.is_null() {
        return None;
    }
    // SAFETY: SHARED points at the shared page (4096 bytes, 512 slots), which stays
    // mapped for the life of the worker process; i < 512 at every call site.
    Some(unsafe { &*p.add(i) })
}

/// SIGBUS in a worker: legitimate if the file was (or became) short during the access.
/// Record which, put an anonymous zero page over the faulting page so the access can
/// complete (reading 0, which the data check accepts), and return; the thread maps the
/// file back after its operation (`restore_patches`).
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _uc: *mut libc::c_void) {
    let e0 = START_EPOCH.with(|c| c.get());
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let base = MAP_BASE.load(Ordering::Relaxed);
    if let (Some(epoch), Some(past), Some(inside), Some(inside_off)) = (
        shared_slot(slot::EPOCH),
        shared_slot(slot::SIGBUS_PAST_EOF),
        shared_slot(slot::SIGBUS_INSIDE),
        shared_slot(slot::SIGBUS_INSIDE_OFF),
    ) {
        let e1 = epoch.load(Ordering::SeqCst);
        if e0 % 2 == 1 || e1 != e0 {
            past.fetch_add(1, Ordering::SeqCst);
        } else {
            inside.fetch_add(1, Ordering::SeqCst);
            inside_off.store(addr.wrapping_sub(base) as u64, Ordering::SeqCst);
        }
    }
    let page = addr & !(PAGE - 1);
    if base == 0 || page < base || page >= base + RACE_LEN {
        // Not our mapping: nothing sane to do.
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(SIGBUS_EXIT) }
    }
    // Everything from the faulting page to the end of the mapping is past EOF too (EOF
    // is one point): patch it all at once, so a 2 MiB sweep costs one SIGBUS, not 512.
    let end = base + RACE_LEN;
    // SAFETY: [page, end) lies inside the worker's own file mapping (checked above),
    // which no Rust object owns byte-wise (only atomics view it); MAP_FIXED swaps its
    // backing for anonymous zeros and the atomics stay valid. mmap is a plain syscall.
    let r = unsafe {
        libc::mmap(
            page as *mut libc::c_void,
            end - page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if r == libc::MAP_FAILED {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(SIGBUS_EXIT) }
    }
    PATCH_LO.with(|lo| {
        if lo.get() == 0 || page < lo.get() {
            lo.set(page);
        }
    });
    PATCH_HI.with(|hi| hi.set(end));
}

/// Map the file back over pages the SIGBUS handler patched during the last operation.
fn restore_patches() -> bool {
    let (lo, hi) = (PATCH_LO.with(|c| c.get()), PATCH_HI.with(|c| c.get()));
    if lo == 0 {
        return true;
    }
    PATCH_LO.with(|c| c.set(0));
    PATCH_HI.with(|c| c.set(0));
    let base = MAP_BASE.load(Ordering::Relaxed);
    // SAFETY: [lo, hi) lies inside the worker's file mapping (the handler checked each
    // page); it is mapped again to the same file at the matching offset.
    let r = unsafe {
        libc::mmap(
            lo as *mut libc::c_void,
            hi - lo,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            MAP_FD.load(Ordering::Relaxed),
            (lo - base) as libc::off_t,
        )
    };
    r != libc::MAP_FAILED
}

fn install_sigbus_handler() {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler only touches
    // atomics and const thread-locals and calls mmap and _exit, plain syscalls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

fn worker_thread(map: &Mapping, shared: &Mapping, index: usize, seed: u64) {
    let s = shared.words();
    let w = map.words();
    let mut rng = XorShift64::new(seed);
    let check = |off: usize, v: u64| {
        if v != 0 && v != word_for(off as u64) {
            s[slot::BAD_DATA].fetch_add(1, Ordering::SeqCst);
            s[slot::BAD_OFF].store(off as u64, Ordering::SeqCst);
            s[slot::BAD_VALUE].store(v, Ordering::SeqCst);
        }
    };
    while s[slot::STOP].load(Ordering::Relaxed) == 0 {
        START_EPOCH.with(|c| c.set(s[slot::EPOCH].load(Ordering::SeqCst)));
        let off = rng.below((RACE_LEN / 8) as u64) as usize * 8;
        match rng.below(8) {
            0..=2 => {
                check(off, w[off / 8].load(Ordering::Acquire));
                s[slot::READS].fetch_add(1, Ordering::Relaxed);
            }
            3..=4 => {
                w[off / 8].store(word_for(off as u64), Ordering::Release);
                s[slot::WRITES].fetch_add(1, Ordering::Relaxed);
            }
            5..=6 => {
                // One word in each page of a 2 MiB range: PMD-sized coverage.
                let base = (off / PMD) * PMD;
                let write = rng.below(2) == 0;
                for page in 0..PMD / PAGE {
                    let o = base + page * PAGE + 8 * (page % 8);
                    if write {
                        w[o / 8].store(word_for(o as u64), Ordering::Release);
                    } else {
                        check(o, w[o / 8].load(Ordering::Acquire));
                    }
                }
                s[slot::SWEEPS].fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                let (at, len) = if rng.below(2) == 0 {
                    ((off / PAGE) * PAGE, PAGE)
                } else {
                    ((off / PMD) * PMD, PMD)
                };
                let _ = map.advise(at, len, libc::MADV_DONTNEED);
                s[slot::DONTNEED].fetch_add(1, Ordering::Relaxed);
            }
        }
        if !restore_patches() {
            // Without the file behind the page this thread would test nothing.
            // SAFETY: _exit ends the worker; the monitor starts a new one.
            unsafe { libc::_exit(SIGBUS_EXIT) }
        }
        s[slot::THREAD_OPS + index].fetch_add(1, Ordering::Relaxed);
    }
}

/// A worker process: its own file descriptor and mapping, two faulting threads.
fn worker(path: &Path, shared: &Mapping, w: usize, generation: u64) -> i32 {
    let Ok(f) = common::open_rw(path) else {
        return SETUP;
    };
    let Ok(map) = common::map_pmd_aligned(&f, RACE_LEN, 0) else {
        return SETUP;
    };
    SHARED.store(shared.words().as_ptr() as *mut AtomicU64, Ordering::Release);
    MAP_BASE.store(map.addr(), Ordering::Release);
    MAP_FD.store(f.as_raw_fd(), Ordering::Release);
    install_sigbus_handler();
    std::thread::scope(|sc| {
        for t in 0..THREADS_PER_WORKER {
            let (map, shared) = (&map, shared);
            sc.spawn(move || {
                worker_thread(
                    map,
                    shared,
                    w * THREADS_PER_WORKER + t,
                    generation << 8 | (w * 4 + t) as u64,
                )
            });
        }
    });
    0
}

/// The truncator process: the only one that changes the file's size.
fn truncator(path: &Path, shared: &Mapping) -> i32 {
    let s = shared.words();
    let Ok(f) = common::open_rw(path) else {
        return SETUP;
    };
    let mut rng = XorShift64::new(0x7C);
    let fail = |e: std::io::Error| {
        s[slot::TRUNCATOR_ERRNO].store(e.raw_os_error().unwrap_or(-1) as u64, Ordering::SeqCst);
        2
    };
    while s[slot::STOP].load(Ordering::Relaxed) == 0 {
        let r = match rng.below(5) {
            0 | 1 => {
                // Shrink and regrow; the epoch is odd in between.
                s[slot::EPOCH].fetch_add(1, Ordering::SeqCst);
                let small = if rng.below(2) == 0 {
                    0
                } else {
                    rng.below(RACE_LEN as u64)
                };
                let r = f.set_len(small).and_then(|_| {
                    if rng.below(2) == 0 {
                        f.set_len(RACE_LEN as u64)
                    } else {
                        sys::fallocate(&f, 0, RACE_LEN as u64)
                    }
                });
                s[slot::EPOCH].fetch_add(1, Ordering::SeqCst);
                r
            }
            2 | 3 => {
                let page = rng.below((RACE_LEN / PAGE) as u64) * PAGE as u64;
                sys::fallocate_mode(&f, sys::FALLOC_PUNCH_HOLE, page, PAGE as u64)
            }
            _ => {
                let at = rng.below((RACE_LEN / PMD) as u64) * PMD as u64;
                sys::fallocate_mode(&f, sys::FALLOC_PUNCH_HOLE, at, PMD as u64)
            }
        };
        if let Err(e) = r {
            return fail(e);
        }
        s[slot::TRUNCATOR_OPS].fetch_add(1, Ordering::Relaxed);
    }
    0
}

/// Catalogue C10: worker processes (2 threads each) read, write, sweep 2 MiB ranges and
/// MADV_DONTNEED a 4 MiB 2 MiB-aligned shared mapping while a truncator process loops
/// ftruncate 0 <-> 4 MiB (and to random sizes), 4 KiB and 2 MiB punch-holes, for a
/// bounded time. No hang, no kernel warning (checked around every case), SIGBUS only
/// while the file was short, and every word read is 0 or the word written there.
pub fn truncate_fault_race(child: &Child, env: &Env) -> Result<Verdict> {
    let path = env.mnt.join("truncate_race.dat");
    let f = common::create(&path)?;
    sys::fallocate(&f, 0, RACE_LEN as u64).ctx("fallocate 4 MiB")?;
    drop(f);
    let shared = Mapping::shared_anonymous(PAGE).ctx("shared page")?;
    let s = shared.words();
    let run_for = env.duration(RACE_DEFAULT);
    let started = Instant::now();

    let spawn_worker = |w: usize, generation: u64| -> Result<Proc> {
        let (path, shared) = (&path, &shared);
        isolate::spawn(|| worker(path, shared, w, generation)).ctx("fork worker")
    };
    let mut trunc = isolate::spawn(|| truncator(&path, &shared)).ctx("fork truncator")?;
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        workers.push(spawn_worker(w, 0)?);
    }
    let mut respawns = 0u64;
    let mut odd_exits: Vec<String> = Vec::new();
    let progress = |s: &[AtomicU64]| -> Vec<u64> {
        let mut v = vec![s[slot::TRUNCATOR_OPS].load(Ordering::Relaxed)];
        // A worker's progress is the sum of its threads (a respawned worker restarts them).
        for w in 0..WORKERS {
            v.push(
                (0..THREADS_PER_WORKER)
                    .map(|t| {
                        s[slot::THREAD_OPS + w * THREADS_PER_WORKER + t].load(Ordering::Relaxed)
                    })
                    .sum(),
            );
        }
        v
    };
    let mut last = progress(s);
    let mut last_change = vec![Instant::now(); last.len()];
    const STALL: Duration = Duration::from_secs(30);
    while started.elapsed() < run_for {
        std::thread::sleep(Duration::from_millis(50));
        for (w, p) in workers.iter_mut().enumerate() {
            if let Some(exit) = p.try_wait() {
                if exit != Exit::Code(SIGBUS_EXIT) {
                    odd_exits.push(format!("worker {w}: {}", End::Done(exit).describe()));
                }
                respawns += 1;
                *p = spawn_worker(w, respawns)?;
            }
        }
        if let Some(exit) = trunc.try_wait() {
            fail!(
                "truncator ended early: {} (errno {})",
                End::Done(exit).describe(),
                s[slot::TRUNCATOR_ERRNO].load(Ordering::SeqCst)
            );
        }
        let now = progress(s);
        for i in 0..now.len() {
            if now[i] != last[i] {
                last[i] = now[i];
                last_change[i] = Instant::now();
            } else if last_change[i].elapsed() > STALL {
                let who = if i == 0 {
                    "truncator".to_string()
                } else {
                    format!("worker {}", i - 1)
                };
                let what = format!(
                    "{who} made no progress for {}s (ops {now:?})",
                    STALL.as_secs()
                );
                child.hung(&what);
                fail!("{what}");
            }
        }
    }
    s[slot::STOP].store(1, Ordering::SeqCst);
    for (i, p) in std::iter::once(&mut trunc)
        .chain(workers.iter_mut())
        .enumerate()
    {
        match p.wait(Duration::from_secs(30) + started.elapsed()) {
            End::Done(Exit::Code(0)) | End::Done(Exit::Code(SIGBUS_EXIT)) => {}
            end @ End::Hung { .. } => {
                let what = format!(
                    "{} did not stop: {}",
                    if i == 0 { "truncator" } else { "a worker" },
                    end.describe()
                );
                child.hung(&what);
                fail!("{what}");
            }
            end => odd_exits.push(format!("at stop: {}", end.describe())),
        }
    }
    let get = |i: usize| s[i].load(Ordering::SeqCst);
    child.diag(&format!(
        "{:.1} s: truncator ops {} (shrink+regrow cycles {}), reads {}, writes {}, 2 MiB sweeps {}, MADV_DONTNEED {}; \
         SIGBUS while short {} (recovered in the handler; workers restarted {respawns})",
        started.elapsed().as_secs_f64(),
        get(slot::TRUNCATOR_OPS),
        get(slot::EPOCH) / 2,
        get(slot::READS),
        get(slot::WRITES),
        get(slot::SWEEPS),
        get(slot::DONTNEED),
        get(slot::SIGBUS_PAST_EOF),
    ));
    if env.stress.is_none() {
        child.diag("race time: 15 s by default; --stress SECS races for SECS seconds");
    }
    let _ = std::fs::remove_file(&path);
    let mut wrong = Vec::new();
    if get(slot::SIGBUS_INSIDE) > 0 {
        wrong.push(format!(
            "{} SIGBUS while the file was 4 MiB long (last at mapping offset {:#x})",
            get(slot::SIGBUS_INSIDE),
            get(slot::SIGBUS_INSIDE_OFF)
        ));
    }
    if get(slot::BAD_DATA) > 0 {
        wrong.push(format!(
            "{} reads were neither 0 nor the word written (last: {:#x} at {:#x})",
            get(slot::BAD_DATA),
            get(slot::BAD_VALUE),
            get(slot::BAD_OFF)
        ));
    }
    wrong.extend(odd_exits);
    if !wrong.is_empty() {
        fail!("{}", wrong.join("; "));
    }
    Ok(Verdict::Pass)
}

pub const SUITE: SuiteDef = SuiteDef {
    name: "truncate",
    help: &["catalogue C: sigbus_rules, truncate_fault_race, dio_collision"],
    run: suite,
};

/// Catalogue C.
fn suite(ctx: &mut Ctx) {
    catalogue_setup(ctx);
    ctx.case_isolated("sigbus_rules", NEEDS_DAX, SIGBUS_LIMIT, sigbus_rules);
    let limit = race_limit(&ctx.env());
    ctx.case_isolated("truncate_fault_race", NEEDS_DAX, limit, truncate_fault_race);
    let limit = dio::collision_limit(&ctx.env());
    ctx.case_isolated("dio_collision", NEEDS_DAX, limit, dio::dio_collision);
}
