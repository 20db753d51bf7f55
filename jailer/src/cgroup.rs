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
use crate::spec::{CGROUP_PARENT, Limits};

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
                        if matches!(option, "memory" | "pids" | "cpu" | "cpuset" | "blkio" | "io") {
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

impl Cgroups {
    /// Creates `<hierarchy>/micromachines/<name>` wherever a limit or the
    /// unified hierarchy needs one, and writes the limits. On error the
    /// directories made so far are in `self.dirs` for the caller to remove.
    pub fn create(&mut self, hierarchies: &Hierarchies, name: &str, limits: &Limits) -> Result<(), JailError> {
        let wanted: Vec<(&'static str, u64)> = [("memory", limits.memory_bytes), ("pids", limits.pids)]
            .into_iter()
            .filter_map(|(c, v)| v.map(|v| (c, v)))
            .collect();
        let mut v2_controllers = Vec::new();
        for (controller, value) in &wanted {
            if hierarchies.in_unified(controller) {
                v2_controllers.push((*controller, *value));
            } else {
                let mount = hierarchies.v1_mount(controller).ok_or(JailError::NoController { controller })?;
                let dir = self.make(mount, name)?;
                let file = if *controller == "memory" { "memory.limit_in_bytes" } else { "pids.max" };
                write(&dir.join(file), &value.to_string())?;
            }
        }
        if let Some(unified) = &hierarchies.unified {
            if !v2_controllers.is_empty() {
                let enable: Vec<String> = v2_controllers.iter().map(|(c, _)| format!("+{c}")).collect();
                // Controllers must be enabled in every ancestor's subtree_control.
                write(&unified.join("cgroup.subtree_control"), &enable.join(" "))?;
                let parent = unified.join(CGROUP_PARENT);
                std::fs::create_dir_all(&parent).map_err(cg_err(&parent))?;
                write(&parent.join("cgroup.subtree_control"), &enable.join(" "))?;
            }
            let dir = self.make(unified, name)?;
            for (controller, value) in v2_controllers {
                let file = if controller == "memory" { "memory.max" } else { "pids.max" };
                write(&dir.join(file), &value.to_string())?;
            }
        }
        Ok(())
    }

    fn make(&mut self, hierarchy: &Path, name: &str) -> Result<PathBuf, JailError> {
        let parent = hierarchy.join(CGROUP_PARENT);
        std::fs::create_dir_all(&parent).map_err(cg_err(&parent))?;
        let dir = parent.join(name);
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
