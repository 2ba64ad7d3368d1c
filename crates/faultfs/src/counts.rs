//! What faultfs did with each FSYNC/FSYNCDIR, counted per file and written as JSON after every
//! one, so that tests decide from numbers rather than from the wording of log lines.
//!
//! ```json
//! {"version":1,"files":{"pmem0.img":{"passed":48,"injected":0,"held":0,"failed":0}}}
//! ```
//!
//! Keys are paths relative to the mount's root. The file is replaced whole (a temporary file
//! and a rename), and written before the request is answered: whoever saw an fsync return can
//! read it counted.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use log::warn;
use serde::{Deserialize, Serialize};

pub const COUNTS_VERSION: u32 = 1;

/// The outcomes of one file's fsyncs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCounts {
    /// Passed through to the source, which succeeded.
    pub passed: u64,
    /// Answered with an injected EIO.
    pub injected: u64,
    /// Held (hold-fsync) before being let through or failed.
    pub held: u64,
    /// Passed through to the source, which failed.
    pub failed: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub version: u32,
    pub files: BTreeMap<String, FileCounts>,
}

/// One fsync's outcome, for [`CountsFile::record`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Injected,
    Held,
    Failed,
}

impl Counts {
    /// Reads a counts file; a file that does not exist yet means no fsync so far.
    pub fn read(path: &Path) -> io::Result<Counts> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(io::Error::other),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Counts {
                version: COUNTS_VERSION,
                files: BTreeMap::new(),
            }),
            Err(e) => Err(e),
        }
    }

    /// The counts of `name` (relative to the mount's root; a leading `/` is ignored).
    pub fn of(&self, name: &str) -> FileCounts {
        self.files
            .get(name.trim_start_matches('/'))
            .copied()
            .unwrap_or_default()
    }

    /// All files together.
    pub fn total(&self) -> FileCounts {
        self.files
            .values()
            .fold(FileCounts::default(), |a, c| FileCounts {
                passed: a.passed + c.passed,
                injected: a.injected + c.injected,
                held: a.held + c.held,
                failed: a.failed + c.failed,
            })
    }
}

/// The counts kept by a running faultfs, and the file they are written to.
#[derive(Debug)]
pub struct CountsFile {
    path: PathBuf,
    counts: Mutex<Counts>,
}

impl CountsFile {
    pub fn new(path: PathBuf) -> CountsFile {
        CountsFile {
            path,
            counts: Mutex::new(Counts {
                version: COUNTS_VERSION,
                files: BTreeMap::new(),
            }),
        }
    }

    /// Counts one outcome for `rel` and rewrites the file. A failed write is logged, not
    /// returned: the fsync itself must not fail because of the bookkeeping.
    pub fn record(&self, rel: &Path, outcome: Outcome) {
        let mut counts = crate::fs::lock(&self.counts);
        let c = counts.files.entry(rel.display().to_string()).or_default();
        match outcome {
            Outcome::Passed => c.passed += 1,
            Outcome::Injected => c.injected += 1,
            Outcome::Held => c.held += 1,
            Outcome::Failed => c.failed += 1,
        }
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let json = serde_json::to_string(&*counts).expect("counts serialize");
        if let Err(e) = std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, &self.path))
        {
            warn!("cannot write the counts to {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_written_per_file_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("counts.json");
        assert_eq!(Counts::read(&path).unwrap().total(), FileCounts::default());
        let f = CountsFile::new(path.clone());
        f.record(Path::new("a.img"), Outcome::Passed);
        f.record(Path::new("a.img"), Outcome::Passed);
        f.record(Path::new("b"), Outcome::Injected);
        f.record(Path::new("b"), Outcome::Held);
        let c = Counts::read(&path).unwrap();
        assert_eq!(c.of("/a.img").passed, 2);
        assert_eq!(c.of("b").injected, 1);
        assert_eq!(c.of("b").held, 1);
        assert_eq!(c.of("missing"), FileCounts::default());
        assert_eq!(c.total().passed + c.total().injected, 3);
    }
}
