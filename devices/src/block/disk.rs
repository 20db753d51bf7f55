//! The raw image file, and moving bytes between it and guest memory without
//! a bounce buffer: `pread`/`pwrite` straight into the guest's pages.
//!
//! The image may be a copy-on-write overlay ([`mm_overlay`]: a forked
//! microVM's disk over its snapshot's): reads then come from the base or
//! the upper file per cluster, still straight into guest memory, and
//! writes, discards and write-zeroes go to upper only, so the base is never
//! written and never shows through a range the guest wrote or zeroed.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;

use mm_overlay::{Overlay, OverlayError};
use vm_memory::bitmap::{Bitmap, BitmapSlice};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};
use vmm_sys_util::fallocate::{FallocateMode, fallocate};

use super::chain::Segment;
use super::config::SECTOR_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("cannot size disk image {path}: {source}")]
    Size { path: String, source: std::io::Error },
    #[error("disk I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("overlay: {0}")]
    Overlay(#[from] OverlayError),
    #[error("guest buffer is not in guest memory")]
    GuestMemory,
    #[error("unexpected end of the image file")]
    ShortIo,
}

/// An open raw image. Capacity is fixed at open time, in whole sectors (a
/// trailing partial sector is not exposed).
#[derive(Debug)]
pub struct DiskImage {
    backing: Backing,
    capacity_sectors: u64,
    read_only: bool,
}

#[derive(Debug)]
enum Backing {
    /// One raw image (or block device).
    Raw(File),
    /// A copy-on-write overlay: a read-only base, the upper file written,
    /// and the map of which clusters are in upper.
    Overlay(Overlay),
}

impl DiskImage {
    /// Opens `path` read-write, or read-only when asked (then the guest
    /// cannot change it even by a back-end bug).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskError::Open { path: path.display().to_string(), source })?;
        Self::from_file(file, read_only).map_err(|e| match e {
            DiskError::Io(source) => DiskError::Size { path: path.display().to_string(), source },
            other => other,
        })
    }

    /// Wraps an already open file (a regular file or a block device: the
    /// size comes from seeking to the end, which works for both).
    pub fn from_file(mut file: File, read_only: bool) -> Result<Self, DiskError> {
        let size = file.seek(SeekFrom::End(0))?;
        Ok(DiskImage { backing: Backing::Raw(file), capacity_sectors: size / SECTOR_SIZE, read_only })
    }

    /// Opens an overlay: `base` read-only, `upper` (what `--image` names)
    /// and `map` read-write. The capacity is the base's.
    pub fn open_overlay(base: &Path, upper: &Path, map: &Path) -> Result<Self, DiskError> {
        Ok(Self::from_overlay(Overlay::open_paths(base, upper, map, true)?))
    }

    /// Wraps an open overlay (always writable: a read-only disk needs none).
    pub fn from_overlay(overlay: Overlay) -> Self {
        let capacity_sectors = overlay.len() / SECTOR_SIZE;
        DiskImage { backing: Backing::Overlay(overlay), capacity_sectors, read_only: false }
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The file written: the image, or an overlay's upper (for tests and
    /// the fuzzer's checks).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn file(&self) -> &File {
        match &self.backing {
            Backing::Raw(file) => file,
            Backing::Overlay(overlay) => overlay.upper_file(),
        }
    }

    /// Reads the image at `offset` into the guest buffers `data`. From an
    /// overlay, each guest slice is split into runs of one layer, each read
    /// straight from its file.
    pub fn read_to_guest<B: Bitmap>(
        &self,
        mem: &GuestMemoryMmap<B>,
        data: &[Segment],
        mut offset: u64,
    ) -> Result<u64, DiskError> {
        let mut done = 0;
        for seg in data {
            for slice in mem.get_slices(seg.addr, seg.len as usize) {
                let slice = slice.map_err(|_| DiskError::GuestMemory)?;
                match &self.backing {
                    Backing::Raw(file) => pread_exact(file, &slice, offset)?,
                    Backing::Overlay(overlay) => {
                        for run in overlay.read_runs(offset, slice.len() as u64)? {
                            let part = slice
                                .subslice((run.offset - offset) as usize, run.len as usize)
                                .map_err(|_| DiskError::GuestMemory)?;
                            pread_exact(overlay.file(run.layer), &part, run.offset)?;
                        }
                    }
                }
                offset += slice.len() as u64;
                done += slice.len() as u64;
            }
        }
        Ok(done)
    }

    /// Writes the guest buffers `data` to the image at `offset`. To an
    /// overlay: the partly covered clusters are copied up first, the data
    /// goes straight into upper, then the touched clusters are mapped.
    pub fn write_from_guest<B: Bitmap>(
        &self,
        mem: &GuestMemoryMmap<B>,
        data: &[Segment],
        offset: u64,
    ) -> Result<(), DiskError> {
        match &self.backing {
            Backing::Raw(file) => write_segments(file, mem, data, offset),
            Backing::Overlay(overlay) => {
                let len = data.iter().map(|seg| u64::from(seg.len)).sum();
                let write = overlay.prepare_write(offset, len)?;
                write_segments(overlay.upper_file(), mem, data, offset)?;
                Ok(write.commit()?)
            }
        }
    }

    /// Makes every completed write durable: a guest `sync` that returned
    /// means the data is on the host's disk (an overlay's upper, then its
    /// map).
    pub fn flush(&self) -> Result<(), DiskError> {
        match &self.backing {
            _ if self.read_only => Ok(()),
            Backing::Raw(file) => Ok(file.sync_data()?),
            Backing::Overlay(overlay) => Ok(overlay.sync()?),
        }
    }

    /// Deallocates a range. Discard is a hint, so a file system that cannot
    /// punch holes is not an error. On an overlay the range is zeroed for
    /// good instead: a discard must not make the base's data reappear.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let file = match &self.backing {
            Backing::Raw(file) => file,
            Backing::Overlay(overlay) => return Ok(overlay.zero(offset, len, true)?),
        };
        match fallocate(file, FallocateMode::PunchHole, true, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if unsupported(e.errno()) => Ok(()),
            Err(e) => Err(std::io::Error::from_raw_os_error(e.errno()).into()),
        }
    }

    /// Makes a range read back as zeroes: punch a hole when the driver
    /// allows deallocation, else zero the range in place; fall back to
    /// writing zeroes where the file system supports neither.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        let file = match &self.backing {
            Backing::Raw(file) => file,
            Backing::Overlay(overlay) => return Ok(overlay.zero(offset, len, unmap)?),
        };
        Ok(mm_overlay::zero_range(file, offset, len, unmap)?)
    }
}

/// Writes the guest buffers `data` to `file` at `offset`.
fn write_segments<B: Bitmap>(
    file: &File,
    mem: &GuestMemoryMmap<B>,
    data: &[Segment],
    mut offset: u64,
) -> Result<(), DiskError> {
    for seg in data {
        for slice in mem.get_slices(seg.addr, seg.len as usize) {
            let slice = slice.map_err(|_| DiskError::GuestMemory)?;
            pwrite_all(file, &slice, offset)?;
            offset += slice.len() as u64;
        }
    }
    Ok(())
}

/// Reads `slice.len()` bytes at `offset` straight into guest memory, then
/// marks the slice in the dirty log: the kernel's write into the page is
/// invisible to vm-memory. Marked even when the read fails part way, since
/// some of the slice may have changed.
fn pread_exact<B: BitmapSlice>(file: &File, slice: &VolatileSlice<'_, B>, offset: u64) -> Result<(), DiskError> {
    let result = pread_raw(file, slice, offset);
    slice.bitmap().mark_dirty(0, slice.len());
    result
}

fn pread_raw<B: BitmapSlice>(file: &File, slice: &VolatileSlice<'_, B>, offset: u64) -> Result<(), DiskError> {
    let guard = slice.ptr_guard_mut();
    let fd = file.as_raw_fd();
    // SAFETY: the pointer and length come from a VolatileSlice of mapped
    // guest memory that `guard` keeps alive; pread writes at most
    // `len - done` bytes inside it. Guest memory is shared with the guest
    // anyway, so concurrent changes are no UB hazard for a raw syscall.
    retry_io(guard.len(), offset, |done, off| unsafe {
        libc::pread64(fd, guard.as_ptr().add(done).cast(), guard.len() - done, off)
    })
}

fn pwrite_all<B: BitmapSlice>(file: &File, slice: &VolatileSlice<'_, B>, offset: u64) -> Result<(), DiskError> {
    let guard = slice.ptr_guard();
    let fd = file.as_raw_fd();
    // SAFETY: as in pread_exact; pwrite only reads the buffer.
    retry_io(guard.len(), offset, |done, off| unsafe {
        libc::pwrite64(fd, guard.as_ptr().add(done).cast(), guard.len() - done, off)
    })
}

fn unsupported(errno: i32) -> bool {
    errno == libc::EOPNOTSUPP || errno == libc::ENOSYS || errno == libc::EINVAL
}

/// Repeats a positioned read or write until `len` bytes are done: `op(done,
/// file offset)` moves the rest and returns what the syscall returned. A
/// zero return (end of file, or a device that takes nothing) is a short I/O;
/// EINTR is retried.
fn retry_io(len: usize, offset: u64, mut op: impl FnMut(usize, libc::off64_t) -> isize) -> Result<(), DiskError> {
    let mut done = 0usize;
    while done < len {
        let off = offset.checked_add(done as u64).ok_or(DiskError::ShortIo)?;
        match op(done, off as libc::off64_t) {
            0 => return Err(DiskError::ShortIo),
            n if n < 0 => {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(err.into());
                }
            }
            n => done += n as usize,
        }
    }
    Ok(())
}
