//! The legacy devices mm-vmm emulates itself, and the bus that routes port
//! I/O and MMIO exits to them. Everything else a guest uses is a vhost-user
//! device in its own process (DESIGN.md); these are only what a Linux guest
//! needs to boot and to report back.

pub mod boot_device;
pub mod serial;

use std::sync::Mutex;

use vm_superio::I8042Device;

use crate::layout::{BOOT_DEVICE_SIZE, BOOT_DEVICE_START, COM1_PORT, I8042_COMMAND_PORT, I8042_DATA_PORT};
use crate::virtio::mmio::{MMIO_SIZE, MmioDevice};
use boot_device::BootDevice;
use serial::{EventFdTrigger, SerialConsole};

/// Routes a vCPU's I/O exits. Each device sits behind its own lock; exits
/// are rare enough (console bytes, a reset) that contention does not matter.
pub struct Bus {
    pub serial: Mutex<SerialConsole>,
    pub i8042: Mutex<I8042Device<EventFdTrigger>>,
    pub boot_device: BootDevice,
    /// Virtio-mmio devices and their base addresses.
    pub virtio: Vec<(u64, Mutex<MmioDevice>)>,
}

impl Bus {
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1_PORT..=0x3ff if data.len() == 1 => {
                data[0] = self.serial.lock().expect("serial lock").read((port - COM1_PORT) as u8);
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT if data.len() == 1 => {
                data[0] = self.i8042.lock().expect("i8042 lock").read((port - I8042_DATA_PORT) as u8);
            }
            // Nothing else is there: reads float high, as on real hardware.
            _ => data.fill(0xff),
        }
    }

    /// Handles a port write; returns true when the guest asked for a reset.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match port {
            COM1_PORT..=0x3ff if data.len() == 1 => {
                let offset = (port - COM1_PORT) as u8;
                if let Err(e) = self.serial.lock().expect("serial lock").write(offset, data[0]) {
                    tracing::warn!("serial: {e:?}");
                }
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT if data.len() == 1 => {
                let offset = (port - I8042_DATA_PORT) as u8;
                let mut i8042 = self.i8042.lock().expect("i8042 lock");
                if let Err(e) = i8042.write(offset, data[0]) {
                    tracing::warn!("i8042: {e:?}");
                }
                // The reset command (0xfe) raises the device's eventfd.
                return i8042.reset_evt().0.read().is_ok();
            }
            _ => {}
        }
        false
    }

    fn virtio_at(&self, addr: u64) -> Option<(u64, &Mutex<MmioDevice>)> {
        self.virtio.iter().find(|(base, _)| (*base..*base + MMIO_SIZE).contains(&addr)).map(|(base, dev)| (*base, dev))
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if (BOOT_DEVICE_START..BOOT_DEVICE_START + BOOT_DEVICE_SIZE).contains(&addr) {
            self.boot_device.read(addr - BOOT_DEVICE_START, data);
        } else if let Some((base, dev)) = self.virtio_at(addr) {
            dev.lock().expect("virtio lock").read(addr - base, data);
        } else {
            data.fill(0xff);
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if (BOOT_DEVICE_START..BOOT_DEVICE_START + BOOT_DEVICE_SIZE).contains(&addr) {
            self.boot_device.write(addr - BOOT_DEVICE_START, data);
        } else if let Some((base, dev)) = self.virtio_at(addr) {
            dev.lock().expect("virtio lock").write(addr - base, data);
        }
    }
}
