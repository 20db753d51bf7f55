//! net and vsock with `--lazy-memory`: PAGEFAULT offered only with it, and
//! the postcopy sequence (handled by the `vhost-user-backend` crate) run
//! under each device's own seccomp policy. (Block's handler is its own:
//! `block::tests::postcopy`.)

use std::os::fd::AsRawFd;
use std::time::Duration;

use vhost::vhost_user::VhostUserFrontend;
use vhost::vhost_user::message::VhostUserProtocolFeatures;

use super::testutil::*;
use crate::net::testnet::{TestNetns, queued_listener};
use crate::test_frontend::{TestFrontend, TestMemory};
use crate::vsock::testutil::TempDir;

const T: Duration = Duration::from_secs(20);

/// Drives the lazy set-up of a device served by `child` over `stream`
/// (advise, listen, memory table, ack, end), checks the child's mapping is
/// registered, hangs up, and expects the child to exit cleanly.
fn postcopy_under_policy(kind: &str, stream: std::os::unix::net::UnixStream, child: ChildDevice, queues: usize) {
    let pid = child.pid();
    let memory = TestMemory::new(0x1_0000_0000, 16 << 20).unwrap();
    let mut fe = TestFrontend::connect_wanting(stream, memory, queues, LAZY_PROTOCOL_FEATURES).unwrap();
    assert!(fe.protocol.contains(VhostUserProtocolFeatures::PAGEFAULT), "{kind}: PAGEFAULT not offered");
    fe.set_features(u64::MAX).unwrap();
    let (_uffd, bases) = postcopy_set_up(&mut fe);
    assert_eq!(registered_missing(pid, bases[0]), (true, true), "{kind}: the mapping is not registered");
    postcopy_ack(&mut fe);
    fe.frontend.postcopy_end().unwrap();
    drop(fe);
    let (status, stderr) = child.finish(T);
    assert!(status.success(), "{kind} under its policy: {status:?}\n{stderr}");
}

#[test]
fn vsock_serves_postcopy_under_its_policy() {
    if !userfaultfd_available("vsock_serves_postcopy_under_its_policy") {
        return;
    }
    let dir = TempDir::new("lazy-vsock");
    let (listener, stream) = queued_listener();
    let uds = dir.path("v.sock");
    let args = format!("vsock {} {}", listener.as_raw_fd(), uds.display());
    let child = serve_in_child(&args, &[listener.as_raw_fd()]);
    drop(listener);
    postcopy_under_policy("vsock", stream, child, 2);
}

#[test]
fn net_serves_postcopy_under_its_policy() {
    let Some(ns) = TestNetns::new("lazy") else { return };
    if !userfaultfd_available("net_serves_postcopy_under_its_policy") {
        return;
    }
    let (tap, _sock) = ns.create_tap("mmtap0", true);
    let (listener, stream) = queued_listener();
    let args = format!("net {} {}", listener.as_raw_fd(), tap.as_raw_fd());
    let child = serve_in_child(&args, &[listener.as_raw_fd(), tap.as_raw_fd()]);
    drop((listener, tap));
    postcopy_under_policy("net", stream, child, 2);
}

#[test]
fn vsock_offers_pagefault_only_with_lazy_memory() {
    for lazy_memory in [false, true] {
        let dir = TempDir::new(&format!("lazy-offer-{lazy_memory}"));
        let (listener, stream) = queued_listener();
        let config = crate::vsock::VsockConfig {
            guest_cid: 3,
            uds_path: dir.path("v.sock"),
            transport_reset: false,
            lazy_memory,
        };
        let server = std::thread::spawn(move || crate::vsock::serve_vsock(config, listener));
        let memory = TestMemory::new(0x1_0000_0000, 1 << 20).unwrap();
        let fe = TestFrontend::connect_wanting(stream, memory, 2, LAZY_PROTOCOL_FEATURES).unwrap();
        assert_eq!(fe.protocol.contains(VhostUserProtocolFeatures::PAGEFAULT), lazy_memory);
        drop(fe);
        crate::net::testnet::join_within(server, T).unwrap();
    }
}
