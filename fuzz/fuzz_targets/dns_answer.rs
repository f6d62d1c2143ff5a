//! cargo-fuzz target `dns_answer`: the body (and its invariants) is
//! `sluice_engine::fuzzing::dns::dns_answer`, shared with tests/fuzz_replay.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sluice_engine::fuzzing::dns::dns_answer(data);
});
