//! The real filesystem, mounted by the real binary: passthrough behaviour, mmap, and that
//! the injected fsync failure reaches fdatasync, fsync, msync and directory fsync.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;

use faultfs::counts::FileCounts;
use faultfs::harness::{FaultFsMount, Launcher};
use faultfs::Mode;

fn mount() -> FaultFsMount {
    let launcher = Launcher::Binary(PathBuf::from(env!("CARGO_BIN_EXE_faultfs")));
    // Fails the test, never skips it: a machine that cannot mount FUSE cannot run these.
    FaultFsMount::start(&launcher).unwrap_or_else(|e| panic!("cannot mount faultfs: {e}"))
}

fn errno(r: io::Result<()>) -> Option<i32> {
    r.err().map(|e| e.raw_os_error().expect("an OS error"))
}

/// A shared writable mapping of a whole file, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(file: &File, len: usize) -> Mapping {
        // SAFETY: a fresh mapping at an address of the kernel's choice, aliasing nothing;
        // MAP_FAILED is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            io::Error::last_os_error()
        );
        Mapping {
            ptr: ptr.cast(),
            len,
        }
    }

    fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len);
        // SAFETY: the range is inside our live PROT_WRITE mapping (checked above).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) };
    }

    fn msync(&self) -> io::Result<()> {
        // SAFETY: `ptr`/`len` describe our live mapping.
        let r = unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping made in `new` and not unmapped since.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[test]
fn fdatasync_fails_only_while_injected() {
    let m = mount();
    let mut f = File::create(m.path("f")).unwrap();
    f.write_all(b"one").unwrap();
    f.sync_data().unwrap();

    m.set_mode(Mode::FailFsync).unwrap();
    f.write_all(b"two").unwrap();
    assert_eq!(errno(f.sync_data()), Some(libc::EIO), "fdatasync");
    assert_eq!(errno(f.sync_all()), Some(libc::EIO), "fsync");
    // The write itself went through: only the durability request failed.
    assert_eq!(std::fs::read(m.source().join("f")).unwrap(), b"onetwo");

    m.set_mode(Mode::Ok).unwrap();
    f.sync_data().unwrap();
    f.sync_all().unwrap();
    assert_eq!(
        m.fsyncs(),
        FileCounts {
            passed: 3,
            injected: 2,
            ..FileCounts::default()
        },
        "log:\n{}",
        m.log()
    );
}

#[test]
fn a_held_fdatasync_waits_for_the_release_and_then_follows_the_new_mode() {
    let m = mount();
    let f = File::create(m.path("f")).unwrap();
    for (release, want) in [(Mode::Ok, None), (Mode::FailFsync, Some(libc::EIO))] {
        m.set_mode(Mode::HoldFsync).unwrap();
        let g = f.try_clone().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || tx.send(errno(g.sync_data())).unwrap());
        let held = std::time::Duration::from_millis(300);
        assert!(
            rx.recv_timeout(held).is_err(),
            "fdatasync returned while held"
        );
        assert!(
            m.fsyncs().held >= 1,
            "no held fsync counted; log:\n{}",
            m.log()
        );
        m.set_mode(release).unwrap();
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("fdatasync still held after the release");
        assert_eq!(got, want, "fdatasync released to {release}");
        t.join().unwrap();
    }
    m.set_mode(Mode::Ok).unwrap();
}

#[test]
fn mmap_shared_writes_and_the_injected_failure() {
    const LEN: usize = 1 << 20;
    let m = mount();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("img"))
        .unwrap();
    file.set_len(LEN as u64).unwrap();
    let map = Mapping::new(&file, LEN);

    map.write(0, b"first");
    file.sync_data().unwrap();
    let mut src = vec![0u8; 5];
    File::open(m.source().join("img"))
        .unwrap()
        .read_exact_at(&mut src, 0)
        .unwrap();
    assert_eq!(
        src, b"first",
        "fdatasync pushed the dirty page to the source"
    );

    m.set_mode(Mode::FailFsync).unwrap();
    map.write(8192, b"second");
    assert_eq!(errno(file.sync_data()), Some(libc::EIO), "fdatasync");
    map.write(16384, b"third");
    assert_eq!(errno(map.msync()), Some(libc::EIO), "msync(MS_SYNC)");

    // Lifting the fault makes the next fdatasync succeed: the kernel already wrote the
    // pages back and has nothing left to report. This is why a caller must remember the
    // failure itself.
    m.set_mode(Mode::Ok).unwrap();
    file.sync_data().unwrap();
    map.msync().unwrap();
    let data = std::fs::read(m.source().join("img")).unwrap();
    assert_eq!(data.len(), LEN);
    assert_eq!(&data[8192..8198], b"second");
    assert_eq!(&data[16384..16389], b"third");
}

#[test]
fn directory_fsync_fails_on_command() {
    let m = mount();
    std::fs::create_dir(m.path("d")).unwrap();
    let dir = File::open(m.path("d")).unwrap();
    dir.sync_all().unwrap();
    m.set_mode(Mode::FailFsync).unwrap();
    assert_eq!(errno(dir.sync_all()), Some(libc::EIO));
    m.set_mode(Mode::Ok).unwrap();
    dir.sync_all().unwrap();
}

#[test]
fn write_only_opens_can_fill_partial_pages() {
    // With the writeback cache the kernel reads the rest of a partly written page through
    // the write-only handle; a source file opened write-only would fail that read.
    let m = mount();
    std::fs::write(m.source().join("w"), vec![b'a'; 10_000]).unwrap();
    let f = OpenOptions::new().write(true).open(m.path("w")).unwrap();
    f.write_all_at(b"XYZ", 5000).unwrap();
    f.sync_all().unwrap();
    let data = std::fs::read(m.source().join("w")).unwrap();
    assert_eq!(data.len(), 10_000);
    assert_eq!(&data[4998..5005], b"aaXYZaa");
}

#[test]
fn passthrough_basics() {
    let m = mount();
    std::fs::create_dir(m.path("dir")).unwrap();
    std::fs::write(m.path("dir/a"), b"hello world").unwrap();
    assert_eq!(
        std::fs::read(m.source().join("dir/a")).unwrap(),
        b"hello world"
    );
    // Changes made to the source behind the mount's back show through.
    std::fs::write(m.source().join("dir/b"), b"from below").unwrap();
    assert_eq!(std::fs::read(m.path("dir/b")).unwrap(), b"from below");

    let mut names: Vec<String> = std::fs::read_dir(m.path("dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b"]);

    // Truncate, extend, seek and read.
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("dir/a"))
        .unwrap();
    f.set_len(5).unwrap();
    f.set_len(8).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 8);
    let mut buf = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut buf).unwrap();
    assert_eq!(buf, b"hello\0\0\0");
    drop(f);
    assert_eq!(
        std::fs::metadata(m.source().join("dir/a")).unwrap().len(),
        8
    );

    // fallocate reaches the source.
    let f = OpenOptions::new()
        .write(true)
        .open(m.path("dir/a"))
        .unwrap();
    // SAFETY: fallocate on a descriptor we own, with integer arguments only.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 1 << 16) };
    assert_eq!(r, 0, "fallocate: {}", io::Error::last_os_error());
    drop(f);
    assert_eq!(std::fs::metadata(m.path("dir/a")).unwrap().len(), 1 << 16);

    std::fs::rename(m.path("dir/a"), m.path("dir/c")).unwrap();
    assert!(!m.source().join("dir/a").exists());
    assert_eq!(std::fs::metadata(m.path("dir/c")).unwrap().len(), 1 << 16);
    std::fs::remove_file(m.path("dir/c")).unwrap();
    std::fs::remove_file(m.path("dir/b")).unwrap();
    std::fs::remove_dir(m.path("dir")).unwrap();
    assert!(!m.source().join("dir").exists());

    // Exclusive creation and permissions.
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(m.path("x"))
        .unwrap();
    let err = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.path("x"))
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(m.source().join("x"))
        .unwrap()
        .permissions()
        .mode();
    // Both umasks (ours, applied by the kernel, and the server's) may only take bits away.
    assert_eq!(mode & 0o777 & !0o640, 0, "{mode:o}");
    assert_eq!(mode & 0o600, 0o600, "{mode:o}");
}

#[test]
fn sigterm_unmounts() {
    let mut m = mount();
    assert!(m.is_mounted());
    let status = m.stop().expect("exit status");
    assert!(status.success(), "{status}; log:\n{}", m.log());
    assert!(!m.is_mounted());
}

#[test]
fn exits_with_an_error_when_the_source_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_faultfs"))
        .args(["--source", "/nonexistent/faultfs-source", "--mountpoint"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("faultfs: error: source"), "{stderr}");
}
