//! Snapshots through a host's broker (`protocols/broker.capnp`): taking
//! and removing one for the REST API (`Vm.snapshot`,
//! `Broker.removeSnapshot`), and for the driver suspending a machine
//! (`Vm.suspend`), restoring a new one from a snapshot
//! (`Broker.restoreVm`, in place of `createVm`) and making a branch, a live
//! copy of a running machine (`Vm.branch` on the source, in place of
//! `createVm`).
//!
//! The broker's snapshot names are host-wide, so the controller never
//! sends one: a tenant's name lives in Postgres, where it is unique per
//! namespace, and the broker is always addressed by its own id.

use std::time::Duration;

use mm_protocols::broker_capnp::{broker, snapshot_info};

use super::SessionError;
use super::ops::{get_vm, within};
use crate::db::models::{MachineRow, string_list};

/// Taking a snapshot pauses the guest and copies its disk and memory: a big
/// guest on a slow disk takes a while.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Removing one deletes a directory.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(60);

/// A snapshot as its broker describes it (`broker.capnp`'s `SnapshotInfo`,
/// read as mmctl reads it).
pub use mm_protocols::snapshot_info::SnapshotInfo;

/// Reads the broker's answer; text that is not UTF-8 is a broken link.
fn read_info(info: snapshot_info::Reader<'_>) -> Result<SnapshotInfo, SessionError> {
    SnapshotInfo::read(info).map_err(|e| SessionError::Link(format!("the broker sent a bad snapshot: {e}")))
}

pub(super) async fn snapshot(broker: &broker::Client, name: &str) -> Result<SnapshotInfo, SessionError> {
    let take = async {
        let vm = get_vm(broker, name).await?;
        let mut request = vm.snapshot_request();
        request.get().set_name("");
        let reply = request.send().promise.await?;
        let info = read_info(reply.get()?.get_snapshot()?)?;
        if info.id.is_empty() {
            return Err(SessionError::Link("the broker answered a snapshot without an id".into()));
        }
        Ok(info)
    };
    within(SNAPSHOT_TIMEOUT, take).await
}

/// Deletes snapshot `id` on the broker; one it does not have (any more)
/// counts as deleted.
pub(super) async fn remove(broker: &broker::Client, id: &str) -> Result<(), SessionError> {
    let remove = async {
        let mut request = broker.remove_snapshot_request();
        request.get().set_id(id);
        match request.send().promise.await {
            Ok(_) => Ok(()),
            Err(e) => match SessionError::from(e) {
                SessionError::Broker { kind, .. } if kind == "not-found" => Ok(()),
                other => Err(other),
            },
        }
    };
    within(REMOVE_TIMEOUT, remove).await
}

/// Suspends machine `name`'s microVM: saved to disk, its processes ended;
/// returns the state the broker reports afterwards (`suspended`).
pub(super) async fn suspend(broker: &broker::Client, name: &str) -> Result<String, SessionError> {
    let vm = get_vm(broker, name).await?;
    let reply = vm.suspend_request().send().promise.await?;
    let state = reply.get()?.get_info()?.get_state()?;
    state.to_string().map_err(|e| SessionError::Link(format!("the broker sent text that is not UTF-8: {e}")))
}

/// Creates machine `row`'s microVM from snapshot `snapshot` (instead of
/// `createVm`): named after the machine, with its SSH keys; the rest (size,
/// image, workload) is the snapshot's, which the machine's row agrees
/// with by construction (`store::machines::restored_workload`).
pub(super) async fn restore(broker: &broker::Client, row: &MachineRow, snapshot: &str) -> Result<(), SessionError> {
    let mut request = broker.restore_vm_request();
    {
        let mut params = request.get();
        params.set_snapshot(snapshot);
        params.set_name(row.id.to_string());
        let keys = string_list(&row.ssh_keys);
        let mut list = params.init_ssh_keys(keys.len() as u32);
        for (i, key) in keys.iter().enumerate() {
            list.set(i as u32, key);
        }
    }
    request.send().promise.await?;
    Ok(())
}

/// Creates branch `row`'s microVM as a live copy of machine `source`'s
/// running one (instead of `createVm`): the broker snapshots the source
/// while it runs on and restores that at once under the new name (the
/// machine's id) with an identity of its own; its workload, size and keys
/// are the source's, which the row copied (`store::fork::branch`).
pub(super) async fn branch(broker: &broker::Client, row: &MachineRow, source: uuid::Uuid) -> Result<(), SessionError> {
    let vm = get_vm(broker, &source.to_string()).await?;
    let mut request = vm.branch_request();
    request.get().set_name(row.id.to_string());
    request.send().promise.await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Against a stand-in broker over a real two-party connection, as
    //! `streams`' tests: what the controller sends and how the broker's
    //! answers and refusals come back.

    use std::cell::RefCell;
    use std::rc::Rc;

    use capnp_rpc::RpcSystem;
    use capnp_rpc::rpc_twoparty_capnp::Side;
    use mm_protocols::broker_capnp::{vm, vm_info};
    use mm_protocols::rpc::vat_network;

    use super::*;

    #[derive(Default)]
    struct Seen {
        /// (snapshot, name, ssh keys) of each restoreVm.
        restores: RefCell<Vec<(String, String, Vec<String>)>>,
        removed: RefCell<Vec<String>>,
        /// Names sent with Vm.snapshot.
        snapshot_names: RefCell<Vec<String>>,
        /// Names sent with Vm.branch.
        branches: RefCell<Vec<String>>,
    }

    /// What the stand-in's `snapshot` answers, field for field.
    fn served() -> SnapshotInfo {
        SnapshotInfo {
            id: "0123456789ab".into(),
            kind: "snapshot".into(),
            vm_name: "vm".into(),
            created_at: "2027-01-05T10:00:00Z".into(),
            cpus: 2,
            memory_mib: 256,
            memory_bytes: 12 << 20,
            disk_bytes: 40 << 20,
            pause_us: 1500,
            ..SnapshotInfo::default()
        }
    }

    struct FakeVm(Rc<Seen>);

    impl vm::Server for FakeVm {
        async fn snapshot(
            self: Rc<Self>,
            params: vm::SnapshotParams,
            mut results: vm::SnapshotResults,
        ) -> Result<(), capnp::Error> {
            self.0.snapshot_names.borrow_mut().push(params.get()?.get_name()?.to_string().unwrap());
            served().write(results.get().init_snapshot());
            Ok(())
        }

        async fn suspend(
            self: Rc<Self>,
            _: vm::SuspendParams,
            mut results: vm::SuspendResults,
        ) -> Result<(), capnp::Error> {
            let mut info: vm_info::Builder<'_> = results.get().init_info();
            info.set_state("suspended");
            Ok(())
        }

        async fn branch(
            self: Rc<Self>,
            params: vm::BranchParams,
            mut results: vm::BranchResults,
        ) -> Result<(), capnp::Error> {
            self.0.branches.borrow_mut().push(params.get()?.get_name()?.to_string().unwrap());
            results.get().set_vm(capnp_rpc::new_client(FakeVm(Rc::clone(&self.0))));
            Ok(())
        }
    }

    struct FakeBroker(Rc<Seen>);

    impl broker::Server for FakeBroker {
        async fn get_vm(
            self: Rc<Self>,
            params: broker::GetVmParams,
            mut results: broker::GetVmResults,
        ) -> Result<(), capnp::Error> {
            let name = params.get()?.get_name()?.to_string().unwrap();
            if name != "vm" && name != uuid::Uuid::max().to_string() {
                return Err(capnp::Error::failed("not-found: no microVM \"other\"".into()));
            }
            results.get().set_vm(capnp_rpc::new_client(FakeVm(Rc::clone(&self.0))));
            Ok(())
        }

        async fn remove_snapshot(
            self: Rc<Self>,
            params: broker::RemoveSnapshotParams,
            _: broker::RemoveSnapshotResults,
        ) -> Result<(), capnp::Error> {
            let id = params.get()?.get_id()?.to_string().unwrap();
            match id.as_str() {
                "gone" => Err(capnp::Error::failed("not-found: no snapshot \"gone\"".into())),
                "busy" => Err(capnp::Error::failed("internal: removing the snapshot: EBUSY".into())),
                _ => {
                    self.0.removed.borrow_mut().push(id);
                    Ok(())
                }
            }
        }

        async fn restore_vm(
            self: Rc<Self>,
            params: broker::RestoreVmParams,
            mut results: broker::RestoreVmResults,
        ) -> Result<(), capnp::Error> {
            let params = params.get()?;
            let keys = params.get_ssh_keys()?.iter().map(|k| k.unwrap().to_string().unwrap()).collect();
            let snapshot = params.get_snapshot()?.to_string().unwrap();
            if snapshot == "missing" {
                return Err(capnp::Error::failed("not-found: no snapshot \"missing\"".into()));
            }
            self.0.restores.borrow_mut().push((snapshot, params.get_name()?.to_string().unwrap(), keys));
            results.get().set_vm(capnp_rpc::new_client(FakeVm(Rc::clone(&self.0))));
            Ok(())
        }
    }

    fn connect(seen: &Rc<Seen>) -> broker::Client {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let (far_read, far_write) = tokio::io::split(far);
        let served: broker::Client = capnp_rpc::new_client(FakeBroker(Rc::clone(seen)));
        let network = vat_network(far_read, far_write, Side::Server, None);
        tokio::task::spawn_local(RpcSystem::new(Box::new(network), Some(served.client)));
        let (near_read, near_write) = tokio::io::split(near);
        let mut system = RpcSystem::new(Box::new(vat_network(near_read, near_write, Side::Client, None)), None);
        let broker: broker::Client = system.bootstrap(Side::Server);
        tokio::task::spawn_local(system);
        broker
    }

    fn machine_row(keys: &[&str]) -> MachineRow {
        let now = chrono::Utc::now();
        MachineRow {
            id: uuid::Uuid::nil(),
            seq: 1,
            namespace: "ns".into(),
            name: "web2".into(),
            state: "starting".into(),
            previous_state: None,
            image: "builtin".into(),
            cpus: 2,
            memory_mb: 256,
            env: serde_json::json!({}),
            labels: serde_json::json!({}),
            host_labels: serde_json::json!({}),
            host_name: Some("h1".into()),
            lease_nonce: None,
            lease_owner: None,
            lease_description: None,
            lease_expires_at: None,
            created_at: now,
            updated_at: now,
            command: serde_json::json!([]),
            drain_restart: false,
            ssh_keys: serde_json::json!(keys),
            from_snapshot: Some("0123456789ab".into()),
            branch_of: None,
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn snapshot_remove_suspend_restore_and_branch_reach_the_broker() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let seen = Rc::new(Seen::default());
                let broker = connect(&seen);

                let info = snapshot(&broker, "vm").await.unwrap();
                assert_eq!(info, served());
                // Never a tenant's name: the broker's names are host-wide.
                assert_eq!(*seen.snapshot_names.borrow(), [""]);
                let refused = snapshot(&broker, "other").await.unwrap_err();
                assert!(matches!(&refused, SessionError::Broker { kind, .. } if kind == "not-found"), "{refused:?}");

                remove(&broker, "0123456789ab").await.unwrap();
                remove(&broker, "gone").await.expect("a snapshot the broker lacks is deleted");
                let busy = remove(&broker, "busy").await.unwrap_err();
                assert!(matches!(&busy, SessionError::Broker { kind, .. } if kind == "internal"), "{busy:?}");
                assert_eq!(*seen.removed.borrow(), ["0123456789ab"]);

                assert_eq!(suspend(&broker, "vm").await.unwrap(), "suspended");

                let row = machine_row(&["ssh-ed25519 AAAA k1"]);
                restore(&broker, &row, "0123456789ab").await.unwrap();
                let missing = restore(&broker, &row, "missing").await.unwrap_err();
                assert!(matches!(&missing, SessionError::Broker { kind, .. } if kind == "not-found"), "{missing:?}");
                // A branch asks the source's microVM, naming the copy
                // after the new machine.
                branch(&broker, &row, uuid::Uuid::max()).await.unwrap();
                let no_source = branch(&broker, &row, uuid::Uuid::from_u128(7)).await.unwrap_err();
                assert!(
                    matches!(&no_source, SessionError::Broker { kind, .. } if kind == "not-found"),
                    "{no_source:?}"
                );
                assert_eq!(*seen.branches.borrow(), [uuid::Uuid::nil().to_string()]);
                assert_eq!(
                    *seen.restores.borrow(),
                    [(
                        "0123456789ab".to_string(),
                        uuid::Uuid::nil().to_string(),
                        vec!["ssh-ed25519 AAAA k1".to_string()]
                    )]
                );
            })
            .await;
    }
}
