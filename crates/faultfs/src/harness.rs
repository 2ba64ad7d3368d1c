//! Runs faultfs as a child process for integration tests, and cleans up after it.
//!
//! The server always runs in its own process. A FUSE server inside the process whose threads
//! fault on the mounted files can deadlock: a faulting thread holds the address space's
//! lock for reading while it waits for the server, and a server thread that needs the same
//! lock (to fault in its own buffer) queues behind any writer (an mmap in a third thread).
//!
//! Tests of another crate have no path to the `faultfs` binary (Cargo only tells a package's
//! own tests where its binaries are), so [`Launcher::TestChild`] re-runs the test binary
//! itself, filtered to one test that calls [`run_if_child`].

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

use crate::cli::{run, Args};
use crate::control::{set_mode, Mode};
use crate::counts::{Counts, FileCounts};
use crate::mounts::is_fuse_mounted;
use crate::sys;

/// Carries the faultfs arguments, newline-separated, to a [`Launcher::TestChild`].
pub const CHILD_ARGS_ENV: &str = "FAULTFS_CHILD_ARGS";
/// How long [`FaultFsMount::start`] waits for the mount to appear.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stop waits after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("faultfs exited ({status}) before its filesystem was mounted; its log:\n{log}")]
    Exited { status: ExitStatus, log: String },
    #[error("faultfs did not mount within {MOUNT_TIMEOUT:?}; its log:\n{log}")]
    Timeout { log: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// How to start the server process.
#[derive(Clone, Debug)]
pub enum Launcher {
    /// The `faultfs` binary at this path.
    Binary(PathBuf),
    /// The test binary `exe`, run with only the test `test` selected; that test must call
    /// [`run_if_child`] first thing.
    TestChild { exe: PathBuf, test: String },
}

impl Launcher {
    /// The running test binary, with the test `test` as the entry point.
    pub fn test_child(test: &str) -> io::Result<Self> {
        Ok(Launcher::TestChild {
            exe: std::env::current_exe()?,
            test: test.to_string(),
        })
    }

    fn command(&self, args: &[OsString]) -> Command {
        match self {
            Launcher::Binary(path) => {
                let mut c = Command::new(path);
                c.args(args);
                c
            }
            Launcher::TestChild { exe, test } => {
                let mut c = Command::new(exe);
                c.args([test.as_str(), "--exact", "--nocapture", "--test-threads=1"]);
                c.env(CHILD_ARGS_ENV, join_args(args));
                c
            }
        }
    }
}

fn join_args(args: &[OsString]) -> OsString {
    let mut out = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        out.extend_from_slice(a.as_bytes());
    }
    OsString::from_vec(out)
}

/// The entry point of a [`Launcher::TestChild`]: if this process was started as one, serves
/// the filesystem and exits the process; otherwise returns at once.
pub fn run_if_child() {
    let Some(joined) = std::env::var_os(CHILD_ARGS_ENV) else {
        return;
    };
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .try_init();
    let args = std::iter::once(OsString::from("faultfs")).chain(
        joined
            .as_bytes()
            .split(|&b| b == b'\n')
            .map(|a| OsStr::from_bytes(a).to_owned()),
    );
    // Exiting here keeps libtest from reporting on a "test" that was really a server.
    let code = match Args::try_parse_from(args) {
        Ok(args) => match run(args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("faultfs: error: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("{e}");
            2
        }
    };
    std::process::exit(code);
}

/// A faultfs mount over a fresh source directory, with its control file beside them (all in
/// one temporary directory). Dropping it stops the server and unmounts, whatever state the
/// test left it in.
pub struct FaultFsMount {
    child: Option<Child>,
    source: PathBuf,
    mountpoint: PathBuf,
    control: PathBuf,
    counts: PathBuf,
    log: PathBuf,
    /// The temporary directory of [`FaultFsMount::start`], removed after the unmount (fields
    /// drop after `Drop::drop`).
    _dir: Option<tempfile::TempDir>,
}

impl FaultFsMount {
    /// Starts the server over a fresh source directory in a temporary directory, and waits
    /// until the filesystem is mounted. Fails (never skips) if it cannot be mounted, with the
    /// server's log in the error.
    pub fn start(launcher: &Launcher) -> Result<Self, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("faultfs")
            .tempdir()
            .map_err(io_err("create a temporary directory"))?;
        let base = dir
            .path()
            .canonicalize()
            .map_err(io_err("canonicalize the temporary directory"))?;
        let source = base.join("source");
        std::fs::create_dir(&source).map_err(io_err(format!("create {}", source.display())))?;
        let mut m = Self::start_in(launcher, &source, &base)?;
        m._dir = Some(dir);
        Ok(m)
    }

    /// Starts the server over the existing directory `source`, with the mount point
    /// (`faultfs.mnt`), control file, counts file and log in `work`, which must not be inside
    /// `source`. Nothing is removed afterwards but the mount point.
    pub fn start_in(launcher: &Launcher, source: &Path, work: &Path) -> Result<Self, HarnessError> {
        let source = source
            .canonicalize()
            .map_err(io_err(format!("canonicalize {}", source.display())))?;
        let work = work
            .canonicalize()
            .map_err(io_err(format!("canonicalize {}", work.display())))?;
        let mountpoint = work.join("faultfs.mnt");
        if is_fuse_mounted(&mountpoint).map_err(io_err("read the mount table"))? {
            return Err(HarnessError::Io {
                what: format!("mount on {}", mountpoint.display()),
                source: io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "still mounted from an earlier run (umount -l it)",
                ),
            });
        }
        std::fs::create_dir_all(&mountpoint)
            .map_err(io_err(format!("create {}", mountpoint.display())))?;
        let control = work.join("faultfs.control");
        let counts = work.join("faultfs.counts.json");
        let log = work.join("faultfs.log");
        let _ = std::fs::remove_file(&counts);
        set_mode(&control, Mode::Ok).map_err(io_err("write the control file"))?;
        let log_file = File::create(&log).map_err(io_err("create the log file"))?;

        let args: Vec<OsString> = vec![
            "--source".into(),
            source.clone().into(),
            "--mountpoint".into(),
            mountpoint.clone().into(),
            "--control".into(),
            control.clone().into(),
            "--counts".into(),
            counts.clone().into(),
        ];
        let mut command = launcher.command(&args);
        // SAFETY: the closure runs in the forked child before exec and calls only prctl(2),
        // which is async-signal-safe, and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                // If the thread that started us dies without cleaning up (a test run killed
                // by a timeout), SIGTERM makes the server unmount instead of leaving a mount
                // behind that nobody serves.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            // Every fsync at info level in the log, for whoever reads it after a failure.
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(io_err(format!("spawn {launcher:?}")))?;
        let mut m = FaultFsMount {
            child: Some(child),
            source,
            mountpoint,
            control,
            counts,
            log,
            _dir: None,
        };
        m.wait_mounted()?;
        Ok(m)
    }

    fn wait_mounted(&mut self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            if is_fuse_mounted(&self.mountpoint).map_err(io_err("read the mount table"))? {
                return Ok(());
            }
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().map_err(io_err("wait for faultfs"))? {
                self.child = None;
                return Err(HarnessError::Exited {
                    status,
                    log: self.log(),
                });
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout { log: self.log() });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The directory the mount mirrors; reading it bypasses FUSE and the page cache above it.
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn control(&self) -> &Path {
        &self.control
    }

    /// `name` inside the mount.
    pub fn path(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    /// Switches fault injection; in force for the next fsync.
    pub fn set_mode(&self, mode: Mode) -> io::Result<()> {
        set_mode(&self.control, mode)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// FSYNC/FSYNCDIR requests the server has answered so far, by file and outcome.
    pub fn counts(&self) -> io::Result<Counts> {
        Counts::read(&self.counts)
    }

    /// The counts file the server writes (see [`crate::counts`]).
    pub fn counts_path(&self) -> &Path {
        &self.counts
    }

    /// FSYNC/FSYNCDIR requests the server has answered so far, all files together.
    pub fn fsyncs(&self) -> FileCounts {
        self.counts().map(|c| c.total()).unwrap_or_default()
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server with SIGTERM (SIGKILL after a grace period) and makes sure nothing
    /// stays mounted. Returns the server's exit status, if it had one to give.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut status = None;
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_TIMEOUT;
            while status.is_none() && Instant::now() < deadline {
                status = child.try_wait().ok().flatten();
                std::thread::sleep(Duration::from_millis(10));
            }
            if status.is_none() {
                let _ = child.kill();
                status = child.wait().ok();
            }
        }
        // A server that was killed leaves a dead mount behind ("Transport endpoint is not
        // connected") that only an unmount removes.
        if is_fuse_mounted(&self.mountpoint).unwrap_or(true) {
            let _ = sys::lazy_unmount(&self.mountpoint);
        }
        status
    }

    /// Whether the filesystem is still mounted.
    pub fn is_mounted(&self) -> bool {
        is_fuse_mounted(&self.mountpoint).unwrap_or(false)
    }
}

impl Drop for FaultFsMount {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "---- faultfs log ({}) ----\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}
