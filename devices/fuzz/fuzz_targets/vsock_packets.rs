//! Fuzzes the vsock back end's packet, credit and connection handling: a
//! script of guest packets, host socket activity and guest reads against a
//! real muxer. The input format is in `mm_devices::vsock::fuzzing`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mm_devices::vsock::fuzzing::fuzz_vsock(data);
});
