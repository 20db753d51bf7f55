//! One virtqueue of the block device: what the front end configured, the
//! `virtio_queue::Queue` built from it, and draining it. The worker thread
//! owns every `Vring` while it runs; the request handler gets them back
//! (by stopping the worker) before changing anything.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use crate::rearm::Rearm;
use vm_memory::{Address, Bytes, GuestAddress};

use super::chain::DescTable;
use super::config::MAX_QUEUE_SIZE;
use super::execute::{process_chain, request_bytes};
use super::inflight::QueueInflight;
use super::memory::{GuestMem, MemoryTable};
use super::worker::WorkerContext;

/// Ring addresses as the front end sent them (its virtual addresses).
#[derive(Debug, Clone, Copy)]
pub struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VringError {
    #[error("ring address {0:#x} is not in any memory region")]
    Untranslatable(u64),
    #[error("queue size {0} is not a power of two up to {MAX_QUEUE_SIZE}")]
    BadSize(u16),
    #[error("ring does not fit in guest memory")]
    Invalid,
    #[error("cannot read the used index: {0}")]
    UsedIndex(vm_memory::GuestMemoryError),
}

#[derive(Debug)]
pub struct Vring {
    pub queue: Queue,
    pub size: u16,
    pub addrs: Option<RingAddrs>,
    /// SET_VRING_BASE: the avail index to resume at.
    pub base: u16,
    pub kick: Option<File>,
    pub call: Option<File>,
    /// SET_VRING_ENABLE state (meaningful with VHOST_USER_F_PROTOCOL_FEATURES).
    pub enabled: bool,
    /// Started: has a kick fd and resolved addresses; stopped by GET_VRING_BASE.
    pub started: bool,
    pub inflight: Option<QueueInflight>,
    /// Requests a killed predecessor left in flight, oldest first.
    pub resubmit: VecDeque<u16>,
    /// The request at the front is waiting for the rate limiter (counted
    /// once, however many times it is retried).
    waiting: bool,
}

impl Vring {
    pub fn new() -> Self {
        Vring {
            // MAX_QUEUE_SIZE is a nonzero power of two, which is all new() checks.
            queue: Queue::new(MAX_QUEUE_SIZE).unwrap_or_default(),
            size: 0,
            addrs: None,
            base: 0,
            kick: None,
            call: None,
            enabled: false,
            started: false,
            inflight: None,
            resubmit: VecDeque::new(),
            waiting: false,
        }
    }

    /// Points the queue at the rings, translated through `memory`.
    pub fn resolve(&mut self, memory: &MemoryTable, event_idx: bool) -> Result<(), VringError> {
        let addrs = self.addrs.ok_or(VringError::Invalid)?;
        let gpa = |va: u64| memory.va_to_guest(va).ok_or(VringError::Untranslatable(va));
        let (desc, avail, used) = (gpa(addrs.desc)?, gpa(addrs.avail)?, gpa(addrs.used)?);
        self.queue.try_set_size(self.size).map_err(|_| VringError::BadSize(self.size))?;
        self.queue.try_set_desc_table_address(desc).map_err(|_| VringError::Invalid)?;
        self.queue.try_set_avail_ring_address(avail).map_err(|_| VringError::Invalid)?;
        self.queue.try_set_used_ring_address(used).map_err(|_| VringError::Invalid)?;
        self.queue.set_event_idx(event_idx);
        self.queue.set_ready(true);
        if !self.queue.is_valid(&*memory.mem) {
            self.queue.set_ready(false);
            return Err(VringError::Invalid);
        }
        Ok(())
    }

    /// Starts the ring: resume at SET_VRING_BASE's index, or, when a table
    /// says requests were in flight, at used index + their number, with
    /// them queued for resubmission.
    pub fn start(&mut self, memory: &MemoryTable, event_idx: bool) -> Result<(), VringError> {
        self.resolve(memory, event_idx)?;
        let used_addr = GuestAddress(self.queue.used_ring()).checked_add(2).ok_or(VringError::Invalid)?;
        let used_idx =
            memory.mem.load::<u16>(used_addr, Ordering::Acquire).map(u16::from_le).map_err(VringError::UsedIndex)?;
        self.queue.set_next_used(used_idx);
        self.queue.set_next_avail(self.base);
        self.resubmit.clear();
        if let Some(inflight) = &mut self.inflight {
            let avail_idx = memory
                .mem
                .load::<u16>(GuestAddress(self.queue.avail_ring()).unchecked_add(2), Ordering::Acquire)
                .unwrap_or(0);
            tracing::debug!(used_idx, avail_idx, base = self.base, "block: trace: start, table {}", inflight.dump());
            let recovery = inflight.recover(used_idx);
            tracing::debug!(?recovery, "block: trace: recovery");
            if !recovery.resubmit.is_empty() || recovery.next_avail != self.base {
                tracing::info!(
                    resubmit = recovery.resubmit.len(),
                    next_avail = recovery.next_avail,
                    "block: resuming after a restart",
                );
            }
            self.queue.set_next_avail(recovery.next_avail);
            self.resubmit = recovery.resubmit.into();
        }
        self.started = true;
        Ok(())
    }

    /// Stops the ring (GET_VRING_BASE) and returns the avail index to
    /// resume at.
    pub fn stop(&mut self) -> u16 {
        let next = self.queue.next_avail();
        self.started = false;
        self.kick = None;
        self.queue.set_ready(false);
        self.base = next;
        next
    }

    fn signal(&self) {
        if let Some(mut call) = self.call.as_ref()
            && let Err(e) = call.write(&1u64.to_ne_bytes())
        {
            tracing::warn!("block: cannot signal the call eventfd: {e}");
        }
    }

    fn complete(&mut self, mem: &GuestMem, head: u16, len: u32) {
        if let Some(inflight) = &self.inflight {
            inflight.pre_put(head);
        }
        if let Err(e) = self.queue.add_used(mem, head, len) {
            tracing::warn!(head, "block: cannot publish a used element: {e}");
            return;
        }
        if let Some(inflight) = &self.inflight {
            inflight.post_put(head, self.queue.next_used());
        }
        tracing::debug!(head, len, next_used = self.queue.next_used(), "block: trace: done");
    }

    /// Publishes a request's completion (where a test may simulate a kill
    /// between publishing and clearing its in-flight mark).
    fn publish(&mut self, mem: &GuestMem, head: u16, len: u32, hooks: &Hooks) -> Flow {
        if hooks.crash_at(CrashPoint::Published) {
            if let Some(inflight) = &self.inflight {
                inflight.pre_put(head);
            }
            let _ = self.queue.add_used(mem, head, len);
            hooks.crash_now(CrashPoint::Published);
            return Flow::Crashed;
        }
        self.complete(mem, head, len);
        hooks.count();
        Flow::Continue
    }

    /// Asks the rate limiter for the request at `head`: Err(how long to
    /// wait) if it must wait, counting each waiting request once.
    fn admit(&mut self, ctx: &WorkerContext, table: DescTable, head: u16) -> Result<(), Duration> {
        let limiter = &ctx.stats.limiter;
        if !limiter.limited() {
            return Ok(());
        }
        match limiter.try_take(request_bytes(&ctx.mem, table, head, &ctx.disk), 1) {
            Ok(()) => {
                self.waiting = false;
                Ok(())
            }
            Err(wait) => {
                if !self.waiting {
                    self.waiting = true;
                    limiter.count_throttled();
                }
                Err(wait)
            }
        }
    }

    /// Runs everything the ring holds: leftovers of a predecessor first,
    /// then the avail ring until it is empty (re-checking after re-enabling
    /// notifications, with EVENT_IDX), then signals the driver once.
    ///
    /// A request the rate limiter holds back is left where it was (a
    /// predecessor's at the front of `resubmit`, a new one in the avail
    /// ring: popped, costed, and the position moved back) and the ring
    /// returns [`Flow::Throttled`]; the worker calls again after the wait,
    /// and requests go on in order. Nothing waiting is in flight, so a
    /// kill mid-wait leaves it for the successor like any unread request.
    pub fn process(&mut self, ctx: &WorkerContext) -> Flow {
        let (mem, disk, hooks) = (&*ctx.mem, &*ctx.disk, &ctx.hooks);
        let table =
            DescTable { addr: GuestAddress(self.queue.desc_table()), queue_size: self.size, indirect: ctx.indirect };
        let mut completed = 0usize;
        let mut throttled = None;
        while let Some(&head) = self.resubmit.front() {
            if let Err(wait) = self.admit(ctx, table, head) {
                throttled = Some(wait);
                break;
            }
            self.resubmit.pop_front();
            tracing::debug!(head, "block: trace: resubmit");
            ctx.stats.taken();
            let len = process_chain(mem, table, head, disk);
            self.complete(mem, head, len);
            ctx.stats.completed();
            ctx.stats.count_resubmitted();
            completed += 1;
        }
        // Test hook (out of order): requests run as they come but are
        // published at the end of the batch, newest first.
        let mut held: Vec<(u16, u32)> = Vec::new();
        let mut rearm = Rearm::default();
        let mut popped = 0;
        while throttled.is_none() {
            if self.queue.event_idx_enabled() {
                let _ = self.queue.disable_notification(mem);
            }
            while let Some(chain) = self.queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                if let Err(wait) = self.admit(ctx, table, head) {
                    // Not taken after all: it stays in the avail ring.
                    self.queue.go_to_previous_position();
                    throttled = Some(wait);
                    break;
                }
                popped += 1;
                tracing::debug!(head, next_avail = self.queue.next_avail(), "block: trace: pop");
                if head >= self.size {
                    tracing::debug!(head, "block: avail ring names a descriptor outside the table");
                    continue;
                }
                if let Some(inflight) = &mut self.inflight {
                    inflight.mark(head);
                }
                ctx.stats.taken();
                if hooks.crash_now(CrashPoint::Marked) {
                    return Flow::Crashed;
                }
                if let Some(delay) = hooks.request_delay() {
                    std::thread::sleep(delay);
                }
                let len = process_chain(mem, table, head, disk);
                if hooks.crash_now(CrashPoint::Executed) {
                    return Flow::Crashed;
                }
                if hooks.out_of_order() {
                    held.push((head, len));
                    continue;
                }
                if self.publish(mem, head, len, hooks) == Flow::Crashed {
                    return Flow::Crashed;
                }
                ctx.stats.completed();
                completed += 1;
            }
            while let Some((head, len)) = held.pop() {
                // Run, not yet published: a kill here leaves newer requests
                // of the batch completed and older ones not.
                if let Some(delay) = hooks.request_delay() {
                    std::thread::sleep(delay);
                }
                if hooks.crash_now(CrashPoint::Executed) {
                    return Flow::Crashed;
                }
                if self.publish(mem, head, len, hooks) == Flow::Crashed {
                    return Flow::Crashed;
                }
                ctx.stats.completed();
                completed += 1;
            }
            // Not forever on a broken ring (crate::rearm). A throttled ring
            // keeps notifications off: the worker's timer wakes it.
            if throttled.is_some() || !self.queue.event_idx_enabled() || !rearm.again(&mut self.queue, mem, popped) {
                break;
            }
        }
        if completed > 0 && self.queue.needs_notification(mem).unwrap_or(true) {
            self.signal();
        }
        match throttled {
            Some(wait) => Flow::Throttled(wait),
            None => Flow::Continue,
        }
    }
}

/// What the worker does after draining a ring.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The rate limiter holds the next request back this long.
    Throttled(Duration),
    /// A test hook simulated SIGKILL: stop touching anything.
    Crashed,
}

/// Where a test can make the worker "die" (as if SIGKILLed) while a request
/// is in flight, to prove a successor loses and duplicates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Popped and marked in flight, not run.
    Marked,
    /// Run (data written), used element not published.
    Executed,
    /// Used element published, in-flight mark not yet cleared.
    Published,
}

/// Test hooks; inert in production, where (without the cargo feature
/// `test-hooks`, outside this crate's tests) they have no fields at all.
#[derive(Debug, Default, Clone)]
pub struct Hooks {
    /// Sleep this long after marking each request in flight, before running
    /// it (`mm-device block --test-request-delay-ms`): the guest is far
    /// slower than this back end, so without it a SIGKILL at a random
    /// moment almost never finds a request in flight, and the kill test
    /// would not test recovery. Out of order, the same pause comes before
    /// publishing each completion too, so kills land between them.
    #[cfg(any(test, feature = "test-hooks"))]
    pub request_delay: Option<std::time::Duration>,
    /// Publish each batch's completions newest first
    /// (`--test-complete-out-of-order`): with in-order completion, the
    /// requests in flight are exactly those past the used index, so a
    /// restart at the used index would hide a broken in-flight table.
    #[cfg(any(test, feature = "test-hooks"))]
    pub out_of_order: bool,
    #[cfg(test)]
    pub crash: Option<std::sync::Arc<CrashHook>>,
}

/// Crash at `point` once `after` requests have completed.
#[cfg(test)]
#[derive(Debug)]
pub struct CrashHook {
    pub point: CrashPoint,
    pub after: usize,
    pub completed: std::sync::atomic::AtomicUsize,
    pub crashed: std::sync::atomic::AtomicBool,
}

impl Hooks {
    fn request_delay(&self) -> Option<std::time::Duration> {
        #[cfg(any(test, feature = "test-hooks"))]
        return self.request_delay;
        #[cfg(not(any(test, feature = "test-hooks")))]
        None
    }

    fn out_of_order(&self) -> bool {
        #[cfg(any(test, feature = "test-hooks"))]
        return self.out_of_order;
        #[cfg(not(any(test, feature = "test-hooks")))]
        false
    }

    #[cfg(test)]
    fn crash_at(&self, point: CrashPoint) -> bool {
        self.crash.as_ref().is_some_and(|h| h.point == point && h.completed.load(Ordering::SeqCst) >= h.after)
    }
    #[cfg(not(test))]
    fn crash_at(&self, _point: CrashPoint) -> bool {
        false
    }

    fn crash_now(&self, point: CrashPoint) -> bool {
        let now = self.crash_at(point);
        #[cfg(test)]
        if now && let Some(h) = &self.crash {
            h.crashed.store(true, Ordering::SeqCst);
        }
        now
    }

    fn count(&self) {
        #[cfg(test)]
        if let Some(h) = &self.crash {
            h.completed.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Whether a simulated crash happened (the handler then starts no new
    /// worker, as a dead process would not).
    pub fn crashed(&self) -> bool {
        #[cfg(test)]
        if let Some(h) = &self.crash {
            return h.crashed.load(Ordering::SeqCst);
        }
        false
    }
}
