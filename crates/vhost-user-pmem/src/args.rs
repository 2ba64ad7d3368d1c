//! The command line.

use std::path::PathBuf;

use clap::Parser;

use crate::modes::{Allocation, FlushMode, LogLevel, SeccompMode};
use crate::size::ByteSize;

/// Serve a host file to a QEMU guest as a virtio-pmem device over vhost-user.
///
/// The guest sees /dev/pmem0 and can mount a filesystem on it with `-o dax`;
/// loads and stores then reach the file's pages directly. Every guest flush
/// (fsync, msync, journal commit) is answered only after an fdatasync of the
/// file has completed.
///
/// Attach QEMU 11 or later with:
///   -object memory-backend-memfd,id=mem0,size=1G,share=on
///   -machine q35,memory-backend=mem0
///   -chardev socket,id=pmem0,path=SOCKET
///   -device vhost-user-test-device-pci,chardev=pmem0,virtio-id=27,num_vqs=1,vq_size=256,config_size=16
/// With --connect SOCKET QEMU listens instead:
///   -chardev socket,id=pmem0,path=SOCKET,server=on,wait=on
/// (wait=on is needed: with wait=off QEMU 11.1 sets the device up before the
/// daemon connects).
///
/// The socket is one of --socket-path, --connect or --fd. Without any of them
/// the daemon takes a socket from systemd-style socket activation: LISTEN_FDS=1
/// with LISTEN_PID equal to its own pid means fd 3 is a listening socket, used
/// as --fd 3 would be. LISTEN_FDS with another LISTEN_PID is ignored; more than
/// one socket, or LISTEN_FDS together with an endpoint option, is refused. The
/// daemon unsets LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES.
///
/// With NOTIFY_SOCKET set (systemd Type=notify), the daemon sends READY=1 once
/// the file is open and the socket listens (with --connect: once the first
/// connection is made), and STOPPING=1 when a signal stops it.
///
/// Once the file is open and the socket is ready, the daemon confines itself
/// with a seccomp allow-list (see --seccomp and docs/security.md).
///
/// Logging: RUST_LOG, when set, is the filter (env_logger syntax, for example
/// `debug` or `vhost_user_pmem::flush=trace`) and overrides --log-level;
/// otherwise --log-level (default info). At debug level every fdatasync is
/// logged with its start time and the pop times of the requests it answered.
/// When stderr is not a terminal the lines carry no colours; under journald
/// (JOURNAL_STREAM naming stderr's device and inode) they carry no timestamp
/// and start with a syslog priority (<3> error .. <7> debug and trace), as
/// sd-daemon(3) describes.
///
/// Metrics: counters and latency histograms (fdatasync, and request from pop
/// to answer) are printed at exit and summarised in the log line of each
/// disconnect. SIGUSR1 writes them as JSON to --metrics-path if given,
/// otherwise as one line of JSON on stderr.
///
/// Signals: SIGINT, SIGTERM and SIGHUP make a final fdatasync, remove the
/// socket file (not with --connect or --fd, whose socket is not the daemon's)
/// and exit.
///
/// Exit status: 0 after a clean shutdown; 2 for a usage error (a bad or
/// conflicting option, a --fd that is not a listening UNIX stream socket, an
/// unknown --socket-group, bad socket-activation variables); 1 when something
/// fails at run time (the file cannot be opened or locked, the socket cannot be
/// bound, the seccomp filter cannot be installed, the file could not be made
/// durable at exit).
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(version, about, long_about, verbatim_doc_comment)]
// Not `required`: with none of the three, socket activation may supply the socket, and
// --print-capabilities needs none; Config decides, with a message that names all the ways.
#[command(group = clap::ArgGroup::new("endpoint").multiple(false).args(["socket_path", "connect", "fd"]))]
pub struct Args {
    /// Path of the vhost-user UNIX socket to listen on. A stale socket file left by a dead
    /// daemon is removed; a socket on which a live daemon listens is an error. The daemon
    /// serves one frontend after another on it.
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,

    /// Connect to a frontend that listens on PATH (QEMU's -chardev socket,server=on) instead of
    /// listening. PATH must be a socket when the daemon starts, and the first connection must
    /// succeed, or the daemon exits with an error. When a connection ends the daemon connects
    /// again, retrying with a growing delay (0.1 s up to 5 s, each attempt logged) until it
    /// succeeds or is stopped by a signal. Excludes --socket-path, --fd, --socket-mode and
    /// --socket-group.
    #[arg(long, value_name = "PATH")]
    pub connect: Option<PathBuf>,

    /// Serve on an already listening UNIX stream socket that was passed to the daemon as file
    /// descriptor FD (the vhost-user backend convention; the parent keeps the socket file).
    /// The daemon serves one frontend after another on it, like on --socket-path, and removes
    /// no file at exit. FD must be open, an AF_UNIX SOCK_STREAM socket, and listening.
    /// Excludes --socket-path, --connect, --socket-mode and --socket-group.
    #[arg(long, value_name = "FD")]
    pub fd: Option<i32>,

    /// Permissions of the --socket-path socket file, in octal [default: 0600]. Anyone who can
    /// connect to the socket can drive the device, so only the frontend's user should be able
    /// to. The socket is created with these permissions (no window with wider ones). Does not
    /// apply to --connect or --fd, whose socket belongs to the frontend or the parent.
    #[arg(long, value_name = "OCTAL")]
    pub socket_mode: Option<String>,

    /// Give the --socket-path socket file to group NAME (chown before the socket listens, so
    /// it is never reachable with another group), to let a frontend of that group connect.
    /// With it you usually want --socket-mode 0660: the default 0600 lets only the owner in.
    /// Only with --socket-path. The group must exist.
    #[arg(long, value_name = "NAME")]
    pub socket_group: Option<String>,

    /// The seccomp sandbox: `on` (default) installs a system-call allow-list once the file is
    /// open and the socket is ready, and a call outside it makes the daemon log the call's
    /// number and die of SIGSYS; `log` lets such calls through but has the kernel log them
    /// (audit log or dmesg, "type=1326"), to find what a new environment needs; `off` installs
    /// no filter.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = SeccompMode::On)]
    pub seccomp: SeccompMode,

    /// The backing file whose contents the guest sees as persistent memory (required unless
    /// --print-capabilities).
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,

    /// Device size, with binary units (512M, 1G = 1 GiB, 2GiB). A missing file is created
    /// sparse, a smaller one is extended; a larger one is an error, since shrinking would lose
    /// data. Must be a power of two of at least 2 MiB. Defaults to the file's current size.
    #[arg(long, value_name = "SIZE")]
    pub size: Option<ByteSize>,

    /// Open the file read-only and map it into the guest without write permission. Every
    /// flush is answered with an error, since nothing the guest writes can become durable.
    /// QEMU 11.1 cannot map a read-only file (the guest then sees zeros; see docs/qemu.md).
    #[arg(long)]
    pub read_only: bool,

    /// Whether every block of the file is allocated at start [default: full]. With `full` a
    /// full host file system cannot stop the VM later: the daemon allocates the holes
    /// (fallocate) before it serves, or refuses to start, naming the free and the needed
    /// space. With `sparse` holes stay holes (no disk space until the guest writes) and a
    /// guest that writes one when the file system is full stops with SIGBUS in QEMU; the
    /// metrics show the holes against the free space. Not with --read-only.
    #[arg(long, value_name = "POLICY", value_enum)]
    pub allocate: Option<Allocation>,

    /// Serve a private copy-on-write layer over --file: the guest sees the image read-write,
    /// its writes go to a reflink clone of it (FICLONE) in an unlinked file in the image's
    /// directory, and vanish when the daemon exits. The image is never written and only
    /// share-locked, so many --snapshot daemons (one per VM) can serve one golden image while a
    /// read-write daemon is refused. Needs a file system that makes reflink copies (xfs,
    /// btrfs). The clone shares the image's blocks on disk but not its page cache. Not with
    /// --read-only or --allocate.
    #[arg(long)]
    pub snapshot: bool,

    /// How flush requests become fdatasyncs. Every mode answers a request only after an
    /// fdatasync that started after the request was taken off the queue has completed.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = FlushMode::Group)]
    pub flush_mode: FlushMode,

    /// Start at most OPS fdatasyncs a second, in every --flush-mode; after a quiet spell up to
    /// N may start back to back (burst=N, default OPS) [default: no limit]. The limit is on
    /// fdatasyncs, not on requests: in group mode one fdatasync still answers every request
    /// waiting when it starts, and requests that arrive while it is held back join it. A
    /// held-back flush is answered late, never early and never with an error. Example:
    /// 20/s,burst=5. See docs/operations.md.
    #[arg(long, value_name = "OPS[/s][,burst=N]")]
    pub flush_rate_limit: Option<String>,

    /// After the daemon answers requests, watch the queue for up to N microseconds (0 to
    /// 1000) for the guest's next request before going back to sleep, and take one that
    /// arrives at once, without waiting for the guest's kick to wake the daemon [default: 0,
    /// off]. Polling spins a CPU for up to N us after every answer, and only then: an idle
    /// daemon still never wakes up. It can shorten a flush by the cost of a wakeup when the
    /// guest sends its next flush right after the last answer. See docs/operations.md.
    #[arg(long, value_name = "N")]
    pub poll_us: Option<u64>,

    /// Write the metrics as JSON to this file: at start, every --metrics-interval seconds, on
    /// SIGUSR1, and at exit. Each write goes to FILE.tmp and is renamed over FILE, so readers
    /// never see a partial file.
    #[arg(long, value_name = "FILE")]
    pub metrics_path: Option<PathBuf>,

    /// Seconds between periodic writes of --metrics-path [default: 10]. 0 writes only at
    /// start, on SIGUSR1 and at exit. Apart from these writes an idle daemon never wakes up.
    #[arg(long, value_name = "SECS")]
    pub metrics_interval: Option<u64>,

    /// The log filter when RUST_LOG is not set [default: info]. RUST_LOG, when set, wins.
    /// `off` prints nothing (warnings and errors are still counted in the metrics).
    #[arg(long, value_name = "LEVEL", value_enum)]
    pub log_level: Option<LogLevel>,

    /// Print the backend's capabilities as JSON on stdout, {"type": "pmem", "features": [...]}
    /// (the vhost-user backend convention), and exit 0. Needs no other option.
    #[arg(long)]
    pub print_capabilities: bool,
}
