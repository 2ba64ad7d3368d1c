//! The command line: fuzz bytes as an argument vector through clap (`Args::try_parse_from`)
//! and `Config::try_from`, and as a string through `ByteSize` and `FlushRateLimit` parsing.
//!
//! Beyond "never panics" (clap's rendering of errors and help included), the target checks
//! what the rest of the daemon assumes of a `Config`: non-empty paths, a socket mode within
//! 0o777, an inherited descriptor that is not negative, a size that is a power
//! of two of at least 2 MiB, a bounded metrics interval, a flush rate limit whose rate and burst
//! are within 1..=MAX_OPS; and that every printed `ByteSize` and `FlushRateLimit` parses back
//! to itself, as `--size` and the start-up log line promise.

#![no_main]

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::OnceLock;

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use vhost_user_pmem::args::Args;
use vhost_user_pmem::config::{Config, Endpoint, MAX_METRICS_INTERVAL_SECS};
use vhost_user_pmem::flush_limit::{FlushRateLimit, MAX_OPS};
use vhost_user_pmem::size::{ByteSize, MIN_SIZE};

/// With VHOST_FUZZ_SKIP_KNOWN=1, findings already reported in docs/testing.md are not checked
/// again: a size that is not a whole number of KiB prints as "N bytes", which does not parse.
fn skip_known() -> bool {
    static SKIP: OnceLock<bool> = OnceLock::new();
    *SKIP.get_or_init(|| std::env::var_os("VHOST_FUZZ_SKIP_KNOWN").is_some_and(|v| v == "1"))
}

fn check_size(text: &str) {
    if let Ok(size) = text.parse::<ByteSize>() {
        let printed = size.to_string();
        if skip_known() && printed.ends_with(" bytes") {
            return;
        }
        assert_eq!(
            printed.parse::<ByteSize>(),
            Ok(size),
            "{text:?} parsed as {size:?}, printed as {printed:?}, which does not parse back"
        );
    }
}

fn check_rate_limit(text: &str) {
    if let Ok(limit) = text.parse::<FlushRateLimit>() {
        assert!(
            (1..=MAX_OPS).contains(&limit.ops_per_sec),
            "{text:?}: {limit:?}"
        );
        assert!((1..=MAX_OPS).contains(&limit.burst), "{text:?}: {limit:?}");
        let printed = limit.to_string();
        assert_eq!(
            printed.parse::<FlushRateLimit>(),
            Ok(limit),
            "{text:?} parsed as {limit:?}, printed as {printed:?}, which does not parse back"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    check_size(&String::from_utf8_lossy(data));
    check_rate_limit(&String::from_utf8_lossy(data));

    // NUL separates arguments: a NUL can never be inside one.
    let argv = std::iter::once(OsString::from("vhost-user-pmem")).chain(
        data.split(|&b| b == 0)
            .map(|a| OsStr::from_bytes(a).to_owned()),
    );
    let args = match Args::try_parse_from(argv) {
        Ok(args) => args,
        Err(e) => {
            // What the daemon prints for a bad command line must render.
            let _ = e.render().to_string();
            return;
        }
    };
    if let Some(size) = args.size {
        check_size(&size.to_string());
    }
    match Config::try_from(args) {
        Ok(config) => {
            match &config.endpoint {
                Endpoint::Listen { path, mode, .. } => {
                    assert!(!path.as_os_str().is_empty());
                    assert!(*mode <= 0o777, "socket mode {mode:o} accepted");
                }
                Endpoint::Connect(path) => assert!(!path.is_empty()),
                // Accepted only after the descriptor was found to be a listening socket.
                Endpoint::Fd(inherited) => assert!(inherited.fd() >= 0),
            }
            assert!(!config.file.as_os_str().is_empty());
            if let Some(size) = config.size {
                assert!(
                    size >= MIN_SIZE && size.is_power_of_two(),
                    "size {size} accepted"
                );
            }
            if let Some(limit) = config.flush_rate_limit {
                check_rate_limit(&limit.to_string());
            }
            if let Some(metrics) = &config.metrics {
                assert!(!metrics.path.as_os_str().is_empty());
                if let Some(interval) = metrics.interval {
                    assert!(interval.as_secs() <= MAX_METRICS_INTERVAL_SECS);
                    assert!(!interval.is_zero());
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
