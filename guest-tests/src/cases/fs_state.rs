//! What a run has done to the device and its filesystem (made, mounted, DAX checked,
//! generation written), and the set-up steps suites share that consult it, so a suite
//! after another neither formats nor mounts twice.

use super::{dax, device, Ctx};
use crate::mounts;
use crate::sys;

#[derive(Debug, Default)]
pub struct FsState {
    /// Unmount at exit only what this process mounted.
    pub mounted_by_us: bool,
    pub dax_checked: bool,
    pub dax_ok: bool,
    /// --mkfs is honoured once, before the first mount of the run.
    pub mkfs_done: bool,
    /// Generation persist.dat holds after a write in this invocation.
    pub persisted_gen: Option<u64>,
}

/// Cases that need a DAX mount list these.
pub const NEEDS_DAX: &[&str] = &["mount_dax", "precond_dax"];

/// The hung-task detector's default (120 s) is longer than any case here may take; a
/// shorter one names a task stuck in D state while the case that caused it still runs.
const HUNG_TASK_SECS: u64 = 30;

/// Device, filesystem, mount and DAX check shared by the catalogue suites.
pub fn catalogue_setup(ctx: &mut Ctx) {
    if !ctx.fs_state.dax_checked {
        ctx.case("pmem0_present", &[], device::pmem0_present);
    }
    let path = "/proc/sys/kernel/hung_task_timeout_secs";
    if let Some(cur) = crate::nd::read_trimmed(path).and_then(|v| v.parse::<u64>().ok()) {
        if cur == 0 || cur > HUNG_TASK_SECS {
            match std::fs::write(path, HUNG_TASK_SECS.to_string()) {
                Ok(()) => ctx.diag(&format!(
                    "hung_task_timeout_secs: {cur} -> {HUNG_TASK_SECS}"
                )),
                Err(e) => ctx.diag(&format!(
                    "cannot set {path}: {}",
                    crate::error::describe(&e)
                )),
            }
        }
    }
    ensure_dax_mount(ctx);
}

/// Unmount if this process mounted it, so mkfs/fsck see a quiescent device.
pub fn release_mount(ctx: &mut Ctx) {
    if ctx.fs_state.mounted_by_us && mounts::current(ctx.mnt()).is_some() {
        match sys::umount(ctx.mnt()) {
            Ok(()) => {
                ctx.fs_state.mounted_by_us = false;
                let m = ctx.mnt().display().to_string();
                ctx.diag(&format!("unmounted {m}"));
            }
            Err(e) => {
                let msg = format!(
                    "umount {}: {}",
                    ctx.mnt().display(),
                    crate::error::describe(&e)
                );
                ctx.diag(&msg);
            }
        }
    }
}

pub fn make_fs(ctx: &mut Ctx) {
    release_mount(ctx);
    let name = format!("mkfs_{}", ctx.args.fs.name());
    ctx.case(&name, &["pmem0_present"], device::mkfs);
    ctx.fs_state.mkfs_done = true;
}

/// Mount unless something is already mounted there (an earlier suite, or the caller).
/// With --mkfs and no filesystem made yet in this run, make it first, whichever suite
/// comes first.
pub fn ensure_mounted(ctx: &mut Ctx) {
    match mounts::current(ctx.mnt()) {
        Some(m) => {
            let msg = format!(
                "{} already mounted ({} type {}, {}); not mounting again",
                m.target,
                m.source,
                m.fstype,
                m.options.join(",")
            );
            ctx.diag(&msg);
        }
        None => {
            if ctx.args.mkfs && !ctx.fs_state.mkfs_done {
                make_fs(ctx);
            }
            let mut needs = vec!["pmem0_present"];
            let mkfs_name = format!("mkfs_{}", ctx.args.fs.name());
            needs.push(&mkfs_name);
            ctx.case("mount_dax", &needs, device::mount_dax);
        }
    }
}

pub fn ensure_dax_checked(ctx: &mut Ctx) {
    if !ctx.fs_state.dax_checked {
        ctx.case("precond_dax", &["mount_dax"], dax::precond_dax);
    }
}

/// What most suites start with: the filesystem mounted (made first with --mkfs) and its DAX
/// preconditions checked, each at most once per run.
pub fn ensure_dax_mount(ctx: &mut Ctx) {
    ensure_mounted(ctx);
    ensure_dax_checked(ctx);
}
