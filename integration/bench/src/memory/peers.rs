//! The peers' runs, with the devices of the broker's microVM: the same
//! read-only root image, a writable disk made as the broker makes it, vsock
//! and net on a TAP in a network namespace of this benchmark's (its bridge
//! holds the gateway address the guest is given, and nothing leaves it).
//!
//! * QEMU `microvm`: block and net are its own in-process devices; vsock is
//!   `vhost-user-vsock-device` served by an `mm-device vsock` process (this
//!   host has no /dev/vhost-vsock for the in-kernel one), counted as
//!   QEMU's; guest RAM is then a shared memfd, which vhost-user needs.
//! * Firecracker: everything in its one process (hybrid vsock, its own
//!   virtio-net opening the TAP by name), behind its jailer when
//!   `--firecracker-jailer` is given.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mm_integration::netns::{TestNetwork, ip};
use serde_json::json;

use super::{GuestLine, MemRun, Setup, check_guest, confinement_problems, settle, wait_ready};
use crate::BootConfig;
use crate::boot::Guard;
use crate::procmem::GuestRam;
use crate::snapshot::fclaunch::{Api, JAIL_GID, JAIL_UID, Launcher};
use crate::snapshot::{SnapSystem, ms_between, wait_for_path};
use crate::vm::{Vm, die_with_parent, inherit_fds};

/// The TAP's fd number in QEMU.
const TAP_FD: i32 = 3;
/// The vsock context id every peer's guest gets (mm's comes from the
/// broker; the exec agent does not care).
const GUEST_CID: &str = "3";

/// The peers' network namespace: a bridge with the gateway address the
/// broker gave mm's guest, so the guest's network set-up is the same.
pub fn network(line: &GuestLine) -> Result<TestNetwork> {
    let network = TestNetwork::new("mem")?;
    if let Some((gateway, prefix)) = &line.gateway {
        ip(&["-n", &network.name, "addr", "add", &format!("{gateway}/{prefix}"), "dev", "br0"])?;
    }
    crate::brokered::EXTRA_NETNS.lock().expect("not poisoned").push(network.name.clone());
    Ok(network)
}

/// A sparse 1 GiB ext4 disk, made as the broker makes each microVM's
/// writable disk (broker/src/launch.rs, `prepare_vm_dir`).
pub fn writable_disk(path: &Path) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.set_len(1 << 30)?;
    drop(file);
    let status = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-L", "mm-rw", "-E", "lazy_itable_init=1,lazy_journal_init=1"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .context("running mke2fs")?;
    if !status.success() {
        bail!("mke2fs {} failed", path.display());
    }
    Ok(())
}

/// The unprivileged ids QEMU's vsock back end is jailed as (the broker
/// gives each microVM its own, from 200 000 up).
const BACKEND_UID: u32 = 52_001;

/// QEMU's vsock back end: `mm-device vsock`, jailed by itself as the
/// broker's are (an unprivileged uid that owns only the directory of the
/// guest's socket), serving the guest at `vsock/v.sock` in `dir`; dies
/// with the benchmark.
struct VsockBackend {
    guard: Guard,
    socket: PathBuf,
    uds: PathBuf,
}

impl VsockBackend {
    fn start(dir: &Path, log: &Path) -> Result<VsockBackend> {
        let socket = dir.join("vsock-backend.sock");
        let uds_dir = dir.join("vsock");
        std::fs::create_dir_all(&uds_dir)?;
        std::os::unix::fs::chown(&uds_dir, Some(BACKEND_UID), Some(BACKEND_UID))
            .with_context(|| format!("chown {}", uds_dir.display()))?;
        let uds = uds_dir.join("v.sock");
        let log = std::fs::File::create(log)?;
        let id = BACKEND_UID.to_string();
        let mut cmd = Command::new(mm_integration::workspace_binary("mm-device")?);
        cmd.arg("vsock").arg("--socket").arg(&socket).args(["--guest-cid", GUEST_CID, "--uds"]).arg(&uds);
        cmd.args(["--jail-uid", &id, "--jail-gid", &id]);
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        die_with_parent(&mut cmd);
        let mut guard = Guard(Some(cmd.spawn().context("spawning mm-device vsock")?));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if let Some(status) = guard.child().try_wait()? {
                bail!("mm-device vsock exited with {status} before listening");
            }
            if Instant::now() > deadline {
                bail!("mm-device vsock did not listen within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(VsockBackend { guard, socket, uds })
    }

    fn pid(&mut self) -> u32 {
        self.guard.child().id()
    }
}

/// Fails if `pid` has exited (gone, or a zombie not reaped yet).
fn alive(pid: u32, name: &str) -> Result<()> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    match stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) {
        Some("Z") | None => bail!("{name} (pid {pid}) exited before its guest answered (see its log)"),
        Some(_) => Ok(()),
    }
}

pub fn qemu(setup: &Setup, line: &GuestLine, network: &TestNetwork, run: usize) -> Result<MemRun> {
    const SYSTEM: SnapSystem = SnapSystem::Qemu;
    let mut record = MemRun::new(SYSTEM, run, crate::qemu::version()?);
    let dir = setup.dir.join(format!("qemu-{run}"));
    std::fs::create_dir_all(&dir)?;
    let rw = dir.join("rw.ext4");
    writable_disk(&rw)?;
    let log_base = setup.log_base(SYSTEM, run);
    let mut backend = VsockBackend::start(&dir, &log_base.with_extension("vsock.log"))?;
    let uds = backend.uds.clone();
    let tap = network.tap(&format!("mmq{run}"))?;
    let config = BootConfig {
        cpus: setup.cpus,
        memory_mib: setup.memory_mib,
        extra_cmdline: String::new(),
        workload: Vec::new(),
    };
    let devices = crate::qemu::FullDevices {
        root: &setup.rootfs,
        rw: &rw,
        vsock_backend: &backend.socket,
        tap_fd: TAP_FD,
        mac: &line.mac,
    };
    let mut cmd = crate::qemu::full_command(&config, &setup.kernel, &line.cmdline, &devices);
    inherit_fds(&mut cmd, &[(&tap, TAP_FD)]);
    let vm = Vm::spawn("qemu", cmd, Some(log_base))?;
    drop(tap);
    let answered = wait_ready(&uds, vm.started() + setup.boot_timeout, || alive(vm.pid(), "qemu"))?;
    record.ready_ms = ms_between(vm.started(), answered);
    let roles = vec![("qemu".to_string(), vm.pid()), ("vsock-backend".to_string(), backend.pid())];
    let ram = GuestRam::Named("memory-backend-memfd");
    let (measured, settled) = settle(&roles, &ram, setup, answered)?;
    record.set_memory(measured, settled);
    record.jailed = false;
    record.confinement = vec![
        "qemu: not jailed (runs as root, no -sandbox, no namespaces), as started here".into(),
        format!(
            "its vsock back end (mm-device, counted here as QEMU's): jailed by itself; {}",
            match super::mm::jail_problems(&roles[1..]).as_slice() {
                [] => "confined".to_string(),
                problems => format!("found wanting: {problems:?}"),
            }
        ),
    ];
    record.guest = check_guest(&format!("run {run} qemu"), &uds, &line.cmdline)?;
    vm.finish(Duration::ZERO)?;
    drop(backend);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(record)
}

pub fn firecracker(
    setup: &Setup,
    launcher: &Launcher,
    line: &GuestLine,
    network: &TestNetwork,
    run: usize,
    warnings: &mut Vec<String>,
) -> Result<MemRun> {
    const SYSTEM: SnapSystem = SnapSystem::Firecracker;
    let mut record = MemRun::new(SYSTEM, run, crate::version_of(&launcher.binary));
    let dir = setup.dir.join(format!("firecracker-{run}"));
    let place = launcher.place(&dir, &format!("mem-{run}"))?;
    place.link(&setup.kernel, "vmlinux")?;
    place.link(&setup.rootfs, "root.ext4")?;
    writable_disk(&place.host("rw.ext4"))?;
    place.give("rw.ext4")?;
    // A persistent TAP in the namespace, which Firecracker opens by name
    // (as the jail's unprivileged user when jailed).
    let tap = format!("mmf{run}");
    let mut add = vec!["-n", &network.name, "tuntap", "add", "dev", &tap, "mode", "tap"];
    let (uid, gid) = (JAIL_UID.to_string(), JAIL_GID.to_string());
    if launcher.jailer.is_some() {
        add.extend(["user", &uid, "group", &gid]);
    }
    ip(&add)?;
    ip(&["-n", &network.name, "link", "set", &tap, "master", "br0"])?;
    ip(&["-n", &network.name, "link", "set", &tap, "up"])?;

    let vm = launcher.spawn_in(&place, "firecracker", setup.log_base(SYSTEM, run), Some(&network.name))?;
    let deadline = vm.started() + setup.boot_timeout;
    wait_for_path(&place.host("api.sock"), deadline)?;
    let api = Api(place.host("api.sock"));
    api.put("/machine-config", json!({ "vcpu_count": setup.cpus, "mem_size_mib": setup.memory_mib }))?;
    api.put("/boot-source", json!({ "kernel_image_path": place.api("vmlinux"), "boot_args": line.cmdline }))?;
    api.put(
        "/drives/root",
        json!({ "drive_id": "root", "path_on_host": place.api("root.ext4"), "is_root_device": true,
                "is_read_only": true }),
    )?;
    api.put(
        "/drives/rw",
        json!({ "drive_id": "rw", "path_on_host": place.api("rw.ext4"), "is_root_device": false,
                "is_read_only": false }),
    )?;
    api.put("/vsock", json!({ "guest_cid": 3, "uds_path": place.api("v.sock") }))?;
    api.put("/network-interfaces/eth0", json!({ "iface_id": "eth0", "guest_mac": line.mac, "host_dev_name": tap }))?;
    api.put("/actions", json!({ "action_type": "InstanceStart" }))?;
    let uds = place.host("v.sock");
    let answered = wait_ready(&uds, deadline, || alive(vm.pid(), "firecracker"))?;
    record.ready_ms = ms_between(vm.started(), answered);
    let roles = vec![("firecracker".to_string(), vm.pid())];
    let ram = GuestRam::AnonymousAtLeast(setup.memory_mib * 1024);
    let (measured, settled) = settle(&roles, &ram, setup, answered)?;
    if measured.processes.len() != 1 {
        warnings.push(format!("run {run} firecracker: {} processes, not one", measured.processes.len()));
    }
    record.set_memory(measured, settled);
    match &launcher.jailer {
        None => {
            record.confinement =
                vec!["not jailed (no --firecracker-jailer): root, its seccomp filters on, no namespaces".into()]
        }
        Some(_) => {
            // Its jailer: a chroot in a mount namespace, our network
            // namespace, an unprivileged uid; then Firecracker's filters.
            let problems = confinement_problems(vm.pid(), &["mnt", "net"]);
            record.jailed = problems.is_empty();
            record.confinement = if problems.is_empty() {
                vec![
                    "jailer: one process (the jailer execs Firecracker), chroot in its own mount namespace, \
                     unprivileged uid, every thread seccomp-filtered with no_new_privs and no capabilities"
                        .into(),
                ]
            } else {
                problems
            };
        }
    }
    record.guest = check_guest(&format!("run {run} firecracker"), &uds, &line.cmdline)?;
    vm.finish(Duration::ZERO)?;
    launcher.clean_up(&place);
    let _ = ip(&["-n", &network.name, "link", "del", &tap]);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(record)
}
