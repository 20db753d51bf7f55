//! Fuzzes the virtio-mmio transport: guest register reads and writes in
//! any order, width and offset, with reconnects, quiesce/resume and
//! snapshot/restore between them, in front of a fake vhost-user back end
//! that checks what the transport makes the front end send. The input
//! format is in `mm_vmm::fuzzing::fuzz_mmio`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mm_vmm::fuzzing::fuzz_mmio(data);
});
