//! Fuzz target bodies (issue 6, hostile input). The cargo-fuzz targets in `fuzz/`
//! and the corpus replay test (`tests/fuzz_replay.rs`) both call these functions,
//! so CI replays exactly the logic that was fuzzed. Each takes arbitrary bytes,
//! drives one sans-IO core and panics when an invariant breaks, not only when the
//! core itself panics. Not part of the relay's API.

pub mod client;
pub mod config;
pub mod data;
pub mod dns;
pub mod lenient;
pub mod server;

/// A target body: arbitrary bytes in, a panic on any broken invariant.
pub type Target = fn(&[u8]);

/// Every target by name: the `fuzz/fuzz_targets/<name>.rs` file and the
/// `fuzz/corpus/<name>/` directory use the same names.
pub const TARGETS: &[(&str, Target)] = &[
    ("smtp_server", server::smtp_server),
    ("smtp_data", data::smtp_data),
    ("smtp_client", client::smtp_client),
    ("dns_answer", dns::dns_answer),
    ("config_load", config::config_load),
    ("relay_output", lenient::relay_output),
];

/// The clock every target runs at (sessions take the time as an argument).
pub const NOW_MS: u64 = 1_790_000_000_000;

/// Deterministic chunk sizes derived from a seed byte of the input, so a crash
/// replays with the same read boundaries.
pub struct Chunker {
    state: u64,
    max: usize,
}

impl Chunker {
    /// `seed` 0 means one byte per read; otherwise reads of 1 ..= a size picked
    /// from the seed.
    pub fn new(seed: u8) -> Chunker {
        let max = match seed % 4 {
            0 => 1,
            1 => 3,
            2 => 17,
            _ => 300,
        };
        Chunker {
            state: u64::from(seed) | 0x9e37_79b9_0000_0000,
            max,
        }
    }

    pub fn next_size(&mut self) -> usize {
        // SplitMix64.
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        1 + (z % self.max as u64) as usize
    }

    /// Splits `bytes` into reads.
    pub fn split<'a>(&mut self, bytes: &'a [u8]) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = self.next_size().min(rest.len());
            let (a, b) = rest.split_at(n);
            out.push(a);
            rest = b;
        }
        out
    }
}

/// True when `bytes` hold a CR not followed by LF or an LF not preceded by CR.
pub fn has_bare_newline(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().any(|(i, &b)| match b {
        b'\r' => bytes.get(i + 1) != Some(&b'\n'),
        b'\n' => i == 0 || bytes[i - 1] != b'\r',
        _ => false,
    })
}

/// Position of the first `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
