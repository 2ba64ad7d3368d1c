//! Protocol abuse: malformed, out-of-order and hostile vhost-user messages (and a few hostile
//! ring states) sent to the real daemon binary over its real socket.
//!
//! Every case is one bad input. The daemon may answer it with an error (a NACK when REPLY_ACK
//! is negotiated, an empty GET_CONFIG reply) or drop the connection; some inputs the protocol
//! allows and the daemon may take (they are marked `Any`). Whatever it does, after each case:
//! - the process is still running,
//! - it is not burning CPU while nobody talks to it,
//! - a NEW connection negotiates, receives its SHMEM_MAP and gets 0 for a flush,
//! - its fd and thread counts are back where they were (nothing leaked).
//!
//! A case that breaks any of these fails its group's test, with the daemon's log; the daemon is
//! then restarted so that the remaining cases still run. `catalogue_of_bad_inputs` prints how
//! many distinct bad inputs there are. One case alone:
//! `PROTOCOL_ABUSE_CASE='moved backwards' cargo test --test protocol_abuse -- --nocapture`.

mod common;

use std::any::Any;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::{Daemon, Env, MIB};
use pmem_frontend::{
    Frontend, GuestRam, Options, RawConnection, RawHeader, RawReply, VhostUserProtocolFeatures,
    AVAIL_RING_ADDR, FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION_1, HEADER_LEN, PROTOCOL_FEATURES,
    RING_EVENT_IDX, VERSION_1, VIRTIO_PMEM_F_SHMEM_REGION,
};
use vmm_sys_util::eventfd::EventFd;

/// Size of the backing file of every daemon here.
const FILE_SIZE: u64 = 2 * MIB;
/// How long a case waits for the answer to one message.
const ANSWER: Duration = Duration::from_secs(3);
/// How long a case waits for an answer it does not expect (the daemon may legitimately take a
/// message without answering when REPLY_ACK is not negotiated).
const SILENCE: Duration = Duration::from_millis(300);
/// Window in which an idle daemon's CPU time is measured.
const IDLE_WINDOW: Duration = Duration::from_millis(300);
/// CPU time an idle daemon may use in that window; a spinning thread uses all of it.
const IDLE_CPU_LIMIT: Duration = Duration::from_millis(100);

/// vhost-user request codes (the vhost-user specification, "Front-end message types").
mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_LOG_FD: u32 = 7;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SEND_RARP: u32 = 19;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const IOTLB_MSG: u32 = 22;
    pub const SET_VRING_ENDIAN: u32 = 23;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const POSTCOPY_ADVISE: u32 = 28;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const GPU_SET_SOCKET: u32 = 33;
    pub const RESET_DEVICE: u32 = 34;
    pub const VRING_KICK: u32 = 35;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
    pub const SET_STATUS: u32 = 39;
    pub const GET_STATUS: u32 = 40;
    pub const GET_SHARED_OBJECT: u32 = 41;
    pub const SET_DEVICE_STATE_FD: u32 = 42;
    pub const CHECK_DEVICE_STATE: u32 = 43;
    pub const GET_SHMEM_CONFIG: u32 = 44;
}

/// The vring fd messages' "no fd" flag (bit 8 of the payload).
const VRING_NOFD: u64 = 0x100;

// ---------------------------------------------------------------------------------------------
// Payloads, built field by field so that every field can be wrong.

fn u64_payload(v: u64) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

fn vring_state(index: u32, num: u32) -> Vec<u8> {
    [index.to_ne_bytes(), num.to_ne_bytes()].concat()
}

fn vring_addr(index: u32, flags: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(40);
    v.extend_from_slice(&index.to_ne_bytes());
    v.extend_from_slice(&flags.to_ne_bytes());
    for a in [desc, used, avail, 0u64] {
        v.extend_from_slice(&a.to_ne_bytes());
    }
    v
}

#[derive(Clone, Copy, Debug)]
struct Region {
    gpa: u64,
    size: u64,
    uaddr: u64,
    offset: u64,
}

fn region_bytes(r: &Region) -> Vec<u8> {
    [r.gpa, r.size, r.uaddr, r.offset]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect()
}

/// SET_MEM_TABLE payload: `{u32 num_regions; u32 padding; regions[]}`; `num` may lie.
fn mem_table(num: u32, regions: &[Region]) -> Vec<u8> {
    let mut v = num.to_ne_bytes().to_vec();
    v.extend_from_slice(&0u32.to_ne_bytes());
    for r in regions {
        v.extend(region_bytes(r));
    }
    v
}

/// `VhostUserConfig {u32 offset; u32 size; u32 flags}` followed by `data`.
fn config_msg(offset: u32, size: u32, flags: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for w in [offset, size, flags] {
        v.extend_from_slice(&w.to_ne_bytes());
    }
    v.extend_from_slice(data);
    v
}

/// GET_INFLIGHT_FD payload `{u64 mmap_size; u64 mmap_offset; u16 num_queues; u16 queue_size}`
/// (repr(C), so 24 bytes), for one queue of 256.
fn inflight() -> Vec<u8> {
    let mut v = [0u64.to_ne_bytes(), 0u64.to_ne_bytes()].concat();
    v.extend_from_slice(&1u16.to_ne_bytes());
    v.extend_from_slice(&256u16.to_ne_bytes());
    v.extend_from_slice(&[0; 4]);
    v
}

/// ADD_MEM_REG / REM_MEM_REG payload: `{u64 padding; region}`.
fn single_region(r: &Region) -> Vec<u8> {
    let mut v = 0u64.to_ne_bytes().to_vec();
    v.extend(region_bytes(r));
    v
}

/// A header whose size field says `size`, followed by `len` zero bytes of payload.
fn zeros_after(request: u32, flags: u32, size: u32, len: usize) -> Vec<u8> {
    let mut m = header(request, flags, size).to_vec();
    m.resize(HEADER_LEN + len, 0);
    m
}

fn header(request: u32, flags: u32, size: u32) -> [u8; HEADER_LEN] {
    RawHeader {
        request,
        flags,
        size,
    }
    .to_bytes()
}

// ---------------------------------------------------------------------------------------------
// File descriptors of every kind a frontend could pass.

fn memfd(len: u64) -> Result<File, String> {
    let name = CString::new("protocol-abuse").expect("no NUL");
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no other preconditions.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).map_err(|e| format!("ftruncate: {e}"))?;
    Ok(file)
}

/// (read end, write end)
fn pipe() -> Result<(File, File), String> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is an array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and nothing else owns them.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

fn eventfd() -> Result<EventFd, String> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))
}

fn open(path: &str) -> Result<File, String> {
    File::open(path).map_err(|e| format!("open {path}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// What the daemon did with a bad input.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// REPLY_ACK ack with 0: accepted.
    Ack,
    /// REPLY_ACK ack with a non-zero value: refused, connection kept or dropped after.
    Nack(u64),
    /// A reply that says "error" in the request's own terms (empty GET_CONFIG, state-fd error).
    ErrorReply,
    /// A normal reply of `n` payload bytes.
    Replied(usize),
    /// The daemon closed the connection.
    Dropped,
    /// No answer, and the connection still serves the next request.
    Taken,
    /// What a case that needs more words observed.
    Note(&'static str),
}

impl Seen {
    fn is_rejection(&self) -> bool {
        matches!(self, Seen::Nack(_) | Seen::ErrorReply | Seen::Dropped)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Must be refused: NACK, error reply, or a dropped connection.
    Reject,
    /// The protocol allows the daemon to take it; it only has to survive.
    Tolerated,
}

/// What a case leaves behind: the observation, and objects that must stay alive until the
/// next connection has been checked (a frontend that keeps a socket open after it left).
struct Report {
    seen: Seen,
    keep: Vec<Box<dyn Any>>,
}

impl From<Seen> for Report {
    fn from(seen: Seen) -> Self {
        Report { seen, keep: vec![] }
    }
}

type CaseFn = Box<dyn Fn(&Daemon) -> Result<Report, String>>;

struct Case {
    name: &'static str,
    expect: Expect,
    run: CaseFn,
}

fn case(
    name: &'static str,
    expect: Expect,
    run: impl Fn(&Daemon) -> Result<Report, String> + 'static,
) -> Case {
    Case {
        name,
        expect,
        run: Box::new(run),
    }
}

// ---------------------------------------------------------------------------------------------
// A raw frontend session.

thread_local! {
    /// Connections this test thread has opened to its daemon (each group runs in one thread).
    static CONNECTIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn count_connection() {
    CONNECTIONS.with(|c| c.set(c.get() + 1));
}

fn connections() -> usize {
    CONNECTIONS.with(|c| c.get())
}

fn io_err(e: pmem_frontend::Error) -> String {
    e.to_string()
}

fn is_disconnect(e: &pmem_frontend::Error) -> bool {
    matches!(e, pmem_frontend::Error::Io { source, .. } if matches!(
        source.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    ))
}

struct Raw {
    c: RawConnection,
    reply_ack: std::cell::Cell<bool>,
}

/// The protocol features a QEMU-like frontend acks.
fn usual_protocol_features() -> u64 {
    (VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::BACKEND_SEND_FD
        | VhostUserProtocolFeatures::SHMEM)
        .bits()
}

/// The virtio features a Linux driver acks (EVENT_IDX on request).
fn driver_features(event_idx: bool) -> u64 {
    VERSION_1
        | VIRTIO_PMEM_F_SHMEM_REGION
        | PROTOCOL_FEATURES
        | if event_idx { RING_EVENT_IDX } else { 0 }
}

impl Raw {
    fn open(d: &Daemon) -> Result<Raw, String> {
        count_connection();
        Ok(Raw {
            c: RawConnection::connect(&d.socket, ANSWER).map_err(io_err)?,
            reply_ack: std::cell::Cell::new(false),
        })
    }

    /// A raw session on a started high-level frontend's socket.
    fn on(fe: &Frontend) -> Result<Raw, String> {
        Ok(Raw {
            c: fe.raw_connection().map_err(io_err)?,
            reply_ack: std::cell::Cell::new(true),
        })
    }

    /// A new connection through [`Raw::handshake`] with the protocol features a QEMU-like
    /// frontend acks (REPLY_ACK among them): where most bad inputs are sent.
    fn handshaken(d: &Daemon) -> Result<Raw, String> {
        Raw::handshaken_with(d, usual_protocol_features())
    }

    fn handshaken_with(d: &Daemon, proto: u64) -> Result<Raw, String> {
        let raw = Raw::open(d)?;
        raw.handshake(proto)?;
        Ok(raw)
    }

    /// Handshaken, then SET_FEATURES with what a Linux driver acks.
    fn featured(d: &Daemon, event_idx: bool) -> Result<Raw, String> {
        let raw = Raw::handshaken(d)?;
        raw.ok(
            req::SET_FEATURES,
            &u64_payload(driver_features(event_idx)),
            &[],
        )?;
        Ok(raw)
    }

    /// A new connection that has sent GET_FEATURES and nothing else: before the protocol
    /// features are set, so before REPLY_ACK.
    fn features_asked(d: &Daemon) -> Result<Raw, String> {
        let raw = Raw::open(d)?;
        raw.get_u64(req::GET_FEATURES)?;
        Ok(raw)
    }

    /// Handshaken, with a backend channel (SET_BACKEND_REQ_FD) whose other end is returned:
    /// the daemon sends its SHMEM_MAP there once the device starts.
    fn with_backend_channel(d: &Daemon) -> Result<(Raw, UnixStream), String> {
        let raw = Raw::handshaken(d)?;
        let (ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
        raw.ok(req::SET_BACKEND_REQ_FD, &[], &[theirs.as_raw_fd()])?;
        Ok((raw, ours))
    }

    /// SET_FEATURES with what a Linux driver acks (EVENT_IDX included), observed.
    fn start_device(&self) -> Result<Seen, String> {
        self.observe(req::SET_FEATURES, &u64_payload(driver_features(true)), &[])
    }

    /// Queue 0 sized 256 and based at 0: what comes before its SET_VRING_ADDR.
    fn size_queue(&self) -> Result<(), String> {
        self.ok(req::SET_VRING_NUM, &vring_state(0, 256), &[])?;
        self.ok(req::SET_VRING_BASE, &vring_state(0, 0), &[])
    }

    /// Kick and call eventfds for queue 0, then the queue enabled: what comes after its
    /// SET_VRING_ADDR. Returns (kick, call).
    fn wire_queue(&self) -> Result<(EventFd, EventFd), String> {
        let kick = eventfd()?;
        let call = eventfd()?;
        self.ok(req::SET_VRING_KICK, &u64_payload(0), &[kick.as_raw_fd()])?;
        self.ok(req::SET_VRING_CALL, &u64_payload(0), &[call.as_raw_fd()])?;
        self.ok(req::SET_VRING_ENABLE, &vring_state(0, 1), &[])?;
        Ok((kick, call))
    }

    /// GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES `proto`, SET_OWNER.
    fn handshake(&self, proto: u64) -> Result<u64, String> {
        let features = self.get_u64(req::GET_FEATURES)?;
        self.get_u64(req::GET_PROTOCOL_FEATURES)?;
        self.reply_ack
            .set(proto & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0);
        self.ok(req::SET_PROTOCOL_FEATURES, &u64_payload(proto), &[])?;
        self.ok(req::SET_OWNER, &[], &[])?;
        Ok(features)
    }

    fn get_u64(&self, code: u32) -> Result<u64, String> {
        self.c.send(code, 0, &[], &[]).map_err(io_err)?;
        let reply = self.c.recv(ANSWER).map_err(io_err)?;
        reply
            .as_u64()
            .ok_or_else(|| format!("request {code}: expected a u64 reply, got {reply:?}"))
    }

    /// Sends a request that must succeed (acked with 0 when REPLY_ACK is on).
    fn ok(&self, code: u32, payload: &[u8], fds: &[RawFd]) -> Result<(), String> {
        if !self.reply_ack.get() {
            return self.c.send(code, 0, payload, fds).map_err(io_err);
        }
        match self
            .c
            .call(code, payload, fds, ANSWER)
            .map_err(io_err)?
            .as_u64()
        {
            Some(0) => Ok(()),
            other => Err(format!(
                "request {code} in the setup was not acked: {other:?}"
            )),
        }
    }

    /// Sends `payload` with `flags` (NEED_REPLY added) and classifies the answer.
    fn observe(&self, code: u32, payload: &[u8], fds: &[RawFd]) -> Result<Seen, String> {
        self.observe_flags(code, FLAG_VERSION_1 | FLAG_NEED_REPLY, payload, fds)
    }

    fn observe_flags(
        &self,
        code: u32,
        flags: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<Seen, String> {
        let size = payload.len() as u32;
        let mut msg = header(code, flags, size).to_vec();
        msg.extend_from_slice(payload);
        self.observe_bytes(code, &msg, fds)
    }

    /// Sends arbitrary bytes and classifies what follows.
    fn observe_bytes(&self, code: u32, bytes: &[u8], fds: &[RawFd]) -> Result<Seen, String> {
        match self.c.send_bytes(bytes, fds) {
            Ok(()) => {}
            Err(e) if is_disconnect(&e) => return Ok(Seen::Dropped),
            Err(e) => return Err(e.to_string()),
        }
        self.answer(code)
    }

    /// Reads the answer to a request `code` just sent.
    fn answer(&self, code: u32) -> Result<Seen, String> {
        let wait = if self.reply_ack.get() {
            ANSWER
        } else {
            SILENCE
        };
        match self.c.recv(wait).map_err(io_err)? {
            RawReply::Closed => Ok(Seen::Dropped),
            RawReply::Message { header, payload } => {
                if header.flags & FLAG_REPLY == 0 || header.request != code {
                    return Err(format!(
                        "answer to request {code} is not a reply to it: {header:?}"
                    ));
                }
                Ok(match (code, payload.len()) {
                    (
                        req::GET_FEATURES
                        | req::GET_PROTOCOL_FEATURES
                        | req::GET_VRING_BASE
                        | req::GET_QUEUE_NUM
                        | req::GET_MAX_MEM_SLOTS
                        | req::GET_STATUS
                        | req::GET_SHMEM_CONFIG
                        | req::GET_INFLIGHT_FD
                        | req::SET_LOG_BASE,
                        n,
                    ) => Seen::Replied(n),
                    (req::CHECK_DEVICE_STATE, 8) => {
                        if payload.iter().all(|&b| b == 0) {
                            Seen::Replied(8)
                        } else {
                            Seen::ErrorReply
                        }
                    }
                    (req::GET_CONFIG, 12) => Seen::ErrorReply,
                    (req::SET_DEVICE_STATE_FD, 8) => {
                        // Bits 0-7 non-zero mean failure.
                        if payload[0] != 0 {
                            Seen::ErrorReply
                        } else {
                            Seen::Replied(8)
                        }
                    }
                    (_, 8) => match u64::from_ne_bytes(payload.try_into().unwrap()) {
                        0 => Seen::Ack,
                        v => Seen::Nack(v),
                    },
                    (_, n) => Seen::Replied(n),
                })
            }
            RawReply::Silent => {
                // Taken without an answer, or still waiting for more bytes: a GET_FEATURES
                // tells which (the latter desynchronises the stream, and the daemon drops it).
                match self.c.send(req::GET_FEATURES, 0, &[], &[]) {
                    Ok(()) => {}
                    Err(e) if is_disconnect(&e) => return Ok(Seen::Dropped),
                    Err(e) => return Err(e.to_string()),
                }
                match self.c.recv(ANSWER).map_err(io_err)? {
                    RawReply::Closed => Ok(Seen::Dropped),
                    RawReply::Message { .. } => Ok(Seen::Taken),
                    RawReply::Silent => Err(format!(
                        "no answer to request {code} nor to a GET_FEATURES after it: the \
                         connection hangs"
                    )),
                }
            }
        }
    }

    /// Whether the connection still answers GET_FEATURES.
    fn alive(&self) -> bool {
        self.get_u64(req::GET_FEATURES).is_ok()
    }
}

/// A started, working device (the harness frontend) and a raw session on its socket.
fn started(d: &Daemon, event_idx: bool) -> Result<(Frontend, Raw), String> {
    count_connection();
    let mut fe = Frontend::connect_with(
        &d.socket,
        Options {
            ack_event_idx: event_idx,
            ..Options::default()
        },
    )
    .map_err(io_err)?;
    fe.start().map_err(io_err)?;
    let status = fe.flush().map_err(io_err)?;
    if status != 0 {
        return Err(format!("flush before the bad input answered {status}"));
    }
    let raw = Raw::on(&fe)?;
    Ok((fe, raw))
}

/// Lets the vring thread act on a kick before the checks run.
fn settle() {
    std::thread::sleep(Duration::from_millis(200));
}

/// A raw session with a memory table of `ram`, queue 0 of `size` entries with its rings at
/// the harness's usual guest addresses, kick and call eventfds, and the queue enabled.
struct RawDevice {
    /// The connection; the device lives as long as it is open.
    _raw: Raw,
    ram: GuestRam,
    kick: EventFd,
    _call: EventFd,
}

/// The one region of `ram` as the harness describes it to the daemon, and its fd.
fn ram_region(ram: &GuestRam) -> Result<(Region, RawFd), String> {
    let info = ram.region_infos().map_err(io_err)?.remove(0);
    let region = Region {
        gpa: info.guest_phys_addr,
        size: info.memory_size,
        uaddr: info.userspace_addr,
        offset: info.mmap_offset,
    };
    Ok((region, info.mmap_handle))
}

fn raw_device(d: &Daemon, event_idx: bool) -> Result<RawDevice, String> {
    let raw = Raw::featured(d, event_idx)?;
    let ram = GuestRam::new(16 * MIB).map_err(io_err)?;
    let (region, fd) = ram_region(&ram)?;
    raw.ok(req::SET_MEM_TABLE, &mem_table(1, &[region]), &[fd])?;
    let host = |gpa: u64| ram.host_address(gpa).map_err(io_err);
    raw.size_queue()?;
    raw.ok(
        req::SET_VRING_ADDR,
        &vring_addr(0, 0, host(0)?, host(0x5000)?, host(AVAIL_RING_ADDR)?),
        &[],
    )?;
    let (kick, call) = raw.wire_queue()?;
    Ok(RawDevice {
        _raw: raw,
        ram,
        kick,
        _call: call,
    })
}

// ---------------------------------------------------------------------------------------------
// The catalogue.

use Expect::{Reject, Tolerated};

/// Sends `bytes` on a fresh connection, closes the sending side, and reports what happened.
fn fresh_bytes(
    d: &Daemon,
    code: u32,
    bytes: Vec<u8>,
    fds: &[RawFd],
    half_close: bool,
) -> Result<Report, String> {
    let raw = Raw::open(d)?;
    if half_close {
        raw.c.send_bytes(&bytes, fds).map_err(io_err)?;
        raw.c.shutdown_write().map_err(io_err)?;
        return Ok(match raw.c.recv(ANSWER).map_err(io_err)? {
            RawReply::Closed => Seen::Dropped,
            RawReply::Message { .. } => Seen::Replied(0),
            RawReply::Silent => {
                return Err("the daemon neither answered nor closed after EOF".into())
            }
        }
        .into());
    }
    Ok(raw.observe_bytes(code, &bytes, fds)?.into())
}

/// A handshaken connection (REPLY_ACK on) that then sends one message.
fn after_handshake(
    d: &Daemon,
    code: u32,
    payload: Vec<u8>,
    fds: &[RawFd],
) -> Result<Report, String> {
    let raw = Raw::handshaken(d)?;
    Ok(raw.observe(code, &payload, fds)?.into())
}

/// Like [`after_handshake`], with every protocol feature bit acked, offered or not.
fn after_forced_handshake(
    d: &Daemon,
    code: u32,
    payload: Vec<u8>,
    fds: &[RawFd],
) -> Result<Report, String> {
    let raw = Raw::handshaken_with(d, u64::MAX)?;
    Ok(raw.observe(code, &payload, fds)?.into())
}

/// After the handshake, SET_MEM_TABLE of one 1 MiB region at guest address 0 and `uaddr`,
/// backed by `file`.
fn one_mib_table(d: &Daemon, uaddr: u64, file: &dyn AsRawFd) -> Result<Report, String> {
    let region = Region {
        gpa: 0,
        size: MIB,
        uaddr,
        offset: 0,
    };
    after_handshake(
        d,
        req::SET_MEM_TABLE,
        mem_table(1, &[region]),
        &[file.as_raw_fd()],
    )
}

fn framing_cases() -> Vec<Case> {
    let gf = req::GET_FEATURES;
    let sf = req::SET_FEATURES;
    vec![
        case(
            "partial header (6 of 12 bytes), then EOF",
            Reject,
            move |d| {
                fresh_bytes(
                    d,
                    gf,
                    header(gf, FLAG_VERSION_1, 0)[..6].to_vec(),
                    &[],
                    true,
                )
            },
        ),
        case(
            "SET_FEATURES header announcing 8 bytes, no payload, then EOF",
            Reject,
            move |d| fresh_bytes(d, sf, header(sf, FLAG_VERSION_1, 8).to_vec(), &[], true),
        ),
        case(
            "SET_FEATURES with 4 of its 8 payload bytes, then EOF",
            Reject,
            move |d| fresh_bytes(d, sf, zeros_after(sf, FLAG_VERSION_1, 8, 4), &[], true),
        ),
        case(
            "SET_FEATURES with 4 of its 8 payload bytes, connection kept open",
            Reject,
            move |d| {
                fresh_bytes(
                    d,
                    sf,
                    zeros_after(sf, FLAG_VERSION_1 | FLAG_NEED_REPLY, 8, 4),
                    &[],
                    false,
                )
            },
        ),
        case(
            "SET_FEATURES whose size field and payload are 4 bytes",
            Reject,
            move |d| fresh_bytes(d, sf, zeros_after(sf, FLAG_VERSION_1, 4, 4), &[], false),
        ),
        case("SET_FEATURES with a 16-byte payload", Reject, move |d| {
            fresh_bytes(d, sf, zeros_after(sf, FLAG_VERSION_1, 16, 16), &[], false)
        }),
        case("GET_FEATURES with an 8-byte payload", Reject, move |d| {
            fresh_bytes(d, gf, zeros_after(gf, FLAG_VERSION_1, 8, 8), &[], false)
        }),
        case(
            "size field 4097 (one more than the 4 KiB maximum)",
            Reject,
            move |d| fresh_bytes(d, sf, zeros_after(sf, FLAG_VERSION_1, 4097, 8), &[], false),
        ),
        case("size field u32::MAX", Reject, move |d| {
            fresh_bytes(
                d,
                sf,
                header(sf, FLAG_VERSION_1, u32::MAX).to_vec(),
                &[],
                false,
            )
        }),
        case(
            "SET_MEM_TABLE announcing 4096 bytes, 40 sent",
            Reject,
            move |d| {
                let mut m = header(req::SET_MEM_TABLE, FLAG_VERSION_1, 4096).to_vec();
                m.extend_from_slice(&mem_table(
                    1,
                    &[Region {
                        gpa: 0,
                        size: MIB,
                        uaddr: 0,
                        offset: 0,
                    }],
                ));
                let f = memfd(MIB)?;
                fresh_bytes(d, req::SET_MEM_TABLE, m, &[f.as_raw_fd()], false)
            },
        ),
        case("request code 0", Reject, |d| {
            fresh_bytes(d, 0, header(0, FLAG_VERSION_1, 0).to_vec(), &[], false)
        }),
        case("request code 45 (one past the last defined)", Reject, |d| {
            fresh_bytes(d, 45, header(45, FLAG_VERSION_1, 0).to_vec(), &[], false)
        }),
        case("request code 0x7fffffff", Reject, |d| {
            fresh_bytes(
                d,
                0x7fff_ffff,
                header(0x7fff_ffff, FLAG_VERSION_1, 0).to_vec(),
                &[],
                false,
            )
        }),
        case(
            "request code u32::MAX with an 8-byte payload",
            Reject,
            |d| {
                let mut m = header(u32::MAX, FLAG_VERSION_1, 8).to_vec();
                m.extend_from_slice(&[0xff; 8]);
                fresh_bytes(d, u32::MAX, m, &[], false)
            },
        ),
        case("version bits 0", Reject, move |d| {
            fresh_bytes(d, gf, header(gf, 0, 0).to_vec(), &[], false)
        }),
        case("version bits 2", Reject, move |d| {
            fresh_bytes(d, gf, header(gf, 2, 0).to_vec(), &[], false)
        }),
        case("version bits 3", Reject, move |d| {
            fresh_bytes(d, gf, header(gf, 3, 0).to_vec(), &[], false)
        }),
        case("REPLY flag set on GET_FEATURES", Reject, move |d| {
            fresh_bytes(
                d,
                gf,
                header(gf, FLAG_VERSION_1 | FLAG_REPLY, 0).to_vec(),
                &[],
                false,
            )
        }),
        case("REPLY flag set on SET_FEATURES", Reject, move |d| {
            let mut m = header(sf, FLAG_VERSION_1 | FLAG_REPLY, 8).to_vec();
            m.extend_from_slice(&u64_payload(VERSION_1));
            fresh_bytes(d, sf, m, &[], false)
        }),
        case("reserved flag bit 4 set", Reject, move |d| {
            fresh_bytes(
                d,
                gf,
                header(gf, FLAG_VERSION_1 | 0x10, 0).to_vec(),
                &[],
                false,
            )
        }),
        case("reserved flag bit 31 set", Reject, move |d| {
            fresh_bytes(
                d,
                gf,
                header(gf, FLAG_VERSION_1 | 0x8000_0000, 0).to_vec(),
                &[],
                false,
            )
        }),
        case("an fd attached to GET_FEATURES", Reject, move |d| {
            let f = memfd(4096)?;
            fresh_bytes(
                d,
                gf,
                header(gf, FLAG_VERSION_1, 0).to_vec(),
                &[f.as_raw_fd()],
                false,
            )
        }),
        case(
            "40 fds attached to a 32-region SET_MEM_TABLE (the backend takes 32 fds)",
            Reject,
            |d| {
                let files: Vec<File> = (0..40).map(|_| memfd(MIB)).collect::<Result<_, _>>()?;
                let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
                let regions: Vec<Region> = (0..32)
                    .map(|i| Region {
                        gpa: i * MIB,
                        size: MIB,
                        uaddr: i * MIB,
                        offset: 0,
                    })
                    .collect();
                after_handshake(d, req::SET_MEM_TABLE, mem_table(32, &regions), &fds)
            },
        ),
        case(
            "GET_FEATURES followed in the same write by a garbage header",
            Reject,
            move |d| {
                let raw = Raw::open(d)?;
                let mut m = header(gf, FLAG_VERSION_1, 0).to_vec();
                m.extend_from_slice(&[0xa5; HEADER_LEN]);
                raw.c.send_bytes(&m, &[]).map_err(io_err)?;
                match raw.c.recv(ANSWER).map_err(io_err)? {
                    RawReply::Message { .. } => {}
                    other => return Err(format!("GET_FEATURES got {other:?}")),
                }
                Ok(match raw.c.recv(ANSWER).map_err(io_err)? {
                    RawReply::Closed => Seen::Dropped,
                    RawReply::Silent => Seen::Taken,
                    RawReply::Message { .. } => Seen::Replied(0),
                }
                .into())
            },
        ),
        case("4 KiB of pseudo-random bytes", Reject, |d| {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let bytes: Vec<u8> = (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            fresh_bytes(d, 0, bytes, &[], true)
        }),
    ]
}

fn ordering_cases() -> Vec<Case> {
    vec![
        case(
            "SET_FEATURES with bits the device never offered",
            Reject,
            |d| {
                let raw = Raw::open(d)?;
                let offered = raw.handshake(usual_protocol_features())?;
                Ok(raw
                    .observe(req::SET_FEATURES, &u64_payload(offered | 1 << 40), &[])?
                    .into())
            },
        ),
        case("SET_VRING_ENABLE before SET_FEATURES", Reject, |d| {
            after_handshake(d, req::SET_VRING_ENABLE, vring_state(0, 1), &[])
        }),
        case(
            "SET_VRING_ENABLE after SET_FEATURES without PROTOCOL_FEATURES",
            Reject,
            |d| {
                let raw = Raw::handshaken(d)?;
                raw.ok(
                    req::SET_FEATURES,
                    &u64_payload(VERSION_1 | VIRTIO_PMEM_F_SHMEM_REGION),
                    &[],
                )?;
                Ok(raw
                    .observe(req::SET_VRING_ENABLE, &vring_state(0, 1), &[])?
                    .into())
            },
        ),
        case(
            "SET_VRING_KICK before SET_FEATURES, then a kick",
            Tolerated,
            |d| {
                let raw = Raw::handshaken(d)?;
                let kick = eventfd()?;
                let seen =
                    raw.observe(req::SET_VRING_KICK, &u64_payload(0), &[kick.as_raw_fd()])?;
                let _ = kick.write(1);
                settle();
                Ok(seen.into())
            },
        ),
        case(
            "SET_VRING_KICK, CALL and ENABLE before SET_FEATURES and SET_MEM_TABLE, then a kick",
            Tolerated,
            |d| {
                let raw = Raw::handshaken(d)?;
                let (kick, call) = (eventfd()?, eventfd()?);
                raw.ok(req::SET_VRING_KICK, &u64_payload(0), &[kick.as_raw_fd()])?;
                raw.ok(req::SET_VRING_CALL, &u64_payload(0), &[call.as_raw_fd()])?;
                let seen = raw.observe(req::SET_VRING_ENABLE, &vring_state(0, 1), &[])?;
                let _ = kick.write(1);
                settle();
                Ok(seen.into())
            },
        ),
        case(
            "GET_SHMEM_CONFIG before SET_PROTOCOL_FEATURES",
            Reject,
            |d| {
                let raw = Raw::features_asked(d)?;
                Ok(raw.observe(req::GET_SHMEM_CONFIG, &[], &[])?.into())
            },
        ),
        case("GET_SHMEM_CONFIG with SHMEM not acked", Reject, |d| {
            let raw = Raw::handshaken_with(
                d,
                (VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG).bits(),
            )?;
            Ok(raw.observe(req::GET_SHMEM_CONFIG, &[], &[])?.into())
        }),
        case("GET_CONFIG before SET_PROTOCOL_FEATURES", Reject, |d| {
            let raw = Raw::features_asked(d)?;
            Ok(raw
                .observe(req::GET_CONFIG, &config_msg(0, 16, 0, &[0; 16]), &[])?
                .into())
        }),
        case(
            "SET_BACKEND_REQ_FD before SET_PROTOCOL_FEATURES",
            Reject,
            |d| {
                let raw = Raw::features_asked(d)?;
                let (_ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
                Ok(raw
                    .observe(req::SET_BACKEND_REQ_FD, &[], &[theirs.as_raw_fd()])?
                    .into())
            },
        ),
        case("SET_OWNER twice", Reject, |d| {
            after_handshake(d, req::SET_OWNER, vec![], &[])
        }),
        case("SET_MEM_TABLE before SET_FEATURES", Tolerated, |d| {
            one_mib_table(d, 0x10_0000, &memfd(MIB)?)
        }),
        case(
            "GET_VRING_BASE of a queue that never started",
            Tolerated,
            |d| after_handshake(d, req::GET_VRING_BASE, vring_state(0, 0), &[]),
        ),
        case("SET_PROTOCOL_FEATURES with every bit set", Tolerated, |d| {
            let raw = Raw::features_asked(d)?;
            raw.get_u64(req::GET_PROTOCOL_FEATURES)?;
            raw.reply_ack.set(true);
            Ok(raw
                .observe(req::SET_PROTOCOL_FEATURES, &u64_payload(u64::MAX), &[])?
                .into())
        }),
        case(
            "RESET_OWNER, then the device started again on the same connection",
            Tolerated,
            |d| {
                let raw = Raw::handshaken(d)?;
                let seen = raw.observe(req::RESET_OWNER, &[], &[])?;
                if raw.alive() {
                    raw.ok(req::SET_OWNER, &[], &[])?;
                    raw.ok(req::SET_FEATURES, &u64_payload(driver_features(true)), &[])?;
                }
                Ok(seen.into())
            },
        ),
        case("SET_FEATURES without SET_OWNER", Tolerated, |d| {
            let raw = Raw::features_asked(d)?;
            raw.reply_ack.set(true);
            raw.ok(
                req::SET_PROTOCOL_FEATURES,
                &u64_payload(usual_protocol_features()),
                &[],
            )?;
            Ok(raw.start_device()?.into())
        }),
    ]
}

fn backend_channel_cases() -> Vec<Case> {
    vec![
        case("SET_BACKEND_REQ_FD without an fd", Reject, |d| {
            after_handshake(d, req::SET_BACKEND_REQ_FD, vec![], &[])
        }),
        case("SET_BACKEND_REQ_FD with a pipe", Reject, |d| {
            let (r, _w) = pipe()?;
            after_handshake(d, req::SET_BACKEND_REQ_FD, vec![], &[r.as_raw_fd()])
        }),
        case("SET_BACKEND_REQ_FD with a datagram socket", Reject, |d| {
            let (a, _b) = UnixDatagram::pair().map_err(|e| e.to_string())?;
            after_handshake(d, req::SET_BACKEND_REQ_FD, vec![], &[a.as_raw_fd()])
        }),
        case("SET_BACKEND_REQ_FD with two sockets", Reject, |d| {
            let (a, _b) = UnixStream::pair().map_err(|e| e.to_string())?;
            let (c, _e) = UnixStream::pair().map_err(|e| e.to_string())?;
            after_handshake(
                d,
                req::SET_BACKEND_REQ_FD,
                vec![],
                &[a.as_raw_fd(), c.as_raw_fd()],
            )
        }),
        case("SET_BACKEND_REQ_FD with /dev/null", Reject, |d| {
            let f = open("/dev/null")?;
            after_handshake(d, req::SET_BACKEND_REQ_FD, vec![], &[f.as_raw_fd()])
        }),
        case(
            "a backend channel closed before SET_FEATURES (SHMEM_MAP cannot be sent)",
            Tolerated,
            |d| {
                let (raw, ours) = Raw::with_backend_channel(d)?;
                drop(ours);
                let seen = raw.start_device()?;
                settle();
                Ok(seen.into())
            },
        ),
        case(
            "a backend channel that answers SHMEM_MAP with a NACK",
            Tolerated,
            |d| {
                let (raw, ours) = Raw::with_backend_channel(d)?;
                let seen = raw.start_device()?;
                let channel = RawConnection::from_stream(ours);
                match channel.recv(ANSWER).map_err(io_err)? {
                    RawReply::Message { header, .. } => {
                        channel
                            .send(header.request, FLAG_REPLY, &u64_payload(1), &[])
                            .map_err(io_err)?;
                    }
                    other => return Err(format!("no SHMEM_MAP on the channel: {other:?}")),
                }
                settle();
                Ok(seen.into())
            },
        ),
        case(
            "a backend channel that answers SHMEM_MAP with garbage",
            Tolerated,
            |d| {
                let (raw, ours) = Raw::with_backend_channel(d)?;
                let seen = raw.start_device()?;
                let channel = RawConnection::from_stream(ours);
                channel.recv(ANSWER).map_err(io_err)?;
                channel.send_bytes(&[0xee; 20], &[]).map_err(io_err)?;
                settle();
                Ok(seen.into())
            },
        ),
        case(
            "a backend channel nobody reads, left open after the frontend disconnects",
            Tolerated,
            |d| {
                // A frontend that never answers SHMEM_MAP only hurts itself while it is
                // connected; once it is gone, the next frontend must get its map.
                let (raw, ours) = Raw::with_backend_channel(d)?;
                let seen = raw.start_device()?;
                settle();
                drop(raw);
                Ok(Report {
                    seen,
                    keep: vec![Box::new(ours)],
                })
            },
        ),
    ]
}

fn mem_table_cases() -> Vec<Case> {
    let r = |gpa: u64, size: u64| Region {
        gpa,
        size,
        uaddr: 0x7000_0000_0000 + gpa,
        offset: 0,
    };
    /// SET_MEM_TABLE with `regions`, each backed by its own memfd of `fd_len`.
    fn table(
        d: &Daemon,
        num: u32,
        regions: Vec<Region>,
        fd_count: usize,
        fd_len: u64,
    ) -> Result<Report, String> {
        let files: Vec<File> = (0..fd_count)
            .map(|_| memfd(fd_len))
            .collect::<Result<_, _>>()?;
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        after_handshake(d, req::SET_MEM_TABLE, mem_table(num, &regions), &fds)
    }
    fn with_fd(d: &Daemon, file: &dyn AsRawFd) -> Result<Report, String> {
        one_mib_table(d, 0x7000_0000_0000, file)
    }
    vec![
        case("SET_MEM_TABLE with 0 regions", Reject, |d| table(d, 0, vec![], 0, MIB)),
        case("SET_MEM_TABLE with 0 regions and an fd", Reject, |d| table(d, 0, vec![], 1, MIB)),
        case("SET_MEM_TABLE claiming 33 regions", Reject, move |d| {
            table(d, 33, vec![r(0, MIB)], 1, MIB)
        }),
        case("SET_MEM_TABLE claiming 2 regions, carrying 1", Reject, move |d| {
            table(d, 2, vec![r(0, MIB)], 2, MIB)
        }),
        case("SET_MEM_TABLE claiming 1 region, carrying 2", Reject, move |d| {
            table(d, 1, vec![r(0, MIB), r(MIB, MIB)], 1, MIB)
        }),
        case("2 regions, 1 fd", Reject, move |d| table(d, 2, vec![r(0, MIB), r(MIB, MIB)], 1, MIB)),
        case("1 region, 2 fds", Reject, move |d| table(d, 1, vec![r(0, MIB)], 2, MIB)),
        case("1 region, no fd", Reject, move |d| table(d, 1, vec![r(0, MIB)], 0, MIB)),
        case("two regions overlapping in guest-physical space", Reject, move |d| {
            table(d, 2, vec![r(0, 2 * MIB), r(MIB, 2 * MIB)], 2, 2 * MIB)
        }),
        case("the same region twice", Reject, move |d| {
            table(d, 2, vec![r(0, MIB), r(0, MIB)], 2, MIB)
        }),
        case("a region of size 0", Reject, move |d| table(d, 1, vec![r(0, 0)], 1, MIB)),
        case("a region of size u64::MAX - 4095 (the mmap must fail)", Reject, |d| {
            table(d, 1, vec![Region { gpa: 0, size: u64::MAX - 4095, uaddr: 0, offset: 0 }], 1, MIB)
        }),
        case("a region of 2^62 bytes (larger than the address space)", Reject, |d| {
            table(d, 1, vec![Region { gpa: 0, size: 1 << 62, uaddr: 0, offset: 0 }], 1, MIB)
        }),
        case("guest_phys_addr + size overflows", Reject, |d| {
            table(d, 1, vec![Region { gpa: u64::MAX - 4095, size: 2 * MIB, uaddr: 0, offset: 0 }], 1, 2 * MIB)
        }),
        case("userspace_addr + size overflows", Reject, |d| {
            table(d, 1, vec![Region { gpa: 0, size: MIB, uaddr: u64::MAX - 4095, offset: 0 }], 1, MIB)
        }),
        case("mmap_offset + size overflows", Reject, |d| {
            table(d, 1, vec![Region { gpa: 0, size: MIB, uaddr: 0, offset: u64::MAX - 4095 }], 1, MIB)
        }),
        case("mmap_offset not page-aligned", Reject, |d| {
            table(d, 1, vec![Region { gpa: 0, size: MIB, uaddr: 0, offset: 100 }], 1, 2 * MIB)
        }),
        case("region fd is /dev/null", Reject, |d| with_fd(d, &open("/dev/null")?)),
        case("region fd is a pipe", Reject, |d| with_fd(d, &pipe()?.0)),
        case("region fd is a directory", Reject, |d| with_fd(d, &open("/")?)),
        case("region fd is a stream socket", Reject, |d| {
            with_fd(d, &UnixStream::pair().map_err(|e| e.to_string())?.0)
        }),
        case("region fd is an eventfd", Reject, |d| with_fd(d, &eventfd()?)),
        case("region fd is a read-only regular file", Reject, |d| {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            let path = dir.path().join("ro");
            std::fs::write(&path, vec![0u8; MIB as usize]).map_err(|e| e.to_string())?;
            with_fd(d, &File::open(&path).map_err(|e| e.to_string())?)
        }),
        case("region larger than its fd (16 MiB over 64 KiB), mapped but not touched", Tolerated, |d| {
            table(d, 1, vec![Region { gpa: 0, size: 16 * MIB, uaddr: 0x7000_0000_0000, offset: 0 }], 1, 64 << 10)
        }),
        case(
            "region larger than its fd, rings inside the fd, request buffer past its end, then a kick",
            Tolerated,
            |d| short_fd_device(d, ShortFd::Buffer),
        ),
        case(
            "region larger than its fd, used ring past its end (SET_VRING_ADDR reads it)",
            Tolerated,
            |d| short_fd_device(d, ShortFd::Rings),
        ),
        case("mmap_offset beyond the end of the fd, rings in the region", Tolerated, |d| {
            short_fd_device(d, ShortFd::Offset)
        }),
    ]
}

#[derive(Clone, Copy)]
enum ShortFd {
    /// Rings inside the fd, a request buffer past its end.
    Buffer,
    /// The used ring past the end of the fd.
    Rings,
    /// The region starts (mmap_offset) past the end of the fd.
    Offset,
}

/// A device whose one memory region (16 MiB) is backed by a 64 KiB memfd, so that part of the
/// region the daemon maps has no file behind it. Touching that part raises SIGBUS; the daemon
/// is only safe if it never touches it.
fn short_fd_device(d: &Daemon, how: ShortFd) -> Result<Report, String> {
    const FD_LEN: u64 = 64 << 10;
    const UADDR: u64 = 0x7000_0000_0000;
    let raw = Raw::featured(d, true)?;
    let file = memfd(FD_LEN)?;
    let offset = match how {
        ShortFd::Offset => 4 * MIB,
        _ => 0,
    };
    let region = Region {
        gpa: 0,
        size: 16 * MIB,
        uaddr: UADDR,
        offset,
    };
    let seen = raw.observe(
        req::SET_MEM_TABLE,
        &mem_table(1, &[region]),
        &[file.as_raw_fd()],
    )?;
    if seen != Seen::Ack {
        return Ok(seen.into());
    }
    // Rings in the first pages; past the end of the fd for RingsPastEnd.
    let (desc, avail, used) = match how {
        ShortFd::Rings => (0x0, 0x1000, 8 * MIB),
        _ => (0x0, 0x1000, 0x2000),
    };
    raw.size_queue()?;
    let seen = raw.observe(
        req::SET_VRING_ADDR,
        &vring_addr(0, 0, UADDR + desc, UADDR + used, UADDR + avail),
        &[],
    )?;
    if seen != Seen::Ack {
        return Ok(seen.into());
    }
    let (kick, _call) = raw.wire_queue()?;
    if let ShortFd::Buffer = how {
        // One flush whose request buffer lies past the end of the fd (guest address 2 MiB).
        let mut descs = Vec::new();
        descs.extend_from_slice(&(2 * MIB).to_le_bytes());
        descs.extend_from_slice(&4u32.to_le_bytes());
        descs.extend_from_slice(&1u16.to_le_bytes()); // NEXT
        descs.extend_from_slice(&1u16.to_le_bytes());
        descs.extend_from_slice(&0x3000u64.to_le_bytes());
        descs.extend_from_slice(&4u32.to_le_bytes());
        descs.extend_from_slice(&2u16.to_le_bytes()); // WRITE
        descs.extend_from_slice(&0u16.to_le_bytes());
        file.write_all_at(&descs, desc).map_err(|e| e.to_string())?;
        // avail: flags 0, idx 1, ring[0] = 0
        file.write_all_at(&[0, 0, 1, 0, 0, 0], avail)
            .map_err(|e| e.to_string())?;
    } else {
        // An empty ring at a wrong position, so the daemon looks at it.
        file.write_all_at(&[0, 0, 0, 0], avail)
            .map_err(|e| e.to_string())?;
    }
    kick.write(1).map_err(|e| e.to_string())?;
    settle();
    Ok(Seen::Note("kicked").into())
}

fn vring_cases() -> Vec<Case> {
    /// One message on a started device's socket.
    fn on_started(
        d: &Daemon,
        code: u32,
        payload: Vec<u8>,
        fds: &[RawFd],
    ) -> Result<Report, String> {
        let (_fe, raw) = started(d, true)?;
        Ok(raw.observe(code, &payload, fds)?.into())
    }
    /// SET_VRING_ADDR of queue `index` on a started device, the rings where the harness put
    /// them but the descriptor table at guest address `desc`.
    fn addr_on_started(d: &Daemon, index: u32, flags: u32, desc: u64) -> Result<Report, String> {
        let (fe, raw) = started(d, true)?;
        let h = |gpa| fe.ram().host_address(gpa).map_err(io_err);
        let addr = vring_addr(index, flags, h(desc)?, h(0x5000)?, h(AVAIL_RING_ADDR)?);
        Ok(raw.observe(req::SET_VRING_ADDR, &addr, &[])?.into())
    }
    vec![
        case("SET_VRING_NUM for queue 5", Reject, |d| {
            on_started(d, req::SET_VRING_NUM, vring_state(5, 256), &[])
        }),
        case("SET_VRING_NUM for queue u32::MAX", Reject, |d| {
            on_started(d, req::SET_VRING_NUM, vring_state(u32::MAX, 256), &[])
        }),
        case("SET_VRING_NUM 0", Reject, |d| {
            on_started(d, req::SET_VRING_NUM, vring_state(0, 0), &[])
        }),
        case(
            "SET_VRING_NUM 3 (not a power of two), then a flush",
            Tolerated,
            |d| {
                let (mut fe, raw) = started(d, true)?;
                let seen = raw.observe(req::SET_VRING_NUM, &vring_state(0, 3), &[])?;
                if raw.alive() {
                    // Whatever the daemon did with 3, a flush on the 256-entry ring is answered.
                    match fe.flush() {
                        Ok(0) => {}
                        other => return Err(format!("flush after SET_VRING_NUM 3: {other:?}")),
                    }
                }
                Ok(seen.into())
            },
        ),
        case("SET_VRING_NUM 2048 (above the 1024 maximum)", Reject, |d| {
            on_started(d, req::SET_VRING_NUM, vring_state(0, 2048), &[])
        }),
        case("SET_VRING_NUM 65536 (does not fit 16 bits)", Reject, |d| {
            on_started(d, req::SET_VRING_NUM, vring_state(0, 65536), &[])
        }),
        case("SET_VRING_NUM u32::MAX", Reject, |d| {
            on_started(d, req::SET_VRING_NUM, vring_state(0, u32::MAX), &[])
        }),
        case(
            "SET_VRING_ADDR with addresses outside the memory table",
            Reject,
            |d| {
                on_started(
                    d,
                    req::SET_VRING_ADDR,
                    vring_addr(0, 0, 0x1000, 0x2000, 0x3000),
                    &[],
                )
            },
        ),
        case(
            "SET_VRING_ADDR with only the used ring outside the memory table",
            Reject,
            |d| {
                let (fe, raw) = started(d, true)?;
                let h = |gpa| fe.ram().host_address(gpa).map_err(io_err);
                Ok(raw
                    .observe(
                        req::SET_VRING_ADDR,
                        &vring_addr(0, 0, h(0)?, 0x10, h(AVAIL_RING_ADDR)?),
                        &[],
                    )?
                    .into())
            },
        ),
        case("SET_VRING_ADDR before any SET_MEM_TABLE", Reject, |d| {
            after_handshake(
                d,
                req::SET_VRING_ADDR,
                vring_addr(0, 0, 0x1000, 0x2000, 0x3000),
                &[],
            )
        }),
        case("SET_VRING_ADDR for queue 5", Reject, |d| {
            addr_on_started(d, 5, 0, 0)
        }),
        case("SET_VRING_ADDR with unknown flag bits", Reject, |d| {
            addr_on_started(d, 0, 0xfe, 0)
        }),
        case(
            "SET_VRING_ADDR with a descriptor table not 16-byte aligned",
            Reject,
            |d| addr_on_started(d, 0, 0, 8),
        ),
        case(
            "SET_VRING_ADDR with the rings straddling the end of memory, then a kick",
            Tolerated,
            |d| {
                let (fe, raw) = started(d, true)?;
                let end = fe.guest_memory_size();
                let h = |gpa| fe.ram().host_address(gpa).map_err(io_err);
                let seen = raw.observe(
                    req::SET_VRING_ADDR,
                    &vring_addr(0, 0, h(end - 16)?, h(end - 4)?, h(end - 2)?),
                    &[],
                )?;
                let _ = fe.kick();
                settle();
                Ok(seen.into())
            },
        ),
        case(
            "SET_VRING_ADDR with all three rings at one address, then a flush",
            Tolerated,
            |d| {
                let (mut fe, raw) = started(d, true)?;
                let h = fe.ram().host_address(0x5000).map_err(io_err)?;
                let seen = raw.observe(req::SET_VRING_ADDR, &vring_addr(0, 0, h, h, h), &[])?;
                let _ = fe.submit_request(0);
                settle();
                Ok(seen.into())
            },
        ),
        case("SET_VRING_KICK for queue 5", Reject, |d| {
            let kick = eventfd()?;
            on_started(d, req::SET_VRING_KICK, u64_payload(5), &[kick.as_raw_fd()])
        }),
        case(
            "SET_VRING_KICK with the no-fd flag and an fd",
            Reject,
            |d| {
                let kick = eventfd()?;
                on_started(
                    d,
                    req::SET_VRING_KICK,
                    u64_payload(VRING_NOFD),
                    &[kick.as_raw_fd()],
                )
            },
        ),
        case(
            "SET_VRING_KICK without an fd and without the no-fd flag",
            Reject,
            |d| on_started(d, req::SET_VRING_KICK, u64_payload(0), &[]),
        ),
        case(
            "SET_VRING_KICK with the no-fd flag (polling), then a request",
            Tolerated,
            |d| {
                let (mut fe, raw) = started(d, true)?;
                let seen = raw.observe(req::SET_VRING_KICK, &u64_payload(VRING_NOFD), &[])?;
                let _ = fe.submit_request(0);
                settle();
                Ok(seen.into())
            },
        ),
        case(
            "SET_VRING_KICK with a pipe instead of an eventfd, then 3 bytes in it",
            Tolerated,
            |d| {
                let (_fe, raw) = started(d, true)?;
                let (r, w) = pipe()?;
                let seen = raw.observe(req::SET_VRING_KICK, &u64_payload(0), &[r.as_raw_fd()])?;
                let _ = std::io::Write::write_all(&mut &w, &[1, 2, 3]);
                settle();
                drop(w);
                settle();
                Ok(seen.into())
            },
        ),
        case(
            "SET_VRING_KICK with a pipe whose writer is closed (endless EOF)",
            Tolerated,
            |d| {
                let (_fe, raw) = started(d, true)?;
                let (r, w) = pipe()?;
                drop(w);
                let seen = raw.observe(req::SET_VRING_KICK, &u64_payload(0), &[r.as_raw_fd()])?;
                settle();
                Ok(seen.into())
            },
        ),
        case(
            "SET_VRING_CALL with a pipe whose reader is closed, then a flush",
            Tolerated,
            |d| {
                let (mut fe, raw) = started(d, true)?;
                let (r, w) = pipe()?;
                drop(r);
                let seen = raw.observe(req::SET_VRING_CALL, &u64_payload(0), &[w.as_raw_fd()])?;
                let _ = fe.submit_request(0);
                settle();
                Ok(seen.into())
            },
        ),
        case("SET_VRING_CALL for queue 5", Reject, |d| {
            let call = eventfd()?;
            on_started(d, req::SET_VRING_CALL, u64_payload(5), &[call.as_raw_fd()])
        }),
        case("SET_VRING_ERR for queue 5", Reject, |d| {
            let err = eventfd()?;
            on_started(d, req::SET_VRING_ERR, u64_payload(5), &[err.as_raw_fd()])
        }),
        case("SET_VRING_ENABLE with value 2", Reject, |d| {
            on_started(d, req::SET_VRING_ENABLE, vring_state(0, 2), &[])
        }),
        case("SET_VRING_ENABLE for queue 5", Reject, |d| {
            on_started(d, req::SET_VRING_ENABLE, vring_state(5, 1), &[])
        }),
        case("SET_VRING_BASE for queue 5", Reject, |d| {
            on_started(d, req::SET_VRING_BASE, vring_state(5, 0), &[])
        }),
        case("GET_VRING_BASE for queue 5", Reject, |d| {
            on_started(d, req::GET_VRING_BASE, vring_state(5, 0), &[])
        }),
        case(
            "SET_VRING_BASE with bits above 16 set on a running queue",
            Tolerated,
            |d| on_started(d, req::SET_VRING_BASE, vring_state(0, 0x1_0001), &[]),
        ),
        case("GET_VRING_BASE twice in a row", Tolerated, |d| {
            let (_fe, raw) = started(d, true)?;
            raw.c
                .send(req::GET_VRING_BASE, 0, &vring_state(0, 0), &[])
                .map_err(io_err)?;
            raw.c.recv(ANSWER).map_err(io_err)?;
            Ok(raw
                .observe(req::GET_VRING_BASE, &vring_state(0, 0), &[])?
                .into())
        }),
    ]
}

fn ring_cases() -> Vec<Case> {
    /// A started device whose guest then publishes an avail index `ahead` entries past the
    /// device's position, and kicks.
    fn avail_jump(d: &Daemon, event_idx: bool, ahead: u16) -> Result<Report, String> {
        let (fe, _raw) = started(d, event_idx)?;
        // One flush was made, so the device's next avail index is 1.
        let idx = 1u16.wrapping_add(ahead);
        fe.write_guest(AVAIL_RING_ADDR + 2, &idx.to_le_bytes())
            .map_err(io_err)?;
        fe.kick().map_err(io_err)?;
        settle();
        Ok(Seen::Note("kicked").into())
    }
    vec![
        case("guest avail index 1000 entries ahead of a 256 queue, EVENT_IDX", Tolerated, |d| {
            avail_jump(d, true, 1000)
        }),
        case("guest avail index 1000 entries ahead of a 256 queue, no EVENT_IDX", Tolerated, |d| {
            avail_jump(d, false, 1000)
        }),
        case("guest avail index moved backwards, EVENT_IDX", Tolerated, |d| {
            avail_jump(d, true, u16::MAX)
        }),
        case("SET_VRING_BASE far from the guest's avail index on a running queue, EVENT_IDX, then a kick", Tolerated, |d| {
            let (fe, raw) = started(d, true)?;
            let seen = raw.observe(req::SET_VRING_BASE, &vring_state(0, 5000), &[])?;
            fe.kick().map_err(io_err)?;
            settle();
            Ok(seen.into())
        }),
        case("avail ring entry naming head 1000 of a 256 queue", Tolerated, |d| {
            let (fe, _raw) = started(d, true)?;
            // Entry 1 of the avail ring (the next one the device reads), then idx 2.
            fe.write_guest(AVAIL_RING_ADDR + 4 + 2, &1000u16.to_le_bytes()).map_err(io_err)?;
            fe.write_guest(AVAIL_RING_ADDR + 2, &2u16.to_le_bytes()).map_err(io_err)?;
            fe.kick().map_err(io_err)?;
            settle();
            Ok(Seen::Note("kicked").into())
        }),
        case("a descriptor that chains to itself", Tolerated, |d| {
            let (fe, _raw) = started(d, true)?;
            // Descriptor 7: 4 readable bytes, NEXT, next = 7.
            let mut desc = 0x10_0000u64.to_le_bytes().to_vec();
            desc.extend_from_slice(&4u32.to_le_bytes());
            desc.extend_from_slice(&1u16.to_le_bytes());
            desc.extend_from_slice(&7u16.to_le_bytes());
            fe.write_guest(7 * 16, &desc).map_err(io_err)?;
            fe.write_guest(AVAIL_RING_ADDR + 4 + 2, &7u16.to_le_bytes()).map_err(io_err)?;
            fe.write_guest(AVAIL_RING_ADDR + 2, &2u16.to_le_bytes()).map_err(io_err)?;
            fe.kick().map_err(io_err)?;
            settle();
            Ok(Seen::Note("kicked").into())
        }),
        case("new zeroed memory under a running queue (second SET_MEM_TABLE), then a kick", Tolerated, |d| {
            let (fe, raw) = started(d, true)?;
            let other = GuestRam::new(fe.guest_memory_size()).map_err(io_err)?;
            let (region, fd) = ram_region(&other)?;
            let seen = raw.observe(req::SET_MEM_TABLE, &mem_table(1, &[region]), &[fd])?;
            fe.kick().map_err(io_err)?;
            settle();
            Ok(Report { seen, keep: vec![Box::new(other)] })
        }),
    ]
}

fn mem_update_cases() -> Vec<Case> {
    vec![
        case("second SET_MEM_TABLE (same regions) while the queue runs, then a flush", Tolerated, |d| {
            let (mut fe, raw) = started(d, true)?;
            let (region, fd) = ram_region(fe.ram())?;
            let seen = raw.observe(req::SET_MEM_TABLE, &mem_table(1, &[region]), &[fd])?;
            match (seen.clone(), fe.flush()) {
                (Seen::Ack, Ok(0)) => Ok(seen.into()),
                (Seen::Dropped, _) => Ok(seen.into()),
                (s, f) => Err(format!("second SET_MEM_TABLE: {s:?}, then flush: {f:?}")),
            }
        }),
        case("second SET_MEM_TABLE that no longer covers the rings, then a kick", Tolerated, |d| {
            let (fe, raw) = started(d, true)?;
            let (all, fd) = ram_region(fe.ram())?;
            // Only the upper half of guest RAM, at its usual place: the rings (at 0) are gone.
            let half = all.size / 2;
            let region = Region { gpa: half, size: half, uaddr: all.uaddr + half, offset: half };
            let seen = raw.observe(req::SET_MEM_TABLE, &mem_table(1, &[region]), &[fd])?;
            fe.kick().map_err(io_err)?;
            settle();
            Ok(seen.into())
        }),
        case("second SET_MEM_TABLE with overlapping regions while the queue runs, then a flush", Reject, |d| {
            let (mut fe, raw) = started(d, true)?;
            let (region, fd) = ram_region(fe.ram())?;
            let seen = raw.observe(req::SET_MEM_TABLE, &mem_table(2, &[region, region]), &[fd, fd])?;
            if raw.alive() {
                match fe.flush() {
                    Ok(0) => {}
                    other => return Err(format!("flush after a refused table: {other:?}")),
                }
            }
            Ok(seen.into())
        }),
        case("SET_MEM_TABLE with a region at a different guest address under a running queue, then a flush", Tolerated, |d| {
            let (mut fe, raw) = started(d, true)?;
            let (region, fd) = ram_region(fe.ram())?;
            let region = Region { gpa: 1 << 32, ..region };
            let seen = raw.observe(req::SET_MEM_TABLE, &mem_table(1, &[region]), &[fd])?;
            let _ = fe.submit_request(0);
            settle();
            Ok(seen.into())
        }),
        case("RESET_OWNER on a running device, then a kick", Tolerated, |d| {
            let (fe, raw) = started(d, true)?;
            let seen = raw.observe(req::RESET_OWNER, &[], &[])?;
            let _ = fe.kick();
            settle();
            Ok(seen.into())
        }),
    ]
}

/// Cases the daemon cannot survive, kept runnable (`--ignored`) so the limitation stays visible:
/// the frontend is trusted with guest memory, as in every vhost-user backend.
fn frontend_trust_cases() -> Vec<Case> {
    vec![case(
        "guest memory fd truncated to 0 by the frontend after SET_MEM_TABLE, then a kick",
        Tolerated,
        |d| {
            let dev = raw_device(d, true)?;
            let fd = dev
                .ram
                .region_infos()
                .map_err(io_err)?
                .remove(0)
                .mmap_handle;
            // SAFETY: `fd` is the memfd owned by `dev.ram`, alive here. Shrinking it makes our
            // own mapping of it unusable too; this process does not touch it again.
            if unsafe { libc::ftruncate(fd, 0) } != 0 {
                return Err(format!("ftruncate: {}", std::io::Error::last_os_error()));
            }
            dev.kick.write(1).map_err(|e| e.to_string())?;
            settle();
            // The daemon's own count of what it survived, from a metrics report (without
            // --metrics-path, SIGUSR1 prints it as one JSON line on stderr).
            d.sigusr1();
            let deadline = Instant::now() + Duration::from_secs(10);
            let faults = loop {
                let log = d.log();
                let last = log.lines().rev().find(|l| l.starts_with("{\"version\""));
                if let Some(m) = last.and_then(|l| {
                    pmem_metrics::Metrics::parse(std::path::Path::new("stderr"), l).ok()
                }) {
                    break m.counters.memory_faults;
                }
                if Instant::now() > deadline {
                    return Err("no metrics line after SIGUSR1".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if faults == 0 {
                return Err("the daemon counted no guest-memory fault: the test did not reach the cut-off memory".into());
            }
            Ok(Seen::Note("kicked; the daemon survived its guest-memory faults").into())
        },
    )]
}

fn config_cases() -> Vec<Case> {
    fn get_config(
        d: &Daemon,
        offset: u32,
        size: u32,
        flags: u32,
        data_len: usize,
    ) -> Result<Report, String> {
        after_handshake(
            d,
            req::GET_CONFIG,
            config_msg(offset, size, flags, &vec![0u8; data_len]),
            &[],
        )
    }
    vec![
        case("GET_CONFIG of 17 bytes at 0", Reject, |d| {
            get_config(d, 0, 17, 0, 17)
        }),
        case("GET_CONFIG of 4 bytes at 16", Reject, |d| {
            get_config(d, 16, 4, 0, 4)
        }),
        case("GET_CONFIG of 16 bytes at 8", Reject, |d| {
            get_config(d, 8, 16, 0, 16)
        }),
        case(
            "GET_CONFIG of 4084 bytes at 0 (the largest message)",
            Reject,
            |d| get_config(d, 0, 4084, 0, 4084),
        ),
        case(
            "GET_CONFIG of 2 bytes at 0xfff (past the protocol's 4 KiB)",
            Reject,
            |d| get_config(d, 0xfff, 2, 0, 2),
        ),
        case("GET_CONFIG at offset u32::MAX", Reject, |d| {
            get_config(d, u32::MAX, 1, 0, 1)
        }),
        case("GET_CONFIG of 0 bytes", Reject, |d| {
            get_config(d, 0, 0, 0, 0)
        }),
        case(
            "GET_CONFIG whose payload is shorter than its size field",
            Reject,
            |d| get_config(d, 0, 16, 0, 8),
        ),
        case(
            "GET_CONFIG whose payload is longer than its size field",
            Reject,
            |d| get_config(d, 0, 8, 0, 16),
        ),
        case("GET_CONFIG with unknown flags", Reject, |d| {
            get_config(d, 0, 16, 0x80, 16)
        }),
        case("GET_CONFIG shorter than its 12-byte header", Reject, |d| {
            after_handshake(d, req::GET_CONFIG, vec![0; 8], &[])
        }),
        case(
            "SET_CONFIG of 16 bytes (the config space is read-only)",
            Tolerated,
            |d| {
                let raw = Raw::handshaken(d)?;
                let seen = raw.observe(req::SET_CONFIG, &config_msg(0, 16, 0, &[0xff; 16]), &[])?;
                if raw.alive() {
                    raw.c
                        .send(req::GET_CONFIG, 0, &config_msg(0, 16, 0, &[0; 16]), &[])
                        .map_err(io_err)?;
                    match raw.c.recv(ANSWER).map_err(io_err)? {
                        RawReply::Message { payload, .. } if payload[12..] == [0u8; 16] => {}
                        other => return Err(format!("config space after SET_CONFIG: {other:?}")),
                    }
                }
                Ok(seen.into())
            },
        ),
        case("SET_CONFIG at offset 0x1000", Reject, |d| {
            after_handshake(d, req::SET_CONFIG, config_msg(0x1000, 4, 0, &[0; 4]), &[])
        }),
    ]
}

fn unsupported_cases() -> Vec<Case> {
    let plain = |code: u32, payload: Vec<u8>| {
        move |d: &Daemon| after_handshake(d, code, payload.clone(), &[])
    };
    vec![
        case(
            "GET_QUEUE_NUM without MQ",
            Reject,
            plain(req::GET_QUEUE_NUM, vec![]),
        ),
        case(
            "RESET_DEVICE without its protocol feature",
            Reject,
            plain(req::RESET_DEVICE, vec![]),
        ),
        case("SET_LOG_BASE without LOG_SHMFD", Reject, |d| {
            let f = memfd(4096)?;
            after_handshake(
                d,
                req::SET_LOG_BASE,
                [4096u64.to_ne_bytes(), 0u64.to_ne_bytes()].concat(),
                &[f.as_raw_fd()],
            )
        }),
        case("SET_LOG_FD", Reject, |d| {
            let f = eventfd()?;
            after_handshake(d, req::SET_LOG_FD, vec![], &[f.as_raw_fd()])
        }),
        case(
            "GET_INFLIGHT_FD without INFLIGHT_SHMFD",
            Reject,
            plain(req::GET_INFLIGHT_FD, inflight()),
        ),
        case(
            "GET_MAX_MEM_SLOTS without CONFIGURE_MEM_SLOTS",
            Reject,
            plain(req::GET_MAX_MEM_SLOTS, vec![]),
        ),
        case("ADD_MEM_REG without CONFIGURE_MEM_SLOTS", Reject, |d| {
            let f = memfd(MIB)?;
            after_handshake(
                d,
                req::ADD_MEM_REG,
                single_region(&Region {
                    gpa: 0,
                    size: MIB,
                    uaddr: 0,
                    offset: 0,
                }),
                &[f.as_raw_fd()],
            )
        }),
        case("REM_MEM_REG without CONFIGURE_MEM_SLOTS", Reject, |d| {
            after_handshake(
                d,
                req::REM_MEM_REG,
                single_region(&Region {
                    gpa: 0,
                    size: MIB,
                    uaddr: 0,
                    offset: 0,
                }),
                &[],
            )
        }),
        case(
            "SET_STATUS",
            Reject,
            plain(req::SET_STATUS, u64_payload(0xf)),
        ),
        case("GET_STATUS", Reject, plain(req::GET_STATUS, vec![])),
        case(
            "GET_SHARED_OBJECT",
            Reject,
            plain(req::GET_SHARED_OBJECT, vec![0; 16]),
        ),
        case("SET_DEVICE_STATE_FD", Reject, |d| {
            let (r, _w) = pipe()?;
            after_handshake(
                d,
                req::SET_DEVICE_STATE_FD,
                [0u32.to_ne_bytes(), 0u32.to_ne_bytes()].concat(),
                &[r.as_raw_fd()],
            )
        }),
        case(
            "CHECK_DEVICE_STATE",
            Tolerated,
            plain(req::CHECK_DEVICE_STATE, vec![]),
        ),
        case(
            "POSTCOPY_ADVISE",
            Reject,
            plain(req::POSTCOPY_ADVISE, vec![]),
        ),
        case("SEND_RARP", Reject, plain(req::SEND_RARP, u64_payload(0))),
        case("IOTLB_MSG", Reject, plain(req::IOTLB_MSG, vec![0; 40])),
        case(
            "SET_VRING_ENDIAN",
            Reject,
            plain(req::SET_VRING_ENDIAN, vring_state(0, 1)),
        ),
        case(
            "VRING_KICK (in-band notification)",
            Reject,
            plain(req::VRING_KICK, vring_state(0, 0)),
        ),
        case("GPU_SET_SOCKET with a socket", Reject, |d| {
            let (a, _b) = UnixStream::pair().map_err(|e| e.to_string())?;
            after_handshake(d, req::GPU_SET_SOCKET, vec![], &[a.as_raw_fd()])
        }),
        case(
            "GET_INFLIGHT_FD with INFLIGHT_SHMFD force-acked",
            Reject,
            |d| after_forced_handshake(d, req::GET_INFLIGHT_FD, inflight(), &[]),
        ),
        case("SET_LOG_BASE with LOG_SHMFD force-acked", Tolerated, |d| {
            let f = memfd(4096)?;
            after_forced_handshake(
                d,
                req::SET_LOG_BASE,
                [4096u64.to_ne_bytes(), 0u64.to_ne_bytes()].concat(),
                &[f.as_raw_fd()],
            )
        }),
        case(
            "RESET_DEVICE with its feature force-acked",
            Tolerated,
            |d| after_forced_handshake(d, req::RESET_DEVICE, vec![], &[]),
        ),
        case(
            "ADD_MEM_REG of a zero-sized region with CONFIGURE_MEM_SLOTS force-acked",
            Reject,
            |d| {
                let f = memfd(MIB)?;
                after_forced_handshake(
                    d,
                    req::ADD_MEM_REG,
                    single_region(&Region {
                        gpa: 0,
                        size: 0,
                        uaddr: 0,
                        offset: 0,
                    }),
                    &[f.as_raw_fd()],
                )
            },
        ),
        case(
            "ADD_MEM_REG of a region overlapping the table, CONFIGURE_MEM_SLOTS force-acked",
            Reject,
            |d| {
                let raw = Raw::handshaken_with(d, u64::MAX)?;
                let (f, g) = (memfd(MIB)?, memfd(MIB)?);
                let region = Region {
                    gpa: 0,
                    size: MIB,
                    uaddr: 0x7000_0000_0000,
                    offset: 0,
                };
                raw.ok(
                    req::SET_MEM_TABLE,
                    &mem_table(1, &[region]),
                    &[f.as_raw_fd()],
                )?;
                Ok(raw
                    .observe(req::ADD_MEM_REG, &single_region(&region), &[g.as_raw_fd()])?
                    .into())
            },
        ),
        case(
            "REM_MEM_REG of a region that is not there, CONFIGURE_MEM_SLOTS force-acked",
            Reject,
            |d| {
                after_forced_handshake(
                    d,
                    req::REM_MEM_REG,
                    single_region(&Region {
                        gpa: 1 << 40,
                        size: MIB,
                        uaddr: 0,
                        offset: 0,
                    }),
                    &[],
                )
            },
        ),
    ]
}

/// Every group, in the order the tests run them.
fn catalogue() -> Vec<(&'static str, Vec<Case>)> {
    vec![
        ("framing", framing_cases()),
        ("ordering", ordering_cases()),
        ("backend-channel", backend_channel_cases()),
        ("mem-table", mem_table_cases()),
        ("vring", vring_cases()),
        ("ring", ring_cases()),
        ("mem-update", mem_update_cases()),
        ("config", config_cases()),
        ("unsupported", unsupported_cases()),
    ]
}

// ---------------------------------------------------------------------------------------------
// Watching the daemon.

/// utime + stime of a process.
fn cpu_time(pid: i32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start with the state (field 3).
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

fn count_entries(dir: String) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// (open fds, threads)
fn resources(pid: i32) -> (usize, usize) {
    (
        count_entries(format!("/proc/{pid}/fd")),
        count_entries(format!("/proc/{pid}/task")),
    )
}

/// A new frontend negotiates, gets SHMEM_MAP for the whole file, and a flush answers 0.
fn healthy(d: &Daemon) -> Result<(), String> {
    count_connection();
    let mut fe = Frontend::connect_with(&d.socket, Options::default())
        .map_err(|e| format!("a new connection failed: {e}"))?;
    let map = fe
        .start()
        .map_err(|e| format!("a new connection did not start: {e}"))?;
    if map.len() as u64 != FILE_SIZE {
        return Err(format!("SHMEM_MAP of {} bytes", map.len()));
    }
    match fe.flush() {
        Ok(0) => Ok(()),
        other => Err(format!("a flush on a new connection: {other:?}")),
    }
}

fn log_tail(d: &Daemon, lines: usize) -> String {
    let log = d.log();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A daemon's resources when it waits for a frontend, and how many connections the test
/// thread had made by then.
#[derive(Clone, Copy, Debug)]
struct Baseline {
    fds: usize,
    threads: usize,
    connections: usize,
}

struct Runner {
    env: Env,
    daemon: Daemon,
    starts: usize,
    baseline: Baseline,
    /// Fds every connection leaks whatever it does (see `reconnects_do_not_leak_fds`), so that
    /// the per-case check finds what a bad input leaks on top of that.
    leak_per_connection: usize,
}

impl Runner {
    fn new() -> Runner {
        let env = Env::new();
        env.create_file(FILE_SIZE);
        let daemon = Daemon::start(&env.args(&[]), &env.socket, &env.path("daemon-0.log"));
        let mut r = Runner {
            env,
            daemon,
            starts: 1,
            baseline: Baseline {
                fds: 0,
                threads: 0,
                connections: 0,
            },
            leak_per_connection: 0,
        };
        r.calibrate();
        let before = r.baseline;
        for _ in 0..4 {
            healthy(&r.daemon).unwrap_or_else(|e| panic!("fresh daemon unhealthy: {e}"));
        }
        r.calibrate();
        r.leak_per_connection = (r.baseline.fds.saturating_sub(before.fds)).div_ceil(5);
        r
    }

    /// Takes the fd and thread counts of a daemon that has served one connection and is
    /// waiting for the next.
    fn calibrate(&mut self) {
        healthy(&self.daemon).unwrap_or_else(|e| panic!("fresh daemon unhealthy: {e}"));
        std::thread::sleep(Duration::from_millis(200));
        let (fds, threads) = resources(self.daemon.pid());
        self.baseline = Baseline {
            fds,
            threads,
            connections: connections(),
        };
    }

    /// Replaces the daemon (killed first if it still runs, so that its socket and lock are
    /// free) with a fresh one, so that the remaining cases run against a working daemon.
    fn restart(&mut self) {
        if self.daemon.is_running() {
            self.daemon.signal_and_wait(libc::SIGKILL);
        }
        let log = self.env.path(&format!("daemon-{}.log", self.starts));
        self.starts += 1;
        self.daemon = Daemon::start(&self.env.args(&[]), &self.env.socket, &log);
        self.calibrate();
    }

    /// Runs one case and every check after it. Returns the problems found.
    fn run(&mut self, group: &str, c: &Case) -> Vec<String> {
        let mut problems = Vec::new();
        let started = Instant::now();
        let report = (c.run)(&self.daemon);
        let (seen, keep) = match report {
            Ok(r) => (Some(r.seen), r.keep),
            Err(e) => {
                problems.push(format!("the case itself failed: {e}"));
                (None, vec![])
            }
        };
        if let (Some(seen), Expect::Reject) = (&seen, c.expect) {
            if !seen.is_rejection() {
                problems.push(format!("accepted ({seen:?}) where a refusal was due"));
            }
        }

        // Idle: nobody is connected now (the case dropped its connections).
        let pid = self.daemon.pid();
        let before = cpu_time(pid);
        std::thread::sleep(IDLE_WINDOW);
        if let (Some(a), Some(b)) = (before, cpu_time(pid)) {
            if b.saturating_sub(a) > IDLE_CPU_LIMIT {
                problems.push(format!(
                    "idle daemon used {:?} of CPU in {IDLE_WINDOW:?} (a thread spins)",
                    b.saturating_sub(a)
                ));
            }
        }

        let mut restart = false;
        let mut dead = false;
        if let Some(status) = self.daemon.wait_exit(Duration::ZERO) {
            problems.push(format!(
                "daemon died: {status}{}",
                status
                    .signal()
                    .map(|s| format!(
                        " (signal {s}{})",
                        if s == libc::SIGBUS { ", SIGBUS" } else { "" }
                    ))
                    .unwrap_or_default()
            ));
            dead = true;
        } else if let Err(e) = healthy(&self.daemon) {
            problems.push(e);
            restart = true;
        }
        drop(keep);

        if !dead && !restart {
            // Back to the baseline once the daemon is waiting again (it tears the last
            // connection down asynchronously).
            let base = self.baseline;
            let allowed_fds =
                base.fds + (connections() - base.connections) * self.leak_per_connection;
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                let (fds, threads) = resources(pid);
                if fds <= allowed_fds && threads <= base.threads {
                    break;
                }
                if Instant::now() >= deadline {
                    problems.push(format!(
                        "{fds} fds and {threads} threads stay above the {allowed_fds} fds and \
                         {} threads expected (a leak)",
                        base.threads
                    ));
                    // Compare later cases against the new level.
                    self.baseline = Baseline {
                        fds,
                        threads,
                        connections: connections(),
                    };
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        eprintln!(
            "protocol_abuse {group:16} {:?} {:<9} {:<28} {} ({} ms)",
            c.expect,
            if problems.is_empty() { "ok" } else { "FAIL" },
            seen.map(|s| format!("{s:?}")).unwrap_or_else(|| "-".into()),
            c.name,
            started.elapsed().as_millis()
        );
        if !problems.is_empty() {
            problems.push(format!("daemon log tail:\n{}", log_tail(&self.daemon, 25)));
        }
        if dead || restart {
            self.restart();
        }
        problems
    }
}

fn run_group(name: &str) {
    let (_, cases) = catalogue()
        .into_iter()
        .find(|(g, _)| *g == name)
        .expect("group exists");
    run_cases(name, cases);
}

fn run_cases(name: &str, cases: Vec<Case>) {
    // PROTOCOL_ABUSE_CASE=text runs only the cases whose name contains `text`.
    let only = std::env::var("PROTOCOL_ABUSE_CASE").ok();
    let cases: Vec<Case> = cases
        .into_iter()
        .filter(|c| only.as_deref().is_none_or(|o| c.name.contains(o)))
        .collect();
    if cases.is_empty() {
        return;
    }
    let mut runner = Runner::new();
    let mut failures = Vec::new();
    for c in &cases {
        let problems = runner.run(name, c);
        if !problems.is_empty() {
            failures.push(format!("[{name}] {}:\n  {}", c.name, problems.join("\n  ")));
        }
    }
    eprintln!(
        "protocol_abuse {name}: {} bad inputs, {} failed",
        cases.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

/// Every connection must give back what it took: a daemon that serves QEMU restart after QEMU
/// restart (a CI machine booting VMs all day) must not run out of file descriptors.
#[test]
fn reconnects_do_not_leak_fds() {
    let env = Env::new();
    env.create_file(FILE_SIZE);
    let d = env.start(&[]);
    healthy(&d).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (before, _) = resources(d.pid());
    const N: usize = 50;
    for _ in 0..N {
        // The lightest connection there is: GET_FEATURES, then close.
        pmem_frontend::probe(&d.socket, ANSWER).unwrap();
    }
    healthy(&d).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (after, _) = resources(d.pid());
    // What the fds are, by kind, for the failure message.
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for e in std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(e.path()) {
            *kinds.entry(target.display().to_string()).or_default() += 1;
        }
    }
    assert!(
        after <= before,
        "{N} connections left {} more open fds in the daemon ({before} -> {after}); its fds \
         now: {kinds:?}",
        after - before,
    );
}

/// A frontend that truncates a guest-memory file after SET_MEM_TABLE: the daemon's next access
/// faults (SIGBUS), and the daemon must live on and keep serving (`memory_guard.rs`).
#[test]
fn frontend_truncating_guest_memory() {
    run_cases("frontend-trust", frontend_trust_cases());
}

#[test]
fn catalogue_of_bad_inputs() {
    let groups = catalogue();
    let mut names = std::collections::HashSet::new();
    let mut total = 0;
    for (group, cases) in &groups {
        let rejects = cases.iter().filter(|c| c.expect == Reject).count();
        eprintln!(
            "protocol_abuse catalogue: {group}: {} bad inputs ({rejects} must be refused)",
            cases.len()
        );
        for c in cases {
            assert!(names.insert(c.name), "duplicate case name {:?}", c.name);
        }
        total += cases.len();
    }
    eprintln!(
        "protocol_abuse catalogue: {total} distinct bad inputs in {} groups",
        groups.len()
    );
    assert!(total >= 100, "the catalogue shrank to {total}");
}

#[test]
fn framing() {
    run_group("framing");
}

#[test]
fn ordering() {
    run_group("ordering");
}

#[test]
fn backend_channel() {
    run_group("backend-channel");
}

#[test]
fn memory_tables() {
    run_group("mem-table");
}

#[test]
fn vring() {
    run_group("vring");
}

#[test]
fn ring() {
    run_group("ring");
}

#[test]
fn mem_update() {
    run_group("mem-update");
}

#[test]
fn config() {
    run_group("config");
}

#[test]
fn unsupported() {
    run_group("unsupported");
}
