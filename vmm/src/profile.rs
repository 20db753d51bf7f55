//! A sampling profiler of the guest, for finding where boot time goes.
//!
//! With `--profile-guest PATH`, a thread interrupts vCPU 0 every
//! millisecond with a real-time signal; KVM_RUN returns EINTR, the vCPU
//! thread records the guest RIP, and at exit the histogram is written as
//! `count rip` lines, hottest first (map them with the kernel's System.map).
//! On PVM hosts this shows which guest kernel code the emulator spends its
//! time in, which host-side profilers cannot see.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn ignore(_: libc::c_int) {}

/// Installs a handler that does nothing, so the kick interrupts KVM_RUN
/// (EINTR) instead of killing the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler and empty mask is a
    // well-formed argument; the handler is async-signal-safe (it does nothing).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Samples collected by the vCPU thread.
#[derive(Default)]
pub struct Samples(Mutex<HashMap<u64, u32>>);

impl Samples {
    pub fn record(&self, rip: u64) {
        *self.0.lock().expect("samples lock").entry(rip).or_default() += 1;
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let samples = self.0.lock().expect("samples lock");
        let mut rows: Vec<(u64, u32)> = samples.iter().map(|(rip, n)| (*rip, *n)).collect();
        rows.sort_by_key(|row| std::cmp::Reverse(row.1));
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for (rip, n) in rows {
            writeln!(out, "{n} {rip:#x}")?;
        }
        out.flush()
    }
}

/// Kicks `thread` every `interval` for as long as the process lives.
pub fn start_kicker(thread: libc::pthread_t, interval: Duration) {
    let thread = thread as usize;
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(interval);
            // SAFETY: the vCPU thread lives until the process exits, and
            // the signal has a no-op handler installed.
            if unsafe { libc::pthread_kill(thread as libc::pthread_t, kick_signal()) } != 0 {
                return;
            }
        }
    });
}
