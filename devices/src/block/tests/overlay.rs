//! A copy-on-write disk (`--base`, `--map`) served end to end: the guest
//! sees the base where it has not written, its own writes elsewhere, zeroes
//! where it discarded or zeroed, and the base file never changes.

use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Instant;

use mm_overlay::Overlay;

use super::*;
use crate::block::{BlockConfig, OverlayFiles, open_disk as open_config};
use crate::test_frontend::{TestFrontend, TestMemory};

const MIB: u64 = 1 << 20;
const SECTORS: u64 = MIB / 512;

/// A base full of data, and a new empty overlay of it.
struct Files {
    base: TempImage,
    upper: TempImage,
    map: TempImage,
}

impl Files {
    fn new() -> Self {
        let base = TempImage::new(MIB);
        base.write(0, &base_content());
        // Paths only: the overlay's files must be new.
        let (upper, map) = (TempImage::new(0), TempImage::new(0));
        std::fs::remove_file(&upper.path).unwrap();
        std::fs::remove_file(&map.path).unwrap();
        Overlay::create(&upper.path, &map.path, MIB).unwrap();
        Files { base, upper, map }
    }

    fn disk(&self) -> Arc<BlockDisk> {
        let image = DiskImage::open_overlay(&self.base.path, &self.upper.path, &self.map.path).unwrap();
        Arc::new(BlockDisk::new(image, Serial::new("overlay")))
    }

    /// A back end serving the overlay, and a front end driving it.
    fn rig(&self) -> Rig {
        let (stream, backend) = spawn_backend(self.disk(), Hooks::default());
        rig_on(stream, Some(backend))
    }
}

fn rig_on(stream: UnixStream, backend: Option<JoinHandle<Result<(), BlockError>>>) -> Rig {
    let memory = TestMemory::new(MEM_BASE, MEM_SIZE).unwrap();
    let mut fe = TestFrontend::connect(stream, memory, 1).unwrap();
    fe.activate(u64::MAX, &[QUEUE_SIZE]).unwrap();
    // The rig's own scratch image is not used: the disk is the overlay.
    Rig { fe, image: TempImage::new(0), backend }
}

/// No zero byte in it, so a zeroed or lost range shows.
fn base_content() -> Vec<u8> {
    (0..MIB).map(|i| (i % 251) as u8 + 1).collect()
}

/// Reads the whole disk through the guest, 64 KiB at a time.
fn read_disk(rig: &mut Rig) -> Vec<u8> {
    let mut all = Vec::new();
    for sector in (0..SECTORS).step_by(128) {
        let reply = rig.request(T_IN, sector, &[], 128 * 512);
        assert_eq!(reply.status, S_OK);
        all.extend(reply.data);
    }
    all
}

/// Writes, discards and write-zeroes through the guest, unaligned to the
/// overlay's clusters; returns what the disk must now hold.
fn change_the_disk(rig: &mut Rig) -> Vec<u8> {
    let mut model = base_content();
    let mut write = |rig: &mut Rig, sector: u64, data: Vec<u8>| {
        assert_eq!(rig.request(T_OUT, sector, &data, 0).status, S_OK);
        model[(sector * 512) as usize..(sector * 512) as usize + data.len()].copy_from_slice(&data);
    };
    // Two sectors inside cluster 0; 8 KiB from the middle of cluster 1 into
    // cluster 3; a whole cluster.
    write(rig, 3, pattern(1024, 1));
    write(rig, 15, pattern(8192, 2));
    write(rig, 64, pattern(4096, 3));
    // Discard and write-zeroes over the base's data: zeroes, not the base.
    for (kind, sector, count, flags) in
        [(T_DISCARD, 80, 8, 0), (T_DISCARD, 101, 3, 0), (T_WRITE_ZEROES, 200, 20, 1), (T_WRITE_ZEROES, 301, 9, 0)]
    {
        let reply = rig.request(kind, 0, &range(sector, count, flags), 0);
        assert_eq!(reply.status, S_OK, "kind {kind} at {sector}");
        model[(sector * 512) as usize..((sector + u64::from(count)) * 512) as usize].fill(0);
    }
    // Zeroes over the guest's own write.
    assert_eq!(rig.request(T_WRITE_ZEROES, 0, &range(66, 2, 1), 0).status, S_OK);
    model[66 * 512..68 * 512].fill(0);
    assert_eq!(rig.request(T_FLUSH, 0, &[], 0).status, S_OK);
    model
}

#[test]
fn overlay_serves_the_base_and_the_guests_writes_and_never_writes_the_base() {
    let files = Files::new();
    let mut rig = files.rig();
    assert_eq!(rig.fe.offered_features & (1 << 5), 0, "VIRTIO_BLK_F_RO not offered");
    assert!(read_disk(&mut rig) == base_content(), "a new overlay reads as its base");

    let model = change_the_disk(&mut rig);
    let reply = rig.request(T_IN, 0, &[], 4096);
    assert_eq!(reply.data[..1536], base_content()[..1536], "the base around a partial write");
    assert_eq!(reply.data[1536..2560], pattern(1024, 1)[..]);
    assert_eq!(reply.data[2560..], base_content()[2560..4096]);
    let reply = rig.request(T_IN, 500, &[], 4096);
    assert_eq!(reply.data, base_content()[500 * 512..500 * 512 + 4096], "the base where not written");
    assert!(read_disk(&mut rig) == model, "the disk the guest changed");
    assert_eq!(rig.request(T_IN, SECTORS, &[], 512).status, S_IOERR, "the capacity is the base's");
    assert!(files.base.read(0, MIB as usize) == base_content(), "the base was written");
    drop(rig);

    // A restarted back end, on the same files, serves the same disk.
    let mut rig = files.rig();
    assert!(read_disk(&mut rig) == model, "the disk after a restart");
    drop(rig);
    let overlay = Overlay::open_paths(&files.base.path, &files.upper.path, &files.map.path, false).unwrap();
    let mut all = vec![0u8; MIB as usize];
    overlay.read(0, &mut all).unwrap();
    assert!(all == model, "the overlay's files hold the disk");
    assert!(files.base.read(0, MIB as usize) == base_content(), "the base was written");
}

#[test]
fn an_overlay_is_never_served_read_only() {
    let files = Files::new();
    let config = BlockConfig {
        image: files.upper.path.clone(),
        overlay: Some(OverlayFiles { base: files.base.path.clone(), map: files.map.path.clone() }),
        read_only: true,
        serial: None,
        lazy_memory: false,
        rate_limit: Default::default(),
        test: Default::default(),
    };
    assert!(matches!(open_config(&config), Err(BlockError::ReadOnlyOverlay)));
    let config = BlockConfig { read_only: false, ..config };
    assert_eq!(open_config(&config).unwrap().image.capacity_sectors(), SECTORS);
    // The base as the upper is refused.
    let config = BlockConfig { image: files.base.path.clone(), ..config };
    assert!(open_config(&config).is_err());
}

/// The real `mm-device block --base --map`, jailed and under its seccomp
/// policy: the jail must hold the three files (the base read-only) and the
/// policy must allow what the overlay does. Uses the binary `cargo build`
/// made (as `scripts/test.sh` does before the tests); skipped without it.
#[test]
fn mm_device_serves_an_overlay_in_its_jail() {
    let bin = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug/mm-device");
    if !Path::new(bin).exists() {
        eprintln!("mm_device_serves_an_overlay_in_its_jail: skipped, no {bin} (cargo build first)");
        return;
    }
    let files = Files::new();
    let socket = files.map.path.with_extension("sock");
    let _ = std::fs::remove_file(&socket);
    let mut child = Command::new(bin)
        .arg("block")
        .arg("--socket")
        .arg(&socket)
        .args(
            [&files.upper.path, &files.base.path, &files.map.path]
                .iter()
                .zip(["--image", "--base", "--map"])
                .flat_map(|(path, flag)| [std::ffi::OsStr::new(flag), path.as_os_str()]),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let stream = loop {
        if let Ok(stream) = UnixStream::connect(&socket) {
            break stream;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!("{bin} exited ({status}) instead of serving: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(start.elapsed() < TIMEOUT, "the device's socket never appeared");
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut rig = rig_on(stream, None);
    let model = change_the_disk(&mut rig);
    assert!(read_disk(&mut rig) == model, "the disk the guest changed");
    drop(rig);
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&socket);
    assert!(out.status.success(), "mm-device: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(files.base.read(0, MIB as usize) == base_content(), "the base was written");
}
