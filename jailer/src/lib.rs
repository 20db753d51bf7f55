//! mm-jailer: turns a [`JailSpec`] into a running, confined child
//! (DESIGN.md, "Jails and policies"), with Firecracker's jailer as the model
//! for the order of steps.
//!
//! The parent side ([`spawn`]) creates the jail's root directory and
//! cgroups, prepares everything the child will need, and clones the child
//! into new mount, PID, IPC, UTS and (unless kept) network namespaces. The
//! child side (`child.rs`) joins the cgroups, builds a tmpfs root holding
//! only the spec's bind mounts (and, with [`JailSpec::userfaultfd`], a
//! `/dev` holding only that node), pivots into it, sets rlimits, keeps only the
//! fds it was given, becomes the microVM's uid/gid with no capabilities and
//! no_new_privs, and execs the target. The target installs its own seccomp
//! filter (`mm-policies`) once its set-up is done, as Firecracker's VMM does
//! after its jailer exec's it, because mm-vmm needs one filter per thread
//! kind.
//!
//! A failure at any step is reported as the [`JailError`] variant of that
//! step, and leaves nothing behind: the root directory and the cgroups are
//! removed before `spawn` returns the error.

mod cgroup;
mod child;
mod error;
mod handle;
mod libraries;
mod prepare;
pub mod probes;
mod selfjail;
#[cfg(test)]
mod spawn_tests;
mod spec;
#[cfg(test)]
mod testutil;
#[cfg(test)]
mod userfaultfd_tests;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

pub use cgroup::{Cgroups, Hierarchies};
pub use error::{ChildStep, JailError};
pub use handle::{ExitReason, JailedChild, OUT_OF_MEMORY, describe};
pub use libraries::libraries;
pub use selfjail::{SelfJail, can_jail, exit_code, is_jailed};
pub use spec::{
    BindMount, CGROUP_PARENT, CPU_MAX_ENV, CPU_PERIOD_US, CPU_WEIGHT_DEFAULT, CPU_WEIGHT_ENV, CPU_WEIGHT_MAX,
    CPU_WEIGHT_MIN, CpuMax, DEFAULT_JAIL_BASE, JailSpec, Limits, MEMORY_MAX_ENV, REPORT_FD, USERFAULTFD,
};

/// Set in the jailed child's environment (to the jail's name), so a
/// program that jails itself knows it already is.
pub const JAILED_ENV: &str = "MM_JAILED";

/// What `spawn` made on the host, removed on failure or by the handle.
#[derive(Debug, Default)]
pub(crate) struct Residue {
    pub root: Option<PathBuf>,
    pub cgroups: Cgroups,
}

impl Residue {
    pub(crate) fn remove(&mut self) {
        if let Some(root) = self.root.take() {
            // Only an empty directory is left on the host: the tmpfs lived
            // in the child's mount namespace.
            if let Err(e) = std::fs::remove_dir(&root) {
                tracing::warn!("cannot remove jail root {}: {e}", root.display());
            }
        }
        self.cgroups.remove();
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), JailError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(JailError::Pipes(std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts the jailed child. See the crate docs for the steps.
pub fn spawn(spec: &JailSpec) -> Result<JailedChild, JailError> {
    spec.validate().map_err(JailError::Spec)?;
    let mut residue = Residue::default();
    match spawn_inner(spec, &mut residue) {
        Ok((pid, report)) => Ok(JailedChild::new(spec.name.clone(), pid, report, residue)),
        Err(e) => {
            residue.remove();
            Err(e)
        }
    }
}

fn spawn_inner(spec: &JailSpec, residue: &mut Residue) -> Result<(libc::pid_t, File), JailError> {
    // The root directory: its absence of content is the point.
    let root = spec.jail_base.join(&spec.name);
    std::fs::create_dir_all(&spec.jail_base)
        .map_err(|source| JailError::CreateRoot { path: spec.jail_base.clone(), source })?;
    std::fs::create_dir(&root).map_err(|source| JailError::CreateRoot { path: root.clone(), source })?;
    residue.root = Some(root.clone());

    let hierarchies =
        Hierarchies::detect().map_err(|source| JailError::Cgroup { path: "/proc/self/mountinfo".into(), source })?;
    residue.cgroups.create(&hierarchies, &spec.name, &spec.limits)?;
    let procs = residue.cgroups.open_procs()?;

    let (report_read, report_write) = pipe()?;
    let (error_read, error_write) = pipe()?;
    let prepared = prepare::prepare(spec, &root, &procs, &report_write, &error_write)?;

    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if !spec.keep_net {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: a fork-like clone (no new stack, no shared memory). The child
    // only runs `child::run`, which makes async-signal-safe calls on data
    // prepared above and never returns.
    let pid = unsafe {
        libc::syscall(libc::SYS_clone, (flags | libc::SIGCHLD) as libc::c_ulong, 0usize, 0usize, 0usize, 0usize)
    };
    if pid < 0 {
        return Err(JailError::Clone(std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: we are the freshly cloned child.
        unsafe { child::run(&prepared, error_write.as_raw_fd()) }
    }
    let pid = pid as libc::pid_t;
    drop(error_write);
    drop(report_write);
    drop(procs);

    // Exec closes the error pipe (CLOEXEC): EOF means the jail is complete.
    let mut record = [0u8; 12];
    let mut got = 0;
    let mut error_read = File::from(error_read);
    while got < record.len() {
        match error_read.read(&mut record[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(reap_and(pid, JailError::Wait(e))),
        }
    }
    if got == 0 {
        return Ok((pid, File::from(report_read)));
    }
    let step = u32::from_le_bytes(record[..4].try_into().expect("4 bytes"));
    let index = u32::from_le_bytes(record[4..8].try_into().expect("4 bytes")) as usize;
    let errno = i32::from_le_bytes(record[8..].try_into().expect("4 bytes"));
    Err(reap_and(pid, child_error(spec, &prepared, &root, step, index, errno)))
}

/// Reaps a child that failed, so no zombie outlives the error.
fn reap_and(pid: libc::pid_t, error: JailError) -> JailError {
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    error
}

/// The variant for a step that failed in the child.
fn child_error(
    spec: &JailSpec,
    prepared: &prepare::Prepared,
    root: &Path,
    step: u32,
    index: usize,
    errno: i32,
) -> JailError {
    use ChildStep as S;
    let source = std::io::Error::from_raw_os_error(errno);
    let name = |list: &[std::ffi::CString], i: usize| {
        list.get(i).map_or_else(|| PathBuf::from(format!("#{i}")), |c| PathBuf::from(c.to_string_lossy().as_ref()))
    };
    let mount_path = |i: usize| {
        prepared
            .mounts
            .get(i)
            .map_or_else(|| PathBuf::from(format!("#{i}")), |m| name(std::slice::from_ref(&m.target), 0))
    };
    let point_path = |i: usize| {
        if i < prepared.dirs.len() { name(&prepared.dirs, i) } else { name(&prepared.files, i - prepared.dirs.len()) }
    };
    let Some(step) = ChildStep::from_code(step) else { return JailError::UnknownStep(step) };
    match step {
        S::JoinCgroup => JailError::JoinCgroup { index, source },
        S::PrivateMounts => JailError::PrivateMounts(source),
        S::MountRoot => JailError::MountRoot { path: root.to_path_buf(), source },
        S::MountDev => JailError::MountDev { path: root.join("dev"), source },
        S::MakeDevNode => JailError::MakeDevNode { path: spec::USERFAULTFD.into(), source },
        S::ChownDevNode => {
            JailError::ChownDevNode { path: spec::USERFAULTFD.into(), uid: spec.uid, gid: spec.gid, source }
        }
        S::RemountDevReadOnly => JailError::RemountDevReadOnly(source),
        S::MakeMountPoint => JailError::MakeMountPoint { path: point_path(index), source },
        S::BindMount => JailError::BindMount { path: mount_path(index), source },
        S::RemountBind => JailError::RemountBind { path: mount_path(index), source },
        S::PivotRoot => JailError::PivotRoot(source),
        S::UnmountOldRoot => JailError::UnmountOldRoot(source),
        S::RemountRootReadOnly => JailError::RemountRootReadOnly(source),
        S::Hostname => JailError::Hostname(source),
        S::Rlimits => JailError::Rlimits(source),
        S::PassFds => JailError::PassFds { fd: spec.fds.get(index).map_or(-1, |f| f.0), source },
        S::CloseFds => JailError::CloseFds(source),
        S::DropBoundingSet => JailError::DropBoundingSet { cap: index as u32, source },
        S::ClearAmbient => JailError::ClearAmbient(source),
        S::Securebits => JailError::Securebits(source),
        S::SetGroups => JailError::SetGroups(source),
        S::SetGid => JailError::SetGid(source),
        S::SetUid => JailError::SetUid(source),
        S::DropCapabilities => JailError::DropCapabilities(source),
        S::ParentDeathSignal => JailError::ParentDeathSignal(source),
        S::NoNewPrivs => JailError::NoNewPrivs(source),
        S::ResetSignals => JailError::ResetSignals(source),
        S::Exec => JailError::Exec { path: spec.exec.clone(), source },
    }
}
