//! `mm-vmm`: boot one microVM and exit with its workload's status.
//!
//! Exit status: the workload's (0–255, 128+N for a signal) when mm-init
//! reported one; 125 when mm-vmm itself failed (bad input, KVM error, a
//! guest the hypervisor could not run) or the guest reset without a status.
//!
//! Unless told otherwise it runs jailed (DESIGN.md, "Jails and policies"):
//! when started outside a jail it re-executes itself through `mm-jailer`
//! with only what it needs bound in (kernel, initramfs, /dev/kvm, the
//! device and control sockets or their fds at the same numbers, the serial
//! and profile files' directories) and mirrors the jailed copy's status.
//! Inside, every thread installs its seccomp policy. `--no-jail` and
//! `--no-seccomp` exist for debugging only.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use mm_vmm::devices::serial::SerialOutput;
use mm_vmm::endpoint::Endpoint;
use mm_vmm::pvm::PvmMode;
use mm_vmm::snapshot::{FileArg, SnapshotFiles};
use mm_vmm::vm::{Boot, DeviceSpec, KernelBoot, MemoryRestore};
use mm_vmm::{Vm, VmConfig, VmOutcome};

/// Status for "mm-vmm failed", as `docker run` uses 125 for its own errors.
const VMM_FAILURE: u8 = mm_vmm::fatal::VMM_FAILURE as u8;

#[derive(Debug, Parser)]
#[command(name = "mm-vmm", version, about = "Boot one MicroMachines microVM")]
struct Args {
    /// Guest kernel: an ELF vmlinux or a bzImage.
    #[arg(long, required_unless_present = "restore_state", conflicts_with = "restore_state")]
    kernel: Option<PathBuf>,
    /// Resume the guest of a snapshot instead of booting: its state file
    /// (a path, or `fd:N` opened by the broker). Needs `--restore-memory`;
    /// vCPUs and RAM come from the snapshot, devices from `--device` (the
    /// same kinds in the same order).
    #[arg(long, value_name = "PATH|fd:N", requires = "restore_memory")]
    restore_state: Option<FileArg>,
    /// The snapshot's memory file (a path or `fd:N`).
    #[arg(long, value_name = "PATH|fd:N", requires = "restore_state")]
    restore_memory: Option<FileArg>,
    /// Initramfs (newc cpio, optionally compressed) to use as the root.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel parameters, appended to mm-vmm's own.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// Where the serial console goes: `stdout`, `none`, or a file path.
    #[arg(long, default_value = "stdout")]
    serial: SerialOutput,
    /// Apply the PVM host adjustments: auto-detected by default.
    #[arg(long, value_enum, default_value_t = PvmMode::Auto)]
    pvm: PvmMode,
    /// Debugging aid: sample vCPU 0's guest RIP every millisecond and write
    /// a histogram here at exit.
    #[arg(long)]
    profile_guest: Option<PathBuf>,
    /// A virtio device served by a vhost-user back end: `KIND=SOCKET` with
    /// KIND block, net or vsock. Repeatable; the guest sees them in order.
    #[arg(long = "device", value_name = "KIND=SOCKET")]
    devices: Vec<DeviceSpec>,
    /// The control channel (protocols/vmm.capnp): a path to listen on, or
    /// `fd:N`, an inherited listening SOCK_SEQPACKET socket (the broker's).
    #[arg(long, value_name = "PATH|fd:N")]
    control: Option<Endpoint>,
    /// DEBUGGING ONLY: run unjailed, with this process's full privileges.
    #[arg(long)]
    no_jail: bool,
    /// DEBUGGING ONLY: run without seccomp filters.
    #[arg(long)]
    no_seccomp: bool,
    /// The microVM's unprivileged uid and gid inside the jail (default: the
    /// caller's, with every capability dropped).
    #[arg(long)]
    jail_uid: Option<u32>,
    #[arg(long)]
    jail_gid: Option<u32>,
    /// An open /dev/kvm to use instead of opening it (the broker's, or the
    /// one the jail passes in: the jail has no /dev/kvm node).
    #[arg(long, value_name = "N")]
    kvm_fd: Option<std::os::fd::RawFd>,
    /// How a restore brings guest RAM in: `lazy` (on first touch, through
    /// userfaultfd, the device processes' touches included) or `eager`
    /// (all of it before the vCPUs start).
    #[arg(long, value_enum, default_value_t = MemoryRestore::Lazy)]
    memory_restore: MemoryRestore,
    /// An open /dev/userfaultfd for a lazy restore (the one the jail passes
    /// in: the jail has no device nodes).
    #[arg(long, value_name = "N")]
    uffd_fd: Option<std::os::fd::RawFd>,
    /// The workload for mm-init to run, after `--`.
    #[arg(last = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let start = Instant::now();
    mm_vmm::fatal::exit_on_panic();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MM_LOG").unwrap_or_else(|_| "mm_vmm=info".into()))
        .with_target(false)
        .init();
    let args = Args::parse();
    if !args.no_jail && !mm_jailer::is_jailed() {
        if mm_jailer::can_jail() {
            return match run_jailed(&args) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("mm-vmm: cannot start the jailed VMM: {e:#}");
                    ExitCode::from(VMM_FAILURE)
                }
            };
        }
        tracing::warn!("not root: cannot build a jail, running UNJAILED (seccomp still applies)");
    } else if args.no_jail {
        tracing::warn!("--no-jail: running UNJAILED, with this process's full privileges (debugging only)");
    }
    if args.no_seccomp {
        tracing::warn!("--no-seccomp: running WITHOUT seccomp filters (debugging only)");
    } else {
        mm_vmm::vm::enable_seccomp();
    }
    let boot = match (args.kernel, args.restore_state, args.restore_memory) {
        (_, Some(state), Some(memory)) => Boot::Snapshot(SnapshotFiles { state, memory }),
        (Some(kernel), _, _) => {
            Boot::Kernel(KernelBoot { kernel, initrd: args.initrd, extra_cmdline: args.cmdline, command: args.command })
        }
        _ => unreachable!("clap requires --kernel or --restore-state with --restore-memory"),
    };
    let config = VmConfig {
        boot,
        cpus: args.cpus,
        memory_mib: args.memory_mib,
        serial: args.serial,
        pvm: args.pvm,
        profile_guest: args.profile_guest,
        devices: args.devices,
        control_socket: args.control,
        kvm_fd: args.kvm_fd,
        memory_restore: args.memory_restore,
        uffd_fd: args.uffd_fd,
    };
    let outcome = Vm::build(&config, start).and_then(Vm::run);
    match outcome {
        Ok(VmOutcome::Exited(status)) => {
            // Also in the log: a supervisor that is not our parent (a
            // restarted broker) learns the status from here.
            eprintln!("mm-vmm: the workload exited with status {status}");
            ExitCode::from(u8::try_from(status).unwrap_or(VMM_FAILURE))
        }
        Ok(VmOutcome::ResetWithoutStatus) => {
            eprintln!(
                "mm-vmm: the guest reset without reporting an exit status (kernel panic, or an init other than mm-init)"
            );
            ExitCode::from(VMM_FAILURE)
        }
        Err(e) => {
            eprintln!("mm-vmm: {e}");
            ExitCode::from(VMM_FAILURE)
        }
    }
}

/// The directory a file will be created in.
fn parent_dir(path: &Path) -> Option<PathBuf> {
    std::path::absolute(path).ok()?.parent().map(Path::to_path_buf)
}

/// Where the jailed copy finds /dev/kvm (below the broker's first fd, 10).
const JAILED_KVM_FD: std::os::fd::RawFd = 9;
/// Where the jailed copy finds /dev/userfaultfd for a lazy restore.
const JAILED_UFFD_FD: std::os::fd::RawFd = 8;

/// Re-executes mm-vmm in a jail with only what this VM needs, waits for
/// it and returns the status to exit with.
fn run_jailed(args: &Args) -> anyhow::Result<u8> {
    use mm_jailer::BindMount;
    let mut jail = mm_jailer::SelfJail::new("vmm", Vec::new(), args.jail_uid, args.jail_gid)?;
    let spec = &mut jail.spec;
    // Guest RAM, plus room for our own memory and the kernel's copies.
    spec.limits.memory_bytes = Some((args.memory_mib + 256) << 20);
    spec.limits.pids = Some(u64::from(args.cpus) + 16);
    spec.limits.file_size = Some(4 << 30);
    let mut rewritten: Vec<(&str, PathBuf)> = Vec::new();
    // Files are bound at their real paths; a missing one is left out, so
    // the jailed copy reports it as it always has.
    let snapshot_paths = [("--restore-state", &args.restore_state), ("--restore-memory", &args.restore_memory)];
    for (flag, file) in snapshot_paths {
        match file {
            Some(FileArg::Fd(fd)) => spec.fds.push((*fd, *fd)),
            Some(FileArg::Path(path)) => {
                if let Ok(real) = std::fs::canonicalize(path) {
                    spec.mounts.push(BindMount::read_only(&real));
                    rewritten.push((flag, real));
                }
            }
            None => {}
        }
    }
    for (flag, path) in [("--kernel", args.kernel.as_ref()), ("--initrd", args.initrd.as_ref())] {
        if let Some(real) = path.and_then(|p| std::fs::canonicalize(p).ok()) {
            spec.mounts.push(BindMount::read_only(&real));
            rewritten.push((flag, real));
        }
    }
    // KVM comes in as an fd opened here, before the jail drops to the
    // microVM's uid (which has no access to /dev/kvm): the jail holds no
    // device node at all. Without /dev/kvm the jailed copy reports it.
    let kvm_fd = pass_device_node(spec, args.kvm_fd, true, "/dev/kvm", JAILED_KVM_FD);
    // A lazy restore's userfaultfd comes in the same way (kernel-mode
    // faults need /dev/userfaultfd, which only root may open); a host
    // without it gets an eager restore, which the jailed copy reports.
    let lazy = args.restore_memory.is_some() && args.memory_restore == MemoryRestore::Lazy;
    let uffd_fd = pass_device_node(spec, args.uffd_fd, lazy, "/dev/userfaultfd", JAILED_UFFD_FD);
    // Inherited sockets keep their numbers; socket paths are bound in.
    for endpoint in args.devices.iter().map(|d| &d.socket).chain(args.control.iter()) {
        match endpoint {
            Endpoint::Fd { fd, .. } => spec.fds.push((*fd, *fd)),
            Endpoint::Path(path) if args.control.as_ref() != Some(endpoint) => {
                spec.mounts.push(BindMount::read_only(std::path::absolute(path)?));
            }
            Endpoint::Path(_) => {}
        }
    }
    // The control socket is created there, and `reconnect` names new back
    // ends' sockets beside it (until the broker passes them as fds).
    let mut writable_dirs: Vec<PathBuf> = Vec::new();
    if let Some(Endpoint::Path(path)) = &args.control {
        writable_dirs.extend(parent_dir(path));
    }
    if let SerialOutput::File(path) = &args.serial {
        writable_dirs.extend(parent_dir(path));
    }
    writable_dirs.extend(args.profile_guest.as_deref().and_then(parent_dir));
    writable_dirs.sort();
    writable_dirs.dedup();
    spec.mounts.extend(writable_dirs.into_iter().map(BindMount::writable));
    // The jail has no /sys: decide about PVM here.
    let pvm = if args.pvm.resolve() { "on" } else { "off" };
    spec.args = rewrite_args(&rewritten, pvm);
    for (flag, fd) in [("--kvm-fd", kvm_fd), ("--uffd-fd", uffd_fd)] {
        if let Some(fd) = fd {
            let at = spec.args.iter().position(|a| a == "--").unwrap_or(spec.args.len());
            spec.args.splice(at..at, [flag.into(), fd.to_string().into()]);
        }
    }
    Ok(mm_jailer::exit_code(&jail.run()?))
}

/// A device node the jailed copy uses but may not hold: an fd the caller
/// passed (`given`) keeps its number; else, when `wanted`, `path` is opened
/// here, as root, and passed at `jailed`. Returns the number to name with
/// a flag, if it is new; a node that cannot be opened is left out.
fn pass_device_node(
    spec: &mut mm_jailer::JailSpec,
    given: Option<std::os::fd::RawFd>,
    wanted: bool,
    path: &str,
    jailed: std::os::fd::RawFd,
) -> Option<std::os::fd::RawFd> {
    if let Some(fd) = given {
        spec.fds.push((fd, fd));
        return None;
    }
    if !wanted {
        return None;
    }
    let node = std::fs::OpenOptions::new().read(true).write(true).open(path).ok()?;
    spec.fds.push((std::os::fd::IntoRawFd::into_raw_fd(node), jailed));
    Some(jailed)
}

/// Our command line for the jailed copy: absolute paths for the files that
/// were bound, and PVM decided.
fn rewrite_args(paths: &[(&str, PathBuf)], pvm: &str) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::new();
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--" {
            out.push(arg);
            out.extend(args.by_ref());
            break;
        }
        let text = arg.to_string_lossy().to_string();
        let (flag, inline) = match text.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (text.clone(), None),
        };
        let replacement = if flag == "--pvm" {
            Some(PathBuf::from(pvm))
        } else {
            paths.iter().find(|(f, _)| *f == flag).map(|(_, p)| p.clone())
        };
        match (replacement, inline) {
            (Some(value), Some(_)) => out.push(format!("{flag}={}", value.display()).into()),
            (Some(value), None) => {
                args.next();
                out.extend([arg, value.into_os_string()]);
            }
            (None, _) => out.push(arg),
        }
    }
    if !out.iter().any(|a| a.to_string_lossy().starts_with("--pvm")) {
        let at = out.iter().position(|a| a == "--").unwrap_or(out.len());
        out.splice(at..at, ["--pvm".into(), pvm.into()]);
    }
    out
}
