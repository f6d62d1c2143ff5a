//! Replays every committed fuzz input (fuzz/corpus/<target>/, fuzz/seeds/<target>/)
//! through the same target bodies the cargo-fuzz targets run
//! (`sluice_engine::fuzzing`), so a crash or broken invariant found once stays
//! fixed. A missing or empty corpus directory fails: it would replay nothing.

use std::path::{Path, PathBuf};

use sluice_engine::fuzzing::TARGETS;

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

fn replay(target: &str) {
    let body = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no fuzz target {target}"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let corpus = root.join("corpus").join(target);
    let mut inputs = files(&corpus);
    assert!(
        !inputs.is_empty(),
        "{} is missing or empty: nothing to replay",
        corpus.display()
    );
    let seeds = files(&root.join("seeds").join(target));
    assert!(!seeds.is_empty(), "no seeds for {target}");
    inputs.extend(seeds);
    let mut failed = Vec::new();
    for path in &inputs {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if std::panic::catch_unwind(|| body(&data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs fail (reproduce with `cargo +nightly fuzz run {target} <file>` in fuzz/):\n{}",
        failed.len(),
        inputs.len(),
        failed.join("\n")
    );
}

#[test]
fn every_target_has_a_test() {
    let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "smtp_server",
            "smtp_data",
            "smtp_client",
            "dns_answer",
            "config_load",
            "relay_output"
        ]
    );
}

#[test]
fn smtp_server() {
    replay("smtp_server");
}

#[test]
fn smtp_data() {
    replay("smtp_data");
}

#[test]
fn smtp_client() {
    replay("smtp_client");
}

#[test]
fn dns_answer() {
    replay("dns_answer");
}

#[test]
fn config_load() {
    replay("config_load");
}

#[test]
fn relay_output() {
    replay("relay_output");
}
