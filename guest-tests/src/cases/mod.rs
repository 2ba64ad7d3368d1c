//! Suites, the case runner, and the state cases share (what is mounted, whether the DAX
//! preconditions held, which persistence generation is on disk).

mod alloc;
pub(crate) mod common;
mod dax;
mod device;
mod dio;
mod fault_latency;
mod faults;
mod flush;
mod fsync_loop;
mod hostlink;
mod latency;
mod map_sync;
mod persist;
mod pmd;
mod readonly;
mod rebind;
mod selftest;
mod soak;
mod truncate;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::args::{Args, FsType, Suite};
use crate::crash;
use crate::error::Result;
use crate::isolate::{self, Child, End, Record};
use crate::kmsg::{self, Kmsg};
use crate::mounts;
use crate::sys;
use crate::tap::{Outcome, Tap};

/// How a case that ran to completion ended. Errors (`Err`) are failures too; `Fail` is for
/// a case that finished but must still not count as passed.
pub enum Verdict {
    Pass,
    Skip(String),
    Fail(String),
}

pub struct Ctx<'a> {
    pub args: &'a Args,
    tap: Tap,
    /// Names of failed cases, for cases that depend on them.
    failed: Vec<String>,
    /// Unmount at exit only what this process mounted.
    mounted_by_us: bool,
    dax_checked: bool,
    dax_ok: bool,
    /// --mkfs is honoured once, before the first mount of the run.
    mkfs_done: bool,
    /// Generation persist.dat holds after a write in this invocation.
    persisted_gen: Option<u64>,
    /// /dev/kmsg, read before and after every case.
    kmsg: Option<Kmsg>,
}

/// What an isolated case needs from the context, copied into the forked child.
#[derive(Clone, Debug)]
pub struct Env {
    pub mnt: PathBuf,
    pub dev: PathBuf,
    pub fs: FsType,
    /// --stress: run time-bounded cases this long instead of their defaults.
    pub stress: Option<Duration>,
}

impl Env {
    /// How long a time-bounded case runs: --stress, or its TCG-sized default.
    pub fn duration(&self, default: Duration) -> Duration {
        self.stress.unwrap_or(default)
    }
}

impl<'a> Ctx<'a> {
    pub fn new(args: &'a Args) -> Self {
        Ctx {
            args,
            tap: Tap::stdout(),
            failed: Vec::new(),
            mounted_by_us: false,
            dax_checked: false,
            dax_ok: false,
            mkfs_done: false,
            persisted_gen: None,
            kmsg: Kmsg::open().ok(),
        }
    }

    pub fn env(&self) -> Env {
        Env {
            mnt: self.args.mnt.clone(),
            dev: self.args.dev.clone(),
            fs: self.args.fs,
            stress: self.args.stress_secs.map(Duration::from_secs),
        }
    }

    /// Whether --only lets catalogue case `name` run.
    pub fn selected(&self, name: &str) -> bool {
        self.args.only.is_empty() || self.args.only.iter().any(|o| o == name)
    }

    /// Kernel log lines since the last drain that report trouble.
    fn kernel_trouble(&mut self) -> Vec<String> {
        match self.kmsg.as_mut() {
            Some(k) => k
                .drain()
                .into_iter()
                .filter(|l| kmsg::is_trouble(l))
                .collect(),
            None => Vec::new(),
        }
    }

    /// Run a catalogue case in a forked child with a deadline (see isolate.rs): a hang
    /// or a fatal signal fails this case only, and the suite goes on. Not run at all
    /// when --only excludes it.
    pub fn case_isolated<F>(&mut self, name: &str, needs: &[&str], limit: Duration, f: F) -> bool
    where
        F: FnOnce(&Child, &Env) -> Result<Verdict>,
    {
        if !self.selected(name) {
            return true;
        }
        self.case(name, needs, |ctx| Ok(ctx.isolated(limit, f)))
    }

    /// The body of an isolated case: fork, relay the child's records, judge its end.
    pub fn isolated<F>(&mut self, limit: Duration, f: F) -> Verdict
    where
        F: FnOnce(&Child, &Env) -> Result<Verdict>,
    {
        let env = self.env();
        let mut relay = |rec: Record| match rec {
            Record::Diag(t) => self.diag(&t),
            Record::Raw(t) => self.raw(&t),
            Record::Verdict(_) | Record::Hung(_) => {}
        };
        let run = isolate::run_case(limit, &mut relay, |child| match f(child, &env) {
            Ok(Verdict::Pass) => Outcome::Pass,
            Ok(Verdict::Skip(w)) => Outcome::Skip(w),
            Ok(Verdict::Fail(w)) => Outcome::Fail(w),
            Err(e) => Outcome::Fail(e.to_string()),
        });
        let run = match run {
            Ok(r) => r,
            Err(e) => {
                return Verdict::Fail(format!(
                    "cannot run isolated: {}",
                    crate::error::describe(&e)
                ))
            }
        };
        match (run.verdict, run.end) {
            (_, end @ End::Hung { .. }) => Verdict::Fail(end.describe()),
            (Some(Outcome::Pass), _) => Verdict::Pass,
            (Some(Outcome::Skip(w)), _) => Verdict::Skip(w),
            (Some(Outcome::Fail(w)), _) => Verdict::Fail(w),
            (None, end) => Verdict::Fail(format!("child {} before its verdict", end.describe())),
        }
    }

    /// "pmem0" for "/dev/pmem0": the name under /sys/block.
    pub fn dev_name(&self) -> String {
        self.args
            .dev
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn mnt(&self) -> &Path {
        &self.args.mnt
    }

    pub fn diag(&mut self, text: &str) {
        self.tap.diag(text);
    }

    pub fn raw(&mut self, line: &str) {
        self.tap.raw(line);
    }

    /// Run one case and print its result. A case whose dependency failed is not run and
    /// reported `not ok`, so nothing passes by default. Panics are caught so one broken
    /// case cannot take the rest of the suite with it.
    pub fn case<F>(&mut self, name: &str, needs: &[&str], f: F) -> bool
    where
        F: FnOnce(&mut Ctx<'a>) -> Result<Verdict>,
    {
        if let Some(dep) = needs.iter().find(|d| self.failed.iter().any(|f| f == *d)) {
            let outcome = Outcome::Fail(format!("skipped: precondition {dep} failed"));
            return self.record(name, outcome);
        }
        let outcome = self.outcome_of(name, f);
        self.record(name, outcome)
    }

    /// Run a case body and judge it, without printing its result: panics are caught, and
    /// kernel log trouble that appears meanwhile fails it.
    pub fn outcome_of<F>(&mut self, name: &str, f: F) -> Outcome
    where
        F: FnOnce(&mut Ctx<'a>) -> Result<Verdict>,
    {
        // Trouble logged between cases belongs to no case; show it, the runner fails the
        // run on it anyway.
        for line in self.kernel_trouble() {
            self.diag(&format!("kernel log before {name}: {line}"));
        }
        crash::arm(self.tap.next_number(), name);
        let started = sys::monotonic_raw_ns();
        let result = catch_unwind(AssertUnwindSafe(|| f(self)));
        crash::disarm();
        let elapsed_ms = (sys::monotonic_raw_ns() - started) / 1_000_000;
        if elapsed_ms >= 1000 {
            self.diag(&format!("{name} took {:.1} s", elapsed_ms as f64 / 1000.0));
        }
        let trouble = self.kernel_trouble();
        for line in &trouble {
            self.diag(&format!("kernel: {line}"));
        }
        let outcome = match result {
            Ok(Ok(Verdict::Pass)) => Outcome::Pass,
            Ok(Ok(Verdict::Skip(why))) => Outcome::Skip(why),
            Ok(Ok(Verdict::Fail(why))) => Outcome::Fail(why),
            Ok(Err(e)) => Outcome::Fail(e.to_string()),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown panic");
                Outcome::Fail(format!("panicked: {msg}"))
            }
        };
        match (outcome, trouble.first()) {
            (o, None) => o,
            (Outcome::Fail(why), Some(line)) => Outcome::Fail(format!("{why}; kernel log: {line}")),
            (_, Some(line)) => Outcome::Fail(format!("kernel log: {line}")),
        }
    }

    fn record(&mut self, name: &str, outcome: Outcome) -> bool {
        let ok = !matches!(outcome, Outcome::Fail(_));
        if !ok {
            self.failed.push(name.to_string());
        }
        self.tap.result(name, &outcome);
        ok
    }

    /// Catalogue E15's crash: print the plan, then panic the kernel with the filesystem
    /// still mounted and nothing synced beyond what the cases themselves flushed. Only
    /// returns if the crash could not be triggered.
    pub fn crash_now(&mut self) {
        self.diag("--crash-at-end: crashing the kernel now (sysrq c), filesystem still mounted");
        self.tap.finish();
        // init copies our stdout to the serial ports through tee, and the UART sends from
        // a buffer the panic abandons: give both time to drain, or the last results (the
        // very ones this crash is about) never reach the host. Nothing is synced meanwhile;
        // the filesystem stays mounted and marked as needing recovery.
        std::thread::sleep(std::time::Duration::from_secs(2));
        let r = std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/sysrq-trigger")
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"c"));
        if let Err(e) = r {
            let msg = format!(
                "cannot crash: /proc/sysrq-trigger: {}",
                crate::error::describe(&e)
            );
            self.diag(&msg);
        }
        // sysrq c panics the calling CPU; give it a moment before falling back.
        std::thread::sleep(std::time::Duration::from_secs(5));
        self.diag("still alive after sysrq c; finishing normally");
    }

    /// sync, unmount what we mounted (umount writes back and flushes the device), print
    /// the plan. Returns the process exit status.
    pub fn finish(mut self) -> i32 {
        let stuck = isolate::reap_left_behind();
        if !stuck.is_empty() {
            self.diag(&format!(
                "processes still stuck in the kernel (not reaped): {stuck:?}; sync and umount may hang"
            ));
        }
        sys::sync();
        if self.mounted_by_us {
            match sys::umount(&self.args.mnt) {
                Ok(()) => self.diag(&format!("unmounted {}", self.args.mnt.display())),
                Err(e) => self.diag(&format!(
                    "umount {}: {}",
                    self.args.mnt.display(),
                    crate::error::describe(&e)
                )),
            }
        }
        let failed = self.tap.failed();
        if failed > 0 {
            self.diag(&format!("{failed} case(s) failed"));
        }
        self.tap.finish();
        if failed == 0 {
            0
        } else {
            1
        }
    }
}

/// Cases that need a DAX mount list these.
const NEEDS_DAX: &[&str] = &["mount_dax", "precond_dax"];

pub fn run_suite(ctx: &mut Ctx, suite: Suite) {
    ctx.diag(&format!("suite {}", suite.name()));
    let started = sys::monotonic_raw_ns();
    match suite {
        Suite::E2e => e2e(ctx),
        Suite::Persist => persist_suite(ctx),
        Suite::Latency => latency::suite(ctx),
        Suite::FaultLat => fault_latency_suite(ctx),
        Suite::Faults => faults_suite(ctx),
        Suite::MapSync => mapsync_suite(ctx),
        Suite::Truncate => truncate_suite(ctx),
        Suite::Pmd => pmd_suite(ctx),
        Suite::Flush => flush_suite(ctx),
        Suite::Selftest => selftest::suite(ctx),
        Suite::Rebind => rebind_suite(ctx),
        Suite::Readonly => readonly_suite(ctx),
        Suite::Soak => soak_suite(ctx),
        Suite::FsyncLoop => {
            ctx.case("pmem0_present", &[], device::pmem0_present);
            ensure_mounted(ctx);
            ensure_dax_checked(ctx);
            ctx.case("fsync_loop", NEEDS_DAX, fsync_loop::fsync_loop);
        }
    }
    let secs = (sys::monotonic_raw_ns() - started) as f64 / 1e9;
    // A diagnostic, not a VUP-METRIC line: those are latency rows for scripts/demo.sh.
    ctx.diag(&format!(
        "suite {} took {secs:.1} s (fs {})",
        suite.name(),
        ctx.args.fs.name()
    ));
}

/// The hung-task detector's default (120 s) is longer than any case here may take; a
/// shorter one names a task stuck in D state while the case that caused it still runs.
const HUNG_TASK_SECS: u64 = 30;

/// Device, filesystem, mount and DAX check shared by the catalogue suites.
fn catalogue_setup(ctx: &mut Ctx) {
    if !ctx.dax_checked {
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
    ensure_mounted(ctx);
    ensure_dax_checked(ctx);
}

/// Catalogue A. The two cases that fill the filesystem come last.
fn faults_suite(ctx: &mut Ctx) {
    catalogue_setup(ctx);
    ctx.case_isolated(
        "hole_then_write",
        NEEDS_DAX,
        faults::HOLE_THEN_WRITE_LIMIT,
        faults::hole_then_write,
    );
    let limit = faults::hole_waiters_limit(&ctx.env());
    ctx.case_isolated("hole_waiters", NEEDS_DAX, limit, faults::hole_waiters);
    ctx.case_isolated(
        "dio_mmap_buffers",
        NEEDS_DAX,
        dio::DIO_MMAP_LIMIT,
        dio::dio_mmap_buffers,
    );
    let limit = alloc::stale_limit(&ctx.env());
    ctx.case_isolated(
        "stale_block_exposure",
        NEEDS_DAX,
        limit,
        alloc::stale_block_exposure,
    );
    ctx.case_isolated(
        "enospc_retry",
        NEEDS_DAX,
        alloc::ENOSPC_LIMIT,
        alloc::enospc_retry,
    );
}

/// Catalogue F19: one isolated case per cell of the fault-latency matrix.
fn fault_latency_suite(ctx: &mut Ctx) {
    catalogue_setup(ctx);
    for cell in fault_latency::cells() {
        ctx.case_isolated(
            &cell.case_name(),
            NEEDS_DAX,
            fault_latency::LIMIT,
            move |child, env| fault_latency::run_cell(cell, child, env),
        );
    }
}

/// Catalogue B8 (B7 is part of e2e).
fn mapsync_suite(ctx: &mut Ctx) {
    catalogue_setup(ctx);
    ctx.case_isolated(
        "map_sync_fallback",
        NEEDS_DAX,
        map_sync::FALLBACK_LIMIT,
        map_sync::fallback,
    );
}

/// Catalogue C.
fn truncate_suite(ctx: &mut Ctx) {
    catalogue_setup(ctx);
    ctx.case_isolated(
        "sigbus_rules",
        NEEDS_DAX,
        truncate::SIGBUS_LIMIT,
        truncate::sigbus_rules,
    );
    let limit = truncate::race_limit(&ctx.env());
    ctx.case_isolated(
        "truncate_fault_race",
        NEEDS_DAX,
        limit,
        truncate::truncate_fault_race,
    );
    let limit = dio::collision_limit(&ctx.env());
    ctx.case_isolated("dio_collision", NEEDS_DAX, limit, dio::dio_collision);
}

/// Catalogue D, on whichever filesystem --fs names.
fn pmd_suite(ctx: &mut Ctx) {
    catalogue_setup(ctx);
    ctx.case_isolated("pmd_fault", NEEDS_DAX, pmd::LIMIT, pmd::pmd_fault);
    ctx.case_isolated("pmd_fallback", NEEDS_DAX, pmd::LIMIT, pmd::pmd_fallback);
    ctx.case_isolated("pmd_ops", NEEDS_DAX, pmd::LIMIT, pmd::pmd_ops);
}

/// Catalogue E16-E18 (E15 is fsync_persists). E16 and E17 need the runner's answers
/// (`hostlink`) and E17 an image on faultfs; E17 aborts ext4's journal, so it comes last.
fn flush_suite(ctx: &mut Ctx) {
    catalogue_setup(ctx);
    ctx.case_isolated(
        "flush_reaches_host",
        NEEDS_DAX,
        flush::REACHES_HOST_LIMIT,
        flush::flush_reaches_host,
    );
    let limit = flush::queue_full_limit(&ctx.env());
    ctx.case_isolated(
        "flush_queue_full",
        NEEDS_DAX,
        limit,
        flush::flush_queue_full,
    );
    ctx.case_isolated(
        "flush_error_eio",
        NEEDS_DAX,
        flush::ERROR_EIO_LIMIT,
        flush::flush_error_eio,
    );
}

fn e2e(ctx: &mut Ctx) {
    ctx.case("pmem0_present", &[], device::pmem0_present);
    if ctx.args.mkfs {
        make_fs(ctx);
    }
    ensure_mounted(ctx);
    ensure_dax_checked(ctx);
    ctx.case("write_fsync", NEEDS_DAX, dax::write_fsync);
    ctx.case("pte_rw_basic", NEEDS_DAX, dax::pte_rw_basic);
    ctx.case("map_sync_matrix", NEEDS_DAX, map_sync::matrix);
    let expect = ctx.persisted_gen.or(ctx.args.expect_gen).unwrap_or(0);
    ctx.case("fsync_persists", NEEDS_DAX, |ctx| {
        persist::fsync_persists(ctx, Some(expect))
    });
}

fn persist_suite(ctx: &mut Ctx) {
    ctx.case("pmem0_present", &[], device::pmem0_present);
    // fsck needs the filesystem unmounted; an earlier suite in this run may hold it.
    release_mount(ctx);
    ctx.case("fsck_clean", &["pmem0_present"], device::fsck_clean);
    ensure_mounted(ctx);
    // A fresh mount: check DAX again rather than trusting an earlier suite.
    ctx.dax_checked = false;
    ensure_dax_checked(ctx);
    let expect = ctx.persisted_gen.or(ctx.args.expect_gen);
    ctx.case("fsync_persists", NEEDS_DAX, |ctx| {
        persist::fsync_persists(ctx, expect)
    });
}

/// Data written before a sysfs unbind/bind of virtio_pmem must be there after it, read
/// through a new block device and a new DAX mount; the daemon must have mapped the file again.
fn rebind_suite(ctx: &mut Ctx) {
    ctx.case("pmem0_present", &[], device::pmem0_present);
    ensure_mounted(ctx);
    ensure_dax_checked(ctx);
    let expect = ctx.persisted_gen.or(ctx.args.expect_gen);
    ctx.case("fsync_persists", NEEDS_DAX, |ctx| {
        persist::fsync_persists(ctx, expect)
    });
    ctx.case("rebind_mmap_write", NEEDS_DAX, rebind::mmap_write);
    release_mount(ctx);
    ctx.case("driver_rebind", &["pmem0_present"], rebind::driver_rebind);
    // A new block device: mount and check DAX again.
    ctx.dax_checked = false;
    ensure_mounted(ctx);
    ensure_dax_checked(ctx);
    ctx.case(
        "rebind_data_kept",
        &[
            "driver_rebind",
            "mount_dax",
            "precond_dax",
            "rebind_mmap_write",
        ],
        rebind::mmap_data_kept,
    );
    let expect = ctx.persisted_gen;
    ctx.case(
        "fsync_persists",
        &["driver_rebind", "mount_dax", "precond_dax"],
        |ctx| persist::fsync_persists(ctx, expect),
    );
}

/// For a daemon run with --read-only. Mounts by itself (read-only), so nothing here goes
/// through ensure_mounted.
fn readonly_suite(ctx: &mut Ctx) {
    ctx.case("pmem0_present", &[], device::pmem0_present);
    ctx.case("ro_region", &["pmem0_present"], readonly::ro_region);
    ctx.case("ro_mount_read", &["ro_region"], readonly::ro_mount_read);
    ctx.case("ro_fs_writes", &["ro_mount_read"], readonly::ro_fs_writes);
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
    ctx.case(
        "ro_blockdev_write",
        &["pmem0_present"],
        readonly::ro_blockdev_write,
    );
}

/// One boot of scripts/soak.sh: check the previous boot's acknowledged writes, then load.
fn soak_suite(ctx: &mut Ctx) {
    ctx.case("pmem0_present", &[], device::pmem0_present);
    if !ctx.args.mkfs {
        release_mount(ctx);
        ctx.case("fsck_clean", &["pmem0_present"], device::fsck_clean);
    }
    ensure_mounted(ctx);
    ensure_dax_checked(ctx);
    ctx.case("soak_verify", NEEDS_DAX, soak::soak_verify);
    ctx.case("soak_load", NEEDS_DAX, soak::soak_load);
}

/// Unmount if this process mounted it, so mkfs/fsck see a quiescent device.
fn release_mount(ctx: &mut Ctx) {
    if ctx.mounted_by_us && mounts::current(ctx.mnt()).is_some() {
        match sys::umount(ctx.mnt()) {
            Ok(()) => {
                ctx.mounted_by_us = false;
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

fn make_fs(ctx: &mut Ctx) {
    release_mount(ctx);
    let name = format!("mkfs_{}", ctx.args.fs.name());
    ctx.case(&name, &["pmem0_present"], device::mkfs);
    ctx.mkfs_done = true;
}

/// Mount unless something is already mounted there (an earlier suite, or the caller).
/// With --mkfs and no filesystem made yet in this run, make it first, whichever suite
/// comes first.
fn ensure_mounted(ctx: &mut Ctx) {
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
            if ctx.args.mkfs && !ctx.mkfs_done {
                make_fs(ctx);
            }
            let mut needs = vec!["pmem0_present"];
            let mkfs_name = format!("mkfs_{}", ctx.args.fs.name());
            needs.push(&mkfs_name);
            ctx.case("mount_dax", &needs, device::mount_dax);
        }
    }
}

fn ensure_dax_checked(ctx: &mut Ctx) {
    if !ctx.dax_checked {
        ctx.case("precond_dax", &["mount_dax"], dax::precond_dax);
    }
}
