//! The exec agent: runs commands for the host over vsock (see the
//! `mm-exec-protocol` crate for the wire format).
//!
//! PID 1 starts it before the workload when the guest has a vsock device.
//! A listener thread accepts connections on [`EXEC_PORT`] and serves each
//! on its own thread (session.rs); commands are forked with pipes or a
//! pseudo-terminal (spawn.rs), and their exit statuses come from PID 1's
//! reaper (children.rs). A connection may carry a new identity instead of a
//! command, for a guest restored from a snapshot under a new name; its
//! thread applies it and answers (identity.rs: random numbers, clock,
//! hostname, network, SSH host key and logins). Or it carries PID 1's own
//! workload, for a guest booted with `mm.wait` (a warm start): its thread
//! hands it to PID 1's main thread, which runs it as it would the command
//! line's, and answers once it has started (workload/handover.rs); the
//! workload is not this connection's, so nothing of it flows back over it.
//! These and the SSH server's thread
//! (ssh/, which starts its commands through spawn.rs too) are mm-init's
//! only threads: PID 1's own work (waiting for the workload, forwarding its
//! signals) stays on the main thread.

pub mod children;
mod identity;
mod session;
pub(crate) mod spawn;
mod user;

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use mm_exec_protocol::{EXEC_PORT, Frame};

pub use children::Reaper;
pub use session::serve;

/// Connections served at once; more get an error frame, so a flood from
/// the host cannot exhaust the guest's threads.
const MAX_SESSIONS: usize = 64;

/// `IOCTL_VM_SOCKETS_GET_LOCAL_CID` on `/dev/vsock` (`_IO(7, 0xb9)`).
const GET_LOCAL_CID: libc::c_ulong = 0x7b9;

/// Whether a vsock device is present: the transport answers a CID other
/// than `VMADDR_CID_ANY`. The kernel's vsock core and virtio transport are
/// built in, so socket creation alone succeeds even without a device.
fn vsock_device_present() -> bool {
    let Ok(dev) = std::fs::File::open("/dev/vsock") else {
        return false;
    };
    let mut cid: u32 = libc::VMADDR_CID_ANY;
    // SAFETY: the ioctl writes one u32 to the pointer we pass.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), GET_LOCAL_CID, &mut cid) };
    rc == 0 && cid != libc::VMADDR_CID_ANY
}

fn listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; we own the result.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid start.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = port;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: bind/listen on our socket with a correctly sized address.
    unsafe {
        if libc::bind(fd, (&addr as *const libc::sockaddr_vm).cast(), len) != 0 || libc::listen(fd, 64) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(sock)
}

/// Starts the agent if the guest has a vsock device; without one it does
/// nothing. Must run on PID 1's main thread before the workload starts.
/// Whether the agent runs: without it no host can hand over a workload.
pub fn start() -> bool {
    if !vsock_device_present() {
        return false;
    }
    // Threads inherit the signal mask: block PID 1's signals first, so
    // they stay pending for its `sigwait` instead of landing on (and being
    // discarded by) an agent thread.
    if let Err(e) = crate::supervise::block_signals() {
        eprintln!("mm-init: exec agent: cannot block signals: {e}");
        return false;
    }
    let listener = match listen(EXEC_PORT) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("mm-init: exec agent: cannot listen on vsock port {EXEC_PORT}: {e}");
            return false;
        }
    };
    let spawned =
        std::thread::Builder::new().name("exec-agent".into()).spawn(move || accept_loop(listener, Reaper::Pid1));
    match spawned {
        Ok(_) => {
            let _ = writeln!(io::stdout(), "mm-init: exec agent listening on vsock port {EXEC_PORT}");
            true
        }
        Err(e) => {
            eprintln!("mm-init: exec agent: cannot start its thread: {e}");
            false
        }
    }
}

static SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// Accepts connections forever, one thread each.
fn accept_loop(listener: OwnedFd, reaper: Reaper) {
    loop {
        // SAFETY: accept4(2) on our listener, no peer address wanted.
        let fd = unsafe {
            libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::ECONNABORTED)) {
                // Out of fds or memory: wait instead of spinning.
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            continue;
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let conn = unsafe { OwnedFd::from_raw_fd(fd) };
        if SESSIONS.fetch_add(1, Ordering::SeqCst) >= MAX_SESSIONS {
            SESSIONS.fetch_sub(1, Ordering::SeqCst);
            refuse(conn, "too many execs at once");
            continue;
        }
        let spawned = std::thread::Builder::new().name("exec".into()).spawn(move || {
            serve(conn, reaper);
            SESSIONS.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            SESSIONS.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Best-effort error frame on a connection we will not serve.
fn refuse(conn: OwnedFd, message: &str) {
    if let Ok(bytes) = Frame::Error(message.to_string()).encode() {
        // SAFETY: one non-blocking send from a live buffer.
        unsafe {
            libc::send(conn.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
        };
    }
}

#[cfg(test)]
mod tests;
