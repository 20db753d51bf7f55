//! Starting an exec's command: pipes or a pseudo-terminal, its user, its
//! directory, its environment.
//!
//! We fork and exec by hand rather than through `std::process::Command`:
//! std waits for a child whose exec failed itself (`waitpid(pid)`), which
//! races with PID 1's `waitpid(-1)` reaper and panics when the reaper wins.
//! The agent runs one thread per connection, so between `fork` and `exec`
//! the child may only make raw system calls: everything it needs (C
//! strings, the `PATH` candidates) is built before the fork.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::sync::Arc;

use mm_exec_protocol::ExecRequest;

use super::children::{ExitNotice, Reaper, spawn_watched};
use super::user::{self, Identity};

/// `PATH` for every exec unless the request sets its own.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The agent's ends of the child's standard streams.
pub enum ChildIo {
    Pipes {
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// The pseudo-terminal's master: input, output (stdout and stderr
    /// merged), resize and the foreground process group.
    Pty {
        master: OwnedFd,
    },
}

/// A started command.
pub struct Child {
    pub pid: i32,
    pub io: ChildIo,
    pub exit: Arc<ExitNotice>,
}

/// Where the child failed before its program ran, reported through the
/// error pipe as `[stage u8][errno i32]`.
#[derive(Clone, Copy)]
#[repr(u8)]
enum Stage {
    Session = 1,
    ControllingTty,
    Stdio,
    Groups,
    Gid,
    Uid,
    Chdir,
    Exec,
}

/// `s` for a system call: refused (naming `what`) when it holds a NUL byte,
/// which would cut it short.
pub(crate) fn cstring(what: &str, s: impl Into<Vec<u8>>) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} contains a NUL byte"))
}

/// Refuses an environment variable name that cannot round-trip through
/// `KEY=VALUE`: empty, or holding `=` (or NUL, which [`cstring`] catches).
pub(crate) fn check_env_name(key: &str) -> Result<(), String> {
    if key.is_empty() || key.contains('=') {
        return Err(format!("bad environment variable name: {key:?}"));
    }
    Ok(())
}

/// `pipe2(O_CLOEXEC)`: (read end, write end). Every fd the agent makes is
/// close-on-exec, so no child inherits another session's streams.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Opens a pseudo-terminal pair of the given size: (master, slave).
pub fn open_pty(rows: u16, cols: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt takes flags only; we own the returned fd.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: grantpt/unlockpt act on the master fd we own.
    if unsafe { libc::grantpt(fd) } != 0 || unsafe { libc::unlockpt(fd) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // TIOCGPTPEER opens the slave from the master itself, with no path
    // lookup in /dev/pts.
    // SAFETY: the ioctl takes open flags as its argument and returns an fd.
    let slave = unsafe { libc::ioctl(fd, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    set_window_size(&master, rows, cols)?;
    Ok((master, slave))
}

/// TIOCSWINSZ on the master; the kernel sends SIGWINCH to the terminal's
/// foreground process group.
pub fn set_window_size(master: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer we pass.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets or replaces `key` in an environment kept as `(key, value)` pairs.
fn set_env(env: &mut Vec<(Vec<u8>, Vec<u8>)>, key: &str, value: &str) {
    match env.iter_mut().find(|(k, _)| k == key.as_bytes()) {
        Some(pair) => pair.1 = value.as_bytes().to_vec(),
        None => env.push((key.as_bytes().to_vec(), value.as_bytes().to_vec())),
    }
}

/// Everything the child needs between fork and exec, ready-made.
struct Plan {
    /// Programs to try in order (the `PATH` search, done like `execvp`).
    candidates: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: CString,
    identity: Option<Identity>,
}

fn plan(req: &ExecRequest) -> Result<Plan, String> {
    let Some(program) = req.argv.first() else {
        return Err("empty command".to_string());
    };
    let identity = match &req.user {
        Some(spec) => {
            let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
            let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
            Some(user::resolve(spec, &passwd, &group)?)
        }
        None => None,
    };
    let home = identity.as_ref().map_or("/root", |id| id.home.as_str());

    // mm-init's own environment first: it carries what the kernel set for
    // every process (on PVM hosts, GLIBC_TUNABLES: see guest/kernel/README.md).
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = std::env::vars_os().map(|(k, v)| (k.into_vec(), v.into_vec())).collect();
    set_env(&mut env, "PATH", DEFAULT_PATH);
    set_env(&mut env, "HOME", home);
    if let Some(name) = identity.as_ref().and_then(|id| id.name.as_deref()) {
        set_env(&mut env, "USER", name);
        set_env(&mut env, "LOGNAME", name);
    }
    if req.tty {
        set_env(&mut env, "TERM", "xterm");
    }
    for (key, value) in &req.env {
        check_env_name(key)?;
        set_env(&mut env, key, value);
    }
    let path = env.iter().find(|(k, _)| k == b"PATH").map(|(_, v)| v.clone()).unwrap_or_default();
    let candidates = if program.contains('/') {
        vec![cstring("the command", program.as_str())?]
    } else if program.is_empty() {
        return Err("no such command: \"\"".to_string());
    } else {
        path.split(|b| *b == b':')
            .map(|dir| {
                let dir = if dir.is_empty() { &b"."[..] } else { dir };
                cstring("the command", [dir, b"/", program.as_bytes()].concat())
            })
            .collect::<Result<_, _>>()?
    };
    let argv = req.argv.iter().map(|a| cstring("an argument", a.as_str())).collect::<Result<_, _>>()?;
    let envp = env
        .into_iter()
        .map(|(k, v)| cstring("the environment", [k, b"=".to_vec(), v].concat()))
        .collect::<Result<_, _>>()?;
    let cwd = match &req.cwd {
        Some(cwd) => cwd.clone(),
        None if std::path::Path::new(home).is_dir() => home.to_string(),
        None => "/".to_string(),
    };
    Ok(Plan { candidates, argv, envp, cwd: cstring("the working directory", cwd)?, identity })
}

/// Starts `req`'s command. The error is the message for the host.
pub fn spawn(req: &ExecRequest, reaper: Reaper) -> Result<Child, String> {
    let plan = plan(req)?;
    let io_err = |what: &str, e: io::Error| format!("cannot {what}: {e}");
    // (child's stdin, stdout, stderr) and the agent's ends.
    let (child_fds, io) = if req.tty {
        let (master, slave) = open_pty(req.rows, req.cols).map_err(|e| io_err("open a pseudo-terminal", e))?;
        ([slave.try_clone(), slave.try_clone(), Ok(slave)], ChildIo::Pty { master })
    } else {
        let (in_r, in_w) = pipe().map_err(|e| io_err("make a pipe", e))?;
        let (out_r, out_w) = pipe().map_err(|e| io_err("make a pipe", e))?;
        let (err_r, err_w) = pipe().map_err(|e| io_err("make a pipe", e))?;
        ([Ok(in_r), Ok(out_w), Ok(err_w)], ChildIo::Pipes { stdin: in_w, stdout: out_r, stderr: err_r })
    };
    let [a, b, c] = child_fds;
    let child_fds = [a, b, c].map(|fd| fd.map_err(|e| io_err("duplicate a descriptor", e)));
    let child_fds: [OwnedFd; 3] = match child_fds {
        [Ok(a), Ok(b), Ok(c)] => [a, b, c],
        [Err(e), _, _] | [_, Err(e), _] | [_, _, Err(e)] => return Err(e),
    };
    let (report_r, report_w) = pipe().map_err(|e| io_err("make a pipe", e))?;

    let argv_ptrs: Vec<*const libc::c_char> =
        plan.argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let envp_ptrs: Vec<*const libc::c_char> =
        plan.envp.iter().map(|e| e.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let raw = [child_fds[0].as_raw_fd(), child_fds[1].as_raw_fd(), child_fds[2].as_raw_fd()];
    let child_plan =
        ChildPlan { plan: &plan, argv: &argv_ptrs, envp: &envp_ptrs, stdio: raw, tty: req.tty, report: &report_w };

    let (pid, (), exit) = spawn_watched(reaper, || {
        // SAFETY: fork(2); in the child, `run_child` makes only raw system
        // calls on data prepared before the fork, and never returns.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => run_child(&child_plan),
            pid => Ok((pid, ())),
        }
    })
    .map_err(|e| io_err("fork", e))?;
    drop(child_fds);
    drop(report_w);

    // The report pipe closes on a successful exec (close-on-exec) or
    // carries where and why the child failed.
    let mut report = [0u8; 5];
    let mut got = 0;
    while got < report.len() {
        // SAFETY: reads into the unfilled tail of our buffer.
        let n = unsafe { libc::read(report_r.as_raw_fd(), report[got..].as_mut_ptr().cast(), report.len() - got) };
        match n {
            0 => break,
            n if n > 0 => got += n as usize,
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => break,
        }
    }
    if got == report.len() {
        // The child has exited: its status reaches `exit`, unread.
        let err = io::Error::from_raw_os_error(i32::from_ne_bytes([report[1], report[2], report[3], report[4]]));
        let program = &req.argv[0];
        let cwd = plan.cwd.to_string_lossy();
        return Err(match report[0] {
            s if s == Stage::Exec as u8 => match err.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENOTDIR) => format!("no such command: {program}"),
                Some(libc::EACCES) => format!("permission denied: {program}"),
                _ => format!("cannot run {program}: {err}"),
            },
            s if s == Stage::Chdir as u8 => format!("cannot change directory to {cwd}: {err}"),
            s if s == Stage::Uid as u8 || s == Stage::Gid as u8 || s == Stage::Groups as u8 => {
                format!("cannot switch to user {}: {err}", req.user.as_deref().unwrap_or("root"))
            }
            _ => format!("cannot set up the command's terminal or streams: {err}"),
        });
    }
    for fd in match &io {
        ChildIo::Pipes { stdin, stdout, stderr } => vec![stdin, stdout, stderr],
        ChildIo::Pty { master } => vec![master],
    } {
        set_nonblocking(fd).map_err(|e| io_err("set up the streams", e))?;
    }
    Ok(Child { pid, io, exit })
}

pub fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

struct ChildPlan<'a> {
    plan: &'a Plan,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    stdio: [RawFd; 3],
    tty: bool,
    report: &'a OwnedFd,
}

/// The child between fork and exec. Raw system calls only: another thread
/// of the agent may have held the allocator's lock at the fork.
fn run_child(p: &ChildPlan) -> ! {
    let fail = |stage: Stage| -> ! {
        // SAFETY: errno location, a stack buffer, write(2) and _exit(2)
        // are all async-signal-safe.
        unsafe {
            let errno = *libc::__errno_location();
            let mut msg = [stage as u8, 0, 0, 0, 0];
            msg[1..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(p.report.as_raw_fd(), msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    };
    // SAFETY: each call below is a plain system call on values prepared
    // before the fork; pointers come from live CStrings and arrays.
    unsafe {
        // Start clean: PID 1 blocks the signals it waits for, and Rust's
        // runtime ignores SIGPIPE; both would be inherited through exec.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        // Its own session and process group: signals can reach the whole
        // job, and a tty can become its controlling terminal.
        if libc::setsid() < 0 {
            fail(Stage::Session);
        }
        if p.tty && libc::ioctl(p.stdio[0], libc::TIOCSCTTY, 0) < 0 {
            fail(Stage::ControllingTty);
        }
        for (target, fd) in p.stdio.iter().enumerate() {
            if libc::dup2(*fd, target as RawFd) < 0 {
                fail(Stage::Stdio);
            }
        }
        if let Some(id) = &p.plan.identity {
            // Raw system calls: glibc's wrappers would try to synchronise
            // with threads that do not exist in this child.
            if libc::syscall(libc::SYS_setgroups, id.groups.len(), id.groups.as_ptr()) < 0 {
                fail(Stage::Groups);
            }
            if libc::syscall(libc::SYS_setgid, id.gid) < 0 {
                fail(Stage::Gid);
            }
            if libc::syscall(libc::SYS_setuid, id.uid) < 0 {
                fail(Stage::Uid);
            }
        }
        if libc::chdir(p.plan.cwd.as_ptr()) < 0 {
            fail(Stage::Chdir);
        }
        // Like execvp: try each PATH entry; report EACCES if some entry
        // had the program but could not run it, else the last error.
        let mut saw_eacces = false;
        for candidate in &p.plan.candidates {
            libc::execve(candidate.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr());
            let errno = *libc::__errno_location();
            if errno == libc::EACCES {
                saw_eacces = true;
            } else if errno != libc::ENOENT && errno != libc::ENOTDIR {
                fail(Stage::Exec);
            }
        }
        if saw_eacces {
            *libc::__errno_location() = libc::EACCES;
        }
        fail(Stage::Exec)
    }
}
