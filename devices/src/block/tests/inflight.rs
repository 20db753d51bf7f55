//! Crash recovery: a back end "killed" with requests in flight is replaced
//! by a fresh one on the same in-flight table, and every request completes
//! exactly once with the right data.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use super::*;
use crate::block::inflight::InflightTable;
use crate::block::vring::{CrashHook, CrashPoint};

const MIB: u64 = 1 << 20;
const REQUESTS: u64 = 4;

/// Queues `REQUESTS` writes (request i: pattern i + 1 at sector 8 i),
/// kicks, and waits until the crash hook has fired; returns their heads.
fn write_until_crash(rig: &mut Rig, hook: &CrashHook) -> Vec<u16> {
    let mut heads = Vec::new();
    for i in 0..REQUESTS {
        let (head, _, _) = rig.queue_request(T_OUT, 8 * i, &pattern(4096, i as u8 + 1), 0);
        heads.push(head);
    }
    rig.fe.kick(0).unwrap();
    let start = Instant::now();
    while !hook.crashed.load(Ordering::SeqCst) {
        assert!(start.elapsed() < TIMEOUT, "the crash hook never fired");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    heads
}

/// `base`: SET_VRING_BASE on reconnect (None: the guest's used index, as
/// mm-vmm sends; Some(0): a stale value the in-flight table must override).
fn crash_and_recover(point: CrashPoint, get_only: bool, base: Option<u16>) {
    let hook = Arc::new(CrashHook { point, after: 1, completed: AtomicUsize::new(0), crashed: AtomicBool::new(false) });
    let mut rig = Rig::connected(MIB, false, Hooks { crash: Some(Arc::clone(&hook)), ..Hooks::default() });
    if get_only {
        // As mm-vmm does on first start: GET_INFLIGHT_FD without SET.
        rig.fe.set_features(u64::MAX).unwrap();
        rig.fe.set_mem_table().unwrap();
        rig.fe.get_inflight(QUEUE_SIZE).unwrap();
        rig.fe.setup_vring(0, QUEUE_SIZE).unwrap();
    } else {
        rig.fe.activate(u64::MAX, &[QUEUE_SIZE]).unwrap();
    }

    let heads = write_until_crash(&mut rig, &hook);
    let mut used = rig.fe.take_used(0).unwrap();
    let expected_before = if point == CrashPoint::Published { 2 } else { 1 };
    assert_eq!(used.len(), expected_before, "completions visible before the crash");

    // A fresh back end on the same image; the front end replays set-up
    // (SET_INFLIGHT_FD with the kept table, rings at the guest's used index).
    let disk = open_disk(&rig.image.path, false, "mm-test-serial");
    let (stream, backend2, stats) = spawn_counted_backend(disk, Hooks::default());
    rig.fe.reconnect_at(stream, base).unwrap();
    let old = rig.backend.replace(backend2).unwrap();
    old.join().unwrap().unwrap();

    used.extend(rig.fe.wait_used(0, heads.len() - used.len(), TIMEOUT).unwrap());
    // Nothing more trickles in.
    std::thread::sleep(std::time::Duration::from_millis(100));
    used.extend(rig.fe.take_used(0).unwrap());
    let mut ids: Vec<u32> = used.iter().map(|u| u.id).collect();
    ids.sort_unstable();
    let mut expected: Vec<u32> = heads.iter().map(|&h| u32::from(h)).collect();
    expected.sort_unstable();
    assert_eq!(ids, expected, "each request completed exactly once");
    for i in 0..REQUESTS {
        assert_eq!(rig.image.read(8 * i * 512, 4096), pattern(4096, i as u8 + 1), "request {i}'s data");
    }
    // The second request was in flight, unless its completion was already
    // published (the successor then only clears the mark).
    let in_flight = if point == CrashPoint::Published { 0 } else { 1 };
    assert_eq!(stats.resubmitted(), in_flight, "resubmitted by the successor");
    assert_eq!(stats.in_flight(), 0, "nothing held once all completed");
    rig.assert_still_serving();
}

/// Four requests in one batch, completed newest first
/// (`Hooks::out_of_order`), the back end "killed" after publishing the
/// newest: the guest has seen the fourth complete and not the first three.
/// Returns the heads, the used ids the guest saw in the end (sorted) and
/// what the successor resubmitted.
fn out_of_order_kill(tracking: bool) -> (Vec<u32>, Vec<u32>, u64) {
    let hook = Arc::new(CrashHook {
        point: CrashPoint::Executed,
        after: 1,
        completed: AtomicUsize::new(0),
        crashed: AtomicBool::new(false),
    });
    let hooks = Hooks { out_of_order: true, crash: Some(Arc::clone(&hook)), ..Hooks::default() };
    let mut wanted = crate::test_frontend::TEST_PROTOCOL_FEATURES;
    if !tracking {
        wanted.remove(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
    }
    let mut rig = Rig::connected_wanting(MIB, false, hooks, wanted);
    rig.fe.activate(u64::MAX, &[QUEUE_SIZE]).unwrap();
    let mut heads: Vec<u32> = write_until_crash(&mut rig, &hook).into_iter().map(u32::from).collect();
    let mut used = rig.fe.take_used(0).unwrap();
    assert_eq!(used.iter().map(|u| u.id).collect::<Vec<_>>(), [heads[3]], "the newest completed first");

    // mm-vmm's reconnect: the rings restart at the guest's used index (1),
    // which only the in-flight table can correct.
    let disk = open_disk(&rig.image.path, false, "mm-test-serial");
    let (stream, backend2, stats) = spawn_counted_backend(disk, Hooks::default());
    rig.fe.reconnect(stream).unwrap();
    let old = rig.backend.replace(backend2).unwrap();
    old.join().unwrap().unwrap();
    used.extend(rig.fe.wait_used(0, heads.len() - used.len(), TIMEOUT).unwrap());
    std::thread::sleep(std::time::Duration::from_millis(100));
    used.extend(rig.fe.take_used(0).unwrap());
    let mut ids: Vec<u32> = used.iter().map(|u| u.id).collect();
    ids.sort_unstable();
    for i in 0..REQUESTS {
        assert_eq!(rig.image.read(8 * i * 512, 4096), pattern(4096, i as u8 + 1), "request {i}'s data");
    }
    rig.assert_still_serving();
    heads.sort_unstable();
    assert_eq!(stats.in_flight(), 0, "nothing held once all completed");
    (heads, ids, stats.resubmitted())
}

#[test]
fn killed_between_out_of_order_completions() {
    let (heads, ids, resubmitted) = out_of_order_kill(true);
    assert_eq!(ids, heads, "each request completed exactly once");
    assert_eq!(resubmitted, 3, "the three older requests, from the in-flight table");
}

/// The control for the test above: the same kill with no in-flight table
/// (the front end does not negotiate INFLIGHT_SHMFD) and the ring restarted
/// at the used index loses the oldest request and completes the newest
/// twice. So that test, unlike an in-order one, fails without tracking.
#[test]
fn without_tracking_out_of_order_completions_are_lost_and_repeated() {
    let (heads, ids, resubmitted) = out_of_order_kill(false);
    assert_eq!(resubmitted, 0);
    let oldest = heads.iter().position(|&h| !ids.contains(&h));
    assert!(oldest.is_some(), "a request never completed: {ids:?} of {heads:?}");
    assert!(ids.windows(2).any(|w| w[0] == w[1]), "a request completed twice: {ids:?}");
}

#[test]
fn killed_after_marking() {
    crash_and_recover(CrashPoint::Marked, false, None);
    crash_and_recover(CrashPoint::Marked, false, Some(0));
}

#[test]
fn killed_after_writing_before_completing() {
    crash_and_recover(CrashPoint::Executed, false, None);
    crash_and_recover(CrashPoint::Executed, false, Some(0));
}

#[test]
fn killed_after_completing_before_unmarking() {
    crash_and_recover(CrashPoint::Published, false, None);
    crash_and_recover(CrashPoint::Published, false, Some(0));
}

#[test]
fn killed_with_a_table_the_front_end_only_asked_for() {
    // As mm-vmm does today on first start: GET_INFLIGHT_FD without SET.
    crash_and_recover(CrashPoint::Marked, true, None);
    crash_and_recover(CrashPoint::Published, true, Some(0));
}

#[test]
fn resubmission_order_follows_the_counters() {
    let (table, _file, _) = InflightTable::create(1, 8).unwrap();
    let mut q = table.queue(0, 8).unwrap();
    assert_eq!(q.recover(0).resubmit, Vec::<u16>::new(), "fresh table: nothing to do");
    for head in [5u16, 2, 7, 0] {
        q.mark(head);
    }
    // Head 2 completed normally (used index 0 -> 1).
    q.pre_put(2);
    q.post_put(2, 1);
    // Head 7 was published (used index 2) but the mark not cleared.
    q.pre_put(7);
    let mut successor = table.queue(0, 8).unwrap();
    let recovery = successor.recover(2);
    assert_eq!(recovery.resubmit, vec![5, 0], "oldest first, completed ones skipped");
    assert_eq!(recovery.next_avail, 4, "used index + requests in flight");
    assert!(!successor.is_marked(7) && successor.is_marked(5));
    // New marks continue after the highest counter.
    successor.mark(3);
    let mut third = table.queue(0, 8).unwrap();
    assert_eq!(third.recover(2).resubmit, vec![5, 0, 3]);
}

#[test]
fn inflight_table_validation() {
    use vhost::vhost_user::message::VhostUserInflight;
    let (_, file, info) = InflightTable::create(1, 64).unwrap();
    assert_eq!(info.mmap_size, 1088, "64 descriptors of 16 bytes + header, 64-byte aligned");
    let small = VhostUserInflight::new(info.mmap_size - 64, 0, 1, 64);
    assert!(InflightTable::map(&small, file.try_clone().unwrap()).is_err());
    let past_end = VhostUserInflight::new(info.mmap_size, 4096, 1, 64);
    assert!(InflightTable::map(&past_end, file.try_clone().unwrap()).is_err());
    let table = InflightTable::map(&info, file).unwrap();
    assert!(table.queue(1, 64).is_none(), "no second queue");
    assert!(table.queue(0, 128).is_none(), "ring larger than the table");
}
