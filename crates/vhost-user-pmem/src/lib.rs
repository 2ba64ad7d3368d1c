//! vhost-user-pmem: a vhost-user backend that exposes a host file to a guest as a virtio-pmem
//! device, with the file's memory in a vhost-user shared-memory region and every guest flush
//! answered only after an fdatasync of the file.

pub mod activation;
pub mod allocation;
pub mod args;
pub mod backend;
pub mod backing;
pub mod capabilities;
pub mod config;
pub mod device;
pub mod flush;
pub mod flush_limit;
pub mod logging;
pub mod memory_guard;
pub mod metrics;
pub mod modes;
pub mod notify;
pub mod queue;
pub mod ratelimit;
pub mod request;
pub mod sandbox;
pub mod shmem;
pub mod size;
pub mod snapshot;
pub mod socket;
pub mod stats;
pub mod sync;
pub mod virtio;

use std::sync::Arc;
use std::time::Duration;

use log::{error, info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::PmemBackend;
use crate::config::Endpoint;
use crate::device::Device;

/// First and longest wait between attempts to reach a frontend again in client mode: quick
/// enough for a frontend that restarts at once, and at most one attempt (and log line) every
/// few seconds for one that stays away.
pub const RECONNECT_FIRST_DELAY: Duration = Duration::from_millis(100);
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(5);

/// What can go wrong while setting up, once the configuration was accepted: failures of the
/// system, not of the command line (exit 1, where a refused configuration exits 2).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Backing(#[from] backing::BackingError),
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    #[error("cannot start the device threads: {0}")]
    Threads(std::io::Error),
}

/// Where [`serve`] finds its frontends, as [`prepare`] set it up.
pub enum Frontends {
    /// A bound, listening socket; frontends connect to it one after another.
    Listen(Listener),
    /// The frontend listens; the daemon connects to it, and again after every disconnect.
    /// `first` is the session [`prepare`] connected, so that a wrong path fails at start.
    Connect {
        path: String,
        first: Option<Session>,
    },
}

/// One frontend connection: its backend and the vhost-user handler serving it.
pub struct Session {
    daemon: VhostUserDaemon<Arc<PmemBackend>>,
    backend: Arc<PmemBackend>,
}

/// A fresh session (backend and vhost-user handler) for connection `conn_id`, not connected yet.
fn new_session(device: &Arc<Device>, conn_id: u64) -> Result<Session, String> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = PmemBackend::new(device.clone(), conn_id, mem.clone())
        .map_err(|e| format!("cannot start the connection's threads: {e}"))?;
    let daemon = VhostUserDaemon::new("vhost-user-pmem".into(), backend.clone(), mem)
        .map_err(|e| format!("cannot set up the vhost-user handler: {e}"))?;
    Ok(Session { daemon, backend })
}

/// Connects to the frontend at `path` with a fresh handler.
fn connect_once(device: &Arc<Device>, conn_id: u64, path: &str) -> Result<Session, String> {
    let mut d = new_session(device, conn_id)?;
    device.stats.begin_connection(conn_id);
    if let Err(e) = d.daemon.start_client(path) {
        // The handler's vring threads were started by `new`; stop them with this attempt.
        d.backend.signal_exit();
        return Err(format!("cannot connect to {path}: {e}"));
    }
    device.stats.connection_made(conn_id);
    Ok(d)
}

/// Connects to the frontend at `path`, retrying with a doubling delay until it works. Every
/// failed attempt is logged: a daemon that waits for its frontend should say so.
fn reconnect(device: &Arc<Device>, conn_id: u64, path: &str) -> Session {
    let mut delay = RECONNECT_FIRST_DELAY;
    let mut attempt = 1u64;
    loop {
        match connect_once(device, conn_id, path) {
            Ok(d) => return d,
            Err(e) => {
                info!(
                    "{e} (attempt {attempt}); retrying in {} ms",
                    delay.as_millis()
                );
                std::thread::sleep(delay);
                delay = (delay * 2).min(RECONNECT_MAX_DELAY);
                attempt += 1;
            }
        }
    }
}

/// Serves one frontend connection after another, forever. A connection that ends, cleanly or
/// not, only sends the daemon back to waiting for the next one (listening) or to connecting
/// again (client mode): the daemon never exits because of what a frontend or a guest did.
pub fn serve(device: Arc<Device>, frontends: Frontends) -> ! {
    match frontends {
        Frontends::Listen(listener) => serve_listening(device, listener),
        Frontends::Connect { path, first } => serve_client(device, &path, first),
    }
}

fn serve_listening(device: Arc<Device>, mut listener: Listener) -> ! {
    let mut last_id = 0u64;
    loop {
        // A failed accept uses up no id, so the ids of the connections served count 1, 2, ..
        let conn_id = last_id + 1;
        let mut d = match new_session(&device, conn_id) {
            Ok(d) => d,
            Err(e) => {
                error!("{e}; retrying in 1 s");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        info!("waiting for a frontend");
        // Before the accept: the handler thread serves the connection's first message at
        // once, and its work must be counted for it.
        device.stats.begin_connection(conn_id);
        if let Err(e) = d.daemon.start(&mut listener) {
            error!("cannot accept a frontend: {e}; retrying in 1 s");
            d.backend.signal_exit();
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        last_id = conn_id;
        device.stats.connection_made(conn_id);
        info!("frontend connected (connection {conn_id})");
        run_connection(&device, conn_id, d);
    }
}

fn serve_client(device: Arc<Device>, path: &str, mut first: Option<Session>) -> ! {
    let mut conn_id = 0u64;
    loop {
        conn_id += 1;
        let d = match first.take() {
            Some(d) => d,
            None => {
                info!("connecting to the frontend at {path} again");
                reconnect(&device, conn_id, path)
            }
        };
        info!("connected to the frontend at {path} (connection {conn_id})");
        run_connection(&device, conn_id, d);
    }
}

/// Waits until the frontend of connection `conn_id` goes away, then stops its threads.
fn run_connection(device: &Device, conn_id: u64, mut d: Session) {
    let result = d.daemon.wait();
    d.backend.signal_exit();
    // Dropping the session joins its vring thread, which may be inside an fdatasync (group
    // mode answers on it) that takes long or hangs; the next frontend must not wait for that.
    let reaper = std::thread::Builder::new().name("pmem-conn-end".into());
    if let Err(e) = reaper.spawn(move || drop(d)) {
        warn!("cannot end connection {conn_id} in the background: {e}");
    }
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

/// Validates everything, opens and locks the file, binds the socket (or, in client mode,
/// makes the first connection), and returns what [`serve`] needs. Nothing is served until
/// `serve` runs; in client mode the frontend's first message waits in the socket until then.
pub fn prepare(config: &config::Config) -> Result<(Arc<Device>, Frontends), Error> {
    // A taken or missing socket path is refused before the file is touched; the socket is
    // bound or connected only once the file is ready, so a frontend that can talk to the
    // daemon finds a device it can use.
    match &config.endpoint {
        Endpoint::Listen { path, .. } => {
            // Found here rather than by bind(): by then the file would be created or extended.
            socket::check_listen_dir(path)?;
            socket::ensure_free(path)?;
        }
        Endpoint::Connect(path) => socket::check_connect_path(std::path::Path::new(path))?,
        // config.rs checked that it is a listening UNIX stream socket.
        Endpoint::Fd(_) => {}
    }
    let backing = backing::BackingFile::open(&config.file, config.size, config.access)?;
    let size = backing.size();
    let read_only = backing.read_only();
    // Bound before the flush workers start: listen() sets the process-wide umask for a moment.
    let mut frontends = match &config.endpoint {
        Endpoint::Listen { path, mode, group } => Frontends::Listen(socket::listen(
            path,
            *mode,
            group.as_ref().map(|g| (g.name.as_str(), g.gid)),
        )?),
        Endpoint::Fd(inherited) => Frontends::Listen(socket::adopt(inherited.fd())?),
        Endpoint::Connect(path) => Frontends::Connect {
            path: path.clone(),
            first: None,
        },
    };
    let device = match Device::new(backing, config.flush_mode, config.flush_rate_limit) {
        Ok(d) => Arc::new(d.with_poll(config.poll)),
        Err(e) => {
            if let Endpoint::Listen { path, .. } = &config.endpoint {
                // The listener does not remove its file when dropped; a failed start leaves
                // nothing behind.
                let _ = std::fs::remove_file(path);
            }
            return Err(Error::Threads(e));
        }
    };
    if let Frontends::Connect { path, first } = &mut frontends {
        // Unlike a reconnect, the first attempt is not retried: a wrong path fails at start.
        let mut d =
            new_session(&device, 1).map_err(|e| Error::Threads(std::io::Error::other(e)))?;
        device.stats.begin_connection(1);
        d.daemon
            .start_client(path)
            .map_err(|e| socket::SocketError::Connect {
                path: path.as_str().into(),
                reason: e.to_string(),
            })?;
        device.stats.connection_made(1);
        *first = Some(d);
    }
    let limit = match config.flush_rate_limit {
        Some(l) => format!(", flush rate limit {l}"),
        None => String::new(),
    };
    let poll = match config.poll.as_micros() {
        0 => String::new(),
        us => format!(", polling {us} us after each answer"),
    };
    info!(
        "serving {} ({}, {}, flush mode {}{limit}{poll}), {}",
        config.file.display(),
        size::ByteSize(size),
        if read_only { "read-only" } else { "read-write" },
        config.flush_mode,
        config.endpoint
    );
    Ok((device, frontends))
}
