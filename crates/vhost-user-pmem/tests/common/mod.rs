//! Shared helpers for the integration tests: start the real daemon binary on a tempdir
//! socket and a real file, wait for it with deadlines, and kill it on drop.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pmem_frontend::daemon::{DaemonCommand, DaemonProcess, Side};
use pmem_frontend::{Frontend, FrontendListener, Options};
use pmem_metrics::Metrics;

/// The daemon under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-pmem");
/// Upper bound for anything the tests wait for.
pub const TIMEOUT: Duration = Duration::from_secs(10);
pub const MIB: u64 = 1 << 20;

/// A scratch directory with a socket path and a backing-file path in it.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub file: PathBuf,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("pmem.sock");
        let file = dir.path().join("pmem.img");
        Env { dir, socket, file }
    }

    /// Another path in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Creates the backing file with `len` bytes of a recognisable pattern.
    pub fn create_file(&self, len: u64) -> Vec<u8> {
        let data = pattern(len as usize, 7);
        std::fs::write(&self.file, &data).expect("write backing file");
        data
    }

    /// The usual arguments: `--socket-path S --file F` plus `extra`.
    pub fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<String> {
        let mut v = vec![
            "--socket-path".to_string(),
            self.socket.display().to_string(),
            "--file".to_string(),
            self.file.display().to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    /// Where [`Self::metrics_args`] has the daemon write its metrics.
    pub fn metrics_path(&self) -> PathBuf {
        self.path("metrics.json")
    }

    /// `--metrics-path` [`Self::metrics_path`], written only at start, on SIGUSR1 and at exit,
    /// so that every file a test sees is one it asked for.
    pub fn metrics_args(&self) -> Vec<String> {
        vec![
            "--metrics-path".to_string(),
            self.metrics_path().display().to_string(),
            "--metrics-interval".to_string(),
            "0".to_string(),
        ]
    }

    /// [`Self::start`] with [`Self::metrics_args`] before `extra`.
    pub fn start_with_metrics(&self, extra: &[&str]) -> Daemon {
        let mut args = self.args(&[]);
        args.extend(self.metrics_args());
        args.extend(extra.iter().map(|s| s.to_string()));
        Daemon::start(&args, &self.socket, &self.path("daemon.log"))
    }

    /// Starts a daemon with [`Self::args`] and waits until it listens.
    pub fn start(&self, extra: &[&str]) -> Daemon {
        Daemon::start(&self.args(extra), &self.socket, &self.path("daemon.log"))
    }

    /// `--connect S --file F` plus `extra`.
    pub fn client_args<'a>(&'a self, extra: &[&'a str]) -> Vec<String> {
        let mut v = vec![
            "--connect".to_string(),
            self.socket.display().to_string(),
            "--file".to_string(),
            self.file.display().to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    /// Starts a daemon in `mode` (logging to `log`, a name in the directory). In client mode
    /// `listener` must be listening on [`Self::socket`]; the daemon connects to it at once.
    pub fn start_in(&self, mode: Mode, extra: &[&str], log: &str) -> Daemon {
        match mode {
            Mode::Listen => Daemon::start(&self.args(extra), &self.socket, &self.path(log)),
            Mode::Client => Daemon::spawn(&self.client_args(extra), &self.socket, &self.path(log)),
        }
    }
}

impl Env {
    /// [`Self::start_in`] with [`Self::metrics_args`] before `extra`.
    pub fn start_in_with_metrics(&self, mode: Mode, extra: &[&str], log: &str) -> Daemon {
        let metrics = self.metrics_args();
        let mut all: Vec<&str> = metrics.iter().map(String::as_str).collect();
        all.extend_from_slice(extra);
        self.start_in(mode, &all, log)
    }
}

/// Which side of the socket the daemon is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `--socket-path`: the daemon listens, the harness connects.
    Listen,
    /// `--connect`: the harness listens ([`FrontendListener`]), the daemon connects.
    Client,
}

/// The frontend's end for either mode: in client mode a listener the daemon connects to.
pub struct Frontends {
    pub mode: Mode,
    pub listener: Option<FrontendListener>,
}

impl Frontends {
    /// For client mode, binds the harness's listener on `env.socket` first.
    pub fn new(env: &Env, mode: Mode) -> Frontends {
        let listener = match mode {
            Mode::Listen => None,
            Mode::Client => {
                Some(FrontendListener::bind(&env.socket).expect("bind frontend socket"))
            }
        };
        Frontends { mode, listener }
    }

    /// The next frontend connection to `daemon`: connects to it, or accepts its connection.
    pub fn next(&self, daemon: &Daemon) -> Frontend {
        match &self.listener {
            None => daemon.connect(),
            Some(l) => {
                let opts = Options {
                    timeout: TIMEOUT,
                    ..Options::default()
                };
                l.accept_with(opts).unwrap_or_else(|e| {
                    panic!(
                        "accept the daemon's connection: {e}; daemon log:\n{}",
                        daemon.log()
                    )
                })
            }
        }
    }
}

/// Bytes `i * 31 + seed` (mod 251, so the pattern does not repeat at page sizes).
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed as usize) % 251) as u8)
        .collect()
}

/// Keeps `depth` flushes outstanding for as long as `more(submitted so far)` says, then waits
/// for the rest, dirtying a page of the mapping before each submission as a guest would.
/// Every answer must be a success, and each head must come back once. Returns how many
/// completed (all that were submitted).
pub fn keep_flushing(
    fe: &mut Frontend,
    depth: usize,
    mut more: impl FnMut(usize) -> bool,
) -> usize {
    let map = fe.shmem().expect("started");
    let mut submitted = 0;
    let mut completed = 0;
    let mut in_flight = std::collections::HashSet::new();
    loop {
        while in_flight.len() < depth && more(submitted) {
            let page = (submitted % 256) * 4096;
            map.write(page, &pattern(64, submitted as u8)).unwrap();
            assert!(in_flight.insert(fe.submit_request(0).unwrap()));
            submitted += 1;
        }
        if in_flight.is_empty() {
            return completed;
        }
        let used = fe.wait_used(TIMEOUT).unwrap();
        let head = used.id as u16;
        assert!(in_flight.remove(&head), "head {head} completed twice");
        assert_eq!(used.len, 4);
        assert_eq!(fe.request_status(head).unwrap(), 0, "status of head {head}");
        completed += 1;
    }
}

/// Context switches of every thread of `pid` so far.
pub fn context_switches(pid: i32) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status =
            std::fs::read_to_string(task.unwrap().path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if line.starts_with("voluntary_ctxt_switches:")
                || line.starts_with("nonvoluntary_ctxt_switches:")
            {
                total += line
                    .split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap();
            }
        }
    }
    total
}

/// A running daemon. Killed (SIGKILL) on drop; its log is printed if the test panicked.
pub struct Daemon {
    /// Killed (SIGKILL) on drop.
    process: DaemonProcess,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Spawns the daemon and waits (with a deadline) until it answers on its socket
    /// (GET_FEATURES): the socket accepting a connection is not enough, the daemon binds it
    /// before it opens (creates, locks) the file. The probe connection closes right after its
    /// one request, which the daemon must take as an ordinary disconnect.
    pub fn start(args: &[String], socket: &Path, log: &Path) -> Daemon {
        let mut d = Daemon::spawn(args, socket, log);
        if let Err(e) = d.process.wait_serving(TIMEOUT) {
            panic!("{e}");
        }
        d
    }

    /// Spawns the daemon without waiting for anything (for `--connect`, where the harness
    /// accepts the daemon's connection instead).
    pub fn spawn(args: &[String], socket: &Path, log: &Path) -> Daemon {
        Daemon::spawn_with(args, socket, log, |c| c)
    }

    /// [`Self::start`] with `setup` adding to the launcher's command (environment,
    /// descriptors to pass).
    pub fn start_with(
        args: &[String],
        socket: &Path,
        log: &Path,
        setup: impl FnOnce(DaemonCommand) -> DaemonCommand,
    ) -> Daemon {
        let mut d = Daemon::spawn_with(args, socket, log, setup);
        if let Err(e) = d.process.wait_serving(TIMEOUT) {
            panic!("{e}");
        }
        d
    }

    /// [`Self::spawn`] with `setup` adding to the launcher's command.
    pub fn spawn_with(
        args: &[String],
        socket: &Path,
        log: &Path,
        setup: impl FnOnce(DaemonCommand) -> DaemonCommand,
    ) -> Daemon {
        Daemon::spawn_program(BIN, args, socket, log, setup)
    }

    /// Spawns `program` with `args`, which must end up running the daemon (a wrapper such as
    /// systemd-socket-activate that execs it), without waiting.
    pub fn spawn_program(
        program: &str,
        args: &[String],
        socket: &Path,
        log: &Path,
        setup: impl FnOnce(DaemonCommand) -> DaemonCommand,
    ) -> Daemon {
        let cmd = DaemonCommand::verbatim(program, Side::Listen(socket.to_path_buf()), args)
            .log(log)
            .rust_log("debug");
        let process = setup(cmd).spawn().expect("spawn daemon");
        Daemon {
            process,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        }
    }

    pub fn sigusr1(&self) {
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped.
        assert_eq!(unsafe { libc::kill(self.pid(), libc::SIGUSR1) }, 0);
    }

    /// Waits up to [`TIMEOUT`] for the metrics file at `path` to hold a report numbered above
    /// `seq`, and returns it.
    pub fn wait_metrics_seq_above(&self, path: &Path, seq: u64) -> Metrics {
        self.wait_metrics(path, |m| m.seq > seq)
    }

    /// Waits up to [`TIMEOUT`] for the metrics file at `path` to satisfy `pred`.
    pub fn wait_metrics(&self, path: &Path, pred: impl Fn(&Metrics) -> bool) -> Metrics {
        self.poll_metrics(path, pred, false)
    }

    /// The metrics at `path` once they satisfy `pred`, read every 10 ms (with `ask`, after a
    /// SIGUSR1 each time) for up to [`TIMEOUT`].
    fn poll_metrics(&self, path: &Path, pred: impl Fn(&Metrics) -> bool, ask: bool) -> Metrics {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let m = if ask {
                Some(self.report(path))
            } else {
                read_metrics(path)
            };
            if let Some(m) = m.as_ref().filter(|m| pred(m)) {
                return m.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{} never matched within {TIMEOUT:?}; last: {m:?}; log:\n{}",
                path.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asks for a fresh report (SIGUSR1) in the metrics file at `path` and returns it.
    pub fn report(&self, path: &Path) -> Metrics {
        let seq = read_metrics(path).map_or(0, |m| m.seq);
        self.sigusr1();
        self.wait_metrics_seq_above(path, seq)
    }

    /// Asks for reports (SIGUSR1) until one satisfies `pred`, for what the daemon counts after
    /// the frontend already saw its effect (a refused map is counted once the refusal reached
    /// the daemon's thread, not when the frontend sent it).
    pub fn report_until(&self, path: &Path, pred: impl Fn(&Metrics) -> bool) -> Metrics {
        self.poll_metrics(path, pred, true)
    }

    /// The daemon's threads' `Seccomp:` mode from /proc (0 none, 2 filter), by thread name.
    pub fn seccomp_modes(&self) -> Vec<(String, u32)> {
        let tasks = format!("/proc/{}/task", self.pid());
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&tasks).expect("read /proc/PID/task") {
            let Ok(status) = std::fs::read_to_string(entry.unwrap().path().join("status")) else {
                continue; // the thread ended meanwhile
            };
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            let mode = field("Seccomp:").parse().expect("Seccomp: field");
            out.push((field("Name:"), mode));
        }
        out
    }

    pub fn pid(&self) -> i32 {
        self.process.pid() as i32
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Connects a frontend with default options.
    pub fn connect(&self) -> Frontend {
        self.connect_with(Options::default())
    }

    pub fn connect_with(&self, opts: Options) -> Frontend {
        Frontend::connect_with(&self.socket, opts).unwrap_or_else(|e| {
            panic!("connect: {e}; daemon log:\n{}", self.log());
        })
    }

    /// Sends `signal` and waits for the exit.
    pub fn signal_and_wait(&mut self, signal: i32) -> ExitStatus {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        let r = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(r, 0, "kill: {}", std::io::Error::last_os_error());
        self.wait_exit(TIMEOUT).unwrap_or_else(|| {
            panic!(
                "daemon did not exit within {TIMEOUT:?} after signal {signal}; log:\n{}",
                self.log()
            )
        })
    }

    /// Waits until the socket file exists, without connecting.
    pub fn wait_socket(&mut self) {
        if let Err(e) = self.process.wait_socket(TIMEOUT) {
            panic!("{e}");
        }
    }

    /// Waits up to `timeout` for the daemon to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process.wait_exit(timeout)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.process.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- daemon log ({}) ----\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}

/// The metrics file at `path`, if there is one yet. The daemon renames each file into place
/// whole, so one that exists always parses.
pub fn read_metrics(path: &Path) -> Option<Metrics> {
    match Metrics::read(path) {
        Ok(m) => Some(m),
        Err(pmem_metrics::ReadError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// What a daemon run that is expected to end by itself produced.
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs the daemon with `args` (default log level) and waits up to [`TIMEOUT`] for it to
/// exit; kills it and panics if it does not (for example because it started serving).
pub fn run(args: &[String]) -> Outcome {
    run_with(args, |_| {})
}

/// [`run`], with `setup` changing the command first (environment, descriptors to pass).
pub fn run_with(args: &[String], setup: impl FnOnce(&mut Command)) -> Outcome {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    setup(&mut cmd);
    run_command(cmd, args)
}

/// [`run`] as a socket-activated process: LISTEN_FDS=`fds` and LISTEN_PID set to the daemon's
/// own pid, which only a shell that execs the daemon knows in advance (`$$`). `setup` can
/// pass the descriptors (from 3 on).
pub fn run_activated(fds: &str, args: &[String], setup: impl FnOnce(&mut Command)) -> Outcome {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(BIN)
        .args(args)
        .env("LISTEN_FDS", fds);
    setup(&mut cmd);
    run_command(cmd, args)
}

/// Runs `cmd` (the daemon with `args`, default log level) as [`run`] does.
fn run_command(mut cmd: Command, args: &[String]) -> Outcome {
    cmd.env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn daemon");
    let pid = child.id() as i32;
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut o = String::new();
        let mut e = String::new();
        let _ = out.read_to_string(&mut o);
        let _ = err.read_to_string(&mut e);
        let _ = tx.send((child.wait(), o, e));
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok((status, stdout, stderr)) => Outcome {
            status: status.expect("wait"),
            stdout,
            stderr,
        },
        Err(_) => {
            // SAFETY: kill(2) on the pid of our own child (the reaper thread still owns it).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let (status, _, stderr) = rx.recv().expect("reaper");
            panic!(
                "daemon {args:?} did not exit within {TIMEOUT:?} (killed: {:?}); stderr:\n{stderr}",
                status.map(|s| s.signal())
            );
        }
    }
}

/// Asserts the contract for a run-time failure: exit status 1 and exactly one line on
/// stderr, `vhost-user-pmem: error: ...`. Returns that line.
pub fn assert_error(o: &Outcome) -> String {
    assert_refused(o, 1)
}

/// Asserts the contract for a usage error found after clap (a conflict of options, a bad
/// value, a bad inherited socket): exit status 2 and exactly one line on stderr,
/// `vhost-user-pmem: error: ...`. Returns that line.
pub fn assert_usage_error(o: &Outcome) -> String {
    assert_refused(o, 2)
}

/// Exit status `code` and exactly one line, `vhost-user-pmem: error: ...`, on stderr.
pub fn assert_refused(o: &Outcome, code: i32) -> String {
    assert_eq!(
        o.code(),
        Some(code),
        "expected exit status {code}, got {:?}; stderr:\n{}",
        o.status,
        o.stderr
    );
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one line on stderr, got:\n{}",
        o.stderr
    );
    assert!(
        lines[0].starts_with("vhost-user-pmem: error: "),
        "stderr line lacks the `vhost-user-pmem: error: ` prefix: {:?}",
        lines[0]
    );
    lines[0].to_string()
}

/// A file's observable state, to prove a refused run left it alone.
#[derive(Debug, PartialEq, Eq)]
pub enum FileState {
    Missing,
    Dir { entries: Vec<String> },
    File { len: u64, data: Vec<u8> },
}

impl FileState {
    pub fn of(path: &Path) -> FileState {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileState::Missing,
            Err(e) => panic!("stat {}: {e}", path.display()),
            Ok(m) if m.is_dir() => {
                let mut entries: Vec<String> = std::fs::read_dir(path)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                entries.sort();
                FileState::Dir { entries }
            }
            Ok(m) => FileState::File {
                len: m.len(),
                data: std::fs::read(path).unwrap(),
            },
        }
    }
}

/// Allocated bytes of a file (st_blocks is in 512-byte units).
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}
