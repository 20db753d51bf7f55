//! A microVM's snapshots from the broker's side: taking one while it runs,
//! suspending it (a snapshot of its own, then its processes ended), and
//! giving a resumed guest its identity. The files and their layout are in
//! `crate::snapshot`.

use std::rc::Rc;
use std::time::{Duration, Instant};

use mm_exec_protocol::GuestIdentity;
use serde_json::json;

use super::{Order, Vm};
use crate::BrokerError;
use crate::record::VmState;
use crate::snapshot::{self, SnapshotKind, SnapshotManifest, SnapshotStore};

/// Where a suspended microVM's snapshot lives: in its own directory.
pub const SUSPEND_DIR: &str = "suspend";
/// How long a resumed guest may take to answer for its new identity.
const IDENTITY_TIMEOUT: Duration = Duration::from_secs(60);

impl Vm {
    fn running_control(&self, what: &'static str) -> Result<Rc<mm_protocols::vmm_control::VmmClient>, BrokerError> {
        let state = self.state();
        match (state, self.vmm_control()) {
            (VmState::Running, Some(control)) => Ok(control),
            _ => Err(BrokerError::WrongState { name: self.name(), state: state.name().into(), what }),
        }
    }

    /// Snapshots the running microVM into the host's store; it runs on.
    /// The broker's thread waits for mm-vmm meanwhile (a few hundred ms for
    /// a small guest): the control channel is one blocking request at a time.
    pub fn snapshot(
        &self,
        store: &SnapshotStore,
        id: String,
        name: String,
        kind: SnapshotKind,
        caller: &str,
    ) -> Result<SnapshotManifest, BrokerError> {
        let control = self.running_control("only a running microVM can be snapshotted")?;
        store.ensure().map_err(BrokerError::io("creating the snapshot store"))?;
        let manifest = snapshot::manifest_for(&self.record(), id.clone(), name, kind, &self.config.builtin_image);
        let tmp = store.temporary_dir(&id);
        let taken = snapshot::take(&control, &self.dir, &tmp, manifest)
            .and_then(|m| store.commit(&id).map(|()| m).map_err(BrokerError::io("publishing the snapshot")));
        match &taken {
            Ok(m) => self.audit.record(
                "snapshot",
                json!({
                    "caller": caller,
                    "id": m.id,
                    "kind": m.kind,
                    "pause_us": m.pause_us,
                    "io_held_us": m.io_held_us,
                    "memory_bytes": m.memory_bytes,
                }),
            ),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                self.audit.record("snapshot-failed", json!({ "caller": caller, "error": e.to_string() }));
            }
        }
        taken
    }

    /// Saves the running microVM into its own directory and ends its
    /// processes: it holds no host memory until `start` resumes it.
    pub async fn suspend(self: &Rc<Vm>, caller: &str) -> Result<(), BrokerError> {
        let control = self.running_control("only a running microVM can be suspended")?;
        let dest = self.dir.join(SUSPEND_DIR);
        let tmp = self.dir.join(format!(".{SUSPEND_DIR}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        let id = self.record().id;
        let manifest = snapshot::manifest_for(
            &self.record(),
            id,
            String::new(),
            SnapshotKind::Suspend,
            &self.config.builtin_image,
        );
        // Paused for the whole of it: the guest must not run on after its
        // state was saved, or resuming would go back in time.
        control.pause().map_err(|e| BrokerError::BadSpec(format!("cannot suspend: pause: {e}")))?;
        let saved = snapshot::take_paused(&control, &self.dir, &tmp, manifest).and_then(|m| {
            snapshot::write_manifest(&tmp, &m).map(|()| m).map_err(BrokerError::io("writing the suspend manifest"))
        });
        let manifest = match saved {
            Ok(m) => m,
            Err(e) => {
                let _ = control.resume();
                let _ = std::fs::remove_dir_all(&tmp);
                self.audit.record("suspend-failed", json!({ "caller": caller, "error": e.to_string() }));
                return Err(e);
            }
        };
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&tmp, &dest).map_err(BrokerError::io("publishing the suspend snapshot"))?;
        self.audit.record(
            "suspend",
            json!({ "caller": caller, "pause_us": manifest.pause_us, "memory_bytes": manifest.memory_bytes }),
        );
        self.update(|r| r.resume_from = Some(dest.clone()));
        self.suspending.set(true);
        self.set_state(VmState::Stopping, "suspending");
        if let Some(orders) = self.orders.borrow().as_ref() {
            let _ = orders.send(Order::Kill);
        }
        self.wait_stopped().await;
        Ok(())
    }

    /// A guest resumed from a snapshot still believes it is the one that
    /// was saved: hand it this microVM's identity through the exec agent
    /// (new MAC, address, hostname and SSH host key for a restore under a
    /// new name; for a resume of its own suspend, only fresh entropy and
    /// the wall clock). Then the snapshot is no longer needed to start it:
    /// a suspend's files are removed. A restored guest that cannot take
    /// its identity is ended, rather than left on the network as a copy.
    /// Returns whether the microVM may go on (a resumed suspend always may).
    pub(super) async fn take_identity(self: &Rc<Vm>) -> bool {
        let record = self.record();
        let Some(resumed_from) = record.resume_from.clone() else { return true };
        let own_suspend = resumed_from.starts_with(&self.dir);
        let identity = match self.identity(own_suspend) {
            Ok(identity) => identity,
            Err(e) => {
                self.audit.record("identity-failed", json!({ "error": e.to_string() }));
                return false;
            }
        };
        // A branch's snapshot serves this one start: gone once it is over
        // either way (the memory file stays open in mm-vmm, and the disk
        // is linked into this microVM's directory).
        let branch = snapshot::read_manifest(&resumed_from).is_ok_and(|m| m.kind == SnapshotKind::Branch);
        let began = Instant::now();
        let result = self.with_agent(IDENTITY_TIMEOUT, move |client| client.apply_identity(&identity)).await;
        if branch {
            let _ = std::fs::remove_dir_all(&resumed_from);
        }
        match result {
            Ok(()) => {
                let after_ms = began.elapsed().as_millis() as u64;
                self.audit.record("identity", json!({ "after_ms": after_ms, "new": !own_suspend }));
                self.update(|r| r.resume_from = None);
                if own_suspend {
                    let _ = std::fs::remove_dir_all(&resumed_from);
                }
                true
            }
            Err(e) => {
                self.audit.record("identity-failed", json!({ "error": e.to_string() }));
                if !own_suspend {
                    self.kill("the restored guest did not take its new identity");
                    return false;
                }
                // Its own suspend: it is who it was, only its entropy and
                // clock are stale; it runs on and the suspend is done with.
                self.update(|r| r.resume_from = None);
                let _ = std::fs::remove_dir_all(&resumed_from);
                true
            }
        }
    }

    /// Ends a running microVM that must not run on, saying why.
    pub(super) fn kill(&self, why: &str) {
        if self.state() == VmState::Running {
            self.set_state(VmState::Stopping, why);
            if let Some(orders) = self.orders.borrow().as_ref() {
                let _ = orders.send(Order::Kill);
            }
        }
    }

    fn identity(&self, own_suspend: bool) -> std::io::Result<GuestIdentity> {
        let record = self.record();
        let mut identity = GuestIdentity::fresh()?;
        if own_suspend {
            return Ok(identity);
        }
        identity.hostname = Some(record.name.clone());
        identity.new_ssh_host_key = true;
        identity.ssh_keys = Some(record.ssh_keys.clone());
        if let (Some(network), Some(ip), Some(mac)) = (&self.config.network, record.ip, &record.mac) {
            let cidr = &network.config.cidr;
            identity.mac = Some(mac.clone());
            identity.address = Some(format!("{ip}/{}", cidr.prefix));
            identity.gateway = Some(cidr.gateway().to_string());
            identity.dns = network.config.dns.iter().map(ToString::to_string).collect();
        }
        Ok(identity)
    }
}
