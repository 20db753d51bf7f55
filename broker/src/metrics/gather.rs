//! One scrape's [`Snapshot`]: every microVM of the registry, and for each
//! live one, each of its processes asked at once, all under one deadline.
//!
//! Devices answer over their own control channels (protocols/device.capnp,
//! a connection per question, on a blocking thread with the deadline as its
//! read timeout). mm-vmm's control channel is the one supervision holds and
//! asks in place with a 30 s read timeout; asking it from a scrape would
//! stall the broker's loop behind a stuck mm-vmm, so mm-vmm's CPU time and
//! memory are read from the host kernel's accounting of that same process
//! (`/proc/PID/stat`, `smaps_rollup`), which is what its getrusage would
//! answer. Whatever has not answered at the deadline is reported as down
//! (`mm_vm_process_up 0`) and the scrape returns.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use mm_protocols::device_control::DeviceClient;

use super::{BlockCounters, BrokerSample, NetCounters, ProcessIo, ProcessSample, Snapshot, VmLabels, VmSample};
use crate::launch::device_control_socket;
use crate::network::Network;
use crate::record::ProcessRecord;
use crate::registry::Registry;

/// How long one scrape may wait for the processes, all of them together.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks every microVM in `registry`; `host` labels every series.
pub async fn gather(registry: &Rc<Registry>, host: &str, timeout: Duration) -> Snapshot {
    let began = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let config = &registry.config;
    let taps = config.network.as_ref().map(|network| {
        let namespace = network.namespace().clone();
        tokio::task::spawn_blocking(move || namespace.run(|| std::fs::read_to_string("/proc/thread-self/net/dev")))
    });
    let mut vms = Vec::new();
    let mut asked = Vec::new();
    let mut committed_mib = 0u64;
    for vm in registry.list() {
        let record = vm.record();
        let live = vm.state().is_live();
        if live {
            committed_mib += u64::from(record.memory_mib);
        }
        let labels = VmLabels {
            machine_id: record.id.clone(),
            name: record.name.clone(),
            namespace: String::new(),
            host: host.to_owned(),
        };
        let tap = (live && config.network.is_some()).then(|| Network::tap_name(&record.id));
        vms.push((
            VmSample {
                labels,
                state: vm.state().name().to_owned(),
                vcpus: u32::from(record.cpus),
                memory_bytes: u64::from(record.memory_mib) << 20,
                processes: Vec::new(),
                net: None,
            },
            tap,
        ));
        if !live {
            continue;
        }
        for process in &record.processes {
            let index = vms.len() - 1;
            let control = (process.role != "vmm").then(|| device_control_socket(&vm.dir, &process.role));
            let process = process.clone();
            let recorded =
                ProcessSample { role: process.role.clone(), restarts: process.restarts, ..Default::default() };
            let task = tokio::task::spawn_blocking(move || ask(&process, control.as_deref(), timeout));
            asked.push((index, recorded, task));
        }
    }
    let mut unanswered = 0;
    let mut answers: Vec<(usize, ProcessSample)> = Vec::new();
    for (index, recorded, task) in asked {
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(sample)) => {
                unanswered += u64::from(!sample.up);
                answers.push((index, sample));
            }
            // Not answered by the deadline: the blocking thread ends on its
            // own read timeout; the process is reported down.
            _ => {
                unanswered += 1;
                answers.push((index, recorded));
            }
        }
    }
    let mut by_vm: HashMap<usize, Vec<ProcessSample>> = HashMap::new();
    for (index, sample) in answers {
        by_vm.entry(index).or_default().push(sample);
    }
    let net = match taps {
        Some(task) => match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(Ok(text))) => parse_net_dev(&text),
            _ => HashMap::new(),
        },
        None => HashMap::new(),
    };
    let mut out = Vec::new();
    for (index, (mut sample, tap)) in vms.into_iter().enumerate() {
        sample.processes = by_vm.remove(&index).unwrap_or_default();
        sample.net = tap.and_then(|tap| net.get(&tap).copied());
        out.push(sample);
    }
    let reserved_mib = config.reserved_memory_mib;
    let available_mib = crate::registry::memory_headroom_mib(committed_mib, reserved_mib);
    Snapshot {
        broker: BrokerSample {
            host: host.to_owned(),
            memory_committed_bytes: committed_mib << 20,
            memory_available_bytes: available_mib << 20,
            memory_reserved_bytes: reserved_mib << 20,
            unanswered,
            scrape_seconds: began.elapsed().as_secs_f64(),
        },
        vms: out,
    }
}

/// One process, on a blocking thread: /proc for everyone, the control
/// channel for devices (`control`).
fn ask(process: &ProcessRecord, control: Option<&Path>, timeout: Duration) -> ProcessSample {
    let mut sample = ProcessSample { role: process.role.clone(), restarts: process.restarts, ..Default::default() };
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", process.pid)).ok();
    let stat = stat.as_deref().and_then(parse_stat);
    // A pid that is not ours any more (re-used after an exit) says nothing.
    let ours = stat.is_some_and(|s| s.start_time == process.start_time);
    // The recorded pid is the jailer's outer half; the jailed process that
    // does the work (vCPU threads, a device's I/O) is its descendant, so
    // the figures are summed over the tree.
    let tree = if ours { descendants(process.pid) } else { Vec::new() };
    let mut cpu_ticks = (0u64, 0u64);
    let (mut rss, mut pss, mut io) = (None::<u64>, None::<u64>, None::<ProcessIo>);
    for pid in &tree {
        let dir = PathBuf::from(format!("/proc/{pid}"));
        if let Some(s) = std::fs::read_to_string(dir.join("stat")).ok().as_deref().and_then(parse_stat) {
            cpu_ticks = (cpu_ticks.0 + s.utime, cpu_ticks.1 + s.stime);
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("smaps_rollup")) {
            let (r, p) = parse_rollup(&text);
            rss = Some(rss.unwrap_or(0) + r.unwrap_or(0));
            pss = Some(pss.unwrap_or(0) + p.unwrap_or(0));
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("io")) {
            let add = parse_io(&text);
            let sum = io.get_or_insert_with(ProcessIo::default);
            sum.rchar += add.rchar;
            sum.wchar += add.wchar;
            sum.syscr += add.syscr;
            sum.syscw += add.syscw;
            sum.read_bytes += add.read_bytes;
            sum.write_bytes += add.write_bytes;
        }
    }
    sample.rss_bytes = rss;
    sample.pss_bytes = pss;
    sample.io = io;
    match control {
        None => {
            if ours {
                let ticks = clock_ticks();
                sample.cpu_user_seconds = cpu_ticks.0 as f64 / ticks;
                sample.cpu_system_seconds = cpu_ticks.1 as f64 / ticks;
                sample.up = true;
            }
        }
        Some(path) => {
            if let Ok(status) = DeviceClient::connect(path, timeout).and_then(|client| client.status()) {
                sample.up = true;
                sample.cpu_user_seconds = status.usage.user_cpu_ms as f64 / 1000.0;
                sample.cpu_system_seconds = status.usage.system_cpu_ms as f64 / 1000.0;
                sample.max_rss_bytes = Some(status.usage.max_rss_kib * 1024);
                if status.kind == "block" {
                    sample.block = Some(BlockCounters {
                        resubmitted: status.counters.resubmitted,
                        in_flight: status.counters.in_flight,
                    });
                }
            }
        }
    }
    sample
}

/// `pid` and every process below it (`/proc/PID/task/TID/children`),
/// bounded so a fork bomb cannot make a scrape walk forever.
fn descendants(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut next = 0;
    while next < out.len() && out.len() < 64 {
        let parent = out[next];
        next += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else { continue };
        for task in tasks.flatten() {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            out.extend(children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
        }
    }
    out
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// The fields of `/proc/PID/stat` used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub utime: u64,
    pub stime: u64,
    pub start_time: u64,
}

/// Fields after the command (which may hold spaces and parentheses): the
/// state is field 3, utime 14, stime 15, starttime 22.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat { utime: field(14)?, stime: field(15)?, start_time: field(22)? })
}

/// (Rss, Pss) in bytes from `smaps_rollup`.
pub fn parse_rollup(text: &str) -> (Option<u64>, Option<u64>) {
    let kib = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|k| k * 1024)
    };
    (kib("Rss"), kib("Pss"))
}

pub fn parse_io(text: &str) -> ProcessIo {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    ProcessIo {
        rchar: field("rchar"),
        wchar: field("wchar"),
        syscr: field("syscr"),
        syscw: field("syscw"),
        read_bytes: field("read_bytes"),
        write_bytes: field("write_bytes"),
    }
}

/// `/proc/net/dev` by interface, turned to the guest's side (a TAP's
/// receive is what its guest sent).
pub fn parse_net_dev(text: &str) -> HashMap<String, NetCounters> {
    let mut out = HashMap::new();
    for line in text.lines().skip(2) {
        let Some((name, numbers)) = line.split_once(':') else { continue };
        let n: Vec<u64> = numbers.split_whitespace().filter_map(|v| v.parse().ok()).collect();
        if n.len() < 16 {
            continue;
        }
        let counters = NetCounters {
            tx_bytes: n[0],
            tx_packets: n[1],
            tx_dropped: n[3],
            rx_bytes: n[8],
            rx_packets: n[9],
            rx_dropped: n[11],
        };
        out.insert(name.trim().to_owned(), counters);
    }
    out
}

/// The name series carry as `host`: the cluster's name for this host if
/// given, else the kernel's host name.
pub fn host_name(cluster_name: Option<&str>) -> String {
    match cluster_name {
        Some(name) => name.to_owned(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_default(),
    }
}
