//! Completing descriptor chains: writing the status, the used ring, and the guest notification.
//! The vring event loop and the flush worker both complete chains, so the rules live here once.

use std::sync::Arc;

use log::warn;
use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap, Le32,
};

use crate::ratelimit::RateLimit;
use crate::virtio::MSG_LEN;

pub type GuestMemory = GuestMemoryMmap<()>;
pub type MemGuard = GuestMemoryLoadGuard<GuestMemory>;
pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemory>>;

/// What a thread that has just answered requests on a queue does next (`--poll-us`): called
/// after the notification, with no lock held.
pub type AfterAnswer = Arc<dyn Fn() + Send + Sync>;

static COMPLETION_ERRORS: RateLimit = RateLimit::new(std::time::Duration::from_secs(5), 5);

/// Writes `code` to `status` (if given) and puts `head` on the used ring. The caller notifies
/// the guest with [`notify`] once per batch.
pub fn complete(vring: &Vring, mem: &MemGuard, head: u16, status: Option<GuestAddress>, code: u32) {
    let mut used_len = 0;
    if let Some(addr) = status {
        match mem.write_obj(Le32::from(code), addr) {
            Ok(()) => used_len = MSG_LEN,
            Err(e) => {
                if let Some(n) = COMPLETION_ERRORS.check() {
                    warn!("cannot write status of chain {head}: {e} ({n} similar messages suppressed)");
                }
            }
        }
    }
    if let Err(e) = vring.add_used(head, used_len) {
        if let Some(n) = COMPLETION_ERRORS.check() {
            warn!(
                "cannot put chain {head} on the used ring: {e} ({n} similar messages suppressed)"
            );
        }
    }
}

/// Interrupts the guest if it asked to be (EVENT_IDX), or always without EVENT_IDX.
pub fn notify(vring: &Vring) {
    let needed = vring.needs_notification().unwrap_or(true);
    if needed {
        if let Err(e) = vring.signal_used_queue() {
            if let Some(n) = COMPLETION_ERRORS.check() {
                warn!("cannot notify the guest: {e} ({n} similar messages suppressed)");
            }
        }
    }
}
