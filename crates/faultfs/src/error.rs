//! Why faultfs could not start or stop.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("source {path}: {source}")]
    Source { path: PathBuf, source: io::Error },
    #[error("source {0} is not a directory")]
    SourceNotDir(PathBuf),
    #[error(
        "cannot mount FUSE on {mountpoint}: {source} (is /dev/fuse there, and are we root? \
         Without root, fuser needs fusermount3 from Debian's fuse3 package)"
    )]
    Mount {
        mountpoint: PathBuf,
        source: io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    #[error("FUSE session on {mountpoint} failed: {source}")]
    Session {
        mountpoint: PathBuf,
        source: io::Error,
    },
}
