//! Catalogue E16–E18: guest flushes seen from the host. E16 and E17 need the runner
//! (`hostlink`): it reads the daemon's counters and faultfs's log (E16), and switches faultfs
//! between failing and passing fsyncs (E17). E18 needs only the guest.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use super::common::create;
use super::fs_state::{catalogue_setup, NEEDS_DAX};
use super::hostlink::HostLink;
use super::suites::SuiteDef;
use super::{Ctx, Env, Verdict};
use crate::error::{describe, fail, Context, Result};
use crate::isolate::Child;
use crate::sys::{self, Mapping, PAGE};

/// Each kind of flush E16 makes, one after another.
const E16_EACH: usize = 16;
pub const REACHES_HOST_LIMIT: Duration = Duration::from_secs(300);
pub const ERROR_EIO_LIMIT: Duration = Duration::from_secs(300);

/// The virtqueue size the VM runner (vmrun) gives QEMU's vhost-user-test-device-pci (`vq_size=256`).
/// A flush request is two descriptors, or one with indirect descriptors; either way the ring
/// holds at most this many requests.
pub const QUEUE_SIZE: usize = 256;
/// E18's concurrency: twice the most requests the ring can hold, so that some fsyncs must wait
/// in the driver for a free slot (virtio_pmem's -ENOSPC path) whatever the descriptor layout.
pub const QUEUE_FULL_THREADS: usize = 2 * QUEUE_SIZE;
/// fdatasyncs per thread without --stress.
const QUEUE_FULL_ROUNDS: usize = 4;
/// Every fdatasync of E18 must have returned within this; a lost completion shows as a
/// thread that never returns. Generous: 2,048 flushes take seconds under TCG.
const QUEUE_FULL_DEADLINE: Duration = Duration::from_secs(150);

pub fn queue_full_limit(env: &Env) -> Duration {
    QUEUE_FULL_DEADLINE + env.stress.unwrap_or_default() + Duration::from_secs(60)
}

/// A scratch file of `pages` pages, written and made durable before the case measures
/// anything, so that later flushes have no allocation or size change to commit.
fn prepared_file(path: &Path, pages: usize) -> Result<File> {
    let f = create(path)?;
    f.write_all_at(&vec![0x5a; pages * PAGE], 0)
        .ctx(format!("write {}", path.display()))?;
    f.sync_all()
        .ctx(format!("fsync {} (setup)", path.display()))?;
    Ok(f)
}

fn open_dev(dev: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .ctx(format!("open {}", dev.display()))
}

/// E16: a known number of fsync, fdatasync and msync calls, all answered; the runner then
/// checks that the daemon completed at least that many requests, each with a host fdatasync
/// that started after it arrived, and that faultfs saw that many fdatasyncs of the image.
pub fn flush_reaches_host(child: &Child, env: &Env) -> Result<Verdict> {
    let mut link = HostLink::open()?;
    let path = env.mnt.join("e16.dat");
    let f = prepared_file(&path, E16_EACH)?;
    let mut map = Mapping::new(
        &f,
        E16_EACH * PAGE,
        sys::PROT_READ | sys::PROT_WRITE,
        sys::MAP_SHARED,
        0,
    )
    .ctx("mmap e16.dat")?;
    // Everything before this point (setup, mount, other cases) is outside the window.
    link.expect_ack(child, "snapshot e16")?;
    let (mut fsyncs, mut fdatasyncs, mut msyncs) = (0usize, 0usize, 0usize);
    for i in 0..E16_EACH {
        let off = (i * PAGE) as u64;
        f.write_all_at(&[0x10 + i as u8; PAGE], off).ctx("pwrite")?;
        f.sync_all().ctx(format!("fsync #{}", i + 1))?;
        fsyncs += 1;
    }
    for i in 0..E16_EACH {
        let off = (i * PAGE) as u64;
        f.write_all_at(&[0x30 + i as u8; PAGE], off).ctx("pwrite")?;
        f.sync_data().ctx(format!("fdatasync #{}", i + 1))?;
        fdatasyncs += 1;
    }
    for i in 0..E16_EACH {
        let page = &mut map.as_mut_slice()[i * PAGE..(i + 1) * PAGE];
        page.fill(0x50 + i as u8);
        sys::msync(&map.as_slice()[i * PAGE..(i + 1) * PAGE], libc::MS_SYNC)
            .ctx(format!("msync(MS_SYNC) #{}", i + 1))?;
        msyncs += 1;
    }
    let n = fsyncs + fdatasyncs + msyncs;
    child.raw(&format!(
        "VUP-FLUSHCOUNT name=flush_reaches_host n={n} fsync={fsyncs} fdatasync={fdatasyncs} msync={msyncs}"
    ));
    // Each call waited for its answer before the next was made, so no two of them can share
    // an fdatasync: the host must show at least n of them in the window.
    let figures = link.expect_ack(child, &format!("check-flushes e16 {n}"))?;
    child.diag(&format!("{n} guest flushes returned; host: {figures}"));
    drop(map);
    let _ = std::fs::remove_file(&path);
    Ok(Verdict::Pass)
}

/// What one flush call returned, for E17's expectations.
fn outcome(r: std::io::Result<()>) -> std::result::Result<(), i32> {
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

fn errno_text(code: i32) -> String {
    describe(&std::io::Error::from_raw_os_error(code))
}

/// E17: with the image on faultfs, fsync failures injected on the host reach the guest as EIO,
/// and keep reaching it after the host file system has recovered (the daemon latched the
/// failure), until the daemon is restarted. Leaves the filesystem with an aborted journal: run
/// it last.
pub fn flush_error_eio(child: &Child, env: &Env) -> Result<Verdict> {
    let mut link = HostLink::open()?;
    let path = env.mnt.join("e17.dat");
    let f = prepared_file(&path, 16)?;
    let dev = open_dev(&env.dev)?;
    let mut map = Mapping::new(
        &f,
        16 * PAGE,
        sys::PROT_READ | sys::PROT_WRITE,
        sys::MAP_SHARED,
        0,
    )
    .ctx("mmap e17.dat")?;
    // Healthy first: the flushes work before the fault, so an error later is the fault's.
    f.write_all_at(&[1; PAGE], 0).ctx("pwrite")?;
    f.sync_all().ctx("fsync before the fault")?;
    dev.sync_data()
        .ctx("fdatasync of the device before the fault")?;
    link.expect_ack(child, "faultfs fail-fsync")?;

    let mut wrong = Vec::new();
    let mut expect_eio = |what: &str, r: std::io::Result<()>| match outcome(r) {
        Err(libc::EIO) => child.diag(&format!("{what}: EIO")),
        Ok(()) => wrong.push(format!("{what} succeeded")),
        Err(code) => wrong.push(format!("{what}: {}, want EIO", errno_text(code))),
    };
    // Data-only first (no journal commit), the full fsync last: it aborts ext4's journal.
    f.write_all_at(&[2; PAGE], PAGE as u64).ctx("pwrite")?;
    expect_eio("pwrite + fdatasync while fsync fails", f.sync_data());
    map.as_mut_slice()[2 * PAGE..3 * PAGE].fill(3);
    expect_eio(
        "store + msync while fsync fails",
        sys::msync(&map.as_slice()[2 * PAGE..3 * PAGE], libc::MS_SYNC),
    );
    expect_eio("fdatasync of the device while fsync fails", dev.sync_data());
    f.write_all_at(&[4; PAGE], 3 * PAGE as u64).ctx("pwrite")?;
    expect_eio("pwrite + fsync while fsync fails", f.sync_all());

    link.expect_ack(child, "faultfs ok")?;
    // The host file system works again. The device's own flush is the decisive check: it
    // involves no guest filesystem state, so only the daemon can make it fail now.
    expect_eio(
        "fdatasync of the device after the host recovered",
        dev.sync_data(),
    );
    expect_eio("another fdatasync of the device", dev.sync_data());
    // Through the filesystem too; ext4 may fail these itself (aborted journal), so they
    // only show that nothing silently succeeds. No new store: ext4 is read-only by now and
    // a write fault would raise SIGBUS; msync still makes the filesystem flush.
    let msync_after = outcome(sys::msync(
        &map.as_slice()[4 * PAGE..5 * PAGE],
        libc::MS_SYNC,
    ));
    let fdatasync_after = outcome(f.sync_data());
    for (what, r) in [
        ("store + msync after the host recovered", msync_after),
        (
            "fdatasync of the file after the host recovered",
            fdatasync_after,
        ),
    ] {
        match r {
            Ok(()) => wrong.push(format!("{what} succeeded")),
            Err(code) => child.diag(&format!("{what}: {}", errno_text(code))),
        }
    }
    // The host side: faultfs injected the errors, the daemon logged one at error level and
    // has not called fdatasync since the file system recovered.
    let host = link.request(child, "check-sticky")?;
    match host {
        super::hostlink::Answer::Ack(text) => child.diag(&format!("host: {text}")),
        super::hostlink::Answer::Nak(why) => wrong.push(format!("host: {why}")),
    }
    drop(map);
    if !wrong.is_empty() {
        fail!("{}", wrong.join("; "));
    }
    Ok(Verdict::Pass)
}

/// The `device` feature string bit for VIRTIO_RING_F_INDIRECT_DESC.
const INDIRECT_DESC_BIT: usize = 28;

/// Whether the virtio-pmem device (id 27) negotiated indirect descriptors, from sysfs.
fn pmem_indirect_desc() -> Option<bool> {
    for entry in std::fs::read_dir("/sys/bus/virtio/devices").ok()?.flatten() {
        let dir = entry.path();
        let id = std::fs::read_to_string(dir.join("device")).unwrap_or_default();
        if id.trim() != "0x001b" {
            continue;
        }
        let bits = std::fs::read_to_string(dir.join("features")).ok()?;
        return bits
            .trim()
            .as_bytes()
            .get(INDIRECT_DESC_BIT)
            .map(|&b| b == b'1');
    }
    None
}

/// E18: twice as many concurrent fdatasyncs as the virtqueue holds requests. Every one must
/// return 0, all within a deadline: a request the driver could not queue must wait (for a free
/// ring slot, or for the driver's flush lock) and then be answered, never lost. The runner
/// reports the most requests that waited at the device at once, from the daemon's log; Linux
/// 6.12.95 serializes virtio-pmem flushes in the driver (`flush_lock`), so that is 1 there and
/// the ring never fills: the load is then carried by the driver's lock, not by the ring.
pub fn flush_queue_full(child: &Child, env: &Env) -> Result<Verdict> {
    let mut link = HostLink::open()?;
    let dir = env.mnt.join("e18");
    let _ = std::fs::create_dir(&dir);
    let mut files = Vec::with_capacity(QUEUE_FULL_THREADS);
    for t in 0..QUEUE_FULL_THREADS {
        let p = dir.join(format!("f{t}"));
        let f = create(&p)?;
        f.write_all_at(&[t as u8; PAGE], 0)
            .ctx(format!("write {}", p.display()))?;
        files.push(f);
    }
    // One sync for the setup: afterwards each fdatasync has only data to flush, so it goes
    // straight to the device instead of queueing behind a journal commit.
    sys::sync();
    let capacity = match pmem_indirect_desc() {
        Some(true) => QUEUE_SIZE,
        Some(false) => QUEUE_SIZE / 2,
        None => fail!("virtio-pmem (device 0x001b) not found in /sys/bus/virtio/devices"),
    };
    child.diag(&format!(
        "the {QUEUE_SIZE}-entry ring holds {capacity} flush requests ({} descriptor(s) each)",
        QUEUE_SIZE / capacity
    ));
    link.expect_ack(child, "snapshot e18")?;

    let stress = env.stress;
    let barrier = Arc::new(Barrier::new(QUEUE_FULL_THREADS + 1));
    let inside = Arc::new(AtomicUsize::new(0));
    let most_inside = Arc::new(AtomicUsize::new(0));
    let returned = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut handles = Vec::with_capacity(QUEUE_FULL_THREADS);
    for (t, f) in files.into_iter().enumerate() {
        let (barrier, inside, most_inside, returned, finished, stop, errors) = (
            barrier.clone(),
            inside.clone(),
            most_inside.clone(),
            returned.clone(),
            finished.clone(),
            stop.clone(),
            errors.clone(),
        );
        let h = std::thread::Builder::new()
            .stack_size(128 << 10)
            .spawn(move || {
                barrier.wait();
                let mut round = 0usize;
                loop {
                    let more = match stress {
                        None => round < QUEUE_FULL_ROUNDS,
                        Some(_) => !stop.load(Ordering::Relaxed),
                    };
                    if !more {
                        break;
                    }
                    if let Err(e) = f.write_all_at(&[round as u8; PAGE], 0) {
                        crate::sync::lock(&errors)
                            .push(format!("thread {t}: pwrite: {}", describe(&e)));
                        break;
                    }
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most_inside.fetch_max(now, Ordering::SeqCst);
                    let r = f.sync_data();
                    inside.fetch_sub(1, Ordering::SeqCst);
                    match r {
                        Ok(()) => {
                            returned.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            crate::sync::lock(&errors).push(format!(
                                "thread {t} round {round}: fdatasync: {}",
                                describe(&e)
                            ));
                            break;
                        }
                    }
                    round += 1;
                }
                finished.fetch_add(1, Ordering::SeqCst);
            })
            .ctx(format!("spawn thread {t}"))?;
        handles.push(h);
    }
    barrier.wait();
    let started = Instant::now();
    let run_for = stress.unwrap_or_default();
    let deadline = started + run_for + QUEUE_FULL_DEADLINE;
    while finished.load(Ordering::SeqCst) < QUEUE_FULL_THREADS {
        if stress.is_some() && started.elapsed() >= run_for {
            stop.store(true, Ordering::Relaxed);
        }
        if Instant::now() > deadline {
            let stuck = QUEUE_FULL_THREADS - finished.load(Ordering::SeqCst);
            child.hung(&format!(
                "{stuck} of {QUEUE_FULL_THREADS} threads still in fdatasync {:?} after the start \
                 ({} fdatasyncs returned, {} inside now)",
                started.elapsed(),
                returned.load(Ordering::SeqCst),
                inside.load(Ordering::SeqCst)
            ));
            // The parent kills this process; wait for it.
            std::thread::sleep(Duration::from_secs(3600));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed();
    for h in handles {
        let _ = h.join();
    }
    let host = link.request(child, &format!("check-queue e18 {capacity}"))?;
    let errors = std::mem::take(&mut *crate::sync::lock(&errors));
    let n = returned.load(Ordering::SeqCst);
    child.diag(&format!(
        "{QUEUE_FULL_THREADS} threads: {n} fdatasyncs returned 0 in {:.1} s; at most {} threads \
         were inside fdatasync at once",
        took.as_secs_f64(),
        most_inside.load(Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    match host {
        super::hostlink::Answer::Ack(text) => child.diag(&format!("host: {text}")),
        super::hostlink::Answer::Nak(why) => fail!("host: {why}"),
    }
    if !errors.is_empty() {
        fail!("{} fdatasync(s) failed, first: {}", errors.len(), errors[0]);
    }
    let want = QUEUE_FULL_THREADS * QUEUE_FULL_ROUNDS;
    if stress.is_none() && n != want {
        fail!("{n} fdatasyncs returned, want {want}");
    }
    Ok(Verdict::Pass)
}

pub const SUITE: SuiteDef = SuiteDef {
    name: "flush",
    help: &[
        "catalogue E16-E18: flush_reaches_host, flush_queue_full, flush_error_eio.",
        "E16 and E17 talk to the VM runner (vmrun) over the console (/dev/ttyS0); E17 needs the",
        "image on faultfs (vmrun --faultfs) and leaves ext4's journal aborted",
    ],
    run: suite,
};

/// Catalogue E16-E18 (E15 is fsync_persists). E16 and E17 need the runner's answers
/// (`hostlink`) and E17 an image on faultfs; E17 aborts ext4's journal, so it comes last.
fn suite(ctx: &mut Ctx) {
    catalogue_setup(ctx);
    ctx.case_isolated(
        "flush_reaches_host",
        NEEDS_DAX,
        REACHES_HOST_LIMIT,
        flush_reaches_host,
    );
    let limit = queue_full_limit(&ctx.env());
    ctx.case_isolated("flush_queue_full", NEEDS_DAX, limit, flush_queue_full);
    ctx.case_isolated(
        "flush_error_eio",
        NEEDS_DAX,
        ERROR_EIO_LIMIT,
        flush_error_eio,
    );
}
