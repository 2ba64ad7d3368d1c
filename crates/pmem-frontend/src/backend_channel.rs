//! The backend-to-frontend channel (SET_BACKEND_REQ_FD), served in its own thread.
//!
//! The backend sends SHMEM_MAP here from its own thread, while the main channel may be
//! blocked in a request of ours (QEMU serves this channel from its main loop for the
//! same reason). Each map is recorded and its fd mmapped, like QEMU does into the
//! device's shared-memory BAR.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserMMap, VhostUserMMapFlags};
use vhost::vhost_user::{FrontendReqHandler, HandlerResult, VhostUserFrontendReqHandler};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};

/// A SHMEM_MAP request as received, with its fd mapped into this process.
pub struct ShmemMapping {
    /// The request's fields.
    pub request: VhostUserMMap,
    ptr: *mut u8,
    len: usize,
    /// Kept so tests can fstat the very fd the backend sent.
    fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory owned by this struct; it may be read and
// written from any thread (concurrent access is the caller's concern, as with any
// shared file mapping).
unsafe impl Send for ShmemMapping {}
// SAFETY: see above; `&ShmemMapping` only hands out raw views of shared memory.
unsafe impl Sync for ShmemMapping {}

impl ShmemMapping {
    fn new(request: VhostUserMMap, fd: &dyn AsRawFd) -> io::Result<Self> {
        let len =
            usize::try_from(request.len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let offset = libc::off_t::try_from(request.fd_offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let writable = request.flags & VhostUserMMapFlags::WRITABLE.bits() != 0;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: the fd is open for the duration of the call; the dup'ed copy becomes
        // owned by the returned OwnedFd.
        let fd = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }.try_clone_to_owned()?;
        // SAFETY: a fresh mapping at an address of the kernel's choice; it aliases no Rust
        // object. Failure is reported as MAP_FAILED and checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ShmemMapping {
            request,
            ptr: ptr.cast(),
            len,
            fd,
        })
    }

    /// Whether the backend asked for a writable mapping.
    pub fn writable(&self) -> bool {
        self.request.flags & VhostUserMMapFlags::WRITABLE.bits() != 0
    }

    /// Length of the mapping.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, for a valid request).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The fd the backend sent (a duplicate of it).
    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Copies `buf.len()` bytes at `offset` out of the mapping.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        // SAFETY: the range is inside the live mapping (checked above); `buf` is a distinct
        // Rust buffer. The mapping may change under us (it is shared memory), which a
        // byte copy tolerates.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into the mapping at `offset`, like a guest store through DAX.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        if !self.writable() {
            return Err(Error::InvalidArgument("the mapping is read-only".into()));
        }
        self.check(offset, data.len())?;
        // SAFETY: the range is inside the live mapping, which is PROT_WRITE because the
        // request carried WRITABLE (checked above).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) };
        Ok(())
    }

    /// msync(MS_SYNC) of the whole mapping.
    pub fn msync(&self) -> Result<()> {
        // SAFETY: `ptr`/`len` describe our live mapping.
        let r = unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) };
        if r != 0 {
            return Err(Error::io("msync")(io::Error::last_os_error()));
        }
        Ok(())
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "range {offset}+{len} outside a mapping of {} bytes",
                self.len
            ))),
        }
    }
}

impl Drop for ShmemMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping created in `new` and not unmapped since.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Everything received on the channel, in order.
#[derive(Default)]
struct Received {
    maps: Vec<Arc<ShmemMapping>>,
    /// SHMEM_MAP requests answered with an error (see `refuse_maps`).
    refused: usize,
    unmaps: Vec<VhostUserMMap>,
}

/// The `VhostUserFrontendReqHandler` run by the channel thread.
#[derive(Default)]
struct ShmemRecorder {
    received: Mutex<Received>,
    changed: Condvar,
    /// Answer SHMEM_MAP with an error, as QEMU does when it cannot mmap the fd.
    refuse_maps: AtomicBool,
}

impl VhostUserFrontendReqHandler for ShmemRecorder {
    fn shmem_map(&self, req: &VhostUserMMap, fd: &dyn AsRawFd) -> HandlerResult<u64> {
        if self.refuse_maps.load(Ordering::SeqCst) {
            self.received.lock().unwrap().refused += 1;
            self.changed.notify_all();
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        let mapping = ShmemMapping::new(*req, fd)?;
        self.received.lock().unwrap().maps.push(Arc::new(mapping));
        self.changed.notify_all();
        Ok(0)
    }

    fn shmem_unmap(&self, req: &VhostUserMMap) -> HandlerResult<u64> {
        self.received.lock().unwrap().unmaps.push(*req);
        self.changed.notify_all();
        Ok(0)
    }
}

/// The frontend end of the backend channel and the thread serving it.
pub struct BackendChannel {
    recorder: Arc<ShmemRecorder>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl BackendChannel {
    /// Creates the socket pair and starts serving it. Returns the channel and the socket
    /// end to pass to SET_BACKEND_REQ_FD (the caller may close it once sent).
    pub fn start(reply_ack: bool) -> Result<(Self, OwnedFd)> {
        let recorder = Arc::new(ShmemRecorder::default());
        let mut handler = FrontendReqHandler::new(recorder.clone()).map_err(|e| Error::Vhost {
            op: "create backend channel",
            source: vhost::Error::VhostUserProtocol(e),
        })?;
        handler.set_reply_ack_flag(reply_ack);
        // The handler keeps its own copy of the backend's end, so the channel never sees
        // EOF; we stop the thread with an eventfd instead and hand a duplicate to send.
        // SAFETY: the fd belongs to `handler`, which is alive here.
        let backend_end = unsafe { BorrowedFd::borrow_raw(handler.get_tx_raw_fd()) }
            .try_clone_to_owned()
            .map_err(Error::io("dup backend channel fd"))?;
        let stop = EventFd::new(libc::EFD_CLOEXEC).map_err(Error::io("eventfd"))?;
        let thread_stop = stop.try_clone().map_err(Error::io("dup eventfd"))?;
        let thread = std::thread::Builder::new()
            .name("backend-channel".into())
            .spawn(move || serve(handler, thread_stop))
            .map_err(Error::io("spawn backend channel thread"))?;
        Ok((
            BackendChannel {
                recorder,
                stop,
                thread: Some(thread),
            },
            backend_end,
        ))
    }

    /// Number of SHMEM_MAP requests received so far.
    pub fn map_count(&self) -> usize {
        self.recorder.received.lock().unwrap().maps.len()
    }

    /// All SHMEM_MAP requests received so far, oldest first.
    pub fn maps(&self) -> Vec<Arc<ShmemMapping>> {
        self.recorder.received.lock().unwrap().maps.clone()
    }

    /// From now on, answer SHMEM_MAP with EACCES (or again accept it).
    pub fn refuse_maps(&self, refuse: bool) {
        self.recorder.refuse_maps.store(refuse, Ordering::SeqCst);
    }

    /// Waits until at least `count` SHMEM_MAP requests have been refused.
    pub fn wait_refused(&self, count: usize, timeout: Duration) -> Result<()> {
        self.wait_for("a SHMEM_MAP to refuse", timeout, |r| r.refused >= count)
            .map(drop)
    }

    /// All SHMEM_UNMAP requests received so far.
    pub fn unmaps(&self) -> Vec<VhostUserMMap> {
        self.recorder.received.lock().unwrap().unmaps.clone()
    }

    /// Waits until at least `count` SHMEM_MAP requests have arrived and returns the
    /// `count`-th one.
    pub fn wait_map(&self, count: usize, timeout: Duration) -> Result<Arc<ShmemMapping>> {
        let received = self.wait_for("SHMEM_MAP from the backend", timeout, |r| {
            r.maps.len() >= count
        })?;
        Ok(received.maps[count - 1].clone())
    }

    /// Waits until `done` holds for what was received, or `timeout` passes.
    fn wait_for(
        &self,
        what: &'static str,
        timeout: Duration,
        done: impl Fn(&Received) -> bool,
    ) -> Result<std::sync::MutexGuard<'_, Received>> {
        let deadline = Instant::now() + timeout;
        let mut received = self.recorder.received.lock().unwrap();
        while !done(&received) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout { what, timeout });
            }
            received = self
                .recorder
                .changed
                .wait_timeout(received, left)
                .unwrap()
                .0;
        }
        Ok(received)
    }
}

impl Drop for BackendChannel {
    fn drop(&mut self) {
        // Wakes the thread's poll; it then returns and drops the handler.
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The channel thread: handle requests until told to stop or the channel breaks.
fn serve(mut handler: FrontendReqHandler<ShmemRecorder>, stop: EventFd) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: handler.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("backend channel: poll: {}", io::Error::last_os_error());
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0
            && fds[0].revents & libc::POLLIN == 0
        {
            return;
        }
        if let Err(e) = handler.handle_request() {
            match e {
                // A request our handler refused (it has been answered already).
                vhost::vhost_user::Error::ReqHandlerError(e) => {
                    log::warn!("backend channel: request failed: {e}");
                }
                e => {
                    log::debug!("backend channel closed: {e}");
                    return;
                }
            }
        }
    }
}
