//! vCPU set-up (registers, MSRs, CPUID, local APIC) and the run loop.
//!
//! The boot vCPU starts directly in 64-bit mode at the kernel's entry point
//! with the Linux boot protocol's zero page in RSI; the others wait in the
//! in-kernel local APIC for the guest's INIT/SIPI. A restored vCPU gets its
//! saved state instead ([`state`]). While running, each vCPU thread serves
//! the VMM's events (pause, save, resume: [`control`]).

pub mod control;
pub mod state;

use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::Instant;

use control::{VcpuChannel, VcpuEvent, VcpuResponse};
use state::VcpuState;

use kvm_bindings::{CpuId, Msrs, kvm_fpu, kvm_msr_entry, kvm_regs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::cpuid::{self, Topology};
use crate::devices::Bus;
use crate::gdt;
use crate::layout::*;
use crate::profile::Samples;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// MSRs a fresh CPU should have. Each is set on its own: a host that
/// refuses one (PVM refuses some) costs that MSR, not the rest.
const BOOT_MSRS: [(u32, u64); 10] = [
    (0x174, 0),               // IA32_SYSENTER_CS
    (0x175, 0),               // IA32_SYSENTER_ESP
    (0x176, 0),               // IA32_SYSENTER_EIP
    (0xc000_0081, 0),         // STAR
    (0xc000_0082, 0),         // LSTAR
    (0xc000_0083, 0),         // CSTAR
    (0xc000_0084, 0),         // SYSCALL_MASK
    (0xc000_0102, 0),         // KERNEL_GS_BASE
    (0x1a0, 1),               // IA32_MISC_ENABLE: fast strings
    (0x2ff, (1 << 11) | 0x6), // MTRR default type: enabled, write-back
];

/// LVT registers of the local APIC and the delivery modes we give them.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {cpu}: {what}: {source}")]
    Kvm { cpu: u8, what: &'static str, source: kvm_ioctls::Error },
    #[error(
        "vCPU {cpu}: the hypervisor could not run guest code at rip={rip:#x} (KVM internal error, suberror {suberror}); on PVM hosts see the host's dmesg for the instruction"
    )]
    InternalError { cpu: u8, rip: u64, suberror: u32 },
    #[error("vCPU {cpu}: KVM failed to enter the guest (hardware reason {reason:#x})")]
    FailEntry { cpu: u8, reason: u64 },
    #[error("vCPU {cpu}: cannot install the vCPU seccomp filter: {message}")]
    Seccomp { cpu: u8, message: String },
    #[error("vCPU {cpu}: unexpected exit from KVM_RUN: {exit}")]
    UnexpectedExit { cpu: u8, exit: String },
    #[error("vCPU {cpu}: its thread has stopped")]
    Gone { cpu: u8 },
    #[error("vCPU {cpu}: did not answer within 5 s")]
    NotAnswering { cpu: u8 },
    #[error("vCPU {cpu}: answered {answer}")]
    Unanswered { cpu: u8, answer: String },
    #[error("vCPU {cpu}: saving its state needs it paused")]
    NotPaused { cpu: u8 },
    #[error("vCPU {cpu}: saved state cannot be restored: {what}")]
    BadState { cpu: u8, what: String },
}

fn kvm(cpu: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { cpu, what, source }
}

/// Why a vCPU stopped running the guest.
#[derive(Debug)]
pub enum VcpuStop {
    /// The guest asked for a reset (i8042, triple fault, or KVM's system
    /// event): for us that is the guest powering off.
    Reset,
    Failed(VcpuError),
}

pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
}

impl Vcpu {
    /// Sets CPUID, MSRs, FPU and LAPIC; on the boot vCPU also the registers
    /// that start it at `entry` in long mode.
    pub fn configure(&self, supported: &CpuId, cpu_count: u8, pvm: bool, entry: u64) -> Result<(), VcpuError> {
        let cpu = self.index;
        let mut entries = supported.as_slice().to_vec();
        cpuid::normalize(&mut entries, Topology { cpu_index: cpu, cpu_count }, pvm);
        let cpuid = CpuId::from_entries(&entries)
            .map_err(|_| VcpuError::UnexpectedExit { cpu, exit: "CPUID table too large".into() })?;
        self.fd.set_cpuid2(&cpuid).map_err(kvm(cpu, "KVM_SET_CPUID2"))?;

        for (index, data) in BOOT_MSRS {
            let msrs = Msrs::from_entries(&[kvm_msr_entry { index, data, ..Default::default() }])
                .expect("one MSR always fits");
            match self.fd.set_msrs(&msrs) {
                Ok(1) => {}
                _ => tracing::debug!(cpu, msr = format!("{index:#x}"), "host refused boot MSR; skipped"),
            }
        }

        let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        self.fd.set_fpu(&fpu).map_err(kvm(cpu, "KVM_SET_FPU"))?;

        let mut lapic = self.fd.get_lapic().map_err(kvm(cpu, "KVM_GET_LAPIC"))?;
        for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in value.to_le_bytes().into_iter().enumerate() {
                lapic.regs[reg + i] = b as libc::c_char;
            }
        }
        self.fd.set_lapic(&lapic).map_err(kvm(cpu, "KVM_SET_LAPIC"))?;

        if cpu == 0 {
            self.configure_boot_registers(entry)?;
        }
        Ok(())
    }

    fn configure_boot_registers(&self, entry: u64) -> Result<(), VcpuError> {
        let cpu = self.index;
        let mut sregs = self.fd.get_sregs().map_err(kvm(cpu, "KVM_GET_SREGS"))?;
        let code = gdt::segment(gdt::CODE_INDEX);
        let data = gdt::segment(gdt::DATA_INDEX);
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = gdt::segment(gdt::TSS_INDEX);
        sregs.gdt.base = BOOT_GDT_START;
        sregs.gdt.limit = (std::mem::size_of_val(&gdt::BOOT_GDT) - 1) as u16;
        sregs.idt.base = BOOT_IDT_START;
        sregs.idt.limit = 7;
        sregs.cr3 = PML4_START;
        sregs.cr4 |= X86_CR4_PAE;
        sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
        self.fd.set_sregs(&sregs).map_err(kvm(cpu, "KVM_SET_SREGS"))?;

        let regs = kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(kvm(cpu, "KVM_SET_REGS"))
    }

    /// Runs the guest until it resets or fails; the reason goes to `stops`.
    /// Between runs it serves the VMM's events from `channel`.
    pub fn run(mut self, context: RunContext, channel: VcpuChannel) {
        let RunContext { bus, vmm_start, stops, samples, msr_indices } = context;
        let cpu = self.index;
        control::register_kvm_run(self.fd.get_kvm_run());
        let mut first = true;
        let stop = loop {
            if first {
                first = false;
                log_first_run(cpu, vmm_start);
            }
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
                Ok(VcpuExit::IoOut(port, data)) => {
                    if bus.pio_write(port, data) {
                        break VcpuStop::Reset;
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
                Ok(VcpuExit::Shutdown) | Ok(VcpuExit::SystemEvent(..)) => break VcpuStop::Reset,
                Ok(VcpuExit::Hlt) => break VcpuStop::Reset,
                Ok(VcpuExit::InternalError) => {
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so
                    // the `internal` member of the union is the valid one.
                    let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    break VcpuStop::Failed(VcpuError::InternalError { cpu, rip, suberror });
                }
                Ok(VcpuExit::FailEntry(reason, _)) => {
                    break VcpuStop::Failed(VcpuError::FailEntry { cpu, reason });
                }
                Ok(VcpuExit::Intr) => self.kicked(samples.as_deref(), &channel, &msr_indices),
                Ok(other) => {
                    break VcpuStop::Failed(VcpuError::UnexpectedExit { cpu, exit: format!("{other:?}") });
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.kicked(samples.as_deref(), &channel, &msr_indices)
                }
                Err(e) => {
                    break VcpuStop::Failed(VcpuError::Kvm { cpu, what: "KVM_RUN", source: e });
                }
            }
        };
        let _ = stops.send((cpu, stop));
    }
}

/// What a vCPU thread shares with the VMM.
pub struct RunContext {
    pub bus: Arc<Bus>,
    pub vmm_start: Instant,
    /// Where the thread reports why it stopped.
    pub stops: Sender<(u8, VcpuStop)>,
    /// vCPU 0's guest RIP samples (`--profile-guest`).
    pub samples: Option<Arc<Samples>>,
    /// The MSRs a saved state includes (the host's KVM_GET_MSR_INDEX_LIST).
    pub msr_indices: Arc<[u32]>,
}

impl Vcpu {
    /// KVM_RUN returned because of a kick: sample the profile, then serve
    /// the VMM's events. A pause holds the thread here until resumed.
    fn kicked(&mut self, samples: Option<&Samples>, channel: &VcpuChannel, msr_indices: &[u32]) {
        self.fd.set_kvm_immediate_exit(0);
        self.sample(samples);
        while let Ok(event) = channel.events.try_recv() {
            let response = match event {
                VcpuEvent::Pause => {
                    let _ = channel.responses.send(VcpuResponse::Paused);
                    self.paused(channel, msr_indices);
                    continue;
                }
                VcpuEvent::SaveState => VcpuResponse::Error(VcpuError::NotPaused { cpu: self.index }),
                VcpuEvent::Resume => VcpuResponse::Resumed,
            };
            let _ = channel.responses.send(response);
        }
    }

    /// Out of KVM_RUN until resumed: saves state when asked. If the VMM's
    /// end of the channel is gone (it never is while the VM lives: the
    /// control thread holds it), the guest simply runs on.
    fn paused(&mut self, channel: &VcpuChannel, msr_indices: &[u32]) {
        while let Ok(event) = channel.events.recv() {
            let response = match event {
                VcpuEvent::Pause => VcpuResponse::Paused,
                VcpuEvent::SaveState => match VcpuState::save(self.index, &self.fd, msr_indices) {
                    Ok(state) => VcpuResponse::State(Box::new(state)),
                    Err(e) => VcpuResponse::Error(e),
                },
                VcpuEvent::Resume => {
                    let _ = channel.responses.send(VcpuResponse::Resumed);
                    return;
                }
            };
            let _ = channel.responses.send(response);
        }
    }

    fn sample(&self, samples: Option<&Samples>) {
        if let Some(samples) = samples
            && let Ok(regs) = self.fd.get_regs()
        {
            samples.record(regs.rip);
        }
    }
}

fn log_first_run(cpu: u8, vmm_start: Instant) {
    if cpu != 0 {
        return;
    }
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let monotonic_ns = ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128;
    let ms = vmm_start.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(monotonic_ns = monotonic_ns as u64, since_start_ms = format!("{ms:.2}"), "first KVM_RUN");
}
