//! Turning a queue's notifications back on after draining it, without
//! spinning on a broken ring: one rule for every back end's ring loops.
//!
//! After a drain, `enable_notification` says "more" whenever the avail
//! index is not where the back end stopped, even when nothing can be
//! popped (an index more than a ring ahead, an entry outside memory).
//! Believing it spun the net back end forever (found by its `net_tx` fuzz
//! target); the vsock and block loops had the same spin. Saying "more" once
//! with nothing popped since is a race (the guest added a chain just as
//! notifications came back on: the next pop gets it); twice in a row is a
//! broken ring, which then waits for the guest's next kick or reset.

use virtio_queue::QueueT;
use vm_memory::GuestMemory;

/// Rounds in a row that may end in "more" with nothing popped.
const IDLE_ROUNDS: u32 = 2;

/// A ring loop's memory of how much it has taken, round to round.
#[derive(Debug, Default)]
pub struct Rearm {
    taken: usize,
    idle_rounds: u32,
}

impl Rearm {
    /// Ends a round: notifications back on, and whether to look at the ring
    /// again. `taken` counts the chains popped since the loop began, so a
    /// round that popped nothing is one whose count did not move.
    pub fn again<Q: QueueT, M: GuestMemory>(&mut self, queue: &mut Q, mem: &M, taken: usize) -> bool {
        self.idle_rounds = if taken == self.taken { self.idle_rounds + 1 } else { 0 };
        self.taken = taken;
        matches!(queue.enable_notification(mem), Ok(true)) && self.idle_rounds < IDLE_ROUNDS
    }
}
