//! Configuration reload (SIGHUP, and the management API's reload call).
//!
//! A reload re-reads the file the relay was started with, applies the same
//! `--set` overrides, and validates all of it (keys, cross-key checks,
//! certificates and keys, rules) before anything changes. Then it swaps in what
//! can change while running; the rest keeps its running value and is named in
//! the summary as needing a restart. A bad file changes nothing.
//!
//! Reloadable: listener certificates and keys, the per-session listener settings
//! (greeting, hostname, protocol, auth_plaintext, message/recipient/line/error
//! limits, bare_newline, nul_bytes, max_message_line_length, untrusted_*), relay
//! networks and local domains, auth users, the
//! `[[rule]]` list (queue and route choice), and `[dkim]` (signers and rules;
//! every reload reads the key files again, so a rotated key needs only a
//! SIGHUP, and a key that does not load refuses the reload), and the bounce
//! classification rules file (`delivery.bounce_rules`, re-read every time). New sessions and new TLS handshakes
//! see the new values; sessions already open keep what they started with.
//!
//! Delivery: `[route.*]`, `[queue.*]` (not the quotas), `[destination.*]`,
//! `[host.*]`, `[source_ip.*]`, `[provider.*]` with the presets, the
//! `[delivery]` limits and timeouts, `[shaping]` (rules, slow start), and the
//! egress pools, warm-up schedules and tenants (`[pool.*]`, `[warmup.*]`,
//! `[tenant.*]`, `[tenants]`). The cores read one `DeliveryConfig` snapshot;
//! its `generation` tells sites and limiters built under an older one to
//! retune (keeping what they spent). Queued mail is routed again at its next
//! attempt; mail of a removed queue follows `[queue.default]`. Shaping actions
//! in force stay; warm-up counts are kept per address and destination, so a
//! reload never gives a member a fresh budget; tenant rate limiters keep what
//! they spent (`QueueAdmission::set_tenants`).
//!
//! Needs a restart (kept running, named in the summary): listener addresses,
//! TLS mode, proxy and connection settings, `server.*`, `[spool]`, `[log]`,
//! `[admin]`, `[dns]`, the AUTH failure limits, queue quotas
//! (`max_messages`, `max_bytes`), route `tls_client_cert`/`tls_client_key`,
//! `delivery.enabled`, `ehlo_name`, `tls_ca_file`, `mta_sts*` and the
//! `bounce_rules` path, and the sections read when the relay starts:
//! `[[limit]]`, `[ban]`, `[dnsbl]` and `[greylist]`.
//!
//! Swaps are `ArcSwap` stores: readers (a connection opening, a RCPT choosing a
//! queue, a dispatch choosing a route, a site's next step) do one atomic load,
//! no lock.

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use sluice_policy::shaping::ShapingRules;
use sluice_policy::{Credentials, RuleSet};

use crate::config::delivery::{DeliveryConfig, DeliverySection, QueueConfig};
use crate::config::{ByteSize, Config, ListenerConfig};
use crate::conn::ListenerShared;

/// Where the running configuration came from: `sluice run -c FILE --set K=V…`.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// None: the built-in defaults.
    pub path: Option<PathBuf>,
    pub overrides: Vec<String>,
}

impl ConfigSource {
    /// Reads and validates the configuration as `sluice run` does.
    pub fn load(&self) -> Result<Config, String> {
        let (origin, text) = match &self.path {
            Some(path) => (
                path.display().to_string(),
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
            ),
            None => ("built-in defaults".to_string(), String::new()),
        };
        Config::load(&origin, &text, &self.overrides).map_err(|e| e.to_string())
    }
}

/// Everything a reload may replace, and the configuration now in force.
pub struct Reloader {
    source: ConfigSource,
    /// The effective running configuration; the mutex also keeps two reloads
    /// (a signal and an API call) from interleaving.
    running: Mutex<Config>,
    listeners: Vec<Arc<ListenerShared>>,
    credentials: Arc<ArcSwap<Credentials>>,
    rules: Arc<ArcSwap<RuleSet>>,
    /// DKIM signers and rules; keys are re-read on every reload.
    dkim: Option<crate::queue::dkim::DkimSwap>,
    /// Listeners' filters at the delivery stage (rebuilt with the listeners').
    stage_filters: Option<crate::filters::delivery::DeliveryFiltersSwap>,
    /// The delivery snapshot the cores read (routes, queues, limits).
    delivery: Option<Arc<ArcSwap<DeliveryConfig>>>,
    /// The end of data's tenants (`[tenant.*]` rates, `[tenants]` header).
    admission: Option<Arc<crate::queue::admission::QueueAdmission>>,
}

/// What a validated reload will store.
struct Plan {
    effective: Config,
    changed: Vec<String>,
    restart: Vec<String>,
    certs: Vec<(Arc<ListenerShared>, Arc<CertifiedKey>)>,
    sessions: Vec<(Arc<ListenerShared>, crate::smtp::server::SessionConfig)>,
    credentials: Option<Credentials>,
    rules: Option<RuleSet>,
    dkim: Option<sluice_policy::dkim::DkimPolicy>,
    /// Built when a delivery section or the shaping rules changed.
    delivery: Option<DeliveryConfig>,
    /// `[tenant.*]` or `[tenants]` changed (the end of data's copy is replaced).
    tenants: bool,
    shaping: Option<(ShapingRules, Option<u32>)>,
}

impl Reloader {
    /// `listeners` may repeat a listener (one entry per bound address).
    pub fn new(
        source: ConfigSource,
        running: Config,
        listeners: &[Arc<ListenerShared>],
        credentials: Arc<ArcSwap<Credentials>>,
        rules: Arc<ArcSwap<RuleSet>>,
    ) -> Reloader {
        let mut unique: Vec<Arc<ListenerShared>> = Vec::new();
        for l in listeners {
            if !unique.iter().any(|u| Arc::ptr_eq(u, l)) {
                unique.push(l.clone());
            }
        }
        Reloader {
            source,
            running: Mutex::new(running),
            listeners: unique,
            credentials,
            rules,
            dkim: None,
            stage_filters: None,
            delivery: None,
            admission: None,
        }
    }

    /// Reloads also replace the tenants the end of data counts.
    pub fn with_admission(
        mut self,
        admission: Arc<crate::queue::admission::QueueAdmission>,
    ) -> Reloader {
        self.admission = Some(admission);
        self
    }

    /// Reloads also replace the delivery configuration the cores read.
    pub fn with_delivery(mut self, delivery: Arc<ArcSwap<DeliveryConfig>>) -> Reloader {
        self.delivery = Some(delivery);
        self
    }

    /// Reloads also replace the DKIM signers (keys read again from their
    /// files, so a rotated key file needs only a SIGHUP).
    pub fn with_dkim(mut self, dkim: crate::queue::dkim::DkimSwap) -> Reloader {
        self.dkim = Some(dkim);
        self
    }

    /// Reloads also replace the filters the delivery stage asks.
    pub fn with_stage_filters(
        mut self,
        filters: crate::filters::delivery::DeliveryFiltersSwap,
    ) -> Reloader {
        self.stage_filters = Some(filters);
        self
    }

    /// Re-reads and applies the configuration. Ok: what changed (and what would
    /// need a restart); Err: why it was refused (nothing changed). Logs either.
    pub fn reload(&self) -> Result<String, String> {
        let result = self.try_reload();
        match &result {
            Ok(summary) => tracing::info!("reload: {summary}"),
            Err(why) => tracing::error!("reload refused: {why}"),
        }
        result
    }

    fn try_reload(&self) -> Result<String, String> {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let new = self.source.load()?;
        let plan = self.plan(&running, &new)?;
        // The bounce rules file is read again on every reload (its path is
        // the running one: a new path needs a restart); a bad file refuses
        // the reload.
        let bounce = crate::bounce::load(running.delivery.bounce_rules.as_deref())?;
        // Pools added to a relay started without any: their warm-up store
        // opens now (a failure refuses the reload).
        if self.delivery.is_some() && !plan.effective.pools.pools.is_empty() {
            crate::delivery::pools::open_if_needed(&running.spool.path, crate::time::now_ms())
                .map_err(|e| format!("pool: opening the warm-up store: {e}"))?;
        }
        // Everything is valid: store it all.
        crate::bounce::install(bounce);
        for (listener, key) in plan.certs {
            if let Some(certs) = &listener.certs {
                certs.store(key);
            }
        }
        for (listener, session) in plan.sessions {
            listener.session.store(Arc::new(session));
        }
        if let Some(credentials) = plan.credentials {
            self.credentials.store(Arc::new(credentials));
        }
        if let Some(rules) = plan.rules {
            self.rules.store(Arc::new(rules));
        }
        if let Some(swap) = &self.stage_filters {
            swap.store(Arc::new(
                crate::filters::delivery::DeliveryFilters::of_config(&plan.effective),
            ));
        }
        if let (Some(swap), Some(policy)) = (&self.dkim, plan.dkim) {
            swap.store(Arc::new(crate::queue::dkim::DkimState::new(policy)));
        }
        if let (Some(admission), true) = (&self.admission, plan.tenants) {
            admission.set_tenants(plan.effective.tenant_policy());
        }
        if let (Some(swap), Some(mut delivery)) = (&self.delivery, plan.delivery) {
            // Each core sees the new generation at its next decision.
            delivery.generation = swap.load().generation + 1;
            swap.store(Arc::new(delivery));
        }
        if let (Some(shaping), Some((rules, slow_start))) =
            (crate::delivery::shaping::installed(), plan.shaping)
        {
            shaping.reconfigure(rules, slow_start);
        }
        *running = plan.effective;
        let mut summary = if plan.changed.is_empty() {
            "nothing changed".to_string()
        } else {
            plan.changed.join(", ")
        };
        if !plan.restart.is_empty() {
            summary.push_str(&format!(
                "; not applied, need a restart: {}",
                plan.restart.join(", ")
            ));
        }
        Ok(summary)
    }

    /// Validates `new` against the running configuration and prepares every
    /// swap, without changing anything.
    fn plan(&self, running: &Config, new: &Config) -> Result<Plan, String> {
        let (effective, mut changed, restart) = merge(running, new);
        let users_changed = changed.iter().any(|c| c == "auth.users");
        let rules_changed = changed.iter().any(|c| c.starts_with("[[rule]]"));

        // Build everything before storing anything.
        let rules = effective.rule_set().map_err(|e| format!("rule: {e}"))?;
        // Routes, queues and limits: the rules just checked name only routes
        // and queues of this same snapshot.
        let delivery_changed = changed.iter().any(|c| is_delivery_key(c));
        let shaping = if changed.iter().any(|c| c == "shaping") {
            let rules = effective
                .shaping
                .rules()
                .map_err(|e| format!("shaping: {e}"))?;
            let slow_start = effective
                .shaping
                .slow_start
                .then_some(effective.shaping.slow_start_initial);
            Some((rules, slow_start))
        } else {
            None
        };
        let relay = Arc::new(
            effective
                .relay_policy()
                .map_err(|e| format!("relay: {e}"))?,
        );
        let credentials = Credentials::new(effective.auth.users.clone())
            .map_err(|e| format!("auth.users: {e}"))?;
        let sender_logins = Arc::new(
            sluice_policy::sender_login::SenderLogins::new(&effective.auth.sender_login)
                .map_err(|e| format!("auth.sender_login: {e}"))?,
        );
        // Every reload reads the keys again; one bad key refuses the reload
        // and the running signers stay.
        let dkim = match &self.dkim {
            Some(swap) => {
                let policy = effective.dkim_policy().map_err(|e| e.to_string())?;
                let running = swap.load();
                if !changed.iter().any(|c| c == "dkim") && !policy.same_signers(&running.policy) {
                    changed.push("dkim keys".into());
                }
                Some(policy)
            }
            None => None,
        };

        let mut certs = Vec::new();
        let mut sessions = Vec::new();
        for shared in &self.listeners {
            let Some(l) = effective.server.listener.get(&shared.name) else {
                continue;
            };
            if let (Some(swap), Some(cert), Some(key)) = (&shared.certs, &l.tls_cert, &l.tls_key) {
                let key = crate::tls::certified_key(cert, key)
                    .map_err(|e| format!("server.listener.{}: {e}", shared.name))?;
                if swap.current().cert != key.cert {
                    changed.push(format!("server.listener.{} certificate", shared.name));
                }
                certs.push((shared.clone(), Arc::new(key)));
            }
            let current = shared.session.load();
            let mut session = crate::smtp::server::SessionConfig::from_listener(
                &shared.name,
                l,
                &effective.server.hostname,
                relay.clone(),
                !credentials.is_empty(),
                current.auth_guard.clone(),
                &sender_logins,
            );
            // The TLS mode is restart-only: keep what the running listener offers.
            session.starttls = current.starttls;
            sessions.push((shared.clone(), session));
        }
        let delivery = delivery_changed.then(|| effective.delivery_config());
        let tenants = changed.iter().any(|c| c == "tenant" || c == "tenants");
        Ok(Plan {
            tenants,
            effective,
            changed: dedup(changed),
            restart,
            certs,
            sessions,
            credentials: users_changed.then_some(credentials),
            rules: rules_changed.then_some(rules),
            dkim,
            delivery,
            shaping,
        })
    }
}

/// The running configuration with what a reload takes from `new`, the names of
/// what it takes, and the changes that need a restart.
fn merge(running: &Config, new: &Config) -> (Config, Vec<String>, Vec<String>) {
    let mut effective = running.clone();
    let mut changed = Vec::new();
    for (name, l) in effective.server.listener.iter_mut() {
        if let Some(n) = new.server.listener.get(name) {
            let before = format!("{l:?}");
            take_reloadable(l, n);
            if format!("{l:?}") != before {
                changed.push(format!("server.listener.{name}"));
            }
            if l.filters.is_some() {
                // Scripts and lists are read again on every reload.
                changed.push(format!("server.listener.{name} filters"));
            }
        }
    }
    if effective.lists != new.lists {
        effective.lists = new.lists.clone();
        changed.push("lists".into());
    }
    adopt(&mut effective.relay, &new.relay, "relay", &mut changed);
    adopt(
        &mut effective.auth.users,
        &new.auth.users,
        "auth.users",
        &mut changed,
    );
    adopt(
        &mut effective.auth.sender_login,
        &new.auth.sender_login,
        "auth.sender_login",
        &mut changed,
    );
    if differs(&effective.rule, &new.rule) {
        effective.rule = new.rule.clone();
        changed.push(format!("[[rule]] ({} in force)", new.rule.len()));
    }
    if differs(&effective.rewrite, &new.rewrite) || differs(&effective.srs, &new.srs) {
        // Built into each listener's `rewrite` above; kept here for the
        // next comparison.
        effective.rewrite = new.rewrite.clone();
        effective.srs = new.srs.clone();
        changed.push("rewrite, srs".into());
    }
    adopt(&mut effective.dkim, &new.dkim, "dkim", &mut changed);
    take_delivery(&mut effective, new, &mut changed);
    adopt(
        &mut effective.shaping,
        &new.shaping,
        "shaping",
        &mut changed,
    );
    let restart = restart_only_changes(&effective, new);
    (effective, changed, restart)
}

/// What going from one configuration to another needs (`sluice check-config
/// --changes OLD NEW`; the Ansible role's handler choice).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Applied by a reload (SIGHUP).
    pub reload: Vec<String>,
    /// Only applied by a restart.
    pub restart: Vec<String>,
}

impl Changes {
    /// `restart`, `reload` or `none`: the least that applies all of it.
    pub fn verdict(&self) -> &'static str {
        if !self.restart.is_empty() {
            "restart"
        } else if !self.reload.is_empty() {
            "reload"
        } else {
            "none"
        }
    }
}

/// The verdict on the first line, then the keys (the first line is for tools).
impl std::fmt::Display for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.verdict())?;
        if !self.restart.is_empty() {
            writeln!(f, "need a restart: {}", self.restart.join(", "))?;
        }
        if !self.reload.is_empty() {
            writeln!(f, "reloadable: {}", self.reload.join(", "))?;
        }
        Ok(())
    }
}

/// Compares two configurations as a reload would (file contents such as
/// certificates are not compared: a changed certificate file is a reload).
pub fn changes(running: &Config, new: &Config) -> Changes {
    let (_, changed, restart) = merge(running, new);
    Changes {
        reload: dedup(changed),
        restart,
    }
}

/// Copies the listener keys a reload may change; the others keep running values.
fn take_reloadable(l: &mut ListenerConfig, n: &ListenerConfig) {
    l.tls_cert = n.tls_cert.clone();
    l.tls_key = n.tls_key.clone();
    l.greeting = n.greeting.clone();
    l.hostname = n.hostname.clone();
    l.protocol = n.protocol;
    l.auth_plaintext = n.auth_plaintext;
    l.max_message_size = n.max_message_size;
    l.max_recipients = n.max_recipients;
    l.max_line_length = n.max_line_length;
    l.max_errors = n.max_errors;
    l.bare_newline = n.bare_newline;
    l.nul_bytes = n.nul_bytes;
    l.max_message_line_length = n.max_message_line_length;
    l.add_missing_headers = n.add_missing_headers;
    l.enforce_sender_login = n.enforce_sender_login;
    l.untrusted_mt_priority = n.untrusted_mt_priority;
    l.untrusted_hold = n.untrusted_hold;
    l.untrusted_notices = n.untrusted_notices;
    l.honor_tls_required_no = n.honor_tls_required_no;
    l.verify = n.verify.clone();
    // Filters: the new file's, already built (scripts compiled, lists read)
    // by its load; a compile error there refused the reload before this.
    l.sieve = n.sieve.clone();
    l.filter_rule = n.filter_rule.clone();
    l.milter = n.milter.clone();
    l.hook = n.hook.clone();
    l.filters = n.filters.clone();
    l.rewrite = n.rewrite.clone();
}

/// The delivery keys a reload takes (names as in the summary).
const DELIVERY_KEYS: [&str; 10] = [
    "delivery",
    "queue",
    "route",
    "destination",
    "source_ip",
    "host",
    "provider",
    "pool",
    "warmup",
    "tenant",
];

fn is_delivery_key(change: &str) -> bool {
    DELIVERY_KEYS.contains(&change)
}

/// Takes the new routes, queues, destinations, hosts, source IPs, providers
/// and `[delivery]` limits, keeping the running value of what is built once at
/// start: the `[delivery]` keys of [`delivery_restart_keys`], queue quotas
/// (counted by the admission of the running process) and route client
/// certificates (loaded into the outbound TLS setup).
fn take_delivery(effective: &mut Config, new: &Config, changed: &mut Vec<String>) {
    let mut delivery = new.delivery.clone();
    let run = &effective.delivery;
    delivery.enabled = run.enabled;
    delivery.ehlo_name.clone_from(&run.ehlo_name);
    delivery.tls_ca_file.clone_from(&run.tls_ca_file);
    delivery.mta_sts = run.mta_sts;
    delivery.mta_sts_fetch_timeout = run.mta_sts_fetch_timeout;
    delivery.mta_sts_https_port = run.mta_sts_https_port;
    delivery.mta_sts_refresh_interval = run.mta_sts_refresh_interval;
    delivery.bounce_rules.clone_from(&run.bounce_rules);
    adopt(&mut effective.delivery, &delivery, "delivery", changed);
    let mut queues = new.queue.clone();
    for (name, q) in &mut queues {
        let running = effective
            .queue
            .get(name)
            .cloned()
            .unwrap_or_else(|| QueueConfig {
                max_messages: 0,
                max_bytes: ByteSize(0),
                ..QueueConfig::default()
            });
        q.max_messages = running.max_messages;
        q.max_bytes = running.max_bytes;
    }
    adopt(&mut effective.queue, &queues, "queue", changed);
    let mut routes = new.route.clone();
    for (name, r) in &mut routes {
        let running = effective.route.get(name);
        r.tls_client_cert = running.and_then(|r| r.tls_client_cert.clone());
        r.tls_client_key = running.and_then(|r| r.tls_client_key.clone());
    }
    adopt(&mut effective.route, &routes, "route", changed);
    adopt(
        &mut effective.destination,
        &new.destination,
        "destination",
        changed,
    );
    adopt(
        &mut effective.source_ip,
        &new.source_ip,
        "source_ip",
        changed,
    );
    adopt(&mut effective.host, &new.host, "host", changed);
    if differs(&effective.provider, &new.provider) || differs(&effective.providers, &new.providers)
    {
        effective.provider = new.provider.clone();
        effective.providers = new.providers.clone();
        changed.push("provider".into());
    }
    // Pools and warm-up schedules are checked together (`pools`, built by
    // the new file's load): a member's schedule names a `[warmup.*]`.
    adopt(&mut effective.pool, &new.pool, "pool", changed);
    adopt(&mut effective.warmup, &new.warmup, "warmup", changed);
    effective.pools = new.pools.clone();
    adopt(&mut effective.tenant, &new.tenant, "tenant", changed);
    adopt(&mut effective.tenants, &new.tenants, "tenants", changed);
}

/// `[delivery]` keys built into the running process (the TLS setup, the
/// MTA-STS thread, the EHLO name, the bounce rules path) that differ.
fn delivery_restart_keys(a: &DeliverySection, b: &DeliverySection) -> Vec<String> {
    let keys: [(&str, bool); 8] = [
        ("delivery.enabled", a.enabled != b.enabled),
        ("delivery.ehlo_name", a.ehlo_name != b.ehlo_name),
        ("delivery.tls_ca_file", a.tls_ca_file != b.tls_ca_file),
        ("delivery.mta_sts", a.mta_sts != b.mta_sts),
        (
            "delivery.mta_sts_fetch_timeout",
            differs(&a.mta_sts_fetch_timeout, &b.mta_sts_fetch_timeout),
        ),
        (
            "delivery.mta_sts_https_port",
            a.mta_sts_https_port != b.mta_sts_https_port,
        ),
        (
            "delivery.mta_sts_refresh_interval",
            differs(&a.mta_sts_refresh_interval, &b.mta_sts_refresh_interval),
        ),
        ("delivery.bounce_rules", a.bounce_rules != b.bounce_rules),
    ];
    keys.iter()
        .filter(|k| k.1)
        .map(|k| k.0.to_string())
        .collect()
}

/// Keys that differ between what runs and the new file but cannot change
/// without a restart (sockets, executors, spool, delivery engine state).
fn restart_only_changes(effective: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let (a, b) = (&effective.server, &new.server);
    let fields: [(&str, bool); 7] = [
        ("server.hostname", a.hostname != b.hostname),
        ("server.cores", a.cores != b.cores),
        ("server.io_memory", differs(&a.io_memory, &b.io_memory)),
        ("server.ring_depth", a.ring_depth != b.ring_depth),
        (
            "server.shutdown_grace",
            differs(&a.shutdown_grace, &b.shutdown_grace),
        ),
        (
            "server.max_body_memory",
            differs(&a.max_body_memory, &b.max_body_memory),
        ),
        (
            "server.max_body_memory_per_client",
            differs(&a.max_body_memory_per_client, &b.max_body_memory_per_client),
        ),
    ];
    out.extend(fields.iter().filter(|f| f.1).map(|f| f.0.to_string()));
    let names = |m: &std::collections::BTreeMap<String, ListenerConfig>| {
        m.keys().cloned().collect::<Vec<_>>()
    };
    if names(&a.listener) != names(&b.listener) {
        out.push("server.listener (added or removed)".into());
    }
    for (name, l) in &a.listener {
        if let Some(n) = b.listener.get(name) {
            if differs(l, n) {
                out.push(format!(
                    "server.listener.{name} (bind, tls, proxy, connection limits or timeouts)"
                ));
            }
        }
    }
    out.extend(delivery_restart_keys(&effective.delivery, &new.delivery));
    for (name, q) in &new.queue {
        let (m, b) = effective
            .queue
            .get(name)
            .map_or((0, 0), |r| (r.max_messages, r.max_bytes.0));
        if (m, b) != (q.max_messages, q.max_bytes.0) {
            out.push(format!("queue.{name} quota (max_messages, max_bytes)"));
        }
    }
    for (name, r) in &new.route {
        let running = effective.route.get(name);
        if running.and_then(|r| r.tls_client_cert.as_ref()) != r.tls_client_cert.as_ref()
            || running.and_then(|r| r.tls_client_key.as_ref()) != r.tls_client_key.as_ref()
        {
            out.push(format!("route.{name}.tls_client_cert/tls_client_key"));
        }
    }
    let sections: [(&str, bool); 10] = [
        ("spool", differs(&effective.spool, &new.spool)),
        ("log", differs(&effective.log, &new.log)),
        ("admin", differs(&effective.admin, &new.admin)),
        ("dns", differs(&effective.dns, &new.dns)),
        ("auth", differs(&effective.auth, &new.auth)),
        // Read when the relay starts (their state is built then).
        ("limit", differs(&effective.limit, &new.limit)),
        ("ban", differs(&effective.ban, &new.ban)),
        ("dnsbl", differs(&effective.dnsbl, &new.dnsbl)),
        ("greylist", differs(&effective.greylist, &new.greylist)),
        // The node joined with these; its thread and connections stay.
        ("cluster", differs(&effective.cluster, &new.cluster)),
    ];
    out.extend(sections.iter().filter(|s| s.1).map(|s| s.0.to_string()));
    out
}

/// Takes `new` into the running `value` when they differ, naming the change.
fn adopt<T: Debug + Clone>(value: &mut T, new: &T, name: &str, changed: &mut Vec<String>) {
    if differs(value, new) {
        value.clone_from(new);
        changed.push(name.into());
    }
}

/// Configuration types have Debug but not PartialEq; their Debug output is
/// complete and ordered (BTreeMap), so it compares them.
fn differs<T: Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") != format!("{b:?}")
}

fn dedup(v: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in v {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::load("test", text, &[]).expect("config")
    }

    #[test]
    fn reloadable_listener_keys_are_taken_the_rest_kept() {
        let running = config("[server.listener.smtp]\nbind=[\"127.0.0.1:2525\"]\n");
        let new = config(
            "[server.listener.smtp]\nbind=[\"127.0.0.1:2600\"]\ngreeting=\"hi\"\nmax_errors=3\n",
        );
        let mut effective = running.clone();
        let l = effective.server.listener.get_mut("smtp").expect("smtp");
        take_reloadable(l, &new.server.listener["smtp"]);
        assert_eq!(l.greeting, "hi");
        assert_eq!(l.max_errors, 3);
        assert_eq!(l.bind, running.server.listener["smtp"].bind);
        let restart = restart_only_changes(&effective, &new);
        assert_eq!(restart.len(), 1, "{restart:?}");
        assert!(
            restart[0].starts_with("server.listener.smtp"),
            "{restart:?}"
        );
    }

    #[test]
    fn pools_warmup_and_tenants_reload_without_a_restart() {
        let running = config("[tenant.a]\n");
        let new = config(
            "[tenant.a]\nmessage_rate = [\"1/s\"]\n[tenants]\nheader = \"X-Tenant\"\n\
             [warmup.w]\nschedule = [5]\n\
             [pool.p]\nmembers = [{ip = \"192.0.2.1\", warmup = \"w\", warmup_start = \"2026-12-01\"}]\n",
        );
        let c = changes(&running, &new);
        assert_eq!(c.verdict(), "reload", "{c}");
        for key in ["pool", "warmup", "tenant", "tenants"] {
            assert!(c.reload.iter().any(|k| k == key), "{key}: {c}");
        }
        let (effective, _, _) = merge(&running, &new);
        assert_eq!(effective.pools, new.pools);
        assert_eq!(effective.tenants.header, "X-Tenant");
    }

    #[test]
    fn restart_only_sections_are_named() {
        let running = config("");
        let new = config("[server]\ncores=2\n[spool]\npath=\"/elsewhere\"\n");
        assert_eq!(
            restart_only_changes(&running, &new),
            vec!["server.cores".to_string(), "spool".to_string()]
        );
        let new = config("[greylist]\ndelay=\"1m\"\n[ban]\nduration=\"2h\"\n");
        assert_eq!(
            restart_only_changes(&running, &new),
            vec!["ban".to_string(), "greylist".to_string()]
        );
        assert!(restart_only_changes(&running, &running.clone()).is_empty());
    }

    #[test]
    fn changes_say_restart_reload_or_none() {
        let running = config("[relay]\nlocal_domains = [\"a.test\"]\n");
        assert_eq!(changes(&running, &running.clone()).verdict(), "none");
        assert_eq!(changes(&running, &running.clone()).to_string(), "none\n");

        let relay = config("[relay]\nlocal_domains = [\"b.test\"]\n");
        let c = changes(&running, &relay);
        assert_eq!(c.verdict(), "reload");
        assert_eq!(c.to_string(), "reload\nreloadable: relay\n");

        // Any restart-only key makes it a restart, whatever else changed.
        let both = config("[server]\ncores = 2\n[relay]\nlocal_domains = [\"b.test\"]\n");
        let c = changes(&running, &both);
        assert_eq!(c.verdict(), "restart");
        assert_eq!(
            c.to_string(),
            "restart\nneed a restart: server.cores\nreloadable: relay\n"
        );
        let admin = config("[relay]\nlocal_domains = [\"a.test\"]\n[admin]\nlisten = \"\"\n");
        assert_eq!(changes(&running, &admin).verdict(), "restart");
        let greeting = config(
            "[relay]\nlocal_domains = [\"a.test\"]\n[server.listener.smtp]\nbind = [\"127.0.0.1:2525\"]\ngreeting = \"hi\"\n",
        );
        assert_eq!(changes(&running, &greeting).verdict(), "reload");
        // DKIM signers and rules are reloadable.
        let dkim = config(
            "[relay]\nlocal_domains = [\"a.test\"]\n[dkim.signer.a]\ndomain = \"a.test\"\nselector = \"s\"\nkey = \"/k.pem\"\n",
        );
        assert_eq!(
            changes(&running, &dkim).to_string(),
            "reload\nreloadable: dkim\n"
        );
    }

    #[test]
    fn delivery_sections_reload_and_what_is_built_at_start_is_named() {
        let running = config(
            "[queue.bulk]\nmax_messages = 10\n[route.hop]\ntype = \"relay\"\nhost = \"a.test\"\n",
        );
        let new = config(
            "[queue.bulk]\nmax_messages = 10\nretry = [\"1s\"]\n[queue.extra]\n\
             [route.hop]\ntype = \"relay\"\nhost = \"b.test\"\n\
             [destination.default]\nmax_connections = 2\n[host.\"mx.test\"]\nmax_connections = 1\n\
             [source_ip.default]\nmessage_rate = [\"1/s\"]\n[delivery]\nmax_connections_per_host = 3\n\
             [[shaping.rule]]\nname = \"r\"\ncode = [421]\nthreshold = \"1/1m\"\naction = \"suspend\"\nduration = \"1m\"\n",
        );
        let c = changes(&running, &new);
        assert_eq!(c.verdict(), "reload", "{c}");
        for key in [
            "delivery",
            "queue",
            "route",
            "destination",
            "source_ip",
            "host",
            "shaping",
        ] {
            assert!(c.reload.iter().any(|k| k == key), "{key} in {c}");
        }
        let (effective, _, _) = merge(&running, &new);
        assert_eq!(effective.route["hop"].host.as_deref(), Some("b.test"));
        assert_eq!(
            effective.delivery_config().destination("x").max_connections,
            2
        );

        // Quotas, client certificates and the MTA-STS setup need a restart;
        // the rest of the same sections still reloads.
        let quota = config(
            "[queue.bulk]\nmax_messages = 20\n[queue.new]\nmax_bytes = \"1M\"\n\
             [route.hop]\ntype = \"relay\"\nhost = \"a.test\"\n[delivery]\nmta_sts = false\nidle_timeout = \"1s\"\n",
        );
        let c = changes(&running, &quota);
        assert_eq!(
            c.restart,
            vec![
                "delivery.mta_sts".to_string(),
                "queue.bulk quota (max_messages, max_bytes)".to_string(),
                "queue.new quota (max_messages, max_bytes)".to_string(),
            ],
            "{c}"
        );
        assert!(c.reload.iter().any(|k| k == "delivery"), "{c}");
        let (effective, _, _) = merge(&running, &quota);
        assert_eq!(
            effective.queue["bulk"].max_messages, 10,
            "the running quota stays"
        );
        assert!(
            effective.delivery.mta_sts,
            "the running MTA-STS setting stays"
        );
    }

    #[test]
    fn a_removed_queue_takes_the_default_queues_schedule() {
        let c = config("[queue.default]\nretry = [\"7s\"]\n").delivery_config();
        assert_eq!(
            c.queue("gone").retry_delay(1),
            std::time::Duration::from_secs(7)
        );
        let c = config("").delivery_config();
        assert_eq!(
            c.queue("gone").retry_delay(1),
            std::time::Duration::from_secs(120)
        );
    }
}
