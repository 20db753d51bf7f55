//! cgroup limits, v2 where the unified hierarchy offers the controller and
//! v1 otherwise. Hybrid hosts (v1 controllers under /sys/fs/cgroup/NAME and
//! cgroup2 at /sys/fs/cgroup/unified with few or no controllers) get both:
//! each limit goes where its controller lives, and the process also joins a
//! cgroup in the unified hierarchy so v2-only tooling sees it.
//!
//! The parent creates the cgroups and writes the limits before the clone;
//! the child joins them itself (writing "0" to each `cgroup.procs`) as its
//! first step, so nothing it runs escapes the limits.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::error::JailError;
use crate::spec::{CGROUP_PARENT, CPU_WEIGHT_DEFAULT, Limits};

/// The cgroup hierarchies mounted on this host.
#[derive(Debug, Clone, Default)]
pub struct Hierarchies {
    /// Mount point of cgroup2, if mounted.
    pub unified: Option<PathBuf>,
    /// Controllers enabled at the root of the unified hierarchy.
    pub unified_controllers: Vec<String>,
    /// (controller, mount point) of each v1 hierarchy.
    pub v1: Vec<(String, PathBuf)>,
}

impl Hierarchies {
    /// Reads /proc/self/mountinfo.
    pub fn detect() -> io::Result<Self> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")?;
        let mut found = Hierarchies::default();
        for line in text.lines() {
            let Some((left, right)) = line.split_once(" - ") else { continue };
            let Some(mount_point) = left.split(' ').nth(4) else { continue };
            let mut right = right.split(' ');
            let (fstype, _source, options) = (right.next(), right.next(), right.next().unwrap_or(""));
            match fstype {
                Some("cgroup2") => {
                    let path = PathBuf::from(mount_point);
                    found.unified_controllers = std::fs::read_to_string(path.join("cgroup.controllers"))
                        .unwrap_or_default()
                        .split_whitespace()
                        .map(str::to_string)
                        .collect();
                    found.unified = Some(path);
                }
                Some("cgroup") => {
                    for option in options.split(',') {
                        if matches!(option, "memory" | "pids" | "cpu" | "cpuacct" | "cpuset" | "blkio" | "io") {
                            found.v1.push((option.to_string(), PathBuf::from(mount_point)));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(found)
    }

    /// `<hierarchy>/micromachines` for the unified hierarchy and each v1
    /// one: where every jail's cgroups are made, whichever version the host
    /// mounts (for leak checks and the sweep of stale jails).
    pub fn jail_parents(&self) -> Vec<PathBuf> {
        let mut parents: Vec<PathBuf> = self
            .unified
            .iter()
            .chain(self.v1.iter().map(|(_, mount)| mount))
            .map(|mount| mount.join(CGROUP_PARENT))
            .collect();
        parents.sort();
        parents.dedup();
        parents
    }

    /// Every directory a cgroup of the jail `name` may have, existing or not.
    pub fn jail_cgroups(&self, name: &str) -> Vec<PathBuf> {
        self.jail_parents().into_iter().map(|parent| parent.join(name)).collect()
    }

    fn v1_mount(&self, controller: &str) -> Option<&Path> {
        self.v1.iter().find(|(c, _)| c == controller).map(|(_, p)| p.as_path())
    }

    fn in_unified(&self, controller: &str) -> bool {
        self.unified.is_some() && self.unified_controllers.iter().any(|c| c == controller)
    }
}

/// The cgroups made for one jail; removed by [`Cgroups::remove`].
#[derive(Debug, Default)]
pub struct Cgroups {
    /// Leaf directories, in creation order.
    pub dirs: Vec<PathBuf>,
}

fn cg_err(path: &Path) -> impl FnOnce(io::Error) -> JailError + '_ {
    move |source| JailError::Cgroup { path: path.to_path_buf(), source }
}

fn write(path: &Path, value: &str) -> Result<(), JailError> {
    std::fs::write(path, value).map_err(cg_err(path))
}

/// The controllers `limits` need, in the order their cgroups are made.
fn wanted_controllers(limits: &Limits) -> Vec<&'static str> {
    let mut wanted = Vec::new();
    if limits.memory_bytes.is_some() {
        wanted.push("memory");
    }
    if limits.pids.is_some() {
        wanted.push("pids");
    }
    if limits.cpu_max.is_some() || limits.cpu_weight.is_some() {
        wanted.push("cpu");
    }
    wanted
}

/// v1's `cpu.shares` for a v2 `cpu.weight`: the defaults (100 and 1024)
/// match, the rest scales linearly within v1's bounds.
pub fn weight_to_shares(weight: u64) -> u64 {
    (weight * 1024 / CPU_WEIGHT_DEFAULT).clamp(2, 262_144)
}

/// The files to write for `controller`'s limits, in order, with their
/// contents: cgroup v2's names (`v2`) or v1's. v1's CFS period goes
/// before the quota, so a quota is never checked against a stale period.
pub fn limit_files(controller: &str, limits: &Limits, v2: bool) -> Vec<(&'static str, String)> {
    let mut files = Vec::new();
    match controller {
        "memory" => {
            if let Some(bytes) = limits.memory_bytes {
                files.push((if v2 { "memory.max" } else { "memory.limit_in_bytes" }, bytes.to_string()));
            }
        }
        "pids" => {
            if let Some(pids) = limits.pids {
                files.push(("pids.max", pids.to_string()));
            }
        }
        "cpu" => {
            if let Some(cpu) = limits.cpu_max {
                if v2 {
                    files.push(("cpu.max", format!("{} {}", cpu.quota_us, cpu.period_us)));
                } else {
                    files.push(("cpu.cfs_period_us", cpu.period_us.to_string()));
                    files.push(("cpu.cfs_quota_us", cpu.quota_us.to_string()));
                }
            }
            if let Some(weight) = limits.cpu_weight {
                files.push(if v2 {
                    ("cpu.weight", weight.to_string())
                } else {
                    ("cpu.shares", weight_to_shares(weight).to_string())
                });
            }
        }
        _ => {}
    }
    files
}

/// The `oom_kill` counter of a v2 `memory.events` or a v1
/// `memory.oom_control` (both are `key value` lines).
pub fn parse_oom_kills(text: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix("oom_kill ")?.trim().parse().ok())
}

impl Cgroups {
    /// Creates `<hierarchy>/micromachines/<name>` wherever a limit or the
    /// unified hierarchy needs one, and writes the limits. On error the
    /// directories made so far are in `self.dirs` for the caller to remove.
    /// A v1 CPU limit also gets a cgroup in `cpuacct` (when mounted apart):
    /// that is where v1 accounts the jail's CPU time, as v2's `cpu.stat`.
    pub fn create(&mut self, hierarchies: &Hierarchies, name: &str, limits: &Limits) -> Result<(), JailError> {
        let mut v2_controllers = Vec::new();
        for controller in wanted_controllers(limits) {
            if hierarchies.in_unified(controller) {
                v2_controllers.push(controller);
                continue;
            }
            let mount = hierarchies.v1_mount(controller).ok_or(JailError::NoController { controller })?;
            let dir = self.make(mount, name)?;
            for (file, value) in limit_files(controller, limits, false) {
                write(&dir.join(file), &value)?;
            }
            if controller == "cpu"
                && let Some(accounting) = hierarchies.v1_mount("cpuacct")
            {
                self.make(accounting, name)?;
            }
        }
        if let Some(unified) = &hierarchies.unified {
            if !v2_controllers.is_empty() {
                let enable: Vec<String> = v2_controllers.iter().map(|c| format!("+{c}")).collect();
                // Controllers must be enabled in every ancestor's subtree_control.
                write(&unified.join("cgroup.subtree_control"), &enable.join(" "))?;
                let parent = unified.join(CGROUP_PARENT);
                std::fs::create_dir_all(&parent).map_err(cg_err(&parent))?;
                write(&parent.join("cgroup.subtree_control"), &enable.join(" "))?;
            }
            let dir = self.make(unified, name)?;
            for controller in v2_controllers {
                for (file, value) in limit_files(controller, limits, true) {
                    write(&dir.join(file), &value)?;
                }
            }
        }
        Ok(())
    }

    /// How many times the kernel's OOM killer killed a process of these
    /// cgroups for hitting their memory limit (read before [`Self::remove`]).
    pub fn oom_kills(&self) -> u64 {
        let counter = |dir: &PathBuf| {
            ["memory.events", "memory.oom_control"]
                .iter()
                .filter_map(|file| std::fs::read_to_string(dir.join(file)).ok())
                .find_map(|text| parse_oom_kills(&text))
                .unwrap_or(0)
        };
        self.dirs.iter().map(counter).sum()
    }

    fn make(&mut self, hierarchy: &Path, name: &str) -> Result<PathBuf, JailError> {
        let parent = hierarchy.join(CGROUP_PARENT);
        std::fs::create_dir_all(&parent).map_err(cg_err(&parent))?;
        let dir = parent.join(name);
        // Controllers co-mounted in one v1 hierarchy (`cpu,cpuacct`) share
        // the cgroup: it is made once, its limits kept.
        if self.dirs.contains(&dir) {
            return Ok(dir);
        }
        // A leftover from a jail whose parent died: empty cgroups can go.
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).map_err(cg_err(&dir))?;
        self.dirs.push(dir.clone());
        Ok(dir)
    }

    /// Opens every `cgroup.procs` for the child to write "0" into.
    pub fn open_procs(&self) -> Result<Vec<File>, JailError> {
        self.dirs
            .iter()
            .map(|d| {
                let path = d.join("cgroup.procs");
                OpenOptions::new().write(true).open(&path).map_err(cg_err(&path))
            })
            .collect()
    }

    /// Removes the cgroups (they must have no processes left).
    pub fn remove(&mut self) {
        for dir in self.dirs.drain(..).rev() {
            if let Err(e) = std::fs::remove_dir(&dir) {
                tracing::warn!("cannot remove cgroup {}: {e}", dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{CPU_PERIOD_US, CpuMax};

    fn limits() -> Limits {
        Limits {
            memory_bytes: Some(768 << 20),
            pids: Some(18),
            cpu_max: Some(CpuMax { quota_us: 20_000, period_us: CPU_PERIOD_US }),
            cpu_weight: Some(200),
            ..Limits::default()
        }
    }

    #[test]
    fn v2_limit_files() {
        let l = limits();
        assert_eq!(limit_files("memory", &l, true), [("memory.max", "805306368".to_string())]);
        assert_eq!(limit_files("pids", &l, true), [("pids.max", "18".to_string())]);
        assert_eq!(
            limit_files("cpu", &l, true),
            [("cpu.max", "20000 100000".to_string()), ("cpu.weight", "200".to_string())]
        );
    }

    #[test]
    fn v1_limit_files() {
        let l = limits();
        assert_eq!(limit_files("memory", &l, false), [("memory.limit_in_bytes", "805306368".to_string())]);
        assert_eq!(
            limit_files("cpu", &l, false),
            [
                ("cpu.cfs_period_us", "100000".to_string()),
                ("cpu.cfs_quota_us", "20000".to_string()),
                ("cpu.shares", "2048".to_string())
            ]
        );
        let weight_only = Limits { cpu_max: None, ..l };
        assert_eq!(limit_files("cpu", &weight_only, false), [("cpu.shares", "2048".to_string())]);
        assert_eq!(wanted_controllers(&weight_only), ["memory", "pids", "cpu"]);
        assert_eq!(wanted_controllers(&Limits::default()), Vec::<&str>::new());
    }

    #[test]
    fn weights_map_to_shares() {
        assert_eq!(weight_to_shares(100), 1024);
        assert_eq!(weight_to_shares(1), 10);
        assert_eq!(weight_to_shares(10_000), 102_400);
    }

    #[test]
    fn oom_kill_counters_of_both_versions() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(v2), Some(1));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_oom_kills(v1), Some(3));
        assert_eq!(parse_oom_kills("under_oom 0\n"), None);
    }

    #[test]
    fn supervisor_limits_override_and_are_checked() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |key: &str| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| v.to_string())
        };
        let mut l = Limits { memory_bytes: Some(512 << 20), ..Limits::default() };
        l.apply_supervisor_env(env(&[
            (crate::spec::CPU_MAX_ENV, "50000 100000"),
            (crate::spec::CPU_WEIGHT_ENV, "300"),
            (crate::spec::MEMORY_MAX_ENV, "1073741824"),
        ]))
        .unwrap();
        assert_eq!(l.cpu_max, Some(CpuMax { quota_us: 50_000, period_us: 100_000 }));
        assert_eq!((l.cpu_weight, l.memory_bytes), (Some(300), Some(1 << 30)));
        for bad in [
            (crate::spec::CPU_MAX_ENV, "50000"),
            (crate::spec::CPU_MAX_ENV, "10 100000"),
            (crate::spec::CPU_MAX_ENV, "max 100000"),
            (crate::spec::CPU_WEIGHT_ENV, "0"),
            (crate::spec::CPU_WEIGHT_ENV, "10001"),
            (crate::spec::MEMORY_MAX_ENV, "4096"),
        ] {
            let pairs: &'static [(&str, &str)] = Box::leak(Box::new([bad]));
            assert!(Limits::default().apply_supervisor_env(env(pairs)).is_err(), "{bad:?}");
        }
        let mut untouched = Limits::default();
        untouched.apply_supervisor_env(|_| None).unwrap();
        assert_eq!(untouched, Limits::default());
    }
}
