//! Connections coming and going, device restarts, signals, and the socket file.

mod common;

use std::os::unix::net::UnixListener;

use common::{assert_error, run, Daemon, Env, FileState, MIB, TIMEOUT};
use pmem_frontend::VhostUserMMapFlags;

fn assert_map_fields(map: &pmem_frontend::ShmemMapping, size: u64) {
    let r = map.request;
    assert_eq!(
        ({ r.shmid }, { r.fd_offset }, { r.shm_offset }, { r.len }, {
            r.flags
        }),
        (0, 0, 0, size, VhostUserMMapFlags::WRITABLE.bits())
    );
}

#[test]
fn a_new_connection_after_the_first_closes_works() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let d = env.start(&[]);
    for round in 0..3 {
        let mut fe = d.connect();
        assert_eq!(fe.get_config().unwrap(), vec![0u8; 16], "round {round}");
        let map = fe.start().unwrap();
        assert_map_fields(&map, 2 * MIB);
        assert_eq!(fe.flush().unwrap(), 0, "round {round}");
        map.write(round * 4096, b"hello").unwrap();
        fe.disconnect();
    }
    // The stores of every connection are in the file.
    let data = std::fs::read(&env.file).unwrap();
    for round in 0..3 {
        assert_eq!(&data[round * 4096..round * 4096 + 5], b"hello");
    }
}

#[test]
fn a_connection_that_never_starts_the_device_does_not_break_the_next() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let d = env.start(&[]);
    let fe = d.connect();
    fe.disconnect();
    let mut fe = d.connect();
    fe.get_shmem_config().unwrap();
    fe.disconnect();
    let mut fe = d.connect();
    fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
}

#[test]
fn disconnecting_with_requests_in_flight_does_not_kill_the_daemon() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let mut d = env.start(&[]);
    let mut fe = d.connect();
    fe.start().unwrap();
    for _ in 0..32 {
        fe.submit_request(0).unwrap();
    }
    fe.disconnect();
    let mut fe = d.connect();
    fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
    assert!(d.is_running());
}

#[test]
fn set_features_again_restarts_the_device_with_a_new_shmem_map() {
    let env = Env::new();
    env.create_file(4 * MIB);
    let d = env.start(&[]);
    let mut fe = d.connect();
    let first = fe.start().unwrap();
    assert_map_fields(&first, 4 * MIB);
    assert_eq!(fe.flush().unwrap(), 0);
    assert_eq!(fe.flush().unwrap(), 0);

    // Guest reboot: QEMU stops the rings, then starts the device again from
    // SET_FEATURES on the same connection.
    assert_eq!(fe.stop().unwrap(), 2, "GET_VRING_BASE after two requests");
    let second = fe.start().unwrap();
    assert_eq!(fe.shmem_maps().len(), 2, "one SHMEM_MAP per device start");
    assert_map_fields(&second, 4 * MIB);
    assert_eq!(fe.flush().unwrap(), 0);

    // The new map is the same file.
    second.write(100, b"after restart").unwrap();
    let data = std::fs::read(&env.file).unwrap();
    assert_eq!(&data[100..113], b"after restart");

    // And a third time.
    fe.stop().unwrap();
    fe.start().unwrap();
    assert_eq!(fe.shmem_maps().len(), 3);
    assert_eq!(fe.flush().unwrap(), 0);
}

fn exits_cleanly_on(signal: i32, with_client: bool) {
    let env = Env::new();
    env.create_file(2 * MIB);
    let mut d = env.start(&[]);
    let fe = if with_client {
        let mut fe = d.connect();
        let map = fe.start().unwrap();
        map.write(0, b"dirty").unwrap();
        assert_eq!(fe.flush().unwrap(), 0);
        map.write(4096, b"dirty again").unwrap();
        Some(fe)
    } else {
        None
    };
    let status = d.signal_and_wait(signal);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after signal {signal}: {status}"
    );
    assert!(
        !env.socket.exists(),
        "socket file left behind after signal {signal}"
    );
    drop(fe);
    let data = std::fs::read(&env.file).unwrap();
    if with_client {
        assert_eq!(&data[4096..4107], b"dirty again");
    }
}

#[test]
fn sigterm_exits_zero_and_removes_the_socket() {
    exits_cleanly_on(libc::SIGTERM, false);
}

#[test]
fn sigterm_with_a_client_exits_zero_and_removes_the_socket() {
    exits_cleanly_on(libc::SIGTERM, true);
}

#[test]
fn sigint_exits_zero_and_removes_the_socket() {
    exits_cleanly_on(libc::SIGINT, true);
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let env = Env::new();
    env.create_file(2 * MIB);
    // A socket file nobody listens on, as a killed daemon leaves behind.
    drop(UnixListener::bind(&env.socket).unwrap());
    assert!(env.socket.exists());
    let d = env.start(&[]);
    let mut fe = d.connect();
    fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
}

#[test]
fn a_socket_with_a_live_daemon_is_refused() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let d = env.start(&[]);

    let other = env.path("other.img");
    std::fs::write(&other, vec![3u8; 2 * MIB as usize]).unwrap();
    let before = FileState::of(&other);
    let o = run(&[
        "--socket-path".into(),
        env.socket.display().to_string(),
        "--file".into(),
        other.display().to_string(),
    ]);
    assert_error(&o);
    assert_eq!(FileState::of(&other), before);

    // The first daemon's socket is still there and it still serves.
    assert!(
        env.socket.exists(),
        "the refused daemon removed the live socket"
    );
    let mut fe = d.connect();
    fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
}

#[test]
fn a_file_locked_by_a_running_daemon_is_refused() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let _d = env.start(&[]);
    let before = FileState::of(&env.file);
    for extra in [&[][..], &["--read-only"][..], &["--size", "4M"][..]] {
        let mut args = vec![
            "--socket-path".to_string(),
            env.path("second.sock").display().to_string(),
            "--file".into(),
            env.file.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let o = run(&args);
        let line = assert_error(&o);
        assert_eq!(FileState::of(&env.file), before, "{extra:?}: file changed");
        assert!(
            !env.path("second.sock").exists(),
            "{extra:?}: {line}: socket left behind"
        );
    }
}

#[test]
fn read_only_daemons_share_the_file_but_exclude_a_writer() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let log = |n: &str| env.path(n);
    let args = |sock: &str, extra: &[&str]| {
        let mut v = vec![
            "--socket-path".to_string(),
            env.path(sock).display().to_string(),
            "--file".into(),
            env.file.display().to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let a = Daemon::start(
        &args("a.sock", &["--read-only"]),
        &env.path("a.sock"),
        &log("a.log"),
    );
    let b = Daemon::start(
        &args("b.sock", &["--read-only"]),
        &env.path("b.sock"),
        &log("b.log"),
    );
    for d in [&a, &b] {
        let mut fe = d.connect();
        let map = fe.start().unwrap();
        assert!(!map.writable());
    }
    let before = FileState::of(&env.file);
    assert_error(&run(&args("c.sock", &[])));
    assert_eq!(FileState::of(&env.file), before);
}

#[test]
fn the_daemon_keeps_listening_after_many_connections() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let mut d = env.start(&[]);
    let deadline = std::time::Instant::now() + TIMEOUT;
    for _ in 0..20 {
        let mut fe = d.connect();
        fe.start().unwrap();
        assert_eq!(fe.flush().unwrap(), 0);
    }
    assert!(std::time::Instant::now() < deadline);
    assert!(d.is_running());
}
