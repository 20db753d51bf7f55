//! A small vhost-user front end for tests that need no KVM: it plays mm-vmm's
//! part (guest RAM in a memfd, split virtqueues laid out in it, eventfds for
//! kicks and calls) and the guest driver's part (descriptor chains, the
//! available ring, reading the used ring), so a back end can be driven end to
//! end over a socketpair inside one test process.
//!
//! It deliberately lets a test write any descriptor it likes
//! ([`TestFrontend::write_desc`], [`TestFrontend::push_avail`]), because the
//! point of most device tests is what a back end does with a hostile guest.
//!
//! Ring addresses are sent as this process's virtual addresses, as mm-vmm
//! does (DESIGN.md, "Wire protocols"), so back ends exercise their
//! address translation.
//!
//! It also plays the front end of a live snapshot: a dirty log in a memfd
//! (SET_LOG_BASE, LOG_ALL; [`TestFrontend::start_logging`]) that tests read
//! and clear ([`TestFrontend::take_dirty`]) to see which guest pages a back
//! end wrote.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub const DESC_F_INDIRECT: u16 = 4;

/// Errors of the test front end; tests usually just `unwrap()` them.
#[derive(Debug, thiserror::Error)]
pub enum TestFrontendError {
    #[error("cannot create the guest memory memfd: {0}")]
    Memfd(std::io::Error),
    #[error("cannot map guest memory: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
    #[error("guest memory access: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("vhost-user: {0}")]
    Vhost(#[from] vhost::Error),
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("out of test guest memory (wanted {0} bytes)")]
    OutOfMemory(u64),
    #[error("queue {0} has no free descriptors for a chain of {1}")]
    OutOfDescriptors(usize, usize),
    #[error("queue {0} was not set up")]
    NoQueue(usize),
    #[error("dirty log: {0}")]
    Log(std::io::Error),
    #[error("no dirty log: SET_LOG_BASE was not sent")]
    NoLog,
}

/// The page size of the vhost-user dirty log (VHOST_LOG_PAGE).
pub const LOG_PAGE: u64 = 4096;

/// A new memfd of `len` bytes.
pub fn memfd(name: &std::ffi::CStr, len: u64) -> std::io::Result<File> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the
    // returned fd is checked and then owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok(file)
}

pub type Result<T> = std::result::Result<T, TestFrontendError>;

/// One raw split-ring descriptor, as the driver writes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// One element of the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
}

/// One buffer of a chain built with [`TestFrontend::add_chain`].
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
    /// Written by the device (VRING_DESC_F_WRITE).
    pub device_writes: bool,
}

impl Buf {
    /// A buffer the device reads.
    pub fn out(addr: GuestAddress, len: u32) -> Self {
        Buf { addr, len, device_writes: false }
    }
    /// A buffer the device writes.
    pub fn input(addr: GuestAddress, len: u32) -> Self {
        Buf { addr, len, device_writes: true }
    }
}

/// Guest RAM backed by a memfd, as in mm-vmm, with a bump allocator for
/// rings and buffers.
pub struct TestMemory {
    pub mem: GuestMemoryMmap,
    pub memfd: File,
    next_free: u64,
    end: u64,
}

impl TestMemory {
    /// Guest RAM of `size` bytes at guest-physical `base` (a nonzero base
    /// catches back ends that confuse guest-physical and virtual addresses).
    pub fn new(base: u64, size: usize) -> Result<Self> {
        let memfd = memfd(c"mm-test-guest-ram", size as u64).map_err(TestFrontendError::Memfd)?;
        let file = memfd.try_clone().map_err(TestFrontendError::Memfd)?;
        let mem =
            GuestMemoryMmap::from_ranges_with_files([(GuestAddress(base), size, Some(FileOffset::new(file, 0)))])?;
        Ok(TestMemory { mem, memfd, next_free: base, end: base + size as u64 })
    }

    /// Reserves `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<GuestAddress> {
        let start = self.next_free.next_multiple_of(align);
        let end = start.checked_add(len).filter(|&e| e <= self.end).ok_or(TestFrontendError::OutOfMemory(len))?;
        self.next_free = end;
        Ok(GuestAddress(start))
    }

    /// The first guest-physical address past the end of RAM.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// The region table mm-vmm would send: this process's mapping of each region.
    pub fn regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.mem
            .iter()
            .map(|region| VhostUserMemoryRegionInfo {
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                mmap_offset: region.file_offset().map(|f| f.start()).unwrap_or(0),
                mmap_handle: self.memfd.as_raw_fd(),
            })
            .collect()
    }

    /// This process's virtual address for a guest address.
    pub fn host_addr(&self, addr: GuestAddress) -> u64 {
        self.mem.get_host_address(addr).map(|p| p as u64).unwrap_or(0)
    }
}

/// A split virtqueue as the test driver sees it.
pub struct TestQueue {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    pub kick: EventFd,
    pub call: EventFd,
    /// The driver's next available index.
    avail_idx: u16,
    /// The used index up to which we have read.
    last_used: u16,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
}

impl TestQueue {
    fn new(mem: &mut TestMemory, size: u16) -> Result<Self> {
        let n = u64::from(size);
        let desc = mem.alloc(16 * n, 16)?;
        let avail = mem.alloc(6 + 2 * n, 2)?;
        let used = mem.alloc(6 + 8 * n, 4)?;
        let kick = EventFd::new(EFD_NONBLOCK).map_err(TestFrontendError::EventFd)?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(TestFrontendError::EventFd)?;
        Ok(TestQueue {
            size,
            desc,
            avail,
            used,
            kick,
            call,
            avail_idx: 0,
            last_used: 0,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
        })
    }
}

/// The test front end: one vhost-user session plus the guest it stands for.
pub struct TestFrontend {
    pub frontend: Frontend,
    pub memory: TestMemory,
    pub queues: Vec<Option<TestQueue>>,
    /// Features the back end offered (GET_FEATURES), vhost-user bit included.
    pub offered_features: u64,
    /// Protocol features in use on this session.
    pub protocol: VhostUserProtocolFeatures,
    /// The in-flight table, once GET_INFLIGHT_FD answered.
    pub inflight: Option<(VhostUserInflight, File)>,
    acked_features: u64,
    /// Protocol features asked for when offered (on every reconnect too).
    wanted_protocol: VhostUserProtocolFeatures,
    /// The dirty log sent with SET_LOG_BASE (the file and its size).
    log: Option<(File, u64)>,
}

/// Protocol features the test front end asks for when offered.
pub const TEST_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::CONFIG
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    .union(VhostUserProtocolFeatures::MQ)
    .union(VhostUserProtocolFeatures::LOG_SHMFD);

impl TestFrontend {
    /// Opens a session over `stream` (SET_OWNER, GET_FEATURES and the
    /// protocol-feature handshake) for a device with `num_queues` queues.
    pub fn connect(stream: UnixStream, memory: TestMemory, num_queues: usize) -> Result<Self> {
        Self::connect_wanting(stream, memory, num_queues, TEST_PROTOCOL_FEATURES)
    }

    /// [`TestFrontend::connect`], asking only for the protocol features in
    /// `wanted` (e.g. without INFLIGHT_SHMFD, to show what a test would
    /// miss without in-flight tracking).
    pub fn connect_wanting(
        stream: UnixStream,
        memory: TestMemory,
        num_queues: usize,
        wanted: VhostUserProtocolFeatures,
    ) -> Result<Self> {
        let frontend = Frontend::from_stream(stream, num_queues as u64);
        let mut fe = TestFrontend {
            frontend,
            memory,
            queues: (0..num_queues).map(|_| None).collect(),
            offered_features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            inflight: None,
            acked_features: 0,
            wanted_protocol: wanted,
            log: None,
        };
        fe.handshake()?;
        Ok(fe)
    }

    fn handshake(&mut self) -> Result<()> {
        self.frontend.set_owner()?;
        self.offered_features = self.frontend.get_features()?;
        if self.offered_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = self.frontend.get_protocol_features()?;
            self.protocol = offered & self.wanted_protocol;
            self.frontend.set_protocol_features(self.protocol)?;
            if self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // The vhost crate only asks for acks when told to; without
                // this, a failed set-up step would go unnoticed.
                self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        Ok(())
    }

    /// Replaces the session with a fresh one over `stream` (the back end was
    /// restarted) and replays the whole set-up, as mm-vmm's `reconnect`
    /// does: features, memory, the kept in-flight table, and every ring at
    /// the used index the guest sees.
    pub fn reconnect(&mut self, stream: UnixStream) -> Result<()> {
        self.reconnect_at(stream, None)
    }

    /// [`TestFrontend::reconnect`], with every ring's SET_VRING_BASE set to
    /// `base` instead of the used index (a front end that cannot know where
    /// the dead back end was, so the in-flight table must decide).
    pub fn reconnect_at(&mut self, stream: UnixStream, base: Option<u16>) -> Result<()> {
        self.frontend = Frontend::from_stream(stream, self.queues.len() as u64);
        self.handshake()?;
        // LOG_ALL only once the new back end has the log to write to.
        let acked = self.acked_features;
        let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
        self.send_features(acked & !log_all)?;
        self.set_mem_table()?;
        if acked & log_all != 0
            && let Some((file, size)) = &self.log
        {
            self.send_log_base(file, *size, 0)?;
            self.send_features(acked)?;
        }
        if self.protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
            && let Some((info, file)) = &self.inflight
        {
            self.frontend.set_inflight_fd(info, file.as_raw_fd())?;
        }
        for index in 0..self.queues.len() {
            if self.queues[index].is_some() {
                let base = match base {
                    Some(base) => base,
                    None => self.used_idx(index)?,
                };
                self.start_vring(index, base)?;
            }
        }
        Ok(())
    }

    /// SET_FEATURES with `features` (the vhost-user bit is added when
    /// offered). LOG_ALL is not taken from `features`: it stays as
    /// [`TestFrontend::set_logging`] last set it, so tests acking "every
    /// offered feature" do not turn logging on without a log.
    pub fn set_features(&mut self, features: u64) -> Result<()> {
        let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
        self.send_features((features & !log_all) | (self.acked_features & log_all))
    }

    fn send_features(&mut self, features: u64) -> Result<()> {
        let proto = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let features = (features & self.offered_features) | (self.offered_features & proto);
        self.acked_features = features;
        self.frontend.set_features(features)?;
        Ok(())
    }

    /// SET_MEM_TABLE with the test guest RAM.
    pub fn set_mem_table(&mut self) -> Result<()> {
        self.frontend.set_mem_table(&self.memory.regions())?;
        Ok(())
    }

    /// GET_CONFIG of `size` bytes at `offset`.
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let buf = vec![0u8; size as usize];
        let (_, config) = self.frontend.get_config(offset, size, VhostUserConfigFlags::WRITABLE, &buf)?;
        Ok(config)
    }

    /// GET_INFLIGHT_FD for the configured queues, kept for reconnects.
    pub fn get_inflight(&mut self, queue_size: u16) -> Result<()> {
        let request = VhostUserInflight::new(0, 0, self.queues.len() as u16, queue_size);
        self.inflight = Some(self.frontend.get_inflight_fd(&request)?);
        Ok(())
    }

    /// SET_INFLIGHT_FD with the table from [`TestFrontend::get_inflight`].
    pub fn set_inflight(&mut self) -> Result<()> {
        if let Some((info, file)) = &self.inflight {
            self.frontend.set_inflight_fd(info, file.as_raw_fd())?;
        }
        Ok(())
    }

    /// Lays out queue `index` with `size` entries in guest memory (once),
    /// and starts it at index 0.
    pub fn setup_vring(&mut self, index: usize, size: u16) -> Result<()> {
        self.layout_vring(index, size)?;
        self.start_vring(index, 0)
    }

    /// Lays out queue `index` with `size` entries in guest memory without
    /// telling the back end anything.
    pub fn layout_vring(&mut self, index: usize, size: u16) -> Result<()> {
        let queue = TestQueue::new(&mut self.memory, size)?;
        *self.queues.get_mut(index).ok_or(TestFrontendError::NoQueue(index))? = Some(queue);
        Ok(())
    }

    /// SET_VRING_ENABLE.
    pub fn enable_vring(&mut self, index: usize, enable: bool) -> Result<()> {
        self.frontend.set_vring_enable(index, enable)?;
        Ok(())
    }

    /// SET_VRING_NUM/ADDR/BASE/CALL/KICK and, with protocol features,
    /// SET_VRING_ENABLE, for an already laid-out queue.
    pub fn start_vring(&mut self, index: usize, base: u16) -> Result<()> {
        self.configure_vring(index, base)?;
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            self.frontend.set_vring_enable(index, true)?;
        }
        Ok(())
    }

    /// Like [`TestFrontend::start_vring`] without SET_VRING_ENABLE.
    pub fn configure_vring(&mut self, index: usize, base: u16) -> Result<()> {
        let q = self.queues.get(index).and_then(Option::as_ref).ok_or(TestFrontendError::NoQueue(index))?;
        let config = VringConfigData {
            queue_max_size: q.size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: self.memory.host_addr(q.desc),
            used_ring_addr: self.memory.host_addr(q.used),
            avail_ring_addr: self.memory.host_addr(q.avail),
            log_addr: None,
        };
        self.frontend.set_vring_num(index, q.size)?;
        self.frontend.set_vring_addr(index, &config)?;
        self.frontend.set_vring_base(index, base)?;
        self.frontend.set_vring_call(index, &q.call)?;
        self.frontend.set_vring_kick(index, &q.kick)?;
        Ok(())
    }

    /// The whole activation mm-vmm performs when the driver sets DRIVER_OK:
    /// features, memory, an in-flight table (when negotiated), and rings.
    pub fn activate(&mut self, features: u64, queue_sizes: &[u16]) -> Result<()> {
        self.set_features(features)?;
        self.set_mem_table()?;
        if self.protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            let max = queue_sizes.iter().copied().max().unwrap_or(0);
            self.get_inflight(max)?;
            self.set_inflight()?;
        }
        for (index, &size) in queue_sizes.iter().enumerate() {
            self.setup_vring(index, size)?;
        }
        Ok(())
    }

    fn queue(&self, index: usize) -> Result<&TestQueue> {
        self.queues.get(index).and_then(Option::as_ref).ok_or(TestFrontendError::NoQueue(index))
    }

    fn queue_mut(&mut self, index: usize) -> Result<&mut TestQueue> {
        self.queues.get_mut(index).and_then(Option::as_mut).ok_or(TestFrontendError::NoQueue(index))
    }

    /// Reserves guest memory for a buffer.
    pub fn alloc(&mut self, len: u64) -> Result<GuestAddress> {
        self.memory.alloc(len, 8)
    }

    /// Guest memory, for filling and checking buffers.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.memory.mem
    }

    /// Writes descriptor `idx` of queue `q` verbatim (for malformed chains).
    pub fn write_desc(&self, q: usize, idx: u16, desc: Desc) -> Result<()> {
        let queue = self.queue(q)?;
        let addr = queue.desc.unchecked_add(16 * u64::from(idx));
        let mem = &self.memory.mem;
        mem.write_obj(desc.addr.to_le(), addr)?;
        mem.write_obj(desc.len.to_le(), addr.unchecked_add(8))?;
        mem.write_obj(desc.flags.to_le(), addr.unchecked_add(12))?;
        mem.write_obj(desc.next.to_le(), addr.unchecked_add(14))?;
        Ok(())
    }

    /// Puts `head` in the available ring and publishes it (no kick).
    pub fn push_avail(&mut self, q: usize, head: u16) -> Result<()> {
        let mem = &self.memory.mem;
        let queue = self.queues.get_mut(q).and_then(Option::as_mut).ok_or(TestFrontendError::NoQueue(q))?;
        let slot = u64::from(queue.avail_idx % queue.size);
        mem.write_obj(head.to_le(), queue.avail.unchecked_add(4 + 2 * slot))?;
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        mem.store(queue.avail_idx.to_le(), queue.avail.unchecked_add(2), Ordering::Release)?;
        Ok(())
    }

    /// Sets the avail ring's index to any value (for hostile-index tests).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) -> Result<()> {
        let mem = &self.memory.mem;
        let queue = self.queues.get_mut(q).and_then(Option::as_mut).ok_or(TestFrontendError::NoQueue(q))?;
        queue.avail_idx = idx;
        mem.store(idx.to_le(), queue.avail.unchecked_add(2), Ordering::Release)?;
        Ok(())
    }

    /// Builds a well-formed chain from free descriptors and makes it
    /// available (no kick). Returns the head index.
    pub fn add_chain(&mut self, q: usize, bufs: &[Buf]) -> Result<u16> {
        let queue = self.queue_mut(q)?;
        if bufs.is_empty() || queue.free.len() < bufs.len() {
            return Err(TestFrontendError::OutOfDescriptors(q, bufs.len()));
        }
        let at = queue.free.len() - bufs.len();
        let indices: Vec<u16> = queue.free.drain(at..).rev().collect();
        let head = indices[0];
        queue.chains.insert(head, indices.clone());
        for (i, buf) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let desc = Desc {
                addr: buf.addr.raw_value(),
                len: buf.len,
                flags: if buf.device_writes { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT },
                next: if last { 0 } else { indices[i + 1] },
            };
            self.write_desc(q, indices[i], desc)?;
        }
        self.push_avail(q, head)?;
        Ok(head)
    }

    /// Takes descriptors out of the free pool so hand-written chains can
    /// use them without [`TestFrontend::add_chain`] reusing them.
    pub fn reserve_descs(&mut self, q: usize, n: usize) -> Result<Vec<u16>> {
        let queue = self.queue_mut(q)?;
        if queue.free.len() < n {
            return Err(TestFrontendError::OutOfDescriptors(q, n));
        }
        let at = queue.free.len() - n;
        Ok(queue.free.drain(at..).rev().collect())
    }

    /// Notifies the back end that queue `q` has new buffers.
    pub fn kick(&self, q: usize) -> Result<()> {
        self.queue(q)?.kick.write(1).map_err(TestFrontendError::EventFd)
    }

    /// Waits up to `timeout` for the back end to signal queue `q`'s call
    /// eventfd; true if it did (the counter is consumed).
    pub fn wait_call(&self, q: usize, timeout: Duration) -> Result<bool> {
        let call = &self.queue(q)?.call;
        let mut pfd = libc::pollfd { fd: call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfd is a valid pollfd array of length 1 for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            return Err(TestFrontendError::EventFd(std::io::Error::last_os_error()));
        }
        if n == 0 {
            return Ok(false);
        }
        let _ = call.read();
        Ok(true)
    }

    /// The used ring's index as the back end last published it.
    pub fn used_idx(&self, q: usize) -> Result<u16> {
        let queue = self.queue(q)?;
        let idx: u16 = self.memory.mem.load(queue.used.unchecked_add(2), Ordering::Acquire)?;
        Ok(u16::from_le(idx))
    }

    /// Used elements published since the last call; descriptors of chains
    /// built by [`TestFrontend::add_chain`] return to the free pool.
    pub fn take_used(&mut self, q: usize) -> Result<Vec<UsedElem>> {
        let used_idx = self.used_idx(q)?;
        let mem = &self.memory.mem;
        let queue = self.queues.get_mut(q).and_then(Option::as_mut).ok_or(TestFrontendError::NoQueue(q))?;
        let mut out = Vec::new();
        while queue.last_used != used_idx {
            let slot = u64::from(queue.last_used % queue.size);
            let base = queue.used.unchecked_add(4 + 8 * slot);
            let id = u32::from_le(mem.read_obj::<u32>(base)?);
            let len = u32::from_le(mem.read_obj::<u32>(base.unchecked_add(4))?);
            if let Some(descs) = u16::try_from(id).ok().and_then(|h| queue.chains.remove(&h)) {
                queue.free.extend(descs);
            }
            out.push(UsedElem { id, len });
            queue.last_used = queue.last_used.wrapping_add(1);
        }
        // Ask for an interrupt at the next completion (used_event, read by
        // back ends that negotiated VIRTIO_RING_F_EVENT_IDX), as a driver
        // with callbacks enabled does.
        let used_event = queue.avail.unchecked_add(4 + 2 * u64::from(queue.size));
        mem.store(queue.last_used.to_le(), used_event, Ordering::Release)?;
        Ok(out)
    }

    /// Collects used elements of queue `q` until `count` arrived or
    /// `timeout` passed, waiting on the call eventfd in between.
    pub fn wait_used(&mut self, q: usize, count: usize, timeout: Duration) -> Result<Vec<UsedElem>> {
        let deadline = Instant::now() + timeout;
        let mut out = self.take_used(q)?;
        while out.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Poll in short slices too, in case a back end skips a call
            // (EVENT_IDX) or the call raced with our read.
            self.wait_call(q, left.min(Duration::from_millis(50)))?;
            out.extend(self.take_used(q)?);
        }
        Ok(out)
    }

    /// SET_LOG_BASE with a fresh, zeroed log covering all guest RAM, then
    /// SET_FEATURES with LOG_ALL added: what a front end does before
    /// copying RAM of a running guest.
    pub fn start_logging(&mut self) -> Result<()> {
        let pages = self.memory.end().div_ceil(LOG_PAGE);
        let size = pages.div_ceil(8);
        let file = memfd(c"mm-test-dirty-log", size).map_err(TestFrontendError::Log)?;
        self.send_log_base(&file, size, 0)?;
        self.log = Some((file, size));
        self.set_logging(true)
    }

    /// SET_LOG_BASE with any log (for hostile-input tests), kept by the
    /// caller.
    pub fn send_log_base(&self, file: &File, mmap_size: u64, mmap_offset: u64) -> Result<()> {
        let region = VhostUserDirtyLogRegion { mmap_size, mmap_offset, mmap_handle: file.as_raw_fd() };
        self.frontend.set_log_base(0, Some(region))?;
        Ok(())
    }

    /// SET_FEATURES with the acked features plus or minus LOG_ALL (sent
    /// whether or not a log was, for tests of a front end that forgets).
    pub fn set_logging(&mut self, on: bool) -> Result<()> {
        let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
        let features = if on { self.acked_features | log_all } else { self.acked_features & !log_all };
        self.send_features(features)
    }

    /// The acked features (LOG_ALL included when logging).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The guest-physical addresses of the pages marked in the log since
    /// the last call, which clears them (as a front end does between copy
    /// passes; our clear is not atomic, so call it while the back end is
    /// idle).
    pub fn take_dirty(&self) -> Result<Vec<u64>> {
        let (file, size) = self.log.as_ref().ok_or(TestFrontendError::NoLog)?;
        let mut bitmap = vec![0u8; *size as usize];
        file.read_exact_at(&mut bitmap, 0).map_err(TestFrontendError::Log)?;
        file.write_all_at(&vec![0u8; *size as usize], 0).map_err(TestFrontendError::Log)?;
        let mut pages = Vec::new();
        for (i, byte) in bitmap.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    pages.push((i as u64 * 8 + bit) * LOG_PAGE);
                }
            }
        }
        Ok(pages)
    }

    /// The used index up to which [`TestFrontend::take_used`] has read.
    pub fn last_used(&self, q: usize) -> Result<u16> {
        Ok(self.queue(q)?.last_used)
    }
}
