//! Drives one host's machines to their desired state through its broker.
//!
//! A machine's desired state follows from its `state`: `created` is
//! launched as soon as its host's broker is connected, `starting` and
//! `started` should run, `stopping` and `stopped` should not, `destroying`
//! should be gone. Each pass compares every machine placed on the host with
//! what the broker last reported ([`plan`], a pure function with a unit-test
//! table) and either records what the broker observes (through
//! `store::machines::observe_because`, the same transition rules as every
//! other report) or calls the broker: `createVm` with the machine's id as
//! the microVM's name (`restoreVm` for a machine made from a snapshot,
//! `Vm.branch` on its source's microVM for a branch),
//! `Vm.start` (which also resumes a suspended microVM), `Vm.stop`,
//! `Vm.suspend`, `Vm.remove`. Calls run as their own tasks; a machine
//! with one in flight is left alone until it ends.
//!
//! A `suspended` microVM is neither failed nor lost: it is what a
//! `suspending` machine waits for, a `started` one whose microVM was
//! suspended on the host becomes `suspended` too, and a `starting` one has
//! it started, which resumes it.
//!
//! A microVM named like a machine id that is not (any more) placed on this
//! host, say because the host was lost and the machine re-placed, is
//! removed. MicroVMs with other names belong to the host's admin.

use std::rc::Rc;
use std::time::Duration;

use mm_protocols::broker_capnp::vm;
use uuid::Uuid;

use super::SessionError;
use super::server::{HostLink, Local, Observation};
use crate::db::models::{MachineRow, string_list, string_map};
use crate::machine::MachineState;
use crate::store::{StoreError, machines};

/// How long a graceful stop may take before the broker kills the microVM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// A broker call that takes longer is treated as failed (and retried).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// What to do about one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// created → starting, then create its microVM.
    Launch,
    Create,
    Start,
    Stop,
    Suspend,
    Remove,
    /// Record that the broker observes this state, for this reason.
    Observe(MachineState, String),
}

/// The step for a machine in `state` whose microVM the broker last
/// reported as `observed` (`None`: it has none). `absence_known` says a
/// heartbeat newer than the machine's last operation has been seen, so a
/// missing microVM really is missing.
pub fn plan(state: MachineState, observed: Option<&Observation>, absence_known: bool) -> Step {
    use MachineState::*;
    let vm = observed.map(|o| o.state.as_str());
    let why = |what: &str| match observed {
        Some(o) if !o.reason.is_empty() => format!("{what}: {}", o.reason),
        Some(o) if o.exit_code >= 0 => format!("{what} (exit status {})", o.exit_code),
        _ => what.to_owned(),
    };
    match (state, vm) {
        (Created, _) => Step::Launch,
        (Starting, None) if absence_known => Step::Create,
        (Starting, Some("running")) => Step::Observe(Started, "its microVM is running".into()),
        (Starting, None | Some("starting" | "stopping")) => Step::Nothing,
        (Starting, Some(_)) => Step::Start,
        (Started, None) if absence_known => Step::Observe(Failed, "its microVM is gone from the host".into()),
        (Started, Some("stopped")) => Step::Observe(Stopped, why("the workload ended")),
        (Started, Some("failed" | "lost")) => Step::Observe(Failed, why("its microVM failed")),
        (Started, Some("suspended")) => Step::Observe(Suspended, "its microVM was suspended on the host".into()),
        (Started, _) => Step::Nothing,
        (Stopping, Some("running" | "starting")) => Step::Stop,
        (Stopping, Some("stopping")) => Step::Nothing,
        (Stopping, Some("suspended")) => Step::Observe(Suspended, "its microVM is suspended".into()),
        (Stopping, None) if !absence_known => Step::Nothing,
        (Stopping, _) => Step::Observe(Stopped, "its microVM is stopped".into()),
        (Suspending, Some("running")) => Step::Suspend,
        // The broker is saving it ("stopping" while its processes end).
        (Suspending, Some("starting" | "stopping")) => Step::Nothing,
        (Suspending, Some("suspended")) => Step::Observe(Suspended, "its microVM is suspended".into()),
        (Suspending, Some("stopped")) => Step::Observe(Stopped, why("the workload ended before it was suspended")),
        (Suspending, Some(_)) => Step::Observe(Failed, why("its microVM failed")),
        (Suspending, None) if absence_known => Step::Observe(Failed, "its microVM is gone from the host".into()),
        (Suspending, None) => Step::Nothing,
        (Destroying, Some(_)) => Step::Remove,
        (Destroying, None) if absence_known => Step::Observe(Destroyed, "its microVM is removed".into()),
        (Stopped | Failed | Suspended | Destroying | Destroyed, _) => Step::Nothing,
    }
}

/// Runs until the link is no longer its host's session.
pub async fn run(local: Rc<Local>, link: Rc<HostLink>) {
    let mut changes = local.changes.subscribe();
    while local.is_current(&link) {
        if let Err(e) = pass(&local, &link).await {
            tracing::warn!(host = %link.name, "reconciling: {e}");
        }
        tokio::select! {
            _ = link.kick.notified() => {}
            _ = changes.changed() => {}
            _ = tokio::time::sleep(local.timing.reconcile) => {}
        }
    }
    tracing::debug!(host = %link.name, session = link.id, "driver ends with its session");
}

async fn pass(local: &Rc<Local>, link: &Rc<HostLink>) -> Result<(), StoreError> {
    let host = link.name.clone();
    let rows = local.db.run(move |c| machines::on_host(c, &host)).await?;
    let observed = link.observed.borrow().clone();
    if observed.heartbeats == 0 {
        return Ok(()); // no whole picture yet
    }
    let mut placed = std::collections::HashSet::new();
    for row in rows {
        let name = row.id.to_string();
        placed.insert(name.clone());
        if link.busy.borrow().contains(&name) {
            continue;
        }
        let settled = link.settled_at.borrow().get(&name).copied().unwrap_or(0);
        let absence_known = observed.heartbeats > settled + 1;
        let state: MachineState = row.state.parse()?;
        match plan(state, observed.vms.get(&name), absence_known) {
            Step::Nothing => {}
            Step::Observe(state, why) => {
                let reason = format!("host {}: {why}", link.name);
                observe(local, link, row.id, state, reason).await;
            }
            Step::Launch => {
                let (host, id) = (link.name.clone(), row.id);
                match local.db.run(move |c| machines::launch(c, &host, id)).await {
                    Ok(row) => {
                        local.notify_change();
                        spawn(local, link, name, Op::Create(Box::new(row)));
                    }
                    Err(e) => tracing::info!(machine = %id, "not launched: {e}"),
                }
            }
            Step::Create => spawn(local, link, name, Op::Create(Box::new(row))),
            Step::Start => spawn(local, link, name, Op::Start(row.id)),
            Step::Stop => spawn(local, link, name, Op::Stop(row.id)),
            Step::Suspend => spawn(local, link, name, Op::Suspend(row.id)),
            Step::Remove => spawn(local, link, name, Op::Remove(Some(row.id))),
        }
    }
    let orphans: Vec<String> = observed
        .vms
        .keys()
        .filter(|name| Uuid::parse_str(name).is_ok() && !placed.contains(*name) && !link.busy.borrow().contains(*name))
        .cloned()
        .collect();
    for name in orphans {
        tracing::info!(host = %link.name, vm = %name, "removing a microVM whose machine is not placed here");
        spawn(local, link, name, Op::Remove(None));
    }
    Ok(())
}

/// Records an observation; a refusal (the machine moved on meanwhile) is
/// only logged, the next pass looks again.
async fn observe(local: &Rc<Local>, link: &HostLink, id: Uuid, state: MachineState, reason: String) {
    let host = link.name.clone();
    match local.db.run(move |c| machines::observe_because(c, &host, id, state, &reason)).await {
        Ok(_) => local.notify_change(),
        Err(e) => tracing::debug!(machine = %id, "observation of {state} not recorded: {e}"),
    }
}

enum Op {
    Create(Box<MachineRow>),
    Start(Uuid),
    Stop(Uuid),
    Suspend(Uuid),
    /// The machine to mark destroyed once removed, if any.
    Remove(Option<Uuid>),
}

fn spawn(local: &Rc<Local>, link: &Rc<HostLink>, name: String, op: Op) {
    link.busy.borrow_mut().insert(name.clone());
    let (local, link) = (Rc::clone(local), Rc::clone(link));
    tokio::task::spawn_local(async move {
        let result = tokio::time::timeout(CALL_TIMEOUT, execute(&local, &link, &name, op)).await;
        if let Err(_elapsed) = result {
            tracing::warn!(host = %link.name, vm = %name, "a broker call timed out; retrying later");
        }
        let heartbeats = link.observed.borrow().heartbeats;
        link.settled_at.borrow_mut().insert(name.clone(), heartbeats);
        link.busy.borrow_mut().remove(&name);
        link.kick.notify_one();
    });
}

fn set_observed(link: &HostLink, name: &str, state: Option<&str>) {
    let mut observed = link.observed.borrow_mut();
    match state {
        Some(state) => {
            observed
                .vms
                .insert(name.to_owned(), Observation { state: state.into(), reason: String::new(), exit_code: -1 });
        }
        None => {
            observed.vms.remove(name);
        }
    }
}

async fn get_vm(link: &HostLink, name: &str) -> Result<vm::Client, SessionError> {
    let mut request = link.broker.get_vm_request();
    request.get().set_name(name);
    Ok(request.send().promise.await?.get()?.get_vm()?)
}

async fn execute(local: &Rc<Local>, link: &HostLink, name: &str, op: Op) {
    let host = &link.name;
    match op {
        Op::Create(row) => match create(link, &row).await {
            Ok(()) => {
                set_observed(link, name, Some("running"));
                let reason = match (&row.from_snapshot, row.branch_of) {
                    (Some(snapshot), _) => format!("host {host} restored its microVM from snapshot {snapshot}"),
                    (None, Some(source)) => format!("host {host} branched machine {source}'s microVM into its own"),
                    (None, None) => format!("host {host} started its microVM"),
                };
                observe(local, link, row.id, MachineState::Started, reason).await;
            }
            Err(SessionError::Broker { kind, message }) if kind == "conflict" && message.contains("already exists") => {
                tracing::debug!(vm = %name, "the microVM exists already; the next report will show it");
            }
            Err(e) => {
                let reason = format!("host {host} could not create its microVM: {e}");
                observe(local, link, row.id, MachineState::Failed, reason).await;
            }
        },
        Op::Start(id) => {
            let started =
                async { Ok::<_, SessionError>(get_vm(link, name).await?.start_request().send().promise.await?) };
            match started.await {
                Ok(_) => {
                    set_observed(link, name, Some("running"));
                    observe(local, link, id, MachineState::Started, format!("host {host} started its microVM")).await;
                }
                Err(e) => {
                    let reason = format!("host {host} could not start its microVM: {e}");
                    observe(local, link, id, MachineState::Failed, reason).await;
                }
            }
        }
        Op::Stop(id) => {
            let stopped = async {
                let mut request = get_vm(link, name).await?.stop_request();
                request.get().set_timeout_ms(STOP_TIMEOUT.as_millis() as u32);
                Ok::<_, SessionError>(request.send().promise.await?)
            };
            match stopped.await {
                Ok(_) => {
                    set_observed(link, name, Some("stopped"));
                    observe(local, link, id, MachineState::Stopped, format!("host {host} stopped its microVM")).await;
                }
                Err(e) => tracing::warn!(%host, vm = %name, "stop failed (retrying): {e}"),
            }
        }
        Op::Suspend(id) => match super::snapshots::suspend(&link.broker, name).await {
            Ok(state) => {
                set_observed(link, name, Some(&state));
                if state == "suspended" {
                    let reason = format!("host {host} suspended its microVM");
                    observe(local, link, id, MachineState::Suspended, reason).await;
                }
            }
            // The broker resumes a guest it could not save: the machine
            // runs on (the next report corrects that if it does not).
            Err(e) => {
                let reason = format!("host {host} could not suspend its microVM, which runs on: {e}");
                observe(local, link, id, MachineState::Started, reason).await;
            }
        },
        Op::Remove(machine) => {
            let removed = async {
                let mut request = get_vm(link, name).await?.remove_request();
                request.get().set_force(true);
                Ok::<_, SessionError>(request.send().promise.await?)
            };
            let gone = match removed.await {
                Ok(_) => true,
                Err(SessionError::Broker { kind, .. }) if kind == "not-found" => true,
                Err(e) => {
                    tracing::warn!(%host, vm = %name, "remove failed (retrying): {e}");
                    false
                }
            };
            if gone {
                set_observed(link, name, None);
                if let Some(id) = machine {
                    let reason = format!("host {host} removed its microVM");
                    observe(local, link, id, MachineState::Destroyed, reason).await;
                }
            }
        }
    }
}

async fn create(link: &HostLink, row: &MachineRow) -> Result<(), SessionError> {
    if let Some(snapshot) = &row.from_snapshot {
        return super::snapshots::restore(&link.broker, row, snapshot).await;
    }
    if let Some(source) = row.branch_of {
        return super::snapshots::branch(&link.broker, row, source).await;
    }
    let mut request = link.broker.create_vm_request();
    {
        let mut spec = request.get().init_spec();
        spec.set_name(row.id.to_string());
        spec.set_image(&row.image);
        spec.set_cpus(u8::try_from(row.cpus).unwrap_or(u8::MAX));
        spec.set_memory_mib(u32::try_from(row.memory_mb).unwrap_or(u32::MAX));
        let command = string_list(&row.command);
        let mut argv = spec.reborrow().init_command(command.len() as u32);
        for (i, arg) in command.iter().enumerate() {
            argv.set(i as u32, arg);
        }
        let keys = string_list(&row.ssh_keys);
        let mut list = spec.reborrow().init_ssh_keys(keys.len() as u32);
        for (i, key) in keys.iter().enumerate() {
            list.set(i as u32, key);
        }
        let env = string_map(&row.env);
        let mut vars = spec.init_env(env.len() as u32);
        for (i, (key, value)) in env.iter().enumerate() {
            let mut var = vars.reborrow().get(i as u32);
            var.set_name(key);
            var.set_value(value);
        }
    }
    request.send().promise.await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::MachineState::*;
    use super::*;

    fn vm(state: &str) -> Observation {
        Observation { state: state.into(), reason: String::new(), exit_code: -1 }
    }

    #[test]
    fn desired_against_observed() {
        let step = |state, observed: Option<&str>, known| plan(state, observed.map(vm).as_ref(), known);
        assert_eq!(step(Created, None, true), Step::Launch);
        assert_eq!(step(Starting, None, true), Step::Create);
        // A heartbeat older than the last operation proves nothing.
        assert_eq!(step(Starting, None, false), Step::Nothing);
        assert_eq!(step(Started, None, false), Step::Nothing);
        assert!(matches!(step(Starting, Some("running"), true), Step::Observe(Started, _)));
        assert_eq!(step(Starting, Some("starting"), true), Step::Nothing);
        for stopped in ["stopped", "failed", "lost", "created"] {
            assert_eq!(step(Starting, Some(stopped), true), Step::Start, "{stopped}");
        }
        assert_eq!(step(Started, Some("running"), true), Step::Nothing);
        assert!(matches!(step(Started, None, true), Step::Observe(Failed, _)));
        assert!(matches!(step(Started, Some("stopped"), true), Step::Observe(Stopped, _)));
        assert!(matches!(step(Started, Some("lost"), true), Step::Observe(Failed, _)));
        assert_eq!(step(Stopping, Some("running"), true), Step::Stop);
        assert_eq!(step(Stopping, Some("stopping"), true), Step::Nothing);
        assert!(matches!(step(Stopping, Some("stopped"), true), Step::Observe(Stopped, _)));
        assert!(matches!(step(Stopping, None, true), Step::Observe(Stopped, _)));
        assert_eq!(step(Stopped, Some("running"), true), Step::Nothing);
        assert_eq!(step(Failed, None, true), Step::Nothing);
        assert_eq!(step(Destroying, Some("running"), true), Step::Remove);
        assert_eq!(step(Destroying, Some("stopped"), false), Step::Remove);
        assert!(matches!(step(Destroying, None, true), Step::Observe(Destroyed, _)));
        assert_eq!(step(Destroying, None, false), Step::Nothing);
    }

    #[test]
    fn suspended_is_neither_failed_nor_lost() {
        let step = |state, observed: Option<&str>, known| plan(state, observed.map(vm).as_ref(), known);
        assert_eq!(step(Suspending, Some("running"), true), Step::Suspend);
        assert_eq!(step(Suspending, Some("stopping"), true), Step::Nothing);
        assert!(matches!(step(Suspending, Some("suspended"), true), Step::Observe(Suspended, _)));
        assert!(matches!(step(Suspending, Some("stopped"), true), Step::Observe(Stopped, _)));
        assert!(matches!(step(Suspending, Some("failed"), true), Step::Observe(Failed, _)));
        assert_eq!(step(Suspending, None, false), Step::Nothing);
        assert!(matches!(step(Suspending, None, true), Step::Observe(Failed, _)));
        // Suspended on the host behind the controller's back (or the
        // controller died before recording its own suspend).
        assert!(matches!(step(Started, Some("suspended"), true), Step::Observe(Suspended, _)));
        assert!(matches!(step(Stopping, Some("suspended"), true), Step::Observe(Suspended, _)));
        // A suspended machine is left alone, its microVM kept.
        for observed in [Some("suspended"), Some("running"), None] {
            assert_eq!(step(Suspended, observed, true), Step::Nothing, "{observed:?}");
        }
        // Start resumes it; remove removes it.
        assert_eq!(step(Starting, Some("suspended"), true), Step::Start);
        assert_eq!(step(Destroying, Some("suspended"), true), Step::Remove);
    }

    #[test]
    fn reasons_carry_the_brokers_word() {
        let stopped = Observation { state: "stopped".into(), reason: String::new(), exit_code: 3 };
        assert_eq!(
            plan(Started, Some(&stopped), true),
            Step::Observe(Stopped, "the workload ended (exit status 3)".into())
        );
        let failed = Observation { state: "failed".into(), reason: "mm-vmm died".into(), exit_code: -1 };
        assert_eq!(plan(Started, Some(&failed), true), Step::Observe(Failed, "its microVM failed: mm-vmm died".into()));
    }
}
