//! Connections coming and going, device restarts, daemon restarts, signals, and the socket
//! file. The tests of a restart or a broken connection run in both socket modes: the daemon
//! listening (`--socket-path`) and the daemon connecting to a listening harness (`--connect`).

mod common;

use std::os::unix::net::UnixListener;

use common::{assert_error, run, Daemon, Env, FileState, Frontends, Mode, MIB, TIMEOUT};
use pmem_frontend::{VhostUserMMapFlags, STATUS_SENTINEL};

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

/// SIGHUP (a closed terminal or session) used to kill the daemon outright (status 129): no
/// final fdatasync, the socket left behind. It is a stop like SIGTERM now.
#[test]
fn sighup_exits_zero_after_the_final_sync_and_removes_the_socket() {
    exits_cleanly_on(libc::SIGHUP, true);
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

/// A daemon killed with SIGKILL leaves its frontend with a dead connection (and, listening, a
/// stale socket file). A fresh daemon on the same file must go through the whole negotiation
/// and map the file again from scratch, and the guest's data must be there.
fn a_fresh_daemon_after_sigkill_negotiates_and_maps_again(mode: Mode) {
    let env = Env::new();
    env.create_file(4 * MIB);
    let fes = Frontends::new(&env, mode);
    let mut first = env.start_in(mode, &[], "first.log");
    let mut fe = fes.next(&first);
    let map = fe.start().unwrap();
    assert_map_fields(&map, 4 * MIB);
    map.write(8192, b"before the kill").unwrap();
    assert_eq!(fe.flush().unwrap(), 0);

    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(first.pid(), libc::SIGKILL) }, 0);
    let status = first
        .wait_exit(TIMEOUT)
        .expect("killed daemon did not exit");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    // The old connection is dead.
    assert!(
        fe.get_config().is_err(),
        "a killed daemon answered GET_CONFIG"
    );
    drop(fe);
    if mode == Mode::Listen {
        assert!(env.socket.exists(), "SIGKILL cannot remove the socket file");
    }
    // The frontend still maps the file with the descriptor from SHMEM_MAP, which shares the
    // killed daemon's flock: a fresh daemon is refused (exit 1) until that mapping is gone.
    let args = match mode {
        Mode::Listen => env.args(&[]),
        Mode::Client => env.client_args(&[]),
    };
    let refused = run(&args);
    assert_eq!(refused.code(), Some(1), "{}", refused.stderr);
    let line = refused.stderr.lines().last().unwrap_or_default();
    assert!(
        line.starts_with("vhost-user-pmem: error: ") && line.contains("in use"),
        "{}",
        refused.stderr
    );
    if mode == Mode::Listen {
        // The refused daemon cleared the stale socket before it found the lock taken.
        assert!(
            refused.stderr.contains("removed stale socket"),
            "{}",
            refused.stderr
        );
    }
    drop(map);

    let second = env.start_in(mode, &[], "second.log");
    let mut fe = fes.next(&second);
    // A new connection starts from nothing: features offered again, no map before start.
    assert_eq!(fe.acked_features(), None);
    assert_ne!(fe.features() & pmem_frontend::VIRTIO_PMEM_F_SHMEM_REGION, 0);
    assert!(fe.shmem_maps().is_empty());
    assert_eq!({ fe.get_shmem_config().unwrap().memory_sizes[0] }, 4 * MIB);
    let map = fe.start().unwrap();
    assert_map_fields(&map, 4 * MIB);
    assert_eq!(fe.shmem_maps().len(), 1);
    let mut buf = [0u8; 15];
    map.read(8192, &mut buf).unwrap();
    assert_eq!(&buf, b"before the kill");
    map.write(12288, b"after").unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
    let data = std::fs::read(&env.file).unwrap();
    assert_eq!(&data[12288..12293], b"after");
}

#[test]
fn a_fresh_daemon_after_sigkill_negotiates_and_maps_again_listening() {
    a_fresh_daemon_after_sigkill_negotiates_and_maps_again(Mode::Listen);
}

#[test]
fn a_fresh_daemon_after_sigkill_negotiates_and_maps_again_client() {
    a_fresh_daemon_after_sigkill_negotiates_and_maps_again(Mode::Client);
}

/// SIGSTOPs `pid` and returns once every one of its threads is stopped: kill(2) returns
/// before a busy thread reaches the stop, and a thread still running could answer the request
/// this is meant to hold back.
fn stop_all_threads(pid: i32) {
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        let all_stopped = tasks.flatten().all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state is the first field after the parenthesised command name.
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            matches!(state, Some('T') | Some('t'))
        });
        if all_stopped {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon's threads did not stop"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The frontend goes away in the middle of a flush: the request is on the ring and kicked but
/// not answered. The daemon is stopped (SIGSTOP) while the request is submitted and the
/// connection closed, so "not answered yet" is certain rather than a race; after SIGCONT it
/// finds the kick and the hang-up together. It must survive, and the next connection must
/// work from scratch.
fn a_disconnect_in_the_middle_of_a_flush(mode: Mode) {
    let env = Env::new();
    env.create_file(2 * MIB);
    let fes = Frontends::new(&env, mode);
    let mut d = env.start_in_with_metrics(mode, &[], "daemon.log");
    let mut fe = fes.next(&d);
    let map = fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
    map.write(0, b"dirty before the cut").unwrap();
    let before = d.report(&env.metrics_path());

    stop_all_threads(d.pid());
    let head = fe.submit_request(0).unwrap();
    assert_eq!(fe.in_flight(), 1);
    assert_eq!(fe.request_status(head).unwrap(), STATUS_SENTINEL as i32);
    fe.disconnect();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(d.pid(), libc::SIGCONT) }, 0);

    assert!(d.is_running(), "the daemon died after the cut");
    // In listening mode this waits in the socket's backlog until the daemon has seen the
    // hang-up and accepts again.
    let mut fe = fes.next(&d);
    assert!(fe.shmem_maps().is_empty());
    let map = fe.start().unwrap();
    let mut buf = [0u8; 20];
    map.read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"dirty before the cut");
    assert_eq!(fe.flush().unwrap(), 0);
    assert_eq!(fe.flush().unwrap(), 0);
    let m = d.report(&env.metrics_path());
    let next = before.counters.connections + 1;
    assert_eq!(m.counters.connections, next);
    assert_eq!(
        m.connection.map(|c| (c.id, c.requests, c.errors)),
        Some((next, 2, 0))
    );
    // The cut request was taken off the ring or not; either way it was answered or dropped
    // with its connection, never left in flight.
    assert_eq!(m.in_flight, 0);
    assert_eq!(m.counters.log_errors, 0, "log:\n{}", d.log());
}

#[test]
fn a_disconnect_in_the_middle_of_a_flush_listening() {
    a_disconnect_in_the_middle_of_a_flush(Mode::Listen);
}

#[test]
fn a_disconnect_in_the_middle_of_a_flush_client() {
    a_disconnect_in_the_middle_of_a_flush(Mode::Client);
}
