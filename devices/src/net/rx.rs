//! Guest receive: one frame (virtio_net_hdr_v1 first) into the rx queue.
//!
//! With VIRTIO_NET_F_MRG_RXBUF a frame may span several chains, the header
//! going into the first and `num_buffers` saying how many there are; without
//! it a frame must fit one chain. Chains are collected before anything is
//! written, so a frame that does not fit yet consumes nothing and is retried
//! when the guest adds buffers.

use std::io::Write;

use vhost_user_backend::bitmap::BitmapMmapRegion;
use virtio_queue::{Queue, QueueOwnedT, QueueT, Writer};

use crate::LoggedMemory;

use super::tap::VNET_HDR_LEN;

/// What happened to one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written into this many chains (all now used).
    Delivered(usize),
    /// Not enough buffers yet; nothing was consumed.
    NoBuffers,
    /// The guest's buffers could not take it (malformed, or too small without
    /// mergeable buffers); this many chains were returned empty and the frame
    /// was dropped.
    Dropped(usize),
}

impl RxOutcome {
    /// Used-ring entries added (whether the guest needs an interrupt).
    pub fn used(self) -> usize {
        match self {
            RxOutcome::Delivered(n) | RxOutcome::Dropped(n) => n,
            RxOutcome::NoBuffers => 0,
        }
    }
}

/// Places `frame` (header included; `num_buffers` is filled in here) in
/// the rx queue.
pub fn deliver_frame(queue: &mut Queue, mem: &LoggedMemory, frame: &mut [u8], mergeable: bool) -> RxOutcome {
    debug_assert!(frame.len() >= VNET_HDR_LEN);
    let mut writers: Vec<(u16, Writer<'_, BitmapMmapRegion>)> = Vec::new();
    let mut capacity = 0usize;
    let mut popped = 0usize;
    while capacity < frame.len() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            if popped >= usize::from(queue.size()) {
                // Every buffer the ring can hold is too small together: the
                // guest will not add more, so waiting would wedge rx.
                return return_empty(queue, mem, writers.iter().map(|(h, _)| *h));
            }
            for _ in 0..popped {
                queue.go_to_previous_position();
            }
            return RxOutcome::NoBuffers;
        };
        popped += 1;
        let head = chain.head_index();
        // The header must fit the first buffer (virtio 1.2, 5.1.6.3.1).
        let min = if writers.is_empty() { VNET_HDR_LEN } else { 1 };
        match Writer::new(mem, chain) {
            Ok(w) if w.available_bytes() >= min => {
                capacity = capacity.saturating_add(w.available_bytes());
                writers.push((head, w));
            }
            _ => {
                // A chain we cannot write (out of guest RAM, read-only, too
                // small): hand it and any collected ones back empty.
                let heads: Vec<u16> = writers.iter().map(|(h, _)| *h).chain([head]).collect();
                return return_empty(queue, mem, heads);
            }
        }
        if !mergeable {
            break;
        }
    }
    if capacity < frame.len() {
        return return_empty(queue, mem, writers.iter().map(|(h, _)| *h));
    }

    let count = writers.len();
    frame[10..12].copy_from_slice(&(count as u16).to_le_bytes());
    let mut offset = 0;
    for (head, mut writer) in writers {
        let n = writer.available_bytes().min(frame.len() - offset);
        if let Err(e) = writer.write_all(&frame[offset..offset + n]) {
            tracing::warn!("net rx: writing guest buffer: {e}");
        }
        offset += n;
        if let Err(e) = queue.add_used(mem, head, n as u32) {
            tracing::warn!("net rx: used ring: {e}");
        }
    }
    RxOutcome::Delivered(count)
}

fn return_empty(queue: &mut Queue, mem: &LoggedMemory, heads: impl IntoIterator<Item = u16>) -> RxOutcome {
    let mut n = 0;
    for head in heads {
        if queue.add_used(mem, head, 0).is_ok() {
            n += 1;
        }
    }
    tracing::debug!("net rx: dropped a frame the guest's buffers could not take");
    RxOutcome::Dropped(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::testq::{TestQueue, W};

    fn frame(len: usize) -> Vec<u8> {
        let mut f: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        f[..VNET_HDR_LEN].fill(0);
        f
    }

    #[test]
    fn small_frame_one_chain() {
        let mut tq = TestQueue::new(16);
        tq.add(&[(0x10000, 2048, W)]);
        let mut f = frame(100);
        assert_eq!(deliver_frame(&mut tq.queue, &tq.mem, &mut f, true), RxOutcome::Delivered(1));
        assert_eq!(tq.used(), vec![(0, 100)]);
        let got = tq.read(0x10000, 100);
        assert_eq!(&got[10..12], &[1, 0]);
        assert_eq!(&got[12..], &f[12..]);
    }

    #[test]
    fn mergeable_spans_chains() {
        let mut tq = TestQueue::new(16);
        for i in 0..4u64 {
            tq.add(&[(0x10000 + i * 0x1000, 1000, W)]);
        }
        let mut f = frame(2500);
        assert_eq!(deliver_frame(&mut tq.queue, &tq.mem, &mut f, true), RxOutcome::Delivered(3));
        let used = tq.used();
        assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), vec![1000, 1000, 500]);
        let mut got = Vec::new();
        for (i, (_, len)) in used.iter().enumerate() {
            got.extend(tq.read(0x10000 + i as u64 * 0x1000, *len as usize));
        }
        assert_eq!(&got[10..12], &[3, 0]);
        assert_eq!(&got[12..], &f[12..]);
        // The fourth chain is still available for the next frame.
        let mut f = frame(60);
        assert_eq!(deliver_frame(&mut tq.queue, &tq.mem, &mut f, true), RxOutcome::Delivered(1));
    }

    #[test]
    fn waits_for_buffers_without_consuming() {
        let mut tq = TestQueue::new(16);
        tq.add(&[(0x10000, 1000, W)]);
        let mut f = frame(1500);
        assert_eq!(deliver_frame(&mut tq.queue, &tq.mem, &mut f, true), RxOutcome::NoBuffers);
        assert!(tq.used().is_empty());
        tq.add(&[(0x20000, 1000, W)]);
        assert_eq!(deliver_frame(&mut tq.queue, &tq.mem, &mut f, true), RxOutcome::Delivered(2));
        assert_eq!(tq.used(), vec![(0, 1000), (1, 500)]);
    }

    #[test]
    fn no_buffers_at_all() {
        let mut tq = TestQueue::new(16);
        let mut f = frame(60);
        assert_eq!(deliver_frame(&mut tq.queue, &tq.mem, &mut f, true), RxOutcome::NoBuffers);
    }

    #[test]
    fn without_mergeable_a_frame_needs_one_chain() {
        let mut tq = TestQueue::new(16);
        tq.add(&[(0x10000, 12, W), (0x11000, 2000, W)]);
        tq.add(&[(0x20000, 100, W)]);
        let mut f = frame(1500);
        assert_eq!(deliver_frame(&mut tq.queue, &tq.mem, &mut f, false), RxOutcome::Delivered(1));
        assert_eq!(&tq.read(0x10000, 12)[10..12], &[1, 0]);
        assert_eq!(tq.read(0x11000, 1488), f[12..].to_vec());
        // Too small: dropped, chain returned empty, nothing wedged.
        assert_eq!(deliver_frame(&mut tq.queue, &tq.mem, &mut f, false), RxOutcome::Dropped(1));
        assert_eq!(tq.used(), vec![(0, 1500), (2, 0)]);
    }

    #[test]
    fn malformed_chains_are_returned_not_fatal() {
        let mut tq = TestQueue::new(16);
        // Read-only buffer, buffer outside guest RAM, header-too-small buffer.
        tq.add(&[(0x10000, 2048, 0)]);
        tq.add(&[(0xffff_0000, 2048, W)]);
        tq.add(&[(0x10000, 4, W)]);
        tq.add(&[(0x10000, 2048, W)]);
        let mut f = frame(100);
        for _ in 0..3 {
            assert_eq!(deliver_frame(&mut tq.queue, &tq.mem, &mut f, true), RxOutcome::Dropped(1));
        }
        assert_eq!(deliver_frame(&mut tq.queue, &tq.mem, &mut f, true), RxOutcome::Delivered(1));
    }

    #[test]
    fn ring_full_of_tiny_buffers_drops_instead_of_wedging() {
        let mut tq = TestQueue::new(4);
        for i in 0..4u64 {
            tq.add(&[(0x10000 + i * 0x1000, 100, W)]);
        }
        let mut f = frame(1000);
        assert_eq!(deliver_frame(&mut tq.queue, &tq.mem, &mut f, true), RxOutcome::Dropped(4));
    }
}
