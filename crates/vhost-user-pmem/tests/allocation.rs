//! `--allocate` on a real, small file system: a tmpfs of a few MiB mounted by the test (root
//! only; without root each test says so and returns). With `full` a device the file system
//! cannot hold is refused before anything changes; with `sparse` the holes are reported
//! against the free space, at start and in the metrics.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use common::{allocated_bytes, assert_refused, assert_usage_error, run, Env, FileState, MIB};

/// A tmpfs of `size` bytes on a private directory, unmounted when dropped.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: u64) -> Option<SmallFs> {
        // SAFETY: geteuid(2) has no failure mode and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        if !st.success() {
            eprintln!("skipped: mount -t tmpfs failed ({st})");
            return None;
        }
        Some(SmallFs { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// An environment whose socket, logs and metrics are on the usual temporary directory and
/// whose image is on `fs`.
fn env_on(fs: &SmallFs) -> Env {
    let mut env = Env::new();
    env.file = fs.path("pmem.img");
    env
}

fn refused_leaving(env: &Env, extra: &[&str], file: &Path) -> String {
    let before = FileState::of(file);
    let o = run(&env.args(extra));
    let line = assert_refused(&o, 1);
    assert_eq!(FileState::of(file), before, "{extra:?} changed the file");
    assert!(!env.socket.exists(), "{extra:?} left a socket");
    line
}

#[test]
fn full_refuses_a_device_the_file_system_cannot_hold_and_touches_nothing() {
    let Some(fs) = SmallFs::mount(8 * MIB) else {
        return;
    };
    let env = env_on(&fs);
    let line = refused_leaving(&env, &["--size", "16M"], &env.file);
    for word in [
        "needs 16 MiB more",
        "free",
        "smaller --size",
        "--allocate sparse",
    ] {
        assert!(line.contains(word), "no {word:?} in: {line}");
    }
    // An existing image that would have to grow: its length and bytes stay as they were.
    let data = env.create_file(2 * MIB);
    refused_leaving(&env, &["--size", "16M"], &env.file);
    assert_eq!(std::fs::read(&env.file).unwrap(), data);
}

#[test]
fn full_allocates_every_block_and_the_metrics_say_no_holes() {
    let Some(fs) = SmallFs::mount(8 * MIB) else {
        return;
    };
    let env = env_on(&fs);
    let mut d = env.start_with_metrics(&["--size", "4M"]);
    assert_eq!(allocated_bytes(&env.file), 4 * MIB);
    let m = d.report(&env.metrics_path());
    let b = m.backing.expect("backing space measured");
    assert_eq!(b.allocation, "full");
    assert_eq!(b.size_bytes, 4 * MIB);
    assert_eq!(b.unallocated_bytes, 0);
    assert!(b.fs_free_bytes <= 4 * MIB, "8 MiB tmpfs minus 4 MiB: {b:?}");
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    assert!(d.log().contains("allocated every block"), "{}", d.log());
}

#[test]
fn sparse_warns_and_the_metrics_follow_the_holes() {
    let Some(fs) = SmallFs::mount(8 * MIB) else {
        return;
    };
    let env = env_on(&fs);
    let mut d = env.start_with_metrics(&["--size", "16M", "--allocate", "sparse"]);
    let log = d.log();
    assert!(
        log.contains("WARN") && log.contains("16 MiB of the 16 MiB device may need new blocks"),
        "{log}"
    );
    let m = d.report(&env.metrics_path());
    let b = m.backing.expect("backing space measured");
    assert_eq!(b.allocation, "sparse");
    assert_eq!(b.unallocated_bytes, 16 * MIB);
    assert!(
        b.fs_free_bytes > 7 * MIB && b.fs_free_bytes <= 8 * MIB,
        "{b:?}"
    );
    // What a guest store does to a hole, done from here; then a flush, after which the daemon
    // measures again (at most once a second, never on the metrics writer's thread).
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&env.file)
        .unwrap();
    f.seek(SeekFrom::Start(4 * MIB)).unwrap();
    f.write_all(&vec![1u8; MIB as usize]).unwrap();
    let m = d.report(&env.metrics_path());
    assert_eq!(
        m.backing.unwrap().unallocated_bytes,
        16 * MIB,
        "measured again without a flush"
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let mut fe = d.connect();
    fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
    let m = d.report(&env.metrics_path());
    let after = m.backing.unwrap();
    assert_eq!(after.unallocated_bytes, 15 * MIB, "{after:?}");
    assert!(after.fs_free_bytes < b.fs_free_bytes, "{after:?}");
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
}

#[test]
fn allocate_is_refused_with_read_only_and_for_unknown_policies() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let line = assert_usage_error(&run(&env.args(&["--read-only", "--allocate", "full"])));
    assert!(line.contains("--read-only"), "{line}");
    let o = run(&env.args(&["--allocate", "half"]));
    assert_eq!(o.code(), Some(2), "{}", o.stderr);
    assert!(o.stderr.contains("full") && o.stderr.contains("sparse"));
}
