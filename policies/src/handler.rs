//! The SIGSYS handler: everything here runs in signal context, so it only
//! reads atomics and a const-initialised thread-local, formats into a stack
//! buffer and calls `write` and `syscall` (async-signal-safe).
//!
//! It reports, then re-issues the very syscall that trapped, with the same
//! arguments: the filter traps it again, and because the handler was
//! installed with SA_RESETHAND the kernel now delivers SIGSYS with its
//! default action and the process dies by SIGSYS. A plain `raise` would not
//! do: the jailed process is PID 1 of its PID namespace, which ignores
//! signals it has no handler for unless the kernel forces them, and a
//! seccomp trap is forced.

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::{Policy, Report};

static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

thread_local! {
    /// The policy installed on this thread, for the report.
    static THREAD_POLICY: Cell<u8> = const { Cell::new(u8::MAX) };
}

pub(crate) fn set_report_fd(fd: i32) {
    REPORT_FD.store(fd, Ordering::SeqCst);
}

pub(crate) fn set_thread_policy(policy: Policy) {
    THREAD_POLICY.with(|p| p.set(policy as u8));
}

/// Offset of `si_syscall` in `siginfo_t` on x86_64 (after signo, errno,
/// code, padding and `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

pub(crate) fn install() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with our handler, SA_SIGINFO and an empty
    // mask is well-formed; the handler is async-signal-safe (module docs).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A fixed-capacity line buffer, so the message needs no allocation.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn number(&mut self, mut n: u32) {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS with SA_SIGINFO;
    // for SYS_SECCOMP its `_sigsys` member holds the syscall number at this
    // offset.
    let nr = unsafe { info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>().read_unaligned() };
    let policy = THREAD_POLICY.try_with(|p| p.get()).unwrap_or(u8::MAX);
    let report = Report { syscall: nr, policy: Policy::from_index(policy) };

    let fd = REPORT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let bytes = report.encode();
        // SAFETY: write(2) from a buffer on our stack.
        unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    }
    let mut line = Line { buf: [0; 160], len: 0 };
    line.push(b"seccomp: forbidden syscall ");
    line.push(report.name().as_bytes());
    line.push(b" (");
    line.number(nr as u32);
    line.push(b") on a thread with policy ");
    line.push(report.policy.map_or("none", |p| p.name()).as_bytes());
    line.push(b": killing the process\n");
    // SAFETY: write(2) to stderr from a buffer on our stack.
    unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len) };

    // SAFETY: the context is the ucontext_t the kernel built for this
    // signal; re-issuing the trapped syscall with its own arguments traps
    // again (same filter, same arguments), which now kills (module docs).
    unsafe {
        let gregs = &(*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
        let arg = |r: libc::c_int| gregs[r as usize];
        libc::syscall(
            libc::c_long::from(nr),
            arg(libc::REG_RDI),
            arg(libc::REG_RSI),
            arg(libc::REG_RDX),
            arg(libc::REG_R10),
            arg(libc::REG_R8),
            arg(libc::REG_R9),
        );
        // Not reached; if it were, still never return into the code that
        // made the forbidden call.
        libc::syscall(libc::SYS_exit_group, 128 + libc::SIGSYS);
    }
}
