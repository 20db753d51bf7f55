//! One request, start to finish: walk the chain, parse it, run it against
//! the image, write the status byte. The worker calls this per chain, and
//! the fuzz target calls it directly.

use std::sync::atomic::{AtomicBool, Ordering};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::chain::{self, DescTable, Segment};
use super::config::SECTOR_SIZE;
use super::disk::{DiskError, DiskImage};
use super::request::{self, DiskGeometry, Request, RequestKind, SectorRange};

/// The device serial GET_ID returns: 20 bytes, NUL-padded, not necessarily
/// NUL-terminated (virtio 1.2, 5.2.6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Serial(pub [u8; VIRTIO_BLK_ID_BYTES as usize]);

impl Serial {
    /// Takes the first 20 bytes of `id` (longer ids are cut, as QEMU does).
    pub fn new(id: &str) -> Self {
        let mut bytes = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = id.len().min(bytes.len());
        bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Serial(bytes)
    }
}

/// What a request needs besides guest memory.
#[derive(Debug)]
pub struct BlockDisk {
    pub image: DiskImage,
    pub serial: Serial,
    /// The driver did not negotiate VIRTIO_BLK_F_FLUSH, so it cannot ask
    /// for durability and the cache must be write-through: every write is
    /// synced before it completes (virtio 1.2, 5.2.5).
    pub writethrough: AtomicBool,
}

impl BlockDisk {
    pub fn new(image: DiskImage, serial: Serial) -> Self {
        BlockDisk { image, serial, writethrough: AtomicBool::new(false) }
    }

    /// Syncs after a write when in write-through mode.
    fn write_done(&self) -> Result<(), DiskError> {
        if self.writethrough.load(Ordering::Relaxed) { self.image.flush() } else { Ok(()) }
    }

    pub fn geometry(&self) -> DiskGeometry {
        DiskGeometry { capacity_sectors: self.image.capacity_sectors(), read_only: self.image.read_only() }
    }
}

/// What the request at `head` costs the rate limiter in bytes: the data
/// of a read or write (0 for anything else, and for a malformed chain,
/// which is answered without touching the disk). Parses the chain without
/// running it (so it is parsed twice; cheap next to the I/O).
pub fn request_bytes<B: Bitmap>(mem: &GuestMemoryMmap<B>, table: DescTable, head: u16, disk: &BlockDisk) -> u64 {
    let Ok(segments) = chain::walk(mem, table, head) else { return 0 };
    match request::parse(mem, &segments, &disk.geometry()) {
        Ok(Request { kind: RequestKind::In { len, .. } | RequestKind::Out { len, .. }, .. }) => len,
        _ => 0,
    }
}

/// Processes the chain at `head` and returns the used length to publish:
/// bytes written to device-writable buffers, status byte included (0 when
/// the chain is too broken to have a status byte).
pub fn process_chain<B: Bitmap>(mem: &GuestMemoryMmap<B>, table: DescTable, head: u16, disk: &BlockDisk) -> u32 {
    let segments = match chain::walk(mem, table, head) {
        Ok(segments) => segments,
        Err(e) => {
            tracing::debug!(head, "block: malformed descriptor chain: {e}");
            return 0;
        }
    };
    let request = match request::parse(mem, &segments, &disk.geometry()) {
        Ok(request) => request,
        Err(rejection) => {
            tracing::debug!(head, code = rejection.code, "block: request refused: {}", rejection.reason);
            return match rejection.status {
                Some(status) if write_status(mem, status, rejection.code) => 1,
                _ => 0,
            };
        }
    };
    match &request.kind {
        RequestKind::In { sector, len, .. } => {
            tracing::debug!(head, sector, len, cap = disk.image.capacity_sectors(), "block: trace: IN")
        }
        RequestKind::Out { sector, len, .. } => {
            tracing::debug!(head, sector, len, cap = disk.image.capacity_sectors(), "block: trace: OUT")
        }
        other => tracing::debug!(
            head,
            cap = disk.image.capacity_sectors(),
            "block: trace: other {}",
            match other {
                RequestKind::Flush => "flush",
                _ => "misc",
            }
        ),
    }
    let (code, written) = match execute(mem, &request, disk) {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(e) => {
            tracing::warn!(head, "block: request failed: {e}");
            (VIRTIO_BLK_S_IOERR as u8, 0)
        }
    };
    if write_status(mem, request.status, code) { (written + 1) as u32 } else { written as u32 }
}

/// Through vm-memory, so a dirty log sees it.
fn write_status<B: Bitmap>(mem: &GuestMemoryMmap<B>, status: GuestAddress, code: u8) -> bool {
    mem.write_obj(code, status).is_ok()
}

/// Runs a parsed request; returns the bytes written to guest buffers.
/// Data lengths were bounded by the parser (chain lengths fit in u32).
pub fn execute<B: Bitmap>(mem: &GuestMemoryMmap<B>, request: &Request, disk: &BlockDisk) -> Result<u64, DiskError> {
    match &request.kind {
        RequestKind::In { sector, data, len } => {
            let read = disk.image.read_to_guest(mem, data, sector * SECTOR_SIZE)?;
            debug_assert_eq!(read, *len);
            Ok(read)
        }
        RequestKind::Out { sector, data, .. } => {
            disk.image.write_from_guest(mem, data, sector * SECTOR_SIZE)?;
            disk.write_done()?;
            Ok(0)
        }
        RequestKind::Flush => {
            disk.image.flush()?;
            Ok(0)
        }
        RequestKind::GetId { data, len } => write_serial(mem, data, *len, &disk.serial),
        RequestKind::Discard(ranges) => {
            for SectorRange { sector, num_sectors, .. } in ranges {
                disk.image.discard(sector * SECTOR_SIZE, u64::from(*num_sectors) * SECTOR_SIZE)?;
            }
            disk.write_done()?;
            Ok(0)
        }
        RequestKind::WriteZeroes(ranges) => {
            for SectorRange { sector, num_sectors, unmap } in ranges {
                disk.image.write_zeroes(sector * SECTOR_SIZE, u64::from(*num_sectors) * SECTOR_SIZE, *unmap)?;
            }
            disk.write_done()?;
            Ok(0)
        }
    }
}

fn write_serial<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    data: &[Segment],
    len: u64,
    serial: &Serial,
) -> Result<u64, DiskError> {
    let n = (serial.0.len() as u64).min(len);
    let mut done = 0usize;
    for piece in request::slice_segments(data, 0, n) {
        let end = done + piece.len as usize;
        mem.write_slice(&serial.0[done..end], piece.addr).map_err(|_| DiskError::GuestMemory)?;
        done = end;
    }
    Ok(n)
}
