//! Guest memory as the front end describes it (SET_MEM_TABLE): each region
//! is a file (mm-vmm's memfd) mapped here, plus the front end's own virtual
//! address for it, because vring addresses arrive as front-end virtual
//! addresses (DESIGN.md, "Wire protocols") and must be turned into guest
//! addresses before `virtio_queue` can use them.

use std::fs::File;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::dirty_log::{DirtyLog, LogBitmap};

/// Guest memory as this back end maps it: writes logged through
/// [`LogBitmap`].
pub type GuestMem = GuestMemoryMmap<LogBitmap>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory table has {regions} regions but {files} files")]
    FileCount { regions: usize, files: usize },
    #[error("cannot map guest memory region at {gpa:#x} (+{size:#x}): {source}")]
    Map { gpa: u64, size: u64, source: vm_memory::mmap::MmapRegionError },
    #[error("guest memory region at {gpa:#x} wraps around the address space")]
    Wraps { gpa: u64 },
    #[error("guest memory regions overlap or are invalid: {0}")]
    Layout(vm_memory::GuestRegionCollectionError),
    #[error("region size {0:#x} does not fit this host")]
    TooLarge(u64),
    #[error("region at {gpa:#x} maps past the end of its file (a touch would SIGBUS)")]
    PastEof { gpa: u64 },
    #[error("cannot inspect a memory region's file: {0}")]
    Stat(std::io::Error),
}

/// One region's front-end virtual address range, where it sits in the
/// guest, and where this process mapped it.
#[derive(Debug, Clone, Copy)]
struct VaRange {
    user_addr: u64,
    size: u64,
    gpa: u64,
    /// This process's mapping of the region (what a lazy restore registers
    /// with the userfaultfd and reports back to the front end).
    local: u64,
}

/// Where this process mapped one region of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalMapping {
    pub gpa: u64,
    pub addr: u64,
    pub size: u64,
}

/// The mapped guest memory and the front end's VA → guest address map.
#[derive(Debug, Clone)]
pub struct MemoryTable {
    pub mem: Arc<GuestMem>,
    ranges: Vec<VaRange>,
}

impl MemoryTable {
    /// Maps every region of a SET_MEM_TABLE message, each region's writes
    /// logged to `log` (while it is on).
    pub fn map(regions: &[VhostUserMemoryRegion], files: Vec<File>, log: &Arc<DirtyLog>) -> Result<Self, MemoryError> {
        if regions.len() != files.len() {
            return Err(MemoryError::FileCount { regions: regions.len(), files: files.len() });
        }
        let mut mapped = Vec::with_capacity(regions.len());
        let mut ranges = Vec::with_capacity(regions.len());
        for (region, file) in regions.iter().zip(files) {
            let (gpa, size) = (region.guest_phys_addr, region.memory_size);
            let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge(size))?;
            let meta = file.metadata().map_err(MemoryError::Stat)?;
            if meta.file_type().is_file() && region.mmap_offset.checked_add(size).is_none_or(|end| end > meta.len()) {
                return Err(MemoryError::PastEof { gpa });
            }
            let file = FileOffset::new(file, region.mmap_offset);
            // As `GuestRegionMmap::from_range` maps a file, with the
            // session's bitmap instead of a fresh one.
            let mapping = MmapRegionBuilder::new_with_bitmap(len, LogBitmap::new(Arc::clone(log), gpa))
                .with_file_offset(file)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_SHARED)
                .build()
                .map_err(|source| MemoryError::Map { gpa, size, source })?;
            let mmap = GuestRegionMmap::new(mapping, GuestAddress(gpa)).ok_or(MemoryError::Wraps { gpa })?;
            let local = mmap.as_ptr() as u64;
            mapped.push(mmap);
            ranges.push(VaRange { user_addr: region.user_addr, size, gpa, local });
        }
        let mem = GuestMemoryMmap::from_regions(mapped).map_err(MemoryError::Layout)?;
        Ok(MemoryTable { mem: Arc::new(mem), ranges })
    }

    /// This process's mapping of each region, in the order of the
    /// SET_MEM_TABLE message (the order a postcopy reply lists them in).
    pub fn local_mappings(&self) -> impl Iterator<Item = LocalMapping> + '_ {
        self.ranges.iter().map(|r| LocalMapping { gpa: r.gpa, addr: r.local, size: r.size })
    }

    /// Each region's guest-physical start and size (what a dirty log must
    /// cover).
    pub fn guest_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|r| (r.gpa, r.size))
    }

    /// The guest address behind front-end virtual address `va`, if a region
    /// holds it.
    pub fn va_to_guest(&self, va: u64) -> Option<GuestAddress> {
        self.ranges
            .iter()
            .find(|r| va >= r.user_addr && va - r.user_addr < r.size)
            .map(|r| GuestAddress(r.gpa + (va - r.user_addr)))
    }
}
