//! mm-vmm's boot device, seen from the guest: one MMIO page.
//!
//! A byte write of [`USERSPACE_STARTED`] at offset 0 marks the moment user
//! space starts (Firecracker's boot timer does the same); a 32-bit write at
//! offset 4 reports the workload's exit status, which mm-vmm makes its own
//! exit status. The page is reached through `/dev/mem`, so it needs no driver.

use std::fs::OpenOptions;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::ptr::NonNull;

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

/// Value written at offset 0 when user space has started.
pub const USERSPACE_STARTED: u8 = 123;
/// Offset of the 32-bit exit-status register.
pub const EXIT_STATUS_OFFSET: usize = 4;
const PAGE: usize = 4096;

pub struct BootDevice {
    page: NonNull<libc::c_void>,
}

impl BootDevice {
    pub fn open(addr: u64) -> std::io::Result<Self> {
        let mem = OpenOptions::new().read(true).write(true).open("/dev/mem")?;
        let offset = libc::off_t::try_from(addr).map_err(|_| std::io::Error::other("address too large"))?;
        // SAFETY: a fresh shared mapping of one page of /dev/mem; nothing else
        // in this process aliases it, and it is unmapped in Drop.
        let page = unsafe {
            mmap(
                None,
                NonZeroUsize::new(PAGE).expect("page size is not zero"),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                mem.as_fd(),
                offset,
            )
        }?;
        Ok(BootDevice { page })
    }

    pub fn mark_userspace_started(&self) {
        // SAFETY: offset 0 lies inside the mapped page; a volatile store is
        // what turns into one MMIO write the VMM sees.
        unsafe { self.page.as_ptr().cast::<u8>().write_volatile(USERSPACE_STARTED) }
    }

    pub fn report_exit_status(&self, status: u32) {
        // SAFETY: offset 4 is inside the page and 4-byte aligned.
        unsafe { self.page.as_ptr().cast::<u8>().add(EXIT_STATUS_OFFSET).cast::<u32>().write_volatile(status) }
    }
}

impl Drop for BootDevice {
    fn drop(&mut self) {
        // SAFETY: `page` is the one-page mapping made in `open`.
        let _ = unsafe { munmap(self.page, PAGE) };
    }
}
