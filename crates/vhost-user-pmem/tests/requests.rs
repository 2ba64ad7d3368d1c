//! The request path: flushes, unknown types, every kind of malformed chain, indirect
//! chains, and many requests in flight.

mod common;

use std::collections::HashSet;

use common::{Daemon, Env, MIB, TIMEOUT};
use pmem_frontend::{DescSpec, Frontend, Options, STATUS_SENTINEL};

/// A started device.
fn started(opts: Options) -> (Env, Daemon, Frontend) {
    let env = Env::new();
    env.create_file(2 * MIB);
    let d = env.start(&[]);
    let mut fe = d.connect_with(opts);
    fe.start().unwrap();
    (env, d, fe)
}

#[test]
fn flush_returns_zero() {
    let (_env, _d, mut fe) = started(Options::default());
    for _ in 0..10 {
        let c = fe.request(0).unwrap();
        assert_eq!(c.used.len, 4, "flush must complete with used len 4");
        assert_eq!(c.status, 0);
    }
    assert_eq!(fe.flush().unwrap(), 0);
}

#[test]
fn flush_works_without_event_idx() {
    let (_env, _d, mut fe) = started(Options {
        ack_event_idx: false,
        ..Options::default()
    });
    for _ in 0..10 {
        assert_eq!(fe.flush().unwrap(), 0);
    }
}

#[test]
fn unknown_request_type_returns_minus_one() {
    let (_env, _d, mut fe) = started(Options::default());
    for req_type in [1u32, 2, 0x8000_0000, u32::MAX] {
        let c = fe.request(req_type).unwrap();
        assert_eq!(c.used.len, 4, "type {req_type}: used len");
        assert_eq!(c.status, -1, "type {req_type}: status");
        assert_eq!(fe.flush().unwrap(), 0, "flush after type {req_type}");
    }
}

/// Guest addresses used by the chain tests: a request buffer and two status buffers,
/// each inside a 256-byte window the test checks in full afterwards.
struct Bufs {
    req: u64,
    st: u64,
    st2: u64,
    /// Outside guest RAM (which is 16 MiB).
    outside: u64,
    /// Start and length of the window holding all three.
    window: (u64, usize),
}

/// Which of the status buffers.
#[derive(Clone, Copy, Debug)]
enum Status {
    St,
    St2,
}

impl Bufs {
    fn status(&self, which: Status) -> u64 {
        match which {
            Status::St => self.st,
            Status::St2 => self.st2,
        }
    }
}

/// What the device must do with a chain.
enum Expect {
    /// Write le32 -1 into this status buffer and complete with used len 4.
    MinusOneAt(Status),
    /// Complete with used len 0 and write nothing.
    Nothing,
    /// A valid request: write 0 into this status buffer, used len 4.
    ZeroAt(Status),
}

/// Submits the chain `build` makes, checks the completion and that nothing but the
/// expected status changed in guest RAM, then checks the device still serves.
fn check_chain(build: impl FnOnce(&Bufs) -> Vec<DescSpec>, expect: Expect) {
    let (_env, d, mut fe) = started(Options::default());
    let base = fe.scratch_addr();
    let bufs = Bufs {
        req: base + 0x10,
        st: base + 0x110,
        st2: base + 0x210,
        outside: 1 << 32,
        window: (base, 0x300),
    };
    // Fill the window with a pattern, then the request (FLUSH) and the sentinels.
    let mut image = common::pattern(bufs.window.1, 42);
    let put = |image: &mut Vec<u8>, addr: u64, v: u32| {
        let at = (addr - base) as usize;
        image[at..at + 4].copy_from_slice(&v.to_le_bytes());
    };
    put(&mut image, bufs.req, 0);
    put(&mut image, bufs.st, STATUS_SENTINEL);
    put(&mut image, bufs.st2, STATUS_SENTINEL);
    fe.write_guest(base, &image).unwrap();
    // Also guard the last bytes of guest RAM, which one case straddles.
    let end = fe.guest_memory_size();
    fe.write_guest(end - 8, &[0xee; 8]).unwrap();

    let chain = build(&bufs);
    let head = fe.submit_chain(&chain).unwrap();
    let used = fe
        .wait_used(TIMEOUT)
        .unwrap_or_else(|e| panic!("chain {chain:?} not completed: {e}; log:\n{}", d.log()));
    assert_eq!(used.id, u32::from(head), "used id");

    let (want_len, want_at) = match expect {
        Expect::MinusOneAt(which) => {
            put(&mut image, bufs.status(which), (-1i32) as u32);
            (4, Some(which))
        }
        Expect::ZeroAt(which) => {
            put(&mut image, bufs.status(which), 0);
            (4, Some(which))
        }
        Expect::Nothing => (0, None),
    };
    assert_eq!(used.len, want_len, "used len for chain {chain:?}");
    let after = fe.read_guest(base, bufs.window.1).unwrap();
    if after != image {
        let diff: Vec<String> = after
            .iter()
            .zip(&image)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| format!("+{:#x}: {a:#04x} (want {b:#04x})", i))
            .take(16)
            .collect();
        panic!(
            "guest memory wrong after chain {chain:?} (status expected at {want_at:?}): {}",
            diff.join(", ")
        );
    }
    assert_eq!(
        fe.read_guest(end - 8, 8).unwrap(),
        vec![0xee; 8],
        "end of guest RAM written"
    );

    // The daemon keeps serving.
    assert_eq!(fe.flush().unwrap(), 0, "flush after chain {chain:?}");
    assert_eq!(fe.flush().unwrap(), 0);
}

#[test]
fn well_formed_chain_in_scratch_memory() {
    check_chain(
        |b| vec![DescSpec::readable(b.req, 4), DescSpec::writable(b.st, 4)],
        Expect::ZeroAt(Status::St),
    );
}

#[test]
fn longer_buffers_are_fine() {
    // ">= 4 bytes" on both sides: a request of 8 bytes and a status of 16 are valid, and
    // only the first 4 status bytes are written.
    check_chain(
        |b| vec![DescSpec::readable(b.req, 8), DescSpec::writable(b.st, 16)],
        Expect::ZeroAt(Status::St),
    );
}

#[test]
fn malformed_single_readable_descriptor() {
    check_chain(|b| vec![DescSpec::readable(b.req, 4)], Expect::Nothing);
}

#[test]
fn malformed_single_writable_descriptor() {
    check_chain(
        |b| vec![DescSpec::writable(b.st, 4)],
        Expect::MinusOneAt(Status::St),
    );
}

#[test]
fn malformed_three_descriptors() {
    check_chain(
        |b| {
            vec![
                DescSpec::readable(b.req, 4),
                DescSpec::writable(b.st, 4),
                DescSpec::writable(b.st2, 4),
            ]
        },
        Expect::MinusOneAt(Status::St2),
    );
}

#[test]
fn malformed_three_descriptors_last_readable() {
    check_chain(
        |b| {
            vec![
                DescSpec::readable(b.req, 4),
                DescSpec::writable(b.st, 4),
                DescSpec::readable(b.st2, 4),
            ]
        },
        Expect::Nothing,
    );
}

#[test]
fn malformed_request_shorter_than_four_bytes() {
    check_chain(
        |b| vec![DescSpec::readable(b.req, 2), DescSpec::writable(b.st, 4)],
        Expect::MinusOneAt(Status::St),
    );
}

#[test]
fn malformed_status_shorter_than_four_bytes() {
    check_chain(
        |b| vec![DescSpec::readable(b.req, 4), DescSpec::writable(b.st, 2)],
        Expect::Nothing,
    );
}

#[test]
fn malformed_request_descriptor_write_only() {
    check_chain(
        |b| vec![DescSpec::writable(b.req, 4), DescSpec::writable(b.st, 4)],
        Expect::MinusOneAt(Status::St),
    );
}

#[test]
fn malformed_status_descriptor_read_only() {
    check_chain(
        |b| vec![DescSpec::readable(b.req, 4), DescSpec::readable(b.st, 4)],
        Expect::Nothing,
    );
}

#[test]
fn malformed_request_outside_guest_memory() {
    check_chain(
        |b| {
            vec![
                DescSpec::readable(b.outside, 4),
                DescSpec::writable(b.st, 4),
            ]
        },
        Expect::MinusOneAt(Status::St),
    );
}

#[test]
fn malformed_status_outside_guest_memory() {
    check_chain(
        |b| {
            vec![
                DescSpec::readable(b.req, 4),
                DescSpec::writable(b.outside, 4),
            ]
        },
        Expect::Nothing,
    );
}

#[test]
fn malformed_status_straddling_the_end_of_guest_memory() {
    let end = Options::default().guest_memory_size;
    check_chain(
        |b| vec![DescSpec::readable(b.req, 4), DescSpec::writable(end - 2, 4)],
        Expect::Nothing,
    );
}

#[test]
fn indirect_chain_works() {
    check_chain(
        |b| {
            vec![DescSpec::indirect(vec![
                DescSpec::readable(b.req, 4),
                DescSpec::writable(b.st, 4),
            ])]
        },
        Expect::ZeroAt(Status::St),
    );
}

/// Submits `n` flushes before waiting for any, then collects all completions.
fn flushes_in_flight(opts: Options, n: usize) {
    let (_env, d, mut fe) = started(opts);
    let mut heads = HashSet::new();
    for _ in 0..n {
        assert!(heads.insert(fe.submit_request(0).unwrap()));
    }
    assert_eq!(fe.in_flight(), n);
    let mut statuses = Vec::new();
    for i in 0..n {
        let used = fe
            .wait_used(TIMEOUT)
            .unwrap_or_else(|e| panic!("completion {i} of {n}: {e}; log:\n{}", d.log()));
        let head = u16::try_from(used.id).unwrap();
        assert!(
            heads.remove(&head),
            "head {head} completed twice or never submitted"
        );
        assert_eq!(used.len, 4, "used len of head {head}");
        statuses.push(fe.request_status(head).unwrap());
    }
    assert!(heads.is_empty());
    assert!(statuses.iter().all(|&s| s == 0), "statuses: {statuses:?}");
    assert_eq!(fe.flush().unwrap(), 0);
}

#[test]
fn sixty_four_flushes_in_flight() {
    flushes_in_flight(Options::default(), 64);
}

#[test]
fn sixty_four_flushes_in_flight_without_event_idx() {
    flushes_in_flight(
        Options {
            ack_event_idx: false,
            ..Options::default()
        },
        64,
    );
}

#[test]
fn a_full_queue_of_flushes() {
    // 2 descriptors per request: 512 fill a 1024-entry queue.
    flushes_in_flight(
        Options {
            queue_size: 1024,
            ..Options::default()
        },
        512,
    );
}

#[test]
fn small_queue_wraps_around_many_times() {
    let (_env, _d, mut fe) = started(Options {
        queue_size: 4,
        ..Options::default()
    });
    for _ in 0..40 {
        let a = fe.submit_request(0).unwrap();
        let b = fe.submit_request(0).unwrap();
        for _ in 0..2 {
            let used = fe.wait_used(TIMEOUT).unwrap();
            assert_eq!(used.len, 4);
        }
        assert_eq!(fe.request_status(a).unwrap(), 0);
        assert_eq!(fe.request_status(b).unwrap(), 0);
    }
}

#[test]
fn ring_indices_wrap_past_65535() {
    // As after a migration: the ring starts just below the 16-bit wrap.
    let (_env, _d, mut fe) = started(Options {
        ring_base: 65530,
        ..Options::default()
    });
    for _ in 0..20 {
        assert_eq!(fe.flush().unwrap(), 0);
    }
    // GET_VRING_BASE reports the wrapped index.
    assert_eq!(fe.stop().unwrap(), 65530u16.wrapping_add(20));
}
