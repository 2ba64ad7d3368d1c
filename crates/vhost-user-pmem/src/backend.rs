//! The vhost-user backend: feature negotiation, config space, the shared-memory region, and the
//! request queue's event handler.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use log::{debug, error, info, trace, warn};
use vhost::vhost_user::message::{
    VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserVirtioFeatures,
};
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{
    Address, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::Device;
use crate::flush::FlushJob;
use crate::memory_guard;
use crate::queue::{complete, notify, AfterAnswer, AnswerGate, GuestMemory, Vring};
use crate::ratelimit::RateLimit;
use crate::request::{self, Request};
use crate::shmem::ShmemMapper;
use crate::stats::{PerConnection, Stats};
use crate::sync::{lock, unpoison};
use crate::virtio::{
    CONFIG_SPACE_LEN, MAX_QUEUE_SIZE, NUM_QUEUES, REQUEST_QUEUE, RESP_ERR,
    VIRTIO_PMEM_F_SHMEM_REGION,
};

/// One frontend connection's view of the device.
pub struct PmemBackend {
    device: Arc<Device>,
    /// Tells this connection's vrings apart from an earlier connection's in the flush worker.
    conn_id: u64,
    mem: GuestMemoryAtomic<GuestMemory>,
    event_idx: AtomicBool,
    channel: Mutex<Option<Backend>>,
    exit: Mutex<Option<EventNotifier>>,
    /// The exit-event consumers handed to vhost-user-backend. Its 0.24 epoll handler registers
    /// them with `into_raw_fd()` and never closes them, which would leak one eventfd per
    /// connection; they are closed when this connection's state is dropped.
    exit_consumers: Mutex<Vec<RawFd>>,
    /// Set when the avail ring is corrupt; cleared by the next device start.
    queue_broken: AtomicBool,
    mapper: ShmemMapper,
    bad_input_log: RateLimit,
    /// `memory_guard::faults()` when this connection last looked, to log each new fault once.
    memory_faults_seen: AtomicU64,
    /// Closed when the connection ends and reset with the device, so that a flush answered
    /// after either never reaches the ring.
    answers: Arc<AnswerGate>,
    /// This backend, for the `--poll-us` step the flush worker runs after its answers.
    this: Weak<PmemBackend>,
    /// A thread is polling this connection's queue (`--poll-us`); a second one would only
    /// spin beside it, on a CPU the flush worker or the guest needs.
    polling: AtomicBool,
}

impl PmemBackend {
    pub fn new(
        device: Arc<Device>,
        conn_id: u64,
        mem: GuestMemoryAtomic<GuestMemory>,
    ) -> io::Result<Arc<Self>> {
        let mapper = ShmemMapper::new(device.backing.clone(), device.stats.clone(), conn_id)?;
        Ok(Arc::new_cyclic(|this| PmemBackend {
            device,
            conn_id,
            mem,
            event_idx: AtomicBool::new(false),
            channel: Mutex::new(None),
            exit: Mutex::new(None),
            exit_consumers: Mutex::new(Vec::new()),
            queue_broken: AtomicBool::new(false),
            mapper,
            bad_input_log: RateLimit::new(Duration::from_secs(5), 10),
            memory_faults_seen: AtomicU64::new(memory_guard::faults()),
            answers: Arc::default(),
            this: this.clone(),
            polling: AtomicBool::new(false),
        }))
    }

    /// Stops the vring worker threads after the connection has ended. A vring thread still in
    /// an fdatasync stops once it returns; its answer is dropped.
    pub fn signal_exit(&self) {
        self.answers.close();
        if let Some(n) = lock(&self.exit).as_ref() {
            if let Err(e) = n.notify() {
                warn!("cannot stop the vring worker: {e}");
            }
        }
    }

    /// Serves every available chain; returns whether it answered any itself. Returns `None` once
    /// the ring itself is corrupt: then nothing on it can be trusted, and the queue stays
    /// stopped until the driver restarts the device (virtio's DEVICE_NEEDS_RESET); retrying
    /// would only spin on the same bad index. `polled`: called by a poll rather than a kick,
    /// which may find the queue stopped by the frontend (GET_VRING_BASE) since it looked.
    fn process_queue(&self, vring: &Vring, polled: bool) -> Option<bool> {
        if self.queue_broken.load(Ordering::Relaxed) {
            return None;
        }
        let mem = self.mem.memory();
        let chains: Vec<_> = {
            let mut state = vring.get_mut();
            if polled && !state.get_queue().ready() {
                return None;
            }
            match state.get_queue_mut().iter(mem.clone()) {
                Ok(iter) => iter.collect(),
                Err(e) => {
                    self.queue_broken.store(true, Ordering::Relaxed);
                    error!(
                        "guest queue is corrupt ({e}); it stays stopped until the driver \
                         restarts the device"
                    );
                    return None;
                }
            }
        };
        // Every chain above is off the ring now; the fdatasync that answers a flush must start
        // after this instant.
        let popped = Instant::now();
        let mut completed_here = false;
        let mut flushes = Vec::new();
        let after_answer = self.after_answer(vring);
        for chain in chains {
            let head = chain.head_index();
            match request::parse(&*mem, chain) {
                Request::Flush { status }
                    if self.device.backing.read_only() || self.mapper.map_failed() =>
                {
                    // Nothing the guest stores can reach the file when it was opened read-only
                    // (QEMU maps it read-only, or not at all) or when the frontend refused the
                    // map, so answering 0 would tell the guest that writes it made are durable
                    // when they are not.
                    let stats = &self.device.stats;
                    Stats::add(&stats.requests, 1);
                    Stats::add(&stats.errors, 1);
                    stats.add_for(self.conn_id, PerConnection::Requests, 1);
                    stats.add_for(self.conn_id, PerConnection::Errors, 1);
                    if let Some(n) = self.bad_input_log.check() {
                        let why = if self.device.backing.read_only() {
                            "on a read-only device"
                        } else {
                            "while the file is not mapped (the frontend refused SHMEM_MAP)"
                        };
                        warn!("flush in chain {head} {why}; answering -1 ({n} similar messages suppressed)");
                    }
                    complete(vring, &mem, head, Some(status), RESP_ERR);
                    completed_here = true;
                }
                Request::Flush { status } => flushes.push(FlushJob {
                    vring: vring.clone(),
                    conn_id: self.conn_id,
                    mem: mem.clone(),
                    head,
                    status,
                    ticket: self.answers.ticket(),
                    after_answer: after_answer.clone(),
                }),
                Request::Unknown { kind, status } => {
                    Stats::add(&self.device.stats.unknown, 1);
                    if let Some(n) = self.bad_input_log.check() {
                        warn!("request type {kind} in chain {head} is not FLUSH; answering -1 ({n} similar messages suppressed)");
                    }
                    complete(vring, &mem, head, Some(status), RESP_ERR);
                    completed_here = true;
                }
                Request::Malformed { reason, status } => {
                    Stats::add(&self.device.stats.malformed, 1);
                    if let Some(n) = self.bad_input_log.check() {
                        warn!(
                            "malformed chain {head}: {reason}; {} ({n} similar messages suppressed)",
                            if status.is_some() { "answering -1" } else { "completing it with no status" }
                        );
                    }
                    complete(vring, &mem, head, status, RESP_ERR);
                    completed_here = true;
                }
            }
        }
        if !flushes.is_empty() {
            self.device.submit(flushes, popped);
        }
        if completed_here {
            notify(vring);
        }
        Some(completed_here)
    }

    /// Serves the queue until it is empty; returns whether this answered any chain itself.
    fn drain(&self, vring: &Vring, polled: bool) -> bool {
        if !self.event_idx.load(Ordering::Relaxed) {
            return self.process_queue(vring, polled).unwrap_or(false);
        }
        // With EVENT_IDX the guest only kicks again after it has seen the used index move,
        // so drain until no new chain appeared while notifications were off. Enabling writes
        // avail_event after our last pop, which is what keeps the guest kicking: a poll that
        // popped without it would leave avail_event behind and the guest silent.
        let mut answered = false;
        loop {
            if let Err(e) = vring.disable_notification() {
                warn!("cannot disable notifications: {e}");
            }
            match self.process_queue(vring, polled) {
                Some(here) => answered |= here,
                None => break,
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!("cannot enable notifications: {e}");
                    break;
                }
            }
        }
        answered
    }

    /// The step a flush worker runs after answering this connection's requests: a poll, with
    /// `--poll-us`.
    fn after_answer(&self, vring: &Vring) -> Option<AfterAnswer> {
        if self.device.poll.is_zero() {
            return None;
        }
        let (this, vring) = (self.this.clone(), vring.clone());
        Some(Arc::new(move || {
            if let Some(backend) = this.upgrade() {
                backend.poll(&vring);
            }
        }))
    }

    /// `--poll-us`: right after an answer, the guest may be about to send its next request.
    /// Watching the avail ring for a little while lets this thread, already awake, take it at
    /// once, instead of the request waiting for the kick to wake the vring thread (and that
    /// thread to wake a flush worker). Ends at the first request found: the thread that polls
    /// may be the worker that must now start the request's fdatasync. It never starts on its
    /// own, so an idle daemon still never wakes.
    fn poll(&self, vring: &Vring) {
        let limit = self.device.poll;
        if limit.is_zero() || self.polling.swap(true, Ordering::Acquire) {
            return;
        }
        let mem = self.mem.memory();
        let deadline = Instant::now() + limit;
        loop {
            let waiting = {
                let state = vring.get_ref();
                let queue = state.get_queue();
                if !queue.ready() || self.queue_broken.load(Ordering::Relaxed) {
                    break;
                }
                queue
                    .avail_idx(&*mem, Ordering::Acquire)
                    .is_ok_and(|idx| idx.0 != queue.next_avail())
            };
            if waiting {
                trace!(
                    "poll found a request {} us into its {} us",
                    (limit - deadline.saturating_duration_since(Instant::now())).as_micros(),
                    limit.as_micros()
                );
                self.drain(vring, true);
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            std::hint::spin_loop();
        }
        self.polling.store(false, Ordering::Release);
    }
}

/// Every file-backed region must lie inside its file; the kernel maps a longer range without
/// complaint and only faults (SIGBUS) when the missing part is touched.
fn check_memory_files(mem: &GuestMemory) -> io::Result<()> {
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else {
            continue;
        };
        let meta = fo.file().metadata()?;
        if !meta.is_file() {
            continue;
        }
        let end = fo.start().checked_add(region.len());
        if end.is_none_or(|end| end > meta.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "region at guest address {:#x} maps {} bytes from offset {} of a {}-byte file",
                    region.start_addr().raw_value(),
                    region.len(),
                    fo.start(),
                    meta.len()
                ),
            ));
        }
    }
    Ok(())
}

impl Drop for PmemBackend {
    fn drop(&mut self) {
        // This runs only once every holder of the backend is gone, the vring epoll handlers
        // included, so nothing waits on these descriptors any more.
        for fd in lock(&self.exit_consumers).drain(..) {
            // SAFETY: `fd` is an eventfd we created in `exit_event`; vhost-user-backend took it
            // with `into_raw_fd()` and never closes it, so this is its only close, and the
            // epoll instance that watched it has been dropped with its handler.
            unsafe { libc::close(fd) };
        }
        debug!("connection {}: backend state released", self.conn_id);
    }
}

impl VhostUserBackend for PmemBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_PMEM_F_SHMEM_REGION)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        info!("device starting: features {features:#x} acked");
        self.queue_broken.store(false, Ordering::Relaxed);
        if features & (1 << VIRTIO_PMEM_F_SHMEM_REGION) == 0 {
            warn!("the driver did not ack SHMEM_REGION; it needs Linux 6.8 or later to find the memory");
        }
        match lock(&self.channel).as_ref() {
            Some(channel) => self.mapper.request(channel.clone()),
            None => warn!(
                "the frontend has not set up the backend channel, so the file cannot be mapped; \
                 the guest will see no memory"
            ),
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::BACKEND_SEND_FD
            | VhostUserProtocolFeatures::SHMEM
    }

    fn reset_device(&self) {
        self.answers.reset();
        info!("device reset by the frontend; the region is mapped again at the next start");
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = [0u8; CONFIG_SPACE_LEN];
        let start = (offset as usize).min(CONFIG_SPACE_LEN);
        let end = start.saturating_add(size as usize).min(CONFIG_SPACE_LEN);
        if (end - start) as u32 != size {
            warn!("config read of {size} bytes at {offset} is outside the {CONFIG_SPACE_LEN}-byte config space");
        }
        config[start..end].to_vec()
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        if let Err(e) = check_memory_files(&mem.memory()) {
            // vhost-user-backend installs the table before calling us. A region that reaches
            // past the end of its file would raise SIGBUS at the first touch (the library itself
            // reads the rings on SET_VRING_ADDR), so take the table away again and refuse it.
            unpoison(mem.lock()).replace(GuestMemory::new());
            error!("refusing the frontend's memory table: {e}");
            return Err(e);
        }
        memory_guard::set_regions(mem.memory().iter().filter_map(|r| {
            let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
            Some((host as usize, r.len() as usize))
        }));
        debug!("guest memory table updated");
        Ok(())
    }

    fn set_backend_req_fd(&self, channel: Backend) {
        debug!("backend channel set up");
        *lock(&self.channel) = Some(channel);
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        *lock(&self.exit) = Some(notifier.try_clone().ok()?);
        lock(&self.exit_consumers).push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        // The frontend reads the ring position right after this returns; answer every request
        // already taken off the ring first, or its completion would land in a stopped ring.
        self.device.wait_idle();
        Ok(())
    }

    fn get_shmem_config(&self) -> io::Result<VhostUserShMemConfig> {
        Ok(VhostUserShMemConfig::new(1, &[self.device.backing.size()]))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // An error returned from here stops the vring thread for good, so problems caused by the
        // guest are logged and the thread keeps serving.
        if evset != EventSet::IN {
            warn!("unexpected event set {evset:?} on event {device_event}");
            return Ok(());
        }
        if device_event != REQUEST_QUEUE {
            warn!("event for unknown queue {device_event}");
            return Ok(());
        }
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        if self.drain(vring, false) {
            // Answered here (a request refused at once): the guest may follow up right away.
            self.poll(vring);
        }
        let faults = memory_guard::faults();
        if faults > self.memory_faults_seen.swap(faults, Ordering::Relaxed) {
            error!(
                "guest memory faulted under the daemon ({faults} page(s) in all replaced with \
                 zeros): the frontend cut a memory file short after SET_MEM_TABLE; this \
                 connection's rings now read as zeros"
            );
        }
        Ok(())
    }
}
