//! Per-connection credit flow control (virtio 1.2, 5.10.6.3).
//!
//! Each side advertises `buf_alloc` (its receive buffer) and `fwd_cnt`
//! (bytes it has consumed from it) in every header; a sender may have at
//! most `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes outstanding.
//! Counters are free-running u32s, so all arithmetic wraps.
//!
//! For the guest→host direction our "buffer" is the bytes we accepted from
//! the guest but have not yet written to the host socket; we enforce the
//! limit we advertised, so a guest that ignores credit cannot make us
//! buffer without bound.

use std::num::Wrapping;

/// Our per-connection receive buffer: what the guest may have in flight
/// towards the host socket.
pub const BUF_ALLOC: u32 = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credit {
    buf_alloc: u32,
    /// Bytes received from the guest (RW payloads accepted).
    rx_cnt: Wrapping<u32>,
    /// Bytes of those written to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as the guest last heard it.
    fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest in RW packets.
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
}

/// The guest sent more than the credit we gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the guest overran its credit: {in_flight} bytes in flight, {len} more, {buf_alloc} allowed")]
pub struct Overrun {
    pub in_flight: u32,
    pub len: u32,
    pub buf_alloc: u32,
}

impl Credit {
    pub fn new(buf_alloc: u32) -> Self {
        Credit {
            buf_alloc,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
        }
    }

    /// Records the guest's view, which every guest packet carries.
    pub fn update_peer(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// Bytes we may still send the guest. A guest reporting a `fwd_cnt`
    /// ahead of what we sent gets no credit rather than a huge one.
    pub fn peer_free(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// We sent `n` payload bytes to the guest.
    pub fn sent(&mut self, n: u32) {
        self.tx_cnt += Wrapping(n);
    }

    /// The guest sent `len` payload bytes; refused if over its credit.
    pub fn received(&mut self, len: u32) -> Result<(), Overrun> {
        let in_flight = (self.rx_cnt - self.fwd_cnt).0;
        if u64::from(in_flight) + u64::from(len) > u64::from(self.buf_alloc) {
            return Err(Overrun { in_flight, len, buf_alloc: self.buf_alloc });
        }
        self.rx_cnt += Wrapping(len);
        Ok(())
    }

    /// `n` bytes from the guest reached the host socket.
    pub fn forwarded(&mut self, n: u32) {
        self.fwd_cnt += Wrapping(n);
    }

    /// The (buf_alloc, fwd_cnt) to put in a header going to the guest,
    /// remembering that the guest now knows them.
    pub fn stamp(&mut self) -> (u32, u32) {
        self.fwd_cnt_sent = self.fwd_cnt;
        (self.buf_alloc, self.fwd_cnt.0)
    }

    /// True when the guest should be told about freed space: once a quarter
    /// of the buffer was freed without it hearing. This is what unblocks a
    /// guest that ran out of credit (it then has at most `buf_alloc` in
    /// flight, so forwarding a quarter of that always reaches the threshold).
    pub fn update_due(&self) -> bool {
        (self.fwd_cnt - self.fwd_cnt_sent).0 >= self.buf_alloc / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_credit_tracks_what_we_sent() {
        let mut c = Credit::new(BUF_ALLOC);
        assert_eq!(c.peer_free(), 0, "no credit before the guest says anything");
        c.update_peer(1000, 0);
        assert_eq!(c.peer_free(), 1000);
        c.sent(600);
        assert_eq!(c.peer_free(), 400);
        c.sent(400);
        assert_eq!(c.peer_free(), 0);
        c.update_peer(1000, 500);
        assert_eq!(c.peer_free(), 500);
        // A bogus fwd_cnt ahead of what we sent yields nothing, not 4 GiB.
        c.update_peer(1000, 5000);
        assert_eq!(c.peer_free(), 0);
    }

    #[test]
    fn counters_wrap() {
        let mut c = Credit::new(BUF_ALLOC);
        c.tx_cnt = Wrapping(u32::MAX - 10);
        c.update_peer(100, u32::MAX - 10);
        c.sent(50);
        assert_eq!(c.peer_free(), 50);
        c.rx_cnt = Wrapping(u32::MAX - 5);
        c.fwd_cnt = Wrapping(u32::MAX - 5);
        c.received(100).unwrap();
        c.forwarded(100);
        assert_eq!((c.rx_cnt - c.fwd_cnt).0, 0);
    }

    #[test]
    fn guest_overrun_is_refused() {
        let mut c = Credit::new(1000);
        c.received(600).unwrap();
        c.received(400).unwrap();
        assert_eq!(c.received(1), Err(Overrun { in_flight: 1000, len: 1, buf_alloc: 1000 }));
        c.forwarded(300);
        c.received(300).unwrap();
        assert!(c.received(u32::MAX).is_err());
    }

    #[test]
    fn credit_update_after_a_quarter() {
        let mut c = Credit::new(1000);
        assert!(!c.update_due());
        c.received(1000).unwrap();
        c.forwarded(249);
        assert!(!c.update_due());
        c.forwarded(1);
        assert!(c.update_due());
        assert_eq!(c.stamp(), (1000, 250));
        assert!(!c.update_due());
    }
}
