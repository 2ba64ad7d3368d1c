//! Raw vhost-user messages: any header, any payload, any file descriptors.
//!
//! [`crate::Frontend`] only sends what the vhost crate's frontend side can encode, and that side
//! refuses most malformed requests before they reach the socket (queue indices it does not know,
//! empty memory regions, ...). A backend must survive whatever arrives on its socket, so the
//! protocol-abuse tests need to write the bytes themselves. [`RawConnection`] does that: one
//! `sendmsg` per call, with the fds as `SCM_RIGHTS`, exactly as QEMU frames a message, and a
//! reader that tells a reply, a closed connection and silence apart.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::error::{Error, Result};

/// Size of the vhost-user header `{u32 request; u32 flags; u32 size}`.
pub const HEADER_LEN: usize = 12;
/// Version 1 in the header's flags (bits 0-1), the only version there is.
pub const FLAG_VERSION_1: u32 = 0x1;
/// The header's REPLY flag.
pub const FLAG_REPLY: u32 = 0x4;
/// The header's NEED_REPLY flag (answered with an ack when REPLY_ACK was negotiated).
pub const FLAG_NEED_REPLY: u32 = 0x8;

/// A vhost-user message header with every field free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawHeader {
    /// Request code.
    pub request: u32,
    /// Flags: version, REPLY, NEED_REPLY, and whatever else a test sets.
    pub flags: u32,
    /// Payload size as the header claims it (need not match what follows).
    pub size: u32,
}

impl RawHeader {
    /// The header's wire form (native byte order, as vhost-user specifies).
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.request.to_ne_bytes());
        b[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        b[8..12].copy_from_slice(&self.size.to_ne_bytes());
        b
    }

    fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        RawHeader {
            request: word(0),
            flags: word(4),
            size: word(8),
        }
    }
}

/// What came back after a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawReply {
    /// A whole message.
    Message {
        /// Its header.
        header: RawHeader,
        /// Its payload (`header.size` bytes).
        payload: Vec<u8>,
    },
    /// The backend closed the connection (EOF or reset).
    Closed,
    /// Nothing arrived before the timeout; the connection is still open.
    Silent,
}

impl RawReply {
    /// The payload as a `u64` if it is exactly one (the form of acks and of most replies).
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            RawReply::Message { payload, .. } => {
                let bytes: [u8; 8] = payload.as_slice().try_into().ok()?;
                Some(u64::from_ne_bytes(bytes))
            }
            _ => None,
        }
    }
}

/// One frontend connection that sends whatever it is told to.
pub struct RawConnection {
    stream: UnixStream,
}

impl RawConnection {
    /// Connects to a backend's socket, retrying until `timeout` while it is not listening yet.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self> {
        let path = path.as_ref();
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => return Ok(RawConnection { stream }),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(Error::Connect {
                        path: path.display().to_string(),
                        source,
                    })
                }
            }
        }
    }

    /// Wraps a connected socket.
    pub fn from_stream(stream: UnixStream) -> Self {
        RawConnection { stream }
    }

    /// Sends `bytes` in one `sendmsg` with `fds` attached as `SCM_RIGHTS`. The backend reads
    /// the header with the fds in one `recvmsg`, so fds always go with the first bytes.
    pub fn send_bytes(&self, bytes: &[u8], fds: &[RawFd]) -> Result<()> {
        let sent = if fds.is_empty() {
            (&self.stream).write_all(bytes).map(|()| bytes.len())
        } else {
            self.stream
                .send_with_fds(&[bytes], fds)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))
        };
        match sent {
            Ok(n) if n == bytes.len() => Ok(()),
            Ok(n) => Err(Error::Protocol(format!(
                "short send: {n} of {} bytes",
                bytes.len()
            ))),
            Err(e) => Err(Error::Io {
                op: "send raw vhost-user message",
                source: e,
            }),
        }
    }

    /// Sends `header` followed by `payload`, whatever `header.size` says.
    pub fn send_with_header(&self, header: RawHeader, payload: &[u8], fds: &[RawFd]) -> Result<()> {
        let mut msg = header.to_bytes().to_vec();
        msg.extend_from_slice(payload);
        self.send_bytes(&msg, fds)
    }

    /// Sends a well-framed message: version 1, `flags` on top, size = `payload.len()`.
    pub fn send(&self, request: u32, flags: u32, payload: &[u8], fds: &[RawFd]) -> Result<()> {
        let size = u32::try_from(payload.len())
            .map_err(|_| Error::InvalidArgument(format!("payload of {} bytes", payload.len())))?;
        self.send_with_header(
            RawHeader {
                request,
                flags: FLAG_VERSION_1 | flags,
                size,
            },
            payload,
            fds,
        )
    }

    /// Sends a well-framed request with NEED_REPLY and reads what comes back.
    pub fn call(
        &self,
        request: u32,
        payload: &[u8],
        fds: &[RawFd],
        timeout: Duration,
    ) -> Result<RawReply> {
        self.send(request, FLAG_NEED_REPLY, payload, fds)?;
        self.recv(timeout)
    }

    /// Reads one message, or notices that the backend closed the connection, or that it said
    /// nothing for `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<RawReply> {
        // The socket may be a duplicate of a `Frontend`'s, which shares the timeout option:
        // put its timeout back afterwards.
        let previous = self
            .stream
            .read_timeout()
            .map_err(Error::io("get socket timeout"))?;
        let reply = self.recv_inner(Instant::now() + timeout);
        self.stream
            .set_read_timeout(previous)
            .map_err(Error::io("set socket timeout"))?;
        reply
    }

    fn recv_inner(&self, deadline: Instant) -> Result<RawReply> {
        let mut header = [0u8; HEADER_LEN];
        match self.read_full(&mut header, deadline)? {
            Filled::All => {}
            Filled::Eof(0) => return Ok(RawReply::Closed),
            Filled::Timeout(0) => return Ok(RawReply::Silent),
            Filled::Eof(n) | Filled::Timeout(n) => {
                return Err(Error::Protocol(format!(
                    "backend sent a partial header ({n} bytes)"
                )))
            }
        }
        let header = RawHeader::from_bytes(&header);
        if header.size as usize > 1 << 20 {
            return Err(Error::Protocol(format!(
                "backend announced a {}-byte payload",
                header.size
            )));
        }
        let mut payload = vec![0u8; header.size as usize];
        match self.read_full(&mut payload, deadline)? {
            Filled::All => Ok(RawReply::Message { header, payload }),
            Filled::Eof(n) | Filled::Timeout(n) => Err(Error::Protocol(format!(
                "backend sent {n} of the {} payload bytes its header announced",
                header.size
            ))),
        }
    }

    /// Closes the sending direction: the backend reads EOF after what was sent, which is how
    /// a test delivers a truncated message without leaving the backend waiting for the rest.
    pub fn shutdown_write(&self) -> Result<()> {
        self.stream
            .shutdown(Shutdown::Write)
            .map_err(Error::io("shutdown socket"))
    }

    /// The socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    fn read_full(&self, buf: &mut [u8], deadline: Instant) -> Result<Filled> {
        let mut got = 0;
        while got < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Filled::Timeout(got));
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(Error::io("set socket timeout"))?;
            match (&self.stream).read(&mut buf[got..]) {
                Ok(0) => return Ok(Filled::Eof(got)),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(Filled::Timeout(got))
                }
                // A backend that closes with unread data in its buffer resets the connection.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Ok(Filled::Eof(got))
                }
                Err(source) => {
                    return Err(Error::Io {
                        op: "read raw vhost-user reply",
                        source,
                    })
                }
            }
        }
        Ok(Filled::All)
    }
}

impl AsRawFd for RawConnection {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

enum Filled {
    All,
    Eof(usize),
    Timeout(usize),
}
