//! Lazy restore: guest RAM starts as an empty memfd and each chunk is
//! filled from the snapshot's memory file the first time anything touches
//! it, so a restored microVM runs within milliseconds whatever its size and
//! holds in host memory only what it uses.
//!
//! Who touches guest RAM, and how each touch reaches us:
//! * the vCPUs and KVM itself (on the vCPUs' behalf), and mm-vmm's own
//!   threads, through mm-vmm's mapping, which is registered with our
//!   userfaultfd in MISSING mode;
//! * each device process, through its own mapping of the same memfd. A
//!   userfaultfd belongs to one process, so each back end registers its
//!   mapping with one of its own and hands it over (vhost-user "postcopy":
//!   `POSTCOPY_ADVISE`/`LISTEN`, `SET_MEM_TABLE` answered with the back
//!   end's mapping addresses); we read its faults too. Without this a back
//!   end writing into a page not yet filled would make shmem allocate a
//!   zero page under everyone, and the guest's data there would be lost.
//!
//! A fault is answered through our own mapping: the snapshot's pages in the
//! 64 KiB chunk around it are copied in (`UFFDIO_COPY`; neighbours are
//! likely next, and one copy is cheaper than sixteen faults), or, for a
//! page the snapshot does not hold, that one page is zeroed
//! (`UFFDIO_ZEROPAGE`; a guest allocating fresh memory must not cost sixteen
//! pages a touch). The page then exists in the memfd for every process, and
//! a device's fault only needs its waiter woken. Every fill happens on the
//! one server thread, so a chunk is copied once.
//!
//! The memory file is mapped read-only and its checksums are checked before
//! the guest runs (a bad file is refused, never half-restored); pages are
//! copied from that mapping, so clones of one snapshot share its page cache.
//!
//! [`PageServer::complete`] fills every chunk the snapshot holds and stops
//! the lazy mode for mm-vmm's mapping: a snapshot of a restored VM (which
//! reads the memfd's holes as "never touched") and a suspend need it.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use userfaultfd::{Event, EventBuffer, Uffd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::memory::{self, MemoryImage, MemoryImageError};
use crate::memory::GuestRam;

/// The unit filled per fault: 16 pages.
pub const CHUNK: u64 = 64 << 10;
const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error(transparent)]
    Image(#[from] MemoryImageError),
    #[error("cannot map the memory file: {0}")]
    Map(std::io::Error),
    #[error("cannot register guest RAM with the userfaultfd: {0}")]
    Register(userfaultfd::Error),
    #[error("cannot start the page server: {0}")]
    Thread(std::io::Error),
    #[error("the page server failed: {0}")]
    Failed(String),
}

/// Where one mapping of guest RAM is: a range of some process's address
/// space holding the memfd from `file_offset` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

impl Mapping {
    /// Where guest RAM's `region` is, mapped at `addr` by some process.
    pub fn of_region(region: &vm_memory::GuestRegionMmap, addr: u64) -> Mapping {
        Mapping { addr, len: region.len(), file_offset: region.file_offset().map_or(0, |f| f.start()) }
    }

    fn offset_of(&self, addr: u64) -> Option<u64> {
        (addr >= self.addr && addr - self.addr < self.len).then(|| self.file_offset + (addr - self.addr))
    }

    fn addr_of(&self, offset: u64) -> Option<u64> {
        (offset >= self.file_offset && offset - self.file_offset < self.len)
            .then(|| self.addr + (offset - self.file_offset))
    }
}

/// Counts, for the log and the tests.
#[derive(Debug, Default)]
pub struct PageStats {
    pub vmm_faults: AtomicU64,
    pub device_faults: AtomicU64,
    pub pages_copied: AtomicU64,
    pub pages_zeroed: AtomicU64,
}

/// The snapshot's memory file, mapped read-only.
struct Source {
    base: *const u8,
    len: usize,
    /// (offset, len) of each extent the file holds, sorted.
    extents: Vec<(u64, u64)>,
}

// SAFETY: the mapping is read-only and lives as long as the Source; any
// thread may read it.
unsafe impl Send for Source {}
// SAFETY: as above.
unsafe impl Sync for Source {}

impl Drop for Source {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range and nothing borrows it now.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

impl Source {
    /// Maps `file` and checks it against `image`: long enough, every
    /// extent inside guest RAM (`ram`), every checksum right.
    fn open(file: &File, image: &MemoryImage, ram: &GuestRam) -> Result<Source, LazyError> {
        memory::checked_len(file, image)?;
        let len = image.size as usize;
        // SAFETY: a new read-only private mapping of our own fd; we check
        // the result before using it.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len.max(1), libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd(), 0)
        };
        if base == libc::MAP_FAILED {
            return Err(LazyError::Map(std::io::Error::last_os_error()));
        }
        let mut extents: Vec<(u64, u64)> = Vec::with_capacity(image.extents.len());
        // Owned from here: an error below unmaps it.
        let mut source = Source { base: base as *const u8, len: len.max(1), extents: Vec::new() };
        for extent in &image.extents {
            memory::region_of(ram, extent)?;
            // Only the mapped part of the file may be read.
            if extent.offset.saturating_add(extent.len) > image.size {
                return Err(MemoryImageError::OutOfRange { offset: extent.offset, len: extent.len }.into());
            }
            extent.check(source.bytes(extent.offset, extent.len))?;
            extents.push((extent.offset, extent.len));
        }
        extents.sort_unstable();
        source.extents = extents;
        // Reading it mapped every page in: let those mappings go (the pages
        // stay in the page cache), so this process maps only what the
        // guest has asked for since and its memory shows what it uses.
        source.release(0, source.len as u64);
        Ok(source)
    }

    fn bytes(&self, offset: u64, len: u64) -> &[u8] {
        assert!(offset + len <= self.len as u64, "read past the memory file's mapping");
        // SAFETY: inside the read-only mapping (asserted), which lives as
        // long as `self`.
        unsafe { std::slice::from_raw_parts(self.base.add(offset as usize), len as usize) }
    }

    /// Drops this process's mappings of the file's pages in `[from, to)`.
    fn release(&self, from: u64, to: u64) {
        // SAFETY: inside our own read-only private mapping, never written:
        // MADV_DONTNEED only drops page-table entries.
        unsafe {
            libc::madvise(self.base.add(from as usize) as *mut libc::c_void, (to - from) as usize, libc::MADV_DONTNEED)
        };
    }

    /// Whether the page at `offset` is in one of the extents.
    fn holds(&self, offset: u64) -> bool {
        self.pieces(offset, offset + PAGE).next().is_some()
    }

    /// The extents' parts within `[start, end)`, in order.
    fn pieces(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first = self.extents.partition_point(|&(off, len)| off + len <= start);
        self.extents[first..]
            .iter()
            .take_while(move |&&(off, _)| off < end)
            .map(move |&(off, len)| (off.max(start), (off + len).min(end)))
    }
}

/// A device process's userfaultfd and where its mappings are.
struct DeviceFaults {
    id: u64,
    kind: &'static str,
    uffd: Uffd,
    mappings: Vec<Mapping>,
    seen_fault: bool,
}

#[derive(Default)]
struct Requests {
    add: Vec<DeviceFaults>,
    forget: Vec<u64>,
    complete: bool,
    stop: bool,
}

struct Shared {
    uffd: Uffd,
    ram: Vec<Mapping>,
    source: Source,
    filled: Vec<AtomicU64>,
    requests: Mutex<Requests>,
    /// Signalled when `complete` is reached (or the server failed).
    done: Condvar,
    complete: AtomicBool,
    failure: Mutex<Option<String>>,
    wake: EventFd,
    stats: PageStats,
}

/// Serves guest RAM's missing pages from a snapshot (module doc).
pub struct PageServer {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PageServer {
    /// Checks the memory file, registers `ram` (empty, fresh) with `uffd`
    /// and starts the server thread, under the `vmm_pages` seccomp policy
    /// when `seccomp`.
    pub fn start(
        ram: &GuestRam,
        file: &File,
        image: &MemoryImage,
        uffd: Uffd,
        seccomp: bool,
    ) -> Result<PageServer, LazyError> {
        let mappings: Vec<Mapping> = ram.memory.iter().map(|r| Mapping::of_region(r, r.as_ptr() as u64)).collect();
        let source = Source::open(file, image, ram)?;
        for m in &mappings {
            uffd.register(m.addr as *mut libc::c_void, m.len as usize).map_err(LazyError::Register)?;
        }
        let chunks = mappings.iter().map(|m| m.file_offset + m.len).max().unwrap_or(0).div_ceil(CHUNK);
        let shared = Arc::new(Shared {
            uffd,
            ram: mappings,
            source,
            filled: (0..chunks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            requests: Mutex::new(Requests::default()),
            done: Condvar::new(),
            complete: AtomicBool::new(false),
            failure: Mutex::new(None),
            wake: EventFd::new(EFD_NONBLOCK).map_err(LazyError::Thread)?,
            stats: PageStats::default(),
        });
        let server = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("pages".into())
            .spawn(move || {
                if seccomp && let Err(e) = mm_policies::install(mm_policies::Policy::VmmPages) {
                    server.fail(format!("cannot install its seccomp filter: {e}"));
                    return;
                }
                if let Err(e) = server.serve() {
                    server.fail(e);
                }
            })
            .map_err(LazyError::Thread)?;
        Ok(PageServer { shared, thread: Some(thread) })
    }

    /// Whether every chunk the snapshot holds is in guest RAM and mm-vmm's
    /// mapping no longer faults to us.
    pub fn is_complete(&self) -> bool {
        self.shared.complete.load(Ordering::SeqCst)
    }

    pub fn stats(&self) -> &PageStats {
        &self.shared.stats
    }

    /// Serves a device process's faults from now on: `uffd` is its
    /// userfaultfd, `mappings` where it mapped guest RAM. Replaces an
    /// earlier registration under the same `id` (a restarted back end).
    pub fn add_device(&self, id: u64, kind: &'static str, uffd: File, mappings: Vec<Mapping>) {
        let uffd = {
            use std::os::fd::{FromRawFd, IntoRawFd};
            // SAFETY: the fd is ours (received from the back end); Uffd
            // takes over closing it.
            unsafe { Uffd::from_raw_fd(uffd.into_raw_fd()) }
        };
        let device = DeviceFaults { id, kind, uffd, mappings, seen_fault: false };
        self.request(|r| r.add.push(device));
    }

    /// Stops serving device `id` (it ended postcopy, or is gone).
    pub fn forget_device(&self, id: u64) {
        self.request(|r| r.forget.push(id));
    }

    /// Fills every chunk the snapshot holds and ends the lazy mode for
    /// mm-vmm's mapping; returns once done. Device faults are still served
    /// (as zero-filled fresh pages) until each device is forgotten.
    pub fn complete(&self) -> Result<(), LazyError> {
        if self.is_complete() {
            return Ok(());
        }
        self.request(|r| r.complete = true);
        let mut requests = self.shared.requests.lock().expect("page server lock");
        loop {
            if self.is_complete() {
                return Ok(());
            }
            if let Some(failure) = self.shared.failure.lock().expect("page server lock").clone() {
                return Err(LazyError::Failed(failure));
            }
            requests = self.shared.done.wait(requests).expect("page server lock");
        }
    }

    fn request(&self, change: impl FnOnce(&mut Requests)) {
        change(&mut self.shared.requests.lock().expect("page server lock"));
        let _ = self.shared.wake.write(1);
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.request(|r| r.stop = true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn fail(&self, why: String) {
        tracing::error!("lazy restore: the page server stopped: {why}");
        *self.failure.lock().expect("page server lock") = Some(why);
        let _guard = self.requests.lock().expect("page server lock");
        self.done.notify_all();
    }

    /// The server loop: poll our userfaultfd, the devices' and the wake-up
    /// eventfd; answer faults; apply requests.
    fn serve(&self) -> Result<(), String> {
        let mut devices: Vec<DeviceFaults> = Vec::new();
        let mut events = EventBuffer::new(64);
        loop {
            let mut fds: Vec<libc::pollfd> = [self.wake.as_raw_fd(), self.uffd.as_raw_fd()]
                .into_iter()
                .chain(devices.iter().map(|d| d.uffd.as_raw_fd()))
                .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
                .collect();
            // SAFETY: `fds` is a live array of pollfd of the length passed.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll: {e}"));
            }
            if fds[0].revents != 0 {
                let _ = self.wake.read();
                if self.apply_requests(&mut devices)? {
                    return Ok(());
                }
            }
            if fds[1].revents & libc::POLLIN != 0 {
                self.answer_own(&mut events)?;
            }
            let mut broken = Vec::new();
            for (device, pollfd) in devices.iter_mut().zip(&fds[2..]) {
                if pollfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                    broken.push(device.id);
                } else if pollfd.revents & libc::POLLIN != 0
                    && let Err(e) = self.answer_device(device, &mut events)
                {
                    tracing::warn!("lazy restore: the {} back end's faults: {e}; no longer served", device.kind);
                    broken.push(device.id);
                }
            }
            devices.retain(|d| !broken.contains(&d.id));
        }
    }

    /// Returns true when asked to stop.
    fn apply_requests(&self, devices: &mut Vec<DeviceFaults>) -> Result<bool, String> {
        let (add, forget, complete, stop) = {
            let mut r = self.requests.lock().expect("page server lock");
            (std::mem::take(&mut r.add), std::mem::take(&mut r.forget), std::mem::take(&mut r.complete), r.stop)
        };
        for device in add {
            // A hostile back end might hand over a blocking fd: never let a
            // read stall the server.
            set_nonblocking(device.uffd.as_raw_fd());
            devices.retain(|d| d.id != device.id);
            devices.push(device);
        }
        devices.retain(|d| !forget.contains(&d.id));
        if complete && !self.complete.load(Ordering::SeqCst) {
            self.fill_snapshot()?;
            for m in &self.ram {
                self.uffd.unregister(m.addr as *mut libc::c_void, m.len as usize).map_err(|e| e.to_string())?;
            }
            let s = &self.stats;
            tracing::info!(
                vmm_faults = s.vmm_faults.load(Ordering::Relaxed),
                device_faults = s.device_faults.load(Ordering::Relaxed),
                pages_copied = s.pages_copied.load(Ordering::Relaxed),
                pages_zeroed = s.pages_zeroed.load(Ordering::Relaxed),
                "lazy restore completed: every page of the snapshot is in guest RAM"
            );
            self.complete.store(true, Ordering::SeqCst);
            let _guard = self.requests.lock().expect("page server lock");
            self.done.notify_all();
        }
        Ok(stop)
    }

    fn answer_own(&self, events: &mut EventBuffer) -> Result<(), String> {
        for event in self.uffd.read_events(events).map_err(|e| format!("reading faults: {e}"))? {
            if let Event::Pagefault { addr, .. } = event.map_err(|e| format!("reading a fault: {e}"))? {
                let addr = addr as u64;
                let Some(offset) = self.ram.iter().find_map(|m| m.offset_of(addr)) else {
                    return Err(format!("a fault at {addr:#x}, outside guest RAM"));
                };
                self.stats.vmm_faults.fetch_add(1, Ordering::Relaxed);
                self.answer(offset)?;
                // Woken by the fill; again in case the page was filled
                // before this fault was read.
                let page = addr & !(PAGE - 1);
                let _ = self.uffd.wake(page as *mut libc::c_void, PAGE as usize);
            }
        }
        Ok(())
    }

    fn answer_device(&self, device: &mut DeviceFaults, events: &mut EventBuffer) -> Result<(), String> {
        let faults: Vec<u64> = device
            .uffd
            .read_events(events)
            .map_err(|e| format!("reading faults: {e}"))?
            .filter_map(|event| match event {
                Ok(Event::Pagefault { addr, .. }) => Some(Ok(addr as u64)),
                Ok(_) => None,
                Err(e) => Some(Err(format!("reading a fault: {e}"))),
            })
            .collect::<Result<_, _>>()?;
        for addr in faults {
            let Some(offset) = device.mappings.iter().find_map(|m| m.offset_of(addr)) else {
                return Err(format!("a fault at {addr:#x}, outside the guest RAM it mapped"));
            };
            self.stats.device_faults.fetch_add(1, Ordering::Relaxed);
            if !device.seen_fault {
                device.seen_fault = true;
                tracing::info!("lazy restore: serving the {} back end's faults (first at {offset:#x})", device.kind);
            }
            self.answer(offset)?;
            let page = addr & !(PAGE - 1);
            device.uffd.wake(page as *mut libc::c_void, PAGE as usize).map_err(|e| format!("waking it: {e}"))?;
        }
        Ok(())
    }

    fn fill_snapshot(&self) -> Result<(), String> {
        let chunks: Vec<u64> =
            self.source.extents.iter().flat_map(|&(off, len)| off / CHUNK..(off + len).div_ceil(CHUNK)).collect();
        for chunk in chunks {
            self.fill(chunk)?;
        }
        Ok(())
    }

    /// Makes the page at memfd offset `offset` exist: its chunk's snapshot
    /// pages copied, or the page zeroed if the snapshot does not hold it.
    fn answer(&self, offset: u64) -> Result<(), String> {
        self.fill(offset / CHUNK)?;
        let page = offset & !(PAGE - 1);
        if !self.source.holds(page) {
            let Some(mapping) = self.ram.iter().find(|m| m.addr_of(page).is_some()) else {
                return Err(format!("page {page:#x} lies outside guest RAM"));
            };
            self.zero(mapping, page, page + PAGE)?;
        }
        Ok(())
    }

    /// Copies the snapshot's pages of chunk `index` in through our mapping,
    /// unless done before.
    fn fill(&self, index: u64) -> Result<(), String> {
        let (word, bit) = ((index / 64) as usize, 1u64 << (index % 64));
        if self.filled[word].load(Ordering::Relaxed) & bit != 0 {
            return Ok(());
        }
        let start = index * CHUNK;
        let Some(mapping) = self.ram.iter().find(|m| m.addr_of(start).is_some()) else {
            return Err(format!("chunk {index} lies outside guest RAM"));
        };
        let end = (start + CHUNK).min(mapping.file_offset + mapping.len);
        for (from, to) in self.source.pieces(start, end) {
            self.copy(mapping, from, to)?;
        }
        self.filled[word].fetch_or(bit, Ordering::Relaxed);
        Ok(())
    }

    fn copy(&self, mapping: &Mapping, from: u64, to: u64) -> Result<(), String> {
        self.place(mapping, from, to, true)?;
        // The copy mapped those file pages into this process: let them go
        // again (they stay in the page cache), or mm-vmm's own memory would
        // grow by a second copy of everything the guest touched.
        self.source.release(from, to);
        self.stats.pages_copied.fetch_add((to - from) / PAGE, Ordering::Relaxed);
        Ok(())
    }

    fn zero(&self, mapping: &Mapping, from: u64, to: u64) -> Result<(), String> {
        self.place(mapping, from, to, false)?;
        self.stats.pages_zeroed.fetch_add((to - from) / PAGE, Ordering::Relaxed);
        Ok(())
    }

    /// UFFDIO_COPY (from the memory file) or UFFDIO_ZEROPAGE over memfd
    /// offsets `[from, to)`. A page that exists already (EEXIST: someone
    /// else made it) is left as it is, page by page.
    fn place(&self, mapping: &Mapping, from: u64, to: u64, copy: bool) -> Result<(), String> {
        let dst = mapping.addr_of(from).expect("inside the mapping") as *mut libc::c_void;
        let len = (to - from) as usize;
        let result = if copy {
            let src = self.source.bytes(from, to - from).as_ptr() as *const libc::c_void;
            // SAFETY: dst..dst+len is inside our registered mapping of
            // guest RAM and src..src+len inside the read-only file mapping.
            unsafe { self.uffd.copy(src, dst, len, true) }
        } else {
            // SAFETY: dst..dst+len is inside our registered mapping.
            unsafe { self.uffd.zeropage(dst, len, true) }
        };
        match result {
            Ok(_) => Ok(()),
            Err(userfaultfd::Error::CopyFailed(e) | userfaultfd::Error::ZeropageFailed(e))
                if e as i32 == libc::EEXIST && len > PAGE as usize =>
            {
                for page in (from..to).step_by(PAGE as usize) {
                    self.place(mapping, page, page + PAGE, copy)?;
                }
                Ok(())
            }
            Err(userfaultfd::Error::CopyFailed(e) | userfaultfd::Error::ZeropageFailed(e))
                if e as i32 == libc::EEXIST =>
            {
                Ok(())
            }
            Err(userfaultfd::Error::PartiallyCopied(done)) => {
                let done = (done as u64) & !(PAGE - 1);
                self.place(mapping, from + done, to, copy)
            }
            Err(e) => Err(format!("filling {from:#x}..{to:#x}: {e:?}")),
        }
    }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

#[cfg(test)]
#[path = "lazy_tests.rs"]
mod tests;
