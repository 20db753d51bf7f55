//! What the device benchmarks (`block`, `net`, `vsock`) share: their
//! common options, booting one guest per system with the same kernel,
//! initramfs and command line as the boot benchmark, checking the command
//! line each guest printed, and the report (a table for people, JSON for
//! tools) with the ratios ours/QEMU and ours/host.
//!
//! Each system boots once per benchmark run and its guest runs every phase
//! in that one boot: boots take ~45 s on PVM hosts, the phases seconds.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::machine::{self, Machine};
use crate::vm::{Results, Vm, VmEnd};
use crate::{BootConfig, System, boot, mmvmm, qemu};

/// Options every device benchmark takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Also print the JSON result on stdout (the table then goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Where to write the JSON result [default: <workspace>/target/bench/<bench>.json].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Boots per system; the systems alternate (mm, qemu, mm, qemu, …) so
    /// that changes in the host's load hit both alike. Figures are medians.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Seconds each measured phase may run (a phase also ends when its data is done).
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Fail if a guest has not finished its phases after this long.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
    /// The systems to boot, in this order (one alone for trying things out;
    /// the comparison needs both).
    #[arg(long, value_delimiter = ',', default_values = ["mm", "qemu"])]
    pub systems: Vec<SystemArg>,
    /// vCPUs of both guests.
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// RAM of both guests, MiB.
    #[arg(long, default_value_t = 128)]
    pub memory_mib: u64,
    /// Extra kernel parameters for both guests (e.g. `idle=poll` to see
    /// what halting costs).
    #[arg(long, default_value = "")]
    pub cmdline: String,
}

impl CommonArgs {
    pub fn out(&self, bench: &str) -> PathBuf {
        self.out.clone().unwrap_or_else(|| mm_integration::repo_root().join(format!("target/bench/{bench}.json")))
    }

    pub fn boot_config(&self, workload: Vec<String>) -> BootConfig {
        BootConfig { cpus: self.cpus, memory_mib: self.memory_mib, extra_cmdline: self.cmdline.clone(), workload }
    }

    pub fn systems(&self) -> Vec<System> {
        self.systems
            .iter()
            .map(|s| match s {
                SystemArg::Mm => System::Mm,
                SystemArg::Qemu => System::Qemu,
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SystemArg {
    Mm,
    Qemu,
}

/// How one system's guest is given its device.
pub struct GuestDevice<'a> {
    /// mm-vmm: `--device KIND=SOCKET` (a running `mm-device`).
    pub mm: Option<(&'a str, &'a Path)>,
    /// QEMU: extra arguments (`-drive …`, `-device …`).
    pub qemu_args: Vec<String>,
    /// fds QEMU inherits at the given numbers (a TAP).
    pub qemu_fds: Vec<(&'a std::os::fd::OwnedFd, i32)>,
}

/// A booted guest of one system, with what the report needs about its start.
pub struct Started {
    pub system: System,
    pub run: usize,
    pub vm: Vm,
    pub other_vms_running: usize,
    pub loadavg_at_start: String,
}

/// Boots `config` on `system` with `device`; the guest runs its workload.
pub fn start(system: System, run: usize, config: &BootConfig, device: &GuestDevice, log_dir: &Path) -> Result<Started> {
    qemu::ensure_installed()?;
    let command = match system {
        System::Mm => {
            let mut cmd = mmvmm::command_with_devices(config, device.mm.iter().copied())?;
            // Its log is only kept for reading; keep it plain text.
            cmd.env("NO_COLOR", "1");
            cmd
        }
        System::Qemu => {
            let kernel = mm_integration::guest_kernel()?;
            let initrd = mm_integration::guest_initramfs()?;
            let cmdline = mmvmm::kernel_cmdline(config)?;
            let mut cmd = qemu::device_command(config, &kernel, &initrd, &cmdline);
            cmd.args(&device.qemu_args);
            crate::vm::inherit_fds(&mut cmd, &device.qemu_fds);
            cmd
        }
    };
    let others = machine::other_vmms().len();
    let loadavg = machine::loadavg();
    eprintln!("mm-bench: run {run} {}: booting ({others} other VM(s) running, load {loadavg})", system.name());
    let vm = Vm::spawn(system.name(), command, Some(log_dir.join(format!("{}-{run}", system.name()))))?;
    Ok(Started { system, run, vm, other_vms_running: others, loadavg_at_start: loadavg })
}

/// One system's run, as recorded in the JSON.
#[derive(Debug, Clone, Serialize)]
pub struct SystemRun {
    pub system: &'static str,
    pub run: usize,
    pub version: String,
    /// Spawn → `mm-init: user space started` on the console.
    pub boot_to_init_ms: Option<f64>,
    /// Spawn → the VMM's end.
    pub total_ms: f64,
    pub ending: String,
    /// The `mmbench:` lines the guest tool printed, parsed.
    pub guest_results: Results,
    pub other_vms_running: usize,
    pub loadavg_at_start: String,
    pub loadavg_at_end: String,
}

/// Ends a started guest (mm-vmm: waits for its exit, which follows the
/// workload's; QEMU: killed at once, since on PVM its guest's reset never
/// completes, see boot.rs) and records it. Its logs were saved by `Vm`.
pub fn finish(
    started: Started,
    results: Results,
    config: &BootConfig,
    warnings: &mut Vec<String>,
) -> Result<SystemRun> {
    let Started { system, run, vm, other_vms_running, loadavg_at_start } = started;
    let boot_to_init_ms = vm.boot_to_init.map(|d| d.as_secs_f64() * 1e3);
    let end: VmEnd = vm.finish(match system {
        System::Mm => Duration::from_secs(120),
        System::Qemu => Duration::ZERO,
    })?;
    let name = format!("run {run} {}", system.name());
    check_cmdline(&name, &end.console, &mmvmm::kernel_cmdline(config)?, warnings)?;
    if system == System::Mm && !matches!(end.ending, boot::Ending::Exited(s) if s.success()) {
        warnings.push(format!("{name}: mm-vmm ended with {} (figures were taken before)", end.ending));
    }
    if other_vms_running > 0 {
        warnings.push(format!("{name}: {other_vms_running} other VM(s) were running on this host when it started"));
    }
    let version = match system {
        System::Mm => crate::version_of(&mm_integration::workspace_binary("mm-vmm")?),
        System::Qemu => qemu::version()?,
    };
    Ok(SystemRun {
        system: system.name(),
        run,
        version,
        boot_to_init_ms,
        total_ms: end.total.as_secs_f64() * 1e3,
        ending: end.ending.to_string(),
        guest_results: results,
        other_vms_running,
        loadavg_at_start,
        loadavg_at_end: machine::loadavg(),
    })
}

/// The command line without `virtio_mmio.device=` entries: each VMM adds
/// its own for its devices (mm-vmm after `mm.bootdev`, QEMU's microvm at
/// the end), at addresses of its own choosing.
fn without_device_entries(cmdline: &str) -> Vec<&str> {
    cmdline.split_whitespace().filter(|w| !w.starts_with("virtio_mmio.device=")).collect()
}

/// Both guests must have booted with the same command line apart from
/// their device entries: a comparison between different ones would be
/// meaningless, so a difference is fatal.
fn check_cmdline(name: &str, console: &str, expected: &str, warnings: &mut Vec<String>) -> Result<()> {
    match boot::printed_cmdline(console) {
        Some(printed) if without_device_entries(printed) == without_device_entries(expected) => Ok(()),
        Some(printed) => bail!(
            "{name}: the guest kernel got a different command line:\n  printed:  {printed}\n  expected: {expected} \
             (+ virtio_mmio.device entries)"
        ),
        None => {
            warnings.push(format!("{name}: the guest did not print its kernel command line"));
            Ok(())
        }
    }
}

/// A deadline `secs` from now.
pub fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

/// One figure, side by side.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    /// The host doing the same without a VM, where that makes sense.
    pub host: Option<f64>,
    pub mm: Option<f64>,
    pub qemu: Option<f64>,
    pub mm_over_qemu: Option<f64>,
    pub mm_over_host: Option<f64>,
}

impl Metric {
    pub fn new(
        name: &'static str,
        unit: &'static str,
        higher_is_better: bool,
        host: Option<f64>,
        mm: Option<f64>,
        qemu: Option<f64>,
    ) -> Self {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        Metric {
            name,
            unit,
            higher_is_better,
            host,
            mm,
            qemu,
            mm_over_qemu: ratio(mm, qemu),
            mm_over_host: ratio(mm, host),
        }
    }
}

/// A target from the issue: `value ≥ limit` (or ≤ for `at_most`).
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub value: Option<f64>,
    pub limit: f64,
    pub at_most: bool,
    pub met: bool,
    /// Where the target applies (e.g. only on hardware KVM).
    pub applies: &'static str,
}

impl Target {
    pub fn at_least(name: String, value: Option<f64>, limit: f64, applies: &'static str) -> Self {
        Target { name, value, limit, at_most: false, met: value.is_some_and(|v| v >= limit), applies }
    }
}

pub use crate::report::GuestSetup;

#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    pub benchmark: &'static str,
    pub unix_time: u64,
    pub source: String,
    pub machine: Machine,
    pub guest: GuestSetup,
    /// The benchmark's own settings (image size, phase length, …).
    pub parameters: serde_json::Value,
    /// Raw figures behind the metrics (the host run's, each endpoint's).
    pub raw: serde_json::Value,
    pub metrics: Vec<Metric>,
    pub targets: Vec<Target>,
    pub systems: Vec<SystemRun>,
    /// What the figures mean and what was not measured, and why.
    pub notes: Vec<String>,
    pub warnings: Vec<String>,
}

impl DeviceReport {
    pub fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "{} benchmark: {} vCPU, {} MiB, {}",
            self.benchmark, self.guest.cpus, self.guest.memory_mib, self.parameters
        );
        let _ = writeln!(out, "{m}");
        let num = |v: Option<f64>| v.map(figure).unwrap_or_else(|| "-".into());
        let ratio = |v: Option<f64>| v.map(ratio_text).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<22} {:>6} {:>11} {:>11} {:>11} {:>8} {:>8}",
            "metric", "unit", "host", "mm", "qemu", "mm/qemu", "mm/host"
        );
        for r in &self.metrics {
            let _ = writeln!(
                out,
                "{:<22} {:>6} {:>11} {:>11} {:>11} {:>8} {:>8}",
                r.name,
                r.unit,
                num(r.host),
                num(r.mm),
                num(r.qemu),
                ratio(r.mm_over_qemu),
                ratio(r.mm_over_host)
            );
        }
        if !self.targets.is_empty() {
            let _ = writeln!(out, "targets:");
        }
        for t in &self.targets {
            let value = t.value.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into());
            let verdict = if t.met { "met" } else { "NOT MET" };
            let op = if t.at_most { "<=" } else { ">=" };
            let _ = writeln!(out, "  {:<28} {value:>8} {op} {:<4} {verdict} ({})", t.name, t.limit, t.applies);
        }
        for s in &self.systems {
            let boot = s.boot_to_init_ms.map(|v| format!("{:.1} s", v / 1e3)).unwrap_or_else(|| "-".into());
            let _ = writeln!(out, "run {} {}: {}, boot to init {boot}, {}", s.run, s.system, s.version, s.ending);
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        out
    }

    /// Writes the JSON to `out` and prints the table (and the JSON with `json`).
    pub fn emit(mut self, out: &Path, json: bool) -> Result<()> {
        self.source = crate::source_revision();
        self.unix_time = unix_time();
        write_and_print(&self, &self.table(), out, json)
    }
}

/// Seconds since the epoch, stamped on each JSON result.
pub fn unix_time() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Writes `report` as JSON to `out` and prints `table`; with `json` the JSON
/// goes to stdout and the table to stderr, so `mm-bench … --json | jq` works.
pub fn write_and_print(report: &impl Serialize, table: &str, out: &Path, json: bool) -> Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(out, format!("{text}\n")).with_context(|| format!("writing {}", out.display()))?;
    if json {
        eprint!("{table}");
        println!("{text}");
    } else {
        print!("{table}");
    }
    eprintln!("mm-bench: wrote {}", out.display());
    Ok(())
}

/// A figure with about three significant digits: the device figures span
/// 0.1 MiB/s in a guest to thousands on the host.
fn figure(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.1}"),
        a if a >= 1.0 => format!("{v:.2}"),
        _ => format!("{v:.3}"),
    }
}

/// A ratio, in scientific notation when tiny (ours/host on PVM).
fn ratio_text(r: f64) -> String {
    if r != 0.0 && r.abs() < 0.001 { format!("{r:.2e}") } else { format!("{r:.3}") }
}

/// The median of the values present (None if none are).
pub fn median(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    crate::report::stats(&values.into_iter().flatten().collect::<Vec<_>>()).map(|s| s.median)
}

/// MiB/s from bytes and nanoseconds.
pub fn mib_per_s(bytes: u64, ns: u64) -> Option<f64> {
    (ns > 0).then(|| bytes as f64 / (1 << 20) as f64 / (ns as f64 / 1e9))
}

/// Operations per second from a count and nanoseconds.
pub fn per_s(ops: u64, ns: u64) -> Option<f64> {
    (ns > 0).then(|| ops as f64 / (ns as f64 / 1e9))
}

/// Runs `binary` with `args` on the host, returning its stdout; fails with
/// its stderr if it fails.
pub fn run_host_tool(binary: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(binary).args(args).output().with_context(|| format!("running {}", binary.display()))?;
    if !out.status.success() {
        bail!("{} {} failed: {}", binary.display(), args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// mm-init as a host binary (its tools run on the host as well), built or
/// reused by guest/rootfs/build-mm-init.sh: the very binary in the guest.
pub fn mm_init_binary() -> Result<PathBuf> {
    let script = mm_integration::repo_root().join("guest/rootfs/build-mm-init.sh");
    let out = Command::new("bash").arg(&script).output().context("running build-mm-init.sh")?;
    if !out.status.success() {
        bail!("build-mm-init.sh failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let path = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string();
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_entries_do_not_count() {
        let mm = "console=ttyS0 mm.bootdev=0xc0000000 virtio_mmio.device=4K@0xd0000000:5 noxsave mm.cmd=x";
        let qemu = "console=ttyS0 mm.bootdev=0xc0000000 noxsave mm.cmd=x virtio_mmio.device=512@0xfeb00e00:12";
        assert_eq!(without_device_entries(mm), without_device_entries(qemu));
        assert_ne!(without_device_entries(mm), without_device_entries("console=ttyS0 mm.cmd=x"));
    }

    #[test]
    fn figures_keep_small_values_readable() {
        assert_eq!(figure(3572.34), "3572.3");
        assert_eq!(figure(4.574), "4.57");
        assert_eq!(figure(0.07615), "0.076");
        assert_eq!(ratio_text(0.456), "0.456");
        assert_eq!(ratio_text(0.0000213), "2.13e-5");
    }

    #[test]
    fn ratios_and_rates() {
        let m = Metric::new("x", "MiB/s", true, Some(200.0), Some(50.0), Some(100.0));
        assert_eq!(m.mm_over_qemu, Some(0.5));
        assert_eq!(m.mm_over_host, Some(0.25));
        let m = Metric::new("x", "MiB/s", true, None, Some(50.0), Some(0.0));
        assert_eq!((m.mm_over_qemu, m.mm_over_host), (None, None));
        assert_eq!(mib_per_s(1 << 21, 1_000_000_000), Some(2.0));
        assert_eq!(per_s(500, 500_000_000), Some(1000.0));
        assert_eq!(per_s(1, 0), None);
        assert_eq!(median([Some(3.0), None, Some(1.0), Some(2.0)]), Some(2.0));
        assert_eq!(median([None]), None);
        assert!(Target::at_least("t".into(), Some(1.0), 1.0, "here").met);
        assert!(!Target::at_least("t".into(), None, 1.0, "here").met);
    }
}
