//! cargo-fuzz target `smtp_data`: the body (and its invariants) is
//! `sluice_engine::fuzzing::data::smtp_data`, shared with tests/fuzz_replay.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sluice_engine::fuzzing::data::smtp_data(data);
});
