//! The block device: a vhost-user back end serving one raw disk image, or a
//! copy-on-write disk over a read-only base ([`mm_overlay`], for microVMs
//! forked from one snapshot) (DESIGN.md, "Processes on one host"), with
//! in-flight request tracking so a replacement process picks up exactly
//! where a killed one stopped.
//!
//! Layout, from the wire inwards:
//! * `handler`: the vhost-user requests (our own handler, because the
//!   `vhost-user-backend` crate refuses GET/SET_INFLIGHT_FD);
//! * `memory`, `inflight`: guest memory and the in-flight table, both
//!   memfds from the front end;
//! * `dirty_log`: the front end's dirty-page log (LOG_SHMFD, LOG_ALL),
//!   where every write to guest memory is marked while it is on;
//! * `postcopy`: guest memory of a lazily restored guest, whose missing
//!   pages the front end fills when this process touches them;
//! * `worker`, `vring`: the data-path thread and its rings;
//! * `chain`, `request`: walking and parsing guest-written descriptor
//!   chains (pure, fuzzed);
//! * `execute`, `disk`: running a request against the image.

mod chain;
mod config;
mod dirty_log;
mod disk;
mod execute;
mod handler;
mod inflight;
mod memory;
mod postcopy;
mod request;
mod vring;
mod worker;

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
#[cfg(test)]
mod tests;

use std::io::ErrorKind;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{BackendReqHandler, Error as VuError};

pub use config::device_features;
pub use disk::DiskError;
pub use execute::Serial;

use execute::BlockDisk;
use handler::BlockHandler;
use vring::Hooks;

use crate::rate_limiter::Limiter;
use mm_protocols::device_control::RateLimit;

/// How to serve one disk: what `mm-device block` takes on its command line
/// (`--image PATH [--read-only] [--serial ID]`, or `--image UPPER --base
/// BASE --map MAP [--serial ID]`), filled in by the broker from the
/// microVM's device spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The raw image: a regular file (usually sparse) or a block device.
    /// Its size, rounded down to 512-byte sectors, is the disk's capacity.
    /// With `overlay`, the overlay's upper file (the one written).
    pub image: PathBuf,
    /// Serve `image` as the copy-on-write upper of this base (a forked
    /// microVM's disk over its snapshot's, see [`mm_overlay`]). Never
    /// together with `read_only`.
    pub overlay: Option<OverlayFiles>,
    /// Open the image read-only and offer VIRTIO_BLK_F_RO; writes, discards
    /// and write-zeroes then fail with VIRTIO_BLK_S_IOERR. Shared base
    /// images are served this way.
    pub read_only: bool,
    /// The serial the guest reads with VIRTIO_BLK_T_GET_ID (and sees as
    /// /dev/disk/by-id/virtio-<serial>); at most 20 bytes are used.
    pub serial: Option<String>,
    /// Serve a lazily restored guest (`--lazy-memory`): offer PAGEFAULT, so
    /// the front end can resolve this process's faults on guest RAM (see
    /// [`crate::lazy_memory`]).
    pub lazy_memory: bool,
    /// The rate limits to start with (`--rate-bps`, `--rate-ops`,
    /// `--rate-burst-bytes`; all 0: none), changeable later over the
    /// control channel.
    pub rate_limit: RateLimit,
    /// Testing only: see [`TestHookFlags`].
    pub test: TestHookFlags,
}

/// The other two files of a copy-on-write disk (`--base`, `--map`); the
/// upper is [`BlockConfig::image`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayFiles {
    /// The snapshot's raw image: opened read-only, never written.
    pub base: PathBuf,
    /// The allocation bitmap: which clusters live in the upper file.
    pub map: PathBuf,
}

/// `mm-device block`'s test-only flags. They exist only with the cargo
/// feature `test-hooks` (which only the test crates turn on): without it
/// this struct is empty and the command line has no such flags, so nothing
/// a user runs can be slowed down or reordered by them.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct TestHookFlags {
    /// Testing only: sleep this long before running each request (and,
    /// with --test-complete-out-of-order, before publishing each
    /// completion), so a test's SIGKILL finds requests in flight.
    #[cfg(feature = "test-hooks")]
    #[arg(long = "test-request-delay-ms", hide = true)]
    pub request_delay_ms: Option<u64>,
    /// Testing only: complete each batch of requests (all the avail ring
    /// held when the worker looked) in reverse order of arrival, as a back
    /// end doing I/O in parallel may, so a kill can land between the
    /// completions of one batch.
    #[cfg(feature = "test-hooks")]
    #[arg(long = "test-complete-out-of-order", hide = true)]
    pub complete_out_of_order: bool,
}

impl BlockConfig {
    #[cfg(feature = "test-hooks")]
    fn hooks(&self) -> Hooks {
        let request_delay = self.test.request_delay_ms.map(std::time::Duration::from_millis);
        if let Some(delay) = request_delay {
            tracing::warn!(?delay, "block: TESTING ONLY: every request is delayed");
        }
        if self.test.complete_out_of_order {
            tracing::warn!("block: TESTING ONLY: requests complete in reverse order of arrival");
        }
        // The crash hook exists only in this crate's own tests.
        #[allow(clippy::needless_update)]
        Hooks { request_delay, out_of_order: self.test.complete_out_of_order, ..Hooks::default() }
    }

    #[cfg(not(feature = "test-hooks"))]
    fn hooks(&self) -> Hooks {
        Hooks::default()
    }
}

/// What a block back end shares with its control channel
/// (protocols/device.capnp, `mmctl stats`): its counts, and its rate
/// limiter, which the control channel may change while requests run.
#[derive(Debug, Default)]
pub struct BlockStats {
    resubmitted: AtomicU64,
    in_flight: AtomicU64,
    pub limiter: Limiter,
}

impl BlockStats {
    /// Requests a killed predecessor left in flight (found in the
    /// in-flight table) that this back end ran again.
    pub fn resubmitted(&self) -> u64 {
        self.resubmitted.load(Ordering::Relaxed)
    }

    /// Requests taken from the ring (or the table) and not yet completed,
    /// now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn count_resubmitted(&self) {
        self.resubmitted.fetch_add(1, Ordering::Relaxed);
    }

    fn taken(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    fn completed(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The stats of the back ends [`serve_block`] and [`serve_block_stream`]
/// run: one device per process, so the process's.
static PROCESS_STATS: LazyLock<Arc<BlockStats>> = LazyLock::new(Arc::default);

/// This process's counts, for its control channel (`mm-device --control-fd`).
pub fn counters() -> mm_protocols::device_control::DeviceCounters {
    mm_protocols::device_control::DeviceCounters {
        resubmitted: PROCESS_STATS.resubmitted(),
        in_flight: PROCESS_STATS.in_flight(),
        rate_limit: PROCESS_STATS.limiter.limit(),
        throttled_total: PROCESS_STATS.limiter.throttled_total(),
    }
}

/// Replaces this process's rate limits (`setRateLimit` on the control
/// channel); the worker sees them from its next request on.
pub fn set_rate_limit(limit: RateLimit) -> Result<(), String> {
    limit.validate().map_err(|e| e.to_string())?;
    PROCESS_STATS.limiter.set(limit);
    tracing::info!(?limit, "block: rate limit changed");
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("a copy-on-write disk (--base) cannot be served read-only: serve its base read-only instead")]
    ReadOnlyOverlay,
    #[error("cannot accept the front end's connection: {0}")]
    Accept(std::io::Error),
    #[error("vhost-user session failed: {0}")]
    Protocol(VuError),
}

/// Opens the image `config` names.
fn open_disk(config: &BlockConfig) -> Result<Arc<BlockDisk>, BlockError> {
    let image = match &config.overlay {
        None => disk::DiskImage::open(&config.image, config.read_only)?,
        Some(_) if config.read_only => return Err(BlockError::ReadOnlyOverlay),
        Some(OverlayFiles { base, map }) => disk::DiskImage::open_overlay(base, &config.image, map)?,
    };
    let serial = Serial::new(config.serial.as_deref().unwrap_or(""));
    tracing::info!(
        image = %config.image.display(),
        base = ?config.overlay.as_ref().map(|o| o.base.display().to_string()),
        sectors = image.capacity_sectors(),
        read_only = config.read_only,
        "block: image opened",
    );
    Ok(Arc::new(BlockDisk::new(image, serial)))
}

/// Opens the image, accepts ONE connection on `listener` (for the broker's
/// `--listen-fd`, the front end's connection is already queued) and serves
/// it until the front end hangs up. The listener is closed once the
/// connection is accepted: a second front end is never served.
pub fn serve_block(config: BlockConfig, listener: UnixListener) -> Result<(), BlockError> {
    let disk = open_disk(&config)?;
    let (stream, _) = loop {
        match listener.accept() {
            Ok(conn) => break conn,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(BlockError::Accept(e)),
        }
    };
    drop(listener);
    PROCESS_STATS.limiter.set(config.rate_limit);
    serve_disk(disk, stream, config.hooks(), Arc::clone(&PROCESS_STATS), config.lazy_memory)
}

/// Serves an already connected stream (a socketpair end) until the front
/// end hangs up.
pub fn serve_block_stream(config: BlockConfig, stream: UnixStream) -> Result<(), BlockError> {
    PROCESS_STATS.limiter.set(config.rate_limit);
    serve_disk(open_disk(&config)?, stream, config.hooks(), Arc::clone(&PROCESS_STATS), config.lazy_memory)
}

fn serve_disk(
    disk: Arc<BlockDisk>,
    stream: UnixStream,
    hooks: Hooks,
    stats: Arc<BlockStats>,
    lazy_memory: bool,
) -> Result<(), BlockError> {
    let handler = Arc::new(Mutex::new(BlockHandler::new(disk, hooks, stats, lazy_memory)));
    let mut requests = BackendReqHandler::from_stream(stream, Arc::clone(&handler));
    let result = loop {
        match requests.handle_request() {
            Ok(()) => {}
            Err(VuError::Disconnected) => break Ok(()),
            // SET_LOG_BASE without LOG_SHMFD negotiated: the vhost crate
            // refuses it before us, and such a message has no reply to miss.
            Err(VuError::InactiveOperation(feature)) if feature == VhostUserProtocolFeatures::LOG_SHMFD => {
                tracing::error!("block: SET_LOG_BASE refused: LOG_SHMFD was not negotiated");
            }
            // A refusal the front end got a NACK for, which leaves the
            // session sound (see BlockHandler::take_survivable).
            Err(e) if handler.lock().is_ok_and(|mut h| h.take_survivable()) => {
                tracing::warn!("block: request refused, still serving: {e}");
            }
            Err(VuError::SocketBroken(e) | VuError::SocketError(e))
                if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) =>
            {
                break Ok(());
            }
            Err(e) => break Err(BlockError::Protocol(e)),
        }
    };
    // Finish the request in progress, if any, before returning.
    if let Ok(mut handler) = handler.lock() {
        let _ = handler.stop_worker();
    }
    match &result {
        Ok(()) => tracing::info!("block: front end hung up"),
        Err(e) => tracing::error!("block: {e}"),
    }
    result
}
