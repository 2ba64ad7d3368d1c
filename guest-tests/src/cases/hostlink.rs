//! The guest's side of the runner handshake: a case prints `VUP-SYNC ACTION ARGS...` on its
//! output and waits for the VM runner (`vmrun`, crates/vm-runner) to act on the host and answer on the
//! console's input (`/dev/ttyS0`, whose host side is QEMU's stdin, a FIFO) with
//! `VUP-ACK ACTION TEXT` or `VUP-NAK ACTION REASON`.
//!
//! The serial console rather than anything on the pmem device, because the cases that need
//! the host are the ones that break the device's flushes: the channel must not depend on them.
//! The console rather than a third serial port, because a third ISA UART shares its interrupt
//! line with the first, and QEMU does not OR two devices on one ISA line: an interrupt can be
//! lost. Nothing else reads the console in the test initramfs.
//! Only one exchange is outstanding at a time, so an answer always belongs to the last
//! request; its action word is checked anyway, so a stale line left on the port cannot be
//! taken for the answer.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use crate::error::{fail, Context, Result};
use crate::isolate::Child;

/// The port the runner writes its answers to (QEMU's `-serial stdio`).
pub const PORT: &str = "/dev/ttyS0";

/// How long to wait for an answer. The runner polls the guest's output every 50 ms and its
/// actions take a few seconds at most; this is only for a runner that never answers (an old
/// runner, or a run under QEMU without the port).
const ANSWER_DEADLINE: Duration = Duration::from_secs(120);

/// What the runner answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    Ack(String),
    Nak(String),
}

pub struct HostLink {
    port: File,
    /// Bytes read past the last complete line.
    pending: Vec<u8>,
}

impl HostLink {
    /// Opens the port without echo and drops whatever input is waiting on it.
    pub fn open() -> Result<HostLink> {
        let port = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(PORT)
            .ctx(format!(
                "open {PORT} (the runner's answer port; run this case through vmrun or scripts/run-vm.sh)"
            ))?;
        quiet_mode(&port).ctx(format!("turn off echo on {PORT}"))?;
        Ok(HostLink {
            port,
            pending: Vec::new(),
        })
    }

    /// Asks the runner to do `action` and waits for its answer.
    pub fn request(&mut self, child: &Child, action: &str) -> Result<Answer> {
        let word = action
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        child.raw(&format!("VUP-SYNC {action}"));
        let deadline = Instant::now() + ANSWER_DEADLINE;
        loop {
            while let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&line).trim().to_string();
                if let Some(answer) = parse_answer(&line, &word) {
                    return Ok(answer);
                }
                if !line.is_empty() {
                    child.diag(&format!("{PORT}: ignoring {line:?}"));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                fail!("no answer from the runner on {PORT} within {ANSWER_DEADLINE:?} to VUP-SYNC {action}");
            }
            self.wait_readable(left)?;
            let mut buf = [0u8; 512];
            match self.port.read(&mut buf) {
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).ctx(format!("read {PORT}")),
            }
        }
    }

    /// [`Self::request`], with a NAK turned into the case's failure.
    pub fn expect_ack(&mut self, child: &Child, action: &str) -> Result<String> {
        match self.request(child, action)? {
            Answer::Ack(text) => Ok(text),
            Answer::Nak(why) => fail!("the runner refused VUP-SYNC {action}: {why}"),
        }
    }

    fn wait_readable(&self, left: Duration) -> Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.port.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(1000) as libc::c_int;
        // SAFETY: pfd is one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e).ctx(format!("poll {PORT}"));
            }
        }
        Ok(())
    }
}

/// `VUP-ACK WORD TEXT` or `VUP-NAK WORD REASON` for the action `word`; None for other lines.
pub fn parse_answer(line: &str, word: &str) -> Option<Answer> {
    let (kind, rest) = line.split_once(' ')?;
    let (w, text) = rest.split_once(' ').unwrap_or((rest, ""));
    if w != word {
        return None;
    }
    match kind {
        "VUP-ACK" => Some(Answer::Ack(text.to_string())),
        "VUP-NAK" => Some(Answer::Nak(text.to_string())),
        _ => None,
    }
}

/// Line mode without echo: a read returns the runner's lines whole, and they are not printed
/// back into the console log. Output processing stays as it is: the port is the console.
fn quiet_mode(port: &File) -> io::Result<()> {
    let fd = port.as_raw_fd();
    // SAFETY: termios is plain data that tcgetattr fills in before it is read.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open tty for the duration of these calls; `t` is a valid termios.
    unsafe {
        if libc::tcgetattr(fd, &mut t) != 0 {
            return Err(io::Error::last_os_error());
        }
        t.c_lflag |= libc::ICANON;
        t.c_lflag &= !(libc::ECHO | libc::ECHOE | libc::ECHOK | libc::ECHONL);
        if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
            return Err(io::Error::last_os_error());
        }
        // Whatever arrived before this case asked anything is not an answer to it.
        libc::tcflush(fd, libc::TCIFLUSH);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert_eq!(
            parse_answer("VUP-ACK faultfs mode fail-fsync", "faultfs"),
            Some(Answer::Ack("mode fail-fsync".into()))
        );
        assert_eq!(
            parse_answer("VUP-NAK check-flushes only 3 fdatasyncs", "check-flushes"),
            Some(Answer::Nak("only 3 fdatasyncs".into()))
        );
        assert_eq!(
            parse_answer("VUP-ACK snapshot", "snapshot"),
            Some(Answer::Ack(String::new()))
        );
        assert_eq!(parse_answer("VUP-ACK faultfs ok", "snapshot"), None);
        assert_eq!(parse_answer("garbage", "snapshot"), None);
        assert_eq!(parse_answer("VUP-MAYBE snapshot x", "snapshot"), None);
    }
}
