//! Snapshots of a running microVM, as mm-vmm writes and reads them.
//!
//! A snapshot is two files the broker opens and hands over as fds (no jail
//! gains a writable path): the **state file**, one JSON document
//! ([`SnapshotState`]: format and version, the host CPU it was taken on,
//! the VM's shape, KVM's VM-wide and per-vCPU state, each virtio
//! transport's registers and ring indices, the console's registers, and
//! where guest RAM lies in the memory file with a checksum per extent), and
//! the **memory file** (sparse; see [`memory`]). The broker keeps them in a
//! directory beside the writable disk copied at the same pause and its own
//! manifest.
//!
//! JSON because the state is small (tens of KiB) and a person debugging a
//! refused restore can read it; the version fields come first and are read
//! on their own, so a snapshot from another format version is refused by
//! name, not by a parse error deep inside.

pub mod device_log;
pub mod lazy;
pub mod machine;
pub mod memory;
pub mod running;
pub mod uffd;

use std::fs::File;
use std::io::{BufWriter, Read, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

use crate::vcpu::state::VcpuState;
use crate::virtio::mmio::TransportState;
use machine::MachineState;
use memory::MemoryImage;

/// What the state file says it is.
pub const FORMAT: &str = "micromachines-vmm-snapshot";
/// Bumped on any change a reader of the old layout would misread.
pub const FORMAT_VERSION: u32 = 1;
/// A state file larger than this is not ours (a real one is < 1 MiB).
const MAX_STATE_BYTES: u64 = 64 << 20;

/// A part of the VM whose state a snapshot carries, as Firecracker's
/// `Persist`: `save` reads it from the running (paused) part, `restore`
/// builds a new one from its state and what it is made of.
pub trait Persist: Sized {
    type State;
    type ConstructorArgs;
    type Error;
    fn save(&self) -> Self::State;
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read the snapshot's state file: {0}")]
    Read(std::io::Error),
    #[error("cannot write the snapshot's state file: {0}")]
    Write(std::io::Error),
    #[error("the state file is over {MAX_STATE_BYTES} bytes: not a snapshot")]
    TooLarge,
    #[error("the state file is not a MicroMachines snapshot: {0}")]
    NotASnapshot(String),
    #[error("the snapshot is format version {found}; this mm-vmm reads version {FORMAT_VERSION} only")]
    WrongVersion { found: u32 },
    #[error("the state file is damaged: {0}")]
    Malformed(serde_json::Error),
    #[error("the snapshot was taken on a {saved} CPU; this host has a {host} CPU, whose state it cannot take")]
    OtherCpu { saved: String, host: String },
    #[error("the snapshot was taken {saved}, this host is {host}: the guest kernel's settings differ")]
    OtherHypervisor { saved: &'static str, host: &'static str },
    #[error("the snapshot is of a VM with {saved}, not {given}")]
    Shape { saved: String, given: String },
}

/// The host CPU a snapshot's vCPU state came from: KVM state (CPUID, MSRs,
/// XSAVE layout) only carries over to the same model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCpu {
    pub vendor: String,
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
}

impl HostCpu {
    pub fn of_this_host() -> HostCpu {
        use std::arch::x86_64::__cpuid;
        // CPUID is unprivileged and side-effect free on every x86-64 CPU.
        let leaf0 = __cpuid(0);
        let vendor: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
        let eax = __cpuid(1).eax;
        let base_family = (eax >> 8) & 0xf;
        let family = if base_family == 0xf { base_family + ((eax >> 20) & 0xff) } else { base_family };
        let model = if base_family == 0x6 || base_family == 0xf {
            ((eax >> 12) & 0xf0) | ((eax >> 4) & 0xf)
        } else {
            (eax >> 4) & 0xf
        };
        HostCpu { vendor: String::from_utf8_lossy(&vendor).into_owned(), family, model, stepping: eax & 0xf }
    }
}

impl std::fmt::Display for HostCpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} family {:#x} model {:#x} stepping {}", self.vendor, self.family, self.model, self.stepping)
    }
}

/// The console's registers: vm-superio's `SerialState`, which has no
/// serde, serialised through this mirror of its fields.
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// Everything in the state file.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    pub format: String,
    pub format_version: u32,
    /// The mm-vmm that wrote it (informational: the format version decides).
    pub vmm_version: String,
    pub host_cpu: HostCpu,
    /// Taken on a PVM host: the guest kernel runs with PVM's settings.
    pub pvm: bool,
    pub cpus: u8,
    pub memory_mib: u64,
    pub machine: MachineState,
    pub vcpus: Vec<VcpuState>,
    #[serde(with = "SerialStateDef")]
    pub serial: SerialState,
    /// In guest order (the `--device` order).
    pub devices: Vec<TransportState>,
    pub memory: MemoryImage,
}

/// The fields read before anything else.
#[derive(Deserialize)]
struct Header {
    format: String,
    format_version: u32,
}

fn hypervisor(pvm: bool) -> &'static str {
    if pvm { "on a PVM host" } else { "on hardware KVM" }
}

impl SnapshotState {
    pub fn write(&self, file: &File) -> Result<u64, SnapshotError> {
        let len = self.write_unsynced(file)?;
        file.sync_data().map_err(SnapshotError::Write)?;
        Ok(len)
    }

    /// [`Self::write`] without the sync: for a running snapshot, whose
    /// files the broker makes durable once the guest's I/O runs again
    /// (an fsync while the devices are held would hold the guest's I/O
    /// for it).
    pub fn write_unsynced(&self, file: &File) -> Result<u64, SnapshotError> {
        let mut out = BufWriter::new(file);
        serde_json::to_writer(&mut out, self).map_err(|e| SnapshotError::Write(e.into()))?;
        out.flush().map_err(SnapshotError::Write)?;
        drop(out);
        Ok(file.metadata().map_err(SnapshotError::Write)?.len())
    }

    /// Reads and checks a state file: ours, this version, small enough.
    pub fn read(mut file: &File) -> Result<SnapshotState, SnapshotError> {
        let len = file.metadata().map_err(SnapshotError::Read)?.len();
        if len > MAX_STATE_BYTES {
            return Err(SnapshotError::TooLarge);
        }
        let mut bytes = Vec::with_capacity(len as usize);
        file.read_to_end(&mut bytes).map_err(SnapshotError::Read)?;
        Self::parse(&bytes)
    }

    pub fn parse(bytes: &[u8]) -> Result<SnapshotState, SnapshotError> {
        let header: Header = serde_json::from_slice(bytes).map_err(|e| SnapshotError::NotASnapshot(e.to_string()))?;
        if header.format != FORMAT {
            return Err(SnapshotError::NotASnapshot(format!("its format is {:?}", header.format)));
        }
        if header.format_version != FORMAT_VERSION {
            return Err(SnapshotError::WrongVersion { found: header.format_version });
        }
        serde_json::from_slice(bytes).map_err(SnapshotError::Malformed)
    }

    /// Refuses a snapshot this host cannot resume.
    pub fn check_host(&self, pvm: bool) -> Result<(), SnapshotError> {
        let host = HostCpu::of_this_host();
        if self.host_cpu != host {
            return Err(SnapshotError::OtherCpu { saved: self.host_cpu.to_string(), host: host.to_string() });
        }
        if self.pvm != pvm {
            return Err(SnapshotError::OtherHypervisor { saved: hypervisor(self.pvm), host: hypervisor(pvm) });
        }
        Ok(())
    }

    /// Refuses a snapshot whose devices are not the ones given, in order.
    pub fn check_devices(&self, given: &[&'static str]) -> Result<(), SnapshotError> {
        let saved: Vec<&str> = self.devices.iter().map(|d| d.kind.as_str()).collect();
        if saved != given {
            return Err(SnapshotError::Shape {
                saved: format!("devices {saved:?}"),
                given: format!("devices {given:?}"),
            });
        }
        if self.vcpus.len() != usize::from(self.cpus) {
            return Err(SnapshotError::Shape {
                saved: format!("{} vCPUs", self.cpus),
                given: format!("{} vCPU states", self.vcpus.len()),
            });
        }
        Ok(())
    }
}

/// A file given on the command line: a path, or `fd:N` inherited from the
/// broker (which opened it, so the jail needs no path to it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileArg {
    Path(std::path::PathBuf),
    Fd(std::os::fd::RawFd),
}

impl std::str::FromStr for FileArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("fd:") {
            Some(n) => match n.parse() {
                Ok(fd) if fd > 2 => Ok(FileArg::Fd(fd)),
                _ => Err(format!("{s:?}: fd:N needs a number above 2")),
            },
            None if s.is_empty() => Err("empty path".into()),
            None => Ok(FileArg::Path(s.into())),
        }
    }
}

impl FileArg {
    /// Opens the path read-only, or takes the inherited fd.
    pub fn open(&self) -> std::io::Result<File> {
        match self {
            FileArg::Path(path) => File::open(path),
            FileArg::Fd(fd) => {
                // SAFETY: fcntl(F_GETFD) only checks that the fd is open.
                if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: the fd was passed to this process for this file
                // alone (`--restore-state fd:N`) and is taken once, here.
                Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(*fd) })
            }
        }
    }
}

/// The two files a restore reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    pub state: FileArg,
    pub memory: FileArg,
}

impl SnapshotFiles {
    pub fn open(&self) -> Result<(File, File), SnapshotError> {
        let state = self.state.open().map_err(SnapshotError::Read)?;
        let memory = self.memory.open().map_err(SnapshotError::Read)?;
        Ok((state, memory))
    }
}

#[cfg(test)]
mod tests;
