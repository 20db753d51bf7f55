//! The snapshot benchmark's result: per metric and system the median and
//! max over the runs, the targets judged on medians, a table for
//! people and JSON for tools (target/bench/snapshot.json).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use super::{Setup, SnapRun, SnapSystem, SnapshotArgs};
use crate::machine::Machine;
use crate::report::{GuestSetup, Stats, stats};

/// One table row: its name, unit, and how to read it off a run.
struct Row {
    name: &'static str,
    unit: &'static str,
    of: fn(&SnapRun) -> Option<f64>,
}

fn kib(v: Option<u64>) -> Option<f64> {
    v.map(|v| v as f64)
}

/// Memory and state file together, as the disk holds them.
fn snapshot_disk_kib(r: &SnapRun) -> f64 {
    (r.memory_file_disk_kib + r.state_file_disk_kib) as f64
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

const ROWS: &[Row] = &[
    Row { name: "cold boot → answer", unit: "ms", of: |r| Some(r.boot_to_answer_ms) },
    Row { name: "  one answer, steady", unit: "ms", of: |r| Some(r.steady_answer_ms) },
    Row { name: "snapshot (pause→durable)", unit: "ms", of: |r| Some(r.snapshot_ms) },
    Row { name: "  save step", unit: "ms", of: |r| r.save_ms },
    Row { name: "pause seen by guest", unit: "ms", of: |r| Some(r.pause_ms) },
    Row { name: "  mm: I/O held", unit: "ms", of: |r| r.io_held_ms },
    Row { name: "guest touched (RAM Rss)", unit: "KiB", of: |r| kib(r.touched_kib) },
    Row { name: "  mm-vmm memory written", unit: "KiB", of: |r| kib(r.memory_written_kib) },
    Row { name: "snapshot on disk", unit: "KiB", of: |r| Some(snapshot_disk_kib(r)) },
    Row { name: "  on disk / touched", unit: "x", of: |r| ratio(Some(snapshot_disk_kib(r)), kib(r.touched_kib)) },
    Row { name: "  apparent size", unit: "KiB", of: |r| Some((r.memory_file_size_kib + r.state_file_size_kib) as f64) },
    Row { name: "restore: devices start", unit: "ms", of: |r| r.restore_devices_ms },
    Row { name: "restore → vCPUs running", unit: "ms", of: |r| Some(r.restore_to_vcpus_ms) },
    Row { name: "  spawn + jail", unit: "ms", of: |r| r.restore_spawn_ms },
    Row { name: "  inside the VMM", unit: "ms", of: |r| r.restore_in_vmm_ms },
    Row { name: "  mm eager: → vCPUs", unit: "ms", of: |r| r.restore_eager_to_vcpus_ms },
    Row { name: "  API ready", unit: "ms", of: |r| r.restore_api_ready_ms },
    Row { name: "  load", unit: "ms", of: |r| r.restore_load_ms },
    Row { name: "  resume", unit: "ms", of: |r| r.restore_resume_ms },
    Row { name: "restore → answer", unit: "ms", of: |r| Some(r.restore_to_answer_ms) },
    Row { name: "  / boot → answer", unit: "x", of: |r| Some(r.restore_to_answer_ms / r.boot_to_answer_ms) },
    Row { name: "restore → first tick", unit: "ms", of: |r| Some(r.restore_to_tick_ms) },
    Row { name: "restored VMM memory", unit: "KiB", of: |r| kib(r.restored_host_kib) },
    Row { name: "  back ends' memory", unit: "KiB", of: |r| kib(r.restored_devices_kib) },
    Row { name: "  guest RAM Pss", unit: "KiB", of: |r| kib(r.restored_guest_ram_pss_kib) },
    Row { name: "  mm eager: guest RAM Pss", unit: "KiB", of: |r| kib(r.restore_eager_guest_ram_pss_kib) },
];

/// One metric across the systems.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
    pub mm: Option<Stats>,
    pub qemu: Option<Stats>,
    pub firecracker: Option<Stats>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: &'static str,
    pub value: Option<f64>,
    /// Met when value ≤ limit.
    pub limit: f64,
    pub met: bool,
}

impl Target {
    fn at_most(name: &'static str, value: Option<f64>, limit: f64) -> Self {
        Target { name, value, limit, met: value.is_some_and(|v| v <= limit) }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    pub benchmark: &'static str,
    pub unix_time: u64,
    pub source: String,
    pub machine: Machine,
    pub guest: GuestSetup,
    pub parameters: serde_json::Value,
    pub metrics: Vec<Metric>,
    pub targets: Vec<Target>,
    pub runs: Vec<SnapRun>,
    pub notes: Vec<String>,
    pub warnings: Vec<String>,
}

fn median_of(runs: &[SnapRun], system: SnapSystem, of: fn(&SnapRun) -> Option<f64>) -> Option<Stats> {
    let values: Vec<f64> = runs.iter().filter(|r| r.system == system.name()).filter_map(of).collect();
    stats(&values)
}

impl SnapshotReport {
    pub fn new(
        machine: Machine,
        setup: &Setup,
        args: &SnapshotArgs,
        runs: Vec<SnapRun>,
        warnings: Vec<String>,
    ) -> Result<Self> {
        let metrics: Vec<Metric> = ROWS
            .iter()
            .map(|row| Metric {
                name: row.name,
                unit: row.unit,
                mm: median_of(&runs, SnapSystem::Mm, row.of),
                qemu: median_of(&runs, SnapSystem::Qemu, row.of),
                firecracker: median_of(&runs, SnapSystem::Firecracker, row.of),
            })
            .collect();
        let mm = |of: fn(&SnapRun) -> Option<f64>| median_of(&runs, SnapSystem::Mm, of).map(|s| s.median);
        let fc = |of: fn(&SnapRun) -> Option<f64>| median_of(&runs, SnapSystem::Firecracker, of).map(|s| s.median);
        let mm_vcpus = mm(|r| Some(r.restore_to_vcpus_ms));
        let targets = vec![
            Target::at_most("restore → vCPUs running (mm, ms)", mm_vcpus, 25.0),
            Target::at_most("mm restore → vCPUs / fc load+resume", ratio(mm_vcpus, fc(|r| r.restore_in_vmm_ms)), 1.0),
            Target::at_most(
                "mm restore → vCPUs / fc spawn→resumed",
                ratio(mm_vcpus, fc(|r| Some(r.restore_to_vcpus_ms))),
                1.0,
            ),
            Target::at_most(
                "restore → exec / boot → exec (mm)",
                mm(|r| Some(r.restore_to_answer_ms / r.boot_to_answer_ms)),
                0.1,
            ),
            Target::at_most(
                "snapshot on disk / touched (mm)",
                mm(|r| ratio(Some(snapshot_disk_kib(r)), kib(r.touched_kib))),
                1.1,
            ),
            Target::at_most("pause seen by guest (mm, ms)", mm(|r| Some(r.pause_ms)), 20.0),
        ];
        let mut guest = GuestSetup::new(&setup.config)?;
        guest.initramfs = "none: root on virtio-blk (a copy of the built-in ext4 image per run)".into();
        Ok(SnapshotReport {
            benchmark: "snapshot",
            unix_time: 0,
            source: String::new(),
            machine,
            guest,
            parameters: serde_json::json!({
                "runs": args.compared.runs,
                "memory_mib": args.compared.memory_mib,
                "tick_ms": args.tick_ms,
                "cold_cache": args.cold_cache,
                "dir": args.dir,
                "firecracker": args.compared.firecracker,
                "firecracker_jailer": args.compared.firecracker_jailer,
                "order": "alternating per run in --systems order",
            }),
            metrics,
            targets,
            runs,
            notes: notes(args),
            warnings,
        })
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "snapshot benchmark: {} run(s), {} vCPU, {} MiB, tick {} ms, {} page cache at restore",
            self.parameters["runs"],
            self.guest.cpus,
            self.guest.memory_mib,
            self.parameters["tick_ms"],
            if self.parameters["cold_cache"] == true { "cold" } else { "warm" }
        );
        let _ = writeln!(out, "{}", self.machine);
        let cell = |s: Option<Stats>| match s {
            Some(s) if s.max >= 1000.0 => format!("{:.0} / {:.0}", s.median, s.max),
            Some(s) => format!("{:.2} / {:.2}", s.median, s.max),
            None => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<26} {:>4} {:>20} {:>20} {:>20}",
            "metric (median / max)", "unit", "mm", "qemu", "firecracker"
        );
        for m in &self.metrics {
            if m.mm.is_none() && m.qemu.is_none() && m.firecracker.is_none() {
                continue;
            }
            let _ = writeln!(
                out,
                "{:<26} {:>4} {:>20} {:>20} {:>20}",
                m.name,
                m.unit,
                cell(m.mm),
                cell(m.qemu),
                cell(m.firecracker)
            );
        }
        let _ = writeln!(out, "targets (on medians):");
        for t in &self.targets {
            let value = t.value.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into());
            let verdict = match (t.value, t.met) {
                (None, _) => "not measured",
                (_, true) => "met",
                (_, false) => "NOT MET",
            };
            let _ = writeln!(out, "  {:<40} {value:>9} <= {:<5} {verdict}", t.name, t.limit);
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        out
    }

    pub fn emit(mut self, out: &Path, json: bool) -> Result<()> {
        self.source = crate::source_revision();
        self.unix_time = crate::devbench::unix_time();
        crate::devbench::write_and_print(&self, &self.table(), out, json)
    }
}

/// What the figures mean where the row names cannot say it.
fn notes(args: &SnapshotArgs) -> Vec<String> {
    vec![
        "answer: mm and firecracker = `true` exec'd by mm-init's agent over hybrid vsock; qemu = a serial \
         `ping` line answered by the workload's shell loop (no vsock device in QEMU here)"
            .into(),
        "restore → vCPUs: from right before the VMM's spawn; mm = its `first KVM_RUN` log line, jailed and \
         seccomp-filtered, with its two back ends already started (their start is the `devices start` row); \
         qemu = `cont` answered; firecracker = `PATCH /vm Resumed` answered"
            .into(),
        match &args.compared.firecracker_jailer {
            Some(_) => "firecracker ran behind its jailer (chroot, mount namespace, memory cgroup v1, \
                        unprivileged ids; no PID namespace) and its default seccomp filters"
                .into(),
            None => "firecracker ran without its jailer (no --firecracker-jailer), with its default seccomp \
                     filters"
                .into(),
        },
        "snapshot ends with both files fsynced (mm-vmm syncs its own; QEMU's `cat` and Firecracker's files \
         are fsynced by the bench, inside the timed span)"
            .into(),
        format!("first tick after restore has the tick period ({} ms) as its resolution", args.tick_ms),
    ]
}

/// One line per finished run, for following along.
pub fn run_line(r: &SnapRun) -> String {
    format!(
        "run {} {}: boot→answer {:.0} ms, snapshot {:.1} ms (pause {:.1} ms, {} KiB on disk, touched {}), \
         restore→vCPUs {:.1} ms, →answer {:.1} ms ({} attempt(s)), →tick {:.1} ms, restored VMM {} KiB",
        r.run,
        r.system,
        r.boot_to_answer_ms,
        r.snapshot_ms,
        r.pause_ms,
        r.memory_file_disk_kib + r.state_file_disk_kib,
        r.touched_kib.map(|k| format!("{k} KiB")).unwrap_or_else(|| "?".into()),
        r.restore_to_vcpus_ms,
        r.restore_to_answer_ms,
        r.restore_answer_attempts,
        r.restore_to_tick_ms,
        r.restored_host_kib.map(|k| k.to_string()).unwrap_or_else(|| "?".into()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(system: SnapSystem, n: usize, vcpus: f64) -> SnapRun {
        SnapRun {
            system: system.name(),
            run: n,
            boot_to_answer_ms: 40_000.0,
            snapshot_ms: 30.0,
            pause_ms: 12.0,
            touched_kib: Some(30_000),
            memory_file_disk_kib: 29_000,
            state_file_disk_kib: 100,
            restore_to_vcpus_ms: vcpus,
            restore_in_vmm_ms: Some(vcpus / 2.0),
            restore_to_answer_ms: 1_000.0,
            ..SnapRun::default()
        }
    }

    #[test]
    fn medians_targets_and_table() {
        let runs = vec![
            run(SnapSystem::Mm, 1, 20.0),
            run(SnapSystem::Firecracker, 1, 30.0),
            run(SnapSystem::Mm, 2, 24.0),
            run(SnapSystem::Firecracker, 2, 34.0),
        ];
        let vcpus = |m: &[Metric]| m.iter().find(|m| m.name == "restore → vCPUs running").unwrap().clone();
        let metrics: Vec<Metric> = ROWS
            .iter()
            .map(|row| Metric {
                name: row.name,
                unit: row.unit,
                mm: median_of(&runs, SnapSystem::Mm, row.of),
                qemu: median_of(&runs, SnapSystem::Qemu, row.of),
                firecracker: median_of(&runs, SnapSystem::Firecracker, row.of),
            })
            .collect();
        let v = vcpus(&metrics);
        assert_eq!(v.mm, Some(Stats { median: 22.0, max: 24.0 }));
        assert_eq!(v.qemu, None);
        assert_eq!(v.firecracker.unwrap().median, 32.0);
        assert!(Target::at_most("x", Some(22.0), 25.0).met);
        assert!(!Target::at_most("x", None, 25.0).met);
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        let line = run_line(&runs[0]);
        assert!(line.contains("restore→vCPUs 20.0 ms"), "{line}");
    }
}
