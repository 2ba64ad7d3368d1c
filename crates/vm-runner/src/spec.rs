//! One VM run, described by types in which the illegal combinations cannot be written: a
//! device is built-in or vhost-user; a vhost-user daemon is started here (listening or
//! connecting, optionally on faultfs) or is someone else's; a run stops in exactly one way.
//! `cli.rs` turns the command line into a [`RunSpec`]; `run.rs` carries it out.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    pub device: Device,
    /// The host backing file.
    pub image: PathBuf,
    /// A tmpfs of its own for the image, at LOGDIR/hostfs.
    pub host_fs: Option<HostFs>,
    /// A second pmem device beside the vhost-user one: QEMU's built-in device on this image,
    /// of the same size, at [`crate::qemu::pair_pci_addr`], so that one guest can measure
    /// both devices in alternation (the guest suite `paired`).
    pub pair_builtin: Option<PathBuf>,
    /// The device size, as given (passed to the daemon in its own grammar) and in bytes.
    pub size: Size,
    pub guest: Guest,
    pub qemu: Qemu,
    pub stop: Stop,
    pub timeout: Duration,
    pub log_dir: PathBuf,
    pub expect: Expect,
    pub allow_kernel_warnings: bool,
    /// Copy the guest console to stderr while it runs.
    pub verbose: bool,
}

/// A host file system smaller (or barely larger) than the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFs {
    pub bytes: u64,
    /// Once the daemon has prepared the image, fill what is left with a file (what another
    /// tenant of the host disk does), so that any block a guest store needs later is missing.
    pub fill: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Size {
    pub text: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Device {
    /// QEMU's own `virtio-pmem-pci` on a `memory-backend-file`: the reference.
    Builtin,
    /// This daemon behind `vhost-user-test-device-pci`.
    VhostUser(VhostUser),
}

#[derive(Debug, Clone, PartialEq)]
pub struct VhostUser {
    pub daemon: Daemon,
    /// More `-chardev socket` options (e.g. `reconnect-ms=500`).
    pub chardev_opts: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Daemon {
    /// Started and stopped by the runner, which also checks how it ended.
    Managed(ManagedDaemon),
    /// Already listening on this socket; its owner starts, stops and checks it.
    External { socket: PathBuf },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ManagedDaemon {
    pub bin: PathBuf,
    pub side: Side,
    /// More daemon arguments (after `--socket-path`/`--connect`, `--file`, `--size`,
    /// `--metrics-path`).
    pub args: Vec<String>,
    /// The image lives on a faultfs mount, whose fsyncs the host link can make fail.
    pub faultfs: Option<PathBuf>,
    /// What the daemon's end must look like.
    pub end: DaemonEnd,
    /// `RUST_LOG` for the daemon.
    pub rust_log: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The daemon listens (`--socket-path`) and QEMU connects: the default.
    Listen,
    /// QEMU listens (`server=on,wait=on`) and the daemon connects (`--connect`).
    Connect,
    /// `systemd-socket-activate -l SOCKET` listens and execs the daemon with the socket as
    /// fd 3 (LISTEN_FDS=1): how the shipped systemd units start it.
    Activated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonEnd {
    /// SIGTERM after QEMU exits; the daemon must exit with this status.
    Exit(i32),
    /// Left running after QEMU exits (pid in LOGDIR/daemon.pid); not checked.
    Keep,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Arguments of the guest binary (sent as `vup.args=a,b,c`).
    pub args: Vec<String>,
    pub end: GuestEnd,
    pub append: Option<String>,
    pub memory: Size,
    pub smp: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEnd {
    Poweroff,
    /// `reboot -f` this many times inside one QEMU, then power off.
    Reboot(u32),
    /// `echo c > /proc/sysrq-trigger`: a kernel crash with no flush.
    Crash,
}

impl GuestEnd {
    pub fn word(self) -> &'static str {
        match self {
            GuestEnd::Poweroff => "poweroff",
            GuestEnd::Reboot(_) => "reboot",
            GuestEnd::Crash => "crash",
        }
    }

    /// Boots the guest binary runs in when nothing stops QEMU early.
    pub fn boots(self) -> usize {
        match self {
            GuestEnd::Reboot(n) => n as usize + 1,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Qemu {
    pub bin: PathBuf,
    pub accel: Accel,
    /// QEMU trace events for every vhost-user message and vhost device start/stop.
    pub trace_vhost: bool,
    pub extra_args: Vec<String>,
    pub launch: Launch,
}

/// Who starts QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Launch {
    /// The runner, with the command line of `qemu.rs`.
    Direct,
    /// libvirt's embedded driver, from the shipped domain template (`libvirt.rs`).
    Libvirt(Libvirt),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Libvirt {
    /// virsh (the unpacked one's launcher, or an installed virsh).
    pub virsh: PathBuf,
    /// An unpacked libvirt's usr/share, overlaid on /usr/share for virsh; `None` for an
    /// installed libvirt.
    pub share: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    pub fn word(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// How the run ends, besides the guest ending by itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Stop {
    /// The guest ends as [`GuestEnd`] says.
    GuestEnds,
    /// SIGKILL QEMU as soon as the guest prints this.
    KillQemuAt(String),
    /// SIGKILL the daemon as soon as the guest prints this, watch QEMU for `observe`, then
    /// kill it. Needs a managed daemon.
    KillDaemonAt { marker: String, observe: Duration },
}

/// Checks beyond the guest's own results.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expect {
    /// SHMEM_MAPs the frontend accepted, from the daemon's final metrics.
    pub maps: Option<u64>,
    /// vhost device starts and SET_FEATURES messages, from QEMU's trace.
    pub device_starts: Option<u64>,
    /// At least this many VUP-HOSTCHECKs compared equal with the image.
    pub hostchecks: Option<usize>,
    /// The image's bytes are the same after the run as before it.
    pub image_unchanged: bool,
    /// The read-only scenario (see `checks::readonly_outcome`).
    pub readonly_outcome: bool,
    /// QEMU must die of this signal (SIGBUS: a guest store to a hole the full host file system
    /// cannot fill); the guest then cannot finish, and that is not a failure.
    pub qemu_signal: Option<i32>,
}

impl RunSpec {
    pub fn device_name(&self) -> &'static str {
        match self.device {
            Device::Builtin => "builtin",
            Device::VhostUser(_) => "vhost-user",
        }
    }

    pub fn managed_daemon(&self) -> Option<&ManagedDaemon> {
        match &self.device {
            Device::VhostUser(VhostUser {
                daemon: Daemon::Managed(m),
                ..
            }) => Some(m),
            _ => None,
        }
    }
}
