//! The few system calls std does not wrap.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::RawFd;
use std::path::Path;
use std::time::UNIX_EPOCH;

use fuser::TimeOrNow;

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
            Err(before) => {
                // Before the epoch: whole seconds down, nanoseconds up from there.
                let d = before.duration();
                let mut secs = -(d.as_secs() as libc::time_t);
                let mut nsecs = d.subsec_nanos() as libc::c_long;
                if nsecs > 0 {
                    secs -= 1;
                    nsecs = 1_000_000_000 - nsecs;
                }
                libc::timespec {
                    tv_sec: secs,
                    tv_nsec: nsecs,
                }
            }
        },
    }
}

/// utimensat(2) without following a final symlink; `None` leaves a time alone.
pub fn set_times(
    path: &Path,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
) -> io::Result<()> {
    let path = cstring(path)?;
    let times = [timespec(atime), timespec(mtime)];
    // SAFETY: `path` is a NUL-terminated string and `times` two timespecs, both alive for
    // the call; utimensat writes nothing.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

pub fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let path = cstring(path)?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value that the call overwrites.
    let mut out: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `out` is a valid, writable statvfs.
    check(unsafe { libc::statvfs(path.as_ptr(), &mut out) })?;
    Ok(out)
}

pub fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fallocate only reads its integer arguments; the caller keeps `fd` open.
    check(unsafe { libc::fallocate(fd, mode, offset, len) })
}

/// Detaches the mount at `path` now, even while files on it are open (MNT_DETACH); the
/// kernel finishes the unmount when the last of them is closed.
pub fn lazy_unmount(path: &Path) -> io::Result<()> {
    let path = cstring(path)?;
    // SAFETY: `path` is NUL-terminated and alive for the call.
    check(unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn converts_times() {
        let t = timespec(Some(TimeOrNow::SpecificTime(
            UNIX_EPOCH + Duration::new(5, 7),
        )));
        assert_eq!((t.tv_sec, t.tv_nsec), (5, 7));
        let t = timespec(Some(TimeOrNow::SpecificTime(
            UNIX_EPOCH - Duration::from_millis(1500),
        )));
        assert_eq!((t.tv_sec, t.tv_nsec), (-2, 500_000_000));
        assert_eq!(timespec(None).tv_nsec, libc::UTIME_OMIT);
    }

    #[test]
    fn sets_times_and_stats() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let when = UNIX_EPOCH + Duration::from_secs(1_000_000);
        set_times(&f, None, Some(TimeOrNow::SpecificTime(when))).unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().modified().unwrap(), when);
        assert!(statvfs(dir.path()).unwrap().f_bsize > 0);
    }
}
