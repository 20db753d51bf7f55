//! The net back end: a virtio-net device on a TAP fd handed in by the
//! broker (`mm-device net --listen-fd N --tap-fd T --mac M`).
//!
//! The process opens nothing: the broker creates the TAP (in its bridge's
//! namespace) and passes the fd, so the jail needs no /dev/net/tun and no
//! network capability. Offloads and mergeable rx buffers follow what that
//! TAP supports (see `features`).

mod backend;
pub(crate) mod daemon;
mod features;
mod mac;
mod rx;
mod tap;
mod tx;

#[cfg(test)]
mod e2e_tests;
/// The fuzz entry point (devices/fuzz, target `net_tx`).
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
#[cfg(test)]
pub(crate) mod testnet;
#[cfg(test)]
pub(crate) mod testq;

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, RwLock};

use vmm_sys_util::epoll::EventSet;

pub use backend::NetBackend;
pub use daemon::ServeError;
pub(crate) use features::read_config;
pub use mac::{BadMac, MacAddr};
pub use tap::TapError;

/// What one net device process serves.
#[derive(Debug)]
pub struct NetConfig {
    /// A TAP queue fd opened with `IFF_TAP | IFF_NO_PI`, and `IFF_VNET_HDR`
    /// if offloads are wanted (without it the device still works, with no
    /// offloads). Made non-blocking here.
    pub tap: OwnedFd,
    /// The guest's MAC address (config space, VIRTIO_NET_F_MAC).
    pub mac: MacAddr,
    /// Serve a lazily restored guest (`--lazy-memory`): offer PAGEFAULT
    /// (see [`crate::lazy_memory`]); the `vhost-user-backend` crate handles
    /// the postcopy messages.
    pub lazy_memory: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("MAC address {0} is multicast; a NIC needs a unicast address")]
    MulticastMac(MacAddr),
    #[error("creating the exit eventfd: {0}")]
    Event(#[source] io::Error),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Serves one net device on the front-end connection queued on `listener`
/// until the front end hangs up.
pub fn serve_net(config: NetConfig, listener: UnixListener) -> Result<(), NetError> {
    if config.mac.is_multicast() {
        return Err(NetError::MulticastMac(config.mac));
    }
    let backend = NetBackend::new(config)?;
    let tap_fd = backend.tap_fd();
    let exit = backend.exit_notifier().try_clone().map_err(NetError::Event)?;
    let backend = Arc::new(RwLock::new(backend));
    daemon::run(
        "mm-device-net",
        backend,
        listener,
        // Edge-triggered: see `backend` on why that cannot spin.
        |handler| handler.register_listener(tap_fd, EventSet::IN | EventSet::EDGE_TRIGGERED, backend::TAP_EVENT.into()),
        exit,
    )?;
    Ok(())
}
