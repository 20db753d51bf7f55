//! Fuzzes block request handling: a guest-written descriptor chain, walked,
//! parsed and run against a small in-memory disk. The input format is in
//! `mm_devices::block::fuzzing`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mm_devices::block::fuzzing::fuzz_block_request(data);
});
