//! The session thread: accepts brokers over mutual TLS, serves `Cluster`
//! and `Session`, keeps one link per registered host, and runs the hub's
//! commands.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use capnp_rpc::{RpcSystem, rpc_twoparty_capnp};
use mm_protocols::broker_capnp::broker;
use mm_protocols::cluster_capnp::{cluster, machine_observation, session};
use mm_protocols::rpc::vat_network;
use tokio::sync::{Notify, mpsc, watch};
use tokio_rustls::TlsAcceptor;

use super::{Command, Timing, driver, ops};
use crate::api::validate;
use crate::db::Db;
use crate::store::hosts::{self, HostSpec};

/// A broker that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Biggest message a broker may send, in words (8 MiB): console logs and
/// exec output arrive in chunks far below it.
const TRAVERSAL_LIMIT_WORDS: usize = 1024 * 1024;

/// One microVM as its broker last reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub state: String,
    pub reason: String,
    pub exit_code: i32,
}

/// What a host's broker has told us about its microVMs.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub vms: BTreeMap<String, Observation>,
    /// Heartbeats received (each carries the whole picture); until the
    /// first, absence means nothing.
    pub heartbeats: u64,
}

/// A registered host's live session.
pub struct HostLink {
    pub name: String,
    /// Tells this session from an earlier or later one of the same host.
    pub id: u64,
    pub broker: broker::Client,
    pub observed: RefCell<Observed>,
    /// Wakes the driver (a report or heartbeat arrived, an operation ended).
    pub kick: Notify,
    /// Machines with an operation in flight, left alone by the driver.
    pub busy: RefCell<HashSet<String>>,
    /// Per machine, the heartbeat count when an operation on it ended: a
    /// heartbeat already on its way then may predate the operation, so
    /// only a later one may say that the microVM is missing.
    pub settled_at: RefCell<HashMap<String, u64>>,
}

/// The session thread's state.
pub struct Local {
    pub db: Db,
    pub changes: watch::Sender<u64>,
    pub timing: Timing,
    /// This controller's URL for its peers, recorded in the hosts row of
    /// every session it holds.
    pub advertise_url: Option<String>,
    links: RefCell<HashMap<String, Rc<HostLink>>>,
    next_id: Cell<u64>,
}

impl Local {
    pub fn notify_change(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn link(&self, host: &str) -> Option<Rc<HostLink>> {
        self.links.borrow().get(host).cloned()
    }

    /// Whether `link` is still its host's session.
    pub fn is_current(&self, link: &HostLink) -> bool {
        self.links.borrow().get(&link.name).is_some_and(|l| l.id == link.id)
    }

    fn add(&self, name: String, broker: broker::Client) -> Rc<HostLink> {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let link = Rc::new(HostLink {
            name: name.clone(),
            id,
            broker,
            observed: RefCell::default(),
            kick: Notify::new(),
            busy: RefCell::default(),
            settled_at: RefCell::default(),
        });
        if let Some(old) = self.links.borrow_mut().insert(name, Rc::clone(&link)) {
            old.kick.notify_one(); // its driver sees it is superseded and ends
        } else {
            crate::metrics::SESSIONS.inc();
        }
        link
    }

    /// Unlinks session `id` of host `name`; false if a newer session of
    /// the host replaced it (which stays).
    fn remove(&self, name: &str, id: u64) -> bool {
        let mut links = self.links.borrow_mut();
        if links.get(name).is_some_and(|l| l.id == id)
            && let Some(link) = links.remove(name)
        {
            link.kick.notify_one();
            crate::metrics::SESSIONS.dec();
            return true;
        }
        false
    }
}

/// What the session thread shares with the rest of the controller.
pub(super) struct Shared {
    pub db: Db,
    pub changes: watch::Sender<u64>,
    pub timing: Timing,
    pub advertise_url: Option<String>,
}

/// The thread's body: a single-threaded runtime serving brokers and the
/// hub's commands until `shutdown`.
pub(super) fn run(
    listener: std::net::TcpListener,
    acceptor: TlsAcceptor,
    shared: Shared,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut shutdown: watch::Receiver<bool>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("broker sessions: cannot build a runtime: {e}");
            return;
        }
    };
    let Shared { db, changes, timing, advertise_url } = shared;
    let local = Rc::new(Local { db, changes, timing, advertise_url, links: RefCell::default(), next_id: Cell::new(1) });
    let tasks = tokio::task::LocalSet::new();
    tasks.block_on(&runtime, async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                tracing::error!("broker sessions: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let _ = tcp.set_nodelay(true);
                        tokio::task::spawn_local(serve_connection(Rc::clone(&local), acceptor.clone(), tcp, peer));
                    }
                    Err(e) => {
                        tracing::warn!("broker sessions: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                command = commands.recv() => match command {
                    Some(command) => {
                        tokio::task::spawn_local(ops::handle(Rc::clone(&local), command));
                    }
                    None => break,
                },
                _ = shutdown.wait_for(|down| *down) => break,
            }
        }
    });
}

async fn serve_connection(local: Rc<Local>, acceptor: TlsAcceptor, tcp: tokio::net::TcpStream, peer: SocketAddr) {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::warn!(%peer, "refused a broker connection: TLS: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "refused a broker connection: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let name = match stream.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        Some(cert) => match super::tls::certificate_name(cert) {
            Ok(name) => name,
            Err(e) => {
                tracing::warn!(%peer, "refused a broker connection: {e}");
                return;
            }
        },
        None => {
            tracing::warn!(%peer, "refused a broker connection: no client certificate");
            return;
        }
    };
    let (reader, writer) = tokio::io::split(stream);
    let network = vat_network(reader, writer, rpc_twoparty_capnp::Side::Server, Some(TRAVERSAL_LIMIT_WORDS));
    let registered = Rc::new(Cell::new(None));
    let bootstrap: cluster::Client = capnp_rpc::new_client(ClusterServer {
        local: Rc::clone(&local),
        cert_name: name.clone(),
        peer,
        registered: Rc::clone(&registered),
    });
    let rpc = RpcSystem::new(Box::new(network), Some(bootstrap.client));
    tracing::info!(%peer, certificate = %name, "broker connected");
    let ended = rpc.await;
    if let Some(id) = registered.get()
        && local.remove(&name, id)
        && let Some(url) = local.advertise_url.clone()
    {
        // Peers stop forwarding here; a row that names another controller
        // by now (the broker dialled it meanwhile) is left alone.
        let host = name.clone();
        if let Err(e) = local.db.run(move |c| hosts::release_session(c, &host, &url)).await {
            tracing::warn!(host = %name, "cannot clear the host's session controller: {e}");
        }
    }
    match ended {
        Ok(()) => tracing::info!(%peer, host = %name, "broker session ended"),
        Err(e) => tracing::warn!(%peer, host = %name, "broker session ended: {e}"),
    }
}

fn refuse(kind: &str, message: impl std::fmt::Display) -> capnp::Error {
    capnp::Error::failed(format!("{kind}: {message}"))
}

fn text(reader: capnp::text::Reader<'_>) -> Result<String, capnp::Error> {
    reader.to_string().map_err(|e| refuse("invalid", format!("text is not UTF-8: {e}")))
}

/// A connection's bootstrap capability; it knows the certificate's name.
struct ClusterServer {
    local: Rc<Local>,
    cert_name: String,
    peer: SocketAddr,
    /// The session id once registered, so the connection's end unlinks it.
    registered: Rc<Cell<Option<u64>>>,
}

impl cluster::Server for ClusterServer {
    async fn register(
        self: Rc<Self>,
        params: cluster::RegisterParams,
        mut results: cluster::RegisterResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let host = params.get_host()?;
        let broker = params.get_broker()?;
        let mut name = text(host.get_name()?)?;
        if name.is_empty() {
            name.clone_from(&self.cert_name);
        }
        if name != self.cert_name {
            return Err(refuse("forbidden", format!("the certificate is for host {:?}, not {name:?}", self.cert_name)));
        }
        if !validate::is_name(&name) {
            return Err(refuse("invalid", format!("host name {name:?} must be 1-63 lowercase letters, digits or '-'")));
        }
        let cpus = i32::try_from(host.get_cpus()).ok().filter(|n| *n > 0);
        let memory_mb = i64::try_from(host.get_memory_mib()).ok().filter(|n| *n > 0);
        let (Some(cpus), Some(memory_mb)) = (cpus, memory_mb) else {
            return Err(refuse("invalid", "cpus and memoryMib must be positive"));
        };
        let mut labels = BTreeMap::new();
        for label in host.get_labels()?.iter() {
            labels.insert(text(label.get_key()?)?, text(label.get_value()?)?);
        }
        validate::labels("labels", &labels).map_err(|e| refuse("invalid", e.detail))?;
        let version = text(host.get_version()?)?;
        let spec = HostSpec { name: name.clone(), address: self.peer.to_string(), cpus, memory_mb, labels };
        let url = self.local.advertise_url.clone();
        self.local
            .db
            .run(move |c| {
                hosts::register(c, &spec)?;
                hosts::claim_session(c, &spec.name, url.as_deref())
            })
            .await
            .map_err(|e| refuse("internal", e))?;
        let link = self.local.add(name.clone(), broker);
        self.registered.set(Some(link.id));
        tracing::info!(host = %name, peer = %self.peer, %version, cpus, memory_mb, "broker registered");
        tokio::task::spawn_local(driver::run(Rc::clone(&self.local), Rc::clone(&link)));
        self.local.notify_change();
        let heartbeat_ms = u32::try_from(self.local.timing.heartbeat.as_millis()).unwrap_or(u32::MAX);
        let mut out = results.get();
        {
            let mut config = out.reborrow().init_config();
            config.set_host_name(&name);
            config.set_heartbeat_ms(heartbeat_ms);
        }
        out.set_session(capnp_rpc::new_client(SessionServer { local: Rc::clone(&self.local), link }));
        Ok(())
    }
}

/// One registered host's session.
struct SessionServer {
    local: Rc<Local>,
    link: Rc<HostLink>,
}

impl SessionServer {
    fn check_current(&self) -> Result<(), capnp::Error> {
        if self.local.is_current(&self.link) {
            Ok(())
        } else {
            Err(refuse("conflict", format!("a newer session of host {} replaced this one", self.link.name)))
        }
    }
}

fn read_observations(
    list: capnp::struct_list::Reader<'_, machine_observation::Owned>,
) -> Result<Vec<(String, Observation)>, capnp::Error> {
    let mut out = Vec::with_capacity(list.len() as usize);
    for o in list.iter() {
        let observation =
            Observation { state: text(o.get_state()?)?, reason: text(o.get_reason()?)?, exit_code: o.get_exit_code() };
        out.push((text(o.get_name()?)?, observation));
    }
    Ok(out)
}

impl session::Server for SessionServer {
    async fn heartbeat(
        self: Rc<Self>,
        params: session::HeartbeatParams,
        _: session::HeartbeatResults,
    ) -> Result<(), capnp::Error> {
        self.check_current()?;
        let observed = read_observations(params.get()?.get_observed()?)?;
        {
            // Replaced before any await, so calls are applied in the order
            // the broker sent them.
            let mut picture = self.link.observed.borrow_mut();
            picture.vms = observed.into_iter().collect();
            picture.heartbeats += 1;
        }
        self.link.kick.notify_one();
        let name = self.link.name.clone();
        self.local.db.run(move |c| hosts::heartbeat(c, &name)).await.map_err(|e| refuse("internal", e))
    }

    async fn report(
        self: Rc<Self>,
        params: session::ReportParams,
        _: session::ReportResults,
    ) -> Result<(), capnp::Error> {
        self.check_current()?;
        let observed = read_observations(params.get()?.get_observed()?)?;
        {
            let mut picture = self.link.observed.borrow_mut();
            for (name, observation) in observed {
                if observation.state == "removed" {
                    picture.vms.remove(&name);
                } else {
                    picture.vms.insert(name, observation);
                }
            }
        }
        self.link.kick.notify_one();
        Ok(())
    }
}
