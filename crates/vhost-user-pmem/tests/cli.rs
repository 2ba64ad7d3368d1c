//! The command line: every refused argument, file creation and extension, --help and
//! --version.

mod common;

use common::{allocated_bytes, assert_error, run, Env, FileState, MIB};

/// Runs with `extra` after the usual socket and file arguments and checks the refusal:
/// exit 1, one error line, the file and socket untouched. Returns the error line.
fn refused(env: &Env, extra: &[&str]) -> String {
    let before = FileState::of(&env.file);
    let o = run(&env.args(extra));
    let line = assert_error(&o);
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
        "--flush-mode",
        "--metrics-path",
        "--metrics-interval",
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
fn metrics_arguments_are_checked_before_anything_is_touched() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let line = refused(&env, &["--metrics-interval", "5"]);
    assert!(line.contains("--metrics-path"), "{line}");
    // clap itself refuses an empty value.
    assert_eq!(run(&env.args(&["--metrics-path", ""])).code(), Some(2));
    let missing_dir = env.path("no-such-dir").join("m.json");
    let line = refused(
        &env,
        &["--metrics-path", &missing_dir.display().to_string()],
    );
    assert!(line.contains("m.json"), "{line}");
    let line = refused(
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
    let line = refused(&env, &["--size", "3G"]);
    assert!(
        line.contains("2 GiB") && line.contains("4 GiB"),
        "message does not name 2 GiB and 4 GiB: {line}"
    );
    let line = refused(&env, &["--size", "6M"]);
    assert!(
        line.contains("4 MiB") && line.contains("8 MiB"),
        "message does not name 4 MiB and 8 MiB: {line}"
    );
    // Same for an existing file.
    env.create_file(2 * MIB);
    let line = refused(&env, &["--size", "3M"]);
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
    refused(&env, &["--size", "1M"]);
    refused(&env, &["--size", "4096"]);
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
fn size_creates_a_missing_file_sparse() {
    let env = Env::new();
    let mut d = env.start(&["--size", "1G"]);
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
