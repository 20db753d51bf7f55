//! Walking one descriptor chain in guest memory, by hand rather than with
//! `virtio_queue::DescriptorChain`: its iterator ends silently on a loop, a
//! bad `next` index or an unreadable table, so a truncated hostile chain would
//! look like a complete one. Here every way a chain can be malformed is an
//! error, and the work per chain is bounded whatever the guest wrote.

use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use super::config::MAX_CHAIN_DESCRIPTORS;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// A descriptor as it sits in a split-ring table (virtio 1.2, 2.7.5).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

// SAFETY: RawDesc is repr(C), made of integers only, with no padding
// (8 + 4 + 2 + 2 bytes), so any byte pattern is a valid value.
unsafe impl ByteValued for RawDesc {}

/// One buffer of a chain, in chain order. Its address range is not yet
/// checked against guest memory: the request parser does that, so that a
/// bad data buffer can still be answered through a good status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (VRING_DESC_F_WRITE).
    pub writable: bool,
}

/// Why a chain could not be walked. None of these leaves a trustworthy
/// "last descriptor", so such chains are returned with a used length of 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor index {index} is outside a table of {table_len}")]
    IndexOutOfRange { index: u16, table_len: u32 },
    #[error("descriptor table entry at {0:#x} is not in guest memory")]
    TableOutOfMemory(u64),
    #[error("chain is longer than its table allows (a loop?)")]
    TooLong,
    #[error("indirect descriptor not negotiated, nested, chained, or not at the head")]
    BadIndirect,
    #[error("indirect table length {0} is not a nonzero multiple of 16 within limits")]
    BadIndirectLength(u32),
}

/// Where the queue's descriptor table lives.
#[derive(Debug, Clone, Copy)]
pub struct DescTable {
    pub addr: GuestAddress,
    pub queue_size: u16,
    /// VIRTIO_RING_F_INDIRECT_DESC was negotiated.
    pub indirect: bool,
}

fn read_desc<M: GuestMemoryBackend>(mem: &M, table: GuestAddress, index: u16) -> Result<RawDesc, ChainError> {
    let addr = table.checked_add(u64::from(index) * 16).ok_or(ChainError::TableOutOfMemory(table.raw_value()))?;
    let desc: RawDesc = mem.read_obj(addr).map_err(|_| ChainError::TableOutOfMemory(addr.raw_value()))?;
    Ok(RawDesc {
        addr: u64::from_le(desc.addr),
        len: u32::from_le(desc.len),
        flags: u16::from_le(desc.flags),
        next: u16::from_le(desc.next),
    })
}

/// Follows the chain that starts at `head`, into at most one indirect
/// table (only as the head descriptor, as QEMU requires), and returns its
/// buffers in order.
pub fn walk<M: GuestMemoryBackend>(mem: &M, table: DescTable, head: u16) -> Result<Vec<Segment>, ChainError> {
    let mut segments = Vec::new();
    let mut table_addr = table.addr;
    let mut table_len = u32::from(table.queue_size);
    let mut index = head;
    let mut in_indirect = false;
    // Descriptors visited in the current table: more than the table holds
    // means the `next` links loop.
    let mut visited: u32 = 0;
    loop {
        if u32::from(index) >= table_len {
            return Err(ChainError::IndexOutOfRange { index, table_len });
        }
        let desc = read_desc(mem, table_addr, index)?;
        if desc.flags & F_INDIRECT != 0 {
            if !table.indirect || in_indirect || desc.flags & F_NEXT != 0 || !segments.is_empty() || visited != 0 {
                return Err(ChainError::BadIndirect);
            }
            let len = desc.len;
            if len == 0 || !len.is_multiple_of(16) || (len / 16) as usize > MAX_CHAIN_DESCRIPTORS {
                return Err(ChainError::BadIndirectLength(len));
            }
            table_addr = GuestAddress(desc.addr);
            table_len = len / 16;
            index = 0;
            in_indirect = true;
            continue;
        }
        visited += 1;
        if visited > table_len || segments.len() >= MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooLong);
        }
        segments.push(Segment { addr: GuestAddress(desc.addr), len: desc.len, writable: desc.flags & F_WRITE != 0 });
        if desc.flags & F_NEXT == 0 {
            return Ok(segments);
        }
        index = desc.next;
    }
}
