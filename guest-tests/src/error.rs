//! The error a case fails with. Its text becomes the `# reason` of a `not ok` line, so it
//! names the operation and the errno (EIO is what a failed device flush looks like).

use std::io;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("{what}: {}", describe(.source))]
    Os { what: String, source: io::Error },
    #[error("{0}")]
    Failed(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Attach the failing operation to an `io::Error`.
pub trait Context<T> {
    fn ctx(self, what: impl Into<String>) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Os {
            what: what.into(),
            source,
        })
    }
}

/// Return early from a case with a formatted failure reason.
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::Failed(format!($($arg)*)))
    };
}
pub(crate) use fail;

/// Symbolic errno names, because catalogue expectations are written that way
/// ("must fail with EOPNOTSUPP").
pub fn errno_name(code: i32) -> Option<&'static str> {
    Some(match code {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::ENOTBLK => "ENOTBLK",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EUCLEAN => "EUCLEAN",
        _ => return None,
    })
}

pub fn describe(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => {
            let text = io::Error::from_raw_os_error(code).to_string();
            // io::Error renders as "Text (os error N)"; the name is what people search for.
            let text = text.split(" (os error").next().unwrap_or(&text).to_string();
            match errno_name(code) {
                Some(name) => format!("{name} ({text})"),
                None => format!("errno {code} ({text})"),
            }
        }
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_name_the_errno() {
        let r: io::Result<()> = Err(io::Error::from_raw_os_error(libc::EIO));
        let e = r.ctx("fsync persist.dat").unwrap_err();
        assert_eq!(e.to_string(), "fsync persist.dat: EIO (Input/output error)");
    }

    #[test]
    fn unknown_errno_keeps_number() {
        let e = io::Error::from_raw_os_error(4000);
        assert!(describe(&e).starts_with("errno 4000 ("));
    }

    #[test]
    fn non_os_error() {
        let e = io::Error::other("short read");
        assert_eq!(describe(&e), "short read");
    }

    #[test]
    fn fail_macro() {
        fn f() -> Result<()> {
            fail!("gen {} expected", 2)
        }
        assert_eq!(f().unwrap_err().to_string(), "gen 2 expected");
    }
}
