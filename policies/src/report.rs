//! The record the SIGSYS handler writes for the parent: fixed size, so one
//! `write` from a signal handler is all it takes, and a reader never sees
//! half of one (pipe writes under PIPE_BUF are atomic).

/// Environment variable naming the fd the report goes to.
pub const REPORT_FD_ENV: &str = "MM_SECCOMP_REPORT_FD";
/// Bytes in one report.
pub const REPORT_SIZE: usize = 12;
const MAGIC: u32 = u32::from_le_bytes(*b"MMSC");

/// "Thread of policy P made forbidden syscall N."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub syscall: i32,
    /// Index of the [`crate::Policy`] installed on the thread, if known.
    pub policy: Option<crate::Policy>,
}

impl Report {
    pub fn encode(&self) -> [u8; REPORT_SIZE] {
        let mut out = [0u8; REPORT_SIZE];
        out[..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.syscall.to_le_bytes());
        out[8] = self.policy.map_or(u8::MAX, |p| p as u8);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Report> {
        let bytes: &[u8; REPORT_SIZE] = bytes.get(..REPORT_SIZE)?.try_into().ok()?;
        if u32::from_le_bytes(bytes[..4].try_into().ok()?) != MAGIC {
            return None;
        }
        let syscall = i32::from_le_bytes(bytes[4..8].try_into().ok()?);
        Some(Report { syscall, policy: crate::Policy::from_index(bytes[8]) })
    }

    /// The syscall's name, e.g. `socket`.
    pub fn name(&self) -> &'static str {
        syscall_name(self.syscall)
    }
}

/// Name of an x86_64 syscall number (`"?"` when unknown).
pub fn syscall_name(nr: i32) -> &'static str {
    usize::try_from(nr).ok().and_then(syscalls::Sysno::new).map_or("?", |s| s.name())
}
