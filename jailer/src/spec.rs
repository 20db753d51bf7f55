//! What a jail holds: the one description the caller (the broker, a
//! binary jailing itself, a test) fills in. Everything not named here is
//! absent from the child's world.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

/// Where per-process roots are made by default (one empty directory each on
/// the host; the root itself is a tmpfs that exists only in the child's
/// mount namespace).
pub const DEFAULT_JAIL_BASE: &str = "/run/micromachines/jail";
/// The cgroup every jail's own cgroup is created under, in each hierarchy.
pub const CGROUP_PARENT: &str = "micromachines";
/// The fd number the seccomp report pipe is passed at.
pub const REPORT_FD: RawFd = 3;
/// The jail's `/dev` (a tmpfs of its own) and the node in it, at the same
/// path as on the host, with [`JailSpec::userfaultfd`].
pub(crate) const DEV: &str = "/dev";
pub const USERFAULTFD: &str = "/dev/userfaultfd";

/// A file or directory made visible inside the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Host path.
    pub source: PathBuf,
    /// Absolute path inside the jail.
    pub target: PathBuf,
    /// Read-write; read-only otherwise.
    pub writable: bool,
    /// A device node (`/dev/kvm`): keeps device access on this mount.
    pub device: bool,
}

impl BindMount {
    /// `source` read-only at the same path inside the jail.
    pub fn read_only(source: impl Into<PathBuf>) -> Self {
        let source = source.into();
        BindMount { target: source.clone(), source, writable: false, device: false }
    }

    /// `source` read-write at the same path inside the jail.
    pub fn writable(source: impl Into<PathBuf>) -> Self {
        BindMount { writable: true, ..Self::read_only(source) }
    }

    /// A device node at the same path, read-write.
    pub fn device(source: impl Into<PathBuf>) -> Self {
        BindMount { writable: true, device: true, ..Self::read_only(source) }
    }
}

/// A CPU bandwidth limit: `quota_us` of CPU time per `period_us` of wall
/// time, across all the jail's threads (so `quota_us / period_us` cores).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuMax {
    pub quota_us: u64,
    pub period_us: u64,
}

/// The period the kernel uses by default (100 ms): short enough that a
/// throttled guest stalls in small slices, not for seconds.
pub const CPU_PERIOD_US: u64 = 100_000;
/// cgroup v2's `cpu.weight` range and default (v1's `cpu.shares` 1024).
pub const CPU_WEIGHT_MIN: u64 = 1;
pub const CPU_WEIGHT_MAX: u64 = 10_000;
pub const CPU_WEIGHT_DEFAULT: u64 = 100;

/// Limits a supervisor (the broker) sets for a binary that jails itself:
/// they win over the binary's own defaults ([`Limits::apply_supervisor_env`]),
/// since only the supervisor knows the microVM's size and its operator's
/// limits. `MM_JAIL_CPU_MAX` is `QUOTA_US PERIOD_US` (cgroup v2's
/// `cpu.max` syntax), the others one decimal number.
pub const CPU_MAX_ENV: &str = "MM_JAIL_CPU_MAX";
pub const CPU_WEIGHT_ENV: &str = "MM_JAIL_CPU_WEIGHT";
pub const MEMORY_MAX_ENV: &str = "MM_JAIL_MEMORY_MAX";

/// Resource limits: cgroup limits and rlimits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// cgroup memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// cgroup limit on processes and threads.
    pub pids: Option<u64>,
    /// cgroup CPU bandwidth limit (v2 `cpu.max`, v1 CFS quota and period).
    pub cpu_max: Option<CpuMax>,
    /// cgroup CPU weight, [`CPU_WEIGHT_MIN`] to [`CPU_WEIGHT_MAX`] (v2
    /// `cpu.weight`; v1 `cpu.shares`, scaled so 100 is 1024).
    pub cpu_weight: Option<u64>,
    /// RLIMIT_NOFILE.
    pub open_files: u64,
    /// RLIMIT_FSIZE in bytes (None: leave as inherited).
    pub file_size: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { memory_bytes: None, pids: None, cpu_max: None, cpu_weight: None, open_files: 1024, file_size: None }
    }
}

impl Limits {
    /// Overrides the cgroup limits with the supervisor's (see
    /// [`CPU_MAX_ENV`]), read through `var`; a malformed value is an error,
    /// not ignored, so a typo cannot silently leave a guest unlimited.
    pub fn apply_supervisor_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), String> {
        let number = |name: &str, text: &str| {
            text.trim().parse::<u64>().map_err(|_| format!("{name}={text:?}: not a non-negative integer"))
        };
        if let Some(text) = var(CPU_MAX_ENV) {
            let mut parts = text.split_whitespace();
            let (Some(quota), Some(period), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(format!("{CPU_MAX_ENV}={text:?}: want \"QUOTA_US PERIOD_US\""));
            };
            let cpu = CpuMax { quota_us: number(CPU_MAX_ENV, quota)?, period_us: number(CPU_MAX_ENV, period)? };
            // The kernel's bounds: 1 ms to 1 s periods, at least 1 ms quota.
            if !(1_000..=1_000_000).contains(&cpu.period_us) || cpu.quota_us < 1_000 {
                return Err(format!("{CPU_MAX_ENV}={text:?}: period 1000-1000000 us, quota at least 1000 us"));
            }
            self.cpu_max = Some(cpu);
        }
        if let Some(text) = var(CPU_WEIGHT_ENV) {
            let weight = number(CPU_WEIGHT_ENV, &text)?;
            if !(CPU_WEIGHT_MIN..=CPU_WEIGHT_MAX).contains(&weight) {
                return Err(format!("{CPU_WEIGHT_ENV}={text:?}: must be {CPU_WEIGHT_MIN} to {CPU_WEIGHT_MAX}"));
            }
            self.cpu_weight = Some(weight);
        }
        if let Some(text) = var(MEMORY_MAX_ENV) {
            let bytes = number(MEMORY_MAX_ENV, &text)?;
            if bytes < 1 << 20 {
                return Err(format!("{MEMORY_MAX_ENV}={text:?}: at least 1 MiB"));
            }
            self.memory_bytes = Some(bytes);
        }
        Ok(())
    }
}

/// One jailed process.
#[derive(Debug, Clone)]
pub struct JailSpec {
    /// Unique among running jails: names the root directory and cgroups,
    /// and becomes the hostname (e.g. `vm1-block0`).
    pub name: String,
    /// The program (host path); it is bound read-only at the same path,
    /// with the shared libraries it links (found with `ldd`).
    pub exec: PathBuf,
    /// Arguments after argv[0].
    pub args: Vec<OsString>,
    /// The complete environment (nothing is inherited).
    pub env: Vec<(OsString, OsString)>,
    pub jail_base: PathBuf,
    /// The microVM's own unprivileged uid and gid.
    pub uid: u32,
    pub gid: u32,
    /// Keep the host network namespace (nothing here needs it: a net device
    /// gets a TAP fd, which works from any namespace).
    pub keep_net: bool,
    pub mounts: Vec<BindMount>,
    /// `(fd in the parent, fd number in the child)`; every other fd but
    /// stdio is closed. Targets must not be [`REPORT_FD`].
    pub fds: Vec<(RawFd, RawFd)>,
    /// Keep fds 0, 1 and 2.
    pub keep_stdio: bool,
    pub limits: Limits,
    /// SIGKILL the child when the thread that spawned it exits.
    pub die_with_parent: bool,
    /// Give the jail a `/dev/userfaultfd` its uid may open, on a read-only
    /// tmpfs `/dev` holding nothing else: for the device back ends of a
    /// lazily restored guest, which create the userfaultfd its front end
    /// resolves their faults on (see `child.rs` for how, and why a node).
    /// The host must have the node (Linux 6.1+): spawning fails otherwise.
    pub userfaultfd: bool,
}

impl JailSpec {
    /// A spec with defaults: no mounts beyond the program, no fds, stdio
    /// kept, a new network namespace.
    pub fn new(name: impl Into<String>, exec: impl Into<PathBuf>, uid: u32, gid: u32) -> Self {
        JailSpec {
            name: name.into(),
            exec: exec.into(),
            args: Vec::new(),
            env: Vec::new(),
            jail_base: PathBuf::from(DEFAULT_JAIL_BASE),
            uid,
            gid,
            keep_net: false,
            mounts: Vec::new(),
            fds: Vec::new(),
            keep_stdio: true,
            limits: Limits::default(),
            die_with_parent: false,
            userfaultfd: false,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn mount(mut self, mount: BindMount) -> Self {
        self.mounts.push(mount);
        self
    }

    pub fn fd(mut self, parent: RawFd, child: RawFd) -> Self {
        self.fds.push((parent, child));
        self
    }

    /// Checks what can be checked before anything is created.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            return Err(format!("name {:?}: use 1-64 letters, digits, - or _", self.name));
        }
        if self.uid == 0 && self.gid != 0 || self.gid == 0 && self.uid != 0 {
            return Err("uid and gid must both be 0 or both be non-zero".into());
        }
        for m in &self.mounts {
            if !m.target.is_absolute() || m.target.components().any(|c| c == std::path::Component::ParentDir) {
                return Err(format!("mount target {} must be absolute, without ..", m.target.display()));
            }
        }
        if self.userfaultfd
            && let Some(m) = self.mounts.iter().find(|m| [DEV, USERFAULTFD].iter().any(|p| m.target == Path::new(p)))
        {
            return Err(format!("mount target {} would hide the jail's {USERFAULTFD}", m.target.display()));
        }
        let mut targets: Vec<RawFd> = self.fds.iter().map(|(_, t)| *t).collect();
        targets.sort_unstable();
        if targets.windows(2).any(|w| w[0] == w[1]) {
            return Err("two fds passed at the same number".into());
        }
        if let Some(t) = targets.iter().find(|t| **t < 0 || **t == REPORT_FD || (self.keep_stdio && **t <= 2)) {
            return Err(format!("fd target {t} is reserved (stdio or the seccomp report at {REPORT_FD})"));
        }
        Ok(())
    }
}
