//! The command line.

use std::path::PathBuf;

use clap::Parser;

use crate::modes::{FlushMode, SeccompMode};
use crate::size::ByteSize;

/// Serve a host file to a QEMU guest as a virtio-pmem device over vhost-user.
///
/// The guest sees /dev/pmem0 and can mount a filesystem on it with `-o dax`; loads and stores
/// then reach the file's pages directly. Every guest flush (fsync, msync, journal commit) is
/// answered only after an fdatasync of the file has completed.
///
/// Attach QEMU 11 or later with:
///   -object memory-backend-memfd,id=mem0,size=1G,share=on -machine q35,memory-backend=mem0
///   -chardev socket,id=pmem0,path=SOCKET
///   -device vhost-user-test-device-pci,chardev=pmem0,virtio-id=27,num_vqs=1,vq_size=256,config_size=16
/// or, with --connect SOCKET, let QEMU listen: -chardev socket,id=pmem0,path=SOCKET,server=on,wait=on
/// (wait=on is needed: with wait=off QEMU 11.1 sets the device up before the daemon connects)
///
/// Once the file is open and the socket is ready, the daemon confines itself with a seccomp
/// allow-list (see --seccomp and docs/security.md).
///
/// Logging is controlled by RUST_LOG (default: info); at debug level every fdatasync is logged
/// with its start time and the pop times of the requests it answered.
///
/// Metrics: counters and latency histograms (fdatasync, and request from pop to answer) are
/// printed at exit and summarised in the log line of each disconnect. SIGUSR1 writes them as
/// JSON to --metrics-path if given, otherwise as one line of JSON on stderr.
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(version, about, long_about, verbatim_doc_comment)]
#[command(group = clap::ArgGroup::new("endpoint").required(true).args(["socket_path", "connect"]))]
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
    /// succeeds or is stopped by SIGINT/SIGTERM. Excludes --socket-path and --socket-mode.
    #[arg(long, value_name = "PATH")]
    pub connect: Option<PathBuf>,

    /// Permissions of the --socket-path socket file, in octal [default: 0600]. Anyone who can
    /// connect to the socket can drive the device, so only the frontend's user should be able
    /// to. The socket is created with these permissions (no window with wider ones). Does not
    /// apply to --connect, whose socket belongs to the frontend.
    #[arg(long, value_name = "OCTAL")]
    pub socket_mode: Option<String>,

    /// The seccomp sandbox: `on` (default) installs a system-call allow-list once the file is
    /// open and the socket is ready, and a call outside it makes the daemon log the call's
    /// number and die of SIGSYS; `log` lets such calls through but has the kernel log them
    /// (audit log or dmesg, "type=1326"), to find what a new environment needs; `off` installs
    /// no filter.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = SeccompMode::On)]
    pub seccomp: SeccompMode,

    /// The backing file whose contents the guest sees as persistent memory.
    #[arg(long, value_name = "PATH")]
    pub file: PathBuf,

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

    /// How flush requests become fdatasyncs. Every mode answers a request only after an
    /// fdatasync that started after the request was taken off the queue has completed.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = FlushMode::Group)]
    pub flush_mode: FlushMode,

    /// Write the metrics as JSON to this file: at start, every --metrics-interval seconds, on
    /// SIGUSR1, and at exit. Each write goes to FILE.tmp and is renamed over FILE, so readers
    /// never see a partial file.
    #[arg(long, value_name = "FILE")]
    pub metrics_path: Option<PathBuf>,

    /// Seconds between periodic writes of --metrics-path [default: 10]. 0 writes only at
    /// start, on SIGUSR1 and at exit. Apart from these writes an idle daemon never wakes up.
    #[arg(long, value_name = "SECS")]
    pub metrics_interval: Option<u64>,
}
