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

pub fn ip(args: &[&str]) -> Result<()> {
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

    /// Runs `work` on a thread that has joined the namespace (the fds it
    /// makes stay in it); the caller's threads stay where they are.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let ns = File::open(format!("/run/netns/{}", self.name)).context("opening the namespace")?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    // SAFETY: setns on a valid namespace fd, for this thread only.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("setns: {}", std::io::Error::last_os_error());
                    }
                    work()
                })
                .join()
                .expect("namespace thread panicked")
        })
    }

    /// A TCP listener on `addr` inside the namespace.
    pub fn listen(&self, addr: &str) -> Result<std::net::TcpListener> {
        let addr = addr.to_string();
        self.run(move || std::net::TcpListener::bind(&addr).with_context(|| format!("listening on {addr}")))
    }

    /// Creates TAP `name` inside the namespace, enslaved to br0, and
    /// returns its fd (opened with a virtio-net header, no packet info).
    pub fn tap(&self, name: &str) -> Result<OwnedFd> {
        let name_owned = name.to_string();
        let fd = self.run(move || open_tap(&name_owned))?;
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

/// Makes `cmd` run in the network namespace `netns` (setns after fork).
pub fn enter_before_exec(cmd: &mut Command, netns: &str) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let ns = File::open(format!("/run/netns/{netns}")).with_context(|| format!("opening namespace {netns}"))?;
    // SAFETY: between fork and exec the closure calls only setns(2), which
    // is async-signal-safe; `ns` stays open (moved into the closure).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
