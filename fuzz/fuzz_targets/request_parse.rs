//! `request::parse` on descriptor chains made from fuzz bytes.
//!
//! Two shapes per input, both over the same two-region guest memory (a hole between the
//! regions and nothing above the second, so that "outside memory" has several forms):
//! 1. the bytes read directly as a list of descriptors, handed to `parse` as they are;
//! 2. the bytes laid out as a split virtqueue (descriptor table, available ring, buffers) and
//!    walked with virtio-queue exactly as the daemon's vring thread walks it, NEXT chains and
//!    indirect tables included; every chain is parsed and completed as the daemon completes it.
//!
//! Beyond "never panics", the target checks the promises the rest of the daemon relies on:
//! every status address `parse` hands out has 4 writable bytes of guest memory behind it, and
//! a request it calls `Unknown` is never a FLUSH.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_user_pmem::virtio::{MSG_LEN, RESP_ERR};
use vhost_user_pmem::request::{parse, Request};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, Le32};

/// Guest memory: [0, 64 KiB) and [128 KiB, 132 KiB).
const LOW_END: u64 = 0x1_0000;
const HIGH: u64 = 0x2_0000;
const HIGH_LEN: u64 = 0x1000;
/// Where shape 2 puts the queue and the rest of the input.
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const BUFFERS: u64 = 0x3000;

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().unwrap())
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().unwrap())
}

fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes(b.try_into().unwrap())
}

fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW_END as usize),
        (GuestAddress(HIGH), HIGH_LEN as usize),
    ])
    .expect("guest memory")
}

/// The promises of `parse`, and the status write the daemon then makes.
fn check(mem: &GuestMemoryMmap<()>, request: Request) {
    let status = match request {
        Request::Flush { status } => Some(status),
        Request::Unknown { kind, status } => {
            assert_ne!(kind, 0, "a FLUSH classified as unknown");
            Some(status)
        }
        Request::Malformed { status, .. } => status,
    };
    if let Some(addr) = status {
        assert!(
            mem.check_range(addr, MSG_LEN as usize),
            "status {addr:?} handed out without 4 bytes of memory behind it"
        );
        mem.write_obj(Le32::from(RESP_ERR), addr)
            .expect("status write the daemon relies on");
    }
}

/// Shape 1: the bytes as a descriptor list.
fn direct(mem: &GuestMemoryMmap<()>, data: &[u8]) {
    let descs = data.chunks_exact(16).map(|c| {
        Descriptor::new(
            le_u64(&c[0..8]),
            le_u32(&c[8..12]),
            le_u16(&c[12..14]),
            le_u16(&c[14..16]),
        )
    });
    check(mem, parse(mem, descs));
}

/// Shape 2: the bytes as a split queue, walked like the daemon does.
fn queue(mem: &GuestMemoryMmap<()>, data: &[u8]) {
    let Some((head, rest)) = data.split_first_chunk::<6>() else {
        return;
    };
    let size = 1u16 << (head[0] % 9); // 1 ..= 256
    let event_idx = head[1] & 1 != 0;
    let next_avail = le_u16(&head[2..4]);
    let avail_idx = le_u16(&head[4..6]);
    let (table, rest) = rest.split_at(rest.len().min(16 * size as usize));
    let (ring, buffers) = rest.split_at(rest.len().min(2 * size as usize));
    mem.write_slice(table, GuestAddress(DESC_TABLE)).unwrap();
    mem.write_obj(0u16, GuestAddress(AVAIL_RING)).unwrap();
    mem.write_obj(avail_idx.to_le(), GuestAddress(AVAIL_RING + 2))
        .unwrap();
    mem.write_slice(ring, GuestAddress(AVAIL_RING + 4)).unwrap();
    let buffers = &buffers[..buffers.len().min((LOW_END - BUFFERS) as usize)];
    mem.write_slice(buffers, GuestAddress(BUFFERS)).unwrap();

    let mut q = Queue::new(256).unwrap();
    q.set_size(size);
    q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    q.set_used_ring_address(Some(USED_RING as u32), Some(0));
    q.set_event_idx(event_idx);
    q.set_next_avail(next_avail);
    q.set_ready(true);

    // As the vring thread: take every chain off the ring, then parse and complete each.
    let chains: Vec<_> = match q.iter(mem) {
        Ok(iter) => iter.collect(),
        Err(_) => return,
    };
    for chain in chains {
        let head = chain.head_index();
        let request = parse(mem, chain);
        check(mem, request);
        let _ = q.add_used(mem, head, MSG_LEN);
    }
    let _ = q.needs_notification(mem);
}

fuzz_target!(|data: &[u8]| {
    let mem = memory();
    // Let shape 1's descriptors point at meaningful bytes too.
    let fill = &data[..data.len().min(LOW_END as usize)];
    mem.write_slice(fill, GuestAddress(0)).unwrap();
    direct(&mem, data);
    queue(&mem, data);
});
