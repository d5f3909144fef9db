//! Fuzz target: `paysync::fuzzing::csv_reader` (the invariants it asserts are documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| paysync::fuzzing::csv_reader(data));
