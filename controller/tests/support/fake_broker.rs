//! A stand-in broker for the REST paths that need one: it dials the
//! controller over mutual TLS (certificates from `scripts/dev-ca.sh`),
//! registers its host with its own `Broker` capability, heart-beats every
//! microVM it has, and serves `createVm`, `getVm`, `restoreVm`,
//! `listSnapshots`, `removeSnapshot` and `Vm.info/start/stop/remove/
//! snapshot/suspend/branch` from memory. So the controller's session code, its
//! driver and the snapshot routes run for real, without KVM (the real
//! brokers are `e2e_brokers.rs`'s).
//!
//! Cap'n Proto is not `Send`: the broker runs on a thread of its own; the
//! test reads and steers it through [`World`] behind a mutex.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capnp_rpc::RpcSystem;
use capnp_rpc::rpc_twoparty_capnp::Side;
use mm_controller::session::{BrokerListen, TlsFiles};
use mm_protocols::broker_capnp::{broker, vm, vm_info};
use mm_protocols::cluster_capnp::cluster;
use mm_protocols::cluster_tls::{load_certs, load_roots};
use mm_protocols::rpc::vat_network;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};

/// How often the stand-in heart-beats (whatever the controller asks):
/// often, so the driver acts at once.
const HEARTBEAT: Duration = Duration::from_millis(100);

/// A microVM of the stand-in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeVm {
    /// running | stopped | suspended
    pub state: String,
    /// The snapshot it was restored from.
    pub restored_from: Option<String>,
    pub ssh_keys: Vec<String>,
    /// Times `start` resumed it from `suspended`.
    pub resumed: u32,
    /// The microVM it is a live copy of (`Vm.branch`).
    pub branched_from: Option<String>,
}

/// A snapshot the stand-in holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeSnapshot {
    pub vm: String,
    /// The name it was given (the controller sends none).
    pub name: String,
}

/// Everything the stand-in has, and how the test steers it.
#[derive(Debug, Default)]
pub struct World {
    pub vms: BTreeMap<String, FakeVm>,
    pub snapshots: BTreeMap<String, FakeSnapshot>,
    /// The next `Vm.snapshot` fails with this (`"<kind>: message"`).
    pub fail_snapshot: Option<String>,
    /// The next `Vm.suspend` fails with this.
    pub fail_suspend: Option<String>,
    /// Every `Vm.branch`: (the source microVM, the name asked for).
    pub branches: Vec<(String, String)>,
}

/// Snapshot ids, unique in the test binary (several stand-ins may share a
/// database).
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

type Shared = Arc<Mutex<World>>;

/// Certificates for a controller and brokers, made by `dev-ca.sh`.
pub struct Certs {
    pub dir: PathBuf,
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Certs {
    /// A CA, the controller's certificate and one per host in `hosts`.
    pub fn make(hosts: &[&str]) -> Certs {
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mm-fake-broker-{}-{n}", std::process::id()));
        let script = mm_integration::repo_root().join("scripts/dev-ca.sh");
        let out = std::process::Command::new("bash").arg(script).arg(&dir).args(hosts).output().unwrap();
        assert!(out.status.success(), "dev-ca.sh: {}", String::from_utf8_lossy(&out.stderr));
        Certs { dir }
    }

    /// Where a controller listens for brokers (any port) with these.
    pub fn listen(&self) -> BrokerListen {
        BrokerListen {
            addr: "127.0.0.1:0".parse().unwrap(),
            tls: TlsFiles {
                cert: self.dir.join("controller.pem"),
                key: self.dir.join("controller.key"),
                ca: self.dir.join("ca.pem"),
            },
        }
    }
}

/// A running stand-in; ends its session when dropped.
pub struct FakeBroker {
    pub world: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl FakeBroker {
    /// Dials `controller` as host `host` (its certificate from `certs`)
    /// with `cpus` and `memory_mib` to offer; returns once registered.
    pub fn start(controller: SocketAddr, certs: &Certs, host: &str, cpus: u32, memory_mib: u64) -> FakeBroker {
        let world = Shared::default();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (registered_tx, registered) = std::sync::mpsc::channel();
        let shared = Arc::clone(&world);
        let (dir, host) = (certs.dir.clone(), host.to_owned());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            tokio::task::LocalSet::new().block_on(&runtime, async move {
                let offer = (cpus, memory_mib);
                tokio::select! {
                    ended = session(controller, &dir, &host, offer, shared, registered_tx) => {
                        if let Err(e) = ended {
                            eprintln!("fake broker {host}: {e}");
                        }
                    }
                    _ = stopped => {}
                }
            });
        });
        registered.recv_timeout(Duration::from_secs(30)).expect("the fake broker registers");
        FakeBroker { world, stop: Some(stop), thread: Some(thread) }
    }

    pub fn vm(&self, name: &str) -> Option<FakeVm> {
        self.world.lock().unwrap().vms.get(name).cloned()
    }

    pub fn snapshot_ids(&self) -> Vec<String> {
        self.world.lock().unwrap().snapshots.keys().cloned().collect()
    }
}

fn failed(message: impl Into<String>) -> capnp::Error {
    capnp::Error::failed(message.into())
}

fn text(t: capnp::Result<capnp::text::Reader<'_>>) -> capnp::Result<String> {
    t?.to_string().map_err(|e| failed(format!("invalid: {e}")))
}

async fn session(
    controller: SocketAddr,
    dir: &Path,
    host: &str,
    (cpus, memory_mib): (u32, u64),
    world: Shared,
    registered: std::sync::mpsc::Sender<()>,
) -> Result<(), Box<dyn std::error::Error>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(load_roots(&dir.join("ca.pem"))?)
        .with_client_auth_cert(
            load_certs(&dir.join(format!("{host}.pem")))?,
            PrivateKeyDer::from_pem_file(dir.join(format!("{host}.key")))?,
        )?;
    let tcp = tokio::net::TcpStream::connect(controller).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = connector.connect(ServerName::try_from("127.0.0.1")?, tcp).await?;
    let (reader, writer) = tokio::io::split(stream);
    let mut rpc = RpcSystem::new(Box::new(vat_network(reader, writer, Side::Client, None)), None);
    let cluster: cluster::Client = rpc.bootstrap(Side::Server);
    tokio::task::spawn_local(rpc);

    let mut request = cluster.register_request();
    {
        let mut info = request.get().init_host();
        info.set_name(host);
        info.set_cpus(cpus);
        info.set_memory_mib(memory_mib);
        info.set_version("fake");
    }
    request.get().set_broker(capnp_rpc::new_client(Broker(Arc::clone(&world))));
    let reply = request.send().promise.await?;
    let session = reply.get()?.get_session()?;
    let _ = registered.send(());
    loop {
        let vms: Vec<(String, String)> =
            world.lock().unwrap().vms.iter().map(|(name, vm)| (name.clone(), vm.state.clone())).collect();
        let mut beat = session.heartbeat_request();
        let mut list = beat.get().init_observed(vms.len() as u32);
        for (i, (name, state)) in vms.iter().enumerate() {
            let mut o = list.reborrow().get(i as u32);
            o.set_name(name);
            o.set_state(state);
            o.set_exit_code(-1);
        }
        beat.send().promise.await?;
        tokio::time::sleep(HEARTBEAT).await;
    }
}

struct Broker(Shared);

fn add_vm(world: &Shared, name: &str, vm: FakeVm) -> capnp::Result<vm::Client> {
    let mut w = world.lock().unwrap();
    if w.vms.contains_key(name) {
        return Err(failed(format!("conflict: a microVM named {name:?} already exists")));
    }
    w.vms.insert(name.to_owned(), vm);
    Ok(capnp_rpc::new_client(Vm { world: Arc::clone(world), name: name.to_owned() }))
}

impl broker::Server for Broker {
    async fn create_vm(
        self: Rc<Self>,
        params: broker::CreateVmParams,
        mut results: broker::CreateVmResults,
    ) -> Result<(), capnp::Error> {
        let spec = params.get()?.get_spec()?;
        let keys = spec.get_ssh_keys()?.iter().map(text).collect::<Result<_, _>>()?;
        let vm = FakeVm { state: "running".into(), ssh_keys: keys, ..FakeVm::default() };
        results.get().set_vm(add_vm(&self.0, &text(spec.get_name())?, vm)?);
        Ok(())
    }

    async fn get_vm(
        self: Rc<Self>,
        params: broker::GetVmParams,
        mut results: broker::GetVmResults,
    ) -> Result<(), capnp::Error> {
        let name = text(params.get()?.get_name())?;
        if !self.0.lock().unwrap().vms.contains_key(&name) {
            return Err(failed(format!("not-found: no microVM {name:?}")));
        }
        results.get().set_vm(capnp_rpc::new_client(Vm { world: Arc::clone(&self.0), name }));
        Ok(())
    }

    async fn version(
        self: Rc<Self>,
        _: broker::VersionParams,
        mut results: broker::VersionResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_version("fake");
        Ok(())
    }

    async fn remove_snapshot(
        self: Rc<Self>,
        params: broker::RemoveSnapshotParams,
        _: broker::RemoveSnapshotResults,
    ) -> Result<(), capnp::Error> {
        let id = text(params.get()?.get_id())?;
        match self.0.lock().unwrap().snapshots.remove(&id) {
            Some(_) => Ok(()),
            None => Err(failed(format!("not-found: no snapshot {id:?}"))),
        }
    }

    async fn restore_vm(
        self: Rc<Self>,
        params: broker::RestoreVmParams,
        mut results: broker::RestoreVmResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let snapshot = text(params.get_snapshot())?;
        let keys: Vec<String> = params.get_ssh_keys()?.iter().map(text).collect::<Result<_, _>>()?;
        if !self.0.lock().unwrap().snapshots.contains_key(&snapshot) {
            return Err(failed(format!("not-found: no snapshot {snapshot:?}")));
        }
        let vm = FakeVm { state: "running".into(), restored_from: Some(snapshot), ssh_keys: keys, ..FakeVm::default() };
        results.get().set_vm(add_vm(&self.0, &text(params.get_name())?, vm)?);
        Ok(())
    }
}

struct Vm {
    world: Shared,
    name: String,
}

impl Vm {
    fn state(&self) -> capnp::Result<String> {
        let w = self.world.lock().unwrap();
        let vm = w.vms.get(&self.name).ok_or_else(|| failed(format!("not-found: no microVM {:?}", self.name)))?;
        Ok(vm.state.clone())
    }

    fn set_state(&self, state: &str) {
        if let Some(vm) = self.world.lock().unwrap().vms.get_mut(&self.name) {
            vm.state = state.to_owned();
        }
    }

    fn fill(&self, mut info: vm_info::Builder<'_>) -> capnp::Result<()> {
        info.set_name(&self.name);
        info.set_id(&self.name);
        info.set_state(self.state()?);
        info.set_exit_code(-1);
        Ok(())
    }
}

impl vm::Server for Vm {
    async fn info(self: Rc<Self>, _: vm::InfoParams, mut results: vm::InfoResults) -> Result<(), capnp::Error> {
        self.fill(results.get().init_info())
    }

    async fn start(self: Rc<Self>, _: vm::StartParams, _: vm::StartResults) -> Result<(), capnp::Error> {
        if let Some(vm) = self.world.lock().unwrap().vms.get_mut(&self.name) {
            if vm.state == "suspended" {
                vm.resumed += 1;
            }
            vm.state = "running".into();
        }
        Ok(())
    }

    async fn stop(self: Rc<Self>, _: vm::StopParams, mut results: vm::StopResults) -> Result<(), capnp::Error> {
        if self.state()? == "running" {
            self.set_state("stopped");
        }
        self.fill(results.get().init_info())
    }

    async fn remove(self: Rc<Self>, _: vm::RemoveParams, _: vm::RemoveResults) -> Result<(), capnp::Error> {
        self.world.lock().unwrap().vms.remove(&self.name);
        Ok(())
    }

    async fn snapshot(
        self: Rc<Self>,
        params: vm::SnapshotParams,
        mut results: vm::SnapshotResults,
    ) -> Result<(), capnp::Error> {
        let name = text(params.get()?.get_name())?;
        if self.state()? != "running" {
            return Err(failed("conflict: only a running microVM can be snapshotted"));
        }
        let id = {
            let mut w = self.world.lock().unwrap();
            if let Some(e) = w.fail_snapshot.take() {
                return Err(failed(e));
            }
            let n = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Scattered, as the broker's random ids are (prefixes differ).
            let id = format!("{:012x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16);
            w.snapshots.insert(id.clone(), FakeSnapshot { vm: self.name.clone(), name });
            id
        };
        mm_protocols::snapshot_info::SnapshotInfo {
            id,
            kind: "snapshot".into(),
            vm_id: self.name.clone(),
            vm_name: self.name.clone(),
            created_at: "2027-01-05T10:00:00Z".into(),
            cpus: 1,
            memory_mib: 128,
            memory_bytes: 20 << 20,
            disk_bytes: 50 << 20,
            pause_us: 1234,
            ..Default::default()
        }
        .write(results.get().init_snapshot());
        Ok(())
    }

    /// As `restoreVm` of a snapshot taken there and then (the broker's
    /// running snapshot of kind branch, removed once the copy runs): a new
    /// running microVM with the source's keys.
    async fn branch(
        self: Rc<Self>,
        params: vm::BranchParams,
        mut results: vm::BranchResults,
    ) -> Result<(), capnp::Error> {
        let name = text(params.get()?.get_name())?;
        let keys = {
            let mut w = self.world.lock().unwrap();
            w.branches.push((self.name.clone(), name.clone()));
            let source =
                w.vms.get(&self.name).ok_or_else(|| failed(format!("not-found: no microVM {:?}", self.name)))?;
            if source.state != "running" {
                return Err(failed("conflict: only a running microVM can be branched"));
            }
            source.ssh_keys.clone()
        };
        let vm = FakeVm {
            state: "running".into(),
            ssh_keys: keys,
            branched_from: Some(self.name.clone()),
            ..FakeVm::default()
        };
        results.get().set_vm(add_vm(&self.world, &name, vm)?);
        Ok(())
    }

    async fn suspend(
        self: Rc<Self>,
        _: vm::SuspendParams,
        mut results: vm::SuspendResults,
    ) -> Result<(), capnp::Error> {
        if self.state()? != "running" {
            return Err(failed("conflict: only a running microVM can be suspended"));
        }
        if let Some(e) = self.world.lock().unwrap().fail_suspend.take() {
            return Err(failed(e));
        }
        self.set_state("suspended");
        self.fill(results.get().init_info())
    }
}
