//! QEMU's run: microvm booting the same guest (root on a
//! `virtio-blk-device`), saved with QMP `stop` + `migrate` to
//! `exec:cat > FILE` (QEMU 7.2 has no `file:` migration URI; that came in
//! 8.2), restored in a new QEMU with `-incoming 'exec:cat FILE' -S` and
//! `cont`. QEMU has no vsock device here (`vhost-vsock-device` needs
//! /dev/vhost-vsock), so the guest's answer is to a serial ping.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::probe::{self, PONG, TICK};
use super::{Setup, SnapRun, SnapSystem, check_cmdline, file_kib, ms, ms_between, sync, wait_for_path};
use crate::boot::MARKER;
use crate::procmem::{self, GuestRam, process_tree};
use crate::vm::Vm;

const SYSTEM: SnapSystem = SnapSystem::Qemu;

/// A QMP connection (one JSON object per line; events interleave with
/// answers and are skipped).
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (retrying until QEMU listens) and leaves capabilities
    /// negotiation mode.
    fn connect(path: &Path, deadline: Instant) -> Result<Qmp> {
        wait_for_path(path, deadline)?;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(e).context("connecting to QMP"),
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut qmp = Qmp { reader: BufReader::new(stream.try_clone()?), writer: stream };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QEMU closed its QMP socket");
        }
        serde_json::from_str(&line).with_context(|| format!("QMP sent {line:?}"))
    }

    /// Runs a command; its `return` value, or its `error` as an error.
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let request = json!({ "execute": command, "arguments": arguments });
        self.writer.write_all(format!("{request}\n").as_bytes())?;
        loop {
            let answer = self.read()?;
            if let Some(value) = answer.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = answer.get("error") {
                bail!("QMP {command}: {error}");
            }
        }
    }

    /// Polls `command` every `every` until `done` says the answer is final.
    fn poll(
        &mut self,
        command: &str,
        every: Duration,
        deadline: Instant,
        done: impl Fn(&Value) -> Result<bool>,
    ) -> Result<Value> {
        loop {
            let answer = self.execute(command, json!({}))?;
            if done(&answer)? {
                return Ok(answer);
            }
            if Instant::now() >= deadline {
                bail!("QMP {command} still says {answer} at the deadline");
            }
            std::thread::sleep(every);
        }
    }
}

/// The QEMU command for this guest, its serial input a pipe and QMP at `qmp`.
fn command(setup: &Setup, disk: &Path, qmp: &Path) -> Command {
    let mut cmd = crate::qemu::root_disk_command(&setup.config, &setup.kernel, disk, &setup.cmdline);
    cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
    cmd.stdin(Stdio::piped());
    cmd
}

fn ram(setup: &Setup) -> GuestRam {
    GuestRam::AnonymousOfSize(setup.config.memory_mib * 1024)
}

pub fn run(setup: &Setup, run: usize, warnings: &mut Vec<String>) -> Result<SnapRun> {
    let (dir, disk) = setup.run_dir(SYSTEM, run)?;
    let name = format!("run {run} qemu");
    let mut record = SnapRun {
        system: SYSTEM.name(),
        run,
        version: crate::qemu::version()?,
        answer_probe: "serial ping",
        ..SnapRun::default()
    };

    // Cold boot; pings start with user space (a UART without a reader
    // would only queue them).
    let qmp_path = dir.join("qmp.sock");
    let mut source =
        Vm::spawn_with_stdin("qemu", command(setup, &disk, &qmp_path), Some(setup.log_base(SYSTEM, run, "boot")))?;
    let mut stdin = source.take_stdin().context("QEMU's stdin")?;
    let boot_deadline = source.started() + setup.boot_timeout;
    source.wait_for(MARKER, boot_deadline)?;
    let (answered, _) = probe::ping_until(&mut source, &mut stdin, "boot", Duration::from_millis(100), boot_deadline)?;
    record.boot_to_answer_ms = ms_between(source.started(), answered);
    record.boot_to_init_ms = source.boot_to_init.map(ms);
    probe::drain(&mut source, PONG, Duration::from_secs(1), boot_deadline)?;
    let settled = Instant::now();
    let (again, _) = probe::ping_until(&mut source, &mut stdin, "steady", Duration::from_secs(1), boot_deadline)?;
    record.steady_answer_ms = ms_between(settled, again);
    probe::tick_after(&mut source, again, boot_deadline)?;
    record.touched_kib = Some(procmem::sample(&process_tree(source.pid()), &ram(setup))?.guest_ram_rss_kib);

    // stop → migrate to a file → completed → fsync → cont. QEMU throttles
    // migration to 32 MiB/s by default; a save to a file should not be
    // (libvirt lifts it the same way for `virsh save`).
    let mut qmp = Qmp::connect(&qmp_path, boot_deadline)?;
    qmp.execute("migrate-set-parameters", json!({ "max-bandwidth": 1u64 << 40 }))?;
    let state_path = dir.join("vm.migration");
    let uri = format!("exec:cat > {}", state_path.display());
    let paused = Instant::now();
    qmp.execute("stop", json!({}))?;
    let saving = Instant::now();
    qmp.execute("migrate", json!({ "uri": uri }))?;
    qmp.poll("query-migrate", Duration::from_micros(500), paused + Duration::from_secs(600), |a| {
        match a["status"].as_str() {
            Some("completed") => Ok(true),
            Some("failed" | "cancelled") => bail!("migration to {uri}: {a}"),
            _ => Ok(false),
        }
    })?;
    let saved = Instant::now();
    sync(&state_path)?;
    let durable = Instant::now();
    qmp.execute("cont", json!({}))?;
    let resumed = Instant::now();
    record.snapshot_ms = ms_between(paused, durable);
    record.save_ms = Some(ms_between(saving, saved));
    record.pause_ms = ms_between(paused, resumed);
    // One file: the migration stream holds RAM and device state alike.
    (record.memory_file_disk_kib, record.memory_file_size_kib) = file_kib(&state_path)?;
    probe::tick_after(&mut source, resumed, Instant::now() + Duration::from_secs(60))
        .context("the source guest after its snapshot")?;
    drop(qmp);
    drop(stdin);
    let end = source.finish(Duration::ZERO)?;
    check_cmdline(&name, &end.console, &setup.cmdline, warnings)?;

    // Restore: the same command plus -incoming and -S; the clock starts
    // at the spawn; `cont` once QMP says the state is loaded (`paused`).
    if setup.cold_cache {
        super::drop_cache(&state_path)?;
    }
    let qmp_path = dir.join("qmp-restored.sock");
    let mut cmd = command(setup, &disk, &qmp_path);
    cmd.arg("-incoming").arg(format!("exec:cat {}", state_path.display())).arg("-S");
    let mut restored = Vm::spawn_with_stdin("qemu restored", cmd, Some(setup.log_base(SYSTEM, run, "restore")))?;
    let mut stdin = restored.take_stdin().context("QEMU's stdin")?;
    let started = restored.started();
    let deadline = started + setup.restore_timeout;
    let mut qmp = Qmp::connect(&qmp_path, deadline)?;
    let api_ready = Instant::now();
    qmp.poll("query-status", Duration::from_micros(500), deadline, |a| match a["status"].as_str() {
        Some("inmigrate" | "prelaunch") => Ok(false),
        Some("paused") => Ok(true),
        _ => bail!("QEMU's state after the incoming migration: {a}"),
    })?;
    let loaded = Instant::now();
    qmp.execute("cont", json!({}))?;
    let running = Instant::now();
    record.restore_api_ready_ms = Some(ms_between(started, api_ready));
    record.restore_load_ms = Some(ms_between(started, loaded));
    record.restore_resume_ms = Some(ms_between(loaded, running));
    record.restore_in_vmm_ms = Some(ms_between(api_ready, running));
    record.restore_to_vcpus_ms = ms_between(started, running);
    // One ping right after `cont`, again every 50 ms if unanswered.
    let (answered, pings) =
        probe::ping_until(&mut restored, &mut stdin, "restore", Duration::from_millis(50), deadline)?;
    record.restore_to_answer_ms = ms_between(started, answered);
    record.restore_answer_attempts = pings;
    let (tick, _) = restored.first_line(TICK, deadline)?;
    record.restore_to_tick_ms = ms_between(started, tick);
    let sample = procmem::sample(&process_tree(restored.pid()), &ram(setup))?;
    record.restored_host_kib = Some(sample.vmm_kib());
    record.restored_total_pss_kib = Some(sample.total_pss_kib);
    record.restored_guest_ram_pss_kib = Some(sample.guest_ram_pss_kib);
    drop(qmp);
    drop(stdin);
    restored.finish(Duration::ZERO)?;
    Ok(record)
}
