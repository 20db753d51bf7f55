//! Muxer tests: real unix sockets on the host side, packets in and out
//! directly (no queues).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use super::*;
use crate::vsock::testutil::{TempDir, wait_readable};

const CID: u64 = 7;

fn pump(m: &mut Muxer) {
    wait_readable(m.epoll_fd(), Duration::from_millis(500));
    m.process_events();
}

fn from_guest(op: Op, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op: op as u16,
        buf_alloc: 65536,
        ..Header::default()
    }
}

fn next(m: &mut Muxer) -> Option<Header> {
    m.next_packet(&mut Vec::new(), 4096)
}

#[test]
fn host_client_connects_to_a_guest_port() {
    let dir = TempDir::new("mux");
    let mut m = Muxer::new(CID, dir.path("v.sock")).unwrap();
    let mut client = UnixStream::connect(dir.path("v.sock")).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    let mut req = None;
    for _ in 0..10 {
        pump(&mut m);
        req = next(&mut m);
        if req.is_some() {
            break;
        }
    }
    let req = req.expect("REQUEST for the guest");
    assert_eq!((req.op(), req.src_cid, req.dst_cid, req.dst_port), (Some(Op::Request), HOST_CID, CID, 52));
    let host_port = req.src_port;
    assert!(host_port >= 1 << 30);

    m.on_guest_packet(&from_guest(Op::Response, 52, host_port), &[]);
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {host_port}\n"));

    m.on_guest_packet(&Header { len: 5, ..from_guest(Op::Rw, 52, host_port) }, b"hello");
    let mut got = [0u8; 5];
    reader.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");

    client.write_all(b"world").unwrap();
    pump(&mut m);
    let mut buf = Vec::new();
    let h = m.next_packet(&mut buf, 4096).unwrap();
    assert_eq!((h.op(), h.src_port, h.dst_port, &buf[..]), (Some(Op::Rw), host_port, 52, &b"world"[..]));

    // A second client gets another host port.
    let mut c2 = UnixStream::connect(dir.path("v.sock")).unwrap();
    c2.write_all(b"CONNECT 52\n").unwrap();
    pump(&mut m);
    pump(&mut m);
    let req2 = next(&mut m).unwrap();
    assert_eq!(req2.op(), Some(Op::Request));
    assert_ne!(req2.src_port, host_port);
}

#[test]
fn guest_connects_to_a_host_listener() {
    let dir = TempDir::new("mux");
    let mut m = Muxer::new(CID, dir.path("v.sock")).unwrap();
    let listener = UnixListener::bind(dir.path("v.sock_1024")).unwrap();
    m.on_guest_packet(&from_guest(Op::Request, 5000, 1024), &[]);
    let (mut server, _) = listener.accept().unwrap();
    let h = next(&mut m).unwrap();
    assert_eq!((h.op(), h.src_port, h.dst_port, h.dst_cid), (Some(Op::Response), 1024, 5000, CID));
    server.write_all(b"hi").unwrap();
    pump(&mut m);
    let mut buf = Vec::new();
    let h = m.next_packet(&mut buf, 4096).unwrap();
    assert_eq!((h.op(), &buf[..]), (Some(Op::Rw), &b"hi"[..]));

    // No listener on port 1025: reset.
    m.on_guest_packet(&from_guest(Op::Request, 5001, 1025), &[]);
    let h = next(&mut m).unwrap();
    assert_eq!((h.op(), h.src_port, h.dst_port), (Some(Op::Rst), 1025, 5001));
}

#[test]
fn stray_packets() {
    let dir = TempDir::new("mux");
    let mut m = Muxer::new(CID, dir.path("v.sock")).unwrap();
    // Wrong source or destination cid: dropped silently.
    m.on_guest_packet(&Header { src_cid: 9, ..from_guest(Op::Request, 1, 2) }, &[]);
    m.on_guest_packet(&Header { dst_cid: 1, ..from_guest(Op::Request, 1, 2) }, &[]);
    assert!(!m.has_packet());
    // No such connection: reset, except for a reset.
    m.on_guest_packet(&from_guest(Op::Rst, 1, 2), &[]);
    assert!(!m.has_packet());
    for op in [Op::Rw, Op::Response, Op::Shutdown, Op::CreditUpdate, Op::CreditRequest] {
        m.on_guest_packet(&from_guest(op, 1, 2), &[]);
        assert_eq!(next(&mut m).unwrap().op(), Some(Op::Rst), "{op:?}");
    }
    // Not a stream socket.
    m.on_guest_packet(&Header { type_: 2, ..from_guest(Op::Request, 1, 2) }, &[]);
    assert_eq!(next(&mut m).unwrap().op(), Some(Op::Rst));
    // A flood of them fills the reset backlog, which is bounded.
    for i in 0..(MAX_RESETS * 4) as u32 {
        m.on_guest_packet(&from_guest(Op::Rw, i, 2), &[]);
    }
    assert!(m.resets_full());
    let mut n = 0;
    while next(&mut m).is_some() {
        n += 1;
    }
    assert_eq!(n, MAX_RESETS * 2);
}

#[test]
fn bad_connect_line_closes_the_client() {
    let dir = TempDir::new("mux");
    let mut m = Muxer::new(CID, dir.path("v.sock")).unwrap();
    let mut client = UnixStream::connect(dir.path("v.sock")).unwrap();
    client.write_all(b"HELLO\n").unwrap();
    pump(&mut m);
    pump(&mut m);
    client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).unwrap(), 0, "closed without a reply");
    assert!(!m.has_packet());
}

#[test]
fn guest_that_never_answers_times_out() {
    let dir = TempDir::new("mux");
    let mut m = Muxer::new(CID, dir.path("v.sock")).unwrap();
    let mut client = UnixStream::connect(dir.path("v.sock")).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    pump(&mut m);
    pump(&mut m);
    assert_eq!(next(&mut m).unwrap().op(), Some(Op::Request));
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(4) && !m.has_packet() {
        pump(&mut m);
    }
    assert_eq!(next(&mut m).unwrap().op(), Some(Op::Rst));
    client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(client.read(&mut [0u8; 8]).unwrap(), 0);
}

#[test]
fn refuses_to_replace_a_regular_file() {
    let dir = TempDir::new("mux");
    std::fs::write(dir.path("v.sock"), b"").unwrap();
    assert!(matches!(Muxer::new(CID, dir.path("v.sock")), Err(MuxerError::PathInUse { .. })));
    std::fs::remove_file(dir.path("v.sock")).unwrap();
    // A stale socket is replaced.
    drop(UnixListener::bind(dir.path("v.sock")).unwrap());
    let m = Muxer::new(CID, dir.path("v.sock")).unwrap();
    drop(m);
    assert!(!dir.path("v.sock").exists(), "socket removed on drop");
}

#[test]
fn reset_all_closes_host_sockets() {
    let dir = TempDir::new("mux");
    let mut m = Muxer::new(CID, dir.path("v.sock")).unwrap();
    let listener = UnixListener::bind(dir.path("v.sock_1024")).unwrap();
    m.on_guest_packet(&from_guest(Op::Request, 5000, 1024), &[]);
    let (mut server, _) = listener.accept().unwrap();
    assert!(m.has_packet());
    m.reset_all();
    assert!(!m.has_packet());
    server.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(server.read(&mut [0u8; 4]).unwrap(), 0);
    // The same ports can connect again.
    m.on_guest_packet(&from_guest(Op::Request, 5000, 1024), &[]);
    assert_eq!(next(&mut m).unwrap().op(), Some(Op::Response));
}
