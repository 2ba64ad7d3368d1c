//! The case runner: the context every suite gets (arguments, TAP bookkeeping, the kernel
//! log watch, the filesystem state), running one case with its dependencies, panics and
//! kernel log trouble judged, in-process or in a forked child with a deadline.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::fs_state::FsState;
use crate::args::{Args, FsType};
use crate::crash;
use crate::error::Result;
use crate::isolate::{self, Child, End, Record};
use crate::kmsg::{self, Kmsg};
use crate::sys;
use crate::tap::{Outcome, Tap};

/// How a case that ran to completion ended. Errors (`Err`) are failures too; `Fail` is for
/// a case that finished but must still not count as passed.
pub enum Verdict {
    Pass,
    Skip(String),
    Fail(String),
}

pub struct Ctx<'a> {
    pub args: &'a Args,
    tap: Tap,
    /// Names of failed cases, for cases that depend on them.
    failed: Vec<String>,
    /// What this run did to the device and its filesystem so far.
    pub(super) fs_state: FsState,
    /// /dev/kmsg, read before and after every case.
    kmsg: Option<Kmsg>,
}

/// What an isolated case needs from the context, copied into the forked child.
#[derive(Clone, Debug)]
pub struct Env {
    pub mnt: PathBuf,
    pub dev: PathBuf,
    pub fs: FsType,
    /// --stress: run time-bounded cases this long instead of their defaults.
    pub stress: Option<Duration>,
}

impl Env {
    /// How long a time-bounded case runs: --stress, or its TCG-sized default.
    pub fn duration(&self, default: Duration) -> Duration {
        self.stress.unwrap_or(default)
    }
}

impl<'a> Ctx<'a> {
    pub fn new(args: &'a Args) -> Self {
        Ctx {
            args,
            tap: Tap::stdout(),
            failed: Vec::new(),
            fs_state: FsState::default(),
            kmsg: Kmsg::open().ok(),
        }
    }

    pub fn env(&self) -> Env {
        Env {
            mnt: self.args.mnt.clone(),
            dev: self.args.dev.clone(),
            fs: self.args.fs,
            stress: self.args.stress_secs.map(Duration::from_secs),
        }
    }

    /// Whether --only lets catalogue case `name` run.
    pub fn selected(&self, name: &str) -> bool {
        self.args.only.is_empty() || self.args.only.iter().any(|o| o == name)
    }

    /// Kernel log lines since the last drain that report trouble.
    fn kernel_trouble(&mut self) -> Vec<String> {
        match self.kmsg.as_mut() {
            Some(k) => k
                .drain()
                .into_iter()
                .filter(|l| kmsg::is_trouble(l))
                .collect(),
            None => Vec::new(),
        }
    }

    /// Run a catalogue case in a forked child with a deadline (see isolate.rs): a hang
    /// or a fatal signal fails this case only, and the suite goes on. Not run at all
    /// when --only excludes it.
    pub fn case_isolated<F>(&mut self, name: &str, needs: &[&str], limit: Duration, f: F) -> bool
    where
        F: FnOnce(&Child, &Env) -> Result<Verdict>,
    {
        if !self.selected(name) {
            return true;
        }
        self.case(name, needs, |ctx| Ok(ctx.isolated(limit, f)))
    }

    /// The body of an isolated case: fork, relay the child's records, judge its end.
    pub fn isolated<F>(&mut self, limit: Duration, f: F) -> Verdict
    where
        F: FnOnce(&Child, &Env) -> Result<Verdict>,
    {
        let env = self.env();
        let mut relay = |rec: Record| match rec {
            Record::Diag(t) => self.diag(&t),
            Record::Raw(t) => self.raw(&t),
            Record::Verdict(_) | Record::Hung(_) => {}
        };
        let run = isolate::run_case(limit, &mut relay, |child| match f(child, &env) {
            Ok(Verdict::Pass) => Outcome::Pass,
            Ok(Verdict::Skip(w)) => Outcome::Skip(w),
            Ok(Verdict::Fail(w)) => Outcome::Fail(w),
            Err(e) => Outcome::Fail(e.to_string()),
        });
        let run = match run {
            Ok(r) => r,
            Err(e) => {
                return Verdict::Fail(format!(
                    "cannot run isolated: {}",
                    crate::error::describe(&e)
                ))
            }
        };
        match (run.verdict, run.end) {
            (_, end @ End::Hung { .. }) => Verdict::Fail(end.describe()),
            (Some(Outcome::Pass), _) => Verdict::Pass,
            (Some(Outcome::Skip(w)), _) => Verdict::Skip(w),
            (Some(Outcome::Fail(w)), _) => Verdict::Fail(w),
            (None, end) => Verdict::Fail(format!("child {} before its verdict", end.describe())),
        }
    }

    /// "pmem0" for "/dev/pmem0": the name under /sys/block.
    pub fn dev_name(&self) -> String {
        self.args
            .dev
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn mnt(&self) -> &Path {
        &self.args.mnt
    }

    pub fn diag(&mut self, text: &str) {
        self.tap.diag(text);
    }

    pub fn raw(&mut self, line: &str) {
        self.tap.raw(line);
    }

    /// Run one case and print its result. A case whose dependency failed is not run and
    /// reported `not ok`, so nothing passes by default. Panics are caught so one broken
    /// case cannot take the rest of the suite with it.
    pub fn case<F>(&mut self, name: &str, needs: &[&str], f: F) -> bool
    where
        F: FnOnce(&mut Ctx<'a>) -> Result<Verdict>,
    {
        if let Some(dep) = needs.iter().find(|d| self.failed.iter().any(|f| f == *d)) {
            let outcome = Outcome::Fail(format!("skipped: precondition {dep} failed"));
            return self.record(name, outcome);
        }
        let outcome = self.outcome_of(name, f);
        self.record(name, outcome)
    }

    /// Run a case body and judge it, without printing its result: panics are caught, and
    /// kernel log trouble that appears meanwhile fails it.
    pub fn outcome_of<F>(&mut self, name: &str, f: F) -> Outcome
    where
        F: FnOnce(&mut Ctx<'a>) -> Result<Verdict>,
    {
        // Trouble logged between cases belongs to no case; show it, the runner fails the
        // run on it anyway.
        for line in self.kernel_trouble() {
            self.diag(&format!("kernel log before {name}: {line}"));
        }
        crash::arm(self.tap.next_number(), name);
        let started = sys::monotonic_raw_ns();
        let result = catch_unwind(AssertUnwindSafe(|| f(self)));
        crash::disarm();
        let elapsed_ms = (sys::monotonic_raw_ns() - started) / 1_000_000;
        if elapsed_ms >= 1000 {
            self.diag(&format!("{name} took {:.1} s", elapsed_ms as f64 / 1000.0));
        }
        let trouble = self.kernel_trouble();
        for line in &trouble {
            self.diag(&format!("kernel: {line}"));
        }
        let outcome = match result {
            Ok(Ok(Verdict::Pass)) => Outcome::Pass,
            Ok(Ok(Verdict::Skip(why))) => Outcome::Skip(why),
            Ok(Ok(Verdict::Fail(why))) => Outcome::Fail(why),
            Ok(Err(e)) => Outcome::Fail(e.to_string()),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown panic");
                Outcome::Fail(format!("panicked: {msg}"))
            }
        };
        match (outcome, trouble.first()) {
            (o, None) => o,
            (Outcome::Fail(why), Some(line)) => Outcome::Fail(format!("{why}; kernel log: {line}")),
            (_, Some(line)) => Outcome::Fail(format!("kernel log: {line}")),
        }
    }

    fn record(&mut self, name: &str, outcome: Outcome) -> bool {
        let ok = !matches!(outcome, Outcome::Fail(_));
        if !ok {
            self.failed.push(name.to_string());
        }
        self.tap.result(name, &outcome);
        ok
    }

    /// Catalogue E15's crash: print the plan, then panic the kernel with the filesystem
    /// still mounted and nothing synced beyond what the cases themselves flushed. Only
    /// returns if the crash could not be triggered.
    pub fn crash_now(&mut self) {
        self.diag("--crash-at-end: crashing the kernel now (sysrq c), filesystem still mounted");
        self.tap.finish();
        // init copies our stdout to the serial ports through tee, and the UART sends from
        // a buffer the panic abandons: give both time to drain, or the last results (the
        // very ones this crash is about) never reach the host. Nothing is synced meanwhile;
        // the filesystem stays mounted and marked as needing recovery.
        std::thread::sleep(std::time::Duration::from_secs(2));
        let r = std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/sysrq-trigger")
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"c"));
        if let Err(e) = r {
            let msg = format!(
                "cannot crash: /proc/sysrq-trigger: {}",
                crate::error::describe(&e)
            );
            self.diag(&msg);
        }
        // sysrq c panics the calling CPU; give it a moment before falling back.
        std::thread::sleep(std::time::Duration::from_secs(5));
        self.diag("still alive after sysrq c; finishing normally");
    }

    /// sync, unmount what we mounted (umount writes back and flushes the device), print
    /// the plan. Returns the process exit status.
    pub fn finish(mut self) -> i32 {
        let stuck = isolate::reap_left_behind();
        if !stuck.is_empty() {
            self.diag(&format!(
                "processes still stuck in the kernel (not reaped): {stuck:?}; sync and umount may hang"
            ));
        }
        sys::sync();
        if self.fs_state.mounted_by_us {
            match sys::umount(&self.args.mnt) {
                Ok(()) => self.diag(&format!("unmounted {}", self.args.mnt.display())),
                Err(e) => self.diag(&format!(
                    "umount {}: {}",
                    self.args.mnt.display(),
                    crate::error::describe(&e)
                )),
            }
        }
        let failed = self.tap.failed();
        if failed > 0 {
            self.diag(&format!("{failed} case(s) failed"));
        }
        self.tap.finish();
        if failed == 0 {
            0
        } else {
            1
        }
    }
}
