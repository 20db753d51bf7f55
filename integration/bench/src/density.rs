//! `mm-bench density` (issue 14): how many idle clones of one snapshot a
//! host holds before the broker refuses the next, and how fast they start
//! at that scale, through a real `mm-broker` and `mmctl fork`.
//!
//! A source microVM (`--memory-mib`, asleep; a warm start from the
//! broker's cache unless `--cold`) is snapshotted once and removed; then
//! `mmctl fork --count B` runs again and again until the broker refuses.
//! A refused batch is retried at half its size, down to one clone, so the
//! count is exactly what the broker holds. Only the broker's own capacity
//! refusal ends the climb (mmctl's "no-memory" exit and the broker's
//! message); any other failure, a clone that dies or is killed, fails the
//! benchmark with its cause.
//!
//! Per batch: `mmctl fork` spawned → exit (every clone restored and
//! `running` per the broker, checked with `mmctl ps`), then → every clone
//! has taken its identity (its audit log), the host's MemAvailable and the
//! broker's capacity after it. At the limit, all clones idle: the Pss of
//! every process of every clone and their guest RAM resident, the host's
//! MemTotal − MemAvailable against before the first fork, the load
//! average, and `exec -- true` in the first, middle and last clone.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use mm_integration::broker::TestBroker;
use serde::Serialize;
use serde_json::Value;

use crate::brokered::{self, listed_pids, meminfo_kib, mmctl_json, mmctl_ok, vm_memory};
use crate::devbench::{unix_time, write_and_print};
use crate::machine::{self, Machine};
use crate::procmem::process_tree;

/// The most clones one fork may make (`MAX_FORK`, broker/src/registry.rs).
const MAX_FORK: u32 = 64;
/// The source's workload, and so every clone's: asleep.
const IDLE: [&str; 2] = ["sleep", "1000000"];
/// The broker's refusals that are its capacity: memory (`NoMemory`), and
/// its network out of addresses (`Full`), which it also sends as
/// "no-memory" (mmctl's exit status 5).
const NO_MEMORY: &str = "not enough memory on this host";
const NO_ADDRESS: &str = "no free address left in";
const EXIT_NO_MEMORY: i32 = 5;
/// One `mmctl fork` (the restores of up to 64 clones) or `rm -f`.
const SLOW: Duration = Duration::from_secs(600);

#[derive(Debug, Args)]
pub struct DensityArgs {
    /// Clones asked for per `mmctl fork` (1 to 64, the broker's most per fork).
    #[arg(long, default_value_t = 32)]
    pub batch: u32,
    /// Stop at this many clones even if the broker would take more (smoke runs) [default: no limit].
    #[arg(long)]
    pub max: Option<u32>,
    /// RAM of the source (and so of every clone), MiB.
    #[arg(long, default_value_t = 128)]
    pub memory_mib: u32,
    /// The broker's `--reserved-memory-mib` (its default: 512): host memory it never gives to microVMs.
    /// Raise it to bring the limit down, to try the refusal path at a small scale.
    #[arg(long, default_value_t = 512)]
    pub reserved_memory_mib: u64,
    /// Boot the source cold instead of a warm start from the broker's cache.
    #[arg(long)]
    pub cold: bool,
    /// How long the source may take to answer its first exec.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
    /// How long one batch's clones may take to take their identities.
    #[arg(long, default_value_t = 600)]
    pub settle_timeout_secs: u64,
    /// How long each sampled clone may take to answer `exec -- true` at the limit.
    #[arg(long, default_value_t = 600)]
    pub exec_timeout_secs: u64,
    /// Also print the JSON result on stdout (the table then goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Where to write the JSON result [default: <workspace>/target/bench/density.json].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One `mmctl fork` the broker accepted.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Batch {
    pub clones: u32,
    /// `mmctl fork` spawned → exit: every clone restored and `running`.
    pub running_ms: f64,
    pub clones_per_s: f64,
    /// → every clone has taken its new identity (guest work, its audit log).
    pub settled_ms: f64,
    /// After the batch: clones held, host MemAvailable, the broker's
    /// capacity (MiB a new microVM may still get, as the broker computes
    /// it), the broker's open file descriptors.
    pub held: u32,
    pub mem_available_mib: u64,
    pub capacity_mib: u64,
    pub broker_fds: u64,
}

/// One `mmctl fork` the broker refused.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    pub asked: u32,
    pub held: u32,
    /// `memory` (its memory admission) or `addresses` (its network full).
    pub kind: &'static str,
    pub message: String,
    /// The capacity recomputed right before the request.
    pub capacity_mib: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Exec {
    pub name: String,
    pub ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DensityReport {
    pub benchmark: &'static str,
    pub unix_time: u64,
    pub source: String,
    pub machine: Machine,
    pub parameters: Value,
    /// The source: `run -d` spawned → its first exec answered; warm start or boot.
    pub source_start_ms: f64,
    pub source_warm: bool,
    pub snapshot_memory_kib: u64,
    /// Clones running at the limit.
    pub clones: u32,
    /// `memory`, `addresses` (the broker refused one clone for that) or
    /// `max` (`--max` reached first).
    pub limit: String,
    pub limit_is_memory_admission: bool,
    /// The broker's refusal of a single clone, at the limit.
    pub refusal: Option<String>,
    pub refusals: Vec<Refusal>,
    pub batches: Vec<Batch>,
    /// All clones over the sum of the batches' `running_ms`.
    pub overall_clones_per_s: f64,
    /// The last batch of the full `--batch` size: the rate at that scale.
    pub last_full_batch_clones_per_s: Option<f64>,
    /// At the limit, idle: Pss of every process of every clone (sum, per
    /// clone mean, least, most), guest RAM resident, and how long sampling
    /// all of them took.
    pub pss_total_kib: u64,
    pub pss_per_clone_kib: u64,
    pub pss_min_kib: u64,
    pub pss_max_kib: u64,
    pub guest_ram_per_clone_kib: u64,
    pub sample_secs: f64,
    /// (MemTotal − MemAvailable) at the limit minus before the first fork,
    /// per clone: what Pss misses (kernel memory: page tables, KVM/PVM).
    pub host_used_per_clone_kib: i64,
    pub mem_available_before_mib: u64,
    pub mem_available_at_limit_mib: u64,
    pub mem_available_after_teardown_mib: u64,
    pub capacity_at_limit_mib: u64,
    pub processes_per_clone: f64,
    /// CPU time of every process of every clone over 10 s idle at the
    /// limit, in percent of one CPU (all clones together).
    pub idle_cpu_percent: f64,
    pub threads_total: u64,
    pub broker_fds_at_limit: u64,
    pub broker_max_open_files: String,
    pub loadavg_at_limit: String,
    pub exec_sample: Vec<Exec>,
    /// `mmctl rm -f` of every clone.
    pub teardown_ms: f64,
    pub loadavg_at_end: String,
    pub warnings: Vec<String>,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl DensityReport {
    fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "density benchmark: {}", self.parameters);
        let _ = writeln!(
            out,
            "{}, load {} -> {} at the limit -> {}",
            self.machine, self.machine.loadavg_at_start, self.loadavg_at_limit, self.loadavg_at_end
        );
        let _ = writeln!(
            out,
            "source: {} to its first exec {:.1} s; snapshot guest RAM {:.1} MiB",
            if self.source_warm { "warm start" } else { "cold boot" },
            self.source_start_ms / 1e3,
            mib(self.snapshot_memory_kib)
        );
        let _ = writeln!(
            out,
            "{:>5} {:>6} {:>10} {:>8} {:>9} {:>5} {:>13} {:>12} {:>6}",
            "batch", "clones", "running ms", "clones/s", "settled s", "held", "MemAvailable", "capacity", "fds"
        );
        for (i, b) in self.batches.iter().enumerate() {
            let _ = writeln!(
                out,
                "{:>5} {:>6} {:>10.0} {:>8.1} {:>9.1} {:>5} {:>9} MiB {:>8} MiB {:>6}",
                i + 1,
                b.clones,
                b.running_ms,
                b.clones_per_s,
                b.settled_ms / 1e3,
                b.held,
                b.mem_available_mib,
                b.capacity_mib,
                b.broker_fds
            );
        }
        for r in &self.refusals {
            let _ = writeln!(out, "refused: {} clone(s) with {} held ({}): {}", r.asked, r.held, r.kind, r.message);
        }
        let _ = writeln!(
            out,
            "held: {} clones of {} MiB; limit: {}{}",
            self.clones,
            self.parameters["memory_mib"],
            self.limit,
            if self.limit_is_memory_admission { " (the broker's memory admission)" } else { "" }
        );
        let _ = writeln!(
            out,
            "start rate: overall {:.1} clones/s; last full batch {}",
            self.overall_clones_per_s,
            self.last_full_batch_clones_per_s.map_or("-".into(), |r| format!("{r:.1} clones/s"))
        );
        let _ = writeln!(
            out,
            "per clone at the limit, idle: Pss {:.1} MiB (least {:.1}, most {:.1}), guest RAM resident {:.1} MiB, \
             host used {:.1} MiB; of {} MiB configured (all {} sampled in {:.1} s)",
            mib(self.pss_per_clone_kib),
            mib(self.pss_min_kib),
            mib(self.pss_max_kib),
            mib(self.guest_ram_per_clone_kib),
            self.host_used_per_clone_kib as f64 / 1024.0,
            self.parameters["memory_mib"],
            self.clones,
            self.sample_secs
        );
        let _ = writeln!(
            out,
            "MemAvailable: {} MiB before, {} MiB at the limit (broker capacity {} MiB), {} MiB after teardown",
            self.mem_available_before_mib,
            self.mem_available_at_limit_mib,
            self.capacity_at_limit_mib,
            self.mem_available_after_teardown_mib
        );
        let _ = writeln!(
            out,
            "processes per clone {:.1}, threads in all {}, idle CPU of all clones {:.1} % of a CPU; broker fds {} \
             (Max open files {})",
            self.processes_per_clone,
            self.threads_total,
            self.idle_cpu_percent,
            self.broker_fds_at_limit,
            self.broker_max_open_files
        );
        let execs: Vec<String> = self.exec_sample.iter().map(|e| format!("{} {:.1} s", e.name, e.ms / 1e3)).collect();
        let _ = writeln!(out, "exec -- true at the limit: {}", execs.join(", "));
        let _ = writeln!(out, "teardown (mmctl rm -f of every clone): {:.1} s", self.teardown_ms / 1e3);
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        out
    }
}

pub fn run(args: DensityArgs) -> Result<()> {
    if !(1..=MAX_FORK).contains(&args.batch) || args.max == Some(0) {
        bail!("--batch must be 1 to {MAX_FORK}, and --max at least 1");
    }
    let out = args.out.clone().unwrap_or_else(|| mm_integration::repo_root().join("target/bench/density.json"));
    let reserved = args.reserved_memory_mib.to_string();
    let report = brokered::with_broker("density", &["--reserved-memory-mib", &reserved], &out, |broker| {
        measure(broker, &args, Machine::detect())
    })?;
    write_and_print(&report, &report.table(), &out, args.json)
}

/// One microVM as `mmctl ps -o json` lists it.
struct Listed {
    id: String,
    state: String,
    reason: String,
    memory_mib: u64,
    pids: Vec<u32>,
}

fn ps(broker: &TestBroker) -> Result<Vec<(String, Listed)>> {
    let list = mmctl_json(broker, &["ps", "-o", "json"])?;
    let list = list.as_array().context("mmctl ps -o json is not a list")?;
    list.iter()
        .map(|vm| {
            let text = |key: &str| vm[key].as_str().unwrap_or_default().to_string();
            let listed = Listed {
                id: text("id"),
                state: text("state"),
                reason: text("reason"),
                memory_mib: vm["memory_mib"].as_u64().unwrap_or(0),
                pids: listed_pids(vm)?,
            };
            Ok((text("name"), listed))
        })
        .collect()
}

/// MiB a new microVM may still be given, as the broker computes it
/// (`available_memory_mib`, broker/src/registry.rs): MemAvailable, or
/// MemTotal less the memory of live microVMs if less, minus the reserve.
fn capacity_mib(vms: &[(String, Listed)], reserved_mib: u64) -> Result<u64> {
    let live = ["starting", "running", "stopping"];
    let committed: u64 =
        vms.iter().filter(|(_, vm)| live.contains(&vm.state.as_str())).map(|(_, vm)| vm.memory_mib).sum();
    let available = meminfo_kib("MemAvailable")? / 1024;
    let total = meminfo_kib("MemTotal")? / 1024;
    Ok(available.min(total.saturating_sub(committed)).saturating_sub(reserved_mib))
}

/// The audit lines of microVM `id`, read from the broker's state directory.
fn audit(broker: &TestBroker, id: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(broker.dir.path(&format!("state/vms/{id}/audit.jsonl"))).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Waits until every clone in `names` has taken its identity; one that is
/// not running, or failed to take it, fails the benchmark.
fn settle(broker: &TestBroker, names: &[String], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<&String> = names.iter().collect();
    loop {
        let vms = ps(broker)?;
        let mut still = Vec::new();
        for name in pending {
            let (_, vm) = vms.iter().find(|(n, _)| n == name).with_context(|| format!("clone {name} is gone"))?;
            if vm.state != "running" {
                bail!("clone {name} is {}: {}", vm.state, vm.reason);
            }
            let lines = audit(broker, &vm.id);
            if let Some(failed) = lines.iter().find(|l| l["event"] == "identity-failed") {
                bail!("clone {name} did not take its identity: {failed}");
            }
            if !lines.iter().any(|l| l["event"] == "identity") {
                still.push(name);
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} clone(s) had not taken their identity after {timeout:?}: {still:?}", still.len());
        }
        pending = still;
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `mmctl fork base --count N`: the new clones' names, or the broker's
/// capacity refusal (kind, message); anything else is an error.
fn fork(
    broker: &TestBroker,
    prefix: &str,
    count: u32,
) -> Result<std::result::Result<Vec<String>, (&'static str, String)>> {
    let n = count.to_string();
    let run = broker.mmctl(&["fork", "base", "--count", &n, "--name-prefix", prefix, "-o", "json"], SLOW)?;
    let message = run.stderr.trim().to_string();
    match run.status {
        Some(0) => {
            let list: Value =
                serde_json::from_str(&run.stdout).with_context(|| format!("mmctl fork: {}", run.stdout))?;
            let list = list.as_array().context("mmctl fork -o json is not a list")?;
            Ok(Ok(list.iter().filter_map(|c| c["name"].as_str().map(str::to_string)).collect()))
        }
        Some(EXIT_NO_MEMORY) if message.contains(NO_MEMORY) => Ok(Err(("memory", message))),
        Some(EXIT_NO_MEMORY) if message.contains(NO_ADDRESS) => Ok(Err(("addresses", message))),
        status => {
            bail!("mmctl fork --count {count} failed with {status:?}, not the broker's capacity refusal: {message}")
        }
    }
}

/// The number of entries in `/proc/PID/fd`, and its "Max open files" soft limit.
fn fds_of(pid: Option<u32>) -> (u64, String) {
    let Some(pid) = pid else { return (0, String::new()) };
    let count = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let max = limits.lines().find_map(|l| l.strip_prefix("Max open files")).unwrap_or_default();
    (count, max.split_whitespace().next().unwrap_or_default().to_string())
}

/// utime + stime of `pids` so far, in clock ticks (a vCPU's guest time is in it).
fn cpu_ticks(pids: &[u32]) -> u64 {
    let ticks = |pid: &u32| -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    };
    pids.iter().filter_map(ticks).sum()
}

fn threads_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok()).unwrap_or(0)
}

fn measure(broker: &TestBroker, args: &DensityArgs, machine: Machine) -> Result<DensityReport> {
    let mut warnings = Vec::new();
    let others = machine::other_vmms().len();
    if others > 0 {
        warnings.push(format!("{others} other VMM process(es) ran on this host before the source started"));
    }
    let memory = format!("{}M", args.memory_mib);
    let mut run = vec!["run", "-d", "--name", "source", "--memory", &memory];
    if args.cold {
        run.push("--cold");
    }
    run.push("--");
    run.extend(IDLE);
    let started = Instant::now();
    mmctl_ok(broker, &run)?;
    brokered::exec_ready(broker, "source", Duration::from_secs(args.timeout_secs))?;
    let source_start_ms = started.elapsed().as_secs_f64() * 1e3;
    let source_id = broker.inspect("source")?["id"].as_str().unwrap_or_default().to_string();
    let source_warm = audit(broker, &source_id).iter().any(|l| l["event"] == "create" && l["spec"]["warm"] == true);
    let snapshot = mmctl_json(broker, &["snapshot", "create", "source", "--name", "base", "-o", "json"])?;
    mmctl_ok(broker, &["rm", "-f", "source"])?;

    let used = || -> Result<i64> { Ok(meminfo_kib("MemTotal")? as i64 - meminfo_kib("MemAvailable")? as i64) };
    let used_before = used()?;
    let mem_available_before_mib = meminfo_kib("MemAvailable")? / 1024;
    let mut names: Vec<String> = Vec::new();
    let mut batches = Vec::new();
    let mut refusals = Vec::new();
    let mut size = args.batch;
    let mut limit = "max";
    for round in 1.. {
        let held = names.len() as u32;
        if let Some(max) = args.max {
            if held >= max {
                break;
            }
            size = size.min(max - held);
        }
        let capacity = capacity_mib(&ps(broker)?, args.reserved_memory_mib)?;
        let prefix = format!("d{round}");
        let begun = Instant::now();
        let forked = fork(broker, &prefix, size)?;
        let running_ms = begun.elapsed().as_secs_f64() * 1e3;
        let new = match forked {
            Ok(new) => new,
            Err((kind, message)) => {
                eprintln!("mm-bench: density: {size} refused with {held} held: {message}");
                refusals.push(Refusal { asked: size, held, kind, message, capacity_mib: capacity });
                // A fork checks memory for all its clones first, but a
                // network that runs out stops it part way.
                let partial: Vec<String> =
                    ps(broker)?.into_iter().map(|(n, _)| n).filter(|n| n.starts_with(&format!("{prefix}-"))).collect();
                if !partial.is_empty() {
                    warnings.push(format!("a refused fork of {size} left {} clone(s) running, counted", partial.len()));
                    settle(broker, &partial, Duration::from_secs(args.settle_timeout_secs))?;
                    names.extend(partial);
                }
                if size == 1 {
                    limit = kind;
                    break;
                }
                size /= 2;
                continue;
            }
        };
        if new.len() as u32 != size {
            bail!("mmctl fork --count {size} made {} clones", new.len());
        }
        let vms = ps(broker)?;
        for name in &new {
            match vms.iter().find(|(n, _)| n == name) {
                Some((_, vm)) if vm.state == "running" => {}
                Some((_, vm)) => bail!("clone {name} is {} right after the fork: {}", vm.state, vm.reason),
                None => bail!("clone {name} is not in mmctl ps"),
            }
        }
        settle(broker, &new, Duration::from_secs(args.settle_timeout_secs))?;
        let settled_ms = begun.elapsed().as_secs_f64() * 1e3;
        names.extend(new);
        let batch = Batch {
            clones: size,
            running_ms,
            clones_per_s: f64::from(size) / (running_ms / 1e3),
            settled_ms,
            held: names.len() as u32,
            mem_available_mib: meminfo_kib("MemAvailable")? / 1024,
            capacity_mib: capacity_mib(&ps(broker)?, args.reserved_memory_mib)?,
            broker_fds: fds_of(broker.pid()).0,
        };
        eprintln!(
            "mm-bench: density: +{size} in {running_ms:.0} ms (settled {:.1} s), {} held, MemAvailable {} MiB, \
             capacity {} MiB",
            settled_ms / 1e3,
            batch.held,
            batch.mem_available_mib,
            batch.capacity_mib
        );
        batches.push(batch);
    }

    // At the limit: everything idle for a moment, then sampled.
    std::thread::sleep(Duration::from_secs(2));
    let loadavg_at_limit = machine::loadavg();
    let sampling = Instant::now();
    let vms = ps(broker)?;
    let (mut pss, mut ram, mut all_pids, mut threads_total) = (Vec::new(), 0, Vec::new(), 0);
    for name in &names {
        let (_, vm) = vms.iter().find(|(n, _)| n == name).with_context(|| format!("clone {name} is gone"))?;
        if vm.state != "running" {
            bail!("clone {name} is {} at the limit: {}", vm.state, vm.reason);
        }
        let (r, p) = vm_memory(&vm.pids).with_context(|| format!("sampling clone {name}"))?;
        ram += r;
        pss.push(p);
        let tree: Vec<u32> = vm.pids.iter().flat_map(|pid| process_tree(*pid)).collect();
        threads_total += tree.iter().map(|pid| threads_of(*pid)).sum::<u64>();
        all_pids.extend(tree);
    }
    let sample_secs = sampling.elapsed().as_secs_f64();
    // What the idle clones cost in CPU: all their processes over 10 s.
    let (ticks, window) = (cpu_ticks(&all_pids), Instant::now());
    std::thread::sleep(Duration::from_secs(10));
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let idle_cpu_percent =
        cpu_ticks(&all_pids).saturating_sub(ticks) as f64 / hz / window.elapsed().as_secs_f64() * 100.0;
    let used_at_limit = used()?;
    let mem_available_at_limit_mib = meminfo_kib("MemAvailable")? / 1024;
    let capacity_at_limit_mib = capacity_mib(&vms, args.reserved_memory_mib)?;
    let (broker_fds_at_limit, broker_max_open_files) = fds_of(broker.pid());
    let n = names.len().max(1);
    // Each clone's mm-vmm is two processes (the jail's two halves).
    let others = machine::other_vmms().len().saturating_sub(names.len() * 2);
    if others > 0 {
        warnings.push(format!("about {others} other VMM process(es) ran on this host at the limit"));
    }

    let mut exec_sample = Vec::new();
    let mut sample: Vec<&String> =
        [names.first(), names.get(names.len() / 2), names.last()].into_iter().flatten().collect();
    sample.dedup();
    for name in sample {
        let run = broker.mmctl(&["exec", name, "--", "true"], Duration::from_secs(args.exec_timeout_secs))?;
        if run.status != Some(0) {
            bail!("clone {name} at the limit: exec -- true failed ({:?}): {}", run.status, run.stderr.trim());
        }
        exec_sample.push(Exec { name: name.clone(), ms: run.elapsed.as_secs_f64() * 1e3 });
    }

    let removing = Instant::now();
    for chunk in names.chunks(32) {
        let mut rm = vec!["rm", "-f"];
        rm.extend(chunk.iter().map(String::as_str));
        let run = broker.mmctl(&rm, SLOW)?;
        if run.status != Some(0) {
            bail!("mmctl rm -f failed ({:?}): {}", run.status, run.stderr.trim());
        }
    }
    let teardown_ms = removing.elapsed().as_secs_f64() * 1e3;
    std::thread::sleep(Duration::from_secs(1));

    let running_s: f64 = batches.iter().map(|b| b.running_ms / 1e3).sum();
    let counted: u32 = batches.iter().map(|b| b.clones).sum();
    let refusal = refusals.last().filter(|r| r.asked == 1 && limit != "max").map(|r| r.message.clone());
    Ok(DensityReport {
        benchmark: "density",
        unix_time: unix_time(),
        source: crate::source_revision(),
        machine,
        parameters: serde_json::json!({
            "batch": args.batch, "max": args.max, "memory_mib": args.memory_mib, "cold": args.cold,
            "reserved_memory_mib": args.reserved_memory_mib,
        }),
        source_start_ms,
        source_warm,
        snapshot_memory_kib: snapshot["memory_bytes"].as_u64().unwrap_or(0) / 1024,
        clones: names.len() as u32,
        limit: limit.to_string(),
        limit_is_memory_admission: limit == "memory",
        refusal,
        refusals,
        overall_clones_per_s: if running_s > 0.0 { f64::from(counted) / running_s } else { 0.0 },
        last_full_batch_clones_per_s: batches.iter().rev().find(|b| b.clones == args.batch).map(|b| b.clones_per_s),
        batches,
        pss_total_kib: pss.iter().sum(),
        pss_per_clone_kib: pss.iter().sum::<u64>() / n as u64,
        pss_min_kib: pss.iter().copied().min().unwrap_or(0),
        pss_max_kib: pss.iter().copied().max().unwrap_or(0),
        guest_ram_per_clone_kib: ram / n as u64,
        sample_secs,
        host_used_per_clone_kib: (used_at_limit - used_before) / n as i64,
        mem_available_before_mib,
        mem_available_at_limit_mib,
        mem_available_after_teardown_mib: meminfo_kib("MemAvailable")? / 1024,
        capacity_at_limit_mib,
        processes_per_clone: all_pids.len() as f64 / n as f64,
        idle_cpu_percent,
        threads_total,
        broker_fds_at_limit,
        broker_max_open_files,
        loadavg_at_limit,
        exec_sample,
        teardown_ms,
        loadavg_at_end: machine::loadavg(),
        warnings,
    })
}
