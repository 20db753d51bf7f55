//! Booting the built-in guest (our kernel + busybox/mm-init initramfs) with
//! mm-vmm, for tests and benchmarks.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::{Run, guest_initramfs, guest_kernel, run_with_timeout, workspace_binary};

/// Cold boots take ~75 s on PVM hosts, more with two guests on two cores.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// One mm-vmm invocation on the built-in guest.
#[derive(Debug, Clone)]
pub struct Boot {
    pub cpus: u8,
    pub memory_mib: u64,
    pub extra_cmdline: String,
    pub command: Vec<String>,
    /// Boot the bzImage built beside the vmlinux instead of the vmlinux.
    pub bzimage: bool,
}

impl Boot {
    /// A 1-vCPU, 128 MiB guest running `command`.
    pub fn new(command: &[&str]) -> Self {
        Boot {
            cpus: 1,
            memory_mib: 128,
            extra_cmdline: String::new(),
            command: command.iter().map(|s| s.to_string()).collect(),
            bzimage: false,
        }
    }

    pub fn bzimage(mut self) -> Self {
        self.bzimage = true;
        self
    }

    pub fn cpus(mut self, cpus: u8) -> Self {
        self.cpus = cpus;
        self
    }

    /// The mm-vmm command line, ready to spawn.
    pub fn command(&self) -> Result<Command> {
        let mut kernel = guest_kernel()?;
        if self.bzimage {
            kernel.set_file_name("bzImage");
        }
        let mut cmd = Command::new(workspace_binary("mm-vmm")?);
        cmd.arg("--kernel")
            .arg(kernel)
            .arg("--initrd")
            .arg(guest_initramfs()?)
            .arg("--cpus")
            .arg(self.cpus.to_string())
            .arg("--memory-mib")
            .arg(self.memory_mib.to_string());
        if !self.extra_cmdline.is_empty() {
            cmd.arg("--cmdline").arg(&self.extra_cmdline);
        }
        cmd.arg("--").args(&self.command);
        Ok(cmd)
    }

    pub fn run(&self) -> Result<Run> {
        run_with_timeout(self.command()?, BOOT_TIMEOUT)
    }
}
