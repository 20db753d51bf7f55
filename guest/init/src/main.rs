//! mm-init: PID 1 of every MicroMachines guest.
//!
//! It mounts the pseudo filesystems, tells mm-vmm that user space has started,
//! configures the network (network.rs), runs the workload from the kernel
//! command line with the console as its stdio (workload/), reaps every
//! orphan, forwards termination signals to the workload, reports the
//! workload's exit status to mm-vmm and then resets the machine, which ends
//! mm-vmm. Its only threads are the exec agent's (agent/, when the guest has
//! a vsock device) and the SSH server's (ssh/, on TCP port 22); PID 1's own
//! work stays on the main thread (see PVM.md).
//!
//! With `mm.wait` on the kernel command line (a warm start) it does all of
//! that, but instead of the command line's workload it runs the first one
//! the host hands over through the exec agent, and until then it waits,
//! saying `mm-init: waiting for a workload` on the console: the moment a
//! host snapshots the guest, to restore it for each run instead of booting.
//! A restored guest then gets a new identity and its workload from the host
//! (agent/identity.rs, workload/handover.rs).

mod agent;
mod bootdev;
mod network;
mod overlay;
mod settings;
mod ssh;
mod supervise;
mod tools;
mod workload;

use std::io::Write;

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

    let agent_running = agent::start();
    // SSH only where there is a network to serve it on.
    if settings.address.is_some() {
        ssh::start(&settings.ssh_keys);
    }
    let status = if !settings.wait {
        workload::run(&workload::from_settings(&settings))
    } else if agent_running {
        workload::wait_and_run()
    } else {
        eprintln!("mm-init: mm.wait, but no exec agent (no vsock device) to take a workload from the host");
        125
    };
    supervise::power_off(boot_device.as_ref(), status);
}
