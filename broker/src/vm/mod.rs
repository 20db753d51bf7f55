//! One microVM's lifecycle: start (spawn its processes), supervise them
//! (restart a dead device and reconnect it; end the microVM when mm-vmm
//! ends), stop (graceful, then forced), remove. Every change of state is
//! saved to the record and published to waiters; every process event goes
//! to the audit log.

pub mod console;
mod snapshot;
mod warm;

use mm_protocols::vmm_control::VmmClient;
use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::audit::AuditLog;
use crate::events::EventHub;
use crate::launch::{self, DeviceSpec};
use crate::process::{Exit, Process};
use crate::record::{ProcessRecord, VmRecord, VmState};
use crate::{BrokerConfig, BrokerError};

/// mm-vmm's exit code for "mm-vmm itself failed".
const VMM_FAILURE: i32 = 125;
/// How a self-jailed process reports that its jailed half died by SIGSYS.
const SIGSYS_EXIT: i32 = 128 + libc::SIGSYS;
/// How a self-jailed process reports that its jailed half was SIGKILLed
/// (the kernel's OOM killer among others).
const SIGKILL_EXIT: i32 = 128 + libc::SIGKILL;
/// What the jailer's last line in a process's log says when the OOM
/// killer ended it (`mm_jailer::OUT_OF_MEMORY`; the words must match).
const OUT_OF_MEMORY: &str = "out of memory";

/// What the supervisor task can be told.
#[derive(Debug)]
enum Order {
    /// End the microVM now (SIGKILL mm-vmm; devices follow).
    Kill,
}

/// How often a device may be replaced before the broker gives up on the
/// microVM: a device that crashes at once would otherwise be restarted
/// forever (and fill the audit log).
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// The restarts of one device within the last [`RESTART_WINDOW`].
#[derive(Debug, Default)]
struct RestartBudget {
    recent: std::collections::VecDeque<std::time::Instant>,
}

impl RestartBudget {
    /// Records a restart at `now`; false once more than [`MAX_RESTARTS`]
    /// happened within the window.
    fn allow(&mut self, now: std::time::Instant) -> bool {
        while self.recent.front().is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW) {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        self.recent.len() <= MAX_RESTARTS
    }
}

/// A started microVM: mm-vmm, its devices, and mm-vmm's control channel.
type Spawned = (Process, Vec<(DeviceSpec, Process)>, VmmClient);

/// What woke the supervisor.
enum Event {
    Vmm(Exit),
    Device(usize, Exit),
    Order(Order),
}

pub struct Vm {
    pub dir: PathBuf,
    config: Rc<BrokerConfig>,
    record: RefCell<VmRecord>,
    pub audit: AuditLog,
    orders: RefCell<Option<mpsc::UnboundedSender<Order>>>,
    state: watch::Sender<VmState>,
    /// mm-vmm's control channel while it runs (shared by supervision and
    /// `stats`; each call is one blocking request and answer, so on this
    /// single-threaded runtime they never interleave).
    control: RefCell<Option<Rc<VmmClient>>>,
    /// Set by `suspend` before it ends the processes: the microVM ends
    /// `suspended`, not stopped.
    suspending: Cell<bool>,
    /// Workload hand-overs cut after they were sent (warm.rs).
    cut_attempts: Cell<u32>,
}

impl Vm {
    pub fn new(config: Rc<BrokerConfig>, dir: PathBuf, record: VmRecord, events: &EventHub) -> Rc<Vm> {
        let (state, _) = watch::channel(record.state);
        Rc::new(Vm {
            audit: AuditLog::published(&dir, events, &record.id, &record.name),
            dir,
            config,
            record: RefCell::new(record),
            orders: RefCell::new(None),
            state,
            control: RefCell::new(None),
            suspending: Cell::new(false),
            cut_attempts: Cell::new(0),
        })
    }

    pub fn record(&self) -> VmRecord {
        self.record.borrow().clone()
    }

    pub fn name(&self) -> String {
        self.record.borrow().name.clone()
    }

    pub fn state(&self) -> VmState {
        self.record.borrow().state
    }

    /// Changes the record (and saves it, and tells waiters and the audit
    /// log of a new state).
    fn update(&self, change: impl FnOnce(&mut VmRecord)) {
        let mut record = self.record.borrow_mut();
        let before = record.state;
        change(&mut record);
        if let Err(e) = record.save(&self.dir) {
            tracing::error!(vm = %record.name, "cannot save the record: {e}");
        }
        if record.state != before {
            tracing::info!(vm = %record.name, from = before.name(), to = record.state.name(), "state");
            let (to, reason) = (record.state, record.reason.clone());
            drop(record);
            self.audit.record("state", json!({ "from": before.name(), "to": to.name(), "reason": reason }));
            self.state.send_replace(to);
        }
    }

    /// Records new rate limits (`Vm.update`); the caller applies them to
    /// running devices (stats::set_io_limits).
    pub fn set_io_limits(&self, limits: crate::record::IoLimits) {
        self.update(|r| r.io_limits = limits);
    }

    fn set_state(&self, state: VmState, reason: &str) {
        self.update(|r| {
            r.state = state;
            r.reason = reason.to_string();
        });
    }

    /// mm-vmm's control channel, while the microVM runs.
    pub fn vmm_control(&self) -> Option<Rc<VmmClient>> {
        self.control.borrow().clone()
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Waits until the microVM is not live (stopped, failed, lost).
    pub async fn wait_stopped(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|s| !s.is_live()).await;
    }

    /// Spawns the devices and mm-vmm and starts supervising them.
    pub fn start(self: &Rc<Vm>, caller: &str) -> Result<(), BrokerError> {
        let state = self.state();
        if state.is_live() {
            return Err(BrokerError::WrongState {
                name: self.name(),
                state: state.name().into(),
                what: "it is already running",
            });
        }
        self.audit.record("start", json!({ "caller": caller }));
        self.update(|r| {
            r.state = VmState::Starting;
            r.reason.clear();
            r.exit_code = None;
            r.processes.clear();
            r.console_log_max = self.config.console_log_max;
        });
        let console_start = std::fs::symlink_metadata(self.dir.join(launch::CONSOLE_LOG)).map_or(0, |m| m.len());
        match self.spawn_all() {
            Ok((vmm, devices, control)) => {
                self.set_state(VmState::Running, "");
                let record = self.record.borrow().clone();
                if record.resume_from.is_some() || record.hand_workload {
                    tokio::task::spawn_local(Rc::clone(self).after_start(console_start));
                }
                let (tx, rx) = mpsc::unbounded_channel();
                *self.orders.borrow_mut() = Some(tx);
                let control = Rc::new(control);
                *self.control.borrow_mut() = Some(Rc::clone(&control));
                tokio::task::spawn_local(Rc::clone(self).supervise(vmm, devices, Some(control), rx));
                tokio::task::spawn_local(Rc::clone(self).cap_console());
                Ok(())
            }
            Err(e) => {
                self.set_state(VmState::Failed, &format!("cannot start: {e}"));
                Err(e)
            }
        }
    }

    fn spawn_all(&self) -> Result<Spawned, BrokerError> {
        let record = self.record();
        launch::prepare_vm_dir(&self.dir, record.uid(), record.resume_from.as_deref())
            .map_err(BrokerError::io("preparing the writable disk"))?;
        let specs = launch::devices_for(&self.config, &self.dir, &record);
        let mut devices = Vec::new();
        let mut connections = Vec::new();
        for spec in &specs {
            let spawned = launch::spawn_device(&self.config, &self.dir, spec, record.uid());
            let (process, vmm_end) = match spawned {
                Ok(pair) => pair,
                Err(e) => {
                    for (_, process) in &devices {
                        let process: &Process = process;
                        process.signal(libc::SIGKILL);
                    }
                    return Err(BrokerError::io(format!("starting the {} device", spec.role))(e));
                }
            };
            self.audit_spawn(&process);
            connections.push((spec, vmm_end));
            devices.push((spec.clone(), process));
        }
        let (vmm, control) = launch::spawn_vmm(&self.config, &self.dir, &record, &connections).map_err(|e| {
            for (_, process) in &devices {
                process.signal(libc::SIGKILL);
            }
            BrokerError::io("starting mm-vmm")(e)
        })?;
        self.audit_spawn(&vmm);
        Ok((vmm, devices, control))
    }

    fn audit_spawn(&self, process: &Process) {
        self.audit.record("spawn", json!({ "role": process.role, "pid": process.pid }));
        let entry =
            ProcessRecord { role: process.role.clone(), pid: process.pid, start_time: process.start_time, restarts: 0 };
        self.update(|r| match r.processes.iter_mut().find(|p| p.role == entry.role) {
            Some(existing) => {
                existing.pid = entry.pid;
                existing.start_time = entry.start_time;
                existing.restarts += 1;
            }
            None => r.processes.push(entry),
        });
    }

    fn audit_exit(&self, process: &Process, exit: Exit) {
        let mut fields = json!({ "role": process.role, "pid": process.pid });
        if let (Some(fields), serde_json::Value::Object(extra)) = (fields.as_object_mut(), exit.json()) {
            fields.extend(extra);
        }
        if let Some(report) = self.seccomp_report(&process.role, exit) {
            fields["seccomp"] = json!(report);
        }
        let oom = self.out_of_memory(&process.role, exit);
        if oom.is_some() {
            fields["oom"] = json!(true);
        }
        self.audit.record("exit", fields);
        if let Some(why) = oom {
            self.audit.record("oom", json!({ "role": process.role, "pid": process.pid, "reason": why }));
        }
    }

    /// For a process the kernel's OOM killer ended at its cgroup's memory
    /// limit, what happened, named after the process and its limit. The
    /// jailer reads the cgroup's `oom_kill` counter when its jailed half
    /// dies (before it removes the cgroup) and says so as the last line
    /// of the process's log; the broker only sees a SIGKILL status.
    fn out_of_memory(&self, role: &str, exit: Exit) -> Option<String> {
        if !matches!(exit, Exit::Signal(libc::SIGKILL) | Exit::Code(SIGKILL_EXIT)) {
            return None;
        }
        let last = last_line_containing(&self.dir.join(format!("{role}.log")), "")?;
        if !last.contains(OUT_OF_MEMORY) {
            return None;
        }
        let limit = match role {
            "vmm" => self.record.borrow().vmm_memory_max_bytes(),
            _ => crate::record::DEVICE_MEMORY_MAX_BYTES,
        };
        Some(format!("the {role} process was killed: {OUT_OF_MEMORY} (its host memory limit is {} MiB)", limit >> 20))
    }

    /// For a process killed by its seccomp filter, the jail's report (it
    /// names the syscall) from the process's log. A self-jailed process's
    /// outer half exits with 128 + SIGSYS rather than by the signal.
    fn seccomp_report(&self, role: &str, exit: Exit) -> Option<String> {
        if !matches!(exit, Exit::Signal(libc::SIGSYS) | Exit::Code(SIGSYS_EXIT)) {
            return None;
        }
        last_line_containing(&self.dir.join(format!("{role}.log")), "killed by seccomp")
    }

    /// Watches the processes until mm-vmm ends. `control` is None only if
    /// a re-adopted mm-vmm's control socket did not answer; a device that
    /// dies then cannot be replaced.
    async fn supervise(
        self: Rc<Vm>,
        mut vmm: Process,
        mut devices: Vec<(DeviceSpec, Process)>,
        control: Option<Rc<VmmClient>>,
        mut orders: mpsc::UnboundedReceiver<Order>,
    ) {
        let mut budgets: Vec<RestartBudget> = devices.iter().map(|_| RestartBudget::default()).collect();
        let mut given_up: Option<String> = None;
        let vmm_exit = loop {
            let event = {
                // Only devices still running: one that ended and could not
                // be replaced must not wake us again and again.
                let waits: Vec<_> = devices
                    .iter_mut()
                    .enumerate()
                    .filter(|(_, (_, p))| !p.has_exited())
                    .map(|(i, (_, p))| Box::pin(async move { (i, p.wait().await) }))
                    .collect();
                let any_device = async move {
                    if waits.is_empty() {
                        std::future::pending().await
                    } else {
                        futures::future::select_all(waits).await
                    }
                };
                tokio::select! {
                    exit = vmm.wait() => Event::Vmm(exit),
                    ((index, exit), _, _) = any_device => Event::Device(index, exit),
                    Some(order) = orders.recv() => Event::Order(order),
                }
            };
            match event {
                Event::Vmm(exit) => break exit,
                Event::Device(index, exit) => {
                    self.audit_exit(&devices[index].1, exit);
                    if budgets[index].allow(std::time::Instant::now()) {
                        self.replace_device(&mut devices, index, control.as_deref()).await;
                    } else {
                        let why = format!(
                            "the {} device crashed more than {MAX_RESTARTS} times in {} s",
                            devices[index].0.role,
                            RESTART_WINDOW.as_secs()
                        );
                        self.audit.record("give-up", json!({ "role": devices[index].0.role, "reason": why }));
                        given_up = Some(why);
                        vmm.signal(libc::SIGKILL);
                    }
                }
                Event::Order(Order::Kill) => vmm.signal(libc::SIGKILL),
            }
        };
        self.audit_exit(&vmm, vmm_exit);
        // Device processes end when mm-vmm hangs up; make sure of it.
        for (_, device) in devices.iter_mut().filter(|(_, p)| !p.has_exited()) {
            if tokio::time::timeout(Duration::from_secs(2), device.wait()).await.is_err() {
                device.signal(libc::SIGKILL);
            }
            let exit = device.wait().await;
            self.audit_exit(device, exit);
        }
        // The TAP is persistent (it outlives a restarted net device); the
        // next start makes a fresh one.
        if let Some(network) = &self.config.network {
            for tap in devices.iter().filter_map(|(spec, _)| spec.tap.as_ref()) {
                network.remove_tap(tap);
            }
        }
        *self.orders.borrow_mut() = None;
        *self.control.borrow_mut() = None;
        let stopping = self.state() == VmState::Stopping;
        let (state, reason, code) = match (vmm_exit, given_up) {
            (_, Some(why)) => (VmState::Failed, why, None),
            (_, None) if self.suspending.replace(false) => {
                (VmState::Suspended, "suspended: `start` resumes it".to_string(), None)
            }
            (vmm_exit, None) => self.ending(vmm_exit, stopping),
        };
        self.update(|r| {
            r.state = state;
            r.reason = reason;
            r.exit_code = code;
        });
        if self.record.borrow().auto_remove && state != VmState::Suspended {
            self.audit.record("remove", json!({ "caller": "broker (auto-remove)" }));
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                tracing::warn!("cannot remove {}: {e}", self.dir.display());
            }
        }
    }

    /// The state, reason and exit code a microVM ends with when mm-vmm ends.
    fn ending(&self, vmm_exit: Exit, stopping: bool) -> (VmState, String, Option<i32>) {
        // A self-jailed mm-vmm whose jailed half its filter killed.
        if vmm_exit == Exit::Code(SIGSYS_EXIT)
            && let Some(report) = self.seccomp_report("vmm", vmm_exit)
        {
            return (VmState::Failed, report, None);
        }
        if let Some(why) = self.out_of_memory("vmm", vmm_exit) {
            return (VmState::Failed, why, None);
        }
        match vmm_exit {
            Exit::Code(VMM_FAILURE) => {
                let why = last_line_containing(&self.dir.join("vmm.log"), "")
                    .unwrap_or_else(|| "mm-vmm failed (exit 125)".into());
                (VmState::Failed, why, None)
            }
            Exit::Code(code) => (VmState::Stopped, format!("the workload exited with code {code}"), Some(code)),
            Exit::Signal(_) if stopping => (VmState::Stopped, "stopped by request (forced)".into(), None),
            Exit::Signal(_) => (VmState::Failed, format!("mm-vmm {}", vmm_exit.describe()), None),
            // Adopted after a broker restart: mm-vmm's log says how it ended.
            Exit::Unknown => match logged_workload_status(&self.dir.join("vmm.log")) {
                Some(code) => (VmState::Stopped, format!("the workload exited with code {code}"), Some(code)),
                None => (VmState::Stopped, vmm_exit.describe(), None),
            },
        }
    }

    /// A device died: start a fresh one from the same spec and hand its
    /// connection to mm-vmm, which replays the set-up (the guest sees a
    /// stall, not an error).
    async fn replace_device(&self, devices: &mut [(DeviceSpec, Process)], index: usize, control: Option<&VmmClient>) {
        let spec = devices[index].0.clone();
        let Some(control) = control else {
            self.audit.record(
                "restart-impossible",
                json!({ "role": spec.role, "reason": "mm-vmm's control socket did not answer after a broker restart" }),
            );
            return;
        };
        // A device that dies at once would otherwise be restarted in a loop.
        let restarts = self.record.borrow().processes.iter().find(|p| p.role == spec.role).map_or(0, |p| p.restarts);
        if restarts >= 3 {
            tokio::time::sleep(Duration::from_millis(200 * u64::from(restarts.min(25)))).await;
        }
        let uid = self.record.borrow().uid();
        match launch::spawn_device(&self.config, &self.dir, &spec, uid) {
            Ok((process, vmm_end)) => {
                self.audit_spawn(&process);
                let sent = control.reconnect_device(index as u32, &vmm_end);
                devices[index].1 = process;
                match sent {
                    Ok(()) => self.audit.record("restart", json!({ "role": spec.role, "pid": devices[index].1.pid })),
                    Err(e) => self.audit.record("restart-failed", json!({ "role": spec.role, "error": e.to_string() })),
                }
            }
            Err(e) => self.audit.record("restart-failed", json!({ "role": spec.role, "error": e.to_string() })),
        }
    }

    /// Asks the guest to shut down; after `timeout`, ends it by force.
    pub async fn stop(self: &Rc<Vm>, timeout: Duration, caller: &str) -> Result<(), BrokerError> {
        let state = self.state();
        if !state.is_live() {
            return Ok(());
        }
        self.audit.record("stop", json!({ "caller": caller, "timeout_ms": timeout.as_millis() as u64 }));
        self.set_state(VmState::Stopping, "stop requested");
        // Graceful: SIGTERM to the guest's init, which forwards it to the
        // workload and powers off when the workload ends.
        let asked = match crate::exec::run_simple(&self.dir, &["kill", "-TERM", "1"]).await {
            crate::exec::SimpleExec::Exited(_) => true,
            // The guest started going down before the agent answered.
            crate::exec::SimpleExec::Interrupted(e) => {
                tracing::debug!(vm = %self.name(), "the stop request's connection ended early: {e}");
                true
            }
            crate::exec::SimpleExec::Unreachable(e) => {
                tracing::info!(vm = %self.name(), "graceful stop not possible ({e}); forcing");
                false
            }
        };
        let stopped = asked && tokio::time::timeout(timeout, self.wait_stopped()).await.is_ok();
        if !stopped {
            self.audit.record("kill", json!({ "caller": caller, "reason": "stop timeout" }));
            if let Some(orders) = self.orders.borrow().as_ref() {
                let _ = orders.send(Order::Kill);
            }
            self.wait_stopped().await;
        }
        Ok(())
    }

    /// Re-adopts the processes a previous broker left running, or reports
    /// the microVM lost.
    pub fn readopt(self: &Rc<Vm>) {
        let record = self.record();
        if !record.state.is_live() {
            return;
        }
        // The directory is the broker's whatever layout it was made under.
        if let Err(e) = launch::own_vm_dirs(&self.dir, record.uid()) {
            tracing::warn!(vm = %record.name, "cannot secure {}: {e}", self.dir.display());
        }
        let find = |role: &str| record.processes.iter().find(|p| p.role == role);
        let vmm = find("vmm").and_then(|p| Process::adopt("vmm", p.pid, p.start_time));
        let specs = launch::devices_for(&self.config, &self.dir, &record);
        let devices: Vec<(DeviceSpec, Option<Process>)> = specs
            .into_iter()
            .map(|spec| {
                let process = find(&spec.role).and_then(|p| Process::adopt(&spec.role, p.pid, p.start_time));
                (spec, process)
            })
            .collect();
        match vmm {
            Some(vmm) if devices.iter().all(|(_, p)| p.is_some()) => {
                let devices = devices.into_iter().filter_map(|(s, p)| p.map(|p| (s, p))).collect();
                self.audit.record("readopt", json!({ "vmm_pid": vmm.pid }));
                self.set_state(VmState::Running, "re-adopted after a broker restart");
                let (tx, rx) = mpsc::unbounded_channel();
                *self.orders.borrow_mut() = Some(tx);
                // mm-vmm accepts a new control connection once the old
                // broker's is gone, so re-adopted microVMs stay repairable.
                let control = match VmmClient::connect(&self.dir.join(launch::VMM_CONTROL_SOCKET)) {
                    Ok(client) => Some(Rc::new(client)),
                    Err(e) => {
                        self.audit.record("control-lost", json!({ "error": e.to_string() }));
                        None
                    }
                };
                self.control.replace(control.clone());
                tokio::task::spawn_local(Rc::clone(self).supervise(vmm, devices, control, rx));
                tokio::task::spawn_local(Rc::clone(self).cap_console());
            }
            vmm => {
                let reason = match &vmm {
                    Some(_) => "a device process ended while the broker was down; the microVM was ended".to_string(),
                    None => "mm-vmm ended while the broker was down (exit status unknown)".to_string(),
                };
                if let Some(vmm) = &vmm {
                    vmm.signal(libc::SIGKILL);
                }
                for process in devices.iter().filter_map(|(_, p)| p.as_ref()) {
                    process.signal(libc::SIGKILL);
                }
                self.audit.record("lost", json!({ "reason": reason }));
                self.set_state(VmState::Lost, &reason);
            }
        }
    }
}

/// The workload's status as mm-vmm logged it at exit (`mm-vmm: the
/// workload exited with status N`), from its last run.
fn logged_workload_status(path: &std::path::Path) -> Option<i32> {
    let line = last_line_containing(path, "the workload exited with status ")?;
    line.rsplit(' ').next()?.parse().ok()
}

/// The last line of a log file containing `needle`.
fn last_line_containing(path: &std::path::Path, needle: &str) -> Option<String> {
    let text = crate::safe_fs::read_to_string(path).ok()?;
    text.lines().rev().find(|l| l.contains(needle) && !l.trim().is_empty()).map(|l| l.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_device_may_restart_five_times_a_minute() {
        let mut budget = RestartBudget::default();
        let start = Instant::now();
        for i in 0..MAX_RESTARTS {
            assert!(budget.allow(start + Duration::from_secs(i as u64)), "restart {i}");
        }
        assert!(!budget.allow(start + Duration::from_secs(10)), "the sixth within a minute");
        // Once the early ones are older than the window, it may again.
        let later = start + RESTART_WINDOW + Duration::from_secs(11);
        assert!(budget.allow(later));
    }
}
