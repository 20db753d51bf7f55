//! Routes packets between the guest and host unix sockets: owns the
//! listener at the device's socket path, clients still sending their
//! CONNECT line, and every connection, all watched by one epoll of its own
//! (nested in the daemon's), plus a timer for deadlines.
//!
//! Packets for the guest come from two places: resets answering packets
//! for connections that do not exist (`resets`), and connections with
//! something to send (`ready`, round robin).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::conn::{ConnKey, Connection, State};
use super::hostside::{Handshake, Progress};
use super::packet::{HOST_CID, Header, Op, TYPE_STREAM};

/// Limits on what a guest or host clients can make us hold.
const MAX_CONNECTIONS: usize = 1024;
const MAX_HANDSHAKES: usize = 64;
/// Resets queued for the guest before we stop taking its tx packets.
pub const MAX_RESETS: usize = 256;
/// Host-side ports for host-initiated connections come from here up,
/// clear of the low ports guest services and host listeners use.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Each process starts at a random port in this span above
/// [`FIRST_LOCAL_PORT`] rather than at the first: a guest resumed from a
/// snapshot may still hold sockets of its old device's connections (reset,
/// but not yet released), and a new connection from the same host port to
/// the same guest port would land on one of those and be reset (seen: a
/// resumed guest's agent refusing every exec for minutes).
const LOCAL_PORT_SPAN: u32 = 1 << 29;

/// A random first host port, from std's per-process random hash keys (the
/// seccomp policy already allows their getrandom).
fn first_local_port() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    FIRST_LOCAL_PORT + (random % u64::from(LOCAL_PORT_SPAN)) as u32
}
const TICK: Duration = Duration::from_millis(250);

const LISTENER_TOKEN: u64 = u64::MAX;
const TIMER_TOKEN: u64 = u64::MAX - 1;

#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("{path} exists and is not a socket")]
    PathInUse { path: PathBuf },
    #[error("listening on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("epoll/timerfd set-up: {0}")]
    Setup(#[source] io::Error),
}

struct Entry {
    conn: Connection<UnixStream>,
    /// What the socket is registered for; `None`: not in epoll.
    registered: Option<EventSet>,
    /// In `ready`.
    queued: bool,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    conns: HashMap<ConnKey, Entry>,
    by_fd: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    ready: VecDeque<ConnKey>,
    resets: VecDeque<Header>,
    next_local_port: u32,
}

/// Binds `path`, replacing a stale socket left by a previous instance.
fn listen(path: &Path) -> Result<UnixListener, MuxerError> {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && !meta.file_type().is_socket()
    {
        return Err(MuxerError::PathInUse { path: path.into() });
    }
    let listener = mm_protocols::socket_path::bind_listening(path, |p| UnixListener::bind(p))
        .map_err(|source| MuxerError::Listen { path: path.into(), source })?;
    listener.set_nonblocking(true).map_err(|source| MuxerError::Listen { path: path.into(), source })?;
    Ok(listener)
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, MuxerError> {
        let listener = listen(&uds_path)?;
        let epoll = Epoll::new().map_err(MuxerError::Setup)?;
        let timer = TimerFd::new().map_err(|e| MuxerError::Setup(e.into()))?;
        for (fd, token) in [(listener.as_raw_fd(), LISTENER_TOKEN), (timer.as_raw_fd(), TIMER_TOKEN)] {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token)).map_err(MuxerError::Setup)?;
        }
        Ok(Muxer {
            guest_cid,
            uds_path,
            listener,
            epoll,
            timer,
            timer_armed: false,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            ready: VecDeque::new(),
            resets: VecDeque::new(),
            next_local_port: first_local_port(),
        })
    }

    /// The epoll fd to nest in the daemon's: readable when a socket or the
    /// timer needs `process_events`.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// True when `next_packet` has something for the guest.
    pub fn has_packet(&self) -> bool {
        !self.resets.is_empty() || !self.ready.is_empty()
    }

    /// True when so many resets wait for rx buffers that we should stop
    /// reading the guest's tx queue (each tx packet may add one).
    pub fn resets_full(&self) -> bool {
        self.resets.len() >= MAX_RESETS
    }

    /// Handles everything ready on our epoll, without blocking.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: epoll: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    LISTENER_TOKEN => self.accept_clients(),
                    TIMER_TOKEN => self.on_tick(),
                    token => self.on_socket(token as RawFd, event.event_set()),
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) if self.handshakes.len() < MAX_HANDSHAKES => {
                    let Ok(hs) = Handshake::new(stream, Instant::now()) else { continue };
                    let fd = hs.stream().as_raw_fd();
                    if self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, fd as u64)).is_ok() {
                        self.handshakes.insert(fd, hs);
                        self.arm_timer();
                    }
                }
                Ok(_) => tracing::warn!("vsock: too many host clients mid-handshake; dropping one"),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return, // WouldBlock, or a client gone already
            }
        }
    }

    fn on_socket(&mut self, fd: RawFd, events: EventSet) {
        if let Some(key) = self.by_fd.get(&fd).copied() {
            if let Some(entry) = self.conns.get_mut(&key) {
                entry.conn.on_host_event(events);
            }
            return self.sync(key);
        }
        let Some(hs) = self.handshakes.get_mut(&fd) else { return };
        match hs.advance() {
            Progress::Pending => {}
            Progress::Failed => self.drop_handshake(fd),
            Progress::Connect(port) => {
                let Some(hs) = self.take_handshake(fd) else { return };
                self.connect_to_guest(hs.into_stream(), port);
            }
        }
    }

    fn take_handshake(&mut self, fd: RawFd) -> Option<Handshake> {
        let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.handshakes.remove(&fd)
    }

    fn drop_handshake(&mut self, fd: RawFd) {
        drop(self.take_handshake(fd));
    }

    /// A host client asked for the guest's `port`.
    fn connect_to_guest(&mut self, stream: UnixStream, port: u32) {
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: connection limit reached; refusing a host client");
            return;
        }
        let local_port = self.alloc_local_port();
        let key = ConnKey { local_port, peer_port: port };
        self.insert(Connection::connect_to_guest(key, stream, Instant::now()));
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.local_port == port) {
                return port;
            }
        }
    }

    fn insert(&mut self, conn: Connection<UnixStream>) {
        let key = conn.key();
        self.by_fd.insert(conn.stream().as_raw_fd(), key);
        self.conns.insert(key, Entry { conn, registered: None, queued: false });
        self.sync(key);
    }

    /// Brings epoll, the ready queue and the timer in line with what a
    /// connection now wants, and forgets it once closed.
    fn sync(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.get_mut(&key) else { return };
        let fd = entry.conn.stream().as_raw_fd();
        if entry.conn.state() == State::Closed {
            if entry.registered.is_some() {
                let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            self.by_fd.remove(&fd);
            self.conns.remove(&key);
            return;
        }
        // An empty interest means out of epoll: hang-ups are reported
        // whatever the mask, and would wake us for nothing.
        let want = Some(entry.conn.interest()).filter(|w| !w.is_empty());
        let op = match (entry.registered, want) {
            (old, new) if old == new => None,
            (None, Some(_)) => Some(ControlOperation::Add),
            (Some(_), Some(_)) => Some(ControlOperation::Modify),
            (Some(_), None) => Some(ControlOperation::Delete),
            (None, None) => None,
        };
        if let Some(op) = op {
            let event = EpollEvent::new(want.unwrap_or(EventSet::empty()), fd as u64);
            match self.epoll.ctl(op, fd, event) {
                Ok(()) => entry.registered = want,
                Err(e) => {
                    tracing::warn!("vsock: epoll for port {}: {e}", key.local_port);
                    entry.conn.reset();
                }
            }
        }
        if entry.conn.has_packet() && !entry.queued {
            entry.queued = true;
            self.ready.push_back(key);
        }
        if entry.conn.deadline().is_some() {
            self.arm_timer();
        }
    }

    fn arm_timer(&mut self) {
        if !self.timer_armed && self.timer.reset(TICK, Some(TICK)).is_ok() {
            self.timer_armed = true;
        }
    }

    fn on_tick(&mut self) {
        let _ = self.timer.wait();
        let now = Instant::now();
        let expired: Vec<RawFd> = self.handshakes.iter().filter(|(_, hs)| hs.expired(now)).map(|(fd, _)| *fd).collect();
        for fd in expired {
            self.drop_handshake(fd);
        }
        let timed: Vec<ConnKey> =
            self.conns.iter().filter(|(_, e)| e.conn.deadline().is_some()).map(|(k, _)| *k).collect();
        for key in &timed {
            if let Some(entry) = self.conns.get_mut(key) {
                entry.conn.tick(now);
            }
            self.sync(*key);
        }
        let still_needed = !self.handshakes.is_empty() || self.conns.values().any(|e| e.conn.deadline().is_some());
        if !still_needed && self.timer.clear().is_ok() {
            self.timer_armed = false;
        }
    }

    /// Forgets every connection (closing its host socket) and queued
    /// packet: the guest driver reset the device, so its side of them is
    /// gone. Clients still sending CONNECT lines are kept.
    pub fn reset_all(&mut self) {
        for (_, entry) in self.conns.drain() {
            if entry.registered.is_some() {
                let fd = entry.conn.stream().as_raw_fd();
                let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        }
        self.by_fd.clear();
        self.ready.clear();
        self.resets.clear();
    }

    /// A packet from the guest's tx queue.
    pub fn on_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            tracing::debug!("vsock: dropped a packet from cid {} to cid {}", hdr.src_cid, hdr.dst_cid);
            return;
        }
        let key = ConnKey { local_port: hdr.dst_port, peer_port: hdr.src_port };
        if hdr.type_ == TYPE_STREAM
            && let Some(entry) = self.conns.get_mut(&key)
        {
            entry.conn.on_guest_packet(hdr, payload);
            return self.sync(key);
        }
        match hdr.op() {
            Some(Op::Rst) => {}
            Some(Op::Request) if hdr.type_ == TYPE_STREAM => self.connect_to_host(hdr, key),
            _ => self.push_reset(hdr.reset_reply()),
        }
    }

    /// The guest connects to host port P: the listener at `<uds>_<P>`.
    fn connect_to_host(&mut self, hdr: &Header, key: ConnKey) {
        if self.conns.len() >= MAX_CONNECTIONS {
            return self.push_reset(hdr.reset_reply());
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        match super::hostside::connect_nonblocking(Path::new(&path)) {
            Ok(stream) => self.insert(Connection::accept_from_guest(key, stream, hdr)),
            Err(e) => {
                tracing::debug!("vsock: guest port {} to {path:?}: {e}", hdr.src_port);
                self.push_reset(hdr.reset_reply());
            }
        }
    }

    fn push_reset(&mut self, hdr: Header) {
        if self.resets.len() < MAX_RESETS * 2 {
            self.resets.push_back(hdr);
        }
    }

    /// The next packet for the guest, with at most `max_payload` bytes of
    /// data in `buf`.
    pub fn next_packet(&mut self, buf: &mut Vec<u8>, max_payload: usize) -> Option<Header> {
        let mut pkt = self.resets.pop_front().inspect(|_| buf.clear());
        // Each connection in `ready` either yields a packet or leaves it.
        let mut budget = self.ready.len();
        while pkt.is_none() && budget > 0 {
            budget -= 1;
            let Some(key) = self.ready.pop_front() else { break };
            let Some(entry) = self.conns.get_mut(&key) else { continue };
            entry.queued = false;
            pkt = entry.conn.next_packet(buf, max_payload);
            self.sync(key);
        }
        pkt.map(|mut h| {
            h.src_cid = HOST_CID;
            h.dst_cid = self.guest_cid;
            h
        })
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
#[path = "muxer_tests.rs"]
mod tests;
