//! A running microVM as its control thread acts on it: pause, resume, and
//! snapshot (`protocols/vmm.capnp`).
//!
//! Pausing takes two steps, in this order: every vCPU leaves KVM_RUN and
//! parks (so the guest can neither run nor submit new I/O), then every
//! activated device's rings are stopped with vhost-user GET_VRING_BASE (so
//! its back end finishes what it holds and writes guest memory no more).
//! Only then are guest memory, the KVM state and the ring indices still,
//! and a snapshot of them consistent. Resuming undoes it in reverse.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::VmFd;
use mm_protocols::vmm_control::SnapshotReport;

use crate::devices::Bus;
use crate::memory::GuestRam;
use crate::snapshot::machine::MachineState;
use crate::snapshot::{FORMAT, FORMAT_VERSION, HostCpu, Persist, SnapshotState, memory};
use crate::vcpu::control::VcpuHandle;
use crate::vm::VmError;

pub struct LiveVm {
    vm: VmFd,
    ram: GuestRam,
    bus: Arc<Bus>,
    /// Behind a lock because a handle's response channel is single-consumer.
    vcpus: Mutex<Vec<VcpuHandle>>,
    pvm: bool,
    cpus: u8,
    memory_mib: u64,
    /// When the current pause took effect; None while running.
    paused_since: Mutex<Option<Instant>>,
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
        LiveVm { vm, ram, bus, vcpus: Mutex::new(vcpus), pvm, cpus, memory_mib, paused_since: Mutex::new(None) }
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Stops the vCPUs, then the device rings. On a failure part-way the
    /// VM is resumed again, so it is never left half paused.
    pub fn pause(&self) -> Result<(), VmError> {
        let mut paused = self.paused_since.lock().expect("pause lock");
        if paused.is_some() {
            return Ok(());
        }
        let result = self.pause_all();
        if let Err(e) = &result {
            tracing::warn!("pause failed, resuming: {e}");
            self.resume_all();
            return result;
        }
        *paused = Some(Instant::now());
        Ok(())
    }

    fn pause_all(&self) -> Result<(), VmError> {
        for vcpu in self.vcpus.lock().expect("vcpus lock").iter() {
            vcpu.pause()?;
        }
        for (_, device) in &self.bus.virtio {
            device.lock().expect("virtio lock").quiesce()?;
        }
        Ok(())
    }

    /// Best effort in reverse: every ring restarted, every vCPU resumed;
    /// errors are logged (a back end that cannot restart is the broker's to
    /// replace, as after a crash).
    fn resume_all(&self) {
        for (index, (_, device)) in self.bus.virtio.iter().enumerate() {
            if let Err(e) = device.lock().expect("virtio lock").resume() {
                tracing::error!(index, "cannot restart the device's rings: {e}");
            }
        }
        for vcpu in self.vcpus.lock().expect("vcpus lock").iter() {
            if let Err(e) = vcpu.resume() {
                tracing::error!("{e}");
            }
        }
    }

    pub fn resume(&self) -> Result<(), VmError> {
        let mut paused = self.paused_since.lock().expect("pause lock");
        if let Some(since) = paused.take() {
            self.resume_all();
            tracing::info!(paused_us = since.elapsed().as_micros() as u64, "resumed");
        }
        Ok(())
    }

    /// Writes the paused VM to the broker's files: guest memory first (its
    /// extents go into the state), then the state file, both synced.
    pub fn snapshot(&self, state_fd: OwnedFd, memory_fd: OwnedFd) -> Result<SnapshotReport, VmError> {
        let paused = self.paused_since.lock().expect("pause lock");
        let Some(since) = *paused else { return Err(VmError::NotPaused) };
        let began = Instant::now();
        let state_file = File::from(state_fd);
        let memory_file = File::from(memory_fd);
        let image = memory::save(&self.ram, &memory_file)?;
        memory_file.sync_data().map_err(|e| VmError::MemoryImage(memory::MemoryImageError::Write(e)))?;
        let mut vcpus = Vec::new();
        for vcpu in self.vcpus.lock().expect("vcpus lock").iter() {
            vcpus.push(vcpu.save_state()?);
        }
        let devices = self.bus.virtio.iter().map(|(_, d)| d.lock().expect("virtio lock").save()).collect();
        let state = SnapshotState {
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
            memory: image,
        };
        let memory_bytes = state.memory.data_bytes();
        let state_bytes = state.write(&state_file)?;
        let report = SnapshotReport {
            memory_bytes,
            state_bytes,
            save_us: began.elapsed().as_micros() as u64,
            paused_us: since.elapsed().as_micros() as u64,
        };
        tracing::info!(?report, "snapshot written");
        Ok(report)
    }
}
