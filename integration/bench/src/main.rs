//! `mm-bench`: MicroMachines benchmarks, measured side by side with QEMU's
//! `microvm` machine on the same host, kernel, initramfs and command line,
//! because on PVM hosts the guest dominates every absolute figure (see
//! shared/PVM.md) and only the comparison says something about the VMM.
//!
//! `mm-bench boot --runs N [--json] [--out PATH]`,
//! `mm-bench block|net|vsock [--json]`,
//! `mm-bench exec [--execs M] [--runs N] [--json]` (mmctl through a real
//! mm-broker; nothing to compare with in QEMU),
//! `mm-bench api [--machines N] [--json]` (the controller's REST API on a
//! throw-away PostgreSQL),
//! `mm-bench snapshot [--runs N] [--memory-mib M] [--firecracker PATH]
//! [--json]` (snapshot and restore vs QEMU and Firecracker),
//! `mm-bench memory [--runs N] [--firecracker PATH] [--json]` (a whole
//! microVM's host memory, every process counted, vs QEMU and Firecracker
//! with the same devices), `mm-bench fork [--count N] [--json]` (N clones of
//! one snapshot), `mm-bench density [--batch B] [--max N] [--json]` (idle
//! clones until the broker refuses): see README.md.

mod api;
mod apibroker;
mod apiload;
mod block;
mod boot;
mod brokered;
mod density;
mod devbench;
mod exec;
mod fork;
mod machine;
mod memory;
mod mmvmm;
mod net;
mod netbroker;
/// The controller tests' throw-away PostgreSQL cluster, shared rather than
/// copied (its `atexit` hook and watchdog clean up after the benchmark too).
#[allow(dead_code)]
#[path = "../../../controller/tests/support/pg.rs"]
mod pg;
mod procmem;
mod qemu;
mod report;
mod snapshot;
mod vm;
mod vsock;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::boot::{BootRun, BootSpec, Ending};
use crate::machine::Machine;
use crate::procmem::GuestRam;
use crate::report::{GuestSetup, Report, RunRecord, SystemReport};

#[derive(Debug, Parser)]
#[command(name = "mm-bench", version, about = "MicroMachines benchmarks: mm-vmm side by side with QEMU microvm")]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Boot time to user space, VMM set-up time and VMM host memory, mm-vmm vs QEMU microvm.
    Boot(BootArgs),
    /// virtio-blk: sequential read/write MiB/s and 4 KiB random-read IOPS in the guest, vs QEMU and the host.
    Block(block::BlockArgs),
    /// virtio-net: guest <-> host TCP throughput through a TAP in a private network namespace, vs QEMU;
    /// then, through a real mm-broker, guest <-> guest throughput, TCP connect latency and `mmctl ssh`.
    Net(net::NetArgs),
    /// Hybrid vsock: round-trip latency (median, p99) and echo throughput.
    Vsock(vsock::VsockArgs),
    /// mmctl through a real mm-broker: `exec VM -- true` latency (median, p99) and `run --rm -- true` end to end.
    Exec(exec::ExecArgs),
    /// The controller's REST API on a throw-away PostgreSQL: list rate and latency (wrk), create latency,
    /// and create-to-running through a real broker when one can join the controller.
    Api(api::ApiArgs),
    /// Snapshot and restore of a running guest: snapshot time, pause, size on disk, restore → vCPUs
    /// running and → the guest answering, vs QEMU migrate-to-file and (with --firecracker) Firecracker.
    Snapshot(snapshot::SnapshotArgs),
    /// Host memory of one idle microVM with its devices (root disk, writable disk, vsock, net), every
    /// process counted (mm: the broker's mm-vmm and device processes, both halves of each jail), vs QEMU
    /// and (with --firecracker) Firecracker with the same devices; Pss split into guest RAM, anonymous +
    /// shmem and file-backed.
    Memory(memory::MemoryArgs),
    /// N clones of one snapshot through `mmctl fork`: time to all running and answering, each clone's
    /// host memory (guest RAM resident and Pss) idle and after it read its working set, its own disk layer.
    Fork(fork::ForkArgs),
    /// Idle clones of one snapshot forked in batches until the broker refuses: how many it holds, the start
    /// rate (clones/s) per batch and at that scale, host memory per clone, exec in a sample at the limit.
    Density(density::DensityArgs),
}

#[derive(Debug, Args)]
struct BootArgs {
    /// Boots per system; mm and QEMU alternate, so drift hits both alike.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also print the JSON result on stdout (the table then goes to stderr).
    #[arg(long)]
    json: bool,
    /// Where to write the JSON result [default: <workspace>/target/bench/boot.json].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Fail if a boot has not printed the user-space marker after this long.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// After the marker, wait this long for mm-vmm to exit (its status
    /// shows the workload ran), then kill it. QEMU is killed at once.
    #[arg(long, default_value_t = 120)]
    exit_timeout_secs: u64,
    /// vCPUs of both guests.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// RAM of both guests, MiB.
    #[arg(long, default_value_t = 128)]
    memory_mib: u64,
    /// Extra kernel parameters for both guests.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// The guest workload, after `--` [default: true].
    #[arg(last = true)]
    workload: Vec<String>,
}

/// What both systems boot.
#[derive(Debug, Clone)]
pub struct BootConfig {
    pub cpus: u8,
    pub memory_mib: u64,
    pub extra_cmdline: String,
    pub workload: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Mm,
    Qemu,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Mm => "mm",
            System::Qemu => "qemu",
        }
    }
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Bench::Boot(args) => boot_bench(args),
        Bench::Block(args) => block::run(args),
        Bench::Net(args) => net::run(args),
        Bench::Vsock(args) => vsock::run(args),
        Bench::Exec(args) => exec::run(args),
        Bench::Api(args) => api::run(args),
        Bench::Snapshot(args) => snapshot::run(args),
        Bench::Memory(args) => memory::run(args),
        Bench::Fork(args) => fork::run(args),
        Bench::Density(args) => density::run(args),
    }
}

/// The first line `binary --version` prints.
fn version_of(binary: &Path) -> String {
    Command::new(binary)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().trim().to_string())
        .unwrap_or_default()
}

fn boot_bench(args: BootArgs) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let config = BootConfig {
        cpus: args.cpus,
        memory_mib: args.memory_mib,
        extra_cmdline: args.cmdline.clone(),
        workload: if args.workload.is_empty() { vec!["true".into()] } else { args.workload.clone() },
    };
    let out = args.out.clone().unwrap_or_else(|| mm_integration::repo_root().join("target/bench/boot.json"));
    let log_dir = out.parent().unwrap_or(Path::new(".")).join("boot-logs");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;

    qemu::ensure_installed()?;
    let mm_vmm = mm_integration::workspace_binary("mm-vmm")?;
    let kernel = mm_integration::guest_kernel()?;
    let initrd = mm_integration::guest_initramfs()?;
    let cmdline = mmvmm::kernel_cmdline(&config)?;
    let machine = Machine::detect();
    let guest = GuestSetup::new(&config)?;
    eprintln!("mm-bench: {} boot(s) each of mm-vmm ({}) and QEMU microvm", args.runs, mm_vmm.display());
    eprintln!("mm-bench: kernel command line: {cmdline}");

    let marker_timeout = Duration::from_secs(args.timeout_secs);
    let exit_timeout = Duration::from_secs(args.exit_timeout_secs);
    let mut warnings = Vec::new();
    let mut records = (Vec::new(), Vec::new());
    for run in 1..=args.runs {
        for system in [System::Mm, System::Qemu] {
            let spec = BootSpec {
                command: match system {
                    System::Mm => mmvmm::command(&config)?,
                    System::Qemu => qemu::command(&config, &kernel, &initrd, &cmdline),
                },
                guest_ram: match system {
                    System::Mm => GuestRam::Named("mm-guest-ram"),
                    System::Qemu => GuestRam::AnonymousOfSize(config.memory_mib * 1024),
                },
                marker_timeout,
                exit_timeout: match system {
                    System::Mm => exit_timeout,
                    // QEMU's exit proves nothing here, and on PVM it did
                    // not come within minutes: microvm has no i8042 for
                    // `reboot=k`, so the guest's reset path polls, then
                    // falls back to methods the PVM emulator lacks. Kill
                    // it as soon as it is sampled.
                    System::Qemu => Duration::ZERO,
                },
            };
            let others = machine::other_vmms();
            let loadavg = machine::loadavg();
            eprintln!(
                "mm-bench: run {run}/{} {}: booting ({} other VM(s) running, load {loadavg})",
                args.runs,
                system.name(),
                others.len()
            );
            let result = boot::run(spec).with_context(|| format!("run {run} of {}", system.name()))?;
            save_logs(&log_dir, system, run, &result)?;
            let record = record(system, run, &result, others.len(), loadavg, &mut warnings);
            check_cmdline(system, run, &result.console, &cmdline, &mut warnings)?;
            eprintln!(
                "mm-bench: run {run}/{} {}: boot_to_init {:.1} ms, host_rss {} KiB, vmm_setup {}, {} after {:.1} s",
                args.runs,
                system.name(),
                record.boot_to_init_ms,
                record.host_rss_kib,
                record.vmm_setup_ms.map(|v| format!("{v:.2} ms")).unwrap_or_else(|| "-".into()),
                record.ending,
                record.total_ms / 1000.0
            );
            match system {
                System::Mm => records.0.push(record),
                System::Qemu => records.1.push(record),
            }
        }
    }

    let mm = SystemReport::new(version_of(&mm_vmm), records.0)?;
    let qemu = SystemReport::new(qemu::version()?, records.1)?;
    let mut report = Report::new(machine, guest, mm, qemu, warnings);
    report.source = source_revision();
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, format!("{json}\n")).with_context(|| format!("writing {}", out.display()))?;
    if args.json {
        eprint!("{}", report.table());
        println!("{json}");
    } else {
        print!("{}", report.table());
    }
    eprintln!("mm-bench: wrote {} (consoles and logs in {})", out.display(), log_dir.display());
    Ok(())
}

/// The workspace's git commit, `-dirty` if it has uncommitted changes, so a
/// result can be traced to the code that produced it.
fn source_revision() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(mm_integration::repo_root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match (git(&["rev-parse", "--short", "HEAD"]), git(&["status", "--porcelain"])) {
        (Some(rev), Some(status)) if !status.is_empty() => format!("{rev}-dirty"),
        (Some(rev), _) => rev,
        (None, _) => "unknown".into(),
    }
}

/// Keeps each boot's console and stderr, for looking into odd numbers.
fn save_logs(dir: &Path, system: System, run: usize, result: &BootRun) -> Result<()> {
    let base = dir.join(format!("{}-{run}", system.name()));
    std::fs::write(base.with_extension("console"), &result.console)?;
    std::fs::write(base.with_extension("stderr"), &result.stderr)?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// One boot's figures; anything odd about the boot becomes a warning.
fn record(
    system: System,
    run: usize,
    result: &BootRun,
    other_vms: usize,
    loadavg: String,
    warnings: &mut Vec<String>,
) -> RunRecord {
    let name = system.name();
    let log = match system {
        System::Mm => mmvmm::parse_log(&result.stderr),
        System::Qemu => mmvmm::LogFigures::default(),
    };
    let vmm_setup_ms = log.first_kvm_run_monotonic_ns.map(|ns| (ns as f64 - result.spawn_monotonic_ns as f64) / 1e6);
    if system == System::Mm {
        if vmm_setup_ms.is_none() {
            warnings.push(format!("run {run} {name}: no `first KVM_RUN` line with monotonic_ns in mm-vmm's log"));
        }
        if log.boot_timer_ms.is_none() {
            warnings.push(format!("run {run} {name}: no `guest user space started` line in mm-vmm's log"));
        }
    }
    let clean = match (system, result.ending) {
        (System::Mm, Ending::Exited(status)) => status.success(),
        (System::Mm, Ending::Killed) => false,
        (System::Qemu, _) => true,
    };
    if !clean {
        warnings.push(format!("run {run} {name}: the VMM ended with {} (boot figures are still valid)", result.ending));
    }
    if other_vms > 0 {
        warnings.push(format!("run {run} {name}: {other_vms} other VM(s) were running on this host when it started"));
    }
    RunRecord {
        run,
        boot_to_init_ms: ms(result.boot_to_init),
        boot_timer_ms: log.boot_timer_ms,
        vmm_setup_ms: vmm_setup_ms.map(|v| (v * 1e3).round() / 1e3),
        first_kvm_run_since_start_ms: log.first_kvm_run_since_start_ms,
        host_rss_kib: result.memory.vmm_kib(),
        memory: result.memory,
        total_ms: ms(result.total),
        ending: result.ending.to_string(),
        other_vms_running: other_vms,
        loadavg_at_start: loadavg,
        loadavg_at_end: machine::loadavg(),
    }
}

/// Both guests must have booted with the command line we meant: the kernel
/// prints the one it got. A difference would make the comparison unfair,
/// so it is fatal; a kernel that does not print it only warns.
fn check_cmdline(system: System, run: usize, console: &str, expected: &str, warnings: &mut Vec<String>) -> Result<()> {
    match boot::printed_cmdline(console) {
        Some(printed) if printed == expected => Ok(()),
        Some(printed) => bail!(
            "run {run} {}: the guest kernel got a different command line:\n  printed:  {printed}\n  expected: {expected}",
            system.name()
        ),
        None => {
            warnings.push(format!("run {run} {}: the guest did not print its kernel command line", system.name()));
            Ok(())
        }
    }
}
