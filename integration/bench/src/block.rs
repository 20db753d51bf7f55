//! `mm-bench block`: sequential read and write MiB/s and 4 KiB random-read
//! IOPS inside the guest on a virtio-blk disk (a scratch raw image), served
//! by `mm-device block` for mm-vmm and by QEMU's in-process
//! `virtio-blk-device` for microvm, against the host doing the same on the
//! same image file without a VM.
//!
//! The guest side and the host side are one program, mm-init's `blk-bench`
//! tool (guest/init/src/tools.rs), all O_DIRECT: in the guest so its page
//! cache does not measure itself, on the host so the host figure is the
//! disk's. Both VMMs' back ends read through the host page cache (mm-device
//! block always, QEMU with its default `cache=writeback`), so the image's
//! cached pages are dropped before the host run and before each boot, and
//! every run starts with the image cold.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use mm_integration::devices::{DeviceProcess, Scratch};

use crate::devbench::{self, CommonArgs, DeviceReport, GuestDevice, GuestSetup, Metric, Target};
use crate::machine::Machine;
use crate::vm::{self, Results};
use crate::{System, devbench::deadline};

#[derive(Debug, Args)]
pub struct BlockArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Size of the scratch disk image, MiB: the first half is read and
    /// written sequentially, the second half read at random.
    #[arg(long, default_value_t = 1024)]
    pub image_mib: u64,
    /// Where the image is created: a filesystem with O_DIRECT (not tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    pub image_dir: PathBuf,
}

/// A directory removed (with the image in it) when dropped.
struct ImageDir(PathBuf);

impl Drop for ImageDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `mib` MiB of non-repeating bytes (not zeros and not a hole: a
/// sparse file would be read without touching the disk), then syncs.
fn create_image(path: &Path, mib: u64) -> Result<()> {
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..mib {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&chunk)?;
    }
    file.sync_all()?;
    Ok(())
}

/// Makes the image cold: its dirty pages written back, then its cached
/// pages dropped (`POSIX_FADV_DONTNEED`), so the next reader reads the disk.
pub(crate) fn drop_cache(path: &Path) -> Result<()> {
    let file = File::open(path)?;
    file.sync_data()?;
    // SAFETY: posix_fadvise only advises the kernel about an fd we own.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        bail!("posix_fadvise DONTNEED on {}: {}", path.display(), std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// The three figures from one `blk-bench` run's results.
fn figures(r: &Results) -> Result<[Option<f64>; 3]> {
    let f = |phase, key| vm::field(r, phase, key);
    Ok([
        devbench::mib_per_s(f("seq_read", "bytes")?, f("seq_read", "ns")?),
        devbench::mib_per_s(f("seq_write", "bytes")?, f("seq_write", "ns")?),
        devbench::per_s(f("rand_read", "ops")?, f("rand_read", "ns")?),
    ])
}

pub fn run(args: BlockArgs) -> Result<()> {
    let secs = args.common.secs;
    let workload: Vec<String> =
        ["/init", "blk-bench", "/dev/vda", &secs.to_string()].iter().map(|s| s.to_string()).collect();
    let config = args.common.boot_config(workload);
    let out = args.common.out("block");
    let log_dir = out.parent().unwrap_or(Path::new(".")).join("block-logs");
    let guest = GuestSetup::new(&config)?;
    let machine = Machine::detect();
    let mut warnings = Vec::new();

    let dir = ImageDir(args.image_dir.join(format!("mm-bench-block-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    let image = dir.0.join("disk.img");
    eprintln!("mm-bench: block: writing a {} MiB image at {}", args.image_mib, image.display());
    create_image(&image, args.image_mib)?;
    let image_arg = image.to_str().context("image path is not UTF-8")?;
    let sockets = Scratch::new("bench-block")?;
    let socket = sockets.path("block.sock");

    let mm_init = devbench::mm_init_binary()?;
    let mut host_runs = Vec::new();
    let mut runs = Vec::new();
    // (system, figures) of every boot; None for the host's runs.
    let mut all: Vec<(Option<System>, [Option<f64>; 3])> = Vec::new();
    for run in 1..=args.common.runs {
        drop_cache(&image)?;
        eprintln!("mm-bench: block: run {run} host: blk-bench on the image file ({secs} s per phase)");
        let out = devbench::run_host_tool(&mm_init, &["blk-bench", image_arg, &secs.to_string()])?;
        let host = vm::parse_results(&out.lines().map(str::to_string).collect::<Vec<_>>());
        all.push((None, figures(&host)?));
        host_runs.push(host);
        for system in args.common.systems() {
            drop_cache(&image)?;
            let _device = match system {
                System::Mm => Some(DeviceProcess::block(&socket, &image)?),
                System::Qemu => None,
            };
            let device = GuestDevice {
                mm: Some(("block", socket.as_path())),
                // QEMU's defaults (cache=writeback, aio=threads) are its usual
                // in-process back end: through the host page cache like ours.
                qemu_args: vec![
                    "-drive".into(),
                    format!("id=disk0,file={image_arg},format=raw,if=none"),
                    "-device".into(),
                    "virtio-blk-device,drive=disk0".into(),
                ],
                qemu_fds: Vec::new(),
            };
            let mut started = devbench::start(system, run, &config, &device, &log_dir)?;
            let results = started.vm.results(deadline(args.common.timeout_secs))?;
            let f = figures(&results).with_context(|| format!("{} guest results", system.name()))?;
            all.push((Some(system), f));
            runs.push(devbench::finish(started, results, &config, &mut warnings)?);
        }
    }

    let of = |who: Option<System>, i: usize| devbench::median(all.iter().filter(|(s, _)| *s == who).map(|(_, f)| f[i]));
    let metrics: Vec<Metric> = [("seq_read", "MiB/s"), ("seq_write", "MiB/s"), ("rand_read_4k", "IOPS")]
        .iter()
        .enumerate()
        .map(|(i, (name, unit))| {
            Metric::new(name, unit, true, of(None, i), of(Some(System::Mm), i), of(Some(System::Qemu), i))
        })
        .collect();
    let mut targets = Vec::new();
    for m in &metrics {
        targets.push(Target::at_least(format!("{} mm/qemu", m.name), m.mm_over_qemu, 1.0, "here"));
    }
    for m in metrics.iter().filter(|m| m.name != "seq_write") {
        targets.push(Target::at_least(format!("{} mm/host", m.name), m.mm_over_host, 0.8, "hardware KVM only"));
    }
    let report = DeviceReport {
        benchmark: "block",
        unix_time: 0,
        source: String::new(),
        machine,
        guest,
        parameters: serde_json::json!({
            "image_mib": args.image_mib,
            "secs_per_phase": secs,
            "runs": args.common.runs,
            "image": image_arg,
        }),
        raw: serde_json::json!({ "host": host_runs }),
        metrics,
        targets,
        systems: runs,
        notes: vec![
            "all I/O O_DIRECT (guest and host); seq = 1 MiB requests over the first half of the image, \
             rand_read = 4 KiB at seeded random 4 KiB-aligned offsets in the second half, seq_write timed \
             with its final fdatasync"
                .into(),
            "host = the same mm-init blk-bench on the image file; the image's page cache is dropped before \
             the host run and before each boot; both back ends use the host page cache"
                .into(),
            format!("each phase stops after {secs} s or at the end of its region"),
        ],
        warnings,
    };
    report.emit(&out, args.common.json)
}
