//! Validated daemon configuration. Every rule about what the command line may ask for lives
//! here, so that the rest of the daemon can trust its `Config`.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::activation::{self, Activation, ActivationError, ListenEnv};
use crate::args::Args;
use crate::backing::Access;
use crate::flush_limit::{FlushLimitError, FlushRateLimit};
use crate::modes::{FlushMode, SeccompMode};
use crate::notify::NotifyAddr;
use crate::size::{self, SizeError};
use crate::socket::{self, FdFacts};

/// Permissions of a listening socket when --socket-mode is not given: only its owner (the
/// frontend's user) may connect, because whoever connects drives the device.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Period of the metrics file's rewrite when --metrics-interval is not given.
pub const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(10);
/// Longest --metrics-interval: a day. Longer periods are almost surely a mistake (milliseconds
/// given as seconds), and a bound keeps the timer arithmetic trivially in range.
pub const MAX_METRICS_INTERVAL_SECS: u64 = 86_400;
/// The longest `--poll-us`: a millisecond is many wakeups' worth of spinning; beyond it polling
/// only burns the CPU the guest's own threads could use.
pub const MAX_POLL_US: u64 = 1000;

/// A refused command line (with the environment variables of socket activation). Every
/// variant is a usage error: the daemon exits 2 for it, before anything is touched. Failures
/// of the system itself (the file, binding the socket, the sandbox) are other types, exit 1.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(transparent)]
    Size(#[from] SizeError),
    #[error(transparent)]
    FlushRateLimit(#[from] FlushLimitError),
    #[error("--socket-path is empty")]
    EmptySocketPath,
    #[error("--connect is empty")]
    EmptyConnectPath,
    #[error(
        "no socket to serve on: give --socket-path PATH to listen, --connect PATH to connect to a \
         listening frontend, or --fd FD for an inherited listening socket, or start the daemon \
         by socket activation (LISTEN_FDS=1)"
    )]
    NoEndpoint,
    #[error(
        "--socket-path, --connect and --fd exclude each other: give one socket for the daemon"
    )]
    TwoEndpoints,
    #[error(
        "{option} {} is {} bytes long; a UNIX socket path holds at most {max}: choose a shorter \
         one", path.display(), path.as_os_str().len(), max = socket::MAX_SOCKET_PATH
    )]
    SocketPathTooLong { option: &'static str, path: PathBuf },
    #[error("--connect path {0:?} is not valid UTF-8, which the vhost-user library needs")]
    ConnectPathNotUtf8(PathBuf),
    #[error(
        "--socket-mode applies only to --socket-path; with --connect the frontend owns the socket"
    )]
    SocketModeWithConnect,
    #[error(
        "--socket-mode applies only to --socket-path; an inherited socket (--fd or socket \
         activation) keeps the permissions its creator gave it"
    )]
    SocketModeWithFd,
    #[error("--socket-mode {0:?} is not an octal mode from 0 to 0777 (for example 0600 or 660)")]
    BadSocketMode(String),
    #[error(
        "--socket-group applies only to --socket-path; with --connect or an inherited socket \
         (--fd, socket activation) the daemon creates no socket file"
    )]
    SocketGroupWithoutPath,
    #[error("--socket-group {0:?}: no such group; create it (groupadd) or name an existing one")]
    UnknownGroup(String),
    #[error("--socket-group {name:?}: cannot look the group up: {reason}")]
    GroupLookup { name: String, reason: String },
    #[error("{0} is negative; give the number of an open file descriptor")]
    NegativeFd(Inherited),
    #[error(
        "{0} is not an open file descriptor; pass the listening socket to the daemon as that \
         descriptor, without close-on-exec"
    )]
    FdNotOpen(Inherited),
    #[error("{0} is not a socket; pass a listening AF_UNIX stream socket (socket, bind, listen)")]
    FdNotASocket(Inherited),
    #[error(
        "{fd} is a socket of address family {family}, not AF_UNIX; vhost-user needs a UNIX \
         domain socket"
    )]
    FdNotUnix { fd: Inherited, family: i32 },
    #[error(
        "{0} is not a stream socket; vhost-user needs SOCK_STREAM (a datagram or seqpacket \
         socket cannot carry it)"
    )]
    FdNotStream(Inherited),
    #[error(
        "{0} is a UNIX stream socket that is not listening; call listen() on it before passing \
         it (for a frontend that listens itself, use --connect PATH)"
    )]
    FdNotListening(Inherited),
    #[error("cannot inspect {fd}: {reason}")]
    FdInspect { fd: Inherited, reason: String },
    #[error(transparent)]
    Activation(#[from] ActivationError),
    #[error(
        "socket activation passed a socket (LISTEN_FDS=1 for this process) and {0} was given \
         too; use one: drop {0}, or start the daemon without socket activation"
    )]
    ActivationWithEndpoint(&'static str),
    #[error("--file PATH is required: the backing file the guest sees as persistent memory")]
    NoFile,
    #[error("--file is empty")]
    EmptyFile,
    #[error("--allocate does not go with --read-only: a read-only file is never written, so its holes stay holes")]
    AllocateReadOnly,
    #[error("--snapshot does not go with --read-only: a snapshot is written, to its private layer; use one of them")]
    SnapshotReadOnly,
    #[error("--snapshot does not go with --allocate: the private layer shares the image's blocks, and a guest write gets a new block when it happens")]
    SnapshotAllocate,
    #[error("--metrics-path is empty")]
    EmptyMetricsPath,
    #[error("--metrics-interval needs --metrics-path (SIGUSR1 prints the metrics on stderr without one)")]
    IntervalWithoutPath,
    #[error("--metrics-interval {0} is more than a day ({MAX_METRICS_INTERVAL_SECS} s)")]
    IntervalTooLong(u64),
    #[error("--poll-us {0} is more than {MAX_POLL_US}: longer spins burn a CPU for no gain, since a wakeup costs tens of microseconds")]
    PollTooLong(u64),
}

/// Where and how often the metrics JSON is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsFile {
    pub path: PathBuf,
    /// `None`: only at start, on SIGUSR1 and at exit.
    pub interval: Option<Duration>,
}

/// How an inherited listening socket reached the daemon, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inherited {
    /// `--fd N`.
    Flag(RawFd),
    /// Socket activation: LISTEN_FDS=1, always fd 3.
    Activation(RawFd),
}

impl Inherited {
    pub fn fd(self) -> RawFd {
        match self {
            Inherited::Flag(fd) | Inherited::Activation(fd) => fd,
        }
    }
}

impl std::fmt::Display for Inherited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Inherited::Flag(fd) => write!(f, "--fd {fd}"),
            Inherited::Activation(fd) => {
                write!(f, "the socket-activation descriptor {fd} (LISTEN_FDS=1)")
            }
        }
    }
}

/// The group that gets the listening socket file (`--socket-group`), resolved at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketGroup {
    pub name: String,
    pub gid: u32,
}

/// Which side of the vhost-user socket the daemon is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Listen on this path (the default), creating the socket with `mode` (and `group`).
    Listen {
        path: PathBuf,
        mode: u32,
        group: Option<SocketGroup>,
    },
    /// Connect to a frontend that listens on this path (QEMU `server=on`). Kept as a `String`
    /// because vhost-user-backend's `start_client` takes a `&str`.
    Connect(String),
    /// Serve on a listening socket the daemon inherited, already checked to be an AF_UNIX
    /// stream socket that listens. Its file, if it has one, is not the daemon's.
    Fd(Inherited),
}

impl Endpoint {
    /// The socket file the daemon creates or connects to; `None` for an inherited socket.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Endpoint::Listen { path, .. } => Some(path),
            Endpoint::Connect(path) => Some(Path::new(path)),
            Endpoint::Fd(_) => None,
        }
    }

    /// Whether the daemon accepts frontends (as opposed to connecting to one).
    pub fn listens(&self) -> bool {
        !matches!(self, Endpoint::Connect(_))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Listen { path, mode, group } => {
                write!(f, "listening on {} (mode {mode:04o}", path.display())?;
                if let Some(g) = group {
                    write!(f, ", group {}", g.name)?;
                }
                write!(f, ")")
            }
            Endpoint::Connect(path) => write!(f, "connecting to {path}"),
            Endpoint::Fd(inherited) => write!(f, "listening on {inherited}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub endpoint: Endpoint,
    pub file: PathBuf,
    /// The size asked for on the command line, already checked; `None` means "the file's size".
    pub size: Option<u64>,
    /// Read-only, or read-write with the `--allocate` policy.
    pub access: Access,
    pub flush_mode: FlushMode,
    /// `None`: fdatasyncs start as soon as there are requests for them.
    pub flush_rate_limit: Option<FlushRateLimit>,
    /// `--poll-us`: how long to watch the queue after answering; zero is off.
    pub poll: Duration,
    pub metrics: Option<MetricsFile>,
    pub seccomp: SeccompMode,
    /// Where to send READY=1 and STOPPING=1 (NOTIFY_SOCKET), if anywhere.
    pub notify: Option<NotifyAddr>,
    /// What the daemon found in its environment and ignored, to log once the logger is up.
    pub notes: Vec<String>,
}

/// The environment variables through which a service manager talks to the daemon: socket
/// activation (sd_listen_fds(3)) and readiness notification (sd_notify(3)). RUST_LOG and
/// JOURNAL_STREAM are the logger's (logging.rs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessEnv {
    pub listen: ListenEnv,
    pub notify_socket: Option<OsString>,
    /// The daemon's pid, which LISTEN_PID must name.
    pub pid: u32,
}

impl ProcessEnv {
    /// Reads the variables and removes them from the environment, as sd_listen_fds(3) and
    /// sd_notify(3) do with `unset_environment`: they describe this process only, and nothing
    /// the daemon starts may take them for its own. Call before any thread exists (changing
    /// the environment is not thread-safe).
    pub fn take() -> ProcessEnv {
        let take = |name: &str| {
            let v = std::env::var_os(name);
            std::env::remove_var(name);
            v
        };
        let env = ProcessEnv {
            listen: ListenEnv {
                fds: take("LISTEN_FDS"),
                pid: take("LISTEN_PID"),
            },
            notify_socket: take("NOTIFY_SOCKET"),
            pid: std::process::id(),
        };
        std::env::remove_var("LISTEN_FDNAMES");
        env
    }
}

/// Without the environment: what `Config::new(args, ProcessEnv::default())` gives.
impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        Config::new(args, ProcessEnv::default())
    }
}

impl Config {
    /// Every check of the command line and the service manager's variables, in one place.
    pub fn new(args: Args, env: ProcessEnv) -> Result<Config, ConfigError> {
        let mut notes = Vec::new();
        let activated = match activation::interpret(&env.listen, env.pid)? {
            Activation::None => None,
            Activation::Ignored(why) => {
                notes.push(why);
                None
            }
            Activation::Socket(fd) => Some(fd),
        };
        let endpoint = endpoint(
            args.socket_path,
            args.connect,
            args.fd,
            activated,
            args.socket_mode,
            args.socket_group,
        )?;
        let file = args.file.ok_or(ConfigError::NoFile)?;
        if file.as_os_str().is_empty() {
            return Err(ConfigError::EmptyFile);
        }
        if let Some(size) = args.size {
            size::check_requested(size.0)?;
        }
        let access = match (args.read_only, args.allocate, args.snapshot) {
            (true, _, true) => return Err(ConfigError::SnapshotReadOnly),
            (_, Some(_), true) => return Err(ConfigError::SnapshotAllocate),
            (false, None, true) => Access::Snapshot,
            (true, Some(_), false) => return Err(ConfigError::AllocateReadOnly),
            (true, None, false) => Access::ReadOnly,
            (false, a, false) => Access::ReadWrite(a.unwrap_or_default()),
        };
        let flush_rate_limit = args
            .flush_rate_limit
            .as_deref()
            .map(str::parse::<FlushRateLimit>)
            .transpose()?;
        let poll = match args.poll_us.unwrap_or(0) {
            us if us > MAX_POLL_US => return Err(ConfigError::PollTooLong(us)),
            us => Duration::from_micros(us),
        };
        let metrics = match (args.metrics_path, args.metrics_interval) {
            (None, None) => None,
            (None, Some(_)) => return Err(ConfigError::IntervalWithoutPath),
            (Some(path), _) if path.as_os_str().is_empty() => {
                return Err(ConfigError::EmptyMetricsPath)
            }
            (Some(_), Some(secs)) if secs > MAX_METRICS_INTERVAL_SECS => {
                return Err(ConfigError::IntervalTooLong(secs))
            }
            (Some(path), secs) => Some(MetricsFile {
                path,
                interval: match secs {
                    None => Some(DEFAULT_METRICS_INTERVAL),
                    Some(0) => None,
                    Some(s) => Some(Duration::from_secs(s)),
                },
            }),
        };
        let notify = match env.notify_socket {
            None => None,
            Some(text) => match NotifyAddr::parse(&text) {
                Some(addr) => Some(addr),
                None => {
                    // A service manager's business, not the user's: serving matters more than
                    // telling it so.
                    notes.push(format!(
                        "NOTIFY_SOCKET={text:?} is neither a path nor an abstract address \
                         (@name); not notifying"
                    ));
                    None
                }
            },
        };
        Ok(Config {
            endpoint,
            file,
            size: args.size.map(|s| s.0),
            access,
            flush_mode: args.flush_mode,
            flush_rate_limit,
            poll,
            metrics,
            seccomp: args.seccomp,
            notify,
            notes,
        })
    }
}

fn endpoint(
    listen: Option<PathBuf>,
    connect: Option<PathBuf>,
    fd: Option<RawFd>,
    activated: Option<RawFd>,
    socket_mode: Option<String>,
    socket_group: Option<String>,
) -> Result<Endpoint, ConfigError> {
    let given = [
        listen.as_ref().map(|_| "--socket-path"),
        connect.as_ref().map(|_| "--connect"),
        fd.map(|_| "--fd"),
    ];
    let mut given = given.into_iter().flatten();
    let first = given.next();
    if given.next().is_some() {
        return Err(ConfigError::TwoEndpoints);
    }
    if let (Some(flag), Some(_)) = (first, activated) {
        return Err(ConfigError::ActivationWithEndpoint(flag));
    }
    let inherited = match (fd, activated) {
        (Some(fd), _) => Some(Inherited::Flag(fd)),
        (None, Some(fd)) => Some(Inherited::Activation(fd)),
        (None, None) => None,
    };
    if let Some(inherited) = inherited {
        if socket_mode.is_some() {
            return Err(ConfigError::SocketModeWithFd);
        }
        if socket_group.is_some() {
            return Err(ConfigError::SocketGroupWithoutPath);
        }
        check_inherited(inherited)?;
        return Ok(Endpoint::Fd(inherited));
    }
    match (listen, connect) {
        (None, None) => Err(ConfigError::NoEndpoint),
        (Some(_), Some(_)) => Err(ConfigError::TwoEndpoints),
        (Some(path), None) => {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::EmptySocketPath);
            }
            if path.as_os_str().len() > socket::MAX_SOCKET_PATH {
                return Err(ConfigError::SocketPathTooLong {
                    option: "--socket-path",
                    path,
                });
            }
            let mode = match socket_mode {
                None => DEFAULT_SOCKET_MODE,
                Some(text) => parse_socket_mode(&text)?,
            };
            let group = socket_group.map(resolve_group).transpose()?;
            Ok(Endpoint::Listen { path, mode, group })
        }
        (None, Some(path)) => {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::EmptyConnectPath);
            }
            if path.as_os_str().len() > socket::MAX_SOCKET_PATH {
                return Err(ConfigError::SocketPathTooLong {
                    option: "--connect",
                    path,
                });
            }
            if socket_mode.is_some() {
                return Err(ConfigError::SocketModeWithConnect);
            }
            if socket_group.is_some() {
                return Err(ConfigError::SocketGroupWithoutPath);
            }
            match path.into_os_string().into_string() {
                Ok(path) => Ok(Endpoint::Connect(path)),
                Err(path) => Err(ConfigError::ConnectPathNotUtf8(path.into())),
            }
        }
    }
}

/// The group's id, looked up before anything is created, so that a misspelt name costs
/// nothing but the message.
fn resolve_group(name: String) -> Result<SocketGroup, ConfigError> {
    match socket::group_id(&name) {
        Ok(Some(gid)) => Ok(SocketGroup { name, gid }),
        Ok(None) => Err(ConfigError::UnknownGroup(name)),
        Err(e) => Err(ConfigError::GroupLookup {
            name,
            reason: e.to_string(),
        }),
    }
}

/// An inherited descriptor must be what vhost-user's listener needs: a listening AF_UNIX
/// stream socket. Each way it can be wrong gets its own message, since each has another fix.
fn check_inherited(inherited: Inherited) -> Result<(), ConfigError> {
    let fd = inherited.fd();
    if fd < 0 {
        return Err(ConfigError::NegativeFd(inherited));
    }
    match socket::fd_facts(fd) {
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => Err(ConfigError::FdNotOpen(inherited)),
        Err(e) => Err(ConfigError::FdInspect {
            fd: inherited,
            reason: e.to_string(),
        }),
        Ok(FdFacts::NotASocket) => Err(ConfigError::FdNotASocket(inherited)),
        Ok(FdFacts::Socket {
            family,
            stream,
            listening,
        }) => {
            if family != libc::AF_UNIX {
                Err(ConfigError::FdNotUnix {
                    fd: inherited,
                    family,
                })
            } else if !stream {
                Err(ConfigError::FdNotStream(inherited))
            } else if !listening {
                Err(ConfigError::FdNotListening(inherited))
            } else {
                Ok(())
            }
        }
    }
}

/// Octal permission bits, as chmod takes them: `600`, `0600`, `0o600`. Set-id and sticky bits
/// mean nothing on a socket and are refused rather than silently dropped.
fn parse_socket_mode(text: &str) -> Result<u32, ConfigError> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    let bad = || ConfigError::BadSocketMode(text.to_string());
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return Err(bad());
    }
    let mode = u32::from_str_radix(digits, 8).map_err(|_| bad())?;
    if mode > 0o777 {
        return Err(bad());
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(size: Option<&str>) -> Args {
        Args {
            socket_path: Some("/tmp/s.sock".into()),
            connect: None,
            fd: None,
            socket_mode: None,
            socket_group: None,
            seccomp: SeccompMode::On,
            file: Some("/tmp/f.img".into()),
            size: size.map(|s| s.parse().unwrap()),
            read_only: false,
            allocate: None,
            snapshot: false,
            flush_mode: FlushMode::Group,
            flush_rate_limit: None,
            poll_us: None,
            metrics_path: None,
            metrics_interval: None,
            log_level: None,
            print_capabilities: false,
        }
    }

    #[test]
    fn poll_us_is_checked_here() {
        let mut a = args(None);
        assert_eq!(Config::try_from(a.clone()).unwrap().poll, Duration::ZERO);
        a.poll_us = Some(0);
        assert_eq!(Config::try_from(a.clone()).unwrap().poll, Duration::ZERO);
        a.poll_us = Some(MAX_POLL_US);
        assert_eq!(
            Config::try_from(a.clone()).unwrap().poll,
            Duration::from_millis(1)
        );
        a.poll_us = Some(MAX_POLL_US + 1);
        let e = Config::try_from(a).unwrap_err();
        assert_eq!(e, ConfigError::PollTooLong(MAX_POLL_US + 1));
        assert!(
            e.to_string().contains("--poll-us 1001 is more than 1000"),
            "{e}"
        );
    }

    #[test]
    fn metrics_file_rules() {
        let mut a = args(None);
        assert_eq!(Config::try_from(a.clone()).unwrap().metrics, None);
        a.metrics_interval = Some(5);
        assert_eq!(
            Config::try_from(a.clone()).unwrap_err(),
            ConfigError::IntervalWithoutPath
        );
        a.metrics_path = Some("".into());
        assert_eq!(
            Config::try_from(a.clone()).unwrap_err(),
            ConfigError::EmptyMetricsPath
        );
        a.metrics_path = Some("/tmp/m.json".into());
        let m = Config::try_from(a.clone()).unwrap().metrics.unwrap();
        assert_eq!(m.interval, Some(Duration::from_secs(5)));
        a.metrics_interval = None;
        let m = Config::try_from(a.clone()).unwrap().metrics.unwrap();
        assert_eq!(m.interval, Some(DEFAULT_METRICS_INTERVAL));
        a.metrics_interval = Some(0);
        assert_eq!(
            Config::try_from(a.clone())
                .unwrap()
                .metrics
                .unwrap()
                .interval,
            None
        );
        a.metrics_interval = Some(MAX_METRICS_INTERVAL_SECS + 1);
        assert!(matches!(
            Config::try_from(a).unwrap_err(),
            ConfigError::IntervalTooLong(_)
        ));
    }

    #[test]
    fn flush_mode_is_passed_on() {
        let mut a = args(None);
        assert_eq!(
            Config::try_from(a.clone()).unwrap().flush_mode,
            FlushMode::Group
        );
        a.flush_mode = FlushMode::Parallel;
        assert_eq!(Config::try_from(a).unwrap().flush_mode, FlushMode::Parallel);
    }

    #[test]
    fn flush_rate_limit_is_parsed_and_checked_here() {
        let mut a = args(None);
        assert_eq!(Config::try_from(a.clone()).unwrap().flush_rate_limit, None);
        a.flush_rate_limit = Some("20/s,burst=1".into());
        assert_eq!(
            Config::try_from(a.clone()).unwrap().flush_rate_limit,
            Some(FlushRateLimit {
                ops_per_sec: 20,
                burst: 1
            })
        );
        a.flush_rate_limit = Some("0".into());
        assert_eq!(
            Config::try_from(a).unwrap_err(),
            ConfigError::FlushRateLimit(FlushLimitError::ZeroRate("0".into()))
        );
    }

    #[test]
    fn accepts_powers_of_two() {
        let c = Config::try_from(args(Some("1G"))).unwrap();
        assert_eq!(c.size, Some(1 << 30));
        assert_eq!(Config::try_from(args(None)).unwrap().size, None);
        assert!(Config::try_from(args(Some("2M"))).is_ok());
    }

    #[test]
    fn sizes_are_checked_by_the_size_rules() {
        let e = Config::try_from(args(Some("3G"))).unwrap_err();
        assert!(
            matches!(e, ConfigError::Size(SizeError::NotPowerOfTwo { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("2 GiB and 4 GiB"), "{e}");
        assert!(matches!(
            Config::try_from(args(Some("1M"))),
            Err(ConfigError::Size(SizeError::TooSmall(_)))
        ));
    }

    #[test]
    fn rejects_empty_paths() {
        let mut a = args(None);
        a.socket_path = Some("".into());
        assert_eq!(
            Config::try_from(a).unwrap_err(),
            ConfigError::EmptySocketPath
        );
    }

    #[test]
    fn exactly_one_endpoint() {
        let mut a = args(None);
        assert_eq!(
            Config::try_from(a.clone()).unwrap().endpoint,
            Endpoint::Listen {
                path: "/tmp/s.sock".into(),
                mode: 0o600,
                group: None,
            }
        );
        a.connect = Some("/tmp/qemu.sock".into());
        assert_eq!(
            Config::try_from(a.clone()).unwrap_err(),
            ConfigError::TwoEndpoints
        );
        a.socket_path = None;
        assert_eq!(
            Config::try_from(a.clone()).unwrap().endpoint,
            Endpoint::Connect("/tmp/qemu.sock".into())
        );
        a.connect = Some("".into());
        assert_eq!(
            Config::try_from(a.clone()).unwrap_err(),
            ConfigError::EmptyConnectPath
        );
        a.connect = None;
        assert_eq!(Config::try_from(a).unwrap_err(), ConfigError::NoEndpoint);
    }

    #[test]
    fn connect_path_must_be_utf8() {
        use std::os::unix::ffi::OsStrExt;
        let mut a = args(None);
        a.socket_path = None;
        a.connect = Some(std::ffi::OsStr::from_bytes(b"/tmp/\xff.sock").into());
        assert!(matches!(
            Config::try_from(a).unwrap_err(),
            ConfigError::ConnectPathNotUtf8(_)
        ));
    }

    #[test]
    fn socket_modes() {
        let mode = |m: &str| {
            let mut a = args(None);
            a.socket_mode = Some(m.into());
            Config::try_from(a).map(|c| match c.endpoint {
                Endpoint::Listen { mode, .. } => mode,
                other => panic!("{other:?}"),
            })
        };
        assert_eq!(mode("0600"), Ok(0o600));
        assert_eq!(mode("660"), Ok(0o660));
        assert_eq!(mode("0o666"), Ok(0o666));
        assert_eq!(mode("0"), Ok(0));
        assert_eq!(mode("0777"), Ok(0o777));
        for bad in [
            "",
            "8",
            "0x600",
            "4755",
            "1777",
            "rw-------",
            "00600",
            "-600",
            " 600",
        ] {
            assert_eq!(
                mode(bad),
                Err(ConfigError::BadSocketMode(bad.into())),
                "{bad:?}"
            );
        }
        let mut a = args(None);
        a.socket_path = None;
        a.connect = Some("/tmp/q.sock".into());
        a.socket_mode = Some("0600".into());
        assert_eq!(
            Config::try_from(a).unwrap_err(),
            ConfigError::SocketModeWithConnect
        );
    }

    #[test]
    fn seccomp_mode_is_passed_on() {
        let mut a = args(None);
        assert_eq!(
            Config::try_from(a.clone()).unwrap().seccomp,
            SeccompMode::On
        );
        a.seccomp = SeccompMode::Log;
        assert_eq!(Config::try_from(a).unwrap().seccomp, SeccompMode::Log);
    }

    /// A process environment in which socket activation passed `fds` sockets to us.
    fn activated(fds: &str) -> ProcessEnv {
        ProcessEnv {
            listen: ListenEnv {
                fds: Some(fds.into()),
                pid: Some("4242".into()),
            },
            notify_socket: None,
            pid: 4242,
        }
    }

    /// A listening UNIX stream socket, and its descriptor.
    fn listening() -> (tempfile::TempDir, std::os::unix::net::UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let l = std::os::unix::net::UnixListener::bind(dir.path().join("l.sock")).unwrap();
        (dir, l)
    }

    #[test]
    fn an_inherited_listening_socket_is_an_endpoint() {
        use std::os::fd::AsRawFd;
        let (_dir, l) = listening();
        let mut a = args(None);
        a.socket_path = None;
        a.fd = Some(l.as_raw_fd());
        assert_eq!(
            Config::try_from(a.clone()).unwrap().endpoint,
            Endpoint::Fd(Inherited::Flag(l.as_raw_fd()))
        );
        a.socket_mode = Some("0600".into());
        assert_eq!(
            Config::try_from(a.clone()).unwrap_err(),
            ConfigError::SocketModeWithFd
        );
        a.socket_mode = None;
        a.socket_group = Some("root".into());
        assert_eq!(
            Config::try_from(a).unwrap_err(),
            ConfigError::SocketGroupWithoutPath
        );
    }

    #[test]
    fn inherited_descriptors_that_cannot_serve() {
        use std::os::fd::AsRawFd;
        let check = |fd| {
            let mut a = args(None);
            a.socket_path = None;
            a.fd = Some(fd);
            Config::try_from(a).unwrap_err()
        };
        let file = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(
            check(file.as_raw_fd()),
            ConfigError::FdNotASocket(Inherited::Flag(file.as_raw_fd()))
        );
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(
            check(a.as_raw_fd()),
            ConfigError::FdNotListening(_)
        ));
        let d = std::os::unix::net::UnixDatagram::unbound().unwrap();
        assert!(matches!(check(d.as_raw_fd()), ConfigError::FdNotStream(_)));
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(matches!(
            check(t.as_raw_fd()),
            ConfigError::FdNotUnix {
                family: libc::AF_INET,
                ..
            }
        ));
        assert!(matches!(check(-1), ConfigError::NegativeFd(_)));
        // Far above any descriptor limit, so no other test's file can get this number.
        assert!(matches!(check(1 << 24), ConfigError::FdNotOpen(_)));
    }

    #[test]
    fn socket_activation_rules() {
        let mut a = args(None);
        // With an endpoint option, a socket passed to us is a conflict...
        assert_eq!(
            Config::new(a.clone(), activated("1")).unwrap_err(),
            ConfigError::ActivationWithEndpoint("--socket-path")
        );
        // ...and so is more than one, with or without.
        assert_eq!(
            Config::new(a.clone(), activated("2")).unwrap_err(),
            ConfigError::Activation(ActivationError::TooMany(2))
        );
        // Another process's variables are ignored, and said so.
        let mut theirs = activated("1");
        theirs.pid = 1;
        let c = Config::new(a.clone(), theirs.clone()).unwrap();
        assert!(matches!(c.endpoint, Endpoint::Listen { .. }));
        assert_eq!(c.notes.len(), 1, "{:?}", c.notes);
        a.socket_path = None;
        assert_eq!(
            Config::new(a.clone(), theirs).unwrap_err(),
            ConfigError::NoEndpoint
        );
        // fd 3 of the test process is whatever it is; it is checked like --fd 3.
        match Config::new(a, activated("1")) {
            Ok(c) => assert_eq!(c.endpoint, Endpoint::Fd(Inherited::Activation(3))),
            Err(e) => assert!(
                e.to_string().contains("socket-activation descriptor 3"),
                "{e}"
            ),
        }
    }

    #[test]
    fn no_endpoint_names_every_way_to_give_one() {
        let mut a = args(None);
        a.socket_path = None;
        let e = Config::try_from(a).unwrap_err().to_string();
        for way in ["--socket-path", "--connect", "--fd", "socket activation"] {
            assert!(e.contains(way), "{e}");
        }
    }

    #[test]
    fn socket_groups_are_resolved_or_refused() {
        let mut a = args(None);
        a.socket_group = Some("root".into());
        match Config::try_from(a.clone()).unwrap().endpoint {
            Endpoint::Listen { group, .. } => assert_eq!(
                group,
                Some(SocketGroup {
                    name: "root".into(),
                    gid: 0
                })
            ),
            other => panic!("{other:?}"),
        }
        a.socket_group = Some("no-such-group-here".into());
        assert_eq!(
            Config::try_from(a.clone()).unwrap_err(),
            ConfigError::UnknownGroup("no-such-group-here".into())
        );
        a.socket_path = None;
        a.connect = Some("/tmp/q.sock".into());
        a.socket_group = Some("root".into());
        assert_eq!(
            Config::try_from(a).unwrap_err(),
            ConfigError::SocketGroupWithoutPath
        );
    }

    #[test]
    fn file_and_socket_path_limits() {
        let mut a = args(None);
        a.file = None;
        assert_eq!(
            Config::try_from(a.clone()).unwrap_err(),
            ConfigError::NoFile
        );
        a.file = Some("/tmp/f.img".into());
        a.socket_path = Some(format!("/tmp/{}", "s".repeat(120)).into());
        assert!(matches!(
            Config::try_from(a).unwrap_err(),
            ConfigError::SocketPathTooLong { .. }
        ));
    }

    #[test]
    fn notify_socket_is_taken_or_noted() {
        let a = args(None);
        let env = |v: &str| ProcessEnv {
            notify_socket: Some(v.into()),
            ..ProcessEnv::default()
        };
        let c = Config::new(a.clone(), env("@manager")).unwrap();
        assert_eq!(c.notify, Some(NotifyAddr::Abstract(b"manager".to_vec())));
        let c = Config::new(a, env("vsock:2:99")).unwrap();
        assert_eq!((c.notify, c.notes.len()), (None, 1));
    }
}
