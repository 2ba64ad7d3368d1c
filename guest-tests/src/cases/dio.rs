//! Catalogue A6 and C11: a DAX mapping as the user buffer of other I/O. Two paths matter:
//! - O_DIRECT on a DAX file: the filesystem copies to or from the buffer (copy_to_user),
//!   faulting the DAX mapping like any store;
//! - O_DIRECT on a block device: the block layer pins the DAX pages (get_user_pages) and
//!   the driver copies into them while the bio is in flight. That is the path where a
//!   truncate of the buffer's file must wait for the pins (fstests generic/503, the
//!   "DAX-gup" thread).
//!
//! The only block device here is /dev/pmem0 itself, mounted. The block-device half
//! therefore reads and writes the device at the physical location of a file the case
//! owns (found with FIEMAP, after fsync, with every extent written): the filesystem's
//! metadata is never touched, and read(2) of that file (DAX: no page cache) shows what
//! the raw I/O did.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::common::{self, Clock, Progress};
use super::{Env, Verdict};
use crate::error::{describe, fail, Context, Result};
use crate::fiemap::{self, Segment};
use crate::isolate::Child;
use crate::pattern::{self, XorShift64};
use crate::sys::{self, Mapping, PAGE, PMD};

pub const DIO_MMAP_LIMIT: Duration = Duration::from_secs(180);
const LEN: usize = 1 << 20;

/// Write `data` to a fresh file and make its extents plain written data on the device.
fn written_file(path: &Path, data: &[u8]) -> Result<File> {
    let f = common::create(path)?;
    f.write_all_at(data, 0)
        .ctx(format!("write {}", path.display()))?;
    f.sync_all().ctx(format!("fsync {}", path.display()))?;
    Ok(f)
}

/// Where `file`'s first `len` bytes lie on the device.
fn device_segments(file: &File, len: usize) -> Result<Vec<Segment>> {
    let ext = fiemap::extents(file).ctx("FIEMAP")?;
    fiemap::segments(&ext, len as u64).map_err(crate::error::Error::Failed)
}

/// The device offset of file offset `off`, for a range that stays inside one segment.
fn dev_offset(segs: &[Segment], off: u64, len: u64) -> Option<u64> {
    segs.iter()
        .find(|s| off >= s.file_offset && off + len <= s.file_offset + s.len)
        .map(|s| s.dev_offset + (off - s.file_offset))
}

fn expect_len(what: &str, r: std::io::Result<usize>, want: usize) -> Result<()> {
    match r {
        Ok(n) if n == want => Ok(()),
        Ok(n) => fail!("{what}: transferred {n} of {want} bytes"),
        Err(e) => fail!("{what}: {}", describe(&e)),
    }
}

/// Catalogue A6 (fstests generic/413 and 462): a DAX mapping as the buffer of O_DIRECT
/// and buffered I/O to and from another file, both ways; then a read-only DAX mapping as
/// an O_DIRECT destination, which must fail and leave its file unchanged.
pub fn dio_mmap_buffers(child: &Child, env: &Env) -> Result<Verdict> {
    let px = pattern::seeded(0xD10_0001, LEN);
    let py = pattern::seeded(0xD10_0002, LEN);
    let pz = pattern::seeded(0xD10_0003, LEN);
    let xp = env.mnt.join("dio_x.dat");
    let yp = env.mnt.join("dio_y.dat");
    let x = written_file(&xp, &px)?;
    let y = written_file(&yp, &py)?;
    let mx = common::map_pmd_aligned(&x, LEN, 0)?;
    let y_direct = sys::open_direct(&yp, true).ctx("open dio_y.dat O_DIRECT")?;

    // 1. DAX buffer -> O_DIRECT write into a DAX file.
    expect_len(
        "O_DIRECT pwrite from the mapping",
        mx.pwrite_from(&y_direct, 0, LEN, 0),
        LEN,
    )?;
    common::compare(
        "dio_y.dat after O_DIRECT write from the mapping",
        &common::read_at(&y, 0, LEN)?,
        &px,
    )?;
    // 2. O_DIRECT read from a DAX file -> DAX buffer.
    y.write_all_at(&py, 0).ctx("rewrite dio_y.dat")?;
    expect_len(
        "O_DIRECT pread into the mapping",
        mx.pread_into(&y_direct, 0, LEN, 0),
        LEN,
    )?;
    common::compare(
        "dio_x.dat after O_DIRECT read into its mapping",
        &common::read_at(&x, 0, LEN)?,
        &py,
    )?;
    child.diag("O_DIRECT on a DAX file, both ways through the DAX mapping: data matches");

    // 3. Buffered I/O to a non-DAX file (tmpfs), both ways.
    x.write_all_at(&px, 0).ctx("rewrite dio_x.dat")?;
    let tp = Path::new("/dev/shm/pmem-dio-buffered.dat");
    let t = common::create(tp)?;
    expect_len(
        "buffered pwrite from the mapping to tmpfs",
        mx.pwrite_from(&t, 0, LEN, 0),
        LEN,
    )?;
    common::compare(
        "tmpfs file written from the mapping",
        &common::read_at(&t, 0, LEN)?,
        &px,
    )?;
    t.write_all_at(&pz, 0).ctx("rewrite tmpfs file")?;
    expect_len(
        "buffered pread from tmpfs into the mapping",
        mx.pread_into(&t, 0, LEN, 0),
        LEN,
    )?;
    common::compare(
        "dio_x.dat after buffered read into its mapping",
        &common::read_at(&x, 0, LEN)?,
        &pz,
    )?;
    child.diag("buffered I/O to and from tmpfs through the DAX mapping: data matches");

    // 4. Block-layer O_DIRECT (pins the DAX pages), at dio_y.dat's blocks.
    x.write_all_at(&px, 0).ctx("rewrite dio_x.dat")?;
    y.write_all_at(&py, 0).ctx("rewrite dio_y.dat")?;
    y.sync_all().ctx("fsync dio_y.dat")?;
    let segs = device_segments(&y, LEN)?;
    let dev = sys::open_direct(&env.dev, true)
        .ctx(format!("open {} O_DIRECT read-write", env.dev.display()))?;
    for s in &segs {
        expect_len(
            "O_DIRECT pwrite to the block device from the mapping",
            mx.pwrite_from(&dev, s.file_offset as usize, s.len as usize, s.dev_offset),
            s.len as usize,
        )?;
    }
    common::compare(
        "dio_y.dat after block-device O_DIRECT write from the mapping",
        &common::read_at(&y, 0, LEN)?,
        &px,
    )?;
    y.write_all_at(&py, 0).ctx("rewrite dio_y.dat")?;
    y.sync_all().ctx("fsync dio_y.dat")?;
    if device_segments(&y, LEN)? != segs {
        fail!("dio_y.dat moved on the device after an in-place rewrite");
    }
    for s in &segs {
        expect_len(
            "O_DIRECT pread from the block device into the mapping",
            mx.pread_into(&dev, s.file_offset as usize, s.len as usize, s.dev_offset),
            s.len as usize,
        )?;
    }
    common::compare(
        "dio_x.dat after block-device O_DIRECT read into its mapping",
        &common::read_at(&x, 0, LEN)?,
        &py,
    )?;
    child.diag(&format!(
        "O_DIRECT on {} (pinned DAX pages), both ways, {} extent(s) of dio_y.dat: data matches",
        env.dev.display(),
        segs.len()
    ));
    drop(mx);

    // 5. A read-only DAX mapping as the destination: EFAULT, file unchanged. Once before
    // the mapping is faulted, once after.
    x.write_all_at(&px, 0).ctx("rewrite dio_x.dat")?;
    x.sync_all().ctx("fsync dio_x.dat")?;
    let ro = Mapping::new_aligned(&x, LEN, sys::PROT_READ, sys::MAP_SHARED, 0, PMD, 0)
        .ctx("mmap dio_x.dat read-only")?;
    let mut results = Vec::new();
    for faulted in [false, true] {
        if faulted {
            let sum: u64 = ro
                .words()
                .iter()
                .step_by(512)
                .map(|w| w.load(Ordering::Relaxed))
                .sum();
            std::hint::black_box(sum);
        }
        let s0 = segs[0];
        let tries: [(&str, std::io::Result<usize>); 3] = [
            (
                "O_DIRECT pread from a DAX file",
                ro.pread_into(&y_direct, 0, LEN, 0),
            ),
            (
                "O_DIRECT pread from the block device",
                ro.pread_into(&dev, 0, s0.len.min(LEN as u64) as usize, s0.dev_offset),
            ),
            ("buffered pread from tmpfs", ro.pread_into(&t, 0, LEN, 0)),
        ];
        for (what, r) in tries {
            let when = if faulted { "faulted" } else { "unfaulted" };
            match r {
                Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                    results.push(format!("{what} into a read-only {when} mapping: EFAULT"));
                }
                Err(e) => fail!(
                    "{what} into a read-only {when} mapping: {}, want EFAULT",
                    describe(&e)
                ),
                Ok(n) => fail!(
                    "{what} into a read-only {when} mapping transferred {n} bytes, want EFAULT"
                ),
            }
            common::compare(
                &format!("dio_x.dat after {what} into its read-only mapping"),
                &common::read_at(&x, 0, LEN)?,
                &px,
            )?;
        }
    }
    child.diag(&results.join("\n"));
    drop(ro);

    // 6. A mapping of holes (never written) as the source: it reads as zeros, so what it
    // writes elsewhere must be zeros. Unfaulted, then after read faults (which map the
    // zero page, or the huge zero page for a whole 2 MiB hole).
    let hp = env.mnt.join("dio_holes.dat");
    let h = common::create(&hp)?;
    h.set_len(PMD as u64).ctx("ftruncate dio_holes.dat")?;
    let zeros = vec![0u8; LEN];
    let mut hole_results = Vec::new();
    let mut hole_wrong = Vec::new();
    for faulted in [false, true] {
        let hm = common::map_pmd_aligned(&h, PMD, 0)?;
        let ino = {
            use std::os::unix::fs::MetadataExt;
            h.metadata().map(|m| m.ino()).unwrap_or(0)
        };
        if faulted {
            let obs = common::observe(ino, || {
                for w in hm.words().iter().step_by(512) {
                    std::hint::black_box(w.load(Ordering::Relaxed));
                }
            });
            hole_results.push(format!("read faults on the 2 MiB hole: {}", obs.text()));
        }
        let when = if faulted { "faulted" } else { "unfaulted" };
        let s0 = segs[0];
        let n0 = s0.len.min(LEN as u64) as usize;
        type Try<'a> = Box<dyn Fn() -> std::io::Result<usize> + 'a>;
        let tries: [(&str, &File, Try, usize); 3] = [
            (
                "O_DIRECT pwrite to a DAX file",
                &y,
                Box::new(|| hm.pwrite_from(&y_direct, 0, LEN, 0)),
                LEN,
            ),
            (
                "O_DIRECT pwrite to the block device",
                &y,
                Box::new(|| hm.pwrite_from(&dev, 0, n0, s0.dev_offset)),
                n0,
            ),
            (
                "buffered pwrite to tmpfs",
                &t,
                Box::new(|| hm.pwrite_from(&t, 0, LEN, 0)),
                LEN,
            ),
        ];
        for (what, target, run, n) in tries {
            match run() {
                Ok(got) if got == n => {
                    let back = common::read_at(target, 0, n)?;
                    if back[..] != zeros[..n] {
                        hole_wrong.push(format!(
                            "{what} from a {when} hole mapping wrote non-zero data"
                        ));
                    }
                    hole_results.push(format!("{what} from a {when} hole mapping: ok, zeros"));
                }
                Ok(got) => hole_wrong.push(format!(
                    "{what} from a {when} hole mapping: {got} of {n} bytes"
                )),
                Err(e) => hole_wrong.push(format!(
                    "{what} from a {when} hole mapping: {}",
                    describe(&e)
                )),
            }
            // Put the targets back to a known non-zero state for the next try.
            y.write_all_at(&py, 0).ctx("rewrite dio_y.dat")?;
            t.write_all_at(&pz, 0).ctx("rewrite tmpfs file")?;
        }
    }
    for r in &hole_wrong {
        hole_results.push(format!("WRONG: {r}"));
    }
    child.diag(&hole_results.join("\n"));
    drop(h);
    let _ = std::fs::remove_file(&hp);
    drop(t);
    let _ = std::fs::remove_file(tp);
    let _ = std::fs::remove_file(&xp);
    let _ = std::fs::remove_file(&yp);
    if !hole_wrong.is_empty() {
        fail!("{}", hole_wrong.join("; "));
    }
    Ok(Verdict::Pass)
}

/// Race length without --stress.
const COLLISION_RACE: Duration = Duration::from_secs(12);
const X_LEN: usize = 2 * PMD;
const CHUNK: usize = 64 << 10;
const NEW_LEN: usize = 3 * (256 << 10);

pub fn collision_limit(env: &Env) -> Duration {
    env.duration(COLLISION_RACE) + Duration::from_secs(120)
}

/// The mutator's operations, for attributing EFAULTs; index 0: none overlapped.
const MUT_OPS: [&str; 8] = [
    "none",
    "punch 4 KiB",
    "punch 2 MiB",
    "zero-range 64 KiB",
    "truncate 0 + ftruncate back",
    "truncate 0 + fallocate back",
    "pwrite 64 KiB",
    "several",
];

struct Collision {
    xp: std::path::PathBuf,
    x: File,
    y_direct: File,
    dev: File,
    segs: Vec<Segment>,
    clock: Clock,
    progress: Progress,
    bad: Mutex<Option<String>>,
    /// Per kind (device write, device read, Y write, Y read): ops and EFAULTs.
    ops: [AtomicU64; 4],
    efaults: [AtomicU64; 4],
    /// The mutator's operation in progress (an index into MUT_OPS; 0: none) and how
    /// many it has started, so an EFAULT can be pinned on what overlapped it.
    mut_kind: AtomicU64,
    mut_seq: AtomicU64,
    /// EFAULTs by the mutator operation that overlapped them (index as MUT_OPS; last:
    /// more than one overlapped).
    efault_by: [AtomicU64; 8],
    new_files: AtomicU64,
    mnt: std::path::PathBuf,
}

impl Collision {
    fn found(&self, what: String) {
        let mut b = crate::sync::lock(&self.bad);
        if b.is_none() {
            *b = Some(what);
        }
        self.clock.stop();
    }

    /// An O_DIRECT transfer whose buffer's file may be cut under it: a full or short
    /// transfer and EFAULT are fine; anything else is not.
    /// The mutator's state before an operation: (kind in progress, ops started).
    fn mut_state(&self) -> (u64, u64) {
        (
            self.mut_kind.load(Ordering::SeqCst),
            self.mut_seq.load(Ordering::SeqCst),
        )
    }

    /// Which mutator operation overlapped [before, now]: index into MUT_OPS.
    fn overlapped(&self, before: (u64, u64)) -> usize {
        let (kind1, seq1) = self.mut_state();
        let (kind0, seq0) = before;
        match seq1 - seq0 {
            0 => kind0 as usize,
            1 if kind0 == 0 => kind1 as usize,
            _ => MUT_OPS.len() - 1,
        }
    }

    /// `before` is the mutator's state read before the operation started.
    fn check(&self, kind: usize, before: (u64, u64), what: &str, r: std::io::Result<usize>) {
        self.ops[kind].fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                self.efaults[kind].fetch_add(1, Ordering::Relaxed);
                self.efault_by[self.overlapped(before)].fetch_add(1, Ordering::Relaxed);
                // X is short: let the mutator finish growing it rather than spin.
                std::thread::sleep(Duration::from_micros(500));
            }
            Err(e) => self.found(format!("{what}: {}", describe(&e))),
        }
    }
}

/// Punch, zero-range, truncate and regrow X while the others use its mapping.
fn mutator(c: Arc<Collision>) {
    let mut rng = XorShift64::new(11);
    let fill = vec![0x3Cu8; CHUNK];
    while c.clock.running() {
        let op = 1 + rng.below(6);
        // Announce the operation before it starts; the kind stays set until it ends.
        c.mut_seq.fetch_add(1, Ordering::SeqCst);
        c.mut_kind.store(op, Ordering::SeqCst);
        let r = match op {
            1 => {
                let off = rng.below((X_LEN / PAGE) as u64) * PAGE as u64;
                sys::fallocate_mode(&c.x, sys::FALLOC_PUNCH_HOLE, off, PAGE as u64)
            }
            2 => {
                let off = rng.below(2) * PMD as u64;
                sys::fallocate_mode(&c.x, sys::FALLOC_PUNCH_HOLE, off, PMD as u64)
            }
            3 => {
                let off = rng.below((X_LEN / CHUNK) as u64) * CHUNK as u64;
                sys::fallocate_mode(&c.x, sys::FALLOC_ZERO_RANGE, off, CHUNK as u64)
            }
            4 => c.x.set_len(0).and_then(|_| c.x.set_len(X_LEN as u64)),
            5 => {
                c.x.set_len(0)
                    .and_then(|_| sys::fallocate(&c.x, 0, X_LEN as u64))
            }
            _ => {
                let off = rng.below((X_LEN / CHUNK) as u64) * CHUNK as u64;
                c.x.write_all_at(&fill, off)
            }
        };
        c.mut_kind.store(0, Ordering::SeqCst);
        if let Err(e) = r {
            c.found(format!("mutating dio_coll_x.dat: {}", describe(&e)));
        }
        c.progress.tick(0);
    }
    // Leave X at full size for the final checks.
    let _ = c.x.set_len(X_LEN as u64);
}

/// O_DIRECT with X's mapping as the buffer: writes from it and reads into it, to the
/// block device (pinned pages) and to a DAX file (copies).
fn dio_worker(c: Arc<Collision>, k: usize) {
    let Ok(f) = common::open_rw(&c.xp) else {
        c.found("reopen dio_coll_x.dat".into());
        return;
    };
    let map = match common::map_pmd_aligned(&f, X_LEN, 0) {
        Ok(m) => m,
        Err(e) => {
            c.found(format!("map X: {e}"));
            return;
        }
    };
    let mut rng = XorShift64::new(100 + k as u64);
    while c.clock.running() {
        let off = rng.below((X_LEN / CHUNK) as u64) as usize * CHUNK;
        // A chunk that straddles two of Y's extents has no single device offset; it
        // goes to Y through the filesystem instead.
        let dev_off = dev_offset(&c.segs, off as u64, CHUNK as u64);
        let write = rng.below(2) == 0;
        // Only reads touch the block device. Writing to a mounted file system's device raced
        // its journal: one CI run ended with "Detected aborted journal" and the file system
        // read-only, breaking every later case. Reads still pin X's DAX pages (the GUP path
        // the catalogue is after); writes from X's mapping go to Y through the file system.
        let to_dev = !write && (k % 2 == 0) && dev_off.is_some();
        let e0 = c.mut_state();
        match (write, dev_off.filter(|_| to_dev)) {
            (true, Some(d)) => c.check(
                0,
                e0,
                "O_DIRECT pwrite to the device from X's mapping",
                map.pwrite_from(&c.dev, off, CHUNK, d),
            ),
            (false, Some(d)) => c.check(
                1,
                e0,
                "O_DIRECT pread from the device into X's mapping",
                map.pread_into(&c.dev, off, CHUNK, d),
            ),
            (true, None) => c.check(
                2,
                e0,
                "O_DIRECT pwrite to Y from X's mapping",
                map.pwrite_from(&c.y_direct, off, CHUNK, off as u64),
            ),
            (false, None) => c.check(
                3,
                e0,
                "O_DIRECT pread from Y into X's mapping",
                map.pread_into(&c.y_direct, off, CHUNK, off as u64),
            ),
        }
        c.progress.tick(1 + k);
    }
}

/// Create new files while the race runs; every byte they did not write must be zero,
/// whether allocated by write(2), by a write fault, or by fallocate.
fn new_file_worker(c: Arc<Collision>, slot: usize) {
    let mut n = 0u64;
    while c.clock.running() {
        n += 1;
        let p = c.mnt.join(format!("dio_coll_new{n}.dat"));
        let r = (|| -> Result<()> {
            let f = common::create(&p)?;
            f.set_len(NEW_LEN as u64).ctx("ftruncate new file")?;
            let third = NEW_LEN / 3;
            let mut want = vec![0u8; NEW_LEN];
            for page in (0..third).step_by(PAGE) {
                f.write_all_at(&[0x77; 8], page as u64)
                    .ctx("pwrite new file")?;
                want[page..page + 8].fill(0x77);
            }
            {
                let m = common::map_pmd_aligned(&f, NEW_LEN, 0)?;
                for page in (third..2 * third).step_by(PAGE) {
                    m.words()[page / 8].store(u64::from_le_bytes([0x66; 8]), Ordering::Release);
                    want[page..page + 8].fill(0x66);
                }
            }
            sys::fallocate(&f, 2 * third as u64, third as u64).ctx("fallocate new file")?;
            let got = common::read_at(&f, 0, NEW_LEN)?;
            if let Some(at) = pattern::first_difference(&got, &want) {
                fail!(
                    "new file {} holds {:#04x} at {at:#x} where it never wrote (want {:#04x})",
                    p.display(),
                    got[at],
                    want[at]
                );
            }
            Ok(())
        })();
        let _ = std::fs::remove_file(&p);
        if let Err(e) = r {
            c.found(e.to_string());
            return;
        }
        c.new_files.fetch_add(1, Ordering::Relaxed);
        c.progress.tick(slot);
    }
}

/// Catalogue C11: O_DIRECT with a DAX buffer, both ways, racing punch-hole, zero-range
/// and truncate of the buffer's file, for a bounded time; new files created meanwhile
/// must read as zeros where they were not written.
pub fn dio_collision(child: &Child, env: &Env) -> Result<Verdict> {
    let xp = env.mnt.join("dio_coll_x.dat");
    let yp = env.mnt.join("dio_coll_y.dat");
    let x = written_file(&xp, &pattern::seeded(0xC011, X_LEN))?;
    let y = written_file(&yp, &pattern::seeded(0xC012, X_LEN))?;
    let segs = device_segments(&y, X_LEN)?;
    let c = Arc::new(Collision {
        xp: xp.clone(),
        x,
        y_direct: sys::open_direct(&yp, true).ctx("open Y O_DIRECT")?,
        dev: sys::open_direct(&env.dev, true)
            .ctx(format!("open {} O_DIRECT", env.dev.display()))?,
        segs,
        clock: Clock::new(env.duration(COLLISION_RACE)),
        progress: Progress::new(5),
        bad: Mutex::new(None),
        ops: Default::default(),
        efaults: Default::default(),
        mut_kind: AtomicU64::new(0),
        mut_seq: AtomicU64::new(0),
        efault_by: Default::default(),
        new_files: AtomicU64::new(0),
        mnt: env.mnt.clone(),
    });
    let started = Instant::now();
    let mut threads = Vec::new();
    {
        let c = c.clone();
        threads.push(std::thread::spawn(move || mutator(c)));
    }
    for k in 0..3 {
        let c = c.clone();
        threads.push(std::thread::spawn(move || dio_worker(c, k)));
    }
    {
        let c = c.clone();
        threads.push(std::thread::spawn(move || new_file_worker(c, 4)));
    }
    let names = [
        "truncate/punch",
        "dio worker 0",
        "dio worker 1",
        "dio worker 2",
        "new files",
    ];
    if let Err(what) = common::watch(child, &names, &c.progress, Duration::from_secs(30), || {
        !c.clock.running()
    }) {
        fail!("{what}");
    }
    for t in threads {
        let _ = t.join();
    }
    let counts = c.progress.snapshot();
    let kinds: Vec<String> = ["to the device", "from the device", "to Y", "from Y"]
        .iter()
        .enumerate()
        .map(|(i, k)| {
            format!(
                "{k} {} (EFAULT {})",
                c.ops[i].load(Ordering::Relaxed),
                c.efaults[i].load(Ordering::Relaxed)
            )
        })
        .collect();
    child.diag(&format!(
        "{:.1} s: truncate/punch/zero ops {}, new files checked {}; O_DIRECT with X's mapping as buffer: {}",
        started.elapsed().as_secs_f64(),
        counts[0],
        c.new_files.load(Ordering::Relaxed),
        kinds.join(", ")
    ));
    let by: Vec<String> = MUT_OPS
        .iter()
        .zip(&c.efault_by)
        .map(|(op, n)| (op, n.load(Ordering::Relaxed)))
        .filter(|(_, n)| *n > 0)
        .map(|(op, n)| format!("{op}: {n}"))
        .collect();
    child.diag(&format!(
        "EFAULTs by the truncate/punch operation that overlapped them: {}",
        if by.is_empty() {
            "none".to_string()
        } else {
            by.join(", ")
        }
    ));
    if env.stress.is_none() {
        child.diag("race time: 12 s by default; --stress SECS races for SECS seconds");
    }
    if let Some(bad) = crate::sync::lock(&c.bad).take() {
        fail!("{bad}");
    }
    // After the race, a fresh file must read as zeros too.
    let fresh = env.mnt.join("dio_coll_fresh.dat");
    let f = common::create(&fresh)?;
    f.set_len(X_LEN as u64).ctx("ftruncate fresh")?;
    sys::fallocate(&f, 0, X_LEN as u64).ctx("fallocate fresh")?;
    let m = common::map_pmd_aligned(&f, X_LEN, 0)?;
    // Write-fault one byte per 2 MiB so the blocks get allocated-and-zeroed, not just
    // reported unwritten.
    for r in 0..X_LEN / PMD {
        m.atomic_bytes()[r * PMD].store(0, Ordering::Release);
    }
    drop(m);
    if let Some(at) = common::read_at(&f, 0, X_LEN)?.iter().position(|&b| b != 0) {
        fail!("a file created after the race is not zero at {at:#x}");
    }
    drop(f);
    let _ = std::fs::remove_file(&fresh);
    let _ = std::fs::remove_file(&xp);
    let _ = std::fs::remove_file(&yp);
    Ok(Verdict::Pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_offset_inside_one_segment() {
        let segs = [
            Segment {
                file_offset: 0,
                dev_offset: 1 << 30,
                len: 1 << 20,
            },
            Segment {
                file_offset: 1 << 20,
                dev_offset: 5 << 30,
                len: 1 << 20,
            },
        ];
        assert_eq!(dev_offset(&segs, 4096, 4096), Some((1 << 30) + 4096));
        assert_eq!(dev_offset(&segs, 1 << 20, 65536), Some(5 << 30));
        // straddles two segments
        assert_eq!(dev_offset(&segs, (1 << 20) - 4096, 8192), None);
        assert_eq!(dev_offset(&segs, 2 << 20, 1), None);
    }
}
