use std::cell::Cell;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::SpoolError;

const SEQ_BITS: u32 = 16;
const SHARD_BITS: u32 = 6;
const MS_BITS: u32 = 42;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
const SHARD_MASK: u64 = (1 << SHARD_BITS) - 1;
const MS_MASK: u64 = (1 << MS_BITS) - 1;

/// Largest number of shards an id can name (6 bits).
pub const MAX_SHARDS: u16 = 1 << SHARD_BITS;

/// `unix_ms (42 bits) << 22 | shard (6 bits) << 16 | seq (16 bits)`.
///
/// Time first, so the big-endian key order in LMDB is arrival order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct MessageId(pub u64);

impl MessageId {
    fn from_parts(unix_ms: u64, shard: u16, seq: u16) -> Self {
        MessageId(
            (unix_ms & MS_MASK) << (SHARD_BITS + SEQ_BITS)
                | (u64::from(shard) & SHARD_MASK) << SEQ_BITS
                | u64::from(seq),
        )
    }

    pub fn shard(self) -> u16 {
        ((self.0 >> SEQ_BITS) & SHARD_MASK) as u16
    }

    pub fn unix_ms(self) -> u64 {
        self.0 >> (SHARD_BITS + SEQ_BITS)
    }

    fn seq(self) -> u16 {
        (self.0 & SEQ_MASK) as u16
    }

    /// LMDB key: big-endian so byte order equals numeric order.
    pub(crate) fn key(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

impl FromStr for MessageId {
    type Err = SpoolError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // from_str_radix alone would also take a sign and shorter strings.
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SpoolError::BadId(s.to_owned()));
        }
        u64::from_str_radix(s, 16)
            .map(MessageId)
            .map_err(|_| SpoolError::BadId(s.to_owned()))
    }
}

/// Per-core id source. Deliberately not `Sync` (plain `Cell`): one per executor.
#[derive(Debug)]
pub struct IdGenerator {
    shard: u16,
    /// (logical ms, seq) of the last id handed out (or the floor).
    last: Cell<Option<(u64, u16)>>,
}

impl IdGenerator {
    /// `floor` is the largest id already stored in the shard; every new id is
    /// greater, even if the wall clock went back across a restart.
    pub fn new(shard: u16, floor: Option<MessageId>) -> Self {
        assert!(
            shard < MAX_SHARDS,
            "shard {shard} does not fit in a message id"
        );
        IdGenerator {
            shard,
            last: Cell::new(floor.map(|f| (f.unix_ms(), f.seq()))),
        }
    }

    pub fn next(&self, now_unix_ms: u64) -> MessageId {
        let now = now_unix_ms & MS_MASK;
        let (ms, seq) = match self.last.get() {
            None => (now, 0),
            // Clock went back or stood still: stay on the logical ms.
            Some((last_ms, last_seq)) if now <= last_ms => match last_seq.checked_add(1) {
                Some(seq) => (last_ms, seq),
                // 65536 ids in one ms: borrow from the next ms.
                None => (last_ms + 1, 0),
            },
            Some(_) => (now, 0),
        };
        self.last.set(Some((ms, seq)));
        MessageId::from_parts(ms, self.shard, seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let id = MessageId::from_parts(1_700_000_000_123, 5, 7);
        assert_eq!(id.unix_ms(), 1_700_000_000_123);
        assert_eq!(id.shard(), 5);
        assert_eq!(id.seq(), 7);
    }

    #[test]
    fn ordered_and_unique() {
        let g = IdGenerator::new(3, None);
        let a = g.next(1000);
        let b = g.next(1000);
        let c = g.next(1001);
        assert!(a < b && b < c);
        assert!([a, b, c].iter().all(|i| i.shard() == 3));
    }

    #[test]
    fn clock_going_back() {
        let g = IdGenerator::new(0, None);
        let a = g.next(5000);
        let b = g.next(4000);
        let c = g.next(4500);
        assert!(a < b && b < c);
        assert_eq!(b.unix_ms(), 5000);
    }

    #[test]
    fn floor_is_respected() {
        let old = IdGenerator::new(2, None);
        let floor = old.next(10_000);
        let g = IdGenerator::new(2, Some(floor));
        // Restarted with a clock behind the stored data.
        assert!(g.next(9_000) > floor);
        assert!(g.next(20_000) > floor);
    }

    #[test]
    fn seq_overflow_advances_ms() {
        let g = IdGenerator::new(1, None);
        let mut prev = g.next(100);
        for _ in 0..70_000 {
            let id = g.next(100);
            assert!(id > prev);
            prev = id;
        }
        assert_eq!(prev.unix_ms(), 101);
        // Real time catching up must not go back below the borrowed ms.
        assert!(g.next(101) > prev);
    }

    #[test]
    fn display_round_trip() {
        let id = MessageId::from_parts(1_700_000_000_123, 63, 65535);
        let s = id.to_string();
        assert_eq!(s.len(), 16);
        assert_eq!(s, s.to_uppercase());
        assert_eq!(s.parse::<MessageId>(), Ok(id));
        assert_eq!(MessageId(1).to_string(), "0000000000000001");
        assert!("+000000000000001".parse::<MessageId>().is_err());
        assert!("123".parse::<MessageId>().is_err());
        assert!("000000000000000G".parse::<MessageId>().is_err());
    }
}
