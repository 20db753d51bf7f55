//! Connection state machine tests, with a unix socket pair as the host end.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::*;
use crate::vsock::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

const KEY: ConnKey = ConnKey { local_port: 1 << 30, peer_port: 52 };

fn guest(op: Op, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: 3,
        dst_cid: 2,
        src_port: KEY.peer_port,
        dst_port: KEY.local_port,
        type_: TYPE_STREAM,
        op: op as u16,
        buf_alloc,
        fwd_cnt,
        ..Header::default()
    }
}

fn pair() -> (UnixStream, UnixStream) {
    let (client, device) = UnixStream::pair().unwrap();
    device.set_nonblocking(true).unwrap();
    client.set_nonblocking(true).unwrap();
    (client, device)
}

fn next(c: &mut Connection<UnixStream>) -> Option<Header> {
    c.next_packet(&mut Vec::new(), 4096)
}

/// A host-initiated connection the guest accepted with `buf_alloc`.
fn established(buf_alloc: u32) -> (UnixStream, Connection<UnixStream>) {
    let (mut client, device) = pair();
    let mut c = Connection::connect_to_guest(KEY, device, Instant::now());
    assert_eq!(c.state(), State::Connecting);
    assert_eq!(c.interest(), EventSet::HANG_UP);
    let req = next(&mut c).unwrap();
    assert_eq!(
        (req.op(), req.src_port, req.dst_port, req.buf_alloc),
        (Some(Op::Request), KEY.local_port, 52, BUF_ALLOC)
    );
    assert!(!c.has_packet());
    c.on_guest_packet(&guest(Op::Response, buf_alloc, 0), &[]);
    assert_eq!(c.state(), State::Established);
    assert_eq!(c.deadline(), None);
    let mut ok = [0u8; 14];
    client.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"OK 1073741824\n");
    (client, c)
}

#[test]
fn host_data_is_bounded_by_guest_credit() {
    let (mut client, mut c) = established(10_000);
    assert_eq!(c.interest(), EventSet::IN);
    client.write_all(&[7u8; 30_000]).unwrap();
    c.on_host_event(EventSet::IN);
    assert_eq!(c.interest(), EventSet::empty(), "no IN while data waits for rx buffers");
    let mut buf = Vec::new();
    let mut got = 0;
    while let Some(h) = c.next_packet(&mut buf, 4096) {
        if h.op() == Some(Op::CreditRequest) {
            break;
        }
        assert_eq!(h.op(), Some(Op::Rw));
        assert_eq!(h.len as usize, buf.len());
        got += buf.len();
    }
    assert_eq!(got, 10_000);
    assert!(!c.has_packet(), "credit request sent once, then quiet");
    // The guest consumed 6000 bytes.
    c.on_guest_packet(&guest(Op::CreditUpdate, 10_000, 6000), &[]);
    assert!(c.has_packet());
    let h = c.next_packet(&mut buf, 65536).unwrap();
    assert_eq!((h.op(), h.len), (Some(Op::Rw), 6000));
}

#[test]
fn guest_data_reaches_the_host_and_credit_flows_back() {
    let (mut client, mut c) = established(65536);
    let chunk = vec![9u8; 40_000];
    client.set_nonblocking(false).unwrap();
    let mut got = vec![0u8; 40_000];
    c.on_guest_packet(&guest(Op::Rw, 65536, 0), &chunk);
    client.read_exact(&mut got).unwrap();
    assert_eq!(got, chunk);
    assert!(!c.has_packet(), "40 000 bytes is less than a quarter of our buffer");
    c.on_guest_packet(&guest(Op::Rw, 65536, 0), &chunk);
    client.read_exact(&mut got).unwrap();
    // 80 000 forwarded, over a quarter of 256 KiB: a credit update is due.
    let h = next(&mut c).unwrap();
    assert_eq!((h.op(), h.fwd_cnt, h.buf_alloc), (Some(Op::CreditUpdate), 80_000, BUF_ALLOC));
    c.on_guest_packet(&guest(Op::CreditRequest, 65536, 0), &[]);
    assert_eq!(next(&mut c).unwrap().op(), Some(Op::CreditUpdate));
}

#[test]
fn full_host_socket_buffers_then_flushes() {
    let (mut client, mut c) = established(65536);
    small_send_buffer(c.stream());
    let chunk = vec![1u8; 60_000];
    let mut sent = 0;
    // Fill the socket; what does not fit waits in the connection.
    for _ in 0..4 {
        c.on_guest_packet(&guest(Op::Rw, 65536, 0), &chunk);
        sent += chunk.len();
    }
    assert_eq!(c.state(), State::Established);
    assert!(c.interest().contains(EventSet::OUT));
    client.set_nonblocking(false).unwrap();
    let mut got = 0;
    let mut buf = vec![0u8; 65536];
    while got < sent {
        got += client.read(&mut buf).unwrap();
        c.on_host_event(EventSet::OUT);
    }
    assert!(!c.interest().contains(EventSet::OUT));
    assert_eq!(c.state(), State::Established);
}

/// Makes the device end's socket fill up after a few dozen KiB.
fn small_send_buffer(s: &UnixStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 16384;
    // SAFETY: setsockopt reads one c_int from a live local.
    let ret = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(ret, 0);
}

#[test]
fn overrun_resets() {
    let (_client, mut c) = established(65536);
    small_send_buffer(c.stream());
    // The client reads nothing; the guest ignores its credit.
    for _ in 0..10 {
        c.on_guest_packet(&guest(Op::Rw, 65536, 0), &[0u8; 65536]);
    }
    assert_eq!(c.state(), State::Resetting);
    assert_eq!(next(&mut c).unwrap().op(), Some(Op::Rst));
    assert_eq!(c.state(), State::Closed);
    assert_eq!(next(&mut c), None);
}

#[test]
fn orderly_close_both_ways() {
    let (mut client, mut c) = established(65536);
    // Host half-closes after some data: the guest gets the data, then SHUTDOWN(SEND).
    client.write_all(b"bye").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    c.on_host_event(EventSet::IN);
    let mut buf = Vec::new();
    let h = c.next_packet(&mut buf, 4096).unwrap();
    assert_eq!((h.op(), &buf[..]), (Some(Op::Rw), &b"bye"[..]));
    let h = c.next_packet(&mut buf, 4096).unwrap();
    assert_eq!((h.op(), h.flags), (Some(Op::Shutdown), SHUTDOWN_SEND));
    assert_eq!(c.interest(), EventSet::empty());
    // The guest can still send; then it shuts down sending: the client sees EOF.
    c.on_guest_packet(&guest(Op::Rw, 65536, 3), b"ack");
    c.on_guest_packet(&Header { flags: SHUTDOWN_SEND, ..guest(Op::Shutdown, 65536, 3) }, &[]);
    client.set_nonblocking(false).unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"ack");
    // The guest closes: we answer RST and are gone.
    c.on_guest_packet(&Header { flags: SHUTDOWN_SEND | SHUTDOWN_RCV, ..guest(Op::Shutdown, 65536, 3) }, &[]);
    assert_eq!(next(&mut c).unwrap().op(), Some(Op::Rst));
    assert_eq!(c.state(), State::Closed);
}

#[test]
fn host_hang_up_tells_the_guest_both_directions() {
    let (client, mut c) = established(65536);
    drop(client);
    c.on_host_event(EventSet::IN | EventSet::HANG_UP);
    assert_eq!(c.interest(), EventSet::empty());
    let h = next(&mut c).unwrap();
    assert_eq!((h.op(), h.flags), (Some(Op::Shutdown), SHUTDOWN_SEND | SHUTDOWN_RCV));
    c.on_guest_packet(&guest(Op::Rst, 65536, 0), &[]);
    assert_eq!(c.state(), State::Closed);
    assert_eq!(next(&mut c), None);
}

#[test]
fn guest_reset_closes_without_reply() {
    let (_client, mut c) = established(65536);
    c.on_guest_packet(&guest(Op::Rst, 0, 0), &[]);
    assert_eq!(c.state(), State::Closed);
    assert_eq!(next(&mut c), None);
}

#[test]
fn protocol_violations_reset() {
    for op in [Op::Request, Op::Response] {
        let (_client, mut c) = established(65536);
        c.on_guest_packet(&guest(op, 65536, 0), &[]);
        assert_eq!(next(&mut c).unwrap().op(), Some(Op::Rst), "{op:?}");
    }
    let (_client, mut c) = established(65536);
    c.on_guest_packet(&Header { op: 42, ..guest(Op::Rw, 65536, 0) }, &[]);
    assert_eq!(next(&mut c).unwrap().op(), Some(Op::Rst));
    // Data after the guest said it would send no more.
    let (_client, mut c) = established(65536);
    c.on_guest_packet(&Header { flags: SHUTDOWN_SEND, ..guest(Op::Shutdown, 65536, 0) }, &[]);
    c.on_guest_packet(&guest(Op::Rw, 65536, 0), b"x");
    assert_eq!(next(&mut c).unwrap().op(), Some(Op::Rst));
    // Data before RESPONSE.
    let (_client, device) = pair();
    let mut c = Connection::connect_to_guest(KEY, device, Instant::now());
    next(&mut c).unwrap();
    c.on_guest_packet(&guest(Op::Rw, 65536, 0), b"x");
    assert_eq!(next(&mut c).unwrap().op(), Some(Op::Rst));
}

#[test]
fn connect_timeout_and_client_hang_up() {
    let (_client, device) = pair();
    let now = Instant::now();
    let mut c = Connection::connect_to_guest(KEY, device, now);
    next(&mut c).unwrap(); // REQUEST sent
    c.tick(now);
    assert_eq!(c.state(), State::Connecting);
    c.tick(now + CONNECT_TIMEOUT);
    assert_eq!(next(&mut c).unwrap().op(), Some(Op::Rst));

    // The client leaves before the guest even saw the REQUEST: no RST.
    let (client, device) = pair();
    let mut c = Connection::connect_to_guest(KEY, device, now);
    drop(client);
    c.on_host_event(EventSet::HANG_UP);
    assert_eq!(c.state(), State::Closed);
    assert_eq!(next(&mut c), None);
}

#[test]
fn guest_initiated_connection_answers_response() {
    let (mut client, device) = pair();
    let req = Header { src_port: 52, dst_port: 1234, ..guest(Op::Request, 8192, 0) };
    let key = ConnKey { local_port: 1234, peer_port: 52 };
    let mut c = Connection::accept_from_guest(key, device, &req);
    let h = next(&mut c).unwrap();
    assert_eq!((h.op(), h.src_port, h.dst_port), (Some(Op::Response), 1234, 52));
    client.write_all(&[5u8; 10_000]).unwrap();
    c.on_host_event(EventSet::IN);
    let mut buf = Vec::new();
    let h = c.next_packet(&mut buf, 65536).unwrap();
    assert_eq!(h.len, 8192, "bounded by the credit in the REQUEST");
}

#[test]
fn hang_up_with_undelivered_guest_data_resets() {
    let (client, mut c) = established(65536);
    small_send_buffer(c.stream());
    for _ in 0..4 {
        c.on_guest_packet(&guest(Op::Rw, 65536, 0), &[0u8; 60_000]);
    }
    drop(client);
    c.on_host_event(EventSet::HANG_UP);
    assert_eq!(next(&mut c).unwrap().op(), Some(Op::Rst));
}
