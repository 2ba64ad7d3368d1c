//! A vhost-user frontend for virtio-pmem backends, for tests and benchmarks.
//!
//! It does what QEMU 11's `vhost-user-test-device-pci,virtio-id=27` and a Linux
//! virtio-pmem driver do together, using the `vhost` crate's frontend side for the
//! protocol:
//!
//! ```no_run
//! let mut fe = pmem_frontend::Frontend::connect("/run/pmem0.sock")?;
//! let map = fe.start()?; // SET_FEATURES .. SET_VRING_ENABLE, then the SHMEM_MAP
//! assert_eq!(fe.flush()?, 0);
//! # Ok::<(), pmem_frontend::Error>(())
//! ```
//!
//! Or as the listening side, for a backend started with `--connect` (QEMU's `server=on`):
//!
//! ```no_run
//! let listener = pmem_frontend::FrontendListener::bind("/run/pmem0.sock")?;
//! // ... start `vhost-user-pmem --connect /run/pmem0.sock ...` ...
//! let mut fe = listener.accept()?;
//! fe.start()?;
//! assert_eq!(fe.flush()?, 0);
//! # Ok::<(), pmem_frontend::Error>(())
//! ```

mod backend_channel;
pub mod daemon;
mod error;
mod frontend;
mod memory;
mod raw;
mod vring;
mod watchdog;

pub use backend_channel::ShmemMapping;
pub use error::{Error, Result};
pub use frontend::{
    probe, Completion, Frontend, FrontendListener, Options, CONFIG_SIZE, PROTOCOL_FEATURES,
    REQ_TYPE_FLUSH, RING_EVENT_IDX, RING_INDIRECT_DESC, STATUS_SENTINEL, VERSION_1,
    VIRTIO_PMEM_F_SHMEM_REGION,
};
pub use memory::GuestRam;
pub use raw::{
    RawConnection, RawHeader, RawReply, FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION_1, HEADER_LEN,
};
/// The vhost crate, for requests the harness does not wrap (see `Frontend::connection`).
pub use vhost;
/// Re-exported so users need not depend on `vhost` for flag and message types.
pub use vhost::vhost_user::message::{VhostUserMMap, VhostUserMMapFlags, VhostUserShMemConfig};
pub use vhost::vhost_user::VhostUserProtocolFeatures;
pub use vring::{
    DescSpec, NotifyCounts, Used, AVAIL_RING_ADDR, DESC_TABLE_ADDR, MAX_QUEUE_SIZE, USED_RING_ADDR,
};
