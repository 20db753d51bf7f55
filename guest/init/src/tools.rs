//! Small tools built into mm-init, run when it is not PID 1 (`/init TOOL
//! ARGS`), so tests and benchmarks have vsock endpoints inside any guest
//! without shipping another binary. Single-threaded: one poll loop each.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, VsockAddr, accept, bind, connect, listen, socket};

/// The host's CID, as seen from a guest.
const HOST_CID: u32 = 2;
const CHUNK: usize = 64 * 1024;

/// Byte `i` of the test pattern: not periodic at any small power of two,
/// so a dropped or duplicated chunk shows.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 11) as u8 ^ (i / 4093) as u8
}

fn vsock() -> nix::Result<OwnedFd> {
    socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
}

/// Runs a tool; returns its exit status.
pub fn run(args: &[String]) -> i32 {
    let result = match args {
        [tool, port] if tool == "vsock-echo" => port.parse().map_err(|_| "bad port".to_string()).and_then(echo),
        [tool, port, bytes] if tool == "vsock-send" => match (port.parse(), bytes.parse()) {
            (Ok(port), Ok(bytes)) => send(port, bytes),
            _ => Err("bad port or byte count".to_string()),
        },
        _ => Err("usage: vsock-echo PORT | vsock-send PORT BYTES".to_string()),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mm-init {}: {e}", args.first().map(String::as_str).unwrap_or(""));
            1
        }
    }
}

/// Accepts one connection on vsock PORT and echoes it until EOF.
fn echo(port: u32) -> Result<(), String> {
    let listener = vsock().map_err(|e| format!("socket: {e}"))?;
    bind(listener.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port)).map_err(|e| format!("bind: {e}"))?;
    listen(&listener, Backlog::new(1).expect("1 is a valid backlog")).map_err(|e| format!("listen: {e}"))?;
    println!("vsock-echo listening on {port}");
    let raw = accept(listener.as_raw_fd()).map_err(|e| format!("accept: {e}"))?;
    // SAFETY: accept returned a new descriptor that nothing else owns.
    let conn = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = nix::unistd::read(&conn, &mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        let mut sent = 0;
        while sent < n {
            sent += nix::unistd::write(&conn, &buf[sent..n]).map_err(|e| format!("write: {e}"))?;
        }
        total += n as u64;
    }
    println!("vsock-echo done {total}");
    Ok(())
}

/// Connects to the host on vsock PORT, sends BYTES of the pattern and
/// checks that the same bytes come back.
fn send(port: u32, bytes: u64) -> Result<(), String> {
    let sock = vsock().map_err(|e| format!("socket: {e}"))?;
    connect(sock.as_raw_fd(), &VsockAddr::new(HOST_CID, port)).map_err(|e| format!("connect: {e}"))?;
    let mut out = vec![0u8; CHUNK];
    let mut inbuf = vec![0u8; CHUNK];
    let (mut sent, mut received) = (0u64, 0u64);
    while received < bytes {
        let mut flags = PollFlags::POLLIN;
        if sent < bytes {
            flags |= PollFlags::POLLOUT;
        }
        let mut fds = [PollFd::new(sock.as_fd(), flags)];
        poll(&mut fds, PollTimeout::from(30_000u16)).map_err(|e| format!("poll: {e}"))?;
        let ready = fds[0].revents().unwrap_or(PollFlags::empty());
        if ready.is_empty() {
            return Err(format!("stalled after sending {sent} and receiving {received} bytes"));
        }
        if ready.contains(PollFlags::POLLOUT) && sent < bytes {
            let n = (bytes - sent).min(CHUNK as u64) as usize;
            for (i, b) in out[..n].iter_mut().enumerate() {
                *b = pattern(sent + i as u64);
            }
            sent += nix::unistd::write(&sock, &out[..n]).map_err(|e| format!("write: {e}"))? as u64;
        }
        if ready.intersects(PollFlags::POLLIN | PollFlags::POLLHUP) {
            let n = nix::unistd::read(&sock, &mut inbuf).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!("host closed after {received} of {bytes} bytes"));
            }
            for (i, b) in inbuf[..n].iter().enumerate() {
                if *b != pattern(received + i as u64) {
                    return Err(format!("byte {} differs", received + i as u64));
                }
            }
            received += n as u64;
        }
    }
    println!("vsock-send ok {bytes}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_not_short_periodic() {
        for period in [1u64, 2, 4, 256, 4096, 65536] {
            assert!((0..1000).any(|i| pattern(i) != pattern(i + period)), "period {period}");
        }
    }
}
