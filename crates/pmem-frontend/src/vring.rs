//! The driver side of one split virtqueue, laid out in guest RAM.
//!
//! The harness writes descriptor chains the way a guest driver does and reads the used
//! ring the device fills. It deliberately lets a test describe any chain, including
//! malformed ones (wrong directions, short buffers, addresses outside guest RAM), because
//! that is what the backend must survive.
//!
//! Guest RAM layout (guest physical addresses):
//!
//! | range                     | content                                          |
//! |---------------------------|--------------------------------------------------|
//! | `0x0000..0x4000`          | descriptor table (16 bytes x up to 1024)         |
//! | `0x4000..0x4806`          | available ring                                   |
//! | `0x5000..0x7006`          | used ring                                        |
//! | `SLOT_BASE..+4 MiB`       | one 4 KiB slot per head: request, status, indirect table |
//! | `SCRATCH_BASE..end`       | free for tests                                   |

use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};

/// Largest queue the layout has room for (the device's maximum is 1024 too).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Guest address of the descriptor table.
pub const DESC_TABLE_ADDR: u64 = 0x0;
/// Guest address of the available ring.
pub const AVAIL_RING_ADDR: u64 = 0x4000;
/// Guest address of the used ring.
pub const USED_RING_ADDR: u64 = 0x5000;
/// Guest address of the per-head slots.
pub const SLOT_BASE: u64 = 0x10_0000;
/// Size of one per-head slot.
pub const SLOT_SIZE: u64 = 0x1000;
/// Offset of the request buffer inside a slot.
pub const SLOT_REQUEST_OFFSET: u64 = 0x0;
/// Offset of the status buffer inside a slot.
pub const SLOT_STATUS_OFFSET: u64 = 0x10;
/// Offset of the indirect descriptor table inside a slot.
pub const SLOT_INDIRECT_OFFSET: u64 = 0x100;
/// Most entries one indirect table may have (it must fit in its slot).
pub const MAX_INDIRECT_ENTRIES: usize = ((SLOT_SIZE - SLOT_INDIRECT_OFFSET) / 16) as usize;
/// Guest address from which tests may use memory freely.
pub const SCRATCH_BASE: u64 = SLOT_BASE + SLOT_SIZE * MAX_QUEUE_SIZE as u64;

/// One descriptor of a chain, as a test describes it.
///
/// The harness sets NEXT and `next` for direct chains itself (a test cannot get them
/// wrong by accident); every other flag bit is passed through as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DescSpec {
    /// A descriptor with exactly these fields (NEXT is added as needed).
    Direct {
        /// Guest physical address of the buffer.
        addr: u64,
        /// Length of the buffer in bytes.
        len: u32,
        /// Flags (VRING_DESC_F_WRITE and whatever else the test wants the device to see).
        flags: u16,
    },
    /// A descriptor with INDIRECT set, pointing at a table of these entries, which the
    /// harness writes into the head's slot. The entries must be `Direct`.
    Indirect(Vec<DescSpec>),
}

impl DescSpec {
    /// A device-readable buffer.
    pub fn readable(addr: u64, len: u32) -> Self {
        DescSpec::Direct {
            addr,
            len,
            flags: 0,
        }
    }

    /// A device-writable buffer.
    pub fn writable(addr: u64, len: u32) -> Self {
        DescSpec::Direct {
            addr,
            len,
            flags: VRING_DESC_F_WRITE as u16,
        }
    }

    /// A descriptor with arbitrary flags.
    pub fn raw(addr: u64, len: u32, flags: u16) -> Self {
        DescSpec::Direct { addr, len, flags }
    }

    /// An indirect descriptor whose table holds `entries`.
    pub fn indirect(entries: Vec<DescSpec>) -> Self {
        DescSpec::Indirect(entries)
    }
}

/// One used-ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// The head descriptor index the device returned.
    pub id: u32,
    /// The number of bytes the device says it wrote.
    pub len: u32,
}

/// How often each side told the other about the ring, for benchmarks of notification
/// suppression. Counted from the harness's side of the eventfds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NotifyCounts {
    /// Writes to the kick eventfd.
    pub kicks: u64,
    /// Kicks left out because the device's `avail_event` said it did not need them.
    pub kicks_skipped: u64,
    /// Signals of the call eventfd (an eventfd adds up the writes between two reads, so this
    /// is the backend's writes, not our wakeups).
    pub calls: u64,
}

/// Driver-side state of the split virtqueue.
pub struct SplitVring {
    size: u16,
    event_idx: bool,
    /// With EVENT_IDX, leave out the kicks the device's `avail_event` does not ask for, as
    /// Linux's `virtqueue_kick_prepare` does; otherwise every submission kicks.
    skip_kicks: bool,
    /// `avail_idx` when the driver last decided whether to kick (Linux's `avail_idx_shadow -
    /// num_added`): the entries after it are the ones a kick would announce.
    kick_checked: u16,
    kicks: AtomicU64,
    kicks_skipped: AtomicU64,
    calls: AtomicU64,
    /// Free descriptor indices (a stack).
    free: Vec<u16>,
    /// For every head in flight, the descriptor indices of its chain.
    in_flight: Vec<Option<Vec<u16>>>,
    /// Our copy of avail->idx (the next free avail ring entry, free-running).
    avail_idx: u16,
    /// The used ring index up to which the harness has consumed entries.
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

impl SplitVring {
    /// Lays out an empty queue of `size` entries in `mem` (all descriptors free), with both
    /// ring indices at `base` (0 for a fresh device; anything, as after a migration).
    pub fn new(mem: &GuestMemoryMmap, size: u16, base: u16, event_idx: bool) -> Result<Self> {
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(Error::InvalidArgument(format!(
                "queue size {size} must be a power of two in 1..={MAX_QUEUE_SIZE}"
            )));
        }
        // Zero the rings: flags 0 (we want interrupts), idx 0, event fields 0.
        let zeros = vec![0u8; (SLOT_BASE - DESC_TABLE_ADDR) as usize];
        mem.write_slice(&zeros, GuestAddress(DESC_TABLE_ADDR))?;
        mem.write_obj(base.to_le(), GuestAddress(AVAIL_RING_ADDR + 2))?;
        mem.write_obj(base.to_le(), GuestAddress(USED_RING_ADDR + 2))?;
        let new_eventfd = || EventFd::new(libc::EFD_CLOEXEC).map_err(Error::io("eventfd"));
        Ok(SplitVring {
            size,
            event_idx,
            skip_kicks: false,
            kick_checked: base,
            kicks: AtomicU64::new(0),
            kicks_skipped: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            free: (0..size).rev().collect(),
            in_flight: vec![None; size as usize],
            avail_idx: base,
            last_used: base,
            kick: new_eventfd()?,
            call: new_eventfd()?,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The eventfd the backend waits on (SET_VRING_KICK).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The eventfd the backend signals (SET_VRING_CALL).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// Whether EVENT_IDX was negotiated (changes how the device decides to signal).
    pub fn set_event_idx(&mut self, event_idx: bool) {
        self.event_idx = event_idx;
    }

    /// Whether [`Self::kick_if_needed`] may leave out kicks (only with EVENT_IDX).
    pub fn set_skip_kicks(&mut self, skip: bool) {
        self.skip_kicks = skip;
    }

    /// The kicks and calls so far. Takes in a call the device signalled that no wait has
    /// read yet, so that counts taken between two runs are complete.
    pub fn notify_counts(&self) -> Result<NotifyCounts> {
        self.wait_call(Duration::ZERO)?;
        Ok(NotifyCounts {
            kicks: self.kicks.load(Ordering::Relaxed),
            kicks_skipped: self.kicks_skipped.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
        })
    }

    /// Number of heads submitted and not yet seen in the used ring.
    pub fn in_flight(&self) -> usize {
        self.in_flight.iter().filter(|c| c.is_some()).count()
    }

    /// The slot of head `head`: a 4 KiB area the harness reserves for that head.
    pub fn slot_addr(head: u16) -> u64 {
        SLOT_BASE + u64::from(head) * SLOT_SIZE
    }

    /// Takes `n` descriptors off the free list, in chain order.
    pub fn alloc(&mut self, n: usize) -> Result<Vec<u16>> {
        if n == 0 || n > self.free.len() {
            return Err(Error::QueueFull {
                needed: n,
                free: self.free.len(),
            });
        }
        let at = self.free.len() - n;
        let mut ids = self.free.split_off(at);
        ids.reverse();
        Ok(ids)
    }

    /// Writes `chain` into the descriptors `ids` (from [`Self::alloc`]) and makes the head
    /// available to the device. Does not kick.
    pub fn publish(
        &mut self,
        mem: &GuestMemoryMmap,
        ids: Vec<u16>,
        chain: &[DescSpec],
    ) -> Result<u16> {
        if ids.len() != chain.len() || ids.is_empty() {
            return Err(Error::InvalidArgument(
                "descriptor ids and chain differ in length".into(),
            ));
        }
        let head = ids[0];
        if let Err(e) = self.write_chain(mem, head, &ids, chain) {
            self.free.extend(ids.iter().rev());
            return Err(e);
        }
        self.in_flight[head as usize] = Some(ids);

        let ring_slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(
            head.to_le(),
            GuestAddress(AVAIL_RING_ADDR + 4 + 2 * ring_slot),
        )?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Release: the descriptors and the ring entry must be visible before the index
        // that publishes them (the backend runs on other CPUs).
        mem.store(
            self.avail_idx.to_le(),
            GuestAddress(AVAIL_RING_ADDR + 2),
            Ordering::Release,
        )?;
        Ok(head)
    }

    fn write_chain(
        &self,
        mem: &GuestMemoryMmap,
        head: u16,
        ids: &[u16],
        chain: &[DescSpec],
    ) -> Result<()> {
        for (pos, (id, spec)) in ids.iter().zip(chain).enumerate() {
            let next = ids.get(pos + 1).copied();
            let desc = match spec {
                DescSpec::Direct { addr, len, flags } => {
                    let flags = match next {
                        Some(_) => flags | VRING_DESC_F_NEXT as u16,
                        None => *flags,
                    };
                    Descriptor::new(*addr, *len, flags, next.unwrap_or(0))
                }
                DescSpec::Indirect(entries) => {
                    let table = Self::slot_addr(head) + SLOT_INDIRECT_OFFSET;
                    Self::write_indirect_table(mem, table, entries)?;
                    let mut flags = VRING_DESC_F_INDIRECT as u16;
                    if next.is_some() {
                        flags |= VRING_DESC_F_NEXT as u16;
                    }
                    let len = (entries.len() * std::mem::size_of::<Descriptor>()) as u32;
                    Descriptor::new(table, len, flags, next.unwrap_or(0))
                }
            };
            let at = DESC_TABLE_ADDR + u64::from(*id) * std::mem::size_of::<Descriptor>() as u64;
            mem.write_obj(desc, GuestAddress(at))?;
        }
        Ok(())
    }

    fn write_indirect_table(mem: &GuestMemoryMmap, table: u64, entries: &[DescSpec]) -> Result<()> {
        if entries.is_empty() || entries.len() > MAX_INDIRECT_ENTRIES {
            return Err(Error::InvalidArgument(format!(
                "indirect table needs 1..={MAX_INDIRECT_ENTRIES} entries, got {}",
                entries.len()
            )));
        }
        for (i, spec) in entries.iter().enumerate() {
            let DescSpec::Direct { addr, len, flags } = spec else {
                return Err(Error::InvalidArgument(
                    "an indirect table cannot hold another indirect descriptor".into(),
                ));
            };
            // Inside an indirect table, `next` indexes the table itself.
            let desc = if i + 1 < entries.len() {
                Descriptor::new(
                    *addr,
                    *len,
                    flags | VRING_DESC_F_NEXT as u16,
                    (i + 1) as u16,
                )
            } else {
                Descriptor::new(*addr, *len, *flags, 0)
            };
            let at = table + (i * std::mem::size_of::<Descriptor>()) as u64;
            mem.write_obj(desc, GuestAddress(at))?;
        }
        Ok(())
    }

    /// Notifies the backend that new buffers are available.
    ///
    /// Kicks unconditionally (even with EVENT_IDX, where a driver may skip it): an extra
    /// kick is harmless and costs one write(2).
    pub fn kick(&self) -> Result<()> {
        self.kicks.fetch_add(1, Ordering::Relaxed);
        self.kick.write(1).map_err(Error::io("kick eventfd"))
    }

    /// Kicks after [`Self::publish`], unless EVENT_IDX and [`Self::set_skip_kicks`] are on and
    /// the device's `avail_event` lies outside the entries published since the last decision:
    /// then the device has said it will look at the ring without one.
    pub fn kick_if_needed(&mut self, mem: &GuestMemoryMmap) -> Result<()> {
        let old = std::mem::replace(&mut self.kick_checked, self.avail_idx);
        if !(self.event_idx && self.skip_kicks) {
            return self.kick();
        }
        // The device reads avail->idx after it writes avail_event; we read avail_event after
        // we wrote avail->idx. With both orders full fences, one of us sees the other.
        fence(Ordering::SeqCst);
        let at = USED_RING_ADDR + 4 + 8 * u64::from(self.size);
        let event = u16::from_le(mem.load(GuestAddress(at), Ordering::SeqCst)?);
        if need_event(event, self.avail_idx, old) {
            self.kick()
        } else {
            self.kicks_skipped.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    /// Takes the next used element if there is one, without waiting or asking for a call.
    pub fn try_used(&mut self, mem: &GuestMemoryMmap) -> Result<Option<Used>> {
        self.pop_used(mem)
    }

    /// Returns the next used element, blocking on the call eventfd for up to `timeout`.
    ///
    /// The chain's descriptors go back to the free list.
    pub fn wait_used(&mut self, mem: &GuestMemoryMmap, timeout: Duration) -> Result<Used> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(used) = self.pop_used(mem)? {
                return Ok(used);
            }
            if self.event_idx {
                // Ask for a call as soon as the device adds the entry after `last_used`,
                // then look again: an entry added before the device saw used_event would
                // otherwise produce no call and we would sleep through it.
                let used_event = AVAIL_RING_ADDR + 4 + 2 * u64::from(self.size);
                mem.store(
                    self.last_used.to_le(),
                    GuestAddress(used_event),
                    Ordering::SeqCst,
                )?;
                fence(Ordering::SeqCst);
                if let Some(used) = self.pop_used(mem)? {
                    return Ok(used);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    what: "a used-ring entry",
                    timeout,
                });
            }
            self.wait_call(left)?;
        }
    }

    /// Blocks until the call eventfd is signalled or `timeout` passes, and resets it.
    fn wait_call(&self, timeout: Duration) -> Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Round up so that a sub-millisecond remainder still sleeps instead of spinning.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: `pfd` is a valid pollfd and we pass exactly one entry.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(Error::io("poll call eventfd")(e));
        }
        if n > 0 {
            // The eventfd is readable, so this read does not block; it resets the counter.
            let signals = self.call.read().map_err(Error::io("read call eventfd"))?;
            self.calls.fetch_add(signals, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Takes the next used element if the device has published one.
    fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Result<Option<Used>> {
        // Acquire: the element must be read only after the index that published it.
        let used_idx = u16::from_le(mem.load(GuestAddress(USED_RING_ADDR + 2), Ordering::Acquire)?);
        if used_idx == self.last_used {
            return Ok(None);
        }
        let pending = used_idx.wrapping_sub(self.last_used);
        if pending > self.size {
            return Err(Error::Protocol(format!(
                "used idx {used_idx} is {pending} entries ahead of {} on a queue of {}",
                self.last_used, self.size
            )));
        }
        let slot = u64::from(self.last_used % self.size);
        // struct virtq_used_elem { le32 id; le32 len; }
        let elem = USED_RING_ADDR + 4 + 8 * slot;
        let used = Used {
            id: u32::from_le(mem.read_obj(GuestAddress(elem))?),
            len: u32::from_le(mem.read_obj(GuestAddress(elem + 4))?),
        };
        self.last_used = self.last_used.wrapping_add(1);
        let chain = usize::try_from(used.id)
            .ok()
            .and_then(|i| self.in_flight.get_mut(i))
            .and_then(Option::take)
            .ok_or_else(|| {
                Error::Protocol(format!("used id {} is not a head in flight", used.id))
            })?;
        self.free.extend(chain.iter().rev());
        Ok(Some(used))
    }
}

/// The virtio spec's `vring_need_event`: whether moving an index from `old` to `new` passes
/// `event` (the index the other side asked to be told about), in 16-bit wrapping arithmetic.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::need_event;

    #[test]
    fn need_event_is_the_spec_formula() {
        // The device asked about entry 5: moving 5 -> 6 passes it, 6 -> 7 does not.
        assert!(need_event(5, 6, 5));
        assert!(!need_event(5, 7, 6));
        // Several entries at once, the asked-for one among them.
        assert!(need_event(5, 8, 3));
        assert!(!need_event(9, 8, 3));
        // Across the 16-bit wrap.
        assert!(need_event(0xffff, 1, 0xfffe));
        assert!(!need_event(0xfffd, 1, 0xfffe));
        // Nothing published, nothing to announce.
        assert!(!need_event(5, 5, 5));
    }
}
