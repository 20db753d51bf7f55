//! mm-init: PID 1 of every MicroMachines guest.
//!
//! It mounts the pseudo filesystems, tells mm-vmm that user space has started,
//! configures the network (network.rs), runs the workload from the kernel
//! command line with the console as its stdio, reaps every orphan, forwards
//! termination signals to the workload, reports the workload's exit status
//! to mm-vmm and then resets the machine, which ends mm-vmm. Its only
//! threads are the exec agent's (agent/, when the guest has a vsock device)
//! and the SSH server's (ssh/, on TCP port 22); PID 1's own work stays on
//! the main thread (see PVM.md).

mod agent;
mod bootdev;
mod network;
mod overlay;
mod settings;
mod ssh;
mod supervise;
mod tools;

use std::io::Write;
use std::process::Command;

use nix::mount::{MsFlags, mount};

use bootdev::BootDevice;
use settings::Settings;

/// The line the benchmarks and tests look for on the serial console.
const STARTED_MARKER: &str = "mm-init: user space started";

fn mount_pseudo_filesystems() {
    let mounts: [(&str, &str, &str, MsFlags); 6] = [
        ("proc", "/proc", "proc", MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC),
        ("sysfs", "/sys", "sysfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC),
        ("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID),
        ("devpts", "/dev/pts", "devpts", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC),
        ("tmpfs", "/dev/shm", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV),
        ("tmpfs", "/tmp", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV),
    ];
    for (source, target, fstype, flags) in mounts {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(Some(source), target, Some(fstype), flags, None::<&str>) {
            // devtmpfs is already mounted when the kernel mounted the root itself.
            if e != nix::errno::Errno::EBUSY {
                eprintln!("mm-init: mount {target}: {e}");
            }
        }
    }
}

fn main() {
    if std::process::id() != 1 {
        // Not PID 1: run one of the built-in tools (see tools.rs).
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.is_empty() {
            eprintln!("mm-init: must run as PID 1 inside a microVM (or: mm-init TOOL ARGS)");
            std::process::exit(2);
        }
        std::process::exit(tools::run(&args));
    }
    mount_pseudo_filesystems();
    println!("{STARTED_MARKER}");
    let _ = std::io::stdout().flush();

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let settings = match Settings::parse(&cmdline) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mm-init: bad kernel command line: {e}");
            supervise::power_off(None, 125);
        }
    };
    if let Some(device) = &settings.overlay {
        if let Err(e) = overlay::switch_root(device) {
            eprintln!("mm-init: cannot set up the writable root on {device}: {e}");
            supervise::power_off(None, 125);
        }
        // The pseudo filesystems stayed behind with the old root.
        mount_pseudo_filesystems();
    }
    let boot_device = settings.boot_device.and_then(|addr| match BootDevice::open(addr) {
        Ok(dev) => Some(dev),
        Err(e) => {
            eprintln!("mm-init: boot device at {addr:#x}: {e}");
            None
        }
    });
    if let Some(dev) = &boot_device {
        dev.mark_userspace_started();
    }
    network::configure(&settings);

    agent::start();
    // SSH only where there is a network to serve it on.
    if settings.address.is_some() {
        ssh::start(&settings.ssh_keys);
    }
    let status = run_workload(&settings);
    supervise::power_off(boot_device.as_ref(), status);
}

/// Runs the workload to completion and returns its shell-style exit status
/// (the exit code, or 128 + the signal number).
fn run_workload(settings: &Settings) -> u32 {
    let signals = match supervise::block_signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mm-init: cannot set up signal handling: {e}");
            return 125;
        }
    };
    let mut command = Command::new(&settings.command[0]);
    command
        .args(&settings.command[1..])
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/root")
        .env("TERM", "linux")
        .current_dir("/");
    for pair in &settings.env {
        if let Some((key, value)) = pair.split_once('=') {
            command.env(key, value);
        }
    }
    // The workload must not inherit the signals blocked here for sigwait.
    // std's spawn was seen NOT to clear them here (the workload's shell had
    // SIGTERM and SIGCHLD blocked: `mmctl stop` could not end it, and
    // ash's `wait` slept forever), so clear the mask explicitly. Its own
    // process group lets us forward signals to the whole job.
    // SAFETY: the closure runs between fork and exec and calls only
    // sigemptyset and sigprocmask, which are async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(empty.as_mut_ptr());
            if libc::sigprocmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("mm-init: cannot run {:?}: {e}", settings.command[0]);
            return if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
        }
    };
    supervise::wait_for(child.id() as i32, &signals)
}
