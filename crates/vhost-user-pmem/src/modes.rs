//! The command line's vocabulary: the modes a user chooses between. A leaf module, so that the
//! clap struct, the validated configuration and the parts that act on a mode can all name it
//! without depending on one another.

use std::fmt;

use serde::Serialize;

/// Workers of the `parallel` flush mode. QEMU's thread pool allows 64; 16 is plenty to keep a
/// disk's queue busy, and bounds what a guest with a deep queue can make the host do at once.
pub const PARALLEL_THREADS: usize = 16;

/// `--flush-mode`: how flush requests are turned into fdatasyncs.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum FlushMode {
    /// Group commit: one fdatasync answers every request waiting when it starts; the fastest
    #[default]
    Group,
    /// One fdatasync per request, one at a time (as Cloud Hypervisor and crosvm do)
    Serial,
    /// One fdatasync per request, up to 16 at once in a thread pool (as QEMU's own device does)
    Parallel,
}

impl FlushMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FlushMode::Group => "group",
            FlushMode::Serial => "serial",
            FlushMode::Parallel => "parallel",
        }
    }
}

impl fmt::Display for FlushMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `--allocate`: whether every block of the file is allocated at start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Allocation {
    /// Allocate every block at start (fallocate), or refuse to start when the file system
    /// cannot hold the device; a full host disk then cannot stop the VM
    #[default]
    Full,
    /// Leave holes as they are; a guest writing them when the host file system is full stops
    /// (SIGBUS in QEMU)
    Sparse,
}

impl Allocation {
    pub fn as_str(self) -> &'static str {
        match self {
            Allocation::Full => "full",
            Allocation::Sparse => "sparse",
        }
    }
}

/// `--seccomp`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Install the allow-list; a call outside it kills the daemon (SIGSYS) after a log line.
    #[default]
    On,
    /// Install no filter.
    Off,
    /// Let every call through, but have the kernel log those outside the list.
    Log,
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::On => "on",
            SeccompMode::Off => "off",
            SeccompMode::Log => "log",
        })
    }
}

/// `--log-level`: the log filter when RUST_LOG is not set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
    // Nothing at all; warnings and errors are still counted in the metrics.
    Off,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
            LogLevel::Off => log::LevelFilter::Off,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_states_the_pool_bound() {
        use clap::ValueEnum;
        let v = FlushMode::Parallel.to_possible_value().unwrap();
        let help = v.get_help().unwrap().to_string();
        assert!(help.contains(&PARALLEL_THREADS.to_string()), "{help}");
    }
}
