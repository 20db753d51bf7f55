//! The CPUID each vCPU sees: KVM's supported set, given a per-vCPU topology
//! and, on PVM hosts, stripped of what PVM's emulator cannot run (PVM.md).
//!
//! The filtering is a pure function over the entries so it can be tested
//! without KVM.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1, ECX.
const LEAF1_ECX_FMA: u32 = 1 << 12;
const LEAF1_ECX_CX16: u32 = 1 << 13;
const LEAF1_ECX_POPCNT: u32 = 1 << 23;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_F16C: u32 = 1 << 29;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1, EDX: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 7.0, EBX: AVX2, the AVX-512 family and SMAP.
const LEAF7_EBX_AVX2: u32 = 1 << 5;
const LEAF7_EBX_SMAP: u32 = 1 << 20;
const LEAF7_EBX_AVX512_MASK: u32 =
    (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31);
/// Leaf 7.0, EDX: IA32_ARCH_CAPABILITIES, an MSR PVM cannot set.
const LEAF7_EDX_ARCH_CAPABILITIES: u32 = 1 << 29;
/// KVM paravirt features (leaf 0x40000001, EAX) that work on PVM: the clock
/// sources and the no-op I/O delay. The rest use hypercalls that never
/// return there (PV IPI, sched-yield, unhalt) or machinery we do not trust.
const KVM_FEATURE_CLOCKSOURCE: u32 = 1 << 0;
const KVM_FEATURE_NOP_IO_DELAY: u32 = 1 << 1;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;
const PVM_KVM_FEATURES: u32 =
    KVM_FEATURE_CLOCKSOURCE | KVM_FEATURE_NOP_IO_DELAY | KVM_FEATURE_CLOCKSOURCE2 | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT;

/// How one vCPU should see the machine.
#[derive(Debug, Clone, Copy)]
pub struct Topology {
    pub cpu_index: u8,
    pub cpu_count: u8,
}

/// Rewrites `entries` in place for one vCPU.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], topo: Topology, pvm: bool) {
    let apic_id = u32::from(topo.cpu_index);
    let count = u32::from(topo.cpu_count);
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                // APIC id in EBX[31:24], logical processor count in EBX[23:16].
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (count << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
                if pvm {
                    e.ecx &= !(LEAF1_ECX_CX16
                        | LEAF1_ECX_POPCNT
                        | LEAF1_ECX_XSAVE
                        | LEAF1_ECX_OSXSAVE
                        | LEAF1_ECX_AVX
                        | LEAF1_ECX_FMA
                        | LEAF1_ECX_F16C);
                }
            }
            0x7 if e.index == 0 && pvm => {
                e.ebx &= !(LEAF7_EBX_SMAP | LEAF7_EBX_AVX2 | LEAF7_EBX_AVX512_MASK);
                e.ecx = 0;
                e.edx &= !LEAF7_EDX_ARCH_CAPABILITIES;
            }
            0x7 if e.index == 0 => {
                e.edx &= !LEAF7_EDX_ARCH_CAPABILITIES;
            }
            0xb | 0x1f => {
                // Extended topology: one thread per core, all vCPUs cores of
                // one package. EDX is the x2APIC id.
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = 32 - (count.max(1) - 1).leading_zeros().min(32);
                        e.ebx = count;
                        e.ecx = 1 | (2 << 8);
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0xd if pvm => {
                // No XSAVE on PVM: nothing to enumerate.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x4000_0001 if pvm => e.eax &= PVM_KVM_FEATURES,
            0x8000_0008 => {
                // AMD: number of cores minus one in ECX[7:0].
                e.ecx = (e.ecx & !0xff) | (count.max(1) - 1);
            }
            0x8000_001e => {
                e.eax = apic_id;
                e.ebx = (e.ebx & !0xff) | apic_id;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    fn host_like() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0x1, 0, 0, 0x0000_0800, !LEAF1_ECX_HYPERVISOR, u32::MAX),
            entry(0x7, 0, 0, u32::MAX, u32::MAX, u32::MAX),
            entry(0xb, 1, 9, 9, 9, 9),
            entry(0xd, 0, 7, 7, 7, 7),
            entry(0x4000_0001, 0, u32::MAX, 0, 0, 0),
        ]
    }

    #[test]
    fn pvm_hides_what_the_emulator_lacks() {
        let mut e = host_like();
        normalize(&mut e, Topology { cpu_index: 1, cpu_count: 2 }, true);
        assert_eq!(e[0].ecx & (LEAF1_ECX_CX16 | LEAF1_ECX_POPCNT | LEAF1_ECX_XSAVE), 0);
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(e[0].ebx >> 24, 1, "APIC id");
        assert_eq!((e[0].ebx >> 16) & 0xff, 2, "logical count");
        assert_eq!(e[1].ebx & LEAF7_EBX_SMAP, 0);
        assert_eq!(e[1].edx & LEAF7_EDX_ARCH_CAPABILITIES, 0);
        assert_eq!(e[2].ebx, 2);
        assert_eq!(e[2].edx, 1);
        assert_eq!((e[3].eax, e[3].ebx), (0, 0));
        assert_eq!(e[4].eax, PVM_KVM_FEATURES);
    }

    #[test]
    fn hardware_kvm_keeps_host_features() {
        let mut e = host_like();
        normalize(&mut e, Topology { cpu_index: 0, cpu_count: 1 }, false);
        assert_ne!(e[0].ecx & LEAF1_ECX_XSAVE, 0);
        assert_ne!(e[1].ebx & LEAF7_EBX_SMAP, 0);
        assert_eq!(e[4].eax, u32::MAX);
        assert_eq!(e[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(e[3].eax, 7);
    }
}
