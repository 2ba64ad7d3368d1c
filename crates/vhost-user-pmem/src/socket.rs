//! The listening socket: refusing to steal a live daemon's socket, and clearing a dead one's.

use std::io;
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
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
}

/// Binds `path`, first removing a socket file that nobody listens on any more (left by a
/// daemon that was killed).
pub fn listen(path: &Path) -> Result<Listener, SocketError> {
    ensure_free(path)?;
    Listener::new(path, false).map_err(|source| SocketError::Listen {
        path: path.to_path_buf(),
        source,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_stale_refuses_live_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let live = listen(&path).unwrap();
        assert!(matches!(listen(&path), Err(SocketError::InUse(_))));
        drop(live);
        // A killed daemon leaves its socket file behind; std's listener does not unlink it.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let _again = listen(&path).unwrap();

        let file = dir.path().join("plain");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(listen(&file), Err(SocketError::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }
}
