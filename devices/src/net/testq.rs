//! Test-only: a split virtqueue in plain test memory, driven from the
//! driver's side, for unit tests of the queue-facing code without a front
//! end. (End-to-end tests go through `crate::test_frontend`.)

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::LoggedMemory;

/// Descriptor flag: device-writable.
pub const W: u16 = VRING_DESC_F_WRITE as u16;

const DESC: u64 = 0;
const AVAIL: u64 = 0x4000;
const USED: u64 = 0x8000;
/// Guest RAM: 4 MiB from 0; rings below 0x10000, buffers above.
const MEM_SIZE: usize = 4 << 20;

pub struct TestQueue {
    pub mem: LoggedMemory,
    pub queue: Queue,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl TestQueue {
    pub fn new(size: u16) -> Self {
        let mem = LoggedMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut queue = Queue::new(size).unwrap();
        queue.set_size(size);
        queue.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        queue.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        queue.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        queue.set_ready(true);
        TestQueue { mem, queue, size, next_desc: 0, avail_idx: 0 }
    }

    /// Makes a chain of (address, length, flags) descriptors available;
    /// returns its head index.
    pub fn add(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let last = i + 1 == descs.len();
            let flags = if last { flags } else { flags | VRING_DESC_F_NEXT as u16 };
            let next = if last { 0 } else { self.next_desc };
            let at = GuestAddress(DESC + 16 * u64::from(index));
            self.mem.write_obj(addr.to_le(), at).unwrap();
            self.mem.write_obj(len.to_le(), GuestAddress(at.0 + 8)).unwrap();
            self.mem.write_obj(flags.to_le(), GuestAddress(at.0 + 12)).unwrap();
            self.mem.write_obj(next.to_le(), GuestAddress(at.0 + 14)).unwrap();
        }
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL + 2)).unwrap();
        head
    }

    fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(USED + 2)).unwrap())
    }

    fn used_at(&self, i: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(i % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    /// All used entries so far, as (head, length) (for tests that add fewer
    /// than a ring's worth).
    pub fn used(&self) -> Vec<(u32, u32)> {
        (0..self.used_idx()).map(|i| self.used_at(i)).collect()
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }
}
