//! The parent's handle on a jailed child: its pid, how it ended (a seccomp
//! kill is told apart from any other SIGSYS by the report the child's
//! handler wrote), and the removal of its root directory and cgroups.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;

use mm_policies::{Policy, REPORT_SIZE, Report};

use crate::{JailError, Residue};

/// How a jailed process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    Exited(i32),
    Signaled(i32),
    /// Killed by its seccomp filter for making a syscall its policy forbids.
    Seccomp {
        syscall: &'static str,
        nr: i32,
        policy: Option<Policy>,
    },
}

impl ExitReason {
    /// A status for a supervisor that mirrors its child: the code, or 128
    /// plus the signal (SIGSYS for seccomp).
    pub fn code(&self) -> i32 {
        match self {
            ExitReason::Exited(code) => *code,
            ExitReason::Signaled(signal) => 128 + signal,
            ExitReason::Seccomp { .. } => 128 + libc::SIGSYS,
        }
    }
}

/// Describes the end of process `name`, e.g. for an audit log.
pub fn describe(name: &str, pid: libc::pid_t, reason: &ExitReason) -> String {
    match reason {
        ExitReason::Exited(code) => format!("process {name} (pid {pid}) exited with status {code}"),
        ExitReason::Signaled(signal) => format!("process {name} (pid {pid}) was killed by signal {signal}"),
        ExitReason::Seccomp { syscall, nr, policy } => format!(
            "process {name} (pid {pid}) killed by seccomp: forbidden syscall {syscall} ({nr}){}",
            policy.map(|p| format!(" under policy {p}")).unwrap_or_default()
        ),
    }
}

/// What [`JailedChild::describe`] adds when the kernel's OOM killer ended
/// the child for its cgroup's memory limit: a supervisor that only sees a
/// self-jailed process's status and log (the broker) looks for it there.
pub const OUT_OF_MEMORY: &str = "out of memory";

/// A running jailed child. Dropping it kills the child (SIGKILL), reaps it
/// and removes its jail.
#[derive(Debug)]
pub struct JailedChild {
    name: String,
    pid: libc::pid_t,
    report: File,
    residue: Residue,
    reason: Option<ExitReason>,
    /// OOM kills in its cgroups, read once it ended (before their removal).
    oom_kills: u64,
}

impl JailedChild {
    pub(crate) fn new(name: String, pid: libc::pid_t, report: File, residue: Residue) -> Self {
        JailedChild { name, pid, report, residue, reason: None, oom_kills: 0 }
    }

    /// The child's pid in our PID namespace.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cgroup directories the child was put in.
    pub fn cgroup_dirs(&self) -> &[std::path::PathBuf] {
        &self.residue.cgroups.dirs
    }

    /// Waits for the child to end, then removes its jail.
    pub fn wait(&mut self) -> Result<ExitReason, JailError> {
        if let Some(reason) = &self.reason {
            return Ok(reason.clone());
        }
        let mut status = 0;
        loop {
            // SAFETY: waitpid on our own, not yet reaped child.
            if unsafe { libc::waitpid(self.pid, &mut status, 0) } >= 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(JailError::Wait(e));
            }
        }
        let reason = self.reason_for(status);
        self.oom_kills = self.residue.cgroups.oom_kills();
        self.residue.remove();
        self.reason = Some(reason.clone());
        Ok(reason)
    }

    /// Whether the kernel's OOM killer killed a process of the jail for its
    /// memory limit (known once it ended).
    pub fn out_of_memory(&self) -> bool {
        self.oom_kills > 0
    }

    /// Like `wait` without blocking: `None` while the child runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitReason>, JailError> {
        if self.reason.is_some() {
            return self.wait().map(Some);
        }
        let mut status = 0;
        // SAFETY: waitpid on our own, not yet reaped child.
        match unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) } {
            0 => Ok(None),
            n if n < 0 => Err(JailError::Wait(std::io::Error::last_os_error())),
            _ => {
                let reason = self.reason_for(status);
                self.oom_kills = self.residue.cgroups.oom_kills();
                self.residue.remove();
                self.reason = Some(reason.clone());
                Ok(Some(reason))
            }
        }
    }

    /// SIGKILLs the child (if still running) and waits for it.
    pub fn kill(&mut self) -> Result<ExitReason, JailError> {
        if self.reason.is_none() {
            // SAFETY: kill(2) on our own child, which is not yet reaped.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        self.wait()
    }

    /// One line saying how the child ended.
    pub fn describe(&self, reason: &ExitReason) -> String {
        let line = describe(&self.name, self.pid, reason);
        match self.out_of_memory() {
            true => format!("{line}: {OUT_OF_MEMORY} (killed by the kernel at its cgroup's memory limit)"),
            false => line,
        }
    }

    fn reason_for(&mut self, status: libc::c_int) -> ExitReason {
        if libc::WIFEXITED(status) {
            return ExitReason::Exited(libc::WEXITSTATUS(status));
        }
        let signal = libc::WTERMSIG(status);
        if signal == libc::SIGSYS
            && let Some(report) = self.read_report()
        {
            return ExitReason::Seccomp { syscall: report.name(), nr: report.syscall, policy: report.policy };
        }
        ExitReason::Signaled(signal)
    }

    /// The first report in the pipe; every writer is gone once the child
    /// is dead, so this never blocks for long.
    fn read_report(&mut self) -> Option<Report> {
        // SAFETY: F_SETFL on our own pipe fd.
        unsafe { libc::fcntl(self.report.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let mut buf = [0u8; REPORT_SIZE];
        let mut got = 0;
        while got < REPORT_SIZE {
            match self.report.read(&mut buf[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        Report::decode(&buf[..got])
    }
}

impl Drop for JailedChild {
    fn drop(&mut self) {
        if self.reason.is_none() {
            let _ = self.kill();
        }
    }
}
