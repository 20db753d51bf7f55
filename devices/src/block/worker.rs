//! The data-path thread: waits on every running ring's kick eventfd and on
//! an exit eventfd, and drains rings as they are kicked. It owns the rings
//! while it runs, so the data path takes no locks; the request handler
//! stops it (exit eventfd, join) to get them back before any change.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::BlockStats;
use super::execute::BlockDisk;
use super::memory::GuestMem;
use super::vring::{Flow, Hooks, Vring};

const EXIT_TOKEN: u64 = u64::MAX;
/// The rate limiter's limits changed: rings parked on it retry at once.
const LIMIT_TOKEN: u64 = u64::MAX - 1;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot set up the worker's epoll: {0}")]
    Epoll(std::io::Error),
    #[error("cannot spawn the worker thread: {0}")]
    Spawn(std::io::Error),
    #[error("the worker thread panicked; its rings are lost")]
    Panicked,
}

/// What the worker needs besides the rings.
pub struct WorkerContext {
    pub mem: Arc<GuestMem>,
    pub disk: Arc<BlockDisk>,
    pub indirect: bool,
    /// Per ring: started and enabled, so the worker may touch it.
    pub runnable: Vec<bool>,
    pub hooks: Hooks,
    pub stats: Arc<BlockStats>,
}

pub struct Worker {
    exit: EventFd,
    handle: JoinHandle<Vec<Vring>>,
}

impl Worker {
    /// Starts a worker that owns `vrings` until [`Worker::stop`].
    pub fn spawn(mut vrings: Vec<Vring>, ctx: WorkerContext) -> Result<Worker, (Vec<Vring>, WorkerError)> {
        let setup = || -> Result<(Epoll, EventFd), WorkerError> {
            let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
            let exit = EventFd::new(EFD_NONBLOCK).map_err(WorkerError::Epoll)?;
            let add = |fd, token| {
                epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token)).map_err(WorkerError::Epoll)
            };
            add(exit.as_raw_fd(), EXIT_TOKEN)?;
            if let Some(changed) = ctx.stats.limiter.changed() {
                add(changed.as_raw_fd(), LIMIT_TOKEN)?;
            }
            for (index, vring) in vrings.iter().enumerate() {
                if let (true, Some(kick)) = (ctx.runnable[index], &vring.kick) {
                    add(kick.as_raw_fd(), index as u64)?;
                }
            }
            Ok((epoll, exit))
        };
        let (epoll, exit) = match setup() {
            Ok(v) => v,
            Err(e) => return Err((vrings, e)),
        };
        let thread_exit = match exit.try_clone() {
            Ok(fd) => fd,
            Err(e) => return Err((vrings, WorkerError::Epoll(e))),
        };
        // Spawning can fail only for lack of resources; the closure owns the
        // rings then, so keep them in a slot we can take back.
        let slot = Arc::new(std::sync::Mutex::new(Some(std::mem::take(&mut vrings))));
        let thread_slot = Arc::clone(&slot);
        let spawned = std::thread::Builder::new().name("block-worker".into()).spawn(move || {
            let vrings = thread_slot.lock().map(|mut s| s.take().unwrap_or_default()).unwrap_or_default();
            run(epoll, thread_exit, vrings, ctx)
        });
        match spawned {
            Ok(handle) => Ok(Worker { exit, handle }),
            Err(e) => {
                let vrings = slot.lock().map(|mut s| s.take().unwrap_or_default()).unwrap_or_default();
                Err((vrings, WorkerError::Spawn(e)))
            }
        }
    }

    /// Stops the worker after the request it is running, if any, and
    /// returns the rings.
    pub fn stop(self) -> Result<Vec<Vring>, WorkerError> {
        let _ = self.exit.write(1);
        self.handle.join().map_err(|_| WorkerError::Panicked)
    }
}

/// Drains one ring; a ring the rate limiter holds back gets a deadline to
/// be drained again at (kicks before it only wake us). True if a test
/// hook "killed" the worker.
fn step(vring: &mut Vring, ctx: &WorkerContext, deadline: &mut Option<Instant>) -> bool {
    *deadline = None;
    match vring.process(ctx) {
        Flow::Continue => false,
        Flow::Throttled(wait) => {
            *deadline = Some(Instant::now() + wait);
            false
        }
        Flow::Crashed => true,
    }
}

/// epoll's timeout until the earliest deadline: whole milliseconds,
/// rounded up (waking late costs nothing: the bucket keeps filling).
fn timeout_ms(deadlines: &[Option<Instant>]) -> i32 {
    match deadlines.iter().flatten().min() {
        None => -1,
        Some(deadline) => {
            let wait = deadline.saturating_duration_since(Instant::now());
            i32::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
        }
    }
}

fn run(epoll: Epoll, exit: EventFd, mut vrings: Vec<Vring>, ctx: WorkerContext) -> Vec<Vring> {
    let mut deadlines: Vec<Option<Instant>> = vec![None; vrings.len()];
    // Buffers may have been queued while no worker ran (a restart, or a
    // kick that arrived between workers): drain every ring once up front.
    for index in 0..vrings.len() {
        if ctx.runnable[index] && step(&mut vrings[index], &ctx, &mut deadlines[index]) {
            return frozen(exit, vrings);
        }
    }
    let mut events = vec![EpollEvent::default(); vrings.len() + 2];
    loop {
        let n = match epoll.wait(timeout_ms(&deadlines), &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("block: worker epoll failed: {e}");
                // Without epoll we cannot serve; wait for the handler to stop us.
                return frozen(exit, vrings);
            }
        };
        for event in &events[..n] {
            let token = event.data();
            if token == EXIT_TOKEN {
                return vrings;
            }
            if token == LIMIT_TOKEN {
                if let Some(changed) = ctx.stats.limiter.changed() {
                    let _ = changed.read();
                }
                for deadline in deadlines.iter_mut().filter(|d| d.is_some()) {
                    *deadline = Some(Instant::now());
                }
                continue;
            }
            let index = token as usize;
            let Some(vring) = vrings.get_mut(index) else { continue };
            if let Some(kick) = &vring.kick {
                drain(kick);
            }
            // Throttled: the new request waits behind the held one.
            if deadlines[index].is_some() {
                continue;
            }
            if step(vring, &ctx, &mut deadlines[index]) {
                return frozen(exit, vrings);
            }
        }
        let now = Instant::now();
        for index in 0..vrings.len() {
            if deadlines[index].is_some_and(|d| d <= now) && step(&mut vrings[index], &ctx, &mut deadlines[index]) {
                return frozen(exit, vrings);
            }
        }
    }
}

/// Consumes a kick eventfd's counter (it is readable, so this does not block).
fn drain(kick: &File) {
    let mut buf = [0u8; 8];
    let _ = (&*kick).read(&mut buf);
}

/// Does nothing more until told to exit: what a killed process would do.
fn frozen(exit: EventFd, vrings: Vec<Vring>) -> Vec<Vring> {
    let mut pfd = libc::pollfd { fd: exit.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: pfd is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, -1) };
        if n > 0 {
            return vrings;
        }
    }
}
