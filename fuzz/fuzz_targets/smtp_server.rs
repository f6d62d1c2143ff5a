//! cargo-fuzz target `smtp_server`: the body (and its invariants) is
//! `sluice_engine::fuzzing::server::smtp_server`, shared with tests/fuzz_replay.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sluice_engine::fuzzing::server::smtp_server(data);
});
