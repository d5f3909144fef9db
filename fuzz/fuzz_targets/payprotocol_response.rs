//! Fuzz target: `paysync::fuzzing::payprotocol_response` (the invariants it asserts are documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| paysync::fuzzing::payprotocol_response(data));
