//! A lazily restored guest (`--lazy-memory`, vhost-user postcopy): the
//! back end's faults on guest pages missing from the memfd reach the front
//! end's userfaultfd and wait for it, the memory is used only once the
//! front end acks it, and postcopy messages out of order end in an error
//! naming the problem, not a panic.

use std::os::fd::AsRawFd;

use vhost::VhostBackend;
use vhost::vhost_user::VhostUserFrontend;
use vhost::vhost_user::message::{FrontendReq, VhostUserMemoryRegion};

use super::*;
use crate::block::postcopy::{Postcopy, PostcopyError};
use crate::lazy_memory::testutil::{
    LAZY_PROTOCOL_FEATURES, PAGE, ServeOnPanic, populate_except, postcopy_ack, postcopy_set_up, registered_missing,
    resolve, serve_in_child, userfaultfd_available, wait_fault,
};

const MIB: u64 = 1 << 20;

/// A back end serving a scratch image, `--lazy-memory` or not, and a test
/// front end asking for `wanted`.
fn rig(lazy_memory: bool, wanted: VhostUserProtocolFeatures) -> Rig {
    let image = TempImage::new(MIB);
    let disk = open_disk(&image.path, false, "lazy");
    let (frontend, backend) = UnixStream::pair().unwrap();
    let stats = Arc::new(BlockStats::default());
    let handle = std::thread::spawn(move || serve_disk(disk, backend, Hooks::default(), stats, lazy_memory));
    let memory = TestMemory::new(MEM_BASE, MEM_SIZE).unwrap();
    let fe = TestFrontend::connect_wanting(frontend, memory, 1, wanted).unwrap();
    Rig { fe, image, backend: Some(handle) }
}

/// Waits for the back end to end the session and returns its error.
fn session_error(rig: &mut Rig) -> String {
    let backend = rig.backend.take().expect("back end running");
    match backend.join().expect("the back end panicked") {
        Err(e) => e.to_string(),
        Ok(()) => panic!("the back end ended its session without an error"),
    }
}

/// The lazy set-up and one write whose data page is missing from the
/// memfd, on a connected front end whose back end (pid `pid`) writes to
/// `image`: the page faults to the front end's userfaultfd and the write
/// waits until the front end supplies the page. Nothing may touch the
/// memory before the front end's ack. Ends with POSTCOPY_END.
fn write_from_a_missing_page(fe: &mut TestFrontend, pid: u32, image: &TempImage) {
    assert!(fe.protocol.contains(VhostUserProtocolFeatures::PAGEFAULT), "PAGEFAULT not offered");
    fe.set_features(u64::MAX).unwrap();
    let (uffd, bases) = postcopy_set_up(fe);
    let sizes = fe.memory.regions().into_iter().map(|r| r.memory_size);
    let _unblock = ServeOnPanic { uffd: &uffd, ranges: bases.iter().copied().zip(sizes).collect() };
    assert_ne!(bases[0], fe.memory.regions()[0].userspace_addr, "the base is the back end's own mapping");
    let (registered, no_huge_pages) = registered_missing(pid, bases[0]);
    assert!(
        registered && no_huge_pages,
        "mapping at {:#x}: registered {registered}, nohugepage {no_huge_pages}",
        bases[0]
    );

    // Guest RAM as a lazy restore has it: one page not fetched yet (missing
    // in the memfd), every other present.
    let data = fe.memory.alloc(PAGE as u64, PAGE as u64).unwrap();
    fe.layout_vring(0, QUEUE_SIZE).unwrap();
    populate_except(fe, data.0, PAGE as u64);

    // The ring set up and a write of that page kicked before the ack:
    // nothing may use the memory yet.
    fe.start_vring(0, 0).unwrap();
    let hdr = fe.alloc(16).unwrap();
    fe.mem().write_slice(&header(T_OUT, 8), hdr).unwrap();
    let status = fe.alloc(1).unwrap();
    fe.mem().write_obj(STATUS_UNTOUCHED, status).unwrap();
    let bufs = [Buf::out(hdr, 16), Buf::out(data, PAGE as u32), Buf::input(status, 1)];
    let head = fe.add_chain(0, &bufs).unwrap();
    fe.kick(0).unwrap();
    assert!(fe.wait_used(0, 1, Duration::from_millis(300)).unwrap().is_empty(), "served before the ack");
    assert_eq!(wait_fault(&uffd, Duration::from_millis(100)), None, "the back end touched memory before the ack");

    // Acked: the write's pwrite copies from the missing page in the kernel,
    // which faults to our userfaultfd and waits.
    postcopy_ack(fe);
    let addr = wait_fault(&uffd, TIMEOUT).expect("no fault on the missing page");
    assert_eq!(addr & !(PAGE as u64 - 1), bases[0] + (data.0 - MEM_BASE), "fault at {addr:#x}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(fe.take_used(0).unwrap().is_empty(), "completed before its page was there");

    let contents: [u8; PAGE] = pattern(PAGE, 5).try_into().unwrap();
    resolve(&uffd, addr, &contents);
    let used = fe.wait_used(0, 1, TIMEOUT).unwrap();
    assert_eq!(used.len(), 1, "{used:?}");
    assert_eq!((used[0].id, used[0].len), (u32::from(head), 1));
    assert_eq!(fe.mem().read_obj::<u8>(status).unwrap(), S_OK);
    assert_eq!(image.read(8 * 512, PAGE), contents, "the disk holds the page the front end supplied");
    let mut seen = vec![0u8; PAGE];
    fe.mem().read_slice(&mut seen, data).unwrap();
    assert_eq!(seen, contents, "the page is in the shared memfd");
    fe.frontend.postcopy_end().unwrap();
}

#[test]
fn faults_on_missing_guest_pages_wait_for_the_front_end() {
    if !userfaultfd_available("faults_on_missing_guest_pages_wait_for_the_front_end") {
        return;
    }
    let mut rig = rig(true, LAZY_PROTOCOL_FEATURES);
    write_from_a_missing_page(&mut rig.fe, std::process::id(), &rig.image);
    rig.assert_still_serving();
}

/// The same in a process of its own under the block seccomp policy, as
/// `mm-device block --lazy-memory` serves (the userfaultfd's creation, the
/// registration, the fault and POSTCOPY_END must all be allowed).
#[test]
fn block_serves_postcopy_under_its_policy() {
    if !userfaultfd_available("block_serves_postcopy_under_its_policy") {
        return;
    }
    let image = TempImage::new(MIB);
    let (listener, stream) = crate::net::testnet::queued_listener();
    let args = format!("block {} {}", listener.as_raw_fd(), image.path.display());
    let child = serve_in_child(&args, &[listener.as_raw_fd()]);
    drop(listener);
    let pid = child.pid();
    let memory = TestMemory::new(MEM_BASE, MEM_SIZE).unwrap();
    let mut fe = TestFrontend::connect_wanting(stream, memory, 1, LAZY_PROTOCOL_FEATURES).unwrap();
    write_from_a_missing_page(&mut fe, pid, &image);
    drop(fe);
    let (status, stderr) = child.finish(TIMEOUT);
    assert!(status.success(), "block under its policy: {status:?}\n{stderr}");
}

#[test]
fn postcopy_listen_before_advise_ends_the_session() {
    let mut rig = rig(true, LAZY_PROTOCOL_FEATURES);
    rig.fe.set_features(u64::MAX).unwrap();
    assert!(rig.fe.frontend.postcopy_listen().is_err(), "the front end got an ack");
    let error = session_error(&mut rig);
    assert!(error.contains("postcopy not advised"), "{error}");
}

#[test]
fn postcopy_advise_twice_ends_the_session() {
    if !userfaultfd_available("postcopy_advise_twice_ends_the_session") {
        return;
    }
    let mut rig = rig(true, LAZY_PROTOCOL_FEATURES);
    rig.fe.set_features(u64::MAX).unwrap();
    let uffd = rig.fe.frontend.postcopy_advise().unwrap();
    assert!(crate::lazy_memory::testutil::is_userfaultfd(uffd.as_raw_fd()));
    assert!(rig.fe.frontend.postcopy_advise().is_err(), "a second userfaultfd");
    let error = session_error(&mut rig);
    assert!(error.contains("postcopy already advised"), "{error}");
}

#[test]
fn postcopy_ack_with_no_memory_table_ends_the_session() {
    if !userfaultfd_available("postcopy_ack_with_no_memory_table_ends_the_session") {
        return;
    }
    let mut rig = rig(true, LAZY_PROTOCOL_FEATURES);
    rig.fe.set_features(u64::MAX).unwrap();
    let _uffd = rig.fe.frontend.postcopy_advise().unwrap();
    rig.fe.frontend.postcopy_listen().unwrap();
    // The ack has no reply; the back end ends the session on it.
    rig.fe.frontend.postcopy_ack_mem_regions(FrontendReq::SET_MEM_TABLE).unwrap();
    let error = session_error(&mut rig);
    assert!(error.contains("no memory table is waiting for its ack"), "{error}");
    assert!(rig.fe.frontend.get_features().is_err(), "the session went on");
}

#[test]
fn without_lazy_memory_pagefault_is_not_offered_nor_served() {
    let mut rig = rig(false, LAZY_PROTOCOL_FEATURES);
    assert!(!rig.fe.protocol.contains(VhostUserProtocolFeatures::PAGEFAULT), "PAGEFAULT offered");
    // A front end that asks anyway gets no userfaultfd, and the session
    // goes on.
    let protocol = rig.fe.protocol | VhostUserProtocolFeatures::PAGEFAULT;
    rig.fe.frontend.set_protocol_features(protocol).unwrap();
    assert!(rig.fe.frontend.postcopy_advise().is_err(), "got a userfaultfd without --lazy-memory");
    rig.fe.activate(u64::MAX, &[QUEUE_SIZE]).unwrap();
    rig.assert_still_serving();
}

/// The state checks of the handler's postcopy half, called directly.
#[test]
fn postcopy_state_refuses_messages_out_of_order() {
    let mut postcopy = Postcopy::default();
    assert!(matches!(postcopy.listen(), Err(PostcopyError::NotAdvised)));
    let region = VhostUserMemoryRegion::new(MEM_BASE, PAGE as u64, 0x7000_0000, 0);
    let memfd = TestMemory::new(MEM_BASE, PAGE).unwrap().memfd;
    assert!(matches!(
        postcopy.map_pending(&[region], vec![memfd], &Default::default()),
        Err(PostcopyError::NotListening)
    ));
    assert!(matches!(postcopy.take_pending(), Err(PostcopyError::NothingPending)));
    assert!(postcopy.end().is_none());
    if !userfaultfd_available("postcopy_state_refuses_messages_out_of_order") {
        return;
    }
    let _copy = postcopy.advise().unwrap();
    assert!(matches!(postcopy.advise(), Err(PostcopyError::AlreadyAdvised)));
    let memfd = TestMemory::new(MEM_BASE, PAGE).unwrap().memfd;
    assert!(matches!(
        postcopy.map_pending(&[region], vec![memfd], &Default::default()),
        Err(PostcopyError::NotListening)
    ));
    postcopy.listen().unwrap();
    let memfd = TestMemory::new(MEM_BASE, PAGE).unwrap().memfd;
    let bases = postcopy.map_pending(&[region], vec![memfd], &Default::default()).unwrap();
    assert!(registered_missing(std::process::id(), bases[0]).0, "not registered");
    let table = postcopy.take_pending().unwrap();
    assert_eq!(table.local_mappings().map(|m| m.addr).collect::<Vec<_>>(), bases);
    assert!(matches!(postcopy.take_pending(), Err(PostcopyError::NothingPending)));
}
