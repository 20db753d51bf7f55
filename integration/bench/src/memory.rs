//! `mm-bench memory`: what one running microVM costs the host in memory,
//! every process of it counted, mm side by side with QEMU's `microvm` and
//! (with `--firecracker PATH`) Firecracker, all with the same devices.
//!
//! mm runs as in production: a real `mm-broker` (`mmctl run -d`, cold boot,
//! no warm start) spawns mm-vmm and one jailed `mm-device` process per
//! device (read-only root disk, writable disk, vsock, net on a TAP in the
//! broker's own network namespace); each of them is two processes, the
//! jail's outer half that waits and the jailed child, and both are counted.
//! The peers boot the same kernel and root image with the command line the
//! broker gave mm's guest (read from mm-vmm's argv, so the same mm-init
//! parameters, address and workload), a fresh writable disk made as the
//! broker makes it, vsock, and net on a TAP in a network namespace this
//! benchmark creates. Every system's guest runs the same idle workload.
//!
//! Per run and system: boot until the guest's exec agent answers over the
//! hybrid vsock (`true`), wait `--settle-secs`, then sample every process
//! of the microVM (`/proc/PID/smaps_rollup` and `smaps`) every few seconds
//! until the total Pss holds still; then check inside the guest that it got
//! the command line and the devices it should have. mm's figures are only
//! reported if every one of its processes ran jailed (checked in `/proc`,
//! not assumed). What each figure means: README.md, "Host memory".

mod mm;
mod peers;
mod report;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use mm_integration::devices::Scratch;
use mm_integration::netns::TestNetwork;
use serde::Serialize;

use crate::brokered;
use crate::machine::{self, Machine};
use crate::procmem::{self, GuestRam, Sample, process_tree};
use crate::snapshot::SnapSystem;
use crate::snapshot::fclaunch::Launcher;

/// The guest's workload: idle (no fork after the first).
pub const WORKLOAD: [&str; 2] = ["sleep", "1000000"];
/// Samples this far apart must agree to within [`STABLE_KIB`] for the
/// microVM to count as settled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const STABLE_KIB: u64 = 256;

#[derive(Debug, Args)]
pub struct MemoryArgs {
    #[command(flatten)]
    pub compared: crate::snapshot::ComparedRuns,
    /// After the guest first answers, wait this long before sampling.
    #[arg(long, default_value_t = 20)]
    pub settle_secs: u64,
    /// Sample until two samples 5 s apart differ by at most 256 KiB of Pss,
    /// or this long after the guest answered (then a warning).
    #[arg(long, default_value_t = 180)]
    pub settle_timeout_secs: u64,
    /// A cold boot must answer within this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
    /// Where the peers' writable disks go (1 GiB sparse each); a directory
    /// per benchmark inside it, removed at the end.
    #[arg(long, default_value = "/var/tmp")]
    pub dir: PathBuf,
    /// Also print the JSON result on stdout (the table then goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Where to write the JSON result [default: <workspace>/target/bench/memory.json].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// What every system boots and where its files go.
pub struct Setup {
    pub cpus: u8,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    /// The broker's built-in image: every system's read-only root.
    pub rootfs: PathBuf,
    pub dir: PathBuf,
    pub log_dir: PathBuf,
    pub boot_timeout: Duration,
    pub settle: Duration,
    pub settle_timeout: Duration,
}

impl Setup {
    pub fn log_base(&self, system: SnapSystem, run: usize) -> PathBuf {
        self.log_dir.join(format!("{}-{run}", system.name()))
    }
}

/// The guest the broker made for mm, which the peers boot too.
#[derive(Debug, Clone, Serialize)]
pub struct GuestLine {
    /// What the broker passed to mm-vmm's `--cmdline` (mm-init's parameters).
    pub broker_params: String,
    /// The workload (after mm-vmm's `--`).
    pub workload: Vec<String>,
    /// The whole kernel command line: mm-vmm's own parts, the broker's
    /// parameters and `mm.cmd=` (each VMM adds its `virtio_mmio.device=`).
    pub cmdline: String,
    /// The guest's MAC address (the broker's choice; the peers' TAPs are in
    /// a namespace of their own, so the same one does not clash).
    pub mac: String,
    /// The gateway's address and prefix length (`mm.gw=`, `mm.ip=…/P`),
    /// given to the peers' bridge.
    pub gateway: Option<(String, u8)>,
}

impl GuestLine {
    /// From mm-vmm's argv as the broker started it: `--cmdline PARAMS`
    /// and the workload after `--`.
    pub fn from_vmm_argv(argv: &[String], config: &crate::BootConfig, mac: &str) -> Result<GuestLine> {
        let params = argv
            .windows(2)
            .find(|w| w[0] == "--cmdline")
            .map(|w| w[1].clone())
            .context("mm-vmm was started without --cmdline")?;
        let workload: Vec<String> =
            argv.iter().position(|a| a == "--").map(|i| argv[i + 1..].to_vec()).unwrap_or_default();
        let config = crate::BootConfig { extra_cmdline: params.clone(), workload: workload.clone(), ..config.clone() };
        let cmdline = crate::mmvmm::kernel_cmdline(&config)?;
        Ok(GuestLine { gateway: gateway(&params), broker_params: params, workload, cmdline, mac: mac.to_string() })
    }
}

/// `mm.gw=G` and the prefix of `mm.ip=A/P` among kernel parameters.
fn gateway(params: &str) -> Option<(String, u8)> {
    let value = |key: &str| params.split_whitespace().find_map(|w| w.strip_prefix(key));
    let prefix = value("mm.ip=")?.split_once('/')?.1.parse().ok()?;
    Some((value("mm.gw=")?.to_string(), prefix))
}

/// One process of a microVM.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessMem {
    /// The broker's role (`vmm`, `block-root`, …), or `qemu`,
    /// `vsock-backend`, `firecracker`.
    pub role: String,
    pub pid: u32,
    /// `outer` (a jail's waiting half), `inner` (the jailed process) or
    /// `only` (a process that is not split).
    pub half: &'static str,
    pub comm: String,
    pub pss_kib: u64,
    pub own_anon_shmem_kib: u64,
    pub own_file_kib: u64,
    pub guest_ram_pss_kib: u64,
    pub sample: Sample,
}

/// Every process of one microVM, sampled once.
#[derive(Debug, Clone)]
pub struct Measured {
    pub processes: Vec<ProcessMem>,
    pub total: Sample,
    pub guest_ram_resident_kib: u64,
}

/// Samples the process trees rooted at `roles` (role, pid): a jailed
/// process's tree is its outer half and the jailed child.
pub fn measure(roles: &[(String, u32)], ram: &GuestRam) -> Result<Measured> {
    let mut processes = Vec::new();
    let mut ram_maps = Vec::new();
    for (role, root) in roles {
        let tree = process_tree(*root);
        for (index, pid) in tree.iter().enumerate() {
            let (sample, maps) = procmem::sample_process(*pid, ram, false).with_context(|| role.clone())?;
            let half = match (tree.len(), index) {
                (1, _) => "only",
                (_, 0) => "outer",
                _ => "inner",
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string();
            processes.push(ProcessMem {
                role: role.clone(),
                pid: *pid,
                half,
                comm,
                pss_kib: sample.total_pss_kib,
                own_anon_shmem_kib: sample.own_anon_shmem_kib(),
                own_file_kib: sample.own_file_kib(),
                guest_ram_pss_kib: sample.guest_ram_pss_kib,
                sample,
            });
            ram_maps.push((*pid, maps));
        }
    }
    let total = Sample::sum(processes.iter().map(|p| &p.sample));
    if total.guest_ram_mappings == 0 {
        bail!("no guest-RAM mapping ({ram:?}) in any process of {roles:?}");
    }
    let guest_ram_resident_kib = procmem::guest_ram_resident_kib(&ram_maps, procmem::mapped_file)?;
    Ok(Measured { processes, total, guest_ram_resident_kib })
}

/// How the sampling ended.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Settle {
    /// Samples taken (the last one is reported).
    pub samples: usize,
    /// The last two samples agreed to within 256 KiB of total Pss.
    pub settled: bool,
    /// The difference between them.
    pub last_change_kib: u64,
    /// The guest's first answer → the reported sample.
    pub waited_ms: f64,
}

/// Waits `setup.settle`, then samples every 5 s until the total Pss holds
/// still (or `setup.settle_timeout` has passed since `answered`).
pub fn settle(roles: &[(String, u32)], ram: &GuestRam, setup: &Setup, answered: Instant) -> Result<(Measured, Settle)> {
    std::thread::sleep(setup.settle.saturating_sub(answered.elapsed()));
    let mut last = measure(roles, ram)?;
    let mut samples = 1;
    loop {
        std::thread::sleep(SAMPLE_EVERY);
        let now = measure(roles, ram)?;
        samples += 1;
        let change = now.total.total_pss_kib.abs_diff(last.total.total_pss_kib);
        let settled = change <= STABLE_KIB;
        if settled || answered.elapsed() >= setup.settle_timeout {
            let waited_ms = crate::snapshot::ms(answered.elapsed());
            return Ok((now, Settle { samples, settled, last_change_kib: change, waited_ms }));
        }
        last = now;
    }
}

/// The `/proc/PID/status` fields that show confinement, and what each must
/// read in every thread of a confined process.
const CONFINED: [(&str, &str); 4] =
    [("Seccomp", "2"), ("NoNewPrivs", "1"), ("CapEff", "0000000000000000"), ("CapPrm", "0000000000000000")];

fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim)
}

/// What in `status` (one thread's `/proc/PID/task/TID/status`) says it is
/// not confined: a field of [`CONFINED`] that reads otherwise, or root's uid.
pub fn status_problems(status: &str) -> Vec<String> {
    let name = status_field(status, "Name").unwrap_or("?");
    let mut problems = Vec::new();
    for (key, want) in CONFINED {
        let got = status_field(status, key).unwrap_or("(absent)");
        if got != want {
            problems.push(format!("{name}: {key} is {got}, not {want}"));
        }
    }
    let uid = status_field(status, "Uid").and_then(|u| u.split_whitespace().next()).unwrap_or("(absent)");
    if uid == "0" || uid == "(absent)" {
        problems.push(format!("{name}: runs as uid {uid}"));
    }
    problems
}

/// Why `pid` is not confined as a jailed process: every thread under a
/// seccomp filter with `no_new_privs`, no capabilities and a uid other
/// than root's, and the namespaces `own` not shared with this benchmark.
/// Empty when it is.
pub fn confinement_problems(pid: u32, own: &[&str]) -> Vec<String> {
    use mm_integration::proc_status::{namespace, threads};
    let mut problems = Vec::new();
    match threads(pid as i32) {
        Ok(tids) => {
            for tid in tids {
                if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) {
                    problems.extend(status_problems(&status).into_iter().map(|p| format!("{pid}/{tid} {p}")));
                }
            }
        }
        Err(e) => problems.push(format!("/proc/{pid}/task: {e}")),
    }
    let me = std::process::id() as i32;
    for kind in own {
        match (namespace(pid as i32, kind), namespace(me, kind)) {
            (Ok(theirs), Ok(mine)) if theirs == mine => {
                problems.push(format!("{pid} shares the benchmark's {kind} namespace"))
            }
            (Ok(_), Ok(_)) => {}
            (a, b) => problems.push(format!("{kind} namespaces of {pid} / the benchmark: {a:?} / {b:?}")),
        }
    }
    problems
}

/// What the guest itself says about its devices and command line, from
/// one exec after the sample ([`GUEST_CHECK`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GuestCheck {
    /// /proc/cmdline as the guest kernel got it.
    pub cmdline: String,
    /// `vda ro=1` …: the block devices and whether each is read-only.
    pub disks: Vec<String>,
    /// `eth0 up` …: network interfaces and their state.
    pub nets: Vec<String>,
}

/// The guest side of [`GuestCheck`], run with `sh -c`.
pub const GUEST_CHECK: &str = "cat /proc/cmdline; \
    for d in vda vdb vdc; do [ -e /sys/block/$d ] && echo \"blk $d ro=$(cat /sys/block/$d/ro)\"; done; \
    for n in /sys/class/net/*; do echo \"net ${n##*/} $(cat $n/operstate)\"; done; true";

impl GuestCheck {
    pub fn parse(output: &str) -> GuestCheck {
        let mut check = GuestCheck::default();
        for line in output.lines() {
            if let Some(disk) = line.strip_prefix("blk ") {
                check.disks.push(disk.to_string());
            } else if let Some(net) = line.strip_prefix("net ") {
                check.nets.push(net.to_string());
            } else if check.cmdline.is_empty() {
                check.cmdline = line.trim().to_string();
            }
        }
        check
    }

    /// What makes this guest unlike the broker's: a word of `expected`
    /// missing from its command line, a root that is not the read-only
    /// `vda`, a writable disk that is not `vdb`, no `eth0`. Empty when
    /// it matches.
    pub fn problems(&self, expected: &str) -> Vec<String> {
        let words: Vec<&str> = self.cmdline.split_whitespace().collect();
        let mut problems: Vec<String> = expected
            .split_whitespace()
            .filter(|w| !words.contains(w))
            .map(|w| format!("kernel parameter {w:?} missing"))
            .collect();
        let expected_disks = ["vda ro=1", "vdb ro=0"];
        if self.disks != expected_disks {
            problems.push(format!("disks {:?}, not {expected_disks:?}", self.disks));
        }
        if !self.nets.iter().any(|n| n.starts_with("eth0 ")) {
            problems.push(format!("no eth0 among {:?}", self.nets));
        }
        problems
    }
}

/// Runs [`GUEST_CHECK`] through the exec agent at `uds` and fails on any
/// difference from the broker's guest: a comparison between different
/// guests would say nothing.
pub fn check_guest(name: &str, uds: &Path, expected: &str) -> Result<GuestCheck> {
    let output = crate::snapshot::probe::exec_output(uds, &["sh", "-c", GUEST_CHECK], Duration::from_secs(120))
        .with_context(|| format!("{name}: the guest check"))?;
    let check = GuestCheck::parse(&output);
    let problems = check.problems(expected);
    if !problems.is_empty() {
        bail!("{name}: the guest differs from the broker's: {problems:?}\n  guest: {check:?}\n  expected: {expected}");
    }
    Ok(check)
}

/// Waits until the exec agent behind `uds` runs `true`, trying every
/// second; `alive` is asked between 30 s tries (a VMM that died fails at
/// once rather than at the deadline).
pub fn wait_ready(uds: &Path, deadline: Instant, mut alive: impl FnMut() -> Result<()>) -> Result<Instant> {
    loop {
        let chunk = (Instant::now() + Duration::from_secs(30)).min(deadline);
        match crate::snapshot::probe::exec_until(uds, Duration::from_secs(1), chunk) {
            Ok((answered, _)) => return Ok(answered),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => alive()?,
        }
    }
}

/// One run of one system.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemRun {
    pub system: &'static str,
    pub run: usize,
    pub version: String,
    /// Every process that runs guest-facing code was confined (checked in
    /// /proc: seccomp, no_new_privs, no capabilities, not root, namespaces
    /// of its own). mm's figures are never reported without it.
    pub jailed: bool,
    /// How that was decided, or what was found wanting.
    pub confinement: Vec<String>,
    pub process_count: usize,
    /// Sums over every process of the microVM, KiB.
    pub pss_kib: u64,
    pub pss_anon_kib: u64,
    pub pss_shmem_kib: u64,
    pub pss_file_kib: u64,
    /// Guest RAM: the Pss of its mappings (summed over the processes that
    /// map it), and what is resident (a memfd's allocated size, counted
    /// once; anonymous RAM's Rss).
    pub guest_ram_pss_kib: u64,
    pub guest_ram_resident_kib: u64,
    /// The VMM's own memory: Pss less guest RAM's Pss, and its two parts.
    pub vmm_pss_kib: u64,
    pub vmm_anon_shmem_kib: u64,
    pub vmm_file_kib: u64,
    /// What the microVM holds on the host: `vmm_pss_kib` plus
    /// `guest_ram_resident_kib` (for mm more than `pss_kib`: memfd pages
    /// that no process maps are in no Pss).
    pub host_kib: u64,
    pub processes: Vec<ProcessMem>,
    /// Spawn (or `mmctl run -d`) → the first exec answered.
    pub ready_ms: f64,
    pub settle: Settle,
    pub guest: GuestCheck,
    /// mm only: the broker's own Pss, one per host whatever the number of
    /// microVMs (not in the sums above).
    pub broker_pss_kib: Option<u64>,
    pub other_vms_running: usize,
    pub loadavg_at_start: String,
    pub loadavg_at_end: String,
}

impl MemRun {
    pub fn new(system: SnapSystem, run: usize, version: String) -> MemRun {
        MemRun { system: system.name(), run, version, ..MemRun::default() }
    }

    /// Fills in the figures from `measured`.
    pub fn set_memory(&mut self, measured: Measured, settle: Settle) {
        let t = &measured.total;
        self.process_count = measured.processes.len();
        self.pss_kib = t.total_pss_kib;
        self.pss_anon_kib = t.total_pss_anon_kib;
        self.pss_shmem_kib = t.total_pss_shmem_kib;
        self.pss_file_kib = t.total_pss_file_kib;
        self.guest_ram_pss_kib = t.guest_ram_pss_kib;
        self.guest_ram_resident_kib = measured.guest_ram_resident_kib;
        self.vmm_pss_kib = t.vmm_kib();
        self.vmm_anon_shmem_kib = t.own_anon_shmem_kib();
        self.vmm_file_kib = t.own_file_kib();
        self.host_kib = self.vmm_pss_kib + self.guest_ram_resident_kib;
        self.processes = measured.processes;
        self.settle = settle;
    }
}

pub fn run(args: MemoryArgs) -> Result<()> {
    if args.compared.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if args.compared.systems.first() != Some(&SnapSystem::Mm) {
        bail!("--systems must start with mm: the peers boot the command line mm's broker made");
    }
    // Before any thread starts, so that all of them inherit the mask.
    let signals = brokered::block_signals()?;
    let out = args.out.clone().unwrap_or_else(|| mm_integration::repo_root().join("target/bench/memory.json"));
    let log_dir = out.parent().unwrap_or(Path::new(".")).join("memory-logs");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    // Removed, with every disk copy and snapshot file in it, when dropped.
    let work = Scratch::new_in(&args.dir, "bench-memory")?;

    let (systems, firecracker, mut warnings) = args.compared.peers()?;
    let setup = Setup {
        cpus: args.compared.cpus,
        memory_mib: args.compared.memory_mib,
        kernel: mm_integration::guest_kernel()?,
        rootfs: mm_integration::guest_rootfs()?,
        dir: work.0.clone(),
        log_dir,
        boot_timeout: Duration::from_secs(args.timeout_secs),
        settle: Duration::from_secs(args.settle_secs),
        settle_timeout: Duration::from_secs(args.settle_timeout_secs.max(args.settle_secs)),
    };
    let machine = Machine::detect();
    eprintln!(
        "mm-bench: memory: {} run(s) of {:?}, {} MiB, {} vCPU",
        args.compared.runs, systems, args.compared.memory_mib, args.compared.cpus
    );

    let broker = Arc::new(brokered::start_broker("bench-mem", &["--no-warm-starts"])?);
    brokered::cleanup_on_signal("memory", signals, Arc::downgrade(&broker));
    eprintln!("mm-bench: memory: broker in {}", broker.dir.0.display());
    let mut line = None;
    let measured =
        measure_all(&broker, &setup, &systems, firecracker.as_ref(), args.compared.runs, &mut line, &mut warnings);
    let broker_log = setup.log_dir.join("broker.log");
    let _ = std::fs::write(&broker_log, broker.log());
    // Last reference (unless a signal's cleanup holds one): its Drop removes
    // the microVMs, ends the broker and deletes its namespace.
    drop(broker);
    drop(brokered::CLEANUP.lock());
    let runs = measured.with_context(|| format!("broker log: {}", broker_log.display()))?;
    let line = line.context("mm did not run")?;
    let report = report::MemoryReport::new(machine, &setup, &args, line, firecracker.as_ref(), runs, warnings)?;
    report.emit(&out, args.json)
}

/// Every run of every system, in turn.
fn measure_all(
    broker: &mm_integration::broker::TestBroker,
    setup: &Setup,
    systems: &[SnapSystem],
    firecracker: Option<&Launcher>,
    runs: usize,
    line: &mut Option<GuestLine>,
    warnings: &mut Vec<String>,
) -> Result<Vec<MemRun>> {
    let mut network: Option<TestNetwork> = None;
    let mut records = Vec::new();
    for run in 1..=runs {
        for &system in systems {
            let (others, loadavg) = (machine::other_vmms().len(), machine::loadavg());
            eprintln!(
                "mm-bench: memory: run {run} {}: cold boot ({others} other VM(s), load {loadavg})",
                system.name()
            );
            let result = match system {
                SnapSystem::Mm => mm::run(broker, setup, run, warnings).map(|(record, made)| {
                    line.get_or_insert(made);
                    record
                }),
                peer => {
                    let line = line.as_ref().context("mm runs first")?;
                    if network.is_none() {
                        network = Some(peers::network(line)?);
                    }
                    let network = network.as_ref().expect("made above");
                    match peer {
                        SnapSystem::Qemu => peers::qemu(setup, line, network, run),
                        _ => peers::firecracker(
                            setup,
                            firecracker.context("no Firecracker launcher")?,
                            line,
                            network,
                            run,
                            warnings,
                        ),
                    }
                }
            };
            let mut record = result.with_context(|| format!("run {run} of {}", system.name()))?;
            record.other_vms_running = others;
            record.loadavg_at_start = loadavg;
            record.loadavg_at_end = machine::loadavg();
            if others > 0 {
                warnings.push(format!("run {run} {}: {others} other VM(s) running at its start", system.name()));
            }
            if !record.settle.settled {
                warnings.push(format!(
                    "run {run} {}: Pss still moved {} KiB in the last 5 s when sampled",
                    system.name(),
                    record.settle.last_change_kib
                ));
            }
            eprintln!("mm-bench: memory: {}", report::run_line(&record));
            records.push(record);
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_line_comes_from_mm_vmms_argv() {
        let argv: Vec<String> = [
            "/bin/mm-vmm",
            "--jail-uid",
            "200003",
            "--kernel",
            "/k",
            "--cmdline",
            "quiet root=/dev/vda ro init=/init mm.overlay=/dev/vdb mm.hostname=mem-1 mm.ip=10.100.0.2/24 \
             mm.gw=10.100.0.1",
            "--device",
            "block=fd:3",
            "--",
            "sleep",
            "1000000",
        ]
        .map(String::from)
        .to_vec();
        let config = crate::BootConfig { cpus: 1, memory_mib: 128, extra_cmdline: String::new(), workload: vec![] };
        let line = GuestLine::from_vmm_argv(&argv, &config, "06:00:0a:64:00:02").unwrap();
        assert_eq!(line.workload, ["sleep", "1000000"]);
        assert!(line.cmdline.starts_with(mm_vmm::vm::BASE_CMDLINE), "{}", line.cmdline);
        assert!(line.cmdline.contains(" mm.overlay=/dev/vdb mm.hostname=mem-1 "), "{}", line.cmdline);
        assert!(line.cmdline.ends_with(&format!("mm.cmd={}", mm_vmm::vm::encode_command(&line.workload))));
        assert_eq!(line.gateway, Some(("10.100.0.1".to_string(), 24)));
        assert!(GuestLine::from_vmm_argv(&argv[..5], &config, "").is_err());
        assert_eq!(gateway("mm.ip=10.0.0.2/16"), None);
    }

    #[test]
    fn a_run_takes_its_figures_from_the_sum() {
        let sample = Sample {
            total_pss_kib: 30_000,
            total_pss_anon_kib: 1_000,
            total_pss_shmem_kib: 21_000,
            total_pss_file_kib: 8_000,
            guest_ram_pss_kib: 20_000,
            guest_ram_pss_shmem_kib: 20_000,
            guest_ram_mappings: 1,
            ..Sample::default()
        };
        let process = ProcessMem {
            role: "vmm".into(),
            pid: 1,
            half: "inner",
            comm: "mm-vmm".into(),
            pss_kib: 30_000,
            own_anon_shmem_kib: 2_000,
            own_file_kib: 8_000,
            guest_ram_pss_kib: 20_000,
            sample,
        };
        let measured = Measured { processes: vec![process], total: sample, guest_ram_resident_kib: 23_000 };
        let mut run = MemRun::new(SnapSystem::Mm, 1, "v".into());
        run.set_memory(measured, Settle::default());
        assert_eq!((run.process_count, run.pss_kib, run.guest_ram_pss_kib), (1, 30_000, 20_000));
        assert_eq!((run.vmm_pss_kib, run.vmm_anon_shmem_kib, run.vmm_file_kib), (10_000, 2_000, 8_000));
        // Resident guest RAM beyond its Pss (unmapped memfd pages) counts.
        assert_eq!((run.guest_ram_resident_kib, run.host_kib), (23_000, 33_000));
    }

    #[test]
    fn confinement_is_read_from_status() {
        let jailed = "Name:\tmm-device\nUid:\t200003\t200003\t200003\t200003\nNoNewPrivs:\t1\nSeccomp:\t2\n\
                      CapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n";
        assert!(status_problems(jailed).is_empty(), "{:?}", status_problems(jailed));
        let outer = "Name:\tmm-vmm\nUid:\t0\t0\t0\t0\nNoNewPrivs:\t0\nSeccomp:\t0\n\
                     CapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n";
        let problems = status_problems(outer);
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("Seccomp is 0")));
        assert!(problems.iter().any(|p| p.contains("uid 0")));
        assert_eq!(status_problems("").len(), 5);
    }

    #[test]
    fn this_process_is_not_confined() {
        let problems = confinement_problems(std::process::id(), &["mnt"]);
        assert!(problems.iter().any(|p| p.contains("Seccomp")), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("shares the benchmark's mnt namespace")), "{problems:?}");
    }

    #[test]
    fn the_guest_check_wants_the_brokers_devices_and_line() {
        let output = "console=ttyS0 quiet root=/dev/vda ro mm.cmd=x virtio_mmio.device=4K@0xd0000000:5\n\
                      blk vda ro=1\nblk vdb ro=0\nnet eth0 up\nnet lo unknown\n";
        let check = GuestCheck::parse(output);
        assert_eq!(check.disks, ["vda ro=1", "vdb ro=0"]);
        assert_eq!(check.nets, ["eth0 up", "lo unknown"]);
        assert!(check.problems("console=ttyS0 root=/dev/vda mm.cmd=x").is_empty());
        assert_eq!(check.problems("mm.ip=1"), ["kernel parameter \"mm.ip=1\" missing"]);
        let swapped = GuestCheck::parse("x\nblk vda ro=0\nblk vdb ro=1\nnet lo unknown\n");
        assert_eq!(swapped.problems("x").len(), 2, "{:?}", swapped.problems("x"));
    }

    #[test]
    fn the_guest_check_script_runs_in_busybox_sh() {
        if !Path::new("/bin/busybox").exists() {
            return;
        }
        let out = std::process::Command::new("/bin/busybox").args(["sh", "-c", GUEST_CHECK]).output().unwrap();
        assert!(out.status.success());
        let check = GuestCheck::parse(&String::from_utf8_lossy(&out.stdout));
        assert!(!check.cmdline.is_empty());
        assert!(check.nets.iter().any(|n| n.starts_with("lo ")), "{check:?}");
    }
}
