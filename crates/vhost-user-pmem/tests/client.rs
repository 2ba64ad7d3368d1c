//! `--connect`: the daemon as the connecting side, for a frontend that listens (QEMU's
//! `-chardev socket,server=on`). The harness plays that frontend with a `FrontendListener`.
//! Restarts and cut connections in this mode are in lifecycle.rs, next to the listening ones.

mod common;

use common::{
    assert_error, assert_usage_error, run, Daemon, Env, FileState, Frontends, Mode, MIB, TIMEOUT,
};
use pmem_frontend::{FrontendListener, VhostUserMMapFlags};

#[test]
fn client_mode_negotiates_maps_and_flushes() {
    let env = Env::new();
    env.create_file(4 * MIB);
    let fes = Frontends::new(&env, Mode::Client);
    let d = env.start_in_with_metrics(Mode::Client, &[], "daemon.log");
    let mut fe = fes.next(&d);
    assert_ne!(fe.features() & pmem_frontend::VIRTIO_PMEM_F_SHMEM_REGION, 0);
    assert_eq!(fe.get_config().unwrap(), vec![0u8; 16]);
    assert_eq!({ fe.get_shmem_config().unwrap().memory_sizes[0] }, 4 * MIB);
    let map = fe.start().unwrap();
    let r = map.request;
    assert_eq!(
        ({ r.shmid }, { r.len }, { r.flags }),
        (0, 4 * MIB, VhostUserMMapFlags::WRITABLE.bits())
    );
    map.write(4096, b"through --connect").unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
    let data = std::fs::read(&env.file).unwrap();
    assert_eq!(&data[4096..4113], b"through --connect");
    let m = d.report(&env.metrics_path());
    assert_eq!(m.counters.connections, 1, "no probe in client mode");
    assert_eq!(
        m.connection.map(|c| (c.id, c.requests, c.maps)),
        Some((1, 1, 1))
    );
}

#[test]
fn client_mode_read_only_maps_without_write_permission() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let fes = Frontends::new(&env, Mode::Client);
    let d = env.start_in(Mode::Client, &["--read-only"], "daemon.log");
    let mut fe = fes.next(&d);
    assert!(!fe.start().unwrap().writable());
    // As in listening mode: nothing a guest writes can become durable on a read-only device.
    assert_eq!(fe.flush().unwrap(), -1);
}

/// The frontend goes away and its socket with it (QEMU exited). The daemon keeps trying, with
/// a growing delay and a log line per attempt, and connects to the next frontend that listens
/// on the same path.
#[test]
fn client_mode_reconnects_with_backoff_until_a_frontend_listens_again() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let mut fes = Frontends::new(&env, Mode::Client);
    let mut d = env.start_in_with_metrics(Mode::Client, &[], "daemon.log");
    let mut fe = fes.next(&d);
    let map = fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
    drop(map);
    drop(fe);
    fes.listener = None; // removes the socket file
    assert!(!env.socket.exists());

    // 0.1 s, 0.2 s, 0.4 s: three failed attempts take 0.7 s plus the attempts themselves.
    // The frontend cannot see attempts that find no socket, so the wait is by the clock; the
    // log line of each attempt is the documented way to watch this (--help), and is checked
    // as that output, not to decide what the daemon did.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let log = d.log();
    for (attempt, delay) in [(1, 100), (2, 200), (3, 400)] {
        let line = format!("(attempt {attempt}); retrying in {delay} ms");
        assert!(log.contains(&line), "no {line:?} in:\n{log}");
    }
    assert!(log.contains("No such file or directory"), "{log}");
    assert!(d.is_running());

    let listener = FrontendListener::bind(&env.socket).unwrap();
    let opts = pmem_frontend::Options {
        timeout: TIMEOUT,
        ..Default::default()
    };
    let mut fe = listener
        .accept_with(opts)
        .unwrap_or_else(|e| panic!("no reconnect: {e}; log:\n{}", d.log()));
    fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
    let m = d.report(&env.metrics_path());
    // The immediate reconnect may reach the old listener before its socket goes away (a
    // connection made, then dropped with the listener); attempts that found no socket are
    // not connections.
    let n = m.counters.connections;
    assert!((2..=3).contains(&n), "{m:?}");
    assert_eq!(
        m.connection.map(|c| (c.id, c.requests)),
        Some((n, 1)),
        "the new connection counts from 0"
    );
}

#[test]
fn sigterm_in_client_mode_exits_zero_and_leaves_the_frontends_socket() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let fes = Frontends::new(&env, Mode::Client);
    let mut d = env.start_in(Mode::Client, &[], "daemon.log");
    let mut fe = fes.next(&d);
    let map = fe.start().unwrap();
    map.write(100, b"unflushed").unwrap();
    let status = d.signal_and_wait(libc::SIGTERM);
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());
    assert!(
        env.socket.exists(),
        "the daemon removed the frontend's socket"
    );
    assert_eq!(&std::fs::read(&env.file).unwrap()[100..109], b"unflushed");
}

#[test]
fn a_missing_or_wrong_connect_path_is_refused_before_the_file_is_touched() {
    let env = Env::new();
    // No socket at all.
    let o = run(&env.client_args(&["--size", "2M"]));
    let line = assert_error(&o);
    assert!(line.contains("no such socket"), "{line}");
    assert_eq!(FileState::of(&env.file), FileState::Missing);

    // A plain file where the socket should be.
    std::fs::write(&env.socket, b"not a socket").unwrap();
    let line = assert_error(&run(&env.client_args(&["--size", "2M"])));
    assert!(line.contains("is not a socket"), "{line}");
    assert_eq!(FileState::of(&env.file), FileState::Missing);
    assert_eq!(std::fs::read(&env.socket).unwrap(), b"not a socket");
}

/// A socket file nobody listens on can only be found by connecting, which vhost-user-backend
/// does by path after the device (and so the file) is ready.
#[test]
fn a_socket_nobody_listens_on_is_an_error_at_start_not_a_wait() {
    let env = Env::new();
    let data = env.create_file(2 * MIB);
    drop(std::os::unix::net::UnixListener::bind(&env.socket).unwrap());
    let line = assert_error(&run(&env.client_args(&[])));
    assert!(line.contains("Connection refused"), "{line}");
    assert_eq!(std::fs::read(&env.file).unwrap(), data);
    assert!(
        env.socket.exists(),
        "the frontend's socket file was removed"
    );
}

#[test]
fn endpoint_arguments_are_checked() {
    let env = Env::new();
    env.create_file(2 * MIB);
    // Both or neither: clap's usage error (exit 2) naming the two options.
    let mut both = env.args(&[]);
    both.extend(["--connect".into(), env.path("q.sock").display().to_string()]);
    let o = run(&both);
    assert_eq!(o.code(), Some(2), "{}", o.stderr);
    assert!(o.stderr.contains("cannot be used with"), "{}", o.stderr);
    let o = run(&["--file".into(), env.file.display().to_string()]);
    assert_eq!(o.code(), Some(2), "{}", o.stderr);
    assert!(
        o.stderr.contains("--socket-path") && o.stderr.contains("--connect"),
        "{}",
        o.stderr
    );
    // --socket-mode means nothing for a socket the frontend created: a usage error too.
    let line = assert_usage_error(&run(&env.client_args(&["--socket-mode", "0600"])));
    assert!(
        line.contains("--socket-mode applies only to --socket-path"),
        "{line}"
    );
}

#[test]
fn the_listening_default_still_works_next_to_client_mode() {
    // One daemon of each kind on different files at once.
    let env = Env::new();
    env.create_file(2 * MIB);
    let listening = env.start(&[]);
    let other = env.path("other.img");
    std::fs::write(&other, vec![0u8; 2 * MIB as usize]).unwrap();
    let qsock = env.path("qemu.sock");
    let listener = FrontendListener::bind(&qsock).unwrap();
    let client = Daemon::spawn(
        &[
            "--connect".into(),
            qsock.display().to_string(),
            "--file".into(),
            other.display().to_string(),
        ],
        &qsock,
        &env.path("client.log"),
    );
    let mut a = listening.connect();
    let mut b = listener
        .accept()
        .unwrap_or_else(|e| panic!("{e}; {}", client.log()));
    a.start().unwrap();
    b.start().unwrap();
    assert_eq!(a.flush().unwrap(), 0);
    assert_eq!(b.flush().unwrap(), 0);
}
