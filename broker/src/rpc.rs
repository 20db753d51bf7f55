//! The Cap'n Proto face of the broker (`protocols/broker.capnp`): one
//! `Broker` capability per client connection (it knows the caller, from
//! the socket's peer credentials, for the audit log), and one `Vm`
//! capability per microVM a client created or looked up.
//!
//! Errors travel as `"<kind>: <message>"` so `mmctl` can map them to exit
//! codes: `not-found`, `conflict`, `invalid`, `no-memory`, `internal`.

use std::rc::Rc;
use std::time::Duration;

use mm_protocols::broker_capnp::{broker, byte_sink, io_limits, snapshot_info, vm, vm_info};
use serde_json::json;

use crate::BrokerError;
use crate::launch::CONSOLE_LOG;
use crate::record::{IoLimits, VmRecord};
use crate::registry::{CreateRequest, Registry};
use crate::snapshot::{SnapshotError, SnapshotKind, SnapshotManifest};
use crate::vm::Vm;

impl BrokerError {
    pub fn kind(&self) -> &'static str {
        match self {
            BrokerError::UnknownVm(_) => "not-found",
            BrokerError::DuplicateName(_) | BrokerError::WrongState { .. } => "conflict",
            BrokerError::BadName(_) | BrokerError::UnknownImage(_) | BrokerError::BadSpec(_) => "invalid",
            BrokerError::NoMemory { .. } => "no-memory",
            BrokerError::Network(crate::network::NetworkError::Full(_)) => "no-memory",
            BrokerError::Io { .. } | BrokerError::Network(_) => "internal",
            BrokerError::Snapshot(e) => match e {
                SnapshotError::Unknown(_) => "not-found",
                SnapshotError::Ambiguous(_) | SnapshotError::OtherBase { .. } => "invalid",
                SnapshotError::BadManifest { .. } | SnapshotError::Vmm(_) => "internal",
            },
        }
    }
}

fn rpc_err(e: BrokerError) -> capnp::Error {
    capnp::Error::failed(format!("{}: {e}", e.kind()))
}

pub(crate) fn text(reader: capnp::text::Reader<'_>) -> Result<String, capnp::Error> {
    reader.to_string().map_err(|e| capnp::Error::failed(format!("invalid: text is not UTF-8: {e}")))
}

/// A list of texts (argv, SSH keys), each checked as [`text`].
fn texts(list: capnp::text_list::Reader<'_>) -> Result<Vec<String>, capnp::Error> {
    list.iter().map(|t| text(t?)).collect()
}

/// The bootstrap capability of one client connection.
pub struct BrokerServer {
    pub registry: Rc<Registry>,
    /// `uid U pid P` of the peer, for the audit log.
    pub caller: String,
}

impl broker::Server for BrokerServer {
    async fn create_vm(
        self: Rc<Self>,
        params: broker::CreateVmParams,
        mut results: broker::CreateVmResults,
    ) -> Result<(), capnp::Error> {
        let spec = params.get()?.get_spec()?;
        let mut request = CreateRequest {
            name: text(spec.get_name()?)?,
            image: text(spec.get_image()?)?,
            cpus: spec.get_cpus(),
            memory_mib: spec.get_memory_mib(),
            auto_remove: spec.get_auto_remove(),
            cold: spec.get_cold(),
            cpu_quota_millis: spec.get_cpu_quota_millis(),
            cpu_weight: spec.get_cpu_weight(),
            ..CreateRequest::default()
        };
        request.command = texts(spec.get_command()?)?;
        for var in spec.get_env()?.iter() {
            request.env.push((text(var.get_name()?)?, text(var.get_value()?)?));
        }
        request.ssh_keys = texts(spec.get_ssh_keys()?)?;
        if spec.has_limits() {
            request.io_limits = read_io_limits(spec.get_limits()?);
        }
        let vm = self.registry.create(request, &self.caller).map_err(rpc_err)?;
        results.get().set_vm(capnp_rpc::new_client(VmServer::new(&self, vm)));
        Ok(())
    }

    async fn get_vm(
        self: Rc<Self>,
        params: broker::GetVmParams,
        mut results: broker::GetVmResults,
    ) -> Result<(), capnp::Error> {
        self.registry.forget_removed();
        let name = text(params.get()?.get_name()?)?;
        let vm = self.registry.find(&name).map_err(rpc_err)?;
        results.get().set_vm(capnp_rpc::new_client(VmServer::new(&self, vm)));
        Ok(())
    }

    async fn list_vms(
        self: Rc<Self>,
        _: broker::ListVmsParams,
        mut results: broker::ListVmsResults,
    ) -> Result<(), capnp::Error> {
        self.registry.forget_removed();
        let vms = self.registry.list();
        let mut list = results.get().init_vms(vms.len() as u32);
        for (i, vm) in vms.iter().enumerate() {
            fill_info(&vm.record(), list.reborrow().get(i as u32));
        }
        Ok(())
    }

    async fn events(
        self: Rc<Self>,
        params: broker::EventsParams,
        mut results: broker::EventsResults,
    ) -> Result<(), capnp::Error> {
        let sink = params.get()?.get_sink()?;
        self.registry.audit.record("subscribe", json!({ "caller": self.caller }));
        results.get().set_subscription(crate::events::serve_subscription(&self.registry.events, sink));
        Ok(())
    }

    async fn list_snapshots(
        self: Rc<Self>,
        params: broker::ListSnapshotsParams,
        mut results: broker::ListSnapshotsResults,
    ) -> Result<(), capnp::Error> {
        let key = text(params.get()?.get_vm()?)?;
        let vm_id = match key.as_str() {
            "" => None,
            key => Some(self.registry.find(key).map(|vm| vm.record().id).unwrap_or_else(|_| key.to_string())),
        };
        let all: Vec<_> = self
            .registry
            .snapshots
            .list()
            .into_iter()
            .filter(|m| vm_id.as_ref().is_none_or(|id| &m.vm_id == id || &m.vm_name == id))
            .collect();
        let mut list = results.get().init_snapshots(all.len() as u32);
        for (i, manifest) in all.iter().enumerate() {
            fill_snapshot(manifest, list.reborrow().get(i as u32));
        }
        Ok(())
    }

    async fn remove_snapshot(
        self: Rc<Self>,
        params: broker::RemoveSnapshotParams,
        _: broker::RemoveSnapshotResults,
    ) -> Result<(), capnp::Error> {
        let key = text(params.get()?.get_id()?)?;
        self.registry.remove_snapshot(&key, &self.caller).map_err(rpc_err)
    }

    async fn restore_vm(
        self: Rc<Self>,
        params: broker::RestoreVmParams,
        mut results: broker::RestoreVmResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let snapshot = text(params.get_snapshot()?)?;
        let name = text(params.get_name()?)?;
        let keys = texts(params.get_ssh_keys()?)?;
        let vm = self.registry.restore(&snapshot, name, keys, &self.caller).map_err(rpc_err)?;
        results.get().set_vm(capnp_rpc::new_client(VmServer::new(&self, vm)));
        Ok(())
    }

    async fn fork_vm(
        self: Rc<Self>,
        params: broker::ForkVmParams,
        mut results: broker::ForkVmResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let snapshot = text(params.get_snapshot()?)?;
        let prefix = text(params.get_name_prefix()?)?;
        let keys = texts(params.get_ssh_keys()?)?;
        let vms = self.registry.fork(&snapshot, params.get_count(), prefix, keys, &self.caller).map_err(rpc_err)?;
        let mut list = results.get().init_vms(vms.len() as u32);
        for (i, vm) in vms.into_iter().enumerate() {
            list.set(i as u32, capnp_rpc::new_client::<vm::Client, _>(VmServer::new(&self, vm)).client.hook);
        }
        Ok(())
    }

    async fn version(
        self: Rc<Self>,
        _: broker::VersionParams,
        mut results: broker::VersionResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_version(env!("CARGO_PKG_VERSION"));
        Ok(())
    }
}

fn read_io_limits(limits: io_limits::Reader<'_>) -> IoLimits {
    IoLimits {
        disk_bps: limits.get_disk_bps(),
        disk_iops: limits.get_disk_iops(),
        net_bps: limits.get_net_bps(),
        net_pps: limits.get_net_pps(),
    }
}

pub fn fill_info(record: &VmRecord, mut info: vm_info::Builder<'_>) {
    info.set_id(&record.id);
    info.set_name(&record.name);
    info.set_image(&record.image);
    info.set_state(record.state.name());
    info.set_reason(&record.reason);
    info.set_cpus(record.cpus);
    info.set_memory_mib(record.memory_mib);
    info.set_exit_code(record.exit_code.unwrap_or(-1));
    info.set_created_at(&record.created_at);
    info.set_ip(record.ip.map(|ip| ip.to_string()).unwrap_or_default());
    info.set_mac(record.mac.as_deref().unwrap_or_default());
    info.set_cpu_quota_millis(record.effective_cpu_quota_millis());
    info.set_cpu_weight(record.effective_cpu_weight());
    info.set_vmm_memory_max_bytes(record.vmm_memory_max_bytes());
    info.set_device_memory_max_bytes(crate::record::DEVICE_MEMORY_MAX_BYTES);
    info.set_console_log_max_bytes(record.console_log_max);
    {
        let mut limits = info.reborrow().init_limits();
        limits.set_disk_bps(record.io_limits.disk_bps);
        limits.set_disk_iops(record.io_limits.disk_iops);
        limits.set_net_bps(record.io_limits.net_bps);
        limits.set_net_pps(record.io_limits.net_pps);
    }
    {
        let mut command = info.reborrow().init_command(record.command.len() as u32);
        for (i, arg) in record.command.iter().enumerate() {
            command.set(i as u32, arg);
        }
    }
    let mut pids = info.init_pids(record.processes.len() as u32);
    for (i, p) in record.processes.iter().enumerate() {
        let mut entry = pids.reborrow().get(i as u32);
        entry.set_role(&p.role);
        entry.set_pid(if record.state.is_live() { p.pid } else { 0 });
        entry.set_restarts(p.restarts);
    }
}

pub fn fill_snapshot(manifest: &SnapshotManifest, info: snapshot_info::Builder<'_>) {
    let kind = match manifest.kind {
        SnapshotKind::Snapshot => "snapshot",
        SnapshotKind::Suspend => "suspend",
        SnapshotKind::Branch => "branch",
    };
    mm_protocols::snapshot_info::SnapshotInfo {
        id: manifest.id.clone(),
        name: manifest.name.clone(),
        kind: kind.into(),
        vm_id: manifest.vm_id.clone(),
        vm_name: manifest.vm_name.clone(),
        created_at: manifest.created_at.clone(),
        cpus: manifest.cpus,
        memory_mib: manifest.memory_mib,
        memory_bytes: manifest.memory_bytes,
        disk_bytes: manifest.disk_bytes,
        pause_us: manifest.pause_us,
    }
    .write(info);
}

/// A capability for one microVM.
pub struct VmServer {
    registry: Rc<Registry>,
    vm: Rc<Vm>,
    caller: String,
}

impl VmServer {
    fn new(broker: &BrokerServer, vm: Rc<Vm>) -> Self {
        VmServer { registry: Rc::clone(&broker.registry), vm, caller: broker.caller.clone() }
    }
}

impl vm::Server for VmServer {
    async fn info(self: Rc<Self>, _: vm::InfoParams, mut results: vm::InfoResults) -> Result<(), capnp::Error> {
        fill_info(&self.vm.record(), results.get().init_info());
        Ok(())
    }

    async fn start(self: Rc<Self>, _: vm::StartParams, _: vm::StartResults) -> Result<(), capnp::Error> {
        self.vm.start(&self.caller).map_err(rpc_err)
    }

    async fn stop(self: Rc<Self>, params: vm::StopParams, mut results: vm::StopResults) -> Result<(), capnp::Error> {
        let timeout = Duration::from_millis(u64::from(params.get()?.get_timeout_ms()));
        self.vm.stop(timeout, &self.caller).await.map_err(rpc_err)?;
        fill_info(&self.vm.record(), results.get().init_info());
        Ok(())
    }

    async fn remove(self: Rc<Self>, params: vm::RemoveParams, _: vm::RemoveResults) -> Result<(), capnp::Error> {
        if params.get()?.get_force() {
            self.vm.stop(Duration::ZERO, &self.caller).await.map_err(rpc_err)?;
        }
        self.registry.remove(&self.vm, &self.caller).map_err(rpc_err)
    }

    async fn logs(self: Rc<Self>, params: vm::LogsParams, _: vm::LogsResults) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let follow = params.get_follow();
        let sink = params.get_sink()?;
        stream_console(&self.vm, follow, sink).await
    }

    async fn audit(self: Rc<Self>, _: vm::AuditParams, mut results: vm::AuditResults) -> Result<(), capnp::Error> {
        let lines = self.vm.audit.lines().map_err(|e| capnp::Error::failed(format!("internal: {e}")))?;
        let mut list = results.get().init_lines(lines.len() as u32);
        for (i, line) in lines.iter().enumerate() {
            list.set(i as u32, line);
        }
        Ok(())
    }

    async fn wait(self: Rc<Self>, _: vm::WaitParams, mut results: vm::WaitResults) -> Result<(), capnp::Error> {
        self.vm.wait_stopped().await;
        fill_info(&self.vm.record(), results.get().init_info());
        Ok(())
    }

    fn exec(
        self: Rc<Self>,
        params: vm::ExecParams,
        results: vm::ExecResults,
    ) -> impl Future<Output = Result<(), capnp::Error>> + 'static {
        self.vm.audit.record("exec", json!({ "caller": self.caller }));
        // Until a warm-started guest has its identity and workload, its exec
        // agent is the broker's: a client's session could be cut by the
        // warm snapshot's pause (it resets vsock connections) or see the
        // guest before it is who it will be. Answered as "not up yet",
        // which clients retry as they do while a guest boots.
        let record = self.vm.record();
        let starting = record.hand_workload || record.resume_from.is_some();
        let dir = self.vm.dir.clone();
        async move {
            if starting {
                return Err(capnp::Error::failed(
                    "conflict: cannot reach the guest's exec agent: the guest is still starting".into(),
                ));
            }
            crate::exec::serve_exec(dir, params, results).await
        }
    }

    async fn stats(self: Rc<Self>, _: vm::StatsParams, mut results: vm::StatsResults) -> Result<(), capnp::Error> {
        if !self.vm.state().is_live() {
            return Err(rpc_err(BrokerError::WrongState {
                name: self.vm.name(),
                state: self.vm.state().name().into(),
                what: "only a running microVM has processes to ask",
            }));
        }
        let stats = crate::stats::gather(&self.vm).await;
        let mut list = results.get().init_processes(stats.len() as u32);
        for (i, process) in stats.iter().enumerate() {
            let mut out = list.reborrow().get(i as u32);
            out.set_role(&process.role);
            out.set_pid(process.pid);
            out.set_restarts(process.restarts);
            out.set_reconnects(process.reconnects);
            out.set_resubmitted(process.resubmitted);
            out.set_throttled_total(process.throttled_total);
            match &process.usage {
                Ok(usage) => {
                    out.set_uptime_ms(usage.uptime_ms);
                    out.set_user_cpu_ms(usage.user_cpu_ms);
                    out.set_system_cpu_ms(usage.system_cpu_ms);
                    out.set_max_rss_kib(usage.max_rss_kib);
                }
                Err(e) => out.set_error(e),
            }
        }
        Ok(())
    }

    async fn update(
        self: Rc<Self>,
        params: vm::UpdateParams,
        mut results: vm::UpdateResults,
    ) -> Result<(), capnp::Error> {
        let limits = read_io_limits(params.get()?.get_limits()?);
        limits.validate().map_err(|e| rpc_err(BrokerError::BadSpec(e)))?;
        self.vm.audit.record("update", json!({ "caller": self.caller, "io_limits": limits }));
        crate::stats::set_io_limits(&self.vm, limits).await.map_err(rpc_err)?;
        fill_info(&self.vm.record(), results.get().init_info());
        Ok(())
    }

    async fn snapshot(
        self: Rc<Self>,
        params: vm::SnapshotParams,
        mut results: vm::SnapshotResults,
    ) -> Result<(), capnp::Error> {
        let name = text(params.get()?.get_name()?)?;
        let manifest = self.registry.snapshot(&self.vm, name, &self.caller).map_err(rpc_err)?;
        fill_snapshot(&manifest, results.get().init_snapshot());
        Ok(())
    }

    async fn branch(
        self: Rc<Self>,
        params: vm::BranchParams,
        mut results: vm::BranchResults,
    ) -> Result<(), capnp::Error> {
        let name = text(params.get()?.get_name()?)?;
        let copy = self.registry.branch(&self.vm, name, &self.caller).map_err(rpc_err)?;
        results.get().set_vm(capnp_rpc::new_client(VmServer {
            registry: Rc::clone(&self.registry),
            vm: copy,
            caller: self.caller.clone(),
        }));
        Ok(())
    }

    async fn suspend(
        self: Rc<Self>,
        _: vm::SuspendParams,
        mut results: vm::SuspendResults,
    ) -> Result<(), capnp::Error> {
        self.vm.suspend(&self.caller).await.map_err(rpc_err)?;
        fill_info(&self.vm.record(), results.get().init_info());
        Ok(())
    }

    async fn connect(
        self: Rc<Self>,
        params: vm::ConnectParams,
        mut results: vm::ConnectResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let port = params.get_port();
        let to_client = params.get_to_client()?;
        let (network, ip) = match (&self.registry.config.network, self.vm.record().ip) {
            (Some(network), Some(ip)) => (network.clone(), ip),
            _ => return Err(capnp::Error::failed("invalid: this microVM has no network".into())),
        };
        if !self.vm.state().is_live() {
            return Err(rpc_err(BrokerError::WrongState {
                name: self.vm.name(),
                state: self.vm.state().name().into(),
                what: "start it first",
            }));
        }
        self.vm.audit.record("connect", json!({ "caller": self.caller, "port": port }));
        let to_guest = crate::forward::connect(&network, ip, port, to_client).await?;
        results.get().set_to_guest(to_guest);
        Ok(())
    }
}

/// Sends the console log to `sink` in chunks, the rotated-out older part
/// (`console.log.1`) first; with `follow`, keeps going until the microVM
/// is no longer running and everything is sent. A rotation while
/// following starts over at the new log's beginning.
async fn stream_console(vm: &Rc<Vm>, follow: bool, sink: byte_sink::Client) -> Result<(), capnp::Error> {
    use tokio::io::AsyncReadExt;
    if let Ok(older) = crate::safe_fs::read(&vm.dir.join(crate::vm::console::CONSOLE_LOG_OLD)) {
        for chunk in older.chunks(64 * 1024) {
            let mut request = sink.write_request();
            request.get().set_data(chunk);
            request.send().promise.await?;
        }
    }
    let path = vm.dir.join(CONSOLE_LOG);
    let mut offset = 0u64;
    loop {
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.len() < offset) {
            offset = 0;
        }
        let live = vm.state().is_live();
        let mut chunk = Vec::new();
        if let Ok(file) = crate::safe_fs::open_read(&path) {
            let mut file = tokio::fs::File::from_std(file);
            use tokio::io::AsyncSeekExt;
            file.seek(std::io::SeekFrom::Start(offset)).await.map_err(|e| capnp::Error::failed(e.to_string()))?;
            file.take(64 * 1024).read_to_end(&mut chunk).await.map_err(|e| capnp::Error::failed(e.to_string()))?;
        }
        if !chunk.is_empty() {
            offset += chunk.len() as u64;
            let mut request = sink.write_request();
            request.get().set_data(&chunk);
            request.send().promise.await?;
            continue;
        }
        if !follow || !live {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sink.done_request().send().promise.await?;
    Ok(())
}
