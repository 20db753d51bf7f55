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
/// patches (syscall fix-up, no int3 self-test, no fwait), `noxsave` and
/// `clearcpuid` hide instructions the emulator lacks (PVM ignores the CPUID
/// we set for XSAVE, POPCNT and SMAP) or runs one byte at a time (the `rep`
/// string forms), and RCU stall reports are off: with guest kernel code
/// ~1000x slower a busy host makes false stalls, and the NMI backtrace such
/// a report sends hits an instruction the emulator cannot run.
pub const PVM_CMDLINE: &str =
    "mm_pvm noxsave clearcpuid=cx16,popcnt,smap,erms,fsrm,rep_good rcupdate.rcu_cpu_stall_suppress=1";

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
