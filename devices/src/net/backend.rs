//! The vhost-user side of the net device: queues 0 (rx) and 1 (tx), plus the
//! TAP fd, all served by the daemon's single worker thread.
//!
//! The TAP is watched edge-triggered: every frame that arrives is an edge,
//! and we read until the TAP is empty or the guest is out of rx buffers. In
//! the second case the frame in hand waits in `rx_frame` and the rx kick
//! (the guest adding buffers) resumes reading, so a full guest never makes
//! us spin on a readable TAP.

use std::io;
use std::sync::atomic::{Ordering, fence};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackendMut, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier};

use crate::{LoggedMemory, LoggedVring};

use super::NetConfig;
use super::features::{self, CONFIG_SIZE};
use super::rx::{RxOutcome, deliver_frame};
use super::tap::{Tap, VNET_HDR_LEN};
use super::tx::{MAX_FRAME_LEN, drain_tx};

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const NUM_QUEUES: usize = 2;
/// Event id of the TAP fd: ids up to NUM_QUEUES belong to the daemon
/// (queues, then its exit event).
pub const TAP_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Largest ring we accept; mm-vmm uses 256.
pub const MAX_QUEUE_SIZE: usize = 1024;

pub struct NetBackend {
    tap: Tap,
    config: [u8; CONFIG_SIZE],
    features: u64,
    acked: u64,
    mem: Option<GuestMemoryAtomic<LoggedMemory>>,
    /// A frame read from the TAP (header included) not yet in the rx queue.
    rx_frame: Vec<u8>,
    rx_pending: usize,
    tx_buf: Vec<u8>,
    exit: (EventConsumer, EventNotifier),
    /// `--lazy-memory`: PAGEFAULT is offered.
    lazy_memory: bool,
}

impl NetBackend {
    pub fn new(config: NetConfig) -> Result<Self, super::NetError> {
        let tap = Tap::new(config.tap)?;
        let features = features::offered_features(tap.vnet_hdr(), tap.supported_offloads());
        let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK).map_err(super::NetError::Event)?;
        Ok(NetBackend {
            tap,
            config: features::config_space(config.mac),
            features,
            acked: 0,
            mem: None,
            rx_frame: vec![0; MAX_FRAME_LEN],
            rx_pending: 0,
            tx_buf: Vec::with_capacity(MAX_FRAME_LEN),
            exit,
            lazy_memory: config.lazy_memory,
        })
    }

    /// The TAP fd, for the daemon's epoll.
    pub fn tap_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.tap.as_raw_fd()
    }

    /// Stops the daemon's worker thread (it owns a clone of the backend).
    pub fn exit_notifier(&self) -> &EventNotifier {
        &self.exit.1
    }

    /// Reads the next frame from the TAP into `rx_frame`, giving it a
    /// zeroed header when the TAP has none. `None`: the TAP is empty.
    fn read_tap(&mut self) -> Option<usize> {
        let (start, extra) = if self.tap.vnet_hdr() { (0, 0) } else { (VNET_HDR_LEN, VNET_HDR_LEN) };
        loop {
            match self.tap.read(&mut self.rx_frame[start..]) {
                Ok(n) if n + extra >= VNET_HDR_LEN + 14 => {
                    self.rx_frame[..start].fill(0);
                    return Some(n + extra);
                }
                Ok(_) => continue, // runt: nothing a guest could use
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => {
                    tracing::warn!("net rx: tap read: {e}");
                    return None;
                }
            }
        }
    }

    fn process_rx(&mut self, vring: &LoggedVring) -> io::Result<()> {
        let Some(atomic) = &self.mem else { return Ok(()) };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            // The frames stay in the TAP; the daemon runs us again when the
            // ring starts.
            return Ok(());
        }
        let mergeable = features::mergeable_rx(self.acked);
        let mut used = 0;
        loop {
            if self.rx_pending == 0 {
                match self.read_tap() {
                    Some(n) => self.rx_pending = n,
                    None => break,
                }
            }
            let queue = state.get_queue_mut();
            let frame = &mut self.rx_frame[..self.rx_pending];
            match deliver_frame(queue, &mem, frame, mergeable) {
                RxOutcome::NoBuffers => {
                    if !arm_kick(queue, &mem) {
                        break; // the guest's next rx kick resumes us
                    }
                }
                outcome => {
                    used += outcome.used();
                    self.rx_pending = 0;
                }
            }
        }
        if used > 0 && state.get_queue_mut().needs_notification(&*mem).unwrap_or(true) {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    fn process_tx(&mut self, vring: &LoggedVring) -> io::Result<()> {
        let Some(atomic) = &self.mem else { return Ok(()) };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let used = drain_tx(queue, &mem, &self.tap, &mut self.tx_buf);
        if used > 0 && queue.needs_notification(&*mem).unwrap_or(true) {
            state.signal_used_queue()?;
        }
        Ok(())
    }
}

/// Asks the guest to kick rx as soon as it adds any buffer, and says
/// whether it already has (retry now).
///
/// With EVENT_IDX, `enable_notification` would set avail_event to our
/// position, which lags behind when the guest has buffers out that are too
/// few for the frame in hand; the guest would then never cross it. So set
/// avail_event to the guest's current index instead.
fn arm_kick(queue: &mut Queue, mem: &LoggedMemory) -> bool {
    let Ok(before) = queue.avail_idx(mem, Ordering::Acquire) else { return false };
    if queue.event_idx_enabled() {
        let avail_event = queue.used_ring() + 4 + 8 * u64::from(queue.size());
        if mem.store(before.0.to_le(), GuestAddress(avail_event), Ordering::Release).is_err() {
            return false;
        }
    } else if queue.enable_notification(mem).is_err() {
        return false;
    }
    fence(Ordering::SeqCst);
    queue.avail_idx(mem, Ordering::Acquire).is_ok_and(|after| after != before)
}

impl VhostUserBackendMut for NetBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = LoggedVring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&mut self, features: u64) {
        self.acked = features;
        if self.tap.vnet_hdr() {
            let flags = features::tun_offloads_for(features);
            if let Err(e) = self.tap.set_offloads(flags) {
                tracing::warn!("net: TUNSETOFFLOAD {flags:#x}: {e}");
            }
        }
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
        self.rx_pending = 0;
        self.acked_features(0);
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // The queues know (the daemon sets it on them); we ask them.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        features::read_config(&self.config, offset, size)
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
        match device_event {
            RX_QUEUE | TAP_EVENT => self.process_rx(&vrings[RX_QUEUE as usize]),
            TX_QUEUE => self.process_tx(&vrings[TX_QUEUE as usize]),
            other => Err(io::Error::other(format!("net: unknown event {other}"))),
        }
    }
}
