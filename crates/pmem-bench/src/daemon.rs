//! Starting and stopping the real daemon binary for one flush mode.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use pmem_metrics::Metrics;

use crate::BenchError;

const START_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Daemon {
    child: Option<Child>,
    /// The --metrics-path file, refreshed with SIGUSR1.
    metrics: Option<PathBuf>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `bin` on `file` with `--flush-mode mode` and waits until it serves. With
    /// `metrics`, the daemon writes its metrics there on SIGUSR1 (and nowhere else).
    pub fn start(
        bin: &Path,
        mode: &str,
        file: &Path,
        socket: &Path,
        metrics: Option<&Path>,
        log: &Path,
    ) -> Result<Daemon, BenchError> {
        let _ = std::fs::remove_file(socket);
        let log_file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(BenchError::io(format!("open {}", log.display())))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--socket-path")
            .arg(socket)
            .arg("--file")
            .arg(file)
            .args(["--flush-mode", mode]);
        if let Some(m) = metrics {
            cmd.arg("--metrics-path")
                .arg(m)
                .args(["--metrics-interval", "0"]);
        }
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(BenchError::io(format!("start {}", bin.display())))?;
        let mut d = Daemon {
            child: Some(child),
            metrics: metrics.map(Path::to_path_buf),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = d.child_mut().try_wait().ok().flatten() {
                return Err(BenchError::Daemon(format!(
                    "{} --flush-mode {mode} exited with {status} before serving; see {}",
                    bin.display(),
                    log.display()
                )));
            }
            if pmem_frontend::probe(socket, Duration::from_millis(200)).is_ok() {
                return Ok(d);
            }
            if Instant::now() > deadline {
                return Err(BenchError::Daemon(format!(
                    "the daemon did not serve on {} within {START_TIMEOUT:?}; see {}",
                    socket.display(),
                    log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("daemon running")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped (we still
        // hold it in `child`).
        unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
    }

    /// Asks for the metrics with SIGUSR1 and waits for the report it writes (a `seq` above the
    /// last one), which must count `requests` requests: every request the benchmark has seen
    /// answered, which the daemon counts before it answers.
    pub fn metrics(&self, requests: u64) -> Result<Metrics, BenchError> {
        let Some(path) = &self.metrics else {
            return Err(BenchError::Daemon("started without --metrics-path".into()));
        };
        let seq = Metrics::read(path).map_or(0, |m| m.seq);
        self.signal(libc::SIGUSR1);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(m) = Metrics::read(path).ok().filter(|m| m.seq > seq) {
                if m.counters.requests != requests {
                    return Err(BenchError::Daemon(format!(
                        "{} counts {} requests, the benchmark saw {requests} answered",
                        path.display(),
                        m.counters.requests
                    )));
                }
                return Ok(m);
            }
            if Instant::now() > deadline {
                return Err(BenchError::Daemon(format!(
                    "{} was not rewritten after SIGUSR1; see {}",
                    path.display(),
                    self.log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGTERM, and the exit status (SIGKILL after a grace period).
    pub fn stop(mut self) -> Result<ExitStatus, BenchError> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut child = self.child.take().expect("daemon running");
        loop {
            if let Some(s) = child
                .try_wait()
                .map_err(BenchError::io("wait for the daemon".to_string()))?
            {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(BenchError::Daemon(format!(
                    "the daemon did not exit within {STOP_TIMEOUT:?} of SIGTERM; see {}",
                    self.log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
