//! The fuzz entry point for block request handling: one descriptor chain,
//! written by the fuzzer into a small guest memory, walked, parsed and run
//! against a small in-memory disk. Shared by `devices/fuzz` (cargo-fuzz)
//! and a deterministic `#[test]` so stable CI runs it too.
//!
//! Input layout: byte 0 picks the queue size (1 << (b % 6)), byte 1 the
//! head index (may be out of range), byte 2 flags (bit 0: indirect
//! descriptors negotiated, bit 1: read-only disk); the rest is copied to
//! the start of guest memory, where the descriptor table lives, so the
//! fuzzer controls descriptors and buffers alike.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::chain::DescTable;
use super::disk::DiskImage;
use super::execute::{BlockDisk, Serial, process_chain};

/// Guest memory the fuzzer writes: 64 KiB at a nonzero guest address.
pub const MEM_BASE: u64 = 0x1_0000;
pub const MEM_SIZE: usize = 0x1_0000;
/// The disk: 64 KiB (128 sectors).
pub const DISK_SIZE: u64 = 0x1_0000;

fn memfd_disk(read_only: bool) -> Option<DiskImage> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the
    // result is checked and then owned by the File.
    let fd = unsafe { libc::memfd_create(c"mm-block-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(DISK_SIZE).ok()?;
    file.write_all_at(&[0xa5; 512], 0).ok()?;
    DiskImage::from_file(file, read_only).ok()
}

/// Runs one fuzz input. Panics only if an invariant breaks.
pub fn fuzz_block_request(data: &[u8]) {
    let [b0, b1, b2, rest @ ..] = data else { return };
    let queue_size = 1u16 << (b0 % 6);
    let head = u16::from(*b1);
    let table = DescTable { addr: GuestAddress(MEM_BASE), queue_size, indirect: b2 & 1 != 0 };
    let read_only = b2 & 2 != 0;

    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(MEM_BASE), MEM_SIZE)]) else { return };
    let n = rest.len().min(MEM_SIZE);
    if mem.write_slice(&rest[..n], GuestAddress(MEM_BASE)).is_err() {
        return;
    }
    let Some(image) = memfd_disk(read_only) else { return };
    let disk = BlockDisk::new(image, Serial::new("fuzz-serial-0123456789"));
    let before = read_only.then(|| snapshot(&disk));

    let used = process_chain(&mem, table, head, &disk);

    // A used length counts bytes written to guest buffers: never more than
    // the request could hold (data limited to the disk, plus a status byte).
    assert!(u64::from(used) <= DISK_SIZE + 1, "used length {used} too large");
    if let Some(before) = before {
        assert!(before == snapshot(&disk), "a read-only disk changed");
    }
}

fn snapshot(disk: &BlockDisk) -> Vec<u8> {
    let mut buf = vec![0u8; DISK_SIZE as usize];
    let _ = disk.image.file().read_exact_at(&mut buf, 0);
    buf
}
