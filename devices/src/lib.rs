//! mm-device: one vhost-user back end per process (DESIGN.md, "Processes on
//! one host"). Each device parses guest-controlled data in its own jailed
//! process, so a bug in one reaches nothing but that device.
//!
//! * `block`: raw disk images, with in-flight request tracking so a
//!   restarted process resubmits what its predecessor had not finished.
//! * `net`: a TAP fd handed in by the broker.
//! * `vsock`: Firecracker's hybrid vsock over unix sockets.

pub mod block;
pub mod lazy_memory;
pub mod net;
pub mod rate_limiter;
pub mod rearm;
pub mod vsock;

/// Guest memory of the back ends built on `vhost-user-backend` (net and
/// vsock): every region carries the crate's replaceable dirty-log bitmap,
/// which its SET_LOG_BASE fills in, so every write through vm-memory (and
/// virtio-queue's `Writer` and used ring) is marked in the front end's log
/// (vhost-user LOG_SHMFD; needed for live snapshots). Unused, the bitmap
/// marks nothing.
pub type LoggedMemory = vm_memory::GuestMemoryMmap<vhost_user_backend::bitmap::BitmapMmapRegion>;

/// The rings of the net and vsock back ends, over [`LoggedMemory`].
pub type LoggedVring = vhost_user_backend::VringRwLock<vm_memory::GuestMemoryAtomic<LoggedMemory>>;

/// A vhost-user front end for device tests without KVM (see the module docs).
#[cfg(any(test, feature = "test-frontend"))]
pub mod test_frontend;
