//! Guest transmit: each tx chain is one frame (virtio_net_hdr_v1 first),
//! written to the TAP as one write.
//!
//! The frame is copied out of guest memory before the write, so the guest
//! cannot change it while the kernel parses it. A chain we cannot read is
//! returned and its frame dropped; nothing a guest puts in a chain stops the
//! queue.

use std::io::Read;

use vhost_user_backend::bitmap::BitmapMmapRegion;
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader};

use crate::LoggedMemory;
use crate::rearm::Rearm;

use super::tap::{Tap, VNET_HDR_LEN};

/// The largest frame we take: header, a 64 KiB GSO packet, Ethernet and
/// VLAN headers.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65536 + 14 + 4;

/// Sends every frame the guest made available; returns how many chains
/// were used (whether the guest needs an interrupt).
pub fn process_tx(queue: &mut Queue, mem: &LoggedMemory, tap: &Tap, buf: &mut Vec<u8>) -> usize {
    let mut used = 0;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        match read_frame(mem, chain, buf) {
            Some(len) => {
                let frame = if tap.vnet_hdr() { &buf[..len] } else { &buf[VNET_HDR_LEN..len] };
                if let Err(e) = tap.write(frame) {
                    // The kernel refused it (a bad GSO header, the link is
                    // down): a lost frame, as on a real wire.
                    tracing::debug!("net tx: tap write of {} bytes: {e}", frame.len());
                }
            }
            None => tracing::debug!("net tx: dropped a malformed chain"),
        }
        // The device writes nothing into tx buffers: used length 0.
        if let Err(e) = queue.add_used(mem, head, 0) {
            tracing::warn!("net tx: used ring: {e}");
            break;
        }
        used += 1;
    }
    used
}

/// Sends frames until the guest has made no more available, with
/// notifications off meanwhile (so it does not kick for each frame), and
/// on again before the last look so a frame added at that moment is not
/// missed. Returns how many chains were used.
pub fn drain_tx(queue: &mut Queue, mem: &LoggedMemory, tap: &Tap, buf: &mut Vec<u8>) -> usize {
    let mut used = 0;
    let mut rearm = Rearm::default();
    loop {
        let _ = queue.disable_notification(mem);
        used += process_tx(queue, mem, tap, buf);
        // Not forever on a broken ring (crate::rearm; found here by the
        // `net_tx` fuzz target).
        if !rearm.again(queue, mem, used) {
            break;
        }
    }
    used
}

/// Copies a chain's readable bytes into `buf`; `None` when the chain is
/// outside guest memory, too short for a header or too long for a frame.
fn read_frame(mem: &LoggedMemory, chain: DescriptorChain<&LoggedMemory>, buf: &mut Vec<u8>) -> Option<usize> {
    let mut reader: Reader<'_, BitmapMmapRegion> = Reader::new(mem, chain).ok()?;
    let len = reader.available_bytes();
    if !(VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&len) {
        return None;
    }
    buf.resize(len, 0);
    reader.read_exact(&mut buf[..len]).ok()?;
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::testq::{TestQueue, W};
    use std::os::unix::net::UnixDatagram;

    fn setup(vnet_hdr: bool) -> (TestQueue, Tap, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        (TestQueue::new(16), Tap::from_parts(a.into(), vnet_hdr, 0), b)
    }

    fn recv(peer: &UnixDatagram) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70000];
        peer.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
    }

    #[test]
    fn frame_split_over_descriptors_is_one_write() {
        let (mut tq, tap, peer) = setup(true);
        let frame: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        tq.write(0x10000, &frame[..12]);
        tq.write(0x20000, &frame[12..500]);
        tq.write(0x30000, &frame[500..]);
        tq.add(&[(0x10000, 12, 0), (0x20000, 488, 0), (0x30000, 500, 0)]);
        let mut buf = Vec::new();
        assert_eq!(process_tx(&mut tq.queue, &tq.mem, &tap, &mut buf), 1);
        assert_eq!(recv(&peer).unwrap(), frame);
        assert_eq!(tq.used(), vec![(0, 0)]);
    }

    #[test]
    fn header_stripped_without_vnet_hdr() {
        let (mut tq, tap, peer) = setup(false);
        let frame: Vec<u8> = (0..100u32).map(|i| i as u8).collect();
        tq.write(0x10000, &frame);
        tq.add(&[(0x10000, 100, 0)]);
        process_tx(&mut tq.queue, &tq.mem, &tap, &mut Vec::new());
        assert_eq!(recv(&peer).unwrap(), frame[12..].to_vec());
    }

    /// Regression (found by the `net_tx` fuzz target): an avail index more
    /// than a ring ahead made the drain loop spin forever.
    #[test]
    fn avail_index_beyond_the_ring_does_not_spin() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut tq, tap, peer) = setup(true);
            tq.write(0x10000, &[0u8; 60]);
            tq.add(&[(0x10000, 60, 0)]);
            // The avail index (at avail + 2) claims 17 chains in a ring of 16.
            tq.write(0x4002, &17u16.to_le_bytes());
            let used = drain_tx(&mut tq.queue, &tq.mem, &tap, &mut Vec::new());
            let _ = tx.send((used, recv(&peer)));
        });
        let (used, frame) = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("drain_tx returned");
        assert_eq!((used, frame), (0, None), "a broken ring yields nothing");
    }

    #[test]
    fn drain_takes_everything_available() {
        let (mut tq, tap, peer) = setup(true);
        tq.write(0x10000, &[0u8; 60]);
        for _ in 0..3 {
            tq.add(&[(0x10000, 60, 0)]);
        }
        assert_eq!(drain_tx(&mut tq.queue, &tq.mem, &tap, &mut Vec::new()), 3);
        assert!((0..3).all(|_| recv(&peer).is_some()));
    }

    #[test]
    fn malformed_chains_are_used_and_dropped() {
        let (mut tq, tap, peer) = setup(true);
        tq.add(&[(0x10000, 8, 0)]); // shorter than the header
        tq.add(&[(0xffff_0000, 100, 0)]); // outside guest RAM
        tq.add(&[(0x10000, 100, W)]); // nothing readable
        tq.add(&[(0x10000, 0x20000, 0), (0x30000, 0x20000, 0)]); // too long
        tq.write(0x10000, &[0u8; 60]);
        tq.add(&[(0x10000, 60, 0)]); // fine
        assert_eq!(process_tx(&mut tq.queue, &tq.mem, &tap, &mut Vec::new()), 5);
        assert_eq!(recv(&peer).unwrap().len(), 60);
        assert!(recv(&peer).is_none());
    }
}
