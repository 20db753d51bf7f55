//! Fuzz entry points for mm-vmm (vmm/fuzz, cargo-fuzz), shared with
//! deterministic `#[test]`s so stable CI runs them too:
//!
//! * [`fuzz_mmio`] (target `mmio_transport`): guest register reads and
//!   writes, in any order, width and offset, on a virtio-mmio transport
//!   ([`MmioDevice`]) whose vhost-user back end is [`FakeBackend`], plus the
//!   host's own calls (reconnect, quiesce/resume, snapshot and restore).
//! * [`fuzz_vhost_user`] (target `vhost_user_frontend`): the byte stream a
//!   hostile back end sends (and the files it attaches) drives
//!   [`VhostUserDevice`] through its whole set-up: features, protocol
//!   features, config, in-flight table, rings, quiesce, resume, reset,
//!   reconnect and restore.
//!
//! Why here and not in the targets: the transport has no trait seam to its
//! back end, so the fake is a real vhost-user peer on a socketpair, and it
//! needs the crate's types; this module is all the `fuzzing` feature
//! exposes.
//!
//! [`FakeBackend`] answers like a well-behaved back end and checks what
//! mm-vmm sends it (see [`Session`]); the mmio harness also checks that
//! no ring runs unless the transport holds an activation, so a guest
//! reset always stops the device.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::snapshot::Persist;
use crate::virtio::mmio::{MmioDevice, TransportParts, TransportState};
use crate::virtio::vhost_user::{Activation, QueueEvents, QueueSetup, VhostUserDevice};
use crate::virtio::{DeviceKind, MAX_QUEUE_SIZE, VIRTIO_F_VERSION_1};

/// vhost-user request codes (vhost-user spec, "Front-end message types").
mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
}

const HDR_LEN: usize = 12;
const FLAG_VERSION_1: u32 = 1;
const FLAG_REPLY: u32 = 4;
const FLAG_NEED_REPLY: u32 = 8;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const PROTOCOL_FEATURES: u64 = 1 << 30;
/// Protocol feature bits (vhost-user spec).
pub const PROTO_MQ: u64 = 1 << 0;
pub const PROTO_REPLY_ACK: u64 = 1 << 3;
pub const PROTO_CONFIG: u64 = 1 << 9;
pub const PROTO_INFLIGHT_SHMFD: u64 = 1 << 12;
pub const PROTO_LOG_SHMFD: u64 = 1 << 1;
/// `VHOST_F_LOG_ALL`.
pub const LOG_ALL: u64 = 1 << 26;

/// Guest RAM for the devices: 64 KiB at guest address 0, in a memfd as
/// mm-vmm's RAM is. Made once per process.
pub(crate) fn guest_ram() -> &'static (GuestMemoryMmap, File) {
    static RAM: OnceLock<(GuestMemoryMmap, File)> = OnceLock::new();
    RAM.get_or_init(|| {
        let memfd = memfd(0x1_0000).expect("memfd for guest RAM");
        let region = (GuestAddress(0), 0x1_0000, Some(FileOffset::new(memfd.try_clone().expect("dup"), 0)));
        let mem = GuestMemoryMmap::from_ranges_with_files([region]).expect("map guest RAM");
        (mem, memfd)
    })
}

fn memfd(size: u64) -> Option<File> {
    let file = crate::memory::new_memfd(c"mm-vmm-fuzz").ok()?;
    file.set_len(size).ok()?;
    Some(file)
}

/// Open descriptors of this process, to catch leaks of files a back end
/// sends. Only counted in the fuzz targets: unit tests run in parallel
/// threads of one process, so the count moves under them.
fn open_fds() -> usize {
    if cfg!(test) {
        return 0;
    }
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// Bytes waiting to be read on a socket.
fn unread(fd: RawFd) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points
    // at a live local.
    let ret = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if ret < 0 { 0 } else { n }
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
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
}

/// What a [`FakeBackend`] offers, and which acks it fails.
#[derive(Debug, Clone, Default)]
pub struct Offer {
    /// Virtio features, with [`PROTOCOL_FEATURES`] if it speaks them.
    pub features: u64,
    pub protocol: u64,
    pub config: Vec<u8>,
    /// Bit n: acks for request code n report failure.
    pub nack: u64,
}

impl Offer {
    /// A back end offering everything mm-vmm asks for, and `config`.
    pub fn full(kind: DeviceKind) -> Offer {
        Offer {
            features: 1 << 32 | 1 << 28 | 1 << 29 | PROTOCOL_FEATURES | 0xff,
            protocol: PROTO_MQ | PROTO_REPLY_ACK | PROTO_CONFIG | PROTO_INFLIGHT_SHMFD,
            config: (0..kind.config_size()).map(|i| (i * 7 + 1) as u8).collect(),
            nack: 0,
        }
    }

    /// [`Offer::full`], and a back end that logs its writes to guest RAM.
    pub fn logging(kind: DeviceKind) -> Offer {
        let full = Offer::full(kind);
        Offer { features: full.features | LOG_ALL, protocol: full.protocol | PROTO_LOG_SHMFD, ..full }
    }
}

/// One piece of a recorded back-end byte stream: bytes sent in one
/// `sendmsg`, with a file attached or not.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub bytes: Vec<u8>,
    pub file: bool,
}

/// What the fake back end saw of its session: ring states, and what was
/// negotiated. It asserts, per message, that mm-vmm keeps to the protocol:
/// SET_OWNER first, only offered features and protocol features acked,
/// requests that need a protocol feature only once it is negotiated, ring
/// indices and sizes in range, rings given addresses only after a memory
/// table, and no ring reconfigured (size, addresses, base) while started.
#[derive(Debug, Default)]
pub struct Session {
    /// Per ring: started (kick fd received) and not stopped since
    /// (GET_VRING_BASE).
    pub started: Vec<bool>,
    bases: Vec<u32>,
    owner: bool,
    pub acked_features: u64,
    acked_protocol: u64,
    mem_table: bool,
    pub messages: usize,
    /// SET_LOG_BASE's `mmap_size`, once one came (after a memory table).
    pub log_size: Option<u64>,
    /// How many SET_LOG_BASE came.
    pub log_bases: usize,
    /// A log came since the last memory table (a new table drops it).
    log_current: bool,
}

/// A vhost-user back end on a thread, answering one front-end session.
pub struct FakeBackend {
    session: Arc<Mutex<Session>>,
    /// A second descriptor of the fake's socket end, to see whether it
    /// has read everything the front end sent.
    probe: UnixStream,
    thread: Option<JoinHandle<Vec<Chunk>>>,
}

/// Shuts the socket down when the fake's thread ends, even by a panic, so
/// a front end waiting for a reply sees EOF (the probe keeps it open).
struct ShutOnDrop(UnixStream);

impl Drop for ShutOnDrop {
    fn drop(&mut self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

impl FakeBackend {
    /// Starts a back end; returns it and the front end's end of the socket.
    pub fn spawn(offer: Offer, num_queues: usize) -> (FakeBackend, UnixStream) {
        let (front, back) = UnixStream::pair().expect("socketpair");
        let probe = back.try_clone().expect("dup");
        let session = Arc::new(Mutex::new(Session {
            started: vec![false; num_queues],
            bases: vec![0; num_queues],
            ..Session::default()
        }));
        let shared = session.clone();
        let thread = std::thread::spawn(move || serve(ShutOnDrop(back), offer, &shared));
        (FakeBackend { session, probe, thread: Some(thread) }, front)
    }

    /// Waits until the back end has handled everything sent to it, and
    /// returns its view of the session.
    pub fn settle(&self) -> MutexGuard<'_, Session> {
        let start = Instant::now();
        while unread(self.probe.as_raw_fd()) > 0 && !self.thread.as_ref().is_none_or(|t| t.is_finished()) {
            assert!(start.elapsed() < Duration::from_secs(20), "the fake back end is stuck");
            std::thread::yield_now();
        }
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the thread (the front end must have dropped its end) and
    /// returns what it sent; re-raises its panic.
    pub fn finish(mut self) -> Vec<Chunk> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(chunks)) => chunks,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Vec::new(),
        }
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | u64::from(le32(b, at + 4)) << 32
}

/// Reads one message: header, body and the file sent with it. `None` at
/// EOF or on a socket error.
fn read_message(stream: &UnixStream) -> Option<(u32, u32, Vec<u8>, Option<File>)> {
    let mut hdr = [0u8; HDR_LEN];
    let (mut got, file) = stream.recv_with_fd(&mut hdr).ok()?;
    if got == 0 {
        return None;
    }
    while got < HDR_LEN {
        let n = (&*stream).read(&mut hdr[got..]).ok()?;
        if n == 0 {
            return None;
        }
        got += n;
    }
    let (code, flags, size) = (le32(&hdr, 0), le32(&hdr, 4), le32(&hdr, 8));
    assert!(size <= 0x1000, "request {code} with a {size}-byte body");
    let mut body = vec![0u8; size as usize];
    (&*stream).read_exact(&mut body).ok()?;
    Some((code, flags, body, file))
}

fn serve(stream: ShutOnDrop, offer: Offer, session: &Mutex<Session>) -> Vec<Chunk> {
    let mut sent = Vec::new();
    loop {
        let mut pfd = libc::pollfd { fd: stream.0.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one pollfd we own for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
            continue;
        }
        let mut s = session.lock().unwrap_or_else(|e| e.into_inner());
        let Some((code, flags, body, file)) = read_message(&stream.0) else { break };
        s.messages += 1;
        let Some((reply, attach)) = answer(&mut s, &offer, code, flags, &body, file) else { continue };
        let mut bytes = Vec::with_capacity(HDR_LEN + reply.len());
        bytes.extend(code.to_le_bytes());
        bytes.extend((FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
        bytes.extend((reply.len() as u32).to_le_bytes());
        bytes.extend(&reply);
        let result = match &attach {
            Some(f) => stream.0.send_with_fd(&bytes[..], f.as_raw_fd()),
            None => (&stream.0).write_all(&bytes).map(|()| bytes.len()).map_err(Into::into),
        };
        if result.is_err() {
            break;
        }
        sent.push(Chunk { bytes, file: attach.is_some() });
    }
    sent
}

/// Checks one request and returns the reply body (and a file to attach),
/// or `None` when the request gets no reply.
fn answer(
    s: &mut Session,
    offer: &Offer,
    code: u32,
    flags: u32,
    body: &[u8],
    file: Option<File>,
) -> Option<(Vec<u8>, Option<File>)> {
    assert_eq!(flags & !(FLAG_NEED_REPLY), FLAG_VERSION_1, "request {code}: flags {flags:#x}");
    assert!(code == req::SET_OWNER || s.owner, "request {code} before SET_OWNER");
    let rings = s.started.len();
    let ring = |index: u32| {
        assert!((index as usize) < rings, "request {code} for ring {index} of {rings}");
        index as usize
    };
    let reconfigure = |s: &Session, index: usize| {
        assert!(!s.started[index], "request {code} reconfigures ring {index}, which is running");
    };
    let negotiated = |s: &Session, bit: u64| {
        assert!(s.acked_protocol & bit != 0, "request {code} without protocol feature {bit:#x}");
    };
    let u64_reply = |v: u64| Some((v.to_le_bytes().to_vec(), None));
    match code {
        req::SET_OWNER => {
            assert!(!s.owner, "SET_OWNER twice");
            s.owner = true;
        }
        req::GET_FEATURES => return u64_reply(offer.features),
        req::SET_FEATURES => {
            let features = le64(body, 0);
            assert_eq!(features & !offer.features, 0, "acked features {features:#x} never offered");
            assert!(features & LOG_ALL == 0 || s.log_current, "LOG_ALL acked without a log for the memory table");
            s.acked_features = features;
        }
        req::GET_PROTOCOL_FEATURES => {
            assert!(offer.features & PROTOCOL_FEATURES != 0, "GET_PROTOCOL_FEATURES without the feature");
            return u64_reply(offer.protocol);
        }
        req::SET_PROTOCOL_FEATURES => {
            let protocol = le64(body, 0);
            assert_eq!(protocol & !offer.protocol, 0, "acked protocol features {protocol:#x} never offered");
            s.acked_protocol = protocol;
        }
        req::GET_QUEUE_NUM => {
            negotiated(s, PROTO_MQ);
            return u64_reply(rings as u64);
        }
        req::SET_MEM_TABLE => {
            let regions = le32(body, 0) as usize;
            assert!(regions > 0 && body.len() == 8 + 32 * regions, "SET_MEM_TABLE of {} bytes", body.len());
            assert!(file.is_some(), "SET_MEM_TABLE without the memory's file");
            s.mem_table = true;
            s.log_current = false;
        }
        req::SET_VRING_NUM => {
            let index = ring(le32(body, 0));
            reconfigure(s, index);
            let num = le32(body, 4);
            assert!(num >= 1 && num <= u32::from(MAX_QUEUE_SIZE), "ring {index} of size {num}");
        }
        req::SET_VRING_ADDR => {
            let index = ring(le32(body, 0));
            reconfigure(s, index);
            assert!(s.mem_table, "ring {index} addresses before a memory table");
        }
        req::SET_VRING_BASE => {
            let index = ring(le32(body, 0));
            reconfigure(s, index);
            s.bases[index] = le32(body, 4);
        }
        req::GET_VRING_BASE => {
            let index = ring(le32(body, 0));
            s.started[index] = false;
            let mut reply = (index as u32).to_le_bytes().to_vec();
            reply.extend(s.bases[index].to_le_bytes());
            return Some((reply, None));
        }
        req::SET_VRING_KICK | req::SET_VRING_CALL => {
            let value = le64(body, 0);
            let index = ring((value & 0xff) as u32);
            assert!(file.is_some() || value & 0x100 != 0, "request {code} for ring {index} without a file");
            if code == req::SET_VRING_KICK {
                s.started[index] = true;
            }
        }
        req::SET_VRING_ENABLE => {
            ring(le32(body, 0));
            assert!(s.acked_features & PROTOCOL_FEATURES != 0, "SET_VRING_ENABLE without protocol features");
        }
        req::GET_CONFIG => {
            negotiated(s, PROTO_CONFIG);
            let (offset, size) = (le32(body, 0) as usize, le32(body, 4) as usize);
            assert_eq!(body.len(), 12 + size, "GET_CONFIG body");
            let mut reply = body[..12].to_vec();
            reply.extend((offset..offset + size).map(|i| offer.config.get(i).copied().unwrap_or(0)));
            return Some((reply, None));
        }
        req::GET_INFLIGHT_FD => {
            negotiated(s, PROTO_INFLIGHT_SHMFD);
            let (queues, size) = (body.get(16..18), body.get(18..20));
            let queues = queues.map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
            let size = size.map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
            let mmap_size = 4096 * u64::from(queues.max(1));
            let mut reply = mmap_size.to_le_bytes().to_vec();
            reply.extend(0u64.to_le_bytes());
            reply.extend(queues.to_le_bytes());
            reply.extend(size.to_le_bytes());
            reply.extend([0u8; 4]);
            return Some((reply, memfd(mmap_size)));
        }
        req::SET_LOG_BASE => {
            negotiated(s, PROTO_LOG_SHMFD);
            assert!(s.mem_table, "SET_LOG_BASE before a memory table: the log would cover no region");
            assert_eq!(body.len(), 16, "SET_LOG_BASE body");
            let size = le64(body, 0);
            let len = file.as_ref().expect("SET_LOG_BASE without the log's file").metadata().map_or(0, |m| m.len());
            assert!(size > 0 && size + le64(body, 8) <= len, "log of {size} bytes in a {len}-byte file");
            s.log_size = Some(size);
            s.log_bases += 1;
            s.log_current = true;
            // Always answered, with the request's body (not an ack).
            return Some((body.to_vec(), None));
        }
        req::SET_INFLIGHT_FD => {
            negotiated(s, PROTO_INFLIGHT_SHMFD);
            assert!(file.is_some(), "SET_INFLIGHT_FD without the table's file");
        }
        other => panic!("unexpected request {other}"),
    }
    if flags & FLAG_NEED_REPLY != 0 && s.acked_protocol & PROTO_REPLY_ACK != 0 {
        return u64_reply(u64::from(offer.nack >> code & 1 != 0));
    }
    None
}

/// Register offsets of the transport, for inputs that name one.
const REGISTERS: [u64; 24] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050, 0x060, 0x064, 0x070,
    0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0fc, 0x100,
];
const STATUS: u64 = 0x070;
const CONFIG: u64 = 0x100;

/// A transport and the fake back end behind it.
struct Machine {
    kind: DeviceKind,
    offer: Offer,
    device: Option<MmioDevice>,
    /// The current back end, then those it replaced (ended at the finish).
    backend: FakeBackend,
    retired: Vec<FakeBackend>,
}

impl Machine {
    fn events(kind: DeviceKind) -> (Vec<EventFd>, EventFd) {
        let kicks = (0..kind.num_queues()).map(|_| EventFd::new(EFD_NONBLOCK).expect("eventfd")).collect();
        (kicks, EventFd::new(EFD_NONBLOCK).expect("eventfd"))
    }

    fn new(kind: DeviceKind, offer: Offer) -> Option<Machine> {
        let (backend, stream) = FakeBackend::spawn(offer.clone(), kind.num_queues());
        let (mem, memfd) = guest_ram();
        let device = match VhostUserDevice::connect(kind, stream) {
            Ok(vu) => {
                let (kicks, call) = Self::events(kind);
                Some(MmioDevice::new(vu, mem.clone(), memfd.try_clone().ok()?, kicks, call))
            }
            Err(_) => None,
        };
        let clean = Offer { nack: 0, ..offer.clone() };
        Some(Machine { kind, offer: clean, device, backend, retired: Vec::new() })
    }

    /// A fresh back end (a restarted device process), answering cleanly.
    fn replace_backend(&mut self) -> UnixStream {
        let (backend, stream) = FakeBackend::spawn(self.offer.clone(), self.kind.num_queues());
        self.retired.push(std::mem::replace(&mut self.backend, backend));
        stream
    }

    /// Rings may run only while the transport holds an activation: a
    /// guest reset, or an activation that failed, leaves none running.
    fn check(&self) {
        let Some(device) = &self.device else { return };
        let state = device.save();
        let session = self.backend.settle();
        if state.activation.is_none() {
            let running: Vec<usize> = (0..session.started.len()).filter(|&i| session.started[i]).collect();
            assert!(running.is_empty(), "rings {running:?} run with no activation (status {:#x})", state.status);
        }
        if state.status == 0 {
            assert!(state.activation.is_none(), "reset left an activation");
        }
    }

    fn snapshot(&mut self, restore: bool) {
        let Some(device) = &mut self.device else { return };
        if device.quiesce().is_err() {
            return;
        }
        if !restore {
            let _ = device.resume();
            return;
        }
        let saved: TransportState = device.save();
        let stream = self.replace_backend();
        let Ok(vu) = VhostUserDevice::connect(self.kind, stream) else { return };
        let (mem, memfd) = guest_ram();
        let (kicks, call) = Self::events(self.kind);
        let Ok(memfd) = memfd.try_clone() else { return };
        let parts = TransportParts { backend: vu, mem: mem.clone(), memfd, kicks, call };
        match MmioDevice::restore(parts, &saved) {
            Ok(restored) => {
                let again = restored.save();
                assert_eq!(
                    TransportState { ring_bases: saved.ring_bases.clone(), ..again },
                    saved,
                    "restore changed state"
                );
                // The old transport goes, and its back end with it.
                self.device = Some(restored);
            }
            Err(e) => panic!("restoring a state the transport saved failed: {e}"),
        }
    }

    fn finish(mut self) {
        self.device = None;
        for backend in self.retired.drain(..) {
            backend.finish();
        }
        self.backend.finish();
    }
}

/// The kind an input's first byte names.
const KINDS: [DeviceKind; 3] = [DeviceKind::Block, DeviceKind::Net, DeviceKind::Vsock];

fn kind_index(kind: DeviceKind) -> u8 {
    KINDS.iter().position(|&k| k == kind).unwrap_or(0) as u8
}

/// Runs one input of `mmio_transport`. Panics only if an invariant breaks.
///
/// Input: byte 0 the device kind; bytes 1-8 the virtio features the back
/// end offers, byte 9 its protocol support (bit 0: protocol features at
/// all, bits 1-4: CONFIG, REPLY_ACK, INFLIGHT_SHMFD, MQ), bytes 10-17 the
/// request codes whose acks fail (first back end only). Then operations,
/// each an opcode byte and arguments:
///
/// | op % 8 | arguments | what happens |
/// |---|---|---|
/// | 0 | register index, value (4) | 32-bit write to a named register |
/// | 1 | offset (2), len, bytes | write of any width (0-8) at any offset in the page |
/// | 2 | register index | 32-bit read of a named register |
/// | 3 | offset (2), len | read of any width at any offset |
/// | 4 | — | the device process restarted: reconnect |
/// | 5 | — | quiesce and resume |
/// | 6 | — | quiesce, save, restore onto a new back end |
/// | 7 | — | the guest resets the device (status 0) |
pub fn fuzz_mmio(data: &[u8]) {
    let mut input = Input(data);
    let kind = KINDS[usize::from(input.u8() % 3)];
    let mut offer = Offer::full(kind);
    offer.features = input.u64() & !PROTOCOL_FEATURES;
    let protocol = input.u8();
    if protocol & 1 != 0 {
        offer.features |= PROTOCOL_FEATURES;
    }
    offer.protocol = [PROTO_CONFIG, PROTO_REPLY_ACK, PROTO_INFLIGHT_SHMFD, PROTO_MQ]
        .iter()
        .enumerate()
        .filter(|(i, _)| protocol >> (i + 1) & 1 != 0)
        .fold(0, |acc, (_, bit)| acc | bit);
    offer.nack = input.u64();
    let fds = open_fds_after_setup();

    let Some(mut m) = Machine::new(kind, offer) else { return };
    while !input.0.is_empty() {
        let op = input.u8() % 8;
        match op {
            0 | 1 => {
                let (offset, bytes) = if op == 0 {
                    (REGISTERS[usize::from(input.u8()) % REGISTERS.len()], input.u32().to_le_bytes().to_vec())
                } else {
                    let offset = u64::from(input.u16() % 0x1000);
                    let len = usize::from(input.u8() % 9);
                    (offset, (0..len).map(|_| input.u8()).collect())
                };
                if let Some(d) = &mut m.device {
                    d.write(offset, &bytes);
                }
            }
            2 | 3 => {
                let (offset, len) = if op == 2 {
                    (REGISTERS[usize::from(input.u8()) % REGISTERS.len()], 4)
                } else {
                    (u64::from(input.u16() % 0x1000), usize::from(input.u8() % 9))
                };
                if let Some(d) = &mut m.device {
                    let mut buf = vec![0u8; len];
                    d.read(offset, &mut buf);
                    check_read(d, &m.offer, offset, &buf);
                }
            }
            4 => {
                let stream = m.replace_backend();
                if let Some(d) = &mut m.device {
                    let _ = d.reconnect(stream);
                }
            }
            5 => m.snapshot(false),
            6 => m.snapshot(true),
            _ => {
                if let Some(d) = &mut m.device {
                    d.write(STATUS, &0u32.to_le_bytes());
                }
            }
        }
        m.check();
    }
    m.finish();
    assert_eq!(open_fds(), fds, "descriptors leaked");
}

/// Reads that must give fixed answers do.
fn check_read(device: &MmioDevice, offer: &Offer, offset: u64, buf: &[u8]) {
    let expect = |value: u32| {
        let n = buf.len().min(4);
        assert_eq!(buf[..n], value.to_le_bytes()[..n], "register {offset:#x}");
    };
    match offset {
        0x000 => expect(0x7472_6976),
        0x004 => expect(2),
        0x008 => expect(device.kind().device_type()),
        0x070 => expect(device.save().status),
        o if o >= CONFIG => {
            let start = (o - CONFIG) as usize;
            let config = if offer.features & PROTOCOL_FEATURES != 0 && offer.protocol & PROTO_CONFIG != 0 {
                &offer.config[..]
            } else {
                &[][..]
            };
            for (i, b) in buf.iter().enumerate() {
                assert_eq!(*b, config.get(start + i).copied().unwrap_or(0), "config byte {}", start + i);
            }
        }
        _ => {}
    }
}

/// The descriptor count once this process's shared set-up exists.
fn open_fds_after_setup() -> usize {
    guest_ram();
    open_fds()
}

/// Memory file sizes a hostile back end may attach, by tag bits 1-2.
const FILE_SIZES: [u64; 4] = [0, 4096, 1 << 20, 12];

/// Splits `vhost_user_frontend` input into up to three sessions' streams:
/// chunks of `[tag][len (2)][bytes]`; tag bit 7 starts the next session,
/// bit 0 attaches a memfd of `FILE_SIZES[tag >> 1 & 3]` bytes, bit 3 a
/// second one.
fn sessions(input: &mut Input) -> Vec<Vec<(Vec<u8>, u8)>> {
    let mut sessions = vec![Vec::new()];
    while !input.0.is_empty() {
        let tag = input.u8();
        let len = usize::from(input.u16()).min(input.0.len());
        let (bytes, rest) = input.0.split_at(len);
        input.0 = rest;
        if tag & 0x80 != 0 && sessions.len() < 3 {
            sessions.push(Vec::new());
        }
        if let Some(last) = sessions.last_mut() {
            last.push((bytes.to_vec(), tag));
        }
    }
    sessions.resize(3, Vec::new());
    sessions
}

/// A socket whose peer has already sent `chunks` and then stopped
/// sending (its end stays open, so the front end can still write).
fn scripted_stream(chunks: &[(Vec<u8>, u8)]) -> Option<(UnixStream, UnixStream)> {
    let (front, back) = UnixStream::pair().ok()?;
    // Everything must fit in the socket buffer before the front end runs.
    back.set_nonblocking(true).ok()?;
    for (bytes, tag) in chunks {
        let mut files = Vec::new();
        if tag & 1 != 0 {
            files.extend(memfd(FILE_SIZES[usize::from(tag >> 1 & 3)]));
        }
        if tag & 8 != 0 {
            files.extend(memfd(4096));
        }
        let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        let sent = if bytes.is_empty() {
            Ok(0)
        } else if fds.is_empty() {
            (&back).write(bytes).map_err(Into::into)
        } else {
            back.send_with_fds(&[&bytes[..]], &fds)
        };
        if sent.is_err() {
            break;
        }
    }
    back.shutdown(Shutdown::Write).ok()?;
    Some((front, back))
}

/// The activation the front-end script uses: per queue a size from the
/// input (0: unused), rings at fixed places in guest RAM.
fn script_activation(kind: DeviceKind, input: &mut Input) -> Activation {
    let acked_features = input.u64();
    let queues = (0..kind.num_queues() as u64)
        .map(|i| {
            let size = input.u8();
            QueueSetup {
                size: if size == 0 { 0 } else { u16::from(size) + 1 },
                desc: 0x4000 * i,
                avail: 0x4000 * i + 0x1000,
                used: 0x4000 * i + 0x2000,
            }
        })
        .collect();
    Activation { acked_features, queues }
}

/// The set-up sequence mm-vmm runs over a device's life, on three
/// sessions: connect, activate, quiesce, resume, reset, activate again;
/// reconnect on the second; connect and restore on the third. Every step
/// runs whatever the last one returned.
fn run_script(kind: DeviceKind, activation: &Activation, streams: [UnixStream; 3]) {
    let (mem, memfd) = guest_ram();
    let (kicks, call) = Machine::events(kind);
    let events = QueueEvents { kicks: &kicks, call: &call };
    let [s0, s1, s2] = streams;
    let Ok(mut dev) = VhostUserDevice::connect(kind, s0) else { return };
    let _ = dev.config();
    // The transport lets the driver ack only what the back end offered.
    let mut activation = activation.clone();
    activation.acked_features &= dev.device_features() | VIRTIO_F_VERSION_1;
    let activation = &activation;
    let _ = dev.activate(mem, memfd, activation.acked_features, &activation.queues, &events);
    let bases = dev.quiesce().unwrap_or_default();
    let _ = dev.resume(mem, memfd, &bases, &events);
    dev.reset();
    let _ = dev.activate(mem, memfd, activation.acked_features, &activation.queues, &events);
    let _ = dev.reconnect(s1, mem, memfd, &events);
    let bases: Vec<u16> = (0..activation.queues.len() as u16).collect();
    if let Ok(mut fresh) = VhostUserDevice::connect(kind, s2) {
        let _ = fresh.restore(activation.clone(), &bases, mem, memfd, &events);
    }
}

/// Runs one input of `vhost_user_frontend`. Panics only if an invariant
/// breaks (no panic, no hang, no leaked descriptor).
///
/// Input: byte 0 the device kind; bytes 1-8 the features the driver
/// acked, then one byte per queue for its size; then the back end's
/// byte streams (see [`sessions`]).
pub fn fuzz_vhost_user(data: &[u8]) {
    let mut input = Input(data);
    let kind = KINDS[usize::from(input.u8() % 3)];
    let activation = script_activation(kind, &mut input);
    let fds = open_fds_after_setup();
    {
        let sessions = sessions(&mut input);
        let mut fronts = Vec::new();
        let mut backs = Vec::new();
        for chunks in &sessions {
            let Some((front, back)) = scripted_stream(chunks) else { return };
            fronts.push(front);
            backs.push(back);
        }
        let Ok(streams) = <[UnixStream; 3]>::try_from(fronts) else { return };
        run_script(kind, &activation, streams);
    }
    assert_eq!(open_fds(), fds, "descriptors leaked");
}

/// A `vhost_user_frontend` input that replays what a well-behaved back end
/// offering `offer` answers to the script: a seed that reaches every step.
pub fn vhost_user_seed(kind: DeviceKind, offer: &Offer, acked_features: u64, sizes: &[u8]) -> Vec<u8> {
    let mut head = vec![kind_index(kind)];
    head.extend(acked_features.to_le_bytes());
    head.extend(sizes.iter().take(kind.num_queues()));
    let activation = script_activation(kind, &mut Input(&head[1..]));
    let spawned: Vec<(FakeBackend, UnixStream)> =
        (0..3).map(|_| FakeBackend::spawn(offer.clone(), kind.num_queues())).collect();
    let (backends, streams): (Vec<FakeBackend>, Vec<UnixStream>) = spawned.into_iter().unzip();
    let Ok(streams) = <[UnixStream; 3]>::try_from(streams) else { return head };
    run_script(kind, &activation, streams);
    let mut out = head;
    for (i, backend) in backends.into_iter().enumerate() {
        let chunks = backend.finish();
        if chunks.is_empty() && i > 0 {
            out.extend([0x80, 0, 0]);
        }
        for (j, chunk) in chunks.iter().enumerate() {
            let tag = u8::from(chunk.file) | if i > 0 && j == 0 { 0x80 } else { 0 };
            out.push(tag);
            out.extend((chunk.bytes.len() as u16).to_le_bytes());
            out.extend(&chunk.bytes);
        }
    }
    out
}

/// A `mmio_transport` input: a Linux-like driver probe (reset,
/// ACKNOWLEDGE, DRIVER, features, FEATURES_OK, every queue at valid
/// addresses, DRIVER_OK), config reads, then `tail`.
pub fn mmio_seed(kind: DeviceKind, protocol: u8, nack: u64, tail: &[u8]) -> Vec<u8> {
    let mut v = vec![kind_index(kind)];
    v.extend((1u64 << 32 | 0xff).to_le_bytes());
    v.push(protocol);
    v.extend(nack.to_le_bytes());
    let reg = |offset: u64| REGISTERS.iter().position(|&r| r == offset).unwrap_or(0) as u8;
    let write = |v: &mut Vec<u8>, offset: u64, value: u32| {
        v.extend([0, reg(offset)]);
        v.extend(value.to_le_bytes());
    };
    write(&mut v, STATUS, 0);
    write(&mut v, STATUS, 1);
    write(&mut v, STATUS, 3);
    v.extend([2, reg(0x010)]);
    write(&mut v, 0x024, 0);
    write(&mut v, 0x020, 0xff);
    write(&mut v, 0x024, 1);
    write(&mut v, 0x020, 1);
    write(&mut v, STATUS, 0xb);
    for q in 0..kind.num_queues() as u32 {
        write(&mut v, 0x030, q);
        v.extend([2, reg(0x034)]);
        write(&mut v, 0x038, 256);
        write(&mut v, 0x080, 0x4000 * q);
        write(&mut v, 0x090, 0x4000 * q + 0x1000);
        write(&mut v, 0x0a0, 0x4000 * q + 0x2000);
        write(&mut v, 0x044, 1);
    }
    write(&mut v, STATUS, 0xf);
    v.extend([3, 0x00, 0x01, 8]);
    v.extend(tail);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds() -> [DeviceKind; 3] {
        [DeviceKind::Block, DeviceKind::Net, DeviceKind::Vsock]
    }

    #[test]
    fn fake_backend_serves_a_full_setup() {
        for kind in kinds() {
            let (backend, stream) = FakeBackend::spawn(Offer::full(kind), kind.num_queues());
            let mut dev = VhostUserDevice::connect(kind, stream).unwrap();
            assert_eq!(dev.config(), &Offer::full(kind).config[..]);
            let (mem, memfd) = guest_ram();
            let (kicks, call) = Machine::events(kind);
            let events = QueueEvents { kicks: &kicks, call: &call };
            let queues: Vec<QueueSetup> = (0..kind.num_queues() as u64)
                .map(|i| QueueSetup {
                    size: 256,
                    desc: 0x4000 * i,
                    avail: 0x4000 * i + 0x1000,
                    used: 0x4000 * i + 0x2000,
                })
                .collect();
            dev.activate(mem, memfd, 1 << 32, &queues, &events).unwrap();
            assert!(backend.settle().started.iter().all(|&s| s));
            dev.reset();
            assert!(backend.settle().started.iter().all(|&s| !s));
            drop(dev);
            backend.finish();
        }
    }

    #[test]
    fn vhost_user_seeds_replay() {
        let mut plain = Offer::full(DeviceKind::Net);
        plain.features &= !PROTOCOL_FEATURES;
        for kind in kinds() {
            for offer in [Offer::full(kind), Offer { config: Offer::full(kind).config, ..plain.clone() }] {
                let seed = vhost_user_seed(kind, &offer, u64::MAX, &[255, 255, 0]);
                assert!(seed.len() > 100, "{kind:?}: a {}-byte seed", seed.len());
                fuzz_vhost_user(&seed);
                // Every truncation and a flipped byte or two must be safe.
                for cut in (0..seed.len()).step_by(7) {
                    fuzz_vhost_user(&seed[..cut]);
                }
                let mut flipped = seed.clone();
                for at in (9..flipped.len()).step_by(13) {
                    flipped[at] ^= 0x5a;
                    fuzz_vhost_user(&flipped);
                }
            }
        }
    }

    #[test]
    fn mmio_seeds_run() {
        for kind in kinds() {
            for protocol in [0, 0x1f, 0x1d, 0x0b] {
                fuzz_mmio(&mmio_seed(kind, protocol, 0, &[7, 4, 5, 6, 2, 15]));
            }
        }
    }

    #[test]
    fn mmio_on_deterministic_inputs() {
        let mut rng = fastrand::Rng::with_seed(0x6d6d_6d6d_696f_2121);
        for i in 0..60 {
            let tail: Vec<u8> = (0..rng.u64(..) % 200).map(|_| rng.u64(..) as u8).collect();
            let kind = kinds()[i % 3];
            let input = if i % 2 == 0 { tail } else { mmio_seed(kind, 0x1f, rng.u64(..) & 0x3f00, &tail) };
            fuzz_mmio(&input);
        }
    }

    /// Writes the seeds of both targets to `$MM_FUZZ_SEEDS/<target>/`
    /// (`cargo test -p mm-vmm --features fuzzing -- --ignored write_seeds`).
    #[test]
    #[ignore]
    fn write_seeds() {
        let Some(dir) = std::env::var_os("MM_FUZZ_SEEDS").map(std::path::PathBuf::from) else { return };
        let vu = dir.join("vhost_user_frontend");
        let mmio = dir.join("mmio_transport");
        std::fs::create_dir_all(&vu).unwrap();
        std::fs::create_dir_all(&mmio).unwrap();
        for kind in kinds() {
            let mut plain = Offer::full(kind);
            plain.features &= !PROTOCOL_FEATURES;
            let mut no_ack = Offer::full(kind);
            no_ack.protocol &= !PROTO_REPLY_ACK;
            for (name, offer) in [("full", Offer::full(kind)), ("plain", plain), ("noack", no_ack)] {
                let seed = vhost_user_seed(kind, &offer, u64::MAX, &[255, 127, 63]);
                std::fs::write(vu.join(format!("seed-{}-{name}", kind.name())), seed).unwrap();
            }
            for (name, protocol) in [("full", 0x1f), ("plain", 0), ("noack", 0x1b)] {
                let seed = mmio_seed(kind, protocol, 0, &[7, 4, 5, 6, 2, 15]);
                std::fs::write(mmio.join(format!("seed-{}-{name}", kind.name())), seed).unwrap();
            }
        }
    }
}
