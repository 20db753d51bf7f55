//! Turning runs into the result: median and max per metric, the mm/QEMU
//! ratios, the targets, a table for people and JSON for tools.
//!
//! Medians, not means: with a handful of ~75 s boots on a shared 2-core
//! machine, one boot slowed by a neighbour should not move the headline.
//! Targets are judged on medians; maxima are reported beside them.

use std::fmt::Write as _;

use anyhow::{Result, bail};
use serde::Serialize;

use crate::machine::Machine;
use crate::procmem::Sample;

/// One boot's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    /// 1-based: run N of mm and run N of QEMU were booted back to back.
    pub run: usize,
    pub boot_to_init_ms: f64,
    /// mm only: mm-vmm's own boot timer (its start → mm-init's boot-device write).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_timer_ms: Option<f64>,
    /// mm only: spawn → first KVM_RUN, from the two CLOCK_MONOTONIC readings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm_setup_ms: Option<f64>,
    /// mm only: mm-vmm's `since_start_ms` of its first KVM_RUN (in-process,
    /// so without exec and dynamic loading).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_kvm_run_since_start_ms: Option<f64>,
    /// Total Pss − guest-RAM Pss at the marker.
    pub host_rss_kib: u64,
    #[serde(flatten)]
    pub memory: Sample,
    /// Spawn → the VMM's exit.
    pub total_ms: f64,
    /// The VMM's exit status, or that it was killed.
    pub ending: String,
    /// Other mm-vmm/QEMU processes on the host when this boot started.
    pub other_vms_running: usize,
    pub loadavg_at_start: String,
    /// /proc/loadavg once the boot is over: its 1-minute figure roughly
    /// says how busy the host was during the boot.
    pub loadavg_at_end: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub median: f64,
    pub max: f64,
}

/// Median (mean of the middle two for an even count) and max; None if empty.
pub fn stats(values: &[f64]) -> Option<Stats> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
    Some(Stats { median, max: sorted[n - 1] })
}

/// The `q`-quantile (0..=1) of sorted values, nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One system's summary and its runs.
#[derive(Debug, Clone, Serialize)]
pub struct SystemReport {
    pub version: String,
    pub boot_to_init_ms: Stats,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_timer_ms: Option<Stats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm_setup_ms: Option<Stats>,
    pub host_rss_kib: Stats,
    pub total_pss_kib: Stats,
    pub total_rss_kib: Stats,
    pub total_pss_file_kib: Stats,
    pub guest_ram_pss_kib: Stats,
    pub runs: Vec<RunRecord>,
}

impl SystemReport {
    pub fn new(version: String, runs: Vec<RunRecord>) -> Result<Self> {
        if runs.is_empty() {
            bail!("no runs to report");
        }
        let all = |f: fn(&RunRecord) -> f64| stats(&runs.iter().map(f).collect::<Vec<_>>()).expect("runs");
        let some = |f: fn(&RunRecord) -> Option<f64>| stats(&runs.iter().filter_map(f).collect::<Vec<_>>());
        Ok(SystemReport {
            version,
            boot_to_init_ms: all(|r| r.boot_to_init_ms),
            boot_timer_ms: some(|r| r.boot_timer_ms),
            vmm_setup_ms: some(|r| r.vmm_setup_ms),
            host_rss_kib: all(|r| r.host_rss_kib as f64),
            total_pss_kib: all(|r| r.memory.total_pss_kib as f64),
            total_rss_kib: all(|r| r.memory.total_rss_kib as f64),
            total_pss_file_kib: all(|r| r.memory.total_pss_file_kib as f64),
            guest_ram_pss_kib: all(|r| r.memory.guest_ram_pss_kib as f64),
            runs,
        })
    }
}

/// What was booted, identically on both systems.
#[derive(Debug, Clone, Serialize)]
pub struct GuestSetup {
    pub kernel: String,
    pub initramfs: String,
    /// Apart from each VMM's `virtio_mmio.device=` entries.
    pub cmdline: String,
    pub cpus: u8,
    pub memory_mib: u64,
    pub workload: Vec<String>,
}

impl GuestSetup {
    pub fn new(config: &crate::BootConfig) -> anyhow::Result<Self> {
        Ok(GuestSetup {
            kernel: mm_integration::guest_kernel()?.display().to_string(),
            initramfs: mm_integration::guest_initramfs()?.display().to_string(),
            cmdline: crate::mmvmm::kernel_cmdline(config)?,
            cpus: config.cpus,
            memory_mib: config.memory_mib,
            workload: config.workload.clone(),
        })
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ratios {
    /// median mm / median QEMU.
    pub boot_to_init_ms: f64,
    pub host_rss_kib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: &'static str,
    pub value: Option<f64>,
    /// Met when value ≤ limit (a ratio exactly at its limit meets it).
    pub limit: f64,
    pub met: bool,
}

impl Target {
    fn new(name: &'static str, value: Option<f64>, limit: f64) -> Self {
        Target { name, value, limit, met: value.is_some_and(|v| v <= limit) }
    }
}

/// A table row: metric, mm, QEMU, mm/QEMU.
type Row = (&'static str, Option<Stats>, Option<Stats>, Option<f64>);

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub benchmark: &'static str,
    pub unix_time: u64,
    /// The git revision of the workspace (`-dirty` with local changes).
    pub source: String,
    pub runs: usize,
    pub order: &'static str,
    pub machine: Machine,
    pub guest: GuestSetup,
    pub mm: SystemReport,
    pub qemu: SystemReport,
    pub ratios: Ratios,
    pub targets: Vec<Target>,
    pub warnings: Vec<String>,
}

impl Report {
    pub fn new(
        machine: Machine,
        guest: GuestSetup,
        mm: SystemReport,
        qemu: SystemReport,
        warnings: Vec<String>,
    ) -> Self {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        let ratios = Ratios {
            boot_to_init_ms: ratio(mm.boot_to_init_ms.median, qemu.boot_to_init_ms.median),
            host_rss_kib: ratio(mm.host_rss_kib.median, qemu.host_rss_kib.median),
        };
        let finite = |v: f64| Some(v).filter(|v| v.is_finite());
        let targets = vec![
            Target::new("boot_to_init_ms mm/qemu", finite(ratios.boot_to_init_ms), 0.9),
            Target::new("host_rss_kib mm/qemu", finite(ratios.host_rss_kib), 0.25),
            Target::new("vmm_setup_ms (mm)", mm.vmm_setup_ms.map(|s| s.median), 10.0),
        ];
        let unix_time =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Report {
            benchmark: "boot",
            unix_time,
            source: String::new(),
            runs: mm.runs.len(),
            order: "alternating: mm, qemu, mm, qemu, ...",
            machine,
            guest,
            mm,
            qemu,
            ratios,
            targets,
            warnings,
        }
    }

    /// The summary as a plain-text table.
    pub fn table(&self) -> String {
        let pair = |s: Option<Stats>| match s {
            Some(s) => format!("{:.1} / {:.1}", s.median, s.max),
            None => "-".to_string(),
        };
        let rows: [Row; 8] = [
            (
                "boot_to_init_ms",
                Some(self.mm.boot_to_init_ms),
                Some(self.qemu.boot_to_init_ms),
                Some(self.ratios.boot_to_init_ms),
            ),
            ("boot_timer_ms", self.mm.boot_timer_ms, None, None),
            ("vmm_setup_ms", self.mm.vmm_setup_ms, None, None),
            ("host_rss_kib", Some(self.mm.host_rss_kib), Some(self.qemu.host_rss_kib), Some(self.ratios.host_rss_kib)),
            ("total_pss_kib", Some(self.mm.total_pss_kib), Some(self.qemu.total_pss_kib), None),
            ("total_rss_kib", Some(self.mm.total_rss_kib), Some(self.qemu.total_rss_kib), None),
            ("total_pss_file_kib", Some(self.mm.total_pss_file_kib), Some(self.qemu.total_pss_file_kib), None),
            ("guest_ram_pss_kib", Some(self.mm.guest_ram_pss_kib), Some(self.qemu.guest_ram_pss_kib), None),
        ];
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "boot benchmark: {} run(s) each, {} vCPU, {} MiB, workload {:?}",
            self.runs, self.guest.cpus, self.guest.memory_mib, self.guest.workload
        );
        let _ = writeln!(out, "{m}");
        let _ =
            writeln!(out, "{:<18} {:>22} {:>22} {:>8}", "metric", "mm median / max", "qemu median / max", "mm/qemu");
        for (name, mm, qemu, ratio) in rows {
            let ratio = ratio.map(|r| format!("{r:.3}")).unwrap_or_else(|| "-".into());
            let _ = writeln!(out, "{name:<18} {:>22} {:>22} {ratio:>8}", pair(mm), pair(qemu));
        }
        let _ = writeln!(out, "targets (on medians):");
        for t in &self.targets {
            let value = t.value.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into());
            let verdict = if t.met { "met" } else { "NOT MET" };
            let _ = writeln!(out, "  {:<24} {value:>10} <= {:<6} {verdict}", t.name, t.limit);
        }
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(run: usize, boot: f64, vmm_kib: u64, setup: Option<f64>) -> RunRecord {
        RunRecord {
            run,
            boot_to_init_ms: boot,
            boot_timer_ms: setup.map(|_| boot - 1.0),
            vmm_setup_ms: setup,
            first_kvm_run_since_start_ms: setup,
            host_rss_kib: vmm_kib,
            memory: Sample {
                total_pss_kib: vmm_kib + 40_000,
                total_rss_kib: vmm_kib + 41_000,
                total_pss_anon_kib: 0,
                total_pss_file_kib: vmm_kib,
                total_pss_shmem_kib: 40_000,
                guest_ram_pss_kib: 40_000,
                guest_ram_rss_kib: 40_000,
                guest_ram_pss_shmem_kib: 40_000,
                guest_ram_mappings: 1,
                ..Sample::default()
            },
            total_ms: boot + 5_000.0,
            ending: "exit status: 0".into(),
            other_vms_running: 0,
            loadavg_at_start: "0.00 0.00 0.00".into(),
            loadavg_at_end: "0.00 0.00 0.00".into(),
        }
    }

    fn machine() -> Machine {
        Machine {
            cpu_model: "Test CPU".into(),
            nproc: 2,
            mem_total_kib: 2048 * 1024,
            kernel: "6.1.0".into(),
            pvm: true,
            loadavg_at_start: "0.1 0.2 0.3".into(),
        }
    }

    fn guest() -> GuestSetup {
        GuestSetup {
            kernel: "/k".into(),
            initramfs: "/i".into(),
            cmdline: "console=ttyS0".into(),
            cpus: 1,
            memory_mib: 128,
            workload: vec!["true".into()],
        }
    }

    #[test]
    fn median_and_max() {
        assert_eq!(stats(&[]), None);
        assert_eq!(stats(&[3.0]), Some(Stats { median: 3.0, max: 3.0 }));
        assert_eq!(stats(&[5.0, 1.0, 3.0]), Some(Stats { median: 3.0, max: 5.0 }));
        assert_eq!(stats(&[4.0, 1.0, 2.0, 3.0]), Some(Stats { median: 2.5, max: 4.0 }));
    }

    #[test]
    fn ratios_targets_and_json() {
        let mm = SystemReport::new(
            "mm-vmm 0.1.0".into(),
            vec![
                record(1, 70_000.0, 2_000, Some(4.0)),
                record(2, 72_000.0, 2_200, Some(12.0)),
                record(3, 74_000.0, 2_100, Some(5.0)),
            ],
        )
        .unwrap();
        let qemu = SystemReport::new(
            "QEMU 7.2".into(),
            vec![
                record(1, 80_000.0, 10_000, None),
                record(2, 79_000.0, 9_000, None),
                record(3, 81_000.0, 11_000, None),
            ],
        )
        .unwrap();
        assert_eq!(mm.vmm_setup_ms, Some(Stats { median: 5.0, max: 12.0 }));
        assert_eq!(qemu.vmm_setup_ms, None);
        let report = Report::new(machine(), guest(), mm, qemu, vec!["busy host".into()]);
        assert!((report.ratios.boot_to_init_ms - 0.9).abs() < 1e-9);
        assert!((report.ratios.host_rss_kib - 0.21).abs() < 1e-9);
        assert!(report.targets.iter().all(|t| t.met), "{:?}", report.targets);

        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["mm"]["boot_to_init_ms"]["median"], 72_000.0);
        assert_eq!(json["mm"]["vmm_setup_ms"]["max"], 12.0);
        assert!(json["qemu"].get("vmm_setup_ms").is_none());
        assert_eq!(json["qemu"]["host_rss_kib"]["max"], 11_000.0);
        assert_eq!(json["mm"]["runs"][0]["total_pss_kib"], 42_000);
        assert_eq!(json["machine"]["pvm"], true);
        assert_eq!(json["targets"][2]["met"], true);

        let table = report.table();
        assert!(table.contains("boot_to_init_ms"));
        assert!(table.contains("0.900"));
        assert!(table.contains("warning: busy host"));
        assert!(!table.contains("NOT MET"));
    }

    #[test]
    fn missing_figures_do_not_meet_targets() {
        let mm = SystemReport::new("mm".into(), vec![record(1, 95_000.0, 5_000, None)]).unwrap();
        let qemu = SystemReport::new("qemu".into(), vec![record(1, 80_000.0, 10_000, None)]).unwrap();
        let report = Report::new(machine(), guest(), mm, qemu, Vec::new());
        assert!(report.targets.iter().all(|t| !t.met));
        assert!(report.table().contains("NOT MET"));
        assert!(SystemReport::new("x".into(), Vec::new()).is_err());
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
