//! The real daemon binary for one flush mode, through the project's one launcher
//! (`pmem_frontend::daemon`), with the benchmark's own check on its metrics.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use pmem_frontend::daemon::{DaemonCommand, DaemonProcess, Side};
use pmem_metrics::Metrics;

use crate::BenchError;

const START_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Daemon(DaemonProcess);

fn daemon_err(e: pmem_frontend::daemon::DaemonError) -> BenchError {
    BenchError::Daemon(e.to_string())
}

impl Daemon {
    /// Starts `bin` on `file` with `--flush-mode mode` and `extra` and waits until it serves.
    /// With `metrics`, the daemon writes its metrics there on SIGUSR1 (and nowhere else).
    pub fn start(
        bin: &Path,
        mode: &str,
        extra: &[String],
        file: &Path,
        socket: &Path,
        metrics: Option<&Path>,
        log: &Path,
    ) -> Result<Daemon, BenchError> {
        let mut d = Daemon::spawn(bin, mode, extra, file, socket, metrics, log)?;
        d.wait_serving()?;
        Ok(d)
    }

    /// Like [`Daemon::start`], without waiting: for timing the start-up, and for starting
    /// many daemons at once.
    pub fn spawn(
        bin: &Path,
        mode: &str,
        extra: &[String],
        file: &Path,
        socket: &Path,
        metrics: Option<&Path>,
        log: &Path,
    ) -> Result<Daemon, BenchError> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = DaemonCommand::new(bin, Side::Listen(socket.to_path_buf()), file)
            .args(["--flush-mode", mode])
            .args(extra)
            .log(log)
            .append_log(true);
        if let Some(m) = metrics {
            cmd = cmd.metrics(m);
        }
        Ok(Daemon(cmd.spawn().map_err(daemon_err)?))
    }

    /// Whether the socket takes a connection yet (the daemon is listening). The connection is
    /// closed at once; the daemon takes it as an ordinary disconnect, as it does the probe of
    /// [`Daemon::wait_serving`].
    pub fn accepts(&self) -> bool {
        UnixStream::connect(self.0.socket()).is_ok()
    }

    /// An error if the daemon has exited.
    pub fn check_running(&mut self) -> Result<(), BenchError> {
        match self.0.try_wait() {
            None => Ok(()),
            Some(status) => Err(BenchError::Daemon(format!(
                "the daemon exited with {status}; see {}",
                self.0.log_path().display()
            ))),
        }
    }

    /// Waits until the daemon answers GET_FEATURES on its socket.
    pub fn wait_serving(&mut self) -> Result<(), BenchError> {
        self.0.wait_serving(START_TIMEOUT).map_err(daemon_err)
    }

    pub fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// Fresh metrics (SIGUSR1, then a report with a higher `seq`), which must count `requests`
    /// requests: every request the benchmark has seen answered, which the daemon counts before
    /// it answers.
    pub fn metrics(&mut self, requests: u64) -> Result<Metrics, BenchError> {
        let m = self.0.snapshot(START_TIMEOUT).map_err(daemon_err)?;
        if m.counters.requests != requests {
            return Err(BenchError::Daemon(format!(
                "the daemon's metrics count {} requests, the benchmark saw {requests} answered",
                m.counters.requests
            )));
        }
        Ok(m)
    }

    /// SIGTERM, and the exit status (SIGKILL after a grace period).
    pub fn stop(mut self) -> Result<ExitStatus, BenchError> {
        self.0.stop(STOP_TIMEOUT).map_err(daemon_err)
    }
}
