//! The pure chain walk and request parser, without any vhost-user.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{T_IN, T_OUT, header};
use crate::block::chain::{ChainError, DescTable, Segment, walk};
use crate::block::request::{DiskGeometry, RequestKind, parse};

const BASE: u64 = 0x4000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(BASE), 0x10000)]).unwrap()
}

fn desc(mem: &GuestMemoryMmap, index: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let at = GuestAddress(BASE + 16 * index);
    mem.write_obj(addr, at).unwrap();
    mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
    mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
    mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
}

fn seg(addr: u64, len: u32, writable: bool) -> Segment {
    Segment { addr: GuestAddress(addr), len, writable }
}

const GEOMETRY: DiskGeometry = DiskGeometry { capacity_sectors: 100, read_only: false };

#[test]
fn walk_follows_next_and_stops_loops() {
    let m = mem();
    let table = DescTable { addr: GuestAddress(BASE), queue_size: 4, indirect: false };
    desc(&m, 0, BASE + 0x1000, 16, 1, 2);
    desc(&m, 2, BASE + 0x2000, 1, 2, 0);
    assert_eq!(walk(&m, table, 0).unwrap(), vec![seg(BASE + 0x1000, 16, false), seg(BASE + 0x2000, 1, true)]);
    desc(&m, 2, BASE + 0x2000, 1, 3, 0);
    assert_eq!(walk(&m, table, 0), Err(ChainError::TooLong));
    assert!(matches!(walk(&m, table, 4), Err(ChainError::IndexOutOfRange { .. })));
    desc(&m, 0, 0, 16, 4, 0);
    assert_eq!(walk(&m, table, 0), Err(ChainError::BadIndirect), "indirect not negotiated");
}

#[test]
fn parse_read_request() {
    let m = mem();
    m.write_slice(&header(T_IN, 7), GuestAddress(BASE + 0x1000)).unwrap();
    let segs = [seg(BASE + 0x1000, 16, false), seg(BASE + 0x2000, 1024, true), seg(BASE + 0x3000, 1, true)];
    let request = parse(&m, &segs, &GEOMETRY).unwrap();
    assert_eq!(request.status, GuestAddress(BASE + 0x3000));
    assert_eq!(request.kind, RequestKind::In { sector: 7, data: vec![segs[1]], len: 1024 });
}

#[test]
fn parse_status_sharing_the_data_buffer() {
    let m = mem();
    m.write_slice(&header(T_IN, 0), GuestAddress(BASE + 0x1000)).unwrap();
    // 512 bytes of data and the status byte in one 513-byte buffer.
    let segs = [seg(BASE + 0x1000, 16, false), seg(BASE + 0x2000, 513, true)];
    let request = parse(&m, &segs, &GEOMETRY).unwrap();
    assert_eq!(request.status, GuestAddress(BASE + 0x2000 + 512));
    assert_eq!(request.kind, RequestKind::In { sector: 0, data: vec![seg(BASE + 0x2000, 512, true)], len: 512 });
}

#[test]
fn parse_rejections_carry_the_status_byte() {
    let m = mem();
    m.write_slice(&header(T_OUT, 99), GuestAddress(BASE + 0x1000)).unwrap();
    let segs = [seg(BASE + 0x1000, 16, false), seg(BASE + 0x2000, 1024, false), seg(BASE + 0x3000, 1, true)];
    let rejection = parse(&m, &segs, &GEOMETRY).unwrap_err();
    assert_eq!((rejection.status, rejection.code), (Some(GuestAddress(BASE + 0x3000)), 1));
    let read_only = DiskGeometry { read_only: true, ..GEOMETRY };
    let segs = [seg(BASE + 0x1000, 16, false), seg(BASE + 0x2000, 512, false), seg(BASE + 0x3000, 1, true)];
    m.write_slice(&header(T_OUT, 0), GuestAddress(BASE + 0x1000)).unwrap();
    assert!(parse(&m, &segs, &GEOMETRY).is_ok());
    assert_eq!(parse(&m, &segs, &read_only).unwrap_err().code, 1);
    assert_eq!(parse(&m, &[], &GEOMETRY).unwrap_err().status, None);
}
