//! Firecracker's run, when `--firecracker PATH` names a binary built
//! outside this repository (nothing of Firecracker is committed here):
//! configured through its API socket with the same kernel, command line,
//! RAM and vCPUs, the root on its virtio-blk and a vsock device (its hybrid
//! vsock is the protocol mm-device vsock speaks, so the exec probe is the
//! same); `PATCH /vm Paused`, `PUT /snapshot/create` (Full), `PATCH /vm
//! Resumed`; the restore is a fresh process with `PUT /snapshot/load` (the
//! memory file as its `File` backend, the vsock socket overridden) and
//! `PATCH /vm Resumed`. Behind its jailer with `--firecracker-jailer`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use super::fclaunch::{Api, Launcher};
use super::probe::{self, TICK};
use super::{Setup, SnapRun, SnapSystem, check_cmdline, file_kib, ms, ms_between, sync, wait_for_path};
use crate::procmem::{self, GuestRam, process_tree};

const SYSTEM: SnapSystem = SnapSystem::Firecracker;
/// The memory file's name: a restored Firecracker maps it privately, so
/// its guest RAM shows in smaps under this name.
const MEMORY_FILE: &str = "fc-snapshot.mem";
const STATE_FILE: &str = "fc-snapshot.state";

pub fn run(setup: &Setup, launcher: &Launcher, run: usize, warnings: &mut Vec<String>) -> Result<SnapRun> {
    let (dir, disk) = setup.run_dir(SYSTEM, run)?;
    let name = format!("run {run} firecracker");
    let mut record = SnapRun {
        system: SYSTEM.name(),
        run,
        version: crate::version_of(&launcher.binary),
        answer_probe: "exec true over vsock",
        ..SnapRun::default()
    };

    // Cold boot: configure through the API, start, wait for the agent.
    let boot = launcher.place(&dir, &format!("boot-{run}"))?;
    boot.link(&setup.kernel, "vmlinux")?;
    boot.link(&disk, "root.ext4")?;
    boot.give("root.ext4")?;
    let mut source = launcher.spawn(&boot, "firecracker", setup.log_base(SYSTEM, run, "boot"))?;
    let boot_deadline = source.started() + setup.boot_timeout;
    wait_for_path(&boot.host("api.sock"), boot_deadline)?;
    let api = Api(boot.host("api.sock"));
    api.put("/machine-config", json!({ "vcpu_count": setup.config.cpus, "mem_size_mib": setup.config.memory_mib }))?;
    api.put("/boot-source", json!({ "kernel_image_path": boot.api("vmlinux"), "boot_args": setup.cmdline }))?;
    api.put(
        "/drives/root",
        json!({ "drive_id": "root", "path_on_host": boot.api("root.ext4"), "is_root_device": true,
                "is_read_only": false }),
    )?;
    api.put("/vsock", json!({ "guest_cid": 3, "uds_path": boot.api("v.sock") }))?;
    api.put("/actions", json!({ "action_type": "InstanceStart" }))?;
    let uds = boot.host("v.sock");
    let (answered, _) = probe::exec_until(&uds, Duration::from_millis(200), boot_deadline)?;
    record.boot_to_answer_ms = ms_between(source.started(), answered);
    source.wait_for(TICK, boot_deadline)?;
    let again = Instant::now();
    let (answered, _) = probe::exec_until(&uds, Duration::from_millis(200), boot_deadline)?;
    record.steady_answer_ms = ms_between(again, answered);
    record.boot_to_init_ms = source.boot_to_init.map(ms);
    let ram = GuestRam::AnonymousAtLeast(setup.config.memory_mib * 1024);
    match procmem::sample(&process_tree(source.pid()), &ram) {
        Ok(s) => record.touched_kib = Some(s.guest_ram_rss_kib),
        Err(e) => warnings.push(format!("{name}: guest RAM not found in Firecracker's smaps: {e:#}")),
    }

    // Pause → create (Full) → fsync both files → resume.
    let (state_path, memory_path) = (boot.host(STATE_FILE), boot.host(MEMORY_FILE));
    let paused = Instant::now();
    api.patch("/vm", json!({ "state": "Paused" }))?;
    let saving = Instant::now();
    api.put(
        "/snapshot/create",
        json!({ "snapshot_type": "Full", "snapshot_path": boot.api(STATE_FILE),
                "mem_file_path": boot.api(MEMORY_FILE) }),
    )?;
    let saved = Instant::now();
    sync(&memory_path)?;
    sync(&state_path)?;
    let durable = Instant::now();
    api.patch("/vm", json!({ "state": "Resumed" }))?;
    let resumed = Instant::now();
    record.snapshot_ms = ms_between(paused, durable);
    record.save_ms = Some(ms_between(saving, saved));
    record.pause_ms = ms_between(paused, resumed);
    (record.memory_file_disk_kib, record.memory_file_size_kib) = file_kib(&memory_path)?;
    (record.state_file_disk_kib, record.state_file_size_kib) = file_kib(&state_path)?;
    probe::tick_after(&mut source, resumed, Instant::now() + Duration::from_secs(60))
        .context("the source guest after its snapshot")?;
    let end = source.finish(Duration::ZERO)?;
    launcher.clean_up(&boot);
    check_cmdline(&name, &end.console, &setup.cmdline, warnings)?;

    // Restore in a fresh process: spawn → API socket → load → resume. Its
    // files (the snapshot, the disk the snapshot names) are put in place
    // before the clock starts.
    if setup.cold_cache {
        super::drop_cache(&state_path)?;
        super::drop_cache(&memory_path)?;
    }
    let restore = launcher.place(&dir, &format!("restore-{run}"))?;
    restore.link(&state_path, STATE_FILE)?;
    restore.link(&memory_path, MEMORY_FILE)?;
    restore.link(&disk, "root.ext4")?;
    let mut restored = launcher.spawn(&restore, "firecracker restored", setup.log_base(SYSTEM, run, "restore"))?;
    let started = restored.started();
    let deadline = started + setup.restore_timeout;
    wait_for_path(&restore.host("api.sock"), deadline)?;
    let api_ready = Instant::now();
    let api = Api(restore.host("api.sock"));
    api.put(
        "/snapshot/load",
        json!({
            "snapshot_path": restore.api(STATE_FILE),
            "mem_backend": { "backend_type": "File", "backend_path": restore.api(MEMORY_FILE) },
            "vsock_override": { "uds_path": restore.api("v.sock") },
            "resume_vm": false,
        }),
    )?;
    let loaded = Instant::now();
    api.patch("/vm", json!({ "state": "Resumed" }))?;
    let running = Instant::now();
    record.restore_api_ready_ms = Some(ms_between(started, api_ready));
    record.restore_load_ms = Some(ms_between(api_ready, loaded));
    record.restore_resume_ms = Some(ms_between(loaded, running));
    record.restore_in_vmm_ms = Some(ms_between(api_ready, running));
    record.restore_to_vcpus_ms = ms_between(started, running);
    let (answered, attempts) = probe::exec_until(&restore.host("v.sock"), Duration::from_millis(2), deadline)?;
    record.restore_to_answer_ms = ms_between(started, answered);
    record.restore_answer_attempts = attempts;
    let (tick, _) = restored.first_line(TICK, deadline)?;
    record.restore_to_tick_ms = ms_between(started, tick);
    match procmem::sample(&process_tree(restored.pid()), &GuestRam::Named(MEMORY_FILE)) {
        Ok(s) => {
            record.restored_host_kib = Some(s.vmm_kib());
            record.restored_total_pss_kib = Some(s.total_pss_kib);
            record.restored_guest_ram_pss_kib = Some(s.guest_ram_pss_kib);
        }
        Err(e) => warnings.push(format!("{name}: the restored Firecracker's memory: {e:#}")),
    }
    restored.finish(Duration::ZERO)?;
    launcher.clean_up(&restore);
    Ok(record)
}
