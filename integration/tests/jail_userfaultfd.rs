//! `mm-device --lazy-memory` (a lazily restored guest's back end): its own
//! jail holds a `/dev/userfaultfd` of the microVM's uid and nothing else in
//! `/dev`, and creating a userfaultfd for kernel-mode faults there works
//! under the device's seccomp policy; without the flag the jail has no
//! such node. (The vhost-user postcopy sequence itself is tested per device
//! in mm-devices; the jail option in mm-jailer.)

use std::os::unix::fs::{MetadataExt, chown};
use std::process::Command;
use std::time::Duration;

use mm_integration::devices::Scratch;
use mm_integration::{root_available, run_with_timeout, workspace_binary};

/// An unprivileged uid/gid, as the broker gives each microVM.
const VM_UID: u32 = 61_236;

/// Runs `mm-device [--lazy-memory] block ... --test-escape PROBE [extra]`
/// jailing itself as [`VM_UID`]; returns its exit code and stdout.
fn probe(name: &str, lazy_memory: bool, probe: &str, extra: &[&str]) -> (Option<i32>, String) {
    let dir = Scratch::new(name).unwrap();
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    chown(&disk, Some(VM_UID), Some(VM_UID)).unwrap();
    let mut cmd = Command::new(workspace_binary("mm-device").unwrap());
    if lazy_memory {
        cmd.arg("--lazy-memory");
    }
    let uid = VM_UID.to_string();
    cmd.arg("block").arg("--socket").arg(dir.path("block.sock")).arg("--image").arg(&disk);
    cmd.args(["--jail-uid", &uid, "--jail-gid", &uid, "--test-escape", probe]).args(extra);
    let run = run_with_timeout(cmd, Duration::from_secs(30)).unwrap();
    (run.status, format!("{}\nstderr:\n{}", run.stdout, run.stderr))
}

#[test]
fn lazy_memory_creates_a_userfaultfd_in_its_jail_under_the_block_policy() {
    if !root_available("lazy_memory_creates_a_userfaultfd_in_its_jail_under_the_block_policy") {
        return;
    }
    let host = std::fs::metadata("/dev/userfaultfd").expect("the host's /dev/userfaultfd");
    let (status, out) = probe("lazy-uffd", true, "userfaultfd", &[]);
    assert_eq!(status, Some(0), "{out}");
    let expected = format!(
        "PROBE userfaultfd created: /dev/userfaultfd is {}:{} owned by {VM_UID}:{VM_UID} mode 600;",
        libc::major(host.rdev()),
        libc::minor(host.rdev())
    );
    assert!(out.contains(&expected), "wanted {expected}:\n{out}");
}

#[test]
fn lazy_memory_jail_dev_holds_only_the_node_read_only() {
    if !root_available("lazy_memory_jail_dev_holds_only_the_node_read_only") {
        return;
    }
    let (status, out) = probe("lazy-dev", true, "dev", &["--no-seccomp"]);
    assert_eq!(status, Some(0), "{out}");
    assert!(out.contains(&format!("PROBE uid: {VM_UID}\n")), "{out}");
    assert!(out.contains("PROBE dev-lists: userfaultfd\n"), "{out}");
    assert!(out.contains("PROBE dev-write blocked: "), "{out}");
}

#[test]
fn without_lazy_memory_the_jail_has_no_userfaultfd() {
    if !root_available("without_lazy_memory_the_jail_has_no_userfaultfd") {
        return;
    }
    let (status, out) = probe("no-lazy-uffd", false, "userfaultfd", &[]);
    assert_eq!(status, Some(0), "{out}");
    assert!(out.contains("PROBE userfaultfd failed: stat /dev/userfaultfd: No such file or directory"), "{out}");
}
