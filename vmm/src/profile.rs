//! A sampling profiler of the guest, for finding where boot time goes.
//!
//! With `--profile-guest PATH`, a thread interrupts vCPU 0 every
//! millisecond with the vCPU kick signal (`vcpu::control`); KVM_RUN returns EINTR, the vCPU
//! thread records the guest RIP, and at exit the histogram is written as
//! `count rip` lines, hottest first (map them with the kernel's System.map).
//! On PVM hosts this shows which guest kernel code the emulator spends its
//! time in, which host-side profilers cannot see.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

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
            if !crate::vcpu::control::kick(thread as libc::pthread_t) {
                return;
            }
        }
    });
}
