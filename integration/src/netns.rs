//! Network namespaces, bridges and TAP devices that a test creates for
//! itself, so guest traffic never leaves the namespace (and never touches
//! the host's networks). Everything is removed on drop.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;

use anyhow::{Context, Result, bail};

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A network namespace with one bridge, `br0`, up.
pub struct TestNetwork {
    pub name: String,
}

impl TestNetwork {
    pub fn new(tag: &str) -> Result<Self> {
        let name = format!("mm-test-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let net = TestNetwork { name };
        ip(&["-n", &net.name, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &net.name, "link", "set", "br0", "up"])?;
        ip(&["-n", &net.name, "link", "set", "lo", "up"])?;
        Ok(net)
    }

    /// Creates TAP `name` inside the namespace, enslaved to br0, and
    /// returns its fd (opened with a virtio-net header, no packet info).
    pub fn tap(&self, name: &str) -> Result<OwnedFd> {
        let ns = File::open(format!("/run/netns/{}", self.name)).context("opening the namespace")?;
        let name_owned = name.to_string();
        // setns affects only the calling thread: open the TAP from a
        // short-lived thread so the test's own threads stay where they are.
        let fd = std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<OwnedFd> {
                    // SAFETY: setns on a valid namespace fd, for this thread only.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("setns: {}", std::io::Error::last_os_error());
                    }
                    open_tap(&name_owned)
                })
                .join()
                .expect("tap thread panicked")
        })?;
        ip(&["-n", &self.name, "link", "set", name, "master", "br0"])?;
        ip(&["-n", &self.name, "link", "set", name, "up"])?;
        Ok(fd)
    }
}

fn open_tap(name: &str) -> Result<OwnedFd> {
    if name.len() >= libc::IFNAMSIZ {
        bail!("TAP name {name:?} is too long");
    }
    let tun = OpenOptions::new().read(true).write(true).open("/dev/net/tun").context("opening /dev/net/tun")?;
    // SAFETY: an all-zero ifreq is valid; we fill the name and flags.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    // SAFETY: TUNSETIFF reads and writes the ifreq we own.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut ifr) } != 0 {
        bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    }
    Ok(OwnedFd::from(tun))
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
