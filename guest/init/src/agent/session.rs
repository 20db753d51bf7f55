//! One exec connection: read the request, start the command, then shuttle
//! frames and bytes with `poll` until the command has ended and its output
//! is out.
//!
//! Everything is non-blocking in one loop, so a command that never reads
//! its stdin cannot hold up a signal or resize frame, and a host that stops
//! reading stops the command's output (we stop reading its pipes) instead
//! of growing a buffer.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use std::sync::Arc;

use mm_exec_protocol::{ExecRequest, ExitStatus, Frame, GuestIdentity, Workload, decode};

use super::children::{ExitNotice, Reaper};
use super::identity;
use super::spawn::{self, Child, ChildIo};
use crate::workload::handover::HANDOVER;

/// How long a host may take to send its request (or identity, or workload).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// After the command exits, output still open (a background job holding
/// the pipe or terminal) is read until it is quiet this long.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);
/// How long the last frames may take to leave.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from the command per output frame.
const CHUNK: usize = 32 * 1024;
/// Stop reading the host while this much stdin waits for the command.
const STDIN_HIGH: usize = 256 * 1024;
/// Stop reading the command while this much output waits for the host.
const OUTPUT_HIGH: usize = 256 * 1024;
/// The terminal's end-of-file character (^D): how stdin EOF reaches a
/// command on a tty, whose master cannot be half-closed.
const VEOF: u8 = 4;

/// Serves one connection to the end. Never panics on the host's input;
/// every failure becomes an error frame or a closed connection.
pub fn serve(sock: OwnedFd, reaper: Reaper) {
    let mut conn = Conn { sock, inbuf: Vec::new(), outbuf: Vec::new() };
    if spawn::set_nonblocking(&conn.sock).is_err() {
        return;
    }
    let request = match conn.read_first() {
        Ok(Some(First::Request(req))) => req,
        Ok(Some(First::Identity(new))) => return conn.answer(identity::apply(&new)),
        Ok(Some(First::Workload(workload))) => return conn.answer(HANDOVER.offer(workload)),
        Ok(None) => return,
        Err(message) => return conn.fail(&message),
    };
    let child = match spawn::spawn(&request, reaper) {
        Ok(child) => child,
        Err(message) => return conn.fail(&message),
    };
    Pump::new(conn, child).run();
}

/// The connection to the host, with its buffers.
struct Conn {
    sock: OwnedFd,
    /// Bytes from the host not yet decoded into frames.
    inbuf: Vec<u8>,
    /// Encoded frames not yet sent.
    outbuf: Vec<u8>,
}

/// What a connection is for, from its first frame.
enum First {
    Request(ExecRequest),
    Identity(GuestIdentity),
    /// PID 1's workload, for a guest waiting for it (`mm.wait`).
    Workload(Workload),
}

enum ReadResult {
    Data,
    Closed,
    WouldBlock,
}

impl Conn {
    fn read_some(&mut self) -> ReadResult {
        let mut buf = [0u8; 64 * 1024];
        match read_fd(self.sock.as_fd(), &mut buf) {
            Ok(0) => ReadResult::Closed,
            Ok(n) => {
                self.inbuf.extend_from_slice(&buf[..n]);
                ReadResult::Data
            }
            Err(e) if would_block(&e) => ReadResult::WouldBlock,
            Err(_) => ReadResult::Closed,
        }
    }

    /// Sends what it can; false when the host is gone.
    fn write_some(&mut self) -> bool {
        while !self.outbuf.is_empty() {
            // SAFETY: send(2) from the live buffer; MSG_NOSIGNAL turns a
            // closed peer into EPIPE rather than a signal.
            let n = unsafe {
                libc::send(
                    self.sock.as_raw_fd(),
                    self.outbuf.as_ptr().cast(),
                    self.outbuf.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return would_block(&e);
            }
            self.outbuf.drain(..n as usize);
        }
        true
    }

    fn queue(&mut self, frame: &Frame) {
        // Our frames are chunked below the limit, so this cannot fail; an
        // error frame too long to send is cut (messages are short anyway).
        if frame.encode_into(&mut self.outbuf).is_err()
            && let Frame::Error(message) = frame
        {
            let _ = Frame::Error(message.chars().take(1000).collect()).encode_into(&mut self.outbuf);
        }
    }

    /// Sends everything queued, waiting up to `timeout`.
    fn flush(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.outbuf.is_empty() {
            if !self.write_some() {
                return false;
            }
            if self.outbuf.is_empty() {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || poll_one(self.sock.as_fd(), libc::POLLOUT, left) == 0 {
                return false;
            }
        }
        true
    }

    /// The first frame, which must be a request, an identity or a workload:
    /// `Ok(None)` if the host left without one, `Err` with the message for
    /// an error frame.
    fn read_first(&mut self) -> Result<Option<First>, String> {
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            match decode(&self.inbuf) {
                Ok(Some((frame, used))) => {
                    let first = match frame {
                        Frame::Request(req) => First::Request(req),
                        Frame::Identity(new) => First::Identity(new),
                        Frame::Workload(workload) => First::Workload(workload),
                        _ => {
                            return Err(
                                "protocol error: the first frame must be a request, an identity or a workload".into()
                            );
                        }
                    };
                    self.inbuf.drain(..used);
                    return Ok(Some(first));
                }
                Ok(None) => {}
                Err(e) => return Err(format!("protocol error: {e}")),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("no request within 30 s".into());
            }
            if poll_one(self.sock.as_fd(), libc::POLLIN, left) > 0 {
                match self.read_some() {
                    ReadResult::Closed => return Ok(None),
                    ReadResult::Data | ReadResult::WouldBlock => {}
                }
            }
        }
    }

    /// The one answer to an identity or a workload: exited 0 when done,
    /// else an error frame with the message; then the connection ends.
    fn answer(mut self, done: Result<(), String>) {
        let answer = match done {
            Ok(()) => Frame::Exit(ExitStatus::Exited(0)),
            Err(message) => Frame::Error(message),
        };
        self.queue(&answer);
        self.finish();
    }

    /// Sends an error frame and ends the connection.
    fn fail(self, message: &str) {
        self.answer(Err(message.to_string()));
    }

    /// Flushes, half-closes, and waits briefly for the host to close, so
    /// that unread input from the host does not turn our close into a
    /// reset that could overtake the last frames.
    fn finish(mut self) {
        if !self.flush(FLUSH_TIMEOUT) {
            return;
        }
        // SAFETY: shutdown(2) on our socket.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_WR) };
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || poll_one(self.sock.as_fd(), libc::POLLIN, left) == 0 {
                return;
            }
            self.inbuf.clear();
            if let ReadResult::Closed = self.read_some() {
                return;
            }
        }
    }
}

fn would_block(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}

fn read_fd(fd: BorrowedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: read(2) into our live buffer.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Polls one fd; the number of ready fds (0 on timeout or error).
fn poll_one(fd: BorrowedFd, events: libc::c_short, timeout: Duration) -> i32 {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
    // SAFETY: poll(2) on one pollfd we own.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) }.max(0)
}

/// Whose readiness a pollfd entry reports.
#[derive(Clone, Copy)]
enum Slot {
    Host,
    Stdin,
    Output(usize),
    Exit,
}

/// A running command and its connection.
struct Pump {
    conn: Conn,
    pid: i32,
    exit: Arc<ExitNotice>,
    /// Where stdin goes: the stdin pipe or the terminal master.
    stdin: Option<OwnedFd>,
    stdin_buf: Vec<u8>,
    /// Close the stdin pipe once `stdin_buf` is empty.
    stdin_eof: bool,
    /// Output fds, and whether each is stderr.
    outputs: Vec<(OwnedFd, bool)>,
    /// The terminal master, for resize and the foreground process group.
    tty: Option<OwnedFd>,
    exited: Option<mm_exec_protocol::ExitStatus>,
    /// After the exit: when open output counts as quiet.
    quiet_at: Instant,
}

impl Pump {
    fn new(conn: Conn, child: Child) -> Self {
        let Child { pid, io, exit } = child;
        let (stdin, outputs, tty) = match io {
            ChildIo::Pipes { stdin, stdout, stderr } => (Some(stdin), vec![(stdout, false), (stderr, true)], None),
            ChildIo::Pty { master } => {
                let out = master.try_clone().ok();
                let tty = master.try_clone().ok();
                (Some(master), out.map(|o| vec![(o, false)]).unwrap_or_default(), tty)
            }
        };
        Pump {
            conn,
            pid,
            exit,
            stdin,
            stdin_buf: Vec::new(),
            stdin_eof: false,
            outputs,
            tty,
            exited: None,
            quiet_at: Instant::now(),
        }
    }

    fn run(mut self) {
        // Frames that arrived with the request.
        if !self.handle_frames() {
            return self.hang_up();
        }
        let mut buf = vec![0u8; CHUNK];
        loop {
            if self.exited.is_some() && (self.outputs.is_empty() || Instant::now() >= self.quiet_at) {
                break;
            }
            let mut fds = Vec::with_capacity(5);
            let mut slots = Vec::with_capacity(5);
            let mut host_events = 0;
            if self.stdin_buf.len() < STDIN_HIGH {
                host_events |= libc::POLLIN;
            }
            if !self.conn.outbuf.is_empty() {
                host_events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd { fd: self.conn.sock.as_raw_fd(), events: host_events, revents: 0 });
            slots.push(Slot::Host);
            if let Some(stdin) = &self.stdin
                && !self.stdin_buf.is_empty()
            {
                fds.push(libc::pollfd { fd: stdin.as_raw_fd(), events: libc::POLLOUT, revents: 0 });
                slots.push(Slot::Stdin);
            }
            if self.conn.outbuf.len() < OUTPUT_HIGH {
                for (i, (fd, _)) in self.outputs.iter().enumerate() {
                    fds.push(libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
                    slots.push(Slot::Output(i));
                }
            }
            if self.exited.is_none() {
                fds.push(libc::pollfd { fd: self.exit.fd().as_raw_fd(), events: libc::POLLIN, revents: 0 });
                slots.push(Slot::Exit);
            }
            let timeout = match self.exited {
                Some(_) => self.quiet_at.saturating_duration_since(Instant::now()).as_millis() as i32,
                None => -1,
            };
            // SAFETY: poll(2) over our vector of pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n <= 0 {
                continue; // timeout (checked at the top) or EINTR
            }
            let mut closed_outputs = Vec::new();
            for (pfd, slot) in fds.iter().zip(&slots) {
                if pfd.revents == 0 {
                    continue;
                }
                match *slot {
                    Slot::Host => {
                        if pfd.revents & libc::POLLOUT != 0 && !self.conn.write_some() {
                            return self.hang_up();
                        }
                        if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                            match self.conn.read_some() {
                                ReadResult::Closed => return self.hang_up(),
                                ReadResult::Data if !self.handle_frames() => return self.hang_up(),
                                _ => {}
                            }
                        }
                    }
                    Slot::Stdin => self.write_stdin(),
                    Slot::Output(i) => {
                        let (fd, is_stderr) = &self.outputs[i];
                        match read_fd(fd.as_fd(), &mut buf) {
                            Ok(0) => closed_outputs.push(i),
                            Ok(n) => {
                                let data = buf[..n].to_vec();
                                let frame = if *is_stderr { Frame::Stderr(data) } else { Frame::Stdout(data) };
                                self.conn.queue(&frame);
                                self.quiet_at = Instant::now() + OUTPUT_GRACE;
                            }
                            Err(e) if would_block(&e) => {}
                            // EIO: the terminal's last slave fd closed.
                            Err(_) => closed_outputs.push(i),
                        }
                    }
                    Slot::Exit => {
                        self.exited = self.exit.get();
                        if self.exited.is_some() {
                            self.quiet_at = Instant::now() + OUTPUT_GRACE;
                            self.stdin_buf.clear();
                            if self.tty.is_none() {
                                self.stdin = None;
                            }
                        }
                    }
                }
            }
            for i in closed_outputs.into_iter().rev() {
                self.outputs.remove(i);
            }
            if !self.conn.write_some() {
                return self.hang_up();
            }
        }
        let status = self.exited.expect("the loop ends only after the exit");
        self.conn.queue(&Frame::Exit(status));
        let Pump { conn, .. } = self;
        conn.finish();
    }

    /// Acts on every complete frame from the host; false on a protocol
    /// error (after queueing an error frame).
    fn handle_frames(&mut self) -> bool {
        loop {
            let (frame, used) = match decode(&self.conn.inbuf) {
                Ok(Some(decoded)) => decoded,
                Ok(None) => return true,
                Err(e) => return self.protocol_error(e.to_string()),
            };
            self.conn.inbuf.drain(..used);
            match frame {
                Frame::Stdin(data) => {
                    if self.stdin.is_some() && !self.stdin_eof && self.exited.is_none() {
                        self.stdin_buf.extend_from_slice(&data);
                    }
                }
                Frame::StdinEof => {
                    if self.tty.is_some() {
                        self.stdin_buf.push(VEOF);
                    } else {
                        self.stdin_eof = true;
                        if self.stdin_buf.is_empty() {
                            self.stdin = None;
                        }
                    }
                }
                Frame::Resize { rows, cols } => {
                    if let Some(tty) = &self.tty {
                        let _ = spawn::set_window_size(tty, rows, cols);
                    }
                }
                Frame::Signal(sig) => self.signal(sig),
                Frame::Request(_) => return self.protocol_error("a second request".into()),
                Frame::Identity(_) => return self.protocol_error("an identity after the request".into()),
                Frame::Workload(_) => return self.protocol_error("a workload after the request".into()),
                Frame::Stdout(_) | Frame::Stderr(_) | Frame::Exit(_) | Frame::Error(_) => {
                    return self.protocol_error("a guest-to-host frame from the host".into());
                }
            }
        }
    }

    fn protocol_error(&mut self, what: String) -> bool {
        self.conn.queue(&Frame::Error(format!("protocol error: {what}")));
        false
    }

    fn write_stdin(&mut self) {
        let Some(fd) = &self.stdin else { return };
        // SAFETY: write(2) from our live buffer to the child's stdin.
        let n = unsafe { libc::write(fd.as_raw_fd(), self.stdin_buf.as_ptr().cast(), self.stdin_buf.len()) };
        if n >= 0 {
            self.stdin_buf.drain(..n as usize);
            if self.stdin_buf.is_empty() && self.stdin_eof {
                self.stdin = None;
            }
            return;
        }
        let e = io::Error::last_os_error();
        if !would_block(&e) {
            // EPIPE: the command closed its stdin; what it did not read
            // is dropped, as a pipe would.
            self.stdin_buf.clear();
            if self.tty.is_none() {
                self.stdin = None;
            }
        }
    }

    /// Delivers a host's signal: to the terminal's foreground process
    /// group with a tty (where ^C would go), else to the command.
    fn signal(&self, sig: i32) {
        if !(1..=64).contains(&sig) || self.exited.is_some() {
            return;
        }
        let target = match &self.tty {
            Some(tty) => {
                let mut pgrp: libc::pid_t = 0;
                // SAFETY: TIOCGPGRP writes one pid_t to the pointer we pass.
                let ok = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCGPGRP, &mut pgrp) } == 0;
                if ok && pgrp > 0 { -pgrp } else { -self.pid }
            }
            None => self.pid,
        };
        // SAFETY: kill(2) with a pid or group we started and have not seen end.
        unsafe { libc::kill(target, sig) };
    }

    /// The host went away (or broke the protocol) before the command
    /// ended: hang up on the command's process group, as a terminal does,
    /// and stop. Its status still reaches the reaper.
    fn hang_up(mut self) {
        if self.exited.is_none() {
            // SAFETY: kill(2) on the process group of our own child, which
            // has not been reported as ended (so its pid is not reused).
            unsafe {
                libc::kill(-self.pid, libc::SIGHUP);
                libc::kill(-self.pid, libc::SIGCONT);
            }
        }
        let _ = self.conn.flush(Duration::from_millis(100));
    }
}
