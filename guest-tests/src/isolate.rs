//! Running a case, or one risky access, in a forked child with a deadline.
//!
//! A DAX bug shows up as a hang as often as a wrong byte, and a hung page fault cannot be
//! interrupted from inside the process. So the child runs the case while the parent
//! watches a clock: past the deadline it SIGKILLs the child's whole process group and
//! reports the case as hung. A task stuck in uninterruptible sleep (state D) cannot be
//! killed at all; the parent then describes it (state, wait channel, kernel stack) and
//! moves on without reaping it.
//!
//! The child reports through a pipe, one record per line (`encode`/`decode`), so nothing
//! it does can garble the TAP stream on stdout.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use crate::tap::Outcome;

/// What a child sends to the parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A TAP diagnostic line.
    Diag(String),
    /// A line outside TAP (VUP-FLUSHCOUNT and the like).
    Raw(String),
    /// The case's result; the last record of a child that finished.
    Verdict(Outcome),
    /// The child saw itself stall (a round that never ended) and asks to be killed.
    Hung(String),
}

/// Records are single lines: newlines in the text become " | ".
pub fn encode(rec: &Record) -> String {
    let flat = |t: &str| t.replace(['\n', '\r'], " | ");
    match rec {
        Record::Diag(t) => format!("D {}\n", flat(t)),
        Record::Raw(t) => format!("R {}\n", flat(t)),
        Record::Verdict(Outcome::Pass) => "P\n".to_string(),
        Record::Verdict(Outcome::Skip(t)) => format!("S {}\n", flat(t)),
        Record::Verdict(Outcome::Fail(t)) => format!("F {}\n", flat(t)),
        Record::Hung(t) => format!("H {}\n", flat(t)),
    }
}

/// One line (without its newline) back into a record; None for anything else.
pub fn decode(line: &str) -> Option<Record> {
    let (tag, text) = match line.split_once(' ') {
        Some((t, rest)) => (t, rest.to_string()),
        None => (line, String::new()),
    };
    Some(match tag {
        "D" => Record::Diag(text),
        "R" => Record::Raw(text),
        "P" => Record::Verdict(Outcome::Pass),
        "S" => Record::Verdict(Outcome::Skip(text)),
        "F" => Record::Verdict(Outcome::Fail(text)),
        "H" => Record::Hung(text),
        _ => return None,
    })
}

/// The child's end of the pipe. Each record is one write(2) of at most PIPE_BUF bytes,
/// so threads of the child can report concurrently without interleaving.
pub struct Child {
    fd: RawFd,
}

/// PIPE_BUF on Linux: writes up to this size are atomic.
const RECORD_MAX: usize = 4096;

impl Child {
    fn send(&self, rec: &Record) {
        let mut line = encode(rec);
        if line.len() > RECORD_MAX {
            let mut cut = RECORD_MAX - 5;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push_str("...\n");
        }
        // SAFETY: fd is the pipe's write end, open for the child's whole life; the
        // buffer is valid for its length. A failure (parent gone) is ignored: there is
        // nobody left to tell.
        unsafe {
            libc::write(self.fd, line.as_ptr().cast(), line.len());
        }
    }

    pub fn diag(&self, text: &str) {
        for line in text.lines() {
            self.send(&Record::Diag(line.to_string()));
        }
    }

    pub fn raw(&self, line: &str) {
        self.send(&Record::Raw(line.to_string()));
    }

    /// Report a stall; the parent kills this process and reports the case as hung.
    pub fn hung(&self, what: &str) {
        self.send(&Record::Hung(what.to_string()));
    }
}

/// How a child process ended, as far as waitpid can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// How an isolated case or probe ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// It ran to completion (probes) or sent a verdict and exited (cases).
    Done(Exit),
    /// Past its deadline, or it reported a stall. `left_behind` describes a child that
    /// SIGKILL could not end (state D): it was not reaped.
    Hung {
        after: Duration,
        why: Option<String>,
        left_behind: Option<String>,
    },
}

pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGILL => "SIGILL".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGPIPE => "SIGPIPE".into(),
        n => format!("signal {n}"),
    }
}

impl End {
    /// The text after `hung`, e.g. "hung after 30.0s (round 12; left behind: ...)".
    pub fn describe(&self) -> String {
        match self {
            End::Done(Exit::Code(c)) => format!("exited with status {c}"),
            End::Done(Exit::Signal(s)) => format!("killed by {}", signal_name(*s)),
            End::Hung {
                after,
                why,
                left_behind,
            } => {
                let mut t = format!("hung after {:.1}s", after.as_secs_f64());
                let extra: Vec<&str> = [why.as_deref(), left_behind.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect();
                if !extra.is_empty() {
                    t.push_str(&format!(" ({})", extra.join("; ")));
                }
                t
            }
        }
    }
}

/// Children SIGKILL could not end; kept to try reaping them once more at the end.
static UNREAPED: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

/// Try to reap children left in state D earlier; returns those still there.
pub fn reap_left_behind() -> Vec<i32> {
    let mut list = crate::sync::lock(&UNREAPED);
    list.retain(|&pid| {
        let mut status = 0;
        // SAFETY: pid is our own child; WNOHANG never blocks.
        unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) == 0 }
    });
    list.clone()
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = RawFd::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: fd was just returned by the kernel and is owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Wait up to `timeout` for any of `fds` to become readable (pidfds become readable when
/// the process exits). Returns which ones are.
fn poll_readable(fds: &[RawFd], timeout: Duration) -> Vec<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: pfds is a valid array of pollfd of the given length.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return vec![false; fds.len()];
    }
    pfds.iter().map(|p| p.revents != 0).collect()
}

fn try_wait(pid: i32) -> Option<Exit> {
    let mut status = 0;
    // SAFETY: pid is our own child; WNOHANG never blocks.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if r != pid {
        return None;
    }
    if libc::WIFSIGNALED(status) {
        Some(Exit::Signal(libc::WTERMSIG(status)))
    } else {
        Some(Exit::Code(libc::WEXITSTATUS(status)))
    }
}

/// Whether the child has exited (it may still be unreaped), without reaping it.
fn has_exited(pid: i32) -> bool {
    let mut info = std::mem::MaybeUninit::<libc::siginfo_t>::zeroed();
    // SAFETY: info is a writable siginfo_t; WNOWAIT leaves the child waitable.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            info.as_mut_ptr(),
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: waitid filled (or left zeroed) the buffer.
    r == 0 && unsafe { info.assume_init().si_pid() } == pid
}

/// Signal the child's process group (it made itself a group leader), then the child.
fn kill_group(pid: i32) {
    // SAFETY: kill takes plain integers. pid is our unreaped child, so neither it nor
    // its process group id can have been reused by an unrelated process.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Describe a process that SIGKILL did not end: its state and, per thread, the wait
/// channel and kernel stack (what it is stuck on).
pub fn describe_stuck(pid: i32) -> String {
    let mut parts = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    for tid in tasks.iter().take(8) {
        let tid = tid.to_string_lossy();
        let base = format!("/proc/{pid}/task/{tid}");
        let state = std::fs::read_to_string(format!("{base}/stat"))
            .ok()
            .and_then(|s| stat_state(&s))
            .unwrap_or('?');
        let wchan = std::fs::read_to_string(format!("{base}/wchan")).unwrap_or_default();
        let stack: Vec<String> = std::fs::read_to_string(format!("{base}/stack"))
            .unwrap_or_default()
            .lines()
            .take(6)
            .map(|l| l.split_whitespace().nth(1).unwrap_or(l).to_string())
            .collect();
        parts.push(format!(
            "tid {tid} state {state} wchan {} stack {}",
            if wchan.is_empty() { "?" } else { wchan.trim() },
            if stack.is_empty() {
                "?".to_string()
            } else {
                stack.join("<")
            }
        ));
    }
    format!(
        "pid {pid} not reaped after SIGKILL, left behind: {}",
        if parts.is_empty() {
            "no /proc entry".to_string()
        } else {
            parts.join(", ")
        }
    )
}

/// The state letter of a /proc/PID/stat line ("123 (name with spaces) D ...").
pub fn stat_state(stat: &str) -> Option<char> {
    let after = stat.rsplit_once(')')?.1;
    after.trim_start().chars().next()
}

/// After SIGKILL, how long to wait for the kernel to tear the child down.
const REAP_GRACE: Duration = Duration::from_secs(5);

/// Kill the child's group and wait a little for it; End::Hung either way.
fn give_up(pid: i32, pidfd: Option<&OwnedFd>, after: Duration, why: Option<String>) -> End {
    kill_group(pid);
    let until = Instant::now() + REAP_GRACE;
    loop {
        if let Some(_exit) = try_wait(pid) {
            return End::Hung {
                after,
                why,
                left_behind: None,
            };
        }
        let now = Instant::now();
        if now >= until {
            break;
        }
        match pidfd {
            Some(fd) => {
                poll_readable(&[fd.as_raw_fd()], until - now);
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let desc = describe_stuck(pid);
    crate::sync::lock(&UNREAPED).push(pid);
    End::Hung {
        after,
        why,
        left_behind: Some(desc),
    }
}

/// In a fresh child: default actions for the fatal signals (the crash reporter would
/// print a TAP line from the child), and death with the parent. A case's top process
/// also gets its own process group, so the parent can kill everything it forks; helper
/// processes stay in that group.
fn child_setup(new_group: bool) {
    // SAFETY: plain syscalls on the calling process; the signal actions set are the
    // defaults, which need no handler code.
    unsafe {
        if new_group {
            libc::setpgid(0, 0);
        }
        for sig in [libc::SIGBUS, libc::SIGSEGV, libc::SIGILL] {
            libc::signal(sig, libc::SIG_DFL);
        }
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
    }
}

/// fork(), refusing when this process has other threads: they could hold locks (the
/// allocator's, stdout's) that the child would inherit locked.
fn fork_checked(new_group: bool) -> io::Result<i32> {
    match crate::sys::thread_count() {
        Some(1) => {}
        Some(n) => {
            return Err(io::Error::other(format!(
                "refusing to fork with {n} threads running"
            )))
        }
        None => return Err(io::Error::other("cannot read /proc/self/status")),
    }
    // SAFETY: the process is single-threaded (checked above), so the child inherits a
    // consistent copy of every lock and may run ordinary Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid > 0 && new_group {
        // Also from the parent, so the group exists before any kill can target it.
        // SAFETY: plain syscall on our own child.
        unsafe { libc::setpgid(pid, pid) };
    }
    Ok(pid)
}

/// Leave the child without running destructors or atexit handlers: they belong to the
/// parent's copy of the state (its stdout buffer, its mount).
fn child_exit(code: i32) -> ! {
    // SAFETY: _exit ends the process immediately; nothing is touched afterwards.
    unsafe { libc::_exit(code) }
}

/// A helper process forked by a case (a second mapping user, a racing worker). It stays
/// in the case's process group, so the case's watchdog kills it too; dropping an
/// unfinished one kills it.
pub struct Proc {
    pid: i32,
    pidfd: Option<OwnedFd>,
    started: Instant,
    exit: Option<Exit>,
}

/// Fork a helper running `f`; `f`'s return value is its exit status, a panic exits 101.
pub fn spawn(f: impl FnOnce() -> i32) -> io::Result<Proc> {
    let pid = fork_checked(false)?;
    if pid == 0 {
        child_setup(false);
        let code = catch_unwind(AssertUnwindSafe(f)).unwrap_or(101);
        child_exit(code);
    }
    Ok(Proc {
        pid,
        pidfd: pidfd_open(pid),
        started: Instant::now(),
        exit: None,
    })
}

impl Proc {
    /// How it ended, if it has; reaps it.
    pub fn try_wait(&mut self) -> Option<Exit> {
        if self.exit.is_none() {
            self.exit = try_wait(self.pid);
        }
        self.exit.clone()
    }

    /// Wait until it ends or `limit` after it was spawned has passed; then it is killed
    /// and reported Hung.
    pub fn wait(&mut self, limit: Duration) -> End {
        loop {
            if let Some(e) = self.try_wait() {
                return End::Done(e);
            }
            let elapsed = self.started.elapsed();
            if elapsed >= limit {
                let end = give_up(self.pid, self.pidfd.as_ref(), elapsed, None);
                if let End::Hung {
                    left_behind: None, ..
                } = &end
                {
                    self.exit = Some(Exit::Signal(libc::SIGKILL));
                }
                return end;
            }
            let wait = (limit - elapsed).min(Duration::from_millis(100));
            match &self.pidfd {
                Some(fd) => {
                    poll_readable(&[fd.as_raw_fd()], wait);
                }
                None => std::thread::sleep(wait.min(Duration::from_millis(5))),
            }
        }
    }

    pub fn kill(&mut self) {
        if self.try_wait().is_none() {
            // SAFETY: our own unreaped child.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            self.kill();
            // Reap it if it dies promptly; a task in D state is left to the case's
            // watchdog, which kills and describes the whole group.
            let _ = self.wait(self.started.elapsed() + Duration::from_secs(2));
        }
    }
}

/// Run `f` in a helper process and wait for it: for one risky access ("does touching
/// this page raise SIGBUS?"). `f`'s return value is the exit status; after `limit` the
/// helper is killed and reported Hung.
pub fn probe(limit: Duration, f: impl FnOnce() -> i32) -> io::Result<End> {
    let mut p = spawn(f)?;
    Ok(p.wait(limit))
}

/// What `run_case` observed: the child's verdict if it sent one, and how it ended.
pub struct CaseEnd {
    pub verdict: Option<Outcome>,
    pub end: End,
}

/// Run a case in a child: `f` gets the pipe to report through, its result becomes the
/// verdict. Records are handed to `on_record` as they arrive (diagnostics stream while
/// the case runs); the verdict and any Hung record are handled here.
pub fn run_case(
    limit: Duration,
    on_record: &mut dyn FnMut(Record),
    f: impl FnOnce(&Child) -> Outcome,
) -> io::Result<CaseEnd> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a writable array of two ints, as pipe2 needs.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let started = Instant::now();
    let pid = fork_checked(true)?;
    if pid == 0 {
        drop(rd);
        child_setup(true);
        let child = Child { fd: wr.as_raw_fd() };
        let outcome = catch_unwind(AssertUnwindSafe(|| f(&child))).unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Outcome::Fail(format!("panicked: {msg}"))
        });
        child.send(&Record::Verdict(outcome));
        child_exit(0);
    }
    drop(wr);
    // SAFETY: rd is our open pipe read end; O_NONBLOCK lets us drain without blocking
    // on a grandchild that still holds a write end.
    unsafe {
        let fl = libc::fcntl(rd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(rd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    let pidfd = pidfd_open(pid);
    let mut buf: Vec<u8> = Vec::new();
    let mut verdict = None;
    let mut hung_why: Option<String> = None;
    let mut handle =
        |buf: &mut Vec<u8>, verdict: &mut Option<Outcome>, hung: &mut Option<String>| {
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                match decode(&line) {
                    Some(Record::Verdict(o)) => *verdict = Some(o),
                    Some(Record::Hung(w)) => *hung = Some(w),
                    Some(r) => on_record(r),
                    None => on_record(Record::Diag(format!("(unparsed from child) {line}"))),
                }
            }
        };
    loop {
        let mut watch = vec![rd.as_raw_fd()];
        if let Some(fd) = &pidfd {
            watch.push(fd.as_raw_fd());
        }
        let elapsed = started.elapsed();
        let wait = limit
            .saturating_sub(elapsed)
            .min(Duration::from_millis(if pidfd.is_some() {
                1000
            } else {
                20
            }));
        poll_readable(&watch, wait);
        drain_fd(&rd, &mut buf);
        handle(&mut buf, &mut verdict, &mut hung_why);
        if hung_why.is_some() {
            let after = started.elapsed();
            let end = give_up(pid, pidfd.as_ref(), after, hung_why);
            return Ok(CaseEnd { verdict, end });
        }
        if has_exited(pid) {
            // Kill what the child may have left running in its group, then reap it.
            kill_group(pid);
            let exit = loop {
                if let Some(e) = try_wait(pid) {
                    break e;
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            drain_fd(&rd, &mut buf);
            if !buf.is_empty() {
                // A last record without its newline (the child died mid-write).
                buf.push(b'\n');
            }
            handle(&mut buf, &mut verdict, &mut hung_why);
            return Ok(CaseEnd {
                verdict,
                end: End::Done(exit),
            });
        }
        if started.elapsed() >= limit {
            let end = give_up(pid, pidfd.as_ref(), started.elapsed(), None);
            drain_fd(&rd, &mut buf);
            handle(&mut buf, &mut verdict, &mut hung_why);
            return Ok(CaseEnd { verdict, end });
        }
    }
}

fn drain_fd(fd: &OwnedFd, into: &mut Vec<u8>) {
    let mut chunk = [0u8; 8192];
    loop {
        // SAFETY: chunk is writable for its length; the fd is non-blocking.
        let n = unsafe { libc::read(fd.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
        match usize::try_from(n) {
            Ok(0) | Err(_) => return,
            Ok(n) => into.extend_from_slice(&chunk[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        for rec in [
            Record::Diag("rounds: 10".into()),
            Record::Raw("VUP-FLUSHCOUNT name=x n=3".into()),
            Record::Verdict(Outcome::Pass),
            Record::Verdict(Outcome::Skip("no tracefs".into())),
            Record::Verdict(Outcome::Fail("saw 0xa5 at 4096".into())),
            Record::Hung("round 7".into()),
            Record::Diag(String::new()),
        ] {
            let line = encode(&rec);
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
            assert_eq!(decode(line.trim_end_matches('\n')), Some(rec));
        }
    }

    #[test]
    fn newlines_are_flattened() {
        assert_eq!(encode(&Record::Diag("a\nb".into())), "D a | b\n");
        assert_eq!(decode("X what"), None);
    }

    #[test]
    fn stat_state_handles_odd_names() {
        assert_eq!(stat_state("42 (pmem) guest) D 1 2 3"), Some('D'));
        assert_eq!(stat_state("7 (sh) S 1"), Some('S'));
        assert_eq!(stat_state("garbage"), None);
    }

    #[test]
    fn describe_ends() {
        assert_eq!(
            End::Done(Exit::Signal(libc::SIGBUS)).describe(),
            "killed by SIGBUS"
        );
        let h = End::Hung {
            after: Duration::from_millis(30_000),
            why: Some("round 3 stalled".into()),
            left_behind: Some("pid 9 state D".into()),
        };
        assert_eq!(
            h.describe(),
            "hung after 30.0s (round 3 stalled; pid 9 state D)"
        );
    }

    // fork() in the test harness would copy its other threads' locks: only the pure
    // parts are tested on the host; the fork paths run in every guest case.
}
