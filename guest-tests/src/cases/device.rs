//! The block device and the filesystem on it: presence, mkfs, fsck, mount.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use super::{Ctx, Verdict};
use crate::args::FsType;
use crate::error::{describe, fail, Context, Result};
use crate::nd;
use crate::sys;
use crate::tools;

pub fn pmem0_present(ctx: &mut Ctx) -> Result<Verdict> {
    let dev = ctx.args.dev.clone();
    let meta = std::fs::metadata(&dev).ctx(format!("stat {}", dev.display()))?;
    if !meta.file_type().is_block_device() {
        fail!("{} is not a block device", dev.display());
    }
    let name = ctx.dev_name();
    let sectors =
        nd::read_trimmed(format!("/sys/block/{name}/size")).and_then(|s| s.parse::<u64>().ok());
    match sectors {
        Some(s) => ctx.diag(&format!(
            "{}: {} bytes ({} MiB)",
            dev.display(),
            s * 512,
            (s * 512) >> 20
        )),
        None => ctx.diag(&format!(
            "{}: size unknown (/sys/block/{name}/size unreadable)",
            dev.display()
        )),
    }
    if let Some(mode) = nd::read_trimmed(format!("/sys/block/{name}/device/mode")) {
        ctx.diag(&format!("namespace mode: {mode}"));
    }
    match nd::region_dir(&name) {
        Some(region) => {
            let rname = region
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            match nd::region_start(&region) {
                Some(start) => ctx.diag(&format!(
                    "{rname} resource start {start:#x}, 2 MiB-aligned: {}",
                    if start % nd::PMD_SIZE == 0 {
                        "yes"
                    } else {
                        "no (no PMD faults possible)"
                    }
                )),
                None => ctx.diag(&format!("{rname}: resource unreadable")),
            }
            let deep_flush = region.join("deep_flush");
            if deep_flush.exists() {
                ctx.diag(&format!("{rname}/deep_flush: present"));
            } else {
                ctx.diag(&format!("{rname}: {}", nd::NO_DEEP_FLUSH));
            }
        }
        None => ctx.diag("no nd region found under /sys/bus/nd/devices"),
    }
    Ok(Verdict::Pass)
}

pub fn mkfs(ctx: &mut Ctx) -> Result<Verdict> {
    let dev = ctx.args.dev.clone();
    make_fs(ctx, &dev)?;
    Ok(Verdict::Pass)
}

/// The project's one mkfs command line per file system (`--fs`), on `dev`; the tool's last
/// lines are reported when it fails.
pub fn make_fs(ctx: &mut Ctx, dev: &Path) -> Result<()> {
    let path = dev;
    let dev = dev.to_string_lossy().into_owned();
    // A 2 MiB stripe (512 blocks of 4 KiB) makes ext4's allocator align large allocations
    // to 2 MiB, as su=2m does for xfs. Without it a large fallocate is aligned only when
    // the free space happens to be: after the A-C cases had churned the file system, one
    // CI run got a single 64 MiB extent at a 0x0e0000 offset, with no PMD-capable window.
    let ext4_opts = [
        "-F",
        "-q",
        "-b",
        "4096",
        "-E",
        "stride=512,stripe_width=512",
    ];
    let out = match ctx.args.fs {
        FsType::Ext4 if tools::exists("mkfs.ext4") => {
            tools::run("mkfs.ext4", &[&ext4_opts[..], &[dev.as_str()]].concat())?
        }
        FsType::Ext4 => tools::run(
            "mke2fs",
            &[&["-t", "ext4"][..], &ext4_opts[..], &[dev.as_str()]].concat(),
        )?,
        // 2 MiB stripe unit so data extents can be PMD-aligned; no reflink (DAX excludes it).
        FsType::Xfs => tools::run(
            "mkfs.xfs",
            &["-f", "-q", "-d", "su=2m,sw=1", "-m", "reflink=0", &dev],
        )?,
    };
    if !out.success() {
        ctx.diag(&out.tail(20));
        fail!("mkfs on {} exited with {:?}", path.display(), out.status);
    }
    Ok(())
}

/// ext4's superblock sits at byte 1024; s_feature_incompat at +0x60 carries RECOVER
/// (0x4) while the journal holds transactions not yet checkpointed (an unclean stop).
fn ext4_needs_recovery(dev: &File) -> io::Result<Option<bool>> {
    let mut sb = [0u8; 1024];
    dev.read_exact_at(&mut sb, 1024)?;
    let magic = u16::from_le_bytes([sb[0x38], sb[0x39]]);
    if magic != 0xEF53 {
        return Ok(None);
    }
    let incompat = u32::from_le_bytes([sb[0x60], sb[0x61], sb[0x62], sb[0x63]]);
    Ok(Some(incompat & 0x4 != 0))
}

/// After an unclean stop the journal is replayed first (what mount would do), then a
/// forced read-only check must find nothing. `e2fsck -n` alone would report the
/// unreplayed journal's effects as corruption.
pub fn fsck_clean(ctx: &mut Ctx) -> Result<Verdict> {
    let dev = ctx.args.dev.to_string_lossy().into_owned();
    if crate::mounts::current(ctx.mnt()).is_some() {
        return Ok(Verdict::Skip(
            "filesystem is mounted by someone else".into(),
        ));
    }
    match ctx.args.fs {
        FsType::Ext4 => {
            let f = File::open(&ctx.args.dev).ctx(format!("open {dev}"))?;
            match ext4_needs_recovery(&f).ctx("read ext4 superblock")? {
                None => fail!("no ext4 superblock on {dev}"),
                Some(true) => {
                    ctx.diag("journal needs recovery (unclean shutdown): replaying with e2fsck -p");
                    let out = tools::run("e2fsck", &["-p", &dev])?;
                    ctx.diag(&out.tail(10));
                    // 0: clean, 1: fixed (journal replay counts as a change).
                    if !matches!(out.status, Some(0) | Some(1)) {
                        fail!("e2fsck -p exited with {:?}", out.status);
                    }
                }
                Some(false) => ctx.diag("journal clean (no recovery needed)"),
            }
            let out = tools::run("e2fsck", &["-f", "-n", &dev])?;
            ctx.diag(&out.tail(if out.success() { 2 } else { 30 }));
            if !out.success() {
                fail!("e2fsck -f -n exited with {:?}", out.status);
            }
        }
        FsType::Xfs => {
            let mut out = tools::run("xfs_repair", &["-n", &dev])?;
            // xfs_repair cannot replay a dirty log (and -n would not anyway); xfs wants the
            // kernel to do it at mount. Then check again, which must be clean.
            if out.text.contains("metadata changes in a log") {
                ctx.diag("log needs replay (unclean shutdown): mount + umount, then check again");
                let mnt = ctx.args.mnt.clone();
                std::fs::create_dir_all(&mnt).ctx(format!("mkdir -p {}", mnt.display()))?;
                sys::mount(&ctx.args.dev, &mnt, "xfs", "").ctx("mount -t xfs (log replay)")?;
                sys::umount(&mnt).ctx("umount after log replay")?;
                out = tools::run("xfs_repair", &["-n", &dev])?;
            }
            ctx.diag(&out.tail(if out.success() { 2 } else { 30 }));
            if !out.success() {
                fail!("xfs_repair -n exited with {:?}", out.status);
            }
        }
    }
    Ok(Verdict::Pass)
}

pub fn mount_dax(ctx: &mut Ctx) -> Result<Verdict> {
    let (dev, mnt) = (ctx.args.dev.clone(), ctx.args.mnt.clone());
    mount_dax_at(ctx, &dev, &mnt)?;
    ctx.fs_state.mounted_by_us = true;
    Ok(Verdict::Pass)
}

/// Mounts `dev` (`--fs`) on `mnt` with every file DAX, creating `mnt`.
pub fn mount_dax_at(ctx: &mut Ctx, dev: &Path, mnt: &Path) -> Result<()> {
    std::fs::create_dir_all(mnt).ctx(format!("mkdir -p {}", mnt.display()))?;
    let fs = ctx.args.fs.name();
    // "dax=always" is the current spelling; plain "dax" is the legacy one some kernels
    // want. Both ask for every file to be DAX.
    let mut last = None;
    for opts in ["dax=always", "dax"] {
        match sys::mount(dev, mnt, fs, opts) {
            Ok(()) => {
                let line = crate::mounts::current(mnt)
                    .map(|m| {
                        format!(
                            "{} on {} type {} ({})",
                            m.source,
                            m.target,
                            m.fstype,
                            m.options.join(",")
                        )
                    })
                    .unwrap_or_else(|| "mounted, but not in /proc/mounts".into());
                ctx.diag(&format!("mount -o {opts}: {line}"));
                return Ok(());
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                ctx.diag(&format!("mount -o {opts}: {}", describe(&e)));
                last = Some(e);
            }
            Err(e) => return Err(e).ctx(format!("mount -t {fs} -o {opts} {}", dev.display())),
        }
    }
    // EINVAL covers both "no such filesystem here" and "DAX not supported"; only the
    // kernel log says which.
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(log) = sys::kernel_log() {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(name.as_str())).collect();
        for line in &lines[lines.len().saturating_sub(5)..] {
            ctx.diag(&format!("kernel: {line}"));
        }
    }
    let e = last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL));
    Err(e).ctx(format!("mount -t {fs} -o dax {}", dev.display()))
}
