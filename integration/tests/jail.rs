//! The jail and the seccomp layer around a real `mm-device block`, with no
//! guest: escape attempts from inside the jail, a forbidden syscall killing
//! the process with the parent naming it, cgroup limits, and a failed jail
//! leaving nothing behind. (The policies' full workloads are the boot,
//! block, vsock and net tests, which run every process jailed and filtered;
//! the broker tests check the confinement of every process a microVM has.)

use std::os::fd::AsRawFd;
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use mm_integration::devices::Scratch;
use mm_integration::{root_available, workspace_binary};
use mm_jailer::{BindMount, ExitReason, Hierarchies, JailError, JailSpec};
use mm_policies::Policy;

/// An unprivileged uid/gid, as the broker gives each microVM.
const VM_UID: u32 = 61_234;

/// A jailed `mm-device block` serving `disk` (owned by the VM's uid), with
/// `extra` arguments; stdout is captured through a pipe.
fn block_spec(dir: &Scratch, name: &str, disk: &Path, listener: &UnixListener, extra: &[&str]) -> JailSpec {
    block_spec_as(VM_UID, dir, name, disk, listener, extra)
}

/// [`block_spec`] with the jail's uid and gid `uid`.
fn block_spec_as(
    uid: u32,
    dir: &Scratch,
    name: &str,
    disk: &Path,
    listener: &UnixListener,
    extra: &[&str],
) -> JailSpec {
    let mut spec =
        JailSpec::new(format!("{name}-{}", std::process::id()), workspace_binary("mm-device").unwrap(), uid, uid);
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

struct Setup {
    dir: Scratch,
    /// The jail's own disk (owned by [`VM_UID`]).
    disk: PathBuf,
    /// Another microVM's disk outside the jail: root-owned but mode 0666,
    /// so only the jail keeps any uid from it.
    other: PathBuf,
    /// A directory outside the jail anyone may write (mode 0777).
    open_dir: PathBuf,
    listener: UnixListener,
}

fn setup(name: &str) -> Option<Setup> {
    if !root_available(name) {
        return None;
    }
    let dir = Scratch::new(name).unwrap();
    let disk = dir.path("mine.img");
    let open_dir = dir.path("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let other = open_dir.join("other-vm.img");
    for path in [&disk, &other] {
        std::fs::write(path, vec![0u8; 1 << 20]).unwrap();
    }
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o666)).unwrap();
    chown(&disk, Some(VM_UID), Some(VM_UID)).unwrap();
    let listener = UnixListener::bind(dir.path("block.sock")).unwrap();
    Some(Setup { dir, disk, other, open_dir, listener })
}

/// A process outside any jail, of uid `uid` and with no capability at all
/// (as another jailed process of the same uid has none): what permissions
/// alone would let a jailed process of that uid signal and trace.
struct Outsider(Child);

impl Outsider {
    fn start(uid: u32) -> Outsider {
        let ids = [format!("--reuid={uid}"), format!("--regid={uid}")];
        let child = Command::new("setpriv")
            .args(&ids)
            .args(["--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--", "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("setpriv (util-linux)");
        let outsider = Outsider(child);
        // Wait for the exec into sleep, then check what it holds.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while outsider.status("Name").as_deref() != Some("sleep") {
            assert!(std::time::Instant::now() < deadline, "setpriv did not become sleep");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(outsider.status("CapPrm").as_deref(), Some("0000000000000000"));
        assert!(outsider.status("Uid").is_some_and(|u| u.split_whitespace().all(|id| id == uid.to_string())));
        outsider
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    fn status(&self, key: &str) -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status.lines().find_map(|l| Some(l.strip_prefix(key)?.strip_prefix(':')?.trim().to_string()))
    }
}

impl Drop for Outsider {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own unreaped child's pid.
        unsafe { libc::kill(self.pid(), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// Every escape attempt of `mm_jailer::probes::jail`.
const JAIL_PROBES: [&str; 12] = [
    "open-other-disk",
    "see-host-pids",
    "signal-outside",
    "ptrace-attach",
    "write-outside-root",
    "mount-proc",
    "chroot",
    "open-by-handle",
    "capabilities-held",
    "capset-raise",
    "ambient-raise",
    "setuid",
];

/// The jail probes, run in a jail of uid `uid` without the seccomp filter,
/// so the jail alone must stop each (see `jailer/src/probes.rs` for the
/// layer that stops which). Every target is one the uid could reach by its
/// permissions: a mode 0666 file and a mode 0777 directory outside the
/// jail, and a process of the same uid with no capabilities.
fn escape_from_a_jail_of(uid: u32, name: &str) {
    let Some(set) = setup(name) else { return };
    chown(&set.disk, Some(uid), Some(uid)).unwrap();
    let outsider = Outsider::start(uid);
    let probe = format!("jail=other={},dir={},pid={}", set.other.display(), set.open_dir.display(), outsider.pid());
    let host_root_file = Path::new("/escape-test");
    let host_root_file_was_there = host_root_file.exists();
    let extra = ["--no-seccomp", "--test-escape", &probe];
    let spec = block_spec_as(uid, &set.dir, name, &set.disk, &set.listener, &extra);
    let jail_root = spec.jail_base.join(&spec.name);
    let (reason, out) = run(spec, &set.dir);
    assert_eq!(reason, ExitReason::Exited(0), "{out}");
    let probes: Vec<&str> = out.lines().filter(|l| l.starts_with("PROBE ")).collect();
    for name in JAIL_PROBES {
        assert!(probes.iter().any(|l| l.starts_with(&format!("PROBE {name} "))), "no {name} probe:\n{out}");
    }
    let escaped: Vec<&&str> = probes.iter().filter(|l| !l.contains(" blocked: ")).collect();
    assert!(escaped.is_empty(), "escapes from a uid {uid} jail:\n{out}");
    assert!(out.contains("my pid is 1"), "not in its own PID namespace:\n{out}");
    // What the probes say is checked from outside too.
    let written: Vec<_> = std::fs::read_dir(&set.open_dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(written, ["other-vm.img"], "something was written outside the jail");
    assert!(std::fs::read(&set.other).unwrap().iter().all(|b| *b == 0), "the other disk was written");
    assert!(host_root_file_was_there || !host_root_file.exists(), "the jail wrote {}", host_root_file.display());
    assert_eq!(outsider.status("TracerPid").as_deref(), Some("0"), "the outside process was traced");
    assert!(outsider.status("State").is_some_and(|s| s.starts_with('S')), "{:?}", outsider.status("State"));
    assert!(!jail_root.exists(), "{} left behind", jail_root.display());
}

/// The self-jail case (the tests, the benchmark, mm-vmm or mm-device run
/// by hand as root): uid 0, which file permissions do not stop at all.
#[test]
fn escape_attempts_from_a_uid_0_jail_fail() {
    escape_from_a_jail_of(0, "escape-root");
}

/// The broker's case: the microVM's own unprivileged uid.
#[test]
fn escape_attempts_from_an_unprivileged_jail_fail() {
    escape_from_a_jail_of(VM_UID, "escape-vm");
}

#[test]
fn forbidden_syscalls_kill_with_sigsys_and_the_parent_names_them() {
    let Some(Setup { dir, disk, listener, .. }) = setup("jail-sigsys") else { return };
    for (probe, syscall, nr) in [("socket", "socket", 41), ("ptrace", "ptrace", 101), ("userns", "unshare", 272)] {
        let spec = block_spec(&dir, probe, &disk, &listener, &["--test-escape", probe]);
        let name = spec.name.clone();
        let (reason, out) = run(spec, &dir);
        assert_eq!(reason, ExitReason::Seccomp { syscall, nr, policy: Some(Policy::Block) }, "{out}");
        let text = mm_jailer::describe(&name, 1, &reason);
        assert!(text.contains(&format!("killed by seccomp: forbidden syscall {syscall} ({nr})")), "{text}");
    }
    // The filter is what stops them: without it, in the same jail, the
    // calls work (a socket in the jail's empty network namespace, a
    // PTRACE_TRACEME nobody acts on).
    for probe in ["socket", "ptrace"] {
        let spec = block_spec(
            &dir,
            &format!("{probe}-unfiltered"),
            &disk,
            &listener,
            &["--no-seccomp", "--test-escape", probe],
        );
        let (reason, out) = run(spec, &dir);
        assert_eq!(reason, ExitReason::Exited(0), "{out}");
        assert!(out.contains(&format!("PROBE {probe} ESCAPED: {probe} succeeded")), "{out}");
    }
}

#[test]
fn cgroup_limits_are_applied_and_visible() {
    let Some(Setup { dir, disk, listener, .. }) = setup("jail-cgroup") else { return };
    let hierarchies = Hierarchies::detect().unwrap();
    // A block process that serves (and so stays) until we kill it.
    let spec = block_spec(&dir, "cgroup", &disk, &listener, &[]);
    let mut child = mm_jailer::spawn(&spec).unwrap();
    let pid = child.pid();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let dirs = child.cgroup_dirs().to_vec();
    // Wherever the jailer put them, they are under a hierarchy it detected.
    let parents = hierarchies.jail_parents();
    assert!(!dirs.is_empty() && dirs.iter().all(|d| parents.iter().any(|p| d.parent() == Some(p))), "{dirs:?}");
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
    if hierarchies.unified.is_some() {
        assert!(cgroups.lines().any(|l| l.starts_with("0::") && l.contains("micromachines")), "{cgroups}");
    }
    assert_eq!(child.kill().unwrap(), ExitReason::Signaled(libc::SIGKILL));
    for dir in &dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[test]
fn a_failed_jail_names_its_step_and_leaves_nothing_behind() {
    let Some(Setup { dir, disk, listener, .. }) = setup("jail-fail") else { return };
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
    let hierarchies = Hierarchies::detect().unwrap();
    assert!(!hierarchies.jail_parents().is_empty(), "no cgroup hierarchy found: {hierarchies:?}");
    let leftovers: Vec<_> = hierarchies.jail_cgroups(&spec.name).into_iter().filter(|p| p.exists()).collect();
    assert!(leftovers.is_empty(), "cgroups left behind: {leftovers:?}");
    let missing = JailSpec { exec: "/nonexistent/program".into(), ..spec.clone() };
    let error = mm_jailer::spawn(&missing).unwrap_err();
    assert!(error.to_string().contains("/nonexistent/program"), "{error}");
    assert!(!spec.jail_base.join(&spec.name).exists());
}

/// A self-jailed vsock device whose stderr is a regular file (as the
/// broker's per-process logs are) keeps running and its log lines land
/// there. Its RLIMIT_FSIZE was once 0: every log line failed with EFBIG,
/// and the `--no-seccomp` warning (the first line it prints) ended it with
/// status 101 and an empty log.
#[test]
fn a_jailed_device_logs_to_a_regular_file() {
    if !root_available("a_jailed_device_logs_to_a_regular_file") {
        return;
    }
    let dir = Scratch::new("jail-log").unwrap();
    let log_path = dir.path("vsock.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let (mut command, _listener) = jailed_vsock(&dir, &["--no-seccomp"]);
    let mut child = command.stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let ended = child.try_wait().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(ended, None, "the device ended: log {logged:?}");
    assert!(logged.contains("--no-seccomp"), "its warning is in its log: {logged:?}");
}

/// A jailed device that fails under its filter prints its error and exits
/// 1, even with RUST_BACKTRACE set: resolving a backtrace would read
/// /proc/self/exe, which the filter forbids (it once died by SIGSYS).
#[test]
fn a_jailed_device_failing_under_its_filter_prints_its_error() {
    if !root_available("a_jailed_device_failing_under_its_filter_prints_its_error") {
        return;
    }
    let dir = Scratch::new("jail-error").unwrap();
    let (mut command, _listener) = jailed_vsock(&dir, &["--test-escape", "no-such-probe"]);
    let out = command.env("RUST_BACKTRACE", "1").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("unknown probe \"no-such-probe\""), "{stderr}");
    assert!(!stderr.contains("seccomp"), "{stderr}");
}

/// `mm-device vsock`, self-jailed as the microVM's uid with its socket
/// directory in `dir`, as the broker starts it, plus `extra`; and the
/// listener it inherits (kept open by the caller).
fn jailed_vsock(dir: &Scratch, extra: &[&str]) -> (std::process::Command, UnixListener) {
    let vsock_dir = dir.path("vsock");
    std::fs::create_dir(&vsock_dir).unwrap();
    chown(&vsock_dir, Some(VM_UID), Some(VM_UID)).unwrap();
    let listener = UnixListener::bind(dir.path("dev.sock")).unwrap();
    // Inherited by the device (`--listen-fd`), as the broker passes it.
    // SAFETY: fcntl on our own open fd, clearing FD_CLOEXEC only.
    assert_eq!(unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_SETFD, 0) }, 0);
    let uid = VM_UID.to_string();
    let mut command = std::process::Command::new(workspace_binary("mm-device").unwrap());
    command
        .args(["vsock", "--listen-fd", &listener.as_raw_fd().to_string(), "--guest-cid", "9", "--uds"])
        .arg(vsock_dir.join("v.sock"))
        .args(["--jail-uid", &uid, "--jail-gid", &uid])
        .args(extra)
        .stdin(std::process::Stdio::null());
    (command, listener)
}
