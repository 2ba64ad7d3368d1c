//! Fuzz bytes as vhost-user frontend messages, sent over a real UNIX socket to the daemon's own
//! `PmemBackend` behind vhost-user-backend's request handler, in this process.
//!
//! One input is one frontend connection:
//! - byte 0 chooses whether the connection first sets the device up the way QEMU does (features,
//!   a memory table of this harness's guest RAM, queue 0 with its rings, kick, call, enable), so
//!   that the fuzzed messages that follow meet a running queue; and whether EVENT_IDX is on;
//! - the rest is a sequence of operations: a message (any request code, any flags, a payload,
//!   a size field that may lie, one of several kinds of fd attached), a write of bytes into the
//!   guest RAM (rings and buffers), or a kick;
//! - then the harness closes its sending side, as a frontend that goes away does.
//!
//! Findings are crashes (panics abort; SIGBUS and friends are signals), and two hangs the harness
//! turns into aborts: the connection not ending after the frontend has gone, and the daemon not
//! finishing the connection (its vring thread not stopping) so that it can never take the next.
//!
//! The serving loop below is `vhost_user_pmem::serve`'s, in a form that can be watched from
//! the fuzzer thread. A connection that leaks fds shows too: the process runs out of them after
//! its fd limit's worth of inputs, and the next connection fails.

#![no_main]

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vhost_user_pmem::backend::PmemBackend;
use vhost_user_pmem::backing::Access;
use vhost_user_pmem::config::{Config, Endpoint};
use vhost_user_pmem::device::Device;
use vhost_user_pmem::modes::{Allocation, FlushMode, SeccompMode};
use vhost_user_pmem::Frontends;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Guest RAM the scaffold's memory table describes: 1 MiB at guest address 0.
const RAM_LEN: u64 = 1 << 20;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
/// Guest writes of the fuzz input land in [0, WRITABLE): rings and some buffers.
const WRITABLE: u64 = 0x8000;
/// A memfd deliberately shorter than any region that uses it.
const SHORT_FD_LEN: u64 = 4096;
/// Longest wait for the daemon to end a connection, or to be ready for the next.
const HANG: Duration = Duration::from_secs(5);

const VERSION_1: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;
const REPLY: u32 = 0x4;

/// `vhost_user_pmem::serve`, one connection after another, telling the fuzzer thread each
/// time a connection has been completely torn down.
fn serve(device: Arc<Device>, mut listener: Listener, done: mpsc::Sender<()>) {
    let mut conn_id = 0u64;
    loop {
        conn_id += 1;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = PmemBackend::new(device.clone(), conn_id, mem.clone()).expect("backend");
        let mut daemon =
            VhostUserDaemon::new("fuzz".into(), backend.clone(), mem).expect("vhost-user daemon");
        daemon.start(&mut listener).expect("accept");
        let _ = daemon.wait();
        backend.signal_exit();
        // Joins the vring thread: a thread that does not stop hangs here, which the fuzzer
        // thread notices. Dropping the backend last releases the connection's fds.
        drop(daemon);
        drop(backend);
        let _ = done.send(());
    }
}

struct Harness {
    socket: PathBuf,
    done: Mutex<Receiver<()>>,
    ram: GuestMemoryMmap<()>,
    ram_fd: RawFd,
    short_fd: File,
    devnull: File,
    /// Keeps the scratch directory (socket, image) until the process ends.
    _dir: PathBuf,
}

fn memfd(len: u64) -> File {
    let name = CString::new("vhost-messages-fuzz").unwrap();
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no other preconditions.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: the fd was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        // Every connection needs a few fds for a moment; use all the process may have.
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit with a valid, exclusively borrowed rlimit.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
        // fdatasync of a tmpfs file is cheap, which keeps the fuzzer fast.
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("vhost-messages-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = Config {
            endpoint: Endpoint::Listen {
                path: dir.join("pmem.sock"),
                mode: 0o600,
                group: None,
            },
            file: dir.join("pmem.img"),
            size: Some(2 << 20),
            access: Access::ReadWrite(Allocation::Full),
            flush_mode: FlushMode::Group,
            flush_rate_limit: None,
            poll: Duration::ZERO,
            metrics: None,
            // The fuzzer runs the backend inside its own process, which needs far more
            // calls than the daemon's allow-list.
            seccomp: SeccompMode::Off,
            notify: None,
            notes: Vec::new(),
        };
        let (device, frontends) = vhost_user_pmem::prepare(&config).expect("prepare the device");
        let Frontends::Listen(listener) = frontends else {
            panic!("a listening endpoint gave a client connection");
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || serve(device, listener, tx));

        let ram_file = memfd(RAM_LEN);
        let ram_fd = ram_file.as_raw_fd();
        let ram = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            RAM_LEN as usize,
            Some(FileOffset::new(ram_file, 0)),
        )])
        .unwrap();
        Harness {
            socket: dir.join("pmem.sock"),
            done: Mutex::new(rx),
            ram,
            ram_fd,
            short_fd: memfd(SHORT_FD_LEN),
            devnull: File::open("/dev/null").unwrap(),
            _dir: dir,
        }
    })
}

/// Reads the input front to back; running out of bytes reads zeros.
struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    fn u8(&mut self) -> u8 {
        let (b, rest) = self
            .data
            .split_first()
            .map_or((0, &[][..]), |(b, r)| (*b, r));
        self.data = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (b, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        b
    }
}

struct Conn {
    sock: UnixStream,
    kick: EventFd,
    call: EventFd,
}

impl Conn {
    fn send(&self, code: u32, flags: u32, size: u32, payload: &[u8], fds: &[RawFd]) -> bool {
        let mut msg = Vec::with_capacity(12 + payload.len());
        msg.extend_from_slice(&code.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&size.to_ne_bytes());
        msg.extend_from_slice(payload);
        if fds.is_empty() {
            (&self.sock).write_all(&msg).is_ok()
        } else {
            self.sock.send_with_fds(&[&msg[..]], fds).is_ok()
        }
    }

    /// Reads whatever replies are there without waiting (the fuzzed stream does not need them,
    /// but a full socket buffer would block the daemon's replies).
    fn drain(&self) {
        let _ = self.sock.set_nonblocking(true);
        let mut buf = [0u8; 4096];
        while matches!((&self.sock).read(&mut buf), Ok(n) if n > 0) {}
        let _ = self.sock.set_nonblocking(false);
    }

    /// A request of the scaffold, answered (ack or reply) before the next is sent.
    fn setup(&self, code: u32, payload: &[u8], fds: &[RawFd]) -> bool {
        self.roundtrip(code, VERSION_1 | NEED_REPLY, payload, fds)
    }

    /// A request with a reply of its own (GET_*).
    fn get(&self, code: u32) -> bool {
        self.roundtrip(code, VERSION_1, &[], &[])
    }

    fn roundtrip(&self, code: u32, flags: u32, payload: &[u8], fds: &[RawFd]) -> bool {
        if !self.send(code, flags, payload.len() as u32, payload, fds) {
            return false;
        }
        let mut hdr = [0u8; 12];
        if (&self.sock).read_exact(&mut hdr).is_err() {
            return false;
        }
        let size = u32::from_ne_bytes(hdr[8..12].try_into().unwrap()) as usize;
        let mut body = vec![0u8; size];
        (&self.sock).read_exact(&mut body).is_ok()
    }
}

fn u64p(v: u64) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

fn state(index: u32, num: u32) -> Vec<u8> {
    [index.to_ne_bytes(), num.to_ne_bytes()].concat()
}

/// What QEMU sends to start the device, with this harness's guest RAM.
fn scaffold(h: &Harness, c: &Conn, event_idx: bool) -> bool {
    let host = |gpa: u64| h.ram.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    let proto = (VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::SHMEM)
        .bits();
    let features = 1u64 << 32 | 1 | 1 << 30 | if event_idx { 1 << 29 } else { 0 };
    let mut table = 1u32.to_ne_bytes().to_vec();
    table.extend_from_slice(&0u32.to_ne_bytes());
    for v in [0, RAM_LEN, host(0), 0] {
        table.extend_from_slice(&v.to_ne_bytes());
    }
    let mut addr = 0u32.to_ne_bytes().to_vec();
    addr.extend_from_slice(&0u32.to_ne_bytes());
    for v in [host(DESC_TABLE), host(USED_RING), host(AVAIL_RING), 0] {
        addr.extend_from_slice(&v.to_ne_bytes());
    }
    c.get(1)
        && c.get(15)
        && c.setup(16, &u64p(proto), &[])
        && c.setup(3, &[], &[])
        && c.setup(2, &u64p(features), &[])
        && c.setup(5, &table, &[h.ram_fd])
        && c.setup(8, &state(0, 256), &[])
        && c.setup(10, &state(0, 0), &[])
        && c.setup(9, &addr, &[])
        && c.setup(12, &u64p(0), &[c.kick.as_raw_fd()])
        && c.setup(13, &u64p(0), &[c.call.as_raw_fd()])
        && c.setup(18, &state(0, 1), &[])
}

/// With VHOST_FUZZ_SKIP_KNOWN=1 the harness steers clear of the findings already reported in
/// docs/testing.md ("Protocol abuse and fuzzing"), which a long run would otherwise hit again
/// and again instead of looking further: memory regions larger than their fd (SIGBUS) and
/// EVENT_IDX (the vring thread spins on a ring it cannot use).
fn skip_known() -> bool {
    static SKIP: OnceLock<bool> = OnceLock::new();
    *SKIP.get_or_init(|| std::env::var_os("VHOST_FUZZ_SKIP_KNOWN").is_some_and(|v| v == "1"))
}

/// EVENT_IDX (bit 29) off in a SET_FEATURES payload, when skipping known findings.
fn mask_features(code: u32, payload: &mut [u8]) {
    if skip_known() && code == 2 && payload.len() >= 4 {
        payload[3] &= !(1 << 5);
    }
}

/// Regions in a SET_MEM_TABLE (or ADD_MEM_REG) payload that would map past the end of their
/// memfd are cut to fit, when skipping known findings.
fn clamp_regions(code: u32, payload: &mut [u8], fd_lens: &[Option<u64>]) {
    if !skip_known() {
        return;
    }
    let (first, count) = match code {
        5 => (8, payload.len().saturating_sub(8) / 32),
        37 => (8, usize::from(payload.len() >= 40)),
        _ => return,
    };
    for i in 0..count {
        let at = first + 32 * i;
        let word =
            |p: &[u8], o: usize| u64::from_ne_bytes(p[at + o..at + o + 8].try_into().unwrap());
        let (size, offset) = (word(payload, 8), word(payload, 24));
        let len = match fd_lens.get(i) {
            Some(Some(len)) => *len,
            // Not a memfd of ours: the mmap itself decides.
            _ => continue,
        };
        let offset = offset.min(len) & !0xfff;
        let size = size.min(len - offset);
        payload[at + 8..at + 16].copy_from_slice(&size.to_ne_bytes());
        payload[at + 24..at + 32].copy_from_slice(&offset.to_ne_bytes());
    }
}

fn one_connection(h: &Harness, data: &[u8]) {
    let mut input = Input { data };
    let sock = match UnixStream::connect(&h.socket) {
        Ok(s) => s,
        Err(e) => panic!("the daemon does not accept connections: {e}"),
    };
    sock.set_read_timeout(Some(HANG)).unwrap();
    sock.set_write_timeout(Some(HANG)).unwrap();
    let conn = Conn {
        sock,
        kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    };
    // Fresh rings for every input.
    h.ram
        .write_slice(&[0u8; WRITABLE as usize], GuestAddress(0))
        .unwrap();

    let mode = input.u8();
    if mode & 1 != 0 && !scaffold(h, &conn, mode & 2 != 0 && !skip_known()) {
        // The daemon refused the usual setup only if something is wrong with it.
        panic!("the daemon refused QEMU's device setup");
    }

    while !input.is_empty() {
        let op = input.u8();
        match op {
            0..=0xdf => {
                let code = u32::from(op % 48);
                let flags = match input.u8() & 3 {
                    0 => VERSION_1 | NEED_REPLY,
                    1 => VERSION_1,
                    2 => VERSION_1 | NEED_REPLY | REPLY,
                    _ => input.u32(),
                };
                let len = match input.u8() {
                    255 => usize::from(input.u16() % 4200),
                    n => usize::from(n),
                };
                let mut payload = input.bytes(len).to_vec();
                let lie = input.u8();
                let size = if lie & 1 != 0 {
                    payload.len() as u32 + u32::from(lie >> 1)
                } else {
                    payload.len() as u32
                };
                // Owned by this message only: the daemon gets its own copies.
                let mut temporary: Vec<File> = Vec::new();
                let (fds, lens): (Vec<RawFd>, Vec<Option<u64>>) = match input.u8() % 9 {
                    0 => (vec![], vec![]),
                    1 => (vec![conn.kick.as_raw_fd()], vec![None]),
                    2 => (vec![h.ram_fd], vec![Some(RAM_LEN)]),
                    3 => (vec![h.short_fd.as_raw_fd()], vec![Some(SHORT_FD_LEN)]),
                    4 => (vec![h.devnull.as_raw_fd()], vec![None]),
                    5 => {
                        let (r, w) = pipe();
                        let fd = r.as_raw_fd();
                        temporary.extend([r, w]);
                        (vec![fd], vec![None])
                    }
                    6 => {
                        let (a, b) = UnixStream::pair().unwrap();
                        let fd = a.as_raw_fd();
                        temporary.extend([
                            File::from(std::os::fd::OwnedFd::from(a)),
                            File::from(std::os::fd::OwnedFd::from(b)),
                        ]);
                        (vec![fd], vec![None])
                    }
                    7 => (
                        vec![h.ram_fd, conn.call.as_raw_fd()],
                        vec![Some(RAM_LEN), None],
                    ),
                    _ => (vec![h.ram_fd, h.ram_fd], vec![Some(RAM_LEN), Some(RAM_LEN)]),
                };
                clamp_regions(code, &mut payload, &lens);
                mask_features(code, &mut payload);
                let sent = conn.send(code, flags, size, &payload, &fds);
                drop(temporary);
                if !sent {
                    break;
                }
                conn.drain();
            }
            0xe0..=0xef => {
                let at = u64::from(input.u16()) % WRITABLE;
                let n = usize::from(input.u8());
                let bytes = input.bytes(n);
                let n = bytes.len().min((WRITABLE - at) as usize);
                let _ = h.ram.write_slice(&bytes[..n], GuestAddress(at));
            }
            _ => {
                let _ = conn.kick.write(1);
                // Give the vring thread a moment to see the kick before the next message.
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    // The frontend goes away; the daemon must end the connection ...
    let _ = conn.sock.shutdown(Shutdown::Write);
    let mut buf = [0u8; 4096];
    loop {
        match (&conn.sock).read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => {
                eprintln!(
                    "HANG: the daemon did not end the connection after the frontend left: {e}"
                );
                std::process::abort();
            }
        }
    }
    // ... and finish it, so that it can take the next one.
    if h.done.lock().unwrap().recv_timeout(HANG).is_err() {
        eprintln!(
            "HANG: the daemon did not finish the connection within {HANG:?} after the frontend \
             left (its vring thread does not stop); it can never serve another frontend"
        );
        std::process::abort();
    }
}

/// (read end, write end)
fn pipe() -> (File, File) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is an array of two ints for pipe2 to fill.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and nothing else owns them.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

fuzz_target!(|data: &[u8]| {
    one_connection(harness(), data);
});
