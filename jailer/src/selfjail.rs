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
        sweep_stale(&self.spec.jail_base);
        let mut spec = self.spec;
        // The supervisor's limits (the microVM's size) win over the binary's.
        spec.limits.apply_supervisor_env(|key| std::env::var(key).ok()).map_err(JailError::Spec)?;
        let mut child: JailedChild = crate::spawn(&spec)?;
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

/// Removes what self-jails left behind when their supervising process was
/// SIGKILLed (its jailed copy dies with it, by PDEATHSIG, but nobody
/// removes the root directory and cgroups): entries named `<kind>-<pid>`
/// whose pid is gone and whose cgroups hold no process.
fn sweep_stale(jail_base: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(jail_base) else { return };
    let hierarchies = crate::Hierarchies::detect().unwrap_or_default();
    let cgroup_roots = hierarchies.jail_parents();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name.rsplit_once('-').and_then(|(_, pid)| pid.parse::<libc::pid_t>().ok()) else { continue };
        // SAFETY: kill with signal 0 only checks whether the pid exists.
        let alive = pid > 0 && unsafe { libc::kill(pid, 0) } == 0;
        if pid <= 0 || alive || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH) {
            continue;
        }
        let cgroups: Vec<std::path::PathBuf> =
            cgroup_roots.iter().map(|root| root.join(&name)).filter(|d| d.is_dir()).collect();
        let busy = cgroups
            .iter()
            .any(|d| std::fs::read_to_string(d.join("cgroup.procs")).map_or(true, |p| !p.trim().is_empty()));
        if busy {
            continue;
        }
        for dir in cgroups {
            let _ = std::fs::remove_dir(dir);
        }
        if std::fs::remove_dir(entry.path()).is_ok() {
            tracing::info!("removed the stale jail {name}");
        }
    }
}
