//! The jail and the seccomp layer around a real `mm-device block`, with no
//! guest: escape attempts from inside the jail, a forbidden syscall killing
//! the process with the parent naming it, cgroup limits, and a failed jail
//! leaving nothing behind. (The policies' full workloads are the boot,
//! block, vsock and net tests, which run every process jailed and filtered.)

use std::os::fd::AsRawFd;
use std::os::unix::fs::chown;
use std::os::unix::net::UnixListener;
use std::path::Path;

use mm_integration::devices::Scratch;
use mm_integration::workspace_binary;
use mm_jailer::{BindMount, ExitReason, JailError, JailSpec};
use mm_policies::Policy;

/// An unprivileged uid/gid, as the broker gives each microVM.
const VM_UID: u32 = 61_234;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A jailed `mm-device block` serving `disk` (owned by the VM's uid), with
/// `extra` arguments; stdout is captured through a pipe.
fn block_spec(dir: &Scratch, name: &str, disk: &Path, listener: &UnixListener, extra: &[&str]) -> JailSpec {
    let mut spec =
        JailSpec::new(format!("{name}-{}", std::process::id()), workspace_binary("mm-device").unwrap(), VM_UID, VM_UID);
    spec.jail_base = dir.path("jails");
    spec.args = ["block", "--listen-fd", "4", "--image", disk.to_str().unwrap()].iter().map(Into::into).collect();
    spec.args.extend(extra.iter().map(Into::into));
    spec.mounts.push(BindMount::writable(disk));
    spec.fds.push((listener.as_raw_fd(), 4));
    spec.limits.memory_bytes = Some(64 << 20);
    spec.limits.pids = Some(16);
    spec
}

/// Runs the spec with its stdout in a file; returns how it ended and what
/// it printed.
fn run(mut spec: JailSpec, dir: &Scratch) -> (ExitReason, String) {
    let out_path = dir.path(&format!("{}.out", spec.name));
    let out = std::fs::File::create(&out_path).unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    // Rust's runtime aborts a program started with a closed stdio fd when
    // it cannot open /dev/null, which a jail does not have.
    spec.keep_stdio = false;
    spec.fds.extend([(null.as_raw_fd(), 0), (out.as_raw_fd(), 1), (2, 2)]);
    let mut child = mm_jailer::spawn(&spec).unwrap();
    let reason = child.wait().unwrap();
    (reason, std::fs::read_to_string(&out_path).unwrap())
}

fn setup(name: &str) -> Option<(Scratch, std::path::PathBuf, std::path::PathBuf, UnixListener)> {
    if !is_root() {
        eprintln!("SKIPPED {name}: building a jail needs root");
        return None;
    }
    let dir = Scratch::new(name).unwrap();
    let disk = dir.path("mine.img");
    let other = dir.path("other-vm.img");
    for path in [&disk, &other] {
        std::fs::write(path, vec![0u8; 1 << 20]).unwrap();
    }
    chown(&disk, Some(VM_UID), Some(VM_UID)).unwrap();
    let listener = UnixListener::bind(dir.path("block.sock")).unwrap();
    Some((dir, disk, other, listener))
}

#[test]
fn escape_attempts_from_a_jailed_block_process_fail() {
    let Some((dir, disk, other, listener)) = setup("jail-escape") else { return };
    let probe = format!("jail={}", other.display());
    let spec = block_spec(&dir, "escape", &disk, &listener, &["--no-seccomp", "--test-escape", &probe]);
    let (reason, out) = run(spec, &dir);
    assert_eq!(reason, ExitReason::Exited(0), "{out}");
    let probes: Vec<&str> = out.lines().filter(|l| l.starts_with("PROBE ")).collect();
    for name in
        ["open-other-disk", "see-host-pids", "write-outside-root", "ptrace-attach", "capset-raise", "setuid-root"]
    {
        assert!(probes.iter().any(|l| l.starts_with(&format!("PROBE {name} "))), "no {name} probe:\n{out}");
    }
    let escaped: Vec<&&str> = probes.iter().filter(|l| !l.contains(" blocked: ")).collect();
    assert!(escaped.is_empty(), "escapes:\n{out}");
    assert!(out.contains("my pid is 1"), "not in its own PID namespace:\n{out}");
    // The disk it does hold is still there for it, and nothing leaked.
    assert!(!dir.path("jails").join(format!("escape-{}", std::process::id())).exists());
}

#[test]
fn forbidden_syscalls_kill_with_sigsys_and_the_parent_names_them() {
    let Some((dir, disk, _other, listener)) = setup("jail-sigsys") else { return };
    for (probe, syscall, nr) in [("socket", "socket", 41), ("ptrace", "ptrace", 101), ("userns", "unshare", 272)] {
        let spec = block_spec(&dir, probe, &disk, &listener, &["--test-escape", probe]);
        let name = spec.name.clone();
        let (reason, out) = run(spec, &dir);
        assert_eq!(reason, ExitReason::Seccomp { syscall, nr, policy: Some(Policy::Block) }, "{out}");
        let text = mm_jailer::describe(&name, 1, &reason);
        assert!(text.contains(&format!("killed by seccomp: forbidden syscall {syscall} ({nr})")), "{text}");
    }
}

#[test]
fn cgroup_limits_are_applied_and_visible() {
    let Some((dir, disk, _other, listener)) = setup("jail-cgroup") else { return };
    // A block process that serves (and so stays) until we kill it.
    let spec = block_spec(&dir, "cgroup", &disk, &listener, &[]);
    let mut child = mm_jailer::spawn(&spec).unwrap();
    let pid = child.pid();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let dirs = child.cgroup_dirs().to_vec();
    let mut saw = (false, false);
    for dir in &dirs {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(procs.lines().any(|l| l.trim() == pid.to_string()), "{pid} not in {}", dir.display());
        for (file, want, slot) in
            [("memory.limit_in_bytes", "67108864", 0), ("memory.max", "67108864", 0), ("pids.max", "16", 1)]
        {
            if let Ok(value) = std::fs::read_to_string(dir.join(file)) {
                assert_eq!(value.trim(), want, "{}/{file}", dir.display());
                if slot == 0 { saw.0 = true } else { saw.1 = true }
            }
        }
    }
    assert!(saw.0 && saw.1, "memory or pids limit not found in {dirs:?}");
    assert!(cgroups.contains(&format!("micromachines/{}", spec.name)), "/proc/{pid}/cgroup:\n{cgroups}");
    if Path::new("/sys/fs/cgroup/unified").exists() || Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        assert!(cgroups.lines().any(|l| l.starts_with("0::") && l.contains("micromachines")), "{cgroups}");
    }
    assert_eq!(child.kill().unwrap(), ExitReason::Signaled(libc::SIGKILL));
    for dir in &dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[test]
fn a_failed_jail_names_its_step_and_leaves_nothing_behind() {
    let Some((dir, disk, _other, listener)) = setup("jail-fail") else { return };
    let mut spec = block_spec(&dir, "fail", &disk, &listener, &[]);
    // A bind mount whose source vanishes between preparation and the
    // mount is hard to arrange; a target under a file is not.
    spec.mounts.push(BindMount {
        source: disk.clone(),
        target: disk.join("below-a-file"),
        writable: false,
        device: false,
    });
    spec.mounts.push(BindMount::read_only(&disk));
    let error = mm_jailer::spawn(&spec).unwrap_err();
    assert!(
        matches!(error, JailError::MakeMountPoint { .. } | JailError::BindMount { .. }),
        "unexpected error: {error}"
    );
    // The step that failed names the path it was working on.
    assert!(error.to_string().contains("mine.img"), "{error}");
    assert!(!spec.jail_base.join(&spec.name).exists(), "the jail root was left behind");
    let leftovers: Vec<_> = ["memory", "pids", "unified"]
        .iter()
        .map(|h| Path::new("/sys/fs/cgroup").join(h).join("micromachines").join(&spec.name))
        .filter(|p| p.exists())
        .collect();
    assert!(leftovers.is_empty(), "cgroups left behind: {leftovers:?}");
    let missing = JailSpec { exec: "/nonexistent/program".into(), ..spec.clone() };
    let error = mm_jailer::spawn(&missing).unwrap_err();
    assert!(error.to_string().contains("/nonexistent/program"), "{error}");
    assert!(!spec.jail_base.join(&spec.name).exists());
}
