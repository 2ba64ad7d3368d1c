//! Flush errors from a real filesystem layer: the backing file lives on faultfs, a FUSE
//! passthrough whose fsync fails with EIO on command, and the real daemon serves it.
//!
//! What is checked: a failed fdatasync answers the flush with -1 and is logged at error
//! level; every later flush is refused without another fdatasync, even once the filesystem
//! works again (the kernel may have dropped the dirty pages, so a later success proves
//! nothing); the daemon keeps serving meanwhile; and only a restart clears the state. All of
//! it in every flush mode.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{pattern, Daemon, MIB, TIMEOUT};
use faultfs::counts::FileCounts;
use faultfs::harness::{run_if_child, FaultFsMount, Launcher};
use faultfs::Mode;

use pmem_frontend::{Frontend, ShmemMapping};

/// See [`faultfs_server_process`].
const SERVER_ENTRY: &str = "faultfs_server_process";

/// Not a test: the entry point of the faultfs server processes the tests below start, by
/// running this binary again with only this test selected (see `faultfs::harness`). Run
/// normally, it returns at once.
#[test]
fn faultfs_server_process() {
    run_if_child();
}

/// A faultfs mount over a fresh directory. Panics (the test fails, it is never skipped) if
/// FUSE cannot be mounted.
fn mount() -> FaultFsMount {
    let launcher = Launcher::test_child(SERVER_ENTRY).expect("path of the test binary");
    FaultFsMount::start(&launcher).unwrap_or_else(|e| panic!("cannot mount faultfs: {e}"))
}

/// The daemon's socket and log live outside the FUSE mount; only the image is on it.
struct Scratch {
    dir: tempfile::TempDir,
    image: PathBuf,
}

impl Scratch {
    fn new(fs: &FaultFsMount) -> Self {
        Scratch {
            dir: tempfile::tempdir().expect("tempdir"),
            image: fs.path("pmem.img"),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("pmem.sock")
    }

    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut v = vec![
            "--socket-path".to_string(),
            self.socket().display().to_string(),
            "--file".to_string(),
            self.image.display().to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    /// Starts a daemon; `log` names its log file, so that each run keeps its own.
    fn start(&self, extra: &[&str], log: &str) -> Daemon {
        Daemon::start(
            &self.args(extra),
            &self.socket(),
            &self.dir.path().join(log),
        )
    }
}

/// A daemon in flush mode `mode` serving an image on faultfs, and a started frontend whose
/// first flush passed.
struct Running {
    fs: FaultFsMount,
    _scratch: Scratch,
    d: Daemon,
    fe: Frontend,
    map: Arc<ShmemMapping>,
}

fn running(mode: &str) -> Running {
    let fs = mount();
    let scratch = Scratch::new(&fs);
    let d = scratch.start(&["--size", "2M", "--flush-mode", mode], "daemon.log");
    let mut fe: Frontend = d.connect();
    let map = fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
    Running {
        fs,
        _scratch: scratch,
        d,
        fe,
        map,
    }
}

/// Lines of `log` at error level that contain `needle`.
fn error_lines<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.contains(" ERROR ") && l.contains(needle))
        .collect()
}

/// Bytes of `path` at `offset`, read from the source directory under the mount, so that
/// neither FUSE nor its page cache is involved.
fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

#[test]
fn faultfs_makes_fdatasync_fail_on_command() {
    // The precondition of everything below, checked on this binary's own server.
    let fs = mount();
    let mut f = std::fs::File::create(fs.path("plain")).unwrap();
    std::io::Write::write_all(&mut f, b"data").unwrap();
    f.sync_data().unwrap();
    fs.set_mode(Mode::FailFsync).unwrap();
    let err = f.sync_data().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    fs.set_mode(Mode::Ok).unwrap();
    f.sync_data().unwrap();
    assert_eq!(
        fs.fsyncs(),
        FileCounts {
            passed: 2,
            injected: 1,
            ..FileCounts::default()
        }
    );
}

#[test]
fn flush_failure_is_sticky_until_restart_group() {
    flush_failure_is_sticky_until_restart("group");
}

#[test]
fn flush_failure_is_sticky_until_restart_serial() {
    flush_failure_is_sticky_until_restart("serial");
}

#[test]
fn flush_failure_is_sticky_until_restart_parallel() {
    flush_failure_is_sticky_until_restart("parallel");
}

fn flush_failure_is_sticky_until_restart(mode: &str) {
    // Drop order (reverse of declaration): frontends, daemons, scratch, then the mount.
    let fs = mount();
    let scratch = Scratch::new(&fs);
    let source_image = fs.source().join("pmem.img");
    let first = pattern(4096, 1);

    let mut d = scratch.start(&["--size", "4M", "--flush-mode", mode], "daemon1.log");
    let mut fe = d.connect();
    let map = fe.start().unwrap();

    map.write(0, &first).unwrap();
    assert_eq!(fe.flush().unwrap(), 0, "flush on a healthy filesystem");
    assert_eq!(
        read_at(&source_image, 0, first.len()),
        first,
        "a successful flush must have pushed the page below FUSE"
    );

    fs.set_mode(Mode::FailFsync).unwrap();
    let before = fs.fsyncs();
    map.write(4096, &pattern(4096, 2)).unwrap();
    assert_eq!(fe.flush().unwrap(), -1, "flush while fdatasync fails");
    assert_eq!(
        fs.fsyncs().injected,
        before.injected + 1,
        "the -1 must come from the injected fault; faultfs log:\n{}",
        fs.log()
    );
    let log = d.log();
    let latched = error_lines(&log, "until the daemon is restarted");
    assert_eq!(
        latched.len(),
        1,
        "one error line about the latch; log:\n{log}"
    );
    assert!(
        latched[0].contains("Input/output error"),
        "the line should name the cause: {}",
        latched[0]
    );

    // The filesystem works again, but the daemon must not believe it.
    fs.set_mode(Mode::Ok).unwrap();
    let after_failure = fs.fsyncs();
    map.write(8192, &pattern(4096, 3)).unwrap();
    assert_eq!(fe.flush().unwrap(), -1, "flush after the fault was lifted");
    assert_eq!(
        fs.fsyncs(),
        after_failure,
        "a refused flush must not even try fdatasync"
    );
    let refused = error_lines(&d.log(), "with an error").len();
    assert!(
        refused >= 2,
        "the refusal after recovery must be logged at error level too; log:\n{}",
        d.log()
    );

    // Still serving: more flushes, an unknown request, config space, a device restart,
    // and a new connection all get answers, and flushes stay refused throughout.
    for _ in 0..5 {
        assert_eq!(fe.flush().unwrap(), -1);
    }
    assert_eq!(fe.request(7).unwrap().status, -1, "unknown request type");
    assert_eq!(fe.get_config().unwrap().len(), 16);
    fe.stop().unwrap();
    fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), -1, "after a device stop and start");
    drop(fe);
    let mut fe = d.connect();
    fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), -1, "on a new connection");
    assert!(
        d.is_running(),
        "the daemon must not exit over a flush error"
    );
    assert_eq!(fs.fsyncs(), after_failure, "no fdatasync since the failure");
    // The mapping holds a duplicate of the daemon's descriptor, and with it the daemon's
    // flock: like QEMU, the frontend must let go before another daemon may open the file.
    drop((fe, map));
    drop(d);

    // A restarted daemon starts from a clean slate on the same file.
    let d = scratch.start(&["--flush-mode", mode], "daemon2.log");
    let mut fe = d.connect();
    let map = fe.start().unwrap();
    let mut got = vec![0u8; first.len()];
    map.read(0, &mut got).unwrap();
    assert_eq!(got, first, "the data acked before the failure");
    map.write(12288, &pattern(4096, 4)).unwrap();
    assert_eq!(fe.flush().unwrap(), 0, "flush after a restart");
    assert_eq!(fs.fsyncs().passed, after_failure.passed + 1);
    assert_eq!(read_at(&source_image, 12288, 4096), pattern(4096, 4));
    assert!(error_lines(&d.log(), "").is_empty(), "log:\n{}", d.log());
}

#[test]
fn every_flush_in_flight_gets_the_error_group() {
    every_flush_in_flight_gets_the_error("group");
}

#[test]
fn every_flush_in_flight_gets_the_error_serial() {
    every_flush_in_flight_gets_the_error("serial");
}

#[test]
fn every_flush_in_flight_gets_the_error_parallel() {
    every_flush_in_flight_gets_the_error("parallel");
}

fn every_flush_in_flight_gets_the_error(mode: &str) {
    const N: usize = 16;
    let Running {
        fs,
        _scratch,
        d,
        mut fe,
        map,
    } = running(mode);

    fs.set_mode(Mode::FailFsync).unwrap();
    let passed_before = fs.fsyncs().passed;
    map.write(0, &pattern(MIB as usize, 5)).unwrap();
    // All at once, like a guest with many fsyncs in flight: the ones that share the failed
    // fdatasync and the ones refused after it must all read -1.
    let heads: Vec<u16> = (0..N).map(|_| fe.submit_request(0).unwrap()).collect();
    let mut done = Vec::new();
    for _ in 0..N {
        let used = fe.wait_used(TIMEOUT).unwrap();
        assert_eq!(used.len, 4, "used len");
        done.push(used.id as u16);
    }
    done.sort_unstable();
    let mut expected = heads.clone();
    expected.sort_unstable();
    assert_eq!(done, expected, "every request completed once");
    for h in heads {
        assert_eq!(fe.request_status(h).unwrap(), -1, "request {h}");
    }
    let injected = fs.fsyncs().injected;
    if mode == "parallel" {
        // The requests' fdatasyncs run at once, so several may reach the filesystem before the
        // first failure is latched; each of them fails, and none gets past it.
        assert!(
            (1..=N).contains(&injected),
            "{injected} injected failures for {N} requests"
        );
    } else {
        assert_eq!(injected, 1, "one fdatasync failed, the rest were refused");
    }
    assert_eq!(
        fs.fsyncs().passed,
        passed_before,
        "no fdatasync passed once the fault was on"
    );
    assert!(d.log().contains("until the daemon is restarted"));
    assert_eq!(
        d.log().matches("until the daemon is restarted").count(),
        1,
        "the latch is logged once, however many fdatasyncs failed"
    );
}

#[test]
fn refuses_to_start_on_a_new_image_it_cannot_sync() {
    let fs = mount();
    let scratch = Scratch::new(&fs);
    fs.set_mode(Mode::FailFsync).unwrap();
    let out = common::run(&scratch.args(&["--size", "2M"]));
    let line = common::assert_error(&out);
    assert!(
        line.contains("Input/output error"),
        "the error should name the failed sync: {line}"
    );
    assert!(
        !scratch.socket().exists(),
        "nothing may listen for a device that is not ready"
    );
}

/// A frontend that goes away while the fdatasync answering its flush is still running: the
/// daemon must finish that fdatasync, drop the answer with the connection, and serve the next
/// frontend with working flushes. faultfs holds the fdatasync, so the disconnect certainly
/// lands inside it (not before the pop or after the answer).
fn disconnect_during_fdatasync(mode: &str) {
    let Running {
        fs,
        _scratch,
        d,
        mut fe,
        map,
    } = running(mode);

    fs.set_mode(Mode::HoldFsync).unwrap();
    map.write(0, &pattern(64 << 10, 9)).unwrap();
    fe.submit_request(0).unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !fs.log().contains("): held") {
        assert!(
            std::time::Instant::now() < deadline,
            "the flush's fdatasync never reached faultfs"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // `map` stays alive until the hold ends: closing its descriptor sends FUSE a FLUSH, which
    // would wait behind the held fsync in faultfs's single session thread.
    fe.disconnect();
    // The daemon notices the hang-up while its fdatasync is still held.
    d.wait_log("frontend disconnected", 1);
    fs.set_mode(Mode::Ok).unwrap();
    drop(map);

    let mut fe: Frontend = d.connect();
    let map = fe.start().unwrap();
    map.write(0, &pattern(64 << 10, 10)).unwrap();
    assert_eq!(fe.flush().unwrap(), 0, "flush on the next connection");
    assert!(
        fs.log().contains("): released (ok)"),
        "the held fdatasync was released"
    );
    let log = d.log();
    assert!(
        !log.contains(" ERROR "),
        "the daemon logged an error:\n{log}"
    );
    fe.disconnect();
}

#[test]
fn disconnect_during_fdatasync_group() {
    disconnect_during_fdatasync("group");
}

#[test]
fn disconnect_during_fdatasync_serial() {
    disconnect_during_fdatasync("serial");
}

#[test]
fn disconnect_during_fdatasync_parallel() {
    disconnect_during_fdatasync("parallel");
}
