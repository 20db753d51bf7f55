//! PVM ("pagetable-based virtual machine") hosts: KVM without hardware
//! virtualisation, where the guest kernel runs in ring 3 and an instruction
//! emulator runs what cannot. See `../shared/PVM.md` for what was measured;
//! this module only decides whether we are on such a host and what the
//! guest must then be told.

use std::path::Path;

/// Whether to apply the PVM adjustments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PvmMode {
    /// Detect the `kvm_pvm` module.
    Auto,
    On,
    Off,
}

/// Kernel parameters a guest needs on PVM: `mm_pvm` switches on our kernel
/// patches (syscall fix-up, no int3 self-test, no fwait), and the rest hide
/// instructions the emulator lacks, because PVM ignores the CPUID we set
/// for XSAVE, POPCNT and SMAP.
pub const PVM_CMDLINE: &str = "mm_pvm noxsave clearcpuid=cx16,popcnt,smap,erms,fsrm,rep_good";

pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

impl PvmMode {
    pub fn resolve(self) -> bool {
        match self {
            PvmMode::Auto => host_is_pvm(),
            PvmMode::On => true,
            PvmMode::Off => false,
        }
    }
}
