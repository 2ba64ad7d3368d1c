//! The host link: a guest case prints `VUP-SYNC ACTION ARGS` and waits; the runner acts on
//! the host and answers `VUP-ACK ACTION TEXT` or `VUP-NAK ACTION REASON` on the guest's
//! console input (QEMU's stdin, a FIFO). The actions are the table [`ACTIONS`], each with
//! the guest cases it serves (guest-tests/src/cases/hostlink.rs is the guest side); the host
//! halves of catalogue E16–E18 are in `flush_checks.rs`.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use faultfs::counts::FileCounts;
use faultfs::harness::FaultFsMount;
use faultfs::Mode;
use pmem_frontend::daemon::DaemonProcess;
use pmem_metrics::Metrics;

use crate::flush_checks;

/// How long a snapshot waits for the daemon's metrics file after SIGUSR1.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);

/// The daemon's metrics and faultfs's counts of the image at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub metrics: Metrics,
    /// `None` without faultfs.
    pub faultfs: Option<FileCounts>,
}

/// What the actions reach on the host.
pub struct Host<'a> {
    pub daemon: Option<&'a mut DaemonProcess>,
    pub faultfs: Option<&'a FaultFsMount>,
    /// The image's name relative to the faultfs mount's root.
    pub image_name: &'a str,
    pub log_dir: &'a Path,
    pub state: &'a mut LinkState,
}

/// What the link remembers between actions.
#[derive(Debug, Default)]
pub struct LinkState {
    pub snapshots: HashMap<String, Snapshot>,
    /// faultfs's counts of the image when it was last set back to `ok`.
    pub ok_mark: Option<FileCounts>,
}

pub type ActionResult = Result<String, String>;

pub struct Action {
    pub name: &'static str,
    pub usage: &'static str,
    /// The guest cases (catalogue ids) that send it.
    pub serves: &'static str,
    pub what: &'static str,
    pub run: fn(&mut Host, &[&str]) -> ActionResult,
}

pub const ACTIONS: &[Action] = &[
    Action {
        name: "snapshot",
        usage: "snapshot LABEL",
        serves: "E16 flush_reaches_host, E18 flush_queue_full",
        what: "SIGUSR1 to the daemon; keeps its metrics (sync-LABEL.json) and faultfs's counts \
               of the image",
        run: snapshot_action,
    },
    Action {
        name: "check-flushes",
        usage: "check-flushes LABEL N",
        serves: "E16 flush_reaches_host",
        what: "since snapshot LABEL the daemon took and answered >= N requests with >= N \
               fdatasyncs, no errors, order_violations 0, and (with --faultfs) faultfs passed \
               >= N fdatasyncs of the image",
        run: flush_checks::check_flushes,
    },
    Action {
        name: "check-queue",
        usage: "check-queue LABEL CAP",
        serves: "E18 flush_queue_full",
        what: "since snapshot LABEL no request was answered with an error; reports the \
               largest batch one fdatasync answered against CAP, what a full ring holds",
        run: flush_checks::check_queue,
    },
    Action {
        name: "faultfs",
        usage: "faultfs ok|fail-fsync",
        serves: "E17 flush_error_eio",
        what: "switches faultfs's fsync fault injection (needs --faultfs)",
        run: faultfs_action,
    },
    Action {
        name: "check-sticky",
        usage: "check-sticky",
        serves: "E17 flush_error_eio",
        what: "after `faultfs ok`: faultfs injected EIO at least once and passed no fdatasync \
               of the image since; the daemon's metrics report the flush failure and an \
               error-level log record",
        run: flush_checks::check_sticky,
    },
];

/// The table as text, for `vmrun --list-actions`.
pub fn list_actions() -> String {
    let mut s = String::new();
    for a in ACTIONS {
        s.push_str(&format!(
            "{}\n    serves: {}\n    {}\n",
            a.usage, a.serves, a.what
        ));
    }
    s
}

impl Host<'_> {
    /// A fresh snapshot, kept under `label`.
    pub fn snapshot(&mut self, label: &str) -> Result<&Snapshot, String> {
        if label.is_empty()
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!("bad label '{label}'"));
        }
        let daemon = self
            .daemon
            .as_deref_mut()
            .ok_or("no daemon started by the runner")?;
        let metrics = daemon
            .snapshot(SNAPSHOT_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let _ = std::fs::write(
            self.log_dir.join(format!("sync-{label}.json")),
            metrics.to_json() + "\n",
        );
        let faultfs = match self.faultfs {
            Some(f) => Some(self.faultfs_counts(f)?),
            None => None,
        };
        self.state
            .snapshots
            .insert(label.to_string(), Snapshot { metrics, faultfs });
        Ok(&self.state.snapshots[label])
    }

    pub fn faultfs_counts(&self, f: &FaultFsMount) -> Result<FileCounts, String> {
        f.counts()
            .map(|c| c.of(self.image_name))
            .map_err(|e| format!("cannot read faultfs's counts: {e}"))
    }

    /// The snapshot taken earlier under `label`.
    pub fn earlier(&self, label: &str) -> Result<Snapshot, String> {
        self.state
            .snapshots
            .get(label)
            .cloned()
            .ok_or_else(|| format!("no snapshot '{label}'"))
    }
}

fn snapshot_action(host: &mut Host, args: &[&str]) -> ActionResult {
    let [label] = args else {
        return Err("usage: snapshot LABEL".into());
    };
    host.snapshot(label)?;
    Ok(format!("saved sync-{label}.json"))
}

fn faultfs_action(host: &mut Host, args: &[&str]) -> ActionResult {
    let f = host.faultfs.ok_or("no faultfs (run with --faultfs)")?;
    let mode = match args {
        ["ok"] => Mode::Ok,
        ["fail-fsync"] => Mode::FailFsync,
        _ => return Err(format!("unknown faultfs mode '{}'", args.join(" "))),
    };
    f.set_mode(mode)
        .map_err(|e| format!("cannot switch faultfs: {e}"))?;
    if mode == Mode::Ok {
        host.state.ok_mark = Some(host.faultfs_counts(f)?);
    }
    Ok(format!("mode {mode}"))
}

/// The runner's end of the link.
pub struct HostLink {
    /// QEMU's stdin, held open read-write by the runner so it never reaches EOF.
    fifo: File,
    pub path: PathBuf,
    log: File,
    /// Bytes of the guest's output whose complete lines have been looked at.
    scanned: usize,
    pub state: LinkState,
    /// Refused actions, each a failure of the run.
    pub failures: Vec<String>,
}

impl HostLink {
    /// Makes the FIFO `dir/hostlink` and opens it for QEMU's stdin.
    pub fn create(dir: &Path) -> std::io::Result<HostLink> {
        let path = dir.join("hostlink");
        let _ = std::fs::remove_file(&path);
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(std::io::Error::other)?;
        // SAFETY: mkfifo(3) with a valid NUL-terminated path; it touches no memory of ours.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Read-write: opening a FIFO for writing alone blocks until a reader comes.
        let fifo = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        let log = File::create(dir.join("hostlink.log"))?;
        Ok(HostLink {
            fifo,
            path,
            log,
            scanned: 0,
            state: LinkState::default(),
            failures: Vec::new(),
        })
    }

    /// QEMU's stdin.
    pub fn stdin(&self) -> std::io::Result<File> {
        self.fifo.try_clone()
    }

    /// Handles every complete VUP-SYNC line of `guest_out` not handled yet. `guest_out` only
    /// grows, so each poll looks at the new lines alone.
    pub fn poll(&mut self, guest_out: &str, mut host: Host) {
        let Some(end) = guest_out.rfind('\n').map(|i| i + 1) else {
            return;
        };
        if end <= self.scanned {
            return;
        }
        let new = &guest_out[self.scanned..end];
        self.scanned = end;
        for line in new
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| l.starts_with("VUP-SYNC "))
        {
            let _ = writeln!(self.log, "{} guest: {line}", clock());
            let mut words = line.split_whitespace().skip(1);
            let action = words.next().unwrap_or("");
            let args: Vec<&str> = words.collect();
            let result = match ACTIONS.iter().find(|a| a.name == action) {
                Some(a) => (a.run)(&mut host, &args),
                None => Err(format!("unknown action '{action}'")),
            };
            let (word, text) = match &result {
                Ok(t) => ("ACK", t.clone()),
                Err(why) => {
                    self.failures.push(format!(
                        "host check '{}' failed: {why}",
                        line.trim_start_matches("VUP-SYNC ")
                    ));
                    ("NAK", why.clone())
                }
            };
            // One line: the guest reads up to the newline.
            let text = text.replace('\n', "; ");
            let _ = writeln!(self.log, "{} host: VUP-{word} {action} {text}", clock());
            let _ = writeln!(self.fifo, "VUP-{word} {action} {text}");
        }
    }
}

/// Seconds since the epoch with milliseconds, for hostlink.log.
fn clock() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", d.as_secs(), d.subsec_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host with neither daemon nor faultfs.
    fn bare<'a>(dir: &'a Path, state: &'a mut LinkState) -> Host<'a> {
        Host {
            daemon: None,
            faultfs: None,
            image_name: "pmem0.img",
            log_dir: dir,
            state,
        }
    }

    #[test]
    fn unknown_actions_and_bad_arguments_are_refused_and_fail_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut link = HostLink::create(dir.path()).unwrap();
        let mut state = LinkState::default();
        let out = "VUP-SYNC frobnicate\nVUP-SYNC faultfs ok\nVUP-SYNC snapshot a b\nVUP-SYNC snapshot partial";
        link.poll(out, bare(dir.path(), &mut state));
        assert_eq!(link.failures.len(), 3, "{:?}", link.failures);
        assert!(link.failures[0].contains("unknown action 'frobnicate'"));
        assert!(link.failures[1].contains("no faultfs"));
        assert!(link.failures[2].contains("usage: snapshot LABEL"));
        // The answers went to the FIFO, one line each; the incomplete last line waits.
        let mut answers = vec![0u8; 4096];
        let n = std::io::Read::read(&mut link.stdin().unwrap(), &mut answers).unwrap();
        let answers = String::from_utf8_lossy(&answers[..n]).into_owned();
        assert_eq!(answers.lines().count(), 3, "{answers}");
        assert!(
            answers.starts_with("VUP-NAK frobnicate unknown action"),
            "{answers}"
        );
        // Polling again handles nothing twice.
        link.poll(out, bare(dir.path(), &mut state));
        assert_eq!(link.failures.len(), 3);
    }

    #[test]
    fn every_action_is_listed_with_the_cases_it_serves() {
        let l = list_actions();
        for a in ACTIONS {
            assert!(l.contains(a.usage) && !a.serves.is_empty(), "{}", a.name);
        }
        let mut names: Vec<&str> = ACTIONS.iter().map(|a| a.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ACTIONS.len(), "action names are unique");
    }
}
