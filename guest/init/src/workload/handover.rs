//! Handing a workload from the exec agent to PID 1's main thread.
//!
//! A guest booted with `mm.wait` gets its workload from the host on one of
//! the exec agent's session threads, but PID 1's main thread must run it:
//! the workload is PID 1's own job (its process group takes the signals
//! PID 1 forwards, its status ends the machine), and PVM hosts want the
//! guest's work on as few threads as possible (shared/PVM.md).
//!
//! While it waits, the main thread must go on reaping: the agent's and the
//! SSH server's commands run meanwhile, and their exit statuses reach their
//! sessions only through PID 1's reaper (agent/children.rs). So it cannot
//! block on a channel; it sleeps in the reaper's `sigwait`, and the session
//! leaves the workload in the [`Handover`] and rings with SIGCHLD, sent to
//! the waiting thread alone (`tgkill`). SIGCHLD already means "look again"
//! to that loop, so no descriptor and no second way of waking is needed;
//! a doorbell with no workload behind it costs one `waitpid` that finds
//! nothing. Blocked, the signal stays pending until the thread sleeps, so
//! an offer made while it reaps is not missed.
//!
//! The main thread takes the [`Offer`], starts the workload and answers
//! through a channel the session blocks on, so that the host learns whether
//! the workload started. One workload per boot: once taken, whether it
//! then starts or not, every later offer is refused.

use std::io;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Mutex, MutexGuard, PoisonError};

use mm_exec_protocol::Workload;

/// The refusal when nothing waits for a workload: not booted with
/// `mm.wait`, not yet waiting, or already given one.
pub const NOT_WAITING: &str = "not waiting for a workload";

/// The one hand-over of PID 1 (opened by main.rs with `mm.wait`).
pub static HANDOVER: Handover = Handover::new();

/// Where the agent leaves a workload for the waiting thread.
pub struct Handover {
    state: Mutex<State>,
}

enum State {
    /// Nobody waits (yet).
    Closed,
    /// The thread with kernel thread id `waiter` waits.
    Open { waiter: libc::pid_t },
    /// A workload is in; the waiting thread has not taken it yet.
    Offered(Offer),
    /// Taken: there is one workload per boot.
    Taken,
}

/// A workload from the host, and the way to tell its session whether it
/// started.
pub struct Offer {
    pub workload: Workload,
    pub answer: Answer,
}

/// The session's side waits for this, to answer the host.
pub struct Answer(SyncSender<Result<(), String>>);

impl Answer {
    /// `Ok` once the workload runs, or why it could not start (the message
    /// for the host's error frame).
    pub fn send(self, started: Result<(), String>) {
        // The session may be gone (the host hung up): nobody to tell.
        let _ = self.0.send(started);
    }
}

impl Default for Handover {
    fn default() -> Self {
        Handover::new()
    }
}

impl Handover {
    pub const fn new() -> Self {
        Handover { state: Mutex::new(State::Closed) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts taking one workload. The calling thread is the one woken: it
    /// must have SIGCHLD blocked and sleep in `sigwait` (or `sigtimedwait`)
    /// for it, calling [`Self::take`] before each sleep. A hand-over that
    /// was open already, or has had its workload, stays as it is.
    pub fn open(&self) {
        let mut state = self.state();
        if let State::Closed = *state {
            *state = State::Open { waiter: nix::unistd::gettid().as_raw() };
        }
    }

    /// The workload offered since the last look, if any; taking it ends the
    /// hand-over (one workload per boot).
    pub fn take(&self) -> Option<Offer> {
        let mut state = self.state();
        match std::mem::replace(&mut *state, State::Taken) {
            State::Offered(offer) => Some(offer),
            other => {
                *state = other;
                None
            }
        }
    }

    /// The agent's side: leaves `workload` for the waiting thread, wakes
    /// it, and blocks until it has tried to start it: `Ok` once it runs,
    /// else the message for the host's error frame. A workload that can
    /// never start (see [`super::check`]) is refused here, and the thread
    /// keeps waiting for a better one.
    pub fn offer(&self, workload: Workload) -> Result<(), String> {
        let (answer, started) = sync_channel(1);
        {
            let mut state = self.state();
            let State::Open { waiter } = *state else {
                return Err(NOT_WAITING.to_string());
            };
            super::check(&workload)?;
            *state = State::Offered(Offer { workload, answer: Answer(answer) });
            if let Err(e) = ring(waiter) {
                // The waiter is gone (never so for PID 1's main thread):
                // leave things as they were.
                *state = State::Open { waiter };
                return Err(format!("cannot wake PID 1: {e}"));
            }
        }
        started.recv().unwrap_or_else(|_| Err("PID 1 dropped the workload without starting it".to_string()))
    }
}

/// The doorbell: SIGCHLD to thread `waiter` of this process (see the
/// module docs for why a signal).
fn ring(waiter: libc::pid_t) -> io::Result<()> {
    // SAFETY: tgkill(2) takes no pointers; it can only reach a thread of
    // this process (our own pid as the thread group), and SIGCHLD is a
    // signal every thread of mm-init blocks or ignores.
    if unsafe { libc::tgkill(libc::getpid(), waiter, libc::SIGCHLD) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::ops::Deref;
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use nix::sys::signal::{SigSet, Signal};

    use super::*;

    /// Longest a test waits for the doorbell: only a lost ring takes this.
    const RING_TIMEOUT: Duration = Duration::from_secs(20);

    /// A stand-in for PID 1's main thread on a thread of its own: blocks
    /// SIGCHLD, opens `handover`, says so on `opened`, then sleeps until
    /// the doorbell brings an offer, which `then` handles. `None` when no
    /// offer came within [`RING_TIMEOUT`]; it then closes the hand-over,
    /// dropping an offer that came without a ring, so that the offering
    /// side fails instead of waiting for ever.
    pub(crate) fn waiter<T: Send + 'static>(
        handover: impl Deref<Target = Handover> + Send + 'static,
        then: impl FnOnce(Offer) -> T + Send + 'static,
    ) -> JoinHandle<Option<T>> {
        let (opened, is_open) = sync_channel(1);
        let waiter = std::thread::spawn(move || {
            let mut sigchld = SigSet::empty();
            sigchld.add(Signal::SIGCHLD);
            sigchld.thread_block().unwrap();
            handover.open();
            opened.send(()).unwrap();
            let deadline = Instant::now() + RING_TIMEOUT;
            loop {
                if let Some(offer) = handover.take() {
                    return Some(then(offer));
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || !sleep_for_sigchld(&sigchld, left) {
                    *handover.state() = State::Closed;
                    return None;
                }
            }
        });
        is_open.recv().unwrap();
        waiter
    }

    /// `sigtimedwait` for SIGCHLD: false on timeout.
    fn sleep_for_sigchld(set: &SigSet, timeout: Duration) -> bool {
        let timeout = libc::timespec { tv_sec: timeout.as_secs() as _, tv_nsec: timeout.subsec_nanos() as _ };
        // SAFETY: sigtimedwait(2) reads the set and the timeout we pass
        // and writes no siginfo (null).
        let sig = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &timeout) };
        sig == libc::SIGCHLD || io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    }

    #[test]
    fn nobody_waiting_refuses_the_workload() {
        let handover = Handover::new();
        assert_eq!(handover.offer(Workload::new(["true"])), Err(NOT_WAITING.to_string()));
        assert!(handover.take().is_none());
    }

    #[test]
    fn the_doorbell_wakes_the_waiter_and_the_answer_reaches_the_offer() {
        let handover = Arc::new(Handover::new());
        let waiter = waiter(handover.clone(), |offer| {
            let workload = offer.workload.clone();
            offer.answer.send(Ok(()));
            workload
        });
        let workload = Workload::new(["sh", "-c", "exit 3"]).env("A", "b").cwd("/");
        assert_eq!(handover.offer(workload.clone()), Ok(()));
        assert_eq!(waiter.join().unwrap(), Some(workload), "the waiter slept through the doorbell");
        // One per boot.
        assert_eq!(handover.offer(Workload::new(["true"])), Err(NOT_WAITING.to_string()));
        handover.open();
        assert_eq!(handover.offer(Workload::new(["true"])), Err(NOT_WAITING.to_string()));
    }

    #[test]
    fn a_start_failure_reaches_the_offer_and_still_ends_the_handover() {
        let handover = Arc::new(Handover::new());
        let waiter = waiter(handover.clone(), |offer| offer.answer.send(Err("cannot run \"nope\": not found".into())));
        assert_eq!(handover.offer(Workload::new(["nope"])), Err("cannot run \"nope\": not found".into()));
        waiter.join().unwrap().expect("offered");
        assert_eq!(handover.offer(Workload::new(["true"])), Err(NOT_WAITING.to_string()));
    }

    #[test]
    fn an_offer_dropped_unanswered_is_an_error_not_a_hang() {
        let handover = Arc::new(Handover::new());
        let waiter = waiter(handover.clone(), drop);
        let refused = handover.offer(Workload::default()).unwrap_err();
        assert_eq!(refused, "PID 1 dropped the workload without starting it");
        waiter.join().unwrap().expect("offered");
    }

    #[test]
    fn a_malformed_workload_is_refused_and_the_waiter_keeps_waiting() {
        let handover = Arc::new(Handover::new());
        let waiter = waiter(handover.clone(), |offer| {
            let argv = offer.workload.argv.clone();
            offer.answer.send(Ok(()));
            argv
        });
        let refused = |workload: Workload| handover.offer(workload).unwrap_err();
        assert_eq!(refused(Workload::new(["a\0b"])), "an argument contains a NUL byte");
        assert_eq!(refused(Workload::new(["env"]).env("A=B", "c")), "bad environment variable name: \"A=B\"");
        assert_eq!(refused(Workload::new(["env"]).env("", "c")), "bad environment variable name: \"\"");
        assert_eq!(refused(Workload::new(["env"]).env("A", "c\0")), "the environment contains a NUL byte");
        assert!(refused(Workload::new(["pwd"]).cwd("/nonexistent-mm-dir")).starts_with("cannot change directory"));
        assert!(refused(Workload::new(["pwd"]).cwd("/proc/self/status")).ends_with("Not a directory (os error 20)"));
        assert_eq!(handover.offer(Workload::new(["true"])), Ok(()));
        assert_eq!(waiter.join().unwrap(), Some(vec!["true".to_string()]));
    }

    #[test]
    fn a_doorbell_for_a_waiter_that_is_gone_leaves_the_handover_open() {
        let handover = Handover::new();
        // A thread id that is not one of ours: the ring fails.
        *handover.state() = State::Open { waiter: i32::MAX };
        assert!(handover.offer(Workload::new(["true"])).unwrap_err().starts_with("cannot wake PID 1"));
        assert!(matches!(*handover.state(), State::Open { waiter: i32::MAX }));
    }
}
