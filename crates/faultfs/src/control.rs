//! The fault switch: a small state file outside the mount, read at every fsync.
//!
//! Reading the file at each fsync (rather than watching it) means a change is in force for
//! the very next fsync after the writer's `rename` or `write` returned, with no thread and no
//! race to reason about. fsyncs are rare enough that the extra read costs nothing.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use log::error;

/// What the filesystem does with FSYNC and FSYNCDIR requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Pass them through to the source file system.
    Ok,
    /// Answer them with EIO without touching the source.
    FailFsync,
    /// Keep them waiting until the mode changes, then do what the new mode says: lets a test
    /// act while an fsync is certainly in progress.
    HoldFsync,
}

impl Mode {
    /// The word that selects this mode in the control file.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ok => "ok",
            Mode::FailFsync => "fail-fsync",
            Mode::HoldFsync => "hold-fsync",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown faultfs mode {0:?} (expected \"ok\", \"fail-fsync\" or \"hold-fsync\")")]
pub struct UnknownMode(pub String);

impl FromStr for Mode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            // An empty file is what a shell's `>` leaves for an instant before the new word
            // lands; reading it as "ok" keeps that instant harmless.
            "" | "ok" => Ok(Mode::Ok),
            "fail-fsync" => Ok(Mode::FailFsync),
            "hold-fsync" => Ok(Mode::HoldFsync),
            other => Err(UnknownMode(other.to_string())),
        }
    }
}

/// Reads the current mode from the control file.
#[derive(Clone, Debug)]
pub struct Control {
    path: Option<PathBuf>,
}

impl Control {
    /// A control file at `path`; `None` means always [`Mode::Ok`].
    pub fn new(path: Option<PathBuf>) -> Self {
        Control { path }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The mode in force now. A missing file means [`Mode::Ok`]. An unreadable file or an
    /// unknown word is logged and read as [`Mode::FailFsync`]: a fault-injection run that
    /// silently ignored a typo would report a pass it never earned.
    pub fn mode(&self) -> Mode {
        let Some(path) = &self.path else {
            return Mode::Ok;
        };
        match std::fs::read_to_string(path) {
            Ok(text) => text.parse().unwrap_or_else(|e: UnknownMode| {
                error!("{}: {e}; failing fsync", path.display());
                Mode::FailFsync
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Mode::Ok,
            Err(e) => {
                error!("cannot read {}: {e}; failing fsync", path.display());
                Mode::FailFsync
            }
        }
    }
}

/// Switches the filesystem that watches `control` to `mode`.
///
/// Writes a temporary file and renames it over `control`, so that an fsync running at the
/// same moment sees either the old word or the new one, never a half-written file.
pub fn set_mode(control: &Path, mode: Mode) -> io::Result<()> {
    let mut tmp = control.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{mode}\n"))?;
    std::fs::rename(&tmp, control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_words() {
        assert_eq!("ok\n".parse::<Mode>().unwrap(), Mode::Ok);
        assert_eq!("".parse::<Mode>().unwrap(), Mode::Ok);
        assert_eq!(" fail-fsync \n".parse::<Mode>().unwrap(), Mode::FailFsync);
        assert!("fail".parse::<Mode>().is_err());
    }

    #[test]
    fn reads_the_file_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control");
        let c = Control::new(Some(path.clone()));
        assert_eq!(c.mode(), Mode::Ok, "missing file");
        set_mode(&path, Mode::FailFsync).unwrap();
        assert_eq!(c.mode(), Mode::FailFsync);
        set_mode(&path, Mode::Ok).unwrap();
        assert_eq!(c.mode(), Mode::Ok);
        std::fs::write(&path, "typo\n").unwrap();
        assert_eq!(c.mode(), Mode::FailFsync, "unknown words fail safe");
        assert_eq!(Control::new(None).mode(), Mode::Ok);
    }
}
