//! cargo-fuzz target `relay_output`: the body (and its invariants) is
//! `sluice_engine::fuzzing::lenient::relay_output`, shared with tests/fuzz_replay.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sluice_engine::fuzzing::lenient::relay_output(data);
});
