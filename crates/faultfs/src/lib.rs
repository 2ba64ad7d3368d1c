//! faultfs: a passthrough FUSE filesystem whose fsync fails with EIO on command.
//!
//! It mirrors a source directory at a mount point. FSYNC and FSYNCDIR requests are passed
//! through to the source while the control file (outside the mount) holds `ok`, and
//! answered with EIO without touching the source while it holds `fail-fsync`:
//!
//! ```text
//! faultfs --source /srv/lower --mountpoint /mnt/faulty --control /run/faultfs.ctl &
//! echo fail-fsync > /run/faultfs.ctl    # every fsync/fdatasync on /mnt/faulty now fails
//! echo ok > /run/faultfs.ctl            # and passes again
//! echo hold-fsync > /run/faultfs.ctl    # fsyncs wait (and block the mount) until it changes
//! ```
//!
//! This is what a failing disk looks like to a program that fsyncs, including one that
//! fsyncs a file it has mmapped MAP_SHARED: the dirty pages still reach the source (WRITE
//! succeeds), only the durability request fails, so the next fsync after the fault is lifted
//! succeeds although the failed one never promised anything. Programs that must not ack data
//! after such a failure are tested against exactly that.
//!
//! [`harness`] starts it as a child process with cleanup on drop, for integration tests.

mod attr;
mod cli;
mod control;
pub mod counts;
mod error;
mod fs;
pub mod harness;
mod inodes;
mod mounts;
mod ops;
mod sys;

pub use cli::{run, Args};
pub use control::{set_mode, Control, Mode, UnknownMode};
pub use error::Error;
pub use fs::{FaultFs, FsOptions};
pub use mounts::is_fuse_mounted;
