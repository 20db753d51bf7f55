//! `mm-broker --metrics-listen ADDR`: Prometheus/OpenMetrics text at
//! `GET /metrics` (README, "Metrics and logs").
//!
//! Per-microVM numbers are not kept here: each scrape asks the live
//! microVMs' processes afresh ([`gather`]) under one deadline, puts the
//! answers in a [`Snapshot`] and encodes it through [`VmCollector`]. A
//! microVM that is gone is simply not in the next snapshot, so its series
//! disappear with it and nothing has to be unregistered. What the broker
//! observes over time (spawn, boot and restore latencies, from the event
//! feed: [`latency`]) lives in histograms registered once.

pub mod gather;
pub mod latency;
pub mod server;

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Every state a microVM can be in, so `mm_broker_vms` has a series (0 or
/// more) for each and a dashboard's stacked panel keeps its colours.
pub const STATES: [&str; 8] = ["created", "starting", "running", "stopping", "stopped", "failed", "lost", "suspended"];

/// The labels that name one microVM: a bounded set (one per microVM on
/// this host), never free text from a guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct VmLabels {
    pub machine_id: String,
    pub name: String,
    /// The controller's namespace when the broker knows it; "" otherwise.
    pub namespace: String,
    pub host: String,
}

/// Figures of one microVM at scrape time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmSample {
    pub labels: VmLabels,
    pub state: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// Empty unless the microVM is live (starting, running, stopping).
    pub processes: Vec<ProcessSample>,
    /// Guest's view of its network interface (from its TAP); None without one.
    pub net: Option<NetCounters>,
}

/// One process of a microVM (`vmm`, `block-root`, `block-rw`, `vsock`, `net`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessSample {
    pub role: String,
    pub restarts: u32,
    /// It answered within the scrape's deadline (a device over its control
    /// channel; mm-vmm: its /proc entry is still ours).
    pub up: bool,
    pub cpu_user_seconds: f64,
    pub cpu_system_seconds: f64,
    /// Peak RSS as the process reports it (getrusage); devices only.
    pub max_rss_bytes: Option<u64>,
    /// Host RSS and PSS now (`/proc/PID/smaps_rollup`).
    pub rss_bytes: Option<u64>,
    pub pss_bytes: Option<u64>,
    /// The host kernel's I/O accounting of the process (`/proc/PID/io`).
    pub io: Option<ProcessIo>,
    /// Block devices: what the device process counts itself.
    pub block: Option<BlockCounters>,
}

/// `/proc/PID/io`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessIo {
    /// Bytes through read-like syscalls (page-cache hits included).
    pub rchar: u64,
    pub wchar: u64,
    pub syscr: u64,
    pub syscw: u64,
    /// Bytes the process made the storage layer fetch / send.
    pub read_bytes: u64,
    pub write_bytes: u64,
}

/// What `mm-device block` reports over its control channel today.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockCounters {
    pub resubmitted: u64,
    pub in_flight: u64,
}

/// The guest's interface, from the guest's side: its transmit is the TAP's
/// receive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

/// Broker-wide figures at scrape time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BrokerSample {
    pub host: String,
    pub memory_committed_bytes: u64,
    pub memory_available_bytes: u64,
    pub memory_reserved_bytes: u64,
    /// Processes that did not answer before the scrape's deadline.
    pub unanswered: u64,
    pub scrape_seconds: f64,
}

/// One scrape's worth of figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub broker: BrokerSample,
    pub vms: Vec<VmSample>,
}

/// Encodes the latest [`Snapshot`]; the server replaces it before each
/// encode, so what a scrape returns is what that scrape gathered.
#[derive(Debug, Default, Clone)]
pub struct VmCollector {
    pub latest: Arc<Mutex<Snapshot>>,
}

type Labels = Vec<(&'static str, String)>;

fn vm_labels(vm: &VmLabels) -> Labels {
    vec![
        ("machine_id", vm.machine_id.clone()),
        ("name", vm.name.clone()),
        ("namespace", vm.namespace.clone()),
        ("host", vm.host.clone()),
    ]
}

fn with(mut labels: Labels, key: &'static str, value: &str) -> Labels {
    labels.push((key, value.to_owned()));
    labels
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Reads one counter out of a sample struct.
type Field<T> = fn(&T) -> u64;

/// A family of gauges built for one encode.
struct Fresh {
    name: &'static str,
    help: &'static str,
    family: Family<Labels, FloatGauge>,
}

impl Fresh {
    fn new(name: &'static str, help: &'static str) -> Self {
        Fresh { name, help, family: Family::default() }
    }

    fn set(&self, labels: Labels, value: f64) {
        self.family.get_or_create(&labels).set(value);
    }

    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let metric = encoder.encode_descriptor(self.name, self.help, None, self.family.metric_type())?;
        self.family.encode(metric)
    }
}

/// Counters come from the processes as absolute values: each is encoded
/// as a constant counter, one descriptor per name, one line per labels.
struct Counters {
    name: &'static str,
    help: &'static str,
    series: Vec<(Labels, f64)>,
}

impl Counters {
    fn new(name: &'static str, help: &'static str) -> Self {
        Counters { name, help, series: Vec::new() }
    }

    fn add(&mut self, labels: Labels, value: f64) {
        self.series.push((labels, value));
    }

    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.series.is_empty() {
            return Ok(());
        }
        let mut metric =
            encoder.encode_descriptor(self.name, self.help, None, prometheus_client::metrics::MetricType::Counter)?;
        for (labels, value) in &self.series {
            let family = metric.encode_family(labels)?;
            ConstCounter::new(*value).encode(family)?;
        }
        Ok(())
    }
}

impl Collector for VmCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.latest.lock().map(|s| s.clone()).unwrap_or_default();
        encode_snapshot(&snapshot, &mut encoder)
    }
}

fn encode_snapshot(snapshot: &Snapshot, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let broker = &snapshot.broker;
    let host = vec![("host", broker.host.clone())];
    let vms_by_state = Fresh::new("mm_broker_vms", "MicroVMs on this broker by state.");
    for state in STATES {
        let count = snapshot.vms.iter().filter(|vm| vm.state == state).count();
        vms_by_state.set(with(host.clone(), "state", state), count as f64);
    }
    vms_by_state.encode(encoder)?;
    for (name, help, value) in [
        (
            "mm_broker_memory_committed_bytes",
            "Guest memory promised to live microVMs.",
            broker.memory_committed_bytes as f64,
        ),
        (
            "mm_broker_memory_available_bytes",
            "Memory a new microVM may still be given (as create checks it).",
            broker.memory_available_bytes as f64,
        ),
        (
            "mm_broker_memory_reserved_bytes",
            "Host memory never given to microVMs.",
            broker.memory_reserved_bytes as f64,
        ),
        (
            "mm_broker_scrape_unanswered",
            "Processes that did not answer before this scrape's deadline.",
            broker.unanswered as f64,
        ),
        ("mm_broker_scrape_duration_seconds", "How long this scrape took to gather.", broker.scrape_seconds),
    ] {
        let gauge = Fresh::new(name, help);
        gauge.set(host.clone(), value);
        gauge.encode(encoder)?;
    }

    let state = Fresh::new("mm_vm_state", "1 for the microVM's current state.");
    let vcpus = Fresh::new("mm_vm_vcpus", "vCPUs of the microVM.");
    let memory = Fresh::new("mm_vm_memory_bytes", "Guest memory of the microVM (configured).");
    let up = Fresh::new("mm_vm_process_up", "1 if the process answered within the scrape's deadline.");
    let rss = Fresh::new("mm_vm_process_resident_bytes", "Host RSS of the process now.");
    let pss = Fresh::new("mm_vm_process_pss_bytes", "Host PSS of the process now.");
    let max_rss = Fresh::new("mm_vm_process_max_resident_bytes", "Peak RSS the process reports (getrusage).");
    let in_flight = Fresh::new("mm_vm_block_in_flight", "Block requests taken and not completed, now.");
    let mut cpu = Counters::new(
        "mm_vm_cpu_seconds",
        "CPU time of a microVM process by mode; role=vmm is the vCPU threads' (and mm-vmm's own).",
    );
    let mut restarts = Counters::new("mm_vm_process_restarts", "Times the broker restarted the process.");
    let mut io: [(Counters, Field<ProcessIo>); 6] = [
        (Counters::new("mm_vm_process_io_read_bytes", "Bytes through read syscalls (/proc/PID/io rchar)."), |i| {
            i.rchar
        }),
        (Counters::new("mm_vm_process_io_write_bytes", "Bytes through write syscalls (wchar)."), |i| i.wchar),
        (Counters::new("mm_vm_process_io_reads", "Read syscalls (syscr)."), |i| i.syscr),
        (Counters::new("mm_vm_process_io_writes", "Write syscalls (syscw)."), |i| i.syscw),
        (Counters::new("mm_vm_process_io_storage_read_bytes", "Bytes fetched from storage (read_bytes)."), |i| {
            i.read_bytes
        }),
        (Counters::new("mm_vm_process_io_storage_write_bytes", "Bytes sent to storage (write_bytes)."), |i| {
            i.write_bytes
        }),
    ];
    let mut resubmitted = Counters::new(
        "mm_vm_block_resubmitted",
        "Block requests a killed predecessor left that this device ran again.",
    );
    let mut net: [(Counters, Field<NetCounters>); 6] = [
        (Counters::new("mm_vm_net_receive_bytes", "Bytes the guest received."), |n| n.rx_bytes),
        (Counters::new("mm_vm_net_receive_packets", "Packets the guest received."), |n| n.rx_packets),
        (Counters::new("mm_vm_net_receive_dropped", "Packets for the guest dropped on the host."), |n| n.rx_dropped),
        (Counters::new("mm_vm_net_transmit_bytes", "Bytes the guest sent."), |n| n.tx_bytes),
        (Counters::new("mm_vm_net_transmit_packets", "Packets the guest sent."), |n| n.tx_packets),
        (Counters::new("mm_vm_net_transmit_dropped", "Packets from the guest dropped on the host."), |n| n.tx_dropped),
    ];
    for vm in &snapshot.vms {
        let labels = vm_labels(&vm.labels);
        state.set(with(labels.clone(), "state", &vm.state), 1.0);
        vcpus.set(labels.clone(), f64::from(vm.vcpus));
        memory.set(labels.clone(), vm.memory_bytes as f64);
        for p in &vm.processes {
            let labels = with(labels.clone(), "role", &p.role);
            up.set(labels.clone(), if p.up { 1.0 } else { 0.0 });
            restarts.add(labels.clone(), f64::from(p.restarts));
            if p.up {
                cpu.add(with(labels.clone(), "mode", "user"), p.cpu_user_seconds);
                cpu.add(with(labels.clone(), "mode", "system"), p.cpu_system_seconds);
            }
            let gauges = [(&rss, p.rss_bytes), (&pss, p.pss_bytes), (&max_rss, p.max_rss_bytes)];
            for (gauge, value) in gauges {
                if let Some(value) = value {
                    gauge.set(labels.clone(), value as f64);
                }
            }
            if let Some(figures) = &p.io {
                for (counters, field) in &mut io {
                    counters.add(labels.clone(), field(figures) as f64);
                }
            }
            if let Some(block) = p.block {
                resubmitted.add(labels.clone(), block.resubmitted as f64);
                in_flight.set(labels.clone(), block.in_flight as f64);
            }
        }
        if let Some(figures) = &vm.net {
            for (counters, field) in &mut net {
                counters.add(labels.clone(), field(figures) as f64);
            }
        }
    }
    for gauge in [&state, &vcpus, &memory, &up, &rss, &pss, &max_rss, &in_flight] {
        gauge.encode(encoder)?;
    }
    for counters in [&cpu, &restarts, &resubmitted] {
        counters.encode(encoder)?;
    }
    for (counters, _) in &io {
        counters.encode(encoder)?;
    }
    for (counters, _) in &net {
        counters.encode(encoder)?;
    }
    Ok(())
}

/// The broker's metrics: the histograms it keeps and the per-scrape
/// collector, in one registry.
#[derive(Debug)]
pub struct BrokerMetrics {
    registry: Registry,
    pub collector: VmCollector,
    pub latency: latency::Latencies,
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let latency = latency::Latencies::default();
        latency.register(&mut registry);
        let collector = VmCollector::default();
        registry.register_collector(Box::new(collector.clone()));
        BrokerMetrics { registry, collector, latency }
    }
}

impl BrokerMetrics {
    /// The OpenMetrics text of `snapshot` and the histograms.
    pub fn render(&self, snapshot: Snapshot) -> String {
        if let Ok(mut latest) = self.collector.latest.lock() {
            *latest = snapshot;
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            // Only a writer can fail, and a String does not.
            let _ = writeln!(text, "# encoding failed: {e}");
        }
        text
    }
}

/// Binds `addr` and serves `/metrics` there, with the latency follower,
/// as tasks on the current LocalSet; returns the bound address (a port of
/// 0 picks one, which the broker logs).
pub fn start(
    addr: std::net::SocketAddr,
    registry: &std::rc::Rc<crate::registry::Registry>,
    host: String,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let metrics = std::rc::Rc::new(BrokerMetrics::default());
    tokio::task::spawn_local(latency::follow(std::rc::Rc::clone(registry), metrics.latency.clone(), host.clone()));
    tokio::task::spawn_local(server::serve(listener, std::rc::Rc::clone(registry), metrics, host));
    Ok(bound)
}

#[cfg(test)]
mod tests;
