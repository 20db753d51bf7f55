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
pub mod rearm;
pub mod vsock;

/// A vhost-user front end for device tests without KVM (see the module docs).
#[cfg(any(test, feature = "test-frontend"))]
pub mod test_frontend;
