//! Fuzz target: `paysync::fuzzing::decimal` (the invariants it asserts are documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| paysync::fuzzing::decimal(data));
