//! The daemon binary as a child process: one launcher for the VM runner, the host benchmark
//! and the integration tests. It starts the daemon listening or connecting, waits for it,
//! takes metrics snapshots (SIGUSR1, then a metrics file with a higher `seq`), and stops it
//! (SIGTERM, then SIGKILL). A `DaemonProcess` that is dropped kills its daemon, so no test or
//! run leaves one behind.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use pmem_metrics::{Metrics, ReadError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start {bin}: {source}")]
    Spawn { bin: PathBuf, source: io::Error },
    #[error("cannot open the daemon log {path}: {source}")]
    Log { path: PathBuf, source: io::Error },
    #[error("the daemon exited ({status}) {when}; the end of its log ({log}):\n{tail}")]
    Exited {
        status: ExitStatus,
        when: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{what} within {timeout:?}; the end of the daemon's log ({log}):\n{tail}")]
    Timeout {
        what: String,
        timeout: Duration,
        log: PathBuf,
        tail: String,
    },
    #[error("the daemon was started without --metrics-path")]
    NoMetrics,
    #[error(transparent)]
    Metrics(#[from] ReadError),
    #[error("cannot signal the daemon (pid {pid}): {source}")]
    Signal { pid: u32, source: io::Error },
}

/// Whether `path` is a UNIX socket (the daemon's, or a listening frontend's).
pub fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Which side of the vhost-user socket the daemon is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Side {
    /// `--socket-path`: the daemon listens and the frontend connects.
    Listen(PathBuf),
    /// `--connect`: the frontend listens and the daemon connects.
    Connect(PathBuf),
    /// Socket activation as systemd does it: `systemd-socket-activate -l PATH` listens on
    /// PATH and execs the daemon, without an endpoint option, with the listening socket as
    /// fd 3 and LISTEN_FDS=1, LISTEN_PID set. The pid stays the same across the exec.
    Activated(PathBuf),
}

/// The stand-in for systemd's socket units, shipped with systemd (found on PATH).
pub const SOCKET_ACTIVATE: &str = "systemd-socket-activate";

impl Side {
    pub fn socket(&self) -> &Path {
        match self {
            Side::Listen(p) | Side::Connect(p) | Side::Activated(p) => p,
        }
    }
}

/// How to start the daemon. The defaults: `RUST_LOG=info`, no metrics file, and the log in
/// `daemon.log` of the current directory (callers set their own with [`DaemonCommand::log`]).
#[derive(Debug, Clone)]
pub struct DaemonCommand {
    bin: PathBuf,
    side: Side,
    file: PathBuf,
    size: Option<String>,
    metrics: Option<PathBuf>,
    extra: Vec<OsString>,
    log: PathBuf,
    append_log: bool,
    rust_log: String,
    death_signal: Option<i32>,
    /// Environment variables to set (`Some`) or remove (`None`), after RUST_LOG.
    envs: Vec<(OsString, Option<OsString>)>,
    /// Descriptors of ours that the daemon gets as `(ours, its number)`.
    fds: Vec<(RawFd, RawFd)>,
    /// The whole argument list as given, for tests of the command line itself.
    verbatim: Option<Vec<OsString>>,
}

/// Makes the child of `cmd` get each `(ours, its)` descriptor of ours under its own number,
/// without close-on-exec: the way a parent hands a vhost-user backend its socket (`--fd`) or
/// a service manager its activated socket (fd 3). The descriptors must stay open until the
/// child is spawned.
pub fn pass_fds(cmd: &mut Command, fds: Vec<(RawFd, RawFd)>) {
    if fds.is_empty() {
        return;
    }
    // Filled in the child; allocated here, since the child may not allocate.
    let mut moved: Vec<RawFd> = vec![-1; fds.len()];
    // SAFETY: the closure runs in the forked child before exec and calls only fcntl(2) and
    // dup2(2), which are async-signal-safe, on descriptors the child inherited; it writes
    // only into `moved`, which was allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // First out of the way of every target, so that one pair's target cannot be
            // another pair's source (fd 3 of ours must not be overwritten before it moved).
            let lowest = fds.iter().map(|&(_, its)| its).max().unwrap_or(0) + 1;
            for (slot, &(ours, _)) in moved.iter_mut().zip(&fds) {
                *slot = libc::fcntl(ours, libc::F_DUPFD_CLOEXEC, lowest);
                if *slot < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // dup2 gives the target without close-on-exec.
            for (&tmp, &(_, its)) in moved.iter().zip(&fds) {
                if libc::dup2(tmp, its) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

impl DaemonCommand {
    pub fn new(bin: impl Into<PathBuf>, side: Side, file: impl Into<PathBuf>) -> Self {
        DaemonCommand {
            bin: bin.into(),
            side,
            file: file.into(),
            size: None,
            metrics: None,
            extra: Vec::new(),
            log: PathBuf::from("daemon.log"),
            append_log: false,
            rust_log: "info".into(),
            death_signal: None,
            envs: Vec::new(),
            fds: Vec::new(),
            verbatim: None,
        }
    }

    /// The daemon with exactly `argv` (which names the socket on `side`'s terms itself): for
    /// tests that give the daemon arguments it may refuse.
    pub fn verbatim<I, S>(bin: impl Into<PathBuf>, side: Side, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = DaemonCommand::new(bin, side, PathBuf::new());
        c.verbatim = Some(argv.into_iter().map(|a| a.as_ref().to_owned()).collect());
        c
    }

    /// `--size SIZE`, in the daemon's own grammar (it is passed through unparsed).
    pub fn size(mut self, size: impl Into<String>) -> Self {
        self.size = Some(size.into());
        self
    }

    /// `--metrics-path PATH --metrics-interval 0`: metrics on SIGUSR1 and at exit only.
    pub fn metrics(mut self, path: impl Into<PathBuf>) -> Self {
        self.metrics = Some(path.into());
        self
    }

    /// More daemon arguments, after the ones above.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.extra
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Where the daemon's stderr goes (truncated, unless [`Self::append_log`]).
    pub fn log(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = path.into();
        self
    }

    pub fn append_log(mut self, append: bool) -> Self {
        self.append_log = append;
        self
    }

    pub fn rust_log(mut self, filter: impl Into<String>) -> Self {
        self.rust_log = filter.into();
        self
    }

    /// Sets an environment variable for the daemon (after RUST_LOG, so this one wins).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), Some(value.into())));
        self
    }

    /// Removes an environment variable (RUST_LOG too) from the daemon's environment.
    pub fn env_remove(mut self, key: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), None));
        self
    }

    /// Hands our descriptor `ours` to the daemon as its descriptor `its` (see [`pass_fds`]).
    /// `ours` must stay open until [`Self::spawn`].
    pub fn pass_fd(mut self, ours: RawFd, its: RawFd) -> Self {
        self.fds.push((ours, its));
        self
    }

    /// The signal the daemon gets when the thread that started it dies
    /// (`PR_SET_PDEATHSIG`), so that a runner killed with SIGKILL leaves no daemon behind.
    /// Only for a launcher whose starting thread outlives the daemon (a main thread).
    pub fn die_with_parent(mut self, signal: i32) -> Self {
        self.death_signal = Some(signal);
        self
    }

    /// The whole argument list, as the daemon gets it.
    pub fn argv(&self) -> Vec<OsString> {
        if let Some(v) = &self.verbatim {
            return v.clone();
        }
        let mut v: Vec<OsString> = Vec::new();
        match &self.side {
            Side::Listen(p) => v.extend(["--socket-path".into(), p.into()]),
            Side::Connect(p) => v.extend(["--connect".into(), p.into()]),
            Side::Activated(_) => {}
        }
        v.extend(["--file".into(), self.file.clone().into()]);
        if let Some(s) = &self.size {
            v.extend(["--size".into(), s.into()]);
        }
        if let Some(m) = &self.metrics {
            v.extend([
                "--metrics-path".into(),
                m.into(),
                "--metrics-interval".into(),
                "0".into(),
            ]);
        }
        v.extend(self.extra.iter().cloned());
        v
    }

    /// The program to run and its arguments: the daemon with [`Self::argv`], or for
    /// [`Side::Activated`] the activator, which execs the daemon.
    fn program(&self) -> (OsString, Vec<OsString>) {
        match &self.side {
            Side::Activated(socket) if self.verbatim.is_none() => {
                let mut v: Vec<OsString> =
                    vec!["-l".into(), socket.into(), self.bin.clone().into()];
                v.extend(self.argv());
                (SOCKET_ACTIVATE.into(), v)
            }
            _ => (self.bin.clone().into(), self.argv()),
        }
    }

    /// The command as one line for logs (arguments with spaces quoted).
    pub fn display(&self) -> String {
        let (program, args) = self.program();
        std::iter::once(program)
            .chain(args)
            .map(|a| {
                let a = a.to_string_lossy().into_owned();
                if a.contains(' ') || a.is_empty() {
                    format!("'{a}'")
                } else {
                    a
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Starts the daemon. For [`Side::Listen`] the caller then waits with
    /// [`DaemonProcess::wait_socket`] or [`DaemonProcess::wait_serving`].
    pub fn spawn(&self) -> Result<DaemonProcess, DaemonError> {
        let log_file = File::options()
            .create(true)
            .write(true)
            .append(self.append_log)
            .truncate(!self.append_log)
            .open(&self.log)
            .map_err(|source| DaemonError::Log {
                path: self.log.clone(),
                source,
            })?;
        let (program, args) = self.program();
        let mut cmd = Command::new(&program);
        cmd.args(args)
            .env("RUST_LOG", &self.rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        for (key, value) in &self.envs {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        pass_fds(&mut cmd, self.fds.clone());
        if let Some(sig) = self.death_signal {
            // SAFETY: the closure runs in the forked child before exec and calls only
            // prctl(2), which is async-signal-safe, and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, sig) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(|source| DaemonError::Spawn {
            bin: program.into(),
            source,
        })?;
        Ok(DaemonProcess {
            child: Some(child),
            status: None,
            side: self.side.clone(),
            metrics: self.metrics.clone(),
            log: self.log.clone(),
        })
    }
}

/// A running daemon. Dropping it kills the daemon (SIGKILL) and reaps it.
#[derive(Debug)]
pub struct DaemonProcess {
    /// `None` once detached.
    child: Option<Child>,
    /// Once reaped: the pid is then never signalled again.
    status: Option<ExitStatus>,
    side: Side,
    metrics: Option<PathBuf>,
    log: PathBuf,
}

/// How often the waits below look again.
const POLL: Duration = Duration::from_millis(10);

impl DaemonProcess {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn socket(&self) -> &Path {
        self.side.socket()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn metrics_path(&self) -> Option<&Path> {
        self.metrics.as_deref()
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The exit status, if the daemon has exited (reaped here; later calls repeat it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    fn exited(&self, status: ExitStatus, when: &str) -> DaemonError {
        DaemonError::Exited {
            status,
            when: when.into(),
            log: self.log.clone(),
            tail: self.log_tail(40),
        }
    }

    fn timeout(&self, what: String, timeout: Duration) -> DaemonError {
        DaemonError::Timeout {
            what,
            timeout,
            log: self.log.clone(),
            tail: self.log_tail(40),
        }
    }

    /// Waits until the socket file exists (the daemon binds it once the backing file is
    /// ready). Makes no connection, so the daemon's connection count stays untouched.
    pub fn wait_socket(&mut self, timeout: Duration) -> Result<(), DaemonError> {
        self.wait_until(timeout, "created its socket", |d| is_socket(d.socket()))
    }

    /// Waits until the daemon answers GET_FEATURES on its socket. The probe is a connection
    /// of its own, which the daemon counts and takes as an ordinary disconnect.
    pub fn wait_serving(&mut self, timeout: Duration) -> Result<(), DaemonError> {
        let deadline = Instant::now() + timeout;
        self.wait_until(timeout, "answered on its socket", |d| {
            // Once connected, a probe waits for its answer as long as the deadline allows: one
            // given up on a daemon slow to answer (a loaded machine) was a connection all the
            // same, and tests that count connections would find one more than they made.
            let left = deadline.saturating_duration_since(Instant::now());
            crate::frontend::probe_with(d.socket(), Duration::from_millis(200), left).is_ok()
        })
    }

    fn wait_until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Result<(), DaemonError> {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return Ok(());
            }
            if let Some(status) = self.try_wait() {
                return Err(self.exited(status, &format!("before it {what}")));
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(format!("the daemon never {what}"), timeout));
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn signal(&self, signal: i32) -> Result<(), DaemonError> {
        let pid = self.pid();
        if self.child.is_none() || self.status.is_some() {
            return Err(DaemonError::Signal {
                pid,
                source: io::Error::from_raw_os_error(libc::ESRCH),
            });
        }
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped while we
        // hold it in `child`.
        if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
            return Err(DaemonError::Signal {
                pid,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The metrics file as it is now, if the daemon has written one.
    pub fn metrics(&self) -> Result<Option<Metrics>, DaemonError> {
        let path = self.metrics.as_deref().ok_or(DaemonError::NoMetrics)?;
        if !path.exists() {
            return Ok(None);
        }
        Ok(Some(Metrics::read(path)?))
    }

    /// Fresh metrics: SIGUSR1, then the first file whose `seq` is above the one before.
    pub fn snapshot(&mut self, timeout: Duration) -> Result<Metrics, DaemonError> {
        let before = self.metrics()?.map_or(0, |m| m.seq);
        self.signal(libc::SIGUSR1)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self.metrics()? {
                if m.seq > before {
                    return Ok(m);
                }
            }
            if let Some(status) = self.try_wait() {
                return Err(self.exited(status, "before it wrote its metrics"));
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(
                    "the daemon did not write its metrics after SIGUSR1".into(),
                    timeout,
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits up to `timeout` for the daemon to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline || self.child.is_none() {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGTERM and the exit status; SIGKILL and an error if it takes longer than `grace`.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus, DaemonError> {
        if let Some(s) = self.try_wait() {
            return Ok(s);
        }
        self.signal(libc::SIGTERM)?;
        match self.wait_exit(grace) {
            Some(s) => Ok(s),
            None => {
                self.kill();
                Err(self.timeout("the daemon did not exit after SIGTERM".into(), grace))
            }
        }
    }

    /// SIGKILL (unless it has exited) and reap; the exit status, unless detached.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.try_wait().is_none() {
            let child = self.child.as_mut()?;
            let _ = child.kill();
            self.status = child.wait().ok();
        }
        self.status
    }

    /// Leaves the daemon running when this value is dropped; returns its pid.
    pub fn detach(mut self) -> u32 {
        let pid = self.pid();
        self.child = None;
        pid
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_has_the_side_the_file_and_then_the_extras() {
        let c = DaemonCommand::new("/bin/d", Side::Connect("/s".into()), "/img")
            .size("1G")
            .metrics("/m.json")
            .args(["--read-only"]);
        let argv: Vec<String> = c
            .argv()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            argv,
            [
                "--connect",
                "/s",
                "--file",
                "/img",
                "--size",
                "1G",
                "--metrics-path",
                "/m.json",
                "--metrics-interval",
                "0",
                "--read-only"
            ]
        );
        let l = DaemonCommand::new("/bin/d", Side::Listen("/a b".into()), "/img");
        assert_eq!(l.display(), "/bin/d --socket-path '/a b' --file /img");
    }

    #[test]
    fn an_activated_daemon_runs_under_the_activator_without_an_endpoint() {
        let c = DaemonCommand::new("/bin/d", Side::Activated("/run/p.sock".into()), "/img");
        assert_eq!(
            c.display(),
            "systemd-socket-activate -l /run/p.sock /bin/d --file /img"
        );
        assert_eq!(c.argv(), ["--file", "/img"]);
    }

    #[test]
    fn a_daemon_that_exits_at_once_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        // `false` stands in for a daemon that refuses its arguments: what is tested here is
        // the launcher's handling of an early exit, not the daemon.
        let mut d = DaemonCommand::new("/bin/false", Side::Listen(dir.path().join("s")), "/x")
            .log(dir.path().join("log"))
            .spawn()
            .unwrap();
        let e = d.wait_socket(Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, DaemonError::Exited { .. }), "{e}");
        assert!(
            e.to_string().contains("before it created its socket"),
            "{e}"
        );
    }
}
