//! The host side of hybrid vsock: a client connects to the device's unix
//! socket and writes `CONNECT <port>\n`; once the guest accepts, it reads
//! `OK <host_port>\n` and the socket carries the stream.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest line we wait for: `CONNECT 4294967295\r\n` is 20 bytes.
const MAX_LINE: usize = 32;
/// How long a client has to send its line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadConnect {
    #[error("expected \"CONNECT <port>\", got {0:?}")]
    Syntax(String),
    #[error("the CONNECT line is longer than {MAX_LINE} bytes")]
    TooLong,
}

/// Parses one line (without its `\n`; a trailing `\r` is accepted) into
/// the guest port to connect to.
pub fn parse_connect(line: &[u8]) -> Result<u32, BadConnect> {
    let bad = || BadConnect::Syntax(String::from_utf8_lossy(line).into_owned());
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let port = line.strip_prefix(b"CONNECT ").ok_or_else(bad)?;
    if port.is_empty() || !port.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    std::str::from_utf8(port).ok().and_then(|p| p.parse().ok()).ok_or_else(bad)
}

/// The reply once the guest accepted: the host-side port of the stream.
pub fn ok_reply(host_port: u32) -> String {
    format!("OK {host_port}\n")
}

/// Connects to a host listener without ever blocking: a unix connect
/// completes at once or fails (EAGAIN when the listener's backlog is full),
/// so a listener that stopped accepting cannot stall the device.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain old data; all zeroes is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and nothing else owns it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: connect reads `len` bytes of the sockaddr_un we own, which is
    // at least that long.
    let ret = unsafe {
        libc::connect(stream.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len as libc::socklen_t)
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// A client that connected and has not finished its CONNECT line.
pub struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// The line is not complete yet.
    Pending,
    /// The client wants the guest's port.
    Connect(u32),
    /// Bad line, hang-up or error: drop the client.
    Failed,
}

impl Handshake {
    pub fn new(stream: UnixStream, now: Instant) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Handshake { stream, line: Vec::new(), deadline: now + HANDSHAKE_TIMEOUT })
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    pub fn expired(&self, now: Instant) -> bool {
        now >= self.deadline
    }

    /// Reads what the client sent so far. One byte at a time, so bytes
    /// after the line (data the client sends before our OK) stay in the
    /// socket for the guest.
    pub fn advance(&mut self) -> Progress {
        let mut byte = [0u8];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return Progress::Failed,
                Ok(_) if byte[0] == b'\n' => {
                    return match parse_connect(&self.line) {
                        Ok(port) => Progress::Connect(port),
                        Err(e) => {
                            tracing::debug!("vsock: host client: {e}");
                            Progress::Failed
                        }
                    };
                }
                Ok(_) => {
                    self.line.push(byte[0]);
                    if self.line.len() > MAX_LINE {
                        tracing::debug!("vsock: host client: {}", BadConnect::TooLong);
                        return Progress::Failed;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::Pending,
                Err(_) => return Progress::Failed,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Ok(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Ok(u32::MAX));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT 4294967296",
            b"CONNECT -1",
            b"CONNECT +1",
            b"CONNECT 52 ",
            b"CONNECT  52",
            b"connect 52",
            b"OK 52",
            b"CONNECT 5\x002",
        ] {
            assert!(parse_connect(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(ok_reply(1073741824), "OK 1073741824\n");
    }

    #[test]
    fn handshake_keeps_bytes_after_the_line() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let mut hs = Handshake::new(server, Instant::now()).unwrap();
        assert_eq!(hs.advance(), Progress::Pending);
        client.write_all(b"CONN").unwrap();
        assert_eq!(hs.advance(), Progress::Pending);
        client.write_all(b"ECT 1234\nhello").unwrap();
        assert_eq!(hs.advance(), Progress::Connect(1234));
        let mut rest = [0u8; 5];
        hs.into_stream().read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"hello");
    }

    #[test]
    fn nonblocking_connect() {
        let dir = crate::vsock::testutil::TempDir::new("connect");
        let path = dir.path("l");
        assert!(connect_nonblocking(&path).is_err(), "nobody listening");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut s = connect_nonblocking(&path).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        s.write_all(b"x").unwrap();
        let mut b = [0u8];
        server.read_exact(&mut b).unwrap();
        assert_eq!(s.read(&mut b).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        let long = dir.path(&"x".repeat(200));
        assert_eq!(connect_nonblocking(&long).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn handshake_failures() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let mut hs = Handshake::new(server, Instant::now()).unwrap();
        client.write_all(&[b'A'; 40]).unwrap();
        assert_eq!(hs.advance(), Progress::Failed);

        let (client, server) = UnixStream::pair().unwrap();
        let now = Instant::now();
        let mut hs = Handshake::new(server, now).unwrap();
        drop(client);
        assert_eq!(hs.advance(), Progress::Failed);
        assert!(!hs.expired(now));
        assert!(hs.expired(now + HANDSHAKE_TIMEOUT));

        let (mut client, server) = UnixStream::pair().unwrap();
        let mut hs = Handshake::new(server, Instant::now()).unwrap();
        client.write_all(b"CONNECT x\n").unwrap();
        assert_eq!(hs.advance(), Progress::Failed);
    }
}
