//! Hostile descriptor chains: each is answered with VIRTIO_BLK_S_IOERR where
//! a status byte can be written (else returned with used length 0), and the
//! device keeps serving afterwards.

use super::*;
use crate::test_frontend::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, Desc};
use requests_helpers::*;

const MIB: u64 = 1 << 20;

mod requests_helpers {
    use super::*;

    /// One descriptor of a hand-built chain; `next` is a position in the
    /// same list (None ends the chain).
    pub struct Spec {
        pub addr: u64,
        pub len: u32,
        pub writable: bool,
        pub next: Option<usize>,
    }

    pub fn spec(addr: GuestAddress, len: u32, writable: bool, next: Option<usize>) -> Spec {
        Spec { addr: addr.0, len, writable, next }
    }

    /// Writes the chain into free descriptors, makes it available, kicks,
    /// and returns (head, used length).
    pub fn send(rig: &mut Rig, specs: &[Spec]) -> (u16, u32) {
        let idx = rig.fe.reserve_descs(0, specs.len()).unwrap();
        for (i, s) in specs.iter().enumerate() {
            let flags = if s.writable { DESC_F_WRITE } else { 0 } | if s.next.is_some() { DESC_F_NEXT } else { 0 };
            let next = s.next.map_or(0, |p| idx[p]);
            rig.fe.write_desc(0, idx[i], Desc { addr: s.addr, len: s.len, flags, next }).unwrap();
        }
        rig.fe.push_avail(0, idx[0]).unwrap();
        rig.fe.kick(0).unwrap();
        let len = rig.wait_one(idx[0]);
        (idx[0], len)
    }

    pub fn status_of(rig: &Rig, status: GuestAddress) -> u8 {
        rig.fe.mem().read_obj(status).unwrap()
    }
}

fn out_of_memory() -> GuestAddress {
    GuestAddress(MEM_BASE + MEM_SIZE as u64 + 0x1000)
}

#[test]
fn header_too_short() {
    let mut rig = Rig::new(MIB, false);
    let hdr = rig.buffer(&header(T_IN, 0));
    let data = rig.buffer(&[0; 512]);
    let status = rig.status_buffer();
    let (_, len) =
        send(&mut rig, &[spec(hdr, 8, false, Some(1)), spec(data, 512, true, Some(2)), spec(status, 1, true, None)]);
    assert_eq!((len, status_of(&rig, status)), (1, S_IOERR));
    // No header at all: just a status byte.
    let status = rig.status_buffer();
    let (_, len) = send(&mut rig, &[spec(status, 1, true, None)]);
    assert_eq!((len, status_of(&rig, status)), (1, S_IOERR));
    rig.assert_still_serving();
}

#[test]
fn no_writable_status_byte() {
    let mut rig = Rig::new(MIB, false);
    let hdr = rig.buffer(&header(T_OUT, 0));
    let data = rig.buffer(&pattern(512, 1));
    let status = rig.status_buffer();
    // Last descriptor device-readable.
    let (_, len) =
        send(&mut rig, &[spec(hdr, 16, false, Some(1)), spec(data, 512, false, Some(2)), spec(status, 1, false, None)]);
    assert_eq!((len, status_of(&rig, status)), (0, STATUS_UNTOUCHED));
    // Last descriptor writable but empty.
    let (_, len) = send(&mut rig, &[spec(hdr, 16, false, Some(1)), spec(status, 0, true, None)]);
    assert_eq!((len, status_of(&rig, status)), (0, STATUS_UNTOUCHED));
    assert!(rig.image.read(0, 512).iter().all(|&b| b == 0), "nothing written without a status byte");
    rig.assert_still_serving();
}

#[test]
fn data_in_the_wrong_direction() {
    let mut rig = Rig::new(MIB, false);
    let data = rig.buffer(&pattern(512, 1));
    // A read whose data buffer is device-readable.
    let hdr = rig.buffer(&header(T_IN, 0));
    let status = rig.status_buffer();
    let (_, len) =
        send(&mut rig, &[spec(hdr, 16, false, Some(1)), spec(data, 512, false, Some(2)), spec(status, 1, true, None)]);
    assert_eq!((len, status_of(&rig, status)), (1, S_IOERR));
    // A write whose data buffer is device-writable.
    let hdr = rig.buffer(&header(T_OUT, 0));
    let status = rig.status_buffer();
    let (_, len) =
        send(&mut rig, &[spec(hdr, 16, false, Some(1)), spec(data, 512, true, Some(2)), spec(status, 1, true, None)]);
    assert_eq!((len, status_of(&rig, status)), (1, S_IOERR));
    // A readable buffer after a writable one.
    let status = rig.status_buffer();
    let (_, len) = send(
        &mut rig,
        &[
            spec(hdr, 16, false, Some(1)),
            spec(data, 512, true, Some(2)),
            spec(data, 512, false, Some(3)),
            spec(status, 1, true, None),
        ],
    );
    assert_eq!((len, status_of(&rig, status)), (1, S_IOERR));
    // Flush carrying data.
    let hdr = rig.buffer(&header(T_FLUSH, 0));
    let status = rig.status_buffer();
    let (_, len) =
        send(&mut rig, &[spec(hdr, 16, false, Some(1)), spec(data, 512, false, Some(2)), spec(status, 1, true, None)]);
    assert_eq!((len, status_of(&rig, status)), (1, S_IOERR));
    assert!(rig.image.read(0, 512).iter().all(|&b| b == 0));
    rig.assert_still_serving();
}

#[test]
fn out_of_range_and_overflowing_requests() {
    let mut rig = Rig::new(MIB, false);
    let sectors = MIB / 512;
    let cases: [(u32, u64, usize); 6] = [
        (T_IN, sectors, 512),            // starts at the end
        (T_IN, sectors - 1, 1024),       // runs past the end
        (T_OUT, sectors - 1, 1024),      // same, writing
        (T_IN, u64::MAX / 512 + 1, 512), // sector * 512 overflows
        (T_OUT, u64::MAX, 512),          // so does this
        (T_IN, 0, 100),                  // not a multiple of 512
    ];
    for (kind, sector, len) in cases {
        let reply = if kind == T_IN {
            rig.request(kind, sector, &[], len as u32)
        } else {
            rig.request(kind, sector, &pattern(len, 3), 0)
        };
        assert_eq!((reply.status, reply.used_len), (S_IOERR, 1), "type {kind} sector {sector} len {len}");
    }
    assert!(rig.image.read(MIB - 512, 512).iter().all(|&b| b == 0));
    rig.assert_still_serving();
}

#[test]
fn looping_chain() {
    let mut rig = Rig::new(MIB, false);
    let hdr = rig.buffer(&header(T_IN, 0));
    let data = rig.buffer(&[0; 512]);
    // hdr -> data -> hdr -> ... never ends.
    let (_, len) = send(&mut rig, &[spec(hdr, 16, false, Some(1)), spec(data, 512, true, Some(0))]);
    assert_eq!(len, 0);
    // A writable self-loop.
    let (_, len) = send(&mut rig, &[spec(data, 512, true, Some(0))]);
    assert_eq!(len, 0);
    rig.assert_still_serving();
}

#[test]
fn next_index_outside_the_table() {
    let mut rig = Rig::new(MIB, false);
    let hdr = rig.buffer(&header(T_IN, 0));
    let [head] = rig.fe.reserve_descs(0, 1).unwrap()[..] else { unreachable!() };
    rig.fe.write_desc(0, head, Desc { addr: hdr.0, len: 16, flags: DESC_F_NEXT, next: QUEUE_SIZE + 5 }).unwrap();
    rig.fe.push_avail(0, head).unwrap();
    rig.fe.kick(0).unwrap();
    assert_eq!(rig.wait_one(head), 0);
    rig.assert_still_serving();
}

#[test]
fn avail_ring_names_a_head_outside_the_table() {
    let mut rig = Rig::new(MIB, false);
    // Nothing can be published for such a head; the ring moves on.
    rig.fe.push_avail(0, QUEUE_SIZE + 1).unwrap();
    rig.fe.push_avail(0, u16::MAX).unwrap();
    rig.assert_still_serving();
}

#[test]
fn buffers_outside_guest_memory() {
    let mut rig = Rig::new(MIB, false);
    let bad = out_of_memory();
    let hdr = rig.buffer(&header(T_IN, 0));
    // Data buffer outside guest memory: IOERR through the good status byte.
    let status = rig.status_buffer();
    let (_, len) =
        send(&mut rig, &[spec(hdr, 16, false, Some(1)), spec(bad, 512, true, Some(2)), spec(status, 1, true, None)]);
    assert_eq!((len, status_of(&rig, status)), (1, S_IOERR));
    // Data buffer straddling the end of guest memory.
    let edge = GuestAddress(MEM_BASE + MEM_SIZE as u64 - 256);
    let status = rig.status_buffer();
    let (_, len) =
        send(&mut rig, &[spec(hdr, 16, false, Some(1)), spec(edge, 512, true, Some(2)), spec(status, 1, true, None)]);
    assert_eq!((len, status_of(&rig, status)), (1, S_IOERR));
    // Header outside guest memory.
    let data = rig.buffer(&[0; 512]);
    let status = rig.status_buffer();
    let (_, len) =
        send(&mut rig, &[spec(bad, 16, false, Some(1)), spec(data, 512, true, Some(2)), spec(status, 1, true, None)]);
    assert_eq!((len, status_of(&rig, status)), (1, S_IOERR));
    // Status byte outside guest memory: nowhere to answer.
    let (_, len) =
        send(&mut rig, &[spec(hdr, 16, false, Some(1)), spec(data, 512, true, Some(2)), spec(bad, 1, true, None)]);
    assert_eq!(len, 0);
    // Addresses that overflow.
    let wrap = GuestAddress(u64::MAX - 4);
    let (_, len) = send(&mut rig, &[spec(hdr, 16, false, Some(1)), spec(wrap, 16, true, None)]);
    assert_eq!(len, 0);
    let status = rig.status_buffer();
    let (_, len) = send(&mut rig, &[spec(wrap, 16, false, Some(1)), spec(status, 1, true, None)]);
    assert_eq!((len, status_of(&rig, status)), (1, S_IOERR));
    rig.assert_still_serving();
}

#[test]
fn bad_indirect_tables() {
    let mut rig = Rig::new(MIB, false);
    let hdr = rig.buffer(&header(T_IN, 0));
    let status = rig.status_buffer();
    let table = rig.fe.alloc(64).unwrap();
    let cases = [
        // Length not a multiple of 16.
        (Desc { addr: table.0, len: 24, flags: DESC_F_INDIRECT, next: 0 }, None),
        // Indirect and next at once.
        (Desc { addr: table.0, len: 32, flags: DESC_F_INDIRECT | DESC_F_NEXT, next: 1 }, None),
        // Table outside guest memory.
        (Desc { addr: out_of_memory().0, len: 32, flags: DESC_F_INDIRECT, next: 0 }, None),
        // Nested indirect.
        (
            Desc { addr: table.0, len: 32, flags: DESC_F_INDIRECT, next: 0 },
            Some(Desc { addr: table.0, len: 32, flags: DESC_F_INDIRECT, next: 0 }),
        ),
        // A loop inside the table.
        (
            Desc { addr: table.0, len: 32, flags: DESC_F_INDIRECT, next: 0 },
            Some(Desc { addr: hdr.0, len: 16, flags: DESC_F_NEXT, next: 0 }),
        ),
        // next beyond the table.
        (
            Desc { addr: table.0, len: 32, flags: DESC_F_INDIRECT, next: 0 },
            Some(Desc { addr: hdr.0, len: 16, flags: DESC_F_NEXT, next: 2 }),
        ),
    ];
    for (i, (head_desc, first_entry)) in cases.into_iter().enumerate() {
        if let Some(entry) = first_entry {
            super::requests::write_raw_desc(&rig, table.0, entry);
        }
        super::requests::write_raw_desc(
            &rig,
            table.0 + 16,
            Desc { addr: status.0, len: 1, flags: DESC_F_WRITE, next: 0 },
        );
        let [head] = rig.fe.reserve_descs(0, 1).unwrap()[..] else { unreachable!() };
        rig.fe.write_desc(0, head, head_desc).unwrap();
        rig.fe.push_avail(0, head).unwrap();
        rig.fe.kick(0).unwrap();
        assert_eq!(rig.wait_one(head), 0, "case {i}");
        assert_eq!(status_of(&rig, status), STATUS_UNTOUCHED, "case {i}");
    }
    rig.assert_still_serving();
}

#[test]
fn hostile_avail_index_does_not_wedge_the_back_end() {
    let mut rig = Rig::new(MIB, false);
    // The driver claims far more buffers than the ring holds; the queue
    // refuses to iterate, but the session stays up.
    rig.fe.set_avail_idx(0, 1000).unwrap();
    rig.fe.kick(0).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    rig.fe.set_avail_idx(0, 0).unwrap();
    rig.assert_still_serving();
}

#[test]
fn an_avail_index_left_beyond_the_ring_does_not_spin_the_worker() {
    // EVENT_IDX is acked (Rig::new acks everything): re-enabling
    // notifications says "more" while nothing can be popped. Believing it
    // spun the worker forever; a spinning worker never sees the session end,
    // so the back end's hang-up (Rig's drop joins it) would never return.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rig = Rig::new(MIB, false);
        rig.fe.set_avail_idx(0, QUEUE_SIZE + 1).unwrap();
        rig.fe.kick(0).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(rig);
        let _ = tx.send(());
    });
    rx.recv_timeout(std::time::Duration::from_secs(20)).expect("the back end ended after the hang-up");
}
