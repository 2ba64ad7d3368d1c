//! Completing descriptor chains: writing the status, the used ring, and the guest notification.
//! The vring event loop and the flush worker both complete chains, so the rules live here once.

use std::sync::{Arc, RwLock};

use log::warn;
use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap, Le32,
};

use crate::ratelimit::RateLimit;
use crate::sync::unpoison;
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

/// Whether a connection's ring still takes the answers to requests popped from it. An answer
/// that outlives its ring must be dropped, not written: after a reset, or once the frontend
/// has gone and a later connection serves the same guest memory, a late used-ring entry would
/// complete a chain a second time or land in a ring someone else now fills.
#[derive(Default)]
pub struct AnswerGate {
    /// Bumped by every reset; [`CLOSED`] once the connection has ended.
    epoch: RwLock<u64>,
}

const CLOSED: u64 = u64::MAX;

impl AnswerGate {
    /// What a request popped now carries to its answer.
    pub fn ticket(self: &Arc<Self>) -> AnswerTicket {
        AnswerTicket {
            gate: self.clone(),
            epoch: *unpoison(self.epoch.read()),
        }
    }

    /// Drops the answers to every request popped so far. Returns once none is being written.
    pub fn reset(&self) {
        let mut epoch = unpoison(self.epoch.write());
        if *epoch != CLOSED {
            *epoch += 1;
        }
    }

    /// Drops every answer from now on, for good. Returns once none is being written.
    pub fn close(&self) {
        *unpoison(self.epoch.write()) = CLOSED;
    }
}

/// See [`AnswerGate::ticket`].
pub struct AnswerTicket {
    gate: Arc<AnswerGate>,
    epoch: u64,
}

impl AnswerTicket {
    /// Runs `write` (the answer) unless the ring was reset or closed since the request was
    /// popped; a reset or close waits for a `write` that has begun.
    pub fn answer<R>(&self, write: impl FnOnce() -> R) -> Option<R> {
        let epoch = unpoison(self.gate.epoch.read());
        (*epoch == self.epoch && *epoch != CLOSED).then(write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_from_before_a_reset_or_close_are_dropped() {
        let gate = Arc::new(AnswerGate::default());
        let old = gate.ticket();
        assert_eq!(old.answer(|| 1), Some(1));
        gate.reset();
        let new = gate.ticket();
        assert_eq!(old.answer(|| 1), None, "popped before the reset");
        assert_eq!(new.answer(|| 2), Some(2));
        gate.close();
        assert_eq!(new.answer(|| 2), None);
        gate.reset();
        assert_eq!(gate.ticket().answer(|| 3), None, "closed for good");
    }
}
