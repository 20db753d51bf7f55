//! A running microVM as its control thread acts on it: pause, resume, and
//! snapshot (`protocols/vmm.capnp`).
//!
//! Pausing takes two steps, in this order: every vCPU leaves KVM_RUN and
//! parks (so the guest can neither run nor submit new I/O), then every
//! activated device's rings are stopped with vhost-user GET_VRING_BASE (so
//! its back end finishes what it holds and writes guest memory no more).
//! Only then are guest memory, the KVM state and the ring indices still,
//! and a snapshot of them consistent. Resuming undoes it in reverse.
//!
//! A snapshot of a running VM (`snapshot_running`) turns that around so the
//! guest stands still only for the cut: the vCPUs, and the device back ends
//! when they can log their own writes (vhost-user LOG_SHMFD, into
//! `snapshot/device_log.rs`), run on while guest RAM is copied under KVM
//! dirty logging (`snapshot/running.rs`); then the devices are quiesced and
//! the vCPUs paused just long enough for the pages dirtied meanwhile (by
//! either) and the vCPU, machine and device state, and run again. A back
//! end that cannot log has every device held from the start of the copy
//! instead. The devices stay quiesced (the guest's I/O waits in its rings)
//! until the broker has copied the disks at the same cut and says `resume`.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::VmFd;
use mm_protocols::vmm_control::SnapshotReport;

use crate::devices::Bus;
use crate::memory::GuestRam;
use crate::snapshot::machine::MachineState;
use crate::snapshot::{FORMAT, FORMAT_VERSION, HostCpu, Persist, SnapshotState, memory, running};
use crate::vcpu::control::VcpuHandle;
use crate::vm::{VmError, kvm_err};

pub struct LiveVm {
    vm: VmFd,
    ram: GuestRam,
    bus: Arc<Bus>,
    /// Behind a lock because a handle's response channel is single-consumer.
    vcpus: Mutex<Vec<VcpuHandle>>,
    pvm: bool,
    cpus: u8,
    memory_mib: u64,
    /// What is stopped, and since when.
    paused_since: Mutex<Stopped>,
}

/// What of the VM is stopped.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stopped {
    Nothing,
    /// vCPUs parked and devices quiesced, since then (`pause`).
    All(Instant),
    /// Devices quiesced but vCPUs running, since then: after
    /// `snapshot_running`, until the broker's `resume`.
    Devices(Instant),
}

impl LiveVm {
    pub fn new(
        vm: VmFd,
        ram: GuestRam,
        bus: Arc<Bus>,
        vcpus: Vec<VcpuHandle>,
        pvm: bool,
        cpus: u8,
        memory_mib: u64,
    ) -> LiveVm {
        LiveVm {
            vm,
            ram,
            bus,
            vcpus: Mutex::new(vcpus),
            pvm,
            cpus,
            memory_mib,
            paused_since: Mutex::new(Stopped::Nothing),
        }
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Stops the vCPUs, then the device rings. On a failure part-way the
    /// VM is resumed again, so it is never left half paused.
    pub fn pause(&self) -> Result<(), VmError> {
        let mut stopped = self.paused_since.lock().expect("pause lock");
        match *stopped {
            Stopped::All(_) => return Ok(()),
            // Its devices are stopped already; stopping the vCPUs completes it.
            Stopped::Devices(_) => {
                if let Err(e) = self.pause_vcpus() {
                    self.resume_vcpus();
                    return Err(e);
                }
            }
            Stopped::Nothing => {
                let result = self.pause_vcpus().and_then(|()| self.quiesce_devices());
                if let Err(e) = result {
                    tracing::warn!("pause failed, resuming: {e}");
                    self.resume_devices();
                    self.resume_vcpus();
                    return Err(e);
                }
            }
        }
        *stopped = Stopped::All(Instant::now());
        Ok(())
    }

    fn pause_vcpus(&self) -> Result<(), VmError> {
        for vcpu in self.vcpus.lock().expect("vcpus lock").iter() {
            vcpu.pause()?;
        }
        Ok(())
    }

    fn quiesce_devices(&self) -> Result<(), VmError> {
        for (_, device) in &self.bus.virtio {
            device.lock().expect("virtio lock").quiesce()?;
        }
        Ok(())
    }

    /// Best effort: every ring restarted; errors are logged (a back end
    /// that cannot restart is the broker's to replace, as after a crash).
    fn resume_devices(&self) {
        for (index, (_, device)) in self.bus.virtio.iter().enumerate() {
            if let Err(e) = device.lock().expect("virtio lock").resume() {
                tracing::error!(index, "cannot restart the device's rings: {e}");
            }
        }
    }

    fn resume_vcpus(&self) {
        for vcpu in self.vcpus.lock().expect("vcpus lock").iter() {
            if let Err(e) = vcpu.resume() {
                tracing::error!("{e}");
            }
        }
    }

    /// Lets whatever is stopped run again: rings first, then vCPUs.
    pub fn resume(&self) -> Result<(), VmError> {
        let mut stopped = self.paused_since.lock().expect("pause lock");
        match std::mem::replace(&mut *stopped, Stopped::Nothing) {
            Stopped::Nothing => {}
            Stopped::All(since) => {
                self.resume_devices();
                self.resume_vcpus();
                tracing::info!(paused_us = since.elapsed().as_micros() as u64, "resumed");
            }
            Stopped::Devices(since) => {
                self.resume_devices();
                tracing::info!(io_held_us = since.elapsed().as_micros() as u64, "devices resumed");
            }
        }
        Ok(())
    }

    /// Writes the paused VM to the broker's files: guest memory first (its
    /// extents go into the state), then the state file, both synced.
    pub fn snapshot(&self, state_fd: OwnedFd, memory_fd: OwnedFd) -> Result<SnapshotReport, VmError> {
        let paused = self.paused_since.lock().expect("pause lock");
        let Stopped::All(since) = *paused else { return Err(VmError::NotPaused) };
        let began = Instant::now();
        let state_file = File::from(state_fd);
        let memory_file = File::from(memory_fd);
        // Pages a lazy restore has not brought in yet are holes too.
        self.ram.complete_lazy_restore()?;
        let image = memory::save(&self.ram, &memory_file)?;
        memory_file.sync_data().map_err(|e| VmError::MemoryImage(memory::MemoryImageError::Write(e)))?;
        let state = self.state(image)?;
        let memory_bytes = state.memory.data_bytes();
        let state_bytes = state.write(&state_file)?;
        let report = SnapshotReport {
            memory_bytes,
            state_bytes,
            save_us: began.elapsed().as_micros() as u64,
            paused_us: since.elapsed().as_micros() as u64,
            ..SnapshotReport::default()
        };
        tracing::info!(?report, "snapshot written");
        Ok(report)
    }

    /// Everything but guest RAM, of a VM whose vCPUs are paused and whose
    /// devices are quiesced; `memory` says where RAM is in the memory file.
    fn state(&self, memory: memory::MemoryImage) -> Result<SnapshotState, VmError> {
        let mut vcpus = Vec::new();
        for vcpu in self.vcpus.lock().expect("vcpus lock").iter() {
            vcpus.push(vcpu.save_state()?);
        }
        let devices = self.bus.virtio.iter().map(|(_, d)| d.lock().expect("virtio lock").save()).collect();
        Ok(SnapshotState {
            format: FORMAT.to_string(),
            format_version: FORMAT_VERSION,
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            host_cpu: HostCpu::of_this_host(),
            pvm: self.pvm,
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            machine: MachineState::save(&self.vm).map_err(|(what, source)| VmError::Kvm { what, source })?,
            vcpus,
            serial: self.bus.serial.lock().expect("serial lock").state(),
            devices,
            memory,
        })
    }

    /// A snapshot of the running VM with the vCPUs paused only for the cut
    /// (module doc). On success the devices stay quiesced until `resume`;
    /// on failure everything runs again.
    pub fn snapshot_running(&self, state_fd: OwnedFd, memory_fd: OwnedFd) -> Result<SnapshotReport, VmError> {
        let mut stopped = self.paused_since.lock().expect("pause lock");
        if *stopped != Stopped::Nothing {
            return Err(VmError::NotRunning);
        }
        let began = Instant::now();
        let state_file = File::from(state_fd);
        let memory_file = File::from(memory_fd);
        // Pages a lazy restore has not brought in yet are holes in the
        // memfd, which the copy reads as never touched: bring them in first.
        self.ram.complete_lazy_restore()?;
        // Devices whose back ends all log their writes serve the guest
        // during the copy; otherwise they are held from the start.
        let devices_log = self.bus.virtio.iter().all(|(_, d)| d.lock().expect("virtio lock").can_log());
        let ready = if devices_log { self.start_device_logging() } else { self.quiesce_devices() };
        let cut = ready.and_then(|()| self.cut(&memory_file, devices_log));
        if devices_log {
            self.stop_device_logging();
        }
        let cut = match cut {
            Ok(cut) => cut,
            Err(e) => {
                self.resume_devices();
                return Err(e);
            }
        };
        // The guest runs again; its I/O waits for the broker's `resume`.
        let quiesced = cut.quiesced.unwrap_or(began);
        *stopped = Stopped::Devices(quiesced);
        // Not synced here: the devices wait for the broker's `resume`, and
        // the broker syncs both files (and its disk copy) after it.
        let finish = || -> Result<(u64, u64), VmError> {
            let image = running::index(&memory_file, &self.ram)?;
            let state = SnapshotState { memory: image, ..cut.state };
            Ok((state.memory.data_bytes(), state.write_unsynced(&state_file)?))
        };
        let (memory_bytes, state_bytes) = finish()?;
        let report = SnapshotReport {
            memory_bytes,
            state_bytes,
            save_us: began.elapsed().as_micros() as u64,
            paused_us: cut.paused_us,
            dirty_pages: cut.dirty_pages,
            device_pages: cut.device_pages,
            io_run_us: quiesced.saturating_duration_since(began).as_micros() as u64,
        };
        tracing::info!(?report, devices_log, "snapshot of the running VM written");
        Ok(report)
    }

    /// Every device's back end logs its writes to guest RAM into the
    /// device dirty log, cleared first. On an error none is left logging.
    fn start_device_logging(&self) -> Result<(), VmError> {
        let log = &self.ram.device_log;
        log.clear();
        for (_, device) in &self.bus.virtio {
            if let Err(e) = device.lock().expect("virtio lock").start_logging(log.file(), log.size()) {
                self.stop_device_logging();
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Best effort: a back end that cannot be told only logs on, harmlessly.
    fn stop_device_logging(&self) {
        for (index, (_, device)) in self.bus.virtio.iter().enumerate() {
            if let Err(e) = device.lock().expect("virtio lock").stop_logging() {
                tracing::warn!(index, "cannot turn the device's dirty log off: {e}");
            }
        }
    }

    /// The copy beside the running guest (and, when `devices_log`, its
    /// running devices), then the cut: the devices quiesced if they still
    /// run, the vCPUs paused, every page dirtied meanwhile (KVM's log and
    /// the devices') copied again, the state saved, the vCPUs resumed.
    fn cut(&self, memory_file: &File, devices_log: bool) -> Result<Cut, VmError> {
        let dirty_log =
            running::DirtyLog::start(&self.vm, &self.ram).map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (dirty log)"))?;
        running::copy_all(&self.ram, memory_file)?;
        let quiesced = Instant::now();
        if devices_log {
            // GET_VRING_BASE waits for what each back end holds, so every
            // write of theirs is done, and logged, once this returns.
            self.quiesce_devices()?;
        }
        let paused = Instant::now();
        if let Err(e) = self.pause_vcpus() {
            self.resume_vcpus();
            return Err(e);
        }
        let saved = dirty_log.take().map_err(kvm_err("KVM_GET_DIRTY_LOG")).and_then(|vcpu_pages| {
            let (pages, device_count) = running::pages_for_cut(&self.ram, vcpu_pages, &self.ram.device_log.take());
            let count = pages.len() as u64;
            running::copy_pages(&self.ram, memory_file, pages)?;
            let empty = memory::MemoryImage { size: 0, extents: Vec::new() };
            Ok((self.state(empty)?, count, device_count))
        });
        self.resume_vcpus();
        let paused_us = paused.elapsed().as_micros() as u64;
        drop(dirty_log);
        let (state, dirty_pages, device_pages) = saved?;
        Ok(Cut { state, paused_us, dirty_pages, device_pages, quiesced: devices_log.then_some(quiesced) })
    }
}

/// What the cut of a running snapshot leaves: the state (its memory image
/// still to be indexed), the vCPUs' pause, the pages copied again (and of
/// those, the devices'), and when the cut quiesced the devices (`None`:
/// they were held before the copy).
struct Cut {
    state: SnapshotState,
    paused_us: u64,
    dirty_pages: u64,
    device_pages: u64,
    quiesced: Option<Instant>,
}
