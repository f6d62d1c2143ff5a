//! cargo-fuzz target `config_load`: the body (and its invariants) is
//! `sluice_engine::fuzzing::config::config_load`, shared with tests/fuzz_replay.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sluice_engine::fuzzing::config::config_load(data);
});
