//! Device back-end processes (`mm-device`) for tests and benchmarks, each
//! listening on its own socket in a scratch directory, ended by pid when
//! dropped.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::workspace_binary;

/// A running `mm-device` process and the vhost-user socket it serves.
pub struct DeviceProcess {
    child: Child,
    pub socket: PathBuf,
}

impl DeviceProcess {
    /// Starts `mm-device KIND --socket SOCKET ARGS...` and waits until the
    /// socket exists.
    pub fn spawn(kind: &str, socket: &Path, args: &[&str]) -> Result<Self> {
        Self::spawn_with_fds(kind, socket, args, &[])
    }

    /// Like `spawn`, with `fds` inherited by the child at the given numbers
    /// (e.g. a TAP fd for `mm-device net --tap-fd N`).
    pub fn spawn_with_fds(kind: &str, socket: &Path, args: &[&str], fds: &[(&OwnedFd, RawFd)]) -> Result<Self> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(workspace_binary("mm-device")?);
        cmd.arg(kind).arg("--socket").arg(socket).args(args).stdin(Stdio::null());
        inherit_fds(&mut cmd, fds);
        let child = cmd.spawn().context("spawning mm-device")?;
        let mut process = DeviceProcess { child, socket: socket.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if let Some(status) = process.child.try_wait()? {
                bail!("mm-device {kind} exited with {status} before listening");
            }
            if Instant::now() > deadline {
                bail!("mm-device {kind} did not create {} within 30 s", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(process)
    }

    /// A block back end serving `image`.
    pub fn block(socket: &Path, image: &Path) -> Result<Self> {
        Self::spawn("block", socket, &["--image", image.to_str().context("image path is not UTF-8")?])
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs the process (by its pid) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        // SAFETY: kill(2) on our own child's pid, which is not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for DeviceProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.kill();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Makes `cmd`'s child inherit each fd at the given number (a TAP for
/// `mm-device net --tap-fd N` or QEMU's `-netdev tap,fd=N`).
pub fn inherit_fds(cmd: &mut Command, fds: &[(&OwnedFd, RawFd)]) {
    let pairs: Vec<(RawFd, RawFd)> = fds.iter().map(|(fd, target)| (fd.as_raw_fd(), *target)).collect();
    // SAFETY: the closure runs between fork and exec and only calls dup2,
    // which is async-signal-safe; dup2 also clears CLOEXEC on the target,
    // so exactly these fds are inherited.
    unsafe {
        cmd.pre_exec(move || {
            for (fd, target) in &pairs {
                if libc::dup2(*fd, *target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// `mm-NAME-PID` in the temporary directory.
    pub fn new(name: &str) -> Result<Self> {
        Self::new_in(&std::env::temp_dir(), name)
    }

    /// `mm-NAME-PID` in `parent` (a benchmark's `--dir`, on a real disk).
    pub fn new_in(parent: &Path, name: &str) -> Result<Self> {
        let dir = parent.join(format!("mm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A private, writable copy of the built-in ext4 root (sparse).
pub fn rootfs_copy(dest: &Path) -> Result<()> {
    let base = crate::guest_rootfs()?;
    let status = Command::new("cp").arg("--sparse=always").arg(&base).arg(dest).status()?;
    if !status.success() {
        bail!("copying {} failed", base.display());
    }
    Ok(())
}
