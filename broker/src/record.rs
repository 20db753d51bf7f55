//! What the broker remembers about a microVM, on disk in
//! `vms/<id>/record.json` (written to a temporary file and renamed, so a
//! crash leaves the old record or the new one, never half of one; neither
//! name is ever followed if it is a link: see `safe_fs`). After a
//! restart the broker reads every record and re-adopts or reports what the
//! records say was running.

use std::path::Path;

use mm_protocols::device_control::{MAX_BYTES_PER_SEC, MAX_OPS_PER_SEC, RateLimit};
use serde::{Deserialize, Serialize};

/// Lifecycle states, named as Fly's Machines API names them where they
/// overlap; `lost` is a microVM the broker cannot account for after a
/// restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Created,
    Starting,
    Running,
    Stopping,
    Stopped,
    Failed,
    Lost,
    /// Saved to disk with every process gone (`mmctl suspend`); `start`
    /// resumes it from there.
    Suspended,
}

impl VmState {
    pub fn name(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
            VmState::Lost => "lost",
            VmState::Suspended => "suspended",
        }
    }

    /// Processes exist for the microVM in this state.
    pub fn is_live(self) -> bool {
        matches!(self, VmState::Starting | VmState::Running | VmState::Stopping)
    }
}

/// One process of a microVM, as recorded for re-adoption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// `vmm`, `block-root`, `vsock`, ...
    pub role: String,
    pub pid: i32,
    /// Field 22 of /proc/PID/stat: tells a re-used pid from ours.
    pub start_time: u64,
    pub restarts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    pub name: String,
    pub image: String,
    pub cpus: u8,
    pub memory_mib: u32,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub auto_remove: bool,
    pub state: VmState,
    pub reason: String,
    pub exit_code: Option<i32>,
    pub created_at: String,
    /// The guest's vsock context id (unique among this host's microVMs).
    pub guest_cid: u32,
    pub processes: Vec<ProcessRecord>,
    /// The guest's address on the microVM network, held until `rm` (the
    /// records are the address allocation: see network/ipam.rs).
    #[serde(default)]
    pub ip: Option<std::net::Ipv4Addr>,
    #[serde(default)]
    pub mac: Option<String>,
    /// `authorized_keys` lines for mm-init's SSH server.
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// The next start resumes this snapshot directory's guest instead of
    /// booting (a restore under a new name, or a suspended microVM), then
    /// forgets it: later starts boot as usual.
    #[serde(default)]
    pub resume_from: Option<std::path::PathBuf>,
    /// Warm starts (warm.rs): the workload is handed to the guest through
    /// its exec agent once it is up, not put on the kernel command line.
    #[serde(default)]
    pub hand_workload: bool,
    /// This microVM boots with `mm.wait` and becomes the warm snapshot of
    /// this cache key before it is handed its workload.
    #[serde(default)]
    pub warm_template: Option<String>,
    /// mm-vmm's CPU time cap in thousandths of a core, and its weight
    /// (cgroup `cpu.max`/`cpu.weight`); 0 (a record from before limits):
    /// one core per vCPU, weight 100.
    #[serde(default)]
    pub cpu_quota_millis: u32,
    #[serde(default)]
    pub cpu_weight: u16,
    /// The console log's cap when it last started (the broker's
    /// `--console-log-max`), for `inspect`.
    #[serde(default)]
    pub console_log_max: u64,
    /// The device back ends' rate limits (`mmctl run --disk-bps …`,
    /// `mmctl update`): kept here so restarted devices and a restarted
    /// broker keep them.
    #[serde(default)]
    pub io_limits: IoLimits,
}

/// A microVM's rate limits (broker.capnp IoLimits); 0 = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoLimits {
    pub disk_bps: u64,
    pub disk_iops: u64,
    pub net_bps: u64,
    pub net_pps: u64,
}

impl IoLimits {
    /// Each disk's limiter.
    pub fn disk(&self) -> RateLimit {
        RateLimit { bytes_per_sec: self.disk_bps, ops_per_sec: self.disk_iops, burst_bytes: 0 }
    }

    /// The network interface's limiter (each direction).
    pub fn net(&self) -> RateLimit {
        RateLimit { bytes_per_sec: self.net_bps, ops_per_sec: self.net_pps, burst_bytes: 0 }
    }

    /// Refuses absurd limits, naming the one (0 is fine: unlimited).
    pub fn validate(&self) -> Result<(), String> {
        let check = |flag: &str, value: u64, max: u64, unit: &str| {
            if value > max {
                Err(format!("{flag} {value}: more than the most allowed, {max} {unit} (0 means unlimited)"))
            } else {
                Ok(())
            }
        };
        check("disk-bps", self.disk_bps, MAX_BYTES_PER_SEC, "bytes/s")?;
        check("disk-iops", self.disk_iops, MAX_OPS_PER_SEC, "requests/s")?;
        check("net-bps", self.net_bps, MAX_BYTES_PER_SEC, "bytes/s")?;
        check("net-pps", self.net_pps, MAX_OPS_PER_SEC, "packets/s")?;
        // The protocol has room for them, mm-device net not yet a limiter:
        // refused rather than accepted and not enforced.
        if self.net_bps != 0 || self.net_pps != 0 {
            return Err("net-bps/net-pps: the network back end has no rate limiter yet (only disk limits work)".into());
        }
        Ok(())
    }
}

/// mm-vmm's host memory beyond guest RAM: its own heap, thread stacks and
/// the kernel's per-VM structures (what mm-vmm itself allowed before the
/// broker set its limit).
pub const VMM_MEMORY_OVERHEAD_MIB: u64 = 256;
/// Each device process's host memory limit: buffers for its queues and,
/// for a lazily restored guest, the pages it resolves faults with.
pub const DEVICE_MEMORY_MAX_BYTES: u64 = 512 << 20;
/// The default CPU weight (cgroup v2's).
pub const DEFAULT_CPU_WEIGHT: u16 = 100;

/// The first uid/gid given to microVMs: each gets `FIRST_VM_UID + guest_cid`,
/// unique on this host and far above regular users.
pub const FIRST_VM_UID: u32 = 200_000;

impl VmRecord {
    /// The unprivileged uid and gid this microVM's processes run as.
    pub fn uid(&self) -> u32 {
        FIRST_VM_UID + self.guest_cid
    }

    /// mm-vmm's CPU cap in thousandths of a core (default: its vCPUs).
    pub fn effective_cpu_quota_millis(&self) -> u32 {
        match self.cpu_quota_millis {
            0 => u32::from(self.cpus) * 1000,
            millis => millis,
        }
    }

    pub fn effective_cpu_weight(&self) -> u16 {
        match self.cpu_weight {
            0 => DEFAULT_CPU_WEIGHT,
            weight => weight,
        }
    }

    /// mm-vmm's host memory limit: guest RAM plus its overhead.
    pub fn vmm_memory_max_bytes(&self) -> u64 {
        (u64::from(self.memory_mib) + VMM_MEMORY_OVERHEAD_MIB) << 20
    }

    pub fn load(dir: &Path) -> std::io::Result<VmRecord> {
        let text = crate::safe_fs::read_to_string(&dir.join("record.json"))?;
        serde_json::from_str(&text).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Writes `record.json.tmp` (never through a link) and renames it
    /// over `record.json`, in the microVM's own directory.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        crate::safe_fs::replace(dir, "record.json", text.as_bytes())
    }
}

/// Field 22 (starttime) of /proc/PID/stat, or None if no such process.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// A valid microVM name: what `mmctl` and DNS-ish tooling can both carry
/// (the rule `mmctl` checks what it is sent against).
pub fn valid_name(name: &str) -> bool {
    mm_protocols::spec_rules::is_vm_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("web-1"));
        assert!(valid_name("a"));
        assert!(!valid_name(""));
        assert!(!valid_name("-x"));
        assert!(!valid_name("a b"));
        assert!(!valid_name("../etc"));
        assert!(!valid_name(&"a".repeat(64)));
    }

    #[test]
    fn our_own_start_time_is_readable() {
        let me = std::process::id() as i32;
        assert!(process_start_time(me).is_some());
        assert_eq!(process_start_time(me), process_start_time(me));
        assert!(process_start_time(i32::MAX).is_none());
    }

    #[test]
    fn a_record_round_trips_through_disk() {
        let dir = std::env::temp_dir().join(format!("mm-record-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let record = VmRecord {
            id: "abc".into(),
            name: "web".into(),
            image: "builtin".into(),
            cpus: 1,
            memory_mib: 256,
            command: vec!["sh".into()],
            env: vec![("A".into(), "b".into())],
            auto_remove: false,
            state: VmState::Running,
            reason: String::new(),
            exit_code: None,
            created_at: "2026-11-29T00:00:00.000Z".into(),
            guest_cid: 3,
            processes: vec![ProcessRecord { role: "vmm".into(), pid: 1, start_time: 2, restarts: 0 }],
            ip: Some(std::net::Ipv4Addr::new(10, 100, 0, 2)),
            mac: Some("02:6d:0a:64:00:02".into()),
            resume_from: Some("/var/lib/micromachines/snapshots/x".into()),
            hand_workload: true,
            warm_template: Some("0123456789abcdef".into()),
            ssh_keys: vec!["ssh-ed25519 AAAA test".into()],
            cpu_quota_millis: 500,
            cpu_weight: 300,
            console_log_max: 4 << 20,
            io_limits: IoLimits::default(),
        };
        record.save(&dir).unwrap();
        assert_eq!(VmRecord::load(&dir).unwrap(), record);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_linked_record_is_neither_written_through_nor_read() {
        use crate::safe_fs::testing::{Scratch, Target, assert_refused, planted};
        let scratch = Scratch::new("record-links");
        let target = Target::new(&scratch);
        let record: VmRecord = serde_json::from_value(serde_json::json!({
            "id": "abc", "name": "web", "image": "builtin", "cpus": 1, "memory_mib": 128, "command": ["sh"],
            "env": [], "auto_remove": false, "state": "running", "reason": "", "exit_code": null,
            "created_at": "2026-01-01T00:00:00.000Z", "guest_cid": 3, "processes": []
        }))
        .unwrap();
        assert_eq!((record.effective_cpu_quota_millis(), record.effective_cpu_weight()), (1000, 100));
        assert_eq!(record.vmm_memory_max_bytes(), (128 + VMM_MEMORY_OVERHEAD_MIB) << 20);
        let vm = scratch.0.join("vm");
        let tmp = planted(&scratch, "record.json.tmp", &target.path);
        assert_refused(record.save(&vm), &tmp);
        let link = planted(&scratch, "record.json", &target.path);
        assert_refused(VmRecord::load(&vm), &link);
        target.untouched();
        // Once the temporary name is free again, the save replaces the
        // link at record.json itself, not what it points at.
        std::fs::remove_file(&tmp).unwrap();
        record.save(&vm).unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_file());
        assert_eq!(VmRecord::load(&vm).unwrap(), record);
        target.untouched();
    }
}
