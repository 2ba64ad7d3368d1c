//! The command line: every refused argument, file creation and extension, --help,
//! --version and --print-capabilities; bad inherited sockets and socket-activation variables.

mod common;

use std::os::fd::AsRawFd;

use common::{
    allocated_bytes, assert_refused, assert_usage_error, run, run_activated, run_with, Env,
    FileState, MIB,
};
use pmem_frontend::daemon::pass_fds;

/// Runs with `extra` after the usual socket and file arguments and checks a run-time refusal:
/// exit 1, one error line, the file and socket untouched. Returns the error line.
fn refused(env: &Env, extra: &[&str]) -> String {
    refused_with(env, extra, 1)
}

/// [`refused`] for a usage error: exit 2.
fn refused_usage(env: &Env, extra: &[&str]) -> String {
    refused_with(env, extra, 2)
}

fn refused_with(env: &Env, extra: &[&str], code: i32) -> String {
    let before = FileState::of(&env.file);
    let o = run(&env.args(extra));
    let line = assert_refused(&o, code);
    assert_eq!(
        FileState::of(&env.file),
        before,
        "{extra:?} changed the file ({line})"
    );
    assert!(
        !env.socket.exists(),
        "{extra:?} left a socket behind ({line})"
    );
    line
}

#[test]
fn help_and_version_exit_zero() {
    let o = run(&["--help".into()]);
    assert_eq!(o.code(), Some(0), "stderr: {}", o.stderr);
    for flag in [
        "--socket-path",
        "--file",
        "--size",
        "--read-only",
        "--allocate",
        "--flush-mode",
        "--flush-rate-limit",
        "--metrics-path",
        "--metrics-interval",
        "--fd",
        "--socket-group",
        "--log-level",
        "--print-capabilities",
        "LISTEN_FDS",
        "NOTIFY_SOCKET",
        "RUST_LOG",
        "SIGHUP",
        "Exit status",
    ] {
        assert!(o.stdout.contains(flag), "--help does not mention {flag}");
    }
    let o = run(&["--version".into()]);
    assert_eq!(o.code(), Some(0), "stderr: {}", o.stderr);
    assert!(
        o.stdout.contains(env!("CARGO_PKG_VERSION")),
        "--version printed {:?}",
        o.stdout
    );
}

#[test]
fn missing_arguments_are_a_usage_error() {
    let o = run(&[]);
    assert_eq!(o.code(), Some(2), "stderr: {}", o.stderr);
    let env = Env::new();
    let o = run(&["--file".into(), env.file.display().to_string()]);
    assert_eq!(o.code(), Some(2), "stderr: {}", o.stderr);
    assert_eq!(FileState::of(&env.file), FileState::Missing);
}

#[test]
fn unknown_flush_mode_is_a_usage_error() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let o = run(&env.args(&["--flush-mode", "fast"]));
    assert_eq!(o.code(), Some(2), "stderr: {}", o.stderr);
    assert!(
        o.stderr.contains("group") && o.stderr.contains("parallel"),
        "the error should list the modes: {}",
        o.stderr
    );
    assert!(!env.socket.exists());
}

#[test]
fn bad_flush_rate_limits_are_one_line_usage_errors() {
    let env = Env::new();
    env.create_file(2 * MIB);
    // `=` so that a value starting with '-' reaches the daemon's own check, not clap's.
    for (text, fix) in [
        ("0", "at least 1/s, or leave the option out"),
        ("0/s,burst=3", "at least 1/s"),
        ("-5/s", "from 1 to 1000000"),
        ("fast", "OPS[/s][,burst=N]"),
        ("2.5/s", "whole number"),
        ("20/min", "OPS[/s][,burst=N]"),
        ("/s", "OPS[/s][,burst=N]"),
        ("2000000/s", "leave the option out for no limit"),
        ("20/s,burst=0", "burst=1 or more"),
        ("20/s,burst=", "burst= needs a whole number"),
        ("20/s,burst=many", "burst= needs a whole number"),
        ("20/s,rate=3", "the only key is burst=N"),
        ("20/s,burst=2,burst=3", "give it once"),
        ("", "give OPS[/s][,burst=N]"),
    ] {
        let line = refused_usage(&env, &[&format!("--flush-rate-limit={text}")]);
        assert!(
            line.contains("--flush-rate-limit") && line.contains(fix),
            "{text:?}: {line}"
        );
    }
    // No value at all is clap's to refuse; still a usage error.
    let o = run(&env.args(&["--flush-rate-limit"]));
    assert_eq!(o.code(), Some(2), "stderr: {}", o.stderr);
    assert!(o.stderr.contains("--flush-rate-limit"), "{}", o.stderr);
}

#[test]
fn poll_us_is_checked_before_anything_is_touched() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let line = refused_usage(&env, &["--poll-us", "1001"]);
    assert!(
        line.contains("--poll-us 1001") && line.contains("1000"),
        "{line}"
    );
    // Not a number of microseconds: clap's to refuse, still a usage error before anything.
    for bad in ["-1", "20us", "", "0.5"] {
        let o = run(&env.args(&[&format!("--poll-us={bad}")]));
        assert_eq!(o.code(), Some(2), "{bad:?}: stderr: {}", o.stderr);
        assert!(o.stderr.contains("--poll-us"), "{bad:?}: {}", o.stderr);
        assert!(!env.socket.exists(), "{bad:?} left a socket behind");
    }
}

#[test]
fn metrics_arguments_are_checked_before_anything_is_touched() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let line = refused_usage(&env, &["--metrics-interval", "5"]);
    assert!(line.contains("--metrics-path"), "{line}");
    // clap itself refuses an empty value.
    assert_eq!(run(&env.args(&["--metrics-path", ""])).code(), Some(2));
    let missing_dir = env.path("no-such-dir").join("m.json");
    let line = refused(
        &env,
        &["--metrics-path", &missing_dir.display().to_string()],
    );
    assert!(line.contains("m.json"), "{line}");
    let line = refused_usage(
        &env,
        &[
            "--metrics-path",
            &env.path("m.json").display().to_string(),
            "--metrics-interval",
            "100000",
        ],
    );
    assert!(line.contains("a day"), "{line}");
    let dir = env.path("a-dir");
    std::fs::create_dir(&dir).unwrap();
    refused(&env, &["--metrics-path", &dir.display().to_string()]);
}

#[test]
fn size_not_a_power_of_two_names_the_nearest_valid_sizes() {
    let env = Env::new();
    let line = refused_usage(&env, &["--size", "3G"]);
    assert!(
        line.contains("2 GiB") && line.contains("4 GiB"),
        "message does not name 2 GiB and 4 GiB: {line}"
    );
    let line = refused_usage(&env, &["--size", "6M"]);
    assert!(
        line.contains("4 MiB") && line.contains("8 MiB"),
        "message does not name 4 MiB and 8 MiB: {line}"
    );
    // Same for an existing file.
    env.create_file(2 * MIB);
    let line = refused_usage(&env, &["--size", "3M"]);
    assert!(line.contains("2 MiB") && line.contains("4 MiB"), "{line}");
}

#[test]
fn existing_file_of_a_size_that_is_not_a_power_of_two() {
    let env = Env::new();
    env.create_file(3 * MIB);
    let line = refused(&env, &[]);
    // The file cannot be shrunk, so the one valid size to name is the next one up.
    assert!(
        line.contains("4 MiB"),
        "message does not name 4 MiB: {line}"
    );
}

#[test]
fn size_below_two_mib() {
    let env = Env::new();
    refused_usage(&env, &["--size", "1M"]);
    refused_usage(&env, &["--size", "4096"]);
    env.create_file(MIB);
    refused(&env, &[]);
}

#[test]
fn file_is_a_directory() {
    let env = Env::new();
    std::fs::create_dir(&env.file).unwrap();
    std::fs::write(env.file.join("inside"), b"x").unwrap();
    refused(&env, &[]);
    refused(&env, &["--size", "2M"]);
}

#[test]
fn missing_file_without_size() {
    let env = Env::new();
    refused(&env, &[]);
}

#[test]
fn missing_file_with_read_only() {
    let env = Env::new();
    refused(&env, &["--read-only"]);
    refused(&env, &["--read-only", "--size", "2M"]);
}

#[test]
fn file_larger_than_size_is_never_shrunk() {
    let env = Env::new();
    env.create_file(4 * MIB);
    refused(&env, &["--size", "2M"]);
}

#[test]
fn allocate_sparse_creates_a_missing_file_sparse() {
    let env = Env::new();
    let mut d = env.start(&["--size", "1G", "--allocate", "sparse"]);
    let meta = std::fs::metadata(&env.file).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    assert!(
        allocated_bytes(&env.file) <= MIB,
        "a new 1 GiB file has {} bytes allocated; it should be sparse",
        allocated_bytes(&env.file)
    );
    let mut fe = d.connect();
    assert_eq!({ fe.get_shmem_config().unwrap().memory_sizes[0] }, 1 << 30);
    let map = fe.start().unwrap();
    assert_eq!({ map.request.len }, 1 << 30);
    assert_eq!(fe.flush().unwrap(), 0);
    fe.disconnect();
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    assert!(
        allocated_bytes(&env.file) <= MIB,
        "flush or exit filled the file"
    );
}

#[test]
fn by_default_every_block_of_a_new_or_extended_file_is_allocated() {
    let env = Env::new();
    let data = env.create_file(2 * MIB);
    let mut d = env.start(&["--size", "64M"]);
    assert_eq!(allocated_bytes(&env.file), 64 * MIB);
    let now = std::fs::read(&env.file).unwrap();
    assert_eq!(
        &now[..data.len()],
        &data[..],
        "allocation kept the contents"
    );
    assert!(now[data.len()..].iter().all(|&b| b == 0));
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
}

#[test]
fn size_units() {
    for (arg, size) in [
        ("4M", 4 * MIB),
        ("4MiB", 4 * MIB),
        ("4096K", 4 * MIB),
        ("8388608", 8 * MIB),
        ("1G", 1 << 30),
        ("2GiB", 2 << 30),
    ] {
        let env = Env::new();
        let mut d = env.start(&["--size", arg]);
        assert_eq!(
            std::fs::metadata(&env.file).unwrap().len(),
            size,
            "--size {arg}"
        );
        let mut fe = d.connect();
        assert_eq!(
            { fe.get_shmem_config().unwrap().memory_sizes[0] },
            size,
            "--size {arg}"
        );
        fe.disconnect();
        assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    }
}

#[test]
fn size_extends_a_smaller_file_and_keeps_its_data() {
    let env = Env::new();
    let initial = env.create_file(2 * MIB);
    let d = env.start(&["--size", "8M"]);
    let data = std::fs::read(&env.file).unwrap();
    assert_eq!(data.len() as u64, 8 * MIB);
    assert!(
        data[..initial.len()] == initial[..],
        "existing data changed"
    );
    assert!(
        data[initial.len()..].iter().all(|&b| b == 0),
        "extension not zero"
    );

    let mut fe = d.connect();
    let map = fe.start().unwrap();
    assert_eq!({ map.request.len }, 8 * MIB);
    let mut seen = vec![0u8; initial.len()];
    map.read(0, &mut seen).unwrap();
    assert!(seen == initial);
}

#[test]
fn size_equal_to_the_file_is_fine() {
    let env = Env::new();
    let initial = env.create_file(4 * MIB);
    let d = env.start(&["--size", "4M"]);
    let mut fe = d.connect();
    fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
    fe.disconnect();
    drop(d);
    assert!(std::fs::read(&env.file).unwrap() == initial);
}

/// `--fd N --file F --size 2M` with `fd` of ours passed as the daemon's descriptor `n`
/// (nothing passed for `None`); checks a usage error that leaves the file alone.
fn refused_fd(fd: Option<i32>, n: i32) -> String {
    let env = Env::new();
    let args: Vec<String> = [
        "--fd",
        &n.to_string(),
        "--file",
        &env.file.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["--size".into(), "2M".into()])
    .collect();
    let o = run_with(&args, |cmd| {
        if let Some(fd) = fd {
            pass_fds(cmd, vec![(fd, n)]);
        }
    });
    let line = assert_usage_error(&o);
    assert_eq!(FileState::of(&env.file), FileState::Missing, "{line}");
    line
}

#[test]
fn fd_that_is_not_open() {
    let line = refused_fd(None, 200);
    assert!(
        line.contains("--fd 200 is not an open file descriptor"),
        "{line}"
    );
    assert!(line.contains("without close-on-exec"), "{line}");
}

#[test]
fn fd_that_is_not_a_socket() {
    let f = std::fs::File::open("/dev/null").unwrap();
    let line = refused_fd(Some(f.as_raw_fd()), 3);
    assert!(line.contains("--fd 3 is not a socket"), "{line}");
    assert!(line.contains("listening AF_UNIX stream socket"), "{line}");
}

#[test]
fn fd_that_is_a_udp_or_tcp_socket() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let line = refused_fd(Some(udp.as_raw_fd()), 3);
    assert!(line.contains("not AF_UNIX"), "{line}");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let line = refused_fd(Some(tcp.as_raw_fd()), 4);
    assert!(
        line.contains("--fd 4") && line.contains("not AF_UNIX"),
        "{line}"
    );
}

#[test]
fn fd_that_is_a_unix_datagram_socket() {
    let d = std::os::unix::net::UnixDatagram::unbound().unwrap();
    let line = refused_fd(Some(d.as_raw_fd()), 3);
    assert!(line.contains("SOCK_STREAM"), "{line}");
}

#[test]
fn fd_that_is_not_listening() {
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let line = refused_fd(Some(a.as_raw_fd()), 3);
    assert!(line.contains("not listening"), "{line}");
    assert!(line.contains("listen()"), "{line}");
}

#[test]
fn endpoints_exclude_each_other() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let file = env.file.display().to_string();
    let sock = env.socket.display().to_string();
    for pair in [
        ["--socket-path", &sock, "--fd", "3"],
        ["--connect", &sock, "--fd", "3"],
        ["--socket-path", &sock, "--connect", &sock],
    ] {
        let mut args: Vec<String> = pair.iter().map(|s| s.to_string()).collect();
        args.extend(["--file".into(), file.clone()]);
        let o = run(&args);
        assert_eq!(o.code(), Some(2), "{pair:?}: {}", o.stderr);
        assert!(o.stderr.contains("cannot be used with"), "{}", o.stderr);
    }
    assert!(!env.socket.exists());
}

#[test]
fn no_endpoint_is_a_usage_error_naming_every_way() {
    let env = Env::new();
    let o = run(&["--file".into(), env.file.display().to_string()]);
    let line = assert_usage_error(&o);
    for way in ["--socket-path", "--connect", "--fd", "socket activation"] {
        assert!(line.contains(way), "{line}");
    }
    assert_eq!(FileState::of(&env.file), FileState::Missing);
}

#[test]
fn socket_activation_variables_that_cannot_work() {
    let env = Env::new();
    let file_args = vec![
        "--file".to_string(),
        env.file.display().to_string(),
        "--size".into(),
        "2M".into(),
    ];
    let a = std::os::unix::net::UnixListener::bind(env.path("a.sock")).unwrap();
    let b = std::os::unix::net::UnixListener::bind(env.path("b.sock")).unwrap();
    let two = vec![(a.as_raw_fd(), 3), (b.as_raw_fd(), 4)];
    let line = assert_usage_error(&run_activated("2", &file_args, |c| pass_fds(c, two)));
    assert!(
        line.contains("2 sockets") && line.contains("ListenStream"),
        "{line}"
    );

    // One socket, and an endpoint option as well.
    let mut with_path = env.args(&[]);
    with_path.extend(["--size".into(), "2M".into()]);
    let one = vec![(a.as_raw_fd(), 3)];
    let line = assert_usage_error(&run_activated("1", &with_path, |c| pass_fds(c, one)));
    assert!(
        line.contains("socket activation") && line.contains("--socket-path"),
        "{line}"
    );
    assert!(!env.socket.exists());

    // One socket claimed, but fd 3 is not one.
    let f = std::fs::File::open("/dev/null").unwrap();
    let one = vec![(f.as_raw_fd(), 3)];
    let line = assert_usage_error(&run_activated("1", &file_args, |c| pass_fds(c, one)));
    assert!(line.contains("socket-activation descriptor 3"), "{line}");

    let line = assert_usage_error(&run_activated("many", &file_args, |_| {}));
    assert!(line.contains("LISTEN_FDS"), "{line}");
    assert_eq!(FileState::of(&env.file), FileState::Missing);
}

#[test]
fn socket_group_must_exist_and_needs_a_socket_path() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let line = refused_usage(&env, &["--socket-group", "no-such-group-vup"]);
    assert!(
        line.contains("\"no-such-group-vup\"") && line.contains("no such group"),
        "{line}"
    );
    let line = assert_usage_error(&run(&env.client_args(&["--socket-group", "root"])));
    assert!(
        line.contains("--socket-group applies only to --socket-path"),
        "{line}"
    );
    let l = std::os::unix::net::UnixListener::bind(env.path("l.sock")).unwrap();
    let args: Vec<String> = ["--fd", "3", "--socket-group", "root", "--file"]
        .iter()
        .map(|s| s.to_string())
        .chain([env.file.display().to_string()])
        .collect();
    let line = assert_usage_error(&run_with(&args, |c| pass_fds(c, vec![(l.as_raw_fd(), 3)])));
    assert!(
        line.contains("--socket-group applies only to --socket-path"),
        "{line}"
    );
}

#[test]
fn print_capabilities_needs_nothing_else_and_is_json() {
    let o = run(&["--print-capabilities".into()]);
    assert_eq!(o.code(), Some(0), "stderr: {}", o.stderr);
    assert_eq!(o.stderr, "");
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("JSON on stdout");
    assert_eq!(v["type"], "pmem");
    let features: Vec<&str> = v["features"]
        .as_array()
        .expect("features is a list")
        .iter()
        .map(|f| f.as_str().expect("features are strings"))
        .collect();
    for f in [
        "fd",
        "socket-activation",
        "sd-notify",
        "read-only",
        "connect",
        "flush-rate-limit",
    ] {
        assert!(features.contains(&f), "{features:?}");
    }
    assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
}

#[test]
fn a_socket_in_a_missing_directory_touches_no_file() {
    let env = Env::new();
    let socket = env.path("no-such-dir").join("pmem.sock");
    let args = |extra: &[&str]| {
        let mut v = vec![
            "--socket-path".to_string(),
            socket.display().to_string(),
            "--file".into(),
            env.file.display().to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // A missing image is not created...
    let line = assert_refused(&run(&args(&["--size", "2M"])), 1);
    assert!(line.contains("does not exist; create it first"), "{line}");
    assert_eq!(FileState::of(&env.file), FileState::Missing);
    // ...and an existing smaller one is not extended.
    env.create_file(2 * MIB);
    let before = FileState::of(&env.file);
    assert_refused(&run(&args(&["--size", "4M"])), 1);
    assert_eq!(FileState::of(&env.file), before);
    // A socket directory that is a file is found the same way.
    let socket = env.file.join("pmem.sock");
    let o = run(&[
        "--socket-path".into(),
        socket.display().to_string(),
        "--file".into(),
        env.file.display().to_string(),
        "--size".into(),
        "4M".into(),
    ]);
    let line = assert_refused(&o, 1);
    assert!(line.contains("is not a directory"), "{line}");
    assert_eq!(FileState::of(&env.file), before);
}

#[test]
fn snapshot_refuses_read_only_allocate_a_missing_image_and_a_file_system_without_reflink() {
    let env = Env::new();
    // No image: nothing to layer over, and nothing is created.
    let line = refused(&env, &["--snapshot"]);
    assert!(line.contains("needs an existing image"), "{line}");
    env.create_file(2 * MIB);
    let line = refused_usage(&env, &["--snapshot", "--read-only"]);
    assert!(line.contains("--read-only"), "{line}");
    let line = refused_usage(&env, &["--snapshot", "--allocate", "sparse"]);
    assert!(line.contains("--allocate"), "{line}");
    // Without reflink (ext4, tmpfs) the refusal names the file system; on xfs or btrfs the
    // daemon would serve instead (`vmrun shared-image` tests that on an xfs of its own).
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683e;
    // SAFETY: statfs is plain old data, written by statfs(2) on success.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let dir = std::ffi::CString::new(env.dir.path().as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and a writable struct, for the call only.
    assert_eq!(unsafe { libc::statfs(dir.as_ptr(), &mut st) }, 0);
    if [XFS, BTRFS].contains(&(st.f_type as i64)) {
        eprintln!("the temporary directory can reflink: the refusal is not exercised here");
        return;
    }
    let line = refused(&env, &["--snapshot"]);
    assert!(line.contains("makes no reflink copies"), "{line}");
    assert!(!line.contains("unknown type"), "{line}");
}
