//! The vhost-user front end: mm-vmm tells a device process where guest RAM
//! and the rings are, and hands it the eventfds KVM uses for queue
//! notifications and interrupts. After that the data path never touches
//! mm-vmm. Everything set up here is remembered, so a restarted back end can
//! be given the same state again (`reconnect`), in-flight table included.
//!
//! During a lazy restore (snapshot/lazy.rs) each back end that offers
//! PAGEFAULT is set up in vhost-user's postcopy mode: it registers its
//! mapping of guest RAM with a userfaultfd of its own and hands that over,
//! and mm-vmm's page server answers its faults. A back end that does not
//! offer it gets guest RAM only once the restore has been completed.
//!
//! While a running snapshot copies guest RAM, each back end that offers
//! it logs its own writes to guest RAM (LOG_SHMFD and `VHOST_F_LOG_ALL`)
//! into mm-vmm's device dirty log (snapshot/device_log.rs), so it can keep
//! serving the guest during the copy; one that does not is held instead.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::DeviceKind;
use crate::snapshot::lazy::{LazyError, Mapping, PageServer};

/// Protocol features we can use: config space, acknowledged requests (so
/// set-up errors surface at the step that caused them), the in-flight
/// table that makes a back-end restart lose nothing, and postcopy
/// (PAGEFAULT) for lazy restores, and a shared-memory dirty log
/// (LOG_SHMFD) for snapshots of a running VM.
const WANTED_PROTOCOL: VhostUserProtocolFeatures = VhostUserProtocolFeatures::CONFIG
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    .union(VhostUserProtocolFeatures::MQ)
    .union(VhostUserProtocolFeatures::PAGEFAULT)
    .union(VhostUserProtocolFeatures::LOG_SHMFD);

/// Names each front end to the page server, across reconnects.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
const PROTOCOL_FEATURES_BIT: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// `VHOST_F_LOG_ALL`: offered by a back end that can log its writes, acked
/// while it must. Like the protocol bit, vhost-user's own: never the guest's.
const LOG_ALL_BIT: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("vhost-user {device} back end: {step}: {source}")]
    Protocol { device: &'static str, step: &'static str, source: vhost::Error },
    #[error("vhost-user {device} back end: ring address {addr:#x} is not in guest RAM")]
    BadRingAddress { device: &'static str, addr: u64 },
    #[error("vhost-user {device} back end: the restarted back end offers features {new:#x}, not {old:#x}")]
    FeaturesChanged { device: &'static str, old: u64, new: u64 },
    #[error("vhost-user {device} back end: the snapshot's driver acked features {acked:#x} this back end lacks")]
    FeaturesMissing { device: &'static str, acked: u64 },
    #[error("vhost-user {device} back end: the snapshot has {saved} ring indices for {queues} queues")]
    BadRingBases { device: &'static str, saved: usize, queues: usize },
    #[error("vhost-user {device} back end: postcopy SET_MEM_TABLE answered without its mapping addresses")]
    NoPostcopyBases { device: &'static str },
    #[error("vhost-user {device} back end: lazy restore: {source}")]
    Lazy { device: &'static str, source: LazyError },
    #[error("vhost-user {device} back end: cannot log its writes (no LOG_SHMFD or VHOST_F_LOG_ALL)")]
    NoDirtyLog { device: &'static str },
    #[error("vhost-user {device} back end: cannot share the dirty log: {source}")]
    LogFd { device: &'static str, source: std::io::Error },
}

/// Where one queue lives, as the guest driver configured it
/// (guest-physical addresses).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSetup {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// The eventfds a device's queues are wired to: one kick per queue (a KVM
/// ioeventfd on the QueueNotify register) and one interrupt (a KVM irqfd).
pub struct QueueEvents<'a> {
    pub kicks: &'a [EventFd],
    pub call: &'a EventFd,
}

/// What the guest driver activated, kept for replay on reconnect and
/// carried in snapshots.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Activation {
    pub acked_features: u64,
    pub queues: Vec<QueueSetup>,
}

pub struct VhostUserDevice {
    kind: DeviceKind,
    frontend: Frontend,
    /// Features the back end offers, without the vhost-user-only bit.
    device_features: u64,
    backend_speaks_protocol: bool,
    protocol: VhostUserProtocolFeatures,
    config: Vec<u8>,
    inflight: Option<(VhostUserInflight, File)>,
    activation: Option<Activation>,
    /// This front end's name to the page server.
    id: u64,
    /// The lazy restore's page server, while the VM has one.
    pages: Option<Arc<PageServer>>,
    /// The back end is in postcopy mode: its faults go to `pages`.
    postcopy: bool,
    /// It offered `VHOST_F_LOG_ALL`.
    offers_log: bool,
    /// The device dirty log (memfd, size) while its writes must be logged;
    /// replayed by every set-up, as a restarted back end must log too.
    log: Option<(File, u64)>,
}

impl VhostUserDevice {
    fn err(&self, step: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError + use<> {
        let device = self.kind.name();
        move |source| FrontendError::Protocol { device, step, source }
    }

    /// Opens a session with a back end and learns what it offers.
    pub fn connect(kind: DeviceKind, stream: UnixStream) -> Result<Self, FrontendError> {
        let frontend = Frontend::from_stream(stream, kind.num_queues() as u64);
        let mut device = VhostUserDevice {
            kind,
            frontend,
            device_features: 0,
            backend_speaks_protocol: false,
            protocol: VhostUserProtocolFeatures::empty(),
            config: vec![0; kind.config_size()],
            inflight: None,
            activation: None,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            pages: None,
            postcopy: false,
            offers_log: false,
            log: None,
        };
        device.handshake()?;
        if device.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let size = kind.config_size() as u32;
            let empty = vec![0u8; kind.config_size()];
            let flags = vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE;
            let (_, config) = device.frontend.get_config(0, size, flags, &empty).map_err(device.err("GET_CONFIG"))?;
            device.config = config;
        }
        Ok(device)
    }

    fn handshake(&mut self) -> Result<(), FrontendError> {
        self.frontend.set_owner().map_err(self.err("SET_OWNER"))?;
        let features = self.frontend.get_features().map_err(self.err("GET_FEATURES"))?;
        self.backend_speaks_protocol = features & PROTOCOL_FEATURES_BIT != 0;
        self.offers_log = features & LOG_ALL_BIT != 0;
        self.device_features = features & !(PROTOCOL_FEATURES_BIT | LOG_ALL_BIT);
        if self.backend_speaks_protocol {
            let offered = self.frontend.get_protocol_features().map_err(self.err("GET_PROTOCOL_FEATURES"))?;
            self.protocol = offered & WANTED_PROTOCOL;
            self.frontend.set_protocol_features(self.protocol).map_err(self.err("SET_PROTOCOL_FEATURES"))?;
            if self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Ask for an ack on every request, so a set-up step the back
                // end rejects fails here, naming the step.
                self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        Ok(())
    }

    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// Guest RAM is being restored lazily by `pages`: this back end takes
    /// part (postcopy) when it can, or waits for the restore to complete.
    pub fn serve_faults_from(&mut self, pages: Option<Arc<PageServer>>) {
        self.pages = pages;
    }

    /// Hands guest RAM over (SET_MEM_TABLE): in postcopy mode while a lazy
    /// restore is under way and the back end can take part; otherwise the
    /// restore is completed first, so the back end never sees a page the
    /// snapshot holds as missing.
    fn set_mem_table(
        &mut self,
        mem: &GuestMemoryMmap,
        regions: &[VhostUserMemoryRegionInfo],
    ) -> Result<(), FrontendError> {
        let device = self.kind.name();
        let lazy = |source| FrontendError::Lazy { device, source };
        let pages = self.pages.clone().filter(|p| !p.is_complete());
        let Some(pages) = pages else {
            self.frontend.set_mem_table(regions).map_err(self.err("SET_MEM_TABLE"))?;
            return Ok(());
        };
        if !self.protocol.contains(VhostUserProtocolFeatures::PAGEFAULT) {
            tracing::info!(
                "the {device} back end does not offer PAGEFAULT: completing the lazy restore before it starts"
            );
            pages.complete().map_err(lazy)?;
            self.frontend.set_mem_table(regions).map_err(self.err("SET_MEM_TABLE"))?;
            return Ok(());
        }
        let uffd = self.frontend.postcopy_advise().map_err(self.err("POSTCOPY_ADVISE"))?;
        self.frontend.postcopy_listen().map_err(self.err("POSTCOPY_LISTEN"))?;
        let bases = self
            .frontend
            .set_mem_table(regions)
            .map_err(self.err("SET_MEM_TABLE (postcopy)"))?
            .filter(|b| b.len() == regions.len())
            .ok_or(FrontendError::NoPostcopyBases { device })?;
        let mappings = mem.iter().zip(bases).map(|(region, base)| Mapping::of_region(region, base)).collect();
        pages.add_device(self.id, device, uffd, mappings);
        self.frontend.postcopy_ack_mem_regions(FrontendReq::SET_MEM_TABLE).map_err(self.err("postcopy ack"))?;
        self.postcopy = true;
        Ok(())
    }

    /// Ends postcopy for this back end once the lazy restore is complete:
    /// its later set-ups are ordinary ones.
    fn end_postcopy(&mut self) -> Result<(), FrontendError> {
        if !self.postcopy {
            return Ok(());
        }
        let device = self.kind.name();
        if let Some(pages) = &self.pages {
            pages.complete().map_err(|source| FrontendError::Lazy { device, source })?;
        }
        self.frontend.postcopy_end().map_err(self.err("POSTCOPY_END"))?;
        if let Some(pages) = &self.pages {
            pages.forget_device(self.id);
        }
        self.postcopy = false;
        Ok(())
    }

    /// Features to offer the guest driver.
    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// The device's config space, as the back end reported it.
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// Gives the back end guest RAM, the in-flight table and the rings, and
    /// starts them. `base` returns, per queue (index, set-up), the ring index to start at.
    fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        memfd: &File,
        activation: &Activation,
        events: &QueueEvents,
        base: impl Fn(usize, &QueueSetup) -> u16,
    ) -> Result<(), FrontendError> {
        let features = self.backend_features(activation);
        self.frontend.set_features(features & !LOG_ALL_BIT).map_err(self.err("SET_FEATURES"))?;

        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(|region| VhostUserMemoryRegionInfo {
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                mmap_offset: region.file_offset().map(|f| f.start()).unwrap_or(0),
                mmap_handle: memfd.as_raw_fd(),
            })
            .collect();
        self.set_mem_table(mem, &regions)?;
        // After the memory table: a back end builds its log over the
        // regions it has, and a new table drops the old log. LOG_ALL only
        // once it has the log (a back end refuses it without one).
        self.hand_over_log(activation)?;

        if self.protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            match &self.inflight {
                Some((info, file)) => {
                    let fd = file.as_raw_fd();
                    self.frontend.set_inflight_fd(info, fd).map_err(self.err("SET_INFLIGHT_FD"))?;
                }
                None => {
                    let queue_size = activation.queues.iter().map(|q| q.size).max().unwrap_or(0);
                    let request = VhostUserInflight::new(0, 0, activation.queues.len() as u16, queue_size);
                    let (info, file) = self.frontend.get_inflight_fd(&request).map_err(self.err("GET_INFLIGHT_FD"))?;
                    // The spec (and QEMU) hand the table straight back, so
                    // the back end tracks into the region we keep.
                    self.frontend.set_inflight_fd(&info, file.as_raw_fd()).map_err(self.err("SET_INFLIGHT_FD"))?;
                    self.inflight = Some((info, file));
                }
            }
        }

        for (index, queue) in activation.queues.iter().enumerate() {
            if queue.size == 0 {
                continue;
            }
            let host = |addr: u64| {
                mem.get_host_address(GuestAddress(addr))
                    .map(|p| p as u64)
                    .map_err(|_| FrontendError::BadRingAddress { device: self.kind.name(), addr })
            };
            let ring = VringConfigData {
                queue_max_size: super::MAX_QUEUE_SIZE,
                queue_size: queue.size,
                flags: 0,
                desc_table_addr: host(queue.desc)?,
                used_ring_addr: host(queue.used)?,
                avail_ring_addr: host(queue.avail)?,
                log_addr: None,
            };
            self.frontend.set_vring_num(index, queue.size).map_err(self.err("SET_VRING_NUM"))?;
            self.frontend.set_vring_addr(index, &ring).map_err(self.err("SET_VRING_ADDR"))?;
            self.frontend.set_vring_base(index, base(index, queue)).map_err(self.err("SET_VRING_BASE"))?;
            self.frontend.set_vring_call(index, events.call).map_err(self.err("SET_VRING_CALL"))?;
            self.frontend.set_vring_kick(index, &events.kicks[index]).map_err(self.err("SET_VRING_KICK"))?;
            if self.backend_speaks_protocol {
                self.frontend.set_vring_enable(index, true).map_err(self.err("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// What SET_FEATURES says: the driver's features this back end offers,
    /// plus vhost-user's own bits (protocol features; LOG_ALL while its
    /// writes are logged).
    fn backend_features(&self, activation: &Activation) -> u64 {
        let mut features = activation.acked_features & self.device_features;
        if self.backend_speaks_protocol {
            features |= PROTOCOL_FEATURES_BIT;
        }
        if self.log.is_some() {
            features |= LOG_ALL_BIT;
        }
        features
    }

    /// While logging: the log (SET_LOG_BASE), then `LOG_ALL` acked with
    /// the activation's features — in that order, as a back end refuses
    /// `LOG_ALL` without a log for its memory table. Nothing otherwise.
    fn hand_over_log(&mut self, activation: &Activation) -> Result<(), FrontendError> {
        let Some((file, size)) = &self.log else { return Ok(()) };
        let region = VhostUserDirtyLogRegion { mmap_size: *size, mmap_offset: 0, mmap_handle: file.as_raw_fd() };
        self.frontend.set_log_base(0, Some(region)).map_err(self.err("SET_LOG_BASE"))?;
        let features = self.backend_features(activation);
        self.frontend.set_features(features).map_err(self.err("SET_FEATURES (LOG_ALL)"))
    }

    /// Whether the back end can log its writes to guest RAM.
    pub fn can_log(&self) -> bool {
        self.offers_log && self.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD)
    }

    /// From now on the back end logs every page of guest RAM it writes
    /// into `log` (`size` bytes, one bit per guest-physical page): the
    /// log's memfd (SET_LOG_BASE), then `VHOST_F_LOG_ALL` (SET_FEATURES),
    /// now if the device runs, else when it is started; and again after a
    /// restart of the back end.
    pub fn start_logging(&mut self, log: &File, size: u64) -> Result<(), FrontendError> {
        let device = self.kind.name();
        if !self.can_log() {
            return Err(FrontendError::NoDirtyLog { device });
        }
        let file = log.try_clone().map_err(|source| FrontendError::LogFd { device, source })?;
        self.log = Some((file, size));
        let Some(activation) = self.activation.clone() else { return Ok(()) };
        let result = self.hand_over_log(&activation);
        if result.is_err() {
            self.log = None;
        }
        result
    }

    /// The back end's writes need no logging any more: SET_FEATURES
    /// without `VHOST_F_LOG_ALL` (vhost-user has no message that takes the
    /// log back; a back end may go on marking it, which costs nothing).
    pub fn stop_logging(&mut self) -> Result<(), FrontendError> {
        if self.log.take().is_none() {
            return Ok(());
        }
        let Some(activation) = self.activation.clone() else { return Ok(()) };
        let features = self.backend_features(&activation);
        self.frontend.set_features(features).map_err(self.err("SET_FEATURES (LOG_ALL off)"))
    }

    /// The guest driver set DRIVER_OK: start the device.
    pub fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        memfd: &File,
        acked_features: u64,
        queues: &[QueueSetup],
        events: &QueueEvents,
    ) -> Result<(), FrontendError> {
        let activation = Activation { acked_features, queues: queues.to_vec() };
        if let Err(e) = self.start(mem, memfd, &activation, events, |_, _| 0) {
            // Rings set up before the failing step may be running, and with
            // no activation recorded the guest's reset would not stop them:
            // the back end would go on using rings in memory the guest has
            // taken back (found by the mmio_transport fuzz target).
            self.stop_rings(activation.queues.len());
            return Err(e);
        }
        self.activation = Some(activation);
        Ok(())
    }

    /// Stops rings `0..count` (GET_VRING_BASE stops a ring in vhost-user).
    /// Errors are ignored: a ring never started answers too, and a back end
    /// that is gone runs nothing.
    fn stop_rings(&mut self, count: usize) {
        for index in 0..count {
            let _ = self.frontend.get_vring_base(index);
        }
    }

    /// Replaces a back end that died: a fresh session over `stream`, then
    /// the same features, memory, in-flight table and rings. Each ring
    /// resumes at the used index the guest can see; requests that were in
    /// flight are resubmitted by the back end from the in-flight table.
    pub fn reconnect(
        &mut self,
        stream: UnixStream,
        mem: &GuestMemoryMmap,
        memfd: &File,
        events: &QueueEvents,
    ) -> Result<(), FrontendError> {
        let old_features = self.device_features;
        self.frontend = Frontend::from_stream(stream, self.kind.num_queues() as u64);
        // The dead back end's userfaultfd goes with it; the new one hands
        // over its own (same id) if the restore is still lazy.
        self.postcopy = false;
        self.handshake()?;
        if self.device_features != old_features {
            return Err(FrontendError::FeaturesChanged {
                device: self.kind.name(),
                old: old_features,
                new: self.device_features,
            });
        }
        let Some(activation) = self.activation.clone() else {
            return Ok(()); // the driver had not started the device yet
        };
        self.start(mem, memfd, &activation, events, |_, q| used_index(mem, q))?;
        // The old back end may have died between publishing a used element
        // and raising the interrupt, and the new one has nothing to complete
        // for it: raise one now. A spurious interrupt costs the driver a
        // look at its rings; a lost one would hang it.
        let _ = events.call.write(1);
        Ok(())
    }

    /// What the driver activated, if it has.
    pub fn activation(&self) -> Option<&Activation> {
        self.activation.as_ref()
    }

    /// Stops every ring of an activated device (GET_VRING_BASE: the back
    /// end finishes what it holds, stops, and says where each ring stands)
    /// and returns, per queue, the avail index to resume at. The block
    /// back end answers only once its worker has completed every request
    /// it took, so nothing more lands in guest memory after this.
    pub fn quiesce(&mut self) -> Result<Vec<u16>, FrontendError> {
        let Some(activation) = &self.activation else { return Ok(Vec::new()) };
        let mut bases = Vec::with_capacity(activation.queues.len());
        for (index, queue) in activation.queues.clone().iter().enumerate() {
            if queue.size == 0 {
                bases.push(0);
                continue;
            }
            let base = self.frontend.get_vring_base(index).map_err(self.err("GET_VRING_BASE"))?;
            bases.push(base as u16);
        }
        // A snapshot reads the memfd's holes as never touched: every page
        // must be in by then, and the back end out of postcopy.
        self.end_postcopy()?;
        Ok(bases)
    }

    /// Starts the rings again at `bases` (from [`Self::quiesce`]), replaying
    /// the set-up as a reconnect does.
    pub fn resume(
        &mut self,
        mem: &GuestMemoryMmap,
        memfd: &File,
        bases: &[u16],
        events: &QueueEvents,
    ) -> Result<(), FrontendError> {
        let Some(activation) = self.activation.clone() else { return Ok(()) };
        if bases.len() != activation.queues.len() {
            return Err(FrontendError::BadRingBases {
                device: self.kind.name(),
                saved: bases.len(),
                queues: activation.queues.len(),
            });
        }
        self.start(mem, memfd, &activation, events, |index, _| bases[index])?;
        let _ = events.call.write(1);
        // And one kick per ring: the guest may have queued requests while
        // the rings were stopped (a running snapshot lets its vCPUs run
        // then) whose kick the stopped back end never read, or, restored,
        // whose kick went to the old VM's eventfd. A spurious kick costs
        // the back end a look at its avail ring; a lost one stalls the
        // queue until the guest happens to kick again.
        for (kick, queue) in events.kicks.iter().zip(&activation.queues) {
            if queue.size != 0 {
                let _ = kick.write(1);
            }
        }
        Ok(())
    }

    /// A fresh back end takes over a restored guest's device: the driver's
    /// activation from the snapshot, each ring at its saved index.
    pub fn restore(
        &mut self,
        activation: Activation,
        bases: &[u16],
        mem: &GuestMemoryMmap,
        memfd: &File,
        events: &QueueEvents,
    ) -> Result<(), FrontendError> {
        if activation.acked_features & !(self.device_features | super::VIRTIO_F_VERSION_1) != 0 {
            return Err(FrontendError::FeaturesMissing { device: self.kind.name(), acked: activation.acked_features });
        }
        self.activation = Some(activation);
        self.resume(mem, memfd, bases, events)
    }

    /// The guest reset the device: stop every ring (GET_VRING_BASE stops a
    /// ring in vhost-user) and forget the activation.
    pub fn reset(&mut self) {
        if let Some(activation) = self.activation.take() {
            self.stop_rings(activation.queues.len());
        }
        self.inflight = None;
    }
}

/// The used ring's index as the guest sees it: everything before it is
/// done, whatever the back end that died had or had not finished.
fn used_index(mem: &GuestMemoryMmap, queue: &QueueSetup) -> u16 {
    use vm_memory::Bytes;
    mem.read_obj::<u16>(GuestAddress(queue.used + 2)).map(u16::from_le).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::{FakeBackend, Offer};
    use crate::snapshot::device_log::DeviceLog;
    use crate::virtio::VIRTIO_F_VERSION_1;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// Regression (found by the mmio_transport fuzz target): an activation
    /// failing at its second ring left the first one running, and the
    /// guest's reset then stopped nothing.
    #[test]
    fn failed_activation_stops_the_rings_it_started() {
        let kind = DeviceKind::Net;
        let (backend, stream) = FakeBackend::spawn(Offer::full(kind), kind.num_queues());
        let mut dev = VhostUserDevice::connect(kind, stream).unwrap();
        let (mem, memfd) = crate::fuzzing::guest_ram();
        let kicks = [EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap()];
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let events = QueueEvents { kicks: &kicks, call: &call };
        let good = QueueSetup { size: 256, desc: 0, avail: 0x1000, used: 0x2000 };
        let outside = QueueSetup { desc: 0x10_0000, ..good };
        let err = dev.activate(mem, memfd, 0, &[good, outside], &events).unwrap_err();
        assert!(matches!(err, FrontendError::BadRingAddress { .. }), "{err}");
        assert_eq!(dev.activation(), None);
        assert_eq!(backend.settle().started, vec![false, false], "ring 0 left running");
        drop(dev);
        backend.finish();
    }

    fn events_for(kind: DeviceKind) -> (Vec<EventFd>, EventFd) {
        let kicks = (0..kind.num_queues()).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
        (kicks, EventFd::new(EFD_NONBLOCK).unwrap())
    }

    /// The device dirty log reaches a back end that can log after its
    /// memory table (its log is built over the regions it has), with
    /// LOG_ALL acked; a restarted back end is given it again, or its
    /// writes during the copy would be lost; turning it off acks without
    /// LOG_ALL; and LOG_ALL, vhost-user's own bit, never reaches the guest.
    #[test]
    fn a_logging_back_end_gets_the_log_after_its_memory_and_again_after_a_restart() {
        let kind = DeviceKind::Block;
        let (backend, stream) = FakeBackend::spawn(Offer::logging(kind), kind.num_queues());
        let mut dev = VhostUserDevice::connect(kind, stream).unwrap();
        assert!(dev.can_log());
        assert_eq!(dev.device_features() & LOG_ALL_BIT, 0, "LOG_ALL offered to the guest driver");
        let (mem, memfd) = crate::fuzzing::guest_ram();
        let log = DeviceLog::new(0x1_0000).unwrap();
        let (kicks, call) = events_for(kind);
        let events = QueueEvents { kicks: &kicks, call: &call };
        let queue = QueueSetup { size: 256, desc: 0, avail: 0x1000, used: 0x2000 };

        // Logging asked for before the driver starts the device: the log
        // goes with its set-up.
        dev.start_logging(log.file(), log.size()).unwrap();
        assert_eq!(backend.settle().log_bases, 0, "a log sent to a device with no memory table");
        dev.activate(mem, memfd, VIRTIO_F_VERSION_1, &[queue], &events).unwrap();
        {
            let session = backend.settle();
            assert_eq!((session.log_bases, session.log_size), (1, Some(log.size())));
            assert_ne!(session.acked_features & LOG_ALL_BIT, 0, "LOG_ALL not acked while logging");
        }

        // The back end dies and a new one takes over while logging.
        let (restarted, stream) = FakeBackend::spawn(Offer::logging(kind), kind.num_queues());
        dev.reconnect(stream, mem, memfd, &events).unwrap();
        {
            let session = restarted.settle();
            assert_eq!(session.log_bases, 1, "the restarted back end was not given the log");
            assert_ne!(session.acked_features & LOG_ALL_BIT, 0);
        }

        dev.stop_logging().unwrap();
        assert_eq!(restarted.settle().acked_features & LOG_ALL_BIT, 0, "LOG_ALL still acked");
        // Started again on a running device: the log, then LOG_ALL.
        dev.start_logging(log.file(), log.size()).unwrap();
        {
            let session = restarted.settle();
            assert_eq!(session.log_bases, 2);
            assert_ne!(session.acked_features & LOG_ALL_BIT, 0);
        }
        drop(dev);
        backend.finish();
        restarted.finish();
    }

    #[test]
    fn a_back_end_that_cannot_log_is_never_sent_a_log() {
        let kind = DeviceKind::Net;
        let (backend, stream) = FakeBackend::spawn(Offer::full(kind), kind.num_queues());
        let mut dev = VhostUserDevice::connect(kind, stream).unwrap();
        assert!(!dev.can_log());
        let log = DeviceLog::new(0x1_0000).unwrap();
        let err = dev.start_logging(log.file(), log.size()).unwrap_err();
        assert!(matches!(err, FrontendError::NoDirtyLog { .. }), "{err}");
        let (mem, memfd) = crate::fuzzing::guest_ram();
        let (kicks, call) = events_for(kind);
        let events = QueueEvents { kicks: &kicks, call: &call };
        let queue = QueueSetup { size: 256, desc: 0, avail: 0x1000, used: 0x2000 };
        dev.activate(mem, memfd, VIRTIO_F_VERSION_1, &[queue, queue], &events).unwrap();
        assert_eq!(backend.settle().log_bases, 0);
        drop(dev);
        backend.finish();
    }
}
