//! `mm-bench fork`: what N clones of one snapshot cost, through a real
//! `mm-broker` and `mmctl fork`.
//!
//! A source microVM fills about `--touch-mib` of tmpfs with `seq`'s lines (its
//! working set), is snapshotted, branched once (`mmctl branch`: the
//! source's vCPU pause and held I/O from its audit line, the time until the
//! copy answers) and removed; then `mmctl fork --count N`
//! starts N clones. Per clone: how long until its exec agent answers, and
//! its host memory twice — idle after the fork, and after it has read its
//! whole working set (`md5sum` of the data: every page of it faults in) —
//! as guest RAM resident on the host (the memfd's allocated size, which is
//! what the clone costs whoever maps it) and as the Pss of all of its
//! processes; its own disk layer's allocated bytes against the snapshot's
//! disk. The host's MemAvailable is read before the fork and after the
//! reads, so the per-clone cost is also seen from outside the processes.
//!
//! What it shows: a clone's memory is the pages it touches, not its RAM
//! size, and its disk is what it writes. What it cannot show: clean pages
//! shared between clones — each clone's guest RAM is a memfd of its own
//! (the device processes map it), so a page read from the snapshot is
//! copied into it (README, "Fork and copy-on-write disks").
//!
//! No peer runs here: QEMU has no fork of a snapshot, and Firecracker's
//! restore maps the memory file privately (clean pages shared through the
//! page cache), which no vhost-user VMM can do; see the README.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use mm_integration::broker::TestBroker;
use serde::Serialize;

use crate::brokered::{self, meminfo_kib, memory_of, mmctl_json as json, mmctl_ok};
use crate::devbench::{unix_time, write_and_print};
use crate::machine::{self, Machine};

#[derive(Debug, Args)]
pub struct ForkArgs {
    /// Clones forked from the one snapshot (then as many single restores,
    /// one after another, for comparison).
    #[arg(long, default_value_t = 10)]
    pub count: u32,
    /// RAM of the source (and so of every clone), MiB.
    #[arg(long, default_value_t = 128)]
    pub memory_mib: u32,
    /// The source's working set: about this many MiB of data it writes to
    /// tmpfs before the snapshot, which every clone reads back.
    #[arg(long, default_value_t = 32)]
    pub touch_mib: u32,
    /// Also print the JSON result on stdout (the table then goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Where to write the JSON result [default: <workspace>/target/bench/fork.json].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// How long the source may take to boot and fill its data.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
}

/// One clone's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Clone {
    pub name: String,
    /// `mmctl fork` spawned → this clone's first `exec … true` answered
    /// (the clones are polled in order, so later ones include waiting).
    pub ready_ms: f64,
    /// Guest RAM resident on the host (its memfd's allocated KiB), idle
    /// after the fork, then after reading its working set.
    pub ram_idle_kib: u64,
    pub ram_after_read_kib: u64,
    /// Pss of all of its processes (mm-vmm and each device process, jails
    /// included), idle and after the read.
    pub pss_idle_kib: u64,
    pub pss_after_read_kib: u64,
    /// `mmctl exec … md5sum` of its working set: every page of it faults
    /// in from the snapshot (the source's own read is `source_read_ms`).
    pub read_ms: f64,
    /// Its own disk layer (rw.ext4 + rw.map), allocated KiB, after the read.
    pub disk_layer_kib: u64,
    /// Its disk's base is the snapshot's disk (same inode): no copy made.
    pub disk_base_shared: bool,
}

/// `mmctl branch source`: the live copy of the running source.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Branch {
    /// The source's vCPUs paused for the cut (its audit line).
    pub pause_us: u64,
    /// The source's I/O held for the capture and the disk copy.
    pub io_held_us: u64,
    /// `mmctl branch` spawned → exit (the copy restored and running).
    pub branch_ms: f64,
    /// → the copy's first `exec … true` answered.
    pub ready_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ForkReport {
    pub benchmark: &'static str,
    pub unix_time: u64,
    pub source: String,
    pub machine: Machine,
    pub parameters: serde_json::Value,
    /// The snapshot: vCPU pause, guest RAM saved, disk allocated (KiB).
    pub snapshot_pause_us: u64,
    pub snapshot_memory_kib: u64,
    pub snapshot_disk_kib: u64,
    pub branch: Branch,
    /// The same `md5sum` in the source before the snapshot (all resident).
    pub source_read_ms: f64,
    /// The source's cold boot: `mmctl run -d` spawned → its first exec
    /// answered (what N cold boots would cost, N times over).
    pub source_boot_ms: f64,
    /// N single `mmctl restore`s after the clones are gone, one after
    /// another, each spawned → its first exec answered.
    pub restore_ms: Vec<f64>,
    /// Idle Pss of the first of them (all its processes), sampled once all
    /// are up, as the clones were: the clones' idle Pss summed over this
    /// is what forking N costs against one.
    pub restored_pss_idle_kib: u64,
    /// `mmctl fork --count N`: spawn → exit (every clone restored and running).
    pub fork_ms: f64,
    pub clones: Vec<Clone>,
    /// Host MemAvailable before the fork minus after every clone read its
    /// data, divided by the clones (KiB): the cost seen from outside.
    pub mem_available_drop_per_clone_kib: i64,
    pub loadavg_at_end: String,
    pub warnings: Vec<String>,
}

impl ForkReport {
    fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "fork benchmark: {}", self.parameters);
        let _ = writeln!(out, "{}, load {} -> {}", self.machine, self.machine.loadavg_at_start, self.loadavg_at_end);
        let _ = writeln!(
            out,
            "snapshot: vCPUs paused {:.2} ms, guest RAM saved {:.1} MiB, disk {:.1} MiB; fork of {}: {:.0} ms",
            self.snapshot_pause_us as f64 / 1e3,
            mib(self.snapshot_memory_kib),
            mib(self.snapshot_disk_kib),
            self.clones.len(),
            self.fork_ms
        );
        let b = &self.branch;
        let _ = writeln!(
            out,
            "branch of the running source: vCPUs paused {:.2} ms, I/O held {:.1} ms, copy running after {:.0} ms, \
             answering after {:.0} ms",
            b.pause_us as f64 / 1e3,
            b.io_held_us as f64 / 1e3,
            b.branch_ms,
            b.ready_ms
        );
        let _ = writeln!(
            out,
            "{:<10} {:>9} {:>9} {:>12} {:>12} {:>11} {:>11} {:>10} {:>6}",
            "clone", "ready ms", "read ms", "RAM idle", "RAM read", "Pss idle", "Pss read", "disk own", "base"
        );
        for c in &self.clones {
            let _ = writeln!(
                out,
                "{:<10} {:>9.0} {:>9.0} {:>8.1} MiB {:>8.1} MiB {:>7.1} MiB {:>7.1} MiB {:>6.1} MiB {:>6}",
                c.name,
                c.ready_ms,
                c.read_ms,
                mib(c.ram_idle_kib),
                mib(c.ram_after_read_kib),
                mib(c.pss_idle_kib),
                mib(c.pss_after_read_kib),
                mib(c.disk_layer_kib),
                if c.disk_base_shared { "shared" } else { "COPY" }
            );
        }
        let _ = writeln!(out, "the source's own read of its working set: {:.0} ms", self.source_read_ms);
        let n = self.clones.len();
        let last_ready = self.clones.iter().map(|c| c.ready_ms).fold(0.0, f64::max);
        let restores: f64 = self.restore_ms.iter().sum();
        let _ = writeln!(
            out,
            "{n} clones answering: fork {:.1} s; {} single restores one after another {:.1} s; {n} cold boots \
             ~{:.0} s (one took {:.1} s)",
            last_ready / 1e3,
            self.restore_ms.len(),
            restores / 1e3,
            self.source_boot_ms * n as f64 / 1e3,
            self.source_boot_ms / 1e3
        );
        let clones_pss: u64 = self.clones.iter().map(|c| c.pss_idle_kib).sum();
        let _ = writeln!(
            out,
            "idle Pss: {n} clones {:.1} MiB, one restored VM {:.1} MiB ({:.1}x)",
            mib(clones_pss),
            mib(self.restored_pss_idle_kib),
            clones_pss as f64 / self.restored_pss_idle_kib.max(1) as f64
        );
        let _ = writeln!(
            out,
            "host MemAvailable drop per clone: {:.1} MiB",
            self.mem_available_drop_per_clone_kib as f64 / 1024.0
        );
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        out
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn allocated_kib(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) / 2).unwrap_or(0)
}

/// Branches the running `source` into `copy` and times it; the pause
/// comes from the source's audit line for the branch's snapshot.
fn measure_branch(broker: &TestBroker, args: &ForkArgs) -> Result<Branch> {
    let started = Instant::now();
    mmctl_ok(broker, &["branch", "source", "--name", "copy"])?;
    let branch_ms = started.elapsed().as_secs_f64() * 1e3;
    let answered = broker.exec_when_ready("copy", &["true"], Duration::from_secs(args.timeout_secs))?;
    if answered.status != Some(0) {
        bail!("the branch never answered an exec: {}", answered.stderr);
    }
    let ready_ms = started.elapsed().as_secs_f64() * 1e3;
    let audit = mmctl_ok(broker, &["audit", "source"])?;
    let line = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["event"] == "snapshot" && l["kind"] == "branch")
        .context("no branch snapshot in the source's audit log")?;
    Ok(Branch {
        pause_us: line["pause_us"].as_u64().unwrap_or(0),
        io_held_us: line["io_held_us"].as_u64().unwrap_or(0),
        branch_ms,
        ready_ms,
    })
}

pub fn run(args: ForkArgs) -> Result<()> {
    if args.count == 0 || args.touch_mib >= args.memory_mib {
        bail!("--count must be at least 1, and --touch-mib less than --memory-mib");
    }
    let out = args.out.clone().unwrap_or_else(|| mm_integration::repo_root().join("target/bench/fork.json"));
    let report = brokered::with_broker("fork", &[], &out, |broker| measure(broker, &args, Machine::detect()))?;
    write_and_print(&report, &report.table(), &out, args.json)
}

fn measure(broker: &TestBroker, args: &ForkArgs, machine: Machine) -> Result<ForkReport> {
    let memory = format!("{}M", args.memory_mib);
    // seq, not /dev/urandom: user space makes it fast, where the guest
    // kernel's RNG would run in PVM's emulator; ~1 MiB per 150,000 lines.
    let fill = format!(
        "mkdir -p /run/m && mount -t tmpfs m /run/m && seq 1 {} > /run/m/data && \
         echo data-ready $(wc -c < /run/m/data) && while true; do sleep 5; done",
        u64::from(args.touch_mib) * 150_000
    );
    let boot = Instant::now();
    // --cold: a boot, not a warm start from the broker's cache.
    mmctl_ok(broker, &["run", "-d", "--cold", "--name", "source", "--memory", &memory, "--", "sh", "-c", &fill])?;
    ready(broker, "source", args)?;
    let source_boot_ms = boot.elapsed().as_secs_f64() * 1e3;
    broker.wait_for_log("source", "data-ready", Duration::from_secs(args.timeout_secs))?;
    let read = Instant::now();
    mmctl_ok(broker, &["exec", "source", "--", "md5sum", "/run/m/data"])?;
    let source_read_ms = read.elapsed().as_secs_f64() * 1e3;
    let snapshot = json(broker, &["snapshot", "create", "source", "--name", "base", "-o", "json"])?;
    let id = snapshot["id"].as_str().context("no snapshot id")?.to_string();
    let branch = measure_branch(broker, args)?;
    mmctl_ok(broker, &["rm", "-f", "source", "copy"])?;
    let snapshot_disk = broker.dir.path(&format!("state/snapshots/{id}/rw.ext4"));

    let available_before = meminfo_kib("MemAvailable")?;
    let count = args.count.to_string();
    let started = Instant::now();
    let clones = json(broker, &["fork", "base", "--count", &count, "--name-prefix", "clone", "-o", "json"])?;
    let fork_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut report = ForkReport {
        benchmark: "fork",
        unix_time: unix_time(),
        source: crate::source_revision(),
        machine,
        parameters: serde_json::json!({
            "count": args.count, "memory_mib": args.memory_mib, "touch_mib": args.touch_mib,
        }),
        snapshot_pause_us: snapshot["pause_us"].as_u64().unwrap_or(0),
        branch,
        source_read_ms,
        source_boot_ms,
        restore_ms: Vec::new(),
        restored_pss_idle_kib: 0,
        snapshot_memory_kib: snapshot["memory_bytes"].as_u64().unwrap_or(0) / 1024,
        snapshot_disk_kib: allocated_kib(&snapshot_disk),
        fork_ms,
        clones: Vec::new(),
        mem_available_drop_per_clone_kib: 0,
        loadavg_at_end: String::new(),
        warnings: Vec::new(),
    };
    let clones = clones.as_array().context("mmctl fork -o json is not a list")?;
    for clone in clones {
        let name = clone["name"].as_str().context("a clone without a name")?.to_string();
        ready(broker, &name, args)?;
        let dir = broker.dir.path(&format!("state/vms/{}", clone["id"].as_str().unwrap_or_default()));
        let inode = |p: &Path| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok();
        report.clones.push(Clone {
            name,
            ready_ms: started.elapsed().as_secs_f64() * 1e3,
            disk_base_shared: inode(&dir.join("base.ext4")).is_some()
                && inode(&dir.join("base.ext4")) == inode(&snapshot_disk),
            ..Clone::default()
        });
    }
    // Settled: the restores' own activity is over.
    std::thread::sleep(Duration::from_secs(2));
    for c in &mut report.clones {
        (c.ram_idle_kib, c.pss_idle_kib) = memory_of(broker, &c.name)?;
    }
    for c in &mut report.clones {
        let read =
            broker.mmctl(&["exec", &c.name, "--", "md5sum", "/run/m/data"], Duration::from_secs(args.timeout_secs))?;
        if read.status != Some(0) {
            bail!("{}: reading its data failed: {}", c.name, read.stderr);
        }
        c.read_ms = read.elapsed.as_secs_f64() * 1e3;
    }
    for (c, clone) in report.clones.iter_mut().zip(clones) {
        (c.ram_after_read_kib, c.pss_after_read_kib) = memory_of(broker, &c.name)?;
        let dir = broker.dir.path(&format!("state/vms/{}", clone["id"].as_str().unwrap_or_default()));
        c.disk_layer_kib = allocated_kib(&dir.join("rw.ext4")) + allocated_kib(&dir.join("rw.map"));
    }
    let available_after = meminfo_kib("MemAvailable")?;
    report.mem_available_drop_per_clone_kib =
        (available_before as i64 - available_after as i64) / i64::from(args.count.max(1));
    let others = machine::other_vmms().len().saturating_sub(clones.len() * 2);
    if others > 0 {
        report.warnings.push(format!("about {others} other VMM process(es) ran on this host"));
    }
    // The same number of single restores, after the clones are gone.
    let names: Vec<&str> = report.clones.iter().map(|c| c.name.as_str()).collect();
    let mut rm = vec!["rm", "-f"];
    rm.extend(names);
    mmctl_ok(broker, &rm)?;
    for i in 1..=args.count {
        let name = format!("single-{i}");
        let started = Instant::now();
        mmctl_ok(broker, &["restore", "base", "--name", &name])?;
        ready(broker, &name, args)?;
        report.restore_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    // Sampled as the clones were: once all are up, after 2 s.
    std::thread::sleep(Duration::from_secs(2));
    report.restored_pss_idle_kib = memory_of(broker, "single-1")?.1;
    report.loadavg_at_end = machine::loadavg();
    Ok(report)
}

/// Waits until `name` answers `exec … true`.
fn ready(broker: &TestBroker, name: &str, args: &ForkArgs) -> Result<()> {
    brokered::exec_ready(broker, name, Duration::from_secs(args.timeout_secs))
}
