//! Parent-side preparation: everything the child needs, computed and
//! allocated before the clone (C strings, mount lists, fd plans), because
//! the child of a multi-threaded parent may not allocate (see child.rs).

use std::collections::BTreeSet;
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use crate::error::JailError;
use crate::spec::{BindMount, DEV, JailSpec, REPORT_FD, USERFAULTFD};

pub(crate) struct PreparedMount {
    /// Host path of the source.
    pub source: CString,
    /// Host path of the target under the new root (before pivot_root).
    pub target: CString,
    /// Flags for the MS_REMOUNT|MS_BIND that sets read-only etc.
    pub remount_flags: libc::c_ulong,
}

/// The jail's own `/dev` and the one device node in it.
pub(crate) struct PreparedDev {
    /// Host path of `/dev` under the new root (before pivot_root).
    pub dir: CString,
    /// Host path of the node under the new root.
    pub node: CString,
    /// The host node's device number, which the jail's node gets.
    pub rdev: libc::dev_t,
}

/// Everything the child reads; built by [`prepare`].
pub(crate) struct Prepared {
    pub root: CString,
    /// With [`JailSpec::userfaultfd`].
    pub userfaultfd: Option<PreparedDev>,
    pub hostname: CString,
    /// Directories to create under the new root, parents first.
    pub dirs: Vec<CString>,
    /// Empty files to create as mount points for file binds.
    pub files: Vec<CString>,
    pub mounts: Vec<PreparedMount>,
    /// `cgroup.procs` files, open for writing.
    pub cgroup_procs: Vec<RawFd>,
    pub open_files: u64,
    pub file_size: Option<u64>,
    /// `(parent fd, child fd)`, the report pipe included.
    pub fds: Vec<(RawFd, RawFd)>,
    /// First fd number above every fd in play: fds are staged from here so
    /// moving one to its target never overwrites another.
    pub stage_base: RawFd,
    /// Sorted fd numbers that survive the close step (targets, stdio, and
    /// the error pipe, which is staged at `stage_base + fds.len()`).
    pub keep: Vec<RawFd>,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub cap_last: u32,
    pub die_with_parent: bool,
    pub exec: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
}

pub(crate) fn cstring(bytes: &[u8]) -> Result<CString, JailError> {
    CString::new(bytes).map_err(|_| JailError::Spec(format!("{:?} contains a NUL byte", OsStr::from_bytes(bytes))))
}

fn path_c(path: &Path) -> Result<CString, JailError> {
    cstring(path.as_os_str().as_bytes())
}

/// Host path of `inside` (absolute, in the jail) under `root`.
fn under(root: &Path, inside: &Path) -> PathBuf {
    root.join(inside.strip_prefix("/").unwrap_or(inside))
}

/// The highest capability number this kernel knows.
fn cap_last() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(63)
}

/// The device number of the host's character device `path`.
pub(crate) fn char_device(path: &Path) -> Result<libc::dev_t, JailError> {
    let error = |source| JailError::HostDevice { path: path.to_path_buf(), source };
    let meta = std::fs::metadata(path).map_err(error)?;
    if !meta.file_type().is_char_device() {
        return Err(error(std::io::Error::other("not a character device")));
    }
    Ok(meta.rdev())
}

pub(crate) fn prepare(
    spec: &JailSpec,
    root: &Path,
    cgroup_procs: &[std::fs::File],
    report_write: &OwnedFd,
    error_write: &OwnedFd,
) -> Result<Prepared, JailError> {
    // A host without the node fails here, before the clone.
    let userfaultfd = match spec.userfaultfd {
        false => None,
        true => Some(PreparedDev {
            rdev: char_device(Path::new(USERFAULTFD))?,
            dir: path_c(&under(root, Path::new(DEV)))?,
            node: path_c(&under(root, Path::new(USERFAULTFD)))?,
        }),
    };
    let mut mounts: Vec<BindMount> = vec![BindMount::read_only(&spec.exec)];
    let libraries = crate::libraries::libraries(&spec.exec)
        .map_err(|detail| JailError::Libraries { exec: spec.exec.clone(), detail })?;
    mounts.extend(libraries.into_iter().map(BindMount::read_only));
    mounts.extend(spec.mounts.iter().cloned());

    let mut dirs = BTreeSet::new();
    let mut files = Vec::new();
    let mut prepared_mounts = Vec::new();
    for m in &mounts {
        let meta =
            std::fs::metadata(&m.source).map_err(|source| JailError::MountSource { path: m.source.clone(), source })?;
        let mut parent = PathBuf::from("/");
        let components: Vec<Component> = m.target.components().skip(1).collect();
        for (i, c) in components.iter().enumerate() {
            parent.push(c);
            if i + 1 < components.len() || meta.is_dir() {
                dirs.insert(under(root, &parent));
            }
        }
        let target = under(root, &m.target);
        if !meta.is_dir() {
            files.push(path_c(&target)?);
        }
        let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID;
        if !m.device {
            flags |= libc::MS_NODEV;
        }
        if !m.writable {
            flags |= libc::MS_RDONLY;
        }
        prepared_mounts.push(PreparedMount {
            source: path_c(&m.source)?,
            target: path_c(&target)?,
            remount_flags: flags,
        });
    }
    // BTreeSet order puts every parent before its children.
    let dirs = dirs.iter().map(|d| path_c(d)).collect::<Result<Vec<_>, _>>()?;

    let mut fds = spec.fds.clone();
    fds.push((report_write.as_raw_fd(), REPORT_FD));
    let cgroup_fds: Vec<RawFd> = cgroup_procs.iter().map(|f| f.as_raw_fd()).collect();
    let highest = fds
        .iter()
        .flat_map(|(a, b)| [*a, *b])
        .chain(cgroup_fds.iter().copied())
        .chain([error_write.as_raw_fd(), 2])
        .max()
        .unwrap_or(2);
    let stage_base = highest + 1;
    let mut keep: Vec<RawFd> = fds.iter().map(|(_, t)| *t).collect();
    if spec.keep_stdio {
        keep.extend([0, 1, 2]);
    }
    keep.push(stage_base + fds.len() as RawFd);
    keep.sort_unstable();

    let mut env: Vec<(OsString, OsString)> = spec.env.clone();
    env.push((mm_policies::REPORT_FD_ENV.into(), REPORT_FD.to_string().into()));
    env.push((crate::JAILED_ENV.into(), spec.name.clone().into()));
    let envp = env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            cstring(&kv)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut argv = vec![path_c(&spec.exec)?];
    for a in &spec.args {
        argv.push(cstring(a.as_bytes())?);
    }

    Ok(Prepared {
        root: path_c(root)?,
        userfaultfd,
        hostname: cstring(spec.name.as_bytes())?,
        dirs,
        files,
        mounts: prepared_mounts,
        cgroup_procs: cgroup_fds,
        open_files: spec.limits.open_files,
        file_size: spec.limits.file_size,
        fds,
        stage_base,
        keep,
        uid: spec.uid,
        gid: spec.gid,
        cap_last: cap_last(),
        die_with_parent: spec.die_with_parent,
        exec: path_c(&spec.exec)?,
        argv,
        envp,
    })
}
