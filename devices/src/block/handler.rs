//! The vhost-user request handler for block, our own rather than the
//! `vhost-user-backend` crate's, which answers the in-flight messages with
//! "not supported" (DESIGN.md, "Wire protocols").
//!
//! Every message that changes ring or memory state first stops the worker
//! (getting the rings back), applies the change, then starts a worker again
//! for whichever rings can run. Control messages are rare, so a thread
//! restart each time costs nothing and keeps the data path lock-free.
//! The exception is SET_FEATURES toggling only VHOST_F_LOG_ALL: logging is
//! switched under the running worker (see `dirty_log`), because the front
//! end turns it on while the guest runs and must not stall the disk.

use std::fs::File;
use std::sync::Arc;

use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight, VhostUserLog,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut};

use super::BlockStats;
use super::config::{self, MAX_QUEUE_SIZE, NUM_QUEUES};
use super::dirty_log::{DirtyLog, DirtyLogError, LogMap};
use super::execute::BlockDisk;
use super::inflight::InflightTable;
use super::memory::MemoryTable;
use super::postcopy::Postcopy;
use super::vring::{Hooks, RingAddrs, Vring};
use super::worker::{Worker, WorkerContext};

fn io_err(e: impl std::fmt::Display) -> VuError {
    VuError::ReqHandlerError(std::io::Error::other(e.to_string()))
}

/// State of one vhost-user session with the block device.
pub struct BlockHandler {
    disk: Arc<BlockDisk>,
    acked_features: u64,
    acked_protocol: VhostUserProtocolFeatures,
    memory: Option<MemoryTable>,
    inflight: Option<Arc<InflightTable>>,
    /// The rings; empty while a worker owns them.
    vrings: Vec<Vring>,
    worker: Option<Worker>,
    hooks: Hooks,
    stats: Arc<BlockStats>,
    /// `mm-device --lazy-memory`: PAGEFAULT is offered (see `postcopy`).
    lazy_memory: bool,
    postcopy: Postcopy,
    /// The log every region's bitmap marks (on while LOG_ALL is acked and
    /// a log is mapped); shared with every memory table of the session.
    log: Arc<DirtyLog>,
    /// The last usable SET_LOG_BASE's log; dropped when LOG_ALL goes off.
    log_map: Option<Arc<LogMap>>,
    /// Why the last SET_LOG_BASE was refused, until a usable one arrives.
    log_refused: Option<String>,
    /// The message that just failed was refused without ending the
    /// session (see [`BlockHandler::take_survivable`]).
    survivable: bool,
}

impl BlockHandler {
    pub fn new(disk: Arc<BlockDisk>, hooks: Hooks, stats: Arc<BlockStats>, lazy_memory: bool) -> Self {
        BlockHandler {
            disk,
            acked_features: 0,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            memory: None,
            inflight: None,
            vrings: (0..NUM_QUEUES).map(|_| Vring::new()).collect(),
            worker: None,
            hooks,
            stats,
            lazy_memory,
            postcopy: Postcopy::default(),
            log: Arc::default(),
            log_map: None,
            log_refused: None,
            survivable: false,
        }
    }

    /// Whether the request that just failed was a refusal the front end
    /// was told about (a NACK) and the session goes on: a LOG_ALL with no
    /// usable log. Cleared by asking.
    pub fn take_survivable(&mut self) -> bool {
        std::mem::take(&mut self.survivable)
    }

    fn log_all(features: u64) -> bool {
        features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0
    }

    /// Maps SET_LOG_BASE's log and checks it covers all guest memory
    /// mapped now (a postcopy table waiting for its ack included).
    fn map_log(&self, log: &VhostUserLog, file: File) -> Result<Arc<LogMap>, DirtyLogError> {
        let map = LogMap::map(log, file)?;
        let tables = self.memory.iter().chain(self.postcopy.pending());
        map.check_covers(tables.flat_map(|t| t.guest_ranges()))?;
        Ok(Arc::new(map))
    }

    fn protocol_acked(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Takes the rings back from the worker, if one runs.
    pub fn stop_worker(&mut self) -> VuResult<()> {
        if let Some(worker) = self.worker.take() {
            match worker.stop() {
                Ok(vrings) => self.vrings = vrings,
                Err(e) => {
                    // The rings are gone with the thread: nothing can be
                    // served on this session any more.
                    self.vrings = (0..NUM_QUEUES).map(|_| Vring::new()).collect();
                    return Err(io_err(e));
                }
            }
        }
        Ok(())
    }

    /// Starts a worker for every ring that is started and enabled.
    fn start_worker(&mut self) -> VuResult<()> {
        debug_assert!(self.worker.is_none());
        let Some(memory) = &self.memory else { return Ok(()) };
        if self.hooks.crashed() {
            return Ok(()); // a "killed" back end serves nothing more
        }
        let protocol = self.protocol_acked();
        let runnable: Vec<bool> = self.vrings.iter().map(|v| v.started && (v.enabled || !protocol)).collect();
        if !runnable.contains(&true) {
            return Ok(());
        }
        let ctx = WorkerContext {
            mem: Arc::clone(&memory.mem),
            disk: Arc::clone(&self.disk),
            indirect: config::indirect_enabled(self.acked_features),
            runnable,
            hooks: self.hooks.clone(),
            stats: Arc::clone(&self.stats),
        };
        match Worker::spawn(std::mem::take(&mut self.vrings), ctx) {
            Ok(worker) => {
                self.worker = Some(worker);
                Ok(())
            }
            Err((vrings, e)) => {
                self.vrings = vrings;
                Err(io_err(e))
            }
        }
    }

    /// Stops the worker, applies `change`, and restarts the worker.
    fn with_rings_stopped<T>(&mut self, change: impl FnOnce(&mut Self) -> VuResult<T>) -> VuResult<T> {
        self.stop_worker()?;
        let result = change(self);
        self.start_worker()?;
        result
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        self.vrings.get_mut(index as usize).ok_or(VuError::InvalidParam)
    }

    /// Starts ring `index` if it has everything it needs and is not running.
    fn try_start(&mut self, index: usize) -> VuResult<()> {
        let event_idx = config::event_idx_enabled(self.acked_features);
        let inflight_on = self.acked_protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        let Some(memory) = &self.memory else { return Ok(()) };
        let inflight = self.inflight.clone();
        let vring = &mut self.vrings[index];
        if vring.started || vring.kick.is_none() || vring.addrs.is_none() || vring.size == 0 {
            return Ok(());
        }
        vring.inflight = match (&inflight, inflight_on) {
            (Some(table), true) => {
                let q = table.queue(index as u16, vring.size);
                if q.is_none() {
                    tracing::warn!(index, "block: in-flight table too small for the ring; not tracking");
                }
                q
            }
            _ => None,
        };
        vring.start(memory, event_idx).map_err(|e| {
            tracing::error!(index, "block: cannot start ring: {e}");
            io_err(e)
        })
    }

    /// Makes `table` the memory the rings use, and starts every ring that
    /// only waited for memory.
    fn publish(&mut self, table: MemoryTable) -> VuResult<()> {
        // A log in place must cover the new memory, or writes there would
        // go unlogged (a front end that grows RAM sends a larger log first).
        if let Some(log) = &self.log_map {
            log.check_covers(table.guest_ranges()).map_err(|e| {
                tracing::error!("block: memory table refused: {e}");
                io_err(e)
            })?;
        }
        self.with_rings_stopped(|this| {
            this.memory = Some(table);
            this.resolve_started()?;
            for index in 0..this.vrings.len() {
                this.try_start(index)?;
            }
            Ok(())
        })
    }

    /// Re-points running rings at a new memory table.
    fn resolve_started(&mut self) -> VuResult<()> {
        let event_idx = config::event_idx_enabled(self.acked_features);
        let Some(memory) = &self.memory else { return Ok(()) };
        for vring in self.vrings.iter_mut().filter(|v| v.started) {
            vring.resolve(memory, event_idx).map_err(io_err)?;
        }
        Ok(())
    }
}

impl Drop for BlockHandler {
    fn drop(&mut self) {
        let _ = self.stop_worker();
    }
}

impl VhostUserBackendReqHandlerMut for BlockHandler {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.stop_worker()?;
        let (disk, hooks, stats) = (Arc::clone(&self.disk), self.hooks.clone(), Arc::clone(&self.stats));
        self.log.set(None);
        *self = BlockHandler::new(disk, hooks, stats, self.lazy_memory);
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.reset_owner()
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(config::device_features(self.disk.image.read_only()))
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !config::device_features(self.disk.image.read_only()) != 0 {
            return Err(VuError::InvalidParam);
        }
        let log_all = Self::log_all(features);
        if log_all && self.log_map.is_none() {
            // Acking LOG_ALL with nothing to log to would let the front end
            // believe our writes are logged. REPLY_ACK tells it; the
            // session goes on without logging.
            let why = self.log_refused.as_deref().unwrap_or("no SET_LOG_BASE before it");
            tracing::error!("block: SET_FEATURES with LOG_ALL refused: no usable dirty log ({why})");
            self.survivable = true;
            return Err(io_err(format!("LOG_ALL without a usable dirty log: {why}")));
        }
        // Logging on or off takes effect for every write that finishes from
        // now on, the worker running or not.
        self.log.set(if log_all { self.log_map.clone() } else { None });
        if !log_all {
            self.log_map = None;
        }
        let writethrough = !config::flush_enabled(features);
        self.disk.writethrough.store(writethrough, std::sync::atomic::Ordering::Relaxed);
        let log_bit = VhostUserVirtioFeatures::LOG_ALL.bits();
        if (features ^ self.acked_features) & !log_bit == 0 {
            // Only LOG_ALL changed (or nothing): the driver sees nothing of
            // it, so the rings keep running.
            self.acked_features = features;
            return Ok(());
        }
        self.with_rings_stopped(|this| {
            this.acked_features = features;
            Ok(())
        })
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening == Some(true) {
            // Registered now, published (and the rings started) only at the
            // front end's ack: see `postcopy`.
            return self.postcopy.map_pending(regions, files, &self.log).map(Some).map_err(io_err);
        }
        let table = MemoryTable::map(regions, files, &self.log).map_err(io_err)?;
        self.postcopy.discard_pending();
        self.publish(table)?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let size = u16::try_from(num).map_err(|_| VuError::InvalidParam)?;
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(VuError::InvalidParam);
        }
        self.with_rings_stopped(|this| {
            this.vring(index)?.size = size;
            Ok(())
        })
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        if let Some(memory) = &self.memory
            && [descriptor, used, available].iter().any(|&va| memory.va_to_guest(va).is_none())
        {
            return Err(VuError::InvalidParam);
        }
        self.with_rings_stopped(|this| {
            this.vring(index)?.addrs = Some(RingAddrs { desc: descriptor, avail: available, used });
            Ok(())
        })
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let base = u16::try_from(base).map_err(|_| VuError::InvalidParam)?;
        self.with_rings_stopped(|this| {
            this.vring(index)?.base = base;
            Ok(())
        })
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.with_rings_stopped(|this| {
            let next = this.vring(index)?.stop();
            Ok(VhostUserVringState::new(index, u32::from(next)))
        })
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.with_rings_stopped(|this| {
            let vring = this.vring(u32::from(index))?;
            match fd {
                // A new kick fd for a running ring changes nothing else.
                Some(fd) if vring.started => vring.kick = Some(fd),
                Some(fd) => {
                    vring.kick = Some(fd);
                    this.try_start(usize::from(index))?;
                }
                // No fd means "poll the ring", which this back end does not
                // do: the ring stops, remembering where it was.
                None => {
                    vring.stop();
                }
            }
            Ok(())
        })
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.with_rings_stopped(|this| {
            this.vring(u32::from(index))?.call = fd;
            Ok(())
        })
    }

    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> VuResult<()> {
        Ok(()) // errors are reported per request, in the status byte
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(config::protocol_features(self.lazy_memory))
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let offered = config::protocol_features(self.lazy_memory);
        self.acked_protocol = VhostUserProtocolFeatures::from_bits_truncate(features) & offered;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(NUM_QUEUES as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.with_rings_stopped(|this| {
            this.vring(index)?.enabled = enable;
            Ok(())
        })
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        let space = config::config_space(self.disk.image.capacity_sectors());
        let start = offset as usize;
        let end = start.checked_add(size as usize).ok_or(VuError::InvalidParam)?;
        space.get(start..end).map(<[u8]>::to_vec).ok_or(VuError::InvalidParam)
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        Ok(()) // nothing in our config space is writable (no CONFIG_WCE): writes are ignored
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(&mut self, inflight: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        let (table, file, info) = InflightTable::create(inflight.num_queues, inflight.queue_size).map_err(io_err)?;
        // Use it at once too: the spec has the front end send it back with
        // SET_INFLIGHT_FD, but a front end that only asks (as mm-vmm does
        // on first start) still gets tracking.
        self.with_rings_stopped(|this| {
            this.inflight = Some(table);
            Ok(())
        })?;
        Ok((info, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        let table = InflightTable::map(inflight, file).map_err(io_err)?;
        self.with_rings_stopped(|this| {
            this.inflight = Some(table);
            Ok(())
        })
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Err(VuError::InvalidOperation("CONFIGURE_MEM_SLOTS not offered"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        Err(VuError::InvalidOperation("CONFIGURE_MEM_SLOTS not offered"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        Err(VuError::InvalidOperation("CONFIGURE_MEM_SLOTS not offered"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation("DEVICE_STATE not offered"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation("DEVICE_STATE not offered"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("SHMEM not offered"))
    }

    /// SET_LOG_BASE (the vhost crate has checked LOG_SHMFD was acked and
    /// replies once this returns Ok). The reply only says the message was
    /// processed: the spec gives it no way to say "refused". So a log that
    /// cannot be used (past the end of its file, too small for guest
    /// memory, unmappable) is answered too, logged as an error, and
    /// logging stops; the refusal reaches the front end as the NACK of its
    /// next SET_FEATURES with LOG_ALL, and the session goes on.
    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        match self.map_log(log, file) {
            Ok(map) => {
                tracing::info!(size = log.mmap_size, covered = map.covered(), "block: dirty log mapped");
                if Self::log_all(self.acked_features) {
                    self.log.set(Some(Arc::clone(&map)));
                }
                self.log_map = Some(map);
                self.log_refused = None;
            }
            Err(e) => {
                tracing::error!("block: SET_LOG_BASE refused, not logging: {e}");
                self.log.set(None);
                self.log_map = None;
                self.log_refused = Some(e.to_string());
            }
        }
        Ok(())
    }

    fn postcopy_advice(&mut self) -> VuResult<File> {
        // The vhost crate checks that the front end acked PAGEFAULT, but not
        // that we offered it: without --lazy-memory the jail has no
        // /dev/userfaultfd, and trying would end in the seccomp filter.
        if !self.acked_protocol.contains(VhostUserProtocolFeatures::PAGEFAULT) {
            return Err(VuError::InvalidOperation("PAGEFAULT not offered (mm-device runs without --lazy-memory)"));
        }
        self.postcopy.advise().map_err(|e| {
            tracing::error!("block: POSTCOPY_ADVISE: {e}");
            io_err(e)
        })
    }

    fn postcopy_listen(&mut self) -> VuResult<()> {
        self.postcopy.listen().map_err(io_err)
    }

    fn postcopy_end(&mut self) -> VuResult<()> {
        match self.postcopy.end() {
            Some(table) => self.publish(table),
            None => Ok(()),
        }
    }

    fn postcopy_ack_mem_regions(&mut self) -> VuResult<()> {
        let table = self.postcopy.take_pending().map_err(io_err)?;
        self.publish(table)
    }
}
