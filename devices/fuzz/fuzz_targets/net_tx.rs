//! Fuzzes the net back end's transmit path: a guest-written split ring and
//! its buffers, drained into a socketpair standing in for the TAP. The
//! input format is in `mm_devices::net::fuzzing`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mm_devices::net::fuzzing::fuzz_net_tx(data);
});
