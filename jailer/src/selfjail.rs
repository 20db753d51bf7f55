//! For binaries that jail themselves when started by hand or by a test
//! (until the broker jails them): re-exec the same binary inside a jail,
//! wait for it and mirror how it ended. The broker builds [`JailSpec`]s
//! itself and calls [`crate::spawn`] directly.

use std::ffi::OsString;

use crate::{ExitReason, JAILED_ENV, JailError, JailSpec, JailedChild};

/// Environment variables a self-jailed binary passes on (logging only).
const PASSED_ENV: [&str; 3] = ["MM_LOG", "RUST_LOG", "RUST_BACKTRACE"];

/// True inside a jail made by this crate.
pub fn is_jailed() -> bool {
    std::env::var_os(JAILED_ENV).is_some()
}

/// An exit status for a supervisor that mirrors `reason`.
pub fn exit_code(reason: &ExitReason) -> u8 {
    u8::try_from(reason.code()).unwrap_or(1)
}

/// A spec that runs the current executable again, jailed.
pub struct SelfJail {
    pub spec: JailSpec,
}

impl SelfJail {
    /// `kind` names the jail (`block-<pid>`); `uid`/`gid` default to the
    /// caller's own, which only the broker can do better than.
    pub fn new(kind: &str, args: Vec<OsString>, uid: Option<u32>, gid: Option<u32>) -> std::io::Result<Self> {
        let exec = std::env::current_exe()?;
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = (uid.unwrap_or(unsafe { libc::getuid() }), gid.unwrap_or(unsafe { libc::getgid() }));
        let mut spec = JailSpec::new(format!("{kind}-{}", std::process::id()), exec, uid, gid);
        spec.args = args;
        spec.die_with_parent = true;
        for key in PASSED_ENV {
            if let Some(value) = std::env::var_os(key) {
                spec.env.push((key.into(), value));
            }
        }
        Ok(SelfJail { spec })
    }

    /// Starts the jailed copy, waits for it, and says on stderr how it
    /// ended if a signal or its seccomp filter killed it.
    pub fn run(self) -> Result<ExitReason, JailError> {
        if self.spec.uid == 0 {
            tracing::warn!(
                "jail {}: running as uid 0 (all capabilities dropped); pass --jail-uid/--jail-gid for the \
                 microVM's own unprivileged ids",
                self.spec.name
            );
        }
        let mut child: JailedChild = crate::spawn(&self.spec)?;
        let reason = child.wait()?;
        if !matches!(reason, ExitReason::Exited(_)) {
            eprintln!("{}", child.describe(&reason));
        }
        Ok(reason)
    }
}

/// Only root can build a jail (new namespaces, mounts, cgroups, another
/// uid); a binary started by anyone else runs unjailed, and says so.
pub fn can_jail() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}
