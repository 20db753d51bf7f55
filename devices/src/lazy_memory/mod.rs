//! Serving a lazily restored guest (`mm-device --lazy-memory`).
//!
//! A lazy restore gives the guest an empty guest-RAM memfd and fills pages
//! from the snapshot as they are first touched: mm-vmm registers its own
//! mapping with a userfaultfd. A device process maps the same memfd, and its
//! first touch of a page must wait for mm-vmm too, or it would find (and
//! allocate) a zero page in place of the guest's data. That is vhost-user's
//! "postcopy" (protocol feature PAGEFAULT): the back end creates a
//! userfaultfd in its own process, hands the front end a copy, registers
//! its guest-memory mappings with it, and mm-vmm resolves the faults.
//!
//! Only a device started with `--lazy-memory` offers PAGEFAULT, and only its
//! jail holds `/dev/userfaultfd` (`mm_jailer::JailSpec::userfaultfd`), which
//! is how an unprivileged process gets a userfaultfd that also catches
//! faults taken in the kernel (block's `pread`/`pwrite` go straight to
//! guest pages). net and vsock leave the messages to the
//! `vhost-user-backend` crate (feature `postcopy`); block has its own
//! handler (`block::postcopy`).

use vhost::vhost_user::message::VhostUserProtocolFeatures;

/// The protocol features a back end adds for lazy memory: PAGEFAULT with
/// `--lazy-memory`, nothing without.
pub fn protocol_features(lazy_memory: bool) -> VhostUserProtocolFeatures {
    if lazy_memory { VhostUserProtocolFeatures::PAGEFAULT } else { VhostUserProtocolFeatures::empty() }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;
