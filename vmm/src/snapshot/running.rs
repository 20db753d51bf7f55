//! Guest RAM of a *running* guest into a snapshot's memory file, so that
//! the vCPUs stop only for the consistent cut rather than for the whole
//! copy (pre-copy, as live migration does it, with one round).
//!
//! The order is what makes it consistent (`LiveVm::snapshot_running`):
//! the device back ends are quiesced first and stay so until the broker
//! has copied the disks, so no process but mm-vmm writes guest RAM while
//! this runs; KVM's dirty log then records every page the vCPUs (and KVM
//! itself: kvmclock, steal time) write from the moment it is on. The first
//! copy runs beside the guest and may catch pages half written; every such
//! page is in the dirty log, and is copied again while the vCPUs are
//! paused. The file then holds RAM exactly as it was at that pause.
//!
//! Checksums cannot be computed while pages may still be rewritten, so the
//! extents (and their CRCs) are indexed from the finished file, after the
//! vCPUs run again: [`index`] reads it back (from the page cache) and
//! describes it as [`super::memory::save`] would have described the RAM.
//!
//! Guest RAM is read with vm-memory's volatile copies: the guest may write
//! a page while it is copied, which is fine for the copy (the page is
//! dirty and copied again) but must not be a Rust-level data race.

use std::fs::File;
use std::os::unix::fs::FileExt;

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::memory::{MAX_EXTENT, MemoryExtent, MemoryImage, MemoryImageError, PAGE, data_ranges, is_zero};
use crate::memory::GuestRam;

/// How much is read from guest RAM (or the file) at a time.
const CHUNK: usize = 1 << 20;

/// KVM dirty logging on every RAM slot, for as long as this lives.
pub struct DirtyLog<'a> {
    vm: &'a VmFd,
    ram: &'a GuestRam,
}

impl<'a> DirtyLog<'a> {
    /// Turns dirty logging on (each slot re-registered with
    /// `KVM_MEM_LOG_DIRTY_PAGES`); pages written from now on are logged.
    pub fn start(vm: &'a VmFd, ram: &'a GuestRam) -> Result<Self, kvm_ioctls::Error> {
        ram.register(vm, KVM_MEM_LOG_DIRTY_PAGES)?;
        Ok(DirtyLog { vm, ram })
    }

    /// The memfd offsets of the pages written since logging began (or
    /// since the last call: KVM clears the log as it hands it over).
    pub fn take(&self) -> Result<Vec<u64>, kvm_ioctls::Error> {
        let mut pages = Vec::new();
        for (slot, region) in self.ram.memory.iter().enumerate() {
            let file_start = region.file_offset().map_or(0, |f| f.start());
            let bitmap = self.vm.get_dirty_log(slot as u32, region.len() as usize)?;
            for (word_index, word) in bitmap.iter().enumerate() {
                let mut bits = *word;
                while bits != 0 {
                    let bit = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let page = word_index as u64 * 64 + bit;
                    pages.push(file_start + page * PAGE as u64);
                }
            }
        }
        Ok(pages)
    }
}

impl Drop for DirtyLog<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.ram.register(self.vm, 0) {
            tracing::warn!("cannot turn KVM dirty logging off again: {e}");
        }
    }
}

/// The guest address of memfd offset `offset`, and how much of its region
/// lies from there on.
fn guest_address(ram: &GuestRam, offset: u64) -> Option<(GuestAddress, u64)> {
    ram.memory.iter().find_map(|region| {
        let start = region.file_offset().map_or(0, |f| f.start());
        (offset >= start && offset < start + region.len())
            .then(|| (GuestAddress(region.start_addr().0 + (offset - start)), start + region.len() - offset))
    })
}

/// Copies `len` bytes of guest RAM at memfd offset `offset` to the same
/// offset of `file`, page by page, leaving all-zero pages out (holes) when
/// `skip_zero`; returns the bytes written.
fn copy_range(
    ram: &GuestRam,
    file: &File,
    offset: u64,
    len: usize,
    skip_zero: bool,
    buf: &mut [u8],
) -> Result<u64, MemoryImageError> {
    let outside = MemoryImageError::OutOfRange { offset, len: len as u64 };
    let (address, room) = guest_address(ram, offset).ok_or(outside)?;
    let len = len.min(room as usize);
    let buf = &mut buf[..len];
    ram.memory.read_slice(buf, address).map_err(|_| MemoryImageError::OutOfRange { offset, len: len as u64 })?;
    if !skip_zero {
        file.write_all_at(buf, offset).map_err(MemoryImageError::Write)?;
        return Ok(len as u64);
    }
    let mut written = 0;
    let mut run: Option<usize> = None; // start (in buf) of the current non-zero run
    for page_start in (0..len).step_by(PAGE).chain(std::iter::once(len)) {
        let zero = page_start == len || is_zero(&buf[page_start..(page_start + PAGE).min(len)]);
        match (run, zero) {
            (None, false) => run = Some(page_start),
            (Some(start), true) => {
                file.write_all_at(&buf[start..page_start], offset + start as u64).map_err(MemoryImageError::Write)?;
                written += (page_start - start) as u64;
                run = None;
            }
            _ => {}
        }
    }
    Ok(written)
}

/// The first copy, beside the running guest: every touched, non-zero page
/// of the memfd to the same offset of `file` (sized to the memfd first).
/// Returns the bytes written.
pub fn copy_all(ram: &GuestRam, file: &File) -> Result<u64, MemoryImageError> {
    let size = ram.memfd.metadata().map_err(MemoryImageError::Seek)?.len();
    file.set_len(size).map_err(MemoryImageError::Write)?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0;
    for (region_start, region_end) in region_spans(ram) {
        for (start, end) in data_ranges(&ram.memfd, region_start, region_end)? {
            let mut offset = start - start % PAGE as u64;
            while offset < end {
                let len = CHUNK.min((end - offset) as usize);
                written += copy_range(ram, file, offset, len, true, &mut buf)?;
                offset += len as u64;
            }
        }
    }
    Ok(written)
}

/// The memfd offsets of guest-physical pages `pages` (from the devices'
/// dirty log); a page outside guest RAM (a back end's stray mark) is left
/// out, as nothing of it goes into the snapshot.
pub fn memfd_offsets(ram: &GuestRam, pages: &[u64]) -> Vec<u64> {
    pages
        .iter()
        .filter_map(|&gpa| {
            ram.memory.iter().find_map(|region| {
                let start = region.start_addr().0;
                (gpa >= start && gpa < start + region.len())
                    .then(|| region.file_offset().map_or(0, |f| f.start()) + (gpa - start))
            })
        })
        .collect()
}

/// The pages the cut copies again: every page in KVM's dirty log (memfd
/// offsets) and every page the device back ends logged (guest-physical),
/// once each, in order; with how many of them the devices named.
pub fn pages_for_cut(ram: &GuestRam, mut vcpu_pages: Vec<u64>, device_pages: &[u64]) -> (Vec<u64>, u64) {
    let device_pages = memfd_offsets(ram, device_pages);
    let device_count = device_pages.len() as u64;
    vcpu_pages.extend(device_pages);
    vcpu_pages.sort_unstable();
    vcpu_pages.dedup();
    (vcpu_pages, device_count)
}

/// Each RAM region's span of memfd offsets: extents never cross one, as
/// a restore fills each extent into one region.
fn region_spans(ram: &GuestRam) -> Vec<(u64, u64)> {
    ram.memory
        .iter()
        .map(|region| {
            let start = region.file_offset().map_or(0, |f| f.start());
            (start, start + region.len())
        })
        .collect()
}

/// The cut: copies the pages at `offsets` (memfd offsets, from the dirty
/// log) again, zero or not, contiguous ones in one go.
pub fn copy_pages(ram: &GuestRam, file: &File, mut offsets: Vec<u64>) -> Result<(), MemoryImageError> {
    offsets.sort_unstable();
    let region_starts: Vec<u64> = region_spans(ram).into_iter().map(|(start, _)| start).collect();
    let mut buf = vec![0u8; CHUNK];
    let mut pages = offsets.into_iter().peekable();
    while let Some(start) = pages.next() {
        let mut end = start + PAGE as u64;
        while pages.peek() == Some(&end) && ((end - start) as usize) < CHUNK && !region_starts.contains(&end) {
            pages.next();
            end += PAGE as u64;
        }
        copy_range(ram, file, start, (end - start) as usize, false, &mut buf)?;
    }
    Ok(())
}

/// Describes a finished memory file of `ram` as [`super::memory::save`]
/// describes RAM: its non-zero pages in runs of at most `MAX_EXTENT`
/// within one region, each with the CRC-32 of its bytes.
pub fn index(file: &File, ram: &GuestRam) -> Result<MemoryImage, MemoryImageError> {
    let size = ram.memfd.metadata().map_err(MemoryImageError::Seek)?.len();
    let mut extents = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    let spans = region_spans(ram);
    let mut ranges = Vec::new();
    for (region_start, region_end) in spans {
        ranges.extend(data_ranges(file, region_start, region_end)?);
    }
    for (start, end) in ranges {
        let mut run: Option<(u64, u64, crc32fast::Hasher)> = None;
        let mut offset = start - start % PAGE as u64;
        while offset < end {
            let len = CHUNK.min((end - offset) as usize);
            let chunk = &mut buf[..len];
            file.read_exact_at(chunk, offset).map_err(|source| MemoryImageError::Read { offset, source })?;
            for page_start in (0..len).step_by(PAGE) {
                let page = &chunk[page_start..(page_start + PAGE).min(len)];
                let at = offset + page_start as u64;
                let zero = is_zero(page);
                let full = run.as_ref().is_some_and(|(_, run_len, _)| *run_len as usize >= MAX_EXTENT);
                if (zero || full)
                    && let Some((run_start, run_len, crc)) = run.take()
                {
                    extents.push(MemoryExtent { offset: run_start, len: run_len, crc32: crc.finalize() });
                }
                if !zero {
                    let (_, run_len, crc) = run.get_or_insert_with(|| (at, 0, crc32fast::Hasher::new()));
                    *run_len += page.len() as u64;
                    crc.update(page);
                }
            }
            offset += len as u64;
        }
        if let Some((run_start, run_len, crc)) = run {
            extents.push(MemoryExtent { offset: run_start, len: run_len, crc32: crc.finalize() });
        }
    }
    Ok(MemoryImage { size, extents })
}

#[cfg(test)]
mod tests {
    use super::super::memory::{restore, save};
    use super::*;

    fn temp_file(name: &str) -> File {
        let path = std::env::temp_dir().join(format!("mm-running-test-{}-{name}", std::process::id()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    fn fill(ram: &GuestRam) {
        ram.memory.write_slice(&[0xab; 3 * PAGE], GuestAddress(0x10_0000)).unwrap();
        ram.memory.write_slice(&[0; PAGE], GuestAddress(0x20_0000)).unwrap(); // touched, but zero
        ram.memory.write_obj(0x1234_5678u32, GuestAddress(0x30_0010)).unwrap();
        // A run longer than one extent and than one chunk.
        ram.memory.write_slice(&vec![0x5a; MAX_EXTENT + 3 * PAGE], GuestAddress(0x40_0000)).unwrap();
    }

    #[test]
    fn copy_then_index_describes_what_save_describes() {
        let ram = GuestRam::new(64).unwrap();
        fill(&ram);
        let (saved, copied) = (temp_file("saved"), temp_file("copied"));
        let by_save = save(&ram, &saved).unwrap();
        let written = copy_all(&ram, &copied).unwrap();
        let by_index = index(&copied, &ram).unwrap();
        assert_eq!(by_index, by_save);
        assert_eq!(written, by_save.data_bytes());
    }

    #[test]
    fn pages_copied_again_replace_the_first_copy() {
        let ram = GuestRam::new(64).unwrap();
        fill(&ram);
        let file = temp_file("cut");
        copy_all(&ram, &file).unwrap();
        // The guest writes on after the first copy: a page changed, a page
        // zeroed, a page touched for the first time.
        ram.memory.write_slice(&[0xcd; PAGE], GuestAddress(0x10_1000)).unwrap();
        ram.memory.write_slice(&[0; PAGE], GuestAddress(0x10_2000)).unwrap();
        ram.memory.write_obj(0x77u8, GuestAddress(0x50_0000 + MAX_EXTENT as u64)).unwrap();
        let dirty = vec![0x10_2000, 0x10_1000, 0x50_0000 + MAX_EXTENT as u64];
        copy_pages(&ram, &file, dirty).unwrap();
        assert_eq!(index(&file, &ram).unwrap(), save(&ram, &temp_file("now")).unwrap());

        // And the file restores to RAM as it is now.
        let image = index(&file, &ram).unwrap();
        let fresh = GuestRam::new(64).unwrap();
        restore(&fresh, &file, &image).unwrap();
        let mut page = vec![0u8; PAGE];
        fresh.memory.read_slice(&mut page, GuestAddress(0x10_1000)).unwrap();
        assert!(page.iter().all(|&b| b == 0xcd));
        fresh.memory.read_slice(&mut page, GuestAddress(0x10_2000)).unwrap();
        assert!(page.iter().all(|&b| b == 0));
    }

    /// A page a device back end wrote after the first copy passed it is
    /// in its dirty log only (KVM's sees vCPU writes): the cut copies it
    /// from there, and without it the file would hold the stale page.
    #[test]
    fn the_cut_copies_what_the_devices_logged() {
        let ram = GuestRam::new(64).unwrap();
        fill(&ram);
        let file = temp_file("devices");
        copy_all(&ram, &file).unwrap();
        ram.memory.write_slice(&[0xee; PAGE], GuestAddress(0x30_0000)).unwrap(); // the back end's write
        mark_as_a_back_end(&ram, 0x30_0000);
        let (pages, from_devices) = pages_for_cut(&ram, Vec::new(), &ram.device_log.take());
        assert_eq!((pages.len(), from_devices), (1, 1));
        let without = temp_file("without-devices");
        std::io::copy(&mut &file, &mut &without).unwrap();
        copy_pages(&ram, &file, pages).unwrap();
        assert_eq!(index(&file, &ram).unwrap(), save(&ram, &temp_file("devices-truth")).unwrap());
        copy_pages(&ram, &without, Vec::new()).unwrap();
        assert_ne!(index(&without, &ram).unwrap(), save(&ram, &temp_file("devices-truth2")).unwrap());
    }

    /// Sets the page's bit through a mapping of the log's memfd of its own,
    /// as a device process does.
    fn mark_as_a_back_end(ram: &GuestRam, gpa: u64) {
        use vm_memory::VolatileMemory;
        let log = &ram.device_log;
        let file = vm_memory::FileOffset::new(log.file().try_clone().unwrap(), 0);
        let theirs = vm_memory::mmap::MmapRegion::<()>::from_file(file, log.size() as usize).unwrap();
        let page = gpa / PAGE as u64;
        let byte = theirs.get_atomic_ref::<std::sync::atomic::AtomicU8>((page / 8) as usize).unwrap();
        byte.fetch_or(1 << (page % 8), std::sync::atomic::Ordering::SeqCst);
    }

    #[test]
    fn a_page_left_out_of_the_cut_is_seen() {
        // The dirty log is what makes the copy consistent: without the
        // page it names, the file holds the first copy's stale bytes.
        let ram = GuestRam::new(64).unwrap();
        fill(&ram);
        let file = temp_file("stale");
        copy_all(&ram, &file).unwrap();
        ram.memory.write_slice(&[0xcd; PAGE], GuestAddress(0x10_1000)).unwrap();
        copy_pages(&ram, &file, Vec::new()).unwrap();
        assert_ne!(index(&file, &ram).unwrap(), save(&ram, &temp_file("truth")).unwrap());
    }
}
