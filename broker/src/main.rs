//! `mm-broker`: the per-host supervisor. Serves `protocols/broker.capnp`
//! on an owner-only unix socket; see the crate docs of `mm_broker`.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::rc::Rc;

use anyhow::{Context, Result};
use capnp_rpc::{RpcSystem, rpc_twoparty_capnp};
use clap::Parser;
use mm_protocols::rpc::vat_network;
use mm_protocols::socket_path;
use std::net::Ipv4Addr;

use mm_broker::BrokerConfig;
use mm_broker::cluster::{Cluster, ClusterConfig};
use mm_broker::network::ipam::Ipv4Net;
use mm_broker::network::{Network, NetworkConfig};
use mm_broker::registry::Registry;
use mm_broker::rpc::BrokerServer;
use mm_protocols::broker_capnp::broker;
use tokio::net::UnixListener;

#[derive(Debug, Parser)]
#[command(name = "mm-broker", version, about = "MicroMachines per-host broker")]
struct Args {
    /// Where microVM records, disks, consoles and audit logs live.
    #[arg(long, default_value = "/var/lib/micromachines/broker")]
    state_dir: PathBuf,
    /// The Cap'n Proto socket for mmctl (made owner-only).
    #[arg(long, default_value = mm_protocols::DEFAULT_BROKER_SOCKET)]
    socket: PathBuf,
    /// The guest kernel (vmlinux) microVMs boot.
    #[arg(long)]
    kernel: PathBuf,
    /// The built-in image (an ext4 root filesystem).
    #[arg(long)]
    builtin_image: PathBuf,
    /// Directory with mm-vmm and mm-device (default: beside mm-broker).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Host memory in MiB never given to microVMs.
    #[arg(long, default_value_t = 512)]
    reserved_memory_mib: u64,
    /// Where post-boot snapshots for warm starts are kept (default:
    /// STATE_DIR/warm). Brokers on one host may share one.
    #[arg(long)]
    warm_cache: Option<PathBuf>,
    /// Boot every microVM; never restore a post-boot snapshot.
    #[arg(long)]
    no_warm_starts: bool,
    /// Each microVM's console log is rotated at this size (bytes; suffixes
    /// K, M, G), one older file kept: a guest printing forever takes at
    /// most twice this much of the host's disk.
    #[arg(long, default_value = "4M", value_parser = parse_console_log_max)]
    console_log_max: u64,
    /// DEBUGGING ONLY: run every microVM process without its seccomp filter.
    #[arg(long)]
    no_seccomp: bool,
    /// DEBUGGING ONLY: run every microVM process unjailed.
    #[arg(long)]
    no_jail: bool,
    #[command(flatten)]
    network: NetworkArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Serve Prometheus/OpenMetrics text at http://ADDR/metrics (default:
    /// off). Unauthenticated: bind loopback or a monitoring-only address.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Log lines as `text` or `json` (one object per line).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Joining a cluster (controller/README.md): the broker dials the
/// controller over mutual TLS and keeps a session with it.
#[derive(Debug, clap::Args)]
struct ClusterArgs {
    /// The controller's broker address (HOST:PORT) to dial; without it the
    /// broker serves only its local socket.
    #[arg(long, requires_all = ["tls_cert", "tls_key", "tls_ca"])]
    controller: Option<String>,
    /// The name the controller's certificate must carry (default: the HOST
    /// of --controller).
    #[arg(long, requires = "controller")]
    controller_name: Option<String>,
    /// This broker's certificate (PEM), signed by the cluster's CA; its
    /// common name is the host's name.
    #[arg(long, requires = "controller")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "controller")]
    tls_key: Option<PathBuf>,
    /// The cluster's CA certificate (PEM): the controller's must be signed by it.
    #[arg(long, requires = "controller")]
    tls_ca: Option<PathBuf>,
    /// The host's name in the cluster; must be the certificate's (default).
    #[arg(long, requires = "controller")]
    host_name: Option<String>,
    /// KEY=VALUE the scheduler can match machines against (repeatable).
    #[arg(long = "label", value_parser = parse_label, requires = "controller")]
    labels: Vec<(String, String)>,
    /// vCPUs offered to the cluster (default: every CPU).
    #[arg(long, requires = "controller")]
    offer_cpus: Option<u32>,
    /// Memory in MiB offered to the cluster (default: MemTotal less
    /// --reserved-memory-mib).
    #[arg(long, requires = "controller")]
    offer_memory_mib: Option<u64>,
}

impl ClusterArgs {
    fn load(self, reserved_memory_mib: u64) -> Result<Option<Cluster>> {
        let Some(controller) = self.controller else { return Ok(None) };
        let (cpus, memory_mib) = mm_broker::cluster::default_capacity(reserved_memory_mib);
        let config = ClusterConfig {
            controller,
            controller_name: self.controller_name,
            tls_cert: self.tls_cert.context("--tls-cert")?,
            tls_key: self.tls_key.context("--tls-key")?,
            tls_ca: self.tls_ca.context("--tls-ca")?,
            host_name: self.host_name,
            labels: self.labels,
            cpus: self.offer_cpus.unwrap_or(cpus),
            memory_mib: self.offer_memory_mib.unwrap_or(memory_mib),
        };
        Ok(Some(Cluster::new(config).context("loading the cluster TLS identity")?))
    }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    if key.is_empty() {
        return Err(format!("{text:?}: the key is empty"));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// The microVM network (README, "Networking").
#[derive(Debug, clap::Args)]
struct NetworkArgs {
    /// The guests' IPv4 network; its first address is the gateway's.
    #[arg(long, default_value = "10.100.0.0/24")]
    network_cidr: Ipv4Net,
    /// The network namespace (created if missing) that holds the bridge.
    #[arg(long, default_value = "micromachines")]
    netns: String,
    /// Put the bridge in the broker's own network namespace instead: guests
    /// and host can then reach each other directly.
    #[arg(long, conflicts_with = "netns")]
    bridge_in_host_netns: bool,
    /// The bridge's name.
    #[arg(long, default_value = "mmbr0")]
    bridge: String,
    /// Host interface for the guests' egress (NAT); without it, none.
    #[arg(long)]
    uplink: Option<String>,
    /// The /30 between the namespace and the host, used with --uplink.
    #[arg(long, default_value = "169.254.100.0/30")]
    transit_cidr: String,
    /// A name server for the guests' /etc/resolv.conf (repeatable).
    #[arg(long)]
    dns: Vec<Ipv4Addr>,
    /// No network at all: microVMs get no interface.
    #[arg(long, conflicts_with_all = ["netns", "bridge_in_host_netns", "uplink"])]
    no_network: bool,
}

impl NetworkArgs {
    fn setup(self) -> Result<Option<Network>> {
        if self.no_network {
            return Ok(None);
        }
        let transit = parse_transit(&self.transit_cidr)?;
        let config = NetworkConfig {
            cidr: self.network_cidr,
            netns: (!self.bridge_in_host_netns).then_some(self.netns),
            bridge: self.bridge,
            uplink: self.uplink,
            transit,
            dns: self.dns,
        };
        Ok(Some(Network::setup(config).context("setting up the microVM network")?))
    }
}

/// The transit network must be exactly a /30 (two addresses).
fn parse_transit(text: &str) -> Result<Ipv4Net> {
    let (addr, prefix) = text.split_once('/').context("--transit-cidr: expected ADDR/30")?;
    anyhow::ensure!(prefix == "30", "--transit-cidr {text}: must be a /30");
    Ok(Ipv4Net { addr: addr.parse().with_context(|| format!("--transit-cidr {text}"))?, prefix: 30 })
}

/// Biggest message a client may send, in 8-byte words (1 MiB): nothing in
/// the protocol needs more, and a hostile client must not make us allocate.
const TRAVERSAL_LIMIT_WORDS: usize = 128 * 1024;

fn main() -> Result<()> {
    let args = Args::parse();
    init_logging(args.log_format);
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()?.parent().context("mm-broker has no directory")?.to_path_buf(),
    };
    for (what, path) in [("--kernel", &args.kernel), ("--builtin-image", &args.builtin_image)] {
        anyhow::ensure!(path.is_file(), "{what} {}: no such file", path.display());
    }
    let cluster = args.cluster.load(args.reserved_memory_mib)?;
    let warm_cache = match (args.no_warm_starts, args.warm_cache) {
        (true, _) => None,
        (false, Some(dir)) => Some(dir),
        (false, None) => Some(args.state_dir.join("warm")),
    };
    let config = Rc::new(BrokerConfig {
        warm_cache,
        state_dir: args.state_dir,
        bin_dir,
        kernel: args.kernel,
        builtin_image: args.builtin_image,
        reserved_memory_mib: args.reserved_memory_mib,
        no_seccomp: args.no_seccomp,
        no_jail: args.no_jail,
        network: args.network.setup()?,
        console_log_max: args.console_log_max,
    });
    if config.no_jail {
        tracing::warn!("--no-jail: DEBUGGING ONLY, microVM processes run UNJAILED with the broker's privileges");
    }
    if config.no_seccomp {
        tracing::warn!("--no-seccomp: DEBUGGING ONLY, microVM processes run WITHOUT their seccomp filters");
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(config, args.socket, cluster, args.metrics_listen))
}

/// Text (colours only on a terminal) or JSON lines on stderr; `MM_LOG`
/// filters.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("MM_LOG").unwrap_or_else(|_| "mm_broker=info".into());
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}

async fn serve(
    config: Rc<BrokerConfig>,
    socket: PathBuf,
    cluster: Option<Cluster>,
    metrics_listen: Option<std::net::SocketAddr>,
) -> Result<()> {
    let registry = Registry::load(Rc::clone(&config)).context("loading the state directory")?;
    if let Some(addr) = metrics_listen {
        let host = mm_broker::metrics::gather::host_name(cluster.as_ref().map(|c| c.host_name()));
        let bound =
            mm_broker::metrics::start(addr, &registry, host).with_context(|| format!("--metrics-listen {addr}"))?;
        tracing::info!(%bound, "serving metrics at /metrics");
    }
    if let Some(cluster) = cluster {
        tracing::info!(host = cluster.host_name(), "joining the cluster");
        tokio::task::spawn_local(cluster.run(Rc::clone(&registry)));
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Only root may connect: the mode is set before the socket appears.
    let listener = socket_path::bind_listening(&socket, |staging| {
        let listener = std::os::unix::net::UnixListener::bind(staging)?;
        std::fs::set_permissions(staging, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        UnixListener::from_std(listener)
    })
    .with_context(|| format!("listening on {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), state_dir = %config.state_dir.display(), "mm-broker ready");
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    continue;
                }
            },
            _ = terminate.recv() => {
                // MicroVMs keep running; the next broker re-adopts them.
                tracing::info!("SIGTERM: exiting, microVMs keep running");
                let _ = std::fs::remove_file(&socket);
                return Ok(());
            }
        };
        let caller = match stream.peer_cred() {
            Ok(cred) => format!("uid {} pid {}", cred.uid(), cred.pid().unwrap_or(0)),
            Err(_) => "unknown".into(),
        };
        let server = BrokerServer { registry: Rc::clone(&registry), caller: caller.clone() };
        let client: broker::Client = capnp_rpc::new_client(server);
        let (reader, writer) = stream.into_split();
        let network = vat_network(reader, writer, rpc_twoparty_capnp::Side::Server, Some(TRAVERSAL_LIMIT_WORDS));
        let rpc = RpcSystem::new(Box::new(network), Some(client.client));
        tokio::task::spawn_local(async move {
            if let Err(e) = rpc.await {
                tracing::info!(%caller, "client connection ended: {e}");
            }
        });
    }
}

/// `--console-log-max`: a byte count with an optional K, M or G suffix,
/// 4 KiB to 1 GiB.
fn parse_console_log_max(text: &str) -> Result<u64, String> {
    mm_broker::vm::console::parse_size(text)
}
