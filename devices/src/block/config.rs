//! What the block device offers: virtio feature bits, vhost-user protocol
//! features, and the virtio-blk config space (virtio 1.2, 5.2.4).

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, virtio_blk_config,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Sector size of the virtio-blk protocol: sector numbers, capacity and
/// request lengths are all in these units, whatever the image's block size.
pub const SECTOR_SIZE: u64 = 512;
/// `SECTOR_SIZE` as a shift.
pub const SECTOR_SHIFT: u32 = 9;

/// Largest queue the driver may configure. mm-vmm offers 256; a larger cap
/// costs nothing and suits other front ends.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// The block device has one request queue (no VIRTIO_BLK_F_MQ).
pub const NUM_QUEUES: usize = 1;

/// Data segments per request we advertise (VIRTIO_BLK_F_SEG_MAX). With the
/// header and status descriptors a request then fits a 128-entry queue even
/// without indirect descriptors, as in QEMU.
pub const SEG_MAX: u32 = 126;
/// Upper bound on descriptors in one chain, indirect tables included: the
/// chain walk does no more work than this per request, whatever the guest
/// writes.
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// Per-request limits for DISCARD and WRITE_ZEROES (in sectors): 1 GiB, so a
/// single request cannot keep the worker busy for long on the zero-writing
/// fallback.
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) >> SECTOR_SHIFT;
pub const MAX_WRITE_ZEROES_SECTORS: u32 = (1 << 30) >> SECTOR_SHIFT;
/// One range per DISCARD/WRITE_ZEROES request, as QEMU: Linux honours it.
pub const MAX_DISCARD_SEG: u32 = 1;
pub const MAX_WRITE_ZEROES_SEG: u32 = 1;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Virtio features offered to the driver (through the front end).
pub fn device_features(read_only: bool) -> u64 {
    let mut features = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_FLUSH)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        // Dirty-page logging for live snapshots (see `dirty_log`): a
        // vhost-user bit, never shown to the guest driver.
        | VhostUserVirtioFeatures::LOG_ALL.bits();
    if read_only {
        features |= bit(VIRTIO_BLK_F_RO);
    } else {
        features |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
    }
    features
}

/// Whether the driver may use indirect descriptor tables.
pub fn indirect_enabled(acked: u64) -> bool {
    acked & bit(VIRTIO_RING_F_INDIRECT_DESC) != 0
}

/// Whether the driver can ask for flushes (else writes are write-through).
pub fn flush_enabled(acked: u64) -> bool {
    acked & bit(VIRTIO_BLK_F_FLUSH) != 0
}

/// Whether used/avail event indices are in use.
pub fn event_idx_enabled(acked: u64) -> bool {
    acked & bit(VIRTIO_RING_F_EVENT_IDX) != 0
}

/// vhost-user protocol features: config space, acked requests, the
/// in-flight table that lets a restarted block process lose nothing, the
/// shared dirty log (SET_LOG_BASE with a memfd), and,
/// serving a lazily restored guest, PAGEFAULT (see `postcopy`).
pub fn protocol_features(lazy_memory: bool) -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
        | crate::lazy_memory::protocol_features(lazy_memory)
}

/// The config space, as little-endian bytes at the offsets of `struct
/// virtio_blk_config` (the bindings' struct is packed, so it is serialised
/// by hand). Fields past `write_zeroes_may_unmap` (secure erase, zoned) are
/// zero: those features are not offered.
pub fn config_space(capacity_sectors: u64) -> Vec<u8> {
    let mut c = vec![0u8; std::mem::size_of::<virtio_blk_config>()];
    let mut put = |offset: usize, bytes: &[u8]| c[offset..offset + bytes.len()].copy_from_slice(bytes);
    put(0, &capacity_sectors.to_le_bytes()); // capacity
    put(12, &SEG_MAX.to_le_bytes()); // seg_max
    put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
    put(34, &1u16.to_le_bytes()); // num_queues
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
    put(40, &MAX_DISCARD_SEG.to_le_bytes()); // max_discard_seg
    put(44, &1u32.to_le_bytes()); // discard_sector_alignment
    put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &MAX_WRITE_ZEROES_SEG.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn config_offsets_match_the_bindings() {
        assert_eq!(offset_of!(virtio_blk_config, seg_max), 12);
        assert_eq!(offset_of!(virtio_blk_config, blk_size), 20);
        assert_eq!(offset_of!(virtio_blk_config, num_queues), 34);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_sectors), 36);
        assert_eq!(offset_of!(virtio_blk_config, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(virtio_blk_config, write_zeroes_may_unmap), 56);
        let c = config_space(2048);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert!(c.len() >= 60, "mm-vmm reads 60 bytes");
    }
}
