//! Booting the built-in guest (our kernel + busybox/mm-init initramfs) with
//! mm-vmm, for tests and benchmarks.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::{Run, guest_initramfs, guest_kernel, run_with_timeout, workspace_binary};

/// Cold boots take 40-75 s on PVM hosts, and a busy guest's user space is
/// slow too (its kernel work is emulated): generous, so that only a hang
/// fails on time.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(1200);

/// One mm-vmm invocation on the built-in guest.
#[derive(Debug, Clone)]
pub struct Boot {
    pub cpus: u8,
    pub memory_mib: u64,
    pub extra_cmdline: String,
    pub command: Vec<String>,
    /// Boot the bzImage built beside the vmlinux instead of the vmlinux.
    pub bzimage: bool,
    /// Use the built-in initramfs as the root (else a block device must
    /// carry it: see `root_on_block`).
    pub initramfs: bool,
    /// `KIND=SOCKET` virtio devices, in guest order.
    pub devices: Vec<String>,
    pub control_socket: Option<PathBuf>,
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
            initramfs: true,
            devices: Vec::new(),
            control_socket: None,
        }
    }

    /// Root filesystem on the first block device (served at `socket`)
    /// instead of the initramfs.
    pub fn root_on_block(mut self, socket: &Path) -> Self {
        self.initramfs = false;
        self.devices.insert(0, format!("block={}", socket.display()));
        self.extra_cmdline = format!("root=/dev/vda rw init=/init {}", self.extra_cmdline).trim().to_string();
        self
    }

    pub fn device(mut self, kind: &str, socket: &Path) -> Self {
        self.devices.push(format!("{kind}={}", socket.display()));
        self
    }

    pub fn control(mut self, socket: &Path) -> Self {
        self.control_socket = Some(socket.to_path_buf());
        self
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
        cmd.arg("--kernel").arg(kernel);
        if self.initramfs {
            cmd.arg("--initrd").arg(guest_initramfs()?);
        }
        for device in &self.devices {
            cmd.arg("--device").arg(device);
        }
        if let Some(control) = &self.control_socket {
            cmd.arg("--control").arg(control);
        }
        cmd.arg("--cpus").arg(self.cpus.to_string()).arg("--memory-mib").arg(self.memory_mib.to_string());
        if !self.extra_cmdline.is_empty() {
            cmd.arg("--cmdline").arg(&self.extra_cmdline);
        }
        cmd.arg("--").args(&self.command);
        Ok(cmd)
    }

    pub fn run(&self) -> Result<Run> {
        run_with_timeout(self.command()?, BOOT_TIMEOUT)
    }

    /// Starts the guest and hands back its console line by line.
    pub fn spawn(&self) -> Result<RunningGuest> {
        RunningGuest::spawn(self.command()?)
    }
}

/// An mm-vmm that resumes a snapshot's guest instead of booting one.
#[derive(Debug, Clone)]
pub struct Restore {
    pub state: PathBuf,
    pub memory: PathBuf,
    /// `KIND=SOCKET`, the snapshot's devices in its order.
    pub devices: Vec<String>,
    pub control_socket: Option<PathBuf>,
}

impl Restore {
    pub fn new(state: &Path, memory: &Path) -> Self {
        Restore { state: state.into(), memory: memory.into(), devices: Vec::new(), control_socket: None }
    }

    pub fn device(mut self, kind: &str, socket: &Path) -> Self {
        self.devices.push(format!("{kind}={}", socket.display()));
        self
    }

    pub fn command(&self) -> Result<Command> {
        let mut cmd = Command::new(workspace_binary("mm-vmm")?);
        cmd.arg("--restore-state").arg(&self.state).arg("--restore-memory").arg(&self.memory);
        for device in &self.devices {
            cmd.arg("--device").arg(device);
        }
        if let Some(control) = &self.control_socket {
            cmd.arg("--control").arg(control);
        }
        Ok(cmd)
    }

    pub fn spawn(&self) -> Result<RunningGuest> {
        RunningGuest::spawn(self.command()?)
    }

    pub fn run(&self) -> Result<Run> {
        run_with_timeout(self.command()?, Duration::from_secs(60))
    }
}

impl RunningGuest {
    /// Starts mm-vmm as `cmd` says, its console (stdout) read line by line.
    pub fn spawn(mut cmd: Command) -> Result<RunningGuest> {
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = child.stderr.take().expect("stderr is piped");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut text);
            text
        });
        Ok(RunningGuest { child, lines, console: Vec::new(), stderr: Some(stderr) })
    }
}

/// A guest started with [`Boot::spawn`].
pub struct RunningGuest {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every console line seen so far.
    pub console: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl RunningGuest {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a console line containing `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.console.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("no console line with {needle:?} within {timeout:?}; console:\n{}", self.console.join("\n"))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // The console closed: mm-vmm ended; say how and why.
                    let status = self.child.wait()?;
                    let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
                    bail!(
                        "mm-vmm ended ({status}) before printing {needle:?}; console:\n{}\nstderr:\n{stderr}",
                        self.console.join("\n")
                    )
                }
            }
        }
    }

    /// Takes in the console lines printed so far, without waiting, and
    /// says whether any contains `needle`.
    pub fn has_printed(&mut self, needle: &str) -> bool {
        while let Ok(line) = self.lines.try_recv() {
            self.console.push(line);
        }
        self.console.iter().any(|line| line.contains(needle))
    }

    /// Waits for the guest to end; returns mm-vmm's exit status, the whole
    /// console and mm-vmm's stderr.
    pub fn finish(mut self, timeout: Duration) -> Result<Run> {
        let start = Instant::now();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.console.push(line);
                }
                let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
                let stdout = std::mem::take(&mut self.console).join("\n");
                return Ok(Run { status: status.code(), stdout, stderr, elapsed: start.elapsed() });
            }
            while let Ok(line) = self.lines.try_recv() {
                self.console.push(line);
            }
            if Instant::now() > deadline {
                bail!("guest still running after {timeout:?}; console:\n{}", self.console.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl RunningGuest {
    /// Ends the guest (SIGKILL to mm-vmm) and returns mm-vmm's stderr.
    pub fn kill_for_log(mut self) -> String {
        // SAFETY: kill(2) on our own, not yet reaped child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
        self.stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own, not yet reaped child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}
