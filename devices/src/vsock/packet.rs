//! The virtio-vsock packet header (virtio 1.2, 5.10.6): 44 bytes,
//! little-endian, in front of every packet on the rx and tx queues.

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// The host's well-known CID.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type we offer.
pub const TYPE_STREAM: u16 = 1;
/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
/// The largest payload a guest may put in one packet (Linux's
/// VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); larger is malformed.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Size of `struct virtio_vsock_event { le32 id; }`, the event queue's
/// only element (virtio 1.2, 5.10.6.7).
pub const EVENT_LEN: usize = 4;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, the only event id: the guest drops
/// its connections (listeners stay) and re-reads its CID from config space.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Packet operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    Request = 1,
    Response = 2,
    Rst = 3,
    Shutdown = 4,
    Rw = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl Op {
    pub fn from_u16(v: u16) -> Option<Op> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr`, decoded. `op` stays raw so an unknown value
/// survives parsing and gets its answer (a reset) from the muxer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn u16_at(b: &[u8; HDR_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8; HDR_LEN], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn u64_at(b: &[u8; HDR_LEN], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Header {
        Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    pub fn op(&self) -> Option<Op> {
        Op::from_u16(self.op)
    }

    /// A header-only stream packet from the host side `src_port` to the
    /// guest's `dst_port` (cids are filled in by the muxer).
    pub fn host_to_guest(op: Op, src_port: u32, dst_port: u32) -> Header {
        Header { src_port, dst_port, type_: TYPE_STREAM, op: op as u16, ..Header::default() }
    }

    /// The reset that answers this (guest) packet: ports swapped.
    pub fn reset_reply(&self) -> Header {
        Header::host_to_guest(Op::Rst, self.dst_port, self.src_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_spec() {
        let h = Header {
            src_cid: 0x0102030405060708,
            dst_cid: 2,
            src_port: 0x11223344,
            dst_port: 52,
            len: 1000,
            type_: TYPE_STREAM,
            op: Op::Rw as u16,
            flags: SHUTDOWN_SEND,
            buf_alloc: 0x40000,
            fwd_cnt: 0xdeadbeef,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[8..16], &[2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[24..28], &1000u32.to_le_bytes());
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(&b[40..44], &[0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(Header::from_bytes(&b), h);
        assert_eq!(h.op(), Some(Op::Rw));
    }

    #[test]
    fn unknown_ops_survive_parsing() {
        let mut b = [0u8; HDR_LEN];
        b[30] = 9;
        let h = Header::from_bytes(&b);
        assert_eq!(h.op, 9);
        assert_eq!(h.op(), None);
        assert_eq!(Op::from_u16(0), None);
        for op in 1..=7 {
            assert_eq!(Op::from_u16(op).unwrap() as u16, op);
        }
    }

    #[test]
    fn reset_reply_swaps_ports() {
        let h = Header { src_port: 1000, dst_port: 52, op: Op::Request as u16, ..Header::default() };
        let r = h.reset_reply();
        assert_eq!((r.src_port, r.dst_port, r.op(), r.type_), (52, 1000, Some(Op::Rst), TYPE_STREAM));
    }
}
