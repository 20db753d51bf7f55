//! `mm-bench exec`: what a user of `mmctl` waits for. A real `mm-broker`
//! (`mm_integration::broker::TestBroker`, in a scratch state directory with
//! its own socket) runs one detached microVM on the built-in image; then:
//!
//! * readiness: `mmctl run -d` spawned → the first `mmctl exec bench -- true`
//!   that succeeds (polled), i.e. how long until a new microVM takes commands;
//! * `exec_true`: M sequential `mmctl exec bench -- true`, each the wall time
//!   of the whole `mmctl` process (spawn → exit: connecting to the broker,
//!   the broker reaching the guest's exec agent over the hybrid vsock, the
//!   guest forking `true`, the exit status back) → median and p99;
//! * `run_rm_true`: N `mmctl run --rm -- true`, spawn → exit, after the exec
//!   microVM is removed so that it does not compete → median and max. On PVM
//!   hosts this is nearly all guest boot.
//!
//! Nothing is compared with QEMU: there is no QEMU counterpart of the
//! broker and the exec agent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use mm_integration::broker::TestBroker;
use serde::Serialize;

use crate::brokered;
use crate::devbench::{unix_time, write_and_print};
use crate::machine::{self, Machine};
use crate::report::{quantile, stats};

/// The detached microVM's name.
const VM: &str = "bench";
/// Its workload: idle, so the guest spends no CPU between execs.
const IDLE: &str = "while true; do sleep 5; done";
/// The pause between readiness attempts. While the guest boots a failing
/// attempt itself takes seconds (`ready_attempt_ms`), so the readiness
/// figure is only as fine as those.
const POLL: Duration = Duration::from_millis(250);
/// One `mmctl` call that is not a boot (exec, ps, inspect, rm -f).
const QUICK: Duration = Duration::from_secs(120);

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Measured `mmctl exec bench -- true` calls, one after another.
    #[arg(long, default_value_t = 50)]
    pub execs: usize,
    /// Measured `mmctl run --rm -- true` calls (each boots a microVM).
    #[arg(long, default_value_t = 2)]
    pub runs: usize,
    /// Also print the JSON result on stdout (the table then goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Where to write the JSON result [default: <workspace>/target/bench/exec.json].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Fail if the detached microVM does not answer an exec after this long,
    /// or a `run --rm` has not ended.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
}

/// One latency figure over its samples.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
    pub samples: usize,
    pub median: f64,
    /// Nearest rank: with fewer than 100 samples this is the maximum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99: Option<f64>,
    pub max: f64,
    pub what: &'static str,
}

impl Metric {
    fn new(name: &'static str, unit: &'static str, values: &[f64], p99: bool, what: &'static str) -> Option<Metric> {
        let s = stats(values)?;
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Metric {
            name,
            unit,
            samples: values.len(),
            median: s.median,
            p99: p99.then(|| quantile(&sorted, 0.99)),
            max: s.max,
            what,
        })
    }
}

/// Every figure the metrics come from, in ms, in the order measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Raw {
    /// `mmctl run -d --name bench …`: spawn → exit (it returns once started).
    pub run_detached_ms: f64,
    /// `mmctl run -d` spawned → the end of the first `exec … true` that succeeded.
    pub ready_ms: f64,
    /// Exec attempts until then (POLL apart).
    pub ready_attempts: usize,
    /// Each attempt's wall time, the successful one last.
    pub ready_attempt_ms: Vec<f64>,
    /// The wall time of that first successful exec alone.
    pub first_exec_ms: f64,
    pub exec_ms: Vec<f64>,
    /// `mmctl ps -o json` after the execs: an mmctl call that stays on the
    /// host (spawn, connect, one request), the floor under `exec_ms`.
    pub ps_ms: Vec<f64>,
    /// `mmctl rm -f bench` (a graceful stop is not asked for: SIGKILL).
    pub rm_force_ms: f64,
    pub run_rm_ms: Vec<f64>,
}

/// The microVM as the broker reported it.
#[derive(Debug, Clone, Serialize)]
pub struct Guest {
    pub kernel: String,
    pub rootfs: String,
    pub cpus: serde_json::Value,
    pub memory_mib: serde_json::Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExecReport {
    pub benchmark: &'static str,
    pub unix_time: u64,
    pub source: String,
    pub machine: Machine,
    pub mmctl: String,
    pub mm_broker: String,
    pub guest: Option<Guest>,
    pub parameters: serde_json::Value,
    pub metrics: Vec<Metric>,
    pub raw: Raw,
    /// Other mm-vmm/QEMU processes (not this benchmark's) when it started
    /// and before each `run --rm`.
    pub other_vms_at_start: usize,
    pub other_vms_before_runs: Vec<usize>,
    pub loadavg_at_end: String,
    pub notes: Vec<String>,
    pub warnings: Vec<String>,
}

impl ExecReport {
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(out, "exec benchmark: {}, {}; {}", self.mmctl, self.mm_broker, self.parameters);
        if let Some(g) = &self.guest {
            let _ = writeln!(out, "guest: built-in image, {} vCPU, {} MiB", g.cpus, g.memory_mib);
        }
        let _ = writeln!(out, "{m}, load {} -> {}", m.loadavg_at_start, self.loadavg_at_end);
        let _ = writeln!(
            out,
            "{:<14} {:>4} {:>7} {:>10} {:>10} {:>10}",
            "metric", "unit", "samples", "median", "p99", "max"
        );
        for r in &self.metrics {
            let p99 = r.p99.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "{:<14} {:>4} {:>7} {:>10.1} {p99:>10} {:>10.1}",
                r.name, r.unit, r.samples, r.median, r.max
            );
        }
        let _ = writeln!(
            out,
            "readiness: run -d returned after {:.0} ms; first exec succeeded {:.1} s after run -d (attempt {}), \
             that exec took {:.1} ms",
            self.raw.run_detached_ms,
            self.raw.ready_ms / 1e3,
            self.raw.ready_attempts,
            self.raw.first_exec_ms
        );
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        out
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// `mmctl ARGS` that must succeed; its wall time (spawn → exit) and stdout.
fn mmctl_ok(broker: &TestBroker, args: &[&str], timeout: Duration) -> Result<(Duration, String)> {
    let run = broker.mmctl(args, timeout).with_context(|| format!("mmctl {}", args.join(" ")))?;
    if run.status != Some(0) {
        bail!("mmctl {} exited with {:?}: {}", args.join(" "), run.status, run.stderr.trim());
    }
    Ok((run.elapsed, run.stdout))
}

/// Polls `mmctl exec bench -- true` until it succeeds; returns each
/// attempt's wall time, the successful one last. Fails at once if the
/// microVM is no longer running (its console then says why).
fn wait_until_ready(broker: &TestBroker, deadline: Instant) -> Result<Vec<f64>> {
    let mut attempts = Vec::new();
    loop {
        let run = broker.mmctl(&["exec", VM, "--", "true"], QUICK)?;
        attempts.push(ms(run.elapsed));
        if run.status == Some(0) {
            return Ok(attempts);
        }
        let state = broker.inspect(VM)?["state"].as_str().unwrap_or_default().to_string();
        if state != "running" {
            let console = broker.mmctl(&["logs", VM], QUICK).map(|r| r.stdout).unwrap_or_default();
            bail!("{VM} is {state}, not running, before its exec agent answered; console:\n{console}");
        }
        if Instant::now() > deadline {
            let n = attempts.len();
            bail!("{VM}: exec still fails after {n} attempts: {:?} {}", run.status, run.stderr.trim());
        }
        std::thread::sleep(POLL);
    }
}

pub fn run(args: ExecArgs) -> Result<()> {
    if args.execs == 0 || args.runs == 0 {
        bail!("--execs and --runs must be at least 1");
    }
    let out = args.out.clone().unwrap_or_else(|| mm_integration::repo_root().join("target/bench/exec.json"));
    let log_dir = out.parent().unwrap_or(Path::new(".")).join("exec-logs");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let signals = brokered::block_signals()?;
    let machine = Machine::detect();
    let other_vms_at_start = machine::other_vmms().len();
    let mmctl = crate::version_of(&mm_integration::workspace_binary("mmctl")?);
    let mm_broker = crate::version_of(&mm_integration::workspace_binary("mm-broker")?);

    let broker = Arc::new(brokered::start_broker("bench-exec", &[])?);
    brokered::cleanup_on_signal("exec", signals, Arc::downgrade(&broker));
    eprintln!("mm-bench: exec: broker in {} ({other_vms_at_start} other VM(s) running)", broker.dir.0.display());
    let mut report = ExecReport {
        benchmark: "exec",
        unix_time: 0,
        source: String::new(),
        machine,
        mmctl,
        mm_broker,
        guest: None,
        parameters: serde_json::json!({
            "execs": args.execs,
            "runs": args.runs,
            "ready_poll_ms": POLL.as_millis() as u64,
            "workload": ["sh", "-c", IDLE],
        }),
        metrics: Vec::new(),
        raw: Raw::default(),
        other_vms_at_start,
        other_vms_before_runs: Vec::new(),
        loadavg_at_end: String::new(),
        notes: Vec::new(),
        warnings: Vec::new(),
    };
    let measured = measure(&broker, &args, &mut report);
    // The broker's log is in its scratch directory, which goes with it.
    let _ = std::fs::write(log_dir.join("broker.log"), broker.log());
    // Last reference (unless a signal's cleanup holds one): its Drop removes
    // every microVM left and ends the broker, on success and on error alike.
    drop(broker);
    let _guard = brokered::CLEANUP.lock();
    measured.with_context(|| format!("broker log: {}", log_dir.join("broker.log").display()))?;

    report.loadavg_at_end = machine::loadavg();
    report.source = crate::source_revision();
    report.unix_time = unix_time();
    report.notes = vec![
        "each figure is the wall time of one whole mmctl process (spawn -> exit), as a user sees it".into(),
        format!(
            "readiness: exec attempts {} ms apart; while the guest boots a failing attempt itself takes seconds \
             (ready_attempt_ms), so ready_ms is only that fine",
            POLL.as_millis()
        ),
        "run_rm_true boots a fresh microVM each time: on PVM hosts nearly all of it is the guest kernel's boot".into(),
    ];
    if other_vms_at_start > 0 || report.other_vms_before_runs.iter().any(|&n| n > 0) {
        report.warnings.push("other VMs were running on this host during the benchmark".into());
    }
    write_and_print(&report, &report.table(), &out, args.json)
}

fn measure(broker: &TestBroker, args: &ExecArgs, report: &mut ExecReport) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    eprintln!("mm-bench: exec: mmctl run -d --name {VM}; waiting for its exec agent");
    let start = Instant::now();
    let (run_d, _) = mmctl_ok(broker, &["run", "-d", "--name", VM, "--", "sh", "-c", IDLE], QUICK)?;
    report.raw.run_detached_ms = ms(run_d);
    let attempts = wait_until_ready(broker, deadline)?;
    report.raw.ready_ms = ms(start.elapsed());
    report.raw.ready_attempts = attempts.len();
    report.raw.first_exec_ms = attempts.last().copied().unwrap_or_default();
    report.raw.ready_attempt_ms = attempts;
    eprintln!("mm-bench: exec: ready after {:.1} s; {} execs", report.raw.ready_ms / 1e3, args.execs);
    let info = broker.inspect(VM)?;
    report.guest = Some(Guest {
        kernel: mm_integration::guest_kernel()?.display().to_string(),
        rootfs: mm_integration::guest_rootfs()?.display().to_string(),
        cpus: info["cpus"].clone(),
        memory_mib: info["memory_mib"].clone(),
    });

    for _ in 0..args.execs {
        let (elapsed, _) = mmctl_ok(broker, &["exec", VM, "--", "true"], QUICK)?;
        report.raw.exec_ms.push(ms(elapsed));
    }
    for _ in 0..args.execs {
        let (elapsed, _) = mmctl_ok(broker, &["ps", "-o", "json"], QUICK)?;
        report.raw.ps_ms.push(ms(elapsed));
    }
    // Removed before the boots so that it does not compete with them.
    let (rm, _) = mmctl_ok(broker, &["rm", "-f", VM], QUICK)?;
    report.raw.rm_force_ms = ms(rm);

    let boot_timeout = Duration::from_secs(args.timeout_secs);
    for run in 1..=args.runs {
        let others = machine::other_vmms().len();
        report.other_vms_before_runs.push(others);
        eprintln!("mm-bench: exec: run {run}/{}: mmctl run --rm -- true ({others} other VM(s) running)", args.runs);
        let (elapsed, _) = mmctl_ok(broker, &["run", "--rm", "--", "true"], boot_timeout)?;
        report.raw.run_rm_ms.push(ms(elapsed));
        eprintln!("mm-bench: exec: run {run}/{}: {:.1} s", args.runs, elapsed.as_secs_f64());
        let (_, ps) = mmctl_ok(broker, &["ps", "-o", "json"], QUICK)?;
        if ps.trim() != "[]" {
            report.warnings.push(format!("run {run}: --rm left a microVM behind: {}", ps.trim()));
        }
    }

    report.metrics = [
        Metric::new("exec_true", "ms", &report.raw.exec_ms, true, "mmctl exec bench -- true, spawn -> exit"),
        Metric::new("ps", "ms", &report.raw.ps_ms, true, "mmctl ps -o json (host only: the floor), spawn -> exit"),
        Metric::new("run_rm_true", "ms", &report.raw.run_rm_ms, false, "mmctl run --rm -- true, spawn -> exit"),
        Metric::new("ready", "ms", &[report.raw.ready_ms], false, "mmctl run -d spawned -> first exec succeeded"),
    ]
    .into_iter()
    .flatten()
    .collect();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_have_median_p99_and_max() {
        let values: Vec<f64> = (1..=50).rev().map(f64::from).collect();
        let m = Metric::new("exec_true", "ms", &values, true, "").unwrap();
        assert_eq!((m.samples, m.median, m.p99, m.max), (50, 25.5, Some(50.0), 50.0));
        let m = Metric::new("run_rm_true", "ms", &[3.0, 1.0], false, "").unwrap();
        assert_eq!((m.median, m.p99, m.max), (2.0, None, 3.0));
        assert!(Metric::new("x", "ms", &[], true, "").is_none());
    }

    #[test]
    fn table_shows_every_metric() {
        let raw = Raw { exec_ms: vec![10.0, 12.0], run_rm_ms: vec![40_000.0], ready_ms: 41_000.0, ..Raw::default() };
        let report = ExecReport {
            benchmark: "exec",
            unix_time: 0,
            source: String::new(),
            machine: Machine::detect(),
            mmctl: "mmctl 0.1.0".into(),
            mm_broker: "mm-broker 0.1.0".into(),
            guest: None,
            parameters: serde_json::json!({}),
            metrics: vec![
                Metric::new("exec_true", "ms", &raw.exec_ms, true, "").unwrap(),
                Metric::new("run_rm_true", "ms", &raw.run_rm_ms, false, "").unwrap(),
            ],
            raw,
            other_vms_at_start: 0,
            other_vms_before_runs: vec![0],
            loadavg_at_end: String::new(),
            notes: Vec::new(),
            warnings: vec!["busy".into()],
        };
        let table = report.table();
        assert!(table.contains("exec_true") && table.contains("run_rm_true") && table.contains("40000.0"));
        assert!(table.contains("warning: busy"));
    }
}
