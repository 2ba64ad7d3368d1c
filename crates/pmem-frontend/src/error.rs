//! Errors of the frontend harness.

use std::io;
use std::time::Duration;

/// Everything that can go wrong while driving a vhost-user-pmem backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting to the backend's socket failed (after retrying until the deadline).
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket path.
        path: String,
        /// The last connect error.
        source: io::Error,
    },
    /// A vhost-user request failed or the backend answered with an error.
    #[error("vhost-user {op} failed: {source}")]
    Vhost {
        /// The request that failed.
        op: &'static str,
        /// The error from the vhost crate.
        source: vhost::Error,
    },
    /// Creating or accessing guest memory failed.
    #[error("guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// Setting up guest memory regions failed.
    #[error("guest memory setup: {0}")]
    GuestMemorySetup(#[from] vm_memory::mmap::FromRangesError),
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Something the harness waited for did not happen in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        timeout: Duration,
    },
    /// The caller asked for something the harness cannot do.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Not enough free descriptors for the chain.
    #[error("queue full: {needed} descriptors needed, {free} free")]
    QueueFull {
        /// Descriptors the chain needs.
        needed: usize,
        /// Descriptors free.
        free: usize,
    },
    /// The backend behaved in a way the protocol does not allow.
    #[error("protocol violation by the backend: {0}")]
    Protocol(String),
}

impl Error {
    pub(crate) fn vhost(op: &'static str) -> impl FnOnce(vhost::Error) -> Error {
        move |source| Error::Vhost { op, source }
    }

    pub(crate) fn io(op: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { op, source }
    }
}

/// Result type of the harness.
pub type Result<T> = std::result::Result<T, Error>;
