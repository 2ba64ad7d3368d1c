//! The soak load (scripts/soak.sh): many threads writing and fsyncing, half through DAX
//! mappings, and a file that is extended and truncated, for a bounded time per boot. Every
//! write that was acknowledged (its fsync, rename and directory fsync returned) is recorded in
//! an ack file, itself replaced durably; the next boot checks that each file holds at least the
//! acknowledged write (never an older one, never a torn one).
//!
//! Boot `g` (= --expect-gen + 1) must find every worker's ack from boot `g - 1`: a boot that
//! found an older state would have lost a whole boot's acknowledged writes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::fs_state::{ensure_dax_mount, release_mount, NEEDS_DAX};
use super::suites::SuiteDef;
use super::{common, device, persist, Ctx, Verdict};
use crate::error::{describe, fail, Context, Result};
use crate::pattern::{self, XorShift64};
use crate::sys::{self, Mapping};

const DIR: &str = "soak";
const HEADER: usize = 64;
const MAX_LEN: u64 = 256 << 10;
/// The truncated file never grows past this.
const TRUNC_MAX: u64 = 8 << 20;
const DEFAULT_SECS: u64 = 20;
/// Not VUP-HOSTCHECK: the next boot inside the same QEMU rewrites these blocks, and the VM runner
/// checks every boot's lines only after QEMU exits. scripts/soak.sh checks the last boot's.
const SOAKCHECK: &str = "VUP-SOAKCHECK";

fn writer_seed(worker: u64, boot: u64, i: u64) -> u64 {
    0x534f_414b_0000_0000 ^ (worker << 40) ^ (boot << 20) ^ i
}

/// A writer's file: a 64-byte text header naming the write, then its seeded bytes.
fn writer_data(worker: u64, boot: u64, i: u64, len: u64) -> Vec<u8> {
    let mut data = format!("VUP-SOAK w={worker} boot={boot} i={i} len={len}").into_bytes();
    data.resize(HEADER - 1, b' ');
    data.push(b'\n');
    data.extend(pattern::seeded(
        writer_seed(worker, boot, i),
        (len as usize) - HEADER,
    ));
    data
}

/// (worker, boot, i, len) from a header.
fn parse_header(data: &[u8]) -> Option<(u64, u64, u64, u64)> {
    let text = std::str::from_utf8(data.get(..HEADER)?).ok()?;
    let mut f = text.trim().strip_prefix("VUP-SOAK ")?.split(' ');
    let mut num = |key: &str| f.next()?.strip_prefix(key)?.parse::<u64>().ok();
    Some((num("w=")?, num("boot=")?, num("i=")?, num("len=")?))
}

/// The truncated file's bytes are a function of the offset alone, so any length has one
/// right content.
fn trunc_stream() -> Vec<u8> {
    pattern::seeded(0x5452_554e_4341_5445, TRUNC_MAX as usize)
}

fn dir(ctx: &Ctx) -> PathBuf {
    ctx.mnt().join(DIR)
}

/// Replace `path` durably with `data`: write a temporary, fsync it, rename, fsync the dir.
fn replace(dir: &Path, name: &str, data: &[u8], through_mapping: bool) -> std::io::Result<File> {
    let tmp = dir.join(format!("{name}.tmp"));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    if through_mapping {
        sys::fallocate(&f, 0, data.len() as u64)?;
        let mut map = Mapping::new(
            &f,
            data.len(),
            sys::PROT_READ | sys::PROT_WRITE,
            sys::MAP_SHARED,
            0,
        )?;
        map.as_mut_slice().copy_from_slice(data);
        sys::msync(map.as_slice(), libc::MS_SYNC)?;
    } else {
        f.write_all_at(data, 0)?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()?;
    Ok(f)
}

fn read_ack(dir: &Path, name: &str) -> Result<Option<Vec<u64>>> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(Some(
            t.split_whitespace()
                .filter_map(|kv| kv.split_once('=')?.1.parse().ok())
                .collect(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).ctx(format!("read {}", path.display())),
    }
}

/// Check what the previous boot acknowledged. With --expect-gen 0 (first boot) there must be
/// nothing yet.
pub fn soak_verify(ctx: &mut Ctx) -> Result<Verdict> {
    let prev = ctx.args.expect_gen.unwrap_or(0);
    let d = dir(ctx);
    if prev == 0 {
        if d.exists() {
            fail!(
                "{} exists, but --expect-gen 0 means a fresh file system",
                d.display()
            );
        }
        ctx.diag("first soak boot: nothing to check");
        return Ok(Verdict::Pass);
    }
    let workers = ctx.args.threads.iter().copied().max().unwrap_or(1) as u64;
    let mut checked = 0;
    for w in 0..workers {
        let name = format!("w{w}");
        let Some(ack) = read_ack(&d, &format!("{name}.ack"))? else {
            fail!("{name}.ack is missing: worker {w} acknowledged nothing in boot {prev}");
        };
        let [boot, i] = ack[..] else {
            fail!("{name}.ack is malformed: {ack:?}");
        };
        if boot != prev {
            fail!("{name}.ack is from boot {boot}, not from the previous boot {prev}: a boot's acknowledged writes are gone");
        }
        let path = d.join(format!("{name}.dat"));
        let got = std::fs::read(&path).ctx(format!("read {}", path.display()))?;
        let Some((hw, hb, hi, hl)) = parse_header(&got) else {
            fail!("{name}.dat has no valid header ({} bytes)", got.len());
        };
        // The data may be one write ahead of its ack (acknowledged, then the boot ended before
        // the ack file was replaced); never behind.
        if hw != w || hb != boot || (hi != i && hi != i + 1) {
            fail!("{name}.dat holds w={hw} boot={hb} i={hi}, but write i={i} of boot {boot} was acknowledged");
        }
        common::compare(
            &format!("{name}.dat (boot {hb} write {hi})"),
            &got,
            &writer_data(w, hb, hi, hl),
        )?;
        checked += 1;
    }
    let Some(t) = read_ack(&d, "trunc.ack")? else {
        fail!("trunc.ack is missing");
    };
    let [len, planned] = t[..] else {
        fail!("trunc.ack is malformed: {t:?}");
    };
    let got = std::fs::read(d.join("trunc.dat")).ctx("read trunc.dat")?;
    let n = got.len() as u64;
    // A boot that ended in the middle of a step (QEMU killed) may leave any length between
    // the acknowledged one and the planned one; the bytes are a function of the offset, so
    // they are checked all the same.
    if n < len.min(planned) || n > len.max(planned) {
        fail!("trunc.dat is {n} bytes; the acknowledged length is {len} (next planned {planned})");
    }
    common::compare("trunc.dat", &got, &trunc_stream()[..got.len()])?;
    ctx.diag(&format!(
        "boot {prev}'s acknowledged writes are all there: {checked} writer files, trunc.dat at {n} bytes"
    ));
    Ok(Verdict::Pass)
}

struct Counters {
    writes: AtomicU64,
    mapped: AtomicU64,
    truncates: AtomicU64,
    bytes: AtomicU64,
}

fn writer(
    d: &Path,
    w: u64,
    boot: u64,
    until: Instant,
    c: &Counters,
) -> std::result::Result<(), String> {
    let mut rng = XorShift64::new(writer_seed(w, boot, 0xffff));
    let mut i = 0;
    while Instant::now() < until || i == 0 {
        i += 1;
        let len = HEADER as u64 + 4096 * (1 + rng.below(MAX_LEN / 4096 - 1));
        let data = writer_data(w, boot, i, len);
        let mapped = i % 2 == 0;
        replace(d, &format!("w{w}.dat"), &data, mapped)
            .map_err(|e| format!("worker {w} write {i}: {}", describe(&e)))?;
        replace(
            d,
            &format!("w{w}.ack"),
            format!("boot={boot} i={i}\n").as_bytes(),
            false,
        )
        .map_err(|e| format!("worker {w} ack {i}: {}", describe(&e)))?;
        c.writes.fetch_add(1, Ordering::Relaxed);
        c.bytes.fetch_add(len, Ordering::Relaxed);
        if mapped {
            c.mapped.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Extend trunc.dat with pwrite, fsync, then truncate it shorter, fsync; each acknowledged
/// length goes to trunc.ack (with the next planned one, which a boot may end between).
fn truncator(d: &Path, boot: u64, until: Instant, c: &Counters) -> std::result::Result<(), String> {
    let stream = trunc_stream();
    let err = |what: &str, e: std::io::Error| format!("truncator: {what}: {}", describe(&e));
    let path = d.join("trunc.dat");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| err("open trunc.dat", e))?;
    let mut len = f
        .metadata()
        .map_err(|e| err("stat", e))?
        .len()
        .min(TRUNC_MAX);
    let mut rng = XorShift64::new(0x7472_756e ^ boot);
    let mut first = true;
    while Instant::now() < until || first {
        first = false;
        let grow_to = (len + 4096 * (1 + rng.below(256))).min(TRUNC_MAX);
        let shrink_to = 4096 * rng.below(grow_to / 4096 + 1);
        for (what, next) in [("extend", grow_to), ("truncate", shrink_to)] {
            replace(
                d,
                "trunc.ack",
                format!("len={len} planned={next}\n").as_bytes(),
                false,
            )
            .map_err(|e| err("ack", e))?;
            if next > len {
                f.write_all_at(&stream[len as usize..next as usize], len)
                    .map_err(|e| err("pwrite", e))?;
            } else {
                f.set_len(next).map_err(|e| err("ftruncate", e))?;
            }
            f.sync_all()
                .map_err(|e| err(&format!("fsync after {what}"), e))?;
            len = next;
            replace(
                d,
                "trunc.ack",
                format!("len={len} planned={len}\n").as_bytes(),
                false,
            )
            .map_err(|e| err("ack", e))?;
            c.truncates.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// The load: `--threads` (largest value) writers plus the truncator, for `--stress` seconds
/// (default 20). Afterwards every file's final contents go to the host as VUP-SOAKCHECKs.
pub fn soak_load(ctx: &mut Ctx) -> Result<Verdict> {
    let boot = ctx.args.expect_gen.unwrap_or(0) + 1;
    let workers = ctx.args.threads.iter().copied().max().unwrap_or(1) as u64;
    let secs = ctx.args.stress_secs.unwrap_or(DEFAULT_SECS);
    let d = dir(ctx);
    std::fs::create_dir_all(&d).ctx(format!("mkdir {}", d.display()))?;
    let c = Counters {
        writes: AtomicU64::new(0),
        mapped: AtomicU64::new(0),
        truncates: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    };
    let errors = Mutex::new(Vec::new());
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    std::thread::scope(|s| {
        // For scripts/soak.sh, which may kill QEMU at this line: in the middle of the load.
        s.spawn(move || {
            std::thread::sleep(Duration::from_secs(secs) / 2);
            super::fsync_loop::line(&format!("VUP-SOAK-HALFWAY boot={boot}"));
        });
        for w in 0..workers {
            let (d, c, errors) = (&d, &c, &errors);
            s.spawn(move || {
                if let Err(e) = writer(d, w, boot, until, c) {
                    crate::sync::lock(errors).push(e);
                }
            });
        }
        let (d, c, errors) = (&d, &c, &errors);
        s.spawn(move || {
            if let Err(e) = truncator(d, boot, until, c) {
                crate::sync::lock(errors).push(e);
            }
        });
    });
    let took = started.elapsed().as_secs_f64();
    let (writes, mapped) = (c.writes.into_inner(), c.mapped.into_inner());
    ctx.diag(&format!(
        "boot {boot}: {workers} writers + 1 truncator for {took:.1} s: {writes} acknowledged writes \
         ({mapped} through DAX mappings, {} MiB), {} extend/truncate steps",
        c.bytes.into_inner() >> 20,
        c.truncates.into_inner()
    ));
    ctx.raw(&format!(
        "VUP-SOAK boot={boot} writes={writes} mapped={mapped} seconds={took:.1}"
    ));
    let errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(first) = errors.first() {
        fail!("{} thread(s) failed; first: {first}", errors.len());
    }
    // The final state, for the host to compare with the image.
    for w in 0..workers {
        let path = d.join(format!("w{w}.dat"));
        let f = File::open(&path).ctx(format!("open {}", path.display()))?;
        let data = std::fs::read(&path).ctx(format!("read {}", path.display()))?;
        persist::host_check(ctx, SOAKCHECK, &f, &data)?;
    }
    let f = File::open(d.join("trunc.dat")).ctx("open trunc.dat")?;
    let data = common::read_at(&f, 0, f.metadata().ctx("stat trunc.dat")?.len() as usize)?;
    if !data.is_empty() {
        persist::host_check(ctx, SOAKCHECK, &f, &data)?;
    }
    Ok(Verdict::Pass)
}

pub const SUITE: SuiteDef = SuiteDef {
    name: "soak",
    help: &[
        "check the previous soak boot's acknowledged writes (--expect-gen N:",
        "the previous boot; 0 on a fresh file system), then --threads writers",
        "(largest value) plus a truncator for --stress SECS (default 20)",
    ],
    run: suite,
};

/// One boot of scripts/soak.sh: check the previous boot's acknowledged writes, then load.
fn suite(ctx: &mut Ctx) {
    ctx.case("pmem0_present", &[], device::pmem0_present);
    if !ctx.args.mkfs {
        release_mount(ctx);
        ctx.case("fsck_clean", &["pmem0_present"], device::fsck_clean);
    }
    ensure_dax_mount(ctx);
    ctx.case("soak_verify", NEEDS_DAX, soak_verify);
    ctx.case("soak_load", NEEDS_DAX, soak_load);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let d = writer_data(3, 7, 42, 8192);
        assert_eq!(d.len(), 8192);
        assert_eq!(parse_header(&d), Some((3, 7, 42, 8192)));
        assert_eq!(parse_header(b"garbage"), None);
        assert_ne!(writer_data(3, 7, 43, 8192), d);
    }
}
