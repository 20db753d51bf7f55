//! Shared plumbing for the end-to-end tests and the benchmarks: where the
//! guest kernel, the initramfs and our binaries are, building the first two
//! on demand (cached in the state directory), and the KVM and root gates
//! that make a test fail loudly in CI but skip with a message elsewhere.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod broker;
pub mod devices;
pub mod guest;
pub mod netns;
pub mod proc_status;
pub mod pty;

/// The repository root (this crate lives in `integration/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("integration/ has a parent").to_path_buf()
}

fn run_script(script: &str) -> Result<PathBuf> {
    let path = repo_root().join(script);
    let out = Command::new("bash")
        .arg(&path)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", path.display()))?;
    if !out.status.success() {
        bail!("{} failed with {}", path.display(), out.status);
    }
    let printed = String::from_utf8(out.stdout).context("script printed non-UTF-8")?;
    let last = printed.lines().last().unwrap_or_default().trim().to_string();
    Ok(PathBuf::from(last))
}

type Artifact = OnceLock<std::result::Result<PathBuf, String>>;

/// Runs a build script once per process and remembers its answer (the
/// scripts themselves cache across processes, by content hash).
fn built_once(cell: &'static Artifact, script: &str) -> Result<PathBuf> {
    cell.get_or_init(|| run_script(script).map_err(|e| format!("{e:#}"))).clone().map_err(anyhow::Error::msg)
}

/// Where the build scripts cache the guest artefacts (`$MM_STATE_DIR`).
pub fn state_dir() -> PathBuf {
    std::env::var_os("MM_STATE_DIR").map_or_else(|| PathBuf::from("/var/lib/micromachines"), PathBuf::from)
}

/// The guest kernel (`vmlinux`), built from Debian's linux-source on first
/// use; a bzImage of the same kernel sits beside it.
pub fn guest_kernel() -> Result<PathBuf> {
    static KERNEL: Artifact = OnceLock::new();
    built_once(&KERNEL, "guest/kernel/build.sh")
}

/// The built-in initramfs (busybox + mm-init).
pub fn guest_initramfs() -> Result<PathBuf> {
    static INITRAMFS: Artifact = OnceLock::new();
    built_once(&INITRAMFS, "guest/rootfs/build-initramfs.sh")
}

/// The built-in root filesystem as an ext4 image (a read-only base).
pub fn guest_rootfs() -> Result<PathBuf> {
    static ROOTFS: Artifact = OnceLock::new();
    built_once(&ROOTFS, "guest/rootfs/build-rootfs.sh")
}

/// A binary of this workspace, from the same target directory as the
/// running test or benchmark (`MM_BIN_DIR` overrides).
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("MM_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe()?;
            let mut dir = exe.parent().context("executable has no directory")?.to_path_buf();
            if dir.ends_with("deps") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        bail!("{} not found: build it first (cargo build --workspace --bins)", path.display());
    }
    Ok(path)
}

/// True when KVM is usable. Without it: panics when `CI` is set (a CI run
/// that skipped every boot would prove nothing), else prints why the test
/// is skipped and returns false.
pub fn kvm_available(test: &str) -> bool {
    let usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if usable {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: /dev/kvm is not usable, and CI is set: boot tests must run in CI");
    }
    eprintln!("SKIPPED {test}: /dev/kvm is not usable on this machine (needs KVM and root or the kvm group)");
    false
}

/// True when this process runs as root, which building a jail, a network
/// namespace or a TAP needs. Without it: panics when `CI` is set (a CI run
/// that skipped the jail tests would prove nothing), else prints why the
/// test is skipped and returns false.
pub fn root_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: not running as root, and CI is set: tests that need root must run in CI");
    }
    eprintln!("SKIPPED {test}: needs root (run the tests as root)");
    false
}

/// The result of one mm-vmm run.
#[derive(Debug)]
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `cmd`, killing it (by its own pid) if it outlives `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Run> {
    let start = Instant::now();
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output: Output = match rx.recv_timeout(timeout) {
        Ok(out) => out?,
        Err(_) => {
            // SAFETY: kill(2) on the pid of the child we spawned and have not
            // reaped yet (the waiter thread still holds it).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let out = rx.recv().context("waiter thread vanished")??;
            bail!(
                "timed out after {timeout:?}; console so far:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    Ok(Run {
        status: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed: start.elapsed(),
    })
}

/// A fresh passphrase-less ed25519 key pair, `dir/name` and `dir/name.pub`.
pub fn ssh_keygen(dir: &devices::Scratch, name: &str) -> Result<PathBuf> {
    let key = dir.path(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .stdin(Stdio::null())
        .status()
        .context("running ssh-keygen (apt-get install openssh-client)")?;
    if !status.success() {
        bail!("ssh-keygen failed with {status}");
    }
    Ok(key)
}
