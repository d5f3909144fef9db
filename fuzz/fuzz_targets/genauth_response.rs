//! Fuzz target: `paysync::fuzzing::genauth_response` (the invariants it asserts are documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| paysync::fuzzing::genauth_response(data));
