//! The vhost-user socket: refusing to steal a live daemon's socket, clearing a dead one's,
//! creating a new one with the permissions asked for, and checking a frontend's socket before
//! connecting to it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use log::info;
use vhost::vhost_user::Listener;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("a live process is listening on {0}; is another vhost-user-pmem running? Choose another --socket-path")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot remove the stale socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot check {path}: {source}")]
    Inspect { path: PathBuf, source: io::Error },
    #[error("--connect {0}: no such socket; start the frontend (QEMU with -chardev socket,server=on) first")]
    ConnectMissing(PathBuf),
    #[error("--connect {0} is not a socket")]
    ConnectNotASocket(PathBuf),
    #[error("cannot connect to {path}: {reason}")]
    Connect { path: PathBuf, reason: String },
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
}

/// Binds `path` with permissions `mode`, first removing a socket file that nobody listens on
/// any more (left by a daemon that was killed).
///
/// The mode is set through the umask around bind(): the kernel creates the socket file with
/// `0777 & !umask`, so there is no moment at which a wider mode lets someone else connect, as
/// a chmod after bind() would leave. fchmod() cannot do it: on a socket it changes the socket's
/// inode, not the file in the directory. The umask is process-wide, which is why this runs
/// while the daemon has no other thread that could create files.
pub fn listen(path: &Path, mode: u32) -> Result<Listener, SocketError> {
    ensure_free(path)?;
    let mask = !mode & 0o777;
    // SAFETY: umask(2) cannot fail and touches no memory; the old value is put back below.
    let old = unsafe { libc::umask(mask as libc::mode_t) };
    let listener = Listener::new(path, false);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    listener.map_err(|source| SocketError::Listen {
        path: path.to_path_buf(),
        source,
    })
}

/// Checks, before the file is touched, that a frontend's socket exists at `path`. It does not
/// connect: QEMU's `server=on` chardev takes the first connection as the backend's, so a test
/// connection would be mistaken for the daemon itself.
pub fn check_connect_path(path: &Path) -> Result<(), SocketError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => Ok(()),
        Ok(_) => Err(SocketError::ConnectNotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(SocketError::ConnectMissing(path.to_path_buf()))
        }
        Err(source) => Err(SocketError::Inspect {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Fails if a live process listens on `path` or if `path` is something other than a socket;
/// removes a stale socket file.
pub fn ensure_free(path: &Path) -> Result<(), SocketError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse(path.to_path_buf())),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                std::fs::remove_file(path).map_err(|source| SocketError::RemoveStale {
                    path: path.to_path_buf(),
                    source,
                })?;
                info!("removed stale socket {}", path.display());
            }
            Err(source) => {
                return Err(SocketError::Inspect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(SocketError::Inspect {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    Ok(())
}

/// The listening socket's file, to remove at exit through a descriptor of its directory.
///
/// Removing it by path would need `unlink` on the seccomp allow-list, which would let a
/// compromised daemon delete any file its user may; `unlinkat` on this directory descriptor
/// is allowed for this descriptor only (see `sandbox.rs`).
pub struct SocketFile {
    dir: OwnedFd,
    name: CString,
    path: PathBuf,
}

impl SocketFile {
    /// Opens the directory of `path` (O_PATH: no read access needed).
    pub fn new(path: &Path) -> io::Result<SocketFile> {
        let invalid = || io::Error::new(io::ErrorKind::InvalidInput, "not a file path");
        let name = path.file_name().ok_or_else(invalid)?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir_c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| invalid())?;
        let name = CString::new(name.as_bytes()).map_err(|_| invalid())?;
        // SAFETY: a NUL-terminated path; the descriptor returned is owned below.
        let fd = unsafe {
            libc::open(
                dir_c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(SocketFile {
            // SAFETY: `fd` was just opened and nothing else owns it.
            dir: unsafe { OwnedFd::from_raw_fd(fd) },
            name,
            path: path.to_path_buf(),
        })
    }

    /// The directory descriptor that `remove` uses.
    pub fn dir_fd(&self) -> RawFd {
        self.dir.as_raw_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file.
    pub fn remove(&self) -> io::Result<()> {
        // SAFETY: a valid directory descriptor and a NUL-terminated name.
        if unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// listen() changes the process-wide umask for a moment; tests that call it take turns so
    /// one cannot see another's mask.
    static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn replaces_stale_refuses_live_and_files() {
        let _turn = crate::sync::lock(&UMASK);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let live = listen(&path, 0o600).unwrap();
        assert!(matches!(listen(&path, 0o600), Err(SocketError::InUse(_))));
        drop(live);
        // A killed daemon leaves its socket file behind; std's listener does not unlink it.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let _again = listen(&path, 0o600).unwrap();

        let file = dir.path().join("plain");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(
            listen(&file, 0o600),
            Err(SocketError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }

    #[test]
    fn the_socket_gets_the_mode_asked_for_and_the_umask_is_restored() {
        use std::os::unix::fs::PermissionsExt;
        let _turn = crate::sync::lock(&UMASK);
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: umask(2) only; this test puts back what it found.
        let before = unsafe { libc::umask(0o022) };
        for mode in [0o600, 0o660, 0o666, 0o700, 0o000] {
            let path = dir.path().join(format!("{mode:o}.sock"));
            let _l = listen(&path, mode).unwrap();
            let got = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
            assert_eq!(got, mode, "asked {mode:o}, got {got:o}");
        }
        // SAFETY: as above.
        let after = unsafe { libc::umask(before) };
        assert_eq!(after, 0o022, "listen() left the umask changed");
    }

    #[test]
    fn socket_file_removes_through_its_directory() {
        let _turn = crate::sync::lock(&UMASK);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _l = listen(&path, 0o600).unwrap();
        let f = SocketFile::new(&path).unwrap();
        f.remove().unwrap();
        assert!(!path.exists());
        assert_eq!(
            f.remove().unwrap_err().kind(),
            io::ErrorKind::NotFound,
            "a second remove finds nothing"
        );
    }

    #[test]
    fn connect_path_checks() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fe.sock");
        assert!(matches!(
            check_connect_path(&sock),
            Err(SocketError::ConnectMissing(_))
        ));
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        check_connect_path(&sock).unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            check_connect_path(&file),
            Err(SocketError::ConnectNotASocket(_))
        ));
    }
}
