//! What a (re)joining node does with its recovered spool, given what the
//! engine says (set logic only; the node thread carries it out).
//!
//! * `taken`: ids of this node that a survivor imported while it was away
//!   (`sluice_taken`). Delivered by the survivor: dropped here, unsent.
//! * `engine`: ids the replica log holds for this node (`sluice_message`).
//! * A local message in neither was never replicated (accepted while the
//!   engine was down, with `engine_down = "accept-local"`): nobody else can
//!   have it, so it is replicated now, before dispatch starts.
//! * An engine row with no local message was removed here (delivered) but the
//!   removal had not reached the engine: deleted there, or a later takeover
//!   would send it again.

use std::collections::HashSet;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Remove locally without an attempt (`cluster: dropped, taken over`).
    pub drop_local: Vec<u64>,
    /// Copy to the engine before dispatch.
    pub replicate: Vec<u64>,
    /// Delete from the engine.
    pub delete_remote: Vec<u64>,
}

pub fn plan(local: &[u64], engine: &HashSet<u64>, taken: &HashSet<u64>) -> Plan {
    let mut p = Plan::default();
    let mut local_set = HashSet::with_capacity(local.len());
    for &id in local {
        local_set.insert(id);
        if taken.contains(&id) {
            p.drop_local.push(id);
        } else if !engine.contains(&id) {
            p.replicate.push(id);
        }
    }
    p.delete_remote = engine
        .iter()
        .filter(|id| !local_set.contains(id))
        .copied()
        .collect();
    p.delete_remote.sort_unstable();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u64]) -> HashSet<u64> {
        v.iter().copied().collect()
    }

    #[test]
    fn taken_over_messages_are_dropped_not_sent() {
        let p = plan(&[1, 2, 3], &set(&[3]), &set(&[1, 2]));
        assert_eq!(p.drop_local, vec![1, 2]);
        assert!(p.replicate.is_empty());
        assert!(p.delete_remote.is_empty());
    }

    #[test]
    fn unreplicated_local_messages_are_replicated() {
        let p = plan(&[5, 6], &set(&[5]), &set(&[]));
        assert_eq!(p.replicate, vec![6]);
        assert!(p.drop_local.is_empty());
    }

    #[test]
    fn engine_rows_removed_here_are_deleted_there() {
        let p = plan(&[7], &set(&[7, 8, 9]), &set(&[]));
        assert_eq!(p.delete_remote, vec![8, 9]);
    }

    #[test]
    fn a_node_that_was_not_away_changes_nothing() {
        let p = plan(&[1, 2], &set(&[1, 2]), &set(&[]));
        assert_eq!(p, Plan::default());
    }
}
