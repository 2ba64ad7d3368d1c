//! Driver rebind: unbinding virtio_pmem through sysfs resets the device (QEMU drops the
//! shared-memory mapping), binding it again starts the device again, and the daemon must map the
//! file again. The data written before must be there after, read through a fresh DAX mount.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::fs_state::{ensure_dax_mount, release_mount, NEEDS_DAX};
use super::suites::SuiteDef;
use super::{common, device, persist, Ctx, Verdict};
use crate::error::{fail, Context, Result};
use crate::pattern;
use crate::sys::{self, Mapping};

const DRIVER: &str = "/sys/bus/virtio/drivers/virtio_pmem";
/// How long the block device may take to go away or come back.
const DEVICE_WAIT: Duration = Duration::from_secs(20);
const MMAP_FILE: &str = "rebind.dat";
const MMAP_LEN: usize = 2 << 20;

/// The seed of rebind.dat's contents: new for every generation, so a stale copy is caught.
fn mmap_seed(ctx: &Ctx) -> u64 {
    0x5245_4249_4e44_0000 ^ ctx.args.expect_gen.unwrap_or(0)
}

/// Stores through a MAP_SHARED DAX mapping (no write(2)), msync, fsync: the bytes live only in
/// the shared-memory region, so after the rebind they can only come from the file mapped again.
pub fn mmap_write(ctx: &mut Ctx) -> Result<Verdict> {
    let path = ctx.mnt().join(MMAP_FILE);
    let want = pattern::seeded(mmap_seed(ctx), MMAP_LEN);
    let f = common::create(&path)?;
    sys::fallocate(&f, 0, MMAP_LEN as u64).ctx("fallocate 2 MiB")?;
    {
        let mut map = Mapping::new(
            &f,
            MMAP_LEN,
            sys::PROT_READ | sys::PROT_WRITE,
            sys::MAP_SHARED,
            0,
        )
        .ctx("mmap MAP_SHARED 2 MiB")?;
        map.as_mut_slice().copy_from_slice(&want);
        sys::msync(map.as_slice(), libc::MS_SYNC).ctx("msync MS_SYNC")?;
    }
    f.sync_all().ctx(format!("fsync {MMAP_FILE}"))?;
    File::open(ctx.mnt())
        .and_then(|d| d.sync_all())
        .ctx("fsync the directory")?;
    persist::host_check(ctx, "VUP-HOSTCHECK", &f, &want)?;
    Ok(Verdict::Pass)
}

/// After the rebind: rebind.dat holds what `mmap_write` stored, read through read(2) and through
/// a fresh mapping.
pub fn mmap_data_kept(ctx: &mut Ctx) -> Result<Verdict> {
    let path = ctx.mnt().join(MMAP_FILE);
    let want = pattern::seeded(mmap_seed(ctx), MMAP_LEN);
    let f = File::open(&path).ctx(format!("open {}", path.display()))?;
    let got = common::read_at(&f, 0, MMAP_LEN)?;
    common::compare("read(2) of rebind.dat after the rebind", &got, &want)?;
    let map = Mapping::new(&f, MMAP_LEN, sys::PROT_READ, sys::MAP_SHARED, 0)
        .ctx("mmap rebind.dat read-only")?;
    common::compare(
        "DAX mapping of rebind.dat after the rebind",
        map.as_slice(),
        &want,
    )?;
    ctx.diag("rebind.dat holds the 2 MiB stored through the mapping before the rebind");
    Ok(Verdict::Pass)
}

/// The virtio device the driver holds, e.g. "virtio1" (exactly one).
fn bound_device() -> Result<String> {
    let mut names: Vec<String> = std::fs::read_dir(DRIVER)
        .ctx(format!("read {DRIVER}"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("virtio"))
        .collect();
    names.sort();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        [] => fail!("{DRIVER} holds no device"),
        many => fail!(
            "{DRIVER} holds {} devices ({many:?}); expected one",
            many.len()
        ),
    }
}

fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Waits until `done()` or the deadline; returns how long it took.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > DEVICE_WAIT {
            fail!("{what}: not within {} s", DEVICE_WAIT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(start.elapsed())
}

/// The device's virtio status byte from sysfs, for the record.
fn status(name: &str) -> String {
    crate::nd::read_trimmed(format!("/sys/bus/virtio/devices/{name}/status"))
        .unwrap_or_else(|| "?".into())
}

/// Unbind virtio_pmem from its device and bind it again; the block device must go away and
/// come back. The filesystem must not be mounted.
pub fn driver_rebind(ctx: &mut Ctx) -> Result<Verdict> {
    if crate::mounts::current(ctx.mnt()).is_some() {
        fail!("{} is still mounted; cannot unbind", ctx.mnt().display());
    }
    let dev: PathBuf = ctx.args.dev.clone();
    let sys_block = PathBuf::from(format!("/sys/block/{}", ctx.dev_name()));
    let name = bound_device()?;
    ctx.diag(&format!(
        "virtio_pmem holds {name} (status {}); unbinding",
        status(&name)
    ));

    std::fs::write(format!("{DRIVER}/unbind"), &name).ctx(format!("write {name} to unbind"))?;
    let gone = wait_for("the block device going away after unbind", || {
        !sys_block.exists() && !is_block_device(&dev)
    })?;
    ctx.diag(&format!(
        "unbound: {} and {} gone after {} ms; device status now {}",
        sys_block.display(),
        dev.display(),
        gone.as_millis(),
        status(&name)
    ));
    if Path::new(&format!("{DRIVER}/{name}")).exists() {
        fail!("{name} is still bound after unbind");
    }

    std::fs::write(format!("{DRIVER}/bind"), &name).ctx(format!("write {name} to bind"))?;
    let back = wait_for("the block device coming back after bind", || {
        sys_block.exists() && is_block_device(&dev)
    })?;
    ctx.diag(&format!(
        "bound again: {} back after {} ms; device status {}",
        dev.display(),
        back.as_millis(),
        status(&name)
    ));
    if bound_device()? != name {
        fail!("after bind the driver holds another device than {name}");
    }
    // The region must hold the filesystem again, read through the new block device. A region
    // the frontend did not map again reads as zeros.
    let f = File::open(&dev).ctx(format!("open {}", dev.display()))?;
    let mut sb = [0u8; 4096];
    f.read_exact_at(&mut sb, 0)
        .ctx("read the superblock area")?;
    if sb.iter().all(|&b| b == 0) {
        fail!("the region reads as zeros after the rebind: it was not mapped again");
    }
    Ok(Verdict::Pass)
}

pub const SUITE: SuiteDef = SuiteDef {
    name: "rebind",
    help: &[
        "persist generation N+1 and a file stored through a DAX mapping, unbind",
        "and bind virtio_pmem through sysfs, mount again, find both, write N+2",
    ],
    run: suite,
};

/// Data written before a sysfs unbind/bind of virtio_pmem must be there after it, read
/// through a new block device and a new DAX mount; the daemon must have mapped the file again.
fn suite(ctx: &mut Ctx) {
    ctx.case("pmem0_present", &[], device::pmem0_present);
    ensure_dax_mount(ctx);
    let expect = ctx.fs_state.persisted_gen.or(ctx.args.expect_gen);
    ctx.case("fsync_persists", NEEDS_DAX, |ctx| {
        persist::fsync_persists(ctx, expect)
    });
    ctx.case("rebind_mmap_write", NEEDS_DAX, mmap_write);
    release_mount(ctx);
    ctx.case("driver_rebind", &["pmem0_present"], driver_rebind);
    // A new block device: mount and check DAX again.
    ctx.fs_state.dax_checked = false;
    ensure_dax_mount(ctx);
    ctx.case(
        "rebind_data_kept",
        &[
            "driver_rebind",
            "mount_dax",
            "precond_dax",
            "rebind_mmap_write",
        ],
        mmap_data_kept,
    );
    let expect = ctx.fs_state.persisted_gen;
    ctx.case(
        "fsync_persists",
        &["driver_rebind", "mount_dax", "precond_dax"],
        |ctx| persist::fsync_persists(ctx, expect),
    );
}
