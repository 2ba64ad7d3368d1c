//! Many QEMU runs behind ONE daemon: the set-up `vmrun boot-loop` and `vmrun soak` share. The
//! daemon is started here, not by each run, because what these commands test is that it
//! outlives every QEMU: each run attaches to it as an external daemon (`--socket`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use pmem_frontend::daemon::{DaemonCommand, DaemonProcess, Side};

use crate::cli::{AccelArg, Defaults, RunArgs};

/// The options both commands take.
#[derive(Args, Debug, Clone)]
pub struct OneDaemonArgs {
    /// Device size.
    #[arg(long, default_value = "1G")]
    pub size: String,
    /// Where the logs go (emptied first; default $VUP_BUILD/<command>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The initramfs to boot.
    #[arg(long)]
    pub initrd: PathBuf,
    /// Daemon binary (default: vhost-user-pmem beside vmrun).
    #[arg(long)]
    pub daemon: Option<PathBuf>,
    /// qemu-system-x86_64 (default $QEMU, else the fetched one).
    #[arg(long)]
    pub qemu: Option<PathBuf>,
    /// The guest kernel (default $KERNEL, else the fetched one).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub accel: Option<AccelArg>,
    /// Start the daemon as the shipped systemd units do, by socket activation:
    /// `systemd-socket-activate -l SOCKET` listens and execs it with the socket as fd 3.
    #[arg(long)]
    pub socket_activate: bool,
}

/// The running daemon, its socket (in a private directory removed on drop) and the image.
pub struct OneDaemon {
    pub daemon: DaemonProcess,
    pub socket: PathBuf,
    pub image: PathBuf,
    pub out: PathBuf,
    _sockdir: tempfile::TempDir,
}

impl OneDaemon {
    /// Empties the log directory (`name` under $VUP_BUILD unless --out), then starts the
    /// daemon on `out/pmem0.img` with its metrics at `out/daemon-metrics.json` (written at
    /// start, on SIGUSR1 and at exit only, so that an idle daemon never wakes).
    pub fn start(a: &OneDaemonArgs, d: &Defaults, name: &str) -> Result<OneDaemon, String> {
        let out = a.out.clone().unwrap_or_else(|| d.build.join(name));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).map_err(|e| format!("create {}: {e}", out.display()))?;
        let out = out.canonicalize().map_err(|e| e.to_string())?;
        let sockdir = tempfile::Builder::new()
            .prefix(&format!("vmrun-{name}."))
            .tempdir_in("/tmp")
            .map_err(|e| format!("create a socket directory: {e}"))?;
        let socket = sockdir.path().join("pmem0.sock");
        let image = out.join("pmem0.img");
        let bin = a
            .daemon
            .clone()
            .unwrap_or_else(|| d.exe_dir.join("vhost-user-pmem"));
        let side = if a.socket_activate {
            Side::Activated(socket.clone())
        } else {
            Side::Listen(socket.clone())
        };
        let cmd = DaemonCommand::new(bin, side, &image)
            .size(&a.size)
            .metrics(out.join("daemon-metrics.json"))
            .log(out.join("daemon.log"))
            .rust_log(d.rust_log.clone().unwrap_or_else(|| "info".into()))
            .die_with_parent(libc::SIGTERM);
        eprintln!("{name}: starting daemon: {}", cmd.display());
        let mut daemon = cmd.spawn().map_err(|e| e.to_string())?;
        daemon
            .wait_socket(Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        Ok(OneDaemon {
            daemon,
            socket,
            image,
            out,
            _sockdir: sockdir,
        })
    }

    /// The arguments of one run on this daemon: the guest gets `guest_args`, the logs go to
    /// `out/<run>`; the caller sets the stop policy.
    pub fn run_args(&self, a: &OneDaemonArgs, run: &str, guest_args: String) -> RunArgs {
        RunArgs {
            image: Some(self.image.clone()),
            size: a.size.clone(),
            external_socket: Some(self.socket.clone()),
            args: guest_args,
            kernel: a.kernel.clone(),
            initrd: Some(a.initrd.clone()),
            qemu: a.qemu.clone(),
            accel: a.accel,
            log_dir: Some(self.log_dir(run)),
            ..RunArgs::defaults()
        }
    }

    pub fn log_dir(&self, run: &str) -> PathBuf {
        self.out.join(run)
    }
}

/// The closing line (`NAME: P passed, F failed`, which CI log readers look for) and the exit
/// status of a command over many runs; a set-up error counts as one failure.
pub fn closing_line(name: &str, result: Result<(usize, usize), String>) -> i32 {
    let (passed, failed) = result.unwrap_or_else(|e| {
        eprintln!("{name}: error: {e}");
        (0, 1)
    });
    println!("{name}: {passed} passed, {failed} failed");
    i32::from(failed > 0)
}
