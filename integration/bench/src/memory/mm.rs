//! mm's run: a microVM made by a real `mm-broker` (`mmctl run -d`), as in
//! production: mm-vmm and a `mm-device` per device (block-root, block-rw,
//! vsock, net), each jailed by itself (the jail's outer half waits for the
//! jailed child). The processes are the record's (`mmctl inspect`), each
//! with its process tree; the guest is reached through the hybrid vsock
//! socket the broker made for it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mm_integration::broker::TestBroker;
use mm_integration::proc_status::OWN_NAMESPACES;

use super::{GuestLine, MemRun, Setup, WORKLOAD, check_guest, confinement_problems, settle, wait_ready};
use crate::procmem::{self, GuestRam, process_tree};
use crate::snapshot::{SnapSystem, ms_between};

const SYSTEM: SnapSystem = SnapSystem::Mm;
pub const RAM: GuestRam = GuestRam::Named("mm-guest-ram");
/// One `mmctl` call that is not a boot.
const QUICK: Duration = Duration::from_secs(120);

fn mmctl_ok(broker: &TestBroker, args: &[&str]) -> Result<String> {
    let run = broker.mmctl(args, QUICK).with_context(|| format!("mmctl {}", args.join(" ")))?;
    if run.status != Some(0) {
        bail!("mmctl {} exited with {:?}: {}", args.join(" "), run.status, run.stderr.trim());
    }
    Ok(run.stdout)
}

/// The processes of `vm` as the broker recorded them: (role, pid).
fn processes(info: &serde_json::Value) -> Result<Vec<(String, u32)>> {
    let list = info["processes"].as_array().context("no processes in mmctl inspect")?;
    list.iter()
        .map(|p| {
            let role = p["role"].as_str().context("a process without a role")?.to_string();
            let pid = p["pid"].as_u64().context("a process without a pid")? as u32;
            Ok((role, pid))
        })
        .collect()
}

/// Whether every process of the microVM ran jailed: each role is exactly
/// two processes, the jail's outer half and a jailed child that is
/// confined in every thread and has namespaces of its own. The problems
/// found, empty when it did.
pub fn jail_problems(roles: &[(String, u32)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (role, pid) in roles {
        let tree = process_tree(*pid);
        match tree.as_slice() {
            [_outer, inner] => problems
                .extend(confinement_problems(*inner, &OWN_NAMESPACES).into_iter().map(|p| format!("{role}: {p}"))),
            other => problems.push(format!(
                "{role}: {} process(es) {other:?}, not two (the jail's outer half and the jailed child)",
                other.len()
            )),
        }
    }
    problems
}

fn argv(pid: u32) -> Result<Vec<String>> {
    mm_integration::proc_status::cmdline(pid as i32).with_context(|| format!("reading /proc/{pid}/cmdline"))
}

pub fn run(broker: &TestBroker, setup: &Setup, run: usize, warnings: &mut Vec<String>) -> Result<(MemRun, GuestLine)> {
    let name = format!("mem-{run}");
    let mut record = MemRun::new(SYSTEM, run, crate::version_of(&mm_integration::workspace_binary("mm-vmm")?));
    let (cpus, memory) = (setup.cpus.to_string(), format!("{}M", setup.memory_mib));
    let mut args = vec!["run", "-d", "--name", &name, "--cpus", &cpus, "--memory", &memory, "--"];
    args.extend(WORKLOAD);
    let started = Instant::now();
    mmctl_ok(broker, &args)?;
    let result = measure(broker, setup, &name, run, started, &mut record, warnings);
    let console = broker.mmctl(&["logs", &name], QUICK).map(|r| r.stdout).unwrap_or_default();
    let _ = std::fs::write(setup.log_base(SYSTEM, run).with_extension("console"), console);
    let removed = mmctl_ok(broker, &["rm", "-f", &name]);
    let line = result?;
    removed?;
    Ok((record, line))
}

fn measure(
    broker: &TestBroker,
    setup: &Setup,
    name: &str,
    run: usize,
    started: Instant,
    record: &mut MemRun,
    warnings: &mut Vec<String>,
) -> Result<GuestLine> {
    let info = broker.inspect(name)?;
    let id = info["id"].as_str().context("no id in mmctl inspect")?.to_string();
    let uds = broker.dir.path("state").join("vms").join(&id).join("vsock").join("vsock.sock");
    let deadline = started + setup.boot_timeout;
    let answered = wait_ready(&uds, deadline, || {
        let state = broker.inspect(name)?["state"].as_str().unwrap_or_default().to_string();
        if state != "running" {
            bail!("{name} is {state}, not running, before its exec agent answered");
        }
        Ok(())
    })?;
    record.ready_ms = ms_between(started, answered);
    let roles = processes(&broker.inspect(name)?)?;
    let (measured, settled) = settle(&roles, &RAM, setup, answered)?;
    record.set_memory(measured, settled);

    // The same processes throughout (a device restarted mid-way would
    // have been sampled as a fresh process).
    let after = broker.inspect(name)?;
    if processes(&after)? != roles {
        bail!("run {run} mm: the microVM's processes changed while it was sampled: {roles:?} -> {after}");
    }
    if let Some(restarted) = after["processes"].as_array().and_then(|l| l.iter().find(|p| p["restarts"] != 0)) {
        warnings.push(format!("run {run} mm: a process had been restarted: {restarted}"));
    }

    let problems = jail_problems(&roles);
    if !problems.is_empty() {
        bail!(
            "run {run} mm: the microVM did not run jailed, so its figures are not reported (run as root, and \
             without the broker's --no-jail): {problems:?}"
        );
    }
    record.jailed = true;
    record.confinement = vec![format!(
        "each of {} is two processes, the jail's outer half and a child confined in every thread (seccomp \
         filter, no_new_privs, no capabilities, unprivileged uid) with its own {} namespaces",
        roles.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>().join(", "),
        OWN_NAMESPACES.join("/"),
    )];

    let vmm = roles.iter().find(|(role, _)| role == "vmm").context("no vmm process")?.1;
    let mac = info["mac"].as_str().unwrap_or_default();
    let config = crate::BootConfig {
        cpus: setup.cpus,
        memory_mib: setup.memory_mib,
        extra_cmdline: String::new(),
        workload: Vec::new(),
    };
    let line = GuestLine::from_vmm_argv(&argv(vmm)?, &config, mac)?;
    record.guest = check_guest(&format!("run {run} mm"), &uds, &line.cmdline)?;
    record.broker_pss_kib = broker
        .pid()
        .and_then(|pid| procmem::sample_process(pid, &RAM, false).ok())
        .map(|(sample, _)| sample.total_pss_kib);
    Ok(line)
}
