//! Shared limits on the site owner (cluster mode, `[cluster] shared_limits`,
//! docs/cluster.md "(b)"): a connection slot from the engine per new
//! connection, and message-rate permits leased in blocks, both asked of the
//! sluice-cluster thread and awaited here under `engine_timeout`. The local
//! limits keep working as before; the shared ones are extra permits.
//!
//! With shared limits off, `DeliveryShared::limits` is None: each step below
//! is that one test.

use std::rc::Rc;
use std::time::Duration;

use futures_channel::oneshot;
use glommio::timer::Timer;
use sluice_cluster::limits::{self, PermitBank, Spend};
use sluice_cluster::shared::{PermitAnswer, RateKey, SharedLimits, Slot, SlotAnswer};
use sluice_policy::{MultiLimiter, Rate};

use super::rollup::SiteGroup;
use super::site::Site;
use super::{now_ms, CoreDelivery};

/// A site at its cluster-wide connection limit asks again after this long
/// (slots free on other nodes without telling this one).
const SLOT_RETRY: Duration = Duration::from_millis(250);
/// Another connection of the group is asking for permits: look again then.
const PERMIT_RETRY: Duration = Duration::from_millis(20);

/// What a new connection does about the shared connection limit.
pub(super) enum SlotStep {
    /// Holds this slot while it lives.
    Taken(Slot),
    /// No shared limit (off, or the engine unreachable: local limits).
    Local,
    /// Every slot is held: ask again after this long.
    Wait(Duration),
}

/// What a message does about the shared message rate.
pub(super) enum PermitStep {
    Go,
    Wait(Duration),
}

/// Per group: the leased permits and the fallback limiter.
#[derive(Default)]
pub(super) struct GroupShare {
    bank: std::cell::RefCell<PermitBank>,
    /// The local rate while the engine is unreachable (nodes up it was cut for).
    fallback: std::cell::RefCell<Option<(usize, MultiLimiter)>>,
}

/// Awaits a reply from the cluster thread, at most `limit`.
async fn bounded<T>(rx: oneshot::Receiver<T>, limit: Duration) -> Option<T> {
    futures_lite::future::or(async { rx.await.ok() }, async {
        Timer::new(limit).await;
        None
    })
    .await
}

fn engine_key(group: &SiteGroup) -> String {
    format!("site:{}", group.key)
}

impl CoreDelivery {
    /// The group's connection limit now: the configured one, or its share
    /// while the engine is unreachable (`cluster.fallback_share`).
    pub(super) fn group_max(&self, group: &SiteGroup) -> usize {
        let max = group.max_connections.get();
        match &self.shared.limits {
            Some(l) if l.fallback() => limits::fallback_connections(max, l.nodes_up(), l.share),
            _ => max,
        }
    }

    /// Before a new connection: a cluster slot of the site's group.
    pub(super) async fn cluster_slot(&self, site: &Site) -> SlotStep {
        let Some(l) = &self.shared.limits else {
            return SlotStep::Local;
        };
        if l.fallback() {
            return SlotStep::Local;
        }
        let Some(rx) = l.take_slot(&engine_key(&site.group), site.group.max_connections.get())
        else {
            return SlotStep::Local;
        };
        match bounded(rx, l.timeout).await {
            Some(SlotAnswer::Taken(slot)) => {
                tracing::debug!(site = %site.key, slot = slot.number(), "cluster connection slot taken");
                SlotStep::Taken(slot)
            }
            Some(SlotAnswer::Full) => SlotStep::Wait(SLOT_RETRY),
            Some(SlotAnswer::Unavailable) | None => SlotStep::Local,
        }
    }

    /// Before a message: a permit of the group's shared message rate.
    pub(super) async fn cluster_permit(&self, site: &Site) -> PermitStep {
        let Some(l) = &self.shared.limits else {
            return PermitStep::Go;
        };
        let rates = site.group.throttle.borrow().message_rates();
        if rates.is_empty() {
            return PermitStep::Go;
        }
        let share = &site.group.share;
        if l.fallback() {
            return fallback_permit(l, share, &rates);
        }
        let spend = share.bank.borrow_mut().spend();
        match spend {
            Spend::Spent => PermitStep::Go,
            Spend::SpentAskMore => {
                // The next lease, in the background: this message goes now.
                if let Some(rx) = ask(l, &site.group, &rates) {
                    let group = site.group.clone();
                    let timeout = l.timeout;
                    glommio::spawn_local(async move {
                        let n = match bounded(rx, timeout).await {
                            Some(PermitAnswer::Granted(n)) => n,
                            _ => 0,
                        };
                        group.share.bank.borrow_mut().granted(n);
                    })
                    .detach();
                } else {
                    share.bank.borrow_mut().granted(0);
                }
                PermitStep::Go
            }
            Spend::Ask => {
                if !share.bank.borrow_mut().asking() {
                    // Another connection of the group is asking.
                    return PermitStep::Wait(PERMIT_RETRY);
                }
                let answer = match ask(l, &site.group, &rates) {
                    Some(rx) => bounded(rx, l.timeout).await,
                    None => None,
                };
                match answer {
                    Some(PermitAnswer::Granted(n)) => {
                        let mut bank = share.bank.borrow_mut();
                        bank.granted(n);
                        // One for this message. Should that leave half or
                        // less, the next message asks (not this one: the
                        // call just came back), so the ask `spend` may have
                        // started is ended again with `granted(0)`.
                        match bank.spend() {
                            Spend::Ask => PermitStep::Wait(PERMIT_RETRY),
                            _ => {
                                bank.granted(0);
                                PermitStep::Go
                            }
                        }
                    }
                    Some(PermitAnswer::Wait(d)) => {
                        share.bank.borrow_mut().granted(0);
                        PermitStep::Wait(d)
                    }
                    Some(PermitAnswer::Unavailable) | None => {
                        share.bank.borrow_mut().granted(0);
                        fallback_permit(l, share, &rates)
                    }
                }
            }
        }
    }
}

/// The call for the group's next lease: `n` of each rate.
fn ask(
    l: &SharedLimits,
    group: &Rc<SiteGroup>,
    rates: &[Rate],
) -> Option<oneshot::Receiver<PermitAnswer>> {
    let lease_ms = u64::try_from(l.permit_lease.as_millis()).unwrap_or(u64::MAX);
    let want = rates
        .iter()
        .map(|r| limits::permit_batch(r.count, r.per_ms, lease_ms, l.nodes_up()))
        .min()
        .unwrap_or(1);
    let keys = rates
        .iter()
        .map(|r| RateKey {
            key: format!("{}:msgs:{}/{}", engine_key(group), r.count, r.per_ms),
            count: r.count,
            per_ms: r.per_ms,
        })
        .collect();
    l.take_permits(keys, want)
}

/// The local rate while the engine is unreachable: the group's rates cut
/// to this node's share (`cluster.fallback_share`).
fn fallback_permit(l: &SharedLimits, share: &GroupShare, rates: &[Rate]) -> PermitStep {
    let nodes = l.nodes_up();
    let mut fb = share.fallback.borrow_mut();
    if fb.as_ref().is_none_or(|(n, _)| *n != nodes) {
        let cut = rates
            .iter()
            .map(|r| {
                let (count, per_ms) = limits::fallback_rate(r.count, r.per_ms, nodes, l.share);
                Rate { count, per_ms }
            })
            .collect();
        *fb = Some((nodes, MultiLimiter::new(cut)));
    }
    match fb.as_mut().map(|(_, m)| m.try_acquire(now_ms())) {
        Some(Err(ms)) => PermitStep::Wait(Duration::from_millis(ms.max(1))),
        _ => PermitStep::Go,
    }
}
