//! Seccomp policies for every MicroMachines process and thread kind
//! (DESIGN.md, "Jails and policies").
//!
//! Each policy is a text file in `policy/`, reviewed like code, compiled to
//! BPF by build.rs with `seccompiler` and embedded here. A process installs
//! its filter itself, after its own set-up (as Firecracker's VMM does once
//! the jailer has exec'd it), because mm-vmm needs a different filter per
//! thread kind.
//!
//! Anything a policy does not allow traps (`SECCOMP_RET_TRAP`): our SIGSYS
//! handler writes a fixed-size [`Report`] to the fd named by
//! [`REPORT_FD_ENV`] (the jailer passes a pipe), says the same on stderr,
//! and the process then dies by SIGSYS, so the parent can tell which process
//! and which syscall.

mod handler;
mod report;
pub mod syntax;

use std::sync::OnceLock;

pub use report::{REPORT_FD_ENV, REPORT_SIZE, Report, syscall_name};

mod compiled {
    include!(concat!(env!("OUT_DIR"), "/compiled.rs"));
}

/// One process or thread kind, with its own policy file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Policy {
    /// mm-vmm's main thread: VM set-up is done; it waits for a vCPU to stop.
    VmmMain = 0,
    /// mm-vmm's vCPU threads: KVM_RUN and the exits handled on them.
    VmmVcpu = 1,
    /// mm-vmm's control-socket thread: replaces device back ends.
    VmmControl = 2,
    /// mm-device block.
    Block = 3,
    /// mm-device net.
    Net = 4,
    /// mm-device vsock.
    Vsock = 5,
    /// A deliberately tiny policy for tests of the trap path.
    TestTiny = 6,
    /// mm-vmm's page server thread: a lazy restore's guest-RAM faults.
    VmmPages = 7,
}

impl Policy {
    pub const ALL: [Policy; 8] = [
        Policy::VmmMain,
        Policy::VmmVcpu,
        Policy::VmmControl,
        Policy::Block,
        Policy::Net,
        Policy::Vsock,
        Policy::TestTiny,
        Policy::VmmPages,
    ];

    fn entry(self) -> &'static (&'static str, &'static [u8], &'static [&'static str]) {
        &compiled::COMPILED[self as usize]
    }

    /// The policy file's name, without `.policy`.
    pub fn name(self) -> &'static str {
        self.entry().0
    }

    /// The syscalls this policy allows (some only with certain arguments).
    pub fn syscalls(self) -> &'static [&'static str] {
        self.entry().2
    }

    pub fn from_index(index: u8) -> Option<Policy> {
        Policy::ALL.get(usize::from(index)).copied()
    }

    /// The compiled BPF program.
    pub fn program(self) -> Vec<seccompiler::sock_filter> {
        self.entry()
            .1
            .chunks_exact(8)
            .map(|b| seccompiler::sock_filter {
                code: u16::from_ne_bytes([b[0], b[1]]),
                jt: b[2],
                jf: b[3],
                k: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            })
            .collect()
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("{REPORT_FD_ENV}={0:?} is not an open file descriptor")]
    ReportFd(String),
    #[error("cannot install the {policy} seccomp filter: {source}")]
    Install { policy: Policy, source: seccompiler::Error },
}

/// Installs `policy` on the calling thread (threads it creates afterwards
/// inherit it). The first call also installs the SIGSYS handler and picks
/// up the report fd from the environment.
pub fn install(policy: Policy) -> Result<(), PolicyError> {
    static HANDLER: OnceLock<Result<(), String>> = OnceLock::new();
    HANDLER
        .get_or_init(|| {
            if let Ok(value) = std::env::var(REPORT_FD_ENV) {
                let fd: i32 = value.parse().map_err(|_| value.clone())?;
                // SAFETY: F_GETFD only queries the descriptor table.
                if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                    return Err(value);
                }
                handler::set_report_fd(fd);
            }
            handler::install().map_err(|e| format!("handler: {e}"))
        })
        .clone()
        .map_err(|e| match e.strip_prefix("handler: ") {
            Some(io) => PolicyError::Handler(std::io::Error::other(io.to_string())),
            None => PolicyError::ReportFd(e),
        })?;
    handler::set_thread_policy(policy);
    seccompiler::apply_filter(&policy.program()).map_err(|source| PolicyError::Install { policy, source })
}

/// Installs `policy` unless `enabled` is false, in which case it says so on
/// stderr: running without a filter is for debugging only.
pub fn install_or_warn(policy: Policy, enabled: bool) -> Result<(), PolicyError> {
    if enabled {
        install(policy)
    } else {
        eprintln!("WARNING: seccomp DISABLED for the {policy} thread (--no-seccomp): for debugging only");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
