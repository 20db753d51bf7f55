//! The guest's network, from the kernel command line (`mm.ip`, `mm.gw`,
//! `mm.dns`, `mm.hostname`) at boot, and from a new identity after a
//! restore from a snapshot (agent/identity.rs): both go through [`apply`].
//!
//! mm-init configures it itself, with the classic `SIOCSIF*` and
//! `SIOCADDRT` ioctls, because an image need not ship `ip` or `ifconfig`
//! (the point is that any OCI image comes up reachable). The kernel's own
//! `ip=` autoconfiguration would do as much, but it runs before the
//! overlay root exists and cannot write `/etc/resolv.conf`.

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::settings::{Ipv4Net, Settings};

/// The one virtio-net interface mm-vmm gives a guest.
const INTERFACE: &str = "eth0";

/// What to set, at boot from the command line ([`configure`]) and after a
/// restore from a new identity (agent/identity.rs). Both go through
/// [`apply`], which sets what is given and leaves the rest as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetConfig {
    pub hostname: Option<String>,
    /// eth0's MAC: only a restored clone changes it (at boot the VMM's
    /// virtio-net device already has the right one).
    pub mac: Option<MacAddr>,
    pub address: Option<Ipv4Net>,
    pub gateway: Option<Ipv4Addr>,
    /// Name servers; empty leaves `/etc/resolv.conf` alone.
    pub dns: Vec<Ipv4Addr>,
}

/// An Ethernet address, `02:6d:0a:64:00:05`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("not six two-digit hexadecimal octets separated by colons")]
    Syntax,
    /// The kernel refuses these for an interface (`is_valid_ether_addr`);
    /// saying so here is clearer than its EADDRNOTAVAIL.
    #[error("a multicast or all-zero address cannot be an interface's")]
    NotUnicast,
}

impl std::str::FromStr for MacAddr {
    type Err = MacError;
    fn from_str(s: &str) -> Result<Self, MacError> {
        let mut mac = [0u8; 6];
        let mut octets = s.split(':');
        for byte in &mut mac {
            let octet = octets.next().ok_or(MacError::Syntax)?;
            if octet.len() != 2 || !octet.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(MacError::Syntax);
            }
            *byte = u8::from_str_radix(octet, 16).map_err(|_| MacError::Syntax)?;
        }
        if octets.next().is_some() {
            return Err(MacError::Syntax);
        }
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(MacError::NotUnicast);
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// One step of [`apply`] that failed: what it was and why.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct StepError {
    pub step: String,
    pub source: io::Error,
}

impl StepError {
    pub fn new(step: impl Into<String>, source: impl Into<io::Error>) -> Self {
        StepError { step: step.into(), source: source.into() }
    }
}

/// Sets the hostname, brings up `lo`, then (when the command line has an
/// address) eth0 with its address and default route, and writes
/// `/etc/resolv.conf` and `/etc/hosts`. Each failure is one line on the
/// console; the workload still runs.
pub fn configure(settings: &Settings) {
    let mut failed = Vec::new();
    match inet_socket() {
        Ok(sock) => {
            if let Err(e) = set_flags(&sock, "lo", true) {
                failed.push(StepError::new("lo up", e));
            }
        }
        Err(e) => failed.push(StepError::new("AF_INET socket", e)),
    }
    let hostname = settings.hostname.clone();
    let config = match settings.address {
        Some(address) => NetConfig {
            hostname,
            mac: None,
            address: Some(address),
            gateway: settings.gateway,
            dns: settings.dns.clone(),
        },
        None => NetConfig { hostname, ..NetConfig::default() },
    };
    failed.extend(apply(&config));
    for e in failed {
        eprintln!("mm-init: network: {e}");
    }
}

/// Applies `config`, in order: hostname; eth0 down, its MAC and address,
/// up again (a failure there skips the rest of eth0: a route or
/// `/etc/hosts` for an address that did not take would be wrong); the
/// default route (one that is already there is fine); `/etc/hosts` when the
/// hostname or address changed; `/etc/resolv.conf`. Returns what failed.
pub fn apply(config: &NetConfig) -> Vec<StepError> {
    let mut failed = Vec::new();
    if let Some(name) = &config.hostname
        && let Err(e) = nix::unistd::sethostname(name)
    {
        failed.push(StepError::new("hostname", e));
    }
    let touches_eth0 = config.mac.is_some() || config.address.is_some() || config.gateway.is_some();
    if !touches_eth0 && config.hostname.is_none() && config.dns.is_empty() {
        return failed;
    }
    let sock = match inet_socket() {
        Ok(sock) => sock,
        Err(e) => {
            failed.push(StepError::new("AF_INET socket", e));
            return failed;
        }
    };
    if let Err(e) = configure_eth0(&sock, config) {
        failed.push(e);
        return failed;
    }
    if config.hostname.is_some() || config.address.is_some() {
        let address = config.address.map(|net| net.addr).or_else(|| get_address(&sock, INTERFACE).ok());
        if let Some(address) = address {
            let hostname = config.hostname.clone().or_else(current_hostname);
            let result = write_etc("hosts", &hosts_file(address, hostname.as_deref().unwrap_or("localhost")));
            failed.extend(result.err());
        }
    }
    if !config.dns.is_empty() {
        failed.extend(write_etc("resolv.conf", &resolv_conf(&config.dns)).err());
    }
    failed
}

/// eth0's link, address and default route, stopping at the first failure.
fn configure_eth0(sock: &OwnedFd, config: &NetConfig) -> Result<(), StepError> {
    if config.mac.is_some() || config.address.is_some() {
        // Down first: the MAC cannot change while it is up, and going
        // down drops the neighbour cache and the routes of the old
        // address. (At boot it is down already.)
        set_flags(sock, INTERFACE, false).map_err(|e| StepError::new(format!("{INTERFACE} down"), e))?;
        if let Some(mac) = config.mac {
            set_mac(sock, INTERFACE, mac).map_err(|e| StepError::new(format!("{INTERFACE} MAC {mac}"), e))?;
        }
        if let Some(net) = config.address {
            // SIOCSIFADDR replaces the primary address (and drops its routes).
            set_address(sock, INTERFACE, libc::SIOCSIFADDR, net.addr)
                .and_then(|()| set_address(sock, INTERFACE, libc::SIOCSIFNETMASK, net.netmask()))
                .map_err(|e| StepError::new(format!("{INTERFACE} address {}/{}", net.addr, net.prefix), e))?;
        }
        announce_on_up(INTERFACE);
        set_flags(sock, INTERFACE, true).map_err(|e| StepError::new(format!("{INTERFACE} up"), e))?;
    }
    if let Some(gateway) = config.gateway {
        match add_default_route(sock, gateway) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                return Err(StepError::new(format!("default route via {gateway}"), e));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Asks the kernel to send a gratuitous ARP when the interface comes up
/// (`arp_notify`), so the bridge and the gateway learn a restored clone's
/// MAC for its address at once instead of after their caches expire, and a
/// reused address never points at its previous owner. Best effort: without
/// it, neighbours only learn a little later.
fn announce_on_up(name: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{name}/arp_notify"), "1");
}

/// `/etc/hosts`: localhost, and our name on our address.
pub fn hosts_file(address: Ipv4Addr, hostname: &str) -> String {
    format!("127.0.0.1\tlocalhost\n{address}\t{hostname}\n")
}

/// `/etc/resolv.conf` for `dns`.
pub fn resolv_conf(dns: &[Ipv4Addr]) -> String {
    dns.iter().map(|ns| format!("nameserver {ns}\n")).collect()
}

/// The kernel's hostname, unless it is unset (`(none)`, Linux's default).
fn current_hostname() -> Option<String> {
    let name = nix::unistd::gethostname().ok()?.into_string().ok()?;
    (!name.is_empty() && name != "(none)").then_some(name)
}

/// Writes `/etc/NAME`; on a read-only root (no `mm.overlay`) that fails,
/// which is reported and otherwise harmless.
fn write_etc(name: &str, contents: &str) -> Result<(), StepError> {
    let _ = std::fs::create_dir_all("/etc");
    let path = format!("/etc/{name}");
    // A symlink (some images point resolv.conf at systemd-resolved's) would
    // be followed into a path we do not own; replace it with our file.
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
        let _ = std::fs::remove_file(&path);
    }
    std::fs::write(&path, contents).map_err(|e| StepError::new(path, e))
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

/// Brings the interface up (`IFF_UP | IFF_RUNNING`) or down.
fn set_flags(sock: &OwnedFd, name: &str, up: bool) -> io::Result<()> {
    let mut req = ifreq_for(name);
    ioctl(sock, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let bits = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    req.ifr_ifru.ifru_flags = if up { flags | bits } else { flags & !bits };
    ioctl(sock, libc::SIOCSIFFLAGS, &mut req)
}

/// The interface's primary IPv4 address.
fn get_address(sock: &OwnedFd, name: &str) -> io::Result<Ipv4Addr> {
    let mut req = ifreq_for(name);
    ioctl(sock, libc::SIOCGIFADDR, &mut req)?;
    // SAFETY: SIOCGIFADDR filled the address member of the union with an
    // AF_INET sockaddr, which has the layout of sockaddr_in.
    let inet = unsafe { std::mem::transmute::<libc::sockaddr, libc::sockaddr_in>(req.ifr_ifru.ifru_addr) };
    Ok(Ipv4Addr::from(u32::from_be(inet.sin_addr.s_addr)))
}

/// Sets the interface's Ethernet address (it must be down).
fn set_mac(sock: &OwnedFd, name: &str, mac: MacAddr) -> io::Result<()> {
    let mut req = ifreq_for(name);
    // SAFETY: sockaddr is plain data; all-zero is a valid value.
    let mut hwaddr: libc::sockaddr = unsafe { std::mem::zeroed() };
    hwaddr.sa_family = libc::ARPHRD_ETHER;
    for (dst, src) in hwaddr.sa_data.iter_mut().zip(mac.0) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = hwaddr;
    ioctl(sock, libc::SIOCSIFHWADDR, &mut req)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_parse_and_print() {
        let mac: MacAddr = "02:6D:0a:64:00:05".parse().unwrap();
        assert_eq!(mac, MacAddr([0x02, 0x6d, 0x0a, 0x64, 0x00, 0x05]));
        assert_eq!(mac.to_string(), "02:6d:0a:64:00:05");
        assert_eq!(mac.to_string().parse::<MacAddr>(), Ok(mac));
        for bad in ["", "02:6d:0a:64:00:", ":02:6d:0a:64:00:05", "02:6d:0a:64:00:005", "02:6d:0a:64:00:05:"] {
            assert_eq!(bad.parse::<MacAddr>(), Err(MacError::Syntax), "{bad:?}");
        }
        // Locally administered unicast is what the broker hands out; any
        // other unicast is fine too.
        assert!("52:54:00:12:34:56".parse::<MacAddr>().is_ok());
        assert_eq!("ff:ff:ff:ff:ff:ff".parse::<MacAddr>(), Err(MacError::NotUnicast));
        assert_eq!("03:00:00:00:00:01".parse::<MacAddr>(), Err(MacError::NotUnicast));
    }

    #[test]
    fn etc_files() {
        assert_eq!(hosts_file(Ipv4Addr::new(10, 100, 0, 5), "clone-1"), "127.0.0.1\tlocalhost\n10.100.0.5\tclone-1\n");
        assert_eq!(
            resolv_conf(&[Ipv4Addr::new(10, 100, 0, 1), Ipv4Addr::new(9, 9, 9, 9)]),
            "nameserver 10.100.0.1\nnameserver 9.9.9.9\n"
        );
    }

    #[test]
    fn nothing_to_do_does_nothing() {
        assert!(apply(&NetConfig::default()).is_empty());
    }
}
