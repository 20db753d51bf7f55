//! End-to-end: `serve_net` on a real TAP in a test-created network
//! namespace, driven over vhost-user by the test front end standing in for
//! mm-vmm and the guest driver.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use vm_memory::{Address, Bytes, GuestAddress};

use super::testnet::{TestNetns, join_within, queued_listener, recv_frame, send_frame};
use super::{MacAddr, NetConfig, NetError, serve_net};
use crate::test_frontend::{Buf, TestFrontend, TestMemory, UsedElem};

const MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x42]);
/// IEEE "local experimental" ethertype: nothing else on the link uses it.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const T: Duration = Duration::from_secs(5);
const RX: usize = 0;
const TX: usize = 1;

struct Rig {
    fe: TestFrontend,
    sock: OwnedFd,
    server: JoinHandle<Result<(), NetError>>,
    _ns: TestNetns,
}

fn bit(n: u32) -> u64 {
    1 << n
}

fn rig(vnet_hdr: bool, acked: u64) -> Option<Rig> {
    let ns = TestNetns::new("net")?;
    let (tap, sock) = ns.create_tap("mmtap0", vnet_hdr);
    ns.ip(&["link", "set", "dev", "mmtap0", "mtu", "9000"]);
    let (listener, stream) = queued_listener();
    let server = std::thread::spawn(move || serve_net(NetConfig { tap, mac: MAC, lazy_memory: false }, listener));
    let memory = TestMemory::new(0x1_0000_0000, 16 << 20).unwrap();
    let mut fe = TestFrontend::connect(stream, memory, 2).unwrap();
    fe.activate(acked, &[256, 256]).unwrap();
    Some(Rig { fe, sock, server, _ns: ns })
}

fn test_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&MAC.0);
    f.extend_from_slice(&ETHERTYPE);
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    f
}

fn ours(frame: &[u8]) -> bool {
    frame.len() > 14 && frame[12..14] == ETHERTYPE
}

/// The bytes the device wrote into a used rx buffer.
fn read_used(fe: &TestFrontend, bufs: &HashMap<u32, GuestAddress>, elem: UsedElem) -> Vec<u8> {
    let mut data = vec![0u8; elem.len as usize];
    fe.mem().read_slice(&mut data, bufs[&elem.id]).unwrap();
    data
}

fn guest_sends_and_receives(vnet_hdr: bool) {
    let acked =
        bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS) | bit(VIRTIO_NET_F_MRG_RXBUF);
    let Some(mut rig) = rig(vnet_hdr, acked) else { return };
    let fe = &mut rig.fe;

    // Config space: our MAC, link up.
    let config = fe.get_config(0, 12).unwrap();
    assert_eq!(&config[..6], &MAC.0);
    assert_eq!(&config[6..8], &[1, 0]);
    let offloads = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4);
    assert_eq!(fe.offered_features & offloads != 0, vnet_hdr);

    // tx: header and frame in separate descriptors, out of the TAP.
    let frame = test_frame(1400, 1);
    let hdr = fe.alloc(12).unwrap();
    let body = fe.alloc(frame.len() as u64).unwrap();
    fe.mem().write_slice(&[0u8; 12], hdr).unwrap();
    fe.mem().write_slice(&frame, body).unwrap();
    fe.add_chain(TX, &[Buf::out(hdr, 12), Buf::out(body, frame.len() as u32)]).unwrap();
    fe.kick(TX).unwrap();
    assert_eq!(recv_frame(&rig.sock, T, ours).expect("frame from the guest"), frame);
    assert_eq!(fe.wait_used(TX, 1, T).unwrap().len(), 1);

    // rx: a 4000-byte frame into 1 KiB mergeable buffers (12 + 4000 bytes
    // need four), posted before the frame exists.
    let mut bufs = HashMap::new();
    for _ in 0..8 {
        let b = fe.alloc(1024).unwrap();
        bufs.insert(u32::from(fe.add_chain(RX, &[Buf::input(b, 1024)]).unwrap()), b);
    }
    fe.kick(RX).unwrap();
    let frame = test_frame(4000, 2);
    send_frame(&rig.sock, &frame).unwrap();
    let mut got = Vec::new();
    let mut used = Vec::new();
    // Skip anything else the namespace's stack might emit.
    while got.len() < 12 + 14 || !ours(&got[12..]) {
        used = fe.wait_used(RX, 1, T).unwrap();
        assert!(!used.is_empty(), "no rx");
        got = read_used(fe, &bufs, used[0]);
    }
    let num_buffers = u16::from_le_bytes([got[10], got[11]]) as usize;
    assert_eq!(num_buffers, 4);
    while used.len() < num_buffers {
        used.extend(fe.wait_used(RX, num_buffers - used.len(), T).unwrap());
    }
    for &elem in &used[1..num_buffers] {
        got.extend(read_used(fe, &bufs, elem));
    }
    assert_eq!(&got[12..], &frame[..]);

    drop(rig.fe);
    join_within(rig.server, T).unwrap();
}

#[test]
fn tap_with_vnet_hdr() {
    guest_sends_and_receives(true);
}

#[test]
fn tap_without_vnet_hdr() {
    guest_sends_and_receives(false);
}

/// A frame that arrives before the guest posted any buffer waits in the
/// device (nothing spins, nothing is lost) and is delivered on the rx kick;
/// with EVENT_IDX and offloads negotiated, as a Linux guest would.
#[test]
fn frame_waits_for_rx_buffers() {
    use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    let acked = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_HOST_TSO4);
    let Some(mut rig) = rig(true, acked) else { return };
    let fe = &mut rig.fe;
    let frame = test_frame(1000, 3);
    send_frame(&rig.sock, &frame).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(fe.take_used(RX).unwrap().is_empty());

    let mut bufs = HashMap::new();
    for _ in 0..4 {
        let b = fe.alloc(2048).unwrap();
        bufs.insert(u32::from(fe.add_chain(RX, &[Buf::input(b, 2048)]).unwrap()), b);
    }
    fe.kick(RX).unwrap();
    let found = (0..4).any(|_| {
        let used = fe.wait_used(RX, 1, T).unwrap();
        used.iter().any(|&e| {
            let got = read_used(fe, &bufs, e);
            got.len() > 12 && got[12..] == frame[..]
        })
    });
    assert!(found, "the waiting frame was not delivered");
    drop(rig.fe);
    join_within(rig.server, T).unwrap();
}

/// Dirty-page logging (LOG_SHMFD, LOG_ALL): a frame from the TAP marks the
/// pages of the rx buffers it went into and the used ring's page in the
/// front end's log, and nothing else the device did not write.
#[test]
fn rx_frame_is_logged() {
    use crate::test_frontend::LOG_PAGE;
    let acked = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_MRG_RXBUF);
    let Some(mut rig) = rig(true, acked) else { return };
    let fe = &mut rig.fe;
    fe.start_logging().unwrap();
    // Each buffer on a page of its own, starting mid-page so a buffer
    // spans two.
    let mut bufs = HashMap::new();
    for _ in 0..4 {
        let b = fe.memory.alloc(3 * LOG_PAGE, LOG_PAGE).unwrap().unchecked_add(LOG_PAGE / 2);
        bufs.insert(u32::from(fe.add_chain(RX, &[Buf::input(b, 4096)]).unwrap()), b);
    }
    let untouched = fe.memory.alloc(LOG_PAGE, LOG_PAGE).unwrap().0;
    fe.kick(RX).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(fe.take_used(RX).unwrap().is_empty());
    fe.take_dirty().unwrap();
    let frame = test_frame(3000, 4);
    send_frame(&rig.sock, &frame).unwrap();
    let mut ours_at = None;
    while ours_at.is_none() {
        let used = fe.wait_used(RX, 1, T).unwrap();
        assert!(!used.is_empty(), "no rx");
        ours_at = used.into_iter().find(|&e| ours(&read_used(fe, &bufs, e)[12..])).map(|e| (bufs[&e.id], e.len));
    }
    let (addr, len) = ours_at.unwrap();
    assert_eq!(len as usize, 12 + frame.len());
    let dirty = fe.take_dirty().unwrap();
    let used_page = fe.queues[RX].as_ref().unwrap().used.0 & !(LOG_PAGE - 1);
    let first = addr.0 & !(LOG_PAGE - 1);
    for page in [first, first + LOG_PAGE, used_page] {
        assert!(dirty.contains(&page), "page {page:#x} not marked; marked: {dirty:x?}");
    }
    assert!(!dirty.contains(&untouched), "a page the device never wrote is marked");
    drop(rig.fe);
    join_within(rig.server, T).unwrap();
}
