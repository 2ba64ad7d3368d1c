//! The command line: clap arguments, and the one place that validates them into a
//! [`RunSpec`]. Conflicts that clap can state (an option that needs another, two that
//! exclude each other) are declared on the arguments, so they fail with clap's message and
//! exit status 2; the rest are checked in [`RunArgs::spec`] with a message naming the options.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use vhost_user_pmem::size::ByteSize;

use pmem_frontend::daemon::is_socket;

use crate::spec::{
    Accel, Daemon, DaemonEnd, Device, Expect, Guest, GuestEnd, HostFs, Launch, Libvirt,
    ManagedDaemon, Qemu, RunSpec, Side, Size, Stop, VhostUser,
};

const HOST_LINK_HELP: &str = "\
Host link: a guest line \"VUP-SYNC ACTION ARGS\" makes the runner act on the host and answer
\"VUP-ACK ACTION TEXT\" or \"VUP-NAK ACTION REASON\" on the guest's console input (ttyS0; QEMU's
stdin is a FIFO, LOGDIR/hostlink). A NAK fails the run. The actions and the catalogue cases
they serve are listed in `vmrun --list-actions`.

Files in LOGDIR: console.log (guest serial console), guest-out.txt (the guest binary's
output, copied by the guest to a second serial port), tap.txt, junit.xml, metrics.txt
(VUP-METRIC lines), hostchecks.txt and hostchecks.result, daemon.log, daemon-metrics.json
(the daemon's metrics, format 2), sync-LABEL.json (host-link snapshots), qemu.log, qemu.cmd,
hostlink.log, faultfs.log and faultfs.counts.json, pids (every child the runner started),
result.txt, after-kill.txt, cpu.txt (host CPU of QEMU and the daemon per thread name over the
boot, from /proc/PID/task/*/schedstat every 200 ms; not with --libvirt); with --libvirt also
virsh.log and libvirt/ (the embedded driver's root, with domain.xml).

Fails (exit 1) on: a timeout; QEMU exiting non-zero; a managed daemon that died, or did not
exit with --expect-daemon-exit's status on SIGTERM; a refused host-link action; no VUP-END
(unless the run ends by a crash or a kill); a guest rc != 0; any \"not ok\"; a missing or
wrong TAP plan; a VUP-HOSTCHECK whose sha256 does not match the image; kernel warnings; any
--expect-* check. Prints \"DEVICE: N passed, M failed\" (M counts \"not ok\" results plus
failed runner checks). Bad options exit 2.

Environment: QEMU and KERNEL (as --qemu and --kernel), VUP_CACHE (the download cache, default
~/.cache/vhost-user-pmem), VUP_KERNEL_SUITE (whose fetched kernel boots without KERNEL or
--kernel: VUP_CACHE/kernel for bookworm-backports, the default, else VUP_CACHE/kernel-SUITE, as
scripts/fetch-kernel.sh --suite SUITE puts it), VUP_BUILD (default log directory root), RUST_LOG (the daemon's
log filter, default info).";

#[derive(Parser, Debug)]
#[command(
    name = "vmrun",
    version,
    about = "Boot a QEMU guest with a virtio-pmem device (this vhost-user daemon or QEMU's \
             built-in device), run the guest test binary inside, and check the result.",
    after_long_help = HOST_LINK_HELP,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
    /// List the host-link actions with the catalogue cases they serve, and exit.
    #[arg(long)]
    pub list_actions: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot QEMU again and again on one image behind ONE daemon; every boot must find the
    /// previous boot's data, and the daemon must have mapped the region once per boot.
    BootLoop(crate::boot_loop::BootLoopArgs),
    /// Minutes of mixed guest load, reboots, kernel crashes and QEMU kills behind ONE daemon;
    /// every boot checks the one before, and the daemon's RSS, threads and fds must not grow.
    Soak(crate::soak::SoakArgs),
    /// One golden image on a loop-mounted xfs, two VMs on it at once through --snapshot
    /// daemons: each sees only its own writes, a read-write daemon is refused meanwhile, and
    /// the golden image is unchanged after both. Needs root.
    SharedImage(crate::shared_image::SharedImageArgs),
    /// Read a daemon metrics file (format 2, checked) and print every field as one
    /// `name value` line (`counters.maps 3`), for scripts that decide from the metrics.
    Metrics {
        /// The file the daemon's --metrics-path names.
        file: PathBuf,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    VhostUser,
    Builtin,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonModeArg {
    /// The daemon listens and QEMU connects.
    Server,
    /// QEMU listens (server=on,wait=on) and the daemon connects (--connect).
    Client,
    /// systemd-socket-activate -l SOCKET listens and execs the daemon with the socket as fd 3
    /// (LISTEN_FDS=1), as the shipped systemd units do; QEMU connects.
    Activated,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndArg {
    Poweroff,
    Reboot,
    Crash,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelArg {
    Tcg,
    Kvm,
    /// KVM if it can boot the guest kernel here (probed once and cached), else TCG.
    Auto,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    // ---- device
    /// vhost-user: this daemon behind QEMU's vhost-user-test-device-pci; builtin: QEMU's own
    /// virtio-pmem-pci on a memory-backend-file (the reference).
    #[arg(
        long,
        value_enum,
        default_value = "vhost-user",
        help_heading = "Device"
    )]
    pub device: Option<DeviceArg>,
    /// Host backing file (default LOGDIR/pmem0.img, or LOGDIR/faultfs.src/pmem0.img with
    /// --faultfs); created sparse when missing.
    #[arg(long, help_heading = "Device")]
    pub image: Option<PathBuf>,
    /// Put the image on a tmpfs of SIZE mounted at LOGDIR/hostfs (removed at the end): a
    /// host file system too small, or just large enough, for the device. Needs root.
    #[arg(long, value_name = "SIZE", help_heading = "Device",
          conflicts_with_all = ["image", "faultfs"])]
    pub host_fs_size: Option<String>,
    /// With --host-fs-size: once the daemon listens (its image prepared), fill the rest of
    /// the tmpfs with LOGDIR/hostfs/filler, as another writer on a shared host disk would.
    #[arg(
        long,
        requires = "host_fs_size",
        conflicts_with = "daemon_mode",
        help_heading = "Device"
    )]
    pub fill_host_fs: bool,
    /// Device size, a power of two with a binary unit (512M, 1G).
    #[arg(long, default_value = "1G", help_heading = "Device")]
    pub size: String,
    /// Daemon binary (default: vhost-user-pmem beside vmrun).
    #[arg(long, help_heading = "Device")]
    pub daemon: Option<PathBuf>,
    /// Extra daemon argument (repeatable), e.g. --daemon-arg=--read-only.
    #[arg(
        long = "daemon-arg",
        allow_hyphen_values = true,
        help_heading = "Device"
    )]
    pub daemon_args: Vec<String>,
    /// Which side listens on the vhost-user socket.
    #[arg(long, value_enum, help_heading = "Device")]
    pub daemon_mode: Option<DaemonModeArg>,
    /// Attach QEMU to a daemon already listening on PATH instead of starting one (its owner
    /// starts, stops and checks it).
    #[arg(long = "socket", value_name = "PATH", help_heading = "Device",
          conflicts_with_all = ["daemon", "daemon_args", "daemon_mode", "keep_daemon",
                                "expect_daemon_exit", "faultfs", "faultfs_bin",
                                "kill_daemon_after_marker", "expect_maps", "expect_readonly_outcome"])]
    pub external_socket: Option<PathBuf>,
    /// Leave the daemon running after QEMU exits (pid in LOGDIR/daemon.pid).
    #[arg(long, conflicts_with = "expect_daemon_exit", help_heading = "Device")]
    pub keep_daemon: bool,
    /// The status the daemon must exit with on SIGTERM (default 0; 1 after an injected
    /// flush failure, whose final fdatasync is refused).
    #[arg(long, value_name = "N", help_heading = "Device")]
    pub expect_daemon_exit: Option<i32>,
    /// Put the image on a faultfs mount (FUSE passthrough that fails fsync on command): the
    /// image's directory is mirrored at LOGDIR/faultfs.mnt. Needs root and /dev/fuse.
    #[arg(long, help_heading = "Device")]
    pub faultfs: bool,
    /// faultfs binary (default: faultfs beside vmrun).
    #[arg(long, requires = "faultfs", help_heading = "Device")]
    pub faultfs_bin: Option<PathBuf>,
    /// Extra options for QEMU's -chardev socket (e.g. reconnect-ms=500).
    #[arg(long, help_heading = "Device")]
    pub chardev_opts: Option<String>,
    /// Log every vhost-user message QEMU sends and every vhost device start/stop (QEMU trace
    /// events) to qemu.log.
    #[arg(long, help_heading = "Device")]
    pub trace_vhost: bool,
    /// Also give the guest QEMU's built-in virtio-pmem, on LOGDIR/pair.img (created at
    /// --size), at PCI address 0000:00:06.0, and pass the guest `--pair-pci 0000:00:06.0`:
    /// one boot with both devices, for the guest suite `paired` (scripts/bench-guest-paired.sh).
    #[arg(long, help_heading = "Device",
          conflicts_with_all = ["libvirt", "host_fs_size", "faultfs", "external_socket"])]
    pub pair_builtin: bool,

    // ---- guest
    /// Arguments of the guest binary, space-separated (sent as vup.args=A,B,C; no commas).
    #[arg(
        long,
        default_value = "",
        allow_hyphen_values = true,
        help_heading = "Guest"
    )]
    pub args: String,
    /// What the guest does after the binary.
    #[arg(long, value_enum, default_value = "poweroff", help_heading = "Guest")]
    pub end: EndArg,
    /// With --end reboot: reboot N times inside one QEMU, then power off; each boot runs the
    /// binary (VUP_BOOT=1..N+1 in its environment).
    #[arg(long, value_name = "N", help_heading = "Guest")]
    pub reboots: Option<u32>,
    /// SIGKILL QEMU as soon as the guest prints STRING.
    #[arg(
        long,
        value_name = "STRING",
        allow_hyphen_values = true,
        help_heading = "Guest"
    )]
    pub kill_after_marker: Option<String>,
    /// SIGKILL the daemon (not QEMU) as soon as the guest prints STRING, then watch QEMU for
    /// --observe seconds and kill it. Fails if more than 2 "VUP-FSYNC n=N ok" lines follow
    /// the kill, or if the guest reports neither a pending nor a failed fsync after it.
    #[arg(
        long,
        value_name = "STRING",
        conflicts_with = "kill_after_marker",
        help_heading = "Guest"
    )]
    pub kill_daemon_after_marker: Option<String>,
    /// With --kill-daemon-after-marker: how long to watch, in seconds.
    #[arg(
        long,
        value_name = "SEC",
        requires = "kill_daemon_after_marker",
        help_heading = "Guest"
    )]
    pub observe: Option<u64>,
    /// The guest kernel (default $KERNEL, else the fetched one in the cache).
    #[arg(long, help_heading = "Guest")]
    pub kernel: Option<PathBuf>,
    /// The initramfs to boot (scripts/build-initramfs.sh makes one).
    #[arg(long, help_heading = "Guest")]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line arguments.
    #[arg(long, allow_hyphen_values = true, help_heading = "Guest")]
    pub append: Option<String>,
    /// Guest RAM.
    #[arg(long, default_value = "1G", help_heading = "Guest")]
    pub memory: String,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64), help_heading = "Guest")]
    pub smp: u32,

    // ---- QEMU
    /// qemu-system-x86_64, 11.0 or later (default $QEMU, else the fetched one in the cache).
    #[arg(long, help_heading = "QEMU")]
    pub qemu: Option<PathBuf>,
    /// Accelerator (default $VUP_ACCEL, else tcg: the nested KVM of the development machines
    /// cannot boot Linux).
    #[arg(long, value_enum, help_heading = "QEMU")]
    pub accel: Option<AccelArg>,
    /// Extra QEMU argument (repeatable).
    #[arg(long = "qemu-arg", allow_hyphen_values = true, help_heading = "QEMU")]
    pub qemu_args: Vec<String>,
    /// Let libvirt start QEMU: the shipped domain template
    /// (contrib/libvirt/vhost-user-pmem-domain.xml) filled in from this run and started by
    /// libvirt's embedded driver (virsh -c 'qemu:///embed?root=LOGDIR/libvirt'); no libvirt
    /// daemon runs. Needs root: virsh runs in a private mount namespace (docs/libvirt.md).
    /// The guest console is a file, so the host link is not available.
    #[arg(long, help_heading = "QEMU",
          conflicts_with_all = ["kill_after_marker", "trace_vhost", "expect_device_starts",
                                "chardev_opts"])]
    pub libvirt: bool,
    /// virsh for --libvirt (default $VUP_CACHE/libvirt/bin/virsh, which
    /// scripts/fetch-libvirt.sh writes).
    #[arg(long, requires = "libvirt", help_heading = "QEMU")]
    pub virsh: Option<PathBuf>,
    /// With --libvirt: the unpacked libvirt whose usr/share virsh is shown at /usr/share,
    /// where libvirt reads its data (default $VUP_CACHE/libvirt/root; / for an installed
    /// libvirt).
    #[arg(long, value_name = "DIR", requires = "libvirt", help_heading = "QEMU")]
    pub libvirt_root: Option<PathBuf>,

    // ---- run
    /// Kill QEMU after SEC seconds, and fail.
    #[arg(long, value_name = "SEC", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..), help_heading = "Run")]
    pub timeout: u64,
    /// Where the logs go (default $VUP_BUILD/runs/<time>-<pid>-<device>).
    #[arg(long, help_heading = "Run")]
    pub log_dir: Option<PathBuf>,
    /// Do not fail on WARNING:/BUG:/Oops in the guest console.
    #[arg(long, help_heading = "Run")]
    pub allow_kernel_warnings: bool,
    /// Stream the guest console to stderr while it runs.
    #[arg(short, long, help_heading = "Run")]
    pub verbose: bool,

    // ---- checks
    /// The daemon's final metrics must count exactly N SHMEM_MAPs accepted by QEMU.
    #[arg(long, value_name = "N", help_heading = "Checks")]
    pub expect_maps: Option<u64>,
    /// QEMU's trace must show exactly N vhost device starts and N SET_FEATURES (turns on
    /// --trace-vhost).
    #[arg(long, value_name = "N", help_heading = "Checks")]
    pub expect_device_starts: Option<u64>,
    /// At least N VUP-HOSTCHECKs must have compared equal with the image.
    #[arg(long, value_name = "N", help_heading = "Checks")]
    pub expect_hostchecks: Option<usize>,
    /// The image's bytes must be the same after the run as before.
    #[arg(long, help_heading = "Checks")]
    pub expect_image_unchanged: bool,
    /// The read-only scenario (a daemon with --daemon-arg=--read-only): when QEMU mapped the
    /// region, the guest's ro_mount_read must have passed; when QEMU 11.1.3 refused the
    /// read-only map (its known "unable to map backing store" error, docs/qemu.md), the guest
    /// must have found the region blank (ro_region skipped).
    #[arg(long, help_heading = "Checks")]
    pub expect_readonly_outcome: bool,
    /// QEMU must die of signal SIG (a number, or a name such as SIGBUS); the guest's missing
    /// end is then expected. What a guest store to a hole does when the host file system under
    /// an --allocate sparse image is full.
    #[arg(long, value_name = "SIG", help_heading = "Checks", value_parser = parse_signal)]
    pub expect_qemu_signal: Option<i32>,
}

/// A signal by number or by name (`SIGBUS`, `BUS`).
fn parse_signal(text: &str) -> Result<i32, String> {
    const NAMES: &[(&str, i32)] = &[
        ("HUP", libc::SIGHUP),
        ("INT", libc::SIGINT),
        ("ILL", libc::SIGILL),
        ("ABRT", libc::SIGABRT),
        ("BUS", libc::SIGBUS),
        ("FPE", libc::SIGFPE),
        ("KILL", libc::SIGKILL),
        ("SEGV", libc::SIGSEGV),
        ("TERM", libc::SIGTERM),
    ];
    if let Ok(n) = text.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(format!("{n} is not a signal number (1-64)"))
        };
    }
    let name = text.strip_prefix("SIG").unwrap_or(text);
    NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .ok_or_else(|| {
            let known: Vec<String> = NAMES.iter().map(|(n, _)| format!("SIG{n}")).collect();
            format!(
                "unknown signal '{text}' (a number, or {})",
                known.join(", ")
            )
        })
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{option}: {reason}")]
    Invalid {
        option: &'static str,
        reason: String,
    },
    #[error("{0}")]
    Conflict(String),
    /// The message names `--size` itself.
    #[error(transparent)]
    Size(#[from] vhost_user_pmem::size::SizeError),
    #[error("{what} {path} {problem} ({hint})")]
    Missing {
        what: &'static str,
        path: PathBuf,
        problem: &'static str,
        hint: &'static str,
    },
}

/// What the defaults come from: the environment and the runner's own location, gathered in
/// one place so that tests can give them.
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    pub qemu: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    /// VUP_KERNEL_SUITE: which fetched kernel is the default (see [`kernel_cache_dir`]).
    pub kernel_suite: Option<String>,
    pub accel: Option<String>,
    pub cache: PathBuf,
    pub build: PathBuf,
    /// The directory holding vmrun, where the daemon and faultfs binaries are by default.
    pub exe_dir: PathBuf,
    pub rust_log: Option<String>,
    /// A name for the default log directory, unique per run (time and pid).
    pub run_name: String,
}

/// The cache directory scripts/fetch-kernel.sh fills for a suite: `kernel` for the default
/// (bookworm-backports), `kernel-SUITE` for any other.
pub fn kernel_cache_dir(suite: Option<&str>) -> String {
    match suite {
        None | Some("bookworm-backports") => "kernel".into(),
        Some(s) => format!("kernel-{s}"),
    }
}

impl Defaults {
    pub fn from_env() -> Defaults {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let home = var("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/root".into());
        let cache = var("VUP_CACHE").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".cache"))
                .join("vhost-user-pmem")
        });
        let exe_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Defaults {
            qemu: var("QEMU").map(PathBuf::from),
            kernel: var("KERNEL").map(PathBuf::from),
            kernel_suite: var("VUP_KERNEL_SUITE").map(|v| v.to_string_lossy().into_owned()),
            accel: var("VUP_ACCEL").map(|v| v.to_string_lossy().into_owned()),
            cache,
            build: var("VUP_BUILD")
                .map(PathBuf::from)
                .unwrap_or_else(|| ".cache".into()),
            exe_dir,
            rust_log: var("RUST_LOG").map(|v| v.to_string_lossy().into_owned()),
            run_name: format!("{secs}-{}", std::process::id()),
        }
    }
}

impl RunArgs {
    /// The arguments of a bare `vmrun`: every default as clap gives it, for callers that
    /// build a run in code (the boot loop) and set only what they need.
    pub fn defaults() -> RunArgs {
        Cli::parse_from(["vmrun"]).run
    }
}

fn invalid(option: &'static str, reason: impl Into<String>) -> CliError {
    CliError::Invalid {
        option,
        reason: reason.into(),
    }
}

/// A size in the daemon's grammar (`vhost_user_pmem::size`), the one the daemon parses too.
pub fn parse_size(option: &'static str, text: &str) -> Result<Size, CliError> {
    let bytes = ByteSize::from_str(text)
        .map_err(|e| invalid(option, e.to_string()))?
        .0;
    if bytes == 0 {
        return Err(invalid(option, "must not be 0"));
    }
    Ok(Size {
        text: text.to_string(),
        bytes,
    })
}

/// The guest binary's arguments, split on whitespace; they travel as `vup.args=a,b,c` on the
/// kernel command line, which has no quoting.
pub fn split_guest_args(text: &str) -> Result<Vec<String>, CliError> {
    if text.contains(',') {
        return Err(invalid(
            "--args",
            "cannot contain commas (they become vup.args=a,b,c on the kernel command line)",
        ));
    }
    if text.contains(['"', '\'']) {
        return Err(invalid("--args", "arguments cannot contain quotes"));
    }
    Ok(text.split_whitespace().map(str::to_string).collect())
}

fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl RunArgs {
    /// Validates everything and resolves the defaults. Checks that need the file system
    /// (binaries exist) come last, so that option errors are reported first.
    pub fn spec(self, d: &Defaults) -> Result<RunSpec, CliError> {
        let size = parse_size("--size", &self.size)?;
        // The daemon's rules (a power of two of at least 2 MiB): QEMU aborts on any other BAR
        // size, and the built-in device gets the same check here as the daemon makes.
        vhost_user_pmem::size::check_requested(size.bytes)?;
        let memory = parse_size("--memory", &self.memory)?;
        let mut args = split_guest_args(&self.args)?;
        if self.pair_builtin {
            if args.iter().any(|a| a.starts_with("--pair-pci")) {
                return Err(CliError::Conflict(
                    "--args cannot set --pair-pci: --pair-builtin sets it".into(),
                ));
            }
            args.extend(["--pair-pci".into(), crate::qemu::pair_pci_addr()]);
        }
        let device_arg = self.device.unwrap_or(DeviceArg::VhostUser);

        if device_arg == DeviceArg::Builtin {
            let vhost_only = [
                ("--daemon", self.daemon.is_some()),
                ("--daemon-arg", !self.daemon_args.is_empty()),
                ("--daemon-mode", self.daemon_mode.is_some()),
                ("--socket", self.external_socket.is_some()),
                ("--keep-daemon", self.keep_daemon),
                ("--expect-daemon-exit", self.expect_daemon_exit.is_some()),
                ("--faultfs", self.faultfs),
                (
                    "--kill-daemon-after-marker",
                    self.kill_daemon_after_marker.is_some(),
                ),
                ("--chardev-opts", self.chardev_opts.is_some()),
                ("--expect-maps", self.expect_maps.is_some()),
                (
                    "--expect-device-starts",
                    self.expect_device_starts.is_some(),
                ),
                ("--expect-readonly-outcome", self.expect_readonly_outcome),
                ("--pair-builtin", self.pair_builtin),
            ];
            if let Some((name, _)) = vhost_only.iter().find(|(_, set)| *set) {
                return Err(CliError::Conflict(format!(
                    "{name} needs --device vhost-user (QEMU's built-in device has no daemon)"
                )));
            }
        }
        if self.libvirt {
            if device_arg == DeviceArg::Builtin {
                return Err(CliError::Conflict(
                    "--libvirt needs --device vhost-user (the template is for this daemon)".into(),
                ));
            }
            if self.daemon_mode == Some(DaemonModeArg::Client) {
                return Err(CliError::Conflict(
                    "--libvirt needs a listening daemon: the template's QEMU connects".into(),
                ));
            }
            if self.end != EndArg::Poweroff {
                return Err(CliError::Conflict(
                    "--libvirt needs --end poweroff: the template ends the domain on a reboot \
                     or crash"
                        .into(),
                ));
            }
        }
        let end = match (self.end, self.reboots) {
            (EndArg::Reboot, n) => GuestEnd::Reboot(n.unwrap_or(1)),
            (_, Some(_)) => return Err(CliError::Conflict("--reboots needs --end reboot".into())),
            (EndArg::Poweroff, None) => GuestEnd::Poweroff,
            (EndArg::Crash, None) => GuestEnd::Crash,
        };
        let stop = match (&self.kill_after_marker, &self.kill_daemon_after_marker) {
            (Some(m), _) => Stop::KillQemuAt(nonempty("--kill-after-marker", m)?),
            (None, Some(m)) => Stop::KillDaemonAt {
                marker: nonempty("--kill-daemon-after-marker", m)?,
                observe: Duration::from_secs(match self.observe {
                    Some(0) => return Err(invalid("--observe", "must be at least 1 second")),
                    Some(s) => s,
                    None => 60,
                }),
            },
            (None, None) => Stop::GuestEnds,
        };
        let accel = match self.accel {
            Some(a) => a,
            None => match d.accel.as_deref() {
                None | Some("tcg") => AccelArg::Tcg,
                Some("kvm") => AccelArg::Kvm,
                Some("auto") => AccelArg::Auto,
                Some(other) => {
                    return Err(invalid(
                        "VUP_ACCEL",
                        format!("must be tcg, kvm or auto, not '{other}'"),
                    ))
                }
            },
        };

        let log_dir = self.log_dir.clone().unwrap_or_else(|| {
            let dev = match device_arg {
                DeviceArg::Builtin => "builtin",
                DeviceArg::VhostUser => "vhost-user",
            };
            d.build.join("runs").join(format!("{}-{dev}", d.run_name))
        });
        let host_fs = match &self.host_fs_size {
            Some(t) => Some(HostFs {
                bytes: parse_size("--host-fs-size", t)?.bytes,
                fill: self.fill_host_fs,
            }),
            None => None,
        };
        let image = self.image.clone().unwrap_or_else(|| {
            if host_fs.is_some() {
                log_dir.join("hostfs").join("pmem0.img")
            } else if self.faultfs {
                log_dir.join("faultfs.src").join("pmem0.img")
            } else {
                log_dir.join("pmem0.img")
            }
        });

        let device = match device_arg {
            DeviceArg::Builtin => Device::Builtin,
            DeviceArg::VhostUser => {
                let daemon = match &self.external_socket {
                    Some(socket) => Daemon::External {
                        socket: socket.clone(),
                    },
                    None => {
                        let bin = self
                            .daemon
                            .clone()
                            .unwrap_or_else(|| d.exe_dir.join("vhost-user-pmem"));
                        let faultfs = if self.faultfs {
                            Some(
                                self.faultfs_bin
                                    .clone()
                                    .unwrap_or_else(|| d.exe_dir.join("faultfs")),
                            )
                        } else {
                            None
                        };
                        if self.daemon_args.iter().any(|a| {
                            a.starts_with("--metrics-path")
                                || a.starts_with("--socket-path")
                                || a.starts_with("--connect")
                                || a.starts_with("--fd")
                                || a.starts_with("--file")
                        }) {
                            return Err(CliError::Conflict(
                                "--daemon-arg cannot set --socket-path, --connect, --fd, --file \
                                 or --metrics-path: the runner sets them (its checks read the \
                                 metrics file)"
                                    .into(),
                            ));
                        }
                        Daemon::Managed(ManagedDaemon {
                            bin,
                            side: match self.daemon_mode {
                                Some(DaemonModeArg::Client) => Side::Connect,
                                Some(DaemonModeArg::Activated) => Side::Activated,
                                Some(DaemonModeArg::Server) | None => Side::Listen,
                            },
                            args: self.daemon_args.clone(),
                            faultfs,
                            end: if self.keep_daemon {
                                DaemonEnd::Keep
                            } else {
                                DaemonEnd::Exit(self.expect_daemon_exit.unwrap_or(0))
                            },
                            rust_log: d.rust_log.clone().unwrap_or_else(|| "info".into()),
                        })
                    }
                };
                Device::VhostUser(VhostUser {
                    daemon,
                    chardev_opts: self.chardev_opts.clone(),
                })
            }
        };
        if matches!(stop, Stop::KillDaemonAt { .. }) && self.keep_daemon {
            return Err(CliError::Conflict(
                "--kill-daemon-after-marker and --keep-daemon exclude each other".into(),
            ));
        }

        let qemu_bin = self
            .qemu
            .clone()
            .or_else(|| d.qemu.clone())
            .unwrap_or_else(|| d.cache.join("qemu/bin/qemu-system-x86_64"));
        let kernel = self
            .kernel
            .clone()
            .or_else(|| d.kernel.clone())
            .unwrap_or_else(|| {
                d.cache
                    .join(kernel_cache_dir(d.kernel_suite.as_deref()))
                    .join("vmlinuz")
            });
        let Some(initrd) = self.initrd.clone() else {
            return Err(invalid(
                "--initrd",
                "is required (scripts/build-initramfs.sh builds one; scripts/run-vm.sh builds and passes it)",
            ));
        };
        let accel = match accel {
            AccelArg::Tcg => Accel::Tcg,
            AccelArg::Kvm => Accel::Kvm,
            AccelArg::Auto => {
                if crate::qemu::kvm_usable(&qemu_bin, &kernel, &d.cache) {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                }
            }
        };

        let spec = RunSpec {
            device,
            image,
            host_fs,
            pair_builtin: self.pair_builtin.then(|| log_dir.join("pair.img")),
            size,
            guest: Guest {
                kernel,
                initrd,
                args,
                end,
                append: self.append.clone(),
                memory,
                smp: self.smp,
            },
            qemu: Qemu {
                bin: qemu_bin,
                accel,
                trace_vhost: self.trace_vhost || self.expect_device_starts.is_some(),
                extra_args: self.qemu_args.clone(),
                launch: if self.libvirt {
                    let root = self
                        .libvirt_root
                        .clone()
                        .unwrap_or_else(|| d.cache.join("libvirt/root"));
                    Launch::Libvirt(Libvirt {
                        virsh: self
                            .virsh
                            .clone()
                            .unwrap_or_else(|| d.cache.join("libvirt/bin/virsh")),
                        share: (root != Path::new("/")).then(|| root.join("usr/share")),
                    })
                } else {
                    Launch::Direct
                },
            },
            stop,
            timeout: Duration::from_secs(self.timeout),
            log_dir,
            expect: Expect {
                maps: self.expect_maps,
                device_starts: self.expect_device_starts,
                hostchecks: self.expect_hostchecks,
                image_unchanged: self.expect_image_unchanged,
                readonly_outcome: self.expect_readonly_outcome,
                qemu_signal: self.expect_qemu_signal,
            },
            allow_kernel_warnings: self.allow_kernel_warnings,
            verbose: self.verbose,
        };
        check_files(&spec)?;
        Ok(spec)
    }
}

fn nonempty(option: &'static str, s: &str) -> Result<String, CliError> {
    if s.is_empty() {
        return Err(invalid(option, "must not be empty"));
    }
    Ok(s.to_string())
}

fn check_files(spec: &RunSpec) -> Result<(), CliError> {
    if !executable(&spec.qemu.bin) {
        return Err(CliError::Missing {
            what: "QEMU",
            problem: "is not an executable file",
            path: spec.qemu.bin.clone(),
            hint: "scripts/fetch-qemu.sh fetches it, or set QEMU= or --qemu",
        });
    }
    if !spec.guest.kernel.is_file() {
        return Err(CliError::Missing {
            what: "the guest kernel",
            problem: "is not a file",
            path: spec.guest.kernel.clone(),
            hint: "scripts/fetch-kernel.sh fetches it, or set KERNEL= or --kernel",
        });
    }
    if !spec.guest.initrd.is_file() {
        return Err(CliError::Missing {
            what: "the initramfs",
            problem: "is not a file",
            path: spec.guest.initrd.clone(),
            hint: "scripts/build-initramfs.sh builds it",
        });
    }
    // SAFETY: geteuid(2) has no failure mode and touches no memory.
    if spec.host_fs.is_some() && unsafe { libc::geteuid() } != 0 {
        return Err(invalid("--host-fs-size", "needs root to mount the tmpfs"));
    }
    if let Launch::Libvirt(l) = &spec.qemu.launch {
        if !executable(&l.virsh) {
            return Err(CliError::Missing {
                what: "virsh",
                problem: "is not an executable file",
                path: l.virsh.clone(),
                hint: "scripts/fetch-libvirt.sh fetches it, or pass --virsh",
            });
        }
        if let Some(share) = l.share.as_ref().filter(|s| !s.join("libvirt").is_dir()) {
            return Err(CliError::Missing {
                what: "libvirt's data",
                problem: "has no libvirt directory",
                path: share.clone(),
                hint:
                    "scripts/fetch-libvirt.sh unpacks it; --libvirt-root / for an installed libvirt",
            });
        }
        // SAFETY: geteuid(2) has no failure mode and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            return Err(invalid(
                "--libvirt",
                "needs root: virsh runs under unshare --mount with libvirt's files bind-mounted",
            ));
        }
    }
    if let Some(m) = spec.managed_daemon() {
        if !executable(&m.bin) {
            return Err(CliError::Missing {
                what: "the daemon",
                problem: "is not an executable file",
                path: m.bin.clone(),
                hint: "cargo build --release -p vhost-user-pmem, or pass --daemon",
            });
        }
        if let Some(f) = &m.faultfs {
            if !executable(f) {
                return Err(CliError::Missing {
                    what: "faultfs",
                    problem: "is not an executable file",
                    path: f.clone(),
                    hint: "cargo build --release -p faultfs, or pass --faultfs-bin",
                });
            }
            if !Path::new("/dev/fuse").exists() {
                return Err(invalid("--faultfs", "needs /dev/fuse"));
            }
        }
    }
    if let Device::VhostUser(VhostUser {
        daemon: Daemon::External { socket },
        ..
    }) = &spec.device
    {
        if !is_socket(socket) {
            return Err(invalid(
                "--socket",
                format!(
                    "{} is not a socket; start the daemon first",
                    socket.display()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Real files for the binaries the spec checks for: this test binary stands in for every
    /// executable (only their existence is checked here).
    fn defaults(dir: &Path) -> Defaults {
        let exe = std::env::current_exe().unwrap();
        for name in ["vhost-user-pmem", "faultfs", "qemu"] {
            let _ = std::fs::remove_file(dir.join(name));
            std::os::unix::fs::symlink(&exe, dir.join(name)).unwrap();
        }
        std::fs::write(dir.join("vmlinuz"), b"k").unwrap();
        std::fs::write(dir.join("initrd"), b"i").unwrap();
        Defaults {
            qemu: Some(dir.join("qemu")),
            kernel: Some(dir.join("vmlinuz")),
            cache: dir.join("cache"),
            build: dir.join("build"),
            exe_dir: dir.to_path_buf(),
            run_name: "t".into(),
            ..Defaults::default()
        }
    }

    #[test]
    fn kernel_cache_dir_follows_the_suite() {
        assert_eq!(kernel_cache_dir(None), "kernel");
        assert_eq!(kernel_cache_dir(Some("bookworm-backports")), "kernel");
        assert_eq!(kernel_cache_dir(Some("sid")), "kernel-sid");
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vmrun").chain(args.iter().copied()))
    }

    fn spec(dir: &Path, args: &[&str]) -> Result<RunSpec, CliError> {
        let initrd = dir.join("initrd").display().to_string();
        let mut all = vec!["--initrd", initrd.as_str()];
        all.extend_from_slice(args);
        parse(&all).expect("clap accepts").run.spec(&defaults(dir))
    }

    #[test]
    fn pair_builtin_adds_the_image_and_tells_the_guest_where_the_device_is() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let s = spec(
            d,
            &[
                "--pair-builtin",
                "--log-dir",
                "/l",
                "--args",
                "--mkfs paired",
            ],
        )
        .unwrap();
        assert_eq!(s.pair_builtin.as_deref(), Some(Path::new("/l/pair.img")));
        assert_eq!(
            s.guest.args,
            ["--mkfs", "paired", "--pair-pci", "0000:00:06.0"]
        );
        let e = spec(d, &["--pair-builtin", "--device", "builtin"]).unwrap_err();
        assert!(
            e.to_string()
                .contains("--pair-builtin needs --device vhost-user"),
            "{e}"
        );
        let e = spec(d, &["--pair-builtin", "--args", "--pair-pci=x paired"]).unwrap_err();
        assert!(e.to_string().contains("--pair-builtin sets it"), "{e}");
        assert!(spec(d, &[]).unwrap().pair_builtin.is_none());
    }

    #[test]
    fn an_activated_daemon_listens_through_the_activator_and_no_fd_option_slips_in() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path(), &["--daemon-mode", "activated"]).unwrap();
        assert_eq!(s.managed_daemon().unwrap().side, Side::Activated);
        let e = spec(dir.path(), &["--daemon-arg=--fd=3"]).unwrap_err();
        assert!(e.to_string().contains("--fd"), "{e}");
    }

    #[test]
    fn libvirt_takes_its_files_from_the_cache_and_refuses_what_the_template_cannot_do() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let e = spec(d, &["--libvirt"]).unwrap_err();
        assert!(e.to_string().contains("scripts/fetch-libvirt.sh"), "{e}");
        std::fs::create_dir_all(d.join("cache/libvirt/bin")).unwrap();
        std::os::unix::fs::symlink(d.join("qemu"), d.join("cache/libvirt/bin/virsh")).unwrap();
        let e = spec(d, &["--libvirt"]).unwrap_err();
        assert!(e.to_string().contains("libvirt's data"), "{e}");
        std::fs::create_dir_all(d.join("cache/libvirt/root/usr/share/libvirt")).unwrap();
        // SAFETY: geteuid(2) has no failure mode and touches no memory.
        if unsafe { libc::geteuid() } == 0 {
            let s = spec(d, &["--libvirt"]).unwrap();
            assert_eq!(
                s.qemu.launch,
                Launch::Libvirt(Libvirt {
                    virsh: d.join("cache/libvirt/bin/virsh"),
                    share: Some(d.join("cache/libvirt/root/usr/share")),
                })
            );
            let s = spec(
                d,
                &[
                    "--libvirt",
                    "--libvirt-root",
                    "/",
                    "--virsh",
                    "/usr/bin/true",
                ],
            );
            let Launch::Libvirt(l) = s.unwrap().qemu.launch else {
                panic!("not libvirt")
            };
            assert_eq!(l.share, None, "an installed libvirt needs no overlay");
        } else {
            let e = spec(d, &["--libvirt"]).unwrap_err();
            assert!(e.to_string().contains("needs root"), "{e}");
        }
        for (args, word) in [
            (
                &["--libvirt", "--device", "builtin"][..],
                "--device vhost-user",
            ),
            (
                &["--libvirt", "--daemon-mode", "client"],
                "listening daemon",
            ),
            (&["--libvirt", "--end", "reboot"], "--end poweroff"),
        ] {
            let e = spec(d, args).unwrap_err();
            assert!(e.to_string().contains(word), "{args:?}: {e}");
        }
        for args in [
            &["--libvirt", "--kill-after-marker", "x"][..],
            &["--libvirt", "--chardev-opts", "reconnect-ms=1"],
            &["--virsh", "/v"],
        ] {
            assert_eq!(parse(args).unwrap_err().exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn defaults_give_a_listening_managed_daemon_that_must_exit_0() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path(), &[]).unwrap();
        let m = s.managed_daemon().expect("managed");
        assert_eq!(m.side, Side::Listen);
        assert_eq!(m.end, DaemonEnd::Exit(0));
        assert_eq!(m.rust_log, "info", "flush debug logging is off by default");
        assert_eq!(s.size.bytes, 1 << 30);
        assert_eq!(s.stop, Stop::GuestEnds);
        assert_eq!(s.guest.end, GuestEnd::Poweroff);
        assert_eq!(s.log_dir, dir.path().join("build/runs/t-vhost-user"));
        assert_eq!(s.image, s.log_dir.join("pmem0.img"));
    }

    #[test]
    fn clap_refuses_what_it_can_state() {
        for args in [
            &["--socket", "/s", "--faultfs"][..],
            &["--socket", "/s", "--daemon-mode", "client"],
            &[
                "--kill-after-marker",
                "a",
                "--kill-daemon-after-marker",
                "b",
            ],
            &["--observe", "5"],
            &["--faultfs-bin", "/f"],
            &["--keep-daemon", "--expect-daemon-exit", "1"],
            &["--device", "qemu"],
            &["--timeout", "0"],
            &["--smp", "0"],
        ] {
            let e = parse(args).expect_err(&format!("{args:?} must be refused"));
            assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
        }
    }

    #[test]
    fn semantic_conflicts_name_the_options() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&[&str], &str); 8] = [
            (
                &["--device", "builtin", "--faultfs"],
                "--faultfs needs --device vhost-user",
            ),
            (
                &["--device", "builtin", "--daemon-mode", "client"],
                "--daemon-mode needs",
            ),
            (
                &["--device", "builtin", "--expect-maps", "1"],
                "--expect-maps needs",
            ),
            (&["--reboots", "2"], "--reboots needs --end reboot"),
            (&["--args", "a,b"], "cannot contain commas"),
            (&["--size", "1Q"], "--size"),
            (&["--daemon-arg=--metrics-path=/x"], "the runner sets them"),
            (
                &["--kill-daemon-after-marker", "M", "--observe", "0"],
                "--observe",
            ),
        ];
        for (args, want) in cases {
            let e = spec(dir.path(), args).expect_err(&format!("{args:?}"));
            assert!(e.to_string().contains(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn sizes_follow_the_daemons_rules_for_both_devices() {
        let dir = tempfile::tempdir().unwrap();
        for dev in ["vhost-user", "builtin"] {
            let e = spec(dir.path(), &["--device", dev, "--size", "3M"]).unwrap_err();
            assert!(e.to_string().contains("not a power of two"), "{dev}: {e}");
            assert!(e.to_string().contains("2 MiB and 4 MiB"), "{dev}: {e}");
            let e = spec(dir.path(), &["--device", dev, "--size", "1M"]).unwrap_err();
            assert!(e.to_string().contains("below the minimum"), "{dev}: {e}");
        }
    }

    #[test]
    fn the_typed_spec_follows_the_options() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(
            dir.path(),
            &[
                "--daemon-mode",
                "client",
                "--faultfs",
                "--expect-daemon-exit",
                "1",
                "--end",
                "reboot",
                "--reboots",
                "2",
                "--args",
                "--mkfs  flush",
                "--expect-device-starts",
                "2",
            ],
        )
        .unwrap();
        let m = s.managed_daemon().unwrap();
        assert_eq!(m.side, Side::Connect);
        assert_eq!(m.end, DaemonEnd::Exit(1));
        assert_eq!(m.faultfs, Some(dir.path().join("faultfs")));
        assert_eq!(s.image, s.log_dir.join("faultfs.src/pmem0.img"));
        assert_eq!(s.guest.end, GuestEnd::Reboot(2));
        assert_eq!(s.guest.args, ["--mkfs", "flush"]);
        assert!(s.qemu.trace_vhost, "--expect-device-starts needs the trace");
        let k = spec(
            dir.path(),
            &["--kill-daemon-after-marker", "M", "--observe", "7"],
        )
        .unwrap();
        assert_eq!(
            k.stop,
            Stop::KillDaemonAt {
                marker: "M".into(),
                observe: Duration::from_secs(7)
            }
        );
    }

    #[test]
    fn missing_binaries_are_named_with_how_to_get_them() {
        let dir = tempfile::tempdir().unwrap();
        let e = spec(dir.path(), &["--daemon", "/nonexistent/daemon"]).unwrap_err();
        assert!(
            e.to_string()
                .contains("cargo build --release -p vhost-user-pmem"),
            "{e}"
        );
        let e = spec(dir.path(), &["--socket", "/nonexistent.sock"]).unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");
        let initrd_missing = parse(&[])
            .unwrap()
            .run
            .spec(&defaults(dir.path()))
            .unwrap_err();
        assert!(
            initrd_missing.to_string().contains("--initrd"),
            "{initrd_missing}"
        );
    }
}
