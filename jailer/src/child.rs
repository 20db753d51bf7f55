//! The child's side of the jail: one linear sequence of steps from clone to
//! exec, in the order Firecracker's jailer uses (`env.rs`): cgroups, mounts
//! (with the spec's `userfaultfd`, a `/dev` of the jail's own: see
//! `make_dev`) and pivot_root, rlimits, fds, identity, capabilities,
//! no_new_privs, exec.
//!
//! This runs in a copy of a possibly multi-threaded parent, so like the
//! code between fork and exec in `std::process::Command` it may only make
//! async-signal-safe calls: raw syscalls on data `prepare.rs` made before
//! the clone, no allocation, no locks. A failing step sends (step, index,
//! errno) down the error pipe and the child exits; the parent turns that
//! into a [`crate::JailError`].

use std::ffi::CStr;
use std::os::fd::RawFd;

use crate::error::ChildStep;
use crate::prepare::Prepared;

/// (step, index of the item it was working on, errno).
pub(crate) type Failure = (ChildStep, u32, i32);

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

fn check(step: ChildStep, index: usize, rc: libc::c_long) -> Result<(), Failure> {
    if rc < 0 { Err((step, index as u32, errno())) } else { Ok(()) }
}

fn check_int(step: ChildStep, index: usize, rc: libc::c_int) -> Result<(), Failure> {
    check(step, index, libc::c_long::from(rc))
}

const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
const SECBIT_NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Runs the jail sequence and execs; returns only on failure.
///
/// # Safety
/// Must be called in the child right after the clone, with `error_fd` the
/// write end of the (CLOEXEC) error pipe.
pub(crate) unsafe fn run(p: &Prepared, error_fd: RawFd) -> ! {
    let mut error_fd = error_fd;
    // SAFETY: the caller guarantees we are the freshly cloned child; every
    // step is a raw syscall on data prepared before the clone.
    let failure = match unsafe { steps(p, &mut error_fd) } {
        Err(failure) => failure,
        Ok(()) => (ChildStep::Exec, 0, errno()),
    };
    let mut record = [0u8; 12];
    record[..4].copy_from_slice(&(failure.0 as u32).to_le_bytes());
    record[4..8].copy_from_slice(&failure.1.to_le_bytes());
    record[8..].copy_from_slice(&failure.2.to_le_bytes());
    // SAFETY: write(2) and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(error_fd, record.as_ptr().cast(), record.len());
        libc::_exit(127)
    }
}

unsafe fn steps(p: &Prepared, error_fd: &mut RawFd) -> Result<(), Failure> {
    use ChildStep::*;
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: (the whole function) every call is a syscall whose pointer
    // arguments are NUL-terminated strings or structs owned by `p` or this
    // stack frame, valid for the duration of the call.
    unsafe {
        // 1. cgroups: join before anything else runs in the child.
        for (i, fd) in p.cgroup_procs.iter().enumerate() {
            let rc = libc::write(*fd, b"0".as_ptr().cast(), 1);
            check(JoinCgroup, i, rc as libc::c_long)?;
        }

        // 2. Mounts: nothing we do propagates back to the host.
        check_int(
            PrivateMounts,
            0,
            libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, null.cast()),
        )?;

        // 3. The new root: a small tmpfs holding only mount points.
        let tmpfs_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        let opts = c"size=1m,mode=0755";
        let rc = libc::mount(c"tmpfs".as_ptr(), p.root.as_ptr(), c"tmpfs".as_ptr(), tmpfs_flags, opts.as_ptr().cast());
        check_int(MountRoot, 0, rc)?;
        if let Some(dev) = &p.userfaultfd {
            make_dev(p, dev)?;
        }
        for (i, dir) in p.dirs.iter().enumerate() {
            let rc = libc::mkdir(dir.as_ptr(), 0o755);
            if rc < 0 && errno() != libc::EEXIST {
                return Err((MakeMountPoint, i as u32, errno()));
            }
        }
        for (i, file) in p.files.iter().enumerate() {
            let fd = libc::open(file.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
            check_int(MakeMountPoint, p.dirs.len() + i, fd)?;
            libc::close(fd);
        }
        for (i, m) in p.mounts.iter().enumerate() {
            let rc = libc::mount(m.source.as_ptr(), m.target.as_ptr(), null, libc::MS_BIND | libc::MS_REC, null.cast());
            check_int(BindMount, i, rc)?;
            check_int(RemountBind, i, libc::mount(null, m.target.as_ptr(), null, m.remount_flags, null.cast()))?;
        }
        // Read-only only now: mount points of binds under /dev were made in it.
        if let Some(dev) = &p.userfaultfd {
            let ro = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | DEV_FLAGS;
            check_int(RemountDevReadOnly, 0, libc::mount(null, dev.dir.as_ptr(), null, ro, null.cast()))?;
        }

        // 4. pivot_root into it and let go of the host's tree.
        check_int(PivotRoot, 0, libc::chdir(p.root.as_ptr()))?;
        check(PivotRoot, 0, libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()))?;
        check_int(UnmountOldRoot, 0, libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
        check_int(UnmountOldRoot, 0, libc::chdir(c"/".as_ptr()))?;
        let ro = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | tmpfs_flags;
        check_int(RemountRootReadOnly, 0, libc::mount(null, c"/".as_ptr(), null, ro, null.cast()))?;
        check_int(Hostname, 0, libc::sethostname(p.hostname.as_ptr(), p.hostname.as_bytes().len()))?;

        // 5. rlimits (no core dumps: a dump would land outside the jail's
        //    view and could hold guest memory).
        let set = |resource: libc::__rlimit_resource_t, value: u64| {
            let limit = libc::rlimit { rlim_cur: value, rlim_max: value };
            libc::setrlimit(resource, &limit)
        };
        check_int(Rlimits, 0, set(libc::RLIMIT_NOFILE, p.open_files))?;
        if let Some(size) = p.file_size {
            check_int(Rlimits, 1, set(libc::RLIMIT_FSIZE, size))?;
        }
        check_int(Rlimits, 2, set(libc::RLIMIT_CORE, 0))?;

        // 6. fds: stage every passed fd above all others, move each to its
        //    number, then close everything not kept.
        for (i, (from, _)) in p.fds.iter().enumerate() {
            check_int(PassFds, i, libc::dup2(*from, p.stage_base + i as RawFd))?;
        }
        let staged_error = p.stage_base + p.fds.len() as RawFd;
        check_int(PassFds, p.fds.len(), libc::dup3(*error_fd, staged_error, libc::O_CLOEXEC))?;
        *error_fd = staged_error;
        for (i, (_, to)) in p.fds.iter().enumerate() {
            check_int(PassFds, i, libc::dup2(p.stage_base + i as RawFd, *to))?;
        }
        let mut next: RawFd = 0;
        for keep in p.keep.iter().copied() {
            if keep > next {
                check(CloseFds, 0, libc::syscall(libc::SYS_close_range, next as u32, (keep - 1) as u32, 0))?;
            }
            next = keep + 1;
        }
        check(CloseFds, 0, libc::syscall(libc::SYS_close_range, next as u32, u32::MAX, 0))?;

        // 7. Capabilities out of reach for good, while we still may change
        //    them: the bounding set, the ambient set, and securebits that
        //    stop uid 0 from meaning "all capabilities" on exec.
        for cap in 0..=p.cap_last {
            let rc = libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
            if rc < 0 && errno() != libc::EINVAL {
                return Err((DropBoundingSet, cap, errno()));
            }
        }
        check_int(ClearAmbient, 0, libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))?;
        let bits = SECBIT_NOROOT
            | SECBIT_NOROOT_LOCKED
            | SECBIT_KEEP_CAPS_LOCKED
            | SECBIT_NO_CAP_AMBIENT_RAISE
            | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
        check_int(Securebits, 0, libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0))?;

        // 8. The microVM's own identity, by raw syscalls: glibc's wrappers
        //    apply a change to every thread of the process (setxid), and
        //    this copy's glibc still lists the parent's threads, one of
        //    which may have been in pthread_create at the clone: the
        //    wrapper then waits forever for it to finish starting.
        check(SetGroups, 0, libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()))?;
        check(SetGid, 0, libc::syscall(libc::SYS_setresgid, p.gid, p.gid, p.gid))?;
        check(SetUid, 0, libc::syscall(libc::SYS_setresuid, p.uid, p.uid, p.uid))?;
        let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
        let data = [CapData { effective: 0, permitted: 0, inheritable: 0 }; 2];
        check(DropCapabilities, 0, libc::syscall(libc::SYS_capset, &header, data.as_ptr()))?;

        // 9. Die with the parent if asked (after the identity change, which
        //    clears the setting), and never gain privileges again.
        if p.die_with_parent {
            check_int(ParentDeathSignal, 0, libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
        }
        check_int(NoNewPrivs, 0, libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;

        // 10. A clean signal state (the parent's mask and ignored signals
        //     would otherwise survive exec), then exec.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        check_int(ResetSignals, 0, libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()))?;
        for signal in [libc::SIGPIPE, libc::SIGSYS, libc::SIGXFSZ] {
            libc::signal(signal, libc::SIG_DFL);
        }
        exec(p);
    }
    Ok(())
}

/// Mount flags of the jail's `/dev`: the root's, but device nodes work.
const DEV_FLAGS: libc::c_ulong = libc::MS_NOSUID | libc::MS_NOEXEC;

/// The jail's own `/dev` ([`crate::JailSpec::userfaultfd`]): a tiny tmpfs
/// mounted over the root's (which is `MS_NODEV`, where no node would
/// open), holding one node, `userfaultfd`, a character device with the
/// host's device number, mode 0600, owned by the jail's uid and gid. It is
/// remounted read-only after the binds.
///
/// Why a node: a lazily restored guest's device back ends create the
/// userfaultfd their front end (mm-vmm) resolves their faults on, and it
/// must catch faults the kernel takes on their behalf (block's
/// `pread`/`pwrite` straight into guest pages). The userfaultfd(2) syscall
/// grants that only with CAP_SYS_PTRACE while vm.unprivileged_userfaultfd
/// is 0 (and the device's seccomp policy forbids it); opening
/// `/dev/userfaultfd` grants it to whoever the node's permissions let in,
/// which the `vhost-user-backend` crate's postcopy handler (and block's)
/// tries first. Made (mknod, chown) rather than bound from the host, as
/// Firecracker's jailer makes its `/dev/kvm`, `/dev/net/tun` and
/// `/dev/userfaultfd`, so the jail's node belongs to the jail's uid and the
/// host's keeps its owner and mode. The device number is the host node's
/// (userfaultfd is a misc device: its minor is allocated at boot).
///
/// # Safety
/// As [`steps`]: in the cloned child, still privileged, before pivot_root.
unsafe fn make_dev(p: &Prepared, dev: &crate::prepare::PreparedDev) -> Result<(), Failure> {
    use ChildStep::*;
    // SAFETY: syscalls on NUL-terminated strings owned by `dev`.
    unsafe {
        let rc = libc::mkdir(dev.dir.as_ptr(), 0o755);
        if rc < 0 && errno() != libc::EEXIST {
            return Err((MountDev, 0, errno()));
        }
        let opts = c"size=4k,nr_inodes=32,mode=0755";
        let rc = libc::mount(c"tmpfs".as_ptr(), dev.dir.as_ptr(), c"tmpfs".as_ptr(), DEV_FLAGS, opts.as_ptr().cast());
        check_int(MountDev, 0, rc)?;
        check_int(MakeDevNode, 0, libc::mknod(dev.node.as_ptr(), libc::S_IFCHR | 0o600, dev.rdev))?;
        check_int(ChownDevNode, 0, libc::chown(dev.node.as_ptr(), p.uid, p.gid))?;
        // The umask applied to mknod's mode; the node's mode is exactly this.
        check_int(ChownDevNode, 0, libc::chmod(dev.node.as_ptr(), 0o600))?;
    }
    Ok(())
}

/// execve with argv and envp arrays built on the stack (no allocation).
unsafe fn exec(p: &Prepared) {
    const MAX: usize = 128;
    let mut argv = [std::ptr::null::<libc::c_char>(); MAX + 1];
    let mut envp = [std::ptr::null::<libc::c_char>(); MAX + 1];
    for (slot, s) in argv.iter_mut().zip(p.argv.iter().take(MAX)) {
        *slot = CStr::as_ptr(s);
    }
    for (slot, s) in envp.iter_mut().zip(p.envp.iter().take(MAX)) {
        *slot = CStr::as_ptr(s);
    }
    // SAFETY: NULL-terminated arrays of pointers into `p`'s C strings.
    unsafe { libc::execve(p.exec.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
}
