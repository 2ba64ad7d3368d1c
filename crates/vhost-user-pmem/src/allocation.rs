//! The backing file's blocks against the host file system's free space: measuring both, and
//! allocating every block at start (`--allocate full`).
//!
//! Why it matters: QEMU maps the file itself, so a guest store to a hole makes the host file
//! system allocate a block inside QEMU's page fault. When it has none left, QEMU gets SIGBUS
//! and the guest dies with everything since its last flush. The daemon never sees that
//! fault; it can only allocate beforehand, or say how far the file system is from it.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use log::info;

use crate::size::ByteSize;

/// fallocate is called in pieces this large, so that a large file shows progress.
const CHUNK: u64 = 1 << 30;
/// A progress line at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// The file's blocks and the room left for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// The device size (the file's length).
    pub size: u64,
    /// Bytes of the file that have blocks (st_blocks; may include the file system's own
    /// metadata blocks for the file, so it can exceed `size` slightly).
    pub allocated: u64,
    /// Bytes an unprivileged writer can still allocate on the file system (f_bavail).
    pub fs_free: u64,
}

impl Space {
    /// Bytes of the device that have no block behind them yet: each one a guest store can
    /// need a new block for.
    pub fn unallocated(&self) -> u64 {
        self.size.saturating_sub(self.allocated)
    }

    /// The holes could not all be filled from the free space.
    pub fn short(&self) -> bool {
        self.unallocated() > self.fs_free
    }
}

/// Measures `file`, whose device size is `size`.
pub fn measure(file: &File, size: u64) -> io::Result<Space> {
    let meta = file.metadata()?;
    // SAFETY: statvfs is plain old data, fully written by fstatvfs on success.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the call (`file` owns it) and `st` is writable.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Space {
        size,
        allocated: meta.blocks() * 512,
        fs_free: st.f_bavail.saturating_mul(st.f_frsize),
    })
}

/// Gives every byte of `file` up to `size` a block (fallocate mode 0: the contents are kept,
/// holes read as zeros as before). Logs progress for a large file, and how many bytes were
/// `holes` (without a block, as measured before).
pub fn allocate_all(file: &File, path: &Path, size: u64, holes: u64) -> io::Result<()> {
    let t0 = Instant::now();
    let mut last_log = t0;
    let mut done = 0;
    while done < size {
        let len = CHUNK.min(size - done);
        // SAFETY: fallocate only reads its integer arguments; the descriptor is open.
        let r = unsafe {
            libc::fallocate(file.as_raw_fd(), 0, done as libc::off_t, len as libc::off_t)
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        done += len;
        if last_log.elapsed() >= PROGRESS_EVERY && done < size {
            last_log = Instant::now();
            info!(
                "allocating {}: {} of {} done",
                path.display(),
                ByteSize(done),
                ByteSize(size)
            );
        }
    }
    info!(
        "allocated every block of {} ({}, {} of it holes before) in {} ms",
        path.display(),
        ByteSize(size),
        ByteSize(holes),
        t0.elapsed().as_millis()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_file_is_all_holes_and_an_allocated_one_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(8 << 20).unwrap();
        let s = measure(&f, 8 << 20).unwrap();
        assert!(s.unallocated() > 7 << 20, "{s:?}");
        assert!(s.fs_free > 0);
        allocate_all(&f, &path, 8 << 20, s.unallocated()).unwrap();
        let s = measure(&f, 8 << 20).unwrap();
        assert_eq!(s.unallocated(), 0, "{s:?}");
        assert!(!s.short());
        assert_eq!(f.metadata().unwrap().len(), 8 << 20, "the length is kept");
    }

    #[test]
    fn short_means_more_holes_than_free_space() {
        let s = Space {
            size: 10,
            allocated: 4,
            fs_free: 5,
        };
        assert_eq!(s.unallocated(), 6);
        assert!(s.short());
        let s = Space { fs_free: 6, ..s };
        assert!(!s.short());
        let over = Space {
            size: 10,
            allocated: 12,
            fs_free: 0,
        };
        assert_eq!(
            over.unallocated(),
            0,
            "metadata blocks never make it negative"
        );
    }
}
