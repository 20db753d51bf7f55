//! Every microVM this broker knows, by id, loaded from the state directory
//! at start (and re-adopted), created and removed through the API.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Read;
use std::rc::Rc;

use mm_protocols::spec_rules;
use serde_json::json;

use crate::audit::{AuditLog, now_rfc3339};
use crate::events::EventHub;
use crate::record::{IoLimits, VmRecord, VmState, valid_name};
use crate::snapshot::{SnapshotError, SnapshotKind, SnapshotManifest, SnapshotStore};
use crate::vm::Vm;
use crate::warm::WarmCache;
use crate::{BrokerConfig, BrokerError};

/// Most vCPUs and memory one microVM may ask for.
const MAX_CPUS: u8 = 32;
const MIN_MEMORY_MIB: u32 = 64;
const MAX_MEMORY_MIB: u32 = 64 * 1024;

/// What a client asks for (from `VmSpec`).
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub name: String,
    pub image: String,
    pub cpus: u8,
    pub memory_mib: u32,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub auto_remove: bool,
    pub ssh_keys: Vec<String>,
    /// Boot even when a warm snapshot exists (`mmctl run --cold`).
    pub cold: bool,
    /// mm-vmm's CPU cap in thousandths of a core (0: one core per vCPU)
    /// and weight (0: 100).
    pub cpu_quota_millis: u32,
    pub cpu_weight: u16,
    /// The device back ends' rate limits (0: none).
    pub io_limits: IoLimits,
}

pub struct Registry {
    pub config: Rc<BrokerConfig>,
    vms: RefCell<BTreeMap<String, Rc<Vm>>>,
    /// Broker-wide events (creations, removals): survives `rm`.
    pub audit: AuditLog,
    /// Every audit line, live (`Broker.events`).
    pub events: EventHub,
    /// This host's snapshots (`STATE/snapshots`).
    pub snapshots: SnapshotStore,
}

impl Registry {
    /// Loads every record under `vms/` and re-adopts live microVMs.
    pub fn load(config: Rc<BrokerConfig>) -> std::io::Result<Rc<Registry>> {
        std::fs::create_dir_all(config.vms_dir())?;
        let events = EventHub::default();
        let registry = Rc::new(Registry {
            audit: AuditLog::published(&config.state_dir, &events, "", ""),
            events,
            snapshots: SnapshotStore::new(&config.state_dir),
            config: Rc::clone(&config),
            vms: RefCell::new(BTreeMap::new()),
        });
        for entry in std::fs::read_dir(config.vms_dir())? {
            let dir = entry?.path();
            match VmRecord::load(&dir) {
                Ok(record) => {
                    let vm = Vm::new(Rc::clone(&config), dir, record.clone(), &registry.events);
                    vm.readopt();
                    registry.vms.borrow_mut().insert(record.id, vm);
                }
                Err(e) => tracing::warn!("ignoring {}: unreadable record: {e}", dir.display()),
            }
        }
        // Only the re-adopted microVMs' TAPs may send (stale elements go).
        if let Some(network) = &config.network {
            let vms = registry.vms.borrow();
            let live = vms.values().filter(|vm| vm.state().is_live()).map(|vm| vm.record());
            let taps: Vec<_> = live.filter_map(|record| crate::launch::tap_for(&config, &record)).collect();
            network.sync_guards(&taps).map_err(std::io::Error::other)?;
        }
        Ok(registry)
    }

    pub fn list(&self) -> Vec<Rc<Vm>> {
        self.vms.borrow().values().cloned().collect()
    }

    /// By exact name, exact id, or unique id prefix.
    pub fn find(&self, name: &str) -> Result<Rc<Vm>, BrokerError> {
        let vms = self.vms.borrow();
        if let Some(vm) = vms.values().find(|vm| vm.name() == name) {
            return Ok(Rc::clone(vm));
        }
        let matches: Vec<_> = vms.iter().filter(|(id, _)| !name.is_empty() && id.starts_with(name)).collect();
        match matches.as_slice() {
            [(_, vm)] => Ok(Rc::clone(vm)),
            _ => Err(BrokerError::UnknownVm(name.to_string())),
        }
    }

    /// Validates `request`, writes the microVM's directory and record, and
    /// starts it.
    pub fn create(&self, request: CreateRequest, caller: &str) -> Result<Rc<Vm>, BrokerError> {
        self.create_from(request, None, caller)
    }

    /// A new microVM resuming `snapshot`'s guest (see `restoreVm` in
    /// broker.capnp): the snapshot's shape and workload, its own identity.
    pub fn restore(
        &self,
        snapshot: &str,
        name: String,
        ssh_keys: Vec<String>,
        caller: &str,
    ) -> Result<Rc<Vm>, BrokerError> {
        let manifest = self.restorable(snapshot)?;
        self.audit.record("restore", json!({ "caller": caller, "snapshot": manifest.id }));
        self.create_from(restore_request(&manifest, name, ssh_keys), Some(&manifest), caller)
    }

    /// The snapshot `key` names, if this broker can restore it.
    fn restorable(&self, key: &str) -> Result<SnapshotManifest, BrokerError> {
        let manifest = self.snapshots.find(key)?;
        if manifest.base_image != self.config.builtin_image {
            return Err(SnapshotError::OtherBase {
                id: manifest.id,
                wanted: manifest.base_image.display().to_string(),
                have: self.config.builtin_image.display().to_string(),
            }
            .into());
        }
        Ok(manifest)
    }

    /// `count` new microVMs from `snapshot` (see `forkVm` in
    /// broker.capnp): every name and the memory for all of them are
    /// checked first, so a fork that cannot be whole starts nothing.
    pub fn fork(
        &self,
        snapshot: &str,
        count: u32,
        prefix: String,
        ssh_keys: Vec<String>,
        caller: &str,
    ) -> Result<Vec<Rc<Vm>>, BrokerError> {
        let manifest = self.restorable(snapshot)?;
        if !(1..=MAX_FORK).contains(&count) {
            return Err(BrokerError::BadSpec(format!("fork count {count}: must be 1 to {MAX_FORK}")));
        }
        let prefix = match prefix {
            p if !p.is_empty() => p,
            _ if !manifest.name.is_empty() => format!("{}-fork", manifest.name),
            _ => format!("{}-fork", &manifest.id[..6.min(manifest.id.len())]),
        };
        let names: Vec<String> = (1..=count).map(|i| format!("{prefix}-{i}")).collect();
        for name in &names {
            self.check_new_name(name)?;
        }
        let wanted = u64::from(count) * u64::from(manifest.memory_mib);
        let available = self.available_memory_mib();
        if wanted > available {
            return Err(BrokerError::NoMemory { wanted, available });
        }
        self.audit.record("fork", json!({ "caller": caller, "snapshot": manifest.id, "count": count }));
        names
            .into_iter()
            .map(|name| self.create_from(restore_request(&manifest, name, ssh_keys.clone()), Some(&manifest), caller))
            .collect()
    }

    /// Whether `name` may name a new microVM: well formed, and no microVM
    /// has it (an id prefix that matches is no conflict).
    fn check_new_name(&self, name: &str) -> Result<(), BrokerError> {
        if !valid_name(name) {
            return Err(BrokerError::BadName(name.to_string()));
        }
        if self.find(name).is_ok_and(|vm| vm.name() == name) {
            return Err(BrokerError::DuplicateName(name.to_string()));
        }
        Ok(())
    }

    /// Memory (MiB) a new microVM may still be given: guest RAM is touched
    /// lazily, so MemAvailable alone would let microVMs promise more than
    /// the host has; what running ones may still claim is counted against
    /// MemTotal too.
    fn available_memory_mib(&self) -> u64 {
        let committed: u64 = self
            .vms
            .borrow()
            .values()
            .filter(|vm| vm.state().is_live())
            .map(|vm| u64::from(vm.record().memory_mib))
            .sum();
        memory_headroom_mib(committed, self.config.reserved_memory_mib)
    }

    /// A live copy of the running `source` (see `branch` in broker.capnp):
    /// a snapshot of it while it runs on (its vCPUs pause only for the
    /// cut), restored at once as a new microVM with its own identity; the
    /// snapshot is removed once the copy has taken that identity.
    pub fn branch(&self, source: &Rc<Vm>, name: String, caller: &str) -> Result<Rc<Vm>, BrokerError> {
        let name = if name.is_empty() {
            let stem = format!("{}-branch", source.name());
            (1..)
                .map(|n| if n == 1 { stem.clone() } else { format!("{stem}-{n}") })
                .find(|candidate| self.find(candidate).is_err())
                .unwrap_or(stem)
        } else {
            name
        };
        self.check_new_name(&name)?;
        let manifest = source.snapshot(&self.snapshots, random_id()?, String::new(), SnapshotKind::Branch, caller)?;
        self.audit.record("branch", json!({ "caller": caller, "source": manifest.vm_id, "snapshot": manifest.id }));
        let created = self.create_from(restore_request(&manifest, name, Vec::new()), Some(&manifest), caller);
        if created.is_err() {
            let _ = self.snapshots.remove(&manifest.id);
        }
        created
    }

    /// Snapshots `vm` into the store under a fresh id.
    pub fn snapshot(&self, vm: &Rc<Vm>, name: String, caller: &str) -> Result<SnapshotManifest, BrokerError> {
        if !name.is_empty() && (!valid_name(&name) || self.snapshots.find(&name).is_ok()) {
            return Err(BrokerError::BadSpec(format!("snapshot name {name:?}: invalid or taken")));
        }
        vm.snapshot(&self.snapshots, random_id()?, name, SnapshotKind::Snapshot, caller)
    }

    /// Deletes a snapshot of the store.
    pub fn remove_snapshot(&self, key: &str, caller: &str) -> Result<(), BrokerError> {
        let manifest = self.snapshots.find(key)?;
        self.snapshots.remove(&manifest.id).map_err(BrokerError::io("removing the snapshot"))?;
        self.audit.record("snapshot-remove", json!({ "caller": caller, "id": manifest.id }));
        Ok(())
    }

    fn create_from(
        &self,
        mut request: CreateRequest,
        snapshot: Option<&SnapshotManifest>,
        caller: &str,
    ) -> Result<Rc<Vm>, BrokerError> {
        if request.image.is_empty() {
            request.image = "builtin".into();
        }
        if request.image != "builtin" {
            return Err(BrokerError::UnknownImage(request.image));
        }
        if request.memory_mib == 0 {
            request.memory_mib = 256;
        }
        check_spec(&request)?;
        let available = self.available_memory_mib();
        if u64::from(request.memory_mib) > available {
            return Err(BrokerError::NoMemory { wanted: request.memory_mib.into(), available });
        }
        let address = match &self.config.network {
            Some(network) => {
                let used: Vec<_> = self.vms.borrow().values().filter_map(|vm| vm.record().ip).collect();
                Some(network.allocate(&used)?)
            }
            None => None,
        };
        let id = random_id()?;
        if request.name.is_empty() {
            request.name = format!("vm-{}", &id[..6]);
        }
        self.check_new_name(&request.name)?;
        // Warm start: restore this image's post-boot snapshot, or become it.
        let warm = match (&self.config.warm_cache, snapshot, request.cold) {
            (Some(dir), None, false) => {
                let key = WarmCache::key(&self.config, request.cpus, request.memory_mib);
                Some(match WarmCache::new(dir.clone()).find(&key) {
                    Some(found) => (Some(found), None),
                    None => (None, Some(key)),
                })
            }
            _ => None,
        };
        let record = VmRecord {
            id: id.clone(),
            name: request.name,
            image: request.image,
            cpus: request.cpus,
            memory_mib: request.memory_mib,
            command: if request.command.is_empty() { vec!["sh".into()] } else { request.command },
            env: request.env,
            auto_remove: request.auto_remove,
            state: VmState::Created,
            reason: String::new(),
            exit_code: None,
            created_at: now_rfc3339(),
            guest_cid: self.free_cid(),
            processes: Vec::new(),
            ip: address.as_ref().map(|(ip, _)| *ip),
            mac: address.map(|(_, mac)| mac),
            ssh_keys: request.ssh_keys,
            resume_from: match (&warm, snapshot) {
                (Some((found, _)), _) => found.clone(),
                (None, Some(m)) if m.kind != SnapshotKind::Suspend => Some(self.snapshots.dir_of(&m.id)),
                (None, _) => None,
            },
            hand_workload: warm.is_some(),
            warm_template: warm.and_then(|(_, template)| template),
            cpu_quota_millis: request.cpu_quota_millis,
            cpu_weight: request.cpu_weight,
            console_log_max: self.config.console_log_max,
            io_limits: request.io_limits,
        };
        let dir = self.config.vms_dir().join(&id);
        create_private_dir(&dir).map_err(BrokerError::io(format!("creating {}", dir.display())))?;
        record.save(&dir).map_err(BrokerError::io("saving the record"))?;
        let vm = Vm::new(Rc::clone(&self.config), dir, record.clone(), &self.events);
        self.audit.record("create", json!({ "caller": caller, "id": id, "name": record.name }));
        vm.audit.record(
            "create",
            json!({ "caller": caller, "spec": {
                "cpus": record.cpus, "memory_mib": record.memory_mib, "command": record.command, "image": record.image,
                "cpu_quota_millis": record.effective_cpu_quota_millis(), "cpu_weight": record.effective_cpu_weight(),
                "io_limits": record.io_limits,
                "ip": record.ip, "ssh_keys": record.ssh_keys.len(),
                "snapshot": snapshot.map(|m| m.id.clone()),
                "warm": record.resume_from.is_some() && snapshot.is_none(),
            }}),
        );
        self.vms.borrow_mut().insert(id, Rc::clone(&vm));
        vm.start(caller)?;
        Ok(vm)
    }

    /// Forgets a microVM that is not running and deletes its directory.
    pub fn remove(&self, vm: &Rc<Vm>, caller: &str) -> Result<(), BrokerError> {
        let state = vm.state();
        if state.is_live() {
            return Err(BrokerError::WrongState {
                name: vm.name(),
                state: state.name().into(),
                what: "stop it first, or remove with force",
            });
        }
        let record = vm.record();
        self.audit.record("remove", json!({ "caller": caller, "id": record.id, "name": record.name }));
        self.vms.borrow_mut().remove(&record.id);
        match std::fs::remove_dir_all(&vm.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()), // auto-removed
            Err(e) => Err(BrokerError::io(format!("removing {}", vm.dir.display()))(e)),
        }
    }

    /// Forgets a microVM whose directory is gone (auto-removed).
    pub fn forget_removed(&self) {
        self.vms.borrow_mut().retain(|_, vm| vm.dir.exists());
    }

    fn free_cid(&self) -> u32 {
        let used: Vec<u32> = self.vms.borrow().values().map(|vm| vm.record().guest_cid).collect();
        (3..).find(|cid| !used.contains(cid)).unwrap_or(3)
    }
}

/// Most clones one fork makes.
pub const MAX_FORK: u32 = 64;

/// The spec of a new microVM restored from `manifest`: the snapshot's
/// shape and workload, its SSH keys unless others are given.
fn restore_request(manifest: &SnapshotManifest, name: String, ssh_keys: Vec<String>) -> CreateRequest {
    CreateRequest {
        name,
        image: manifest.image.clone(),
        cpus: manifest.cpus,
        memory_mib: manifest.memory_mib,
        command: manifest.command.clone(),
        env: manifest.env.clone(),
        auto_remove: false,
        ssh_keys: if ssh_keys.is_empty() { manifest.ssh_keys.clone() } else { ssh_keys },
        cold: true,
        // The source's limits (0 in a manifest from before limits: defaults).
        cpu_quota_millis: manifest.cpu_quota_millis,
        cpu_weight: manifest.cpu_weight,
        // Rate limits are not in the manifest: a restored copy has none
        // until `mmctl update` gives it some.
        io_limits: IoLimits::default(),
    }
}

/// What a spec must be, whoever sends it (`mmctl`, the controller, a
/// restore): 1 to `MAX_CPUS` vCPUs (0 is refused, not taken for 1), memory
/// in range, plain variable names, public keys only, and a workload that
/// fits the guest's kernel command line (`mm_protocols::spec_rules`), so
/// that what would fail at boot is refused here.
fn check_spec(request: &CreateRequest) -> Result<(), BrokerError> {
    if !(1..=MAX_CPUS).contains(&request.cpus) {
        return Err(BrokerError::BadSpec(format!("cpus {}: must be 1 to {MAX_CPUS}", request.cpus)));
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&request.memory_mib) {
        return Err(BrokerError::BadSpec(format!(
            "memory {} MiB: must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}",
            request.memory_mib
        )));
    }
    if let Some((key, _)) = request.env.iter().find(|(k, _)| k.is_empty() || k.contains('=') || k.contains('\0')) {
        return Err(BrokerError::BadSpec(format!("bad environment variable name {key:?}")));
    }
    validate_ssh_keys(&request.ssh_keys)?;
    check_cpu_limits(request, host_cpus())?;
    request.io_limits.validate().map_err(BrokerError::BadSpec)?;
    let env = request.env.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    spec_rules::check_workload(&request.command, env, &request.ssh_keys)
        .map_err(|e| BrokerError::BadSpec(e.to_string()))?;
    Ok(())
}

/// The smallest CPU cap: the kernel's minimum quota, 1 ms per 100 ms period.
const MIN_CPU_QUOTA_MILLIS: u32 = 10;

/// CPU limits in range: a cap of at least [`MIN_CPU_QUOTA_MILLIS`] and at
/// most the host's CPUs (more would limit nothing), a weight of 1 to
/// 10000 (cgroup v2's range). 0 is each one's default.
fn check_cpu_limits(request: &CreateRequest, host_cpus: u32) -> Result<(), BrokerError> {
    let quota = request.cpu_quota_millis;
    if quota != 0 && !(MIN_CPU_QUOTA_MILLIS..=host_cpus * 1000).contains(&quota) {
        return Err(BrokerError::BadSpec(format!(
            "cpu quota {}: must be between 0.01 and {host_cpus} cores (this host's CPUs)",
            f64::from(quota) / 1000.0
        )));
    }
    if request.cpu_weight > 10_000 {
        return Err(BrokerError::BadSpec(format!("cpu weight {}: must be 1 to 10000", request.cpu_weight)));
    }
    Ok(())
}

/// The CPUs this host has online.
fn host_cpus() -> u32 {
    // SAFETY: sysconf reads a system value and has no side effects.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(online).unwrap_or(1).max(1)
}

/// Public keys only, one per line, of a type OpenSSH knows. A bad one is
/// named by its place in the list, never shown: whatever file it came
/// from may be a secret.
fn validate_ssh_keys(keys: &[String]) -> Result<(), BrokerError> {
    if let Some(index) = keys.iter().position(|key| !spec_rules::is_ssh_public_key(key)) {
        return Err(BrokerError::BadSpec(format!(
            "SSH key {} of {} is not an SSH public key (a line such as \"ssh-ed25519 AAAA… comment\")",
            index + 1,
            keys.len()
        )));
    }
    Ok(())
}

fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// 12 random hex digits.
fn random_id() -> Result<String, BrokerError> {
    let mut bytes = [0u8; 6];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(BrokerError::io("reading /dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What new microVMs may still be given, in MiB, with `committed` MiB
/// promised to the live ones and `reserved` kept back (see
/// `Registry::available_memory_mib`; the metrics report the same figure).
pub(crate) fn memory_headroom_mib(committed: u64, reserved: u64) -> u64 {
    meminfo_mib("MemAvailable").min(meminfo_mib("MemTotal").saturating_sub(committed)).saturating_sub(reserved)
}

/// A /proc/meminfo field (`MemTotal`, `MemAvailable`), in MiB; 0 if absent.
fn meminfo_mib(field: &str) -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_keys_are_checked() {
        let ed = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGs= me@host".to_string();
        assert!(validate_ssh_keys(std::slice::from_ref(&ed)).is_ok());
        assert!(validate_ssh_keys(&[]).is_ok());
        for bad in ["", "hello", "ssh-ed25519", "ssh-ed25519 not*base64", "-----BEGIN OPENSSH PRIVATE KEY-----"] {
            assert!(validate_ssh_keys(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    /// A line that is not a key is named by its place, never shown (it may
    /// be the first line of /etc/shadow).
    #[test]
    fn a_bad_key_is_not_echoed() {
        let ed = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGs= me@host".to_string();
        let secret = "root:$6$s3cr3tSalt$hashhashhash:19000:0:99999:7:::".to_string();
        let e = validate_ssh_keys(&[ed, secret]).unwrap_err().to_string();
        assert!(e.contains("SSH key 2 of 2"), "{e}");
        assert!(!e.contains("s3cr3t") && !e.contains("root:"), "{e}");
    }

    fn spec() -> CreateRequest {
        CreateRequest { image: "builtin".into(), cpus: 1, memory_mib: 256, ..CreateRequest::default() }
    }

    #[test]
    fn zero_cpus_are_refused() {
        assert!(check_spec(&spec()).is_ok());
        let e = check_spec(&CreateRequest { cpus: 0, ..spec() }).unwrap_err().to_string();
        assert!(e.contains("cpus 0"), "{e}");
        assert!(check_spec(&CreateRequest { cpus: MAX_CPUS + 1, ..spec() }).is_err());
    }

    /// `mmctl run -e A=<70 KB>` was created, then failed at boot.
    #[test]
    fn a_workload_too_large_for_the_kernel_command_line_is_refused() {
        let big = CreateRequest { env: vec![("A".into(), "x".repeat(70 * 1024))], ..spec() };
        let e = check_spec(&big).unwrap_err().to_string();
        assert!(e.contains("kernel command line") && e.contains("1400"), "{e}");
        let keys = vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGs= me@host".to_string(); 30];
        assert!(check_spec(&CreateRequest { ssh_keys: keys, ..spec() }).is_err());
        let argv = vec!["y".repeat(2000)];
        assert!(check_spec(&CreateRequest { command: argv, ..spec() }).is_err());
        let fits = CreateRequest { env: vec![("A".into(), "x".repeat(900))], ..spec() };
        assert!(check_spec(&fits).is_ok());
    }

    #[test]
    fn cpu_limits_are_checked() {
        let ok = |quota, weight| {
            check_cpu_limits(&CreateRequest { cpu_quota_millis: quota, cpu_weight: weight, ..spec() }, 4)
        };
        assert!(ok(0, 0).is_ok(), "the defaults");
        assert!(ok(10, 1).is_ok() && ok(4000, 10_000).is_ok() && ok(500, 100).is_ok());
        let e = ok(9, 0).unwrap_err().to_string();
        assert!(e.contains("cpu quota 0.009") && e.contains("between 0.01 and 4 cores"), "{e}");
        assert!(ok(4001, 0).is_err(), "more than the host's CPUs");
        let e = ok(0, 10_001).unwrap_err().to_string();
        assert!(e.contains("cpu weight 10001"), "{e}");
        assert!(host_cpus() >= 1);
    }

    #[test]
    fn io_limits_are_checked() {
        let with = |io_limits| check_spec(&CreateRequest { io_limits, ..spec() });
        assert!(with(IoLimits::default()).is_ok(), "0: unlimited");
        assert!(with(IoLimits { disk_bps: 100 << 30, disk_iops: 10_000_000, ..IoLimits::default() }).is_ok());
        let e = with(IoLimits { net_bps: 1 << 20, ..IoLimits::default() }).unwrap_err().to_string();
        assert!(e.contains("no rate limiter yet"), "{e}");
        let e = with(IoLimits { disk_bps: (100 << 30) + 1, ..IoLimits::default() }).unwrap_err().to_string();
        assert!(e.contains("disk-bps 107374182401") && e.contains("most allowed"), "{e}");
        let e = with(IoLimits { net_pps: u64::MAX, ..IoLimits::default() }).unwrap_err().to_string();
        assert!(e.contains("net-pps"), "{e}");
    }

    #[test]
    fn reads_meminfo_fields() {
        let total = meminfo_mib("MemTotal");
        assert!(total > 0);
        assert!(meminfo_mib("MemAvailable") <= total);
        assert_eq!(meminfo_mib("NoSuchField"), 0);
    }
}
