//! Errors name the step that failed. Steps inside the child can only send
//! back numbers (it may not allocate: see `child.rs`), so each has a code
//! that the parent turns into its variant, with the path or fd it concerns.

use std::io;
use std::path::PathBuf;

/// Steps that run in the child between clone and exec, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ChildStep {
    JoinCgroup = 1,
    PrivateMounts,
    MountRoot,
    MountDev,
    MakeDevNode,
    ChownDevNode,
    MakeMountPoint,
    BindMount,
    RemountBind,
    RemountDevReadOnly,
    PivotRoot,
    UnmountOldRoot,
    RemountRootReadOnly,
    Hostname,
    Rlimits,
    PassFds,
    CloseFds,
    DropBoundingSet,
    ClearAmbient,
    Securebits,
    SetGroups,
    SetGid,
    SetUid,
    DropCapabilities,
    ParentDeathSignal,
    NoNewPrivs,
    ResetSignals,
    Exec,
}

impl ChildStep {
    const ALL: [ChildStep; 28] = [
        ChildStep::JoinCgroup,
        ChildStep::PrivateMounts,
        ChildStep::MountRoot,
        ChildStep::MountDev,
        ChildStep::MakeDevNode,
        ChildStep::ChownDevNode,
        ChildStep::MakeMountPoint,
        ChildStep::BindMount,
        ChildStep::RemountBind,
        ChildStep::RemountDevReadOnly,
        ChildStep::PivotRoot,
        ChildStep::UnmountOldRoot,
        ChildStep::RemountRootReadOnly,
        ChildStep::Hostname,
        ChildStep::Rlimits,
        ChildStep::PassFds,
        ChildStep::CloseFds,
        ChildStep::DropBoundingSet,
        ChildStep::ClearAmbient,
        ChildStep::Securebits,
        ChildStep::SetGroups,
        ChildStep::SetGid,
        ChildStep::SetUid,
        ChildStep::DropCapabilities,
        ChildStep::ParentDeathSignal,
        ChildStep::NoNewPrivs,
        ChildStep::ResetSignals,
        ChildStep::Exec,
    ];

    pub(crate) fn from_code(code: u32) -> Option<ChildStep> {
        ChildStep::ALL.iter().copied().find(|s| *s as u32 == code)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail spec: {0}")]
    Spec(String),
    #[error("listing the shared libraries of {exec}: {detail}")]
    Libraries { exec: PathBuf, detail: String },
    #[error("bind mount source {path}: {source}")]
    MountSource { path: PathBuf, source: io::Error },
    #[error(
        "the jail is to hold {path} (JailSpec::userfaultfd, for a lazily restored guest's devices), but the \
         host's is unusable: {source} (Linux has the node from 6.1 on)"
    )]
    HostDevice { path: PathBuf, source: io::Error },
    #[error("creating the jail root directory {path}: {source}")]
    CreateRoot { path: PathBuf, source: io::Error },
    #[error("no cgroup hierarchy offers the {controller} controller")]
    NoController { controller: &'static str },
    #[error("cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("creating the report and error pipes: {0}")]
    Pipes(io::Error),
    #[error("clone with new namespaces: {0}")]
    Clone(io::Error),
    #[error("joining the cgroup (cgroup.procs #{index}): {source}")]
    JoinCgroup { index: usize, source: io::Error },
    #[error("making every mount private: {0}")]
    PrivateMounts(io::Error),
    #[error("mounting the tmpfs root at {path}: {source}")]
    MountRoot { path: PathBuf, source: io::Error },
    #[error("mounting the jail's own /dev (a tmpfs) at {path}: {source}")]
    MountDev { path: PathBuf, source: io::Error },
    #[error("creating the device node {path} in the jail's /dev: {source}")]
    MakeDevNode { path: PathBuf, source: io::Error },
    #[error("giving the device node {path} to the jail's uid {uid} and gid {gid}: {source}")]
    ChownDevNode { path: PathBuf, uid: u32, gid: u32, source: io::Error },
    #[error("remounting the jail's /dev read-only: {0}")]
    RemountDevReadOnly(io::Error),
    #[error("creating mount point {path} in the root: {source}")]
    MakeMountPoint { path: PathBuf, source: io::Error },
    #[error("bind mounting {path}: {source}")]
    BindMount { path: PathBuf, source: io::Error },
    #[error("remounting {path} with its final flags: {source}")]
    RemountBind { path: PathBuf, source: io::Error },
    #[error("pivot_root into the jail: {0}")]
    PivotRoot(io::Error),
    #[error("unmounting the old root: {0}")]
    UnmountOldRoot(io::Error),
    #[error("remounting the jail root read-only: {0}")]
    RemountRootReadOnly(io::Error),
    #[error("setting the hostname: {0}")]
    Hostname(io::Error),
    #[error("setting rlimits: {0}")]
    Rlimits(io::Error),
    #[error("passing fd {fd}: {source}")]
    PassFds { fd: i32, source: io::Error },
    #[error("closing the other fds: {0}")]
    CloseFds(io::Error),
    #[error("dropping capability {cap} from the bounding set: {source}")]
    DropBoundingSet { cap: u32, source: io::Error },
    #[error("clearing ambient capabilities: {0}")]
    ClearAmbient(io::Error),
    #[error("locking securebits: {0}")]
    Securebits(io::Error),
    #[error("setgroups: {0}")]
    SetGroups(io::Error),
    #[error("setresgid: {0}")]
    SetGid(io::Error),
    #[error("setresuid: {0}")]
    SetUid(io::Error),
    #[error("dropping all capabilities: {0}")]
    DropCapabilities(io::Error),
    #[error("setting the parent-death signal: {0}")]
    ParentDeathSignal(io::Error),
    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(io::Error),
    #[error("resetting the signal mask: {0}")]
    ResetSignals(io::Error),
    #[error("exec {path}: {source}")]
    Exec { path: PathBuf, source: io::Error },
    #[error("the jailed child reported an unknown step {0}")]
    UnknownStep(u32),
    #[error("waiting for the jailed child: {0}")]
    Wait(io::Error),
}
