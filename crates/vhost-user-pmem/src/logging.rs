//! The logger: env_logger's, wrapped so that every record at warning or error level is
//! counted. The counts go into the metrics (`counters.log_warnings`, `counters.log_errors`),
//! so a test or the VM runner learns that the daemon complained without reading its log.

use std::sync::atomic::{AtomicU64, Ordering};

use log::{Level, LevelFilter, Log, Metadata, Record};

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

/// Installs env_logger (RUST_LOG, default `info`) behind the counting wrapper.
pub fn init() -> Result<(), log::SetLoggerError> {
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max = inner.filter().max(LevelFilter::Warn);
    log::set_boxed_logger(Box::new(CountingLogger::new(inner)))?;
    log::set_max_level(max);
    Ok(())
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
}
