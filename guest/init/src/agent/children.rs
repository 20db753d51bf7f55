//! Getting the agent's children's exit statuses past PID 1's reaper.
//!
//! PID 1 reaps with `waitpid(-1)` (it must: orphans land on it), so a
//! session cannot wait for its own child. Instead it spawns through
//! [`spawn_watched`], which records the child's pid under a lock held across
//! the fork; the reaper calls [`deliver`] for every pid that is not the
//! workload, and the status lands in the session's [`ExitNotice`]. Holding
//! the lock across the fork closes the race where the reaper collects a
//! child before its pid is recorded: it blocks in `deliver` until the pid is
//! there. Outside PID 1 (the host-side tests) a thread per child waits for
//! that pid alone.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use mm_exec_protocol::ExitStatus;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

/// Who collects the agent's children.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaper {
    /// PID 1's reaper loop (supervise.rs), through [`deliver`].
    Pid1,
    /// A thread per child calling `waitpid(pid)`: for a process that is not
    /// PID 1 and reaps nothing else: the host-side tests.
    #[cfg_attr(not(test), allow(dead_code, reason = "inside the guest, PID 1 reaps everything"))]
    Direct,
}

/// One child's exit status, and an eventfd that becomes readable when it
/// is set, so a session can `poll` for it beside its pipes.
pub struct ExitNotice {
    status: Mutex<Option<ExitStatus>>,
    event: OwnedFd,
}

impl ExitNotice {
    fn new() -> io::Result<Arc<Self>> {
        // SAFETY: eventfd(2) takes no pointers; we own the returned fd.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let event = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Arc::new(ExitNotice { status: Mutex::new(None), event }))
    }

    fn set(&self, status: ExitStatus) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        unsafe { libc::write(self.event.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Readable once the status is in.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.event.as_fd()
    }

    pub fn get(&self) -> Option<ExitStatus> {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Children whose statuses the reaper hands over, by pid.
static CLAIMED: Mutex<BTreeMap<i32, Arc<ExitNotice>>> = Mutex::new(BTreeMap::new());

fn claimed() -> MutexGuard<'static, BTreeMap<i32, Arc<ExitNotice>>> {
    CLAIMED.lock().unwrap_or_else(|e| e.into_inner())
}

fn exit_status(status: WaitStatus) -> Option<ExitStatus> {
    match status {
        WaitStatus::Exited(_, code) => Some(ExitStatus::Exited(code)),
        WaitStatus::Signaled(_, sig, _) => Some(ExitStatus::Signaled(sig as i32)),
        _ => None,
    }
}

/// Runs `spawn`, which forks and returns the child's pid with whatever
/// else it made, so that the child's exit status reaches the notice.
pub fn spawn_watched<T>(
    reaper: Reaper,
    spawn: impl FnOnce() -> io::Result<(i32, T)>,
) -> io::Result<(i32, T, Arc<ExitNotice>)> {
    let notice = ExitNotice::new()?;
    match reaper {
        Reaper::Pid1 => {
            let mut claimed = claimed();
            let (pid, made) = spawn()?;
            claimed.insert(pid, notice.clone());
            Ok((pid, made, notice))
        }
        Reaper::Direct => {
            let (pid, made) = spawn()?;
            let waiter = notice.clone();
            std::thread::spawn(move || {
                loop {
                    match waitpid(Pid::from_raw(pid), None) {
                        Err(nix::errno::Errno::EINTR) => continue,
                        Ok(status) => match exit_status(status) {
                            Some(status) => waiter.set(status),
                            None => continue,
                        },
                        Err(_) => {}
                    }
                    break;
                }
            });
            Ok((pid, made, notice))
        }
    }
}

/// Hands a reaped child's status to the session that spawned it; false if
/// no session claimed `pid` (an orphan, or the workload).
pub fn deliver(status: WaitStatus) -> bool {
    let (Some(pid), Some(exit)) = (status.pid(), exit_status(status)) else {
        return false;
    };
    match claimed().remove(&pid.as_raw()) {
        Some(notice) => {
            notice.set(exit);
            true
        }
        None => false,
    }
}
