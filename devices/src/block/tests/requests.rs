//! Well-formed requests, and the vhost-user set-up around them.

use std::time::Duration;

use super::*;
use crate::block::config::{SEG_MAX, device_features};
use crate::test_frontend::{Buf, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, Desc};
use std::sync::Arc;

const MIB: u64 = 1 << 20;

#[test]
fn write_then_read_round_trip() {
    let mut rig = Rig::new(MIB, false);
    let data = pattern(8192, 7);
    let reply = rig.request(T_OUT, 3, &data, 0);
    assert_eq!((reply.status, reply.used_len), (S_OK, 1));
    assert_eq!(rig.image.read(3 * 512, data.len()), data, "the image holds what the guest wrote");

    let reply = rig.request(T_IN, 3, &[], 8192);
    assert_eq!((reply.status, reply.used_len), (S_OK, 8193));
    assert_eq!(reply.data, data);
}

#[test]
fn read_sees_the_image_and_the_last_sector() {
    let mut rig = Rig::new(MIB, false);
    let last = MIB / 512 - 1;
    rig.image.write(last * 512, &pattern(512, 9));
    let reply = rig.request(T_IN, last, &[], 512);
    assert_eq!(reply.status, S_OK);
    assert_eq!(reply.data, pattern(512, 9));
}

#[test]
fn data_split_across_buffers_and_header_split_too() {
    let mut rig = Rig::new(MIB, false);
    let data = pattern(2048, 3);
    let h = header(T_OUT, 10);
    // Header in two pieces, data in three uneven pieces (any layout).
    let h1 = rig.buffer(&h[..5]);
    let h2 = rig.buffer(&h[5..]);
    let d1 = rig.buffer(&data[..100]);
    let d2 = rig.buffer(&data[100..1500]);
    let d3 = rig.buffer(&data[1500..]);
    let status = rig.status_buffer();
    let bufs = [
        Buf::out(h1, 5),
        Buf::out(h2, 11),
        Buf::out(d1, 100),
        Buf::out(d2, 1400),
        Buf::out(d3, 548),
        Buf::input(status, 1),
    ];
    let head = rig.fe.add_chain(0, &bufs).unwrap();
    rig.fe.kick(0).unwrap();
    assert_eq!(rig.wait_one(head), 1);
    assert_eq!(rig.fe.mem().read_obj::<u8>(status).unwrap(), S_OK);
    assert_eq!(rig.image.read(10 * 512, 2048), data);
}

#[test]
fn flush_reaches_the_disk() {
    let mut rig = Rig::new(MIB, false);
    assert_eq!(rig.request(T_OUT, 0, &pattern(512, 1), 0).status, S_OK);
    let reply = rig.request(T_FLUSH, 0, &[], 0);
    assert_eq!((reply.status, reply.used_len), (S_OK, 1));
}

#[test]
fn get_id_returns_the_serial() {
    let mut rig = Rig::new(MIB, false);
    let reply = rig.request(T_GET_ID, 0, &[], 20);
    assert_eq!((reply.status, reply.used_len), (S_OK, 21));
    let mut expected = b"mm-test-serial".to_vec();
    expected.resize(20, 0);
    assert_eq!(reply.data, expected);
}

#[test]
fn discard_punches_and_keeps_size() {
    let mut rig = Rig::new(MIB, false);
    assert_eq!(rig.request(T_OUT, 8, &pattern(4096, 2), 0).status, S_OK);
    let reply = rig.request(T_DISCARD, 0, &range(8, 8, 0), 0);
    assert_eq!((reply.status, reply.used_len), (S_OK, 1));
    assert_eq!(std::fs::metadata(&rig.image.path).unwrap().len(), MIB);
    // Discard with the unmap flag is not allowed (virtio 1.2, 5.2.6.2).
    assert_eq!(rig.request(T_DISCARD, 0, &range(8, 8, 1), 0).status, S_UNSUPP);
    // Two ranges: more than the advertised max_discard_seg.
    let two = [range(0, 1, 0), range(2, 1, 0)].concat();
    assert_eq!(rig.request(T_DISCARD, 0, &two, 0).status, S_UNSUPP);
    // Past the end.
    assert_eq!(rig.request(T_DISCARD, 0, &range(MIB / 512, 1, 0), 0).status, S_IOERR);
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    let mut rig = Rig::new(MIB, false);
    for (sector, flags) in [(16u64, 0u32), (32, 1)] {
        assert_eq!(rig.request(T_OUT, sector, &pattern(4096, 5), 0).status, S_OK);
        let reply = rig.request(T_WRITE_ZEROES, 0, &range(sector + 1, 6, flags), 0);
        assert_eq!((reply.status, reply.used_len), (S_OK, 1), "flags {flags}");
        let read = rig.request(T_IN, sector, &[], 4096).data;
        assert_eq!(read[..512], pattern(4096, 5)[..512], "sector before the range untouched");
        assert!(read[512..3584].iter().all(|&b| b == 0), "range zeroed (flags {flags})");
        assert_eq!(read[3584..], pattern(4096, 5)[3584..], "sector after the range untouched");
    }
    assert_eq!(rig.request(T_WRITE_ZEROES, 0, &range(0, 1, 2), 0).status, S_UNSUPP, "unknown flag");
}

#[test]
fn read_only_rejects_writes_discard_and_write_zeroes() {
    let mut rig = Rig::new(MIB, true);
    rig.image.write(0, &pattern(512, 4));
    assert_ne!(rig.fe.offered_features & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
    assert_eq!(rig.request(T_OUT, 0, &pattern(512, 8), 0).status, S_IOERR);
    assert_eq!(rig.request(T_DISCARD, 0, &range(0, 1, 0), 0).status, S_IOERR);
    assert_eq!(rig.request(T_WRITE_ZEROES, 0, &range(0, 1, 0), 0).status, S_IOERR);
    assert_eq!(rig.image.read(0, 512), pattern(512, 4), "image unchanged");
    let reply = rig.request(T_IN, 0, &[], 512);
    assert_eq!((reply.status, reply.data), (S_OK, pattern(512, 4)));
    assert_eq!(rig.request(T_FLUSH, 0, &[], 0).status, S_OK);
}

#[test]
fn unknown_request_type_is_unsupported() {
    let mut rig = Rig::new(MIB, false);
    for kind in [2u32, 14, 15, 0x8000_0000, u32::MAX] {
        let reply = rig.request(kind, 0, &[], 0);
        assert_eq!((reply.status, reply.used_len), (S_UNSUPP, 1), "type {kind:#x}");
    }
}

#[test]
fn config_space_reports_capacity_and_limits() {
    let mut rig = Rig::new(3 * MIB + 100, false);
    let config = rig.fe.get_config(0, 60).unwrap();
    let capacity = u64::from_le_bytes(config[0..8].try_into().unwrap());
    assert_eq!(capacity, 3 * MIB / 512, "partial trailing sector not exposed");
    assert_eq!(u32::from_le_bytes(config[12..16].try_into().unwrap()), SEG_MAX);
    assert_eq!(u32::from_le_bytes(config[20..24].try_into().unwrap()), 512);
    // A window into the middle, and one past the end (refused).
    assert_eq!(rig.fe.get_config(12, 4).unwrap(), config[12..16]);
    assert!(rig.fe.get_config(0, 4096).is_err());
}

#[test]
fn features_and_protocol_features() {
    let rig = Rig::new(MIB, false);
    let offered = rig.fe.offered_features;
    assert_eq!(offered, device_features(false));
    for bit in [32u32, 30, 9, 13, 14, 2, 6] {
        assert_ne!(offered & (1 << bit), 0, "feature bit {bit}");
    }
    assert_eq!(offered & (1 << 5), 0, "not read-only");
    use vhost::vhost_user::message::VhostUserProtocolFeatures as P;
    assert!(rig.fe.protocol.contains(P::CONFIG | P::REPLY_ACK | P::INFLIGHT_SHMFD));
}

#[test]
fn rings_start_disabled_until_enabled() {
    let mut rig = Rig::connected(MIB, false, Hooks::default());
    rig.fe.set_features(u64::MAX).unwrap();
    rig.fe.set_mem_table().unwrap();
    rig.fe.layout_vring(0, QUEUE_SIZE).unwrap();
    rig.fe.configure_vring(0, 0).unwrap();
    let (head, status, _) = rig.queue_request(T_IN, 0, &[], 512);
    rig.fe.kick(0).unwrap();
    assert!(rig.fe.wait_used(0, 1, Duration::from_millis(300)).unwrap().is_empty(), "disabled ring served");
    rig.fe.enable_vring(0, true).unwrap();
    assert_eq!(rig.wait_one(head), 513);
    assert_eq!(rig.fe.mem().read_obj::<u8>(status).unwrap(), S_OK);
}

#[test]
fn indirect_descriptor_table() {
    let mut rig = Rig::new(MIB, false);
    let data = pattern(1024, 6);
    let hdr = rig.buffer(&header(T_OUT, 4));
    let d = rig.buffer(&data);
    let status = rig.status_buffer();
    let entries = [
        Desc { addr: hdr.0, len: 16, flags: DESC_F_NEXT, next: 1 },
        Desc { addr: d.0, len: 1024, flags: DESC_F_NEXT, next: 2 },
        Desc { addr: status.0, len: 1, flags: DESC_F_WRITE, next: 0 },
    ];
    let table = rig.fe.alloc(16 * 3).unwrap();
    for (i, e) in entries.iter().enumerate() {
        write_raw_desc(&rig, table.0 + 16 * i as u64, *e);
    }
    let [head] = rig.fe.reserve_descs(0, 1).unwrap()[..] else { unreachable!() };
    rig.fe.write_desc(0, head, Desc { addr: table.0, len: 48, flags: DESC_F_INDIRECT, next: 0 }).unwrap();
    rig.fe.push_avail(0, head).unwrap();
    rig.fe.kick(0).unwrap();
    assert_eq!(rig.wait_one(head), 1);
    assert_eq!(rig.fe.mem().read_obj::<u8>(status).unwrap(), S_OK);
    assert_eq!(rig.image.read(4 * 512, 1024), data);
}

/// Writes a descriptor anywhere in guest memory (indirect tables).
pub fn write_raw_desc(rig: &Rig, at: u64, d: Desc) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
    raw[8..12].copy_from_slice(&d.len.to_le_bytes());
    raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
    raw[14..16].copy_from_slice(&d.next.to_le_bytes());
    rig.fe.mem().write_slice(&raw, GuestAddress(at)).unwrap();
}

#[test]
fn many_requests_in_one_kick_and_ring_wraparound() {
    let mut rig = Rig::new(MIB, false);
    // 3 rounds of 40 requests in a 64-entry ring wrap the indices.
    for round in 0..3u8 {
        let mut heads = Vec::new();
        for i in 0..10u64 {
            let (head, _, _) = rig.queue_request(T_OUT, i, &pattern(512, round + i as u8), 0);
            heads.push(head);
        }
        rig.fe.kick(0).unwrap();
        let used = rig.fe.wait_used(0, heads.len(), TIMEOUT).unwrap();
        let mut ids: Vec<u32> = used.iter().map(|u| u.id).collect();
        ids.sort_unstable();
        let mut expected: Vec<u32> = heads.iter().map(|&h| u32::from(h)).collect();
        expected.sort_unstable();
        assert_eq!(ids, expected);
        for i in 0..10u64 {
            assert_eq!(rig.image.read(i * 512, 512), pattern(512, round + i as u8));
        }
    }
}

#[test]
fn write_through_when_flush_is_not_negotiated() {
    use std::sync::atomic::Ordering;
    let image = TempImage::new(MIB);
    let disk = open_disk(&image.path, false, "wt");
    let (stream, backend) = spawn_backend(Arc::clone(&disk), Hooks::default());
    let memory = crate::test_frontend::TestMemory::new(MEM_BASE, MEM_SIZE).unwrap();
    let fe = TestFrontend::connect(stream, memory, 1).unwrap();
    let mut rig = Rig { fe, image, backend: Some(backend) };
    rig.fe.activate(!(1u64 << 9), &[QUEUE_SIZE]).unwrap();
    assert!(disk.writethrough.load(Ordering::Relaxed), "no FLUSH: write-through");
    assert_eq!(rig.request(T_OUT, 1, &pattern(512, 3), 0).status, S_OK);
    assert_eq!(rig.image.read(512, 512), pattern(512, 3));
}

#[test]
fn serve_block_accepts_the_queued_connection() {
    use std::os::unix::net::{UnixListener, UnixStream};
    // The broker's pattern: listen, connect the front end, unlink the path,
    // hand over the listener.
    let image = TempImage::new(MIB);
    let path = std::env::temp_dir().join(format!("mm-block-listen-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let stream = UnixStream::connect(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let config = crate::block::BlockConfig {
        image: image.path.clone(),
        overlay: None,
        read_only: false,
        serial: Some("listen".into()),
        lazy_memory: false,
        rate_limit: Default::default(),
        test: Default::default(),
    };
    let backend = std::thread::spawn(move || crate::block::serve_block(config, listener));
    let memory = crate::test_frontend::TestMemory::new(MEM_BASE, MEM_SIZE).unwrap();
    let fe = TestFrontend::connect(stream, memory, 1).unwrap();
    let mut rig = Rig { fe, image, backend: Some(backend) };
    rig.fe.activate(u64::MAX, &[QUEUE_SIZE]).unwrap();
    let reply = rig.request(T_GET_ID, 0, &[], 20);
    assert_eq!(&reply.data[..6], b"listen");
}
