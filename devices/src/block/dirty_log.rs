//! Dirty-page logging for the block back end: vhost-user's LOG_SHMFD and
//! VHOST_F_LOG_ALL (vhost-user spec, "Migration").
//!
//! mm-vmm copies guest RAM while the guest runs (a live snapshot) and finds
//! what changed since with KVM's dirty log, which only sees vCPU writes.
//! This back end writes guest RAM too (read data, status bytes, used
//! rings), so the front end hands it a bitmap (SET_LOG_BASE: a memfd,
//! one bit per 4 KiB guest-physical page, bit `page % 8` of byte
//! `page / 8`) and, with LOG_ALL acked, every write here sets its pages'
//! bits.
//!
//! How writes reach the log: guest memory is a `GuestMemoryMmap<LogBitmap>`,
//! whose regions' [`LogBitmap`] vm-memory marks on every write through its
//! `Bytes`/`VolatileSlice` APIs (and so virtio-queue's used-ring writes).
//! Writes vm-memory does not see (our `pread` straight into guest pages)
//! mark the slice's bitmap themselves (`disk::pread_exact`).
//!
//! Turning logging on and off (SET_FEATURES toggling LOG_ALL) swaps the
//! log behind one [`DirtyLog`] the bitmaps of every region share, under a
//! lock a marking write holds only for its atomic ORs: the rings keep
//! running, and a write that finishes after logging went on is logged.
//!
//! The vhost-user-backend crate's `BitmapMmapRegion` does the same for net
//! and vsock, but its log mapping cannot be built outside that crate.

use std::fs::File;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use vhost::vhost_user::message::VhostUserLog;
use vm_memory::bitmap::{Bitmap, BitmapSlice, NewBitmap, WithBitmapSlice};
use vm_memory::{FileOffset, MmapRegion};

/// The page size of the vhost-user dirty log (VHOST_LOG_PAGE).
pub const LOG_PAGE_SIZE: u64 = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("dirty log of size 0")]
    Empty,
    #[error("cannot inspect the dirty log's file: {0}")]
    Stat(std::io::Error),
    #[error(
        "dirty log {offset:#x}+{size:#x} goes past the end of its file ({file_len:#x} bytes; a touch would SIGBUS)"
    )]
    PastEof { offset: u64, size: u64, file_len: u64 },
    #[error("dirty log size {0:#x} does not fit this host")]
    TooLarge(u64),
    #[error("cannot map the dirty log: {0}")]
    Map(vm_memory::mmap::MmapRegionError),
    #[error(
        "dirty log of {size:#x} bytes covers guest memory up to {covered:#x}, but a region ends at {end:#x}: \
         writes there could not be logged"
    )]
    TooSmall { size: u64, covered: u64, end: u64 },
}

/// The front end's bitmap, mapped shared and writable.
#[derive(Debug)]
pub struct LogMap {
    map: MmapRegion<()>,
}

impl LogMap {
    /// Maps SET_LOG_BASE's file at `log.mmap_offset`, `log.mmap_size`
    /// bytes, after checking the file really holds them: a shared mapping
    /// past the end of a memfd maps fine and then kills us with SIGBUS at
    /// the first mark.
    pub fn map(log: &VhostUserLog, file: File) -> Result<Self, DirtyLogError> {
        let (offset, size) = (log.mmap_offset, log.mmap_size);
        if size == 0 {
            return Err(DirtyLogError::Empty);
        }
        let file_len = file.metadata().map_err(DirtyLogError::Stat)?.len();
        if offset.checked_add(size).is_none_or(|end| end > file_len) {
            return Err(DirtyLogError::PastEof { offset, size, file_len });
        }
        let len = usize::try_from(size).map_err(|_| DirtyLogError::TooLarge(size))?;
        let map = MmapRegion::from_file(FileOffset::new(file, offset), len).map_err(DirtyLogError::Map)?;
        Ok(LogMap { map })
    }

    /// The first guest-physical address past what the bitmap covers.
    pub fn covered(&self) -> u64 {
        (self.map.size() as u64).saturating_mul(8 * LOG_PAGE_SIZE)
    }

    /// Checks that the bitmap has a bit for every page of `[gpa, gpa+len)`
    /// for every region given.
    pub fn check_covers(&self, regions: impl IntoIterator<Item = (u64, u64)>) -> Result<(), DirtyLogError> {
        let covered = self.covered();
        for (gpa, len) in regions {
            let end = gpa.saturating_add(len);
            if end > covered {
                return Err(DirtyLogError::TooSmall { size: self.map.size() as u64, covered, end });
            }
        }
        Ok(())
    }

    fn byte(&self, index: usize) -> Option<&AtomicU8> {
        if index >= self.map.size() {
            return None;
        }
        // SAFETY: `index` is inside the mapping, which lives as long as
        // `self`; AtomicU8 has the size and alignment of u8, and every
        // access to the bitmap from this process is atomic (the front end's
        // are too, across processes, as the spec asks).
        Some(unsafe { AtomicU8::from_ptr(self.map.as_ptr().add(index)) })
    }

    /// Sets the bit of every page `[gpa, gpa+len)` touches. Pages past the
    /// bitmap cannot occur: [`LogMap::check_covers`] ran for every mapped
    /// region before this log was used.
    pub fn mark(&self, gpa: u64, len: usize) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE_SIZE;
        let last = gpa.saturating_add(len as u64 - 1) / LOG_PAGE_SIZE;
        for page in first..=last {
            let Some(byte) = usize::try_from(page / 8).ok().and_then(|i| self.byte(i)) else { break };
            byte.fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
    }

    /// Whether `gpa`'s page is marked.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        let page = gpa / LOG_PAGE_SIZE;
        let byte = usize::try_from(page / 8).ok().and_then(|i| self.byte(i));
        byte.is_some_and(|b| b.load(Ordering::Relaxed) & (1 << (page % 8)) != 0)
    }
}

/// The log in use, if logging is on: one per session, shared by the
/// bitmaps of every region of every memory table and switched by the
/// request handler while the worker runs.
#[derive(Debug, Default)]
pub struct DirtyLog {
    active: RwLock<Option<Arc<LogMap>>>,
}

impl DirtyLog {
    /// Logs writes to `log` from now on (`None`: stops logging and drops
    /// our reference to the mapping; it is unmapped once no write in
    /// progress holds it).
    pub fn set(&self, log: Option<Arc<LogMap>>) {
        *self.active.write().unwrap_or_else(PoisonError::into_inner) = log;
    }

    fn mark(&self, gpa: u64, len: usize) {
        if let Some(log) = &*self.active.read().unwrap_or_else(PoisonError::into_inner) {
            log.mark(gpa, len);
        }
    }

    fn is_dirty(&self, gpa: u64) -> bool {
        self.active.read().unwrap_or_else(PoisonError::into_inner).as_ref().is_some_and(|log| log.is_dirty(gpa))
    }
}

/// vm-memory's bitmap for one region (or a slice of it): offsets are
/// turned into guest-physical addresses and marked in the session's
/// [`DirtyLog`].
#[derive(Debug, Clone, Default)]
pub struct LogBitmap {
    log: Arc<DirtyLog>,
    /// The guest-physical address offset 0 stands for.
    gpa: u64,
}

impl LogBitmap {
    /// The bitmap of a region at guest-physical `gpa`, logging to `log`.
    pub fn new(log: Arc<DirtyLog>, gpa: u64) -> Self {
        LogBitmap { log, gpa }
    }
}

impl WithBitmapSlice<'_> for LogBitmap {
    type S = Self;
}

impl BitmapSlice for LogBitmap {}

impl Bitmap for LogBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.log.mark(self.gpa.saturating_add(offset as u64), len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.log.is_dirty(self.gpa.saturating_add(offset as u64))
    }

    fn slice_at(&self, offset: usize) -> Self {
        LogBitmap { log: Arc::clone(&self.log), gpa: self.gpa.saturating_add(offset as u64) }
    }
}

/// Only for vm-memory's constructors that make a bitmap per region
/// (`GuestRegionMmap::from_range`): such a bitmap logs to a log of its
/// own that is never switched on. [`super::memory::MemoryTable`] builds
/// its regions with [`LogBitmap::new`] instead.
impl NewBitmap for LogBitmap {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn memfd(len: u64) -> File {
        // SAFETY: a NUL-terminated name and flags; the fd is checked and
        // then owned by the File.
        let fd = unsafe { libc::memfd_create(c"mm-test-log".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    #[test]
    fn marks_every_page_of_a_range_and_nothing_else() {
        let log = LogMap::map(&VhostUserLog::new(16, 0), memfd(16)).unwrap();
        log.mark(0x1fff, 2); // pages 1 and 2
        log.mark(0x7_f000, 1); // page 127, the last bit
        let set: Vec<u64> = (0..128).filter(|p| log.is_dirty(p * LOG_PAGE_SIZE)).collect();
        assert_eq!(set, vec![1, 2, 127]);
        assert_eq!(log.covered(), 128 * LOG_PAGE_SIZE);
        assert!(log.check_covers([(0, 128 * LOG_PAGE_SIZE)]).is_ok());
        assert!(matches!(
            log.check_covers([(LOG_PAGE_SIZE, 128 * LOG_PAGE_SIZE)]),
            Err(DirtyLogError::TooSmall { .. })
        ));
    }

    #[test]
    fn refuses_logs_the_file_does_not_hold() {
        assert!(matches!(LogMap::map(&VhostUserLog::new(0, 0), memfd(4096)), Err(DirtyLogError::Empty)));
        let past = LogMap::map(&VhostUserLog::new(4096, 4096), memfd(4096));
        assert!(matches!(past, Err(DirtyLogError::PastEof { .. })), "{past:?}");
        let wrap = LogMap::map(&VhostUserLog::new(16, u64::MAX), memfd(4096));
        assert!(matches!(wrap, Err(DirtyLogError::PastEof { .. })), "{wrap:?}");
        let unaligned = LogMap::map(&VhostUserLog::new(16, 1), memfd(4096));
        assert!(matches!(unaligned, Err(DirtyLogError::Map(_))), "{unaligned:?}");
    }

    #[test]
    fn bitmaps_log_guest_physical_pages_only_while_on() {
        let switch = Arc::new(DirtyLog::default());
        let bitmap = LogBitmap::new(Arc::clone(&switch), 0x10_0000);
        bitmap.mark_dirty(0, 1);
        assert!(!bitmap.dirty_at(0), "marked while off");
        let log = Arc::new(LogMap::map(&VhostUserLog::new(64, 0), memfd(64)).unwrap());
        switch.set(Some(Arc::clone(&log)));
        bitmap.slice_at(0x2000).mark_dirty(0x10, 1);
        assert!(log.is_dirty(0x10_2000));
        assert!(!log.is_dirty(0x10_0000));
        switch.set(None);
        bitmap.mark_dirty(0x5000, 1);
        assert!(!log.is_dirty(0x10_5000), "marked after logging stopped");
    }
}
