//! The kernel log, read through /dev/kmsg around each case: a DAX bug often shows as a
//! WARN_ON or a hung task in dmesg while the syscalls all "succeed".

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;

/// Substrings that make a kernel log line a failure of the case it appeared in.
const TROUBLE: &[&str] = &[
    "WARNING:",
    "BUG:",
    "Oops",
    "general protection",
    "hung_task",
    "Call Trace:",
];

/// Whether a kernel message reports trouble: a warning, BUG, oops, GPF or hung task.
pub fn is_trouble(msg: &str) -> bool {
    if TROUBLE.iter().any(|t| msg.contains(t)) {
        return true;
    }
    // "INFO: task foo:123 blocked for more than 30 seconds."
    msg.contains("INFO: task ") && msg.contains(" blocked for more than")
}

/// The message text of one /dev/kmsg record: "prio,seq,usec,flags;text\n" followed by
/// optional " KEY=value" continuation lines, which are dropped.
pub fn record_text(record: &str) -> &str {
    let first = record.lines().next().unwrap_or("");
    match first.split_once(';') {
        Some((_, text)) => text,
        None => first,
    }
}

/// A reader positioned after the last record consumed.
pub struct Kmsg {
    file: File,
}

impl Kmsg {
    /// Open /dev/kmsg without blocking. Reading starts at the oldest record kept, so the
    /// first drain also sees trouble from boot.
    pub fn open() -> io::Result<Kmsg> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")?;
        Ok(Kmsg { file })
    }

    /// Every record logged since the previous drain, as message text.
    pub fn drain(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        // One read returns one record; the kernel caps records at about 1 KiB of text
        // plus dictionary, so 8 KiB always suffices.
        let mut buf = vec![0u8; 8192];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    out.push(record_text(&rec).to_string());
                }
                // EPIPE: records were overwritten before we read them; the next read
                // continues with the oldest one left.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                    out.push("(kernel log records lost: ring buffer wrapped)".into());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(_) => break, // EAGAIN: nothing more
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trouble_lines() {
        for bad in [
            "WARNING: CPU: 1 PID: 80 at fs/dax.c:1234 dax_insert_entry+0x1/0x2",
            "BUG: kernel NULL pointer dereference, address: 0000000000000008",
            "Oops: 0002 [#1] PREEMPT SMP NOPTI",
            "general protection fault, probably for non-canonical address",
            "INFO: task pmem-guest-test:123 blocked for more than 30 seconds.",
            "\"echo 0 > /proc/sys/kernel/hung_task_timeout_secs\" disables this message.",
            "BUG: soft lockup - CPU#0 stuck for 22s!",
        ] {
            assert!(is_trouble(bad), "{bad}");
        }
        for fine in [
            "EXT4-fs (pmem0): mounted filesystem with ordered data mode",
            "XFS (pmem0): DAX enabled. Warning: Feature is experimental",
            "INFO: rcu detected something else",
            "pmem0: detected capacity change from 0 to 2097152",
        ] {
            assert!(!is_trouble(fine), "{fine}");
        }
    }

    #[test]
    fn record_text_strips_prefix_and_dictionary() {
        assert_eq!(
            record_text("4,1234,5678,-;WARNING: at fs/dax.c\n SUBSYSTEM=x\n"),
            "WARNING: at fs/dax.c"
        );
        assert_eq!(record_text("6,1,2,c;a;b"), "a;b");
        assert_eq!(record_text("no prefix"), "no prefix");
    }
}
