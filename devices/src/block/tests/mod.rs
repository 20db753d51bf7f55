//! Tests of the block back end, end to end through the test front end
//! (no KVM): requests, hostile chains, and crash recovery.

mod dirty_log;
mod fuzz;
mod inflight;
mod malformed;
mod overlay;
mod parse;
mod postcopy;
mod rate_limit;
mod requests;
// Drives real `mm-device` processes with test-only flags.
#[cfg(feature = "test-hooks")]
mod stress;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::{Bytes, GuestAddress};

use super::execute::{BlockDisk, Serial};
use super::vring::Hooks;
use super::{BlockError, BlockStats, disk::DiskImage, serve_disk};
use crate::test_frontend::{Buf, TEST_PROTOCOL_FEATURES, TestFrontend, TestMemory};

pub const QUEUE_SIZE: u16 = 64;
pub const TIMEOUT: Duration = Duration::from_secs(10);
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Guest RAM of the test front end: at a nonzero guest address, so a back
/// end mixing up guest and virtual addresses fails.
pub const MEM_BASE: u64 = 0x10_0000;
pub const MEM_SIZE: usize = 16 << 20;
/// What the status byte holds before the device writes it.
pub const STATUS_UNTOUCHED: u8 = 0xee;

/// A scratch image file, removed on drop.
pub struct TempImage {
    pub path: PathBuf,
}

impl TempImage {
    pub fn new(size: u64) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("mm-block-test-{}-{}.img", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        let path = std::env::temp_dir().join(name);
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(size).unwrap();
        TempImage { path }
    }

    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        std::fs::File::open(&self.path).unwrap().read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    pub fn write(&self, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new().write(true).open(&self.path).unwrap().write_all_at(data, offset).unwrap();
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub fn open_disk(path: &Path, read_only: bool, serial: &str) -> Arc<BlockDisk> {
    Arc::new(BlockDisk::new(DiskImage::open(path, read_only).unwrap(), Serial::new(serial)))
}

/// Starts a back end on one end of a socketpair; returns the other end.
pub fn spawn_backend(disk: Arc<BlockDisk>, hooks: Hooks) -> (UnixStream, JoinHandle<Result<(), BlockError>>) {
    let (frontend, handle, _) = spawn_counted_backend(disk, hooks);
    (frontend, handle)
}

/// [`spawn_backend`], and the back end's own stats.
pub fn spawn_counted_backend(
    disk: Arc<BlockDisk>,
    hooks: Hooks,
) -> (UnixStream, JoinHandle<Result<(), BlockError>>, Arc<BlockStats>) {
    let (frontend, backend) = UnixStream::pair().unwrap();
    let stats = Arc::new(BlockStats::default());
    let backend_stats = Arc::clone(&stats);
    let handle = std::thread::spawn(move || serve_disk(disk, backend, hooks, backend_stats, false));
    (frontend, handle, stats)
}

/// A back end serving a scratch image, and a test front end driving it.
pub struct Rig {
    pub fe: TestFrontend,
    pub image: TempImage,
    pub backend: Option<JoinHandle<Result<(), BlockError>>>,
}

/// The reply to one request.
#[derive(Debug)]
pub struct Reply {
    pub status: u8,
    pub used_len: u32,
    pub data: Vec<u8>,
}

impl Rig {
    /// A connected, activated device with every offered feature acked.
    pub fn new(image_size: u64, read_only: bool) -> Self {
        let rig = Self::connected(image_size, read_only, Hooks::default());
        let mut rig = rig;
        rig.fe.activate(u64::MAX, &[QUEUE_SIZE]).unwrap();
        rig
    }

    /// Connected (handshake done), not yet activated.
    pub fn connected(image_size: u64, read_only: bool, hooks: Hooks) -> Self {
        Self::connected_wanting(image_size, read_only, hooks, TEST_PROTOCOL_FEATURES)
    }

    /// [`Rig::connected`], the front end asking only for `wanted`.
    pub fn connected_wanting(
        image_size: u64,
        read_only: bool,
        hooks: Hooks,
        wanted: VhostUserProtocolFeatures,
    ) -> Self {
        let image = TempImage::new(image_size);
        let disk = open_disk(&image.path, read_only, "mm-test-serial");
        let (stream, backend) = spawn_backend(disk, hooks);
        let memory = TestMemory::new(MEM_BASE, MEM_SIZE).unwrap();
        let fe = TestFrontend::connect_wanting(stream, memory, 1, wanted).unwrap();
        Rig { fe, image, backend: Some(backend) }
    }

    /// Allocates a guest buffer holding `data`.
    pub fn buffer(&mut self, data: &[u8]) -> GuestAddress {
        let addr = self.fe.alloc(data.len().max(1) as u64).unwrap();
        self.fe.mem().write_slice(data, addr).unwrap();
        addr
    }

    /// A status byte, preset to STATUS_UNTOUCHED.
    pub fn status_buffer(&mut self) -> GuestAddress {
        self.buffer(&[STATUS_UNTOUCHED])
    }

    /// Queues a well-formed request (not kicked); returns its head and the
    /// addresses of its status byte and device-writable data.
    pub fn queue_request(
        &mut self,
        kind: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
    ) -> (u16, GuestAddress, GuestAddress) {
        let hdr = self.buffer(&header(kind, sector));
        let mut bufs = vec![Buf::out(hdr, 16)];
        if !out.is_empty() {
            let data = self.buffer(out);
            bufs.push(Buf::out(data, out.len() as u32));
        }
        let in_addr = self.buffer(&vec![0u8; in_len as usize]);
        if in_len > 0 {
            bufs.push(Buf::input(in_addr, in_len));
        }
        let status = self.status_buffer();
        bufs.push(Buf::input(status, 1));
        let head = self.fe.add_chain(0, &bufs).unwrap();
        (head, status, in_addr)
    }

    /// Sends a well-formed request and waits for its completion.
    pub fn request(&mut self, kind: u32, sector: u64, out: &[u8], in_len: u32) -> Reply {
        let (head, status, in_addr) = self.queue_request(kind, sector, out, in_len);
        self.fe.kick(0).unwrap();
        let used = self.wait_one(head);
        let mut data = vec![0u8; in_len as usize];
        self.fe.mem().read_slice(&mut data, in_addr).unwrap();
        Reply { status: self.fe.mem().read_obj(status).unwrap(), used_len: used, data }
    }

    /// Waits for exactly one used element, for `head`; returns its length.
    pub fn wait_one(&mut self, head: u16) -> u32 {
        let used = self.fe.wait_used(0, 1, TIMEOUT).unwrap();
        assert_eq!(used.len(), 1, "expected one completion, got {used:?}");
        assert_eq!(used[0].id, u32::from(head));
        used[0].len
    }

    /// Checks the device still serves a plain read after whatever came before.
    pub fn assert_still_serving(&mut self) {
        let reply = self.request(T_IN, 0, &[], 512);
        assert_eq!(reply.status, S_OK);
        assert_eq!(reply.used_len, 513);
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Hang up (drop the session) before joining the back end.
        let (dummy, _) = UnixStream::pair().unwrap();
        self.fe.frontend = vhost::vhost_user::Frontend::from_stream(dummy, 1);
        if let Some(backend) = self.backend.take() {
            let result = backend.join();
            if !std::thread::panicking() {
                result.unwrap().unwrap();
            }
        }
    }
}

/// A request header: type, reserved, sector.
pub fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// A DISCARD/WRITE_ZEROES range.
pub fn range(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[0..8].copy_from_slice(&sector.to_le_bytes());
    r[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    r[12..16].copy_from_slice(&flags.to_le_bytes());
    r
}

/// A recognisable pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}
