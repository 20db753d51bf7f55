//! Guest RAM: one memfd, mapped into this process and registered with KVM.
//!
//! RAM is a memfd rather than anonymous memory so that the vhost-user device
//! processes can map the very same pages (DESIGN.md, data plane). Below 4 GiB
//! RAM stops at the MMIO gap; anything beyond continues at 4 GiB.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};
use crate::snapshot::device_log::{DeviceLog, DeviceLogError};
use crate::snapshot::lazy::{LazyError, PageServer};

/// Smallest guest we agree to boot: our kernel and an initramfs need ~24 MiB.
pub const MIN_MEMORY_MIB: u64 = 32;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("--memory-mib {requested} is too small: the guest needs at least {MIN_MEMORY_MIB} MiB")]
    TooSmall { requested: u64 },
    #[error("--memory-mib {requested} is more than this host's {host} MiB of RAM")]
    TooLarge { requested: u64, host: u64 },
    #[error("cannot create the guest RAM memfd: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest RAM memfd to {mib} MiB: {source}")]
    Resize { mib: u64, source: std::io::Error },
    #[error("cannot map guest RAM: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
    #[error(transparent)]
    DeviceLog(#[from] DeviceLogError),
}

/// Guest RAM and the memfd behind it.
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    pub memfd: File,
    /// Serves missing pages while a lazy restore lasts (snapshot/lazy.rs).
    pub pages: Option<Arc<PageServer>>,
    /// Where the device back ends log their writes to guest RAM while a
    /// running snapshot copies it (snapshot/device_log.rs).
    pub device_log: DeviceLog,
}

/// A new, empty, close-on-exec memfd named `name` (guest RAM, the device
/// dirty log, test memory): one place for the unsafe call.
pub(crate) fn new_memfd(name: &std::ffi::CStr) -> std::io::Result<File> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags and
    // returns a new fd or -1; we check before wrapping it.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Total RAM of this host in MiB.
fn host_memory_mib() -> u64 {
    // SAFETY: sysinfo only writes into the struct we pass it.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return u64::MAX;
    }
    (info.totalram as u64).saturating_mul(u64::from(info.mem_unit)) >> 20
}

/// The guest-physical ranges that `mib` MiB of RAM occupy.
pub fn ram_ranges(mib: u64) -> Vec<(GuestAddress, u64)> {
    let bytes = mib << 20;
    if bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), bytes)]
    } else {
        vec![(GuestAddress(0), MMIO_GAP_START), (GuestAddress(MMIO_GAP_END), bytes - MMIO_GAP_START)]
    }
}

impl GuestRam {
    pub fn new(mib: u64) -> Result<Self, MemoryError> {
        if mib < MIN_MEMORY_MIB {
            return Err(MemoryError::TooSmall { requested: mib });
        }
        let host = host_memory_mib();
        if mib > host {
            return Err(MemoryError::TooLarge { requested: mib, host });
        }
        let memfd = new_memfd(c"mm-guest-ram").map_err(MemoryError::Memfd)?;
        memfd.set_len(mib << 20).map_err(|source| MemoryError::Resize { mib, source })?;

        let mut offset = 0;
        let mut regions = Vec::new();
        for (start, len) in ram_ranges(mib) {
            let file = memfd.try_clone().map_err(MemoryError::Memfd)?;
            regions.push((start, len as usize, Some(FileOffset::new(file, offset))));
            offset += len;
        }
        let end = ram_ranges(mib).last().map_or(0, |(start, len)| start.0 + len);
        let memory = GuestMemoryMmap::from_ranges_with_files(regions)?;
        Ok(GuestRam { memory, memfd, pages: None, device_log: DeviceLog::new(end)? })
    }

    /// Ends a lazy restore, if one is under way: every page the snapshot
    /// holds is then in the memfd, whose holes again mean "never touched"
    /// (what a snapshot of this VM relies on).
    pub fn complete_lazy_restore(&self) -> Result<(), LazyError> {
        self.pages.as_ref().map_or(Ok(()), |pages| pages.complete())
    }

    /// Registers (or re-registers) each region with KVM as memory slot N
    /// for region N, with `flags` (0, or `KVM_MEM_LOG_DIRTY_PAGES` while a
    /// running snapshot tracks the guest's writes).
    pub fn register(&self, vm: &VmFd, flags: u32) -> Result<(), kvm_ioctls::Error> {
        for (slot, region) in self.memory.iter().enumerate() {
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags,
            };
            // SAFETY: the region is a live mapping owned by `self`, which the
            // Vm keeps for as long as the KVM VM exists; re-registering the
            // same slot with the same range changes only its flags.
            unsafe { vm.set_user_memory_region(mem_region) }?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guests_fit_below_the_gap() {
        assert_eq!(ram_ranges(256), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_guests_continue_above_4g() {
        let r = ram_ranges(4096);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(r[1], (GuestAddress(MMIO_GAP_END), (4096 << 20) - MMIO_GAP_START));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(GuestRam::new(1), Err(MemoryError::TooSmall { .. })));
        assert!(matches!(GuestRam::new(1 << 40), Err(MemoryError::TooLarge { .. })));
    }
}
