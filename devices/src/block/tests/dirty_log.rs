//! Dirty-page logging (LOG_SHMFD, LOG_ALL): every page the back end writes
//! while logging is on is marked in the front end's log, nothing is marked
//! while it is off, turning it on and off does not stall the disk, and a
//! log the back end cannot use is refused without ending the session.

use std::time::{Duration, Instant};

use vhost::VhostBackend;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::{Address, Bytes, GuestAddress};

use super::*;
use crate::test_frontend::{LOG_PAGE, memfd};

const MIB: u64 = 1 << 20;

fn page(addr: u64) -> u64 {
    addr & !(LOG_PAGE - 1)
}

/// The guest pages of one request, each buffer on pages of its own.
struct Layout {
    header: GuestAddress,
    data: GuestAddress,
    data_len: u32,
    status: GuestAddress,
}

impl Layout {
    /// `data_len` bytes starting half way into a page, so 8 KiB span 3 pages.
    fn new(rig: &mut Rig, data_len: u32) -> Self {
        let mut page_of = |len: u64| rig.fe.memory.alloc(len.next_multiple_of(LOG_PAGE) + LOG_PAGE, LOG_PAGE).unwrap();
        let header = page_of(16);
        let data = page_of(u64::from(data_len)).unchecked_add(LOG_PAGE / 2);
        let status = page_of(1);
        Layout { header, data, data_len, status }
    }

    fn data_pages(&self) -> Vec<u64> {
        let last = self.data.raw_value() + u64::from(self.data_len) - 1;
        (page(self.data.raw_value())..=page(last)).step_by(LOG_PAGE as usize).collect()
    }

    /// Queues a read (IN) or write (OUT) of `data_len` bytes at sector 0,
    /// kicks, and returns the head.
    fn submit(&self, rig: &mut Rig, kind: u32) -> u16 {
        let mem = rig.fe.mem();
        mem.write_slice(&header(kind, 0), self.header).unwrap();
        mem.write_obj(STATUS_UNTOUCHED, self.status).unwrap();
        let data = if kind == T_IN {
            Buf::input(self.data, self.data_len)
        } else {
            mem.write_slice(&pattern(self.data_len as usize, 9), self.data).unwrap();
            Buf::out(self.data, self.data_len)
        };
        let bufs = [Buf::out(self.header, 16), data, Buf::input(self.status, 1)];
        let head = rig.fe.add_chain(0, &bufs).unwrap();
        rig.fe.kick(0).unwrap();
        head
    }

    fn run(&self, rig: &mut Rig, kind: u32) {
        let head = self.submit(rig, kind);
        rig.wait_one(head);
        assert_eq!(rig.fe.mem().read_obj::<u8>(self.status).unwrap(), S_OK);
    }
}

fn used_page(rig: &Rig) -> u64 {
    page(rig.fe.queues[0].as_ref().unwrap().used.raw_value())
}

fn logging_rig(hooks: Hooks) -> Rig {
    let mut rig = Rig::connected(MIB, false, hooks);
    rig.fe.activate(u64::MAX, &[QUEUE_SIZE]).unwrap();
    rig.image.write(0, &pattern(16 << 10, 3));
    rig
}

#[test]
fn offers_log_shmfd_and_log_all() {
    let rig = logging_rig(Hooks::default());
    assert!(rig.fe.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    assert_ne!(rig.fe.offered_features & (1 << 26), 0, "VHOST_F_LOG_ALL not offered");
}

#[test]
fn a_read_marks_its_data_status_and_used_pages() {
    let mut rig = logging_rig(Hooks::default());
    let io = Layout::new(&mut rig, 8192);
    rig.fe.start_logging().unwrap();
    assert_eq!(rig.fe.take_dirty().unwrap(), Vec::<u64>::new(), "marked before any request");
    io.run(&mut rig, T_IN);
    let dirty = rig.fe.take_dirty().unwrap();
    let data = io.data_pages();
    assert_eq!(data.len(), 3);
    for p in data.iter().chain([&page(io.status.raw_value()), &used_page(&rig)]) {
        assert!(dirty.contains(p), "page {p:#x} not marked; marked: {dirty:x?}");
    }
    // The header's page is only read (the rings share the used ring's).
    let header = page(io.header.raw_value());
    assert!(!dirty.contains(&header), "header page {header:#x} marked, never written; marked: {dirty:x?}");
    assert_eq!(dirty.len(), 5, "marked: {dirty:x?}");
    // The data read is the image's.
    let mut got = vec![0u8; 8192];
    rig.fe.mem().read_slice(&mut got, io.data).unwrap();
    assert_eq!(got, pattern(16 << 10, 3)[..8192]);
}

#[test]
fn a_write_marks_only_status_and_used_pages() {
    let mut rig = logging_rig(Hooks::default());
    let io = Layout::new(&mut rig, 8192);
    rig.fe.start_logging().unwrap();
    io.run(&mut rig, T_OUT);
    let mut dirty = rig.fe.take_dirty().unwrap();
    dirty.sort_unstable();
    let mut expected = vec![page(io.status.raw_value()), used_page(&rig)];
    expected.sort_unstable();
    assert_eq!(dirty, expected, "a guest -> disk write marked its data pages");
    assert_eq!(rig.image.read(0, 8192), pattern(8192, 9));
}

#[test]
fn nothing_is_marked_while_logging_is_off() {
    let mut rig = logging_rig(Hooks::default());
    let io = Layout::new(&mut rig, 8192);
    // A log sent, LOG_ALL not acked: not logging yet.
    rig.fe.start_logging().unwrap();
    rig.fe.set_logging(false).unwrap();
    io.run(&mut rig, T_IN);
    assert_eq!(rig.fe.take_dirty().unwrap(), Vec::<u64>::new(), "marked with LOG_ALL off");
    // On (a new SET_LOG_BASE, as the mapping was dropped), then off again.
    rig.fe.start_logging().unwrap();
    io.run(&mut rig, T_IN);
    assert!(!rig.fe.take_dirty().unwrap().is_empty());
    rig.fe.set_logging(false).unwrap();
    io.run(&mut rig, T_IN);
    assert_eq!(rig.fe.take_dirty().unwrap(), Vec::<u64>::new(), "marked after LOG_ALL went off");
    // LOG_ALL again without a new log: refused (the old one was dropped).
    assert!(rig.fe.set_logging(true).is_err());
    rig.assert_still_serving();
}

#[test]
fn toggling_log_all_neither_stalls_nor_loses_a_request_in_flight() {
    let delay = Duration::from_millis(600);
    let mut rig = logging_rig(Hooks { request_delay: Some(delay), ..Hooks::default() });
    let io = Layout::new(&mut rig, 8192);
    let head = io.submit(&mut rig, T_IN);
    std::thread::sleep(Duration::from_millis(100)); // the worker holds it now
    let started = Instant::now();
    rig.fe.start_logging().unwrap();
    let took = started.elapsed();
    assert!(took < delay / 2, "LOG_ALL waited {took:?} for the request in flight: the rings were stopped");
    assert_eq!(rig.fe.used_idx(0).unwrap(), 0, "completed before logging went on");
    rig.wait_one(head);
    let dirty = rig.fe.take_dirty().unwrap();
    for p in io.data_pages().iter().chain([&page(io.status.raw_value()), &used_page(&rig)]) {
        assert!(dirty.contains(p), "page {p:#x} of the request in flight not marked");
    }
    // And off again with the next one in flight.
    let head = io.submit(&mut rig, T_IN);
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    rig.fe.set_logging(false).unwrap();
    assert!(started.elapsed() < delay / 2, "turning LOG_ALL off stopped the rings");
    rig.wait_one(head);
    assert_eq!(rig.fe.mem().read_obj::<u8>(io.status).unwrap(), S_OK);
}

/// A log of `size` bytes at `offset` in a file of `file_len` bytes is
/// answered, LOG_ALL is then refused (REPLY_ACK), nothing is marked, and
/// the disk keeps serving.
fn refused(size: u64, offset: u64, file_len: u64) {
    let mut rig = logging_rig(Hooks::default());
    let log = memfd(c"mm-test-log", file_len).unwrap();
    rig.fe.send_log_base(&log, size, offset).unwrap();
    assert!(rig.fe.set_logging(true).is_err(), "LOG_ALL acked with an unusable log");
    rig.assert_still_serving();
    // A usable log afterwards works.
    rig.fe.start_logging().unwrap();
    let io = Layout::new(&mut rig, 4096);
    io.run(&mut rig, T_IN);
    assert!(rig.fe.take_dirty().unwrap().contains(&page(io.data.raw_value())));
}

/// Bytes of log that cover the rig's guest RAM.
fn covering() -> u64 {
    (MEM_BASE + MEM_SIZE as u64).div_ceil(LOG_PAGE).div_ceil(8)
}

#[test]
fn a_log_too_small_for_guest_memory_is_refused() {
    refused(covering() - 1, 0, covering());
}

#[test]
fn a_log_past_the_end_of_its_file_is_refused() {
    refused(covering(), 4096, covering());
    refused(covering(), u64::MAX - 4095, covering());
    refused(u64::MAX, 0, covering());
}

#[test]
fn a_log_that_is_not_a_file_is_refused() {
    let mut rig = logging_rig(Hooks::default());
    let (reader, _writer) = std::io::pipe().unwrap();
    let reader = std::fs::File::from(std::os::fd::OwnedFd::from(reader));
    rig.fe.send_log_base(&reader, covering(), 0).unwrap();
    assert!(rig.fe.set_logging(true).is_err());
    rig.assert_still_serving();
}

#[test]
fn log_all_without_a_log_is_refused() {
    let mut rig = logging_rig(Hooks::default());
    assert!(rig.fe.set_logging(true).is_err());
    rig.assert_still_serving();
}

#[test]
fn set_log_base_without_log_shmfd_is_refused() {
    let wanted = TEST_PROTOCOL_FEATURES.difference(VhostUserProtocolFeatures::LOG_SHMFD);
    let mut rig = Rig::connected_wanting(MIB, false, Hooks::default(), wanted);
    rig.fe.activate(u64::MAX, &[QUEUE_SIZE]).unwrap();
    // Without LOG_SHMFD the front end sends the u64 form, with no fd and
    // no reply.
    rig.fe.frontend.set_log_base(0, None).unwrap();
    assert!(rig.fe.set_logging(true).is_err());
    rig.assert_still_serving();
}

#[test]
fn memory_the_log_does_not_cover_is_refused() {
    let mut rig = logging_rig(Hooks::default());
    let log = memfd(c"mm-test-log", covering()).unwrap();
    // Covers RAM now.
    rig.fe.send_log_base(&log, covering(), 0).unwrap();
    rig.fe.set_logging(true).unwrap();
    // A table with RAM beyond the log: refused, not silently unlogged.
    let big = crate::test_frontend::TestMemory::new(MEM_BASE, MEM_SIZE * 2).unwrap();
    assert!(rig.fe.frontend.set_mem_table(&big.regions()).is_err());
    let error = rig.backend.take().unwrap().join().unwrap().unwrap_err().to_string();
    assert!(error.contains("dirty log"), "{error}");
}
