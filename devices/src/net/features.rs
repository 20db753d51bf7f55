//! Which virtio-net features we offer, and how acknowledged offloads map to
//! the TAP's `TUNSETOFFLOAD` flags.
//!
//! Offloads are offered only when the TAP can carry them: host-side ones
//! (the guest hands us partially checksummed or GSO frames) need the TAP's
//! virtio-net header (IFF_VNET_HDR), which tells the kernel what to finish;
//! guest-side ones (we hand the guest such frames) additionally need the TAP
//! to accept the matching `TUNSETOFFLOAD` flag, because that flag is what
//! allows the kernel to give us unfinished frames at all.

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::MacAddr;

/// `TUNSETOFFLOAD` flags (linux/if_tun.h), as `libc` spells them.
pub const TUN_F_CSUM: u32 = libc::TUN_F_CSUM;
pub const TUN_F_TSO4: u32 = libc::TUN_F_TSO4;
pub const TUN_F_TSO6: u32 = libc::TUN_F_TSO6;
pub const TUN_F_TSO_ECN: u32 = libc::TUN_F_TSO_ECN;

/// The size of the config space (virtio 1.2, 5.1.4): mac, status,
/// max_virtqueue_pairs, mtu. mm-vmm reads exactly this many bytes.
pub const CONFIG_SIZE: usize = 12;

const fn bit(n: u32) -> u64 {
    1 << n
}

/// Features every instance offers, whatever its TAP can do.
pub fn base_features() -> u64 {
    bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        // Dirty-page logging for live snapshots (vhost-user-backend logs
        // through `crate::LoggedMemory`); a vhost-user bit the guest
        // driver never sees.
        | VhostUserVirtioFeatures::LOG_ALL.bits()
}

/// Everything we offer, given whether the TAP has a virtio-net header and
/// which `TUNSETOFFLOAD` flags it accepted.
pub fn offered_features(vnet_hdr: bool, tun_offloads: u32) -> u64 {
    let mut features = base_features();
    if !vnet_hdr {
        return features;
    }
    // Host side: the kernel completes checksums and segments GSO frames
    // written to a vnet-header TAP, so these need nothing more.
    features |= bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6);
    features |= bit(VIRTIO_NET_F_HOST_ECN);
    // Guest side: only what the TAP agreed to hand us.
    if tun_offloads & TUN_F_CSUM != 0 {
        features |= bit(VIRTIO_NET_F_GUEST_CSUM);
        if tun_offloads & TUN_F_TSO4 != 0 {
            features |= bit(VIRTIO_NET_F_GUEST_TSO4);
        }
        if tun_offloads & TUN_F_TSO6 != 0 {
            features |= bit(VIRTIO_NET_F_GUEST_TSO6);
        }
        if tun_offloads & TUN_F_TSO_ECN != 0 && tun_offloads & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
            features |= bit(VIRTIO_NET_F_GUEST_ECN);
        }
    }
    features
}

/// The `TUNSETOFFLOAD` flags for what the guest driver acknowledged: the
/// TAP may hand us only frames the guest said it can take.
pub fn tun_offloads_for(acked: u64) -> u32 {
    let has = |f: u32| acked & bit(f) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
        flags |= TUN_F_TSO_ECN;
    }
    flags
}

/// True when the driver acknowledged mergeable receive buffers, so a frame
/// may span several rx chains.
pub fn mergeable_rx(acked: u64) -> bool {
    acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0
}

/// The config space: our MAC, link up, one queue pair, no MTU advice.
pub fn config_space(mac: MacAddr) -> [u8; CONFIG_SIZE] {
    let mut config = [0u8; CONFIG_SIZE];
    config[..6].copy_from_slice(&mac.0);
    config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    config[8..10].copy_from_slice(&1u16.to_le_bytes());
    config
}

/// `size` bytes of `config` from `offset`, zero-filled past its end (the
/// front end asks for a fixed size); empty if the request overflows.
pub fn read_config(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    // The vhost-user config message carries at most 4 KiB.
    let Some(end) = offset.checked_add(size).filter(|_| size <= 4096) else {
        return Vec::new();
    };
    let (offset, size, end) = (offset as usize, size as usize, end as usize);
    let mut out = vec![0u8; size];
    if offset < config.len() {
        let avail = config.len().min(end) - offset;
        out[..avail].copy_from_slice(&config[offset..offset + avail]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_offloads_without_vnet_hdr() {
        let f = offered_features(false, TUN_F_CSUM | TUN_F_TSO4);
        assert_eq!(f, base_features());
        assert_eq!(f & bit(VIRTIO_NET_F_CSUM), 0);
        assert_ne!(f & bit(VIRTIO_NET_F_MRG_RXBUF), 0);
        assert_ne!(f & bit(VIRTIO_NET_F_MAC), 0);
    }

    #[test]
    fn guest_offloads_follow_tun_flags() {
        let f = offered_features(true, 0);
        assert_ne!(f & bit(VIRTIO_NET_F_HOST_TSO4), 0);
        assert_eq!(f & bit(VIRTIO_NET_F_GUEST_CSUM), 0);
        // TSO without CSUM is not possible: the TAP would reject it anyway.
        let f = offered_features(true, TUN_F_TSO4);
        assert_eq!(f & bit(VIRTIO_NET_F_GUEST_TSO4), 0);
        let f = offered_features(true, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN);
        for b in [VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN] {
            assert_ne!(f & bit(b), 0, "bit {b}");
        }
    }

    #[test]
    fn acked_features_to_tun_flags() {
        assert_eq!(tun_offloads_for(0), 0);
        // TSO acked without CSUM (an invalid driver) gives the TAP nothing.
        assert_eq!(tun_offloads_for(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        let acked = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_ECN);
        assert_eq!(tun_offloads_for(acked), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN);
        assert_eq!(tun_offloads_for(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN)), TUN_F_CSUM);
    }

    #[test]
    fn config_layout() {
        let c = config_space(MacAddr([2, 0, 0, 0, 0, 9]));
        assert_eq!(c, [2, 0, 0, 0, 0, 9, 1, 0, 1, 0, 0, 0]);
        assert_eq!(read_config(&c, 0, 12), c.to_vec());
        assert_eq!(read_config(&c, 6, 2), vec![1, 0]);
        assert_eq!(read_config(&c, 10, 4), vec![0, 0, 0, 0]);
        assert_eq!(read_config(&c, 100, 2), vec![0, 0]);
        assert!(read_config(&c, u32::MAX, 2).is_empty());
    }
}
