//! Snapshots of a microVM, as the broker keeps them: a directory per
//! snapshot, `STATE/snapshots/<id>/` (or `vms/<id>/suspend/` for a
//! suspended microVM), holding
//!
//! * `vm.state` and `vm.mem`: mm-vmm's state file and sparse memory image
//!   (vmm/src/snapshot), written by the jailed mm-vmm into files the broker
//!   opened and passed as fds, so no jail gains a writable path;
//! * `rw.ext4`: the microVM's own disk, copied while the VM was paused, so
//!   memory and disk agree;
//! * `manifest.json`: what the broker needs to restore it (the VM's shape,
//!   workload, base image) and what `mmctl snapshot ls` shows.
//!
//! A snapshot is written into a hidden temporary directory and renamed
//! into place only once whole, so a failure (a device process killed mid
//! snapshot, a full disk) leaves nothing listed; the VM is resumed on every
//! path out.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use mm_protocols::vmm_control::{ControlError, SnapshotReport, VmmClient};
use serde::{Deserialize, Serialize};

use crate::BrokerError;
use crate::launch::{BASE_DISK, DISK_MAP, WRITABLE_DISK, has_layered_disk};
use crate::record::VmRecord;

pub const STATE_FILE: &str = "vm.state";
pub const MEMORY_FILE: &str = "vm.mem";
pub const MANIFEST: &str = "manifest.json";
/// Bumped when the manifest changes incompatibly.
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// `mmctl snapshot create`: the VM runs on; `restore` makes new VMs.
    Snapshot,
    /// `mmctl suspend`: the VM's own, resumed by `start`.
    Suspend,
    /// `mmctl branch`: taken for one new VM, a live copy of the running
    /// one; removed once that copy has its own identity.
    Branch,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    pub format_version: u32,
    pub id: String,
    /// The user's name for it (empty: none).
    pub name: String,
    pub kind: SnapshotKind,
    pub vm_id: String,
    pub vm_name: String,
    pub created_at: String,
    /// The read-only base the guest's root overlay sits on: a restore
    /// needs the very same file under it.
    pub base_image: PathBuf,
    pub image: String,
    pub cpus: u8,
    pub memory_mib: u32,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub ssh_keys: Vec<String>,
    /// Guest RAM written (zero and untouched pages are holes).
    pub memory_bytes: u64,
    /// Disk space the snapshot takes (memory, state and disk, allocated).
    pub disk_bytes: u64,
    /// How long the guest's vCPUs stood still (for a snapshot of a running
    /// VM, only the cut), and the time mm-vmm spent saving.
    pub pause_us: u64,
    pub save_us: u64,
    /// A running VM's snapshot: how long its I/O waited (devices quiesced
    /// until the disk copy was done: from the cut when their back ends log
    /// their writes, else from the start of the memory copy).
    #[serde(default)]
    pub io_held_us: u64,
    /// The source's CPU limits (its record's), inherited by restores,
    /// forks and branches; 0 (older manifests): the defaults.
    #[serde(default)]
    pub cpu_quota_millis: u32,
    #[serde(default)]
    pub cpu_weight: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("no snapshot {0:?}")]
    Unknown(String),
    #[error("snapshot id {0:?} matches more than one snapshot")]
    Ambiguous(String),
    #[error("snapshot {id}: its manifest is unreadable: {why}")]
    BadManifest { id: String, why: String },
    #[error("snapshot {id} is of base image {wanted}, which this broker does not serve (its base is {have})")]
    OtherBase { id: String, wanted: String, have: String },
    #[error("cannot snapshot: mm-vmm: {0}")]
    Vmm(String),
}

/// Space a file takes on disk (sparse files count what is allocated).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// A new file for mm-vmm to write through its fd. Owned by root (the
/// broker): the jailed mm-vmm writes through the fd whatever its uid, and
/// the microVM's uid cannot reach the snapshot through the filesystem.
fn create_for_vmm(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(true).create_new(true).open(path)
}

/// Copies a sparse disk image, sharing extents where the filesystem can
/// (reflink) and keeping holes.
pub fn copy_disk(from: &Path, to: &Path) -> std::io::Result<()> {
    let status = Command::new("cp")
        .args(["--reflink=auto", "--sparse=always"])
        .arg(from)
        .arg(to)
        .stdin(Stdio::null())
        .status()?;
    if !status.success() {
        return Err(std::io::Error::other(format!("cp {} {}: {status}", from.display(), to.display())));
    }
    Ok(())
}

/// Saves the microVM's disk as one flat image at `to`: a copy of its own
/// disk, or, for a layered one (a restored microVM), its base with its
/// layer applied, so no snapshot depends on another.
fn save_disk(vm_dir: &Path, to: &Path) -> std::io::Result<()> {
    if !has_layered_disk(vm_dir) {
        return copy_disk(&vm_dir.join(WRITABLE_DISK), to);
    }
    mm_overlay::flatten(&vm_dir.join(BASE_DISK), &vm_dir.join(WRITABLE_DISK), &vm_dir.join(DISK_MAP), to)
        .map(drop)
        .map_err(std::io::Error::other)
}

/// A snapshot of a running VM, which runs on: mm-vmm writes its state and
/// memory with the vCPUs paused only for the cut and the devices held
/// (`snapshotRunning`), the disk is copied while they are still held, then
/// everything resumes, and the manifest is written: all in `tmp`, which the
/// caller renames into place. The VM is resumed whatever happens.
pub fn take(
    control: &VmmClient,
    vm_dir: &Path,
    tmp: &Path,
    manifest: SnapshotManifest,
) -> Result<SnapshotManifest, BrokerError> {
    let began = Instant::now();
    let taken = take_with(control, vm_dir, tmp, manifest, |c, s, m| c.snapshot_running(s, m));
    let resumed = control.resume();
    let since_request_us = began.elapsed().as_micros() as u64;
    let (mut manifest, report) = taken?;
    resumed.map_err(|e| SnapshotError::Vmm(format!("resume: {e}")))?;
    // Durable only now, with the guest's I/O running again.
    sync_files(tmp).map_err(BrokerError::io(format!("snapshot {}: syncing its files", manifest.id)))?;
    // Devices whose back ends logged their writes served the guest during
    // mm-vmm's copy, and were held only from the cut.
    manifest.io_held_us = since_request_us.saturating_sub(report.io_run_us);
    write_manifest(tmp, &manifest).map_err(BrokerError::io("writing the snapshot manifest"))?;
    Ok(manifest)
}

/// The snapshot of a VM the caller has paused (and resumes or ends):
/// mm-vmm's files and the disk copy in `tmp`; the caller writes the
/// manifest once it knows how long the pause was.
pub fn take_paused(
    control: &VmmClient,
    vm_dir: &Path,
    tmp: &Path,
    manifest: SnapshotManifest,
) -> Result<SnapshotManifest, BrokerError> {
    let (manifest, _) = take_with(control, vm_dir, tmp, manifest, |c, s, m| c.snapshot(s, m))?;
    sync_files(tmp).map_err(BrokerError::io(format!("snapshot {}: syncing its files", manifest.id)))?;
    Ok(manifest)
}

/// Makes a snapshot's files durable: mm-vmm's two (a running snapshot's
/// are written unsynced) and the disk copy.
fn sync_files(tmp: &Path) -> std::io::Result<()> {
    for name in [STATE_FILE, MEMORY_FILE, WRITABLE_DISK] {
        File::open(tmp.join(name))?.sync_all()?;
    }
    Ok(())
}

/// mm-vmm's files (by `snapshot`, one of the client's two snapshot calls)
/// and the disk copy, while the devices are held either way; with mm-vmm's
/// report. Nothing is synced yet: see [`sync_files`].
fn take_with(
    control: &VmmClient,
    vm_dir: &Path,
    tmp: &Path,
    mut manifest: SnapshotManifest,
    snapshot: impl Fn(&VmmClient, &File, &File) -> Result<SnapshotReport, ControlError>,
) -> Result<(SnapshotManifest, SnapshotReport), BrokerError> {
    let io = |what: &str| BrokerError::io(format!("snapshot {}: {what}", manifest.id));
    std::fs::create_dir_all(tmp).map_err(io("creating its directory"))?;
    let state = create_for_vmm(&tmp.join(STATE_FILE)).map_err(io("creating the state file"))?;
    let memory = create_for_vmm(&tmp.join(MEMORY_FILE)).map_err(io("creating the memory file"))?;
    let report = snapshot(control, &state, &memory).map_err(|e| SnapshotError::Vmm(format!("snapshot: {e}")))?;
    save_disk(vm_dir, &tmp.join(WRITABLE_DISK)).map_err(io("copying the disk"))?;
    manifest.memory_bytes = report.memory_bytes;
    manifest.save_us = report.save_us;
    manifest.pause_us = report.paused_us;
    manifest.disk_bytes = [STATE_FILE, MEMORY_FILE, WRITABLE_DISK].iter().map(|f| allocated(&tmp.join(f))).sum();
    Ok((manifest, report))
}

pub fn write_manifest(dir: &Path, manifest: &SnapshotManifest) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(manifest).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!("{MANIFEST}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(MANIFEST))
}

pub fn read_manifest(dir: &Path) -> Result<SnapshotManifest, SnapshotError> {
    let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let bad = |why: String| SnapshotError::BadManifest { id: id.clone(), why };
    let text = std::fs::read_to_string(dir.join(MANIFEST)).map_err(|e| bad(e.to_string()))?;
    let manifest: SnapshotManifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if manifest.format_version != MANIFEST_VERSION {
        return Err(bad(format!("format version {} (this broker reads {MANIFEST_VERSION})", manifest.format_version)));
    }
    Ok(manifest)
}

/// A manifest for a snapshot of `record` about to be taken.
pub fn manifest_for(record: &VmRecord, id: String, name: String, kind: SnapshotKind, base: &Path) -> SnapshotManifest {
    SnapshotManifest {
        format_version: MANIFEST_VERSION,
        id,
        name,
        kind,
        vm_id: record.id.clone(),
        vm_name: record.name.clone(),
        created_at: crate::audit::now_rfc3339(),
        base_image: base.to_path_buf(),
        image: record.image.clone(),
        cpus: record.cpus,
        memory_mib: record.memory_mib,
        command: record.command.clone(),
        env: record.env.clone(),
        ssh_keys: record.ssh_keys.clone(),
        memory_bytes: 0,
        disk_bytes: 0,
        pause_us: 0,
        save_us: 0,
        io_held_us: 0,
        cpu_quota_millis: record.cpu_quota_millis,
        cpu_weight: record.cpu_weight,
    }
}

/// The host's snapshots (`STATE/snapshots`).
pub struct SnapshotStore {
    dir: PathBuf,
}

impl SnapshotStore {
    pub fn new(state_dir: &Path) -> SnapshotStore {
        SnapshotStore { dir: state_dir.join("snapshots") }
    }

    pub fn dir_of(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Where a snapshot is written before it is whole.
    pub fn temporary_dir(&self, id: &str) -> PathBuf {
        self.dir.join(format!(".tmp-{id}"))
    }

    /// Every whole snapshot, oldest first; half-written ones (a broker
    /// that died mid snapshot) are removed on the way.
    pub fn list(&self) -> Vec<SnapshotManifest> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut all = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                let _ = std::fs::remove_dir_all(entry.path());
                continue;
            }
            match read_manifest(&entry.path()) {
                Ok(manifest) => all.push(manifest),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        all.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        all
    }

    /// The snapshot whose id starts with `key`, or whose name is `key`.
    pub fn find(&self, key: &str) -> Result<SnapshotManifest, SnapshotError> {
        let all = self.list();
        if let Some(exact) = all.iter().find(|m| m.id == key || (!m.name.is_empty() && m.name == key)) {
            return Ok(exact.clone());
        }
        let mut matching = all.into_iter().filter(|m| !key.is_empty() && m.id.starts_with(key));
        match (matching.next(), matching.next()) {
            (Some(one), None) => Ok(one),
            (Some(_), Some(_)) => Err(SnapshotError::Ambiguous(key.to_string())),
            _ => Err(SnapshotError::Unknown(key.to_string())),
        }
    }

    pub fn remove(&self, id: &str) -> std::io::Result<()> {
        std::fs::remove_dir_all(self.dir_of(id))
    }

    /// Publishes a finished snapshot.
    pub fn commit(&self, id: &str) -> std::io::Result<()> {
        std::fs::rename(self.temporary_dir(id), self.dir_of(id))
    }

    /// Makes the store's directory (root only).
    pub fn ensure(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(id: &str, name: &str, created_at: &str) -> SnapshotManifest {
        let record: VmRecord = serde_json::from_value(serde_json::json!({
            "id": "abc", "name": "web", "image": "builtin", "cpus": 1, "memory_mib": 128, "command": ["sh"],
            "env": [], "auto_remove": false, "state": "running", "reason": "", "exit_code": null,
            "created_at": "2026-01-01T00:00:00.000Z", "guest_cid": 3, "processes": []
        }))
        .unwrap();
        let mut m = manifest_for(&record, id.into(), name.into(), SnapshotKind::Snapshot, Path::new("/base.ext4"));
        m.created_at = created_at.into();
        m
    }

    #[test]
    fn the_store_finds_by_id_prefix_or_name_and_skips_half_written_ones() {
        let root = std::env::temp_dir().join(format!("mm-snapstore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let store = SnapshotStore::new(&root);
        store.ensure().unwrap();
        for m in [manifest("aa11", "before", "2026-01-02"), manifest("aa22", "", "2026-01-01")] {
            std::fs::create_dir_all(store.temporary_dir(&m.id)).unwrap();
            write_manifest(&store.temporary_dir(&m.id), &m).unwrap();
            store.commit(&m.id).unwrap();
        }
        std::fs::create_dir_all(store.temporary_dir("half")).unwrap();
        std::fs::create_dir_all(store.dir_of("junk")).unwrap(); // no manifest
        let ids: Vec<String> = store.list().into_iter().map(|m| m.id).collect();
        assert_eq!(ids, ["aa22", "aa11"], "oldest first, the half-written and the junk left out");
        assert!(!store.temporary_dir("half").exists(), "a half-written snapshot is cleared away");
        assert_eq!(store.find("aa1").unwrap().id, "aa11");
        assert_eq!(store.find("before").unwrap().id, "aa11");
        assert!(matches!(store.find("aa"), Err(SnapshotError::Ambiguous(_))));
        assert!(matches!(store.find("zz"), Err(SnapshotError::Unknown(_))));
        assert!(matches!(store.find(""), Err(SnapshotError::Unknown(_))));
        let mut future = manifest("bb", "", "2026");
        future.format_version = 99;
        std::fs::create_dir_all(store.dir_of("bb")).unwrap();
        write_manifest(&store.dir_of("bb"), &future).unwrap();
        assert!(matches!(read_manifest(&store.dir_of("bb")), Err(SnapshotError::BadManifest { .. })));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
