//! The logger: env_logger's, wrapped so that every record at warning or error level is
//! counted. The counts go into the metrics (`counters.log_warnings`, `counters.log_errors`),
//! so a test or the VM runner learns that the daemon complained without reading its log.
//!
//! The filter is RUST_LOG when it is set (env_logger's syntax, per module), otherwise
//! `--log-level` (default info): an administrator's RUST_LOG is the finer tool and wins.
//!
//! The line format depends on where stderr goes:
//! - a terminal: env_logger's own, with colours and timestamps;
//! - anything else (a file, a pipe): no colours (escape codes are noise in a file), but
//!   timestamps, since nobody else stamps the lines of a plain file;
//! - the journal (JOURNAL_STREAM names the device and inode of our stderr, systemd.exec(5)):
//!   no colours and no timestamps, since journald stamps every line itself, and each line
//!   starts with its syslog priority, `<3>` error, `<4>` warning, `<6>` info, `<7>` debug and
//!   trace (the sd-daemon(3) convention), so journalctl can filter by priority. The device and
//!   inode are compared, not just the variable's presence: a child whose stderr was redirected
//!   inherits JOURNAL_STREAM without writing to the journal.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::modes::LogLevel;

/// Warning and error records since the daemon started. Process-wide, like the logger itself.
pub static WARNINGS: AtomicU64 = AtomicU64::new(0);
pub static ERRORS: AtomicU64 = AtomicU64::new(0);

/// Forwards to `inner` and counts. Counting is an atomic add, so the wrapper needs no system
/// call beyond what `inner` makes (the seccomp filter allows those).
pub struct CountingLogger<L> {
    inner: L,
}

impl<L: Log> CountingLogger<L> {
    pub fn new(inner: L) -> Self {
        CountingLogger { inner }
    }
}

impl<L: Log> Log for CountingLogger<L> {
    fn enabled(&self, metadata: &Metadata) -> bool {
        // Warnings and errors must reach `log` to be counted even when RUST_LOG hides them.
        metadata.level() <= Level::Warn || self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        match record.level() {
            Level::Error => ERRORS.fetch_add(1, Ordering::Relaxed),
            Level::Warn => WARNINGS.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        // `inner` applies its own filter, so a hidden record is counted but not printed.
        self.inner.log(record);
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Installs env_logger behind the counting wrapper: RUST_LOG if set, otherwise `level`
/// (default info); the format for where stderr goes (see the module comment).
pub fn init(level: Option<LogLevel>) -> Result<(), log::SetLoggerError> {
    let mut builder = env_logger::Builder::new();
    match std::env::var("RUST_LOG") {
        Ok(filters) if !filters.trim().is_empty() => builder.parse_filters(&filters),
        _ => builder.filter_level(level.unwrap_or_default().filter()),
    };
    if stderr_is_journal() {
        builder
            .write_style(env_logger::WriteStyle::Never)
            .format(|buf, record| {
                writeln!(
                    buf,
                    "{}",
                    journal_line(record.level(), record.target(), record.args())
                )
            });
    } else {
        // Auto: colours only on a terminal.
        builder.write_style(env_logger::WriteStyle::Auto);
    }
    let inner = builder.build();
    let max = inner.filter().max(LevelFilter::Warn);
    log::set_boxed_logger(Box::new(CountingLogger::new(inner)))?;
    log::set_max_level(max);
    Ok(())
}

/// The syslog priority of a level, as sd-daemon(3) prefixes it.
fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// A record for the journal: priority prefix, no timestamp (journald adds its own). journald
/// makes every line an entry of its own, so each line of a multi-line record (the exit
/// statistics) carries the prefix, or the continuation lines would be filed at the default
/// priority.
fn journal_line(level: Level, target: &str, args: &std::fmt::Arguments) -> String {
    let prio = priority(level);
    let text = args.to_string();
    let mut lines = text.split('\n');
    let mut out = format!("<{prio}>{target}: {}", lines.next().unwrap_or_default());
    for line in lines {
        out.push_str(&format!("\n<{prio}>{line}"));
    }
    out
}

/// Whether stderr is the journal stream that JOURNAL_STREAM (`DEVICE:INODE`) names.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: `st` is plain data, written by fstat before it is read.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into `st`.
    if unsafe { libc::fstat(libc::STDERR_FILENO, &mut st) } != 0 {
        return false;
    }
    st.st_dev == dev && st.st_ino == ino
}

/// `(warnings, errors)` logged so far.
pub fn counts() -> (u64, u64) {
    (
        WARNINGS.load(Ordering::Relaxed),
        ERRORS.load(Ordering::Relaxed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Quiet;
    impl Log for Quiet {
        fn enabled(&self, _: &Metadata) -> bool {
            false
        }
        fn log(&self, _: &Record) {}
        fn flush(&self) {}
    }

    #[test]
    fn counts_warnings_and_errors_even_when_hidden() {
        let l = CountingLogger::new(Quiet);
        let (w0, e0) = counts();
        for level in [
            Level::Error,
            Level::Warn,
            Level::Warn,
            Level::Info,
            Level::Debug,
        ] {
            let args = format_args!("x");
            let r = Record::builder().level(level).args(args).build();
            assert_eq!(l.enabled(r.metadata()), level <= Level::Warn);
            l.log(&r);
        }
        let (w, e) = counts();
        // Other tests of this binary do not log, so the counts moved by exactly these.
        assert_eq!((w - w0, e - e0), (2, 1));
    }

    #[test]
    fn journal_lines_carry_the_syslog_priority_and_no_timestamp() {
        let line = |level| journal_line(level, "vhost_user_pmem", &format_args!("hello"));
        assert_eq!(line(Level::Error), "<3>vhost_user_pmem: hello");
        assert_eq!(line(Level::Warn), "<4>vhost_user_pmem: hello");
        assert_eq!(line(Level::Info), "<6>vhost_user_pmem: hello");
        assert_eq!(line(Level::Debug), "<7>vhost_user_pmem: hello");
        assert_eq!(line(Level::Trace), "<7>vhost_user_pmem: hello");
        assert_eq!(
            journal_line(Level::Info, "t", &format_args!("a\n  b")),
            "<6>t: a\n<6>  b"
        );
    }
}
