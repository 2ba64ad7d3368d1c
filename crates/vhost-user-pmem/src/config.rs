//! Validated daemon configuration. Every rule about what the command line may ask for lives
//! here, so that the rest of the daemon can trust its `Config`.

use std::path::PathBuf;
use std::time::Duration;

use crate::args::Args;
use crate::flush::FlushMode;
use crate::size::ByteSize;

/// The smallest device the guest can use: one 2 MiB huge page. The Linux driver also needs
/// room for its struct pages, which smaller regions do not leave.
pub const MIN_SIZE: u64 = 2 << 20;

/// Period of the metrics file's rewrite when --metrics-interval is not given.
pub const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(10);
/// Longest --metrics-interval: a day. Longer periods are almost surely a mistake (milliseconds
/// given as seconds), and a bound keeps the timer arithmetic trivially in range.
pub const MAX_METRICS_INTERVAL_SECS: u64 = 86_400;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--size {size} is not a power of two, which QEMU needs for the PCI BAR; the nearest valid sizes are {below} and {above}")]
    NotPowerOfTwo {
        size: ByteSize,
        below: ByteSize,
        above: ByteSize,
    },
    #[error("--size {0} is not a power of two, which QEMU needs for the PCI BAR; the largest valid size is {1}")]
    NotPowerOfTwoTooBig(ByteSize, ByteSize),
    #[error("size {0} is below the minimum of {min}", min = ByteSize(MIN_SIZE))]
    TooSmall(ByteSize),
    #[error("the backing file {path} is {size}, which is not a power of two; give --size {above} to extend it")]
    FileNotPowerOfTwo {
        path: PathBuf,
        size: ByteSize,
        above: ByteSize,
    },
    #[error("--socket-path is empty")]
    EmptySocketPath,
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

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub socket_path: PathBuf,
    pub file: PathBuf,
    /// The size asked for on the command line, already checked; `None` means "the file's size".
    pub size: Option<u64>,
    pub read_only: bool,
    pub flush_mode: FlushMode,
    pub metrics: Option<MetricsFile>,
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        if args.socket_path.as_os_str().is_empty() {
            return Err(ConfigError::EmptySocketPath);
        }
        if args.file.as_os_str().is_empty() {
            return Err(ConfigError::EmptyFile);
        }
        if let Some(size) = args.size {
            check_requested_size(size.0)?;
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
            socket_path: args.socket_path,
            file: args.file,
            size: args.size.map(|s| s.0),
            read_only: args.read_only,
            flush_mode: args.flush_mode,
            metrics,
        })
    }
}

fn check_requested_size(size: u64) -> Result<(), ConfigError> {
    if size < MIN_SIZE {
        return Err(ConfigError::TooSmall(ByteSize(size)));
    }
    if !size.is_power_of_two() {
        let below = 1u64 << (63 - size.leading_zeros());
        return Err(match below.checked_mul(2) {
            Some(above) => ConfigError::NotPowerOfTwo {
                size: ByteSize(size),
                below: ByteSize(below),
                above: ByteSize(above),
            },
            None => ConfigError::NotPowerOfTwoTooBig(ByteSize(size), ByteSize(below)),
        });
    }
    Ok(())
}

/// Checks the size of an existing file that is to be used as it is (no `--size`).
pub fn check_file_size(path: &std::path::Path, size: u64) -> Result<(), ConfigError> {
    if size < MIN_SIZE {
        return Err(ConfigError::TooSmall(ByteSize(size)));
    }
    if !size.is_power_of_two() {
        return Err(ConfigError::FileNotPowerOfTwo {
            path: path.to_path_buf(),
            size: ByteSize(size),
            above: ByteSize(size.checked_next_power_of_two().unwrap_or(u64::MAX)),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(size: Option<&str>) -> Args {
        Args {
            socket_path: "/tmp/s.sock".into(),
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
    fn names_nearest_valid_sizes() {
        let e = Config::try_from(args(Some("3G"))).unwrap_err();
        assert_eq!(
            e,
            ConfigError::NotPowerOfTwo {
                size: ByteSize(3 << 30),
                below: ByteSize(2 << 30),
                above: ByteSize(4 << 30)
            }
        );
        assert!(e.to_string().contains("2 GiB and 4 GiB"), "{e}");
    }

    #[test]
    fn rejects_small_sizes() {
        assert_eq!(
            Config::try_from(args(Some("1M"))).unwrap_err(),
            ConfigError::TooSmall(ByteSize(1 << 20))
        );
        assert!(matches!(
            Config::try_from(args(Some("0"))),
            Err(ConfigError::TooSmall(_))
        ));
    }

    #[test]
    fn rejects_sizes_with_no_power_above() {
        let e = check_requested_size(u64::MAX).unwrap_err();
        assert!(matches!(e, ConfigError::NotPowerOfTwoTooBig(..)));
    }

    #[test]
    fn rejects_empty_paths() {
        let mut a = args(None);
        a.socket_path = "".into();
        assert_eq!(
            Config::try_from(a).unwrap_err(),
            ConfigError::EmptySocketPath
        );
    }

    #[test]
    fn checks_existing_file_sizes() {
        let p = std::path::Path::new("/x");
        assert!(check_file_size(p, 1 << 30).is_ok());
        assert!(matches!(
            check_file_size(p, 3 << 20),
            Err(ConfigError::FileNotPowerOfTwo { .. })
        ));
        assert!(matches!(
            check_file_size(p, 4096),
            Err(ConfigError::TooSmall(_))
        ));
    }
}
