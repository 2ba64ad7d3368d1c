//! The vhost-user-pmem daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::{error, info};

use vhost_user_pmem::args::Args;
use vhost_user_pmem::backend::Device;
use vhost_user_pmem::config::Config;

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("vhost-user-pmem: error: {e}");
    ExitCode::FAILURE
}

/// Blocks SIGINT and SIGTERM in this thread, and so in every thread spawned after it; the
/// signal thread then receives them with sigwait and can shut down in an orderly way instead of
/// being interrupted in the middle of an fdatasync.
fn block_exit_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t for all four calls.
    let ret = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if ret != 0 {
        return Err(std::io::Error::from_raw_os_error(ret));
    }
    Ok(set)
}

fn wait_for_exit_signal(set: libc::sigset_t, device: Arc<Device>, socket: PathBuf) {
    let mut sig: libc::c_int = 0;
    loop {
        // SAFETY: `set` is initialised and `sig` is a valid place for the result.
        let ret = unsafe { libc::sigwait(&set, &mut sig) };
        if ret == 0 {
            break;
        }
    }
    let name = if sig == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    info!("{name} received; shutting down");
    // Guest stores that no flush has covered yet are in the host page cache; make them durable
    // so that a clean shutdown never loses what the guest wrote.
    let synced = device.backing.sync();
    if let Err(e) = std::fs::remove_file(&socket) {
        error!("cannot remove {}: {e}", socket.display());
    }
    info!("final stats: {}", device.stats);
    match synced {
        Ok(()) => {
            info!("{} is synced; exiting", device.backing.path().display());
            std::process::exit(0);
        }
        Err(e) => {
            error!("exiting with the file not durable: {}", e.0);
            std::process::exit(1);
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    let config = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let set = match block_exit_signals() {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot block signals: {e}")),
    };
    let (device, listener) = match vhost_user_pmem::prepare(&config) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    let d = device.clone();
    let socket = config.socket_path.clone();
    if let Err(e) = std::thread::Builder::new()
        .name("pmem-signals".into())
        .spawn(move || wait_for_exit_signal(set, d, socket))
    {
        return fail(format!("cannot start the signal thread: {e}"));
    }
    vhost_user_pmem::serve(device, listener)
}
