//! A vCPU's whole KVM state, saved from a paused vCPU and set on a fresh
//! one: what a snapshot needs to resume the guest where it stood.
//!
//! The order of the set calls is the one Firecracker and QEMU use, for the
//! same reasons: CPUID before anything that depends on it, the LAPIC before
//! the MSRs (the TSC deadline MSR is ignored unless the LAPIC timer is in
//! deadline mode), and the pending events last.

use kvm_bindings::{
    CpuId, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::VcpuError;

/// MSRs per KVM_GET_MSRS/KVM_SET_MSRS call.
const MSR_BATCH: usize = 64;
/// Most CPUID entries KVM hands back.
const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;

/// One model-specific register's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    pub index: u32,
    pub data: u64,
}

/// The FPU and vector registers: the XSAVE area where KVM offers it, the
/// legacy FXSAVE image otherwise.
#[derive(Debug, Serialize, Deserialize)]
pub enum FpuState {
    Xsave(Box<kvm_xsave>),
    Fxsave(Box<LegacyFpu>),
}

/// `kvm_fpu`, which kvm-bindings gives no serde: serialised through
/// [`KvmFpuDef`], serde's mirror of its fields.
#[derive(Debug, Serialize, Deserialize)]
pub struct LegacyFpu(#[serde(with = "KvmFpuDef")] pub kvm_fpu);

#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_fpu")]
struct KvmFpuDef {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    pad1: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
    pad2: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<MsrValue>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// None where the host has no XCRs to offer (no XSAVE).
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub vcpu_events: kvm_vcpu_events,
    /// The guest TSC's frequency, when KVM reports it: a restore on a host
    /// whose TSC runs at another rate is refused rather than skewed.
    pub tsc_khz: Option<u32>,
}

fn kvm(cpu: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { cpu, what, source }
}

impl VcpuState {
    /// Reads everything from a vCPU that is not in KVM_RUN. `msr_indices`
    /// is the host's list (KVM_GET_MSR_INDEX_LIST); the MSRs this host
    /// refuses to read are left out, as they could not be set either.
    pub fn save(index: u8, fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
        let cpu = index;
        let cpuid = fd.get_cpuid2(MAX_CPUID_ENTRIES).map_err(kvm(cpu, "KVM_GET_CPUID2"))?.as_slice().to_vec();
        let fpu = match fd.get_xsave() {
            Ok(xsave) => FpuState::Xsave(Box::new(xsave)),
            Err(_) => FpuState::Fxsave(Box::new(LegacyFpu(fd.get_fpu().map_err(kvm(cpu, "KVM_GET_FPU"))?))),
        };
        Ok(VcpuState {
            index,
            msrs: read_msrs(cpu, fd, msr_indices)?,
            regs: fd.get_regs().map_err(kvm(cpu, "KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm(cpu, "KVM_GET_SREGS"))?,
            fpu,
            xcrs: fd.get_xcrs().ok(),
            debugregs: fd.get_debug_regs().map_err(kvm(cpu, "KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(kvm(cpu, "KVM_GET_LAPIC"))?,
            mp_state: fd.get_mp_state().map_err(kvm(cpu, "KVM_GET_MP_STATE"))?,
            vcpu_events: fd.get_vcpu_events().map_err(kvm(cpu, "KVM_GET_VCPU_EVENTS"))?,
            tsc_khz: fd.get_tsc_khz().ok(),
            cpuid,
        })
    }

    /// Sets everything on a freshly created vCPU.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuError> {
        let cpu = self.index;
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|_| VcpuError::BadState { cpu, what: "more CPUID entries than KVM takes".into() })?;
        fd.set_cpuid2(&cpuid).map_err(kvm(cpu, "KVM_SET_CPUID2"))?;
        if let (Some(saved), Ok(host)) = (self.tsc_khz, fd.get_tsc_khz())
            && saved != host
        {
            fd.set_tsc_khz(saved).map_err(|_| VcpuError::BadState {
                cpu,
                what: format!("the guest's TSC ran at {saved} kHz, this host's at {host} kHz, and KVM cannot scale it"),
            })?;
        }
        fd.set_mp_state(self.mp_state).map_err(kvm(cpu, "KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(kvm(cpu, "KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(kvm(cpu, "KVM_SET_SREGS"))?;
        match &self.fpu {
            // SAFETY: the area is a plain kvm_xsave (the legacy 4 KiB
            // layout) that KVM_GET_XSAVE filled; KVM reads no more than that.
            FpuState::Xsave(xsave) => unsafe { fd.set_xsave(xsave) }.map_err(kvm(cpu, "KVM_SET_XSAVE"))?,
            FpuState::Fxsave(fpu) => fd.set_fpu(&fpu.0).map_err(kvm(cpu, "KVM_SET_FPU"))?,
        }
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(kvm(cpu, "KVM_SET_XCRS"))?;
        }
        fd.set_debug_regs(&self.debugregs).map_err(kvm(cpu, "KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(kvm(cpu, "KVM_SET_LAPIC"))?;
        write_msrs(cpu, fd, &self.msrs)?;
        fd.set_vcpu_events(&self.vcpu_events).map_err(kvm(cpu, "KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Reads `indices` in batches. KVM stops a batch at the first MSR it
/// cannot read and says how many it did: that one is skipped (PVM refuses
/// a few that hardware KVM lists) and the batch goes on after it.
fn read_msrs(cpu: u8, fd: &VcpuFd, indices: &[u32]) -> Result<Vec<MsrValue>, VcpuError> {
    let mut values = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> =
            batch.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).expect("a batch fits");
        let read = fd.get_msrs(&mut msrs).map_err(kvm(cpu, "KVM_GET_MSRS"))?;
        values.extend(msrs.as_slice()[..read].iter().map(|e| MsrValue { index: e.index, data: e.data }));
        if read < batch.len() {
            tracing::debug!(cpu, msr = format!("{:#x}", batch[read]), "host cannot read this MSR; left out");
            rest = &rest[read + 1..];
        } else {
            rest = &rest[batch.len()..];
        }
    }
    Ok(values)
}

/// Writes `values` in batches. An MSR this host refuses to set (PVM
/// refuses IA32_ARCH_CAPABILITIES, which it lists and reads; see
/// shared/PVM.md) is skipped with a warning, as at boot, and the batch
/// goes on after it.
fn write_msrs(cpu: u8, fd: &VcpuFd, values: &[MsrValue]) -> Result<(), VcpuError> {
    let mut rest = values;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> =
            batch.iter().map(|v| kvm_msr_entry { index: v.index, data: v.data, ..Default::default() }).collect();
        let msrs = Msrs::from_entries(&entries).expect("a batch fits");
        let written = fd.set_msrs(&msrs).map_err(kvm(cpu, "KVM_SET_MSRS"))?;
        if written < batch.len() {
            let msr = batch[written];
            tracing::debug!(cpu, msr = format!("{:#x}", msr.index), "host refused a saved MSR; skipped");
            rest = &rest[written + 1..];
        } else {
            rest = &rest[batch.len()..];
        }
    }
    Ok(())
}
