//! Every bad input gets one clear error line, exit status 125, no panic
//! and no hang. None of these boots a guest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mm_integration::{Run, kvm_available, root_available, run_with_timeout, workspace_binary};

fn mm_vmm(args: &[&str]) -> Command {
    let mut cmd = Command::new(workspace_binary("mm-vmm").unwrap());
    cmd.args(args);
    cmd
}

fn run(cmd: Command) -> Run {
    run_with_timeout(cmd, Duration::from_secs(60)).unwrap()
}

/// The one error line mm-vmm printed, after checking the exit and the
/// absence of a panic.
fn single_error(run: &Run) -> String {
    assert_eq!(run.status, Some(125), "stderr:\n{}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "mm-vmm panicked:\n{}", run.stderr);
    let errors: Vec<&str> = run.stderr.lines().filter(|l| l.starts_with("mm-vmm: ")).collect();
    assert_eq!(errors.len(), 1, "stderr:\n{}", run.stderr);
    errors[0].to_string()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mm-bad-input-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A real, small file that is certainly not a kernel.
fn garbage_file(dir: &Path) -> PathBuf {
    let path = dir.join("garbage");
    let bytes: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn missing_kernel() {
    let line = single_error(&run(mm_vmm(&["--kernel", "/nonexistent/vmlinux"])));
    assert!(line.contains("/nonexistent/vmlinux: no such file"), "{line}");
}

#[test]
fn missing_initrd() {
    let dir = scratch("initrd");
    let kernel = garbage_file(&dir);
    let line = single_error(&run(mm_vmm(&["--kernel", kernel.to_str().unwrap(), "--initrd", "/nonexistent.cpio"])));
    assert!(line.contains("initramfs /nonexistent.cpio: no such file"), "{line}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_cpu_counts() {
    for cpus in ["0", "33"] {
        let line = single_error(&run(mm_vmm(&["--kernel", "/nonexistent", "--cpus", cpus])));
        assert!(line.contains(&format!("--cpus {cpus}: must be between 1 and 32")), "{line}");
    }
}

#[test]
fn garbage_kernel_file() {
    if !kvm_available("garbage_kernel_file") {
        return;
    }
    let dir = scratch("garbage");
    let kernel = garbage_file(&dir);
    let line = single_error(&run(mm_vmm(&["--kernel", kernel.to_str().unwrap(), "--memory-mib", "64"])));
    assert!(line.contains("is neither an ELF vmlinux nor a bzImage"), "{line}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn memory_too_small_and_too_large() {
    if !kvm_available("memory_too_small_and_too_large") {
        return;
    }
    let dir = scratch("memory");
    let kernel = garbage_file(&dir);
    let k = kernel.to_str().unwrap();
    let line = single_error(&run(mm_vmm(&["--kernel", k, "--memory-mib", "1"])));
    assert!(line.contains("--memory-mib 1 is too small"), "{line}");
    let line = single_error(&run(mm_vmm(&["--kernel", k, "--memory-mib", "1099511627776"])));
    assert!(line.contains("is more than this host's"), "{line}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn no_dev_kvm() {
    // Root hides /dev/kvm in a private mount namespace.
    if !root_available("no_dev_kvm") {
        return;
    }
    // A private mount namespace whose /dev is an empty tmpfs: the real
    // condition of a host without KVM, for this process only.
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", r#"mount -t tmpfs none /dev && exec "$@""#, "sh"])
        .arg(workspace_binary("mm-vmm").unwrap())
        .args(["--kernel", "/proc/self/exe"]);
    let line = single_error(&run(cmd));
    assert!(line.contains("KVM is not available: /dev/kvm does not exist"), "{line}");
}

#[test]
fn no_permission_on_dev_kvm() {
    // Root switches to an unprivileged user.
    if !root_available("no_permission_on_dev_kvm") {
        return;
    }
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(workspace_binary("mm-vmm").unwrap())
        .args(["--kernel", "/proc/self/exe"]);
    let line = single_error(&run(cmd));
    assert!(line.contains("permission denied opening /dev/kvm"), "{line}");
}
