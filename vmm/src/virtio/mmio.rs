//! The virtio-mmio transport (virtio 1.2, 4.2.2, version 2 registers) in
//! front of a vhost-user back end.
//!
//! Queue notifications never come here: the QueueNotify register is a KVM
//! ioeventfd handed to the back end as its kick fd. Interrupts do not either:
//! the back end writes the device's KVM irqfd directly. Because mm-vmm then
//! cannot know why an interrupt fired, InterruptStatus always reports "used
//! buffer" once the device runs; the guest driver checks every ring, which is
//! cheap, and a spurious interrupt is harmless.

use std::fs::File;
use std::os::unix::net::UnixStream;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::vhost_user::{Activation, FrontendError, QueueEvents, QueueSetup, VhostUserDevice};
use super::*;
use crate::snapshot::Persist;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d4d_564d; // "MVMM"
const INT_VRING: u32 = 1;
const INT_CONFIG: u32 = 2;
const STATUS_NEEDS_RESET: u32 = 64;

/// Register offsets.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}
/// Offset of the QueueNotify register, for the ioeventfd.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;
/// Each device gets one page of MMIO space.
pub const MMIO_SIZE: u64 = 0x1000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Queue {
    pub setup: QueueSetup,
    pub ready: bool,
}

/// A transport's registers and its back end's progress, as a snapshot
/// carries them: enough for a fresh back end to take over the guest's
/// device where the old one stopped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// `block`, `net` or `vsock`: a restore refuses another kind in its place.
    pub kind: String,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<Queue>,
    pub status: u32,
    pub config_generation: u32,
    pub config_interrupt: bool,
    /// What the driver activated (None before DRIVER_OK).
    pub activation: Option<Activation>,
    /// Per queue, the avail index the back end stopped at (GET_VRING_BASE).
    pub ring_bases: Vec<u16>,
}

/// What a restored transport is built from besides its state.
pub struct TransportParts {
    pub backend: VhostUserDevice,
    pub mem: GuestMemoryMmap,
    pub memfd: File,
    pub kicks: Vec<EventFd>,
    pub call: EventFd,
}

/// One virtio-mmio device: its registers, and the vhost-user back end and
/// eventfds behind them.
pub struct MmioDevice {
    backend: VhostUserDevice,
    mem: GuestMemoryMmap,
    memfd: File,
    kicks: Vec<EventFd>,
    call: EventFd,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    status: u32,
    config_generation: u32,
    config_interrupt: bool,
    /// Set while quiesced: where each ring stopped.
    quiesced: Option<Vec<u16>>,
}

fn set_half(value: &mut u64, high: bool, half: u32) {
    if high {
        *value = (*value & 0xffff_ffff) | (u64::from(half) << 32);
    } else {
        *value = (*value & !0xffff_ffff) | u64::from(half);
    }
}

impl MmioDevice {
    pub fn new(
        backend: VhostUserDevice,
        mem: GuestMemoryMmap,
        memfd: File,
        kicks: Vec<EventFd>,
        call: EventFd,
    ) -> Self {
        let queues = vec![Queue::default(); backend.kind().num_queues()];
        MmioDevice {
            backend,
            mem,
            memfd,
            kicks,
            call,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            status: 0,
            config_generation: 0,
            config_interrupt: false,
            quiesced: None,
        }
    }

    fn offered_features(&self) -> u64 {
        self.backend.device_features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            let config = self.backend.config();
            let start = (offset - reg::CONFIG) as usize;
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        let value: u32 = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.backend.kind().device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |_| u32::from(MAX_QUEUE_SIZE)),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => {
                let running = if self.status & STATUS_DRIVER_OK != 0 { INT_VRING } else { 0 };
                running | if self.config_interrupt { INT_CONFIG } else { 0 }
            }
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            // Config space is read-only for the devices we back.
            return;
        }
        if data.len() != 4 {
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        // Queue registers may only change while the queue is not live.
        let queue_writable = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            // Features are settled once FEATURES_OK is (virtio 1.2, 3.1.1):
            // a later write would put features the device never accepted
            // into the activation, and a snapshot of it would not restore
            // (seen with the mmio_transport fuzz harness).
            reg::DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => match self.driver_features_sel {
                0 => set_half(&mut self.driver_features, false, value),
                1 => set_half(&mut self.driver_features, true, value),
                _ => {}
            },
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM if queue_writable => {
                if let Some(q) = self.selected_queue() {
                    q.setup.size = (value as u16).min(MAX_QUEUE_SIZE);
                }
            }
            reg::QUEUE_READY if queue_writable => {
                if let Some(q) = self.selected_queue() {
                    q.ready = value == 1;
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH if queue_writable => {
                let high = offset == reg::QUEUE_DESC_HIGH;
                if let Some(q) = self.selected_queue() {
                    set_half(&mut q.setup.desc, high, value);
                }
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH if queue_writable => {
                let high = offset == reg::QUEUE_DRIVER_HIGH;
                if let Some(q) = self.selected_queue() {
                    set_half(&mut q.setup.avail, high, value);
                }
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH if queue_writable => {
                let high = offset == reg::QUEUE_DEVICE_HIGH;
                if let Some(q) = self.selected_queue() {
                    set_half(&mut q.setup.used, high, value);
                }
            }
            reg::INTERRUPT_ACK => {
                if value & INT_CONFIG != 0 {
                    self.config_interrupt = false;
                }
            }
            reg::STATUS => self.write_status(value),
            _ => tracing::debug!(device = self.backend.kind().name(), offset, value, "ignored register write"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly = value & !self.status;
        if newly & STATUS_FEATURES_OK != 0 && self.driver_features & !self.offered_features() != 0 {
            // The driver asked for something we never offered: leave
            // FEATURES_OK clear, which the driver reads back as a refusal.
            self.status = value & !STATUS_FEATURES_OK;
            return;
        }
        self.status = value;
        // A driver that cleared DRIVER_OK (which it must not) and sets it
        // again gets the device it has: activating again would reconfigure
        // rings the back end is running (seen with the mmio_transport fuzz
        // harness).
        if newly & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK != 0 && self.backend.activation().is_none() {
            let queues: Vec<QueueSetup> =
                self.queues.iter().map(|q| if q.ready { q.setup } else { QueueSetup::default() }).collect();
            let events = QueueEvents { kicks: &self.kicks, call: &self.call };
            if let Err(e) = self.backend.activate(&self.mem, &self.memfd, self.driver_features, &queues, &events) {
                tracing::error!("{e}");
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    fn reset(&mut self) {
        self.backend.reset();
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.config_interrupt = false;
        for q in &mut self.queues {
            *q = Queue::default();
        }
    }

    /// Replaces the back end with a fresh one on `stream`.
    pub fn reconnect(&mut self, stream: UnixStream) -> Result<(), FrontendError> {
        let events = QueueEvents { kicks: &self.kicks, call: &self.call };
        self.backend.reconnect(stream, &self.mem, &self.memfd, &events)
    }

    pub fn kind(&self) -> DeviceKind {
        self.backend.kind()
    }

    /// Stops the back end's rings (see [`VhostUserDevice::quiesce`]) until
    /// [`Self::resume`]. Idempotent.
    pub fn quiesce(&mut self) -> Result<(), FrontendError> {
        if self.quiesced.is_none() {
            self.quiesced = Some(self.backend.quiesce()?);
        }
        Ok(())
    }

    /// Whether the back end can log its writes to guest RAM (see
    /// [`VhostUserDevice::start_logging`]).
    pub fn can_log(&self) -> bool {
        self.backend.can_log()
    }

    /// The back end logs its writes to guest RAM into `log` until
    /// [`Self::stop_logging`].
    pub fn start_logging(&mut self, log: &File, size: u64) -> Result<(), FrontendError> {
        self.backend.start_logging(log, size)
    }

    pub fn stop_logging(&mut self) -> Result<(), FrontendError> {
        self.backend.stop_logging()
    }

    /// Restarts the rings where [`Self::quiesce`] stopped them.
    pub fn resume(&mut self) -> Result<(), FrontendError> {
        let Some(bases) = self.quiesced.take() else { return Ok(()) };
        let events = QueueEvents { kicks: &self.kicks, call: &self.call };
        self.backend.resume(&self.mem, &self.memfd, &bases, &events)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportRestoreError {
    #[error("the snapshot has a {saved} device where this VM has a {given}")]
    WrongKind { saved: String, given: &'static str },
    #[error("the snapshot's {kind} device has {saved} queues, not {expected}")]
    WrongQueueCount { kind: &'static str, saved: usize, expected: usize },
    #[error("the snapshot's {0} device was saved without quiescing its rings")]
    NotQuiesced(&'static str),
    #[error(transparent)]
    Frontend(#[from] FrontendError),
}

impl Persist for MmioDevice {
    type State = TransportState;
    type ConstructorArgs = TransportParts;
    type Error = TransportRestoreError;

    /// The transport as it stands; its ring indices are those of the last
    /// quiesce (a snapshot quiesces first).
    fn save(&self) -> TransportState {
        TransportState {
            kind: self.kind().name().to_string(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self.queues.clone(),
            status: self.status,
            config_generation: self.config_generation,
            config_interrupt: self.config_interrupt,
            activation: self.backend.activation().cloned(),
            ring_bases: self.quiesced.clone().unwrap_or_default(),
        }
    }

    /// Takes over the guest's device with a fresh back end: registers as
    /// saved, and an activated device's rings started at the saved indices.
    fn restore(parts: TransportParts, state: &TransportState) -> Result<Self, TransportRestoreError> {
        let kind = parts.backend.kind();
        if state.kind != kind.name() {
            return Err(TransportRestoreError::WrongKind { saved: state.kind.clone(), given: kind.name() });
        }
        if state.queues.len() != kind.num_queues() {
            return Err(TransportRestoreError::WrongQueueCount {
                kind: kind.name(),
                saved: state.queues.len(),
                expected: kind.num_queues(),
            });
        }
        let mut device = MmioDevice::new(parts.backend, parts.mem, parts.memfd, parts.kicks, parts.call);
        device.device_features_sel = state.device_features_sel;
        device.driver_features_sel = state.driver_features_sel;
        device.driver_features = state.driver_features;
        device.queue_sel = state.queue_sel;
        device.queues = state.queues.clone();
        device.status = state.status;
        device.config_generation = state.config_generation;
        device.config_interrupt = state.config_interrupt;
        if let Some(activation) = &state.activation {
            if state.ring_bases.len() != activation.queues.len() {
                return Err(TransportRestoreError::NotQuiesced(kind.name()));
            }
            let events = QueueEvents { kicks: &device.kicks, call: &device.call };
            device.backend.restore(activation.clone(), &state.ring_bases, &device.mem, &device.memfd, &events)?;
        }
        Ok(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::{FakeBackend, Offer, guest_ram};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A net transport in front of a fake back end, driven to DRIVER_OK
    /// with both rings in guest RAM.
    fn running_net() -> (MmioDevice, FakeBackend) {
        let kind = DeviceKind::Net;
        let mut offer = Offer::full(kind);
        offer.features = 1 << 32 | 0xff | crate::fuzzing::PROTOCOL_FEATURES;
        let (backend, stream) = FakeBackend::spawn(offer, kind.num_queues());
        let vu = VhostUserDevice::connect(kind, stream).unwrap();
        let (mem, memfd) = guest_ram();
        let kicks = (0..2).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
        let mut dev = MmioDevice::new(vu, mem.clone(), memfd.try_clone().unwrap(), kicks, EventFd::new(0).unwrap());
        let mut w = |offset: u64, value: u32| dev.write(offset, &value.to_le_bytes());
        w(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(reg::DRIVER_FEATURES_SEL, 0);
        w(reg::DRIVER_FEATURES, 0xff);
        w(reg::DRIVER_FEATURES_SEL, 1);
        w(reg::DRIVER_FEATURES, 1);
        w(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        for q in 0..2 {
            w(reg::QUEUE_SEL, q);
            w(reg::QUEUE_NUM, 256);
            w(reg::QUEUE_DESC_LOW, 0x4000 * q);
            w(reg::QUEUE_DRIVER_LOW, 0x4000 * q + 0x1000);
            w(reg::QUEUE_DEVICE_LOW, 0x4000 * q + 0x2000);
            w(reg::QUEUE_READY, 1);
        }
        w(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert!(dev.backend.activation().is_some());
        assert_eq!(backend.settle().started, vec![true, true]);
        (dev, backend)
    }

    /// Regression: clearing DRIVER_OK and setting it again re-sent the
    /// rings' size, addresses and base to a back end running them (the
    /// fake back end panics on that).
    #[test]
    fn driver_ok_again_leaves_running_rings_alone() {
        let (mut dev, backend) = running_net();
        dev.write(reg::STATUS, &(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK).to_le_bytes());
        let all = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        dev.write(reg::STATUS, &all.to_le_bytes());
        assert_eq!(backend.settle().started, vec![true, true]);
        drop(dev);
        backend.finish();
    }

    /// Regression: features written after FEATURES_OK went into the
    /// activation unchecked, and the snapshot then refused to restore.
    #[test]
    fn driver_features_settle_at_features_ok() {
        let (mut dev, backend) = running_net();
        dev.write(reg::DRIVER_FEATURES_SEL, &1u32.to_le_bytes());
        dev.write(reg::DRIVER_FEATURES, &u32::MAX.to_le_bytes());
        assert_eq!(dev.save().driver_features, 1 << 32 | 0xff);
        dev.write(reg::STATUS, &0u32.to_le_bytes());
        assert_eq!(backend.settle().started, vec![false, false]);
        drop(dev);
        backend.finish();
    }
}
