//! Fuzzes the vhost-user front end against a hostile back end: the input
//! is what the back end sends (bytes and attached files) over the whole
//! set-up, reconnect and restore. No panic, hang or leaked descriptor is
//! allowed. The input format is in `mm_vmm::fuzzing::fuzz_vhost_user`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mm_vmm::fuzzing::fuzz_vhost_user(data);
});
