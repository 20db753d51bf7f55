//! Fuzzes the exec protocol's frame decoder (request, identity and
//! workload JSON) with arbitrary bytes, as a hostile host or guest could
//! send them: decoding must never panic or allocate past the frame limit,
//! and every frame that decodes must re-encode to an equal frame.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mm_exec_protocol::fuzz_decode(data);
    let _ = mm_exec_protocol::read_frame(&mut &data[..]);
});
