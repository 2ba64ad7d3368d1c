//! A device served with `--read-only`: the guest mounts read-only and reads what an earlier
//! read-write boot wrote; its write attempts (file system, remount, block device) must never
//! end in a flush that reports success. Whether the host file stayed byte-identical is the
//! runner's check (sha256 before and after), since only the host can see it.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::suites::SuiteDef;
use super::{device, Ctx, Verdict};
use crate::error::{describe, fail, Context, Result};
use crate::mounts;
use crate::pattern;
use crate::sys;

/// How much of the device start `region_blank` looks at: every superblock of ext4 and xfs.
const HEAD_LEN: usize = 64 << 10;
const PAGE: usize = 4096;

/// mount(2) with flags (sys::mount passes none).
fn mount_flags(
    source: &Path,
    target: &Path,
    fstype: &str,
    flags: u64,
    data: &str,
) -> io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    };
    let (source, target) = (c(source)?, c(target)?);
    let fstype = CString::new(fstype).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let data = CString::new(data).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags as libc::c_ulong,
            data.as_ptr().cast(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether the start of the device reads as zeros: what a region the frontend never mapped
/// looks like (QEMU 11.1.3 cannot map a read-only file; docs/qemu.md).
fn region_blank(dev: &Path) -> Result<bool> {
    let f = File::open(dev).ctx(format!("open {}", dev.display()))?;
    let mut head = vec![0u8; HEAD_LEN];
    f.read_exact_at(&mut head, 0)
        .ctx(format!("read the first {} KiB", HEAD_LEN >> 10))?;
    Ok(head.iter().all(|&b| b == 0))
}

const BLANK: &str = "the region reads as zeros: the frontend did not map the read-only file \
                     (QEMU 11.1.3 fails to mmap a read-only fd; see docs/qemu.md)";

/// What the guest is told about the device, and whether the region holds a file system.
pub fn ro_region(ctx: &mut Ctx) -> Result<Verdict> {
    let name = ctx.dev_name();
    let ro = crate::nd::read_trimmed(format!("/sys/block/{name}/ro"));
    ctx.diag(&format!(
        "/sys/block/{name}/ro = {} (virtio-pmem has no read-only feature bit, so the driver cannot know)",
        ro.as_deref().unwrap_or("?")
    ));
    if let Some(region) = crate::nd::region_dir(&name) {
        let attr = crate::nd::read_trimmed(region.join("read_only"));
        ctx.diag(&format!(
            "{}/read_only = {}",
            region.display(),
            attr.as_deref().unwrap_or("(absent)")
        ));
    }
    if region_blank(&ctx.args.dev)? {
        return Ok(Verdict::Skip(BLANK.into()));
    }
    ctx.diag("the region holds data (the file is mapped)");
    Ok(Verdict::Pass)
}

/// Mount read-only with DAX, without journal replay (which would write), and read the
/// generation an earlier read-write boot left.
pub fn ro_mount_read(ctx: &mut Ctx) -> Result<Verdict> {
    if region_blank(&ctx.args.dev)? {
        return Ok(Verdict::Skip(BLANK.into()));
    }
    let Some(expect) = ctx.args.expect_gen.filter(|&g| g > 0) else {
        fail!("readonly needs --expect-gen N (N >= 1): the generation a read-write boot wrote");
    };
    let mnt = ctx.mnt().to_path_buf();
    std::fs::create_dir_all(&mnt).ctx(format!("mkdir -p {}", mnt.display()))?;
    let fs = ctx.args.fs.name();
    let opts = match ctx.args.fs {
        crate::args::FsType::Ext4 => "noload,dax=always",
        crate::args::FsType::Xfs => "norecovery,dax=always",
    };
    mount_flags(&ctx.args.dev, &mnt, fs, libc::MS_RDONLY, opts)
        .ctx(format!("mount -t {fs} -o ro,{opts}"))?;
    let m = crate::mounts::current(&mnt);
    let line = m
        .as_ref()
        .map(|m| m.options.join(","))
        .unwrap_or_else(|| "not in /proc/mounts".into());
    ctx.diag(&format!("mount -o ro,{opts}: {line}"));
    let Some(m) = m else {
        fail!("mounted, but {} is not in /proc/mounts", mnt.display())
    };
    if !m.options.iter().any(|o| o == "ro") {
        fail!("the mount is not read-only: {line}");
    }
    if !m.dax_always() {
        fail!("the read-only mount is not DAX: {line}");
    }
    let path = mnt.join("persist.dat");
    let got = std::fs::read(&path).ctx(format!("read {}", path.display()))?;
    if let Some(at) = pattern::first_difference(&got, &pattern::persist(expect)) {
        fail!(
            "persist.dat is not generation {expect} (first difference at byte {at}, header {:?})",
            pattern::persist_generation(&got)
        );
    }
    ctx.diag(&format!(
        "persist.dat holds generation {expect}, read through a read-only DAX mount"
    ));
    // Read it through a mapping too: loads from the region itself.
    let f = File::open(&path).ctx("open persist.dat")?;
    let map = sys::Mapping::new(&f, got.len(), sys::PROT_READ, sys::MAP_SHARED, 0)
        .ctx("mmap persist.dat PROT_READ")?;
    if map.as_slice() != got.as_slice() {
        fail!("a DAX mapping of persist.dat reads other bytes than read(2)");
    }
    Ok(Verdict::Pass)
}

/// Writes through the read-only mount: opening for writing, creating and a shared writable
/// mapping must be refused. A remount read-write is the guest kernel's call (it cannot know
/// the device is read-only); if it is allowed, a file written and fsync'ed there must not
/// report success, since nothing can reach the host file.
pub fn ro_fs_writes(ctx: &mut Ctx) -> Result<Verdict> {
    if region_blank(&ctx.args.dev)? {
        return Ok(Verdict::Skip(BLANK.into()));
    }
    let mnt = ctx.mnt().to_path_buf();
    let Some(m) = crate::mounts::current(&mnt) else {
        fail!("{} is not mounted (ro_mount_read failed)", mnt.display());
    };
    if !m.options.iter().any(|o| o == "ro") {
        fail!("{} is not mounted read-only", mnt.display());
    }
    let path = mnt.join("persist.dat");
    let mut allowed = Vec::new();
    let mut note = |ctx: &mut Ctx, what: &str, r: io::Result<()>| match r {
        Ok(()) => allowed.push(what.to_string()),
        Err(e) => ctx.diag(&format!("refused: {what}: {}", describe(&e))),
    };
    note(
        ctx,
        "open persist.dat O_WRONLY",
        OpenOptions::new().write(true).open(&path).map(drop),
    );
    note(
        ctx,
        "create new.dat",
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(mnt.join("new.dat"))
            .map(drop),
    );
    let f = File::open(&path).ctx("open persist.dat")?;
    note(
        ctx,
        "mmap persist.dat PROT_WRITE MAP_SHARED (read-only fd)",
        sys::Mapping::new(
            &f,
            PAGE,
            sys::PROT_READ | sys::PROT_WRITE,
            sys::MAP_SHARED,
            0,
        )
        .map(drop),
    );
    drop(f);
    if !allowed.is_empty() {
        fail!("allowed on a read-only mount: {}", allowed.join("; "));
    }
    let fs = ctx.args.fs.name();
    if let Err(e) = mount_flags(&ctx.args.dev, &mnt, fs, libc::MS_REMOUNT, "") {
        ctx.diag(&format!("refused: mount -o remount,rw: {}", describe(&e)));
        return Ok(Verdict::Pass);
    }
    ctx.diag("mount -o remount,rw: allowed (the guest kernel sees a writable block device)");
    let new = mnt.join("ro-attempt.dat");
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&new)
        .and_then(|f| {
            f.write_all_at(&pattern::seeded(0x524f, 64 << 10), 0)?;
            f.sync_all()
        });
    ctx.diag(&format!(
        "write + fsync of {} after the remount: {}",
        new.display(),
        written
            .as_ref()
            .map(|_| "ok".to_string())
            .unwrap_or_else(describe)
    ));
    let back = mount_flags(
        &ctx.args.dev,
        &mnt,
        fs,
        libc::MS_REMOUNT | libc::MS_RDONLY,
        "",
    );
    ctx.diag(&format!(
        "mount -o remount,ro: {}",
        back.as_ref()
            .map(|_| "ok".to_string())
            .unwrap_or_else(describe)
    ));
    if written.is_ok() {
        fail!(
            "after remount,rw a write and its fsync succeeded on a read-only device: the \
             bytes cannot be in the host file, so the fsync reported a false success"
        );
    }
    Ok(Verdict::Pass)
}

/// A page-aligned page, as O_DIRECT wants.
fn page_buf() -> Result<sys::Mapping> {
    sys::Mapping::shared_anonymous(PAGE).ctx("mmap an anonymous page")
}

/// A write straight to the block device (the guest kernel does not know the device is
/// read-only), then fdatasync. The write cannot reach the host file, so the flush must not
/// report success: either the write or the fdatasync must fail.
pub fn ro_blockdev_write(ctx: &mut Ctx) -> Result<Verdict> {
    let dev = ctx.args.dev.clone();
    // Past the first 64 KiB and page-aligned, in the middle of the device: a block neither
    // the superblocks nor the start of the log use.
    let sectors: u64 = crate::nd::read_trimmed(format!("/sys/block/{}/size", ctx.dev_name()))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let offset = (sectors * 512 / 2) & !(PAGE as u64 - 1);
    let f = match sys::open_direct(&dev, true) {
        Ok(f) => f,
        Err(e) => {
            ctx.diag(&format!(
                "open {} O_RDWR|O_DIRECT: {}",
                dev.display(),
                describe(&e)
            ));
            return Ok(Verdict::Pass);
        }
    };
    ctx.diag(&format!("open {} O_RDWR|O_DIRECT: ok", dev.display()));
    let mut before = page_buf()?;
    f.read_exact_at(before.as_mut_slice(), offset)
        .ctx(format!("O_DIRECT read at {offset}"))?;
    let mut buf = page_buf()?;
    buf.as_mut_slice()
        .copy_from_slice(&pattern::seeded(0x0052_4f57_5249_5445, PAGE));
    let wrote = f.write_all_at(buf.as_slice(), offset);
    ctx.diag(&format!(
        "pwrite 4 KiB at {offset}: {}",
        wrote
            .as_ref()
            .map(|_| "ok".to_string())
            .unwrap_or_else(describe)
    ));
    let synced = f.sync_data();
    ctx.diag(&format!(
        "fdatasync {}: {}",
        dev.display(),
        synced
            .as_ref()
            .map(|_| "ok".to_string())
            .unwrap_or_else(describe)
    ));
    let mut after = page_buf()?;
    f.read_exact_at(after.as_mut_slice(), offset)
        .ctx(format!("O_DIRECT read back at {offset}"))?;
    let seen = if after.as_slice() == buf.as_slice() {
        "the guest reads its own write back"
    } else if after.as_slice() == before.as_slice() {
        "the guest reads the old bytes back: the store was dropped"
    } else {
        "the guest reads other bytes back"
    };
    ctx.diag(seen);
    if wrote.is_ok() && synced.is_ok() {
        fail!(
            "pwrite and fdatasync both succeeded on a read-only device ({seen}); the bytes \
             cannot be in the host file, so the flush reported a false success"
        );
    }
    Ok(Verdict::Pass)
}

pub const SUITE: SuiteDef = SuiteDef {
    name: "readonly",
    help: &[
        "for a daemon run with --read-only: mount read-only, find generation",
        "--expect-gen N, try writes (file system, remount, block device)",
    ],
    run: suite,
};

/// For a daemon run with --read-only. Mounts by itself (read-only), so nothing here goes
/// through ensure_mounted.
fn suite(ctx: &mut Ctx) {
    ctx.case("pmem0_present", &[], device::pmem0_present);
    ctx.case("ro_region", &["pmem0_present"], ro_region);
    ctx.case("ro_mount_read", &["ro_region"], ro_mount_read);
    ctx.case("ro_fs_writes", &["ro_mount_read"], ro_fs_writes);
    if mounts::current(ctx.mnt()).is_some() {
        if let Err(e) = sys::umount(ctx.mnt()) {
            let msg = format!(
                "umount {}: {}",
                ctx.mnt().display(),
                crate::error::describe(&e)
            );
            ctx.diag(&msg);
        }
    }
    ctx.case("ro_blockdev_write", &["pmem0_present"], ro_blockdev_write);
}
