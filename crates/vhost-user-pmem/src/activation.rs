//! systemd-style socket activation (sd_listen_fds(3)): a service manager that created the
//! listening socket passes it as fd 3 and says so with LISTEN_FDS and LISTEN_PID.
//!
//! Only the interpretation lives here; `config.rs` reads (and unsets) the variables and decides
//! what the answer means next to the command line.

use std::ffi::OsString;
use std::os::fd::RawFd;

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// The variables as found, unparsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenEnv {
    pub fds: Option<OsString>,
    pub pid: Option<OsString>,
}

/// What the variables say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Activation {
    /// No socket was passed.
    None,
    /// The variables were meant for another process; why, for the log.
    Ignored(String),
    /// One socket, at this descriptor.
    Socket(RawFd),
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number of descriptors; fix the service manager's setup")]
    BadCount(String),
    #[error("LISTEN_PID={0:?} is not a process id; fix the service manager's setup")]
    BadPid(String),
    #[error(
        "socket activation passed {0} sockets (LISTEN_FDS); vhost-user-pmem serves exactly one: \
         give the socket unit a single ListenStream="
    )]
    TooMany(u64),
}

/// Reads `env` as sd_listen_fds(3) does for the process `our_pid`. Variables addressed to
/// another pid (inherited from a parent that was activated) are ignored, as systemd says they
/// must be; so is LISTEN_FDS without LISTEN_PID. More than one socket is refused rather than
/// leaving the others open and unserved.
pub fn interpret(env: &ListenEnv, our_pid: u32) -> Result<Activation, ActivationError> {
    let Some(fds) = &env.fds else {
        return Ok(Activation::None);
    };
    let fds = fds.to_string_lossy();
    let Some(pid) = &env.pid else {
        return Ok(Activation::Ignored(format!(
            "LISTEN_FDS={fds} without LISTEN_PID ignored"
        )));
    };
    let pid = pid.to_string_lossy();
    let parsed_pid: u32 = pid
        .parse()
        .map_err(|_| ActivationError::BadPid(pid.to_string()))?;
    if parsed_pid != our_pid {
        return Ok(Activation::Ignored(format!(
            "LISTEN_FDS={fds} is for pid {parsed_pid}, not this one ({our_pid}); ignored"
        )));
    }
    let count: u64 = fds
        .parse()
        .map_err(|_| ActivationError::BadCount(fds.to_string()))?;
    match count {
        0 => Ok(Activation::None),
        1 => Ok(Activation::Socket(LISTEN_FDS_START)),
        n => Err(ActivationError::TooMany(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(fds: Option<&str>, pid: Option<&str>) -> ListenEnv {
        ListenEnv {
            fds: fds.map(Into::into),
            pid: pid.map(Into::into),
        }
    }

    #[test]
    fn one_socket_for_us_is_fd_3() {
        assert_eq!(
            interpret(&env(Some("1"), Some("42")), 42),
            Ok(Activation::Socket(3))
        );
    }

    #[test]
    fn nothing_or_zero_is_no_activation() {
        assert_eq!(interpret(&env(None, None), 42), Ok(Activation::None));
        assert_eq!(interpret(&env(None, Some("42")), 42), Ok(Activation::None));
        assert_eq!(
            interpret(&env(Some("0"), Some("42")), 42),
            Ok(Activation::None)
        );
    }

    #[test]
    fn another_process_s_variables_are_ignored() {
        for e in [env(Some("1"), Some("41")), env(Some("2"), None)] {
            assert!(
                matches!(interpret(&e, 42), Ok(Activation::Ignored(_))),
                "{e:?}"
            );
        }
    }

    #[test]
    fn more_than_one_or_garbage_is_refused() {
        assert_eq!(
            interpret(&env(Some("2"), Some("42")), 42),
            Err(ActivationError::TooMany(2))
        );
        assert!(matches!(
            interpret(&env(Some("x"), Some("42")), 42),
            Err(ActivationError::BadCount(_))
        ));
        assert!(matches!(
            interpret(&env(Some("-1"), Some("42")), 42),
            Err(ActivationError::BadCount(_))
        ));
        assert!(matches!(
            interpret(&env(Some("1"), Some("me")), 42),
            Err(ActivationError::BadPid(_))
        ));
    }
}
