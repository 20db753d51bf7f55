//! Small tools built into mm-init, run when it is not PID 1 (`/init TOOL
//! ARGS`), so tests and benchmarks have vsock endpoints, a disk benchmark,
//! a TCP load generator and a TCP connect timer inside any guest without
//! shipping another binary (busybox has no fio or iperf, and no sub-second
//! clock). Single-threaded: one loop each.
//!
//! `blk-bench` also runs on the host (mm-bench runs this same binary on the
//! image file), so the host figure comes from the very same code.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

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
        [tool, path, secs] if tool == "blk-bench" => match secs.parse() {
            Ok(secs) => blk_bench(path, Duration::from_secs(secs)),
            Err(_) => Err("bad seconds".to_string()),
        },
        [tool, addr, secs] if tool == "tcp-bench" => match secs.parse() {
            Ok(secs) => tcp_bench(addr, Duration::from_secs(secs)),
            Err(_) => Err("bad seconds".to_string()),
        },
        [tool, addr, count] if tool == "tcp-connect" => match count.parse() {
            Ok(count) => tcp_connect_times(addr, count),
            Err(_) => Err("bad count".to_string()),
        },
        _ => Err("usage: vsock-echo PORT | vsock-send PORT BYTES | blk-bench DEVICE SECONDS | \
                  tcp-bench HOST:PORT SECONDS | tcp-connect HOST:PORT COUNT"
            .to_string()),
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

/// What `blk-bench` and `tcp-bench` print, one line per phase, for
/// mm-bench to parse off the console: `mmbench: PHASE key=value ...`.
const RESULT_PREFIX: &str = "mmbench:";

/// Sequential transfers: 1 MiB, large enough that per-request costs
/// (exits, interrupts) do not dominate, small enough to stay in one
/// virtio-blk request after the guest splits it by the device's limits.
const SEQ_BLOCK: usize = 1 << 20;
/// Random reads: the usual 4 KiB IOPS figure.
const RAND_BLOCK: usize = 4096;
/// O_DIRECT wants buffers aligned to the logical block size; a page is
/// enough for every device we meet.
const ALIGN: usize = 4096;

/// A zeroed buffer of `len` bytes at an `ALIGN`-aligned address, carved out
/// of a larger Vec (no unsafe allocation needed).
struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN);
        Aligned { storage, start, len }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// xorshift64*: the random-read offsets, the same sequence on every run and
/// on every system, so the host and both VMMs read the same blocks.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn report(phase: &str, bytes: u64, ops: u64, elapsed: Duration) {
    println!("{RESULT_PREFIX} {phase} bytes={bytes} ops={ops} ns={}", elapsed.as_nanos());
    let _ = std::io::stdout().flush();
}

/// Disk benchmark on PATH (a block device, or an image file on the host),
/// each phase capped at `limit`, all with O_DIRECT so that the page cache
/// of whoever runs it does not measure itself:
///
/// 1. `seq_read`: 1 MiB reads through the first half;
/// 2. `rand_read`: 4 KiB reads at random 4 KiB-aligned offsets in the
///    second half, which phase 1 did not touch (so a host page cache behind
///    a VMM's buffered back end is as cold there as at the start);
/// 3. `seq_write`: 1 MiB writes through the first half, then `fdatasync`,
///    timed together: the figure is for data that reached the host's disk.
fn blk_bench(path: &str, limit: Duration) -> Result<(), String> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("open {path} with O_DIRECT: {e}"))?;
    let size = file.seek(SeekFrom::End(0)).map_err(|e| format!("size of {path}: {e}"))?;
    let half = size / 2 / SEQ_BLOCK as u64 * SEQ_BLOCK as u64;
    if half == 0 {
        return Err(format!("{path} is too small ({size} bytes)"));
    }
    println!("{RESULT_PREFIX} start size={size}");
    let mut big = Aligned::new(SEQ_BLOCK);

    let start = Instant::now();
    let mut offset = 0;
    while offset < half && start.elapsed() < limit {
        file.read_exact_at(big.bytes(), offset).map_err(|e| format!("read at {offset}: {e}"))?;
        offset += SEQ_BLOCK as u64;
    }
    report("seq_read", offset, offset / SEQ_BLOCK as u64, start.elapsed());

    let mut small = Aligned::new(RAND_BLOCK);
    let blocks = (size - half) / RAND_BLOCK as u64;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < limit {
        let offset = half + rng.next() % blocks * RAND_BLOCK as u64;
        file.read_exact_at(small.bytes(), offset).map_err(|e| format!("read at {offset}: {e}"))?;
        ops += 1;
    }
    report("rand_read", ops * RAND_BLOCK as u64, ops, start.elapsed());

    for (i, b) in big.bytes().iter_mut().enumerate() {
        *b = pattern(i as u64);
    }
    let start = Instant::now();
    let mut offset = 0;
    while offset < half && start.elapsed() < limit {
        file.write_all_at(big.bytes(), offset).map_err(|e| format!("write at {offset}: {e}"))?;
        offset += SEQ_BLOCK as u64;
    }
    file.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
    report("seq_write", offset, offset / SEQ_BLOCK as u64, start.elapsed());
    println!("{RESULT_PREFIX} done");
    Ok(())
}

/// Connects to the benchmark's host side, retrying while the link comes
/// up, and says which direction this connection is for.
fn tcp_connect(addr: &str, direction: u8) -> Result<TcpStream, String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match TcpStream::connect(addr) {
            Ok(mut stream) => {
                stream.write_all(&[direction]).map_err(|e| format!("write: {e}"))?;
                return Ok(stream);
            }
            Err(e) if Instant::now() > deadline => return Err(format!("connect {addr}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// TCP throughput against mm-bench's host side at ADDR, one connection
/// per direction. `U` (upload): send for `limit`, half-close, wait for the
/// host to close. `D` (download): receive until the host's EOF, then send
/// back the byte count (8 bytes, little-endian), which stops the host's
/// clock. The host's figures are the ones reported; the guest prints its
/// own view too.
fn tcp_bench(addr: &str, limit: Duration) -> Result<(), String> {
    let mut up = tcp_connect(addr, b'U')?;
    println!("{RESULT_PREFIX} start");
    let chunk: Vec<u8> = (0..CHUNK as u64).map(pattern).collect();
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < limit {
        up.write_all(&chunk).map_err(|e| format!("send: {e}"))?;
        sent += CHUNK as u64;
    }
    up.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
    let mut rest = Vec::new();
    up.read_to_end(&mut rest).map_err(|e| format!("waiting for the host: {e}"))?;
    report("guest_to_host", sent, sent / CHUNK as u64, start.elapsed());

    let mut down = tcp_connect(addr, b'D')?;
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    let mut received = 0u64;
    loop {
        let n = down.read(&mut buf).map_err(|e| format!("receive: {e}"))?;
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    down.write_all(&received.to_le_bytes()).map_err(|e| format!("send the count: {e}"))?;
    report("host_to_guest", received, 0, start.elapsed());
    println!("{RESULT_PREFIX} done");
    Ok(())
}

/// TCP connect latency to ADDR: COUNT connects one after another, each
/// timed from `connect` called to `connect` returned (the handshake, and
/// nothing of a process start: busybox has no sub-second clock, and
/// starting a process in a guest costs far more than a connect), then
/// closed at once. One `mmbench: connect ns=N` line each.
fn tcp_connect_times(addr: &str, count: u32) -> Result<(), String> {
    let addr: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    for _ in 0..count {
        let start = Instant::now();
        let stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(30)).map_err(|e| format!("connect {addr}: {e}"))?;
        let elapsed = start.elapsed();
        drop(stream);
        println!("{RESULT_PREFIX} connect ns={}", elapsed.as_nanos());
    }
    let _ = std::io::stdout().flush();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned() {
        for len in [4096, 1 << 20] {
            let mut buf = Aligned::new(len);
            assert_eq!(buf.bytes().as_ptr() as usize % ALIGN, 0);
            assert_eq!(buf.bytes().len(), len);
        }
    }

    #[test]
    fn random_offsets_spread() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            seen.insert(rng.next() % 65536);
        }
        assert!(seen.len() > 980, "{}", seen.len());
    }

    #[test]
    fn blk_bench_runs_on_a_file() {
        // O_DIRECT needs a filesystem that supports it (not tmpfs).
        let dir = std::env::var("CARGO_TARGET_TMPDIR").unwrap_or_else(|_| "/var/tmp".into());
        let path = format!("{dir}/mm-init-blk-bench-{}", std::process::id());
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(8 << 20).unwrap();
        drop(file);
        let result = blk_bench(&path, Duration::from_millis(200));
        let _ = std::fs::remove_file(&path);
        if let Err(e) = &result
            && e.contains("O_DIRECT")
        {
            eprintln!("SKIPPED: {e}");
            return;
        }
        result.unwrap();
    }

    #[test]
    fn tcp_connect_times_connects() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tcp_connect_times(&addr, 3).unwrap();
        assert!(tcp_connect_times("not an address", 1).is_err());
    }

    #[test]
    fn pattern_is_not_short_periodic() {
        for period in [1u64, 2, 4, 256, 4096, 65536] {
            assert!((0..1000).any(|i| pattern(i) != pattern(i + period)), "period {period}");
        }
    }
}
