//! Every process the runner starts, stopped on every way out: a normal end, an error, a
//! signal to the runner (SIGINT, SIGTERM, SIGHUP end the run as a failure), and a SIGKILL of
//! the runner itself, for which each child is started with a parent-death signal (QEMU
//! SIGKILL; the daemon and faultfs SIGTERM, so the daemon makes its final fdatasync and
//! faultfs unmounts). LOGDIR/pids lists them, so a test can check that none is left.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use faultfs::harness::FaultFsMount;
use pmem_frontend::daemon::DaemonProcess;

/// How long the daemon gets after SIGTERM when the run is torn down early.
const DAEMON_GRACE: Duration = Duration::from_secs(5);

/// The signal that asked the runner to stop, or 0.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    STOP_SIGNAL.store(sig, Ordering::Relaxed);
}

/// Turns SIGINT, SIGTERM and SIGHUP into a flag the run loop polls, so that the run ends
/// through the same clean-up as any other end.
pub fn install_signal_handlers() -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: sigaction is plain old data; all-zero is a valid starting value.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: `sa` is a valid sigaction whose handler only stores to an atomic, which is
        // async-signal-safe; the old action is not wanted.
        if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The signal that asked the runner to stop, if one did.
pub fn stop_requested() -> Option<i32> {
    match STOP_SIGNAL.load(Ordering::Relaxed) {
        0 => None,
        s => Some(s),
    }
}

/// Makes `cmd`'s process get `signal` when the runner's main thread dies.
pub fn die_with_parent(cmd: &mut std::process::Command, signal: i32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and calls only prctl(2),
    // which is async-signal-safe, and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The run's children. Dropping it stops them: QEMU first (SIGKILL), then the daemon
/// (SIGTERM, SIGKILL after a grace period), then faultfs (which unmounts).
pub struct Children {
    pub qemu: Option<Child>,
    pub daemon: Option<DaemonProcess>,
    pub faultfs: Option<FaultFsMount>,
    /// LOGDIR/pids, one `NAME PID` line per child.
    pub pids_file: Option<PathBuf>,
}

impl Children {
    /// No children yet; each is noted in `pids_file` as it starts.
    pub fn new(pids_file: Option<PathBuf>) -> Children {
        Children {
            qemu: None,
            daemon: None,
            faultfs: None,
            pids_file,
        }
    }

    /// Notes a child in LOGDIR/pids.
    pub fn record(&self, name: &str, pid: u32) {
        if let Some(p) = &self.pids_file {
            if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(p) {
                let _ = writeln!(f, "{name} {pid}");
            }
        }
    }

    pub fn kill_qemu(&mut self) -> Option<std::process::ExitStatus> {
        let mut q = self.qemu.take()?;
        let _ = q.kill();
        q.wait().ok()
    }

    pub fn stop_faultfs(&mut self) {
        if let Some(mut f) = self.faultfs.take() {
            f.stop();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.kill_qemu();
        if let Some(mut d) = self.daemon.take() {
            if d.stop(DAEMON_GRACE).is_err() {
                d.kill();
            }
        }
        self.stop_faultfs();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn alive(pid: u32) -> bool {
        // A reaped child is gone from /proc; a zombie would still be there.
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn dropping_the_children_stops_every_one() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = Command::new("sleep").arg("600").spawn().unwrap();
        let qpid = qemu.id();
        // A stand-in for the daemon that takes its arguments and ends on SIGTERM: what is
        // tested is the clean-up, not the daemon.
        let script = dir.path().join("daemon.sh");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 600\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let daemon = pmem_frontend::daemon::DaemonCommand::new(
            &script,
            pmem_frontend::daemon::Side::Listen(dir.path().join("s")),
            "/img",
        )
        .log(dir.path().join("d.log"))
        .spawn()
        .unwrap();
        let dpid = daemon.pid();
        let children = Children {
            qemu: Some(qemu),
            daemon: Some(daemon),
            faultfs: None,
            pids_file: Some(dir.path().join("pids")),
        };
        children.record("qemu", qpid);
        assert!(alive(qpid) && alive(dpid));
        drop(children);
        assert!(!alive(qpid), "QEMU stand-in still running");
        assert!(!alive(dpid), "daemon stand-in still running");
        let pids = std::fs::read_to_string(dir.path().join("pids")).unwrap();
        assert_eq!(pids, format!("qemu {qpid}\n"));
    }
}
