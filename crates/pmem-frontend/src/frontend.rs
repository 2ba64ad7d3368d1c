//! The frontend: connects to a vhost-user-pmem backend and drives it the way QEMU's
//! `vhost-user-test-device-pci` (virtio-id 27) does, with a Linux-like driver on top.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserShMemConfig};
use vhost::vhost_user::{
    Frontend as VhostUserConnection, VhostUserFrontend, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::{Bytes, GuestAddress};

use crate::backend_channel::{BackendChannel, ShmemMapping};
use crate::error::{Error, Result};
use crate::memory::GuestRam;
use crate::raw::RawConnection;
use crate::vring::{
    DescSpec, NotifyCounts, SplitVring, Used, AVAIL_RING_ADDR, DESC_TABLE_ADDR, SCRATCH_BASE,
    SLOT_REQUEST_OFFSET, SLOT_STATUS_OFFSET, USED_RING_ADDR,
};
use crate::watchdog::Watchdog;

/// `VIRTIO_PMEM_F_SHMEM_REGION`: the pmem range is shared-memory region 0.
pub const VIRTIO_PMEM_F_SHMEM_REGION: u64 = 1 << 0;
/// `VIRTIO_F_VERSION_1`.
pub const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const RING_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const RING_INDIRECT_DESC: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// Size of the virtio-pmem config space `{le64 start; le64 size}`.
pub const CONFIG_SIZE: u32 = 16;
/// virtio-pmem request type FLUSH.
pub const REQ_TYPE_FLUSH: u32 = 0;
/// Value the harness puts in a status buffer before submitting, so that a test can tell
/// whether the device wrote it.
pub const STATUS_SENTINEL: u32 = 0x5a5a_5a5a;
/// The only queue of a virtio-pmem device.
const QUEUE_INDEX: usize = 0;

/// How the frontend behaves.
#[derive(Clone, Debug)]
pub struct Options {
    /// Queue size (power of two, at most 1024).
    pub queue_size: u16,
    /// Whether the driver acks RING_EVENT_IDX when offered.
    pub ack_event_idx: bool,
    /// Whether the driver acks RING_INDIRECT_DESC when offered.
    pub ack_indirect_desc: bool,
    /// With EVENT_IDX negotiated, leave out the kicks the device's `avail_event` does not ask
    /// for, as the Linux driver does. Off by default: tests that change the rings behind the
    /// harness's back rely on every submission kicking.
    pub skip_unneeded_kicks: bool,
    /// Ring index the queue starts at (SET_VRING_BASE of the first start). Non-zero values
    /// exercise the 16-bit wrap-around, as after a migration.
    pub ring_base: u16,
    /// Guest RAM size in bytes (at least 16 MiB, see `vring` for the layout).
    pub guest_memory_size: u64,
    /// Upper bound for every wait: connect, replies, SHMEM_MAP, used entries.
    pub timeout: Duration,
    /// Protocol features the frontend supports; it acks these where offered.
    pub protocol_features: VhostUserProtocolFeatures,
    /// If set, `start()` fails unless the SHMEM_MAP's WRITABLE flag is `!read_only`.
    pub expect_read_only: Option<bool>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            queue_size: 256,
            ack_event_idx: true,
            ack_indirect_desc: true,
            skip_unneeded_kicks: false,
            ring_base: 0,
            guest_memory_size: 16 << 20,
            timeout: Duration::from_secs(5),
            protocol_features: VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::BACKEND_REQ
                | VhostUserProtocolFeatures::BACKEND_SEND_FD
                | VhostUserProtocolFeatures::SHMEM,
            expect_read_only: None,
        }
    }
}

/// The outcome of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The used element.
    pub used: Used,
    /// The status buffer's content after completion, as a signed `le32`
    /// (`STATUS_SENTINEL as i32` if the device did not write it).
    pub status: i32,
}

/// A vhost-user frontend connected to a virtio-pmem backend.
pub struct Frontend {
    // Field order is drop order: close the main socket first so the backend sees the
    // disconnect, then stop the channel thread.
    conn: VhostUserConnection,
    channel: BackendChannel,
    vring: SplitVring,
    ram: GuestRam,
    opts: Options,
    offered_features: u64,
    offered_protocol_features: VhostUserProtocolFeatures,
    acked_protocol_features: VhostUserProtocolFeatures,
    acked_features: Option<u64>,
    /// SET_VRING_BASE for the next start (GET_VRING_BASE's answer after a stop).
    next_base: u16,
    running: bool,
    /// Bounds the requests above; see `watchdog`. Requests sent through
    /// [`Self::connection`] are not bounded by it.
    watchdog: Watchdog,
}

impl Frontend {
    /// Connects with default options and performs the initial negotiation.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self> {
        Self::connect_with(path, Options::default())
    }

    /// Connects and performs what QEMU does when the device is created: GET_FEATURES,
    /// GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, SET_BACKEND_REQ_FD, SET_OWNER.
    pub fn connect_with(path: impl AsRef<Path>, opts: Options) -> Result<Self> {
        check_options(&opts)?;
        let stream = connect_socket(path.as_ref(), opts.timeout)?;
        Self::negotiate(stream, opts)
    }

    /// What [`Self::connect_with`] does after connecting, on a stream connected either way
    /// (see [`FrontendListener`] for backends that connect to the frontend).
    fn negotiate(stream: UnixStream, opts: Options) -> Result<Self> {
        // Bounds every reply we wait for, so a hung backend fails the test instead of
        // hanging it.
        stream
            .set_read_timeout(Some(opts.timeout))
            .map_err(Error::io("set socket timeout"))?;
        let watchdog = Watchdog::new(
            stream
                .try_clone()
                .map_err(Error::io("dup socket for the watchdog"))?,
        )?;
        let armed = watchdog.arm(opts.timeout);
        let mut conn = VhostUserConnection::from_stream(stream, 1);

        let offered_features = conn
            .get_features()
            .map_err(|e| watchdog.error("GET_FEATURES", opts.timeout, e))?;
        if offered_features & PROTOCOL_FEATURES == 0 {
            return Err(Error::Protocol(format!(
                "features {offered_features:#x} lack PROTOCOL_FEATURES"
            )));
        }
        let offered_protocol_features = conn
            .get_protocol_features()
            .map_err(|e| watchdog.error("GET_PROTOCOL_FEATURES", opts.timeout, e))?;
        let acked_protocol_features = offered_protocol_features & opts.protocol_features;
        conn.set_protocol_features(acked_protocol_features)
            .map_err(|e| watchdog.error("SET_PROTOCOL_FEATURES", opts.timeout, e))?;
        let reply_ack = acked_protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK);
        if reply_ack {
            // Like QEMU, ask for an ack of every request that has no reply of its own:
            // failures then surface at the request that caused them.
            conn.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
        }

        let (channel, backend_end) = BackendChannel::start(reply_ack)?;
        if acked_protocol_features.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            conn.set_backend_request_fd(&backend_end)
                .map_err(|e| watchdog.error("SET_BACKEND_REQ_FD", opts.timeout, e))?;
        }
        drop(backend_end);
        conn.set_owner()
            .map_err(|e| watchdog.error("SET_OWNER", opts.timeout, e))?;
        drop(armed);

        let ram = GuestRam::new(opts.guest_memory_size)?;
        let vring = SplitVring::new(ram.mem(), opts.queue_size, opts.ring_base, false)?;
        let next_base = opts.ring_base;
        Ok(Frontend {
            conn,
            channel,
            vring,
            ram,
            opts,
            offered_features,
            offered_protocol_features,
            acked_protocol_features,
            acked_features: None,
            next_base,
            running: false,
            watchdog,
        })
    }

    /// Virtio features the backend offered (GET_FEATURES).
    pub fn features(&self) -> u64 {
        self.offered_features
    }

    /// Protocol features the backend offered (GET_PROTOCOL_FEATURES).
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.offered_protocol_features
    }

    /// Protocol features the frontend acked.
    pub fn acked_protocol_features(&self) -> VhostUserProtocolFeatures {
        self.acked_protocol_features
    }

    /// Virtio features sent with the last SET_FEATURES.
    pub fn acked_features(&self) -> Option<u64> {
        self.acked_features
    }

    /// The options in use.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// GET_CONFIG of the whole 16-byte config space.
    pub fn get_config(&mut self) -> Result<Vec<u8>> {
        let _armed = self.watchdog.arm(self.opts.timeout);
        let buf = vec![0u8; CONFIG_SIZE as usize];
        let (_, payload) = self
            .conn
            .get_config(0, CONFIG_SIZE, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(|e| self.watchdog.error("GET_CONFIG", self.opts.timeout, e))?;
        Ok(payload)
    }

    /// GET_SHMEM_CONFIG.
    pub fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        let _armed = self.watchdog.arm(self.opts.timeout);
        self.conn.get_shmem_config().map_err(|e| {
            self.watchdog
                .error("GET_SHMEM_CONFIG", self.opts.timeout, e)
        })
    }

    /// The features a Linux virtio-pmem driver would ack, given the options.
    pub fn driver_features(&self) -> u64 {
        let mut wanted = VERSION_1 | VIRTIO_PMEM_F_SHMEM_REGION | PROTOCOL_FEATURES;
        if self.opts.ack_event_idx {
            wanted |= RING_EVENT_IDX;
        }
        if self.opts.ack_indirect_desc {
            wanted |= RING_INDIRECT_DESC;
        }
        self.offered_features & wanted
    }

    /// Starts the device in QEMU's order and waits for the SHMEM_MAP it triggers:
    /// SET_FEATURES, SET_MEM_TABLE, then for the queue SET_VRING_NUM, _BASE, _ADDR,
    /// _KICK, _CALL, _ENABLE.
    pub fn start(&mut self) -> Result<Arc<ShmemMapping>> {
        let maps_before = self.channel.map_count();
        self.start_no_wait()?;
        let mapping = self.channel.wait_map(maps_before + 1, self.opts.timeout)?;
        if let Some(read_only) = self.opts.expect_read_only {
            if mapping.writable() == read_only {
                return Err(Error::Protocol(format!(
                    "SHMEM_MAP flags {:#x} but the device should be {}",
                    { mapping.request.flags },
                    if read_only { "read-only" } else { "writable" }
                )));
            }
        }
        Ok(mapping)
    }

    /// [`Self::start`] without waiting for the SHMEM_MAP.
    pub fn start_no_wait(&mut self) -> Result<()> {
        let _armed = self.watchdog.arm(self.opts.timeout);
        let features = self.driver_features();
        self.conn
            .set_features(features)
            .map_err(|e| self.watchdog.error("SET_FEATURES", self.opts.timeout, e))?;
        self.acked_features = Some(features);
        self.vring.set_event_idx(features & RING_EVENT_IDX != 0);
        self.vring.set_skip_kicks(self.opts.skip_unneeded_kicks);

        let regions = self.ram.region_infos()?;
        self.conn
            .set_mem_table(&regions)
            .map_err(|e| self.watchdog.error("SET_MEM_TABLE", self.opts.timeout, e))?;

        let size = self.vring.size();
        self.conn
            .set_vring_num(QUEUE_INDEX, size)
            .map_err(|e| self.watchdog.error("SET_VRING_NUM", self.opts.timeout, e))?;
        self.conn
            .set_vring_base(QUEUE_INDEX, self.next_base)
            .map_err(|e| self.watchdog.error("SET_VRING_BASE", self.opts.timeout, e))?;
        // With vhost-user, ring addresses are frontend virtual addresses; the backend
        // translates them through the memory table.
        let host = |gpa: u64| self.ram.host_address(gpa);
        let config = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: host(DESC_TABLE_ADDR)?,
            used_ring_addr: host(USED_RING_ADDR)?,
            avail_ring_addr: host(AVAIL_RING_ADDR)?,
            log_addr: None,
        };
        self.conn
            .set_vring_addr(QUEUE_INDEX, &config)
            .map_err(|e| self.watchdog.error("SET_VRING_ADDR", self.opts.timeout, e))?;
        self.conn
            .set_vring_kick(QUEUE_INDEX, self.vring.kick_fd())
            .map_err(|e| self.watchdog.error("SET_VRING_KICK", self.opts.timeout, e))?;
        self.conn
            .set_vring_call(QUEUE_INDEX, self.vring.call_fd())
            .map_err(|e| self.watchdog.error("SET_VRING_CALL", self.opts.timeout, e))?;
        self.conn.set_vring_enable(QUEUE_INDEX, true).map_err(|e| {
            self.watchdog
                .error("SET_VRING_ENABLE", self.opts.timeout, e)
        })?;
        self.running = true;
        Ok(())
    }

    /// Stops the device like QEMU: SET_VRING_ENABLE 0, then GET_VRING_BASE, whose answer
    /// the next [`Self::start`] sends back with SET_VRING_BASE. Returns that base.
    pub fn stop(&mut self) -> Result<u16> {
        let _armed = self.watchdog.arm(self.opts.timeout);
        self.conn
            .set_vring_enable(QUEUE_INDEX, false)
            .map_err(|e| {
                self.watchdog
                    .error("SET_VRING_ENABLE", self.opts.timeout, e)
            })?;
        let base = self
            .conn
            .get_vring_base(QUEUE_INDEX)
            .map_err(|e| self.watchdog.error("GET_VRING_BASE", self.opts.timeout, e))?;
        let base = u16::try_from(base)
            .map_err(|_| Error::Protocol(format!("GET_VRING_BASE answered {base}")))?;
        self.next_base = base;
        self.running = false;
        Ok(base)
    }

    /// Closes the connection (the backend should go back to listening).
    pub fn disconnect(self) {
        drop(self);
    }

    /// The latest SHMEM_MAP received, if any.
    pub fn shmem(&self) -> Option<Arc<ShmemMapping>> {
        self.channel.maps().pop()
    }

    /// Every SHMEM_MAP received on this connection, oldest first.
    pub fn shmem_maps(&self) -> Vec<Arc<ShmemMapping>> {
        self.channel.maps()
    }

    /// Every SHMEM_UNMAP received on this connection.
    pub fn shmem_unmaps(&self) -> Vec<vhost::vhost_user::message::VhostUserMMap> {
        self.channel.unmaps()
    }

    /// Waits until `count` SHMEM_MAPs have arrived on this connection; returns the last.
    pub fn wait_shmem_map(&self, count: usize) -> Result<Arc<ShmemMapping>> {
        self.channel.wait_map(count, self.opts.timeout)
    }

    /// Makes the backend channel answer every later SHMEM_MAP with an error (`true`), as
    /// QEMU does when it cannot mmap the fd, or accept them again (`false`).
    pub fn refuse_shmem_maps(&self, refuse: bool) {
        self.channel.refuse_maps(refuse);
    }

    /// Waits until `count` SHMEM_MAPs have been refused on this connection.
    pub fn wait_shmem_refusals(&self, count: usize) -> Result<()> {
        self.channel.wait_refused(count, self.opts.timeout)
    }

    /// Guest RAM size.
    pub fn guest_memory_size(&self) -> u64 {
        self.ram.size()
    }

    /// First guest address the harness never touches; tests may use everything from here
    /// to [`Self::guest_memory_size`].
    pub fn scratch_addr(&self) -> u64 {
        SCRATCH_BASE
    }

    /// Reads guest RAM.
    pub fn read_guest(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.ram.mem().read_slice(&mut buf, GuestAddress(addr))?;
        Ok(buf)
    }

    /// Writes guest RAM.
    pub fn write_guest(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.ram.mem().write_slice(data, GuestAddress(addr))?;
        Ok(())
    }

    /// Reads a `le32` from guest RAM.
    pub fn read_u32(&self, addr: u64) -> Result<u32> {
        Ok(u32::from_le(self.ram.mem().read_obj(GuestAddress(addr))?))
    }

    /// Writes a `le32` to guest RAM.
    pub fn write_u32(&self, addr: u64, value: u32) -> Result<()> {
        Ok(self
            .ram
            .mem()
            .write_obj(value.to_le(), GuestAddress(addr))?)
    }

    /// Puts an arbitrary chain on the queue and kicks. Returns the head index.
    pub fn submit_chain(&mut self, chain: &[DescSpec]) -> Result<u16> {
        let ids = self.vring.alloc(chain.len())?;
        let head = self.vring.publish(self.ram.mem(), ids, chain)?;
        self.vring.kick_if_needed(self.ram.mem())?;
        Ok(head)
    }

    /// Puts a well-formed request on the queue the way the Linux driver does (4-byte
    /// readable request, 4-byte writable status preset to [`STATUS_SENTINEL`]) and kicks.
    /// The buffers live in the head's slot; see [`Self::request_status`].
    pub fn submit_request(&mut self, req_type: u32) -> Result<u16> {
        let ids = self.vring.alloc(2)?;
        let slot = SplitVring::slot_addr(ids[0]);
        let (req, status) = (slot + SLOT_REQUEST_OFFSET, slot + SLOT_STATUS_OFFSET);
        self.write_u32(req, req_type)?;
        self.write_u32(status, STATUS_SENTINEL)?;
        let chain = [DescSpec::readable(req, 4), DescSpec::writable(status, 4)];
        let head = self.vring.publish(self.ram.mem(), ids, &chain)?;
        self.vring.kick_if_needed(self.ram.mem())?;
        Ok(head)
    }

    /// The status a request from [`Self::submit_request`] got (read it before the head is
    /// reused by another submission).
    pub fn request_status(&self, head: u16) -> Result<i32> {
        Ok(self.read_u32(SplitVring::slot_addr(head) + SLOT_STATUS_OFFSET)? as i32)
    }

    /// Guest address of the status buffer [`Self::submit_request`] uses for `head`.
    pub fn request_status_addr(&self, head: u16) -> u64 {
        SplitVring::slot_addr(head) + SLOT_STATUS_OFFSET
    }

    /// Kicks the queue without publishing anything, as a guest does after it has changed the
    /// rings behind the harness's back (see [`Self::write_guest`]).
    pub fn kick(&self) -> Result<()> {
        self.vring.kick()
    }

    /// Takes the next used element if the device has published one, without waiting and
    /// without asking for a call (with EVENT_IDX, `used_event` stays where it was).
    pub fn try_used(&mut self) -> Result<Option<Used>> {
        self.vring.try_used(self.ram.mem())
    }

    /// Kicks and calls counted so far on this connection's queue.
    pub fn notify_counts(&self) -> Result<NotifyCounts> {
        self.vring.notify_counts()
    }

    /// Waits for the next used element (frees its descriptors).
    pub fn wait_used(&mut self, timeout: Duration) -> Result<Used> {
        self.vring.wait_used(self.ram.mem(), timeout)
    }

    /// Submits one request of `req_type` and waits for its completion. Expects nothing
    /// else in flight.
    pub fn request(&mut self, req_type: u32) -> Result<Completion> {
        let head = self.submit_request(req_type)?;
        let used = self.wait_used(self.opts.timeout)?;
        if used.id != u32::from(head) {
            return Err(Error::Protocol(format!(
                "completed head {} while {head} was the only one in flight",
                used.id
            )));
        }
        Ok(Completion {
            used,
            status: self.request_status(head)?,
        })
    }

    /// One virtio-pmem FLUSH, as the guest driver does it. Returns the device's status
    /// (0 success, -1 failure). A completion without a written status is an error.
    pub fn flush(&mut self) -> Result<i32> {
        let c = self.request(REQ_TYPE_FLUSH)?;
        if c.used.len != 4 {
            return Err(Error::Protocol(format!(
                "flush completed with used len {} (status {:#x})",
                c.used.len, c.status
            )));
        }
        Ok(c.status)
    }

    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.vring.in_flight()
    }

    /// Whether the device has been started and not stopped.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The underlying vhost connection, for requests the harness does not wrap.
    pub fn connection(&mut self) -> &mut VhostUserConnection {
        &mut self.conn
    }

    /// A [`RawConnection`] on this frontend's socket (a duplicate of the fd), for requests the
    /// vhost crate will not encode. Whatever it sends, its replies must be read from it too.
    pub fn raw_connection(&self) -> Result<RawConnection> {
        // SAFETY: the fd belongs to `self.conn`, which outlives this call; it is only
        // duplicated here, never closed.
        let fd = unsafe { BorrowedFd::borrow_raw(self.conn.as_raw_fd()) }
            .try_clone_to_owned()
            .map_err(Error::io("dup frontend socket"))?;
        Ok(RawConnection::from_stream(UnixStream::from(fd)))
    }

    /// Guest RAM (for example to send its regions again with SET_MEM_TABLE).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Raw fd of the main socket.
    pub fn socket_fd(&self) -> i32 {
        self.conn.as_raw_fd()
    }
}

fn check_options(opts: &Options) -> Result<()> {
    if opts.guest_memory_size < SCRATCH_BASE + (1 << 20) {
        return Err(Error::InvalidArgument(format!(
            "guest memory must be at least {} bytes",
            SCRATCH_BASE + (1 << 20)
        )));
    }
    Ok(())
}

/// The frontend as the listening side, like QEMU's `-chardev socket,server=on`: the backend
/// (`vhost-user-pmem --connect`) connects, and each accepted connection is negotiated exactly
/// as [`Frontend::connect_with`] does. The socket file is removed on drop.
pub struct FrontendListener {
    listener: UnixListener,
    path: PathBuf,
}

impl FrontendListener {
    /// Binds and listens on `path` (which must not exist).
    pub fn bind(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let listener = UnixListener::bind(&path).map_err(|source| Error::Connect {
            path: path.display().to_string(),
            source,
        })?;
        // Accepting polls, so that a backend that never connects fails the test in time.
        listener
            .set_nonblocking(true)
            .map_err(Error::io("set listener non-blocking"))?;
        Ok(FrontendListener { listener, path })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits up to `opts.timeout` for a backend to connect, then negotiates like
    /// [`Frontend::connect_with`].
    pub fn accept_with(&self, opts: Options) -> Result<Frontend> {
        check_options(&opts)?;
        let stream = self.accept_stream(opts.timeout)?;
        Frontend::negotiate(stream, opts)
    }

    /// [`Self::accept_with`] with default options.
    pub fn accept(&self) -> Result<Frontend> {
        self.accept_with(Options::default())
    }

    /// Waits up to `timeout` for a backend to connect and returns the bare connection.
    pub fn accept_stream(&self, timeout: Duration) -> Result<UnixStream> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(Error::io("set accepted socket blocking"))?;
                    return Ok(stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(Error::Timeout {
                            what: "a backend to connect",
                            timeout,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("accept")(e)),
            }
        }
    }
}

impl Drop for FrontendListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Proves that a backend is serving on `path`: connects, asks GET_FEATURES, disconnects.
/// Returns the offered features.
///
/// A socket that accepts connections is not enough: the kernel completes connections
/// into the listen backlog before the backend has finished setting up (and a backend
/// may bind its socket before it opens its file).
pub fn probe(path: impl AsRef<Path>, timeout: Duration) -> Result<u64> {
    probe_with(path.as_ref(), timeout, timeout)
}

/// [`probe`] that gives up at once when nothing accepts within `connect`, but once connected
/// waits up to `answer` for the reply.
pub(crate) fn probe_with(path: &Path, connect: Duration, answer: Duration) -> Result<u64> {
    let stream = connect_socket(path, connect)?;
    stream
        .set_read_timeout(Some(answer))
        .map_err(Error::io("set socket timeout"))?;
    let watchdog = Watchdog::new(
        stream
            .try_clone()
            .map_err(Error::io("dup socket for the watchdog"))?,
    )?;
    let _armed = watchdog.arm(answer);
    VhostUserConnection::from_stream(stream, 1)
        .get_features()
        .map_err(|e| watchdog.error("GET_FEATURES", answer, e))
}

/// Connects to `path`, retrying while the backend is not listening yet.
fn connect_socket(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                // Only at connect time, while a freshly started backend binds its socket.
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(Error::Connect {
                    path: path.display().to_string(),
                    source,
                })
            }
        }
    }
}
