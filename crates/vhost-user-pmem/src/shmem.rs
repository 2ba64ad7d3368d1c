//! Mapping the backing file into the guest's shared-memory region.
//!
//! QEMU 11.1 forces the timing (see docs/qemu.md):
//! - a SHMEM_MAP that arrives before the device has started crashes QEMU (no `vdev` yet), so the
//!   map follows SET_FEATURES, the first message of a device start;
//! - QEMU reads the backend channel only when it is not waiting for our reply to SET_FEATURES,
//!   so sending the map from the handler of that message, and waiting for its ack, deadlocks;
//! - every device reset (guest reboot, driver rebind, new connection) drops the mapping.
//!
//! So every SET_FEATURES wakes this module's thread, which sends the map at once. The guest
//! cannot probe the namespace before QEMU has finished starting the device, and QEMU serves the
//! backend channel as soon as it has, which keeps the unmapped window as small as QEMU allows.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Instant;

use log::{error, info};
use vhost::vhost_user::message::{VhostUserMMap, VhostUserMMapFlags};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

use crate::backing::BackingFile;
use crate::stats::{PerConnection, Stats};
use crate::sync::{lock, unpoison};
use crate::virtio::SHMEM_REGION_ID;

struct MapJob {
    channel: Backend,
    requested: Instant,
}

#[derive(Default)]
struct State {
    job: Option<MapJob>,
    closed: bool,
}

#[derive(Default)]
struct Pending {
    state: Mutex<State>,
    wake: Condvar,
    /// The frontend refused the latest SHMEM_MAP: the guest's stores go nowhere, so no flush
    /// may be answered with success until a later map succeeds.
    failed: AtomicBool,
}

/// Sends SHMEM_MAP from its own thread, one mapper per connection: a frontend that never
/// answers on its backend channel then blocks only its own mapper, never the next connection's.
/// Requests that pile up while one is being sent collapse into one, so a frontend cannot make
/// the daemon queue work without bound.
pub struct ShmemMapper {
    pending: Arc<Pending>,
}

impl Drop for ShmemMapper {
    fn drop(&mut self) {
        // The thread ends once it is idle; one stuck in a send ends when the frontend closes
        // the channel, which it does when it goes away.
        lock(&self.pending.state).closed = true;
        self.pending.wake.notify_one();
    }
}

impl ShmemMapper {
    /// A mapper for connection `conn_id`, whose maps it counts.
    pub fn new(
        backing: Arc<BackingFile>,
        stats: Arc<Stats>,
        conn_id: u64,
    ) -> std::io::Result<Self> {
        let pending = Arc::new(Pending::default());
        let p = pending.clone();
        thread::Builder::new()
            .name("pmem-shmem-map".into())
            .spawn(move || run(&p, &backing, &stats, conn_id))?;
        Ok(ShmemMapper { pending })
    }

    /// Asks for the file to be mapped through `channel`, the backend channel of the connection
    /// whose device is starting.
    pub fn request(&self, channel: Backend) {
        self.pending.failed.store(false, Ordering::SeqCst);
        let mut state = lock(&self.pending.state);
        state.job = Some(MapJob {
            channel,
            requested: Instant::now(),
        });
        self.pending.wake.notify_one();
    }

    /// Whether the frontend refused the map of the current device start.
    pub fn map_failed(&self) -> bool {
        self.pending.failed.load(Ordering::SeqCst)
    }
}

/// The message that maps the whole file at the start of region 0.
pub fn map_message(backing: &BackingFile) -> VhostUserMMap {
    let flags = if backing.read_only() {
        VhostUserMMapFlags::empty()
    } else {
        VhostUserMMapFlags::WRITABLE
    };
    VhostUserMMap {
        shmid: SHMEM_REGION_ID,
        fd_offset: 0,
        shm_offset: 0,
        len: backing.size(),
        flags: flags.bits(),
        ..Default::default()
    }
}

fn run(pending: &Pending, backing: &BackingFile, stats: &Stats, conn_id: u64) {
    let msg = map_message(backing);
    loop {
        let job = {
            let mut guard = lock(&pending.state);
            loop {
                if let Some(job) = guard.job.take() {
                    break job;
                }
                if guard.closed {
                    return;
                }
                guard = unpoison(pending.wake.wait(guard));
            }
        };
        match job.channel.shmem_map(&msg, backing.file()) {
            Ok(_) => {
                let took = job.requested.elapsed();
                pending.failed.store(false, Ordering::SeqCst);
                stats.record_map(took);
                Stats::add(&stats.maps, 1);
                stats.add_for(conn_id, PerConnection::Maps, 1);
                info!(
                    "mapped {} ({}, {}) into shared-memory region {} in {} us",
                    backing.path().display(),
                    crate::size::ByteSize(backing.size()),
                    if backing.read_only() {
                        "read-only"
                    } else {
                        "writable"
                    },
                    SHMEM_REGION_ID,
                    took.as_micros()
                );
            }
            Err(e) => {
                pending.failed.store(true, Ordering::SeqCst);
                Stats::add(&stats.map_refusals, 1);
                error!(
                    "SHMEM_MAP of {} failed: {e}; the guest will see a region of zeros and \
                     every flush is answered -1 until the device restarts",
                    backing.path().display()
                );
            }
        }
    }
}
