//! cargo-fuzz target `smtp_client`: the body (and its invariants) is
//! `sluice_engine::fuzzing::client::smtp_client`, shared with tests/fuzz_replay.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sluice_engine::fuzzing::client::smtp_client(data);
});
