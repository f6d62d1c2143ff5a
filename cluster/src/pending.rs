//! Envelope updates and removals waiting for the next engine sync. They are
//! written at least every `sync_interval`, or as soon as `MAX_PENDING` wait;
//! an update of a message removed since is not written at all.

use std::collections::{HashMap, HashSet};

/// Changes pending before a sync is forced.
pub const MAX_PENDING: usize = 1_000;
/// Kept at most while the engine is unreachable; past it the oldest kind of
/// work (updates) is dropped with a warning. A restart's reconciliation
/// deletes rows whose removal was lost this way.
pub const MAX_HELD: usize = 1_000_000;

#[derive(Debug, Default)]
pub struct PendingSync {
    pub updates: HashMap<u64, Vec<u8>>,
    pub removes: HashSet<u64>,
}

impl PendingSync {
    pub fn update(&mut self, id: u64, envelope: Vec<u8>) {
        if !self.removes.contains(&id) {
            self.updates.insert(id, envelope);
        }
    }

    pub fn remove(&mut self, id: u64) {
        self.updates.remove(&id);
        self.removes.insert(id);
    }

    pub fn len(&self) -> usize {
        self.updates.len() + self.removes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Time to write: something waits and the interval is over, or many wait.
    pub fn due(&self, since_last_ms: u64, interval_ms: u64) -> bool {
        !self.is_empty() && (since_last_ms >= interval_ms || self.len() >= MAX_PENDING)
    }

    /// Over the bound while the engine is away: updates are given up (the
    /// taker of a dead node redoes what they recorded; in-flight duplicates).
    pub fn shed(&mut self) -> usize {
        if self.len() <= MAX_HELD {
            return 0;
        }
        let n = self.updates.len();
        self.updates.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_supersedes_update() {
        let mut p = PendingSync::default();
        p.update(1, vec![1]);
        p.remove(1);
        p.update(1, vec![2]);
        assert!(p.updates.is_empty());
        assert_eq!(p.removes.len(), 1);
    }

    #[test]
    fn due_by_interval_or_count() {
        let mut p = PendingSync::default();
        assert!(!p.due(1_000, 100), "nothing to write");
        p.remove(1);
        assert!(!p.due(50, 100));
        assert!(p.due(100, 100));
        for i in 0..MAX_PENDING as u64 {
            p.update(10 + i, vec![]);
        }
        assert!(p.due(0, 100));
    }
}
