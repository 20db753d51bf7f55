//! PID 1 duties: wait for the workload (and, with `mm.wait`, for the host to
//! hand it over) while reaping every orphan, forward termination signals,
//! and take the machine down when the workload ends.

use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::bootdev::BootDevice;
use crate::workload::handover::{Handover, Offer};

/// Signals PID 1 handles synchronously: children ending, and the ones it
/// passes on to the workload.
const FORWARDED: [Signal; 6] =
    [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2];

/// Blocks the signals we wait for with `sigwait`, so none is lost between
/// spawning the workload and waiting for it.
pub fn block_signals() -> nix::Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    for sig in FORWARDED {
        set.add(sig);
    }
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    Ok(set)
}

/// Shell-style exit status of a finished process.
fn shell_status(status: WaitStatus) -> Option<u32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code as u32 & 0xff),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as u32),
        _ => None,
    }
}

/// Reaps every child that has ended, handing the exec agent's children's
/// statuses to their sessions: the shell-style status of `workload`, if it
/// was among them.
fn reap_ended(workload: Option<Pid>) -> Option<u32> {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return None,
            Ok(status) => {
                if workload.is_some() && status.pid() == workload {
                    if let Some(code) = shell_status(status) {
                        return Some(code);
                    }
                } else {
                    // The exec agent's commands: their sessions wait
                    // for these statuses (agent/children.rs).
                    crate::agent::children::deliver(status);
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return None, // ECHILD: nothing left to reap
        }
    }
}

/// Waits until `workload` ends, reaping any other child on the way and
/// forwarding the signals PID 1 gets to the workload's process group.
pub fn wait_for(workload: i32, signals: &SigSet) -> u32 {
    let workload = Pid::from_raw(workload);
    loop {
        // Reap everything that has already ended before sleeping again:
        // one SIGCHLD may stand for many children.
        if let Some(code) = reap_ended(Some(workload)) {
            return code;
        }
        match signals.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                // Forward to the workload's whole process group.
                let _ = kill(Pid::from_raw(-workload.as_raw()), sig);
            }
        }
    }
}

/// Waits, reaping as [`wait_for`] does, until the exec agent hands over a
/// workload through `handover` (opened on this thread: its doorbell is a
/// SIGCHLD, see workload/handover.rs), or until a signal PID 1 would
/// forward to a workload arrives, which has no workload to go to: `Err`.
pub fn wait_for_handover(handover: &Handover, signals: &SigSet) -> Result<Offer, Signal> {
    loop {
        reap_ended(None);
        // After reaping and before sleeping: a ring from now on stays
        // pending (SIGCHLD is blocked), so the sleep ends at once.
        if let Some(offer) = handover.take() {
            return Ok(offer);
        }
        match signals.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => return Err(sig),
        }
    }
}

/// Reports `status`, ends every other process, flushes filesystems and
/// resets the machine, which is how mm-vmm learns the guest is done.
pub fn power_off(boot_device: Option<&BootDevice>, status: u32) -> ! {
    if let Some(dev) = boot_device {
        dev.report_exit_status(status);
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    // reboot(2) only returns on failure; PID 1 must never exit.
    loop {
        std::thread::park();
    }
}
