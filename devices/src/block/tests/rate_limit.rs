//! The rate limiter on the block data path, through the test front end: a
//! limit of N requests/s delays requests accordingly and loses none, and a
//! change applies to requests already waiting.

use std::time::{Duration, Instant};

use mm_protocols::device_control::RateLimit;

use super::*;

const MIB: u64 = 1 << 20;

/// A rig whose back end's stats (and limiter) the test holds.
fn limited_rig(limit: RateLimit) -> (Rig, Arc<BlockStats>) {
    let image = TempImage::new(MIB);
    let disk = open_disk(&image.path, false, "mm-test-serial");
    let (stream, backend, stats) = spawn_counted_backend(disk, Hooks::default());
    stats.limiter.set(limit);
    let memory = TestMemory::new(MEM_BASE, MEM_SIZE).unwrap();
    let mut fe = TestFrontend::connect_wanting(stream, memory, 1, TEST_PROTOCOL_FEATURES).unwrap();
    fe.activate(u64::MAX, &[QUEUE_SIZE]).unwrap();
    (Rig { fe, image, backend: Some(backend) }, stats)
}

/// Queues `n` 4 KiB writes (sector 8·i, pattern seed `seed + i`), kicks
/// once, and waits for all of them; returns how long that took.
fn write_batch(rig: &mut Rig, n: usize, seed: u8) -> Duration {
    let started = Instant::now();
    let mut pending = Vec::new();
    for i in 0..n {
        let (head, status, _) = rig.queue_request(T_OUT, 8 * i as u64, &pattern(4096, seed + i as u8), 0);
        pending.push((head, status));
    }
    rig.fe.kick(0).unwrap();
    let used = rig.fe.wait_used(0, n, Duration::from_secs(20)).unwrap();
    let elapsed = started.elapsed();
    // Every request completed, once, in order, and reached the disk.
    let heads: Vec<u32> = used.iter().map(|u| u.id).collect();
    assert_eq!(heads, pending.iter().map(|(h, _)| u32::from(*h)).collect::<Vec<_>>());
    for (i, (_, status)) in pending.iter().enumerate() {
        assert_eq!(rig.fe.mem().read_obj::<u8>(*status).unwrap(), S_OK);
        assert_eq!(rig.image.read(8 * 512 * i as u64, 4096), pattern(4096, seed + i as u8));
    }
    elapsed
}

#[test]
fn an_ops_limit_spaces_requests_and_loses_none() {
    // 50 requests/s: the bucket holds 5 (100 ms), the other 15 come one
    // every 20 ms: 300 ms.
    let (mut rig, stats) = limited_rig(RateLimit { ops_per_sec: 50, ..Default::default() });
    let elapsed = write_batch(&mut rig, 20, 1);
    assert!(elapsed >= Duration::from_millis(270) && elapsed < Duration::from_millis(600), "{elapsed:?}");
    assert!(stats.limiter.throttled_total() >= 1);
    assert_eq!(stats.in_flight(), 0);
    rig.assert_still_serving();
}

#[test]
fn a_bandwidth_limit_holds_and_changes_live() {
    // 1 MiB/s, 8 reads of 64 KiB: the first from the full bucket (102 KiB),
    // the other 410 KiB at 1 MiB/s: 0.4 s.
    let (mut rig, stats) = limited_rig(RateLimit { bytes_per_sec: MIB, ..Default::default() });
    let started = Instant::now();
    for _ in 0..8 {
        assert_eq!(rig.request(T_IN, 0, &[], 64 << 10).status, S_OK);
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(350) && elapsed < Duration::from_millis(700), "{elapsed:?}");

    // Live, to 10 MiB/s: the same reads take a tenth as long.
    stats.limiter.set(RateLimit { bytes_per_sec: 10 * MIB, ..Default::default() });
    assert_eq!(stats.limiter.limit().bytes_per_sec, 10 * MIB);
    let started = Instant::now();
    for _ in 0..8 {
        assert_eq!(rig.request(T_IN, 0, &[], 64 << 10).status, S_OK);
    }
    assert!(started.elapsed() < Duration::from_millis(150), "{:?}", started.elapsed());
}

#[test]
fn lifting_a_limit_releases_requests_already_waiting() {
    // 2 requests/s: of 10 queued writes, 1 passes, the rest would take 4.5 s.
    let (mut rig, stats) = limited_rig(RateLimit { ops_per_sec: 2, ..Default::default() });
    let lifter = Arc::clone(&stats);
    let lift = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        lifter.limiter.set(RateLimit::default());
    });
    let elapsed = write_batch(&mut rig, 10, 40);
    lift.join().unwrap();
    assert!(elapsed >= Duration::from_millis(180) && elapsed < Duration::from_millis(1000), "{elapsed:?}");
    assert_eq!(stats.limiter.throttled_total(), 1, "one request waited, however often it was retried");
}
