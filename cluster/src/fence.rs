//! Fencing decisions: is this process still the owner of its node id?
//!
//! Every engine write of a node reads its `sluice_node` row (epoch, state)
//! in the same transaction; a heartbeat updates it only where the epoch is
//! still the node's. Anything else means another process took the node over
//! (a survivor's sweep, or this node restarted elsewhere): it must stop.

/// Exit status of a node that found itself fenced while running, so that a
/// service manager restarts it into a fresh join (EX_TEMPFAIL).
pub const EXIT_FENCED: i32 = 75;

/// The node's state in `sluice_node`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Up,
    Dead,
    Left,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Up => "up",
            NodeState::Dead => "dead",
            NodeState::Left => "left",
        }
    }

    pub fn parse(s: &str) -> Option<NodeState> {
        match s {
            "up" => Some(NodeState::Up),
            "dead" => Some(NodeState::Dead),
            "left" => Some(NodeState::Left),
            _ => None,
        }
    }
}

/// Why a node may no longer write or deliver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fenced: {0}")]
pub struct Fenced(pub String);

/// The epoch check of a write transaction: `row` is the node's
/// `(epoch, state)` as read `FOR SHARE`, `mine` the epoch this process joined with.
pub fn check_epoch(mine: i64, row: Option<(i64, &str)>) -> Result<(), Fenced> {
    match row {
        None => Err(Fenced("node row missing".into())),
        Some((epoch, _)) if epoch != mine => Err(Fenced(format!(
            "epoch is {epoch}, this process joined with {mine}"
        ))),
        Some((_, state)) if NodeState::parse(state) != Some(NodeState::Up) => {
            Err(Fenced(format!("node state is {state}")))
        }
        Some(_) => Ok(()),
    }
}

/// A heartbeat `UPDATE … WHERE node_id = $me AND epoch = $epoch AND state = 'up'`
/// that changed no row means the node was fenced.
pub fn heartbeat_outcome(rows_updated: u64) -> Result<(), Fenced> {
    if rows_updated == 1 {
        Ok(())
    } else {
        Err(Fenced(
            "heartbeat matched no row (epoch bumped or state changed)".into(),
        ))
    }
}

/// Whether a survivor may declare a node dead (the sweep's condition, also
/// in SQL; kept here to be tested with time passed in).
pub fn sweepable(state: NodeState, lease_until_ms: i64, now_ms: i64, grace_ms: i64) -> bool {
    state == NodeState::Up && lease_until_ms.saturating_add(grace_ms) < now_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_epoch_and_up_writes() {
        assert_eq!(check_epoch(4, Some((4, "up"))), Ok(()));
    }

    #[test]
    fn bumped_epoch_or_not_up_is_fenced() {
        assert!(check_epoch(4, Some((5, "dead"))).is_err());
        assert!(check_epoch(4, Some((5, "up"))).is_err());
        assert!(check_epoch(4, Some((4, "dead"))).is_err());
        assert!(check_epoch(4, None).is_err());
    }

    #[test]
    fn heartbeat_that_updates_nothing_is_fenced() {
        assert!(heartbeat_outcome(1).is_ok());
        assert!(heartbeat_outcome(0).is_err());
    }

    #[test]
    fn sweep_only_past_lease_and_grace() {
        assert!(!sweepable(NodeState::Up, 10_000, 10_000, 0));
        assert!(sweepable(NodeState::Up, 10_000, 10_001, 0));
        assert!(!sweepable(NodeState::Up, 10_000, 10_001, 5));
        assert!(!sweepable(NodeState::Dead, 0, 10_001, 0));
    }

    #[test]
    fn states_round_trip() {
        for s in [NodeState::Up, NodeState::Dead, NodeState::Left] {
            assert_eq!(NodeState::parse(s.as_str()), Some(s));
        }
        assert_eq!(NodeState::parse("zombie"), None);
    }
}
