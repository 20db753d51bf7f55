//! Running a `VhostUserDaemon` on the listening socket the broker hands us
//! (shared by the net and vsock back ends).
//!
//! The broker creates the listener, connects mm-vmm's end, unlinks the path
//! and passes us the listener, so exactly one front-end connection is
//! queued on it; we accept it, serve it until the front end hangs up, and
//! return. A restart is the broker's job (a fresh process).

use std::io;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, RwLock};

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{Error as DaemonError, VhostUserBackendMut, VhostUserDaemon, VringEpollHandler};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::event::EventNotifier;

use crate::{LoggedMemory, LoggedVring};

/// Why serving stopped other than by the front end hanging up.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("setting the vhost-user listener to blocking: {0}")]
    Listener(#[source] io::Error),
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    #[error("registering a back-end fd with the daemon: {0}")]
    Register(#[source] io::Error),
}

fn daemon_error(e: DaemonError) -> ServeError {
    ServeError::Daemon(e.to_string())
}

/// Serves `backend` on the one connection queued on `listener`.
/// `register` adds the back end's own fds to the worker's epoll before the
/// front end is accepted; `exit` stops the worker thread afterwards.
pub(crate) fn run<B>(
    name: &str,
    backend: Arc<RwLock<B>>,
    listener: UnixListener,
    register: impl FnOnce(&VringEpollHandler<Arc<RwLock<B>>>) -> io::Result<()>,
    exit: EventNotifier,
) -> Result<(), ServeError>
where
    B: VhostUserBackendMut<Bitmap = BitmapMmapRegion, Vring = LoggedVring> + 'static,
{
    // A non-blocking listener would make the daemon's accept loop spin.
    listener.set_nonblocking(false).map_err(ServeError::Listener)?;
    let mem = GuestMemoryAtomic::new(LoggedMemory::new());
    let mut daemon = VhostUserDaemon::new(name.to_string(), backend, mem).map_err(daemon_error)?;
    let handlers = daemon.get_epoll_handlers();
    let result = match handlers.first() {
        Some(handler) => register(handler).map_err(ServeError::Register),
        None => Err(ServeError::Daemon("no worker thread".into())),
    };
    let result = result.and_then(|()| {
        let mut listener = Listener::from(listener);
        daemon.start(&mut listener).map_err(daemon_error)?;
        match daemon.wait() {
            Ok(()) => Ok(()),
            // The front end going away mid-message is a hang-up too.
            Err(DaemonError::HandleRequest(VhostUserError::Disconnected | VhostUserError::PartialMessage)) => Ok(()),
            Err(e) => Err(daemon_error(e)),
        }
    });
    let _ = exit.notify();
    result
}
