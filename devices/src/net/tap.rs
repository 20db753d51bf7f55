//! The TAP fd the broker hands us. We never open or configure an interface
//! ourselves (our jail has no /dev/net/tun and no CAP_NET_ADMIN); we only
//! ask the fd what it is and set its per-fd options.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::features::{TUN_F_CSUM, TUN_F_TSO_ECN, TUN_F_TSO4, TUN_F_TSO6};

/// The virtio_net_hdr_v1 size (with num_buffers): what the TAP prepends to
/// and expects before every frame once TUNSETVNETHDRSZ says so.
pub const VNET_HDR_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("the tap fd is not a TAP device (TUNGETIFF): {0}")]
    NotTun(#[source] io::Error),
    #[error("the tap fd must be a TAP opened with IFF_TAP|IFF_NO_PI (flags {0:#x})")]
    WrongFlags(u32),
    #[error("TUNSETVNETHDRSZ {VNET_HDR_LEN}: {0}")]
    SetVnetHdrSize(#[source] io::Error),
    #[error("making the tap fd non-blocking: {0}")]
    NonBlocking(#[source] io::Error),
}

/// A TAP queue fd, non-blocking, with its header mode and what offloads the
/// kernel accepted for it.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    vnet_hdr: bool,
    offloads: u32,
}

/// Offload combinations to probe, richest first; the first the TAP takes is
/// what we may offer the guest.
const OFFLOAD_PROBES: [u32; 4] =
    [TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6, TUN_F_CSUM, 0];

impl Tap {
    /// Takes over a TAP fd: checks it is a TAP without packet info, switches
    /// its virtio-net header (if it has one) to our 12-byte layout, probes
    /// which offloads it accepts, and leaves offloads off until the guest
    /// acknowledges some (`set_offloads`).
    pub fn new(fd: OwnedFd) -> Result<Self, TapError> {
        let flags = tun_flags(fd.as_raw_fd()).map_err(TapError::NotTun)?;
        let want = (libc::IFF_TAP | libc::IFF_NO_PI) as u32;
        if flags & want != want || flags & libc::IFF_TUN as u32 != 0 {
            return Err(TapError::WrongFlags(flags));
        }
        let vnet_hdr = flags & libc::IFF_VNET_HDR as u32 != 0;
        if vnet_hdr {
            let size = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer,
            // which points at a live local.
            let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
            if ret < 0 {
                return Err(TapError::SetVnetHdrSize(io::Error::last_os_error()));
            }
        }
        set_nonblocking(fd.as_raw_fd()).map_err(TapError::NonBlocking)?;
        let mut tap = Tap { fd, vnet_hdr, offloads: 0 };
        if vnet_hdr {
            tap.offloads = OFFLOAD_PROBES.into_iter().find(|&f| tap.set_offloads(f).is_ok()).unwrap_or(0);
            // Until the guest says what it takes, it takes finished frames.
            let _ = tap.set_offloads(0);
        }
        Ok(tap)
    }

    /// Wraps any datagram-like fd (a socketpair end in tests and the fuzz
    /// target) as if it were a TAP with or without a virtio-net header,
    /// without probing it.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn from_parts(fd: OwnedFd, vnet_hdr: bool, offloads: u32) -> Self {
        set_nonblocking(fd.as_raw_fd()).unwrap();
        Tap { fd, vnet_hdr, offloads }
    }

    /// True when every frame read or written carries a virtio_net_hdr_v1.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// The `TUNSETOFFLOAD` flags the TAP accepted when probed.
    pub fn supported_offloads(&self) -> u32 {
        self.offloads
    }

    /// Tells the kernel which unfinished frames (partial checksum, GSO) it
    /// may hand us.
    pub fn set_offloads(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is
        // passed.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) };
        if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Reads one frame (one read is one frame on a TAP).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: the kernel writes at most buf.len() bytes into buf,
            // which we borrow mutably for the call.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Writes one frame.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: the kernel reads at most buf.len() bytes from buf.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The interface flags of a tun/tap fd (TUNGETIFF).
fn tun_flags(fd: RawFd) -> io::Result<u32> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one struct ifreq through the pointer, which
    // points at a live local of that type.
    let ret = unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut ifr) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNGETIFF fills the flags member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    Ok(flags as u16 as u32)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own take and return plain ints.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::testnet::TestNetns;

    #[test]
    fn rejects_non_tap_fds() {
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        assert!(matches!(Tap::new(a.into()), Err(TapError::NotTun(_))));
    }

    #[test]
    fn probes_a_real_tap() {
        let Some(ns) = TestNetns::new("tap-probe") else { return };
        let (fd, _) = ns.create_tap("mmt0", true);
        let tap = Tap::new(fd).unwrap();
        assert!(tap.vnet_hdr());
        // Every kernel since 2.6.27 takes at least checksum offload.
        assert_ne!(tap.supported_offloads() & TUN_F_CSUM, 0);
        tap.set_offloads(0).unwrap();

        let (fd, _) = ns.create_tap("mmt1", false);
        let tap = Tap::new(fd).unwrap();
        assert!(!tap.vnet_hdr());
        assert_eq!(tap.supported_offloads(), 0);
    }
}
