//! Guest RAM in a snapshot: a sparse file with each page at its own offset
//! in the guest-RAM memfd, so a restore (or, later, a lazy restore that
//! maps it) finds page N at offset N. Pages the guest never touched (holes
//! in the memfd, found with SEEK_DATA/SEEK_HOLE) and pages that hold only
//! zeros are not written: they stay holes, cost no disk, and read back as
//! zeros. Each written run carries a CRC-32, checked as it is read back.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestRam;

pub(super) const PAGE: usize = 4096;
/// Longest run written (and checksummed) as one extent.
pub(super) const MAX_EXTENT: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryImageError {
    #[error("cannot find the guest's memory in its memfd: {0}")]
    Seek(std::io::Error),
    #[error("cannot write the memory file: {0}")]
    Write(std::io::Error),
    #[error("the memory file is {actual} bytes, the snapshot needs {expected}: truncated")]
    Truncated { expected: u64, actual: u64 },
    #[error("cannot read the memory file at offset {offset:#x}: {source}")]
    Read { offset: u64, source: std::io::Error },
    #[error("the memory file is corrupt: the {len} bytes at offset {offset:#x} fail their checksum")]
    Checksum { offset: u64, len: u64 },
    #[error("the snapshot's memory extent at {offset:#x} (+{len:#x}) lies outside guest RAM")]
    OutOfRange { offset: u64, len: u64 },
}

/// One written run of pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryExtent {
    /// Offset in the memfd and in the memory file alike.
    pub offset: u64,
    pub len: u64,
    pub crc32: u32,
}

/// Where the guest's RAM is in the memory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryImage {
    /// The memfd's size: the memory file is at least this long.
    pub size: u64,
    pub extents: Vec<MemoryExtent>,
}

impl MemoryImage {
    /// Bytes of guest RAM the file holds (its non-hole part).
    pub fn data_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }
}

/// The memfd's data ranges (pages ever touched) from `start` to `end`.
pub(super) fn data_ranges(memfd: &File, start: u64, end: u64) -> Result<Vec<(u64, u64)>, MemoryImageError> {
    let fd = memfd.as_raw_fd();
    let mut ranges = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on our own fd takes no pointers.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(MemoryImageError::Seek(e));
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(MemoryImageError::Seek(std::io::Error::last_os_error()));
        }
        let hole = (hole as u64).min(end);
        ranges.push((data, hole));
        pos = hole;
    }
    Ok(ranges)
}

pub(super) fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: reinterpreting initialised bytes as u64s is sound for any
        // bit pattern; align_to gives the unaligned ends separately.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Writes the guest's RAM to `file`. The caller has stopped everything that
/// writes guest memory (vCPUs paused, device rings quiesced).
pub fn save(ram: &GuestRam, file: &File) -> Result<MemoryImage, MemoryImageError> {
    let size = ram.memfd.metadata().map_err(MemoryImageError::Seek)?.len();
    file.set_len(size).map_err(MemoryImageError::Write)?;
    let mut extents = Vec::new();
    for region in ram.memory.iter() {
        let file_start = region.file_offset().map_or(0, |f| f.start());
        let len = region.len();
        let base = region.as_ptr();
        for (start, end) in data_ranges(&ram.memfd, file_start, file_start + len)? {
            let mut run: Option<(u64, u64)> = None;
            let mut offset = start - start % PAGE as u64;
            while offset < end {
                let page_len = PAGE.min((file_start + len - offset) as usize);
                // SAFETY: the page lies inside this region's live mapping
                // (offset is within [file_start, file_start + len)), and
                // nothing writes guest memory while the VM is quiesced.
                let page = unsafe { std::slice::from_raw_parts(base.add((offset - file_start) as usize), page_len) };
                let zero = is_zero(page);
                match (&mut run, zero) {
                    (Some((_, run_len)), false) if (*run_len as usize) < MAX_EXTENT => *run_len += page_len as u64,
                    (Some(_), _) => {
                        let (run_start, run_len) = run.take().expect("checked");
                        extents.push(write_run(file, base, file_start, run_start, run_len)?);
                        if !zero {
                            run = Some((offset, page_len as u64));
                        }
                    }
                    (None, false) => run = Some((offset, page_len as u64)),
                    (None, true) => {}
                }
                offset += page_len as u64;
            }
            if let Some((run_start, run_len)) = run {
                extents.push(write_run(file, base, file_start, run_start, run_len)?);
            }
        }
    }
    Ok(MemoryImage { size, extents })
}

fn write_run(
    file: &File,
    base: *mut u8,
    region_file_start: u64,
    offset: u64,
    len: u64,
) -> Result<MemoryExtent, MemoryImageError> {
    // SAFETY: the run was built from pages inside the region's mapping.
    let bytes = unsafe { std::slice::from_raw_parts(base.add((offset - region_file_start) as usize), len as usize) };
    file.write_all_at(bytes, offset).map_err(MemoryImageError::Write)?;
    Ok(MemoryExtent { offset, len, crc32: crc32fast::hash(bytes) })
}

/// The memory file's length, refused when shorter than `image` says.
pub(super) fn checked_len(file: &File, image: &MemoryImage) -> Result<u64, MemoryImageError> {
    let actual = file.metadata().map_err(|source| MemoryImageError::Read { offset: 0, source })?.len();
    if actual < image.size {
        return Err(MemoryImageError::Truncated { expected: image.size, actual });
    }
    Ok(actual)
}

/// The region of guest RAM that holds `extent` whole, and the extent's
/// place in it.
pub(super) fn region_of<'a>(
    ram: &'a GuestRam,
    extent: &MemoryExtent,
) -> Result<(&'a vm_memory::GuestRegionMmap, usize), MemoryImageError> {
    ram.memory
        .iter()
        .find_map(|r| {
            let start = r.file_offset().map_or(0, |f| f.start());
            (extent.offset >= start && extent.offset.saturating_add(extent.len) <= start + r.len())
                .then(|| (r, (extent.offset - start) as usize))
        })
        .ok_or(MemoryImageError::OutOfRange { offset: extent.offset, len: extent.len })
}

impl MemoryExtent {
    /// Refuses `bytes` (the extent as read back) unless its CRC matches.
    pub(super) fn check(&self, bytes: &[u8]) -> Result<(), MemoryImageError> {
        if crc32fast::hash(bytes) != self.crc32 {
            return Err(MemoryImageError::Checksum { offset: self.offset, len: self.len });
        }
        Ok(())
    }
}

/// Fills fresh guest RAM from `file`, checking each extent's checksum.
pub fn restore(ram: &GuestRam, file: &File, image: &MemoryImage) -> Result<(), MemoryImageError> {
    let actual = checked_len(file, image)?;
    for extent in &image.extents {
        let (region, at) = region_of(ram, extent)?;
        // SAFETY: the extent lies inside this region's mapping (checked
        // above); the VM does not run yet, so nothing else touches it.
        let dest = unsafe { std::slice::from_raw_parts_mut(region.as_ptr().add(at), extent.len as usize) };
        file.read_exact_at(dest, extent.offset).map_err(|source| match source.kind() {
            std::io::ErrorKind::UnexpectedEof => MemoryImageError::Truncated { expected: image.size, actual },
            _ => MemoryImageError::Read { offset: extent.offset, source },
        })?;
        extent.check(dest)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn temp_file() -> File {
        tempfile_in_tmp()
    }

    fn tempfile_in_tmp() -> File {
        let path =
            std::env::temp_dir().join(format!("mm-mem-test-{}-{:?}", std::process::id(), std::thread::current().id()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    #[test]
    fn sparse_round_trip_skips_untouched_and_zero_pages() {
        let ram = GuestRam::new(32).unwrap();
        ram.memory.write_slice(&[0xab; 3 * PAGE], GuestAddress(0x10_0000)).unwrap();
        ram.memory.write_slice(&[0; PAGE], GuestAddress(0x20_0000)).unwrap(); // touched, but zero
        ram.memory.write_obj(0x1234_5678u32, GuestAddress(0x30_0010)).unwrap();
        let file = temp_file();
        let image = save(&ram, &file).unwrap();
        assert_eq!(image.size, 32 << 20);
        assert_eq!(image.data_bytes(), 4 * PAGE as u64, "three pages of 0xab and one with a word: {image:?}");

        let fresh = GuestRam::new(32).unwrap();
        restore(&fresh, &file, &image).unwrap();
        let mut back = vec![0u8; 3 * PAGE];
        fresh.memory.read_slice(&mut back, GuestAddress(0x10_0000)).unwrap();
        assert!(back.iter().all(|&b| b == 0xab));
        assert_eq!(fresh.memory.read_obj::<u32>(GuestAddress(0x30_0010)).unwrap(), 0x1234_5678);
    }

    #[test]
    fn corruption_and_truncation_are_refused() {
        let ram = GuestRam::new(32).unwrap();
        ram.memory.write_slice(&[7; PAGE], GuestAddress(0x5000)).unwrap();
        let file = temp_file();
        let image = save(&ram, &file).unwrap();
        let fresh = GuestRam::new(32).unwrap();

        file.write_all_at(&[8], 0x5001).unwrap();
        assert!(matches!(restore(&fresh, &file, &image), Err(MemoryImageError::Checksum { offset: 0x5000, .. })));

        file.set_len(0x5800).unwrap();
        assert!(matches!(restore(&fresh, &file, &image), Err(MemoryImageError::Truncated { .. })));

        let mut outside = image.clone();
        outside.extents[0].offset = 64 << 20;
        file.set_len(128 << 20).unwrap();
        outside.size = 32 << 20;
        assert!(matches!(restore(&fresh, &file, &outside), Err(MemoryImageError::OutOfRange { .. })));
    }
}
