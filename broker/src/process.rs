//! One supervised process, watched through a pidfd: its exit wakes the
//! broker's event loop without SIGCHLD handling, it works for processes a
//! restarted broker re-adopts (not its children), and signals sent through
//! it cannot hit a recycled pid.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Child;

use tokio::io::unix::AsyncFd;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// A re-adopted process (not our child) ended: its status went to its
    /// real parent.
    Unknown,
}

impl Exit {
    pub fn describe(self) -> String {
        match self {
            Exit::Code(code) => format!("exited with code {code}"),
            Exit::Signal(sig) => format!("killed by signal {sig} ({})", signal_name(sig)),
            Exit::Unknown => "exited (status unknown: adopted after a broker restart)".into(),
        }
    }

    pub fn json(self) -> serde_json::Value {
        match self {
            Exit::Code(code) => serde_json::json!({ "code": code }),
            Exit::Signal(sig) => serde_json::json!({ "signal": sig, "signal_name": signal_name(sig) }),
            Exit::Unknown => serde_json::json!({ "status": "unknown" }),
        }
    }
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSYS => "SIGSYS",
        _ => "?",
    }
}

/// Registers a pidfd with the runtime's reactor.
fn watch(pidfd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd is a valid pidfd that the AsyncFd owns from here
    // on; nothing else closes or replaces it while registered.
    unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }.map_err(std::io::Error::from)
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

pub struct Process {
    pub role: String,
    pub pid: i32,
    pub start_time: u64,
    child: Option<Child>,
    pidfd: AsyncFd<OwnedFd>,
    exit: Option<Exit>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Process({} pid {})", self.role, self.pid)
    }
}

impl Process {
    /// Watches a child this broker spawned.
    pub fn spawned(role: &str, child: Child) -> std::io::Result<Process> {
        let pid = child.id() as i32;
        let pidfd = watch(pidfd_open(pid)?)?;
        let start_time = crate::record::process_start_time(pid).unwrap_or(0);
        Ok(Process { role: role.into(), pid, start_time, child: Some(child), pidfd, exit: None })
    }

    /// Watches a process a previous broker spawned, if it still runs and
    /// is the same process (same start time).
    pub fn adopt(role: &str, pid: i32, start_time: u64) -> Option<Process> {
        if crate::record::process_start_time(pid)? != start_time {
            return None;
        }
        let pidfd = watch(pidfd_open(pid).ok()?).ok()?;
        // The pid could have been recycled between the check and the open.
        if crate::record::process_start_time(pid)? != start_time {
            return None;
        }
        Some(Process { role: role.into(), pid, start_time, child: None, pidfd, exit: None })
    }

    /// Waits for the process to end (cancel-safe: call again after a drop).
    pub async fn wait(&mut self) -> Exit {
        if let Some(exit) = self.exit {
            return exit;
        }
        loop {
            match self.pidfd.readable().await {
                Ok(mut guard) => {
                    guard.retain_ready();
                    break;
                }
                Err(e) => {
                    tracing::warn!(pid = self.pid, "pidfd wait failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
        let exit = match &mut self.child {
            Some(child) => match child.wait() {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (status.code(), status.signal()) {
                        (Some(code), _) => Exit::Code(code),
                        (None, Some(sig)) => Exit::Signal(sig),
                        _ => Exit::Unknown,
                    }
                }
                Err(_) => Exit::Unknown,
            },
            None => Exit::Unknown,
        };
        self.exit = Some(exit);
        exit
    }

    /// Whether it has ended (without waiting).
    pub fn has_exited(&self) -> bool {
        self.exit.is_some()
    }

    /// Sends `signal` through the pidfd (never to a recycled pid).
    pub fn signal(&self, signal: i32) {
        if self.exit.is_some() {
            return;
        }
        // SAFETY: pidfd_send_signal with a pidfd we own, a signal number,
        // no siginfo and no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.get_ref().as_raw_fd(),
                signal,
                std::ptr::null::<u8>(),
                0,
            )
        };
        if rc != 0 {
            tracing::debug!(pid = self.pid, signal, "pidfd_send_signal: {}", std::io::Error::last_os_error());
        }
    }
}
