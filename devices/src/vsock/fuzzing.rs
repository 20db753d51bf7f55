//! The fuzz entry point for the vsock back end's packet, credit and muxer
//! logic: a script of guest packets (any header: op, ports, cids, credit),
//! host clients and listeners doing what host programs do, and the guest
//! taking packets, all against a real [`Muxer`] on real unix sockets.
//! Shared by `devices/fuzz` (cargo-fuzz target `vsock_packets`) and a
//! deterministic `#[test]` so stable CI runs it too.
//!
//! The harness plays the guest, and checks what the guest could check:
//! every packet it gets is well formed, and data never exceeds the credit
//! the guest advertised for the connection (virtio 1.2, 5.10.6.3).
//!
//! Input: a sequence of operations, each one opcode byte and its
//! arguments (missing bytes read as zero), run until the input ends:
//!
//! | op % 10 | arguments | what happens |
//! |---|---|---|
//! | 0 | 44 header bytes, payload | a raw guest tx packet, parsed with [`Header::from_bytes`]; an RW payload is the next `len` bytes (a chain shorter than `len` is dropped, as the queue code does) |
//! | 1 | op, ports, flags, buf_alloc (4), fwd_cnt (4), len (2) | a well-addressed guest packet: ports picked from those seen so far, RW payload a pattern of `len` bytes; flags bit 7 reports the right fwd_cnt, bits 5/6 break the cid/type |
//! | 2 | port index | a host client connects and sends `CONNECT <port>\n` |
//! | 3 | len, bytes | a host client connects and sends raw bytes |
//! | 4 | stream, len (2) | a host socket writes `len` bytes |
//! | 5 | stream, len (2) | a host socket reads up to `len` bytes |
//! | 6 | stream, how | a host socket shuts down writing, or closes |
//! | 7 | — | the device handles socket events and host listeners accept, twice |
//! | 8 | count, max (2) | the guest takes up to `count` packets, `max` payload bytes each |
//! | 9 | — | the driver resets the device |

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;

use super::conn::ConnKey;
use super::hostside::connect_nonblocking;
use super::muxer::Muxer;
use super::packet::{HDR_LEN, HOST_CID, Header, MAX_PAYLOAD, Op, TYPE_STREAM};

/// The guest's CID.
pub const GUEST_CID: u64 = 3;
/// Host ports with a listener at `<uds>_<port>`; guest REQUESTs to others
/// are refused.
const HOST_PORTS: [u32; 2] = [52, 1024];
/// Guest ports offered to compact packets besides those seen on the wire.
const GUEST_PORTS: [u32; 2] = [1000, 52];

/// One directory per fuzzing process for the sockets; inputs reuse it (the
/// muxer replaces a stale socket, and listeners remove theirs).
fn socket_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mm-vsock-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        dir
    })
}

/// Reads arguments off the input; past its end every byte is zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        first
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// Exactly `n` bytes, or `None` (consuming the rest) if fewer remain.
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if n > self.0.len() {
            self.0 = &[];
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
}

/// What the guest told the device about one connection, and what it got.
#[derive(Default)]
struct GuestView {
    /// RW payload bytes the guest received on this connection.
    received: Wrapping<u32>,
    /// The credit in the guest's last packet for it.
    buf_alloc: u32,
    fwd_cnt: u32,
}

struct Listener {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

struct Harness {
    muxer: Muxer,
    listeners: Vec<Listener>,
    /// Host ends: clients of the device's socket, and connections the
    /// device made to our listeners.
    streams: Vec<UnixStream>,
    /// Ports worth addressing: fixed ones, then every port seen in a packet
    /// from the device (host-side ports of host-initiated connections).
    ports: Vec<u32>,
    views: HashMap<ConnKey, GuestView>,
    buf: Vec<u8>,
}

impl Harness {
    fn new() -> Option<Self> {
        let dir = socket_dir();
        let uds = dir.join("v.sock");
        let muxer = Muxer::new(GUEST_CID, uds).ok()?;
        let mut listeners = Vec::new();
        for port in HOST_PORTS {
            let path = dir.join(format!("v.sock_{port}"));
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).ok()?;
            listener.set_nonblocking(true).ok()?;
            listeners.push(Listener { listener, path });
        }
        let ports = HOST_PORTS.iter().chain(&GUEST_PORTS).copied().collect();
        Some(Harness { muxer, listeners, streams: Vec::new(), ports, views: HashMap::new(), buf: Vec::new() })
    }

    fn port(&self, index: u8) -> u32 {
        self.ports[usize::from(index) % self.ports.len()]
    }

    fn stream(&mut self, index: u8) -> Option<&mut UnixStream> {
        let n = self.streams.len();
        (n > 0).then(|| &mut self.streams[usize::from(index) % n])
    }

    /// Hands the device one guest packet, remembering the credit it carries
    /// for the connection it would reach.
    fn guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid == GUEST_CID && hdr.dst_cid == HOST_CID && hdr.type_ == TYPE_STREAM {
            let key = ConnKey { local_port: hdr.dst_port, peer_port: hdr.src_port };
            let view = self.views.entry(key).or_default();
            if hdr.op() == Some(Op::Request) {
                // A new connection (or the reset of the old one, which
                // sends nothing more): nothing received on it yet.
                view.received = Wrapping(0);
            }
            view.buf_alloc = hdr.buf_alloc;
            view.fwd_cnt = hdr.fwd_cnt;
        }
        self.muxer.on_guest_packet(hdr, payload);
    }

    fn raw_packet(&mut self, input: &mut Input) {
        let mut raw = [0u8; HDR_LEN];
        for b in &mut raw {
            *b = input.u8();
        }
        let hdr = Header::from_bytes(&raw);
        let mut payload = Vec::new();
        if hdr.op() == Some(Op::Rw) {
            let len = hdr.len as usize;
            if len > MAX_PAYLOAD {
                return; // the queue code drops such a chain
            }
            let Some(bytes) = input.take(len) else { return };
            payload.extend_from_slice(bytes);
        }
        self.guest_packet(&hdr, &payload);
    }

    fn compact_packet(&mut self, input: &mut Input) {
        let op = input.u8();
        let ports = input.u8();
        let flags = input.u8();
        let buf_alloc = input.u32();
        let raw_fwd_cnt = input.u32();
        // Up to one byte past the largest payload the queue code accepts.
        let len = usize::from(input.u16()) + if flags & 1 != 0 { 1 << 16 } else { 0 };
        let op = if flags & 2 != 0 { u16::from(op) } else { u16::from(op % 7 + 1) };
        let src_port = self.port(ports >> 4);
        let dst_port = self.port(ports & 15);
        let key = ConnKey { local_port: dst_port, peer_port: src_port };
        let fwd_cnt = match self.views.get(&key) {
            Some(view) if flags & 0x80 != 0 => view.received.0,
            _ => raw_fwd_cnt,
        };
        let hdr = Header {
            src_cid: GUEST_CID,
            dst_cid: if flags & 0x20 != 0 { 1 } else { HOST_CID },
            src_port,
            dst_port,
            len: len as u32,
            type_: if flags & 0x40 != 0 { 2 } else { TYPE_STREAM },
            op,
            flags: u32::from(flags >> 2 & 3),
            buf_alloc,
            fwd_cnt,
        };
        if hdr.op() == Some(Op::Rw) {
            if len > MAX_PAYLOAD {
                return;
            }
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            self.guest_packet(&hdr, &payload);
        } else {
            self.guest_packet(&hdr, &[]);
        }
    }

    fn connect_client(&mut self, line: &[u8]) {
        let Ok(mut stream) = connect_nonblocking(&socket_dir().join("v.sock")) else { return };
        let _ = stream.write(line);
        self.streams.push(stream);
    }

    /// Two rounds, so a client accepted in the first has its CONNECT line
    /// read in the second.
    fn pump(&mut self) {
        for _ in 0..2 {
            for l in &self.listeners {
                while let Ok((stream, _)) = l.listener.accept() {
                    if stream.set_nonblocking(true).is_ok() {
                        self.streams.push(stream);
                    }
                }
            }
            self.muxer.process_events();
        }
    }

    /// The guest takes packets from its rx queue, checking each.
    fn guest_rx(&mut self, count: u8, max_payload: usize) {
        for _ in 0..count {
            let Some(h) = self.muxer.next_packet(&mut self.buf, max_payload) else { return };
            self.check_packet(&h, max_payload);
        }
    }

    fn check_packet(&mut self, h: &Header, max_payload: usize) {
        assert_eq!((h.src_cid, h.dst_cid, h.type_), (HOST_CID, GUEST_CID, TYPE_STREAM), "misaddressed {h:?}");
        let op = h.op().unwrap_or_else(|| panic!("unknown op in {h:?}"));
        if !self.ports.contains(&h.src_port) {
            self.ports.push(h.src_port);
        }
        let key = ConnKey { local_port: h.src_port, peer_port: h.dst_port };
        match op {
            Op::Rw => {
                let n = self.buf.len();
                assert!(n > 0 && n <= max_payload, "RW of {n} bytes, at most {max_payload} allowed");
                assert_eq!(h.len as usize, n, "RW length field");
                let view = self.views.entry(key).or_default();
                let in_flight = (view.received - Wrapping(view.fwd_cnt)).0;
                let credit = view.buf_alloc.saturating_sub(in_flight);
                assert!(
                    n as u32 <= credit,
                    "{n} bytes sent with {credit} credit (buf_alloc {}, fwd_cnt {}, received {})",
                    view.buf_alloc,
                    view.fwd_cnt,
                    view.received
                );
                view.received += Wrapping(n as u32);
            }
            Op::Request => {
                // A host client's new connection: the guest has said nothing
                // about it yet.
                self.views.insert(key, GuestView::default());
                assert!(self.buf.is_empty());
            }
            _ => assert!(self.buf.is_empty(), "{op:?} with a payload"),
        }
    }
}

/// Runs one fuzz input. Panics only if an invariant breaks.
pub fn fuzz_vsock(data: &[u8]) {
    let Some(mut h) = Harness::new() else { return };
    let mut input = Input(data);
    while !input.0.is_empty() {
        match input.u8() % 10 {
            0 => h.raw_packet(&mut input),
            1 => h.compact_packet(&mut input),
            2 => {
                let port = h.port(input.u8());
                h.connect_client(format!("CONNECT {port}\n").as_bytes());
            }
            3 => {
                let len = usize::from(input.u8() % 40);
                let line = input.take(len).unwrap_or_default().to_vec();
                h.connect_client(&line);
            }
            4 => {
                let (index, len) = (input.u8(), usize::from(input.u16()));
                if let Some(s) = h.stream(index) {
                    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
                    let _ = s.write(&data);
                }
            }
            5 => {
                let (index, len) = (input.u8(), usize::from(input.u16()));
                if let Some(s) = h.stream(index) {
                    let _ = s.read(&mut vec![0u8; len]);
                }
            }
            6 => {
                let (index, how) = (input.u8(), input.u8());
                if h.stream(index).is_some() {
                    let i = usize::from(index) % h.streams.len();
                    let _ = match how % 3 {
                        0 => {
                            h.streams.swap_remove(i);
                            Ok(())
                        }
                        1 => h.streams[i].shutdown(Shutdown::Write),
                        _ => h.streams[i].shutdown(Shutdown::Both),
                    };
                }
            }
            7 => h.pump(),
            8 => {
                let (count, max) = (input.u8(), usize::from(input.u16()));
                h.guest_rx(count, max);
            }
            _ => h.muxer.reset_all(),
        }
    }
    // Whatever is left for the guest must be well formed too.
    h.pump();
    h.guest_rx(255, MAX_PAYLOAD);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A script of plausible operations: mostly compact packets to known
    /// ports, host traffic, pumps and guest reads.
    fn script(rng: &mut fastrand::Rng) -> Vec<u8> {
        let mut v = Vec::new();
        for _ in 0..rng.u64(0..40) {
            let op = rng.u64(0..10) as u8;
            v.push(op);
            match op {
                0 => {
                    let mut h = Header {
                        src_cid: GUEST_CID,
                        dst_cid: HOST_CID,
                        src_port: 1000,
                        dst_port: HOST_PORTS[rng.u64(0..2) as usize],
                        type_: TYPE_STREAM,
                        op: rng.u64(0..8) as u16,
                        buf_alloc: rng.u64(..) as u32,
                        fwd_cnt: rng.u64(0..3) as u32,
                        ..Header::default()
                    };
                    h.len = if h.op == Op::Rw as u16 { rng.u64(0..64) as u32 } else { 0 };
                    v.extend(h.to_bytes());
                    v.extend((0..h.len).map(|i| i as u8));
                }
                1 => {
                    v.extend([rng.u64(0..7) as u8, rng.u64(..) as u8, rng.u64(..) as u8 | 0x80]);
                    v.extend((rng.u64(0..1 << 20) as u32).to_le_bytes());
                    v.extend((rng.u64(..) as u32).to_le_bytes());
                    v.extend((rng.u64(0..3000) as u16).to_le_bytes());
                }
                2 => v.push(rng.u64(0..8) as u8),
                3 => {
                    let line = b"CONNECT 52\nxyz";
                    v.push(line.len() as u8);
                    v.extend(line);
                }
                4 | 5 => {
                    v.push(rng.u64(..) as u8);
                    v.extend((rng.u64(0..5000) as u16).to_le_bytes());
                }
                6 => v.extend([rng.u64(..) as u8, rng.u64(..) as u8]),
                8 => {
                    v.push(rng.u64(0..8) as u8);
                    v.extend((rng.u64(0..4096) as u16).to_le_bytes());
                }
                _ => {}
            }
        }
        v
    }

    #[test]
    fn fuzz_entry_point_on_deterministic_inputs() {
        let mut rng = fastrand::Rng::with_seed(0x6d6d_7673_6f63_6b21);
        for i in 0..300 {
            let input =
                if i % 3 == 0 { (0..rng.u64(0..300)).map(|_| rng.u64(..) as u8).collect() } else { script(&mut rng) };
            fuzz_vsock(&input);
        }
    }

    /// A host client's connection, accepted by the guest, carrying data
    /// both ways within credit: the path the fuzzer should reach.
    #[test]
    fn scripted_session_reaches_data() {
        // Connect from the host to guest port 52 (index 0 of `ports`).
        let mut input = vec![2, 0, 7, 8, 4, 0x00, 0x10];
        // The host port is the 5th port now; the guest answers RESPONSE
        // from port 52 (index 0) to it (index 4), with credit.
        input.extend([1, 1, 0x04, 0x80]);
        input.extend(65536u32.to_le_bytes());
        input.extend([0, 0, 0, 0, 0, 0]);
        // The host writes, the device reads it, the guest takes it.
        input.extend([4, 0, 100, 0, 7, 8, 4, 0x00, 0x10]);
        fuzz_vsock(&input);
    }
}
