//! Turning a walked descriptor chain into a block request (virtio 1.2,
//! 5.2.6), with every check a hostile guest needs: this module only reads
//! guest memory, never the disk, so it can be tested and fuzzed on its own.
//!
//! Layout is not assumed (VIRTIO_F_VERSION_1 implies any layout): the header
//! may span buffers and the status byte is the last byte of the last buffer,
//! which must be device-writable. Device-readable buffers must all come
//! before device-writable ones.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::chain::Segment;
use super::config::{
    MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, SECTOR_SIZE,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// Size of `struct virtio_blk_outhdr` (type, ioprio, sector).
pub const HEADER_SIZE: u64 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
pub const RANGE_SIZE: u64 = 16;

/// What the device knows about its disk when it checks a request.
#[derive(Debug, Clone, Copy)]
pub struct DiskGeometry {
    pub capacity_sectors: u64,
    pub read_only: bool,
}

/// One range of a DISCARD or WRITE_ZEROES request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorRange {
    pub sector: u64,
    pub num_sectors: u32,
    /// WRITE_ZEROES only: the device may deallocate (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP).
    pub unmap: bool,
}

/// A request that passed every check and can be executed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes at `sector` into `data` (device-writable buffers).
    In {
        sector: u64,
        data: Vec<Segment>,
        len: u64,
    },
    /// Write the `len` bytes of `data` at `sector`.
    Out {
        sector: u64,
        data: Vec<Segment>,
        len: u64,
    },
    Flush,
    /// Write the device serial into `data` (at most 20 bytes of it).
    GetId {
        data: Vec<Segment>,
        len: u64,
    },
    Discard(Vec<SectorRange>),
    WriteZeroes(Vec<SectorRange>),
}

/// A parsed request: what to do, and where its status byte goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub status: GuestAddress,
}

/// Why a request is refused, and where (if anywhere) to say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// The status byte, when the chain has a usable one.
    pub status: Option<GuestAddress>,
    /// VIRTIO_BLK_S_IOERR or VIRTIO_BLK_S_UNSUPP.
    pub code: u8,
    pub reason: &'static str,
}

fn reject(status: Option<GuestAddress>, code: u32, reason: &'static str) -> Rejection {
    Rejection { status, code: code as u8, reason }
}

/// The sub-list of `segments` covering bytes `[skip, skip + take)` of their
/// concatenation. Zero-length pieces are dropped.
pub fn slice_segments(segments: &[Segment], mut skip: u64, mut take: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for seg in segments {
        if take == 0 {
            break;
        }
        let len = u64::from(seg.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(take);
        // skip < len <= u32::MAX and addresses were range-checked, so this
        // neither overflows nor leaves guest memory.
        out.push(Segment { addr: seg.addr.unchecked_add(skip), len: n as u32, writable: seg.writable });
        take -= n;
        skip = 0;
    }
    out
}

fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// Reads `buf.len()` bytes starting `skip` bytes into `segments`.
fn read_from_segments<M: GuestMemoryBackend>(mem: &M, segments: &[Segment], skip: u64, buf: &mut [u8]) -> bool {
    let mut done = 0usize;
    for piece in slice_segments(segments, skip, buf.len() as u64) {
        let end = done + piece.len as usize;
        if mem.read_slice(&mut buf[done..end], piece.addr).is_err() {
            return false;
        }
        done = end;
    }
    done == buf.len()
}

/// Checks `sector` and `len` bytes against the disk, overflow included.
fn in_range(geometry: &DiskGeometry, sector: u64, len: u64) -> bool {
    let capacity = geometry.capacity_sectors.saturating_mul(SECTOR_SIZE);
    sector.checked_mul(SECTOR_SIZE).and_then(|start| start.checked_add(len)).is_some_and(|end| end <= capacity)
}

/// Parses the chain's buffers into a request for a disk of `geometry`.
pub fn parse<M: GuestMemoryBackend>(
    mem: &M,
    segments: &[Segment],
    geometry: &DiskGeometry,
) -> Result<Request, Rejection> {
    // The status byte: last byte of the last buffer, device-writable and in
    // guest memory, or there is nowhere to report anything.
    let status = segments
        .last()
        .filter(|last| last.writable && last.len > 0)
        .and_then(|last| last.addr.checked_add(u64::from(last.len) - 1))
        .filter(|&addr| mem.check_range(addr, 1));
    let Some(status) = status else {
        return Err(reject(None, VIRTIO_BLK_S_IOERR, "no writable status byte"));
    };
    let ioerr = |reason| reject(Some(status), VIRTIO_BLK_S_IOERR, reason);

    if segments.iter().any(|s| !mem.check_range(s.addr, s.len as usize)) {
        return Err(ioerr("buffer outside guest memory"));
    }
    let first_writable = segments.iter().position(|s| s.writable).unwrap_or(segments.len());
    if segments[first_writable..].iter().any(|s| !s.writable) {
        return Err(ioerr("device-readable buffer after a device-writable one"));
    }
    let (readable, writable) = segments.split_at(first_writable);
    let readable_len = total_len(readable);
    // Everything writable except the status byte.
    let writable_data_len = total_len(writable) - 1;

    let mut header = [0u8; HEADER_SIZE as usize];
    if readable_len < HEADER_SIZE || !read_from_segments(mem, readable, 0, &mut header) {
        return Err(ioerr("header too short"));
    }
    let request_type = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let out_len = readable_len - HEADER_SIZE;
    let out_data = || slice_segments(readable, HEADER_SIZE, out_len);
    let in_data = || slice_segments(writable, 0, writable_data_len);

    let kind = match request_type {
        VIRTIO_BLK_T_IN => {
            if out_len != 0 {
                return Err(ioerr("read with device-readable data"));
            }
            if !writable_data_len.is_multiple_of(SECTOR_SIZE) {
                return Err(ioerr("read length not a multiple of 512"));
            }
            if !in_range(geometry, sector, writable_data_len) {
                return Err(ioerr("read beyond the end of the disk"));
            }
            RequestKind::In { sector, data: in_data(), len: writable_data_len }
        }
        VIRTIO_BLK_T_OUT => {
            if writable_data_len != 0 {
                return Err(ioerr("write with device-writable data"));
            }
            if geometry.read_only {
                return Err(ioerr("write to a read-only disk"));
            }
            if !out_len.is_multiple_of(SECTOR_SIZE) {
                return Err(ioerr("write length not a multiple of 512"));
            }
            if !in_range(geometry, sector, out_len) {
                return Err(ioerr("write beyond the end of the disk"));
            }
            RequestKind::Out { sector, data: out_data(), len: out_len }
        }
        VIRTIO_BLK_T_FLUSH => {
            if out_len != 0 || writable_data_len != 0 {
                return Err(ioerr("flush with data"));
            }
            RequestKind::Flush
        }
        VIRTIO_BLK_T_GET_ID => {
            if out_len != 0 {
                return Err(ioerr("get-id with device-readable data"));
            }
            RequestKind::GetId { data: in_data(), len: writable_data_len }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = request_type == VIRTIO_BLK_T_DISCARD;
            if writable_data_len != 0 {
                return Err(ioerr("discard/write-zeroes with device-writable data"));
            }
            if geometry.read_only {
                return Err(ioerr("discard/write-zeroes on a read-only disk"));
            }
            if out_len == 0 || !out_len.is_multiple_of(RANGE_SIZE) {
                return Err(ioerr("discard/write-zeroes ranges malformed"));
            }
            let (max_seg, max_sectors) = if discard {
                (MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
            } else {
                (MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SECTORS)
            };
            if out_len / RANGE_SIZE > u64::from(max_seg) {
                return Err(reject(Some(status), VIRTIO_BLK_S_UNSUPP, "more ranges than advertised"));
            }
            let ranges = parse_ranges(mem, readable, out_len, discard, max_sectors, geometry, status)?;
            if discard { RequestKind::Discard(ranges) } else { RequestKind::WriteZeroes(ranges) }
        }
        _ => return Err(reject(Some(status), VIRTIO_BLK_S_UNSUPP, "unsupported request type")),
    };
    Ok(Request { kind, status })
}

fn parse_ranges<M: GuestMemoryBackend>(
    mem: &M,
    readable: &[Segment],
    out_len: u64,
    discard: bool,
    max_sectors: u32,
    geometry: &DiskGeometry,
    status: GuestAddress,
) -> Result<Vec<SectorRange>, Rejection> {
    let ioerr = |reason| reject(Some(status), VIRTIO_BLK_S_IOERR, reason);
    let mut ranges = Vec::new();
    for i in 0..out_len / RANGE_SIZE {
        let mut raw = [0u8; RANGE_SIZE as usize];
        if !read_from_segments(mem, readable, HEADER_SIZE + i * RANGE_SIZE, &mut raw) {
            return Err(ioerr("range unreadable"));
        }
        let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        let num_sectors = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
        // Discard takes no flags; write-zeroes only UNMAP (virtio 1.2, 5.2.6.2).
        let allowed = if discard { 0 } else { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP };
        if flags & !allowed != 0 {
            return Err(reject(Some(status), VIRTIO_BLK_S_UNSUPP, "unknown range flags"));
        }
        if num_sectors > max_sectors {
            return Err(ioerr("range larger than advertised"));
        }
        if !in_range(geometry, sector, u64::from(num_sectors) * SECTOR_SIZE) {
            return Err(ioerr("range beyond the end of the disk"));
        }
        ranges.push(SectorRange { sector, num_sectors, unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 });
    }
    Ok(ranges)
}
