//! Doing things inside the microVMs' network namespace: creating and
//! opening TAP devices, and connecting to guests.
//!
//! `setns` moves only the calling thread, so each operation runs on a
//! short-lived thread of its own that joins the namespace, makes its fd and
//! ends; the fd stays bound to that namespace (a TAP lives where it was
//! opened, a socket where it was created) while the broker's own threads
//! never leave theirs.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::{SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `_IOW('T', 202, int)` and `_IOW('T', 203, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

/// A network namespace by path (`/run/netns/NAME`), or the broker's own.
#[derive(Debug, Clone)]
pub struct Namespace {
    path: Option<PathBuf>,
}

impl Namespace {
    /// The namespace the broker itself runs in.
    pub fn own() -> Self {
        Namespace { path: None }
    }

    pub fn at(path: impl Into<PathBuf>) -> Self {
        Namespace { path: Some(path.into()) }
    }

    /// The path, for `ip -n`-style tools (`None`: the broker's own).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Runs `work` inside the namespace, on a thread of its own.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        let Some(path) = &self.path else {
            return work();
        };
        let ns = File::open(path)?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    // SAFETY: setns with a namespace fd we opened; it moves
                    // only this thread, which ends right after `work`.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    work()
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
        })
    }

    /// Opens TAP `name` in the namespace, creating it (persistent, so it
    /// outlives a crashed net device process and the broker) if needed.
    /// Opened without packet info and with a virtio-net header, as
    /// mm-device net expects.
    pub fn open_tap(&self, name: &str) -> io::Result<OwnedFd> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad TAP name {name:?}")));
        }
        let name = name.to_string();
        self.run(move || {
            let tun = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
            // SAFETY: an all-zero ifreq is valid; we fill the name and flags.
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
                *dst = src as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
            // SAFETY: TUNSETIFF reads and writes the ifreq we own.
            if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut ifr) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: TUNSETPERSIST takes its argument by value.
            if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(OwnedFd::from(tun))
        })
    }

    /// A TCP connection to `addr` made from inside the namespace.
    pub fn connect(&self, addr: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
        self.run(move || TcpStream::connect_timeout(&addr.into(), timeout))
    }
}
