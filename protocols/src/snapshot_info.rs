//! `SnapshotInfo` (`broker.capnp`) as a plain struct: one snapshot as the
//! broker that holds it describes it. Written by the broker, read by
//! `mmctl snapshot` (local) and the controller's broker session, so the
//! three agree on every field.

use serde::{Deserialize, Serialize};

use crate::broker_capnp::snapshot_info;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: String,
    /// The user's name for it on this host (empty: none).
    pub name: String,
    /// `snapshot` or `suspend`.
    pub kind: String,
    pub vm_id: String,
    pub vm_name: String,
    /// RFC 3339.
    pub created_at: String,
    pub cpus: u8,
    pub memory_mib: u32,
    /// Guest RAM saved (zero and untouched pages are left out).
    pub memory_bytes: u64,
    /// Space the snapshot takes on the host's disk.
    pub disk_bytes: u64,
    /// How long the guest stood still for it.
    pub pause_us: u64,
}

impl SnapshotInfo {
    /// Text that is not UTF-8 is an error: a snapshot id must be exact.
    pub fn read(r: snapshot_info::Reader<'_>) -> capnp::Result<SnapshotInfo> {
        let text = |t: capnp::Result<capnp::text::Reader<'_>>| -> capnp::Result<String> {
            t?.to_string().map_err(|e| capnp::Error::failed(format!("snapshot info text is not UTF-8: {e}")))
        };
        Ok(SnapshotInfo {
            id: text(r.get_id())?,
            name: text(r.get_name())?,
            kind: text(r.get_kind())?,
            vm_id: text(r.get_vm_id())?,
            vm_name: text(r.get_vm_name())?,
            created_at: text(r.get_created_at())?,
            cpus: r.get_cpus(),
            memory_mib: r.get_memory_mib(),
            memory_bytes: r.get_memory_bytes(),
            disk_bytes: r.get_disk_bytes(),
            pause_us: r.get_pause_us(),
        })
    }

    pub fn write(&self, mut b: snapshot_info::Builder<'_>) {
        b.set_id(&self.id);
        b.set_name(&self.name);
        b.set_kind(&self.kind);
        b.set_vm_id(&self.vm_id);
        b.set_vm_name(&self.vm_name);
        b.set_created_at(&self.created_at);
        b.set_cpus(self.cpus);
        b.set_memory_mib(self.memory_mib);
        b.set_memory_bytes(self.memory_bytes);
        b.set_disk_bytes(self.disk_bytes);
        b.set_pause_us(self.pause_us);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_reads_back_whole() {
        let info = SnapshotInfo {
            id: "0123456789ab".into(),
            name: "before-upgrade".into(),
            kind: "snapshot".into(),
            vm_id: "abcdef012345".into(),
            vm_name: "web".into(),
            created_at: "2026-12-06T10:00:00.000Z".into(),
            cpus: 2,
            memory_mib: 256,
            memory_bytes: 12 << 20,
            disk_bytes: 40 << 20,
            pause_us: 1500,
        };
        let mut message = capnp::message::Builder::new_default();
        info.write(message.init_root::<snapshot_info::Builder>());
        let reader = message.get_root_as_reader::<snapshot_info::Reader>().unwrap();
        assert_eq!(SnapshotInfo::read(reader).unwrap(), info);
    }
}
