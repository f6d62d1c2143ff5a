//! Response-driven shaping in the relay: the actions in force (rules that
//! fired, and operator suspensions), persisted in `<spool.path>/shaping`, and
//! what the site owner does with replies and actions.
//!
//! * The rules, their windows and slow start are `sluice_policy::shaping`'s
//!   (sans-IO). Each core keeps the windows of the sites it owns (a site lives
//!   on one core, so a site's count is exact).
//! * A fired action goes into one process-wide list ([`Shaping`]): a snapshot
//!   every core reads without a lock, so it applies at once to the
//!   destination's sites on every core. A suspension is also sent to every
//!   core as an operator suspension would be, so the shard owners park the
//!   destination's mail instead of dispatching it.
//! * The list is written to a [`RecordTable`] on a blocking thread (never on an
//!   executor) and read back at start: actions outlive a restart. Operator
//!   suspensions (`sluice queue suspend`) are stored the same way.
//! * A management thread ends expired actions (logged, gauge updated); the API
//!   lists and cancels them.

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use sluice_policy::bounce::{Enhanced, ReplyParts};
use sluice_policy::shaping::{Action, Observed, Shaper, ShapingRules, SlowStart};
use sluice_policy::MultiLimiter;
use sluice_spool::{RecordTable, Reply, SpoolError};

use super::admin::{normalize_destination, Command};
use super::job::{Job, JobResult, Outcome};
use super::site::Site;
use super::{now_ms, CoreDelivery};

/// Directory (and table) name under the spool path.
pub const SHAPING_DIR: &str = "shaping";
/// The rule name of operator suspensions.
pub const OPERATOR: &str = "operator";
/// Most actions in force at once; a rule firing beyond it is logged, not kept.
pub const MAX_ACTIVE: usize = 100_000;

/// One action in force, as listed and stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveAction {
    pub id: String,
    /// The rule that fired, or "operator".
    pub rule: String,
    /// `Action::name()`.
    pub action: String,
    /// `Action::value()`: "2", "10/m" or "".
    #[serde(default)]
    pub value: String,
    /// The destination (domain, or "route:NAME") it applies to.
    pub destination: String,
    /// The site key (source IP, EHLO name…) the reply came from.
    #[serde(default)]
    pub site: String,
    /// The reply that made the rule fire.
    #[serde(default)]
    pub reply: String,
    pub created_unix_ms: u64,
    pub until_unix_ms: u64,
}

impl ActiveAction {
    fn action(&self) -> Option<Action> {
        Action::from_parts(&self.action, &self.value)
    }
}

/// The rules in force and the reload that stored them.
struct Rules {
    generation: u64,
    rules: ShapingRules,
}

/// Process-wide shaping state.
pub struct Shaping {
    /// Replaced by a reload; the actions already taken stay in force.
    rules: ArcSwap<Rules>,
    /// Initial concurrency under slow start (0: off; the config refuses 0
    /// as an initial window).
    slow_start: AtomicU32,
    table: RecordTable,
    active: ArcSwap<Vec<ActiveAction>>,
    /// Orders table writes against cancels (see [`Shaping::persist`]).
    writes: Mutex<()>,
    next: AtomicU64,
    /// Cluster mode with shared actions: this node's id, so the ids of the
    /// actions it takes are unique in the cluster.
    id_prefix: OnceLock<String>,
}

static INSTALLED: OnceLock<Arc<Shaping>> = OnceLock::new();

/// The shaping state, once the relay opened it.
pub fn installed() -> Option<&'static Arc<Shaping>> {
    INSTALLED.get()
}

pub fn install(s: Arc<Shaping>) {
    let _ = INSTALLED.set(s);
}

fn lock(m: &Mutex<()>) -> std::sync::MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shaping {
    /// Opens the table under `spool_path` and loads the actions still in
    /// force (expired ones are removed). Blocking.
    pub fn open(
        spool_path: &Path,
        rules: ShapingRules,
        slow_start: Option<u32>,
        now: u64,
    ) -> Result<Shaping, SpoolError> {
        let table = RecordTable::open(spool_path, SHAPING_DIR)?;
        let mut active = Vec::new();
        for (key, value) in table.all()? {
            match serde_json::from_slice::<ActiveAction>(&value) {
                Ok(a) if a.until_unix_ms > now && a.action().is_some() => active.push(a),
                Ok(_) => table.delete(&key)?,
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "shaping: unreadable stored action dropped");
                    table.delete(&key)?;
                }
            }
        }
        if !active.is_empty() {
            tracing::info!(actions = active.len(), "shaping: actions restored");
        }
        crate::metrics::shaping_active(active.len());
        Ok(Shaping {
            rules: ArcSwap::from_pointee(Rules {
                generation: 0,
                rules,
            }),
            slow_start: AtomicU32::new(slow_start.unwrap_or(0)),
            table,
            active: ArcSwap::from_pointee(active),
            writes: Mutex::new(()),
            next: AtomicU64::new(0),
            id_prefix: OnceLock::new(),
        })
    }

    /// A reload's rules and slow start. Actions in force stay; the rules'
    /// windows start counting again (on each core, at its next reply).
    pub fn reconfigure(&self, rules: ShapingRules, slow_start: Option<u32>) {
        let generation = self.rules.load().generation + 1;
        self.rules.store(Arc::new(Rules { generation, rules }));
        self.slow_start
            .store(slow_start.unwrap_or(0), Ordering::Relaxed);
    }

    /// The actions in force at `now`.
    pub fn list(&self, now: u64) -> Vec<ActiveAction> {
        self.active
            .load()
            .iter()
            .filter(|a| a.until_unix_ms > now)
            .cloned()
            .collect()
    }

    /// Whether a `suspend-source-ip` action in force holds source address
    /// `ip` for `target`'s destination (its site key names the address).
    pub(super) fn source_suspended(
        &self,
        target: &super::job::Target,
        ip: std::net::IpAddr,
        now: u64,
    ) -> bool {
        let raw = target.destination();
        let destination = normalize_destination(&raw);
        let prefix = format!("{raw}|{ip}|");
        self.active.load().iter().any(|a| {
            a.until_unix_ms > now
                && a.destination == destination
                && a.action == Action::SuspendSourceIp.name()
                && a.site.starts_with(&prefix)
        })
    }

    /// Suspensions in force (destination, until), for every core's table at start.
    pub fn suspensions(&self, now: u64) -> Vec<(String, u64)> {
        self.list(now)
            .into_iter()
            .filter(|a| a.action == Action::Suspend.name())
            .map(|a| (a.destination, a.until_unix_ms))
            .collect()
    }

    fn new_id(&self, now: u64) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        match self.id_prefix.get() {
            Some(p) => format!("{p}-{now:x}-{n}"),
            None => format!("{now:x}-{n}"),
        }
    }

    /// Cluster mode: action ids start with the node's id.
    pub fn set_id_prefix(&self, node: &str) {
        let _ = self.id_prefix.set(node.to_string());
    }

    /// An action another node took (`cluster_actions`): in force here too,
    /// and stored. False when already in force (or the list is full). Blocking.
    pub fn adopt(&self, action: &ActiveAction) -> Result<bool, SpoolError> {
        if !self.insert(action) {
            return Ok(false);
        }
        self.persist(action)?;
        Ok(true)
    }

    /// Adds to the list in memory (non-blocking); false when an action of the
    /// same rule is already in force for the same target, or the list is full.
    fn insert(&self, action: &ActiveAction) -> bool {
        let mut added = false;
        self.active.rcu(|list| {
            added = false;
            let dup = list.iter().any(|a| {
                a.rule == action.rule
                    && a.destination == action.destination
                    && (a.action != Action::SuspendSourceIp.name() || a.site == action.site)
                    && a.until_unix_ms > action.created_unix_ms
            });
            if dup || list.len() >= MAX_ACTIVE {
                return Arc::clone(list);
            }
            let mut next: Vec<ActiveAction> =
                list.iter().filter(|a| a.id != action.id).cloned().collect();
            next.push(action.clone());
            added = true;
            Arc::new(next)
        });
        if added {
            crate::metrics::shaping_active(self.active.load().len());
        }
        added
    }

    /// Writes an action to the table if it is still in force in memory (a
    /// cancel may have come first). Blocking.
    fn persist(&self, action: &ActiveAction) -> Result<(), SpoolError> {
        let _w = lock(&self.writes);
        if !self.active.load().iter().any(|a| a.id == action.id) {
            return Ok(());
        }
        let value = serde_json::to_vec(action).map_err(|e| SpoolError::Io(e.to_string()))?;
        self.table.put(&action.id, &value)
    }

    /// Removes these actions from memory and the table. Blocking.
    fn remove_where(&self, pred: impl Fn(&ActiveAction) -> bool) -> Vec<ActiveAction> {
        let mut removed = Vec::new();
        self.active.rcu(|list| {
            removed = list.iter().filter(|a| pred(a)).cloned().collect();
            Arc::new(
                list.iter()
                    .filter(|a| !pred(a))
                    .cloned()
                    .collect::<Vec<_>>(),
            )
        });
        if removed.is_empty() {
            return removed;
        }
        crate::metrics::shaping_active(self.active.load().len());
        let _w = lock(&self.writes);
        for a in &removed {
            if let Err(e) = self.table.delete(&a.id) {
                tracing::warn!(id = %a.id, error = %e, "shaping: stored action not removed");
            }
        }
        removed
    }

    /// Cancels one action by id (operator); blocking. The suspension it
    /// made, if any, is lifted on every core by the caller.
    pub fn cancel(&self, id: &str) -> Option<ActiveAction> {
        let removed = self.remove_where(|a| a.id == id).pop();
        if let Some(a) = &removed {
            tracing::info!(id = %a.id, rule = %a.rule, action = %a.action, destination = %a.destination, "shaping action cancelled");
        }
        removed
    }

    /// Ends every suspension of `destination` (an operator resume); blocking.
    pub fn resume_destination(&self, destination: &str) -> usize {
        let removed = self.remove_where(|a| {
            a.destination == destination
                && (a.action == Action::Suspend.name()
                    || a.action == Action::SuspendSourceIp.name())
        });
        for a in &removed {
            tracing::info!(id = %a.id, rule = %a.rule, action = %a.action, destination = %a.destination, "shaping action cancelled (destination resumed)");
        }
        removed.len()
    }

    /// Records an operator suspension so it survives a restart; blocking.
    pub fn operator_suspend(&self, destination: &str, until: u64) -> Result<(), SpoolError> {
        let now = now_ms();
        let action = ActiveAction {
            id: format!("{OPERATOR}:{destination}"),
            rule: OPERATOR.into(),
            action: Action::Suspend.name().into(),
            value: String::new(),
            destination: destination.to_string(),
            site: String::new(),
            reply: String::new(),
            created_unix_ms: now,
            until_unix_ms: until,
        };
        // Replaces an earlier suspension by the operator.
        self.active.rcu(|list| {
            let mut next: Vec<ActiveAction> =
                list.iter().filter(|a| a.id != action.id).cloned().collect();
            next.push(action.clone());
            Arc::new(next)
        });
        crate::metrics::shaping_active(self.active.load().len());
        self.persist(&action)
    }

    /// Removes the actions that ran out (logged); blocking.
    pub fn expire(&self, now: u64) {
        for a in self.remove_where(|a| a.until_unix_ms <= now) {
            tracing::info!(id = %a.id, rule = %a.rule, action = %a.action, destination = %a.destination, site = %a.site, "shaping action expired");
        }
    }

    /// Starts the thread that ends expired actions.
    pub fn start_expiry(self: &Arc<Self>) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("shaping-expiry".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(250));
                me.expire(now_ms());
            })
            .map(|_| ())
    }
}

/// What the actions in force do to one site now.
#[derive(Debug, Default)]
pub(super) struct SiteState {
    /// No connection until then, by this rule.
    pub suspended: Option<(u64, String)>,
    /// Mail for the site fails with this reply.
    pub bounce: Option<(String, String)>,
    pub connections: Option<u32>,
    /// (action id, rate)
    pub rate: Option<(String, sluice_policy::Rate)>,
    /// Id of a backoff action in force.
    pub backoff: Option<String>,
}

fn site_state(list: &[ActiveAction], site: &Site, now: u64) -> SiteState {
    let destination = normalize_destination(&site.target.destination());
    let mut st = SiteState::default();
    for a in list {
        if a.until_unix_ms <= now || a.destination != destination || a.rule == OPERATOR {
            continue;
        }
        match a.action() {
            Some(Action::Suspend) => st.suspended = Some((a.until_unix_ms, a.rule.clone())),
            Some(Action::SuspendSourceIp) if a.site == site.key => {
                st.suspended = Some((a.until_unix_ms, a.rule.clone()))
            }
            Some(Action::Bounce) => st.bounce = Some((a.rule.clone(), a.reply.clone())),
            Some(Action::Connections(n)) => {
                st.connections = Some(st.connections.map_or(n, |c| c.min(n)))
            }
            Some(Action::MessageRate(r)) => st.rate = Some((a.id.clone(), r)),
            Some(Action::Backoff) => st.backoff = Some(a.id.clone()),
            _ => {}
        }
    }
    st
}

/// A site's concurrency as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteConcurrency {
    pub site: String,
    pub destination: String,
    pub core: u16,
    /// Connections allowed now (slow start, actions, configuration).
    pub limit: usize,
    /// The configured limit (`max_connections`).
    pub max: usize,
    /// Connections open or opening now.
    pub active: usize,
    /// Jobs waiting at the site.
    pub queued: usize,
    /// Its MX rollup group (`docs/providers.md`); its own key when alone.
    pub group: String,
    /// Connections of the whole group, open or opening.
    pub group_active: usize,
}

/// Per-site shaping state kept by the site owner.
#[derive(Default)]
pub(super) struct SiteShaping {
    /// Slow start (or backoff) window; None when neither applies.
    pub slow: RefCell<Option<SlowStart>>,
    /// The message-rate action in force and its limiter.
    rate: RefCell<Option<(String, MultiLimiter)>>,
    /// Backoff actions already applied (halved once each).
    backoffs: RefCell<HashSet<String>>,
}

impl SiteShaping {
    pub fn new(slow_start: bool, initial: u32, max: usize) -> SiteShaping {
        SiteShaping {
            slow: RefCell::new(
                slow_start.then(|| SlowStart::new(initial, u32::try_from(max).unwrap_or(u32::MAX))),
            ),
            ..Default::default()
        }
    }
}

thread_local! {
    /// This core's windows: the sites it owns.
    static SHAPER: RefCell<(u64, Shaper)> = RefCell::new((0, Shaper::default()));
}

/// RFC 3339 time of unix ms, for replies and logs.
fn rfc3339(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn enhanced_of(reply: &Reply) -> Option<Enhanced> {
    reply.status.map(|s| Enhanced {
        class: s.class,
        subject: s.subject,
        detail: s.detail,
    })
}

impl CoreDelivery {
    /// The actions in force for the site now (default when shaping is off).
    pub(super) fn shaping_state(&self, site: &Site) -> SiteState {
        match installed() {
            Some(s) => site_state(&s.active.load(), site, now_ms()),
            None => SiteState::default(),
        }
    }

    /// Connections the site may have now: the configured limit, lowered by
    /// slow start and a `connections` action.
    pub(super) fn site_limit(&self, site: &Site) -> usize {
        let mut limit = site.max_connections().min(self.group_max(&site.group));
        if let Some(slow) = site.shaping.slow.borrow().as_ref() {
            limit = limit.min(slow.limit() as usize);
        }
        if let Some(n) = self.shaping_state(site).connections {
            limit = limit.min(n as usize);
        }
        limit.max(1)
    }

    /// Wait imposed by a `message-rate` action (None: send now, counted).
    pub(super) fn shaping_rate_wait(&self, site: &Site, st: &SiteState) -> Option<Duration> {
        let mut rate = site.shaping.rate.borrow_mut();
        match &st.rate {
            None => {
                *rate = None;
                None
            }
            Some((id, r)) => {
                if rate.as_ref().is_none_or(|(have, _)| have != id) {
                    *rate = Some((id.clone(), MultiLimiter::new(vec![*r])));
                }
                let (_, limiter) = rate.as_mut()?;
                limiter
                    .try_acquire(now_ms())
                    .err()
                    .map(Duration::from_millis)
            }
        }
    }

    /// When a suspension or bounce action holds the site: every job queued
    /// there is answered without a connection (deferred until the suspension
    /// ends, or failed), and true is returned.
    pub(super) fn shaping_hold_site(self: &Rc<Self>, site: &Site, st: &SiteState) -> bool {
        let result_of: Box<dyn Fn(&Job) -> JobResult> = if let Some((until, rule)) = &st.suspended {
            let text = format!(
                "delivery to {} suspended by shaping rule {rule} until {}",
                site.target.destination(),
                rfc3339(*until)
            );
            Box::new(move |job| {
                super::job::deferred_all(job, Reply::new(451, "4.7.0", text.clone()))
            })
        } else if let Some((rule, reply)) = &st.bounce {
            let text = format!(
                "delivery to {} stopped by shaping rule {rule} (after: {reply})",
                site.target.destination()
            );
            Box::new(move |job| JobResult {
                id: job.id,
                outcomes: job
                    .recipients
                    .iter()
                    .map(|r| {
                        (
                            r.index,
                            Outcome::Failed(Reply::new(550, "5.7.1", text.clone())),
                        )
                    })
                    .collect(),
                remote_mta: None,
                peer_dsn: false,
                lmtp: false,
            })
        } else {
            return false;
        };
        let jobs: Vec<Box<Job>> = site.queue.borrow_mut().drain().map(|q| q.job).collect();
        for job in jobs {
            let result = result_of(&job);
            self.log_attempt(&job, None, None, &result);
            self.report(&job, result);
        }
        true
    }

    /// Feeds the replies of one job (or of a failed connection) to the rules
    /// and slow start, and carries out what fired.
    pub(super) fn shaping_observe(self: &Rc<Self>, site: &Site, result: &JobResult) {
        let delivered = result
            .outcomes
            .iter()
            .any(|(_, o)| matches!(o, Outcome::Delivered(_)));
        let deferred = result
            .outcomes
            .iter()
            .any(|(_, o)| matches!(o, Outcome::Deferred(_)));
        let backoff = self.shaping_state(site).backoff.is_some();
        if let Some(slow) = site.shaping.slow.borrow_mut().as_mut() {
            if deferred {
                slow.deferral();
                tracing::debug!(site = %site.key, limit = slow.limit(), "slow start: deferral, concurrency lowered");
            } else if delivered {
                slow.success(backoff);
            }
        }
        let Some(shaping) = installed() else { return };
        let rules = shaping.rules.load();
        if rules.rules.is_empty() {
            return;
        }
        let destination = normalize_destination(&site.target.destination());
        let now = now_ms();
        // One count per distinct reply of the job (a 421 at MAIL is one
        // reply, whatever the number of recipients).
        let mut seen: Vec<&Reply> = Vec::new();
        for (_, outcome) in &result.outcomes {
            let reply = outcome.reply();
            if matches!(outcome, Outcome::Delivered(_)) || seen.contains(&reply) {
                continue;
            }
            seen.push(reply);
            let observed = Observed {
                reply: ReplyParts {
                    code: reply.code,
                    enhanced: enhanced_of(reply),
                    text: &reply.text,
                },
                class: Some(crate::bounce::classify(reply)),
            };
            let fired = SHAPER.with(|s| {
                let mut s = s.borrow_mut();
                if s.0 != rules.generation {
                    // New rules: windows counted under the old ones (by
                    // rule index) would be credited to the wrong rule.
                    *s = (rules.generation, Shaper::default());
                }
                s.1.observe(&rules.rules, &site.key, &destination, &observed, now)
            });
            for f in fired {
                let action = ActiveAction {
                    id: shaping.new_id(now),
                    rule: f.rule,
                    action: f.action.name().into(),
                    value: f.action.value(),
                    destination: destination.clone(),
                    site: site.key.clone(),
                    reply: reply.to_string(),
                    created_unix_ms: now,
                    until_unix_ms: f.until_ms,
                };
                self.shaping_take(f.action, action);
            }
        }
    }

    fn shaping_take(self: &Rc<Self>, kind: Action, action: ActiveAction) {
        let Some(shaping) = installed() else { return };
        if !shaping.insert(&action) {
            return;
        }
        crate::metrics::shaping_action(&action.rule, kind.name());
        tracing::info!(
            id = %action.id, rule = %action.rule, action = %kind, destination = %action.destination,
            site = %action.site, reply = %action.reply, until = %rfc3339(action.until_unix_ms),
            core = self.core, "shaping action taken"
        );
        // Cluster mode: the other nodes take it too.
        crate::cluster_actions::shaping_taken(&action);
        if kind == Action::Suspend {
            // Every shard owner parks the destination's mail.
            for tx in self.shared.admin.senders() {
                let (reply, _) = mpsc::channel();
                let _ = tx.unbounded_send(Command::Suspend {
                    destination: action.destination.clone(),
                    until_ms: action.until_unix_ms,
                    reply,
                });
            }
        }
        let id = action.id.clone();
        let spooled = glommio::executor().spawn_blocking(move || shaping.persist(&action));
        glommio::spawn_local(async move {
            match spooled.await {
                Ok(()) => tracing::debug!(id = %id, "shaping action stored"),
                Err(e) => {
                    tracing::warn!(id = %id, error = %e, "shaping: action not stored (ends at a restart)")
                }
            }
        })
        .detach();
    }

    /// A backoff action in force halves the site's concurrency once (slow
    /// start takes over from the configured limit when it was off).
    pub(super) fn shaping_apply_backoff(&self, site: &Site, st: &SiteState) {
        let Some(id) = &st.backoff else { return };
        if !site.shaping.backoffs.borrow_mut().insert(id.clone()) {
            return;
        }
        let mut slow = site.shaping.slow.borrow_mut();
        let s = slow.get_or_insert_with(|| {
            let max = u32::try_from(site.max_connections()).unwrap_or(u32::MAX);
            SlowStart::new(max, max)
        });
        s.deferral();
        tracing::info!(site = %site.key, limit = s.limit(), "shaping backoff: concurrency halved");
    }

    /// This core's sites whose concurrency slow start or an action lowers
    /// (or could: slow start on).
    pub(super) fn shaping_sites(&self) -> Vec<SiteConcurrency> {
        let sites: Vec<Rc<Site>> = self.sites.borrow().values().cloned().collect();
        let mut out: Vec<SiteConcurrency> = sites
            .iter()
            .filter(|s| {
                s.shaping.slow.borrow().is_some() || self.shaping_state(s).connections.is_some()
            })
            .map(|s| SiteConcurrency {
                site: s.key.clone(),
                destination: s.target.destination(),
                core: self.core,
                limit: self.site_limit(s),
                max: s.max_connections(),
                active: s.active_connections(),
                queued: s.queue.borrow().len(),
                group: s.group.key.clone(),
                group_active: s.group.active.get(),
            })
            .collect();
        out.sort_by(|a, b| a.site.cmp(&b.site));
        out
    }

    /// Suspensions stored before a restart go back into this core's table.
    pub(super) fn shaping_restore(&self) {
        let Some(shaping) = installed() else { return };
        for (destination, until) in shaping.suspensions(now_ms()) {
            self.admin_restore_suspension(destination, until);
        }
    }

    /// Slow start's initial window (None: off).
    pub(super) fn slow_start(&self) -> Option<u32> {
        installed()
            .map(|s| s.slow_start.load(Ordering::Relaxed))
            .filter(|&n| n > 0)
    }
}
