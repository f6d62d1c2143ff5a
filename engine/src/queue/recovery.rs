//! Start-up: each core walks the spool shards it schedules once, counting
//! every message in its queue's quota and handing it to the scheduler (when
//! delivery is on) in the same pass.

use sluice_spool::{Envelope, MessageId, RecoveryReport, SpoolError};

use super::CoreQueue;

/// The shards core `core` of `cores` schedules: its own, plus those left over
/// from an earlier run with more cores.
pub fn core_shards(shard_count: u16, core: u16, cores: usize) -> Vec<u16> {
    (0..shard_count)
        .filter(|s| usize::from(*s) % cores.max(1) == usize::from(core))
        .collect()
}

/// Walks `shards` once: counts each message in its queue and passes it to
/// `each` (the scheduler's timer set). Returns what it found, for the
/// start-up report.
pub fn recover(
    queue: &CoreQueue,
    shards: &[u16],
    mut each: impl FnMut(MessageId, &Envelope),
) -> Result<RecoveryReport, SpoolError> {
    let mut found = RecoveryReport::default();
    let core = usize::from(queue.core());
    for &shard in shards {
        let report = queue.spool().recover_shard(shard, |id, env| {
            queue.stats().add(core, &env.queue, env.size);
            each(id, env);
        })?;
        found.add(&report);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shard_has_one_core() {
        for cores in 1..6 {
            let mut seen = vec![0; 8];
            for core in 0..cores as u16 {
                for s in core_shards(8, core, cores) {
                    seen[s as usize] += 1;
                }
            }
            assert!(seen.iter().all(|n| *n == 1), "{cores}: {seen:?}");
        }
    }
}
