//! mm-broker: the per-host supervisor (DESIGN.md, "Processes on one host").
//!
//! For each microVM it prepares a directory under the state directory,
//! spawns mm-vmm and one `mm-device` per device, hands each exactly its
//! fds, supervises them (a device that dies is restarted and reconnected;
//! an mm-vmm that dies ends the microVM), writes an audit log, and keeps a
//! record on disk so a restarted broker re-adopts what still runs. It
//! serves `protocols/broker.capnp` to `mmctl` on an owner-only unix socket.

pub mod audit;
pub mod cluster;
pub mod events;
pub mod exec;
pub mod forward;
pub mod launch;
pub mod metrics;
pub mod network;
pub mod process;
pub mod record;
pub mod registry;
pub mod rpc;
pub mod safe_fs;
pub mod snapshot;
pub mod stats;
pub mod vm;
pub mod warm;

use std::path::PathBuf;

/// Where the broker keeps its state and finds its parts.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// `vms/<id>/` per microVM (record, audit log, console, disk).
    pub state_dir: PathBuf,
    /// Directory holding `mm-vmm` and `mm-device`.
    pub bin_dir: PathBuf,
    /// The guest kernel (vmlinux).
    pub kernel: PathBuf,
    /// The built-in image: an ext4 root filesystem.
    pub builtin_image: PathBuf,
    /// Host memory (MiB) kept free: a microVM that would cut into it is refused.
    pub reserved_memory_mib: u64,
    /// DEBUGGING ONLY: start every process with `--no-seccomp`.
    pub no_seccomp: bool,
    /// DEBUGGING ONLY: start every process with `--no-jail`.
    pub no_jail: bool,
    /// The microVM network (set up at start), or none (`--no-network`).
    pub network: Option<network::Network>,
    /// Post-boot snapshots for warm starts (`--warm-cache`); None: every
    /// run boots (`--no-warm-starts`).
    pub warm_cache: Option<PathBuf>,
    /// Each microVM's console.log is rotated (one `console.log.1` kept)
    /// once it reaches this many bytes (`--console-log-max`).
    pub console_log_max: u64,
}

impl BrokerConfig {
    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no microVM named {0:?}")]
    UnknownVm(String),
    #[error("a microVM named {0:?} already exists")]
    DuplicateName(String),
    #[error("invalid name {0:?}: use 1-63 letters, digits, '-' or '_', starting with a letter or digit")]
    BadName(String),
    #[error("unknown image {0:?} (only the built-in image exists on this host: \"builtin\")")]
    UnknownImage(String),
    #[error("{0}")]
    BadSpec(String),
    #[error("not enough memory on this host: {wanted} MiB asked, {available} MiB available")]
    NoMemory { wanted: u64, available: u64 },
    #[error("microVM {name} is {state}; {what}")]
    WrongState { name: String, state: String, what: &'static str },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Network(#[from] network::NetworkError),
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
}

impl BrokerError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BrokerError {
        let what = what.into();
        move |source| BrokerError::Io { what, source }
    }
}
