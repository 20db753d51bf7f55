//! The transport of the control channels (`vmm.capnp`, `device.capnp`):
//! one Cap'n Proto message per `SOCK_SEQPACKET` packet, with at most
//! [`MAX_FDS`] fds attached (SCM_RIGHTS).
//!
//! Packets rather than a byte stream: a message and the fd it names arrive
//! together or not at all, and no framing code is needed on either side.
//! No capnp-rpc: the processes at the other end (mm-vmm, mm-device) answer
//! from one blocking thread under a short seccomp policy.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use capnp::message::{Builder, ReaderOptions};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The largest packet either side sends or accepts. A status for a few
/// dozen devices is under 2 KiB.
pub const MAX_PACKET: usize = 64 * 1024;
/// The most fds one packet carries (a snapshot request: its state file and
/// its memory file).
pub const MAX_FDS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    #[error("control socket: {0}")]
    Socket(#[from] nix::Error),
    #[error("control socket: {0}")]
    Scm(#[from] vmm_sys_util::errno::Error),
    #[error("malformed control message: {0}")]
    Malformed(#[from] capnp::Error),
    #[error("control message of an unknown kind (a newer peer?)")]
    UnknownKind,
    #[error("mm-vmm hung up the control channel")]
    HungUp,
    #[error("mm-vmm refused: {0}")]
    Refused(String),
    #[error("mm-vmm answered {0} to {1}")]
    Unexpected(&'static str, &'static str),
}

pub(crate) fn encode(message: &Builder<capnp::message::HeapAllocator>) -> Vec<u8> {
    capnp::serialize::write_message_to_words(message)
}

/// Limits for messages from a peer we do not trust to be well-behaved.
pub(crate) fn reader_options() -> ReaderOptions {
    let mut options = ReaderOptions::new();
    options.traversal_limit_in_words(Some(MAX_PACKET / 8)).nesting_limit(8);
    options
}

pub(crate) fn text(reader: capnp::text::Reader<'_>) -> Result<String, ControlError> {
    reader.to_string().map_err(|e| ControlError::Malformed(capnp::Error::failed(format!("text is not UTF-8: {e}"))))
}

/// One packet's bytes, and the fds that came attached to it, in order.
pub type Packet = (Vec<u8>, Vec<OwnedFd>);

/// A connected `SOCK_SEQPACKET` unix socket.
#[derive(Debug)]
pub struct SeqPacket(OwnedFd);

impl ScmSocket for SeqPacket {
    fn socket_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for SeqPacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl From<OwnedFd> for SeqPacket {
    fn from(fd: OwnedFd) -> Self {
        SeqPacket(fd)
    }
}

fn seqpacket_socket() -> Result<OwnedFd, ControlError> {
    Ok(socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?)
}

impl SeqPacket {
    /// A connected pair (for tests, and for a caller that needs no path).
    pub fn pair() -> Result<(SeqPacket, SeqPacket), ControlError> {
        let (a, b) = socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
        Ok((SeqPacket(a), SeqPacket(b)))
    }

    pub fn connect(path: &Path) -> Result<SeqPacket, ControlError> {
        let fd = seqpacket_socket()?;
        socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        Ok(SeqPacket(fd))
    }

    /// Bounds how long `recv` waits (None: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), ControlError> {
        let tv = nix::sys::time::TimeVal::new(
            timeout.map_or(0, |t| t.as_secs() as _),
            timeout.map_or(0, |t| t.subsec_micros() as _),
        );
        socket::setsockopt(&self.0, socket::sockopt::ReceiveTimeout, &tv)?;
        Ok(())
    }

    /// Sends one packet with `fds` attached (at most [`MAX_FDS`]).
    pub fn send(&self, bytes: &[u8], fds: &[RawFd]) -> Result<(), ControlError> {
        if fds.len() > MAX_FDS {
            return Err(ControlError::Io(io::Error::new(io::ErrorKind::InvalidInput, "too many fds for one packet")));
        }
        self.send_with_fds(&[bytes], fds)?;
        Ok(())
    }

    /// Receives one packet and the fds attached to it; `None` when the peer
    /// hung up. A packet longer than [`MAX_PACKET`] is an error.
    pub fn recv(&self) -> Result<Option<Packet>, ControlError> {
        // One byte more than allowed: a packet that fills it was too long
        // (SOCK_SEQPACKET silently truncates).
        let mut buf = vec![0u8; MAX_PACKET + 1];
        let mut fds: [RawFd; MAX_FDS] = [-1; MAX_FDS];
        let mut iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
        // SAFETY: the iovec points at `buf`, which outlives the call; the
        // fd array has room for MAX_FDS descriptors, as we tell the callee.
        let (n, nfds) = unsafe { self.recv_with_fds(&mut iov, &mut fds)? };
        // SAFETY: each of the first `nfds` entries is a descriptor the kernel
        // just installed in this process for us; nothing else owns it.
        let fds: Vec<OwnedFd> = fds[..nfds].iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
        if n == 0 && fds.is_empty() {
            return Ok(None);
        }
        if n > MAX_PACKET {
            return Err(ControlError::Malformed(capnp::Error::failed(format!(
                "packet longer than {MAX_PACKET} bytes"
            ))));
        }
        buf.truncate(n);
        Ok(Some((buf, fds)))
    }
}

/// A listening `SOCK_SEQPACKET` unix socket: mm-vmm's end.
#[derive(Debug)]
pub struct SeqPacketListener(OwnedFd);

impl SeqPacketListener {
    pub fn bind(path: &Path) -> Result<SeqPacketListener, ControlError> {
        let fd = seqpacket_socket()?;
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        socket::listen(&fd, socket::Backlog::new(4)?)?;
        Ok(SeqPacketListener(fd))
    }

    /// Takes over an inherited fd, checking that it is a listening
    /// `SOCK_SEQPACKET` socket (the broker binds it; mm-vmm only accepts).
    pub fn from_inherited(fd: OwnedFd) -> Result<SeqPacketListener, ControlError> {
        let kind = socket::getsockopt(&fd, socket::sockopt::SockType)?;
        let listening = socket::getsockopt(&fd, socket::sockopt::AcceptConn)?;
        if kind != SockType::SeqPacket || !listening {
            return Err(ControlError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the control fd must be a listening SOCK_SEQPACKET unix socket",
            )));
        }
        Ok(SeqPacketListener(fd))
    }

    pub fn accept(&self) -> Result<SeqPacket, ControlError> {
        let fd = socket::accept4(self.0.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: accept4 returned a fresh descriptor that nothing else owns.
        Ok(SeqPacket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

impl AsFd for SeqPacketListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
