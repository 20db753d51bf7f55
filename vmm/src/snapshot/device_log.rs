//! The dirty log the device back ends write into while a running snapshot
//! copies guest RAM (vhost-user's LOG_SHMFD: `SET_LOG_BASE` hands them
//! this memfd, and with `VHOST_F_LOG_ALL` acked they set one bit per
//! guest-physical 4 KiB page they write).
//!
//! KVM's dirty log sees only what the vCPUs write. The back ends write
//! guest RAM from their own processes (rx frames, block read data, status
//! bytes, used rings), so without their log a copy taken while they run
//! could keep a page as it was before a device filled it: the devices had
//! to be held for the whole copy. With it, they are held only for the cut.
//!
//! The memfd is created with guest RAM, before mm-vmm's seccomp filters,
//! and mapped here once: taking a snapshot needs no new syscall.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

use super::memory::PAGE;

#[derive(Debug, thiserror::Error)]
pub enum DeviceLogError {
    #[error("cannot create the device dirty log's memfd: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the device dirty log to {bytes} bytes: {source}")]
    Resize { bytes: u64, source: std::io::Error },
    #[error("cannot map the device dirty log: {0}")]
    Map(vm_memory::mmap::MmapRegionError),
}

/// One bit per guest-physical page, from address 0 to the end of RAM.
pub struct DeviceLog {
    file: File,
    map: MmapRegion,
}

/// Bytes of bitmap for guest-physical addresses below `end`: one bit per
/// page, in whole 64-bit words (read a word at a time), at least a page.
fn bitmap_bytes(end: u64) -> u64 {
    let pages = end.div_ceil(PAGE as u64);
    let words = pages.div_ceil(64);
    (words * 8).next_multiple_of(PAGE as u64)
}

impl DeviceLog {
    /// A zeroed log for guest RAM that ends at guest-physical `end`.
    pub fn new(end: u64) -> Result<DeviceLog, DeviceLogError> {
        let file = crate::memory::new_memfd(c"mm-device-dirty-log").map_err(DeviceLogError::Memfd)?;
        let bytes = bitmap_bytes(end);
        file.set_len(bytes).map_err(|source| DeviceLogError::Resize { bytes, source })?;
        let clone = file.try_clone().map_err(DeviceLogError::Memfd)?;
        let map = MmapRegion::from_file(FileOffset::new(clone, 0), bytes as usize).map_err(DeviceLogError::Map)?;
        Ok(DeviceLog { file, map })
    }

    /// The memfd to hand the back ends (SET_LOG_BASE).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The log's size in bytes (SET_LOG_BASE's `mmap_size`).
    pub fn size(&self) -> u64 {
        self.map.size() as u64
    }

    fn words(&self) -> impl Iterator<Item = &AtomicU64> {
        (0..self.map.size()).step_by(8).map(|offset| {
            self.map.get_atomic_ref::<AtomicU64>(offset).expect("an aligned word inside the log's own mapping")
        })
    }

    /// Guest-physical addresses of the pages marked since the last take or
    /// clear, clearing them (atomically, word by word: a back end may
    /// still be setting bits).
    pub fn take(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        for (index, word) in self.words().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                pages.push((index as u64 * 64 + bit) * PAGE as u64);
            }
        }
        pages
    }

    /// Forgets every mark (what a back end logged after an earlier
    /// snapshot: vhost-user-backend keeps logging until its memory table
    /// changes).
    pub fn clear(&self) {
        for word in self.words() {
            word.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a back end does: an atomic OR of bit `page % 8` into byte
    /// `page / 8`, through its own mapping of the memfd.
    fn mark_as_a_back_end_would(log: &DeviceLog, gpa: u64) {
        let theirs =
            MmapRegion::<()>::from_file(FileOffset::new(log.file().try_clone().unwrap(), 0), log.size() as usize)
                .unwrap();
        let page = gpa / PAGE as u64;
        let byte = theirs.get_atomic_ref::<std::sync::atomic::AtomicU8>((page / 8) as usize).unwrap();
        byte.fetch_or(1 << (page % 8), Ordering::SeqCst);
    }

    #[test]
    fn a_back_ends_marks_come_back_as_guest_addresses_once() {
        let log = DeviceLog::new(128 << 20).unwrap();
        assert_eq!(log.size(), 4096, "128 MiB = 32768 pages = 4 KiB of bits");
        for gpa in [0x1000, 0x7000, 0x10_0000, (128 << 20) - 0x1000] {
            mark_as_a_back_end_would(&log, gpa);
        }
        assert_eq!(log.take(), vec![0x1000, 0x7000, 0x10_0000, (128 << 20) - 0x1000]);
        assert_eq!(log.take(), Vec::<u64>::new(), "taking clears");
        mark_as_a_back_end_would(&log, 0x2000);
        log.clear();
        assert!(log.take().is_empty());
    }

    #[test]
    fn the_log_covers_ram_above_the_gap() {
        // 4 GiB of RAM ends at 5 GiB (the gap below 4 GiB is skipped).
        let end = 5u64 << 30;
        let log = DeviceLog::new(end).unwrap();
        assert_eq!(log.size(), end / 4096 / 8);
        mark_as_a_back_end_would(&log, end - 0x1000);
        assert_eq!(log.take(), vec![end - 0x1000]);
    }
}
