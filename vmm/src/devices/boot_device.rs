//! The boot device: one MMIO page through which mm-init says "user space
//! has started" (a byte write of 123 at offset 0, as Firecracker's boot
//! timer) and reports the workload's exit status (a 32-bit write at
//! offset 4). The guest side is `guest/init/src/bootdev.rs`.

use std::sync::Mutex;
use std::time::Instant;

pub const USERSPACE_STARTED: u8 = 123;
pub const EXIT_STATUS_OFFSET: u64 = 4;

#[derive(Debug, Default, Clone, Copy)]
struct Reported {
    userspace_started: Option<Instant>,
    exit_status: Option<u32>,
}

pub struct BootDevice {
    vmm_start: Instant,
    reported: Mutex<Reported>,
}

impl BootDevice {
    pub fn new(vmm_start: Instant) -> Self {
        BootDevice { vmm_start, reported: Mutex::new(Reported::default()) }
    }

    pub fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    pub fn write(&self, offset: u64, data: &[u8]) {
        let mut reported = self.reported.lock().expect("boot device lock");
        match (offset, data) {
            (0, [USERSPACE_STARTED]) if reported.userspace_started.is_none() => {
                let now = Instant::now();
                reported.userspace_started = Some(now);
                let ms = now.duration_since(self.vmm_start).as_secs_f64() * 1000.0;
                tracing::info!(since_start_ms = format!("{ms:.1}"), "guest user space started");
            }
            (EXIT_STATUS_OFFSET, bytes) if bytes.len() == 4 => {
                let status = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                reported.exit_status = Some(status);
            }
            _ => tracing::debug!(offset, len = data.len(), "boot device: ignored write"),
        }
    }

    /// The workload's exit status, if mm-init reported one.
    pub fn exit_status(&self) -> Option<u32> {
        self.reported.lock().expect("boot device lock").exit_status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_exit_status_and_ignores_junk() {
        let dev = BootDevice::new(Instant::now());
        assert_eq!(dev.exit_status(), None);
        dev.write(0, &[USERSPACE_STARTED]);
        dev.write(4, &[1, 2]); // wrong width: ignored
        assert_eq!(dev.exit_status(), None);
        dev.write(4, &7u32.to_le_bytes());
        assert_eq!(dev.exit_status(), Some(7));
    }
}
