//! Escape attempts, run from inside a jailed process by the tests (through
//! the hidden `mm-device block --test-escape` flag, built with the
//! `test-hooks` feature only). Each prints one line,
//! `PROBE <name> blocked: <why>` or `PROBE <name> ESCAPED: <what worked>`,
//! so a test can check every layer separately.
//!
//! [`jail`] tries what the jail alone (no seccomp filter) must stop, and is
//! meant to run as uid 0 in the jail (as the tests and the benchmark jail
//! themselves) against targets that file permissions would let it reach,
//! so that each attempt is stopped by a layer of the jail and not by the
//! uid: a root-owned, mode 0666 file and a mode 0777 directory outside the
//! jail's root, and a process outside the jail of the same uid holding no
//! capabilities. The layer that stops each attempt is named in the probe's
//! comment; switching that layer off in `child.rs` (or `lib.rs`'s clone
//! flags) makes the probe say ESCAPED.
//!
//! Creating sockets, ptrace and new user namespaces are stopped by the
//! seccomp layer as well, so [`seccomp`] makes one such call each, which a
//! test runs with the filter on and expects to end in SIGSYS.

use std::ffi::CString;
use std::io::Error;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

fn report(name: &str, result: Result<String, String>) {
    match result {
        Ok(what) => println!("PROBE {name} ESCAPED: {what}"),
        Err(why) => println!("PROBE {name} blocked: {why}"),
    }
}

/// Ok(detail) if `rc` says the call worked, Err(errno text) if not.
fn outcome(rc: libc::c_long, what: &str) -> Result<String, String> {
    if rc >= 0 { Ok(format!("{what} succeeded")) } else { Err(format!("{what}: {}", Error::last_os_error())) }
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

/// What [`jail`] aims at, all outside the jail: `KEY=VALUE` pairs separated
/// by commas (`other=PATH,dir=PATH,pid=N`).
#[derive(Debug, Default)]
pub struct Targets {
    /// A file the jail does not hold (another microVM's disk), that its uid
    /// may read and write: root-owned with mode 0666, or any owner as uid 0.
    pub other: Option<PathBuf>,
    /// A directory outside the jail its uid may write (mode 0777).
    pub dir: Option<PathBuf>,
    /// A process outside the jail (its pid on the host) that the jail's uid
    /// could trace and signal if it could name it: same uid, no capabilities.
    pub pid: Option<libc::pid_t>,
}

impl Targets {
    /// Parses `other=PATH,dir=PATH,pid=N` (any subset; a bare `PATH` is
    /// `other=PATH`).
    pub fn parse(text: &str) -> Result<Targets, String> {
        let mut targets = Targets::default();
        for item in text.split(',').filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some(("other", path)) => targets.other = Some(path.into()),
                Some(("dir", path)) => targets.dir = Some(path.into()),
                Some(("pid", pid)) => targets.pid = Some(pid.parse().map_err(|_| format!("pid={pid}: not a pid"))?),
                Some((key, _)) => return Err(format!("unknown escape target {key:?} (other, dir, pid)")),
                None => targets.other = Some(item.into()),
            }
        }
        Ok(targets)
    }
}

/// What the jail alone must stop; see the module docs for the targets.
pub fn jail(targets: &Targets) {
    // Mount namespace + pivot_root: the host's tree is gone, so a path
    // outside the jail names nothing (permissions would allow the open).
    if let Some(other) = &targets.other {
        report(
            "open-other-disk",
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(other)
                .map(|_| format!("opened {} read-write", other.display()))
                .map_err(|e| format!("{}: {e}", other.display())),
        );
    }
    // PID namespace (and no /proc): no other process can be named.
    report(
        "see-host-pids",
        match std::fs::read_dir("/proc") {
            Ok(entries) => Ok(format!("/proc lists {} entries", entries.count())),
            // SAFETY: kill with signal 0 only checks for targets; -1 means
            // "every process I may signal" except myself.
            Err(e) => match unsafe { libc::kill(-1, 0) } {
                0 => Ok("kill(-1, 0) found other processes".into()),
                _ => Err(format!(
                    "/proc: {e}; kill(-1, 0): {}; my pid is {}",
                    Error::last_os_error(),
                    std::process::id()
                )),
            },
        },
    );
    if let Some(pid) = targets.pid {
        // PID namespace: the host pid names nothing here (the same uid may
        // signal it otherwise).
        // SAFETY: signal 0 only checks that the target exists and may be signalled.
        let rc = unsafe { libc::kill(pid, 0) };
        report("signal-outside", outcome(rc.into(), &format!("kill({pid}, 0)")));
    }
    ptrace_attach(targets.pid);
    write_outside(targets);
    mount_proc();
    // Capabilities: chroot needs CAP_SYS_CHROOT (and escaping a chroot is
    // what it would be for).
    // SAFETY: chroot(2) with a valid C string.
    report("chroot", outcome(unsafe { libc::chroot(c"/".as_ptr()) }.into(), "chroot"));
    open_by_handle();
    capabilities();
}

/// PID namespace: ptrace of the outside process by its host pid, of the
/// jail's pid 1 (this process: always refused), and of a guess (the pid
/// after the outside one). The uid and the (absent) capabilities match the
/// target's, so only the namespace stops it; the seccomp filter would too.
/// PTRACE_SEIZE, which the same checks guard as PTRACE_ATTACH, stops nobody
/// if it works (the tracee is let go when this process exits).
fn ptrace_attach(outside: Option<libc::pid_t>) {
    let mut pids = vec![1];
    if let Some(pid) = outside {
        pids.extend([pid, pid + 1]);
    }
    for pid in pids {
        // SAFETY: ptrace(2) with integer arguments.
        let rc = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) };
        report("ptrace-attach", outcome(rc, &format!("ptrace(PTRACE_SEIZE, {pid})")));
    }
}

/// pivot_root (the host's tree is gone) and the read-only root: writes to
/// the root, to a world-writable host directory and beside the other disk.
fn write_outside(targets: &Targets) {
    let mut paths: Vec<PathBuf> = ["/escape-test", "/tmp/escape-test", "/lib/escape-test"].map(PathBuf::from).into();
    paths.extend(targets.dir.iter().map(|d| d.join("escape-test")));
    paths.extend(targets.other.iter().filter_map(|o| o.parent()).map(|d| d.join("escape-test")));
    paths.dedup();
    for path in paths {
        report(
            "write-outside-root",
            std::fs::write(&path, b"x")
                .map(|_| format!("wrote {}", path.display()))
                .map_err(|e| format!("{}: {e}", path.display())),
        );
    }
}

/// Capabilities (CAP_SYS_ADMIN): mount a fresh proc, which would show the
/// host's processes without the PID namespace, on a directory that exists
/// in the jail (the one holding this binary: the root's own directories
/// are all mount points or their parents).
fn mount_proc() {
    let exe = std::env::args_os().next().map(PathBuf::from).unwrap_or_default();
    let dir = exe.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("/"));
    let target = c_path(dir);
    // SAFETY: mount(2) with valid C strings.
    let rc = unsafe { libc::mount(c"proc".as_ptr(), target.as_ptr(), c"proc".as_ptr(), 0, std::ptr::null()) };
    let result = outcome(rc.into(), &format!("mount proc on {}", dir.display()));
    if result.is_ok() {
        // SAFETY: umount2(2) of what we just mounted.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
    report("mount-proc", result);
}

/// Capabilities (CAP_DAC_READ_SEARCH): "shocker". A file handle is an
/// inode number on a filesystem, not a path, so opening one ignores the
/// mount namespace: take the handle of this binary (bound in from the
/// host's filesystem) and, where the filesystem uses 32-bit inode handles
/// (ext4), forge one for its root directory (inode 2).
fn open_by_handle() {
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        data: [u8; 128],
    }
    let exe = std::env::args_os().next().unwrap_or_default();
    let path = CString::new(exe.as_bytes()).unwrap_or_default();
    let mut handle = Handle { bytes: 128, kind: 0, data: [0; 128] };
    let mut mount_id = 0;
    // SAFETY: name_to_handle_at fills the handle and mount id we own.
    let rc = unsafe {
        libc::syscall(libc::SYS_name_to_handle_at, libc::AT_FDCWD, path.as_ptr(), &mut handle, &mut mount_id, 0)
    };
    if rc < 0 {
        return report("open-by-handle", Err(format!("name_to_handle_at: {}", Error::last_os_error())));
    }
    // FILEID_INO32_GEN: (inode, generation); generation 0 is not checked.
    let forged = handle.kind == 1 && handle.bytes == 8;
    if forged {
        handle.data[..8].copy_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]);
    }
    // SAFETY: open(2) of our own binary (not O_PATH: open_by_handle_at
    // refuses those).
    let mount_fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    let flags = libc::O_RDONLY | libc::O_CLOEXEC | if forged { libc::O_DIRECTORY } else { 0 };
    // SAFETY: open_by_handle_at reads the handle we own.
    let fd = unsafe { libc::syscall(libc::SYS_open_by_handle_at, mount_fd, &handle, flags) };
    let result = if fd < 0 {
        Err(format!("open_by_handle_at: {}", Error::last_os_error()))
    } else if forged {
        Ok(format!(
            "opened the host filesystem's root directory by a forged handle: {}",
            list_dir(fd as libc::c_int).join(" ")
        ))
    } else {
        Ok("opened a file by handle".into())
    };
    // SAFETY: closing fds we opened (a negative one is ignored).
    unsafe {
        libc::close(mount_fd);
        libc::close(fd as libc::c_int);
    }
    report("open-by-handle", result);
}

/// The names in an open directory (getdents64: the jail has no /proc).
fn list_dir(fd: libc::c_int) -> Vec<String> {
    let mut names = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: getdents64 writes at most buf.len() bytes into buf.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        if n <= 0 {
            return names;
        }
        let mut at = 0;
        while at + 19 < n as usize {
            // struct linux_dirent64: ino u64, off i64, reclen u16, type u8, name.
            let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
            let name = &buf[at + 19..at + reclen];
            let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
            names.push(String::from_utf8_lossy(name).into_owned());
            at += reclen.max(1);
        }
    }
}

fn capabilities() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header { version: 0x2008_0522, pid: 0 };
    let mut data = [Data::default(); 2];
    // The capability drop (bounding set emptied, capset to nothing,
    // SECBIT_NOROOT so uid 0 gains nothing on exec).
    // SAFETY: capget fills the two data structs we own.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()) };
    let any = data.iter().any(|d| d.effective | d.permitted | d.inheritable != 0);
    report(
        "capabilities-held",
        if rc == 0 && any {
            Ok(format!("capget shows permitted {:x?}", data.map(|d| d.permitted)))
        } else {
            Err("none held".into())
        },
    );
    // CAP_SYS_ADMIN (21) added to what it holds, in every set (inheritable
    // too, which an ambient capability needs).
    let mut raised = data;
    for d in &mut raised[..1] {
        let wanted = d.permitted | 1 << 21;
        *d = Data { effective: wanted, permitted: wanted, inheritable: wanted };
    }
    // SAFETY: capset reads the structs we own.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, raised.as_ptr()) };
    report("capset-raise", outcome(rc, "capset(+CAP_SYS_ADMIN)"));
    // SAFETY: prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, 21, 0, 0) };
    report("ambient-raise", outcome(rc.into(), "PR_CAP_AMBIENT_RAISE CAP_SYS_ADMIN"));
    // CAP_SETUID: a uid 0 jail cannot become another uid, nor an
    // unprivileged one uid 0 (which, with SECBIT_NOROOT set and an empty
    // bounding set, would grant nothing either).
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let other = if uid == 0 { 1 } else { 0 };
    // SAFETY: setresuid with integer arguments.
    let rc = unsafe { libc::setresuid(other, other, other) };
    report(
        "setuid",
        if rc == 0 {
            Ok(format!("setresuid({other}) from uid {uid}{}", capabilities_after_setuid()))
        } else {
            Err(format!("setresuid({other}) from uid {uid}: {}", Error::last_os_error()))
        },
    );
}

/// What uid 0 would bring after a successful setuid.
fn capabilities_after_setuid() -> String {
    // SAFETY: prctl(PR_CAPBSET_READ) only reads.
    let bounding = (0..=40).filter(|cap| unsafe { libc::prctl(libc::PR_CAPBSET_READ, *cap, 0, 0, 0) } == 1).count();
    // SAFETY: prctl(PR_GET_SECUREBITS) only reads.
    let securebits = unsafe { libc::prctl(libc::PR_GET_SECUREBITS, 0, 0, 0, 0) };
    format!(" ({bounding} capabilities in the bounding set, securebits {securebits:#x})")
}

/// `USERFAULTFD_IOC_NEW`, `UFFDIO_API` and `UFFD_API` (linux/userfaultfd.h).
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFD_API: u64 = 0xaa;

/// What a lazily restored guest's device back end does first
/// ([`crate::JailSpec::userfaultfd`]): open `/dev/userfaultfd`, create a
/// userfaultfd that also catches kernel-mode faults (`USERFAULTFD_IOC_NEW`
/// without `UFFD_USER_MODE_ONLY`) and negotiate its API (`UFFDIO_API`), as
/// the `userfaultfd` crate does for `vhost-user-backend`. Prints `PROBE
/// userfaultfd created: ...` or `PROBE userfaultfd failed: <step>: <why>`.
/// Unlike [`seccomp`], nothing here may trap under the device policies
/// (which is why it does not say its uid: [`dev`] does).
pub fn userfaultfd() {
    let result = (|| {
        let path = c"/dev/userfaultfd";
        let mut stat: libc::stat = {
            // SAFETY: all zeroes is a valid `struct stat`.
            unsafe { std::mem::zeroed() }
        };
        // SAFETY: stat(2) with a C string and a struct we own.
        if unsafe { libc::stat(path.as_ptr(), &mut stat) } != 0 {
            return Err(format!("stat /dev/userfaultfd: {}", Error::last_os_error()));
        }
        // SAFETY: open(2) of a C string.
        let dev = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if dev < 0 {
            return Err(format!("open /dev/userfaultfd: {}", Error::last_os_error()));
        }
        // SAFETY: the ioctl takes the new fd's flags by value.
        let uffd = unsafe { libc::ioctl(dev, USERFAULTFD_IOC_NEW as _, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        let new_error = Error::last_os_error();
        // SAFETY: closing the fd we opened.
        unsafe { libc::close(dev) };
        if uffd < 0 {
            return Err(format!("USERFAULTFD_IOC_NEW: {new_error}"));
        }
        let mut api = [UFFD_API, 0, 0]; // struct uffdio_api: api, features, ioctls
        // SAFETY: UFFDIO_API reads and writes the 24-byte struct we own.
        let rc = unsafe { libc::ioctl(uffd, UFFDIO_API as _, api.as_mut_ptr()) };
        let api_error = Error::last_os_error();
        // SAFETY: closing the userfaultfd we created.
        unsafe { libc::close(uffd) };
        if rc < 0 {
            return Err(format!("UFFDIO_API: {api_error}"));
        }
        Ok(format!(
            "/dev/userfaultfd is {}:{} owned by {}:{} mode {:o}; UFFDIO_API ioctls {:#x}",
            libc::major(stat.st_rdev),
            libc::minor(stat.st_rdev),
            stat.st_uid,
            stat.st_gid,
            stat.st_mode & 0o7777,
            api[2]
        ))
    })();
    match result {
        Ok(what) => println!("PROBE userfaultfd created: {what}"),
        Err(why) => println!("PROBE userfaultfd failed: {why}"),
    }
}

/// The jail's `/dev` ([`crate::JailSpec::userfaultfd`]), seen from inside
/// (run without the seccomp filter: listing a directory and the
/// userfaultfd(2) syscall are not in the device policies): whether it
/// takes a new file (`PROBE dev-write`, blocked by its read-only remount),
/// what it lists (`PROBE dev-lists: NAMES`, or the error when the jail has
/// no `/dev`), and whether the syscall gives a userfaultfd for kernel-mode
/// faults instead (`PROBE userfaultfd-syscall`: it needs CAP_SYS_PTRACE
/// while vm.unprivileged_userfaultfd is 0, and the jail holds none); first
/// the uid it runs as (`PROBE uid: N`).
pub fn dev() {
    // SAFETY: geteuid cannot fail.
    println!("PROBE uid: {}", unsafe { libc::geteuid() });
    // SAFETY: userfaultfd(2) with integer flags; a returned fd is closed.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    report("userfaultfd-syscall", outcome(fd, "userfaultfd(2) for kernel-mode faults"));
    if fd >= 0 {
        // SAFETY: closing the fd just created.
        unsafe { libc::close(fd as libc::c_int) };
    }
    report(
        "dev-write",
        std::fs::write("/dev/escape-test", b"x").map(|_| "wrote /dev/escape-test".into()).map_err(|e| e.to_string()),
    );
    let listed = match std::fs::read_dir("/dev") {
        Ok(entries) => {
            let mut names: Vec<String> = entries.flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
            names.sort();
            names.join(" ")
        }
        Err(e) => format!("({e})"),
    };
    println!("PROBE dev-lists: {listed}");
}

/// Seccomp-layer probes: each makes one call the block policy forbids.
pub fn seccomp(name: &str) -> Result<(), String> {
    // SAFETY: each is a plain syscall with integer arguments; under the
    // block policy it traps and the process dies by SIGSYS.
    let rc = unsafe {
        match name {
            "socket" => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0).into(),
            "ptrace" => libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0),
            "userns" => libc::unshare(libc::CLONE_NEWUSER).into(),
            other => return Err(format!("unknown probe {other:?} (socket, ptrace, userns)")),
        }
    };
    report(name, outcome(rc, name));
    Ok(())
}
