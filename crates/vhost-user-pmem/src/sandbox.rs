//! The seccomp sandbox: a system-call allow-list installed on every thread once the file is
//! open and the socket is ready.
//!
//! The list holds what the daemon was seen to call after `prepare()` (strace -f over the
//! integration tests, all threads: main, flush workers, the vhost-user handler and vring
//! threads, shmem mappers, the signal thread) plus the calls of paths those tests do not reach
//! (shutdown on a signal, the metrics file, reconnecting). It depends on the configuration: a
//! listening daemon may accept but not connect, a client may create AF_UNIX sockets and
//! connect but not accept, and only a daemon with `--metrics-path` may open (create) a file at
//! all. None of them can execve, open a file for reading, or make a network socket.
//!
//! A call outside the list traps (SIGSYS). The handler writes one line naming the call and
//! then lets the signal kill the process, so the daemon's log says what was refused and its
//! parent sees it die of SIGSYS. Returning EPERM instead would let the daemon carry on with a
//! half-failed operation (a vring thread that cannot spawn, a flush that was never answered);
//! `SECCOMP_RET_KILL_PROCESS` would give no line in the daemon's own log.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::modes::SeccompMode;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "the seccomp allow-list exists only for x86_64; run with --seccomp=off on this machine"
    )]
    UnsupportedArch,
    #[error("cannot build the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("cannot install the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
}

/// What the filter has to allow beyond the calls every daemon makes; `main` builds it from
/// the configuration, so the sandbox needs to know nothing else about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// Listening: accept frontends.
    pub listen: bool,
    /// The directory descriptor through which the socket file is removed at exit
    /// (`socket::SocketFile`); `unlinkat` is allowed on it alone.
    pub socket_dir: Option<i32>,
    /// Client mode: create an AF_UNIX socket and connect it, to reach the frontend again.
    pub connect: bool,
    /// `--metrics-path`: create `FILE.tmp` and rename it over `FILE`.
    pub metrics_file: bool,
}

/// Fails if `mode` needs a filter this build has no list for; checked before anything is
/// touched, while the filter itself is built only once the socket exists.
pub fn check_supported(mode: SeccompMode) -> Result<(), SandboxError> {
    match mode {
        SeccompMode::Off => Ok(()),
        SeccompMode::On | SeccompMode::Log => arch().map(|_| ()),
    }
}

/// Compiles the filter for `mode` (`None` for `Off`).
pub fn compile(mode: SeccompMode, needs: Needs) -> Result<Option<BpfProgram>, SandboxError> {
    let refused = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::On => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let arch = arch()?;
    let filter = SeccompFilter::new(rules(needs)?, refused, SeccompAction::Allow, arch)?;
    Ok(Some(filter.try_into()?))
}

/// Installs `program` on every thread of the process (TSYNC), after the SIGSYS handler that
/// names a refused call. Threads spawned later inherit the filter.
pub fn install(program: &BpfProgram) -> Result<(), SandboxError> {
    install_sigsys_handler().map_err(SandboxError::Handler)?;
    seccompiler::apply_filter_all_threads(program)?;
    Ok(())
}

/// Keeps glibc's malloc from reading `/sys/devices/system/cpu/online` once the filter is in:
/// it does so, once, the first time a thread needs a ninth arena, to size the arena limit.
/// With the limit set here it never asks. Four arenas are plenty for a daemon whose threads
/// mostly sleep. Must run before threads are spawned.
pub fn prepare_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a malloc tunable; it reads no memory of ours.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

fn arch() -> Result<TargetArch, SandboxError> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else {
        // The list below uses x86_64's legacy calls (rename, unlink, epoll_wait); another
        // architecture needs its own list, measured there.
        Err(SandboxError::UnsupportedArch)
    }
}

/// One condition `arg[index] == value` (`mask` given: `arg & mask == value`).
fn cond(
    index: u8,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
}

#[cfg(target_arch = "x86_64")]
fn rules(needs: Needs) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    use libc::*;

    // Allowed whatever their arguments. Grouped by who needs them.
    let mut plain: Vec<c_long> = vec![
        // The vhost-user protocol: messages with descriptors, the backend channel, shutdown
        // of a connection, socket type checks when descriptors arrive.
        SYS_read,
        SYS_write,
        SYS_recvmsg,
        SYS_sendmsg,
        SYS_close,
        SYS_shutdown,
        SYS_getsockopt,
        SYS_fcntl,
        // Event loops of the vring threads, kick/call/exit eventfds.
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_wait,
        SYS_epoll_pwait,
        SYS_eventfd2,
        // Guest memory tables and the allocator (mmap and mprotect below, without PROT_EXEC).
        SYS_munmap,
        SYS_mremap,
        SYS_madvise,
        SYS_brk,
        // Checking that a memory region lies inside its file.
        SYS_statx,
        SYS_fstat,
        SYS_newfstatat,
        // fstatvfs: the metrics' free space on the backing file's file system.
        SYS_fstatfs,
        // The flush path.
        SYS_fdatasync,
        // Threads: each connection spawns its handler, vring and mapper threads, which start
        // and end here. clone3's flags sit behind a pointer that seccomp cannot read.
        SYS_clone3,
        SYS_set_robust_list,
        SYS_rseq,
        SYS_gettid,
        SYS_sched_getaffinity,
        SYS_sigaltstack,
        SYS_exit,
        SYS_futex,
        SYS_getrandom,
        // Signals: the signal thread's sigwait, masks of new threads, glibc's lazy handler
        // set-up at the first pthread_create.
        SYS_rt_sigprocmask,
        SYS_rt_sigtimedwait,
        SYS_rt_sigaction,
        SYS_rt_sigreturn,
        // Sleeps and clocks (the vDSO falls back to the system call on some clock sources).
        SYS_nanosleep,
        SYS_clock_nanosleep,
        SYS_clock_gettime,
        SYS_sched_yield,
        // Shutdown.
        SYS_exit_group,
    ];
    if needs.listen {
        plain.push(SYS_accept4);
    }
    if needs.connect {
        plain.push(SYS_connect);
    }
    if needs.metrics_file {
        plain.push(SYS_rename);
    }
    let mut map: BTreeMap<i64, Vec<SeccompRule>> =
        plain.into_iter().map(|nr| (nr, Vec::new())).collect();

    let rule = |conds: Vec<SeccompCondition>| SeccompRule::new(conds);
    // Nothing made executable after start: injected code cannot be mapped and run.
    for nr in [SYS_mmap, SYS_mprotect] {
        map.insert(
            nr,
            vec![rule(vec![cond(
                2,
                SeccompCmpOp::MaskedEq(PROT_EXEC as u64),
                0,
            )?])?],
        );
    }
    if let Some(fd) = needs.socket_dir {
        // The socket file, through its directory's descriptor; no other directory.
        map.insert(
            SYS_unlinkat,
            vec![rule(vec![
                cond(0, SeccompCmpOp::Eq, fd as u64)?,
                cond(2, SeccompCmpOp::Eq, 0)?,
            ])?],
        );
    }
    // Thread names only.
    map.insert(
        SYS_prctl,
        vec![rule(vec![cond(0, SeccompCmpOp::Eq, PR_SET_NAME as u64)?])?],
    );
    // A fallback for clone3 in older glibc: threads only, never a new process.
    map.insert(
        SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(CLONE_THREAD as u64),
            CLONE_THREAD as u64,
        )?])?],
    );
    // Reading a resource limit (glibc's thread stack size); setting one is refused.
    map.insert(
        SYS_prlimit64,
        vec![rule(vec![cond(2, SeccompCmpOp::Eq, 0)?])?],
    );
    if needs.connect {
        // Only the stream sockets vhost-user uses to reach the frontend again.
        let ty = (SOCK_STREAM | SOCK_CLOEXEC) as u64;
        map.insert(
            SYS_socket,
            vec![rule(vec![
                cond(0, SeccompCmpOp::Eq, AF_UNIX as u64)?,
                cond(1, SeccompCmpOp::Eq, ty)?,
            ])?],
        );
    }
    if needs.metrics_file {
        // Creating FILE.tmp (std's File::create) and nothing else: no reading, no appending.
        let flags = (O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC) as u64;
        map.insert(
            SYS_openat,
            vec![rule(vec![cond(2, SeccompCmpOp::Eq, flags)?])?],
        );
    }
    Ok(map)
}

#[cfg(not(target_arch = "x86_64"))]
fn rules(_needs: Needs) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    Err(SandboxError::UnsupportedArch)
}

/// Offset of `si_syscall` in the kernel's `siginfo_t` for SIGSYS on 64-bit Linux: after
/// `si_signo`, `si_errno`, `si_code` and padding (16 bytes) comes `void *si_call_addr`, then
/// `int si_syscall`. The libc crate has no accessor for it.
const SI_SYSCALL_OFFSET: usize = 24;

/// The SIGSYS handler. Only async-signal-safe work: format into a stack buffer, write(2).
/// It runs with SA_RESETHAND, so SIGSYS is back to its default action (kill, core) by now;
/// returning re-runs nothing, and the trapped call's error return would let the thread go on,
/// so the handler makes a call that is never on the list: the kernel forces the blocked
/// SIGSYS through at its default action and the process dies of SIGSYS.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; SIGSYS fills
    // si_syscall at SI_SYSCALL_OFFSET, inside the 128-byte siginfo_t.
    let nr = unsafe {
        *(info as *const u8)
            .add(SI_SYSCALL_OFFSET)
            .cast::<libc::c_int>()
    };
    let mut buf = [0u8; 128];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"vhost-user-pmem: seccomp refused system call ");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b" (see docs/security.md; --seccomp=log lets it through and logs it); exiting\n");
    // SAFETY: write(2) of an initialised stack buffer to stderr; the result does not matter.
    unsafe { libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len) };
    // SAFETY: a system call with no arguments that is never on the allow-list (and would be
    // harmless if it were): the filter traps it and the kernel kills the process.
    unsafe { libc::syscall(libc::SYS_getppid) };
    // Only if someone put getppid on the list.
    // SAFETY: _exit is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: sigaction is plain data; zeroed is a valid empty mask and no flags.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
    // SAFETY: `action` is initialised and `on_sigsys` has the SA_SIGINFO signature.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Needs = Needs {
        listen: true,
        socket_dir: Some(3),
        connect: true,
        metrics_file: true,
    };

    #[test]
    fn off_compiles_to_nothing_and_the_others_to_a_program() {
        assert!(compile(SeccompMode::Off, ALL).unwrap().is_none());
        assert!(!compile(SeccompMode::On, ALL).unwrap().unwrap().is_empty());
        assert!(!compile(SeccompMode::Log, ALL).unwrap().unwrap().is_empty());
    }

    #[test]
    fn the_list_depends_on_the_configuration() {
        let none = Needs {
            listen: false,
            socket_dir: None,
            connect: false,
            metrics_file: false,
        };
        let r = rules(none).unwrap();
        for nr in [
            libc::SYS_openat,
            libc::SYS_open,
            libc::SYS_execve,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_accept4,
            libc::SYS_rename,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_ptrace,
            libc::SYS_getppid,
        ] {
            assert!(!r.contains_key(&nr), "syscall {nr} allowed without need");
        }
        let r = rules(ALL).unwrap();
        for nr in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_accept4,
        ] {
            assert!(r.contains_key(&nr), "syscall {nr} missing");
        }
        // The SIGSYS handler relies on these never being allowed.
        for nr in [libc::SYS_getppid, libc::SYS_execve, libc::SYS_open] {
            assert!(!r.contains_key(&nr), "syscall {nr} must stay off the list");
        }
    }

    /// Forks a child that installs the real filter for `mode` and calls `forbidden`; returns
    /// its wait status and what it wrote to stderr.
    fn run_child(mode: SeccompMode, needs: Needs, forbidden: fn() -> i64) -> (i32, String) {
        let (_, status, out) = run_child_pid(mode, needs, forbidden);
        (status, out)
    }

    /// [`run_child`], also returning the child's pid.
    fn run_child_pid(
        mode: SeccompMode,
        needs: Needs,
        forbidden: fn() -> i64,
    ) -> (i32, i32, String) {
        // Built here: after fork() the child must not allocate (another thread of the test
        // harness may hold the allocator's lock).
        let program = compile(mode, needs).unwrap().unwrap();
        let mut fds = [0; 2];
        // SAFETY: pipe(2) into a valid two-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only makes async-signal-safe calls (dup2, sigaction, prctl,
        // seccomp, the raw system calls under test, write, _exit) before it exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: see above; everything here is a raw system call on our own descriptors.
            unsafe {
                libc::dup2(fds[1], libc::STDERR_FILENO);
                libc::close(fds[0]);
                if install(&program).is_err() {
                    libc::_exit(101);
                }
                // A call on the list still works under the filter.
                let alive = b"alive\n";
                libc::write(libc::STDERR_FILENO, alive.as_ptr().cast(), alive.len());
                let r = forbidden();
                let code = if r >= 0 { 0 } else { 102 };
                libc::_exit(code);
            }
        }
        // SAFETY: closing our copy of the write end, so that read() sees EOF at the child's exit.
        unsafe { libc::close(fds[1]) };
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: read(2) into a valid buffer from our pipe.
            let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
        // SAFETY: our pipe's read end, read to EOF.
        unsafe { libc::close(fds[0]) };
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        (pid, status, String::from_utf8_lossy(&out).into_owned())
    }

    fn inet_socket() -> i64 {
        // SAFETY: socket(2) with constant arguments.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as i64 }
    }

    fn execve_true() -> i64 {
        let path = b"/bin/true\0";
        let argv = [path.as_ptr() as *const libc::c_char, std::ptr::null()];
        let envp = [std::ptr::null::<libc::c_char>()];
        // SAFETY: NUL-terminated path and NULL-terminated argv/envp arrays on our stack.
        unsafe { libc::execve(path.as_ptr().cast(), argv.as_ptr(), envp.as_ptr()) as i64 }
    }

    fn open_passwd() -> i64 {
        let path = b"/etc/passwd\0";
        // SAFETY: NUL-terminated path.
        unsafe { libc::open(path.as_ptr().cast(), libc::O_RDONLY) as i64 }
    }

    fn unlink_elsewhere() -> i64 {
        let path = b"/nonexistent-vhost-user-pmem-test\0";
        // SAFETY: NUL-terminated path; AT_FDCWD is not the allowed directory descriptor.
        unsafe { libc::unlinkat(libc::AT_FDCWD, path.as_ptr().cast(), 0) as i64 }
    }

    fn map_executable() -> i64 {
        // SAFETY: an anonymous private mapping; the result is only compared.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            -1
        } else {
            0
        }
    }

    fn assert_killed_by_sigsys(status: i32, out: &str, nr: i64) {
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "child was not killed by SIGSYS: status {status:#x}, stderr {out:?}"
        );
        assert!(out.starts_with("alive\n"), "{out:?}");
        let line = format!("vhost-user-pmem: seccomp refused system call {nr} ");
        assert!(out.contains(&line), "no {line:?} in {out:?}");
    }

    #[test]
    fn a_call_outside_the_list_kills_with_sigsys_and_names_the_call() {
        let (status, out) = run_child(SeccompMode::On, ALL, inet_socket);
        assert_killed_by_sigsys(status, &out, libc::SYS_socket);
        let (status, out) = run_child(SeccompMode::On, ALL, execve_true);
        assert_killed_by_sigsys(status, &out, libc::SYS_execve);
        let none = Needs {
            listen: true,
            socket_dir: None,
            connect: false,
            metrics_file: false,
        };
        let (status, out) = run_child(SeccompMode::On, none, open_passwd);
        // glibc's open() is openat(2).
        assert_killed_by_sigsys(status, &out, libc::SYS_openat);
    }

    #[test]
    fn unlink_outside_the_socket_directory_and_executable_memory_are_refused() {
        let (status, out) = run_child(SeccompMode::On, ALL, unlink_elsewhere);
        assert_killed_by_sigsys(status, &out, libc::SYS_unlinkat);
        let (status, out) = run_child(SeccompMode::On, ALL, map_executable);
        assert_killed_by_sigsys(status, &out, libc::SYS_mmap);
    }

    #[test]
    fn metrics_may_create_but_not_read_files() {
        // openat with O_RDONLY stays refused even when --metrics-path allows creating files.
        let (status, out) = run_child(SeccompMode::On, ALL, open_passwd);
        assert_killed_by_sigsys(status, &out, libc::SYS_openat);
    }

    #[test]
    fn log_mode_lets_the_call_through() {
        let (pid, status, out) = run_child_pid(SeccompMode::Log, ALL, inet_socket);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status:#x}, stderr {out:?}"
        );
        assert_eq!(out, "alive\n");
        // Where the kernel log is readable (not in every sandbox), the record log mode exists
        // for must be there: SECCOMP_RET_LOG (code=0x7ffc0000) for socket(2) from this child.
        let needle = format!(" pid={pid} ");
        let code = format!("syscall={} ", libc::SYS_socket);
        for _ in 0..50 {
            let Ok(o) = std::process::Command::new("dmesg").output() else {
                eprintln!("dmesg cannot run here; the audit record was not checked");
                return;
            };
            if !o.status.success() {
                eprintln!("dmesg is not readable here; the audit record was not checked");
                return;
            }
            let log = String::from_utf8_lossy(&o.stdout);
            if log.lines().any(|l| {
                l.contains("type=1326")
                    && l.contains(&needle)
                    && l.contains(&code)
                    && l.contains("code=0x7ffc0000")
            }) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("the kernel log is readable but has no seccomp log record for pid {pid}");
    }
}
