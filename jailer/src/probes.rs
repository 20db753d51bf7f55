//! Escape attempts, run from inside a jailed process by the tests (through
//! the hidden `mm-device block --test-escape` flag). Each prints one line,
//! `PROBE <name> blocked: <why>` or `PROBE <name> ESCAPED: <what worked>`,
//! so a test can check every layer separately.
//!
//! [`jail`] tries what the jail alone must stop. Creating sockets, ptrace
//! and new user namespaces are stopped by the seccomp layer, so they are
//! separate probes that a test runs with the filter on and expects to end
//! in SIGSYS.

use std::ffi::CString;
use std::io::Error;
use std::path::Path;

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

/// What the jail alone must stop; `other_disk` is a host file the jail does
/// not hold (another microVM's disk).
pub fn jail(other_disk: &Path) {
    report(
        "open-other-disk",
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(other_disk)
            .map(|_| format!("opened {}", other_disk.display()))
            .map_err(|e| format!("{}: {e}", other_disk.display())),
    );
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
    let proc_dir = CString::new("/proc").expect("no NUL");
    // SAFETY: mount(2) with valid C strings.
    let rc = unsafe { libc::mount(c"proc".as_ptr(), proc_dir.as_ptr(), c"proc".as_ptr(), 0, std::ptr::null()) };
    report("mount-proc", outcome(rc.into(), "mount proc"));
    for path in ["/escape-test", "/tmp/escape-test", "/lib/escape-test"] {
        report(
            "write-outside-root",
            std::fs::write(path, b"x").map(|_| format!("wrote {path}")).map_err(|e| format!("{path}: {e}")),
        );
    }
    if let Some(dir) = other_disk.parent() {
        let path = dir.join("escape-test");
        report(
            "write-beside-disk",
            std::fs::write(&path, b"x").map(|_| format!("wrote {}", path.display())).map_err(|e| e.to_string()),
        );
    }
    // SAFETY: chroot(2) with a valid C string.
    report("chroot", outcome(unsafe { libc::chroot(c"/".as_ptr()) }.into(), "chroot"));
    // SAFETY: ptrace(2) attach to PID 1 (ourselves in this namespace) and
    // to the host's init by its host pid, which this namespace cannot name.
    let rc = unsafe { libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0) };
    report("ptrace-attach", outcome(rc, "ptrace(PTRACE_ATTACH, 1)"));
    capabilities();
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
    // SAFETY: capget fills the two data structs we own.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()) };
    let any = data.iter().any(|d| d.effective | d.permitted | d.inheritable != 0);
    report(
        "capabilities-held",
        if rc == 0 && any {
            Ok(format!("capget shows {:x?}", data.map(|d| d.permitted)))
        } else {
            Err("none held".into())
        },
    );
    let all = [Data { effective: u32::MAX, permitted: u32::MAX, inheritable: 0 }; 2];
    // SAFETY: capset reads the structs we own.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, all.as_ptr()) };
    report("capset-raise", outcome(rc, "capset(all)"));
    // SAFETY: prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, 21, 0, 0) };
    report("ambient-raise", outcome(rc.into(), "PR_CAP_AMBIENT_RAISE CAP_SYS_ADMIN"));
    // SAFETY: setresuid with integer arguments; it fails without CAP_SETUID
    // (and uid 0 with SECBIT_NOROOT grants nothing either).
    let rc = unsafe { libc::setresuid(0, 0, 0) };
    let uid_after = unsafe { libc::geteuid() };
    report(
        "setuid-root",
        if rc == 0 && uid_after == 0 {
            capabilities_after_setuid()
        } else {
            Err(format!("setresuid(0): {}", Error::last_os_error()))
        },
    );
}

/// Even as uid 0 (a jail run as root), no capability may come back.
fn capabilities_after_setuid() -> Result<String, String> {
    // SAFETY: prctl(PR_CAPBSET_READ) only reads.
    let bounding = (0..=40).filter(|cap| unsafe { libc::prctl(libc::PR_CAPBSET_READ, *cap, 0, 0, 0) } == 1).count();
    // SAFETY: prctl(PR_SET_KEEPCAPS / securebits read) only reads here.
    let securebits = unsafe { libc::prctl(libc::PR_GET_SECUREBITS, 0, 0, 0, 0) };
    if bounding == 0 && securebits & 1 != 0 {
        Err(format!("uid is 0 but the bounding set is empty and SECBIT_NOROOT is set (securebits {securebits:#x})"))
    } else {
        Ok(format!("uid 0 with {bounding} capabilities in the bounding set"))
    }
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
