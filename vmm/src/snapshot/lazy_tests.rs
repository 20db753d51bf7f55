//! The page server against real userfaultfds: mm-vmm's mapping of guest
//! RAM and a second mapping of the same memfd standing in for a device
//! process's (a userfaultfd registration is per mapping, so one process can
//! play both sides).

use std::os::fd::FromRawFd;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::*;
use crate::snapshot::memory;

/// A userfaultfd, or None (with a message) where this process may not
/// have one; under CI that fails instead.
fn uffd_or_skip(test: &str) -> Option<Uffd> {
    match crate::snapshot::uffd::open(None) {
        Ok(uffd) => Some(uffd),
        Err(e) if std::env::var_os("CI").is_some() => panic!("{test}: CI must be able to create a userfaultfd: {e}"),
        Err(e) => {
            eprintln!("SKIPPED {test}: no userfaultfd here ({e}); run as root");
            None
        }
    }
}

fn temp_file() -> File {
    let path =
        std::env::temp_dir().join(format!("mm-lazy-test-{}-{:?}", std::process::id(), std::thread::current().id()));
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    file
}

/// A 32 MiB guest with known contents, saved: (file, image).
fn snapshot() -> (File, MemoryImage) {
    let ram = GuestRam::new(32).unwrap();
    ram.memory.write_slice(&[0xab; 3 * PAGE as usize], GuestAddress(0x10_0000)).unwrap();
    ram.memory.write_obj(0x1234_5678u32, GuestAddress(0x30_0010)).unwrap();
    ram.memory.write_slice(&[0x5a; PAGE as usize], GuestAddress(0x1f0_0000)).unwrap();
    let file = temp_file();
    let image = memory::save(&ram, &file).unwrap();
    (file, image)
}

/// A second shared mapping of `ram`'s memfd, as a device process maps it.
struct SecondMapping {
    addr: *mut u8,
    len: usize,
}

impl SecondMapping {
    fn new(ram: &GuestRam) -> SecondMapping {
        let len = ram.memory.iter().next().unwrap().len() as usize;
        // SAFETY: a new shared mapping of the memfd; checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                ram.memfd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        SecondMapping { addr: addr as *mut u8, len }
    }

    fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.len);
        // SAFETY: inside our mapping; volatile so the fault really happens here.
        (0..len).map(|i| unsafe { std::ptr::read_volatile(self.addr.add(offset + i)) }).collect()
    }
}

impl Drop for SecondMapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

#[test]
fn pages_come_from_the_snapshot_on_first_touch_and_complete_fills_the_rest() {
    let Some(uffd) = uffd_or_skip("pages_come_from_the_snapshot_on_first_touch") else { return };
    let (file, image) = snapshot();
    let ram = GuestRam::new(32).unwrap();
    let server = PageServer::start(&ram, &file, &image, uffd, false).unwrap();

    assert_eq!(ram.memory.read_obj::<u32>(GuestAddress(0x30_0010)).unwrap(), 0x1234_5678);
    let mut back = vec![0u8; 3 * PAGE as usize];
    ram.memory.read_slice(&mut back, GuestAddress(0x10_0000)).unwrap();
    assert!(back.iter().all(|&b| b == 0xab));
    // A page the snapshot does not hold reads as zeros and can be written.
    assert_eq!(ram.memory.read_obj::<u64>(GuestAddress(0x80_0000)).unwrap(), 0);
    ram.memory.write_obj(7u64, GuestAddress(0x80_0008)).unwrap();
    assert!(server.stats().vmm_faults.load(Ordering::Relaxed) >= 3);
    // Only what was touched is in the memfd: the last extent is not yet.
    let present = memory::data_ranges(&ram.memfd, 0, 32 << 20).unwrap();
    assert!(present.iter().all(|&(_, end)| end <= 0x1f0_0000), "untouched page present: {present:?}");

    server.complete().unwrap();
    assert!(server.is_complete());
    let present = memory::data_ranges(&ram.memfd, 0, 32 << 20).unwrap();
    assert!(present.iter().any(|&(s, e)| s <= 0x1f0_0000 && e > 0x1f0_0000), "{present:?}");
    assert_eq!(ram.memory.read_obj::<u8>(GuestAddress(0x1f0_0000)).unwrap(), 0x5a);
    assert_eq!(ram.memory.read_obj::<u64>(GuestAddress(0x80_0008)).unwrap(), 7, "a write before complete kept");
}

#[test]
fn a_device_mapping_handed_over_faults_to_the_server() {
    let Some(uffd) = uffd_or_skip("a_device_mapping_handed_over_faults_to_the_server") else { return };
    let Some(device_uffd) = uffd_or_skip("a_device_mapping_handed_over_faults_to_the_server") else { return };
    let (file, image) = snapshot();
    let ram = GuestRam::new(32).unwrap();
    let server = PageServer::start(&ram, &file, &image, uffd, false).unwrap();
    let device = SecondMapping::new(&ram);
    device_uffd.register(device.addr as *mut libc::c_void, device.len).unwrap();
    // Handed over as a device does (SCM_RIGHTS makes a second reference):
    // a dup, the original kept open. (userfaultfd 0.9's Uffd::into_raw_fd
    // closes the fd it returns.)
    // SAFETY: dup of an fd we own; File takes over the new one.
    let handed = unsafe { File::from_raw_fd(libc::dup(device_uffd.as_raw_fd())) };
    let mapping = Mapping { addr: device.addr as u64, len: device.len as u64, file_offset: 0 };
    server.add_device(1, "test", handed, vec![mapping]);

    // The "device" reads a page nothing has touched yet: served from the
    // snapshot, and then the guest's view agrees.
    assert_eq!(device.read(0x1f0_0000, 4), vec![0x5a; 4]);
    assert_eq!(ram.memory.read_obj::<u8>(GuestAddress(0x1f0_0100)).unwrap(), 0x5a);
    // And a page the snapshot does not hold is a fresh zero page.
    assert_eq!(device.read(0x90_0000, 8), vec![0; 8]);
    assert!(server.stats().device_faults.load(Ordering::Relaxed) >= 2);
}

/// The negative control for the test above: a device mapping NOT handed
/// over reads a page the snapshot holds as zeros, and the guest then loses
/// that page for good (the memfd now has a zero page there, so mm-vmm's
/// mapping never faults for it). This is why every back end must take
/// part in the lazy restore (vhost-user postcopy) or the VM be completed
/// before it runs.
#[test]
fn a_device_mapping_not_handed_over_corrupts_the_guest() {
    let Some(uffd) = uffd_or_skip("a_device_mapping_not_handed_over_corrupts_the_guest") else { return };
    let (file, image) = snapshot();
    let ram = GuestRam::new(32).unwrap();
    let _server = PageServer::start(&ram, &file, &image, uffd, false).unwrap();
    let device = SecondMapping::new(&ram);
    assert_eq!(device.read(0x1f0_0000, 4), vec![0; 4]);
    assert_eq!(ram.memory.read_obj::<u8>(GuestAddress(0x1f0_0000)).unwrap(), 0, "the snapshot's 0x5a is lost");
}

#[test]
fn a_bad_memory_file_is_refused_before_anything_runs() {
    let Some(uffd) = uffd_or_skip("a_bad_memory_file_is_refused_before_anything_runs") else { return };
    let (file, image) = snapshot();
    let ram = GuestRam::new(32).unwrap();
    let offset = image.extents[0].offset;
    let mut byte = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, offset).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[byte[0] ^ 1], offset).unwrap();
    let err = PageServer::start(&ram, &file, &image, uffd, false).err().expect("a corrupt file is refused");
    assert!(matches!(err, LazyError::Image(MemoryImageError::Checksum { .. })), "{err}");

    let Some(uffd) = uffd_or_skip("a_bad_memory_file_is_refused_before_anything_runs") else { return };
    file.set_len(1 << 20).unwrap();
    let err = PageServer::start(&ram, &file, &image, uffd, false).err().expect("a truncated file is refused");
    assert!(matches!(err, LazyError::Image(MemoryImageError::Truncated { .. })), "{err}");
}

#[test]
fn mappings_translate_both_ways() {
    let m = Mapping { addr: 0x7000_0000, len: 0x10_0000, file_offset: 0x4000_0000 };
    assert_eq!(m.offset_of(0x7000_1234), Some(0x4000_1234));
    assert_eq!(m.offset_of(0x7010_0000), None);
    assert_eq!(m.addr_of(0x4000_1000), Some(0x7000_1000));
    assert_eq!(m.addr_of(0x3fff_ffff), None);
}
