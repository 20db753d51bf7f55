//! The fuzz entry point for the net back end's transmit path: a split
//! virtqueue whose descriptor table, avail ring and buffers all come from
//! the fuzz input, drained by [`drain_tx`] (the loop the back end runs on a
//! tx kick) into a socketpair standing in for the TAP. Shared by
//! `devices/fuzz` (cargo-fuzz target `net_tx`) and a deterministic `#[test]`
//! so stable CI runs it too.
//!
//! The ring is laid out in raw guest memory rather than built with
//! `virtio_queue::mock::MockSplitQueue`, which only writes well-formed
//! chains: here the guest may write anything, avail index included.
//!
//! Input layout: byte 0 picks the queue size (1 << (b % 11), up to the
//! back end's 1024), byte 1 flags (bit 0: the TAP has a virtio-net header,
//! bit 1: EVENT_IDX), bytes 2-3 the ring index the rings start at (a
//! restarted back end's vring base), bytes 4-5 the length of the initial
//! memory image that follows. The image is copied to the start of guest
//! memory, where the descriptor table is, followed by the avail ring, the
//! used ring and free space. The queue is drained once; then each patch
//! (`offset/2` u16, `len` u8, bytes) is written to guest memory, as a
//! driver adding buffers would, and the queue drained again.

use std::os::unix::net::UnixDatagram;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::LoggedMemory;

use super::tap::{Tap, VNET_HDR_LEN};
use super::tx::{MAX_FRAME_LEN, drain_tx};

/// Guest memory the fuzzer writes: 128 KiB at a nonzero guest address,
/// enough for a ring of 1024 and (with descriptors reusing memory) chains
/// longer than the largest frame.
pub const MEM_BASE: u64 = 0x1_0000;
pub const MEM_SIZE: usize = 0x2_0000;
/// The largest queue the back end accepts.
const MAX_QUEUE_SIZE: u16 = 1024;

/// Where the rings of a queue of `size` live: descriptor table at the base,
/// avail ring after it, used ring after that (4-byte aligned).
pub fn ring_addresses(size: u16) -> (u64, u64, u64) {
    let desc = MEM_BASE;
    let avail = desc + 16 * u64::from(size);
    let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
    (desc, avail, used)
}

/// Runs one fuzz input. Panics only if an invariant breaks.
pub fn fuzz_net_tx(data: &[u8]) {
    let [b0, flags, base0, base1, len0, len1, rest @ ..] = data else { return };
    let size = 1u16 << (b0 % 11);
    let vnet_hdr = flags & 1 != 0;
    let base = u16::from_le_bytes([*base0, *base1]);
    let image_len = usize::from(u16::from_le_bytes([*len0, *len1])).min(rest.len());
    let (image, mut patches) = rest.split_at(image_len);

    let Ok(mem) = LoggedMemory::from_ranges(&[(GuestAddress(MEM_BASE), MEM_SIZE)]) else { return };
    if mem.write_slice(image, GuestAddress(MEM_BASE)).is_err() {
        return;
    }
    let (desc, avail, used) = ring_addresses(size);
    let Ok(mut queue) = Queue::new(MAX_QUEUE_SIZE) else { return };
    queue.set_size(size);
    if queue.try_set_desc_table_address(GuestAddress(desc)).is_err()
        || queue.try_set_avail_ring_address(GuestAddress(avail)).is_err()
        || queue.try_set_used_ring_address(GuestAddress(used)).is_err()
    {
        return;
    }
    queue.set_event_idx(flags & 2 != 0);
    queue.set_next_avail(base);
    queue.set_next_used(base);
    queue.set_ready(true);
    assert!(queue.is_valid(&mem), "the fuzz ring layout is outside guest memory");

    let Ok((tap_end, sink)) = UnixDatagram::pair() else { return };
    if sink.set_nonblocking(true).is_err() {
        return;
    }
    let tap = Tap::from_parts(tap_end.into(), vnet_hdr, 0);
    let mut buf = Vec::new();

    loop {
        let before = queue.next_used();
        let n = drain_tx(&mut queue, &mem, &tap, &mut buf);
        // With the ring standing still, one drain takes at most a ring's
        // worth, and every chain it takes is returned.
        assert!(n <= usize::from(size), "{n} chains used from a ring of {size}");
        assert_eq!(queue.next_used().wrapping_sub(before), n as u16, "used index moved by other than {n}");
        for k in 0..n as u16 {
            let slot = u64::from(before.wrapping_add(k) % size);
            let id: u32 = mem.read_obj(GuestAddress(used + 4 + 8 * slot)).unwrap_or(u32::MAX);
            let len: u32 = mem.read_obj(GuestAddress(used + 8 + 8 * slot)).unwrap_or(u32::MAX);
            assert!(u32::from_le(id) < u32::from(size), "used element {id} outside the ring");
            assert_eq!(u32::from_le(len), 0, "a tx buffer reported as written");
        }
        let mut frames = 0;
        let mut frame = vec![0u8; MAX_FRAME_LEN + 1];
        while let Ok(len) = sink.recv(&mut frame) {
            frames += 1;
            let min = if vnet_hdr { VNET_HDR_LEN } else { 0 };
            let max = if vnet_hdr { MAX_FRAME_LEN } else { MAX_FRAME_LEN - VNET_HDR_LEN };
            assert!((min..=max).contains(&len), "a {len}-byte frame reached the TAP");
        }
        assert!(frames <= n, "{frames} frames from {n} chains");

        let [o0, o1, plen, tail @ ..] = patches else { return };
        let offset = u64::from(u16::from_le_bytes([*o0, *o1])) * 2;
        let plen = usize::from(*plen).min(tail.len());
        let _ = mem.write_slice(&tail[..plen], GuestAddress(MEM_BASE + offset));
        patches = &tail[plen..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(image: &mut Vec<u8>, at: u64, bytes: &[u8]) {
        let at = (at - MEM_BASE) as usize;
        if image.len() < at + bytes.len() {
            image.resize(at + bytes.len(), 0);
        }
        image[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// A ring with a few plausible chains: descriptors mostly in memory,
    /// mostly readable, some chained or indirect; an avail index usually
    /// within a ring's worth of the start.
    fn ring_input(rng: &mut fastrand::Rng) -> Vec<u8> {
        let shift = rng.u64(0..6) as u8;
        let size = 1u16 << shift;
        let base = if rng.u64(0..4) == 0 { rng.u64(..) as u16 } else { 0 };
        let (desc, avail, used) = ring_addresses(size);
        let buffers = used + 6 + 8 * u64::from(size) + 64;
        let mut image = Vec::new();
        for i in 0..u64::from(size) {
            let addr = match rng.u64(0..10) {
                0 => rng.u64(..),
                1 => MEM_BASE + MEM_SIZE as u64 - rng.u64(0..64),
                _ => buffers + rng.u64(0..4096),
            };
            let len = match rng.u64(0..4) {
                0 => 12,
                1 => 60 + rng.u64(0..1500) as u32,
                2 => rng.u64(0..0x1_2000) as u32,
                _ => rng.u64(0..40) as u32,
            };
            let mut dflags = 0u16;
            if rng.u64(0..3) == 0 {
                dflags |= 1;
            }
            if rng.u64(0..8) == 0 {
                dflags |= 2;
            }
            if rng.u64(0..16) == 0 {
                dflags |= 4;
            }
            let next = rng.u64(0..u64::from(size) + 1) as u16;
            let mut d = addr.to_le_bytes().to_vec();
            d.extend(len.to_le_bytes());
            d.extend(dflags.to_le_bytes());
            d.extend(next.to_le_bytes());
            put(&mut image, desc + 16 * i, &d);
        }
        let count = rng.u64(0..u64::from(size) + 2) as u16;
        put(&mut image, avail + 2, &base.wrapping_add(count).to_le_bytes());
        for i in 0..u64::from(size) {
            put(&mut image, avail + 4 + 2 * i, &(rng.u64(0..u64::from(size)) as u16).to_le_bytes());
        }
        let mut input = vec![shift, rng.u64(0..4) as u8];
        input.extend(base.to_le_bytes());
        input.extend((image.len() as u16).to_le_bytes());
        input.extend(image);
        // One patch: the driver makes one more chain available.
        let off = ((avail + 2 - MEM_BASE) / 2) as u16;
        input.extend(off.to_le_bytes());
        input.push(2);
        input.extend(base.wrapping_add(count).wrapping_add(1).to_le_bytes());
        input
    }

    #[test]
    fn fuzz_entry_point_on_deterministic_inputs() {
        let mut rng = fastrand::Rng::with_seed(0x6d6d_6e65_7474_7821);
        for i in 0..400 {
            let input = if i % 4 == 0 {
                (0..rng.u64(0..600)).map(|_| rng.u64(..) as u8).collect()
            } else {
                ring_input(&mut rng)
            };
            fuzz_net_tx(&input);
        }
    }
}
