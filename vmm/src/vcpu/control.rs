//! How the VMM drives a running vCPU thread: events in (pause, save state,
//! resume), responses out, through one [`VcpuHandle`] per vCPU, in the
//! manner of Firecracker's `VcpuEvent`/`VcpuHandle` and crosvm's
//! `VcpuControl`.
//!
//! A vCPU thread spends its life inside KVM_RUN, so an event alone would
//! wait for the guest's next exit, which may never come (an idle vCPU halts
//! inside the kernel). The handle therefore also kicks the thread with a
//! real-time signal whose handler sets that thread's
//! `kvm_run.immediate_exit`: KVM_RUN returns EINTR at once, or at its next
//! entry if the signal lands while the thread is in user space handling an
//! exit. Re-entering also lets KVM finish an MMIO or port exit in progress
//! before it returns, so a paused vCPU's registers are consistent (the KVM
//! API's rule for saving state). Kicks repeat until the thread answers, so
//! a kick that lands before the thread registered its `kvm_run` is not lost.

use std::cell::Cell;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;

use super::VcpuError;
use super::state::VcpuState;

/// What the VMM asks of a vCPU thread.
#[derive(Debug)]
pub enum VcpuEvent {
    /// Leave KVM_RUN and wait for the next event.
    Pause,
    /// (Paused only) read the vCPU's whole state.
    SaveState,
    /// Run the guest again.
    Resume,
}

/// What a vCPU thread answers, one response per event.
#[derive(Debug)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    State(Box<VcpuState>),
    Error(VcpuError),
}

thread_local! {
    /// This thread's `kvm_run` mapping, for the kick handler. Const
    /// initialised and without a destructor, so reading it from a signal
    /// handler touches no lazy initialisation.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU out of KVM_RUN (also the guest profiler's).
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, which
        // lives as long as the VcpuFd the thread owns; a single byte store
        // is async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

/// Installs the kick handler (process-wide, once, before vCPU threads run).
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler and an empty mask is
    // well formed; the handler only does a byte store (see `on_kick`).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_kick as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Called on the vCPU thread before its first KVM_RUN.
pub(super) fn register_kvm_run(run: *mut kvm_run) {
    KVM_RUN.with(|cell| cell.set(run));
}

/// Sends `thread` the kick signal.
pub fn kick(thread: libc::pthread_t) -> bool {
    // SAFETY: the handle's thread is alive while its handle exists (it only
    // ends when the VM stops, and then the process exits), and the signal
    // has a handler installed.
    unsafe { libc::pthread_kill(thread, kick_signal()) == 0 }
}

/// How often an unanswered kick is repeated.
const KICK_INTERVAL: Duration = Duration::from_millis(5);
/// How long a vCPU may take to answer: saving state is a few dozen ioctls.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The VMM's end of one vCPU thread.
pub struct VcpuHandle {
    pub index: u8,
    pub thread: libc::pthread_t,
    pub events: Sender<VcpuEvent>,
    pub responses: Receiver<VcpuResponse>,
}

/// The vCPU thread's end: the events it serves and where it answers.
pub struct VcpuChannel {
    pub events: Receiver<VcpuEvent>,
    pub responses: Sender<VcpuResponse>,
}

impl VcpuHandle {
    fn request(&self, event: VcpuEvent, kick_until_answered: bool) -> Result<VcpuResponse, VcpuError> {
        let cpu = self.index;
        self.events.send(event).map_err(|_| VcpuError::Gone { cpu })?;
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            if kick_until_answered {
                kick(self.thread);
            }
            match self.responses.recv_timeout(KICK_INTERVAL) {
                Ok(VcpuResponse::Error(e)) => return Err(e),
                Ok(response) => return Ok(response),
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => continue,
                Err(RecvTimeoutError::Timeout) => return Err(VcpuError::NotAnswering { cpu }),
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::Gone { cpu }),
            }
        }
    }

    /// Takes the vCPU out of KVM_RUN; returns once it waits for events.
    pub fn pause(&self) -> Result<(), VcpuError> {
        match self.request(VcpuEvent::Pause, true)? {
            VcpuResponse::Paused => Ok(()),
            other => Err(VcpuError::Unanswered { cpu: self.index, answer: format!("{other:?}") }),
        }
    }

    /// The whole state of a paused vCPU.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        match self.request(VcpuEvent::SaveState, false)? {
            VcpuResponse::State(state) => Ok(*state),
            other => Err(VcpuError::Unanswered { cpu: self.index, answer: format!("{other:?}") }),
        }
    }

    pub fn resume(&self) -> Result<(), VcpuError> {
        match self.request(VcpuEvent::Resume, true)? {
            VcpuResponse::Resumed => Ok(()),
            other => Err(VcpuError::Unanswered { cpu: self.index, answer: format!("{other:?}") }),
        }
    }
}

/// A connected handle and channel for vCPU `index`, whose thread is not
/// started yet (`thread` is filled in once it is).
pub fn channel(index: u8) -> (VcpuHandle, VcpuChannel) {
    let (events_tx, events_rx) = std::sync::mpsc::channel();
    let (responses_tx, responses_rx) = std::sync::mpsc::channel();
    (
        VcpuHandle { index, thread: 0, events: events_tx, responses: responses_rx },
        VcpuChannel { events: events_rx, responses: responses_tx },
    )
}
