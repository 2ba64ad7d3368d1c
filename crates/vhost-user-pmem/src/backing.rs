//! The backing file: opening, creating, sizing and locking it, and making it durable.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use log::{error, info, warn};

use crate::allocation::{self, Space};
use crate::modes::Allocation;
use crate::size::{self, ByteSize, SizeError};
use crate::snapshot::{self, SnapshotError};
use crate::sync;

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
    #[error("{0} does not exist; --snapshot needs an existing image to layer over")]
    MissingSnapshot(PathBuf),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is in use ({held} lock held): another vhost-user-pmem serves it, or a QEMU still maps it from an earlier daemon (the lock travels with the descriptor passed in SHMEM_MAP)")]
    Locked {
        path: PathBuf,
        /// The kind of lock another holder has that keeps this one out.
        held: &'static str,
    },
    #[error(
        "{0} is share-locked by --snapshot or --read-only daemons: a writer would change the \
         image under their guests; stop them first, or serve it with --snapshot too"
    )]
    SharedLocked(PathBuf),
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
    #[error(
        "--allocate full needs {needed} more for {path} (a {size} device, {allocated} of it \
         allocated already) and its file system has {free} free; free some space, give a \
         smaller --size, or use --allocate sparse (the VM then stops if the file system fills)"
    )]
    NoSpace {
        path: PathBuf,
        needed: ByteSize,
        size: ByteSize,
        allocated: ByteSize,
        free: ByteSize,
    },
    #[error("cannot allocate the blocks of {path} (fallocate: {source}); {hint}")]
    Allocate {
        path: PathBuf,
        source: io::Error,
        hint: &'static str,
    },
    #[error("cannot measure {path} and its file system: {source}")]
    Measure { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Size(#[from] SizeError),
}

/// How the daemon may use the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Created or extended as needed, its holes filled or left as `--allocate` says.
    ReadWrite(Allocation),
    /// `--read-only`: opened without write permission, never created, extended or allocated.
    ReadOnly,
    /// `--snapshot`: the image is read and share-locked; the guest writes to a private layer.
    Snapshot,
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
    access: Access,
    /// With `--snapshot`: the shared image under the private layer `file`, kept open for its
    /// shared lock.
    _image: Option<File>,
    /// The last measurement of the file's blocks and free space, and when it was made.
    space: Mutex<Option<(Space, Instant)>>,
    failure: OnceLock<FlushFailure>,
}

/// How often a flush may measure the space again.
const SPACE_EVERY: Duration = Duration::from_secs(1);

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
        if access == Access::Snapshot {
            return Self::open_snapshot(path, size);
        }
        let path = path.to_path_buf();
        let read_only = access == Access::ReadOnly;
        let allocation = match access {
            Access::ReadWrite(a) => Some(a),
            Access::ReadOnly | Access::Snapshot => None,
        };
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
        // What the file's length will be, for the space check that comes before any change.
        let target = size.unwrap_or(file_size).max(file_size);
        let mut holes = 0;
        if allocation == Some(Allocation::Full) {
            let space =
                allocation::measure(&file, target).map_err(|source| BackingError::Measure {
                    path: path.clone(),
                    source,
                })?;
            if space.short() {
                if !exists {
                    let _ = std::fs::remove_file(&path);
                }
                return Err(BackingError::NoSpace {
                    path,
                    needed: ByteSize(space.unallocated()),
                    size: ByteSize(target),
                    allocated: ByteSize(space.allocated.min(target)),
                    free: ByteSize(space.fs_free),
                });
            }
            holes = space.unallocated();
        }
        let size = match device_size(&path, file_size, size)? {
            size if file_size < size && read_only => {
                return Err(BackingError::ReadOnlyTooSmall {
                    path,
                    file_size: ByteSize(file_size),
                    size: ByteSize(size),
                })
            }
            size if file_size < size => {
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
                    info!("created {} as a file of {}", path.display(), ByteSize(size));
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
            size => size,
        };
        match allocation {
            // An image without holes (every start after the first) needs no call and no
            // fsync: nothing about it would change.
            Some(Allocation::Full) if holes > 0 || file_size < size => {
                if let Err(source) = allocation::allocate_all(&file, &path, size, holes)
                    .and_then(|()| file.sync_all())
                {
                    // Undo what this start did: the blocks fallocate gave an existing range
                    // change nothing the guest can see, but a length must go back.
                    if !exists {
                        let _ = std::fs::remove_file(&path);
                    } else if file_size < size {
                        let _ = file.set_len(file_size).and_then(|()| file.sync_all());
                    }
                    let hint = match source.raw_os_error() {
                        Some(libc::EOPNOTSUPP) => {
                            "this file system cannot allocate in advance; use --allocate \
                             sparse, knowing that the VM then stops if the file system fills"
                        }
                        Some(libc::ENOSPC) => {
                            "the file system filled up while allocating; free some space or \
                             give a smaller --size"
                        }
                        _ => "the file was left as it was",
                    };
                    return Err(BackingError::Allocate { path, source, hint });
                }
            }
            Some(Allocation::Sparse) | Some(Allocation::Full) | None => {}
        }

        let b = BackingFile {
            file,
            path,
            size,
            access,
            _image: None,
            space: Mutex::new(None),
            failure: OnceLock::new(),
        };
        b.measure_space();
        if allocation == Some(Allocation::Sparse) {
            b.report_holes();
        }
        Ok(b)
    }

    /// `--snapshot`: share-locks the image at `path`, which must exist, and serves a private
    /// reflink layer over it, extended to `size` if that is larger. The image is not written.
    fn open_snapshot(path: &Path, size: Option<u64>) -> Result<Self, BackingError> {
        let path = path.to_path_buf();
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => return Err(BackingError::IsDirectory(path)),
            Ok(meta) if !meta.is_file() => {
                return Err(BackingError::NotRegular(path, file_kind(&meta)))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BackingError::MissingSnapshot(path))
            }
            Err(source) => return Err(BackingError::Open { path, source }),
        }
        let open_err = |path: &PathBuf| {
            let path = path.clone();
            move |source| BackingError::Open { path, source }
        };
        let image = File::open(&path).map_err(open_err(&path))?;
        lock(&image, &path, true)?;
        let file_size = image.metadata().map_err(open_err(&path))?.size();
        let size = device_size(&path, file_size, size)?;
        let layer = snapshot::private_layer(&image, &path)?;
        if size > file_size {
            layer.set_len(size).map_err(|source| BackingError::Extend {
                path: path.clone(),
                size: ByteSize(size),
                source,
            })?;
        }
        info!(
            "serving a private copy-on-write layer over {} ({}; a reflink clone in an unlinked \
             file, gone at exit): the image is share-locked and never written",
            path.display(),
            ByteSize(size)
        );
        let b = BackingFile {
            file: layer,
            path,
            size,
            access: Access::Snapshot,
            _image: Some(image),
            space: Mutex::new(None),
            failure: OnceLock::new(),
        };
        b.measure_space();
        b.report_holes();
        Ok(b)
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
        self.access == Access::ReadOnly
    }

    /// `full`, `sparse`, `read-only` or `snapshot`, for the metrics.
    pub fn policy(&self) -> &'static str {
        match self.access {
            Access::ReadWrite(a) => a.as_str(),
            Access::ReadOnly => "read-only",
            Access::Snapshot => "snapshot",
        }
    }

    /// The file's blocks and its file system's free space, as last measured: at start, and
    /// after an fdatasync at most once a second. Never measured on the caller's thread: on
    /// a file system whose fsync hangs (a FUSE server busy with it, NFS) a statfs can hang
    /// behind it, and the metrics must still come out then.
    pub fn space(&self) -> Option<Space> {
        sync::lock(&self.space).map(|(s, _)| s)
    }

    fn measure_space(&self) {
        match allocation::measure(&self.file, self.size) {
            Ok(mut s) => {
                if self.access == Access::Snapshot {
                    // The clone's blocks are the image's: every byte a guest overwrites
                    // needs a new one.
                    s.allocated = 0;
                }
                *sync::lock(&self.space) = Some((s, Instant::now()));
            }
            Err(e) => log::debug!("cannot measure {}: {e}", self.path.display()),
        }
    }

    /// With `--allocate sparse` or `--snapshot`, says at start how far the file system is from
    /// what a guest's writes may need: a warning when it could not hold them all.
    fn report_holes(&self) {
        let Some(s) = self.space() else {
            return;
        };
        if s.short() {
            warn!(
                "{}: {} of the {} device may need new blocks as the guest writes and its file \
                 system has only {} free; a guest that fills it will stop (SIGBUS in QEMU), \
                 losing what it had not flushed{}",
                self.path.display(),
                ByteSize(s.unallocated()),
                ByteSize(self.size),
                ByteSize(s.fs_free),
                if self.access == Access::Snapshot {
                    ""
                } else {
                    ". --allocate full avoids that"
                }
            );
        } else {
            info!(
                "{}: {} may need new blocks, {} free on its file system",
                self.path.display(),
                ByteSize(s.unallocated()),
                ByteSize(s.fs_free)
            );
        }
    }

    /// After a good fdatasync: the thread that just finished with the file system measures
    /// again, unless a measurement is fresh.
    fn refresh_space(&self) {
        let stale = sync::lock(&self.space).is_none_or(|(_, at)| at.elapsed() >= SPACE_EVERY);
        if stale {
            self.measure_space();
        }
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
                None => {
                    self.refresh_space();
                    Ok(())
                }
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

/// The device size: `size`, already checked with `size::check_requested`, which the file
/// must not be larger than (shrinking would lose data), or (`None`) the file's own size, which
/// must then pass `size::check_file`.
fn device_size(path: &Path, file_size: u64, size: Option<u64>) -> Result<u64, BackingError> {
    match size {
        None => {
            size::check_file(path, file_size)?;
            Ok(file_size)
        }
        Some(size) if file_size > size => Err(BackingError::WouldShrink {
            path: path.to_path_buf(),
            file_size: ByteSize(file_size),
            size: ByteSize(size),
        }),
        Some(size) => Ok(size),
    }
}

/// Whether the holders that keep an exclusive lock out hold shared locks only (`--snapshot` or
/// `--read-only` daemons), which a shared lock of our own then joins for a moment.
fn shared_only(file: &File) -> bool {
    // SAFETY: flock only reads the descriptor number, which `file` keeps open for the calls.
    unsafe {
        if libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 {
            return false;
        }
        libc::flock(file.as_raw_fd(), libc::LOCK_UN);
    }
    true
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
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) && !read_only && shared_only(file) {
        Err(BackingError::SharedLocked(path.to_path_buf()))
    } else if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
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
            Access::ReadWrite(Allocation::Sparse)
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
        assert!(matches!(err, BackingError::SharedLocked(_)), "{err}");
        assert!(err.to_string().contains("share-locked"), "{err}");
    }

    #[test]
    fn rejects_bad_paths() {
        let dir = tempfile::tempdir().unwrap();
        let rw = Access::ReadWrite(Allocation::Full);
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
