//! The broker's side of the cluster session (`protocols/cluster.capnp`).
//!
//! The broker dials the controller (so a broker behind NAT joins like any
//! other) over mutual TLS, registers its capacity and labels, and hands the
//! controller its `Broker` capability: the very `BrokerServer` mmctl talks
//! to, with the caller recorded as `controller <host>` in the audit log.
//! From then on the controller drives microVMs through it, and the broker
//! tells the controller what it observes: every microVM's state with each
//! heartbeat, and the microVMs that changed as soon as the events hub
//! (`Broker.events`' feed) says something happened.
//!
//! When the controller cannot be reached or the connection ends, the
//! broker keeps running its microVMs and dials again with exponential
//! backoff; the controller matches microVMs to machines by name (the
//! machine id), so re-registering after a restart on either side needs no
//! state here.

pub mod tls;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use capnp_rpc::{RpcSystem, rpc_twoparty_capnp};
use mm_protocols::broker_capnp::broker;
use mm_protocols::cluster_capnp::{cluster, machine_observation};
use mm_protocols::rpc::vat_network;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::broadcast::error::RecvError;
use tokio_rustls::TlsConnector;

use crate::registry::Registry;
use crate::rpc::BrokerServer;

/// Dialling and the TLS handshake must be done by then.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A call to the controller that takes longer means the link is dead.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Biggest message the controller may send, in words (8 MiB): exec input
/// and the like stay far below it; a confused peer must not make us
/// allocate without bound.
const TRAVERSAL_LIMIT_WORDS: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("the controller refused or failed: {0}")]
    Rpc(#[from] capnp::Error),
}

/// How to join a cluster (the `--controller` flags).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The controller's broker address, `HOST:PORT`.
    pub controller: String,
    /// The name the controller's certificate must carry (default: HOST).
    pub controller_name: Option<String>,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub tls_ca: PathBuf,
    /// Must match the certificate's name; default: that name.
    pub host_name: Option<String>,
    pub labels: Vec<(String, String)>,
    /// What this host offers to microVMs.
    pub cpus: u32,
    pub memory_mib: u64,
}

/// A loaded configuration: certificates are read at start, so a bad file
/// stops the broker at once instead of failing every reconnect quietly.
pub struct Cluster {
    config: ClusterConfig,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    host_name: String,
}

impl Cluster {
    pub fn new(config: ClusterConfig) -> Result<Cluster, ClusterError> {
        let (connector, cert_name) = tls::connector(&config.tls_cert, &config.tls_key, &config.tls_ca)?;
        let server_name = tls::server_name(&config.controller, config.controller_name.as_deref())?;
        let host_name = config.host_name.clone().unwrap_or(cert_name);
        Ok(Cluster { config, connector, server_name, host_name })
    }

    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    /// Holds a session with the controller for as long as the broker runs,
    /// dialling again (with backoff) whenever it ends.
    pub async fn run(self, registry: Rc<Registry>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut registered = false;
            match self.session(&registry, &mut registered).await {
                Ok(()) => tracing::warn!(controller = %self.config.controller, "the controller ended the session"),
                Err(e) => tracing::warn!(controller = %self.config.controller, "cluster session: {e}"),
            }
            if registered {
                backoff = BACKOFF_MIN;
            }
            tracing::info!("dialling the controller again in {} s", backoff.as_secs());
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn session(&self, registry: &Rc<Registry>, registered: &mut bool) -> Result<(), ClusterError> {
        let address = &self.config.controller;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| ClusterError::Timeout("connecting to the controller"))?
            .map_err(|source| ClusterError::Io { what: format!("connecting to {address}"), source })?;
        let _ = tcp.set_nodelay(true);
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, self.connector.connect(self.server_name.clone(), tcp))
            .await
            .map_err(|_| ClusterError::Timeout("the TLS handshake"))?
            .map_err(|e| ClusterError::Tls(format!("handshake with {address}: {e}")))?;
        let (reader, writer) = tokio::io::split(stream);
        let network = vat_network(reader, writer, rpc_twoparty_capnp::Side::Client, Some(TRAVERSAL_LIMIT_WORDS));
        let mut rpc = RpcSystem::new(Box::new(network), None);
        let cluster: cluster::Client = rpc.bootstrap(rpc_twoparty_capnp::Side::Server);
        let mut connection = AbortOnDrop(tokio::task::spawn_local(rpc));

        let caller = format!("controller {}", self.host_name);
        let broker: broker::Client = capnp_rpc::new_client(BrokerServer { registry: Rc::clone(registry), caller });
        let mut request = cluster.register_request();
        {
            let mut params = request.get();
            params.set_broker(broker);
            let mut host = params.init_host();
            host.set_name(&self.host_name);
            host.set_cpus(self.config.cpus);
            host.set_memory_mib(self.config.memory_mib);
            host.set_version(env!("CARGO_PKG_VERSION"));
            let mut labels = host.init_labels(self.config.labels.len() as u32);
            for (i, (key, value)) in self.config.labels.iter().enumerate() {
                let mut label = labels.reborrow().get(i as u32);
                label.set_key(key);
                label.set_value(value);
            }
        }
        let reply = timed(request.send().promise, "registering").await?;
        let reply = reply.get()?;
        let session = reply.get_session()?;
        let config = reply.get_config()?;
        let heartbeat = Duration::from_millis(u64::from(config.get_heartbeat_ms().max(100)));
        *registered = true;
        tracing::info!(
            controller = %address,
            host = config.get_host_name()?.to_str().unwrap_or("?"),
            heartbeat_ms = heartbeat.as_millis() as u64,
            "registered with the controller"
        );

        let mut events = registry.events.subscribe();
        let mut ticker = tokio::time::interval(heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = BTreeMap::new();
        loop {
            tokio::select! {
                ended = &mut connection.0 => {
                    return match ended {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(e.into()),
                        Err(e) => Err(ClusterError::Io { what: "the connection task".into(), source: e.into() }),
                    };
                }
                _ = ticker.tick() => {
                    let now = observe(registry);
                    let mut request = session.heartbeat_request();
                    fill(request.get().init_observed(now.len() as u32), now.values());
                    timed(request.send().promise, "a heartbeat").await?;
                    last = now;
                }
                received = events.recv() => {
                    if matches!(received, Err(RecvError::Closed)) {
                        return Ok(());
                    }
                    let now = observe(registry);
                    let changed = changes(&last, &now);
                    if !changed.is_empty() {
                        let mut request = session.report_request();
                        fill(request.get().init_observed(changed.len() as u32), changed.iter());
                        timed(request.send().promise, "a report").await?;
                    }
                    last = now;
                }
            }
        }
    }
}

/// Ends the connection's task (and with it the session) when the session
/// loop returns for any reason.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn timed<T>(call: impl Future<Output = Result<T, capnp::Error>>, what: &'static str) -> Result<T, ClusterError> {
    tokio::time::timeout(CALL_TIMEOUT, call).await.map_err(|_| ClusterError::Timeout(what))?.map_err(Into::into)
}

/// One microVM as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub name: String,
    pub state: String,
    pub reason: String,
    pub exit_code: i32,
}

/// Every microVM this broker has, by name.
fn observe(registry: &Registry) -> BTreeMap<String, Observation> {
    registry.forget_removed();
    registry
        .list()
        .into_iter()
        .map(|vm| {
            let record = vm.record();
            let observation = Observation {
                name: record.name.clone(),
                state: record.state.name().to_owned(),
                reason: record.reason,
                exit_code: record.exit_code.unwrap_or(-1),
            };
            (record.name, observation)
        })
        .collect()
}

/// What differs from `before` in `now`, with microVMs that went away as
/// `removed`.
pub fn changes(before: &BTreeMap<String, Observation>, now: &BTreeMap<String, Observation>) -> Vec<Observation> {
    let mut changed: Vec<Observation> = now.values().filter(|o| before.get(&o.name) != Some(*o)).cloned().collect();
    for name in before.keys().filter(|name| !now.contains_key(*name)) {
        changed.push(Observation { name: name.clone(), state: "removed".into(), reason: String::new(), exit_code: -1 });
    }
    changed
}

fn fill<'a>(
    mut list: capnp::struct_list::Builder<'_, machine_observation::Owned>,
    observations: impl Iterator<Item = &'a Observation>,
) {
    for (i, o) in observations.enumerate() {
        let mut out = list.reborrow().get(i as u32);
        out.set_name(&o.name);
        out.set_state(&o.state);
        out.set_reason(&o.reason);
        out.set_exit_code(o.exit_code);
    }
}

/// CPUs and memory offered by default: every CPU, and the memory the
/// broker would let microVMs have (MemTotal less the reserve).
pub fn default_capacity(reserved_memory_mib: u64) -> (u32, u64) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total_mib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024);
    (cpus, total_mib.saturating_sub(reserved_memory_mib).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(name: &str, state: &str) -> Observation {
        Observation { name: name.into(), state: state.into(), reason: String::new(), exit_code: -1 }
    }

    #[test]
    fn changes_are_new_changed_and_removed_microvms() {
        let before: BTreeMap<_, _> = [obs("a", "running"), obs("b", "running"), obs("c", "stopped")]
            .into_iter()
            .map(|o| (o.name.clone(), o))
            .collect();
        let now: BTreeMap<_, _> = [obs("a", "running"), obs("b", "stopped"), obs("d", "starting")]
            .into_iter()
            .map(|o| (o.name.clone(), o))
            .collect();
        let changed = changes(&before, &now);
        assert_eq!(changed, [obs("b", "stopped"), obs("d", "starting"), obs("c", "removed")]);
        assert!(changes(&now, &now).is_empty());
    }
}
