//! Thin safe wrappers over the syscalls std does not offer. Each returns `io::Result`
//! with the raw errno preserved, because several cases assert on the exact errno.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8};

pub use libc::{
    MAP_PRIVATE, MAP_SHARED, MAP_SHARED_VALIDATE, MAP_SYNC, PROT_NONE, PROT_READ, PROT_WRITE,
};

pub const PAGE: usize = 4096;
/// The size of a PMD (huge page) mapping on x86-64.
pub const PMD: usize = 2 << 20;

/// `STATX_ATTR_DAX` from linux/stat.h.
pub const STATX_ATTR_DAX: u64 = 0x0020_0000;

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A live mmap, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; access goes through &self /
// &mut self slices, so Rust's aliasing rules apply as for a Vec<u8>.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared access only hands out shared slices.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// mmap `len` bytes of `file` at `offset`. `flags` is passed through unchanged, so
    /// callers can try MAP_SYNC and MAP_SHARED_VALIDATE combinations.
    pub fn new(file: &File, len: usize, prot: i32, flags: i32, offset: u64) -> io::Result<Mapping> {
        if flags & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE) != 0 {
            // A fixed address could replace memory Rust still uses.
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: without MAP_FIXED, a NULL hint lets the kernel pick an unused range, so
        // no existing Rust object is overwritten; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                flags,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { ptr, len })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is mapped for the lifetime of self. The files mapped are
        // the test's own scratch files, which nothing else writes or truncates while a
        // slice is live. Callers map with PROT_READ before reading.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees no other slice is live.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Like `new`, but the mapping starts `skew` bytes past a multiple of `align` (a power
    /// of two): PMD faults need a 2 MiB-aligned address, and the kernel only aligns some
    /// mappings by itself.
    pub fn new_aligned(
        file: &File,
        len: usize,
        prot: i32,
        flags: i32,
        offset: u64,
        align: usize,
        skew: usize,
    ) -> io::Result<Mapping> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        let fd = file.as_raw_fd();
        Self::place(len, align, skew, |addr| {
            // SAFETY: addr..addr+len lies inside a PROT_NONE reservation that `place`
            // made and owns, so MAP_FIXED replaces nothing but that reservation.
            unsafe { libc::mmap(addr, len, prot, flags | libc::MAP_FIXED, fd, offset) }
        })
    }

    /// Anonymous MAP_SHARED memory: survives fork() as the same pages, so processes of
    /// one case can share counters and flags through it (zero-filled).
    pub fn shared_anonymous(len: usize) -> io::Result<Mapping> {
        // SAFETY: no MAP_FIXED, so the kernel picks an unused range; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                PROT_READ | PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { ptr, len })
    }

    /// Reserve len + align + skew bytes of address space, let `map` put the real mapping
    /// at the aligned address inside it, and give back the rest of the reservation.
    fn place(
        len: usize,
        align: usize,
        skew: usize,
        map: impl FnOnce(*mut libc::c_void) -> *mut libc::c_void,
    ) -> io::Result<Mapping> {
        if !align.is_power_of_two() || len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let total = len + align + skew;
        // SAFETY: no MAP_FIXED; an inaccessible private reservation that nothing else
        // uses. Checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = base as usize;
        let aligned = (start + align - 1) & !(align - 1);
        let addr = aligned + skew;
        let got = map(addr as *mut libc::c_void);
        let err = (got == libc::MAP_FAILED).then(io::Error::last_os_error);
        // Give back what is left of the reservation: the head, the tail, and on failure
        // the middle too.
        let unmap = |from: usize, to: usize| {
            if to > from {
                // SAFETY: from..to is part of our own reservation, holding no Rust object.
                unsafe { libc::munmap(from as *mut libc::c_void, to - from) };
            }
        };
        unmap(start, addr);
        unmap(addr + len, start + total);
        if let Some(e) = err {
            unmap(addr, addr + len);
            return Err(e);
        }
        if got as usize != addr {
            unmap(addr, addr + len);
            return Err(io::Error::other("MAP_FIXED mapping landed elsewhere"));
        }
        let ptr = NonNull::new(addr as *mut u8).ok_or_else(|| io::Error::other("NULL mapping"))?;
        Ok(Mapping { ptr, len })
    }

    /// Move the mapping to a fresh `align`-aligned address with mremap(MREMAP_FIXED),
    /// keeping its pages (and their page-table entries where the kernel can).
    pub fn mremap_aligned(self, align: usize) -> io::Result<Mapping> {
        let (old, len) = (self.ptr.as_ptr(), self.len);
        let moved = Self::place(len, align, 0, |addr| {
            // SAFETY: the source is our own live mapping; the target lies inside a
            // reservation `place` owns. On success the old range is gone, and `self` is
            // forgotten below so it is not unmapped twice.
            unsafe {
                libc::mremap(
                    old.cast(),
                    len,
                    len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    addr,
                )
            }
        });
        match moved {
            Ok(m) => {
                std::mem::forget(self);
                Ok(m)
            }
            // The old mapping is untouched; dropping self unmaps it.
            Err(e) => Err(e),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// The mapping as 64-bit atomics. Racing cases use only this view: other threads,
    /// other processes and the kernel change these bytes at any time, which atomics
    /// permit and plain slices do not. An access may still raise SIGBUS (past EOF).
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: mmap returns page-aligned memory, so the start is 8-byte aligned;
        // AtomicU64 has the size and layout of u64; the range stays mapped while self
        // lives, and atomics allow shared mutation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU64>(), self.len / 8) }
    }

    /// The mapping as byte atomics (see `words`).
    pub fn atomic_bytes(&self) -> &[AtomicU8] {
        // SAFETY: as in `words`; AtomicU8 has the layout of u8.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU8>(), self.len) }
    }

    pub fn protect(&mut self, prot: i32) -> io::Result<()> {
        // SAFETY: the range is our own mapping; &mut self means no slice of it is live
        // that a PROT_NONE could invalidate.
        check(unsafe { libc::mprotect(self.ptr.as_ptr().cast(), self.len, prot) })
    }

    /// madvise `advice` on [offset, offset+len) of the mapping (page-aligned).
    pub fn advise(&self, offset: usize, len: usize, advice: i32) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: the range is inside our mapping. MADV_DONTNEED on a shared file
        // mapping only drops page-table entries; the data stays in the file, so any
        // later access reads the same bytes again.
        check(unsafe { libc::madvise(self.ptr.as_ptr().add(offset).cast(), len, advice) })
    }

    /// pwrite(2) from [offset, offset+len) of the mapping: the kernel reads the mapping
    /// (faulting it in, or pinning it for O_DIRECT), Rust code never touches it.
    pub fn pwrite_from(
        &self,
        file: &File,
        offset: usize,
        len: usize,
        pos: u64,
    ) -> io::Result<usize> {
        let ptr = self.range_ptr(offset, len)?;
        let pos =
            libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: ptr..ptr+len is inside the mapping; the kernel validates the user
        // range and returns EFAULT rather than faulting us.
        let n = unsafe { libc::pwrite(file.as_raw_fd(), ptr.cast(), len, pos) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// pread(2) into [offset, offset+len) of the mapping. Takes &self because racing
    /// cases share one mapping between threads; those never form slices of it (see
    /// `words`), and the kernel's store is like a store from another process.
    pub fn pread_into(
        &self,
        file: &File,
        offset: usize,
        len: usize,
        pos: u64,
    ) -> io::Result<usize> {
        let ptr = self.range_ptr(offset, len)?;
        let pos =
            libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: as in pwrite_from; a read-only mapping gives EFAULT.
        let n = unsafe { libc::pread(file.as_raw_fd(), ptr.cast(), len, pos) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    fn range_ptr(&self, offset: usize, len: usize) -> io::Result<*mut u8> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: offset <= len of the mapping, so the result stays inside it.
        Ok(unsafe { self.ptr.as_ptr().add(offset) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap and no slice outlives self.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// msync the pages holding `range`; its start must be page-aligned (as the kernel needs).
pub fn msync(range: &[u8], flags: i32) -> io::Result<()> {
    // SAFETY: msync only inspects the address range; a range that is not mapped gives
    // ENOMEM rather than touching memory.
    check(unsafe { libc::msync(range.as_ptr() as *mut libc::c_void, range.len(), flags) })
}

/// fallocate mode 0: allocate blocks (as unwritten extents) and extend the size.
pub fn fallocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on an owned fd; no memory is passed.
    check(unsafe { libc::fallocate(file.as_raw_fd(), 0, off, len) })
}

pub const FALLOC_PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
pub const FALLOC_ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;

/// fallocate with an explicit mode (punch hole, zero range, keep size).
pub fn fallocate_mode(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on an owned fd; no memory is passed.
    check(unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) })
}

/// Open read-write with O_DIRECT (a block device, or a DAX file where it means DAX I/O).
pub fn open_direct(path: &Path, write: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// The number of threads of this process (from /proc/self/status), to refuse fork()
/// while other threads might hold locks the child would inherit.
pub fn thread_count() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The statx attribute bits and which of them the filesystem supports.
#[derive(Clone, Copy, Debug)]
pub struct StatxAttributes {
    pub attributes: u64,
    pub mask: u64,
}

pub fn statx_attributes(path: &Path) -> io::Result<StatxAttributes> {
    let c = cstring(path)?;
    let mut buf = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: c is a valid NUL-terminated path and buf is a writable statx buffer.
    check(unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            0,
            libc::STATX_BASIC_STATS,
            buf.as_mut_ptr(),
        )
    })?;
    // SAFETY: statx succeeded and filled the buffer (which was zeroed anyway).
    let st = unsafe { buf.assume_init() };
    Ok(StatxAttributes {
        attributes: st.stx_attributes,
        mask: st.stx_attributes_mask,
    })
}

pub fn mount(source: &Path, target: &Path, fstype: &str, data: &str) -> io::Result<()> {
    let source = cstring(source)?;
    let target = cstring(target)?;
    let fstype = CString::new(fstype).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let data = CString::new(data).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    })
}

pub fn umount(target: &Path) -> io::Result<()> {
    let target = cstring(target)?;
    // SAFETY: valid NUL-terminated path.
    check(unsafe { libc::umount2(target.as_ptr(), 0) })
}

/// CLOCK_MONOTONIC_RAW in nanoseconds: not slewed by NTP, so intervals are honest.
pub fn monotonic_raw_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec; CLOCK_MONOTONIC_RAW always exists on Linux.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC_RAW, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() }
}

/// Kernel release, for the run's header.
pub fn kernel_release() -> String {
    let mut u = MaybeUninit::<libc::utsname>::zeroed();
    // SAFETY: u is a writable utsname buffer.
    if unsafe { libc::uname(u.as_mut_ptr()) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname succeeded; release is NUL-terminated within its array.
    let release = unsafe { std::ffi::CStr::from_ptr(u.assume_init_ref().release.as_ptr()) };
    release.to_string_lossy().into_owned()
}

/// Minor page faults of this process so far (ru_minflt): with DAX a PMD fault counts
/// once per 2 MiB, a PTE fault once per 4 KiB.
pub fn minor_faults() -> u64 {
    let mut ru = MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: ru is a writable rusage buffer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } != 0 {
        return 0;
    }
    // SAFETY: getrusage succeeded and filled the buffer.
    unsafe { ru.assume_init() }.ru_minflt as u64
}

/// The kernel log ring buffer (what dmesg prints), to explain failures the errno cannot.
pub fn kernel_log() -> Option<String> {
    const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
    const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;
    // SAFETY: SIZE_BUFFER ignores the buffer arguments.
    let size = unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) };
    let size = usize::try_from(size).ok().filter(|&s| s > 0)?;
    let mut buf = vec![0u8; size];
    // SAFETY: buf is writable for `size` bytes, which is what we pass.
    let n = unsafe {
        libc::klogctl(
            SYSLOG_ACTION_READ_ALL,
            buf.as_mut_ptr().cast(),
            libc::c_int::try_from(size).ok()?,
        )
    };
    let n = usize::try_from(n).ok()?;
    buf.truncate(n);
    Some(String::from_utf8_lossy(&buf).into_owned())
}
