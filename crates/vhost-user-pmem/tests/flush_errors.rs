//! Flush errors from a real filesystem layer: the backing file lives on faultfs, a FUSE
//! passthrough whose fsync fails with EIO on command, and the real daemon serves it.
//!
//! What is checked: a failed fdatasync answers the flush with -1 and is logged at error
//! level (counted in the metrics' `log_errors`); every later flush is refused without another fdatasync, even once the filesystem
//! works again (the kernel may have dropped the dirty pages, so a later success proves
//! nothing); the daemon keeps serving meanwhile; and only a restart clears the state. All of
//! it in every flush mode.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{pattern, read_metrics, Daemon, MIB, TIMEOUT};
use faultfs::counts::FileCounts;
use faultfs::harness::{run_if_child, FaultFsMount, Launcher};
use faultfs::Mode;
use pmem_metrics::Metrics;

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

    /// The metrics file of the daemons [`Self::start`] starts.
    fn metrics_path(&self) -> PathBuf {
        self.dir.path().join("metrics.json")
    }

    /// Starts a daemon that writes its metrics (at start, on SIGUSR1, at exit) to
    /// [`Self::metrics_path`]; `log` names its log file, so that each run keeps its own.
    fn start(&self, extra: &[&str], log: &str) -> Daemon {
        let mut args = self.args(extra);
        args.extend([
            "--metrics-path".to_string(),
            self.metrics_path().display().to_string(),
            "--metrics-interval".to_string(),
            "0".to_string(),
        ]);
        Daemon::start(&args, &self.socket(), &self.dir.path().join(log))
    }

    /// A fresh report from the running daemon.
    fn report(&self, d: &Daemon) -> Metrics {
        d.report(&self.metrics_path())
    }
}

/// A daemon in flush mode `mode` serving an image on faultfs, and a started frontend whose
/// first flush passed.
struct Running {
    fs: FaultFsMount,
    scratch: Scratch,
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
        scratch,
        d,
        fe,
        map,
    }
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
    let m = scratch.report(&d);
    let failure = m.flush_failure.clone().expect("the failure is latched");
    assert!(
        failure.contains("Input/output error"),
        "the failure should name the cause: {failure}"
    );
    // The latch, and the refused flush (rate-limited, but the first one always passes).
    assert_eq!(m.counters.log_errors, 2, "log:\n{}", d.log());
    assert_eq!(m.counters.errors, 1);

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
    let m = scratch.report(&d);
    assert_eq!(
        m.counters.log_errors,
        3,
        "the refusal after recovery must be logged at error level too; log:\n{}",
        d.log()
    );
    assert_eq!(m.counters.errors, 2);

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
    let first_run = read_metrics(&scratch.metrics_path()).expect("the last report");
    assert!(first_run.flush_failure.is_some());
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
    let m = scratch.report(&d);
    assert_eq!(m.flush_failure, None, "a restart starts from a clean slate");
    assert_eq!(m.counters.log_errors, 0, "log:\n{}", d.log());
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
        scratch,
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
            (1..=N as u64).contains(&injected),
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
    let m = scratch.report(&d);
    assert!(m.flush_failure.is_some(), "{m:?}");
    assert_eq!(m.counters.errors, N as u64);
    assert_eq!(m.connection.map(|c| c.errors), Some(N as u64));
    // The latch once, however many fdatasyncs failed, and the refusals: at least one line,
    // at most the rate limit's three per 10 s.
    assert!(
        (2..=4).contains(&m.counters.log_errors),
        "{} error records; log:\n{}",
        m.counters.log_errors,
        d.log()
    );
    if mode != "parallel" {
        assert!(m.largest_batch >= 1);
    }
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
/// Ends faultfs's hold on fsync when dropped.
struct ReleaseOnDrop<'a>(&'a FaultFsMount);

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.set_mode(Mode::Ok) {
            eprintln!("cannot release the held fsync: {e}");
        }
    }
}

fn disconnect_during_fdatasync(mode: &str) {
    let Running {
        fs,
        scratch,
        d,
        mut fe,
        map,
    } = running(mode);

    fs.set_mode(Mode::HoldFsync).unwrap();
    // Dropped before `map` if an assertion below fails: unwinding would otherwise close the
    // mapping's descriptor while the fsync is held and hang instead of reporting the failure.
    let hold = ReleaseOnDrop(&fs);
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
    // Not a fixed number: a readiness probe that timed out under load was a connection too.
    let first = scratch.report(&d).counters.connections;
    // `map` stays alive until the hold ends: closing its descriptor sends FUSE a FLUSH, which
    // would wait behind the held fsync in faultfs's single session thread.
    fe.disconnect();
    // The daemon notices the hang-up while its fdatasync is still held: it accepts the next
    // frontend, with the flush still in flight.
    let mut fe: Frontend = d.connect();
    let next = first + 1;
    // The daemon counts a connection once its accept returns, which can be after the
    // frontend's first messages were answered.
    let m = d.report_until(&scratch.metrics_path(), |m| m.counters.connections == next);
    assert_eq!(m.in_flight, 1, "the held flush is still in flight: {m:?}");
    drop(hold);
    drop(map);

    let map = fe.start().unwrap();
    map.write(0, &pattern(64 << 10, 10)).unwrap();
    assert_eq!(fe.flush().unwrap(), 0, "flush on the next connection");
    assert!(
        fs.log().contains("): released (ok)"),
        "the held fdatasync was released"
    );
    let m = scratch.report(&d);
    assert_eq!(m.counters.log_errors, 0, "log:\n{}", d.log());
    assert_eq!(m.connection.map(|c| (c.id, c.requests)), Some((next, 1)));
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
