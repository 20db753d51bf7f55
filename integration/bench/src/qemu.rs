//! The reference: QEMU's `microvm` machine booting the same kernel,
//! initramfs and command line as mm-vmm, with the same RAM and vCPUs.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::BootConfig;

/// Debian's `qemu-system-x86` puts the binary here.
pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// The machine: microvm without option ROMs or RTC, with the legacy ISA
/// serial port, PIT and PIC that our guest kernel (no ACPI) expects.
const MACHINE: &str = "microvm,x-option-roms=off,rtc=off,isa-serial=on,pit=on,pic=on";

/// Installs QEMU (`apt-get install -y qemu-system-x86`) if it is missing,
/// retrying once after `apt-get update` because a fresh machine may have
/// no package lists yet.
pub fn ensure_installed() -> Result<()> {
    if Path::new(QEMU).exists() {
        return Ok(());
    }
    eprintln!("mm-bench: {QEMU} missing: apt-get install -y qemu-system-x86");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "qemu-system-x86"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
    };
    if !install().context("running apt-get")?.success() {
        let updated = Command::new("apt-get").arg("update").stdout(Stdio::null()).status();
        if !updated.context("running apt-get update")?.success() || !install()?.success() {
            bail!("apt-get install qemu-system-x86 failed (run as root?)");
        }
    }
    if !Path::new(QEMU).exists() {
        bail!("qemu-system-x86 installed, but {QEMU} is still missing");
    }
    Ok(())
}

/// `QEMU emulator version 7.2.22 (...)`, the first line of `--version`.
pub fn version() -> Result<String> {
    let out = Command::new(QEMU).arg("--version").output().context("running qemu --version")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}

/// The QEMU invocation booting `kernel` and `initrd` with `cmdline`.
///
/// `-cpu host,-arch-capabilities`: PVM cannot set that MSR (PVM.md #1).
/// `-nodefaults -no-user-config`: no default devices or config files, so
/// QEMU's cost is what microvm needs. `-no-reboot`: the guest's reset at the
/// end of the workload makes QEMU exit (our boot device is absent, so
/// mm-init skips it and just resets).
pub fn command(config: &BootConfig, kernel: &Path, initrd: &Path, cmdline: &str) -> Command {
    command_on(MACHINE, config, kernel, initrd, cmdline)
}

/// The same for a guest with virtio-mmio devices. `acpi=off`: only then
/// does microvm add a `virtio_mmio.device=` entry per device to the kernel
/// command line (`microvm_machine_reset` in QEMU 7.2); with ACPI on it
/// describes them in ACPI tables, which our kernel (no ACPI) cannot read,
/// and the guest finds no devices. The guest sees no other difference.
pub fn device_command(config: &BootConfig, kernel: &Path, initrd: &Path, cmdline: &str) -> Command {
    command_on(&format!("{MACHINE},acpi=off"), config, kernel, initrd, cmdline)
}

/// The same guest with no initramfs and its root on a virtio-blk disk
/// (`image`, raw, QEMU's default `cache=writeback`), as the snapshot
/// benchmark boots it on every system; `cmdline` must say `root=/dev/vda`.
pub fn root_disk_command(config: &BootConfig, kernel: &Path, image: &Path, cmdline: &str) -> Command {
    let mut cmd = base_command(&format!("{MACHINE},acpi=off"), config, kernel, cmdline);
    cmd.arg("-drive")
        .arg(format!("id=root,file={},format=raw,if=none", image.display()))
        .args(["-device", "virtio-blk-device,drive=root"]);
    cmd
}

/// What [`full_command`] gives the guest: the microVM shape the broker
/// makes (a read-only root, a writable disk, vsock, net).
pub struct FullDevices<'a> {
    /// The read-only root image (`/dev/vda`).
    pub root: &'a Path,
    /// The writable disk (`/dev/vdb`).
    pub rw: &'a Path,
    /// A vhost-user vsock back end's socket (QEMU 7.2's
    /// `vhost-user-vsock-device`; the in-kernel `vhost-vsock-device` needs
    /// /dev/vhost-vsock).
    pub vsock_backend: &'a Path,
    /// The TAP, inherited as this fd number.
    pub tap_fd: i32,
    pub mac: &'a str,
}

/// microvm with the devices of a broker-made microVM, in the broker's
/// order. Guest RAM is a shared memfd (`memory-backend-memfd,share=on`),
/// which vhost-user needs (the back end maps it), so it shows in smaps as
/// `/memfd:memory-backend-memfd (deleted)`. Block and net are QEMU's own
/// in-process devices (`vhost=off`: no vhost-net here either).
pub fn full_command(config: &BootConfig, kernel: &Path, cmdline: &str, devices: &FullDevices) -> Command {
    let machine = format!("{MACHINE},acpi=off,memory-backend=mem");
    let mut cmd = base_command(&machine, config, kernel, cmdline);
    cmd.arg("-object").arg(format!("memory-backend-memfd,id=mem,size={}M,share=on", config.memory_mib));
    cmd.arg("-drive")
        .arg(format!("id=root,file={},format=raw,if=none,readonly=on", devices.root.display()))
        .args(["-device", "virtio-blk-device,drive=root,serial=root"]);
    cmd.arg("-drive")
        .arg(format!("id=rw,file={},format=raw,if=none", devices.rw.display()))
        .args(["-device", "virtio-blk-device,drive=rw,serial=rw"]);
    cmd.arg("-chardev")
        .arg(format!("socket,id=vsock,path={}", devices.vsock_backend.display()))
        .args(["-device", "vhost-user-vsock-device,chardev=vsock"]);
    cmd.arg("-netdev")
        .arg(format!("tap,id=net0,fd={},vhost=off", devices.tap_fd))
        .arg("-device")
        .arg(format!("virtio-net-device,netdev=net0,mac={}", devices.mac));
    cmd
}

fn command_on(machine: &str, config: &BootConfig, kernel: &Path, initrd: &Path, cmdline: &str) -> Command {
    let mut cmd = base_command(machine, config, kernel, cmdline);
    cmd.arg("-initrd").arg(initrd);
    cmd
}

fn base_command(machine: &str, config: &BootConfig, kernel: &Path, cmdline: &str) -> Command {
    let mut cmd = Command::new(QEMU);
    cmd.args(["-M", machine, "-enable-kvm", "-cpu", "host,-arch-capabilities"])
        .args(["-m", &config.memory_mib.to_string()])
        .args(["-smp", &config.cpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-no-reboot", "-append", cmdline]);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_uses_the_same_guest() {
        let config =
            BootConfig { cpus: 2, memory_mib: 96, extra_cmdline: String::new(), workload: vec!["true".into()] };
        let cmd = command(&config, Path::new("/k"), Path::new("/i"), "console=ttyS0 a=b");
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let after = |flag: &str| args[args.iter().position(|a| a == flag).unwrap() + 1].clone();
        assert_eq!(after("-m"), "96");
        assert_eq!(after("-smp"), "2");
        assert_eq!(after("-kernel"), "/k");
        assert_eq!(after("-initrd"), "/i");
        assert_eq!(after("-append"), "console=ttyS0 a=b");
    }

    #[test]
    fn full_command_has_the_brokers_devices_and_shared_ram() {
        let config =
            BootConfig { cpus: 1, memory_mib: 128, extra_cmdline: String::new(), workload: vec!["true".into()] };
        let devices = FullDevices {
            root: Path::new("/r.ext4"),
            rw: Path::new("/w.ext4"),
            vsock_backend: Path::new("/v.sock"),
            tap_fd: 3,
            mac: "02:00:00:00:00:01",
        };
        let cmd = full_command(&config, Path::new("/k"), "console=ttyS0", &devices);
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let line = args.join(" ");
        assert!(line.contains("acpi=off,memory-backend=mem"), "{line}");
        assert!(line.contains("memory-backend-memfd,id=mem,size=128M,share=on"), "{line}");
        let root = line.find("file=/r.ext4,format=raw,if=none,readonly=on").unwrap();
        let rw = line.find("file=/w.ext4,format=raw,if=none ").unwrap();
        assert!(root < rw, "the root disk must come first: {line}");
        assert!(line.contains("socket,id=vsock,path=/v.sock -device vhost-user-vsock-device,chardev=vsock"));
        assert!(
            line.contains("tap,id=net0,fd=3,vhost=off -device virtio-net-device,netdev=net0,mac=02:00:00:00:00:01")
        );
        assert!(!args.contains(&"-initrd".to_string()));
    }
}
