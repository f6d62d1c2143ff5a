//! MX rollup on the site owner: the sites of domains whose MX host sets are
//! equal (and whose connections would run the same way: source IP, EHLO
//! name, TLS level, REQUIRETLS) form one [`SiteGroup`]. The shard owners
//! send all their jobs to the group's owner core (the hash of the group
//! key), so the group's connection count and rate limiters are plain
//! counters there, exact without any cross-core traffic.
//!
//! What the group shares: `max_connections`, `max_messages_per_connection`,
//! `connection_rate` and `message_rate` (`[destination.default]`'s) and the
//! owner core. What stays per domain: the ready queue and the connections
//! (each is opened under its domain's MTA-STS, DANE, TLS-RPT and REQUIRETLS
//! decisions, and carries only that domain's mail), slow start and shaping
//! actions. Sites of a group take connection slots in turn: when a slot
//! frees up, the domain that waited longest gets it, and an idle connection
//! ends at once when another domain of its group waits.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::{Rc, Weak};

use super::config::DestinationConfig;
use super::site::Site;
use super::throttle::SiteThrottle;
use super::CoreDelivery;

/// The limits shared by the sites of one group; a site that is not rolled
/// up has a group of its own.
pub(super) struct SiteGroup {
    /// The rollup key (`job::rollup_key`), or the lone site's own key.
    pub(super) key: String,
    /// Its destination's limits (a reload changes them: [`SiteGroup::retune`]).
    pub(super) max_connections: Cell<usize>,
    pub(super) max_per_connection: Cell<usize>,
    pub(super) throttle: RefCell<SiteThrottle>,
    /// The configuration generation the limits are from.
    generation: Cell<u64>,
    /// Connections of all the group's sites, open or opening.
    pub(super) active: Cell<usize>,
    /// Sites with jobs waiting for a connection slot of the group, oldest
    /// first (each at most once: `Site::group_waiting`).
    waiting: RefCell<VecDeque<Rc<Site>>>,
    /// Wakes the group's idle connections when a site starts waiting, so
    /// they close and free their slots instead of idling on.
    pub(super) wake: event_listener::Event,
    /// Cluster mode, shared limits: leased rate permits (`cluster_limits.rs`).
    pub(super) share: super::cluster_limits::GroupShare,
}

impl SiteGroup {
    pub(super) fn new(key: String, dest: &DestinationConfig, generation: u64) -> SiteGroup {
        SiteGroup {
            key,
            max_connections: Cell::new(dest.max_connections.max(1)),
            max_per_connection: Cell::new(dest.max_messages_per_connection.max(1)),
            throttle: RefCell::new(SiteThrottle::new(dest)),
            generation: Cell::new(generation),
            active: Cell::new(0),
            waiting: RefCell::new(VecDeque::new()),
            wake: event_listener::Event::new(),
            share: Default::default(),
        }
    }

    /// Takes the limits of a reloaded configuration (once per generation):
    /// connections over a lowered limit are not cut, new ones wait; the rate
    /// limiters keep what was spent and apply the new rates from the next
    /// permit.
    pub(super) fn retune(&self, dest: &DestinationConfig, generation: u64) {
        if self.generation.replace(generation) == generation {
            return;
        }
        self.max_connections.set(dest.max_connections.max(1));
        self.max_per_connection
            .set(dest.max_messages_per_connection.max(1));
        self.throttle.borrow_mut().retune(dest);
    }

    /// Whether another domain of the group waits for a connection slot.
    pub(super) fn others_waiting(&self) -> bool {
        !self.waiting.borrow().is_empty()
    }
}

impl CoreDelivery {
    /// The group a new site joins: the live group of its rollup key, or a
    /// new one (registered when it is a rollup group).
    pub(super) fn group_for(
        &self,
        rollup: Option<&str>,
        site_key: &str,
        dest: &DestinationConfig,
        generation: u64,
    ) -> Rc<SiteGroup> {
        let Some(key) = rollup else {
            return Rc::new(SiteGroup::new(site_key.to_string(), dest, generation));
        };
        let mut groups = self.groups.borrow_mut();
        if let Some(g) = groups.get(key).and_then(Weak::upgrade) {
            return g;
        }
        let g = Rc::new(SiteGroup::new(key.to_string(), dest, generation));
        groups.insert(key.to_string(), Rc::downgrade(&g));
        g
    }

    /// Forgets a group no site uses any more.
    pub(super) fn drop_group_if_unused(&self, key: &str) {
        let mut groups = self.groups.borrow_mut();
        if groups.get(key).is_some_and(|w| w.strong_count() == 0) {
            groups.remove(key);
        }
    }

    /// Whether one more connection to `site` may start now: below the site's
    /// own limit (slow start, shaping) and below its group's.
    pub(super) fn may_connect(&self, site: &Site) -> bool {
        site.active_connections() < self.site_limit(site)
            && site.group.active.get() < self.group_max(&site.group)
    }

    /// Starts a connection task for `site`, counted in the site and its group.
    pub(super) fn start_connection(self: &Rc<Self>, site: Rc<Site>) {
        site.count_connection();
        site.group.active.set(site.group.active.get() + 1);
        let me = self.clone();
        glommio::spawn_local(async move { me.connection_task(site).await }).detach();
    }

    /// Starts a connection for `site` if it may have one; when only its
    /// group's limit stops it, it waits its turn in the group.
    pub(super) fn connect_or_wait(self: &Rc<Self>, site: &Rc<Site>) {
        if self.may_connect(site) {
            self.start_connection(site.clone());
        } else if site.active_connections() < self.site_limit(site) {
            self.wait_for_group(site);
        }
    }

    /// `site` waits for a connection of another domain of its group to end.
    fn wait_for_group(&self, site: &Rc<Site>) {
        if !site.group_waiting.replace(true) {
            site.group.waiting.borrow_mut().push_back(site.clone());
            site.group.wake.notify(usize::MAX);
            tracing::debug!(site = %site.key, group = %site.group.key, "site group at its connection limit: waiting");
        }
    }

    /// A connection of `group` ended: the domain that waited longest and can
    /// use the slot gets a connection. True when one was started.
    pub(super) fn group_slot_freed(self: &Rc<Self>, group: &SiteGroup) -> bool {
        loop {
            let Some(next) = group.waiting.borrow_mut().pop_front() else {
                return false;
            };
            next.group_waiting.set(false);
            if next.queue.borrow().is_empty() {
                // Its own connections took the jobs (or shaping answered them).
                if next.active_connections() == 0 {
                    self.evict_site(next);
                }
                continue;
            }
            if self.may_connect(&next) {
                self.start_connection(next);
                return true;
            }
            if group.active.get() >= self.group_max(group) {
                // Still full: keep its turn.
                next.group_waiting.set(true);
                group.waiting.borrow_mut().push_front(next);
                return false;
            }
            // Held by its own limit: its own connections serve it.
        }
    }
}
