//! Validated daemon configuration. Every rule about what the command line may ask for lives
//! here, so that the rest of the daemon can trust its `Config`.

use std::path::PathBuf;
use std::time::Duration;

use crate::args::Args;
use crate::modes::{FlushMode, SeccompMode};
use crate::size::{self, SizeError};

/// Permissions of a listening socket when --socket-mode is not given: only its owner (the
/// frontend's user) may connect, because whoever connects drives the device.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Period of the metrics file's rewrite when --metrics-interval is not given.
pub const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(10);
/// Longest --metrics-interval: a day. Longer periods are almost surely a mistake (milliseconds
/// given as seconds), and a bound keeps the timer arithmetic trivially in range.
pub const MAX_METRICS_INTERVAL_SECS: u64 = 86_400;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(transparent)]
    Size(#[from] SizeError),
    #[error("--socket-path is empty")]
    EmptySocketPath,
    #[error("--connect is empty")]
    EmptyConnectPath,
    #[error(
        "give --socket-path PATH to listen for a frontend, or --connect PATH to connect to one"
    )]
    NoEndpoint,
    #[error(
        "--socket-path and --connect exclude each other: the daemon either listens or connects"
    )]
    TwoEndpoints,
    #[error("--connect path {0:?} is not valid UTF-8, which the vhost-user library needs")]
    ConnectPathNotUtf8(PathBuf),
    #[error(
        "--socket-mode applies only to --socket-path; with --connect the frontend owns the socket"
    )]
    SocketModeWithConnect,
    #[error("--socket-mode {0:?} is not an octal mode from 0 to 0777 (for example 0600 or 660)")]
    BadSocketMode(String),
    #[error("--file is empty")]
    EmptyFile,
    #[error("--metrics-path is empty")]
    EmptyMetricsPath,
    #[error("--metrics-interval needs --metrics-path (SIGUSR1 prints the metrics on stderr without one)")]
    IntervalWithoutPath,
    #[error("--metrics-interval {0} is more than a day ({MAX_METRICS_INTERVAL_SECS} s)")]
    IntervalTooLong(u64),
}

/// Where and how often the metrics JSON is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsFile {
    pub path: PathBuf,
    /// `None`: only at start, on SIGUSR1 and at exit.
    pub interval: Option<Duration>,
}

/// Which side of the vhost-user socket the daemon is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Listen on this path (the default), creating the socket with `mode`.
    Listen { path: PathBuf, mode: u32 },
    /// Connect to a frontend that listens on this path (QEMU `server=on`). Kept as a `String`
    /// because vhost-user-backend's `start_client` takes a `&str`.
    Connect(String),
}

impl Endpoint {
    pub fn path(&self) -> &std::path::Path {
        match self {
            Endpoint::Listen { path, .. } => path,
            Endpoint::Connect(path) => std::path::Path::new(path),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Listen { path, mode } => {
                write!(f, "listening on {} (mode {mode:04o})", path.display())
            }
            Endpoint::Connect(path) => write!(f, "connecting to {path}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub endpoint: Endpoint,
    pub file: PathBuf,
    /// The size asked for on the command line, already checked; `None` means "the file's size".
    pub size: Option<u64>,
    pub read_only: bool,
    pub flush_mode: FlushMode,
    pub metrics: Option<MetricsFile>,
    pub seccomp: SeccompMode,
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        let endpoint = endpoint(args.socket_path, args.connect, args.socket_mode)?;
        if args.file.as_os_str().is_empty() {
            return Err(ConfigError::EmptyFile);
        }
        if let Some(size) = args.size {
            size::check_requested(size.0)?;
        }
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
        Ok(Config {
            endpoint,
            file: args.file,
            size: args.size.map(|s| s.0),
            read_only: args.read_only,
            flush_mode: args.flush_mode,
            metrics,
            seccomp: args.seccomp,
        })
    }
}

fn endpoint(
    listen: Option<PathBuf>,
    connect: Option<PathBuf>,
    socket_mode: Option<String>,
) -> Result<Endpoint, ConfigError> {
    match (listen, connect) {
        (None, None) => Err(ConfigError::NoEndpoint),
        (Some(_), Some(_)) => Err(ConfigError::TwoEndpoints),
        (Some(path), None) => {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::EmptySocketPath);
            }
            let mode = match socket_mode {
                None => DEFAULT_SOCKET_MODE,
                Some(text) => parse_socket_mode(&text)?,
            };
            Ok(Endpoint::Listen { path, mode })
        }
        (None, Some(path)) => {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::EmptyConnectPath);
            }
            if socket_mode.is_some() {
                return Err(ConfigError::SocketModeWithConnect);
            }
            match path.into_os_string().into_string() {
                Ok(path) => Ok(Endpoint::Connect(path)),
                Err(path) => Err(ConfigError::ConnectPathNotUtf8(path.into())),
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
            socket_mode: None,
            seccomp: SeccompMode::On,
            file: "/tmp/f.img".into(),
            size: size.map(|s| s.parse().unwrap()),
            read_only: false,
            flush_mode: FlushMode::Group,
            metrics_path: None,
            metrics_interval: None,
        }
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
                mode: 0o600
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
                Endpoint::Connect(_) => unreachable!(),
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
}
