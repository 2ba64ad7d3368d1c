//! Parsing of the guest's descriptor chains into requests. Every rule about what a well-formed
//! request is lives here; nothing a guest writes can make this panic.

use std::fmt;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, Le32};

use crate::virtio::{MSG_LEN, REQ_TYPE_FLUSH};

/// Longest chain we look at. A valid request has two descriptors; reading more is pointless,
/// and bounding it keeps a hostile chain cheap.
const MAX_DESCRIPTORS: usize = 16;

/// What the guest asked for, and where the answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Flush {
        status: GuestAddress,
    },
    Unknown {
        kind: u32,
        status: GuestAddress,
    },
    Malformed {
        reason: Malformed,
        /// Where -1 can still be written, if the chain's last descriptor is usable for that.
        status: Option<GuestAddress>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    DescriptorCount(usize),
    RequestWritable,
    RequestTooShort(u32),
    RequestOutsideMemory(GuestAddress, u32),
    StatusReadOnly,
    StatusTooShort(u32),
    StatusOutsideMemory(GuestAddress, u32),
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Malformed::DescriptorCount(n) => write!(f, "{n} descriptors where 2 are expected"),
            Malformed::RequestWritable => write!(f, "request descriptor is device-writable"),
            Malformed::RequestTooShort(l) => write!(f, "request descriptor is {l} bytes, need 4"),
            Malformed::RequestOutsideMemory(a, l) => write!(
                f,
                "request descriptor {:#x}+{l} is outside guest memory",
                a.raw_value()
            ),
            Malformed::StatusReadOnly => write!(f, "status descriptor is not device-writable"),
            Malformed::StatusTooShort(l) => write!(f, "status descriptor is {l} bytes, need 4"),
            Malformed::StatusOutsideMemory(a, l) => write!(
                f,
                "status descriptor {:#x}+{l} is outside guest memory",
                a.raw_value()
            ),
        }
    }
}

fn in_memory<M: GuestMemoryBackend>(mem: &M, addr: GuestAddress, len: u32) -> bool {
    mem.check_range(addr, len as usize)
}

/// Parses one descriptor chain. `descriptors` is the chain as the queue walked it (indirect
/// tables already followed).
pub fn parse<M>(mem: &M, descriptors: impl Iterator<Item = Descriptor>) -> Request
where
    M: GuestMemoryBackend + Bytes<GuestAddress>,
{
    let descs: Vec<Descriptor> = descriptors.take(MAX_DESCRIPTORS + 1).collect();

    // The status goes into the chain's last descriptor whenever that is possible, even for a
    // malformed chain: the Linux driver's response buffer is not zeroed, so a chain completed
    // without a status would hand the guest whatever the buffer held before.
    let status = descs.last().and_then(|d| {
        (d.is_write_only() && d.len() >= MSG_LEN && in_memory(mem, d.addr(), MSG_LEN))
            .then(|| d.addr())
    });
    let malformed = |reason| Request::Malformed { reason, status };

    let [req, resp] = descs.as_slice() else {
        return malformed(Malformed::DescriptorCount(descs.len()));
    };
    if req.is_write_only() {
        return malformed(Malformed::RequestWritable);
    }
    if req.len() < MSG_LEN {
        return malformed(Malformed::RequestTooShort(req.len()));
    }
    if !in_memory(mem, req.addr(), req.len()) {
        return malformed(Malformed::RequestOutsideMemory(req.addr(), req.len()));
    }
    if !resp.is_write_only() {
        return malformed(Malformed::StatusReadOnly);
    }
    if resp.len() < MSG_LEN {
        return malformed(Malformed::StatusTooShort(resp.len()));
    }
    if !in_memory(mem, resp.addr(), resp.len()) {
        return malformed(Malformed::StatusOutsideMemory(resp.addr(), resp.len()));
    }
    let Ok(kind) = mem.read_obj::<Le32>(req.addr()) else {
        // check_range said the range was there; a failed read means the memory table changed
        // under us, which is the same as the address being outside it.
        return malformed(Malformed::RequestOutsideMemory(req.addr(), req.len()));
    };
    let status = resp.addr();
    match kind.to_native() {
        REQ_TYPE_FLUSH => Request::Flush { status },
        kind => Request::Unknown { kind, status },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::GuestMemoryMmap;

    const MEM: u64 = 0x10000;

    fn mem() -> GuestMemoryMmap<()> {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        m.write_obj(Le32::from(REQ_TYPE_FLUSH), GuestAddress(0x100))
            .unwrap();
        m.write_obj(Le32::from(7u32), GuestAddress(0x300)).unwrap();
        m
    }

    fn rd(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, 0, 0)
    }

    fn wr(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0)
    }

    fn parse_v(d: Vec<Descriptor>) -> Request {
        parse(&mem(), d.into_iter())
    }

    #[test]
    fn flush_and_unknown() {
        assert_eq!(
            parse_v(vec![rd(0x100, 4), wr(0x200, 4)]),
            Request::Flush {
                status: GuestAddress(0x200)
            }
        );
        assert_eq!(
            parse_v(vec![rd(0x300, 4), wr(0x200, 4)]),
            Request::Unknown {
                kind: 7,
                status: GuestAddress(0x200)
            }
        );
    }

    #[test]
    fn malformed_with_usable_status() {
        let st = Some(GuestAddress(0x200));
        let cases = [
            (vec![wr(0x200, 4)], Malformed::DescriptorCount(1)),
            (
                vec![rd(0x100, 4), rd(0x100, 4), wr(0x200, 4)],
                Malformed::DescriptorCount(3),
            ),
            (vec![wr(0x100, 4), wr(0x200, 4)], Malformed::RequestWritable),
            (
                vec![rd(0x100, 2), wr(0x200, 4)],
                Malformed::RequestTooShort(2),
            ),
            (
                vec![rd(MEM - 2, 4), wr(0x200, 4)],
                Malformed::RequestOutsideMemory(GuestAddress(MEM - 2), 4),
            ),
            (
                vec![rd(0x100, 4), wr(0x200, 1 << 20)],
                Malformed::StatusOutsideMemory(GuestAddress(0x200), 1 << 20),
            ),
        ];
        for (descs, reason) in cases {
            assert_eq!(parse_v(descs), Request::Malformed { reason, status: st });
        }
    }

    #[test]
    fn malformed_without_usable_status() {
        let cases = [
            (vec![], Malformed::DescriptorCount(0)),
            (vec![rd(0x100, 4), rd(0x200, 4)], Malformed::StatusReadOnly),
            (
                vec![rd(0x100, 4), wr(0x200, 3)],
                Malformed::StatusTooShort(3),
            ),
            (
                vec![rd(0x100, 4), wr(u64::MAX - 1, 4)],
                Malformed::StatusOutsideMemory(GuestAddress(u64::MAX - 1), 4),
            ),
        ];
        for (descs, reason) in cases {
            assert_eq!(
                parse_v(descs),
                Request::Malformed {
                    reason,
                    status: None
                }
            );
        }
    }

    #[test]
    fn long_chains_are_bounded() {
        let descs: Vec<_> = (0..10_000).map(|_| rd(0x100, 4)).collect();
        assert_eq!(
            parse_v(descs),
            Request::Malformed {
                reason: Malformed::DescriptorCount(MAX_DESCRIPTORS + 1),
                status: None
            }
        );
    }
}
