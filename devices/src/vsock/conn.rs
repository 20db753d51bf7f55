//! One stream connection between a guest port and a host unix socket: the
//! per-connection state machine, with no knowledge of queues or epoll.
//!
//! Inputs are guest packets (`on_guest_packet`), host socket readiness
//! (`on_host_event`) and time (`tick`); outputs are packets for the guest,
//! pulled one at a time by the muxer (`next_packet`) when an rx buffer is
//! free, and the socket events the connection wants (`interest`). Data for
//! the guest is read from the host socket only at that moment, straight
//! into the packet, so nothing is buffered host→guest and the guest's
//! credit bounds what we read.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::credit::{BUF_ALLOC, Credit};
use super::packet::{Header, Op, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// How long the guest has to accept a host-initiated connection, and to
/// let us finish flushing to the host socket once it closed its end.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The host end of a connection: a unix stream in the device, anything
/// readable, writable and half-closable in tests.
pub trait HostStream: Read + Write + AsRawFd {
    fn shutdown_write(&self) -> io::Result<()>;
}

impl HostStream for UnixStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// A connection's identity: the host-side port and the guest's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: our REQUEST is queued or sent; awaiting RESPONSE.
    Connecting,
    /// Data flows, in each direction until that direction is shut down.
    Established,
    /// A RST for the guest is queued; after it the connection is gone.
    Resetting,
    /// Gone: the muxer drops it, closing the host socket.
    Closed,
}

/// Control packets waiting for an rx buffer.
const P_REQUEST: u8 = 1;
const P_RESPONSE: u8 = 2;
const P_CREDIT_UPDATE: u8 = 4;
const P_CREDIT_REQUEST: u8 = 8;

pub struct Connection<S> {
    key: ConnKey,
    state: State,
    stream: S,
    credit: Credit,
    pending: u8,
    /// The host socket may have bytes or EOF for the guest.
    readable: bool,
    /// The host socket gave EOF (or hung up).
    host_eof: bool,
    host_hup: bool,
    /// We shut down writing to the host socket.
    host_write_shut: bool,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    credit_requested: bool,
    /// Guest bytes not yet written to the host socket (within our credit).
    tx_buf: VecDeque<u8>,
    deadline: Option<Instant>,
}

impl<S: HostStream> Connection<S> {
    fn new(key: ConnKey, stream: S, state: State, pending: u8) -> Self {
        Connection {
            key,
            state,
            stream,
            credit: Credit::new(BUF_ALLOC),
            pending,
            readable: false,
            host_eof: false,
            host_hup: false,
            host_write_shut: false,
            peer_shutdown: 0,
            credit_requested: false,
            tx_buf: VecDeque::new(),
            deadline: None,
        }
    }

    /// A host client asked (CONNECT) for the guest's `key.peer_port`.
    pub fn connect_to_guest(key: ConnKey, stream: S, now: Instant) -> Self {
        let mut c = Connection::new(key, stream, State::Connecting, P_REQUEST);
        c.deadline = Some(now + CONNECT_TIMEOUT);
        c
    }

    /// The guest's REQUEST reached a host listener, which `stream` is
    /// connected to: answer RESPONSE.
    pub fn accept_from_guest(key: ConnKey, stream: S, request: &Header) -> Self {
        let mut c = Connection::new(key, stream, State::Established, P_RESPONSE);
        c.credit.update_peer(request.buf_alloc, request.fwd_cnt);
        c
    }

    pub fn key(&self) -> ConnKey {
        self.key
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn stream(&self) -> &S {
        &self.stream
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Ends the connection with a RST to the guest.
    pub fn reset(&mut self) {
        if matches!(self.state, State::Closed | State::Resetting) {
            return;
        }
        // A REQUEST the guest never saw needs no RST.
        self.state = if self.pending & P_REQUEST != 0 { State::Closed } else { State::Resetting };
        self.pending = 0;
        self.readable = false;
        self.tx_buf = VecDeque::new();
        self.deadline = None;
    }

    /// A packet from the guest for this connection (cids already checked).
    pub fn on_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        if matches!(self.state, State::Closed | State::Resetting) {
            if hdr.op() == Some(Op::Rst) {
                self.state = State::Closed; // no need to send ours
            }
            return;
        }
        self.credit.update_peer(hdr.buf_alloc, hdr.fwd_cnt);
        if self.credit.peer_free() > 0 {
            self.credit_requested = false;
        }
        match (self.state, hdr.op()) {
            (_, Some(Op::Rst)) => self.state = State::Closed,
            (State::Connecting, Some(Op::Response)) if self.pending & P_REQUEST == 0 => self.established(),
            (State::Established, Some(Op::Rw)) => self.on_rw(payload),
            (State::Established, Some(Op::Shutdown)) => self.on_shutdown(hdr.flags),
            (State::Established, Some(Op::CreditUpdate)) => {}
            (State::Established, Some(Op::CreditRequest)) => self.pending |= P_CREDIT_UPDATE,
            // REQUEST for a live connection, RESPONSE out of turn, data
            // before RESPONSE, unknown ops: the guest broke the protocol.
            _ => self.reset(),
        }
        self.settle();
    }

    /// The guest accepted our REQUEST: tell the host client which port it
    /// got (Firecracker's hybrid vsock protocol).
    fn established(&mut self) {
        let reply = super::hostside::ok_reply(self.key.local_port);
        match self.stream.write(reply.as_bytes()) {
            Ok(n) if n == reply.len() => {
                self.state = State::Established;
                self.deadline = None;
            }
            // A fresh socket's buffer takes a dozen bytes; if not, the
            // client is gone or broken.
            _ => self.reset(),
        }
    }

    fn on_rw(&mut self, payload: &[u8]) {
        if self.peer_shutdown & SHUTDOWN_SEND != 0 || self.credit.received(payload.len() as u32).is_err() {
            return self.reset();
        }
        let mut written = 0;
        if self.tx_buf.is_empty() {
            match self.stream.write(payload) {
                Ok(n) => written = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return self.reset(),
            }
        }
        self.credit.forwarded(written as u32);
        self.tx_buf.extend(&payload[written..]);
        if self.credit.update_due() {
            self.pending |= P_CREDIT_UPDATE;
        }
    }

    fn on_shutdown(&mut self, flags: u32) {
        self.peer_shutdown |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            // The guest closed: deliver what it sent, then reset (Linux
            // waits for our RST to finish its close).
            self.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
        }
        self.after_flush();
    }

    /// Writes buffered guest bytes to the host socket.
    fn flush(&mut self) {
        while !self.tx_buf.is_empty() {
            let (chunk, _) = self.tx_buf.as_slices();
            match self.stream.write(chunk) {
                Ok(0) => return self.reset(),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.credit.forwarded(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return self.reset(),
            }
        }
        if self.credit.update_due() {
            self.pending |= P_CREDIT_UPDATE;
        }
        self.after_flush();
    }

    /// Passes the guest's shutdown on to the host socket once everything
    /// before it was written.
    fn after_flush(&mut self) {
        if !self.tx_buf.is_empty() || self.state != State::Established {
            return;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            let _ = self.stream.shutdown_write();
            self.host_write_shut = true;
        }
        if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            self.reset();
        }
    }

    /// Readiness of the host socket.
    pub fn on_host_event(&mut self, events: EventSet) {
        match self.state {
            State::Closed | State::Resetting => return,
            State::Connecting => {
                // The client went away before the guest answered. (Only a
                // full hang-up: a client may half-close after its request.)
                if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                    self.reset();
                }
                return self.settle();
            }
            State::Established => {}
        }
        if events.contains(EventSet::ERROR) {
            self.reset();
            return self.settle();
        }
        if events.contains(EventSet::HANG_UP) {
            self.host_hup = true;
            if !self.tx_buf.is_empty() {
                // Nobody will read what the guest sent.
                self.reset();
                return self.settle();
            }
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP) {
            self.readable = true;
        }
        if events.contains(EventSet::OUT) {
            self.flush();
        }
        self.settle();
    }

    /// Resets a connection whose deadline passed.
    pub fn tick(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| now >= d) {
            self.reset();
        }
    }

    fn can_read_host(&self) -> bool {
        self.state == State::Established && !self.host_eof && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// Asks the guest for credit when host data waits for it.
    fn settle(&mut self) {
        if self.readable && self.can_read_host() && self.credit.peer_free() == 0 && !self.credit_requested {
            self.pending |= P_CREDIT_REQUEST;
            self.credit_requested = true;
        }
    }

    /// The host socket events this connection wants now (empty: take it
    /// out of epoll, because hang-ups are reported even then and would
    /// spin).
    pub fn interest(&self) -> EventSet {
        match self.state {
            State::Connecting => EventSet::HANG_UP,
            State::Established if !(self.host_hup || self.host_eof && self.host_write_shut) => {
                let mut ev = EventSet::empty();
                if self.can_read_host() && !self.readable && self.credit.peer_free() > 0 {
                    ev |= EventSet::IN;
                }
                if !self.tx_buf.is_empty() {
                    ev |= EventSet::OUT;
                }
                ev
            }
            _ => EventSet::empty(),
        }
    }

    /// True when `next_packet` has something for the guest.
    pub fn has_packet(&self) -> bool {
        self.state == State::Resetting
            || self.pending != 0
            || (self.readable && self.can_read_host() && self.credit.peer_free() > 0)
    }

    fn header(&mut self, op: Op) -> Header {
        let mut h = Header::host_to_guest(op, self.key.local_port, self.key.peer_port);
        (h.buf_alloc, h.fwd_cnt) = self.credit.stamp();
        // Every header carries our credit, so no separate update is due.
        self.pending &= !P_CREDIT_UPDATE;
        h
    }

    /// The next packet for the guest, with at most `max_payload` bytes of
    /// data in `buf` (cids are the muxer's to fill in).
    pub fn next_packet(&mut self, buf: &mut Vec<u8>, max_payload: usize) -> Option<Header> {
        buf.clear();
        let pkt = self.produce(buf, max_payload);
        self.settle();
        pkt
    }

    fn produce(&mut self, buf: &mut Vec<u8>, max_payload: usize) -> Option<Header> {
        match self.state {
            State::Closed => return None,
            State::Resetting => {
                self.state = State::Closed;
                return Some(self.header(Op::Rst));
            }
            _ => {}
        }
        for (bit, op) in [
            (P_REQUEST, Op::Request),
            (P_RESPONSE, Op::Response),
            (P_CREDIT_UPDATE, Op::CreditUpdate),
            (P_CREDIT_REQUEST, Op::CreditRequest),
        ] {
            if self.pending & bit != 0 {
                self.pending &= !bit;
                return Some(self.header(op));
            }
        }
        let room = self.credit.peer_free().min(max_payload as u32) as usize;
        if !self.readable || !self.can_read_host() || room == 0 {
            return None;
        }
        buf.resize(room, 0);
        let result = self.stream.read(&mut buf[..room]);
        match result {
            Ok(0) => {
                buf.clear();
                self.readable = false;
                self.host_eof = true;
                // EOF: the host sends no more; a hang-up: it takes no more either.
                let mut h = self.header(Op::Shutdown);
                h.flags = SHUTDOWN_SEND | if self.host_hup { SHUTDOWN_RCV } else { 0 };
                Some(h)
            }
            Ok(n) => {
                buf.truncate(n);
                self.credit.sent(n as u32);
                let mut h = self.header(Op::Rw);
                h.len = n as u32;
                Some(h)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                buf.clear();
                self.readable = false;
                None
            }
            Err(_) => {
                buf.clear();
                self.state = State::Closed;
                self.pending = 0;
                Some(self.header(Op::Rst))
            }
        }
    }
}

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
