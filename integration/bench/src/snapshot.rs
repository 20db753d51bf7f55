//! `mm-bench snapshot`: snapshot and restore of a running guest, mm-vmm
//! side by side with QEMU's migrate-to-file / `-incoming` and, when
//! `--firecracker PATH` is given, Firecracker's snapshot create / load.
//!
//! Every system boots the same kernel with the same command line, 1 vCPU
//! and the same RAM, its root on a virtio-blk copy of the built-in ext4
//! image, and runs the same workload (a shell loop that ticks on the
//! console and answers serial pings, see `probe.rs`). Per run and system:
//! one cold boot until the guest answers, a snapshot while it runs (pause
//! → save → resume), the source ended, then a restore in a fresh VMM
//! process until the guest answers again. The systems alternate (mm, qemu,
//! firecracker, mm, …) so that drift in the host's load hits all alike.
//! What each figure means and how it is taken: README.md, "Snapshot and
//! restore".

pub mod fclaunch;
mod firecracker;
mod mm;
pub mod probe;
mod qemu;
mod report;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use mm_integration::devices::Scratch;
use serde::Serialize;

use crate::BootConfig;
use crate::machine::{self, Machine};

/// What a side-by-side benchmark runs (`snapshot`, `memory`): how many
/// times, which guest, and which systems with which peer binaries.
#[derive(Debug, Args)]
pub struct ComparedRuns {
    /// Runs per system (each one cold boot); the systems alternate (mm,
    /// qemu, firecracker, mm, …). Figures are medians.
    #[arg(long, default_value_t = 2)]
    pub runs: usize,
    /// RAM of every guest, MiB (try 1024 to see what depends on it).
    #[arg(long, default_value_t = 128)]
    pub memory_mib: u64,
    /// vCPUs of every guest.
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// A Firecracker binary (built outside this repository, see
    /// integration/bench/README.md); without it that peer is skipped, saying so.
    #[arg(long)]
    pub firecracker: Option<PathBuf>,
    /// Firecracker's jailer, built beside it: Firecracker then runs jailed
    /// (chroot, mount namespace, memory cgroup, unprivileged ids) as in
    /// production, as mm always does. Without it Firecracker runs
    /// unjailed (still seccomp-filtered), which the result records.
    #[arg(long, requires = "firecracker")]
    pub firecracker_jailer: Option<PathBuf>,
    /// The systems to run, in this order (one alone for trying things out;
    /// `memory` needs mm among them, first).
    #[arg(long, value_delimiter = ',', default_values = ["mm", "qemu", "firecracker"])]
    pub systems: Vec<SnapSystem>,
}

impl ComparedRuns {
    /// The systems to run, Firecracker's launcher (jailer paths made
    /// absolute), and a warning for each system dropped: Firecracker is
    /// skipped, saying so, without `--firecracker`; QEMU is installed if
    /// asked for and missing.
    pub fn peers(&self) -> Result<(Vec<SnapSystem>, Option<fclaunch::Launcher>, Vec<String>)> {
        let mut warnings = Vec::new();
        let mut systems = self.systems.clone();
        let absolute = |path: &Path| std::fs::canonicalize(path).with_context(|| format!("{}", path.display()));
        let firecracker = match (&self.firecracker, systems.contains(&SnapSystem::Firecracker)) {
            (Some(path), true) => Some(fclaunch::Launcher {
                binary: absolute(path)?,
                jailer: self.firecracker_jailer.as_deref().map(absolute).transpose()?,
                memory_limit_bytes: (self.memory_mib + 256) << 20,
            }),
            (None, true) => {
                let msg = "firecracker skipped: no --firecracker PATH given (build it outside this repository, \
                           see integration/bench/README.md)";
                eprintln!("mm-bench: {msg}");
                warnings.push(msg.to_string());
                systems.retain(|s| *s != SnapSystem::Firecracker);
                None
            }
            (_, false) => None,
        };
        if systems.contains(&SnapSystem::Qemu) {
            crate::qemu::ensure_installed()?;
        }
        Ok((systems, firecracker, warnings))
    }
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub compared: ComparedRuns,
    /// Where disk copies and snapshot files go: a real disk (tmpfs would
    /// make "durable" meaningless). A directory per benchmark inside it,
    /// removed at the end.
    #[arg(long, default_value = "/var/tmp")]
    pub dir: PathBuf,
    /// The workload's tick period, ms: the resolution of the "first tick
    /// after restore" figure.
    #[arg(long, default_value_t = 100)]
    pub tick_ms: u64,
    /// Drop the snapshot files from the host page cache before each restore
    /// (default: restore from the cache the snapshot just filled).
    #[arg(long)]
    pub cold_cache: bool,
    /// A cold boot must answer within this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
    /// Extra kernel parameters for every guest.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Also print the JSON result on stdout (the table then goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Where to write the JSON result [default: <workspace>/target/bench/snapshot.json].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapSystem {
    Mm,
    Qemu,
    Firecracker,
}

impl SnapSystem {
    pub fn name(self) -> &'static str {
        match self {
            SnapSystem::Mm => "mm",
            SnapSystem::Qemu => "qemu",
            SnapSystem::Firecracker => "firecracker",
        }
    }
}

/// What every system boots and where its files go.
pub struct Setup {
    /// RAM, vCPUs, the workload, and `root=/dev/vda rw init=/init` plus
    /// `--cmdline` as extra kernel parameters.
    pub config: BootConfig,
    /// The full command line mm-vmm builds (QEMU and Firecracker get it
    /// verbatim; each VMM adds its own `virtio_mmio.device=` entries).
    pub cmdline: String,
    pub kernel: PathBuf,
    pub dir: PathBuf,
    pub log_dir: PathBuf,
    pub boot_timeout: Duration,
    /// A restored guest must answer within this.
    pub restore_timeout: Duration,
    pub cold_cache: bool,
}

impl Setup {
    /// A fresh directory for one run of one system, its own copy of the
    /// root image in it.
    pub fn run_dir(&self, system: SnapSystem, run: usize) -> Result<(PathBuf, PathBuf)> {
        let dir = self.dir.join(format!("{}-{run}", system.name()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let disk = dir.join("root.ext4");
        mm_integration::devices::rootfs_copy(&disk)?;
        Ok((dir, disk))
    }

    pub fn log_base(&self, system: SnapSystem, run: usize, phase: &str) -> PathBuf {
        self.log_dir.join(format!("{}-{run}-{phase}", system.name()))
    }
}

/// One run of one system. Spans are wall time in ms from the bench's side
/// unless the name says otherwise; None where a system has no such figure.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SnapRun {
    pub system: &'static str,
    pub run: usize,
    pub version: String,
    /// Cold boot: VMM spawned → `mm-init: user space started` on the console.
    pub boot_to_init_ms: Option<f64>,
    /// Cold boot: VMM spawned → the first answer (`answer_probe`).
    pub boot_to_answer_ms: f64,
    /// `exec true over vsock` (mm, firecracker) or `serial ping` (qemu).
    pub answer_probe: &'static str,
    /// One more answer from the booted guest once it runs steadily: what
    /// the probe itself costs in the guest, the floor under
    /// `restore_to_answer_ms` (an exec is ~1-3 s of emulated kernel work
    /// on PVM hosts).
    pub steady_answer_ms: f64,
    /// Guest RAM the host had allocated (Rss of the guest-RAM mapping) just
    /// before the pause: the memory the guest touched.
    pub touched_kib: Option<u64>,
    /// Pause requested → both snapshot files written and fsynced.
    pub snapshot_ms: f64,
    /// The VMM's own save step (mm: its `save_us`; qemu: `migrate` →
    /// `completed`; firecracker: `PUT /snapshot/create`).
    pub save_ms: Option<f64>,
    /// How long the guest stood still. Peers: pause requested → resume
    /// answered. mm (a snapshot of the running guest): its vCPUs' pause for
    /// the cut, as mm-vmm timed it around parking and restarting them.
    pub pause_ms: f64,
    /// mm only: snapshot requested → resume answered, the time the guest's
    /// devices were held (its I/O waited; its vCPUs ran but for the cut).
    pub io_held_ms: Option<f64>,
    /// mm only: guest RAM written (non-zero pages), from mm-vmm's report.
    pub memory_written_kib: Option<u64>,
    /// Allocated blocks (what the disk holds) of the memory and state files.
    pub memory_file_disk_kib: u64,
    pub state_file_disk_kib: u64,
    /// Their apparent sizes (a sparse file is larger than what it holds).
    pub memory_file_size_kib: u64,
    pub state_file_size_kib: u64,
    /// mm only: both device back ends (block, vsock) spawned → listening,
    /// before the restore's clock starts.
    pub restore_devices_ms: Option<f64>,
    /// Restore requested (the VMM spawned) → vCPUs running: mm: its
    /// `first KVM_RUN` log line's CLOCK_MONOTONIC; qemu: `cont` answered;
    /// firecracker: `PATCH /vm Resumed` answered.
    pub restore_to_vcpus_ms: f64,
    /// mm only: spawn → mm-vmm's `main` in the jail (exec, the jail's
    /// outer half, namespaces, cgroups, re-exec): `restore_to_vcpus_ms`
    /// minus `restore_in_vmm_ms`.
    pub restore_spawn_ms: Option<f64>,
    /// The part inside the VMM: mm: `since_start_ms` of `first KVM_RUN`
    /// (its `main` → KVM_RUN); firecracker: API socket there → load and
    /// resume answered; qemu: QMP greeting → state loaded (`paused`) →
    /// `cont` answered.
    pub restore_in_vmm_ms: Option<f64>,
    /// Spawned → API ready (firecracker: its socket; qemu: QMP greeting).
    pub restore_api_ready_ms: Option<f64>,
    /// qemu: spawned → state loaded; firecracker: `PUT /snapshot/load`.
    pub restore_load_ms: Option<f64>,
    /// qemu: `cont`; firecracker: `PATCH /vm Resumed`.
    pub restore_resume_ms: Option<f64>,
    /// Restore requested → the first answer (`answer_probe`).
    pub restore_to_answer_ms: f64,
    /// Attempts the answer took (refused while the guest handled its reset).
    pub restore_answer_attempts: usize,
    /// Restore requested → the first `mmtick` line on the new console
    /// (its resolution is the tick period).
    pub restore_to_tick_ms: f64,
    /// The restored VMM's own memory: Pss of its process tree minus the
    /// guest-RAM mapping's Pss, sampled once the guest answered.
    pub restored_host_kib: Option<u64>,
    pub restored_total_pss_kib: Option<u64>,
    pub restored_guest_ram_pss_kib: Option<u64>,
    /// mm only: the two device back ends' Pss minus guest RAM.
    pub restored_devices_kib: Option<u64>,
    /// mm only: the same restore with guest RAM read in before the vCPUs
    /// start (`--memory-restore eager`), for comparison with the lazy one
    /// above: restore → vCPUs running, and guest RAM's Pss once answering.
    pub restore_eager_to_vcpus_ms: Option<f64>,
    pub restore_eager_guest_ram_pss_kib: Option<u64>,
    pub other_vms_running: usize,
    pub loadavg_at_start: String,
    pub loadavg_at_end: String,
}

/// A file opened for the snapshot to write, created empty.
pub fn create(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// fsyncs a file some other process wrote (QEMU's `cat`, Firecracker), so
/// that every system's snapshot time ends with its files durable; mm-vmm
/// syncs its own, so this costs it nothing.
pub fn sync(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", path.display()))
}

/// (allocated KiB, apparent KiB) of a file.
pub fn file_kib(path: &Path) -> Result<(u64, u64)> {
    let meta = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok((meta.blocks() * 512 / 1024, meta.len().div_ceil(1024)))
}

/// Milliseconds, rounded to µs.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// `later - earlier` in ms (0 if the clock says otherwise).
pub fn ms_between(earlier: Instant, later: Instant) -> f64 {
    ms(later.saturating_duration_since(earlier))
}

/// Waits until `path` exists (a socket a process creates), polling every
/// millisecond: the poll's resolution is part of the figures that use it.
pub fn wait_for_path(path: &Path, deadline: Instant) -> Result<()> {
    while !path.exists() {
        if Instant::now() >= deadline {
            bail!("{} did not appear in time", path.display());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Drops a file's pages from the host page cache (`--cold-cache`).
pub fn drop_cache(path: &Path) -> Result<()> {
    crate::block::drop_cache(path)
}

/// Load and other VMs, recorded at the start of each run.
pub fn host_state() -> (usize, String) {
    (machine::other_vmms().len(), machine::loadavg())
}

pub fn run(args: SnapshotArgs) -> Result<()> {
    if args.compared.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let extra = format!("root=/dev/vda rw init=/init {}", args.cmdline).trim().to_string();
    let config = BootConfig {
        cpus: args.compared.cpus,
        memory_mib: args.compared.memory_mib,
        extra_cmdline: extra,
        workload: probe::workload(args.tick_ms),
    };
    let out = args.out.clone().unwrap_or_else(|| mm_integration::repo_root().join("target/bench/snapshot.json"));
    let log_dir = out.parent().unwrap_or(Path::new(".")).join("snapshot-logs");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    // Removed, with every disk copy and snapshot file in it, when dropped.
    let work = Scratch::new_in(&args.dir, "bench-snapshot")?;

    let (systems, firecracker, mut warnings) = args.compared.peers()?;
    let setup = Setup {
        cmdline: crate::mmvmm::kernel_cmdline(&config)?,
        config,
        kernel: mm_integration::guest_kernel()?,
        dir: work.0.clone(),
        log_dir,
        boot_timeout: Duration::from_secs(args.timeout_secs),
        restore_timeout: Duration::from_secs(120),
        cold_cache: args.cold_cache,
    };
    // Built (or found) before the first clock starts.
    mm_integration::guest_rootfs()?;
    let machine = Machine::detect();
    eprintln!("mm-bench: snapshot: {} run(s) of {:?}, {} MiB", args.compared.runs, systems, args.compared.memory_mib);
    eprintln!("mm-bench: kernel command line: {}", setup.cmdline);

    let mut runs = Vec::new();
    for run in 1..=args.compared.runs {
        for &system in &systems {
            let (others, loadavg) = host_state();
            eprintln!(
                "mm-bench: run {run} {}: cold boot ({others} other VM(s) running, load {loadavg})",
                system.name()
            );
            let result = match system {
                SnapSystem::Mm => mm::run(&setup, run, &mut warnings),
                SnapSystem::Qemu => qemu::run(&setup, run, &mut warnings),
                SnapSystem::Firecracker => {
                    firecracker::run(&setup, firecracker.as_ref().expect("checked above"), run, &mut warnings)
                }
            };
            let mut record = result.with_context(|| format!("run {run} of {}", system.name()))?;
            record.other_vms_running = others;
            record.loadavg_at_start = loadavg;
            record.loadavg_at_end = machine::loadavg();
            if others > 0 {
                warnings.push(format!("run {run} {}: {others} other VM(s) running at its start", system.name()));
            }
            eprintln!("mm-bench: {}", report::run_line(&record));
            // Disk copies and snapshots go as soon as a run is done (a
            // 1 GiB guest's Firecracker snapshot is 1 GiB).
            let _ = std::fs::remove_dir_all(setup.dir.join(format!("{}-{run}", system.name())));
            runs.push(record);
        }
    }
    let report = report::SnapshotReport::new(machine, &setup, &args, runs, warnings)?;
    report.emit(&out, args.json)
}

/// Checks the command line a guest printed: every word of ours must be in
/// it (each VMM adds its device entries, Firecracker also `root=` and
/// `rw`/`ro` for its root drive), or the comparison would be unfair.
pub fn check_cmdline(name: &str, console: &str, expected: &str, warnings: &mut Vec<String>) -> Result<()> {
    let Some(printed) = crate::boot::printed_cmdline(console) else {
        warnings.push(format!("{name}: the guest did not print its kernel command line"));
        return Ok(());
    };
    let words: Vec<&str> = printed.split_whitespace().collect();
    let missing: Vec<&str> = expected.split_whitespace().filter(|w| !words.contains(w)).collect();
    if !missing.is_empty() {
        bail!(
            "{name}: the guest kernel's command line lacks {missing:?}:\n  printed:  {printed}\n  expected: {expected}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_check_allows_added_words_only() {
        let console =
            "[ 0.0] Kernel command line: console=ttyS0 root=/dev/vda rw virtio_mmio.device=4K@0xc0001000:5 x=1\n";
        let mut warnings = Vec::new();
        check_cmdline("t", console, "console=ttyS0 x=1", &mut warnings).unwrap();
        assert!(check_cmdline("t", console, "console=ttyS0 y=2", &mut warnings).is_err());
        check_cmdline("t", "no kernel here", "x", &mut warnings).unwrap();
        assert_eq!(warnings.len(), 1);
    }

    #[test]
    fn file_sizes_tell_holes_from_data() {
        let dir = std::env::temp_dir().join(format!("mm-bench-snap-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sparse");
        let file = create(&path).unwrap();
        file.set_len(8 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[1u8; 4096], 4 << 20).unwrap();
        sync(&path).unwrap();
        let (disk, size) = file_kib(&path).unwrap();
        assert_eq!(size, 8 << 10);
        assert!((4..=1024).contains(&disk), "{disk} KiB allocated");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
