//! Test-only: a network namespace of the test's own, with TAP devices in
//! it and packet sockets on them, so net tests see real frames without
//! sending a single packet outside a namespace they created.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A network namespace, deleted on drop.
pub struct TestNetns {
    name: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> io::Result<()> {
    let status = Command::new("ip").args(args).status()?;
    if status.success() { Ok(()) } else { Err(io::Error::other(format!("ip {args:?}: {status}"))) }
}

impl TestNetns {
    /// Creates `mmdev-<pid>-<tag>-<n>`; `None` (test skipped) when not root
    /// (see [`root_available`]).
    pub fn new(tag: &str) -> Option<Self> {
        if !root_available(tag) {
            return None;
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("mmdev-{}-{tag}-{n}", std::process::id());
        ip(&["netns", "add", &name]).expect("ip netns add");
        // No IPv6: its autoconfiguration chatter would land in our rx queue.
        let _ = Command::new("ip")
            .args(["netns", "exec", &name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "exec", &name, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])
            .status();
        Some(TestNetns { name })
    }

    /// Runs `ip -n <namespace> <args>`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all).expect("ip -n");
    }

    /// Creates TAP `ifname` in the namespace (with or without IFF_VNET_HDR),
    /// sets it up, and returns its fd and a packet socket bound to it: what
    /// the packet socket sends comes out of the TAP fd, and what is written
    /// to the TAP fd the packet socket receives.
    pub fn create_tap(&self, ifname: &str, vnet_hdr: bool) -> (OwnedFd, OwnedFd) {
        let ns_path = format!("/var/run/netns/{}", self.name);
        let ifname = ifname.to_string();
        // setns changes only the calling thread's namespace, so do it in a
        // throwaway thread; the fds keep pointing into the namespace.
        std::thread::spawn(move || -> io::Result<(OwnedFd, OwnedFd)> {
            let ns = std::fs::File::open(&ns_path)?;
            // SAFETY: setns on an fd we just opened; affects this thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                return Err(io::Error::last_os_error());
            }
            let tap = open_tap(&ifname, vnet_hdr)?;
            // The child inherits this thread's namespace.
            ip(&["link", "set", "dev", &ifname, "up"])?;
            let sock = packet_socket(&ifname)?;
            Ok((tap, sock))
        })
        .join()
        .expect("tap thread")
        .expect("creating a test TAP")
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// True when running as root, which a network namespace and its TAPs
/// need. Without it: panics when `CI` is set (a CI run that skipped the TAP
/// tests would prove nothing), else says the test is skipped and returns
/// false. (The same rule as `mm_integration::root_available`, which this
/// crate cannot depend on.)
pub fn root_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: not running as root, and CI is set: tests that need root must run in CI");
    }
    eprintln!("SKIPPED {test}: creating a network namespace and TAPs needs root");
    false
}

fn open_tap(ifname: &str, vnet_hdr: bool) -> io::Result<OwnedFd> {
    let path = CString::new("/dev/net/tun").unwrap();
    // SAFETY: open with a valid NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all zeroes is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(ifname.bytes().take(libc::IFNAMSIZ - 1)) {
        *dst = src as libc::c_char;
    }
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads (and updates) one struct ifreq we own.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn packet_socket(ifname: &str) -> io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto as i32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = CString::new(ifname).unwrap();
    // SAFETY: valid NUL-terminated interface name.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain old data; all zeroes is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: bind reads one sockaddr_ll of the size we pass.
    let ret = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Sends one raw Ethernet frame on a packet socket.
pub fn send_frame(sock: &OwnedFd, frame: &[u8]) -> io::Result<()> {
    // SAFETY: send reads frame.len() bytes from frame.
    let n = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Waits up to `timeout` for a frame on a packet socket that `want`
/// accepts (others, such as stray link-layer chatter, are skipped).
pub fn recv_frame(sock: &OwnedFd, timeout: Duration, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 70000];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one pollfd we own.
        if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32 + 1) } <= 0 {
            continue;
        }
        // SAFETY: recv writes at most buf.len() bytes into buf.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n > 0 && want(&buf[..n as usize]) {
            return Some(buf[..n as usize].to_vec());
        }
    }
}

/// A listening socket with one connection already queued on it and its
/// path unlinked, as the broker hands a device process; and the connected
/// front-end end.
pub fn queued_listener() -> (std::os::unix::net::UnixListener, std::os::unix::net::UnixStream) {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("mmdev-{}-{n}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    (listener, stream)
}

/// Joins a serving thread, failing the test if it does not end in time.
pub fn join_within<T: Send + 'static>(handle: std::thread::JoinHandle<T>, timeout: Duration) -> T {
    let deadline = Instant::now() + timeout;
    while !handle.is_finished() {
        assert!(Instant::now() < deadline, "the back end did not return after the front end hung up");
        std::thread::sleep(Duration::from_millis(10));
    }
    handle.join().expect("serving thread panicked")
}
