//! A microVM assembled from its spec, in the order Firecracker's builder
//! uses: KVM, memory, in-kernel interrupt controllers, devices, vCPUs. One
//! core with two ways in: a **boot** loads the kernel and sets the boot
//! vCPU at its entry point; a **restore** fills guest RAM from a snapshot's
//! memory file and sets every KVM object, transport and back end ring from
//! its state file. Nothing touches the host beyond /dev/kvm, one memfd and
//! the files it is handed, so an error at any step leaves nothing behind
//! (and never a half-restored guest: a restore either runs or mm-vmm exits).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_superio::{I8042Device, Serial};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::boot;
use crate::devices::Bus;
use crate::devices::boot_device::BootDevice;
use crate::devices::serial::EventFdTrigger;
use crate::layout::{BOOT_DEVICE_SIZE, BOOT_DEVICE_START, COM1_IRQ, KVM_TSS_ADDRESS};
use crate::memory::GuestRam;
use crate::pvm::PVM_CMDLINE;
use crate::snapshot::lazy::PageServer;
use crate::snapshot::{Persist, SnapshotState, memory};
use crate::vcpu::Vcpu;
use crate::vcpu::state::VcpuState;
use crate::virtio::mmio::{MMIO_SIZE, MmioDevice, QUEUE_NOTIFY_OFFSET, TransportParts, TransportState};
use crate::virtio::vhost_user::VhostUserDevice;
use crate::vm::{
    BASE_CMDLINE, Boot, DeviceSpec, KernelBoot, MAX_CPUS, MAX_DEVICES, MemoryRestore, Vm, VmConfig, VmError, kvm_err,
};

/// IRQ of the first virtio device; the serial port has 4 and the IOAPIC
/// has 24 pins, so up to 19 devices fit.
const FIRST_VIRTIO_IRQ: u32 = 5;

/// The MMIO base and IRQ of virtio device `index`.
fn device_slot(index: usize) -> (u64, u32) {
    (BOOT_DEVICE_START + BOOT_DEVICE_SIZE + index as u64 * MMIO_SIZE, FIRST_VIRTIO_IRQ + index as u32)
}

/// The guest's kernel command line: ours, the devices, the PVM fix-ups,
/// the caller's extras, and the workload for mm-init.
fn kernel_cmdline(
    config: &VmConfig,
    kernel: &KernelBoot,
    pvm: bool,
) -> Result<linux_loader::cmdline::Cmdline, VmError> {
    let devices: Vec<String> = (0..config.devices.len())
        .map(|i| {
            let (base, irq) = device_slot(i);
            format!("virtio_mmio.device=4K@{base:#x}:{irq}")
        })
        .collect();
    let bootdev = format!("mm.bootdev={:#x}", BOOT_DEVICE_START);
    let pvm_params = if pvm { PVM_CMDLINE } else { "" };
    let cmd = if kernel.command.is_empty() {
        String::new()
    } else {
        format!("mm.cmd={}", crate::vm::encode_command(&kernel.command))
    };
    Ok(boot::build_cmdline(&[BASE_CMDLINE, &bootdev, &devices.join(" "), pvm_params, &kernel.extra_cmdline, &cmd])?)
}

/// The KVM VM with its interrupt controllers and guest RAM registered.
fn create_vm(kvm: &Kvm, ram: &GuestRam) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    ram.register(&vm, 0).map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    Ok(vm)
}

/// Connects to a device's back end and learns what it offers (needs no
/// VM, so a restore does it while KVM's objects are made).
fn open_backend(spec: &DeviceSpec) -> Result<VhostUserDevice, VmError> {
    let kind = spec.kind.name();
    let stream = spec.socket.connect().map_err(|source| VmError::DeviceConnect {
        kind,
        socket: spec.socket.to_string(),
        source,
    })?;
    Ok(VhostUserDevice::connect(spec.kind, stream)?)
}

/// Wires a back end's queue notifications (ioeventfds on QueueNotify) and
/// interrupt (an irqfd) into KVM; with a saved transport state the new back
/// end takes over the guest's device.
fn attach_device(
    vm: &VmFd,
    ram: &GuestRam,
    mut backend: VhostUserDevice,
    index: usize,
    saved: Option<&TransportState>,
) -> Result<MmioDevice, VmError> {
    let (base, irq) = device_slot(index);
    backend.serve_faults_from(ram.pages.clone());
    let mut kicks = Vec::new();
    for queue in 0..backend.kind().num_queues() {
        let kick = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm.register_ioevent(&kick, &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET), queue as u32)
            .map_err(kvm_err("KVM_IOEVENTFD"))?;
        kicks.push(kick);
    }
    let call = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&call, irq).map_err(kvm_err("KVM_IRQFD"))?;
    let memfd = ram.memfd.try_clone().map_err(VmError::EventFd)?;
    let parts = TransportParts { backend, mem: ram.memory.clone(), memfd, kicks, call };
    match saved {
        None => Ok(MmioDevice::new(parts.backend, parts.mem, parts.memfd, parts.kicks, parts.call)),
        Some(state) => MmioDevice::restore(parts, state).map_err(|source| VmError::RestoreDevice { index, source }),
    }
}

/// The bus: the console (fresh, or with its saved registers), the i8042,
/// the boot device and the virtio transports.
fn make_bus(
    vm: &VmFd,
    config: &VmConfig,
    virtio: Vec<MmioDevice>,
    serial_state: Option<&vm_superio::serial::SerialState>,
    start: Instant,
) -> Result<Arc<Bus>, VmError> {
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&serial_irq, COM1_IRQ).map_err(kvm_err("KVM_IRQFD"))?;
    let out = config.serial.open().map_err(VmError::Serial)?;
    let serial = match serial_state {
        None => Serial::new(EventFdTrigger(serial_irq), out),
        Some(saved) => Serial::from_state(saved, EventFdTrigger(serial_irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| VmError::BadSnapshot(format!("console state: {e:?}")))?,
    };
    let reset = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
    let virtio = virtio.into_iter().enumerate().map(|(i, dev)| (device_slot(i).0, Mutex::new(dev))).collect();
    Ok(Arc::new(Bus {
        serial: Mutex::new(serial),
        i8042: Mutex::new(I8042Device::new(EventFdTrigger(reset))),
        boot_device: BootDevice::new(start),
        virtio,
    }))
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

/// Builds the VM from `config`: booted, or restored from its snapshot.
pub fn build(config: &VmConfig, start: Instant) -> Result<Vm, VmError> {
    let step = |what: &str| tracing::debug!(since_start_us = start.elapsed().as_micros() as u64, "{what}");
    if config.devices.len() > MAX_DEVICES {
        return Err(VmError::TooManyDevices);
    }
    let pvm = config.pvm.resolve();
    let restore = match &config.boot {
        Boot::Kernel(kernel) => {
            if config.cpus == 0 || config.cpus > MAX_CPUS {
                return Err(VmError::BadCpuCount(config.cpus));
            }
            if !kernel.kernel.is_file() {
                return Err(VmError::KernelMissing(kernel.kernel.clone()));
            }
            if let Some(initrd) = kernel.initrd.as_ref().filter(|p| !p.is_file()) {
                return Err(VmError::InitrdMissing(initrd.clone()));
            }
            None
        }
        Boot::Snapshot(files) => {
            let (state_file, memory_file) = files.open()?;
            let state = SnapshotState::read(&state_file)?;
            state.check_host(pvm)?;
            let kinds: Vec<&'static str> = config.devices.iter().map(|d| d.kind.name()).collect();
            state.check_devices(&kinds)?;
            Some((state, memory_file))
        }
    };
    let kvm = open_kvm(config.kvm_fd)?;
    step("opened /dev/kvm");
    if pvm {
        tracing::info!("PVM host detected: filtering CPUID and adding `{PVM_CMDLINE}` to the kernel command line");
    }
    let (cpus, memory_mib) = match &restore {
        Some((state, _)) => (state.cpus, state.memory_mib),
        None => (config.cpus, config.memory_mib),
    };
    let mut ram = GuestRam::new(memory_mib)?;
    step("guest RAM mapped");
    let msr_indices: Arc<[u32]> =
        kvm.get_msr_index_list().map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?.as_slice().into();

    let (vm, bus, vcpus) = match (&config.boot, restore) {
        (Boot::Kernel(kernel), _) => boot_path(config, kernel, &kvm, &ram, pvm, start)?,
        (Boot::Snapshot(_), Some((state, memory_file))) => {
            restore_path(config, &state, &memory_file, &kvm, &mut ram, start)?
        }
        (Boot::Snapshot(_), None) => unreachable!("a snapshot boot read its state above"),
    };
    step("VM ready");
    Ok(Vm::assemble(vm, ram, vcpus, bus, start, config, pvm, cpus, memory_mib, msr_indices))
}

/// A cold boot: the kernel and initramfs are copied into guest RAM while
/// the KVM objects and devices are made (the copy is the slow step and
/// they do not need it), then the vCPUs are configured for the entry point.
fn boot_path(
    config: &VmConfig,
    kernel: &KernelBoot,
    kvm: &Kvm,
    ram: &GuestRam,
    pvm: bool,
    start: Instant,
) -> Result<(VmFd, Arc<Bus>, Vec<Vcpu>), VmError> {
    let cmdline = kernel_cmdline(config, kernel, pvm)?;
    let (loaded, machine) = std::thread::scope(|scope| {
        let loader =
            scope.spawn(|| boot::load(&ram.memory, &kernel.kernel, kernel.initrd.as_deref(), &cmdline, config.cpus));
        let machine = (|| {
            let vm = create_vm(kvm, ram)?;
            let mut virtio = Vec::new();
            for (i, spec) in config.devices.iter().enumerate() {
                virtio.push(attach_device(&vm, ram, open_backend(spec)?, i, None)?);
            }
            let bus = make_bus(&vm, config, virtio, None, start)?;
            Ok::<_, VmError>((vm, bus))
        })();
        (loader.join().expect("the kernel loader thread panicked"), machine)
    });
    let (vm, bus) = machine?;
    let loaded = loaded?;
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
    for index in 0..config.cpus {
        let fd = vm.create_vcpu(u64::from(index)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let vcpu = Vcpu { index, fd };
        vcpu.configure(&supported, config.cpus, pvm, loaded.entry.0)?;
        vcpus.push(vcpu);
    }
    Ok((vm, bus, vcpus))
}

/// The userfaultfd for a lazy restore, or None for an eager one (asked for,
/// or no userfaultfd to be had here: said in the log).
fn lazy_userfaultfd(config: &VmConfig) -> Option<userfaultfd::Uffd> {
    if config.memory_restore == MemoryRestore::Eager {
        return None;
    }
    match crate::snapshot::uffd::open(config.uffd_fd) {
        Ok(uffd) => Some(uffd),
        Err(e) => {
            tracing::warn!("{e}: restoring guest RAM eagerly instead of lazily");
            None
        }
    }
}

/// A restore: guest RAM (checked, then lazily served or read in), the
/// VM's KVM state, each vCPU with its saved state, and only then each
/// device taken over by its new back end at the saved ring indices. What
/// does not depend on the rest runs side by side: the back ends' handshakes
/// and the memory file's check beside KVM's set-up, then the devices'
/// take-overs beside each other.
///
/// The order matters: a back end may raise its interrupt as soon as its
/// rings start (the vsock device posts its transport reset at once), and an
/// interrupt that arrives before the vCPUs' LAPICs exist, or that
/// KVM_SET_LAPIC then overwrites, is lost; with EVENT_IDX the guest, never
/// having seen it, never asks for another, and the device is dead to it
/// (seen: a resumed guest's vsock and net silent for good while its disks
/// worked).
fn restore_path(
    config: &VmConfig,
    state: &SnapshotState,
    memory_file: &std::fs::File,
    kvm: &Kvm,
    ram: &mut GuestRam,
    start: Instant,
) -> Result<(VmFd, Arc<Bus>, Vec<Vcpu>), VmError> {
    let step = |what: &str| tracing::debug!(since_start_us = start.elapsed().as_micros() as u64, "{what}");
    let uffd = lazy_userfaultfd(config);
    let seccomp = crate::vm::seccomp_enabled();
    let shared_ram: &GuestRam = ram;
    let (pages, machine, backends) = std::thread::scope(|scope| {
        let backends: Vec<_> = config.devices.iter().map(|spec| scope.spawn(move || open_backend(spec))).collect();
        let pages = uffd
            .map(|uffd| scope.spawn(move || PageServer::start(shared_ram, memory_file, &state.memory, uffd, seccomp)));
        let eager = pages.is_none();
        let machine = (|| {
            if eager {
                memory::restore(shared_ram, memory_file, &state.memory)?;
                step("guest RAM restored");
            }
            let vm = create_vm(kvm, shared_ram)?;
            state.machine.restore(&vm).map_err(|(what, source)| VmError::Kvm { what, source })?;
            step("VM and its interrupt controllers restored");
            let mut vcpus = Vec::with_capacity(state.vcpus.len());
            for saved in &state.vcpus {
                let fd = vm.create_vcpu(u64::from(saved.index)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
                VcpuState::restore(saved, &fd)?;
                vcpus.push(Vcpu { index: saved.index, fd });
            }
            step("vCPUs restored");
            Ok::<_, VmError>((vm, vcpus))
        })();
        let pages = pages.map(|h| h.join().expect("the page server's start panicked")).transpose();
        let backends: Vec<_> = backends.into_iter().map(|h| h.join().expect("a back end handshake panicked")).collect();
        (pages, machine, backends)
    });
    if let Some(pages) = pages? {
        ram.pages = Some(Arc::new(pages));
        tracing::info!("lazy restore: guest RAM comes in on first touch (checksums checked)");
    }
    let (vm, vcpus) = machine?;
    let backends = backends.into_iter().collect::<Result<Vec<_>, _>>()?;
    step("back ends connected");
    let ram: &GuestRam = ram;
    let virtio = std::thread::scope(|scope| {
        let handles: Vec<_> = backends
            .into_iter()
            .enumerate()
            .map(|(i, backend)| {
                let (vm, saved) = (&vm, &state.devices[i]);
                scope.spawn(move || attach_device(vm, ram, backend, i, Some(saved)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a device take-over panicked")).collect::<Result<Vec<_>, _>>()
    })?;
    step("devices taken over");
    let bus = make_bus(&vm, config, virtio, Some(&state.serial), start)?;
    Ok((vm, bus, vcpus))
}
