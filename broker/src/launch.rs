//! Turning a microVM record into running processes: one `mm-device` per
//! device and mm-vmm, each handed exactly its fds.
//!
//! The microVM's directory (`vms/<id>/`) is the broker's, 0700: its record,
//! audit log, console and process logs (0600), the sockets it binds. The
//! microVM's uid owns only its disk, handed over through an fd
//! ([`prepare_vm_dir`]), and the vsock device's own subdirectory
//! ([`VSOCK_DIR`]), the one place its processes may write; nothing the
//! broker opens there is followed if it is a link (`crate::safe_fs`).
//!
//! The vhost-user connection of each device is made here: the broker binds
//! a listener at a private path (in the microVM's 0700 directory), connects
//! mm-vmm's end to it, unlinks the path, and passes the listener (one
//! connection queued) to the device as `--listen-fd 10` and the connected
//! end to mm-vmm as `--device KIND=fd:N`. So no jail needs a shared path,
//! and nobody else can reach either end. mm-vmm's control channel
//! (`protocols/vmm.capnp`) is a SOCK_SEQPACKET listener the broker binds in
//! the microVM's directory and passes in (`--control fd:N`): the broker
//! connects to it now, and again after a restart; a restarted device's new
//! connection is sent over it with SCM_RIGHTS.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use mm_protocols::device_control::RateLimit;
use mm_protocols::vmm_control::{SeqPacketListener, VmmClient};

use crate::BrokerConfig;
use crate::network::{Network, Tap};
use crate::process::Process;
use crate::record::VmRecord;

/// The vsock device's directory in the microVM's, owned by the microVM's
/// uid: its jail binds it, and makes its socket and nothing else there.
pub const VSOCK_DIR: &str = "vsock";
/// The hybrid vsock socket's name (in [`VSOCK_DIR`]).
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// Each microVM's own disk: the upper layer of its root overlay. For a
/// microVM restored from a snapshot, the copy-on-write layer over
/// [`BASE_DISK`] (with [`DISK_MAP`]; the format is `mm_overlay`'s).
pub const WRITABLE_DISK: &str = "rw.ext4";
/// A restored microVM's disk underneath its own: a hard link to the
/// snapshot's disk, read-only, so the snapshot can be removed while its
/// clones run and no clone pays for a copy.
pub const BASE_DISK: &str = "base.ext4";
/// Which clusters of a layered disk the microVM has written.
pub const DISK_MAP: &str = "rw.map";
/// Its size (sparse: it takes only what the guest writes).
const WRITABLE_DISK_BYTES: u64 = 1 << 30;
/// The serial console, appended by mm-vmm.
pub const CONSOLE_LOG: &str = "console.log";
/// mm-vmm's control socket (listened on by mm-vmm, bound by the broker).
pub const VMM_CONTROL_SOCKET: &str = "vmm-control.sock";

/// How the broker sets the cgroup limits of a process that jails itself
/// (mm-vmm, mm-device): these variables, read by the jailer
/// (`mm_jailer::CPU_MAX_ENV` and its neighbours; the names must match),
/// override the binary's own defaults. The period of the CPU cap is the
/// kernel's default, 100 ms.
const JAIL_CPU_MAX_ENV: &str = "MM_JAIL_CPU_MAX";
const JAIL_CPU_WEIGHT_ENV: &str = "MM_JAIL_CPU_WEIGHT";
const JAIL_MEMORY_MAX_ENV: &str = "MM_JAIL_MEMORY_MAX";
const CPU_PERIOD_US: u64 = 100_000;

/// mm-vmm's cgroup limits, as the jailer reads them: the CPU cap
/// (`QUOTA_US PERIOD_US`), weight and memory limit.
pub fn vmm_limits_env(record: &VmRecord) -> [(&'static str, String); 3] {
    let quota_us = u64::from(record.effective_cpu_quota_millis()) * CPU_PERIOD_US / 1000;
    [
        (JAIL_CPU_MAX_ENV, format!("{quota_us} {CPU_PERIOD_US}")),
        (JAIL_CPU_WEIGHT_ENV, record.effective_cpu_weight().to_string()),
        (JAIL_MEMORY_MAX_ENV, record.vmm_memory_max_bytes().to_string()),
    ]
}

/// The first fd number handed to a child: 3 is the jail's seccomp report
/// pipe (`mm_jailer::REPORT_FD`), the rest of the low numbers are kept free.
const FIRST_FD: RawFd = 10;

/// A device of a microVM: how to (re)start its back end.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// Audit/log name: `block-root`, `vsock`.
    pub role: String,
    /// `block`, `net` or `vsock`: mm-device's subcommand and mm-vmm's KIND.
    pub kind: &'static str,
    pub args: Vec<OsString>,
    /// For `net`: the TAP the broker opens and hands over as [`TAP_FD`],
    /// with the only MAC and address it may send from.
    pub tap: Option<Tap>,
}

/// The device node a lazy restore's userfaultfds come from.
const USERFAULTFD: &str = "/dev/userfaultfd";

/// Where a net device finds its TAP (after the listener, [`FIRST_FD`]).
const TAP_FD: RawFd = FIRST_FD + 1;
/// Where a device finds its control listener (protocols/device.capnp).
const DEVICE_CONTROL_FD: RawFd = FIRST_FD + 2;

/// The hybrid vsock socket the exec agent is reached through.
pub fn vsock_socket(dir: &Path) -> PathBuf {
    dir.join(VSOCK_DIR).join(VSOCK_SOCKET)
}

/// Where a vsock device started under the older layout (before
/// [`VSOCK_DIR`]) made its socket: a re-adopted microVM's, until its vsock
/// device is restarted or the microVM started again.
pub fn legacy_vsock_socket(dir: &Path) -> PathBuf {
    dir.join(VSOCK_SOCKET)
}

/// A device's control socket, bound by the broker in the microVM's
/// directory and listened on by the device, so a restarted broker reaches
/// it again.
pub fn device_control_socket(dir: &Path, role: &str) -> PathBuf {
    dir.join(format!("{role}-control.sock"))
}

/// The devices every microVM gets, in guest order: the image's shared
/// base, read-only (/dev/vda, the kernel's root), the microVM's own disk
/// (/dev/vdb, laid over it by mm-init as an overlay), vsock, and a network
/// interface on its own TAP when the microVM has an address.
pub fn devices_for(config: &BrokerConfig, dir: &Path, record: &VmRecord) -> Vec<DeviceSpec> {
    let mut devices = vec![
        DeviceSpec {
            role: "block-root".into(),
            kind: "block",
            args: vec![
                "--image".into(),
                config.builtin_image.clone().into(),
                "--read-only".into(),
                "--serial".into(),
                "root".into(),
            ],
            tap: None,
        },
        DeviceSpec { role: "block-rw".into(), kind: "block", args: writable_disk_args(dir), tap: None },
        DeviceSpec {
            role: "vsock".into(),
            kind: "vsock",
            args: vec![
                "--guest-cid".into(),
                record.guest_cid.to_string().into(),
                "--uds".into(),
                vsock_socket(dir).into(),
            ],
            tap: None,
        },
    ];
    // A resumed guest's connections died with the processes that held
    // them: the device tells it so (and its CID may be new).
    if record.resume_from.is_some() {
        devices[2].args.push("--transport-reset".into());
    }
    if let Some(tap) = tap_for(config, record) {
        devices.push(DeviceSpec {
            role: "net".into(),
            kind: "net",
            args: vec!["--tap-fd".into(), TAP_FD.to_string().into(), "--mac".into(), tap.mac.clone().into()],
            tap: Some(tap),
        });
    }
    // The disks' rate limits, from the record: a restarted device keeps
    // them, including those `mmctl update` changed after the start. (Net
    // limits are refused by IoLimits::validate until mm-device net has a
    // limiter.)
    for device in &mut devices {
        let limit = match device.kind {
            "block" => record.io_limits.disk(),
            _ => continue,
        };
        device.args.extend(rate_limit_args(limit));
    }
    // A restored guest's RAM comes in lazily (mm-vmm's page server): each
    // back end registers its mapping with a userfaultfd of its own and
    // hands it over (vhost-user postcopy), which its jail must allow. A
    // host without /dev/userfaultfd gets an eager restore (mm-vmm falls
    // back by itself; a back end asked for it would fail to start).
    if record.resume_from.is_some() && Path::new(USERFAULTFD).exists() {
        for device in &mut devices {
            device.args.push("--lazy-memory".into());
        }
    }
    devices
}

/// The microVM's TAP, MAC and address, if it has a network interface.
pub fn tap_for(config: &BrokerConfig, record: &VmRecord) -> Option<Tap> {
    match (&config.network, &record.mac, record.ip) {
        (Some(_), Some(mac), Some(ip)) => Some(Tap { name: Network::tap_name(&record.id), mac: mac.clone(), ip }),
        _ => None,
    }
}

/// Makes `fds[i].0` appear as `fds[i].1` in the child, and nothing else
/// beyond stdio (everything of ours is CLOEXEC).
fn inherit_fds(cmd: &mut Command, fds: Vec<(RawFd, RawFd)>) {
    // SAFETY: the closure runs between fork and exec and calls only fcntl
    // and dup2, which are async-signal-safe. Sources are first moved above
    // every target, so a source numbered like another pair's target is not
    // clobbered; dup2 clears CLOEXEC on each target.
    unsafe {
        cmd.pre_exec(move || {
            let mut moved = Vec::with_capacity(fds.len());
            for (source, target) in &fds {
                let high = libc::fcntl(*source, libc::F_DUPFD_CLOEXEC, 100);
                if high < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                moved.push((high, *target));
            }
            for (high, target) in moved {
                if libc::dup2(high, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A process's log (its stdout and stderr), appended across restarts.
pub fn log_file(dir: &Path, role: &str) -> std::io::Result<File> {
    crate::safe_fs::open_append(&dir.join(format!("{role}.log")))
}

/// A listener with mm-vmm's connection already queued, and that connection.
fn vhost_user_pair(dir: &Path, role: &str) -> std::io::Result<(UnixListener, UnixStream)> {
    let path: PathBuf = dir.join(format!(".{role}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let connected = UnixStream::connect(&path);
    let _ = std::fs::remove_file(&path);
    Ok((listener, connected?))
}

/// Starts one device back end; returns it and mm-vmm's end of its socket.
pub fn spawn_device(
    config: &BrokerConfig,
    dir: &Path,
    spec: &DeviceSpec,
    record_uid: u32,
) -> std::io::Result<(Process, UnixStream)> {
    let (listener, vmm_end) = vhost_user_pair(dir, &spec.role)?;
    let mut cmd = Command::new(config.bin_dir.join("mm-device"));
    cmd.arg(spec.kind).args(["--listen-fd", &FIRST_FD.to_string()]).args(&spec.args);
    cmd.args(["--control-fd", &DEVICE_CONTROL_FD.to_string()]);
    cmd.args(jail_args(config, record_uid));
    cmd.env(JAIL_MEMORY_MAX_ENV, crate::record::DEVICE_MEMORY_MAX_BYTES.to_string());
    cmd.env_remove(JAIL_CPU_MAX_ENV).env_remove(JAIL_CPU_WEIGHT_ENV);
    cmd.stdin(Stdio::null()).stdout(log_file(dir, &spec.role)?).stderr(log_file(dir, &spec.role)?);
    let control_path = device_control_socket(dir, &spec.role);
    let _ = std::fs::remove_file(&control_path);
    let control = SeqPacketListener::bind(&control_path).map_err(std::io::Error::other)?;
    let mut fds = vec![(listener.as_raw_fd(), FIRST_FD), (control.as_fd().as_raw_fd(), DEVICE_CONTROL_FD)];
    let tap = match (&spec.tap, &config.network) {
        (Some(tap), Some(network)) => Some(network.open_tap(tap).map_err(std::io::Error::other)?),
        (Some(tap), None) => {
            return Err(std::io::Error::other(format!("TAP {} but the broker has no network", tap.name)));
        }
        (None, _) => None,
    };
    if let Some(tap) = &tap {
        fds.push((tap.as_raw_fd(), TAP_FD));
    }
    inherit_fds(&mut cmd, fds);
    let child = cmd.spawn()?;
    drop((listener, tap, control));
    Ok((Process::spawned(&spec.role, child)?, vmm_end))
}

/// Starts mm-vmm with the given device connections (guest order); returns
/// it and the broker's end of its control channel.
pub fn spawn_vmm(
    config: &BrokerConfig,
    dir: &Path,
    record: &VmRecord,
    devices: &[(&DeviceSpec, UnixStream)],
) -> std::io::Result<(Process, VmmClient)> {
    let path = dir.join(VMM_CONTROL_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = SeqPacketListener::bind(&path).map_err(std::io::Error::other)?;
    // Queued until mm-vmm accepts it.
    let control = VmmClient::connect(&path).map_err(std::io::Error::other)?;
    let mut cmd = Command::new(config.bin_dir.join("mm-vmm"));
    cmd.args(jail_args(config, record.uid()));
    cmd.envs(vmm_limits_env(record));
    // The console goes to mm-vmm's stdout, a file opened here in append
    // mode: mm-vmm needs no path for it, and a restart adds to the log.
    cmd.args(["--serial", "stdout"]);
    let mut fds = Vec::new();
    // A resume reads the snapshot through fds opened here (read-only), so
    // the jail sees no path of the snapshot store; vCPUs and RAM come from
    // the snapshot.
    let snapshot_files = match &record.resume_from {
        Some(snapshot) => {
            let state = crate::safe_fs::open_read(&snapshot.join(crate::snapshot::STATE_FILE))?;
            let memory = crate::safe_fs::open_read(&snapshot.join(crate::snapshot::MEMORY_FILE))?;
            let (state_fd, memory_fd) = (FIRST_FD + devices.len() as RawFd + 1, FIRST_FD + devices.len() as RawFd + 2);
            cmd.arg("--restore-state").arg(format!("fd:{state_fd}"));
            cmd.arg("--restore-memory").arg(format!("fd:{memory_fd}"));
            fds.push((state.as_raw_fd(), state_fd));
            fds.push((memory.as_raw_fd(), memory_fd));
            Some((state, memory))
        }
        None => {
            cmd.arg("--kernel").arg(&config.kernel);
            cmd.args(["--cpus", &record.cpus.to_string(), "--memory-mib", &record.memory_mib.to_string()]);
            cmd.arg("--cmdline").arg(guest_cmdline(config, record));
            None
        }
    };
    for (index, (spec, stream)) in devices.iter().enumerate() {
        let fd = FIRST_FD + index as RawFd;
        cmd.arg("--device").arg(format!("{}=fd:{fd}", spec.kind));
        fds.push((stream.as_raw_fd(), fd));
    }
    let control_fd = FIRST_FD + devices.len() as RawFd;
    cmd.arg("--control").arg(format!("fd:{control_fd}"));
    fds.push((listener.as_fd().as_raw_fd(), control_fd));
    // A warm template waits for its workload (mm.wait) instead.
    if snapshot_files.is_none() && record.warm_template.is_none() {
        cmd.arg("--").args(&record.command);
    }
    let console = crate::safe_fs::open_append(&dir.join(CONSOLE_LOG))?;
    cmd.stdin(Stdio::null()).stdout(console).stderr(log_file(dir, "vmm")?);
    inherit_fds(&mut cmd, fds);
    let child = cmd.spawn()?;
    drop(snapshot_files);
    Ok((Process::spawned("vmm", child)?, control))
}

/// The jail options every process of one microVM gets: its own uid/gid.
fn jail_args(config: &BrokerConfig, uid: u32) -> Vec<String> {
    let mut args = vec!["--jail-uid".to_string(), uid.to_string(), "--jail-gid".to_string(), uid.to_string()];
    if config.no_seccomp {
        args.push("--no-seccomp".into());
    }
    if config.no_jail {
        args.push("--no-jail".into());
    }
    args
}

/// Kernel parameters for mm-init: root on the first disk, hostname, env,
/// network and SSH keys.
fn guest_cmdline(config: &BrokerConfig, record: &VmRecord) -> String {
    // `quiet`: the console (`mmctl logs`, `mmctl run`) shows the workload,
    // not the kernel's boot messages; errors still print.
    let mut line = format!("quiet root=/dev/vda ro init=/init mm.overlay=/dev/vdb mm.hostname={}", record.name);
    if record.warm_template.is_some() {
        line.push_str(" mm.wait");
    }
    if !record.env.is_empty() {
        let env: Vec<String> = record.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        push_string_list(&mut line, "mm.env", &env);
    }
    if let (Some(network), Some(ip)) = (&config.network, record.ip) {
        line.push_str(&network.guest_params(ip));
    }
    if !record.ssh_keys.is_empty() {
        push_string_list(&mut line, "mm.ssh", &record.ssh_keys);
    }
    line
}

/// ` PARAM=<base64url JSON list>`: how mm-init takes values that may hold
/// spaces or quotes (guest/init/src/settings.rs).
fn push_string_list(line: &mut String, param: &str, items: &[String]) {
    // The encoding whose size the broker and the controller check at create.
    line.push_str(&format!(" {param}={}", mm_protocols::spec_rules::encode_string_list(items)));
}

/// The microVM's directory the broker's (root, 0700), its vsock
/// directory `uid`'s: at every start, and when a broker re-adopts a
/// microVM (one started under an older layout, whose directory belonged
/// to `uid`, is taken back at once).
pub fn own_vm_dirs(dir: &Path, uid: u32) -> std::io::Result<()> {
    let (own_uid, own_gid) = crate::safe_fs::own_ids();
    crate::safe_fs::own_dir(dir, own_uid, own_gid)?;
    crate::safe_fs::own_dir(&dir.join(VSOCK_DIR), uid, uid).map(drop)
}

/// Whether the microVM in `dir` has a layered disk (restored from a
/// snapshot: [`BASE_DISK`] under [`WRITABLE_DISK`], with [`DISK_MAP`]).
pub fn has_layered_disk(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir.join(BASE_DISK)).is_ok()
}

/// The writable disk's back-end flags: the file, and for a layered disk
/// its read-only base and map too.
/// `mm-device`'s flags for `limit` (none for what is unlimited).
fn rate_limit_args(limit: RateLimit) -> Vec<OsString> {
    let mut args = Vec::new();
    for (flag, value) in [("--rate-bps", limit.bytes_per_sec), ("--rate-ops", limit.ops_per_sec)] {
        if value != 0 {
            args.extend([flag.into(), value.to_string().into()]);
        }
    }
    args
}

fn writable_disk_args(dir: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["--image".into(), dir.join(WRITABLE_DISK).into()];
    if has_layered_disk(dir) {
        args.extend(["--base".into(), dir.join(BASE_DISK).into(), "--map".into(), dir.join(DISK_MAP).into()]);
    }
    args.extend(["--serial".into(), "rw".into()]);
    args
}

/// Lays out the microVM's directory for a start: the directory itself is
/// the broker's, 0700 (taken back if an older layout gave it away); the
/// vsock device's subdirectory is the microVM's uid's; and the microVM's
/// own disk (an empty, sparse ext4 that mm-init lays over the shared base,
/// or a copy-on-write layer over a snapshot's) is made unless it exists (a
/// restart keeps it), then opened here without following a link and
/// handed to that uid through the fd: its jailed block process opens it by
/// path.
pub fn prepare_vm_dir(dir: &Path, uid: u32, resume_from: Option<&Path>) -> std::io::Result<()> {
    use crate::safe_fs;
    own_vm_dirs(dir, uid)?;
    let target = dir.join(WRITABLE_DISK);
    let exists = match std::fs::symlink_metadata(&target) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    if !exists {
        let tmp = dir.join(format!("{WRITABLE_DISK}.tmp"));
        // A layered disk's leftovers of a start that did not finish (a
        // leftover temporary file is refused, as it may be a link).
        for stale in [&dir.join(BASE_DISK), &dir.join(DISK_MAP)] {
            match std::fs::remove_file(stale) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        // Made (never followed) here, whatever fills it.
        let file = safe_fs::create_new(&tmp)?;
        match resume_from {
            // A new microVM restored from a snapshot: its disk is a
            // copy-on-write layer over the snapshot's (a full copy only
            // where the two are on different filesystems).
            Some(snapshot) => {
                drop(file);
                std::fs::remove_file(&tmp)?;
                layer_over(&snapshot.join(WRITABLE_DISK), dir, &tmp)?;
            }
            None => {
                file.set_len(WRITABLE_DISK_BYTES)?;
                drop(file);
                let status = Command::new("mke2fs")
                    .args(["-q", "-F", "-t", "ext4", "-L", "mm-rw", "-E", "lazy_itable_init=1,lazy_journal_init=1"])
                    .arg(&tmp)
                    .stdin(Stdio::null())
                    .status()?;
                if !status.success() {
                    return Err(std::io::Error::other(format!("mke2fs {} failed: {status}", tmp.display())));
                }
            }
        }
        std::fs::rename(&tmp, &target)?;
    }
    if has_layered_disk(dir) {
        safe_fs::hand_over(&dir.join(DISK_MAP), uid, uid)?;
    }
    safe_fs::hand_over(&target, uid, uid).map(drop)
}

/// Makes `upper` (and the map beside it) a copy-on-write layer over the
/// snapshot's disk `snapshot_disk`, linked in as [`BASE_DISK`]: the link
/// keeps the bits alive if the snapshot is removed, and the base is made
/// read-only for everyone, since every clone reads it. Where no link can be
/// made (another filesystem), `upper` becomes a full copy instead.
fn layer_over(snapshot_disk: &Path, dir: &Path, upper: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // The snapshot store is the broker's own (root, 0700): its files are
    // taken as they are.
    let snapshot = File::open(snapshot_disk)?;
    snapshot.set_permissions(std::fs::Permissions::from_mode(0o444))?;
    let size = snapshot.metadata()?.len();
    match std::fs::hard_link(snapshot_disk, dir.join(BASE_DISK)) {
        Ok(()) => mm_overlay::Overlay::create(upper, &dir.join(DISK_MAP), size).map_err(std::io::Error::other),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => crate::snapshot::copy_disk(snapshot_disk, upper),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safe_fs::testing::{Scratch, Target, assert_refused, planted};
    use crate::safe_fs::{DIR_MODE, FILE_MODE, own_ids};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// The microVM's uid in these tests: another one if we may chown.
    fn vm_uid() -> u32 {
        if own_ids().0 == 0 { 4242 } else { own_ids().0 }
    }

    #[test]
    fn rate_limits_become_device_flags_and_unlimited_none() {
        assert!(rate_limit_args(RateLimit::default()).is_empty());
        let args = rate_limit_args(RateLimit { bytes_per_sec: 1 << 20, ops_per_sec: 0, burst_bytes: 0 });
        assert_eq!(args, ["--rate-bps", "1048576"]);
        let limits = crate::record::IoLimits { disk_iops: 50, ..Default::default() };
        assert_eq!(rate_limit_args(limits.disk()), ["--rate-ops", "50"]);
    }

    #[test]
    fn mm_vmm_gets_its_cpu_cap_weight_and_memory_limit() {
        let mut record: VmRecord = serde_json::from_value(serde_json::json!({
            "id": "abc", "name": "web", "image": "builtin", "cpus": 2, "memory_mib": 512, "command": ["sh"],
            "env": [], "auto_remove": false, "state": "running", "reason": "", "exit_code": null,
            "created_at": "2026-01-01T00:00:00.000Z", "guest_cid": 3, "processes": []
        }))
        .unwrap();
        let env = |record: &VmRecord| vmm_limits_env(record).map(|(_, value)| value);
        assert_eq!(env(&record), ["200000 100000", "100", &((512u64 + 256) << 20).to_string()]);
        record.cpu_quota_millis = 200;
        record.cpu_weight = 50;
        assert_eq!(env(&record)[..2], ["20000 100000", "50"]);
    }

    #[test]
    fn a_link_at_any_name_the_broker_writes_is_refused_and_its_target_untouched() {
        let scratch = Scratch::new("launch-links");
        let target = Target::new(&scratch);
        let vm = scratch.0.join("vm");
        for name in [CONSOLE_LOG, "vmm.log", "block-rw.log"] {
            let link = planted(&scratch, name, &target.path);
            let role = name.trim_end_matches(".log");
            let opened = if name == CONSOLE_LOG { crate::safe_fs::open_append(&link) } else { log_file(&vm, role) };
            assert_refused(opened, &link);
        }
        // The disk: neither chowned, nor made, nor copied over.
        let disk = planted(&scratch, WRITABLE_DISK, &target.path);
        assert_refused(prepare_vm_dir(&vm, vm_uid(), None), &disk);
        std::fs::remove_file(&disk).unwrap();
        let tmp = planted(&scratch, &format!("{WRITABLE_DISK}.tmp"), &target.path);
        assert_refused(prepare_vm_dir(&vm, vm_uid(), None), &tmp);
        assert_refused(prepare_vm_dir(&vm, vm_uid(), Some(&scratch.0)), &tmp);
        assert!(std::fs::symlink_metadata(&disk).is_err(), "no disk was made beside the refusal");
        target.untouched();
    }

    #[test]
    fn a_link_in_place_of_the_vsock_directory_or_the_microvm_directory_is_refused() {
        let scratch = Scratch::new("launch-dirs");
        let outside = scratch.0.join("outside-dir");
        std::fs::create_dir(&outside).unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = planted(&scratch, VSOCK_DIR, &outside);
        assert_refused(prepare_vm_dir(&scratch.0.join("vm"), vm_uid(), None), &link);
        let whole = scratch.0.join("vm-link");
        std::os::unix::fs::symlink(&outside, &whole).unwrap();
        assert_refused(prepare_vm_dir(&whole, vm_uid(), None), &whole);
        let meta = std::fs::metadata(&outside).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (own_ids().0, 0o755), "the target directory was changed");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "something was made in the target directory");
    }

    #[test]
    fn the_microvm_owns_its_disk_and_vsock_directory_and_nothing_else() {
        if own_ids().0 != 0 || Command::new("mke2fs").arg("-V").stderr(Stdio::null()).status().is_err() {
            eprintln!("skipped: needs root and mke2fs");
            return;
        }
        let scratch = Scratch::new("launch-layout");
        let vm = scratch.0.join("vm");
        // An older layout's directory, the microVM's own and open to all.
        std::fs::create_dir(&vm).unwrap();
        std::os::unix::fs::chown(&vm, Some(4242), Some(4242)).unwrap();
        std::fs::set_permissions(&vm, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_vm_dir(&vm, 4242, None).unwrap();
        let ids = |path: &Path| {
            let meta = std::fs::symlink_metadata(path).unwrap();
            (meta.uid(), meta.gid(), meta.mode() & 0o7777)
        };
        assert_eq!(ids(&vm), (0, 0, DIR_MODE));
        assert_eq!(ids(&vm.join(VSOCK_DIR)), (4242, 4242, DIR_MODE));
        assert_eq!(ids(&vm.join(WRITABLE_DISK)), (4242, 4242, FILE_MODE));
        assert_eq!(std::fs::metadata(vm.join(WRITABLE_DISK)).unwrap().len(), WRITABLE_DISK_BYTES);
        // A restart keeps the disk and the layout.
        std::fs::OpenOptions::new().write(true).open(vm.join(WRITABLE_DISK)).unwrap().set_len(4096).unwrap();
        prepare_vm_dir(&vm, 4242, None).unwrap();
        assert_eq!(std::fs::metadata(vm.join(WRITABLE_DISK)).unwrap().len(), 4096);
        assert_eq!(ids(&vm), (0, 0, DIR_MODE));
        let mut names: Vec<_> = std::fs::read_dir(&vm).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, [WRITABLE_DISK, VSOCK_DIR], "nothing else is left, the temporary disk included");
        // A restored microVM's disk is a layer over the snapshot's: the
        // base a read-only link to it (no copy), the layer and its map
        // the microVM's, the layer empty.
        let snapshot = scratch.0.join("snapshot");
        std::fs::create_dir(&snapshot).unwrap();
        std::fs::write(snapshot.join(WRITABLE_DISK), vec![7u8; 3 * 4096]).unwrap();
        let restored = scratch.0.join("restored");
        std::fs::create_dir(&restored).unwrap();
        prepare_vm_dir(&restored, 4243, Some(&snapshot)).unwrap();
        let inode = |path: &Path| std::fs::metadata(path).unwrap().ino();
        assert_eq!(inode(&restored.join(BASE_DISK)), inode(&snapshot.join(WRITABLE_DISK)));
        assert_eq!(ids(&restored.join(BASE_DISK)), (0, 0, 0o444));
        assert_eq!(ids(&restored.join(WRITABLE_DISK)), (4243, 4243, FILE_MODE));
        assert_eq!(ids(&restored.join(DISK_MAP)).0, 4243);
        let upper = std::fs::metadata(restored.join(WRITABLE_DISK)).unwrap();
        assert_eq!((upper.len(), upper.blocks()), (3 * 4096, 0), "an empty, sparse layer");
        let args: Vec<String> =
            writable_disk_args(&restored).iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.windows(2).any(|w| w[0] == "--base" && w[1].ends_with(BASE_DISK)), "{args:?}");
        // Once removed, the snapshot's disk lives on in its clone.
        std::fs::remove_dir_all(&snapshot).unwrap();
        prepare_vm_dir(&restored, 4243, None).unwrap();
        assert_eq!(std::fs::read(restored.join(BASE_DISK)).unwrap(), vec![7u8; 3 * 4096]);
    }
}
