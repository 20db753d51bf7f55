//! The vhost-user side of the vsock device: rx (0), tx (1) and event (2)
//! queues, and the muxer's epoll nested in the daemon's, all on the
//! daemon's single worker thread.
//!
//! tx: every chain is one guest packet, copied out of guest memory and
//! handed to the muxer. rx: while the muxer has packets and the guest has
//! buffers, each buffer gets one packet; host data is read only then, so
//! a guest that posts no buffers costs nothing and loses nothing.
//!
//! event: used once at most, for a guest restored from a snapshot
//! (`--transport-reset`): its driver still believes in connections this
//! fresh process never had, and its CID may have changed. One
//! VIRTIO_VSOCK_EVENT_TRANSPORT_RESET makes it reset those sockets (its
//! listeners stay) and re-read the CID from config space, as Firecracker
//! does on restore. The buffers it is written into were posted by the
//! driver at probe, before the snapshot, so it goes out as soon as the
//! restored event ring runs, without waiting for a guest kick.

use std::io::{self, Read, Write};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackendMut, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT, Reader, Writer};

use crate::rearm::Rearm;
use crate::{LoggedMemory, LoggedVring};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier};

use super::muxer::Muxer;
use super::packet::{EVENT_LEN, EVENT_TRANSPORT_RESET, HDR_LEN, Header, MAX_PAYLOAD, Op};

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const EVENT_QUEUE: u16 = 2;
pub const NUM_QUEUES: usize = 3;
/// Event id of the muxer's epoll fd (ids up to NUM_QUEUES are the daemon's).
pub const MUXER_EVENT: u16 = NUM_QUEUES as u16 + 1;
pub const MAX_QUEUE_SIZE: usize = 1024;

pub struct VsockBackend {
    muxer: Muxer,
    guest_cid: u64,
    mem: Option<GuestMemoryAtomic<LoggedMemory>>,
    buf: Vec<u8>,
    /// We stopped reading tx because resets pile up; resume after rx.
    tx_stalled: bool,
    exit: (EventConsumer, EventNotifier),
    /// A TRANSPORT_RESET is owed to a restored guest and not yet posted.
    /// Cleared once posted and never set again: one per process lifetime.
    reset_pending: bool,
    /// `--lazy-memory`: PAGEFAULT is offered.
    lazy_memory: bool,
}

impl VsockBackend {
    /// `transport_reset`: the guest was restored from a snapshot and gets
    /// one TRANSPORT_RESET event once its event queue runs. `lazy_memory`:
    /// the guest is restored lazily, PAGEFAULT is offered (see
    /// [`crate::lazy_memory`]).
    pub fn new(guest_cid: u64, muxer: Muxer, transport_reset: bool, lazy_memory: bool) -> io::Result<Self> {
        let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        Ok(VsockBackend {
            muxer,
            guest_cid,
            mem: None,
            buf: Vec::with_capacity(MAX_PAYLOAD),
            tx_stalled: false,
            exit,
            reset_pending: transport_reset,
            lazy_memory,
        })
    }

    pub fn muxer_fd(&self) -> std::os::fd::RawFd {
        self.muxer.epoll_fd()
    }

    pub fn exit_notifier(&self) -> &EventNotifier {
        &self.exit.1
    }

    fn process_tx(&mut self, vring: &LoggedVring) -> io::Result<()> {
        let Some(atomic) = &self.mem else { return Ok(()) };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() {
            return Ok(());
        }
        let queue = state.get_queue_mut();
        let mut used = 0;
        self.tx_stalled = false;
        let mut rearm = Rearm::default();
        'outer: loop {
            let _ = queue.disable_notification(&*mem);
            loop {
                if self.muxer.resets_full() {
                    self.tx_stalled = true;
                    break 'outer;
                }
                let Some(chain) = queue.pop_descriptor_chain(&*mem) else { break };
                let head = chain.head_index();
                match read_packet(&mem, chain, &mut self.buf) {
                    Some(hdr) => self.muxer.on_guest_packet(&hdr, &self.buf),
                    None => tracing::debug!("vsock tx: dropped a malformed chain"),
                }
                if let Err(e) = queue.add_used(&*mem, head, 0) {
                    tracing::warn!("vsock tx: used ring: {e}");
                    break 'outer;
                }
                used += 1;
            }
            if !rearm.again(queue, &*mem, used) {
                break;
            }
        }
        if used > 0 && queue.needs_notification(&*mem).unwrap_or(true) {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    fn process_rx(&mut self, vring: &LoggedVring) -> io::Result<()> {
        let Some(atomic) = &self.mem else { return Ok(()) };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Ok(());
        }
        let queue = state.get_queue_mut();
        let mut used = 0;
        let mut rearm = Rearm::default();
        while self.muxer.has_packet() {
            let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
                // Out of buffers: the guest kicks when it adds some.
                if rearm.again(queue, &*mem, used) {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let len = match Writer::new(&*mem, chain) {
                Ok(mut w) if w.available_bytes() >= HDR_LEN => {
                    let max = (w.available_bytes() - HDR_LEN).min(MAX_PAYLOAD);
                    let Some(mut hdr) = self.muxer.next_packet(&mut self.buf, max) else {
                        queue.go_to_previous_position();
                        break;
                    };
                    hdr.len = self.buf.len() as u32;
                    if w.write_all(&hdr.to_bytes()).and_then(|()| w.write_all(&self.buf)).is_err() {
                        tracing::warn!("vsock rx: writing a guest buffer failed");
                    }
                    w.bytes_written() as u32
                }
                // Unusable buffer: returned empty, the packet stays with us.
                _ => 0,
            };
            queue.add_used(&*mem, head, len).map_err(|e| io::Error::other(e.to_string()))?;
            used += 1;
        }
        if used > 0 && queue.needs_notification(&*mem).unwrap_or(true) {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    /// Posts the owed TRANSPORT_RESET into the event queue's next buffer,
    /// if the queue runs and holds one. Buffers too short for the event
    /// are returned empty (Linux ignores a used length other than 4). With
    /// no buffer, the guest is asked to kick when it adds one.
    fn post_transport_reset(&mut self, vring: &LoggedVring) -> io::Result<()> {
        let Some(atomic) = &self.mem else { return Ok(()) };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Ok(());
        }
        let queue = state.get_queue_mut();
        let mut used = 0;
        let mut rearm = Rearm::default();
        while self.reset_pending {
            let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
                if rearm.again(queue, &*mem, used) {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let written = match Writer::new(&*mem, chain) {
                Ok(mut w) if w.available_bytes() >= EVENT_LEN => {
                    w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).is_ok()
                }
                _ => false,
            };
            let len = if written { EVENT_LEN as u32 } else { 0 };
            queue.add_used(&*mem, head, len).map_err(|e| io::Error::other(e.to_string()))?;
            used += 1;
            if written {
                self.reset_pending = false;
                tracing::info!("vsock: posted TRANSPORT_RESET to the restored guest");
            } else {
                tracing::debug!("vsock event: returned an unusable buffer");
            }
        }
        if used > 0 && queue.needs_notification(&*mem).unwrap_or(true) {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    fn process_rx_and_resume_tx(&mut self, vrings: &[LoggedVring]) -> io::Result<()> {
        self.process_rx(&vrings[RX_QUEUE as usize])?;
        if self.tx_stalled && !self.muxer.resets_full() {
            self.process_tx(&vrings[TX_QUEUE as usize])?;
            self.process_rx(&vrings[RX_QUEUE as usize])?;
        }
        Ok(())
    }
}

/// Copies one guest packet out of a tx chain: the header, and for RW its
/// payload into `buf` (cleared otherwise). `None` if the chain is too short,
/// outside guest memory, or claims more payload than it holds or we allow.
fn read_packet(mem: &LoggedMemory, chain: DescriptorChain<&LoggedMemory>, buf: &mut Vec<u8>) -> Option<Header> {
    let mut reader: Reader<'_, BitmapMmapRegion> = Reader::new(mem, chain).ok()?;
    let mut raw = [0u8; HDR_LEN];
    reader.read_exact(&mut raw).ok()?;
    let hdr = Header::from_bytes(&raw);
    buf.clear();
    if hdr.op() == Some(Op::Rw) {
        let len = hdr.len as usize;
        if len > MAX_PAYLOAD || len > reader.available_bytes() {
            return None;
        }
        buf.resize(len, 0);
        reader.read_exact(buf).ok()?;
    }
    Some(hdr)
}

impl VhostUserBackendMut for VsockBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = LoggedVring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            // Dirty-page logging for live snapshots, see `crate::LoggedMemory`.
            | vhost::vhost_user::message::VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
            // The dirty log (SET_LOG_BASE), see `crate::LoggedMemory`.
            | VhostUserProtocolFeatures::LOG_SHMFD
            | crate::lazy_memory::protocol_features(self.lazy_memory)
    }

    fn reset_device(&mut self) {
        self.muxer.reset_all();
        self.tx_stalled = false;
    }

    /// mm-vmm stops the rings (GET_VRING_BASE) when the guest resets the
    /// device; the guest's connections are gone with it.
    fn stop_vring(&mut self, queue_index: u32) -> io::Result<()> {
        if queue_index == u32::from(TX_QUEUE) {
            self.reset_device();
        }
        Ok(())
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // The queues know (the daemon sets it on them); we ask them.
    }

    /// The config space is the guest's CID (le64).
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        crate::net::read_config(&self.guest_cid.to_le_bytes(), offset, size)
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<LoggedMemory>) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[LoggedVring],
        _thread: usize,
    ) -> io::Result<()> {
        // When the owed reset goes out: vhost-user-backend 0.24 calls
        // handle_event(q) on this worker thread as soon as ring q is both
        // started and enabled (it registers the kick fd, then raises its
        // "vring enabled" event so no kick made before is lost), whether or
        // not the guest ever kicks. That call for EVENT_QUEUE is our "ring
        // is running" hook, with no timer and no self-kick; the back end
        // trait itself has no ring-start callback (update_memory comes
        // before the rings are set up). Checking on every event also puts
        // the reset ahead of anything else we would send the guest once the
        // event ring runs, and a guest kick on EVENT_QUEUE (buffers added
        // after we found none) retries it.
        if self.reset_pending {
            self.post_transport_reset(&vrings[EVENT_QUEUE as usize])?;
        }
        match device_event {
            RX_QUEUE => self.process_rx_and_resume_tx(vrings),
            TX_QUEUE => {
                self.process_tx(&vrings[TX_QUEUE as usize])?;
                self.process_rx_and_resume_tx(vrings)
            }
            // Only the owed reset (above) uses this queue.
            EVENT_QUEUE => Ok(()),
            MUXER_EVENT => {
                self.muxer.process_events();
                self.process_rx_and_resume_tx(vrings)
            }
            other => Err(io::Error::other(format!("vsock: unknown event {other}"))),
        }
    }
}
