//! The vhost-user-pmem daemon.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use log::{debug, error, info, warn};

use vhost_user_pmem::args::Args;
use vhost_user_pmem::capabilities;
use vhost_user_pmem::config::{Config, Endpoint, MetricsFile, ProcessEnv};
use vhost_user_pmem::device::Device;
use vhost_user_pmem::logging;
use vhost_user_pmem::metrics::{self, Reporter};
use vhost_user_pmem::modes::SeccompMode;
use vhost_user_pmem::notify::Notifier;
use vhost_user_pmem::sandbox;
use vhost_user_pmem::socket::SocketFile;

/// Exit status of a usage error, as clap's own: the command line (or the service manager's
/// variables) asked for something that cannot work as given. A service manager need not
/// restart the daemon for it (systemd: RestartPreventExitStatus=2).
const EXIT_USAGE: u8 = 2;

/// A failure at run time: exit status 1.
fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("vhost-user-pmem: error: {e}");
    ExitCode::FAILURE
}

/// A refused configuration: exit status 2.
fn usage(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("vhost-user-pmem: error: {e}");
    ExitCode::from(EXIT_USAGE)
}

/// Blocks SIGINT, SIGTERM, SIGHUP and SIGUSR1 in this thread, and so in every thread spawned
/// after it; the signal thread then receives them with sigwait. Exit signals can then never
/// interrupt an fdatasync halfway, and SIGUSR1 and SIGHUP (whose default actions kill) only
/// ever mean "report" and "stop cleanly". SIGHUP is a stop like SIGTERM: a daemon whose
/// terminal or session goes away must still make the file durable and remove its socket.
fn block_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t for all six calls.
    let ret = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if ret != 0 {
        return Err(std::io::Error::from_raw_os_error(ret));
    }
    Ok(set)
}

/// Waits for one of the signals in `set`, or until `deadline`; `None` means the deadline came.
fn next_signal(set: &libc::sigset_t, deadline: Option<Instant>) -> Option<libc::c_int> {
    loop {
        let Some(deadline) = deadline else {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is initialised and `sig` is a valid place for the result.
            if unsafe { libc::sigwait(set, &mut sig) } == 0 {
                return Some(sig);
            }
            continue;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let ts = libc::timespec {
            // At most a day (see config.rs), so this fits.
            tv_sec: left.as_secs() as libc::time_t,
            tv_nsec: left.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `set` and `ts` are initialised; a null siginfo pointer is allowed.
        let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
        if sig > 0 {
            return Some(sig);
        }
        // EAGAIN is the timeout, which the next round sees from the clock; EINTR (a signal
        // outside the set) just waits again.
    }
}

/// Writes the metrics file, logging rather than failing: a full disk must not stop flushes.
fn write_metrics(reporter: &mut Reporter, device: &Device, file: &MetricsFile) {
    match reporter.write(device, &file.path) {
        Ok(()) => debug!("metrics written to {}", file.path.display()),
        Err(e) => warn!("{e}"),
    }
}

/// The signal thread: reports metrics on SIGUSR1 and on the --metrics-interval timer, and shuts
/// down on SIGINT, SIGTERM or SIGHUP. Between those it sleeps in the kernel.
///
/// `socket` is the listening socket to remove at exit; in client mode the socket is the
/// frontend's and stays, and an inherited one (--fd) belongs to whoever passed it.
/// `notifier` tells the service manager that the daemon is stopping.
fn signal_loop(
    set: libc::sigset_t,
    device: Arc<Device>,
    socket: Option<SocketFile>,
    metrics_file: Option<MetricsFile>,
    mut reporter: Reporter,
    notifier: Option<Arc<Notifier>>,
) {
    let period = metrics_file.as_ref().and_then(|m| m.interval);
    let mut next = period.map(|p| Instant::now() + p);
    let sig = loop {
        match next_signal(&set, next) {
            None => {
                if let (Some(file), Some(p)) = (&metrics_file, period) {
                    write_metrics(&mut reporter, &device, file);
                    // Keep the period steady; after a long stall (a suspended machine) start
                    // afresh rather than write several times in a row.
                    let mut n = next.unwrap_or_else(Instant::now) + p;
                    if n <= Instant::now() {
                        n = Instant::now() + p;
                    }
                    next = Some(n);
                }
            }
            Some(libc::SIGUSR1) => match &metrics_file {
                Some(file) => {
                    write_metrics(&mut reporter, &device, file);
                    info!("SIGUSR1: metrics written to {}", file.path.display());
                }
                // One line of JSON on stderr, outside the logger so that RUST_LOG cannot hide it.
                None => eprintln!("{}", reporter.line(&device)),
            },
            Some(sig) => break sig,
        }
    };
    let name = match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "SIGTERM",
    };
    info!("{name} received; shutting down");
    if let Some(n) = &notifier {
        if let Err(e) = n.send("STOPPING=1") {
            warn!("cannot tell the service manager that the daemon stops: {e}");
        }
    }
    // Guest stores that no flush has covered yet are in the host page cache; make them durable
    // so that a clean shutdown never loses what the guest wrote.
    let synced = device.backing.sync();
    if let Some(socket) = &socket {
        if let Err(e) = socket.remove() {
            error!("cannot remove {}: {e}", socket.path().display());
        }
    }
    if let Some(file) = &metrics_file {
        write_metrics(&mut reporter, &device, file);
    }
    info!("final stats: {}", device.stats.report());
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

/// Removes the socket file of a start that failed after the socket was bound: the listener
/// does not remove it when dropped.
fn abandon(config: &Config, socket: Option<&SocketFile>) {
    match (socket, &config.endpoint) {
        (Some(s), _) => {
            let _ = s.remove();
        }
        (None, Endpoint::Listen { path, .. }) => {
            let _ = std::fs::remove_file(path);
        }
        _ => {}
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_capabilities {
        println!("{}", capabilities::json());
        return ExitCode::SUCCESS;
    }
    // Still the only thread, so the environment may be changed (the variables are unset).
    let env = ProcessEnv::take();
    if let Err(e) = logging::init(args.log_level) {
        return fail(format!("cannot install the logger: {e}"));
    }

    let config = match Config::new(args, env) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    for note in &config.notes {
        info!("{note}");
    }
    let set = match block_signals() {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot block signals: {e}")),
    };
    if let Some(file) = &config.metrics {
        // Before the file and the socket are touched, like every other refusal.
        if let Err(e) = metrics::check_writable(&file.path) {
            return fail(e);
        }
    }
    // An unsupported machine is refused before anything is touched too; the filter goes in
    // only once the file is open and the socket ready.
    if let Err(e) = sandbox::check_supported(config.seccomp) {
        return fail(e);
    }
    sandbox::prepare_allocator();
    if let Err(e) = vhost_user_pmem::memory_guard::install() {
        return fail(format!(
            "cannot install the SIGBUS handler for guest memory: {e}"
        ));
    }
    let (device, frontends) = match vhost_user_pmem::prepare(&config) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    let mut reporter = Reporter::default();
    if let Some(file) = &config.metrics {
        // Written once before serving, so that a reader finds the file as soon as the socket
        // is there.
        write_metrics(&mut reporter, &device, file);
        if let Some(p) = file.interval {
            info!(
                "metrics go to {} every {} s",
                file.path.display(),
                p.as_secs()
            );
        }
    }
    let socket = match &config.endpoint {
        Endpoint::Listen { path, .. } => match SocketFile::new(path) {
            Ok(s) => Some(s),
            Err(e) => {
                abandon(&config, None);
                return fail(format!(
                    "cannot open the directory of {}: {e}",
                    path.display()
                ));
            }
        },
        Endpoint::Connect(_) | Endpoint::Fd(_) => None,
    };
    // Connected before the filter goes in: from then on a notification is a write(2), which
    // the filter allows anyway. getpid is not on the list either, so the message is made now.
    let notifier = config.notify.as_ref().and_then(|addr| match Notifier::connect(addr) {
        Ok(n) => Some(Arc::new(n)),
        Err(e) => {
            warn!("cannot reach the service manager at {addr} (NOTIFY_SOCKET): {e}; not notifying");
            None
        }
    });
    let ready = format!("READY=1\nMAINPID={}", std::process::id());
    // Every thread that exists now (main, flush workers, in client mode the first
    // connection's) gets the filter through TSYNC; every later one inherits it.
    let needs = sandbox::Needs {
        listen: config.endpoint.listens(),
        socket_dir: socket.as_ref().map(SocketFile::dir_fd),
        connect: matches!(config.endpoint, Endpoint::Connect(_)),
        metrics_file: config.metrics.is_some(),
    };
    match sandbox::compile(config.seccomp, needs) {
        Ok(None) => {}
        Ok(Some(filter)) => {
            if let Err(e) = sandbox::install(&filter) {
                abandon(&config, socket.as_ref());
                return fail(e);
            }
        }
        Err(e) => {
            abandon(&config, socket.as_ref());
            return fail(e);
        }
    }
    match config.seccomp {
        SeccompMode::On => info!("seccomp sandbox on: calls outside the allow-list kill the daemon"),
        SeccompMode::Log => warn!("seccomp sandbox in log mode: calls outside the allow-list are only logged by the kernel"),
        SeccompMode::Off => warn!("seccomp sandbox off"),
    }
    let d = device.clone();
    let metrics_file = config.metrics.clone();
    let stopping = notifier.clone();
    if let Err(e) = std::thread::Builder::new()
        .name("pmem-signals".into())
        .spawn(move || signal_loop(set, d, socket, metrics_file, reporter, stopping))
    {
        // The socket file stays: the filter allows removing it only through the SocketFile,
        // which went down with the thread's closure. The next start replaces a stale socket.
        return fail(format!("cannot start the signal thread: {e}"));
    }
    // READY=1 only now that the signal thread runs: a stop the service manager sends right
    // after it is handled like any other (the signals were blocked until then, never lost).
    if let Some(n) = &notifier {
        match n.send(&ready) {
            Ok(()) => debug!("told the service manager: ready"),
            Err(e) => warn!("cannot tell the service manager that the daemon is ready: {e}"),
        }
    }
    vhost_user_pmem::serve(device, frontends)
}
