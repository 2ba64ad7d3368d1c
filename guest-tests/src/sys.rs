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

pub use libc::{MAP_PRIVATE, MAP_SHARED, MAP_SHARED_VALIDATE, MAP_SYNC, PROT_READ, PROT_WRITE};

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
