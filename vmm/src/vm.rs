//! A microVM assembled from its spec, in the order Firecracker's builder
//! uses: KVM, memory, in-kernel interrupt controllers, boot data, devices,
//! vCPUs. Nothing touches the host beyond /dev/kvm and one memfd, so an
//! error at any step leaves nothing behind.

use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use base64::Engine;
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};

use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use mm_policies::Policy;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vm_superio::{I8042Device, Serial};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::boot::{self, BootError};
use crate::devices::Bus;
use crate::devices::boot_device::BootDevice;
use crate::devices::serial::{EventFdTrigger, SerialOutput};
use crate::endpoint::Endpoint;
use crate::layout::{BOOT_DEVICE_SIZE, BOOT_DEVICE_START, COM1_IRQ, KVM_TSS_ADDRESS};
use crate::memory::{GuestRam, MemoryError};
use crate::profile::{self, Samples};
use crate::pvm::{PVM_CMDLINE, PvmMode};
use crate::vcpu::{Vcpu, VcpuError, VcpuStop};
use crate::virtio::DeviceKind;
use crate::virtio::mmio::{MMIO_SIZE, MmioDevice, QUEUE_NOTIFY_OFFSET};
use crate::virtio::vhost_user::{FrontendError, VhostUserDevice};

/// Kernel parameters every guest gets: console on COM1, reset through the
/// i8042 (the only reboot method that works on PVM), reboot on panic, and
/// no IOAPIC timer check (it waits for ticks, which is slow when emulated).
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 no_timer_check";
/// Most vCPUs we offer; the guest kernel is built with NR_CPUS=32.
pub const MAX_CPUS: u8 = 32;

/// Everything needed to build one microVM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Extra kernel parameters, appended after ours.
    pub extra_cmdline: String,
    /// The workload mm-init runs; empty means its default shell.
    pub command: Vec<String>,
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

fn seccomp_enabled() -> bool {
    SECCOMP.load(Ordering::SeqCst)
}

/// Starts the control thread under the control policy. A thread inherits the
/// filter of the thread that creates it, so a short-lived thread installs
/// the policy and then starts the control thread.
fn serve_control(endpoint: &Endpoint, bus: Arc<Bus>, facts: crate::control::VmFacts) -> std::io::Result<()> {
    if !seccomp_enabled() {
        return crate::control::serve(endpoint, bus, facts);
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                mm_policies::install(Policy::VmmControl).map_err(std::io::Error::other)?;
                crate::control::serve(endpoint, bus, facts)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the control set-up thread panicked")))
    })
}

/// IRQ of the first virtio device; the serial port has 4 and the IOAPIC
/// has 24 pins, so up to 19 devices fit.
const FIRST_VIRTIO_IRQ: u32 = 5;
pub const MAX_DEVICES: usize = 19;

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
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

pub struct Vm {
    // Kept alive for the VM's lifetime: the fds own the KVM objects.
    _vm: VmFd,
    _ram: GuestRam,
    vcpus: Vec<Vcpu>,
    bus: Arc<Bus>,
    start: Instant,
    profile_guest: Option<PathBuf>,
    control_socket: Option<Endpoint>,
}

/// Encodes the workload for mm-init's `mm.cmd=` (see guest/init/src/settings.rs).
pub fn encode_command(command: &[String]) -> String {
    let json = serde_json::to_vec(command).expect("strings always serialise");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

/// The MMIO base and IRQ of virtio device `index`.
fn device_slot(index: usize) -> (u64, u32) {
    (BOOT_DEVICE_START + BOOT_DEVICE_SIZE + index as u64 * MMIO_SIZE, FIRST_VIRTIO_IRQ + index as u32)
}

/// The guest's kernel command line: ours, the devices, the PVM fix-ups,
/// the caller's extras, and the workload for mm-init.
fn kernel_cmdline(config: &VmConfig, pvm: bool) -> Result<linux_loader::cmdline::Cmdline, VmError> {
    let devices: Vec<String> = (0..config.devices.len())
        .map(|i| {
            let (base, irq) = device_slot(i);
            format!("virtio_mmio.device=4K@{base:#x}:{irq}")
        })
        .collect();
    let bootdev = format!("mm.bootdev={:#x}", BOOT_DEVICE_START);
    let pvm_params = if pvm { PVM_CMDLINE } else { "" };
    let cmd =
        if config.command.is_empty() { String::new() } else { format!("mm.cmd={}", encode_command(&config.command)) };
    Ok(boot::build_cmdline(&[BASE_CMDLINE, &bootdev, &devices.join(" "), pvm_params, &config.extra_cmdline, &cmd])?)
}

/// The KVM VM with its interrupt controllers, guest RAM registered, the
/// virtio devices connected and the legacy devices on a bus.
fn create_machine(kvm: &Kvm, ram: &GuestRam, config: &VmConfig, start: Instant) -> Result<(VmFd, Arc<Bus>), VmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    for (slot, region) in ram.memory.iter().enumerate() {
        let mem_region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `ram`, which the
        // Vm keeps for as long as the KVM VM exists.
        unsafe { vm.set_user_memory_region(mem_region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }

    let mut virtio = Vec::new();
    for (i, spec) in config.devices.iter().enumerate() {
        let (base, irq) = device_slot(i);
        virtio.push((base, Mutex::new(connect_device(&vm, ram, spec, base, irq)?)));
    }
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&serial_irq, COM1_IRQ).map_err(kvm_err("KVM_IRQFD"))?;
    let serial = Serial::new(EventFdTrigger(serial_irq), config.serial.open().map_err(VmError::Serial)?);
    let reset = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
    let bus = Arc::new(Bus {
        serial: Mutex::new(serial),
        i8042: Mutex::new(I8042Device::new(EventFdTrigger(reset))),
        boot_device: BootDevice::new(start),
        virtio,
    });
    if let Some(path) = &config.control_socket {
        let facts = crate::control::VmFacts {
            vcpus: u32::from(config.cpus),
            memory_mib: config.memory_mib as u32,
            started: start,
        };
        serve_control(path, Arc::clone(&bus), facts)
            .map_err(|source| VmError::Control { path: path.to_string(), source })?;
    }
    Ok((vm, bus))
}

/// Connects to a device's back end and wires its queue notifications
/// (ioeventfds on QueueNotify) and interrupt (an irqfd) into KVM.
fn connect_device(vm: &VmFd, ram: &GuestRam, spec: &DeviceSpec, base: u64, irq: u32) -> Result<MmioDevice, VmError> {
    let kind = spec.kind.name();
    let stream = spec.socket.connect().map_err(|source| VmError::DeviceConnect {
        kind,
        socket: spec.socket.to_string(),
        source,
    })?;
    let backend = VhostUserDevice::connect(spec.kind, stream)?;
    let mut kicks = Vec::new();
    for queue in 0..spec.kind.num_queues() {
        let kick = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm.register_ioevent(&kick, &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET), queue as u32)
            .map_err(kvm_err("KVM_IOEVENTFD"))?;
        kicks.push(kick);
    }
    let call = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&call, irq).map_err(kvm_err("KVM_IRQFD"))?;
    let memfd = ram.memfd.try_clone().map_err(VmError::EventFd)?;
    Ok(MmioDevice::new(backend, ram.memory.clone(), memfd, kicks, call))
}

fn open_kvm(fd: Option<std::os::fd::RawFd>) -> Result<Kvm, VmError> {
    if let Some(fd) = fd {
        // SAFETY: fstat only reads the fd table and writes `stat`.
        let is_open = unsafe {
            let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
            libc::fstat(fd, stat.as_mut_ptr()) == 0
        };
        if !is_open {
            return Err(VmError::KvmOpen(kvm_ioctls::Error::new(libc::EBADF)));
        }
        // SAFETY: the fd was handed to us as an open /dev/kvm for this VM
        // alone (`--kvm-fd`); nothing else in this process owns it.
        return Ok(unsafe { <Kvm as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => VmError::NoKvm,
        libc::EACCES | libc::EPERM => VmError::KvmPermission,
        _ => VmError::KvmOpen(e),
    })
}

impl Vm {
    pub fn build(config: &VmConfig, start: Instant) -> Result<Vm, VmError> {
        if config.cpus == 0 || config.cpus > MAX_CPUS {
            return Err(VmError::BadCpuCount(config.cpus));
        }
        if !config.kernel.is_file() {
            return Err(VmError::KernelMissing(config.kernel.clone()));
        }
        if let Some(initrd) = config.initrd.as_ref().filter(|p| !p.is_file()) {
            return Err(VmError::InitrdMissing(initrd.clone()));
        }
        let step = |what: &str| tracing::debug!(since_start_us = start.elapsed().as_micros() as u64, "{what}");
        let kvm = open_kvm(config.kvm_fd)?;
        step("opened /dev/kvm");
        let pvm = config.pvm.resolve();
        if pvm {
            tracing::info!("PVM host detected: filtering CPUID and adding `{PVM_CMDLINE}` to the kernel command line");
        }
        let ram = GuestRam::new(config.memory_mib)?;
        step("guest RAM mapped");
        if config.devices.len() > MAX_DEVICES {
            return Err(VmError::TooManyDevices);
        }
        let cmdline = kernel_cmdline(config, pvm)?;

        // Copying the kernel and initramfs into guest RAM is the slowest
        // step of set-up, and the KVM objects do not need it: do both at once.
        let (kernel, machine) = std::thread::scope(|scope| {
            let loader = scope
                .spawn(|| boot::load(&ram.memory, &config.kernel, config.initrd.as_deref(), &cmdline, config.cpus));
            let machine = create_machine(&kvm, &ram, config, start);
            (loader.join().expect("the kernel loader thread panicked"), machine)
        });
        let (vm, bus) = machine?;
        let kernel = kernel?;
        step("VM created, kernel and initramfs loaded");

        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
        for index in 0..config.cpus {
            let fd = vm.create_vcpu(u64::from(index)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let vcpu = Vcpu { index, fd };
            vcpu.configure(&supported, config.cpus, pvm, kernel.entry.0)?;
            vcpus.push(vcpu);
        }
        Ok(Vm {
            _vm: vm,
            _ram: ram,
            vcpus,
            bus,
            start,
            profile_guest: config.profile_guest.clone(),
            control_socket: config.control_socket.clone(),
        })
    }

    /// Runs the guest to its end. vCPU threads still inside KVM_RUN are
    /// left to the process exit that follows.
    pub fn run(mut self) -> Result<VmOutcome, VmError> {
        let (tx, rx) = mpsc::channel();
        let samples = match &self.profile_guest {
            Some(_) => {
                profile::install_kick_handler().map_err(VmError::Thread)?;
                Some(Arc::new(Samples::default()))
            }
            None => None,
        };
        let seccomp = seccomp_enabled();
        let mut kick_target = None;
        for vcpu in self.vcpus.drain(..) {
            let bus = Arc::clone(&self.bus);
            let tx = tx.clone();
            let start = self.start;
            let vcpu_samples = if vcpu.index == 0 { samples.clone() } else { None };
            let profiled = vcpu_samples.is_some();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.index))
                .spawn(move || {
                    if seccomp && let Err(e) = mm_policies::install(Policy::VmmVcpu) {
                        let error = VcpuError::Seccomp { cpu: vcpu.index, message: e.to_string() };
                        let _ = tx.send((vcpu.index, VcpuStop::Failed(error)));
                        return;
                    }
                    vcpu.run(bus, start, tx, vcpu_samples)
                })
                .map_err(VmError::Thread)?;
            if profiled {
                kick_target = Some(handle.as_pthread_t());
            }
        }
        drop(tx);
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
