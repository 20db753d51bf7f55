//! The vsock back end: Firecracker's "hybrid vsock", bridging guest stream
//! ports to unix sockets (`mm-device vsock --listen-fd N --guest-cid C
//! --uds PATH`).
//!
//! * Host → guest: a client connects to the unix socket at `PATH` and
//!   writes `CONNECT <port>\n`; once the guest's listener on that port
//!   accepts, it reads `OK <host_port>\n` and the socket is the stream.
//! * Guest → host: a guest connection to host (CID 2) port P is connected
//!   to the unix socket listening at `PATH_P`.
//!
//! The jail shows this process only the directory holding `PATH`; the exec
//! agent and SSH are reached this way.
//!
//! Modules: `packet` (the wire header), `credit` (flow control), `conn`
//! (one connection's state machine), `hostside` (the CONNECT handshake),
//! `muxer` (sockets, epoll, routing), `device` (the virtqueues).

mod conn;
mod credit;
mod device;
mod hostside;
mod muxer;
mod packet;

#[cfg(test)]
mod e2e_tests;
/// The fuzz entry point (devices/fuzz, target `vsock_packets`).
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
#[cfg(test)]
pub(crate) mod testutil;

use std::io;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use vmm_sys_util::epoll::EventSet;

use crate::net::daemon::{self, ServeError};
pub use device::VsockBackend;
pub use hostside::{BadConnect, parse_connect};
pub use muxer::MuxerError;

/// What one vsock device process serves.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// The guest's context id (config space), 3 or more: 0-2 are reserved
    /// (2 is the host) and u32::MAX means "any".
    pub guest_cid: u64,
    /// Where the device listens for host clients; guest connections to
    /// host port P go to `<uds_path>_<P>`. A stale socket there is
    /// replaced; it is removed when the device exits.
    pub uds_path: PathBuf,
    /// The guest was restored from a snapshot: once its event queue runs,
    /// post one VIRTIO_VSOCK_EVENT_TRANSPORT_RESET so it drops the
    /// connections this fresh process never had (listeners stay) and
    /// re-reads its CID (`guest_cid`, possibly new) from config space.
    pub transport_reset: bool,
    /// Serve a lazily restored guest (`--lazy-memory`): offer PAGEFAULT
    /// (see [`crate::lazy_memory`]); the `vhost-user-backend` crate handles
    /// the postcopy messages.
    pub lazy_memory: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (must be 3..4294967295)")]
    BadCid(u64),
    #[error(transparent)]
    Muxer(#[from] MuxerError),
    #[error("creating the exit eventfd: {0}")]
    Event(#[source] io::Error),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Serves one vsock device on the front-end connection queued on
/// `listener` until the front end hangs up.
pub fn serve_vsock(config: VsockConfig, listener: UnixListener) -> Result<(), VsockError> {
    if config.guest_cid < 3 || config.guest_cid >= u64::from(u32::MAX) {
        return Err(VsockError::BadCid(config.guest_cid));
    }
    let muxer = muxer::Muxer::new(config.guest_cid, config.uds_path)?;
    let backend = VsockBackend::new(config.guest_cid, muxer, config.transport_reset, config.lazy_memory)
        .map_err(VsockError::Event)?;
    let muxer_fd = backend.muxer_fd();
    let exit = backend.exit_notifier().try_clone().map_err(VsockError::Event)?;
    let backend = Arc::new(RwLock::new(backend));
    daemon::run(
        "mm-device-vsock",
        backend,
        listener,
        |handler| handler.register_listener(muxer_fd, EventSet::IN, device::MUXER_EVENT.into()),
        exit,
    )?;
    Ok(())
}
