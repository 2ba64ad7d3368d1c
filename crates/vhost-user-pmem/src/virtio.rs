//! virtio-pmem constants from the virtio specification ("PMEM Device"): feature bits, the
//! queue, the request and response layout, the config space.

/// virtio device id of a pmem device.
pub const VIRTIO_ID_PMEM: u32 = 27;

/// Feature bit: the memory is shared-memory region 0 instead of a guest-physical range given in
/// config space. Linux 6.8 and later support it.
pub const VIRTIO_PMEM_F_SHMEM_REGION: u64 = 0;

/// The single request queue.
pub const NUM_QUEUES: usize = 1;
pub const REQUEST_QUEUE: u16 = 0;

/// QEMU's generic device asks for 256 (`vq_size=256`); allow larger rings from other frontends.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// Shared-memory region id that carries the file.
pub const SHMEM_REGION_ID: u8 = 0;

/// Request type of a flush, the only request virtio-pmem defines.
pub const REQ_TYPE_FLUSH: u32 = 0;

/// Response codes. The driver turns anything but 0 into -EIO.
pub const RESP_OK: u32 = 0;
pub const RESP_ERR: u32 = u32::MAX; // -1 as le32

/// Size of both the request and the response structure.
pub const MSG_LEN: u32 = 4;

/// Config space `{le64 start; le64 size}`. With SHMEM_REGION negotiated the device should
/// report zeros and the driver ignores them, so the space is all zeros.
pub const CONFIG_SPACE_LEN: usize = 16;
