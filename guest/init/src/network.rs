//! The guest's network, from the kernel command line (`mm.ip`, `mm.gw`,
//! `mm.dns`, `mm.hostname`).
//!
//! mm-init configures it itself, with the classic `SIOCSIF*` and
//! `SIOCADDRT` ioctls, because an image need not ship `ip` or `ifconfig`
//! (the point is that any OCI image comes up reachable). The kernel's own
//! `ip=` autoconfiguration would do as much, but it runs before the
//! overlay root exists and cannot write `/etc/resolv.conf`.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::settings::Settings;

/// The one virtio-net interface mm-vmm gives a guest.
const INTERFACE: &str = "eth0";

/// Brings up `lo`, then `eth0` with its address and default route when the
/// command line has them, and writes `/etc/resolv.conf` and `/etc/hosts`.
/// Each failure is one line on the console; the workload still runs.
pub fn configure(settings: &Settings) {
    let sock = match inet_socket() {
        Ok(sock) => sock,
        Err(e) => {
            eprintln!("mm-init: network: no AF_INET socket: {e}");
            return;
        }
    };
    if let Err(e) = set_up(&sock, "lo") {
        eprintln!("mm-init: network: lo: {e}");
    }
    let Some(net) = settings.address else {
        return;
    };
    let result = set_address(&sock, INTERFACE, libc::SIOCSIFADDR, net.addr)
        .and_then(|()| set_address(&sock, INTERFACE, libc::SIOCSIFNETMASK, net.netmask()))
        .and_then(|()| set_up(&sock, INTERFACE));
    if let Err(e) = result {
        eprintln!("mm-init: network: {INTERFACE} {}/{}: {e}", net.addr, net.prefix);
        return;
    }
    if let Some(gateway) = settings.gateway
        && let Err(e) = add_default_route(&sock, gateway)
    {
        eprintln!("mm-init: network: default route via {gateway}: {e}");
    }
    let hostname = settings.hostname.as_deref().unwrap_or("localhost");
    let hosts = format!("127.0.0.1\tlocalhost\n{}\t{hostname}\n", net.addr);
    write_etc("hosts", &hosts);
    if !settings.dns.is_empty() {
        let resolv: String = settings.dns.iter().map(|ns| format!("nameserver {ns}\n")).collect();
        write_etc("resolv.conf", &resolv);
    }
}

/// Writes `/etc/NAME`; on a read-only root (no `mm.overlay`) that fails,
/// which is said once and is otherwise harmless.
fn write_etc(name: &str, contents: &str) {
    let _ = std::fs::create_dir_all("/etc");
    let path = format!("/etc/{name}");
    // A symlink (some images point resolv.conf at systemd-resolved's) would
    // be followed into a path we do not own; replace it with our file.
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
        let _ = std::fs::remove_file(&path);
    }
    if let Err(e) = std::fs::write(&path, contents) {
        eprintln!("mm-init: network: cannot write {path}: {e}");
    }
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; we own the descriptor it returns.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data (a name and a union of integers and
    // sockaddrs); all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *dst = src as libc::c_char;
    }
    req
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(addr).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes; the kernel reads
    // the generic one as the AF_INET one its family names.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

fn ioctl<T>(sock: &OwnedFd, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request used here reads (or fills) the one structure
    // `arg` points to, whose type matches the request.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, arg as *mut T) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn set_address(sock: &OwnedFd, name: &str, request: libc::c_ulong, addr: Ipv4Addr) -> io::Result<()> {
    let mut req = ifreq_for(name);
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    ioctl(sock, request, &mut req)
}

fn set_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = ifreq_for(name);
    ioctl(sock, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ioctl(sock, libc::SIOCSIFFLAGS, &mut req)
}

fn add_default_route(sock: &OwnedFd, gateway: Ipv4Addr) -> io::Result<()> {
    // SAFETY: rtentry is plain data (sockaddrs, integers and a null device
    // pointer, meaning "pick by gateway"); all-zero is valid.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr_in(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    ioctl(sock, libc::SIOCADDRT, &mut route)
}
