//! One VM run, from a [`RunSpec`] to an [`Outcome`]: set up the image (on faultfs if asked),
//! start the daemon, start QEMU, watch both until the run's stop policy ends it, answer the
//! host link meanwhile, then check everything and write the report files.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use faultfs::harness::{FaultFsMount, Launcher};
use pmem_frontend::daemon::{is_socket, DaemonCommand, Side as DaemonSide};
use pmem_metrics::Metrics;

use crate::checks;
use crate::children::{self, Children};
use crate::console::Tail;
use crate::cpu;
use crate::hostcheck;
use crate::hostlink::{Host, HostLink};
use crate::junit;
use crate::libvirt;
use crate::qemu::{self, PmemBacking};
use crate::spec::{Daemon, DaemonEnd, Device, GuestEnd, Launch, RunSpec, Side, Stop, VhostUser};
use crate::tap::{self, Boot, BootEnd};

/// How long a listening daemon may take to bind its socket, and QEMU (as the listening side)
/// to create its own.
const DAEMON_START: Duration = Duration::from_secs(10);
const QEMU_SOCKET: Duration = Duration::from_secs(30);
/// How long the daemon gets to exit after SIGTERM at the end of a run.
const DAEMON_STOP: Duration = Duration::from_secs(15);
/// How long libvirt gets to end QEMU after the guest's poweroff event.
const LIBVIRT_QEMU_END: Duration = Duration::from_secs(10);
/// The poll period; shorter while a marker is watched, so a kill follows it closely.
const POLL: Duration = Duration::from_millis(100);
const POLL_MARKER: Duration = Duration::from_millis(50);

/// Errors that end a run before it could be judged (set-up), as opposed to failed checks.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Daemon(#[from] pmem_frontend::daemon::DaemonError),
    #[error("cannot mount faultfs: {0}")]
    Faultfs(#[from] faultfs::harness::HarnessError),
    #[error("{0}")]
    Setup(String),
    #[error("interrupted by signal {0}")]
    Interrupted(i32),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Io { what, source }
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub device: &'static str,
    pub boots: Vec<Boot>,
    /// Failed runner checks (each counts as one failure).
    pub failures: Vec<String>,
    pub passed: usize,
    /// "not ok" results plus failed runner checks.
    pub failed: usize,
    pub qemu_status: Option<i32>,
    pub elapsed: Duration,
    pub hostchecks_ok: usize,
    /// The daemon's last metrics file, when the runner started the daemon.
    pub daemon_metrics: Option<Metrics>,
    pub log_dir: PathBuf,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.failed == 0
    }

    /// The closing line CI log readers recognise: one word with a colon, then the counts.
    pub fn summary_line(&self) -> String {
        format!(
            "{}: {} passed, {} failed",
            self.device, self.passed, self.failed
        )
    }
}

fn info(msg: impl AsRef<str>) {
    eprintln!("vmrun: {}", msg.as_ref());
}

/// Files of an earlier run in the same directory that would mislead a reader of this one.
const STALE: &[&str] = &[
    "console.log",
    "guest-out.raw",
    "guest-out.txt",
    "tap.txt",
    "junit.xml",
    "metrics.txt",
    "hostchecks.txt",
    "hostchecks.result",
    "daemon.log",
    "qemu.log",
    "qemu.cmd",
    "daemon.pid",
    "result.txt",
    "after-kill.txt",
    "kill.txt",
    "hostlink",
    "hostlink.log",
    "faultfs.log",
    "faultfs.control",
    "faultfs.counts.json",
    "daemon-metrics.json",
    "pids",
    "virsh.log",
    "cpu.txt",
];

fn prepare_log_dir(dir: &Path) -> Result<PathBuf, RunError> {
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let dir = dir
        .canonicalize()
        .map_err(io(format!("resolve {}", dir.display())))?;
    for f in STALE {
        let _ = std::fs::remove_file(dir.join(f));
    }
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("sync-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(dir)
}

fn absolute(p: &Path) -> Result<PathBuf, RunError> {
    let parent = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    let parent = parent
        .canonicalize()
        .map_err(io(format!("resolve {}", parent.display())))?;
    let name = p
        .file_name()
        .ok_or_else(|| RunError::Setup(format!("{} is not a file name", p.display())))?;
    Ok(parent.join(name))
}

/// The built-in device maps the image itself: it must exist at exactly the device size.
fn builtin_image(image: &Path, size: u64) -> Result<(), RunError> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(image)
        .map_err(io(format!("create {}", image.display())))?;
    let len = f.metadata().map_err(io("stat the image"))?.len();
    if len > size {
        return Err(RunError::Setup(format!(
            "{} is larger ({len} bytes) than --size ({size} bytes)",
            image.display()
        )));
    }
    f.set_len(size).map_err(io("extend the image"))
}

/// The tmpfs of `--host-fs-size`, lazily unmounted when dropped.
struct HostFsMount(PathBuf);

impl HostFsMount {
    fn mount(dir: &Path, size: u64) -> Result<HostFsMount, RunError> {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .map_err(io("run mount"))?;
        if !st.success() {
            return Err(RunError::Setup(format!(
                "mount -t tmpfs -o size={size} on {} failed ({st})",
                dir.display()
            )));
        }
        info(format!(
            "the image's file system: a tmpfs of {} on {}",
            vhost_user_pmem::size::ByteSize(size),
            dir.display()
        ));
        Ok(HostFsMount(dir.to_path_buf()))
    }

    /// Writes `filler` until the file system is full; returns its size.
    fn fill(&self) -> Result<u64, RunError> {
        let path = self.0.join("filler");
        let mut f = File::create(&path).map_err(io(format!("create {}", path.display())))?;
        let chunk = vec![0x5au8; 1 << 20];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(io(format!("write {}", path.display()))(e)),
            }
        }
        Ok(written)
    }
}

impl Drop for HostFsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The daemon's socket: in the log directory, unless that path is too long for sun_path.
fn socket_path(log_dir: &Path) -> Result<(PathBuf, Option<tempfile::TempDir>), RunError> {
    let s = log_dir.join("pmem0.sock");
    if s.as_os_str().len() <= 100 {
        let _ = std::fs::remove_file(&s);
        return Ok((s, None));
    }
    let d = tempfile::Builder::new()
        .prefix("vmrun-sock.")
        .tempdir_in("/tmp")
        .map_err(io("create a socket directory in /tmp"))?;
    Ok((d.path().join("pmem0.sock"), Some(d)))
}

fn daemon_command(
    m: &crate::spec::ManagedDaemon,
    spec: &RunSpec,
    socket: &Path,
    file: &Path,
    log_dir: &Path,
) -> DaemonCommand {
    let side = match m.side {
        Side::Listen => DaemonSide::Listen(socket.to_path_buf()),
        Side::Connect => DaemonSide::Connect(socket.to_path_buf()),
        Side::Activated => DaemonSide::Activated(socket.to_path_buf()),
    };
    DaemonCommand::new(&m.bin, side, file)
        .size(&spec.size.text)
        .metrics(log_dir.join("daemon-metrics.json"))
        .args(&m.args)
        .log(log_dir.join("daemon.log"))
        .rust_log(&m.rust_log)
        .die_with_parent(libc::SIGTERM)
}

fn start_daemon(
    children: &mut Children,
    cmd: &DaemonCommand,
    log_dir: &Path,
) -> Result<(), RunError> {
    info(format!("starting daemon: {}", cmd.display()));
    let d = cmd.spawn()?;
    children.record("daemon", d.pid());
    let _ = std::fs::write(log_dir.join("daemon.pid"), format!("{}\n", d.pid()));
    children.daemon = Some(d);
    Ok(())
}

/// The shipped domain template filled in for this run, in the embedded driver's root
/// LOGDIR/libvirt; the serial console goes straight to LOGDIR/console.log.
fn libvirt_domain(
    spec: &RunSpec,
    backing: &PmemBacking,
    log_dir: &Path,
) -> Result<libvirt::Embedded, RunError> {
    let PmemBacking::VhostUser { socket, .. } = backing else {
        return Err(RunError::Setup(
            "--libvirt needs the vhost-user device".into(),
        ));
    };
    let console = log_dir.join("console.log");
    let cmdline = qemu::kernel_cmdline(spec);
    let xml = libvirt::domain_xml(&libvirt::Domain {
        kvm: spec.qemu.accel == crate::spec::Accel::Kvm,
        vcpus: spec.guest.smp,
        memory_mib: spec.guest.memory.bytes >> 20,
        emulator: &spec.qemu.bin,
        kernel: &spec.guest.kernel,
        initrd: &spec.guest.initrd,
        cmdline: &cmdline,
        console: &console,
        socket,
        extra_args: &spec.qemu.extra_args,
    })
    .map_err(RunError::Setup)?;
    libvirt::Embedded::prepare(&log_dir.join("libvirt"), &xml)
        .map_err(io("prepare the libvirt driver's root"))
}

/// When and where the daemon was killed at its marker.
#[derive(Debug, Clone, Copy)]
struct DaemonKill {
    at: Duration,
    /// How much of the guest's output had been read: what follows is after the kill.
    guest_out_offset: u64,
}

/// How the watch of a run ended: exactly one of these.
#[derive(Debug)]
enum End {
    /// QEMU exited by itself (the guest ended, or QEMU failed) with this status.
    QemuExited(Option<i32>),
    /// QEMU was killed by this signal, not by the runner.
    QemuSignaled(i32),
    /// The guest printed the kill marker; QEMU was killed.
    QemuKilledAtMarker,
    /// QEMU outlived the timeout; it was killed.
    Timeout,
    /// KVM could not run the guest; QEMU was killed.
    KvmFailed,
    /// The managed daemon died while QEMU ran; QEMU was killed.
    DaemonDied,
    /// The daemon was killed at its marker; then QEMU exited by itself (`Some(status)`) or
    /// was still running at the end of the observation and was killed (`None`).
    AfterDaemonKill {
        kill: DaemonKill,
        qemu: Option<Option<i32>>,
    },
}

impl End {
    /// How the run ended, for a message.
    fn describe(&self) -> String {
        match self {
            End::QemuExited(Some(c)) => format!("QEMU exiting with status {c}"),
            End::QemuExited(None) => "QEMU exiting".into(),
            End::QemuSignaled(s) => format!("QEMU killed by signal {s}"),
            End::QemuKilledAtMarker => "QEMU killed at the marker".into(),
            End::Timeout => "a timeout".into(),
            End::KvmFailed => "KVM failing".into(),
            End::DaemonDied => "the daemon dying".into(),
            End::AfterDaemonKill { .. } => "the daemon killed at its marker".into(),
        }
    }

    fn qemu_status(&self) -> Option<i32> {
        match self {
            End::QemuExited(s) | End::AfterDaemonKill { qemu: Some(s), .. } => *s,
            _ => None,
        }
    }
}

/// The files QEMU writes, read as they grow.
struct Watch {
    guest_out: Tail,
    console: Tail,
    qemu_log: Tail,
}

impl Watch {
    /// Watches QEMU, the daemon and the guest's output until the run ends, acting on the stop
    /// policy and answering the host link; a signal to the runner ends it early.
    fn watch(
        &mut self,
        spec: &RunSpec,
        t0: Instant,
        children: &mut Children,
        link: &mut HostLink,
        image_name: &str,
        log_dir: &Path,
    ) -> Result<End, RunError> {
        let mut deadline = t0 + spec.timeout;
        let mut kill: Option<DaemonKill> = None;
        let poll = if matches!(spec.stop, Stop::GuestEnds) {
            POLL
        } else {
            POLL_MARKER
        };
        let end = loop {
            if let Some(s) = children
                .qemu
                .as_mut()
                .and_then(|q| q.try_wait().ok().flatten())
            {
                children.qemu = None;
                break match (kill, s.signal()) {
                    (Some(kill), _) => End::AfterDaemonKill {
                        kill,
                        qemu: Some(s.code()),
                    },
                    (None, Some(sig)) => End::QemuSignaled(sig),
                    (None, None) => End::QemuExited(s.code()),
                };
            }
            if let Some(sig) = children::stop_requested() {
                return Err(RunError::Interrupted(sig));
            }
            self.guest_out.refresh();
            let new_console = self.console.refresh();
            if spec.verbose {
                eprint!("{new_console}");
            }
            self.qemu_log.refresh();
            let now = Instant::now();
            match &spec.stop {
                Stop::KillDaemonAt { marker, observe }
                    if kill.is_none() && self.guest_out.text.contains(marker.as_str()) =>
                {
                    if let Some(d) = children.daemon.as_mut() {
                        d.kill();
                    }
                    let k = DaemonKill {
                        at: t0.elapsed(),
                        guest_out_offset: self.guest_out.offset(),
                    };
                    let _ = std::fs::write(
                        log_dir.join("kill.txt"),
                        format!(
                            "daemon_killed_at_ms={} guest_out_offset={}\n",
                            k.at.as_millis(),
                            k.guest_out_offset
                        ),
                    );
                    info(format!(
                        "marker '{marker}' seen: daemon killed with SIGKILL after {} ms; watching QEMU for {} s",
                        k.at.as_millis(),
                        observe.as_secs()
                    ));
                    kill = Some(k);
                    deadline = now + *observe;
                }
                Stop::KillQemuAt(marker)
                    if self.guest_out.text.contains(marker.as_str())
                        || self.console.text.contains(marker.as_str()) =>
                {
                    children.kill_qemu();
                    info(format!(
                        "marker '{marker}' seen: QEMU killed with SIGKILL after {} ms",
                        t0.elapsed().as_millis()
                    ));
                    break End::QemuKilledAtMarker;
                }
                _ => {}
            }
            if now > deadline {
                children.kill_qemu();
                break match kill {
                    Some(kill) => End::AfterDaemonKill { kill, qemu: None },
                    None => End::Timeout,
                };
            }
            if spec.qemu.accel == crate::spec::Accel::Kvm
                && self.qemu_log.text.contains("KVM internal error")
            {
                children.kill_qemu();
                break End::KvmFailed;
            }
            if kill.is_none() && children.daemon.as_mut().is_some_and(|d| !d.is_running()) {
                // Give QEMU a moment to report the disconnect in its log.
                std::thread::sleep(Duration::from_secs(1));
                children.kill_qemu();
                break End::DaemonDied;
            }
            poll_link(link, &self.guest_out.text, children, image_name, log_dir);
            std::thread::sleep(poll);
        };
        self.guest_out.refresh();
        self.console.refresh();
        self.qemu_log.refresh();
        poll_link(link, &self.guest_out.text, children, image_name, log_dir);
        Ok(end)
    }
}

/// Answers the guest's host-link requests so far, with the daemon and faultfs of `children`.
fn poll_link(
    link: &mut HostLink,
    guest_out: &str,
    children: &mut Children,
    image_name: &str,
    log_dir: &Path,
) {
    let mut state = std::mem::take(&mut link.state);
    link.poll(
        guest_out,
        Host {
            daemon: children.daemon.as_mut(),
            faultfs: children.faultfs.as_ref(),
            image_name,
            log_dir,
            state: &mut state,
        },
    );
    link.state = state;
}

/// Carries out `spec`. Set-up errors are returned; everything after QEMU started is judged
/// and lands in the outcome.
pub fn run(spec: &RunSpec) -> Result<Outcome, RunError> {
    let log_dir = prepare_log_dir(&spec.log_dir)?;
    // Before the image is created, and dropped after every child that uses it (the
    // children are declared below).
    let host_fs = match spec.host_fs {
        Some(h) => Some(HostFsMount::mount(&log_dir.join("hostfs"), h.bytes)?),
        None => None,
    };
    let image = absolute(&spec.image)?;
    let image_name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut failures: Vec<String> = Vec::new();
    let image_before = if spec.expect.image_unchanged {
        Some(hostcheck::sha256_file(&image).map_err(io(format!("read {}", image.display())))?)
    } else {
        None
    };

    if let Some(pair) = &spec.pair_builtin {
        builtin_image(pair, spec.size.bytes)?;
        info(format!(
            "paired: QEMU's built-in device on {} at PCI {}",
            pair.display(),
            qemu::pair_pci_addr()
        ));
    }
    let mut children = Children::new(Some(log_dir.join("pids")));
    let mut socket_dir = None;
    let mut connect_later: Option<DaemonCommand> = None;
    // A `--snapshot` daemon's guest writes to this, never to the image.
    let mut layer: Option<File> = None;
    let backing = match &spec.device {
        Device::Builtin => {
            builtin_image(&image, spec.size.bytes)?;
            PmemBacking::Builtin {
                image: image.clone(),
                size: spec.size.bytes,
            }
        }
        Device::VhostUser(VhostUser {
            daemon: Daemon::External { socket },
            chardev_opts,
        }) => {
            info(format!(
                "attaching to the running daemon on {}",
                socket.display()
            ));
            PmemBacking::VhostUser {
                socket: socket.clone(),
                server: false,
                chardev_opts: chardev_opts.clone(),
            }
        }
        Device::VhostUser(VhostUser {
            daemon: Daemon::Managed(m),
            chardev_opts,
        }) => {
            let mut file = image.clone();
            if let Some(bin) = &m.faultfs {
                let source = image.parent().expect("absolute").to_path_buf();
                info(format!(
                    "mounting faultfs: {} on {}",
                    source.display(),
                    log_dir.join("faultfs.mnt").display()
                ));
                let f = FaultFsMount::start_in(&Launcher::Binary(bin.clone()), &source, &log_dir)?;
                if let Some(pid) = f.pid() {
                    children.record("faultfs", pid);
                }
                file = f.path(&image_name);
                children.faultfs = Some(f);
            }
            let (socket, dir) = socket_path(&log_dir)?;
            socket_dir = dir;
            let cmd = daemon_command(m, spec, &socket, &file, &log_dir);
            match m.side {
                Side::Listen | Side::Activated => {
                    start_daemon(&mut children, &cmd, &log_dir)?;
                    let d = children.daemon.as_mut().expect("started");
                    d.wait_socket(DAEMON_START)?;
                    if m.args.iter().any(|a| a == "--snapshot") {
                        match hostcheck::snapshot_layer(d.pid(), &file) {
                            Ok(f) => {
                                layer = Some(f);
                                info("host checks read the daemon's private layer, not the image");
                            }
                            // The run goes on, its host checks against the image, so that
                            // what the guest then sees is on record too.
                            Err(e) => failures.push(format!("--snapshot: {e}")),
                        }
                    }
                }
                Side::Connect => connect_later = Some(cmd),
            }
            PmemBacking::VhostUser {
                socket,
                server: m.side == Side::Connect,
                chardev_opts: chardev_opts.clone(),
            }
        }
    };

    if let (Some(m), Some(h)) = (&host_fs, spec.host_fs) {
        if h.fill {
            let n = m.fill()?;
            info(format!(
                "filled the image's file system: {} of filler, nothing left free",
                vhost_user_pmem::size::ByteSize(n)
            ));
        }
    }
    let guest_out_path = log_dir.join("guest-out.raw");
    let mut link = HostLink::create(&log_dir).map_err(io("create the host-link FIFO"))?;
    let mut embedded = None;
    let (mut cmd, qemu_log_path) = match &spec.qemu.launch {
        Launch::Direct => {
            let qargs: Vec<OsString> = qemu::qemu_args(spec, &backing, &guest_out_path);
            let _ = std::fs::write(
                log_dir.join("qemu.cmd"),
                qemu::shell_line(&spec.qemu.bin, &qargs) + "\n",
            );
            let mut cmd = Command::new(&spec.qemu.bin);
            cmd.args(&qargs)
                .stdin(link.stdin().map_err(io("open the host-link FIFO"))?)
                .stdout(
                    File::create(log_dir.join("console.log")).map_err(io("create console.log"))?,
                )
                .stderr(File::create(log_dir.join("qemu.log")).map_err(io("create qemu.log"))?);
            (cmd, log_dir.join("qemu.log"))
        }
        Launch::Libvirt(l) => {
            let e = libvirt_domain(spec, &backing, &log_dir)?;
            let mut cmd = e.virsh(&l.virsh, l.share.as_deref(), spec.timeout);
            let virsh_log =
                File::create(log_dir.join("virsh.log")).map_err(io("create virsh.log"))?;
            cmd.stdin(std::process::Stdio::null())
                .stdout(virsh_log.try_clone().map_err(io("dup virsh.log"))?)
                .stderr(virsh_log);
            let path = e.qemu_log();
            embedded = Some(e);
            (cmd, path)
        }
    };
    info(format!(
        "booting ({}, {}, image {}, size {}); logs in {}",
        spec.device_name(),
        spec.qemu.accel.word(),
        image.display(),
        spec.size.text,
        log_dir.display()
    ));
    let t0 = Instant::now();
    children::die_with_parent(&mut cmd, libc::SIGKILL);
    let qemu_child = cmd.spawn().map_err(io(format!(
        "start {}",
        Path::new(cmd.get_program()).display()
    )))?;
    children.record("qemu", qemu_child.id());
    children.qemu = Some(qemu_child);

    if let (Some(cmd), PmemBacking::VhostUser { socket, .. }) = (&connect_later, &backing) {
        let deadline = Instant::now() + QEMU_SOCKET;
        while !is_socket(socket) {
            let exited = children
                .qemu
                .as_mut()
                .and_then(|q| q.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(log_dir.join("qemu.log")).unwrap_or_default();
                return Err(RunError::Setup(format!(
                    "QEMU did not create {} within {QEMU_SOCKET:?}; qemu.log:\n{log}",
                    socket.display()
                )));
            }
            std::thread::sleep(POLL);
        }
        start_daemon(&mut children, cmd, &log_dir)?;
    }

    // Host CPU per process and thread name while the guest runs (LOGDIR/cpu.txt). Not with
    // libvirt, where the child is virsh and QEMU is libvirt's.
    let sampler = match spec.qemu.launch {
        Launch::Direct => {
            let mut procs = Vec::new();
            if let Some(q) = &children.qemu {
                procs.push(("qemu".to_string(), q.id()));
            }
            if let Some(d) = &children.daemon {
                procs.push(("daemon".to_string(), d.pid()));
            }
            Some(cpu::Sampler::start(procs))
        }
        Launch::Libvirt(_) => None,
    };

    // ---- watch the run
    let mut w = Watch {
        guest_out: Tail::new(&guest_out_path),
        console: Tail::new(&log_dir.join("console.log")),
        qemu_log: Tail::new(&qemu_log_path),
    };
    let end = w.watch(spec, t0, &mut children, &mut link, &image_name, &log_dir);
    // QEMU has ended; the daemon is still up, so its last sample holds all it did.
    if let Some(s) = sampler {
        cpu::write(&log_dir, &s.finish());
    }
    let end = end?;
    if let Some(e) = &embedded {
        // libvirt daemonizes QEMU: virsh's exit is the guest's lifecycle event, and QEMU
        // ends a moment later, by libvirt's hand or by ours.
        if let Some(what) = e.finish(LIBVIRT_QEMU_END) {
            info(what);
        }
        w.qemu_log.refresh();
        let _ = std::fs::write(log_dir.join("qemu.log"), &w.qemu_log.text);
        if w.console.refresh().contains("VUP-SYNC ") {
            failures.push(
                "the guest asked for the host link, which --libvirt does not carry (the \
                 console is a file)"
                    .into(),
            );
        }
    }
    let Watch {
        guest_out,
        console,
        qemu_log,
    } = w;
    let elapsed = t0.elapsed();
    failures.append(&mut link.failures);
    let qemu_status = end.qemu_status();
    match &end {
        End::QemuExited(status) if *status != Some(0) => {
            failures.push(format!("QEMU exited with status {status:?}"))
        }
        End::QemuExited(_) | End::QemuKilledAtMarker | End::DaemonDied => {}
        End::QemuSignaled(sig) if spec.expect.qemu_signal == Some(*sig) => info(format!(
            "QEMU died of signal {sig} after {} ms, as expected",
            elapsed.as_millis()
        )),
        End::QemuSignaled(sig) => failures.push(format!("QEMU was killed by signal {sig}")),
        End::Timeout => failures.push(format!(
            "timeout: QEMU still running after {} s (killed)",
            spec.timeout.as_secs()
        )),
        End::KvmFailed => failures.push(
            "KVM cannot run this guest (KVM internal error, see qemu.log); use --accel tcg".into(),
        ),
        End::AfterDaemonKill { kill, qemu } => match qemu {
            Some(status) => info(format!(
                "QEMU exited by itself {} ms after the daemon was killed (status {status:?})",
                elapsed.saturating_sub(kill.at).as_millis()
            )),
            None => info("QEMU still running at the end of the observation after the daemon was killed (then killed)"),
        },
    }
    match (&spec.stop, &end) {
        (Stop::KillDaemonAt { marker, .. }, e) if !matches!(e, End::AfterDaemonKill { .. }) => {
            failures.push(format!(
                "marker '{marker}' never appeared (the daemon was not killed)"
            ))
        }
        (Stop::KillQemuAt(marker), e) if !matches!(e, End::QemuKilledAtMarker) => {
            failures.push(format!("marker '{marker}' never appeared"))
        }
        _ => {}
    }
    let daemon_killed = match &end {
        End::AfterDaemonKill { kill, .. } => Some(kill.guest_out_offset),
        _ => None,
    };
    let daemon_died = matches!(end, End::DaemonDied);
    if let Some(want) = spec.expect.qemu_signal {
        if !matches!(end, End::QemuSignaled(s) if s == want) {
            failures.push(format!(
                "expected QEMU to die of signal {want}; the run ended with {}",
                end.describe()
            ));
        }
    }
    let stopped_early = matches!(
        end,
        End::QemuKilledAtMarker | End::AfterDaemonKill { .. } | End::QemuSignaled(_)
    );

    // ---- the daemon's end
    let mut daemon_metrics = None;
    if let (Some(m), Some(mut d)) = (spec.managed_daemon(), children.daemon.take()) {
        if daemon_killed.is_some() {
            d.kill();
        } else if daemon_died {
            let st = d.try_wait();
            failures.push(format!("the daemon died while QEMU was running ({st:?})"));
        } else {
            match m.end {
                DaemonEnd::Keep => {
                    info(format!("daemon left running (pid {})", d.pid()));
                    daemon_metrics = d.snapshot(Duration::from_secs(10)).ok();
                }
                DaemonEnd::Exit(want) => {
                    match d.stop(DAEMON_STOP) {
                        Ok(st) => {
                            if st.code() != Some(want) {
                                failures.push(format!(
                                "the daemon exited with {st} after SIGTERM, expected status {want}"
                            ));
                            } else if want != 0 {
                                info(format!("the daemon exited with status {want} after SIGTERM, as expected"));
                            }
                        }
                        Err(e) => failures.push(e.to_string()),
                    }
                }
            }
        }
        if daemon_metrics.is_none() {
            daemon_metrics = match d.metrics() {
                Ok(m) => m,
                Err(e) => {
                    failures.push(format!("the daemon's metrics: {e}"));
                    None
                }
            };
        }
        if m.end == DaemonEnd::Keep && daemon_killed.is_none() && !daemon_died {
            d.detach();
        }
    }
    children.stop_faultfs();
    drop(children);
    drop(socket_dir);
    let _ = std::fs::remove_file(&link.path);

    // ---- results
    let _ = std::fs::write(log_dir.join("console.log"), &console.text);
    let _ = std::fs::remove_file(&guest_out_path);
    let _ = std::fs::write(log_dir.join("guest-out.txt"), &guest_out.text);
    if let Some(offset) = daemon_killed {
        let after = String::from_utf8_lossy(
            &guest_out.text.as_bytes()[(offset as usize).min(guest_out.text.len())..],
        )
        .into_owned();
        let _ = std::fs::write(log_dir.join("after-kill.txt"), &after);
        let a = checks::after_kill(&after);
        info(format!(
            "after the kill the guest printed {} fsync successes and {} fsync errors{} (LOGDIR/after-kill.txt)",
            a.fsync_ok,
            a.fsync_errors,
            if a.waiting { ", and said its fsync waits" } else { "" }
        ));
        failures.extend(checks::after_kill_failures(a));
    }
    let source = if guest_out.text.lines().any(|l| l.starts_with("VUP-BEGIN")) {
        &guest_out.text
    } else {
        &console.text
    };
    let boots = tap::split_boots(source);
    let _ = std::fs::write(log_dir.join("tap.txt"), tap::tap_text(&boots));
    let joined = |f: fn(&Boot) -> &Vec<String>| {
        boots
            .iter()
            .flat_map(f)
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    };
    let _ = std::fs::write(log_dir.join("metrics.txt"), joined(|b| &b.metrics));
    let _ = std::fs::write(log_dir.join("hostchecks.txt"), joined(|b| &b.hostchecks));

    let mut not_ok_msgs = Vec::new();
    for b in &boots {
        let tag = if b.number > 1 || matches!(spec.guest.end, GuestEnd::Reboot(_)) {
            format!(" (boot {})", b.number)
        } else {
            String::new()
        };
        match b.end {
            BootEnd::Missing => {
                if spec.guest.end != GuestEnd::Crash && !stopped_early {
                    failures.push(format!("no VUP-END{tag}: the guest did not finish"));
                }
                continue;
            }
            BootEnd::BadRc => failures.push(format!("the guest binary's VUP-END has no rc{tag}")),
            BootEnd::Rc(0) => {}
            BootEnd::Rc(rc) => failures.push(format!("the guest binary exited with rc={rc}{tag}")),
        }
        match b.plan {
            None => failures.push(format!("no TAP plan (1..N){tag}")),
            Some(p) if p != b.results.len() => failures.push(format!(
                "TAP plan 1..{p} but {} results{tag}",
                b.results.len()
            )),
            Some(_) => {}
        }
        if b.failed() > 0 {
            not_ok_msgs.push(format!("{} test(s) not ok{tag}", b.failed()));
        }
    }
    let expect_boots = spec.guest.end.boots();
    if boots.is_empty() {
        failures.push("no VUP-BEGIN: the guest never ran the test binary".into());
    } else if boots.len() < expect_boots && !stopped_early {
        failures.push(format!(
            "expected {expect_boots} boots, saw {}",
            boots.len()
        ));
    }

    // host-side checks of data the guest wrote
    let mut parsed = Vec::new();
    for l in boots.iter().flat_map(|b| &b.hostchecks) {
        match hostcheck::parse(l) {
            Ok(c) => parsed.push(c),
            Err(e) => failures.push(e),
        }
    }
    let current = hostcheck::current(&parsed);
    let mut results = String::new();
    let mut bad = 0;
    let mut hostchecks_ok = 0;
    for c in &current {
        let got = match &layer {
            Some(f) => hostcheck::sha256_in(f, c.offset, c.len),
            None => hostcheck::sha256_of(&image, c.offset, c.len),
        };
        match got {
            Ok(got) if got == c.sha256 => {
                hostchecks_ok += 1;
                results.push_str(&format!("HOSTCHECK offset={} len={} ok\n", c.offset, c.len));
            }
            got => {
                bad += 1;
                if bad <= 3 {
                    failures.push(format!(
                        "VUP-HOSTCHECK offset={} len={}: host image has sha256 {}, guest saw {}",
                        c.offset,
                        c.len,
                        got.unwrap_or_else(|e| format!("(unreadable: {e})")),
                        c.sha256
                    ));
                }
            }
        }
    }
    if bad > 3 {
        failures.push(format!(
            "... and {} more VUP-HOSTCHECK mismatches (of {} checks)",
            bad - 3,
            current.len()
        ));
    }
    let _ = std::fs::write(log_dir.join("hostchecks.result"), results);

    if !spec.allow_kernel_warnings {
        let w = checks::kernel_warnings(&console.text, spec.guest.end == GuestEnd::Crash);
        if !w.is_empty() {
            failures.push(format!(
                "kernel warnings in the guest console: {}",
                w.iter().take(3).cloned().collect::<Vec<_>>().join(" | ")
            ));
        }
    }

    // --expect-* checks
    let e = &spec.expect;
    if let Some(want) = e.maps {
        match &daemon_metrics {
            Some(m) if m.counters.maps == want => {
                info(format!("the daemon mapped the region {want} time(s), as expected"))
            }
            Some(m) => failures.push(format!(
                "expected {want} SHMEM_MAPs accepted by QEMU, the daemon's metrics count {} (refused: {})",
                m.counters.maps, m.counters.map_refusals
            )),
            None => failures.push("--expect-maps: no daemon metrics".into()),
        }
    }
    if let Some(want) = e.device_starts {
        let (starts, features) = checks::device_starts(&qemu_log.text);
        info(format!(
            "QEMU's trace: {starts} vhost device starts, {features} SET_FEATURES"
        ));
        if starts != want || features != want {
            failures.push(format!(
                "expected {want} vhost device starts and SET_FEATURES in QEMU's trace, saw {starts} and {features}"
            ));
        }
    }
    if let Some(want) = e.hostchecks {
        if hostchecks_ok < want {
            failures.push(format!(
                "expected at least {want} VUP-HOSTCHECKs to match the image, {hostchecks_ok} did"
            ));
        }
    }
    if let Some(before) = image_before {
        match hostcheck::sha256_file(&image) {
            Ok(after) if after == before => info("the image is byte-identical after the run"),
            Ok(_) => failures.push("the image changed".into()),
            Err(e) => failures.push(format!("cannot read the image after the run: {e}")),
        }
    }
    if e.readonly_outcome {
        match daemon_metrics
            .as_ref()
            .map(|m| checks::readonly_outcome(m, &boots, &qemu_log.text))
        {
            Some(Ok(what)) => info(format!("read-only: {what}")),
            Some(Err(why)) => failures.push(format!("read-only: {why}")),
            None => failures.push("--expect-readonly-outcome: no daemon metrics".into()),
        }
    }

    let passed = boots.iter().map(Boot::passed).sum();
    let failed = boots.iter().map(Boot::failed).sum::<usize>() + failures.len();
    let outcome = Outcome {
        device: spec.device_name(),
        boots,
        failures,
        passed,
        failed,
        qemu_status,
        elapsed,
        hostchecks_ok,
        daemon_metrics,
        log_dir,
    };
    write_report(spec, &outcome, &not_ok_msgs, &console.text, &qemu_log.text);
    Ok(outcome)
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// result.txt, junit.xml, and on failure the evidence on stderr.
fn write_report(spec: &RunSpec, o: &Outcome, not_ok: &[String], console: &str, qemu_log: &str) {
    let dir = &o.log_dir;
    let mut r = format!(
        "device={} accel={} end={} elapsed_ms={} qemu_rc={} boots={} hostchecks={}\n",
        o.device,
        spec.qemu.accel.word(),
        spec.guest.end.word(),
        o.elapsed.as_millis(),
        o.qemu_status.map_or("killed".into(), |c| c.to_string()),
        o.boots.len(),
        o.hostchecks_ok
    );
    if let Some(m) = &o.daemon_metrics {
        r.push_str(&format!(
            "daemon: {} largest_batch={} map_latency_p50_us={}\n",
            m.counters, m.largest_batch, m.map_latency_us.p50
        ));
    }
    for f in o.failures.iter().chain(not_ok) {
        r.push_str(&format!("FAIL: {f}\n"));
    }
    let _ = std::fs::write(dir.join("result.txt"), r);
    let _ = std::fs::write(
        dir.join("junit.xml"),
        junit::render(o.device, &o.boots, &o.failures, o.elapsed.as_secs_f64()),
    );
    if !o.failures.is_empty() || !not_ok.is_empty() {
        let mut e = std::io::stderr().lock();
        for f in o.failures.iter().chain(not_ok) {
            let _ = writeln!(e, "vmrun: FAIL: {f}");
        }
        let _ = writeln!(
            e,
            "--- console.log (last 40 lines) ---\n{}",
            tail(console, 40)
        );
        if !qemu_log.is_empty() {
            let _ = writeln!(
                e,
                "--- qemu.log (last 20 lines) ---\n{}",
                tail(qemu_log, 20)
            );
        }
        if let Ok(d) = std::fs::read_to_string(dir.join("daemon.log")) {
            let _ = writeln!(e, "--- daemon.log (last 40 lines) ---\n{}", tail(&d, 40));
        }
        let _ = writeln!(e, "--- not ok lines ---");
        for b in &o.boots {
            for l in b.tap_lines.iter().filter(|l| l.starts_with("not ok")) {
                let _ = writeln!(e, "{l}");
            }
        }
    }
    info(format!(
        "QEMU ran {:.1} s; logs in {}",
        o.elapsed.as_secs_f64(),
        dir.display()
    ));
}
