//! mm-vmm's run: jailed and seccomp-filtered as always (no `--no-jail`),
//! a block root and a vsock device served by `mm-device` processes; pause,
//! snapshot and resume through its control socket; the restore is a new
//! mm-vmm (`--restore-state`, `--restore-memory`) with new back ends, the
//! vsock one with `--transport-reset`, and guest RAM restored lazily with
//! both back ends taking part (`--lazy-memory`), as the broker does it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mm_integration::devices::DeviceProcess;
use mm_integration::guest::Boot;
use mm_protocols::vmm_control::VmmClient;

use super::probe::{self, TICK};
use super::{Setup, SnapRun, SnapSystem, check_cmdline, create, file_kib, ms, ms_between, wait_for_path};
use crate::boot::monotonic_ns;
use crate::procmem::{self, GuestRam, process_tree};
use crate::vm::Vm;

const SYSTEM: SnapSystem = SnapSystem::Mm;
const RAM: GuestRam = GuestRam::Named("mm-guest-ram");

/// Starts the block and vsock back ends for one mm-vmm; the vsock one
/// serves the guest at `uds`.
fn devices(
    dir: &Path,
    tag: &str,
    disk: &Path,
    uds: &Path,
    reset: bool,
    lazy: bool,
) -> Result<(DeviceProcess, DeviceProcess)> {
    let disk = disk.to_str().context("disk path is not UTF-8")?;
    let block_args: &[&str] = if lazy { &["--image", disk, "--lazy-memory"] } else { &["--image", disk] };
    let block = DeviceProcess::spawn("block", &dir.join(format!("{tag}-block.sock")), block_args)?;
    let uds = uds.to_str().context("socket path is not UTF-8")?;
    let mut args = vec!["--guest-cid", "3", "--uds", uds];
    if reset {
        // Restored: the vsock device says so to the guest.
        args.push("--transport-reset");
    }
    if lazy {
        // Both take part in the lazy restore (postcopy), as the broker
        // runs them.
        args.push("--lazy-memory");
    }
    let vsock = DeviceProcess::spawn("vsock", &dir.join(format!("{tag}-vsock.sock")), &args)?;
    Ok((block, vsock))
}

pub fn run(setup: &Setup, run: usize, warnings: &mut Vec<String>) -> Result<SnapRun> {
    let (dir, disk) = setup.run_dir(SYSTEM, run)?;
    let name = format!("run {run} mm");
    let mut record = SnapRun {
        system: SYSTEM.name(),
        run,
        version: crate::version_of(&mm_integration::workspace_binary("mm-vmm")?),
        answer_probe: "exec true over vsock",
        ..SnapRun::default()
    };

    // Cold boot, until the exec agent answers.
    let uds = dir.join("vsock.uds");
    let control = dir.join("vmm.ctl");
    let (block, vsock) = devices(&dir, "boot", &disk, &uds, false, false)?;
    let mut boot = Boot::new(&[]).cpus(setup.config.cpus);
    boot.memory_mib = setup.config.memory_mib;
    boot.initramfs = false;
    boot.extra_cmdline = setup.config.extra_cmdline.clone();
    boot.command = setup.config.workload.clone();
    let boot = boot.device("block", &block.socket).device("vsock", &vsock.socket).control(&control);
    let mut cmd = boot.command()?;
    cmd.env("NO_COLOR", "1");
    let mut source = Vm::spawn("mm", cmd, Some(setup.log_base(SYSTEM, run, "boot")))?;
    let boot_deadline = source.started() + setup.boot_timeout;
    let (answered, _) = probe::exec_until(&uds, Duration::from_millis(200), boot_deadline)?;
    record.boot_to_answer_ms = ms_between(source.started(), answered);
    source.wait_for(TICK, boot_deadline)?;
    let again = Instant::now();
    let (answered, _) = probe::exec_until(&uds, Duration::from_millis(200), boot_deadline)?;
    record.steady_answer_ms = ms_between(again, answered);
    record.boot_to_init_ms = source.boot_to_init.map(ms);
    record.touched_kib = Some(procmem::sample(&process_tree(source.pid()), &RAM)?.guest_ram_rss_kib);

    // A snapshot of the running guest (as the broker takes one): mm-vmm
    // holds the devices, copies RAM beside the running vCPUs, pauses them
    // only for the cut, writes and fsyncs both files; resume then lets the
    // devices run again.
    wait_for_path(&control, boot_deadline)?;
    let client = VmmClient::connect(&control).context("connecting to mm-vmm's control socket")?;
    let (state_path, memory_path) = (dir.join("vm.state"), dir.join("vm.mem"));
    let (state, memory) = (create(&state_path)?, create(&memory_path)?);
    let paused = Instant::now();
    let report = client.snapshot_running(&state, &memory).context("snapshot")?;
    // The devices wait from the cut until `resume` (the broker copies the
    // disk in between; here there is none); the files are synced after,
    // as the broker does, for the same end point as the peers.
    client.resume().context("resume")?;
    let resumed = Instant::now();
    state.sync_all()?;
    memory.sync_all()?;
    let durable = Instant::now();
    record.snapshot_ms = ms_between(paused, durable);
    // The guest's vCPUs stood still only for the cut, as mm-vmm timed it;
    // its I/O from the cut (the devices ran, logging, during the copy).
    record.pause_ms = report.paused_us as f64 / 1e3;
    record.io_held_ms = Some(ms_between(paused, resumed) - report.io_run_us as f64 / 1e3);
    record.save_ms = Some(report.save_us as f64 / 1e3);
    record.memory_written_kib = Some(report.memory_bytes / 1024);
    (record.memory_file_disk_kib, record.memory_file_size_kib) = file_kib(&memory_path)?;
    (record.state_file_disk_kib, record.state_file_size_kib) = file_kib(&state_path)?;
    // The source runs on after its snapshot.
    probe::tick_after(&mut source, resumed, Instant::now() + Duration::from_secs(60))
        .context("the source guest after its snapshot")?;
    drop(client);
    let end = source.finish(Duration::ZERO)?;
    check_cmdline(&name, &end.console, &setup.cmdline, warnings)?;
    drop((block, vsock));

    // Restore: new back ends first (not timed in the restore), then a new
    // mm-vmm; its clock starts right before its spawn. Lazily (the
    // default, as the broker runs it), then eagerly for comparison.
    if setup.cold_cache {
        super::drop_cache(&state_path)?;
        super::drop_cache(&memory_path)?;
    }
    let lazy = restore(setup, run, &dir, &disk, &state_path, &memory_path, true, warnings)?;
    record.restore_devices_ms = Some(lazy.devices_ms);
    record.restore_to_answer_ms = lazy.to_answer_ms;
    record.restore_answer_attempts = lazy.attempts;
    record.restore_to_tick_ms = lazy.to_tick_ms;
    record.restored_host_kib = Some(lazy.vmm_kib);
    record.restored_total_pss_kib = Some(lazy.total_pss_kib);
    record.restored_guest_ram_pss_kib = Some(lazy.guest_ram_pss_kib);
    record.restored_devices_kib = lazy.devices_kib;
    record.restore_to_vcpus_ms = lazy.to_vcpus_ms;
    record.restore_in_vmm_ms = lazy.in_vmm_ms;
    record.restore_spawn_ms = lazy.in_vmm_ms.map(|inside| ((lazy.to_vcpus_ms - inside) * 1e3).round() / 1e3);
    if setup.cold_cache {
        super::drop_cache(&state_path)?;
        super::drop_cache(&memory_path)?;
    }
    let eager = restore(setup, run, &dir, &disk, &state_path, &memory_path, false, warnings)?;
    record.restore_eager_to_vcpus_ms = Some(eager.to_vcpus_ms);
    record.restore_eager_guest_ram_pss_kib = Some(eager.guest_ram_pss_kib);
    Ok(record)
}

/// What one restore measured.
struct RestoreFigures {
    devices_ms: f64,
    to_vcpus_ms: f64,
    in_vmm_ms: Option<f64>,
    to_answer_ms: f64,
    attempts: usize,
    to_tick_ms: f64,
    vmm_kib: u64,
    total_pss_kib: u64,
    guest_ram_pss_kib: u64,
    devices_kib: Option<u64>,
}

/// Restores the snapshot in a new mm-vmm with new back ends, guest RAM
/// lazily (the back ends taking part) or eagerly, until the guest answers.
#[allow(clippy::too_many_arguments)]
fn restore(
    setup: &Setup,
    run: usize,
    dir: &Path,
    disk: &Path,
    state_path: &Path,
    memory_path: &Path,
    lazy: bool,
    warnings: &mut Vec<String>,
) -> Result<RestoreFigures> {
    let tag = if lazy { "restore" } else { "restore-eager" };
    let name = format!("run {run} mm ({tag})");
    let uds = dir.join(format!("vsock-{tag}.uds"));
    let devices_started = Instant::now();
    let (block, vsock) = devices(dir, tag, disk, &uds, true, lazy)?;
    let devices_ms = ms(devices_started.elapsed());
    let mut cmd = Command::new(mm_integration::workspace_binary("mm-vmm")?);
    cmd.arg("--restore-state").arg(state_path).arg("--restore-memory").arg(memory_path);
    cmd.arg("--memory-restore").arg(if lazy { "lazy" } else { "eager" });
    cmd.arg("--device").arg(format!("block={}", block.socket.display()));
    cmd.arg("--device").arg(format!("vsock={}", vsock.socket.display()));
    cmd.env("NO_COLOR", "1");
    let spawn_ns = monotonic_ns();
    let mut restored = Vm::spawn("mm restored", cmd, Some(setup.log_base(SYSTEM, run, tag)))?;
    let deadline = restored.started() + setup.restore_timeout;
    let (answered, attempts) = probe::exec_until(&uds, Duration::from_millis(2), deadline)?;
    let to_answer_ms = ms_between(restored.started(), answered);
    let (tick, _) = restored.first_line(TICK, deadline)?;
    let to_tick_ms = ms_between(restored.started(), tick);
    let vmm = procmem::sample(&process_tree(restored.pid()), &RAM)?;
    let device_pids: Vec<u32> = [block.pid(), vsock.pid()].into_iter().flat_map(process_tree).collect();
    let devices_kib = match procmem::sample(&device_pids, &RAM) {
        Ok(s) => Some(s.vmm_kib()),
        Err(e) => {
            warnings.push(format!("{name}: the restored back ends' memory: {e:#}"));
            None
        }
    };
    if restored.console.iter().any(|l| l.contains("Linux version")) {
        warnings.push(format!("{name}: the restored guest printed a boot banner: it booted instead of resuming"));
    }
    let end = restored.finish(Duration::ZERO)?;
    drop((block, vsock));
    let log = crate::mmvmm::parse_log(&end.stderr);
    let first_run = log.first_kvm_run_monotonic_ns.context("no `first KVM_RUN` line in the restored mm-vmm's log")?;
    let lazy_said = end.stderr.contains("lazy restore: guest RAM comes in on first touch");
    if lazy_said != lazy {
        bail!("{name}: asked for a {} restore, mm-vmm's log says otherwise:\n{}", tag, end.stderr);
    }
    Ok(RestoreFigures {
        devices_ms,
        to_vcpus_ms: ((first_run as f64 - spawn_ns as f64) / 1e3).round() / 1e3,
        in_vmm_ms: log.first_kvm_run_since_start_ms,
        to_answer_ms,
        attempts,
        to_tick_ms,
        vmm_kib: vmm.vmm_kib(),
        total_pss_kib: vmm.total_pss_kib,
        guest_ram_pss_kib: vmm.guest_ram_pss_kib,
        devices_kib,
    })
}
