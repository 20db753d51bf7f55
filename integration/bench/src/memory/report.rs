//! The memory benchmark's result: per figure and system the median and max
//! over the runs, mm's ratios to each peer, every run's figures down to
//! each process, a table for people and JSON for tools
//! (target/bench/memory.json).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Result, bail};
use serde::Serialize;

use super::{GuestLine, MemRun, MemoryArgs, Setup};
use crate::machine::Machine;
use crate::report::{Stats, stats};
use crate::snapshot::SnapSystem;
use crate::snapshot::fclaunch::Launcher;

/// One table row: its name and how to read it off a run (KiB or a count).
struct Row {
    name: &'static str,
    key: &'static str,
    of: fn(&MemRun) -> f64,
}

const ROWS: &[Row] = &[
    Row { name: "processes", key: "process_count", of: |r| r.process_count as f64 },
    Row { name: "Pss, all processes", key: "pss_kib", of: |r| r.pss_kib as f64 },
    Row { name: "  guest RAM (Pss)", key: "guest_ram_pss_kib", of: |r| r.guest_ram_pss_kib as f64 },
    Row { name: "  VMM: Pss - guest RAM", key: "vmm_pss_kib", of: |r| r.vmm_pss_kib as f64 },
    Row { name: "    anonymous + shmem", key: "vmm_anon_shmem_kib", of: |r| r.vmm_anon_shmem_kib as f64 },
    Row { name: "    file-backed", key: "vmm_file_kib", of: |r| r.vmm_file_kib as f64 },
    Row { name: "guest RAM resident", key: "guest_ram_resident_kib", of: |r| r.guest_ram_resident_kib as f64 },
    Row { name: "VMM + guest RAM resident", key: "host_kib", of: |r| r.host_kib as f64 },
];

/// The rows mm is compared with each peer on.
const RATIO_KEYS: [&str; 3] = ["vmm_pss_kib", "vmm_anon_shmem_kib", "vmm_file_kib"];

/// One figure across the systems.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    pub name: &'static str,
    pub key: &'static str,
    pub mm: Option<Stats>,
    pub qemu: Option<Stats>,
    pub firecracker: Option<Stats>,
}

impl Metric {
    fn of(&self, system: SnapSystem) -> Option<Stats> {
        match system {
            SnapSystem::Mm => self.mm,
            SnapSystem::Qemu => self.qemu,
            SnapSystem::Firecracker => self.firecracker,
        }
    }
}

/// mm's median over a peer's.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub key: &'static str,
    pub mm_over_qemu: Option<f64>,
    pub mm_over_firecracker: Option<f64>,
}

/// Per system: its version and whether it ran jailed in every run.
#[derive(Debug, Clone, Serialize)]
pub struct SystemInfo {
    pub system: &'static str,
    pub version: String,
    pub jailed: bool,
    pub confinement: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub benchmark: &'static str,
    pub unix_time: u64,
    pub source: String,
    pub machine: Machine,
    pub guest: serde_json::Value,
    pub parameters: serde_json::Value,
    pub systems: Vec<SystemInfo>,
    pub metrics: Vec<Metric>,
    pub ratios: Vec<Ratio>,
    pub runs: Vec<MemRun>,
    pub notes: Vec<String>,
    pub warnings: Vec<String>,
}

fn stats_of(runs: &[MemRun], system: SnapSystem, of: fn(&MemRun) -> f64) -> Option<Stats> {
    stats(&runs.iter().filter(|r| r.system == system.name()).map(of).collect::<Vec<_>>())
}

fn ratio(a: Option<Stats>, b: Option<Stats>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b.median > 0.0 => Some((a.median / b.median * 1000.0).round() / 1000.0),
        _ => None,
    }
}

/// One line per run, printed as it ends.
pub fn run_line(r: &MemRun) -> String {
    format!(
        "run {} {}: {} processes, Pss {} KiB = guest RAM {} + VMM {} (anon+shmem {}, file {}); guest RAM \
         resident {} KiB; jailed: {}; ready after {:.1} s, sampled {:.1} s later ({} samples{})",
        r.run,
        r.system,
        r.process_count,
        r.pss_kib,
        r.guest_ram_pss_kib,
        r.vmm_pss_kib,
        r.vmm_anon_shmem_kib,
        r.vmm_file_kib,
        r.guest_ram_resident_kib,
        r.jailed,
        r.ready_ms / 1e3,
        r.settle.waited_ms / 1e3,
        r.settle.samples,
        if r.settle.settled { "" } else { ", not settled" }
    )
}

impl MemoryReport {
    /// Fails, reporting nothing, if any mm run was not jailed: mm's figures
    /// are only meaningful for the processes as production runs them.
    pub fn new(
        machine: Machine,
        setup: &Setup,
        args: &MemoryArgs,
        line: GuestLine,
        firecracker: Option<&Launcher>,
        runs: Vec<MemRun>,
        warnings: Vec<String>,
    ) -> Result<Self> {
        if let Some(unjailed) = runs.iter().find(|r| r.system == "mm" && !r.jailed) {
            bail!("run {} of mm did not run jailed; refusing to report mm's memory", unjailed.run);
        }
        let present: Vec<SnapSystem> = [SnapSystem::Mm, SnapSystem::Qemu, SnapSystem::Firecracker]
            .into_iter()
            .filter(|s| runs.iter().any(|r| r.system == s.name()))
            .collect();
        let systems = present
            .iter()
            .map(|s| {
                let mine: Vec<&MemRun> = runs.iter().filter(|r| r.system == s.name()).collect();
                SystemInfo {
                    system: s.name(),
                    version: mine[0].version.clone(),
                    jailed: mine.iter().all(|r| r.jailed),
                    confinement: mine[0].confinement.clone(),
                }
            })
            .collect();
        let metrics: Vec<Metric> = ROWS
            .iter()
            .map(|row| Metric {
                name: row.name,
                key: row.key,
                mm: stats_of(&runs, SnapSystem::Mm, row.of),
                qemu: stats_of(&runs, SnapSystem::Qemu, row.of),
                firecracker: stats_of(&runs, SnapSystem::Firecracker, row.of),
            })
            .collect();
        let ratios = RATIO_KEYS
            .iter()
            .map(|key| {
                let m = metrics.iter().find(|m| m.key == *key).expect("a row of ROWS");
                Ratio { key, mm_over_qemu: ratio(m.mm, m.qemu), mm_over_firecracker: ratio(m.mm, m.firecracker) }
            })
            .collect();
        let notes = vec![
            "KiB; medians over the runs (max in the JSON). Pss from /proc/PID/smaps_rollup summed over every \
             process of the microVM: for mm mm-vmm and each mm-device, both halves of each jail (the outer \
             process that waits and the jailed child); for QEMU qemu and its vsock back end; for Firecracker \
             its one process"
                .into(),
            "guest RAM (Pss): the guest-RAM mappings' Pss from /proc/PID/smaps, summed over the processes \
             that map it (mm: mm-vmm and the device processes share the memfd; QEMU: qemu and the vsock back \
             end share its memfd); guest RAM resident: the memfd's allocated size (counted once, including \
             pages no process has mapped), or anonymous RAM's Rss"
                .into(),
            "VMM = Pss less guest RAM's Pss; anonymous + shmem = Pss_Anon + Pss_Shmem less guest RAM \
             (each further microVM costs it in full); file-backed = Pss_File (binaries and libraries, shared \
             by further processes of the same binaries)"
                .into(),
            "VMM + guest RAM resident: what the microVM holds on the host (for mm more than the Pss sum: \
             memfd pages that no process maps are in no Pss)"
                .into(),
            "the broker (one per host, not per microVM) is not counted; its Pss is in mm's runs \
             (broker_pss_kib)"
                .into(),
            "every guest: the broker's command line and workload, root on the read-only built-in image \
             (vda), a fresh writable disk (vdb), vsock, net on a TAP; checked inside each guest after its \
             sample (guest in each run)"
                .into(),
        ];
        let guest = serde_json::json!({
            "kernel": setup.kernel.display().to_string(),
            "rootfs": setup.rootfs.display().to_string(),
            "cpus": setup.cpus,
            "memory_mib": setup.memory_mib,
            "cmdline": line.cmdline,
            "broker_params": line.broker_params,
            "workload": line.workload,
        });
        let parameters = serde_json::json!({
            "runs": args.compared.runs,
            "systems": present.iter().map(|s| s.name()).collect::<Vec<_>>(),
            "settle_secs": args.settle_secs,
            "settle_timeout_secs": args.settle_timeout_secs,
            "stable_kib_per_5s": super::STABLE_KIB,
            "firecracker": firecracker.map(|f| f.binary.display().to_string()),
            "firecracker_jailer": firecracker.and_then(|f| f.jailer.as_ref()).map(|j| j.display().to_string()),
            "bin_dir": mm_integration::workspace_binary("mm-vmm").ok()
                .and_then(|p| Some(p.parent()?.display().to_string())),
        });
        Ok(MemoryReport {
            benchmark: "memory",
            unix_time: crate::devbench::unix_time(),
            source: crate::source_revision(),
            machine,
            guest,
            parameters,
            systems,
            metrics,
            ratios,
            runs,
            notes,
            warnings,
        })
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "memory benchmark: one idle microVM ({} vCPU, {} MiB; read-only root disk, writable disk, vsock, \
             net), {} run(s) per system, medians in KiB",
            self.guest["cpus"], self.guest["memory_mib"], self.parameters["runs"]
        );
        let _ = writeln!(out, "{m}, load {}", m.loadavg_at_start);
        let systems: Vec<SnapSystem> = [SnapSystem::Mm, SnapSystem::Qemu, SnapSystem::Firecracker]
            .into_iter()
            .filter(|s| self.systems.iter().any(|i| i.system == s.name()))
            .collect();
        let _ = write!(out, "{:<26}", "");
        for s in &systems {
            let _ = write!(out, " {:>12}", s.name());
        }
        let _ = writeln!(out);
        let _ = write!(out, "{:<26}", "jailed");
        for s in &systems {
            let jailed = self.systems.iter().find(|i| i.system == s.name()).is_some_and(|i| i.jailed);
            let _ = write!(out, " {:>12}", if jailed { "yes" } else { "no" });
        }
        let _ = writeln!(out);
        for metric in &self.metrics {
            let _ = write!(out, "{:<26}", metric.name);
            for s in &systems {
                let v = metric.of(*s).map(|v| format!("{:.0}", v.median)).unwrap_or_else(|| "-".into());
                let _ = write!(out, " {v:>12}");
            }
            let _ = writeln!(out);
        }
        for r in &self.ratios {
            let show = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "mm/qemu {} {}, mm/firecracker {}",
                r.key,
                show(r.mm_over_qemu),
                show(r.mm_over_firecracker)
            );
        }
        for system in &systems {
            let Some(run) = self.runs.iter().find(|r| r.system == system.name()) else { continue };
            let _ = writeln!(
                out,
                "{} run {} by process:\n  {:<14} {:<5} {:>7} {:>8} {:>8} {:>8} {:>8}",
                run.system, run.run, "role", "half", "pid", "Pss", "anon+sh", "file", "RAM Pss"
            );
            for p in &run.processes {
                let _ = writeln!(
                    out,
                    "  {:<14} {:<5} {:>7} {:>8} {:>8} {:>8} {:>8}",
                    p.role, p.half, p.pid, p.pss_kib, p.own_anon_shmem_kib, p.own_file_kib, p.guest_ram_pss_kib
                );
            }
        }
        for i in &self.systems {
            let _ = writeln!(out, "{} ({}): {}", i.system, i.version, i.confinement.join("; "));
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        out
    }

    pub fn emit(&self, out: &Path, json: bool) -> Result<()> {
        crate::devbench::write_and_print(self, &self.table(), out, json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Settle;

    fn run(system: SnapSystem, n: usize, vmm: u64, jailed: bool) -> MemRun {
        MemRun {
            system: system.name(),
            run: n,
            version: "v".into(),
            jailed,
            process_count: 10,
            pss_kib: vmm + 30_000,
            guest_ram_pss_kib: 30_000,
            vmm_pss_kib: vmm,
            vmm_anon_shmem_kib: vmm / 2,
            vmm_file_kib: vmm - vmm / 2,
            settle: Settle { samples: 2, settled: true, ..Settle::default() },
            ..MemRun::default()
        }
    }

    fn setup() -> Setup {
        Setup {
            cpus: 1,
            memory_mib: 128,
            kernel: "/k".into(),
            rootfs: "/r".into(),
            dir: "/d".into(),
            log_dir: "/l".into(),
            boot_timeout: std::time::Duration::ZERO,
            settle: std::time::Duration::ZERO,
            settle_timeout: std::time::Duration::ZERO,
        }
    }

    fn args() -> MemoryArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: MemoryArgs,
        }
        Wrap::parse_from(["x"]).args
    }

    fn line() -> GuestLine {
        GuestLine {
            broker_params: String::new(),
            workload: vec![],
            cmdline: "c".into(),
            mac: String::new(),
            gateway: None,
        }
    }

    #[test]
    fn medians_and_ratios_per_system() {
        let runs = vec![
            run(SnapSystem::Mm, 1, 10_000, true),
            run(SnapSystem::Qemu, 1, 40_000, false),
            run(SnapSystem::Mm, 2, 12_000, true),
            run(SnapSystem::Qemu, 2, 44_000, false),
        ];
        let machine = Machine::detect();
        let report = MemoryReport::new(machine, &setup(), &args(), line(), None, runs, vec![]).unwrap();
        let vmm = report.metrics.iter().find(|m| m.key == "vmm_pss_kib").unwrap();
        assert_eq!(vmm.mm.unwrap().median, 11_000.0);
        assert_eq!(vmm.qemu.unwrap().median, 42_000.0);
        assert!(vmm.firecracker.is_none());
        let r = report.ratios.iter().find(|r| r.key == "vmm_pss_kib").unwrap();
        assert_eq!(r.mm_over_qemu, Some(0.262));
        assert_eq!(r.mm_over_firecracker, None);
        assert_eq!(report.systems.len(), 2);
        assert!(report.systems[0].jailed && !report.systems[1].jailed);
        let table = report.table();
        assert!(table.contains("VMM: Pss - guest RAM"), "{table}");
        assert!(table.contains("mm/qemu vmm_pss_kib 0.262"), "{table}");
    }

    #[test]
    fn an_unjailed_mm_run_is_not_reported() {
        let runs = vec![run(SnapSystem::Mm, 1, 10_000, true), run(SnapSystem::Mm, 2, 10_000, false)];
        let err = MemoryReport::new(Machine::detect(), &setup(), &args(), line(), None, runs, vec![]).unwrap_err();
        assert!(err.to_string().contains("refusing"), "{err}");
    }
}
