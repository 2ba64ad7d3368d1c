//! The command line and the process lifetime: mount, serve until a signal or an external
//! unmount, unmount.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use fuser::{Config, MountOption, Session, SessionACL};
use log::{info, warn};

use crate::control::Control;
use crate::error::Error;
use crate::fs::{FaultFs, FsOptions};
use crate::sys;

/// A passthrough FUSE filesystem whose fsync fails with EIO on command.
#[derive(Parser, Debug, Clone)]
#[command(name = "faultfs", version)]
pub struct Args {
    /// Directory to mirror.
    #[arg(long)]
    pub source: PathBuf,
    /// Where to mount it (an existing, empty directory).
    #[arg(long)]
    pub mountpoint: PathBuf,
    /// File holding `ok`, `fail-fsync` or `hold-fsync`, read at every fsync; missing means `ok`. Keep it
    /// outside the mount.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Write each file's fsync outcomes (passed, injected, held, failed) to this JSON file
    /// after every fsync. Keep it outside the mount.
    #[arg(long)]
    pub counts: Option<PathBuf>,
    /// Do not ask for the kernel's writeback cache: write(2) then reaches the source at once
    /// (mmapped writes are cached either way).
    #[arg(long)]
    pub no_writeback_cache: bool,
    /// Let users other than the one who mounted use the filesystem.
    #[arg(long)]
    pub allow_other: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Sets a flag on SIGTERM, SIGINT and SIGHUP that the main loop polls. A handler rather than
/// sigwait: when faultfs runs inside a test binary, threads it did not create exist already,
/// and a signal blocked only in some threads would still kill the process elsewhere.
fn install_signal_handlers() -> std::io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: sigaction is plain old data; all-zero is a valid starting value.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: `sa` is a valid sigaction whose handler only stores to an atomic, which is
        // async-signal-safe; the old action is not wanted.
        let ret = unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) };
        if ret != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Mounts the filesystem and serves it until SIGTERM/SIGINT/SIGHUP or an external unmount.
pub fn run(args: Args) -> Result<(), Error> {
    let source = args.source.canonicalize().map_err(|source| Error::Source {
        path: args.source.clone(),
        source,
    })?;
    if !source.is_dir() {
        return Err(Error::SourceNotDir(source));
    }
    let mountpoint = args
        .mountpoint
        .canonicalize()
        .map_err(|source| Error::Mount {
            mountpoint: args.mountpoint.clone(),
            source,
        })?;
    install_signal_handlers().map_err(Error::Signals)?;

    let fs = FaultFs::new(FsOptions {
        source: source.clone(),
        control: Control::new(args.control.clone()),
        writeback_cache: !args.no_writeback_cache,
        counts: args.counts.clone(),
    });
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("faultfs:{}", source.display())),
        MountOption::Subtype("faultfs".into()),
    ];
    if args.allow_other {
        config.acl = SessionACL::All;
    }
    let session = Session::new(fs, &mountpoint, &config).map_err(|source| Error::Mount {
        mountpoint: mountpoint.clone(),
        source,
    })?;
    info!(
        "mounted {} on {} (control: {})",
        source.display(),
        mountpoint.display(),
        args.control
            .as_deref()
            .map_or("none".into(), |p| p.display().to_string())
    );
    let session = session.spawn().map_err(|source| Error::Session {
        mountpoint: mountpoint.clone(),
        source,
    })?;

    while !STOP.load(Ordering::Relaxed) {
        if session.guard.is_finished() {
            info!("{} was unmounted", mountpoint.display());
            return session.join().map_err(|source| Error::Session {
                mountpoint: mountpoint.clone(),
                source,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    info!("signalled; unmounting {}", mountpoint.display());
    if let Err(e) = session.umount_and_join() {
        // Typically EBUSY: a process still has a file open. Detach the mount so the name
        // is free at once; those processes get errors once we exit, as with a lost disk.
        warn!("unmount failed ({e}); detaching instead");
        if let Err(e) = sys::lazy_unmount(&mountpoint) {
            warn!("lazy unmount of {} failed: {e}", mountpoint.display());
        }
    }
    Ok(())
}
