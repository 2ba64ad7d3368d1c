//! The daemon under a service manager or a parent that owns the socket: serving on an
//! inherited listening socket (--fd), systemd socket activation (a real
//! systemd-socket-activate), readiness notification (NOTIFY_SOCKET), --socket-group and
//! --log-level.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::Path;

use common::{Daemon, Env, BIN, MIB, TIMEOUT};
use pmem_frontend::Frontend;

/// One frontend session on `socket`: negotiate, map, flush, go away.
fn one_session(socket: &Path, d: &Daemon) {
    let mut fe = Frontend::connect(socket)
        .unwrap_or_else(|e| panic!("connect: {e}; daemon log:\n{}", d.log()));
    fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
    fe.disconnect();
}

#[test]
fn an_inherited_socket_serves_one_frontend_after_another_and_stays() {
    let env = Env::new();
    env.create_file(2 * MIB);
    // The parent (this test) owns the socket and its file; the daemon gets fd 3.
    let listener = UnixListener::bind(&env.socket).unwrap();
    let mut args = vec!["--fd".to_string(), "3".into(), "--file".into()];
    args.push(env.file.display().to_string());
    args.extend(env.metrics_args());
    let mut d = Daemon::start_with(&args, &env.socket, &env.path("daemon.log"), |c| {
        c.pass_fd(listener.as_raw_fd(), 3)
    });
    one_session(&env.socket, &d);
    one_session(&env.socket, &d);
    let m = d.report(&env.metrics_path());
    // The readiness probe, then the two sessions.
    assert_eq!(m.counters.connections, 3, "{m:?}");
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    assert!(
        env.socket.exists(),
        "the daemon removed a socket file that was not its own"
    );
}

#[test]
fn socket_activation_by_systemd_socket_activate() {
    const ACTIVATE: &str = "/usr/bin/systemd-socket-activate";
    if !Path::new(ACTIVATE).exists() {
        eprintln!("skipped: {ACTIVATE} is not installed (Debian package systemd)");
        return;
    }
    let env = Env::new();
    env.create_file(2 * MIB);
    assert!(!env.socket.exists());
    let mut args = vec![
        "-l".to_string(),
        env.socket.display().to_string(),
        // systemd-socket-activate passes on only the variables it is told to.
        "-E".into(),
        "RUST_LOG".into(),
        BIN.into(),
        "--file".into(),
        env.file.display().to_string(),
    ];
    args.extend(env.metrics_args());
    let mut d = Daemon::spawn_program(ACTIVATE, &args, &env.socket, &env.path("daemon.log"), |c| c);
    // systemd-socket-activate creates and listens on the socket; the daemon is started (exec'd
    // in its place) by the first connection.
    d.wait_socket();
    assert!(
        !env.metrics_path().exists(),
        "the daemon ran before a connection"
    );
    one_session(&env.socket, &d);
    one_session(&env.socket, &d);
    let m = d.report(&env.metrics_path());
    assert_eq!(m.counters.connections, 2, "{m:?}");
    assert_eq!(
        m.pid as i32,
        d.pid(),
        "the daemon is not the activated process"
    );
    let log = d.log();
    assert!(
        log.contains("socket-activation descriptor 3"),
        "log:\n{log}"
    );
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
}

#[test]
fn ready_and_stopping_reach_the_notify_socket_under_the_filter() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let notify_path = env.path("notify");
    let manager = UnixDatagram::bind(&notify_path).unwrap();
    manager.set_read_timeout(Some(TIMEOUT)).unwrap();
    // The default --seccomp=on: STOPPING=1 is sent with the filter in.
    let mut d = Daemon::spawn_with(&env.args(&[]), &env.socket, &env.path("daemon.log"), |c| {
        c.env("NOTIFY_SOCKET", &notify_path)
    });
    let mut buf = [0u8; 256];
    let n = manager
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no READY=1: {e}; log:\n{}", d.log()));
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    let lines: Vec<&str> = ready.lines().collect();
    assert_eq!(
        lines,
        ["READY=1".to_string(), format!("MAINPID={}", d.pid())]
    );
    // Ready means serving: the socket answers at once.
    one_session(&env.socket, &d);
    // SAFETY: kill(2) on our own child, which has not been reaped.
    assert_eq!(unsafe { libc::kill(d.pid(), libc::SIGTERM) }, 0);
    let n = manager
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no STOPPING=1: {e}; log:\n{}", d.log()));
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert_eq!(d.wait_exit(TIMEOUT).and_then(|s| s.code()), Some(0));
    // Seccomp would have killed it with SIGSYS had the notification needed another call.
}

#[test]
fn another_process_s_activation_variables_are_ignored() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let d = Daemon::start_with(&env.args(&[]), &env.socket, &env.path("daemon.log"), |c| {
        c.env("LISTEN_FDS", "1").env("LISTEN_PID", "1")
    });
    one_session(&env.socket, &d);
    assert!(d.log().contains("is for pid 1"), "log:\n{}", d.log());
}

/// A group that is not the daemon's own (the tests run as root, who may give a file to any
/// group), or `None` if the machine has only one.
fn another_group() -> Option<(String, u32)> {
    // SAFETY: getegid(2) cannot fail.
    let ours = unsafe { libc::getegid() };
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?.to_string();
            let gid = f.nth(1)?.parse().ok()?;
            Some((name, gid))
        })
        .find(|&(_, gid)| gid != ours)
}

#[test]
fn socket_group_gives_the_socket_to_the_group() {
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: giving a file to another group needs root here");
        return;
    }
    let Some((name, gid)) = another_group() else {
        eprintln!("skipped: no group other than our own in /etc/group");
        return;
    };
    let env = Env::new();
    env.create_file(2 * MIB);
    let d = env.start(&["--socket-group", &name, "--socket-mode", "0660"]);
    let meta = std::fs::metadata(&env.socket).unwrap();
    assert_eq!(
        (meta.gid(), meta.mode() & 0o777),
        (gid, 0o660),
        "group {name}"
    );
    one_session(&env.socket, &d);
}

#[test]
fn log_level_off_is_silent_unless_rust_log_says_otherwise() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let quiet = env.path("quiet.log");
    let mut d = Daemon::start_with(
        &env.args(&["--log-level", "off"]),
        &env.socket,
        &quiet,
        |c| c.env_remove("RUST_LOG"),
    );
    one_session(&env.socket, &d);
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    assert_eq!(std::fs::read_to_string(&quiet).unwrap(), "");

    // RUST_LOG wins over --log-level.
    let loud = env.path("loud.log");
    let mut d = Daemon::start_with(
        &env.args(&["--log-level", "off"]),
        &env.socket,
        &loud,
        |c| c.rust_log("info"),
    );
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    let log = std::fs::read_to_string(&loud).unwrap();
    assert!(log.contains("SIGTERM received"), "log:\n{log}");
}

#[test]
fn under_journald_lines_carry_a_priority_and_no_timestamp() {
    let env = Env::new();
    env.create_file(2 * MIB);
    // JOURNAL_STREAM names the device and inode of stderr; here the log file plays the
    // journal's stream.
    let log = env.path("journal.log");
    std::fs::write(&log, b"").unwrap();
    let meta = std::fs::metadata(&log).unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let mut d = Daemon::start_with(&env.args(&[]), &env.socket, &log, |c| {
        c.rust_log("debug").env("JOURNAL_STREAM", &stream)
    });
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.is_empty());
    for line in text.lines() {
        assert!(
            ["<3>", "<4>", "<6>", "<7>"]
                .iter()
                .any(|p| line.starts_with(p)),
            "{line:?}"
        );
        assert!(!line.contains('\x1b'), "colour in {line:?}");
    }
    assert!(
        text.contains("<6>vhost_user_pmem: SIGTERM received"),
        "{text}"
    );
    assert!(text.contains("<7>"), "no debug line: {text}");
    // Nothing that looks like env_logger's own timestamp ("[2026-...").
    assert!(!text.contains("[20"), "{text}");

    // A JOURNAL_STREAM that is not our stderr (inherited by a redirected child) is ignored.
    let plain = env.path("plain.log");
    let mut d = Daemon::start_with(&env.args(&[]), &env.socket, &plain, |c| {
        c.rust_log("info").env("JOURNAL_STREAM", &stream)
    });
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    let text = std::fs::read_to_string(&plain).unwrap();
    assert!(text.starts_with("[20"), "{text}");
}
