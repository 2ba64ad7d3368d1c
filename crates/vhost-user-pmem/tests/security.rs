//! The sandbox and the socket's permissions on the real daemon: every thread runs under the
//! seccomp filter (which the rest of the integration suite runs with, since it is the
//! default), `--seccomp=off|log` do what they say, and the socket gets the mode asked for.
//! That a call outside the list is refused is shown in `sandbox.rs`'s unit tests, which fork a
//! child that installs the same filter.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{assert_usage_error, run, Daemon, Env, FileState, Frontends, Mode, MIB};

/// Every thread's seccomp mode; fails unless all are `want`. Returns the thread names.
fn assert_all_threads(d: &Daemon, want: u32) -> Vec<String> {
    let modes = d.seccomp_modes();
    assert!(!modes.is_empty());
    for (name, mode) in &modes {
        assert_eq!(*mode, want, "thread {name}: Seccomp {mode}, all: {modes:?}");
    }
    modes.into_iter().map(|(n, _)| n).collect()
}

fn filter_on_every_thread(mode: Mode) {
    let env = Env::new();
    env.create_file(2 * MIB);
    let fes = Frontends::new(&env, mode);
    let d = env.start_in_with_metrics(mode, &[], "daemon.log");
    let mut fe = fes.next(&d);
    fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
    // The connection's threads (handler, vring worker, mapper) were spawned after the filter
    // went in, the flush worker before it: all must have it.
    let names = assert_all_threads(&d, 2);
    assert!(names.iter().any(|n| n == "pmem-flush"), "{names:?}");
    assert!(names.iter().any(|n| n == "pmem-signals"), "{names:?}");
    assert!(names.len() >= 5, "{names:?}");
    // SIGUSR1 with --metrics-path creates and renames a file under the filter, and builds
    // every field without a call outside the list.
    let m = d.report(&env.metrics_path());
    assert_eq!((m.seq, m.counters.requests), (2, 1));
    assert_eq!(m.counters.log_errors, 0);
}

#[test]
fn the_filter_is_on_every_thread_by_default_listening() {
    filter_on_every_thread(Mode::Listen);
}

#[test]
fn the_filter_is_on_every_thread_by_default_client() {
    filter_on_every_thread(Mode::Client);
}

#[test]
fn seccomp_off_installs_no_filter() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let d = env.start(&["--seccomp=off"]);
    let mut fe = d.connect();
    fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
    assert_all_threads(&d, 0);
}

#[test]
fn seccomp_log_installs_a_filter_and_serves() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let d = env.start(&["--seccomp", "log"]);
    let mut fe = d.connect();
    fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
    assert_all_threads(&d, 2);
}

#[test]
fn a_bad_seccomp_value_is_a_usage_error_naming_the_choices() {
    let env = Env::new();
    let o = run(&env.args(&["--seccomp", "strict", "--size", "2M"]));
    assert_eq!(o.code(), Some(2), "{}", o.stderr);
    for v in ["on", "off", "log"] {
        assert!(o.stderr.contains(v), "{}", o.stderr);
    }
    assert_eq!(FileState::of(&env.file), FileState::Missing);
}

fn socket_mode(env: &Env) -> u32 {
    std::fs::metadata(&env.socket).unwrap().permissions().mode() & 0o7777
}

#[test]
fn the_socket_is_0600_by_default() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let _d = env.start(&[]);
    assert_eq!(socket_mode(&env), 0o600);
}

#[test]
fn socket_mode_sets_the_socket_permissions() {
    for (arg, want) in [("0660", 0o660), ("666", 0o666), ("0o640", 0o640)] {
        let env = Env::new();
        env.create_file(2 * MIB);
        let d = env.start(&["--socket-mode", arg]);
        assert_eq!(socket_mode(&env), want, "--socket-mode {arg}");
        let mut fe = d.connect();
        fe.start().unwrap();
        assert_eq!(fe.flush().unwrap(), 0);
    }
}

#[test]
fn a_bad_socket_mode_is_refused_before_anything_is_touched() {
    for bad in ["999", "4755", "u=rw", "0x180", ""] {
        let env = Env::new();
        let o = run(&env.args(&["--socket-mode", bad, "--size", "2M"]));
        let line = assert_usage_error(&o);
        assert!(line.contains("--socket-mode"), "{line}");
        assert_eq!(FileState::of(&env.file), FileState::Missing, "{bad:?}");
        assert!(!env.socket.exists(), "{bad:?}");
    }
}
