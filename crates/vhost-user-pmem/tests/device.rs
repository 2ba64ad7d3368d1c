//! Feature negotiation, config space, and the shared-memory mapping of the file, checked
//! against the real daemon over its real socket.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;

use common::{pattern, Env, MIB};
use pmem_frontend::{
    Options, VhostUserMMapFlags, VhostUserProtocolFeatures, PROTOCOL_FEATURES, RING_EVENT_IDX,
    RING_INDIRECT_DESC, VERSION_1, VIRTIO_PMEM_F_SHMEM_REGION,
};

#[test]
fn offers_the_contract_features() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let d = env.start(&[]);
    let fe = d.connect();

    let want = VERSION_1
        | VIRTIO_PMEM_F_SHMEM_REGION
        | RING_EVENT_IDX
        | RING_INDIRECT_DESC
        | PROTOCOL_FEATURES;
    assert_eq!(
        fe.features() & want,
        want,
        "offered features {:#x} lack {:#x}",
        fe.features(),
        want & !fe.features()
    );

    let want_proto = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::BACKEND_SEND_FD
        | VhostUserProtocolFeatures::SHMEM;
    assert!(
        fe.protocol_features().contains(want_proto),
        "offered protocol features {:?} lack {:?}",
        fe.protocol_features(),
        want_proto - fe.protocol_features()
    );
}

#[test]
fn config_space_is_sixteen_zero_bytes() {
    let env = Env::new();
    env.create_file(4 * MIB);
    let d = env.start(&[]);
    let mut fe = d.connect();
    // QEMU reads the config space before the device starts, and again after.
    assert_eq!(fe.get_config().unwrap(), vec![0u8; 16]);
    fe.start().unwrap();
    assert_eq!(fe.get_config().unwrap(), vec![0u8; 16]);
}

#[test]
fn shmem_config_is_one_region_of_the_device_size() {
    let env = Env::new();
    env.create_file(8 * MIB);
    let d = env.start(&[]);
    let mut fe = d.connect();
    let cfg = fe.get_shmem_config().unwrap();
    assert_eq!({ cfg.nregions }, 1);
    assert_eq!({ cfg.memory_sizes[0] }, 8 * MIB);
    assert!(cfg.memory_sizes[1..].iter().all(|&s| s == 0));
}

#[test]
fn shmem_map_comes_after_set_features_with_the_contract_fields() {
    let env = Env::new();
    env.create_file(4 * MIB);
    let d = env.start(&[]);
    let mut fe = d.connect();
    fe.get_config().unwrap();
    fe.get_shmem_config().unwrap();
    // QEMU 11.1 crashes on a SHMEM_MAP before the device starts; after several round
    // trips on the main channel, none may have been sent.
    assert!(
        fe.shmem_maps().is_empty(),
        "SHMEM_MAP sent before SET_FEATURES"
    );

    let map = fe.start().unwrap();
    let r = map.request;
    assert_eq!({ r.shmid }, 0);
    assert_eq!({ r.fd_offset }, 0);
    assert_eq!({ r.shm_offset }, 0);
    assert_eq!({ r.len }, 4 * MIB);
    assert_eq!({ r.flags }, VhostUserMMapFlags::WRITABLE.bits());
    assert_eq!(fe.shmem_maps().len(), 1, "exactly one SHMEM_MAP per start");
}

#[test]
fn the_mapped_fd_is_the_file() {
    let env = Env::new();
    let initial = env.create_file(4 * MIB);
    let d = env.start(&[]);
    let mut fe = d.connect();
    let map = fe.start().unwrap();

    let meta = std::fs::metadata(&env.file).unwrap();
    let sent = std::fs::File::from(map.fd().try_clone_to_owned().unwrap());
    let sent = sent.metadata().unwrap();
    assert_eq!(
        (sent.dev(), sent.ino()),
        (meta.dev(), meta.ino()),
        "the SHMEM_MAP fd is not the backing file"
    );

    // What the mapping shows is the file's content.
    let mut seen = vec![0u8; initial.len()];
    map.read(0, &mut seen).unwrap();
    assert!(seen == initial, "mapping content differs from the file");

    // Guest stores through the mapping land in the file (first, middle, last page).
    for (offset, seed) in [
        (0usize, 1u8),
        (2 * MIB as usize + 123, 2),
        (4 * MIB as usize - 4096, 3),
    ] {
        let data = pattern(4096, seed);
        map.write(offset, &data).unwrap();
        let mut f = std::fs::File::open(&env.file).unwrap();
        f.seek(SeekFrom::Start(offset as u64)).unwrap();
        let mut back = vec![0u8; data.len()];
        f.read_exact(&mut back).unwrap();
        assert!(
            back == data,
            "file does not show the store at offset {offset}"
        );
    }

    // And writes to the file show in the mapping.
    let data = pattern(8192, 9);
    let offset = MIB;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&env.file)
        .unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&data).unwrap();
    let mut back = vec![0u8; data.len()];
    map.read(offset as usize, &mut back).unwrap();
    assert!(back == data, "mapping does not show the file write");

    // A flush still works with the data written through the mapping.
    assert_eq!(fe.flush().unwrap(), 0);
}

#[test]
fn read_only_maps_without_writable_and_leaves_the_file_alone() {
    let env = Env::new();
    let initial = env.create_file(2 * MIB);
    let d = env.start(&["--read-only"]);
    let mut fe = d.connect_with(Options {
        expect_read_only: Some(true),
        ..Options::default()
    });
    let cfg = fe.get_shmem_config().unwrap();
    assert_eq!({ cfg.memory_sizes[0] }, 2 * MIB);
    let map = fe.start().unwrap();
    assert_eq!(
        { map.request.flags } & VhostUserMMapFlags::WRITABLE.bits(),
        0
    );
    assert!(!map.writable());
    assert_eq!({ map.request.len }, 2 * MIB);

    let mut seen = vec![0u8; initial.len()];
    map.read(0, &mut seen).unwrap();
    assert!(
        seen == initial,
        "read-only mapping content differs from the file"
    );

    // The fd itself must not allow writing.
    // SAFETY: fcntl(F_GETFL) on a valid fd.
    let fl = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&map.fd()), libc::F_GETFL) };
    assert_eq!(
        fl & libc::O_ACCMODE,
        libc::O_RDONLY,
        "read-only device sent a writable fd"
    );

    // Nothing written can become durable, so a flush must not report success.
    assert_eq!(fe.flush().unwrap(), -1, "flush on a read-only device");
    assert_eq!(
        fe.flush().unwrap(),
        -1,
        "second flush on a read-only device"
    );

    fe.disconnect();
    drop(d);
    assert!(
        std::fs::read(&env.file).unwrap() == initial,
        "read-only daemon changed the file"
    );
}

/// QEMU answers SHMEM_MAP with an error when it cannot mmap the fd; the guest then writes into
/// a region with no file behind it, so no flush may report success until a map succeeds.
#[test]
fn flushes_fail_while_the_frontend_refuses_the_map() {
    let env = Env::new();
    env.create_file(2 * MIB);
    let path = env.metrics_path();
    let d = env.start_with_metrics(&[]);
    let mut fe = d.connect();
    fe.refuse_shmem_maps(true);
    fe.start_no_wait().unwrap();
    fe.wait_shmem_refusals(1).unwrap();
    // The daemon has seen the refusal once it counts it, which can be after the frontend sent
    // it; the error is logged and counted around the same time.
    let m = d.report_until(&path, |m| {
        m.counters.map_refusals >= 1 && m.counters.log_errors >= 1
    });
    assert_eq!(m.counters.map_refusals, 1);
    assert_eq!((m.counters.maps, m.map_latency_us.count), (0, 0));
    assert_eq!(m.counters.log_errors, 1, "the refused map is an error");
    assert_eq!(fe.flush().unwrap(), -1, "flush after a refused map");
    assert_eq!(fe.flush().unwrap(), -1, "second flush after a refused map");

    // The next device start maps again; once that map is accepted, flushes succeed.
    fe.refuse_shmem_maps(false);
    fe.stop().unwrap();
    let map = fe.start().unwrap();
    map.write(0, b"mapped again").unwrap();
    assert_eq!(fe.flush().unwrap(), 0, "flush after a successful map");
    let m = d.report(&path);
    assert_eq!((m.counters.maps, m.counters.map_refusals), (1, 1));
    assert_eq!(m.map_latency_us.count, 1);
    let c = m.connection.unwrap();
    assert_eq!((c.requests, c.errors, c.maps), (3, 2, 1));
}

#[test]
fn queue_sizes_up_to_1024_are_accepted_and_larger_refused() {
    use pmem_frontend::vhost::VhostBackend;
    let env = Env::new();
    env.create_file(2 * MIB);
    let d = env.start(&[]);
    let mut fe = d.connect();
    // REPLY_ACK is negotiated, so a refused SET_VRING_NUM surfaces as an error.
    assert!(
        fe.connection().set_vring_num(0, 2048).is_err(),
        "2048 accepted"
    );
    drop(fe);
    let mut fe = d.connect_with(Options {
        queue_size: 1024,
        ..Options::default()
    });
    fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
}
