//! mm-vmm: one microVM per process. KVM, guest RAM in a memfd, vCPU threads
//! and the few legacy devices a Linux guest needs; see `../shared/DESIGN.md`.

pub mod boot;
pub mod builder;
pub mod control;
pub mod cpuid;
pub mod devices;
pub mod endpoint;
pub mod fatal;
/// Fuzz entry points for vmm/fuzz (cargo-fuzz) and their tests.
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod gdt;
pub mod layout;
pub mod live;
pub mod loader;
pub mod memory;
pub mod mptable;
pub mod profile;
pub mod pvm;
pub mod snapshot;
pub mod vcpu;
pub mod virtio;
pub mod vm;

pub use vm::{Vm, VmConfig, VmError, VmOutcome};
