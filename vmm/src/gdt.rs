//! The flat 64-bit GDT the boot vCPU starts with, and the KVM segment
//! registers that describe the same descriptors.

use kvm_bindings::kvm_segment;

/// Descriptor flags: 64-bit code, data, and a busy TSS.
const CODE64_FLAGS: u16 = 0xa09b;
const DATA_FLAGS: u16 = 0xc093;
const TSS_FLAGS: u16 = 0x808b;
const FLAT_LIMIT: u32 = 0xfffff;

/// Packs a segment descriptor (Intel SDM vol. 3, 3.4.5).
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
}

/// Null, code (selector 0x8), data (0x10), TSS (0x18).
pub const BOOT_GDT: [u64; 4] = [
    0,
    descriptor(CODE64_FLAGS, 0, FLAT_LIMIT),
    descriptor(DATA_FLAGS, 0, FLAT_LIMIT),
    descriptor(TSS_FLAGS, 0, FLAT_LIMIT),
];
pub const CODE_INDEX: u16 = 1;
pub const DATA_INDEX: u16 = 2;
pub const TSS_INDEX: u16 = 3;

/// The KVM view of GDT entry `index`.
pub fn segment(index: u16) -> kvm_segment {
    let d = BOOT_GDT[usize::from(index)];
    let bit = |n: u32| ((d >> n) & 1) as u8;
    let granular = bit(55) == 1;
    let raw_limit = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((d >> 16) & 0xff_ffff) | ((d >> 32) & 0xff00_0000),
        limit: if granular { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: index * 8,
        type_: ((d >> 40) & 0xf) as u8,
        present,
        dpl: ((d >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_ring_0() {
        let cs = segment(CODE_INDEX);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.present, cs.s), (1, 0, 0, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.selector, 8);
    }

    #[test]
    fn data_and_tss_segments() {
        let ds = segment(DATA_INDEX);
        assert_eq!((ds.type_, ds.db, ds.l, ds.selector), (3, 1, 0, 0x10));
        let tr = segment(TSS_INDEX);
        assert_eq!((tr.type_, tr.s, tr.selector), (0xb, 0, 0x18));
    }
}
