//! The command line.

use std::path::PathBuf;

use clap::Parser;

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
///
/// Logging is controlled by RUST_LOG (default: info).
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(version, about, long_about, verbatim_doc_comment)]
pub struct Args {
    /// Path of the vhost-user UNIX socket to listen on. A stale socket file left by a dead
    /// daemon is removed; a socket on which a live daemon listens is an error.
    #[arg(long, value_name = "PATH")]
    pub socket_path: PathBuf,

    /// The backing file whose contents the guest sees as persistent memory.
    #[arg(long, value_name = "PATH")]
    pub file: PathBuf,

    /// Device size, with binary units (512M, 1G = 1 GiB, 2GiB). A missing file is created
    /// sparse, a smaller one is extended; a larger one is an error, since shrinking would lose
    /// data. Must be a power of two of at least 2 MiB. Defaults to the file's current size.
    #[arg(long, value_name = "SIZE")]
    pub size: Option<ByteSize>,

    /// Open the file read-only and map it into the guest without write permission.
    #[arg(long)]
    pub read_only: bool,
}
