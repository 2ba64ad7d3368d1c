//! The vhost-user socket: refusing to steal a live daemon's socket, clearing a dead one's,
//! creating a new one with the permissions and group asked for, checking a frontend's socket
//! before connecting to it, and taking over an inherited listening socket (--fd, socket
//! activation).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
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
    Listen { path: PathBuf, source: io::Error },
    #[error("the directory {dir} of --socket-path {path} does not exist; create it first")]
    DirMissing { dir: PathBuf, path: PathBuf },
    #[error("the directory {dir} of --socket-path {path} is not a directory")]
    DirNotADirectory { dir: PathBuf, path: PathBuf },
    #[error("cannot create the socket {path} in {dir}: {source}; choose a directory the daemon may write")]
    DirNotWritable {
        dir: PathBuf,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot give the socket {path} to group {group}: {source}")]
    Chown {
        path: PathBuf,
        group: String,
        source: io::Error,
    },
    #[error("cannot take over the inherited socket (fd {fd}): {source}")]
    Adopt { fd: RawFd, source: io::Error },
}

/// Backlog of the listening socket; the daemon serves one frontend at a time, so a short
/// queue of waiting ones is plenty.
const BACKLOG: libc::c_int = 128;

/// The longest socket path a `sockaddr_un` holds, without its terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Checks, before the file is touched, that the socket can be created at `path`: its
/// directory exists, is a directory, and the daemon may create files in it. Without this a
/// typo in the socket's directory would be found only by bind(), after the file was created
/// or extended.
pub fn check_listen_dir(path: &Path) -> Result<(), SocketError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let err_path = || (dir.to_path_buf(), path.to_path_buf());
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            let (dir, path) = err_path();
            return Err(SocketError::DirNotADirectory { dir, path });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let (dir, path) = err_path();
            return Err(SocketError::DirMissing { dir, path });
        }
        Err(source) => {
            return Err(SocketError::Inspect {
                path: dir.to_path_buf(),
                source,
            })
        }
    }
    let dir_c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| SocketError::Inspect {
        path: dir.to_path_buf(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // AT_EACCESS: the effective ids decide, as they will for bind().
    // SAFETY: a NUL-terminated path; faccessat only reads it.
    let r = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            dir_c.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        )
    };
    if r != 0 {
        let (dir, path) = err_path();
        return Err(SocketError::DirNotWritable {
            dir,
            path,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// What an inherited descriptor is, as far as serving vhost-user on it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdFacts {
    NotASocket,
    Socket {
        /// `AF_UNIX`, `AF_INET`, ...
        family: libc::c_int,
        /// `SOCK_STREAM`.
        stream: bool,
        /// `listen()` was called on it (`SO_ACCEPTCONN`).
        listening: bool,
    },
}

/// Looks at `fd` without changing it. EBADF means it is not open.
pub fn fd_facts(fd: RawFd) -> io::Result<FdFacts> {
    // SAFETY: `st` is plain data, written by fstat before it is read.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into `st`; a closed `fd` gives EBADF.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Ok(FdFacts::NotASocket);
    }
    // SAFETY: as above, plain data written by getsockname.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` has room for `len` bytes, the largest address of any family.
    if unsafe {
        libc::getsockname(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let int_option = |option: libc::c_int| -> io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` has room for the int that SO_TYPE and SO_ACCEPTCONN return.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(value)
    };
    Ok(FdFacts::Socket {
        family: libc::c_int::from(addr.ss_family),
        stream: int_option(libc::SO_TYPE)? == libc::SOCK_STREAM,
        listening: int_option(libc::SO_ACCEPTCONN)? != 0,
    })
}

/// Takes over the inherited listening socket `fd`, which `config.rs` checked. Close-on-exec,
/// so nothing the daemon might ever start inherits it; blocking, because vhost-user-backend's
/// accept loop would spin on a non-blocking one (the flag belongs to the open file description
/// the parent shares, which a parent that hands the socket over does not accept on).
pub fn adopt(fd: RawFd) -> Result<Listener, SocketError> {
    let err = |source| SocketError::Adopt { fd, source };
    // SAFETY: fcntl on a descriptor config.rs found open; F_GETFD reads its flags only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    // SAFETY: as above; F_SETFD sets only the descriptor's own flags.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is an open, listening AF_UNIX stream socket (config.rs checked it) that
    // nothing else in this process owns: it was inherited, and this is the one place that
    // takes it, once.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    listener.set_nonblocking(false).map_err(err)?;
    Ok(Listener::from(listener))
}

/// The id of group `name`, or `None` if there is no such group (getgrnam_r, so that no other
/// thread's lookup can overwrite the answer).
pub fn group_id(name: &str) -> io::Result<Option<u32>> {
    let Ok(c_name) = CString::new(name) else {
        return Ok(None);
    };
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: plain data, filled by getgrnam_r before it is read.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; the strings it sets point into `buf`,
        // which outlives their only use (reading gr_gid, a plain integer, below).
        let r = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut group,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if r == libc::ERANGE && buf.len() < 1 << 20 {
            // A group with many members; its entry needs a larger buffer.
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        return Ok((!result.is_null()).then_some(group.gr_gid));
    }
}

/// Creates a listening socket at `path` with permissions `mode` and, if given, group `group`,
/// first removing a socket file that nobody listens on any more (left by a daemon that was
/// killed).
///
/// The mode is set through the umask around bind(): the kernel creates the socket file with
/// `0777 & !umask`, so there is no moment at which a wider mode lets someone else connect, as
/// a chmod after bind() would leave. fchmod() and fchown() cannot do it: on a socket they
/// change the socket's inode, not the file in the directory. The group is set on the path
/// (fchownat, not following links) after bind() and before listen(): until listen() a
/// connect() is refused, so by the time anyone can connect the file has its final owner and
/// mode. The umask is process-wide, which is why this runs while the daemon has no other
/// thread that could create files.
pub fn listen(path: &Path, mode: u32, group: Option<(&str, u32)>) -> Result<Listener, SocketError> {
    ensure_free(path)?;
    let listen_err = |source| SocketError::Listen {
        path: path.to_path_buf(),
        source,
    };
    let (addr, addr_len) = unix_address(path).map_err(listen_err)?;
    // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(listen_err(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mask = !mode & 0o777;
    // SAFETY: umask(2) cannot fail and touches no memory; the old value is put back below.
    let old = unsafe { libc::umask(mask as libc::mode_t) };
    // SAFETY: `addr` is an initialised sockaddr_un of which `addr_len` bytes are used.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            addr_len,
        )
    };
    let bind_error = io::Error::last_os_error();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    if bound != 0 {
        return Err(listen_err(bind_error));
    }
    // From here on the file is ours: remove it again if the socket does not come up.
    let undo = |e: SocketError| {
        let _ = std::fs::remove_file(path);
        e
    };
    if let Some((name, gid)) = group {
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| listen_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: a NUL-terminated path; uid -1 leaves the owner as it is.
        let r = unsafe {
            libc::fchownat(
                libc::AT_FDCWD,
                c_path.as_ptr(),
                u32::MAX,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r != 0 {
            return Err(undo(SocketError::Chown {
                path: path.to_path_buf(),
                group: name.to_string(),
                source: io::Error::last_os_error(),
            }));
        }
    }
    // SAFETY: listen(2) on the socket bound above.
    if unsafe { libc::listen(socket.as_raw_fd(), BACKLOG) } != 0 {
        return Err(undo(listen_err(io::Error::last_os_error())));
    }
    Ok(Listener::from(UnixListener::from(socket)))
}

/// `path` as a `sockaddr_un` and the length to pass with it.
fn unix_address(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_SOCKET_PATH || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a UNIX socket path must be 1 to {MAX_SOCKET_PATH} bytes without NUL"),
        ));
    }
    // SAFETY: sockaddr_un is plain data; all zeros is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
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
        let live = listen(&path, 0o600, None).unwrap();
        assert!(matches!(
            listen(&path, 0o600, None),
            Err(SocketError::InUse(_))
        ));
        // A killed daemon leaves its socket file behind, as dropping the listener does.
        drop(live);
        assert!(path.exists());
        let _again = listen(&path, 0o600, None).unwrap();

        let file = dir.path().join("plain");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(
            listen(&file, 0o600, None),
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
            let _l = listen(&path, mode, None).unwrap();
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
        let _l = listen(&path, 0o600, None).unwrap();
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

    #[test]
    fn the_socket_gets_the_group_before_it_listens() {
        use std::os::unix::fs::MetadataExt;
        let _turn = crate::sync::lock(&UMASK);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        // Any group other than ours shows the chown; root (the test machines) may pick any.
        // SAFETY: getegid(2) cannot fail.
        let ours = unsafe { libc::getegid() };
        let other = if ours == 0 { 1 } else { ours };
        let _l = listen(&path, 0o660, Some(("other", other))).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.gid(), other);
        assert_eq!(meta.mode() & 0o777, 0o660);
        UnixStream::connect(&path).unwrap();
    }

    #[test]
    fn missing_or_unwritable_socket_directories_are_found_before_bind() {
        let dir = tempfile::tempdir().unwrap();
        check_listen_dir(&dir.path().join("s.sock")).unwrap();
        check_listen_dir(Path::new("relative.sock")).unwrap();
        assert!(matches!(
            check_listen_dir(&dir.path().join("no/s.sock")),
            Err(SocketError::DirMissing { .. })
        ));
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            check_listen_dir(&file.join("s.sock")),
            Err(SocketError::DirNotADirectory { .. })
        ));
    }

    #[test]
    fn fd_facts_tell_the_kinds_apart() {
        use std::os::unix::net::UnixDatagram;
        let dir = tempfile::tempdir().unwrap();
        let l = UnixListener::bind(dir.path().join("l.sock")).unwrap();
        assert_eq!(
            fd_facts(l.as_raw_fd()).unwrap(),
            FdFacts::Socket {
                family: libc::AF_UNIX,
                stream: true,
                listening: true
            }
        );
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(matches!(
            fd_facts(a.as_raw_fd()).unwrap(),
            FdFacts::Socket {
                stream: true,
                listening: false,
                ..
            }
        ));
        let d = UnixDatagram::unbound().unwrap();
        assert!(matches!(
            fd_facts(d.as_raw_fd()).unwrap(),
            FdFacts::Socket { stream: false, .. }
        ));
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(matches!(
            fd_facts(t.as_raw_fd()).unwrap(),
            FdFacts::Socket {
                family: libc::AF_INET,
                ..
            }
        ));
        let f = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(fd_facts(f.as_raw_fd()).unwrap(), FdFacts::NotASocket);
        drop(f);
    }

    #[test]
    fn groups_by_name() {
        assert_eq!(group_id("root").unwrap(), Some(0));
        assert_eq!(group_id("no-such-group-vhost-user-pmem").unwrap(), None);
        assert_eq!(group_id("nul\0inside").unwrap(), None);
    }
}
