//! Readiness notification for a service manager (sd_notify(3)): one datagram `READY=1` once
//! the daemon can serve, one `STOPPING=1` when a signal stops it, to the AF_UNIX datagram
//! socket named by NOTIFY_SOCKET (a path, or `@name` for the abstract namespace).
//!
//! The socket is created and connected before the seccomp filter goes in; after that a
//! notification is a plain write(2) on it, a call the filter allows anyway, so the sandbox
//! needs nothing for this (see docs/security.md).

use std::ffi::OsStr;
use std::io;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;

/// Where NOTIFY_SOCKET points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddr {
    Path(PathBuf),
    /// The name after the `@`, in Linux's abstract socket namespace.
    Abstract(Vec<u8>),
}

impl NotifyAddr {
    /// `/path` or `@name`; anything else (a relative path, systemd's newer `vsock:` form) is
    /// not an address this daemon can use.
    pub fn parse(text: &OsStr) -> Option<NotifyAddr> {
        let bytes = text.as_bytes();
        match bytes.first() {
            Some(b'/') => Some(NotifyAddr::Path(PathBuf::from(text))),
            Some(b'@') if bytes.len() > 1 => Some(NotifyAddr::Abstract(bytes[1..].to_vec())),
            _ => None,
        }
    }
}

impl std::fmt::Display for NotifyAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotifyAddr::Path(p) => write!(f, "{}", p.display()),
            NotifyAddr::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
        }
    }
}

/// A datagram socket connected to the service manager.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
}

impl Notifier {
    pub fn connect(addr: &NotifyAddr) -> io::Result<Notifier> {
        let socket = UnixDatagram::unbound()?;
        match addr {
            NotifyAddr::Path(p) => socket.connect(p)?,
            NotifyAddr::Abstract(name) => {
                socket.connect_addr(&SocketAddr::from_abstract_name(name)?)?
            }
        }
        Ok(Notifier { socket })
    }

    /// Sends one notification (`KEY=VALUE` lines). write(2), not send(2): glibc's send is
    /// the sendto system call, which the seccomp filter does not allow.
    pub fn send(&self, message: &str) -> io::Result<()> {
        // SAFETY: a valid, connected socket and a buffer of `message.len()` readable bytes.
        let n = unsafe {
            libc::write(
                self.socket.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            NotifyAddr::parse(OsStr::new("/run/systemd/notify")),
            Some(NotifyAddr::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            NotifyAddr::parse(OsStr::new("@sd")),
            Some(NotifyAddr::Abstract(b"sd".to_vec()))
        );
        for bad in ["", "@", "notify", "vsock:2:1234"] {
            assert_eq!(NotifyAddr::parse(OsStr::new(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn sends_to_a_path_and_to_an_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(&NotifyAddr::Path(path)).unwrap();
        n.send("READY=1").unwrap();
        let mut buf = [0u8; 64];
        let len = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");

        let name = format!("vhost-user-pmem-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let manager = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::connect(&NotifyAddr::Abstract(name.into_bytes())).unwrap();
        n.send("STOPPING=1").unwrap();
        let len = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1");
    }
}
