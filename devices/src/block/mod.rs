//! The block device: a vhost-user back end serving one raw disk image
//! (DESIGN.md, "Processes on one host"), with in-flight request tracking so
//! a replacement process picks up exactly where a killed one stopped.
//!
//! Layout, from the wire inwards:
//! * `handler`: the vhost-user requests (our own handler, because the
//!   `vhost-user-backend` crate refuses GET/SET_INFLIGHT_FD);
//! * `memory`, `inflight`: guest memory and the in-flight table, both
//!   memfds from the front end;
//! * `worker`, `vring`: the data-path thread and its rings;
//! * `chain`, `request`: walking and parsing guest-written descriptor
//!   chains (pure, fuzzed);
//! * `execute`, `disk`: running a request against the image.

mod chain;
mod config;
mod disk;
mod execute;
mod handler;
mod inflight;
mod memory;
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
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{BackendReqHandler, Error as VuError};

pub use config::device_features;
pub use disk::DiskError;
pub use execute::Serial;

use execute::BlockDisk;
use handler::BlockHandler;
use vring::Hooks;

/// How to serve one disk: what `mm-device block` takes on its command line
/// (`--image PATH [--read-only] [--serial ID]`), filled in by the broker
/// from the microVM's device spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The raw image: a regular file (usually sparse) or a block device.
    /// Its size, rounded down to 512-byte sectors, is the disk's capacity.
    pub image: PathBuf,
    /// Open the image read-only and offer VIRTIO_BLK_F_RO; writes, discards
    /// and write-zeroes then fail with VIRTIO_BLK_S_IOERR. Shared base
    /// images are served this way.
    pub read_only: bool,
    /// The serial the guest reads with VIRTIO_BLK_T_GET_ID (and sees as
    /// /dev/disk/by-id/virtio-<serial>); at most 20 bytes are used.
    pub serial: Option<String>,
    /// Testing only: a pause before each request runs, so that a test's
    /// SIGKILL lands while requests are in flight (see `Hooks`).
    pub test_request_delay: Option<std::time::Duration>,
}

impl BlockConfig {
    fn hooks(&self) -> Hooks {
        if let Some(delay) = self.test_request_delay {
            tracing::warn!(?delay, "block: TESTING ONLY: every request is delayed");
        }
        Hooks::with_request_delay(self.test_request_delay)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("cannot accept the front end's connection: {0}")]
    Accept(std::io::Error),
    #[error("vhost-user session failed: {0}")]
    Protocol(VuError),
}

/// Opens the image `config` names.
fn open_disk(config: &BlockConfig) -> Result<Arc<BlockDisk>, BlockError> {
    let image = disk::DiskImage::open(&config.image, config.read_only)?;
    let serial = Serial::new(config.serial.as_deref().unwrap_or(""));
    tracing::info!(
        image = %config.image.display(),
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
    serve_disk(disk, stream, config.hooks())
}

/// Serves an already connected stream (a socketpair end) until the front
/// end hangs up.
pub fn serve_block_stream(config: BlockConfig, stream: UnixStream) -> Result<(), BlockError> {
    serve_disk(open_disk(&config)?, stream, config.hooks())
}

fn serve_disk(disk: Arc<BlockDisk>, stream: UnixStream, hooks: Hooks) -> Result<(), BlockError> {
    let handler = Arc::new(Mutex::new(BlockHandler::new(disk, hooks)));
    let mut requests = BackendReqHandler::from_stream(stream, Arc::clone(&handler));
    let result = loop {
        match requests.handle_request() {
            Ok(()) => {}
            Err(VuError::Disconnected) => break Ok(()),
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
