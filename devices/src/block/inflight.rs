//! In-flight I/O tracking (vhost-user spec, "Inflight I/O tracking", split
//! virtqueues), with the semantics of QEMU's libvhost-user so the tables
//! are interchangeable with its back ends.
//!
//! The table lives in a memfd the front end keeps. Every popped request is
//! marked (with an increasing counter) before it runs and cleared after its
//! used element is published, so if this process is killed anywhere in
//! between, its successor finds exactly the requests the guest has not seen
//! complete and resubmits them, in order. Block requests are idempotent
//! (the same bytes to the same sectors), so running one twice is harmless;
//! completing one twice or never is what this prevents.
//!
//! Per queue: `{ features u64, version u16, desc_num u16, last_batch_head
//! u16, used_idx u16, desc[desc_num] { inflight u8, padding [u8; 5], next
//! u16, counter u64 } }`, each queue's area rounded up to 64 bytes.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use vhost::vhost_user::message::VhostUserInflight;
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

const HEADER: usize = 16;
const DESC: usize = 16;
const ALIGN: usize = 64;
const VERSION_OFF: usize = 8;
const DESC_NUM_OFF: usize = 10;
const LAST_BATCH_HEAD_OFF: usize = 12;
const USED_IDX_OFF: usize = 14;
const D_INFLIGHT_OFF: usize = 0;
const D_COUNTER_OFF: usize = 8;
/// The layout version this code writes (libvhost-user's INFLIGHT_VERSION).
const VERSION: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("cannot create the in-flight memfd: {0}")]
    Memfd(std::io::Error),
    #[error("cannot map the in-flight table: {0}")]
    Map(vm_memory::mmap::MmapRegionError),
    #[error("in-flight table of {got} bytes is too small for {num_queues} queues of {queue_size}")]
    TooSmall { got: u64, num_queues: u16, queue_size: u16 },
    #[error("in-flight table description is invalid (zero queues or size)")]
    Invalid,
}

/// Bytes one queue's area takes for `queue_size` descriptors.
pub fn queue_area_size(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).next_multiple_of(ALIGN)
}

/// A mapped in-flight table (all queues).
#[derive(Debug)]
pub struct InflightTable {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightTable {
    /// GET_INFLIGHT_FD: a fresh, zeroed table for `num_queues` queues of
    /// `queue_size`, and the description to send back.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<(Arc<Self>, File, VhostUserInflight), InflightError> {
        if num_queues == 0 || queue_size == 0 {
            return Err(InflightError::Invalid);
        }
        let size = queue_area_size(queue_size) * usize::from(num_queues);
        // SAFETY: memfd_create takes a NUL-terminated name and flags; the
        // result is checked and then owned by the File.
        let fd = unsafe { libc::memfd_create(c"mm-block-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(InflightError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64).map_err(InflightError::Memfd)?;
        let info = VhostUserInflight::new(size as u64, 0, num_queues, queue_size);
        let table = Self::map(&info, file.try_clone().map_err(InflightError::Memfd)?)?;
        for q in 0..num_queues {
            table.write_u16(table.queue_base(q) + DESC_NUM_OFF, queue_size);
        }
        Ok((table, file, info))
    }

    /// SET_INFLIGHT_FD (or our own GET): maps a table the front end kept.
    pub fn map(info: &VhostUserInflight, file: File) -> Result<Arc<Self>, InflightError> {
        if info.num_queues == 0 || info.queue_size == 0 {
            return Err(InflightError::Invalid);
        }
        let needed = queue_area_size(info.queue_size) as u64 * u64::from(info.num_queues);
        let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let fits = info.mmap_offset.checked_add(needed).is_some_and(|end| end <= file_len);
        if info.mmap_size < needed || !fits {
            return Err(InflightError::TooSmall {
                got: info.mmap_size.min(file_len.saturating_sub(info.mmap_offset)),
                num_queues: info.num_queues,
                queue_size: info.queue_size,
            });
        }
        let map = MmapRegion::from_file(FileOffset::new(file, info.mmap_offset), needed as usize)
            .map_err(InflightError::Map)?;
        Ok(Arc::new(InflightTable { map, num_queues: info.num_queues, queue_size: info.queue_size }))
    }

    fn queue_base(&self, q: u16) -> usize {
        usize::from(q) * queue_area_size(self.queue_size)
    }

    // Offsets are derived from the validated layout; a failing access can
    // only mean a bug here, and the worst outcome is a lost mark.
    fn write_u16(&self, off: usize, v: u16) {
        let _ = self.map.as_volatile_slice().store(v.to_le(), off, Ordering::Release);
    }
    fn read_u16(&self, off: usize) -> u16 {
        self.map.as_volatile_slice().load::<u16>(off, Ordering::Acquire).map(u16::from_le).unwrap_or(0)
    }
    fn write_u8(&self, off: usize, v: u8) {
        let _ = self.map.as_volatile_slice().store(v, off, Ordering::Release);
    }
    fn read_u8(&self, off: usize) -> u8 {
        self.map.as_volatile_slice().load::<u8>(off, Ordering::Acquire).unwrap_or(0)
    }
    fn write_u64(&self, off: usize, v: u64) {
        let _ = self.map.as_volatile_slice().store(v.to_le(), off, Ordering::Release);
    }
    fn read_u64(&self, off: usize) -> u64 {
        self.map.as_volatile_slice().load::<u64>(off, Ordering::Acquire).map(u64::from_le).unwrap_or(0)
    }

    /// The area of queue `q`, for a ring of `ring_size` entries; `None` if
    /// the table has no room for it.
    pub fn queue(self: &Arc<Self>, q: u16, ring_size: u16) -> Option<QueueInflight> {
        if q >= self.num_queues || ring_size > self.queue_size {
            return None;
        }
        Some(QueueInflight { table: Arc::clone(self), base: self.queue_base(q), ring_size, counter: 0 })
    }
}

/// What a restarted ring must do about requests its predecessor left.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Heads to run again, oldest first.
    pub resubmit: Vec<u16>,
    /// Where the avail ring resumes: used index + requests in flight.
    pub next_avail: u16,
}

/// One queue's view of the table, with the running counter.
#[derive(Debug)]
pub struct QueueInflight {
    table: Arc<InflightTable>,
    base: usize,
    ring_size: u16,
    counter: u64,
}

impl QueueInflight {
    fn desc_off(&self, head: u16) -> usize {
        self.base + HEADER + DESC * usize::from(head)
    }

    /// Descriptors tracked: the smaller of the table's `desc_num` (which
    /// the front end could have changed) and the ring's size.
    fn desc_num(&self) -> u16 {
        self.table.read_u16(self.base + DESC_NUM_OFF).min(self.ring_size)
    }

    /// At ring start (libvhost-user's `vu_check_queue_inflights`): a fresh
    /// table is stamped with the layout version; a used one is reconciled
    /// with the used ring (`used_idx`, read from guest memory) and yields
    /// the requests to resubmit.
    pub fn recover(&mut self, used_idx: u16) -> Recovery {
        let t = &self.table;
        if t.read_u16(self.base + VERSION_OFF) == 0 {
            t.write_u16(self.base + VERSION_OFF, VERSION);
            t.write_u16(self.base + USED_IDX_OFF, used_idx);
            self.counter = 0;
            return Recovery { resubmit: Vec::new(), next_avail: used_idx };
        }
        let desc_num = self.desc_num();
        // The predecessor died after publishing a used element but before
        // clearing its mark: that request is done, don't run it again.
        if t.read_u16(self.base + USED_IDX_OFF) != used_idx {
            let head = t.read_u16(self.base + LAST_BATCH_HEAD_OFF);
            if head < desc_num {
                t.write_u8(self.desc_off(head) + D_INFLIGHT_OFF, 0);
            }
            fence(Ordering::SeqCst);
            t.write_u16(self.base + USED_IDX_OFF, used_idx);
        }
        let mut pending: Vec<(u64, u16)> = (0..desc_num)
            .filter(|&head| t.read_u8(self.desc_off(head) + D_INFLIGHT_OFF) == 1)
            .map(|head| (t.read_u64(self.desc_off(head) + D_COUNTER_OFF), head))
            .collect();
        pending.sort_unstable();
        self.counter = pending.last().map_or(0, |&(counter, _)| counter.wrapping_add(1));
        Recovery {
            next_avail: used_idx.wrapping_add(pending.len() as u16),
            resubmit: pending.into_iter().map(|(_, head)| head).collect(),
        }
    }

    /// Debug description of the queue's area.
    pub fn dump(&self) -> String {
        let t = &self.table;
        let marked: Vec<(u16, u64)> = (0..self.desc_num())
            .filter(|&h| t.read_u8(self.desc_off(h) + D_INFLIGHT_OFF) == 1)
            .map(|h| (h, t.read_u64(self.desc_off(h) + D_COUNTER_OFF)))
            .collect();
        format!(
            "version={} used_idx={} last_batch_head={} desc_num={} marked={:?}",
            t.read_u16(self.base + VERSION_OFF),
            t.read_u16(self.base + USED_IDX_OFF),
            t.read_u16(self.base + LAST_BATCH_HEAD_OFF),
            self.desc_num(),
            marked
        )
    }

    /// A request was popped: mark it before running it.
    pub fn mark(&mut self, head: u16) {
        if head >= self.desc_num() {
            return;
        }
        let off = self.desc_off(head);
        self.table.write_u64(off + D_COUNTER_OFF, self.counter);
        self.counter = self.counter.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.table.write_u8(off + D_INFLIGHT_OFF, 1);
    }

    /// Just before publishing `head`'s used element.
    pub fn pre_put(&self, head: u16) {
        self.table.write_u16(self.base + LAST_BATCH_HEAD_OFF, head);
        fence(Ordering::SeqCst);
    }

    /// Just after publishing it: `used_idx` is the used ring's new index.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        fence(Ordering::SeqCst);
        if head < self.desc_num() {
            self.table.write_u8(self.desc_off(head) + D_INFLIGHT_OFF, 0);
        }
        fence(Ordering::SeqCst);
        self.table.write_u16(self.base + USED_IDX_OFF, used_idx);
    }

    /// Whether `head` is marked.
    #[cfg(test)]
    pub fn is_marked(&self, head: u16) -> bool {
        head < self.desc_num() && self.table.read_u8(self.desc_off(head) + D_INFLIGHT_OFF) == 1
    }
}
