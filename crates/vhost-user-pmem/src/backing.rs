//! The backing file: opening, creating, sizing and locking it, and making it durable.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use log::{error, info};

use crate::size::{self, ByteSize, SizeError};

#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    #[error("{0} is a directory; --file needs a regular file")]
    IsDirectory(PathBuf),
    #[error("{0} is not a regular file (it is a {1}); --file needs a regular file")]
    NotRegular(PathBuf, &'static str),
    #[error("{0} does not exist; give --size to create it")]
    MissingNoSize(PathBuf),
    #[error("{0} does not exist, and --read-only cannot create it")]
    MissingReadOnly(PathBuf),
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is in use ({held} lock held): another vhost-user-pmem serves it, or a QEMU still maps it from an earlier daemon (the lock travels with the descriptor passed in SHMEM_MAP)")]
    Locked {
        path: PathBuf,
        /// The kind of lock another holder has that keeps this one out.
        held: &'static str,
    },
    #[error("{path} is {file_size}, larger than --size {size}; refusing to shrink it (that would lose data). Use --size {file_size} or omit --size")]
    WouldShrink {
        path: PathBuf,
        file_size: ByteSize,
        size: ByteSize,
    },
    #[error("{path} is {file_size}, smaller than --size {size}, and --read-only cannot extend it")]
    ReadOnlyTooSmall {
        path: PathBuf,
        file_size: ByteSize,
        size: ByteSize,
    },
    #[error("cannot extend {path} to {size}: {source}")]
    Extend {
        path: PathBuf,
        size: ByteSize,
        source: io::Error,
    },
    #[error(transparent)]
    Size(#[from] SizeError),
}

/// How the daemon may use the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    /// `--read-only`: opened without write permission, never created or extended.
    ReadOnly,
}

/// Why flushes are refused: the first fdatasync failure, kept for the daemon's lifetime.
///
/// After a failed fdatasync Linux may already have marked the failed pages clean, so a later
/// fdatasync can succeed although the data never reached the disk (PostgreSQL's "fsyncgate").
/// Acking any later flush would therefore be a lie; only an operator who has checked the
/// file can clear the state, by restarting the daemon.
#[derive(Debug, Clone)]
pub struct FlushFailure(pub String);

#[derive(Debug)]
pub struct BackingFile {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    failure: OnceLock<FlushFailure>,
}

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_block_device() {
        "block device"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

impl BackingFile {
    /// Opens (or creates) and locks the file at `path`, and brings it to the device size:
    /// `size`, already checked with `size::check_requested`, or (`None`) the file's own size,
    /// which must then pass `size::check_file`. Nothing is written to an existing file unless
    /// it has to grow.
    pub fn open(path: &Path, size: Option<u64>, access: Access) -> Result<Self, BackingError> {
        let path = path.to_path_buf();
        let read_only = access == Access::ReadOnly;
        let exists = match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => return Err(BackingError::IsDirectory(path)),
            Ok(meta) if !meta.is_file() => {
                return Err(BackingError::NotRegular(path, file_kind(&meta)))
            }
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(source) => return Err(BackingError::Open { path, source }),
        };
        if !exists {
            if read_only {
                return Err(BackingError::MissingReadOnly(path));
            }
            if size.is_none() {
                return Err(BackingError::MissingNoSize(path));
            }
        }

        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .create(!read_only && size.is_some())
            .truncate(false)
            .open(&path)
            .map_err(|source| BackingError::Open {
                path: path.clone(),
                source,
            })?;
        lock(&file, &path, read_only)?;

        let meta = file.metadata().map_err(|source| BackingError::Open {
            path: path.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(BackingError::NotRegular(path, file_kind(&meta)));
        }
        let file_size = meta.size();
        let size = match size {
            None => {
                size::check_file(&path, file_size)?;
                file_size
            }
            Some(size) if file_size > size => {
                return Err(BackingError::WouldShrink {
                    path,
                    file_size: ByteSize(file_size),
                    size: ByteSize(size),
                })
            }
            Some(size) if file_size < size && read_only => {
                return Err(BackingError::ReadOnlyTooSmall {
                    path,
                    file_size: ByteSize(file_size),
                    size: ByteSize(size),
                })
            }
            Some(size) if file_size < size => {
                // set_len leaves the new range as a hole: a fresh image costs no disk space
                // until the guest writes to it.
                if let Err(source) = file.set_len(size).and_then(|_| file.sync_all()) {
                    // An image we created but could not make durable must not be picked up by
                    // the next start as if it were fine.
                    if !exists {
                        let _ = std::fs::remove_file(&path);
                    }
                    return Err(BackingError::Extend {
                        path,
                        size: ByteSize(size),
                        source,
                    });
                }
                if file_size == 0 {
                    info!(
                        "created {} as a sparse file of {}",
                        path.display(),
                        ByteSize(size)
                    );
                } else {
                    info!(
                        "extended {} from {} to {}",
                        path.display(),
                        ByteSize(file_size),
                        ByteSize(size)
                    );
                }
                size
            }
            Some(size) => size,
        };

        Ok(BackingFile {
            file,
            path,
            size,
            read_only,
            failure: OnceLock::new(),
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The latched failure, if an fdatasync has ever failed.
    pub fn failure(&self) -> Option<&FlushFailure> {
        self.failure.get()
    }

    /// Makes every write the guest has made so far durable. Fails, without trying, once any
    /// fdatasync has failed (see [`FlushFailure`]).
    pub fn sync(&self) -> Result<(), FlushFailure> {
        self.sync_with(|| self.file.sync_data())
    }

    /// [`Self::sync`] with the fdatasync itself supplied, so that tests can stage failures.
    fn sync_with(&self, fdatasync: impl FnOnce() -> io::Result<()>) -> Result<(), FlushFailure> {
        if let Some(f) = self.failure.get() {
            return Err(f.clone());
        }
        match fdatasync() {
            Ok(()) => match self.failure.get() {
                // Another fdatasync that ran at the same time (flush mode `parallel`) failed.
                // Linux reports a writeback error to only one of the callers that share a
                // descriptor, and the pages it lost may be ones this call was meant to cover,
                // so its success proves nothing.
                Some(f) => Err(f.clone()),
                None => Ok(()),
            },
            Err(e) => {
                let failure =
                    FlushFailure(format!("fdatasync of {} failed: {e}", self.path.display()));
                if self.failure.set(failure.clone()).is_ok() {
                    error!(
                        "{}; every later flush will fail until the daemon is restarted, because \
                         the kernel may have dropped the dirty pages",
                        failure.0
                    );
                }
                // Concurrent failures all report the first one, which is the one logged.
                Err(self.failure.get().cloned().unwrap_or(failure))
            }
        }
    }
}

fn lock(file: &File, path: &Path, read_only: bool) -> Result<(), BackingError> {
    // `held` names the other holder's lock that a refusal means: a shared lock is kept out
    // only by an exclusive one, an exclusive lock by either.
    let (op, held) = if read_only {
        (libc::LOCK_SH, "exclusive")
    } else {
        (libc::LOCK_EX, "shared or exclusive")
    };
    // SAFETY: flock only reads the descriptor number, which `file` keeps open for this call.
    let ret = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(BackingError::Locked {
            path: path.to_path_buf(),
            held,
        })
    } else {
        Err(BackingError::Open {
            path: path.to_path_buf(),
            source: err,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `disk.img` in `dir`.
    fn open(dir: &Path, size: Option<u64>, read_only: bool) -> Result<BackingFile, BackingError> {
        let access = if read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        BackingFile::open(&dir.join("disk.img"), size, access)
    }

    #[test]
    fn creates_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path(), Some(64 << 20), false).unwrap();
        let meta = std::fs::metadata(b.path()).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "not sparse: {} blocks",
            meta.blocks()
        );
        b.sync().unwrap();
    }

    #[test]
    fn extends_but_never_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![7u8; 4 << 20]).unwrap();
        let err = open(dir.path(), Some(2 << 20), false).unwrap_err();
        assert!(matches!(err, BackingError::WouldShrink { .. }), "{err}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 20);
        let b = open(dir.path(), Some(8 << 20), false).unwrap();
        assert_eq!(b.size(), 8 << 20);
        let data = std::fs::read(&path).unwrap();
        assert!(data[..4 << 20].iter().all(|&x| x == 7));
        assert!(data[4 << 20..].iter().all(|&x| x == 0));
    }

    #[test]
    fn locks_exclusively() {
        let dir = tempfile::tempdir().unwrap();
        let _a = open(dir.path(), Some(2 << 20), false).unwrap();
        let err = open(dir.path(), None, false).unwrap_err();
        assert!(matches!(err, BackingError::Locked { .. }), "{err}");
        let err = open(dir.path(), None, true).unwrap_err();
        assert!(matches!(err, BackingError::Locked { .. }), "{err}");
    }

    #[test]
    fn read_only_readers_share() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path(), Some(2 << 20), false).unwrap());
        let _a = open(dir.path(), None, true).unwrap();
        let _b = open(dir.path(), None, true).unwrap();
        let err = open(dir.path(), None, false).unwrap_err();
        assert!(matches!(err, BackingError::Locked { .. }), "{err}");
    }

    #[test]
    fn rejects_bad_paths() {
        let dir = tempfile::tempdir().unwrap();
        let rw = Access::ReadWrite;
        assert!(matches!(
            BackingFile::open(dir.path(), Some(2 << 20), rw),
            Err(BackingError::IsDirectory(_))
        ));
        assert!(matches!(
            open(dir.path(), None, false),
            Err(BackingError::MissingNoSize(_))
        ));
        assert!(matches!(
            open(dir.path(), Some(2 << 20), true),
            Err(BackingError::MissingReadOnly(_))
        ));
        assert!(matches!(
            BackingFile::open(Path::new("/dev/null"), Some(2 << 20), rw),
            Err(BackingError::NotRegular(_, "character device"))
        ));
    }

    #[test]
    fn failure_latches_and_covers_concurrent_successes() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path(), Some(2 << 20), false).unwrap();
        b.sync().unwrap();
        // An fdatasync that succeeds while another one, running at the same time, fails: the
        // inner call stands for the concurrent one.
        let outer = b.sync_with(|| {
            let inner = b.sync_with(|| Err(io::Error::from_raw_os_error(libc::EIO)));
            assert!(inner.unwrap_err().0.contains("Input/output error"));
            Ok(())
        });
        assert!(
            outer.is_err(),
            "a success overlapping a failure must not be reported"
        );
        let mut called = false;
        let later = b.sync_with(|| {
            called = true;
            Ok(())
        });
        assert!(
            later.is_err() && !called,
            "later syncs are refused without trying"
        );
        assert!(b.failure().is_some());
    }

    #[test]
    fn rejects_odd_existing_sizes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("disk.img"), vec![0u8; 3 << 20]).unwrap();
        let err = open(dir.path(), None, false).unwrap_err();
        assert!(err.to_string().contains("--size 4 MiB"), "{err}");
    }
}
