//! End-to-end: `serve_vsock` driven over vhost-user by the test front end,
//! with the guest's side of virtio-vsock simulated through the queues and
//! real host clients on the unix sockets.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, GuestAddress};

use super::packet::{
    EVENT_LEN, EVENT_TRANSPORT_RESET, HDR_LEN, HOST_CID, Header, Op, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::testutil::TempDir;
use super::{VsockConfig, VsockError, serve_vsock};
use crate::net::testnet::{join_within, queued_listener};
use crate::test_frontend::{Buf, TestFrontend, TestMemory, UsedElem};

const CID: u64 = 3;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
const QUEUE_SIZES: [u16; 3] = [256, 256, 64];
const RX_BUF: u32 = 4096 + HDR_LEN as u32;
const TX_SLOT: u64 = (HDR_LEN + 65536) as u64;
const T: Duration = Duration::from_secs(30);

/// The guest side: keeps rx buffers posted, sends packets from a pool of
/// tx slots.
struct Guest {
    fe: TestFrontend,
    rx_bufs: HashMap<u32, GuestAddress>,
    tx_free: Vec<GuestAddress>,
    tx_busy: HashMap<u32, GuestAddress>,
    outbox: VecDeque<(Header, Vec<u8>)>,
}

impl Guest {
    fn new(mut fe: TestFrontend) -> Self {
        let mut rx_bufs = HashMap::new();
        for _ in 0..128 {
            let b = fe.alloc(u64::from(RX_BUF)).unwrap();
            rx_bufs.insert(u32::from(fe.add_chain(RX, &[Buf::input(b, RX_BUF)]).unwrap()), b);
        }
        fe.kick(RX).unwrap();
        let tx_free = (0..32).map(|_| fe.alloc(TX_SLOT).unwrap()).collect();
        Guest { fe, rx_bufs, tx_free, tx_busy: HashMap::new(), outbox: VecDeque::new() }
    }

    fn send(&mut self, op: Op, src_port: u32, dst_port: u32, fill: impl FnOnce(&mut Header), payload: Vec<u8>) {
        let mut h = Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: payload.len() as u32,
            type_: TYPE_STREAM,
            op: op as u16,
            ..Header::default()
        };
        fill(&mut h);
        self.outbox.push_back((h, payload));
    }

    /// Puts queued packets on the tx queue as slots free up.
    fn flush(&mut self) {
        for used in self.fe.take_used(TX).unwrap() {
            if let Some(slot) = self.tx_busy.remove(&used.id) {
                self.tx_free.push(slot);
            }
        }
        let mut kicked = false;
        while !self.outbox.is_empty() && !self.tx_free.is_empty() {
            let (h, payload) = self.outbox.pop_front().unwrap();
            let slot = self.tx_free.pop().unwrap();
            self.fe.mem().write_slice(&h.to_bytes(), slot).unwrap();
            self.fe.mem().write_slice(&payload, GuestAddress(slot.0 + HDR_LEN as u64)).unwrap();
            // Header and payload in separate descriptors, as Linux does.
            let mut bufs = vec![Buf::out(slot, HDR_LEN as u32)];
            if !payload.is_empty() {
                bufs.push(Buf::out(GuestAddress(slot.0 + HDR_LEN as u64), payload.len() as u32));
            }
            let head = self.fe.add_chain(TX, &bufs).unwrap();
            self.tx_busy.insert(u32::from(head), slot);
            kicked = true;
        }
        if kicked {
            self.fe.kick(TX).unwrap();
        }
    }

    /// Packets the device delivered (waiting up to `wait` for the first);
    /// their buffers are posted again.
    fn recv(&mut self, wait: Duration) -> Vec<(Header, Vec<u8>)> {
        let used = self.fe.wait_used(RX, 1, wait).unwrap();
        let mut out = Vec::new();
        // Take all the buffers back before posting any again: a new chain
        // may reuse the head index of one not yet read.
        let addrs: Vec<GuestAddress> =
            used.iter().map(|e| self.rx_bufs.remove(&e.id).expect("used an rx buffer we posted")).collect();
        for (elem, addr) in used.iter().zip(addrs) {
            assert!(elem.len as usize >= HDR_LEN, "rx packet shorter than a header");
            let mut raw = vec![0u8; elem.len as usize];
            self.fe.mem().read_slice(&mut raw, addr).unwrap();
            let h = Header::from_bytes(raw[..HDR_LEN].try_into().unwrap());
            assert_eq!(h.len as usize, raw.len() - HDR_LEN, "header length matches the used length");
            assert_eq!((h.src_cid, h.dst_cid, h.type_), (HOST_CID, CID, TYPE_STREAM));
            out.push((h, raw[HDR_LEN..].to_vec()));
            let head = self.fe.add_chain(RX, &[Buf::input(addr, RX_BUF)]).unwrap();
            self.rx_bufs.insert(u32::from(head), addr);
        }
        if !used.is_empty() {
            self.fe.kick(RX).unwrap();
        }
        out
    }
}

struct Rig {
    guest: Guest,
    dir: TempDir,
    server: JoinHandle<Result<(), VsockError>>,
}

/// A back end serving on a fresh session, before any activation.
fn serve(transport_reset: bool) -> (TestFrontend, TempDir, JoinHandle<Result<(), VsockError>>) {
    let dir = TempDir::new("vsock");
    let (listener, stream) = queued_listener();
    let config = VsockConfig { guest_cid: CID, uds_path: dir.path("v.sock"), transport_reset, lazy_memory: false };
    let server = std::thread::spawn(move || serve_vsock(config, listener));
    let memory = TestMemory::new(0x1_0000_0000, 32 << 20).unwrap();
    let mut fe = TestFrontend::connect(stream, memory, 3).unwrap();
    assert_eq!(fe.get_config(0, 8).unwrap(), CID.to_le_bytes());
    (fe, dir, server)
}

fn rig() -> Rig {
    let (mut fe, dir, server) = serve(false);
    fe.activate(1 << VIRTIO_F_VERSION_1, &QUEUE_SIZES).unwrap();
    Rig { guest: Guest::new(fe), dir, server }
}

fn pattern(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// A host client CONNECTs to guest port 1234, where the simulated guest
/// echoes everything; 1 MiB goes each way and must come back byte-exact,
/// with both sides' credit respected.
#[test]
fn host_client_echo_one_mib() {
    const GUEST_BUF: u32 = 32 * 1024;
    let mut rig = rig();
    let data = pattern(1 << 20, 0x9e3779b97f4a7c15);
    let expect = data.clone();
    let uds = rig.dir.path("v.sock");
    let client: JoinHandle<(String, Vec<u8>)> = std::thread::spawn(move || {
        let mut s = UnixStream::connect(uds).unwrap();
        s.write_all(b"CONNECT 1234\n").unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8];
        while byte[0] != b'\n' {
            s.read_exact(&mut byte).unwrap();
            line.push(byte[0]);
        }
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            w.write_all(&data).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut echoed = Vec::new();
        s.read_to_end(&mut echoed).unwrap();
        writer.join().unwrap();
        (String::from_utf8(line).unwrap(), echoed)
    });

    let g = &mut rig.guest;
    let mut host_port = None;
    let mut pending = VecDeque::new(); // received, not yet echoed
    let (mut fwd_cnt, mut fwd_cnt_sent) = (0u32, 0u32);
    let (mut peer_buf, mut peer_fwd, mut tx_cnt) = (0u32, 0u32, 0u32);
    let (mut host_done, mut sent_shutdown, mut closed) = (false, false, false);
    let (mut received, mut credit_requests) = (0usize, 0);
    let deadline = Instant::now() + T;
    while !closed {
        assert!(Instant::now() < deadline, "echo did not finish: {received} bytes received");
        for (h, payload) in g.recv(Duration::from_millis(20)) {
            (peer_buf, peer_fwd) = (h.buf_alloc, h.fwd_cnt);
            match h.op().unwrap() {
                Op::Request => {
                    assert_eq!(h.dst_port, 1234);
                    host_port = Some(h.src_port);
                    g.send(Op::Response, 1234, h.src_port, |r| r.buf_alloc = GUEST_BUF, vec![]);
                }
                Op::Rw => {
                    received += payload.len();
                    pending.extend(payload);
                    assert!(pending.len() <= GUEST_BUF as usize, "the device overran the guest's credit");
                }
                Op::CreditRequest => credit_requests += 1,
                Op::CreditUpdate => {}
                Op::Shutdown => {
                    assert_eq!(h.flags, SHUTDOWN_SEND);
                    host_done = true;
                }
                Op::Rst => closed = true,
                Op::Response => panic!("unexpected RESPONSE"),
            }
        }
        let Some(port) = host_port else { continue };
        // Echo within the device's credit; echoing frees our buffer.
        while !pending.is_empty() && g.outbox.len() < 32 {
            let room = peer_buf.saturating_sub(tx_cnt.wrapping_sub(peer_fwd)) as usize;
            let n = pending.len().min(room).min(16 * 1024);
            if n == 0 {
                break;
            }
            let chunk: Vec<u8> = pending.drain(..n).collect();
            tx_cnt = tx_cnt.wrapping_add(n as u32);
            fwd_cnt = fwd_cnt.wrapping_add(n as u32);
            fwd_cnt_sent = fwd_cnt;
            g.send(Op::Rw, 1234, port, |r| (r.buf_alloc, r.fwd_cnt) = (GUEST_BUF, fwd_cnt), chunk);
        }
        if fwd_cnt != fwd_cnt_sent {
            fwd_cnt_sent = fwd_cnt;
            g.send(Op::CreditUpdate, 1234, port, |r| (r.buf_alloc, r.fwd_cnt) = (GUEST_BUF, fwd_cnt), vec![]);
        }
        if host_done && pending.is_empty() && !sent_shutdown {
            sent_shutdown = true;
            let flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
            g.send(
                Op::Shutdown,
                1234,
                port,
                |r| (r.flags, r.buf_alloc, r.fwd_cnt) = (flags, GUEST_BUF, fwd_cnt),
                vec![],
            );
        }
        g.flush();
    }
    let (line, echoed) = join_within(client, T);
    assert_eq!(line, format!("OK {}\n", host_port.unwrap()));
    assert_eq!(received, expect.len());
    assert!(echoed == expect, "echo differs ({} of {} bytes)", echoed.len(), expect.len());
    assert!(credit_requests > 0, "a 32 KiB guest buffer should have run the device out of credit");
    drop(rig.guest);
    join_within(rig.server, T).unwrap();
}

/// A guest connection to host port 7000 reaches the listener at
/// `<uds>_7000`; a port nobody listens on is refused.
#[test]
fn guest_connects_to_host_listener() {
    let mut rig = rig();
    let listener = UnixListener::bind(rig.dir.path("v.sock_7000")).unwrap();
    let g = &mut rig.guest;
    g.send(Op::Request, 5000, 7000, |r| r.buf_alloc = 65536, vec![]);
    g.send(Op::Request, 5001, 7001, |r| r.buf_alloc = 65536, vec![]);
    g.flush();
    let (mut server, _) = listener.accept().unwrap();
    let mut replies = HashMap::new();
    let deadline = Instant::now() + T;
    while replies.len() < 2 {
        assert!(Instant::now() < deadline);
        for (h, _) in g.recv(Duration::from_millis(50)) {
            replies.insert(h.dst_port, (h.op().unwrap(), h.src_port));
        }
    }
    assert_eq!(replies[&5000], (Op::Response, 7000));
    assert_eq!(replies[&5001], (Op::Rst, 7001));

    g.send(Op::Rw, 5000, 7000, |r| r.buf_alloc = 65536, b"ping".to_vec());
    g.flush();
    let mut got = [0u8; 4];
    server.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    server.write_all(b"pong").unwrap();
    let mut data = Vec::new();
    while data.len() < 4 {
        assert!(Instant::now() < deadline);
        for (h, payload) in g.recv(Duration::from_millis(50)) {
            assert_eq!((h.op(), h.dst_port), (Some(Op::Rw), 5000));
            data.extend(payload);
        }
    }
    assert_eq!(data, b"pong");

    // The guest resets: the host side sees EOF.
    g.send(Op::Rst, 5000, 7000, |_| {}, vec![]);
    g.flush();
    server.set_read_timeout(Some(T)).unwrap();
    assert_eq!(server.read(&mut got).unwrap(), 0);
    drop(rig.guest);
    join_within(rig.server, T).unwrap();
}

/// Malformed tx chains (short header, payload past the chain, outside
/// guest RAM) are consumed without effect, and the device keeps working.
#[test]
fn malformed_tx_chains() {
    let mut rig = rig();
    let g = &mut rig.guest;
    let fe = &mut g.fe;
    let slot = fe.alloc(4096).unwrap();
    let rw = Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        len: 1000,
        type_: TYPE_STREAM,
        op: Op::Rw as u16,
        ..Header::default()
    };
    fe.mem().write_slice(&rw.to_bytes(), slot).unwrap();
    fe.add_chain(TX, &[Buf::out(slot, 20)]).unwrap();
    fe.add_chain(TX, &[Buf::out(slot, HDR_LEN as u32 + 10)]).unwrap();
    fe.add_chain(TX, &[Buf::out(GuestAddress(0x10), 64)]).unwrap();
    fe.add_chain(TX, &[Buf::input(slot, 64)]).unwrap();
    fe.kick(TX).unwrap();
    assert_eq!(fe.wait_used(TX, 4, T).unwrap().len(), 4);
    // Still serving: a REQUEST to a missing listener is refused.
    g.send(Op::Request, 1, 2, |_| {}, vec![]);
    g.flush();
    let deadline = Instant::now() + T;
    loop {
        assert!(Instant::now() < deadline);
        if let Some((h, _)) = g.recv(Duration::from_millis(50)).into_iter().next() {
            assert_eq!(h.op(), Some(Op::Rst));
            break;
        }
    }
    drop(rig.guest);
    join_within(rig.server, T).unwrap();
}

/// Starts the rings as mm-vmm does on restore: the driver's event buffers
/// (`event_bufs` of them, filled with 0xff so a written id shows) were
/// posted before the snapshot and nobody kicks for them. EVENT_IDX is on,
/// as with Linux. Returns the buffers' addresses by head index.
fn start_restored(fe: &mut TestFrontend, event_bufs: usize) -> HashMap<u32, GuestAddress> {
    fe.set_features(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX).unwrap();
    fe.set_mem_table().unwrap();
    for (index, &size) in QUEUE_SIZES.iter().enumerate() {
        fe.layout_vring(index, size).unwrap();
    }
    let bufs = (0..event_bufs).map(|_| post_event_buf(fe)).collect();
    for index in 0..QUEUE_SIZES.len() {
        fe.start_vring(index, 0).unwrap();
    }
    bufs
}

/// Makes one 0xff-filled `struct virtio_vsock_event` buffer available on
/// the event queue (no kick).
fn post_event_buf(fe: &mut TestFrontend) -> (u32, GuestAddress) {
    let addr = fe.alloc(EVENT_LEN as u64).unwrap();
    fe.mem().write_slice(&[0xff; EVENT_LEN], addr).unwrap();
    let head = fe.add_chain(EVENT, &[Buf::input(addr, EVENT_LEN as u32)]).unwrap();
    (u32::from(head), addr)
}

/// The id written into an event buffer.
fn event_id(fe: &TestFrontend, addr: GuestAddress) -> u32 {
    let mut raw = [0u8; EVENT_LEN];
    fe.mem().read_slice(&mut raw, addr).unwrap();
    u32::from_le_bytes(raw)
}

/// Waits a while for anything (more) on the event queue: nothing may come.
fn assert_no_event(fe: &mut TestFrontend, what: &str) {
    let more = fe.wait_used(EVENT, 1, Duration::from_millis(300)).unwrap();
    assert!(more.is_empty(), "{what}: unexpected event-queue completions {more:?}");
}

/// `--transport-reset`: once the restored rings start, with the driver's
/// event buffers already there and no kick, exactly one TRANSPORT_RESET
/// (id 0, used length 4) lands in one of the buffers and the guest is
/// interrupted; a later kick with the buffer re-posted brings nothing more.
#[test]
fn transport_reset_posted_once_on_restore() {
    let (mut fe, _dir, server) = serve(true);
    let bufs = start_restored(&mut fe, 4);
    assert!(fe.wait_call(EVENT, T).unwrap(), "no interrupt for the event queue");
    let used = fe.take_used(EVENT).unwrap();
    assert_eq!(used.len(), 1, "exactly one event: {used:?}");
    let addr = bufs[&used[0].id];
    assert_eq!(used[0].len, EVENT_LEN as u32);
    assert_eq!(event_id(&fe, addr), EVENT_TRANSPORT_RESET);
    // The driver re-posts the buffer and kicks, as Linux does.
    post_event_buf(&mut fe);
    fe.kick(EVENT).unwrap();
    assert_no_event(&mut fe, "after the reset");
    assert!(bufs.values().filter(|&&a| a != addr).all(|&a| event_id(&fe, a) == u32::MAX), "other buffers untouched");
    drop(fe);
    join_within(server, T).unwrap();
}

/// Restored with no event buffer posted yet: the reset waits for the
/// driver to post one and kick, then goes into it.
#[test]
fn transport_reset_waits_for_an_event_buffer() {
    let (mut fe, _dir, server) = serve(true);
    start_restored(&mut fe, 0);
    assert_no_event(&mut fe, "without buffers");
    let (head, addr) = post_event_buf(&mut fe);
    fe.kick(EVENT).unwrap();
    let used = fe.wait_used(EVENT, 1, T).unwrap();
    assert_eq!(used, [UsedElem { id: head, len: EVENT_LEN as u32 }]);
    assert_eq!(event_id(&fe, addr), EVENT_TRANSPORT_RESET);
    drop(fe);
    join_within(server, T).unwrap();
}

/// Without `--transport-reset` the event queue is left alone: the
/// driver's buffers stay available and no interrupt comes.
#[test]
fn no_transport_reset_without_the_flag() {
    let (mut fe, _dir, server) = serve(false);
    let bufs = start_restored(&mut fe, 4);
    fe.kick(EVENT).unwrap();
    assert!(!fe.wait_call(EVENT, Duration::from_millis(300)).unwrap(), "interrupt without an event");
    assert_no_event(&mut fe, "without the flag");
    assert!(bufs.values().all(|&a| event_id(&fe, a) == u32::MAX));
    drop(fe);
    join_within(server, T).unwrap();
}

/// A tx avail index left more than a ring ahead: re-enabling notifications
/// says "more" while nothing can be popped. Believing it spun the back end
/// forever, so it never saw the session end (the join below would time out).
#[test]
fn an_avail_index_left_beyond_the_ring_does_not_spin() {
    let mut rig = rig();
    let fe = &mut rig.guest.fe;
    fe.set_avail_idx(TX, QUEUE_SIZES[TX] + 1).unwrap();
    fe.kick(TX).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(rig.guest);
    join_within(rig.server, T).unwrap();
}

/// Dirty-page logging (LOG_SHMFD, LOG_ALL): a packet to the guest (the
/// REQUEST of a host client's CONNECT) marks its rx buffer's page and the
/// used ring's page in the front end's log, and no page the device did not
/// write.
#[test]
fn packet_to_the_guest_is_logged() {
    use crate::test_frontend::LOG_PAGE;
    let (mut fe, dir, server) = serve(false);
    fe.activate(1 << VIRTIO_F_VERSION_1, &QUEUE_SIZES).unwrap();
    fe.start_logging().unwrap();
    let buf = fe.memory.alloc(2 * LOG_PAGE, LOG_PAGE).unwrap();
    let untouched = fe.memory.alloc(LOG_PAGE, LOG_PAGE).unwrap().0;
    fe.add_chain(RX, &[Buf::input(buf, RX_BUF)]).unwrap();
    fe.kick(RX).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    fe.take_dirty().unwrap();
    let mut client = UnixStream::connect(dir.path("v.sock")).unwrap();
    client.write_all(b"CONNECT 1234\n").unwrap();
    let used = fe.wait_used(RX, 1, T).unwrap();
    assert_eq!(used.len(), 1, "no REQUEST for the guest");
    assert_eq!(used[0].len as usize, HDR_LEN);
    let mut raw = [0u8; HDR_LEN];
    fe.mem().read_slice(&mut raw, buf).unwrap();
    assert_eq!(Header::from_bytes(&raw).op(), Some(Op::Request));
    let dirty = fe.take_dirty().unwrap();
    let used_page = fe.queues[RX].as_ref().unwrap().used.0 & !(LOG_PAGE - 1);
    for page in [buf.0, used_page] {
        assert!(dirty.contains(&page), "page {page:#x} not marked; marked: {dirty:x?}");
    }
    assert!(!dirty.contains(&untouched), "a page the device never wrote is marked");
    drop(client);
    drop(fe);
    join_within(server, T).unwrap();
}
