//! The passthrough filesystem: every request is served from the source directory, except that
//! FSYNC and FSYNCDIR fail with EIO while the control file says `fail-fsync`, and wait while
//! it says `hold-fsync`.
//!
//! Data goes through the kernel's page cache (no `direct_io`), so files can be mmapped
//! MAP_SHARED, and dirty pages reach this server as WRITE requests when the kernel writes
//! them back, at the latest inside an fsync: the same path a real filesystem's writeback takes.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fuser::{Errno, FileHandle, INodeNo, TimeOrNow};
use log::{info, warn};

use crate::attr::file_attr;
use crate::control::{Control, Mode};
use crate::counts::{CountsFile, Outcome};
use crate::inodes::Inodes;
use crate::sys;

/// How often a held fsync looks at the control file again.
const HOLD_POLL: Duration = Duration::from_millis(5);

/// How long the kernel may trust what we tell it. Zero: the source directory may be changed
/// behind the mount's back (tests read and write it directly), so every lookup and stat
/// must come here.
pub(crate) const TTL: Duration = Duration::ZERO;

/// How the filesystem is set up.
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// The directory to mirror.
    pub source: PathBuf,
    pub control: Control,
    /// Ask the kernel for FUSE_WRITEBACK_CACHE, so that write(2) is cached like on a disk
    /// filesystem and only fsync or writeback pushes it here.
    pub writeback_cache: bool,
    /// Where to count each file's fsync outcomes (see `counts.rs`).
    pub counts: Option<PathBuf>,
}

pub struct FaultFs {
    pub(crate) source: PathBuf,
    control: Control,
    pub(crate) writeback_cache: bool,
    pub(crate) inodes: Mutex<Inodes>,
    pub(crate) files: Mutex<HashMap<u64, Arc<File>>>,
    next_fh: AtomicU64,
    counts: Option<CountsFile>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A name the kernel asked about, checked to be one plain path component, so that no
/// request can reach outside the source directory.
fn component(name: &OsStr) -> Result<&Path, Errno> {
    let p = Path::new(name);
    let mut parts = p.components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(_)), None) => Ok(p),
        _ => Err(Errno::EINVAL),
    }
}

impl FaultFs {
    pub fn new(options: FsOptions) -> Self {
        FaultFs {
            source: options.source,
            control: options.control,
            writeback_cache: options.writeback_cache,
            inodes: Mutex::new(Inodes::default()),
            files: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            counts: options.counts.map(CountsFile::new),
        }
    }

    fn count(&self, rel: &Path, outcome: Outcome) {
        if let Some(c) = &self.counts {
            c.record(rel, outcome);
        }
    }

    pub(crate) fn real(&self, rel: &Path) -> PathBuf {
        self.source.join(rel)
    }

    /// The relative path of `ino`. ESTALE for a node the kernel should no longer use.
    pub(crate) fn rel(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        lock(&self.inodes)
            .path(ino.0)
            .map(Path::to_path_buf)
            .ok_or(Errno::ESTALE)
    }

    pub(crate) fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.rel(parent)?.join(component(name)?))
    }

    pub(crate) fn file(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        lock(&self.files).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    pub(crate) fn add_file(&self, file: File) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.files).insert(fh, Arc::new(file));
        FileHandle(fh)
    }

    /// Stats `rel` and counts the kernel reference the reply will hand out.
    pub(crate) fn entry(&self, rel: &Path) -> Result<fuser::FileAttr, Errno> {
        let meta = std::fs::symlink_metadata(self.real(rel))?;
        let ino = lock(&self.inodes).remember(rel);
        Ok(file_attr(ino, &meta))
    }

    pub(crate) fn attr(
        &self,
        ino: INodeNo,
        fh: Option<FileHandle>,
    ) -> Result<fuser::FileAttr, Errno> {
        // An open handle still works after its name was unlinked; the path may not.
        let meta = match fh.map(|fh| self.file(fh)) {
            Some(Ok(file)) => file.metadata()?,
            _ => std::fs::symlink_metadata(self.real(&self.rel(ino)?))?,
        };
        Ok(file_attr(ino.0, &meta))
    }

    /// Opens a source file for a kernel OPEN or CREATE with `flags`.
    ///
    /// Any write access becomes read-write: with the page cache in front, the kernel reads
    /// pages through a handle that its user opened write-only (to fill a partly written page,
    /// or to serve a fault on a shared mapping), and a write-only source handle makes those
    /// reads fail, which a mapping's user sees as SIGBUS. O_APPEND is left to the kernel
    /// under the writeback cache, which computes the offsets itself; other flags (O_DIRECT,
    /// O_SYNC, ...) describe the kernel side's caching, not ours.
    pub(crate) fn open_source(
        &self,
        path: &Path,
        flags: i32,
        create: Option<u32>,
    ) -> io::Result<File> {
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let mut o = OpenOptions::new();
        o.read(true).write(write || create.is_some());
        if write && flags & libc::O_TRUNC != 0 {
            o.truncate(true);
        }
        if flags & libc::O_APPEND != 0 && !self.writeback_cache {
            o.append(true);
        }
        if let Some(mode) = create {
            if flags & libc::O_EXCL != 0 {
                o.create_new(true);
            } else {
                o.create(true);
            }
            o.mode(mode);
        }
        o.open(path)
    }

    pub(crate) fn do_setattr(
        &self,
        ino: INodeNo,
        fh: Option<FileHandle>,
        mode: Option<u32>,
        owner: (Option<u32>, Option<u32>),
        size: Option<u64>,
        times: (Option<TimeOrNow>, Option<TimeOrNow>),
    ) -> Result<fuser::FileAttr, Errno> {
        let path = self.real(&self.rel(ino)?);
        if let Some(mode) = mode {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))?;
        }
        if owner.0.is_some() || owner.1.is_some() {
            std::os::unix::fs::lchown(&path, owner.0, owner.1)?;
        }
        if let Some(size) = size {
            match fh.map(|fh| self.file(fh)) {
                Some(Ok(file)) => file.set_len(size)?,
                _ => OpenOptions::new().write(true).open(&path)?.set_len(size)?,
            }
        }
        if times.0.is_some() || times.1.is_some() {
            sys::set_times(&path, times.0, times.1)?;
        }
        self.attr(ino, fh)
    }

    /// Serves an FSYNC or FSYNCDIR: the one place where faults are injected. A held fsync
    /// blocks this session thread, and with it every other request to the mount, which is
    /// what a stuck disk does too.
    pub(crate) fn sync(
        &self,
        what: &str,
        rel: &Path,
        datasync: bool,
        run: impl FnOnce() -> io::Result<()>,
    ) -> Result<(), Errno> {
        let name = rel.display();
        let kind = if datasync { "fdatasync" } else { "fsync" };
        let mut mode = self.control.mode();
        if mode == Mode::HoldFsync {
            // Logged before waiting, so that a test can see the fsync is in progress.
            info!("{what} /{name} ({kind}): held");
            self.count(rel, Outcome::Held);
            while mode == Mode::HoldFsync {
                std::thread::sleep(HOLD_POLL);
                mode = self.control.mode();
            }
            info!("{what} /{name} ({kind}): released ({mode})");
        }
        match mode {
            Mode::HoldFsync => unreachable!("the loop above waits until the hold ends"),
            Mode::FailFsync => {
                // Logged before the reply, so that a test which saw the error can rely on
                // finding the line.
                info!("{what} /{name} ({kind}): EIO injected");
                self.count(rel, Outcome::Injected);
                Err(Errno::EIO)
            }
            Mode::Ok => match run() {
                Ok(()) => {
                    info!("{what} /{name} ({kind}): ok");
                    self.count(rel, Outcome::Passed);
                    Ok(())
                }
                Err(e) => {
                    warn!("{what} /{name} ({kind}): the source failed: {e}");
                    self.count(rel, Outcome::Failed);
                    Err(e.into())
                }
            },
        }
    }
}
