//! vhost-user-pmem: a vhost-user backend that exposes a host file to a guest as a virtio-pmem
//! device, with the file's memory in a vhost-user shared-memory region and every guest flush
//! answered only after an fdatasync of the file.

pub mod args;
pub mod backend;
pub mod backing;
pub mod config;
pub mod device;
pub mod flush;
pub mod metrics;
pub mod queue;
pub mod ratelimit;
pub mod request;
pub mod shmem;
pub mod size;
pub mod socket;
pub mod stats;

use std::sync::Arc;
use std::time::Duration;

use log::{error, info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{Device, PmemBackend};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Backing(#[from] backing::BackingError),
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    #[error("cannot start the device threads: {0}")]
    Threads(std::io::Error),
}

/// Serves one frontend connection after another, forever. A connection that ends, cleanly or
/// not, only sends the daemon back to waiting for the next one: the daemon never exits because of
/// what a frontend or a guest did.
pub fn serve(device: Arc<Device>, mut listener: Listener) -> ! {
    let mut conn_id = 0u64;
    loop {
        conn_id += 1;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = match PmemBackend::new(device.clone(), conn_id, mem.clone()) {
            Ok(b) => Arc::new(b),
            Err(e) => {
                error!("cannot start the connection's threads: {e}; retrying in 1 s");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let mut daemon = match VhostUserDaemon::new("vhost-user-pmem".into(), backend.clone(), mem)
        {
            Ok(d) => d,
            Err(e) => {
                error!("cannot set up the vhost-user handler: {e}; retrying in 1 s");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        info!("waiting for a frontend");
        if let Err(e) = daemon.start(&mut listener) {
            error!("cannot accept a frontend: {e}; retrying in 1 s");
            backend.signal_exit();
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        info!("frontend connected (connection {conn_id})");
        let result = daemon.wait();
        backend.signal_exit();
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!(
                "frontend disconnected (connection {conn_id}); {}",
                device.stats
            ),
            Err(e) => warn!("connection {conn_id} ended: {e}; {}", device.stats),
        }
    }
}

/// Validates everything, opens and locks the file, binds the socket, and returns what [`serve`]
/// needs. Nothing is listening for frontends until `serve` runs.
pub fn prepare(config: &config::Config) -> Result<(Arc<Device>, Listener), Error> {
    // A taken socket path is refused before the file is touched; the socket is bound only once
    // the file is ready, so a frontend that can connect finds a device it can use.
    socket::ensure_free(&config.socket_path)?;
    let backing = backing::BackingFile::open(config)?;
    let listener = socket::listen(&config.socket_path)?;
    info!(
        "serving {} ({}, {}, flush mode {}) on {}",
        config.file.display(),
        size::ByteSize(backing.size()),
        if backing.read_only() {
            "read-only"
        } else {
            "read-write"
        },
        config.flush_mode,
        config.socket_path.display()
    );
    let device = Device::new(backing, config.flush_mode).map_err(Error::Threads)?;
    Ok((Arc::new(device), listener))
}
