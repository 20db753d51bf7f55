//! One microVM: its configuration, its errors, and its life once built
//! (`builder.rs` assembles it): the vCPU threads, the control thread, and
//! the wait for the guest's end.

use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use base64::Engine;
use kvm_ioctls::VmFd;
use mm_policies::Policy;

use crate::boot::BootError;
use crate::devices::Bus;
use crate::devices::serial::SerialOutput;
use crate::endpoint::Endpoint;
use crate::live::LiveVm;
use crate::memory::{GuestRam, MemoryError};
use crate::profile::{self, Samples};
use crate::pvm::PvmMode;
use crate::snapshot::memory::MemoryImageError;
use crate::snapshot::{SnapshotError, SnapshotFiles};
use crate::vcpu::control::{self, VcpuHandle};
use crate::vcpu::{RunContext, Vcpu, VcpuError, VcpuStop};
use crate::virtio::DeviceKind;
use crate::virtio::mmio::TransportRestoreError;
use crate::virtio::vhost_user::FrontendError;

/// Kernel parameters every guest gets: console on COM1, reset through the
/// i8042 (the only reboot method that works on PVM), reboot on panic, and
/// no IOAPIC timer check (it waits for ticks, which is slow when emulated).
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 no_timer_check";
/// Most vCPUs we offer; the guest kernel is built with NR_CPUS=32.
pub const MAX_CPUS: u8 = 32;

/// Everything needed to build one microVM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Boot a kernel, or resume a snapshot.
    pub boot: Boot,
    /// vCPUs and RAM for a boot; a restore takes them from the snapshot.
    pub cpus: u8,
    pub memory_mib: u64,
    pub serial: SerialOutput,
    pub pvm: PvmMode,
    /// Write a histogram of vCPU 0's guest RIP, sampled every millisecond.
    pub profile_guest: Option<PathBuf>,
    /// Virtio devices, each served by a vhost-user back end process.
    pub devices: Vec<DeviceSpec>,
    /// Where to serve the control socket, if anywhere.
    pub control_socket: Option<Endpoint>,
    /// An already open /dev/kvm (`--kvm-fd`), taken over by the VM.
    pub kvm_fd: Option<std::os::fd::RawFd>,
    /// How a restore brings guest RAM in.
    pub memory_restore: MemoryRestore,
    /// An open /dev/userfaultfd for a lazy restore (`--uffd-fd`).
    pub uffd_fd: Option<std::os::fd::RawFd>,
}

/// How a restore brings guest RAM in from the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MemoryRestore {
    /// On first touch, through userfaultfd (snapshot/lazy.rs); eagerly
    /// where no userfaultfd can be had, saying so.
    #[default]
    Lazy,
    /// All of it before the vCPUs start.
    Eager,
}

/// Where the guest starts.
#[derive(Debug, Clone)]
pub enum Boot {
    Kernel(KernelBoot),
    /// Resume the guest a snapshot saved, without a boot.
    Snapshot(SnapshotFiles),
}

/// A cold boot's inputs.
#[derive(Debug, Clone)]
pub struct KernelBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Extra kernel parameters, appended after ours.
    pub extra_cmdline: String,
    /// The workload mm-init runs; empty means its default shell.
    pub command: Vec<String>,
}

/// One virtio device: its kind and the vhost-user socket of its back end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub kind: DeviceKind,
    pub socket: Endpoint,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    /// `KIND=SOCKET`, e.g. `block=/run/mm/vm1/block.sock`, or `KIND=fd:N`
    /// for an inherited connected socket.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, socket) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected KIND=SOCKET"))?;
        Ok(DeviceSpec { kind: kind.parse()?, socket: socket.parse().map_err(|e| format!("{s:?}: {e}"))? })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("--cpus {0}: must be between 1 and {MAX_CPUS}")]
    BadCpuCount(u8),
    #[error("KVM is not available: /dev/kvm does not exist on this host")]
    NoKvm,
    #[error("permission denied opening /dev/kvm: run as root or as a member of its group")]
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(kvm_ioctls::Error),
    #[error("kernel {0}: no such file")]
    KernelMissing(PathBuf),
    #[error("initramfs {0}: no such file")]
    InitrdMissing(PathBuf),
    #[error("{what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("cannot open the serial output: {0}")]
    Serial(std::io::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("too many devices: at most {MAX_DEVICES}")]
    TooManyDevices,
    #[error("cannot connect to the {kind} back end at {socket}: {source}")]
    DeviceConnect { kind: &'static str, socket: String, source: std::io::Error },
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error(transparent)]
    Seccomp(#[from] mm_policies::PolicyError),
    #[error("cannot serve the control socket at {path}: {source}")]
    Control { path: String, source: std::io::Error },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    MemoryImage(#[from] MemoryImageError),
    #[error("device {index}: {source}")]
    RestoreDevice { index: usize, source: TransportRestoreError },
    #[error("the snapshot cannot be restored: {0}")]
    BadSnapshot(String),
    #[error("lazy restore: {0}")]
    Lazy(#[from] crate::snapshot::lazy::LazyError),
    #[error("the VM is not paused: pause it before a snapshot")]
    NotPaused,
    #[error("the VM is paused (or its devices are): a running snapshot needs it running")]
    NotRunning,
}

/// Whether [`Vm::run`] confines each thread with its seccomp policy
/// (mm-policies). Off unless mm-vmm's `main` turns it on, so that library
/// users running a VM inside a test or benchmark process keep that process
/// unfiltered.
static SECCOMP: AtomicBool = AtomicBool::new(false);

/// Makes this process's VM threads install their seccomp policies: vCPU
/// threads theirs before the first KVM_RUN, the control thread its own, the
/// main thread `vmm_main` once every vCPU runs.
pub fn enable_seccomp() {
    SECCOMP.store(true, Ordering::SeqCst);
}

pub(crate) fn seccomp_enabled() -> bool {
    SECCOMP.load(Ordering::SeqCst)
}

/// Starts the control thread under the control policy. A thread inherits the
/// filter of the thread that creates it, so a short-lived thread installs
/// the policy and then starts the control thread.
fn serve_control(endpoint: &Endpoint, live: Arc<LiveVm>, facts: crate::control::VmFacts) -> std::io::Result<()> {
    if !seccomp_enabled() {
        return crate::control::serve(endpoint, live, facts);
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                mm_policies::install(Policy::VmmControl).map_err(std::io::Error::other)?;
                crate::control::serve(endpoint, live, facts)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the control set-up thread panicked")))
    })
}

/// IRQ and device limits: see builder.rs.
pub const MAX_DEVICES: usize = 19;

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// How a guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmOutcome {
    /// mm-init reported the workload's exit status, then reset.
    Exited(u32),
    /// The guest reset without reporting a status (a kernel panic, or an
    /// init that is not mm-init).
    ResetWithoutStatus,
}

/// A built microVM, not running yet.
pub struct Vm {
    vm: VmFd,
    ram: GuestRam,
    vcpus: Vec<Vcpu>,
    bus: Arc<Bus>,
    start: Instant,
    profile_guest: Option<PathBuf>,
    control_socket: Option<Endpoint>,
    pvm: bool,
    cpus: u8,
    memory_mib: u64,
    msr_indices: Arc<[u32]>,
}

/// Encodes the workload for mm-init's `mm.cmd=` (see guest/init/src/settings.rs).
pub fn encode_command(command: &[String]) -> String {
    let json = serde_json::to_vec(command).expect("strings always serialise");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

impl Vm {
    /// Builds the VM: boots `config`'s kernel or restores its snapshot.
    pub fn build(config: &VmConfig, start: Instant) -> Result<Vm, VmError> {
        crate::builder::build(config, start)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn assemble(
        vm: VmFd,
        ram: GuestRam,
        vcpus: Vec<Vcpu>,
        bus: Arc<Bus>,
        start: Instant,
        config: &VmConfig,
        pvm: bool,
        cpus: u8,
        memory_mib: u64,
        msr_indices: Arc<[u32]>,
    ) -> Vm {
        Vm {
            vm,
            ram,
            vcpus,
            bus,
            start,
            profile_guest: config.profile_guest.clone(),
            control_socket: config.control_socket.clone(),
            pvm,
            cpus,
            memory_mib,
            msr_indices,
        }
    }

    /// Runs the guest to its end. vCPU threads still inside KVM_RUN are
    /// left to the process exit that follows.
    pub fn run(mut self) -> Result<VmOutcome, VmError> {
        let (tx, rx) = mpsc::channel();
        control::install_kick_handler().map_err(VmError::Thread)?;
        let samples = self.profile_guest.as_ref().map(|_| Arc::new(Samples::default()));
        let seccomp = seccomp_enabled();
        let mut kick_target = None;
        let mut handles: Vec<VcpuHandle> = Vec::with_capacity(self.vcpus.len());
        for vcpu in self.vcpus.drain(..) {
            let (mut handle, channel) = control::channel(vcpu.index);
            let context = RunContext {
                bus: Arc::clone(&self.bus),
                vmm_start: self.start,
                stops: tx.clone(),
                samples: if vcpu.index == 0 { samples.clone() } else { None },
                msr_indices: Arc::clone(&self.msr_indices),
            };
            let profiled = context.samples.is_some();
            let stops = tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.index))
                .spawn(move || {
                    if seccomp && let Err(e) = mm_policies::install(Policy::VmmVcpu) {
                        let error = VcpuError::Seccomp { cpu: vcpu.index, message: e.to_string() };
                        let _ = stops.send((vcpu.index, VcpuStop::Failed(error)));
                        return;
                    }
                    vcpu.run(context, channel)
                })
                .map_err(VmError::Thread)?;
            handle.thread = thread.as_pthread_t();
            if profiled {
                kick_target = Some(handle.thread);
            }
            handles.push(handle);
        }
        drop(tx);
        let live = Arc::new(LiveVm::new(
            self.vm,
            self.ram,
            Arc::clone(&self.bus),
            handles,
            self.pvm,
            self.cpus,
            self.memory_mib,
        ));
        if let Some(endpoint) = &self.control_socket {
            let facts = crate::control::VmFacts {
                vcpus: u32::from(self.cpus),
                memory_mib: self.memory_mib as u32,
                started: self.start,
            };
            serve_control(endpoint, Arc::clone(&live), facts)
                .map_err(|source| VmError::Control { path: endpoint.to_string(), source })?;
        }
        // Every vCPU runs: from here the main thread only waits and tears
        // down. The profiler's kicker starts after, so it inherits this filter.
        if seccomp {
            mm_policies::install(Policy::VmmMain)?;
        }
        if let Some(thread) = kick_target {
            profile::start_kicker(thread, Duration::from_millis(1));
        }
        let stop = rx.recv();
        if let Some(Endpoint::Path(path)) = &self.control_socket {
            let _ = std::fs::remove_file(path);
        }
        if let (Some(samples), Some(path)) = (&samples, &self.profile_guest)
            && let Err(e) = samples.write(path)
        {
            tracing::warn!("cannot write the guest profile to {}: {e}", path.display());
        }
        match stop {
            Ok((_, VcpuStop::Reset)) => Ok(match self.bus.boot_device.exit_status() {
                Some(status) => VmOutcome::Exited(status),
                None => VmOutcome::ResetWithoutStatus,
            }),
            Ok((_, VcpuStop::Failed(e))) => Err(e.into()),
            Err(_) => Ok(VmOutcome::ResetWithoutStatus),
        }
    }
}
