//! Prometheus metrics: the recorder and the text exposition served at `/metrics`.
//!
//! Instrumented code holds metric handles made once (per listener, per queue,
//! or process-wide here), so counting is an atomic add, never a label lookup.
//! What other parts already count (queue sizes, DNS counters, executor time) is
//! read periodically or at scrape time instead of being counted twice.
//! METRICS.md lists every metric; a test keeps it and [`CATALOGUE`] in step.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Queue depth as counted for the quotas (implemented by the queue's
/// counters), read at each scrape.
pub trait QueueDepth: Send + Sync {
    /// The queues, "default" first.
    fn queues(&self) -> &[String];
    /// Position in [`QueueDepth::queues`]; unknown names count as the first.
    fn queue_index(&self, queue: &str) -> usize;
    /// (messages, bytes) queued.
    fn usage(&self, queue: &str) -> (u64, u64);
}

/// What a core's delivery publishes (implemented by delivery).
pub trait DeliveryGauges {
    fn dns_metrics(&self) -> sluice_dns::MetricsSnapshot;
    fn site_backlog(&self) -> Vec<SiteBacklog>;
}

/// How often each core publishes what is read rather than counted (executor
/// time, DNS counters, the sites' backlog).
pub const COLLECT_INTERVAL: Duration = Duration::from_secs(1);
/// Destination sites shown by name in the site backlog gauges; the rest are
/// summed under [`OTHER_SITE`], so the label set stays bounded.
pub const TOP_SITES: usize = 20;
/// Label of the sum of all sites outside the top ones. Mail domains never
/// start with an underscore, so no real site is called this.
pub const OTHER_SITE: &str = "_other";
/// How often histogram samples are folded into their buckets when nobody
/// scrapes (they would pile up otherwise).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric sluice exposes: name, type, labels, help text.
pub const CATALOGUE: &[(&str, Kind, &str, &str)] = &[
    // Inbound connections and SMTP.
    ("sluice_connections_total", Kind::Counter, "listener",
     "Connections accepted by a listener (before any limit check)."),
    ("sluice_connections_current", Kind::Gauge, "listener",
     "Connections open on a listener now."),
    ("sluice_connections_rejected_total", Kind::Counter, "listener,reason",
     "Connections refused before the SMTP greeting, by reason."),
    ("sluice_smtp_replies_total", Kind::Counter, "listener,class",
     "SMTP replies sent to clients, by code class (2xx, 3xx, 4xx, 5xx)."),
    ("sluice_smtp_transactions_total", Kind::Counter, "listener,result",
     "Completed message transactions: accepted (queued), rejected (body refused), failed (spool error)."),
    ("sluice_tls_inbound_handshakes_total", Kind::Counter, "listener,result",
     "TLS handshakes with clients (STARTTLS or implicit TLS), ok or failed."),
    ("sluice_messages_received_total", Kind::Counter, "queue",
     "Messages accepted over SMTP and queued, by virtual queue."),
    // Queue.
    ("sluice_queue_messages", Kind::Gauge, "queue",
     "Messages in the spool, by virtual queue."),
    ("sluice_queue_bytes", Kind::Gauge, "queue",
     "Bytes of messages in the spool, by virtual queue."),
    ("sluice_site_queue_messages", Kind::Gauge, "site",
     "Jobs (one message's recipients at one destination) ready and waiting at a destination site; the top 20 sites by name, the rest summed as site=\"_other\"."),
    ("sluice_site_queue_bytes", Kind::Gauge, "site",
     "Bytes of the jobs counted by sluice_site_queue_messages."),
    // Delivery.
    ("sluice_recipients_delivered_total", Kind::Counter, "queue",
     "Recipients delivered to the next hop (2xx), by queue."),
    ("sluice_recipients_deferred_total", Kind::Counter, "queue",
     "Recipient delivery attempts that failed temporarily (will be retried), by queue."),
    ("sluice_recipients_bounced_total", Kind::Counter, "queue",
     "Recipients failed permanently (5xx or unroutable), by queue."),
    ("sluice_recipients_expired_total", Kind::Counter, "queue",
     "Recipients given up on because the message outlived its queue lifetime or DELIVERBY time, by queue."),
    ("sluice_provider_connections_total", Kind::Counter, "provider",
     "Outbound connections opened to a mailbox provider's hosts (docs/providers.md), counted against the provider's limits, by provider."),
    ("sluice_pool_choices_total", Kind::Counter, "pool",
     "Messages given a source address from an egress pool (docs/pools.md), by pool."),
    ("sluice_pool_exhausted_total", Kind::Counter, "pool",
     "Recipients deferred because no member of their pool was usable (suspended, unavailable or over its warm-up budget), by pool."),
    ("sluice_tenant_messages_total", Kind::Counter, "tenant,outcome",
     "Per configured tenant: messages accepted or refused by its rate (outcome accepted, rate_limited) and recipient delivery attempts (delivered, deferred, failed)."),
    ("sluice_delivery_failures_total", Kind::Counter, "class,status",
     "Recipient delivery attempts that failed, by bounce class (docs/bounce-classes.md) and status (deferred, failed, expired)."),
    ("sluice_suppression_added_total", Kind::Counter, "",
     "Recipients put on the suppression list by a hard bounce."),
    ("sluice_suppression_refused_total", Kind::Counter, "action",
     "Recipients refused at RCPT (action=refuse) or failed at delivery (action=drop) because they are suppressed."),
    ("sluice_delivery_stage_refused_total", Kind::Counter, "verdict",
     "Delivery attempts the receiving listener's delivery-stage filters did not let go (reject, tempfail, discard, quarantine)."),
    ("sluice_delivery_waiting_messages", Kind::Gauge, "core",
     "Messages due now waiting as their id only, beyond the core's share of delivery.max_ready_messages."),
    // DNSBL/DNSWL and greylisting at RCPT (ARCHITECTURE.md "DNSBL, DNSWL and greylisting").
    ("sluice_dnsbl_lookups_total", Kind::Counter, "zone,result",
     "DNSBL/DNSWL lookups (resolver cache hits included), by zone and result (listed, clear, failed)."),
    ("sluice_dnsbl_decisions_total", Kind::Counter, "verdict",
     "Clients judged by the DNSBL/DNSWL zones, by verdict (pass, allowed, reject, tempfail)."),
    ("sluice_greylist_total", Kind::Counter, "result",
     "Recipients checked by greylisting, by result (deferred, passed, exempt, full, error)."),
    // Inbound limits and auto-bans.
    ("sluice_inbound_limit_refused_total", Kind::Counter, "rule,stage",
     "Connections (stage=connect), MAIL or RCPT commands refused by a [[limit]] rule, by rule name and stage."),
    ("sluice_inbound_limit_untracked_total", Kind::Counter, "",
     "Limit checks on keys that could not be tracked (the table was full of busy keys), which were therefore not limited."),
    ("sluice_ban_offences_total", Kind::Counter, "offence",
     "Offences counted towards auto-bans: failed AUTH (auth), relay attempts (relay), sessions without mail (scan)."),
    ("sluice_bans_total", Kind::Counter, "offence",
     "Addresses banned automatically, by the offence that crossed its threshold."),
    ("sluice_ban_refused_total", Kind::Counter, "",
     "Connections refused at connect because the client address is banned."),
    ("sluice_bans_active", Kind::Gauge, "",
     "Bans held in memory (an ended ban is dropped when its address next connects or is lifted)."),
    // Delivery events (docs/events.md).
    ("sluice_events_produced_total", Kind::Counter, "type",
     "Delivery events made by the cores, by type (reception, delivery, deferral, bounce, expiry, suppression)."),
    ("sluice_events_written_total", Kind::Counter, "sink",
     "Events written by the events thread: to the JSON-lines file (sink=file) or to the webhook's durable buffer (sink=buffer)."),
    ("sluice_events_posted_total", Kind::Counter, "",
     "Events the webhook acknowledged (2xx) and that left the buffer."),
    ("sluice_events_post_failures_total", Kind::Counter, "",
     "Webhook POSTs that failed (no answer, timeout or non-2xx); their events stay buffered and are retried."),
    ("sluice_events_dropped_total", Kind::Counter, "reason",
     "Events lost: channel_full (the events thread fell behind the cores), buffer_full (events.max_buffered reached), storage (buffer write failed), file_error, stopped."),
    ("sluice_events_buffered", Kind::Gauge, "",
     "Events in the durable buffer waiting for the webhook."),
    // HTTP hooks (docs/hooks.md).
    ("sluice_hook_calls_total", Kind::Counter, "hook,result",
     "HTTP hook calls by hook and result: ok, or the failures busy (max_queued requests already waiting), timeout, transport (connect or I/O error), http_status (not 2xx), invalid_reply (the answer is not the documented JSON); each failure applied the hook's on_failure."),
    ("sluice_shaping_actions_total", Kind::Counter, "rule,action",
     "Shaping actions taken because a rule's threshold of matching replies was reached, by rule and action."),
    ("sluice_shaping_active_actions", Kind::Gauge, "",
     "Shaping actions in force (rules that fired, and operator suspensions)."),
    ("sluice_dsn_messages_total", Kind::Counter, "kind",
     "Delivery status notifications queued, by kind (failure, delay, success)."),
    ("sluice_delivery_attempt_seconds", Kind::Histogram, "",
     "Time of one outbound transaction on an open connection (MAIL to the last reply)."),
    ("sluice_delivery_delay_seconds", Kind::Histogram, "",
     "End-to-end delay of delivered recipients: arrival to the next hop's 2xx."),
    ("sluice_tls_outbound_handshakes_total", Kind::Counter, "result",
     "TLS handshakes with next hops: verified (web PKI), unverified (accepted opportunistically) or failed."),
    ("sluice_tls_outbound_total", Kind::Counter, "policy,result",
     "Outbound sessions by TLS policy and result: verified, unverified, cleartext (the policy was met), or no_starttls, starttls_refused, handshake_failed, not_verified (deferred)."),
    ("sluice_mta_sts_fetches_total", Kind::Counter, "result",
     "MTA-STS policy fetches (RFC 8461), proactive refreshes included, by result: ok, or no_address, connect_failed, tls_failed, http_failed (not a 200, a redirect, too large), invalid_policy, timeout, busy."),
    ("sluice_mta_sts_testing_failures_total", Kind::Counter, "result",
     "Sessions to destinations with an MTA-STS policy in testing mode that would have failed it (mx_mismatch, no_starttls, handshake_failed, not_verified); the mail went on as configured."),
    ("sluice_tls_rpt_reports_total", Kind::Counter, "result",
     "TLS reports (RFC 8460) handed to a report address: sent (queued for mailto:, or a 2xx to the HTTPS POST) or failed."),
    ("sluice_requiretls_refused_total", Kind::Counter, "reason",
     "Outbound sessions that refused a REQUIRETLS message (RFC 8689), by reason: no_starttls, starttls_refused, not_verified, no_requiretls, mx_not_authenticated (MX records not DNSSEC-validated and no MTA-STS enforce policy lists the host). The next host is tried; when every host refuses, the message bounces with the permanent form of the last refusal (5.7.30, 5.7.10, 5.7.5 or 5.7.4)."),
    ("sluice_throttle_events_total", Kind::Counter, "kind",
     "Times a limit delayed or refused mail (rates, concurrency, quotas), by kind."),
    // DKIM signing.
    ("sluice_dkim_signatures_total", Kind::Counter, "signer",
     "DKIM signatures added to accepted messages, by signer (a dual-signed message counts once per signer)."),
    ("sluice_dkim_signing_failures_total", Kind::Counter, "signer",
     "DKIM signing failures, by signer; the message was refused with 451 4.3.0, never sent unsigned."),
    ("sluice_dkim_signing_seconds", Kind::Histogram, "algorithm",
     "Time to make one DKIM signature (canonicalize, hash, sign), by algorithm (rsa-sha256, ed25519-sha256)."),
    // Inbound authentication.
    ("sluice_auth_results_total", Kind::Counter, "method,result",
     "Inbound authentication results, by method (iprev, spf_helo, spf_mailfrom, dkim, arc, dmarc) and RFC 8601 result."),
    ("sluice_auth_decisions_total", Kind::Counter, "decision",
     "What the verify actions did with messages: accept, reject (550 5.7.x) or tempfail (451 4.7.x)."),
    ("sluice_auth_verify_seconds", Kind::Histogram, "",
     "Time to verify one message (SPF, DKIM, ARC, DMARC, DNS included) before it is stored."),
    ("sluice_auth_body_hash_total", Kind::Counter, "path",
     "DKIM/ARC body hashes of verified messages, by where they ran: inline on the executor, or blocking (glommio's blocking pool, messages of verify.offload_size or more)."),
    ("sluice_arc_seals_total", Kind::Counter, "result",
     "ARC seals added to accepted messages (sealed) or not made (failed: broken chain or key error)."),
    // Spool.
    ("sluice_spool_commit_seconds", Kind::Histogram, "",
     "Time of one spool write transaction including its fsync (group commit)."),
    ("sluice_spool_commit_batch_size", Kind::Histogram, "",
     "Operations (stores, updates, removals) written by one spool commit."),
    // Cluster mode (docs/cluster.md); only made when cluster.enabled.
    ("sluice_cluster_engine_up", Kind::Gauge, "",
     "1 while this node's last engine round trip succeeded, 0 after a failure (cluster mode)."),
    ("sluice_cluster_epoch", Kind::Gauge, "",
     "The epoch this node joined the cluster with (bumped at every join and takeover)."),
    ("sluice_cluster_unreplicated_messages", Kind::Gauge, "",
     "Messages accepted while the engine was down (engine_down = \"accept-local\") not yet copied to it."),
    ("sluice_cluster_replicated_total", Kind::Counter, "",
     "Messages copied to the cluster engine before their 250."),
    ("sluice_cluster_imported_total", Kind::Counter, "",
     "Messages of dead nodes taken into this node's spool."),
    ("sluice_cluster_dropped_total", Kind::Counter, "",
     "Messages this node dropped at its rejoin because a survivor had taken them over."),
    ("sluice_cluster_limit_calls_total", Kind::Counter, "call,result",
     "Shared-limit calls to the cluster engine (call slot, release, permits; result taken, full, granted, wait, error, queue_full, dropped)."),
    ("sluice_cluster_limit_call_seconds", Kind::Histogram, "call",
     "Round trip of one shared-limit call on the cluster thread (slot, permits)."),
    ("sluice_cluster_nodes_up", Kind::Gauge, "",
     "Nodes up in the cluster at this node's last look (shared limits: the lease size and the fallback share)."),
    ("sluice_cluster_limits_fallback", Kind::Gauge, "",
     "1 while the cluster engine is unreachable and the local (fallback) limits are in force."),
    ("sluice_cluster_actions_total", Kind::Counter, "direction",
     "Suspensions and shaping actions shared through the engine (shared, lost) or applied from other nodes (applied)."),
    // DNS.
    ("sluice_dns_queries_total", Kind::Counter, "",
     "DNS lookups asked of the resolver, cache hits included."),
    ("sluice_dns_cache_hits_total", Kind::Counter, "",
     "DNS lookups answered from the cache."),
    ("sluice_dns_cache_misses_total", Kind::Counter, "",
     "DNS lookups not in the cache."),
    ("sluice_dns_upstream_queries_total", Kind::Counter, "server",
     "Queries sent to a DNS server (retries, failover and TCP included)."),
    ("sluice_dns_upstream_failures_total", Kind::Counter, "server",
     "Exchanges with a DNS server that failed (timeout, I/O error, unusable answer)."),
    ("sluice_dns_timeouts_total", Kind::Counter, "",
     "DNS exchanges that timed out."),
    ("sluice_dns_failures_total", Kind::Counter, "",
     "DNS lookups that failed after every server and retry."),
    ("sluice_dns_cache_entries", Kind::Gauge, "",
     "Entries in the DNS caches of all cores."),
    // Runtime.
    ("sluice_executor_busy_ratio", Kind::Gauge, "core",
     "Share of the last second a core's executor spent running tasks and polling I/O (0 to 1)."),
    ("sluice_executor_tasks_total", Kind::Counter, "core",
     "Tasks run by a core's executor."),
];

/// Buckets (upper bounds, seconds or counts) per histogram.
const BUCKETS: &[(&str, &[f64])] = &[
    (
        "sluice_cluster_limit_call_seconds",
        &[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
        ],
    ),
    (
        "sluice_spool_commit_seconds",
        &[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5,
        ],
    ),
    (
        "sluice_spool_commit_batch_size",
        &[
            1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
        ],
    ),
    (
        "sluice_dkim_signing_seconds",
        &[
            0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
            0.1,
        ],
    ),
    (
        "sluice_auth_verify_seconds",
        &[
            0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            0.5, 1.0, 5.0,
        ],
    ),
    (
        "sluice_delivery_attempt_seconds",
        &[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0, 300.0,
        ],
    ),
    (
        "sluice_delivery_delay_seconds",
        &[
            0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
            86400.0, 432000.0,
        ],
    ),
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The recorder with sluice's buckets (so latencies are real histograms).
fn builder() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    let mut b = PrometheusBuilder::new();
    for (name, buckets) in BUCKETS {
        b = b.set_buckets_for_metric(Matcher::Full((*name).to_string()), buckets)?;
    }
    Ok(b)
}

fn describe_all() {
    for (name, kind, _, help) in CATALOGUE {
        let unit = if name.ends_with("_seconds") {
            Some(Unit::Seconds)
        } else {
            None
        };
        let name = *name;
        let help = *help;
        match (kind, unit) {
            (Kind::Counter, _) => metrics::describe_counter!(name, help),
            (Kind::Gauge, _) => metrics::describe_gauge!(name, help),
            (Kind::Histogram, Some(u)) => metrics::describe_histogram!(name, u, help),
            (Kind::Histogram, None) => metrics::describe_histogram!(name, help),
        }
    }
}

/// Installs the process-wide recorder (once; later calls do nothing). Metric
/// handles made before this stay no-ops, so it runs first in `runtime::run`.
pub fn install() -> anyhow::Result<()> {
    if HANDLE.get().is_some() {
        return Ok(());
    }
    let recorder = builder()
        .map_err(|e| anyhow::anyhow!("metrics: {e}"))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| anyhow::anyhow!("metrics: installing the recorder: {e}"))?;
    describe_all();
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("sluice-metrics".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            upkeep.run_upkeep();
        })
        .map_err(|e| anyhow::anyhow!("metrics: starting the upkeep thread: {e}"))?;
    let _ = HANDLE.set(handle);
    Ok(())
}

/// The current metrics in Prometheus text format (empty before [`install`]).
pub fn render() -> String {
    let Some(handle) = HANDLE.get() else {
        return String::new();
    };
    if let Some(q) = QUEUES.get() {
        q.refresh_depth();
    }
    let mut out = handle.render();
    render_sites(&mut out);
    out
}

// ---------------------------------------------------------------- listeners

/// Why a connection was refused before the greeting.
#[derive(Debug, Clone, Copy)]
pub enum Reject {
    /// `max_connections` of the listener.
    ConnectionLimit,
    /// `max_connections_per_ip`.
    PerIpLimit,
    /// PROXY listener, peer outside `proxy_trusted_networks`.
    ProxyUntrusted,
    /// Missing, malformed or late PROXY header.
    ProxyInvalid,
    /// Shutting down, or the spool has failed.
    Unavailable,
}

impl Reject {
    const ALL: [Reject; 5] = [
        Reject::ConnectionLimit,
        Reject::PerIpLimit,
        Reject::ProxyUntrusted,
        Reject::ProxyInvalid,
        Reject::Unavailable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reject::ConnectionLimit => "connection_limit",
            Reject::PerIpLimit => "per_ip_limit",
            Reject::ProxyUntrusted => "proxy_untrusted",
            Reject::ProxyInvalid => "proxy_invalid",
            Reject::Unavailable => "unavailable",
        }
    }
}

/// One listener's connection handles (made once, shared by all cores).
#[derive(Debug)]
pub struct ListenerMetrics {
    pub connections: Counter,
    pub current: Gauge,
    rejected: [Counter; Reject::ALL.len()],
    tls_ok: Counter,
    tls_failed: Counter,
    /// What its SMTP sessions count.
    pub smtp: Arc<SmtpMetrics>,
}

impl ListenerMetrics {
    pub fn new(listener: &str) -> ListenerMetrics {
        let l = listener.to_string();
        ListenerMetrics {
            connections: counter!("sluice_connections_total", "listener" => l.clone()),
            current: gauge!("sluice_connections_current", "listener" => l.clone()),
            rejected: Reject::ALL.map(|r| {
                counter!("sluice_connections_rejected_total",
                    "listener" => l.clone(), "reason" => r.label())
            }),
            tls_ok: counter!("sluice_tls_inbound_handshakes_total",
                "listener" => l.clone(), "result" => "ok"),
            tls_failed: counter!("sluice_tls_inbound_handshakes_total",
                "listener" => l.clone(), "result" => "failed"),
            smtp: Arc::new(SmtpMetrics::new(listener)),
        }
    }

    pub fn rejected(&self, why: Reject) {
        self.rejected[why as usize].increment(1);
    }

    pub fn tls_handshake(&self, ok: bool) {
        if ok {
            self.tls_ok.increment(1);
        } else {
            self.tls_failed.increment(1);
        }
    }
}

/// What an SMTP session counts. Sessions count replies in plain fields and add
/// them here once per transaction and at the end, not once per reply.
#[derive(Debug)]
pub struct SmtpMetrics {
    /// 2xx, 3xx, 4xx, 5xx.
    replies: [Counter; 4],
    pub tx_accepted: Counter,
    pub tx_rejected: Counter,
    pub tx_failed: Counter,
}

impl SmtpMetrics {
    pub fn new(listener: &str) -> SmtpMetrics {
        let l = listener.to_string();
        SmtpMetrics {
            replies: ["2xx", "3xx", "4xx", "5xx"].map(|class| {
                counter!("sluice_smtp_replies_total", "listener" => l.clone(), "class" => class)
            }),
            tx_accepted: counter!("sluice_smtp_transactions_total",
                "listener" => l.clone(), "result" => "accepted"),
            tx_rejected: counter!("sluice_smtp_transactions_total",
                "listener" => l.clone(), "result" => "rejected"),
            tx_failed: counter!("sluice_smtp_transactions_total",
                "listener" => l, "result" => "failed"),
        }
    }

    /// Adds a session's reply counts (see [`reply_class`]) and zeroes them.
    pub fn add_replies(&self, counts: &mut [u64; 4]) {
        for (c, n) in self.replies.iter().zip(counts.iter_mut()) {
            if *n > 0 {
                c.increment(*n);
                *n = 0;
            }
        }
    }
}

/// Index of a reply code's class in a `[u64; 4]` of 2xx..5xx counts.
pub fn reply_class(code: u16) -> Option<usize> {
    match code / 100 {
        c @ 2..=5 => Some(usize::from(c - 2)),
        _ => None,
    }
}

// ---------------------------------------------------------------- queues

/// One virtual queue's delivery handles.
#[derive(Debug)]
pub struct QueueMetrics {
    pub received: Counter,
    pub delivered: Counter,
    pub deferred: Counter,
    pub bounced: Counter,
    pub expired: Counter,
}

impl QueueMetrics {
    fn new(queue: &str) -> QueueMetrics {
        let q = queue.to_string();
        QueueMetrics {
            received: counter!("sluice_messages_received_total", "queue" => q.clone()),
            delivered: counter!("sluice_recipients_delivered_total", "queue" => q.clone()),
            deferred: counter!("sluice_recipients_deferred_total", "queue" => q.clone()),
            bounced: counter!("sluice_recipients_bounced_total", "queue" => q.clone()),
            expired: counter!("sluice_recipients_expired_total", "queue" => q),
        }
    }

    const NOOP: QueueMetrics = QueueMetrics {
        received: Counter::noop(),
        delivered: Counter::noop(),
        deferred: Counter::noop(),
        bounced: Counter::noop(),
        expired: Counter::noop(),
    };
}

/// The configured queues: their handles, and the spool counts behind the depth
/// gauges.
struct Queues {
    stats: Arc<dyn QueueDepth>,
    /// In the order of `stats.queues()`, indexed by `stats.queue_index`.
    handles: Vec<QueueMetrics>,
    depth: Vec<(Gauge, Gauge)>,
}

impl Queues {
    fn refresh_depth(&self) {
        for (name, (messages, bytes)) in self.stats.queues().iter().zip(&self.depth) {
            let (m, b) = self.stats.usage(name);
            messages.set(m as f64);
            bytes.set(b as f64);
        }
    }
}

static QUEUES: OnceLock<Queues> = OnceLock::new();

/// Makes the per-queue handles for the queues `stats` counts, and reads the
/// queue depth from it at each scrape. Once per process.
pub fn watch_queues(stats: Arc<dyn QueueDepth>) {
    let names = stats.queues().to_vec();
    let queues = Queues {
        handles: names.iter().map(|n| QueueMetrics::new(n)).collect(),
        depth: names
            .iter()
            .map(|n| {
                (
                    gauge!("sluice_queue_messages", "queue" => n.clone()),
                    gauge!("sluice_queue_bytes", "queue" => n.clone()),
                )
            })
            .collect(),
        stats,
    };
    let _ = QUEUES.set(queues);
}

/// The handles of `queue`. A queue no longer configured counts as the first
/// ("default"), as in the quota counters; before [`watch_queues`], no-ops.
pub fn queue(name: &str) -> &'static QueueMetrics {
    static NOOP: QueueMetrics = QueueMetrics::NOOP;
    match QUEUES.get() {
        Some(q) => q.handles.get(q.stats.queue_index(name)).unwrap_or(&NOOP),
        None => &NOOP,
    }
}

// ---------------------------------------------------------------- process-wide

/// A limit that delayed or refused mail.
#[derive(Debug, Clone, Copy)]
pub enum Throttle {
    /// `[destination.*] connection_rate`.
    SiteConnectionRate,
    /// `[destination.*] message_rate`.
    SiteMessageRate,
    /// `source_ip_rate`.
    SourceIpRate,
    /// A host's connection rate.
    HostConnectionRate,
    /// A host's message rate.
    HostMessageRate,
    /// A host's connection limit (waiting for a slot).
    HostConnectionLimit,
    /// `[queue.X] message_rate`.
    QueueRate,
    /// `[queue.X] concurrency` (message held back).
    QueueConcurrency,
    /// `[queue.X] max_messages` / `max_bytes` (452 4.3.1 to the client).
    QueueQuota,
    /// Cluster mode: the destination's connection limit across the cluster.
    ClusterConnectionLimit,
    /// Cluster mode: the destination's message rate across the cluster.
    ClusterMessageRate,
}

impl Throttle {
    const ALL: [Throttle; 11] = [
        Throttle::SiteConnectionRate,
        Throttle::SiteMessageRate,
        Throttle::SourceIpRate,
        Throttle::HostConnectionRate,
        Throttle::HostMessageRate,
        Throttle::HostConnectionLimit,
        Throttle::QueueRate,
        Throttle::QueueConcurrency,
        Throttle::QueueQuota,
        Throttle::ClusterConnectionLimit,
        Throttle::ClusterMessageRate,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Throttle::SiteConnectionRate => "site_connection_rate",
            Throttle::SiteMessageRate => "site_message_rate",
            Throttle::SourceIpRate => "source_ip_rate",
            Throttle::HostConnectionRate => "host_connection_rate",
            Throttle::HostMessageRate => "host_message_rate",
            Throttle::HostConnectionLimit => "host_connection_limit",
            Throttle::QueueRate => "queue_rate",
            Throttle::QueueConcurrency => "queue_concurrency",
            Throttle::QueueQuota => "queue_quota",
            Throttle::ClusterConnectionLimit => "cluster_connection_limit",
            Throttle::ClusterMessageRate => "cluster_message_rate",
        }
    }
}

/// Handles without per-listener or per-queue labels.
pub struct Global {
    throttle: [Counter; Throttle::ALL.len()],
    pub attempt_seconds: Histogram,
    pub delay_seconds: Histogram,
    tls_verified: Counter,
    tls_unverified: Counter,
    tls_failed: Counter,
    dsn: [Counter; 3],
}

/// The process-wide handles (made at first use: after [`install`]).
pub fn global() -> &'static Global {
    static GLOBAL: OnceLock<Global> = OnceLock::new();
    GLOBAL.get_or_init(|| Global {
        throttle: Throttle::ALL
            .map(|t| counter!("sluice_throttle_events_total", "kind" => t.label())),
        attempt_seconds: histogram!("sluice_delivery_attempt_seconds"),
        delay_seconds: histogram!("sluice_delivery_delay_seconds"),
        tls_verified: counter!("sluice_tls_outbound_handshakes_total", "result" => "verified"),
        tls_unverified: counter!("sluice_tls_outbound_handshakes_total", "result" => "unverified"),
        tls_failed: counter!("sluice_tls_outbound_handshakes_total", "result" => "failed"),
        dsn: ["failure", "delay", "success"]
            .map(|k| counter!("sluice_dsn_messages_total", "kind" => k)),
    })
}

/// The gauge of messages due now waiting (ids only) on `core` beyond its
/// share of `delivery.max_ready_messages`; the core keeps the handle.
pub fn ready_waiting(core: u16) -> Gauge {
    gauge!("sluice_delivery_waiting_messages", "core" => core.to_string())
}

/// A shaping rule fired.
pub fn shaping_action(rule: &str, action: &'static str) {
    counter!("sluice_shaping_actions_total", "rule" => rule.to_string(), "action" => action)
        .increment(1);
}

/// The number of shaping actions in force changed.
pub fn shaping_active(n: usize) {
    gauge!("sluice_shaping_active_actions").set(n as f64);
}

/// A connection opened to a provider's host (`[provider.NAME]`): one per
/// connection, names bounded by the configured providers.
pub fn provider_connection(provider: &str) {
    counter!("sluice_provider_connections_total", "provider" => provider.to_string()).increment(1);
}

/// A message given a member of `[pool.NAME]` (names bounded by the config).
pub fn pool_chosen(pool: &str) {
    counter!("sluice_pool_choices_total", "pool" => pool.to_string()).increment(1);
}

/// No member of `[pool.NAME]` was usable: the recipients wait.
pub fn pool_exhausted(pool: &str) {
    counter!("sluice_pool_exhausted_total", "pool" => pool.to_string()).increment(1);
}

/// A recipient attempt of a tenant's (names bounded by `[tenant.*]`).
pub fn tenant_outcome(tenant: &str, outcome: &crate::delivery::Outcome) {
    let what = match outcome {
        crate::delivery::Outcome::Delivered(_) => "delivered",
        crate::delivery::Outcome::Deferred(_) => "deferred",
        crate::delivery::Outcome::Failed(_) => "failed",
    };
    tenant_count(tenant, what);
}

/// A tenant's counter: "accepted", "rate_limited", or an outcome.
pub fn tenant_count(tenant: &str, outcome: &'static str) {
    counter!("sluice_tenant_messages_total", "tenant" => tenant.to_string(), "outcome" => outcome)
        .increment(1);
}

/// A limit delayed or refused mail.
pub fn throttled(kind: Throttle) {
    global().throttle[kind as usize].increment(1);
}

/// An outbound TLS handshake: Ok(verified) or Err.
pub fn outbound_tls(result: Result<bool, ()>) {
    let g = global();
    match result {
        Ok(true) => g.tls_verified.increment(1),
        Ok(false) => g.tls_unverified.increment(1),
        Err(()) => g.tls_failed.increment(1),
    }
}

/// An outbound session met its TLS policy or failed it (once per session that
/// got past the greeting; `result` from `tls_policy::success_label` or
/// `Failure::label`). Label lookup per call: this is once per connection.
pub fn outbound_tls_policy(policy: &'static str, result: &'static str) {
    counter!("sluice_tls_outbound_total", "policy" => policy, "result" => result).increment(1);
}

/// An MTA-STS policy fetch ended (`result`: "ok" or `FetchError::label`).
pub fn mta_sts_fetch(result: &'static str) {
    counter!("sluice_mta_sts_fetches_total", "result" => result).increment(1);
}

/// A session under an MTA-STS policy in testing mode would have failed it.
pub fn mta_sts_testing_failure(result: &'static str) {
    counter!("sluice_mta_sts_testing_failures_total", "result" => result).increment(1);
}

/// An outbound session refused a REQUIRETLS message (`reason`: the
/// `Failure::label`).
pub fn requiretls_refused(reason: &'static str) {
    counter!("sluice_requiretls_refused_total", "reason" => reason).increment(1);
}

/// A TLS-RPT report was handed to one of its addresses (`result`: "sent" —
/// queued or accepted over HTTPS — or "failed").
pub fn tls_rpt_report(result: &'static str) {
    counter!("sluice_tls_rpt_reports_total", "result" => result).increment(1);
}

/// A failed or deferred recipient attempt, by bounce class; `status` is
/// "deferred", "failed" or "expired" (a bounded label set: 14 × 3).
pub fn delivery_failure(class: sluice_policy::bounce::BounceClass, status: &'static str) {
    use sluice_policy::bounce::BounceClass;
    const STATUSES: [&str; 3] = ["deferred", "failed", "expired"];
    static HANDLES: OnceLock<Vec<Counter>> = OnceLock::new();
    let handles = HANDLES.get_or_init(|| {
        BounceClass::ALL
            .iter()
            .flat_map(|c| {
                STATUSES.iter().map(move |s| {
                    counter!("sluice_delivery_failures_total",
                        "class" => c.as_str(), "status" => *s)
                })
            })
            .collect()
    });
    let c = BounceClass::ALL
        .iter()
        .position(|c| *c == class)
        .unwrap_or(0);
    let s = STATUSES.iter().position(|s| *s == status).unwrap_or(0);
    if let Some(h) = handles.get(c * STATUSES.len() + s) {
        h.increment(1);
    }
}

/// An event made by a core.
pub fn event_produced(kind: &'static str) {
    counter!("sluice_events_produced_total", "type" => kind).increment(1);
}

/// Events written by the events thread to a sink ("file" or "buffer").
pub fn events_written(sink: &'static str, n: usize) {
    counter!("sluice_events_written_total", "sink" => sink).increment(n as u64);
}

/// Events acknowledged by the webhook.
pub fn events_posted(n: usize) {
    counter!("sluice_events_posted_total").increment(n as u64);
}

/// A webhook POST failed.
pub fn events_post_failed() {
    counter!("sluice_events_post_failures_total").increment(1);
}

/// One event lost, by reason.
pub fn events_dropped(reason: &'static str) {
    events_dropped_n(reason, 1);
}

/// Events lost, by reason.
pub fn events_dropped_n(reason: &'static str, n: usize) {
    counter!("sluice_events_dropped_total", "reason" => reason).increment(n as u64);
}

/// Events in the webhook's buffer now.
pub fn events_buffered(n: u64) {
    gauge!("sluice_events_buffered").set(n as f64);
}

/// One HTTP hook call and how it ended.
pub fn hook_call(hook: &str, result: &'static str) {
    counter!("sluice_hook_calls_total", "hook" => hook.to_string(), "result" => result)
        .increment(1);
}

/// A hard bounce put a recipient on the suppression list.
pub fn suppression_added() {
    counter!("sluice_suppression_added_total").increment(1);
}

/// A `[[limit]]` rule refused a connection, MAIL or RCPT.
pub fn limit_refused(rule: &str, stage: &'static str) {
    counter!("sluice_inbound_limit_refused_total", "rule" => rule.to_string(), "stage" => stage)
        .increment(1);
}

/// Limit checks that could not track their key (count since the last call).
pub fn limit_untracked(n: u64) {
    counter!("sluice_inbound_limit_untracked_total").increment(n);
}

/// An offence counted towards an auto-ban.
pub fn ban_offence(offence: &'static str) {
    counter!("sluice_ban_offences_total", "offence" => offence).increment(1);
}

/// An address banned automatically.
pub fn banned(offence: &'static str) {
    counter!("sluice_bans_total", "offence" => offence).increment(1);
}

/// A connection refused because its address is banned.
pub fn ban_refused() {
    counter!("sluice_ban_refused_total").increment(1);
}

/// Bans in force.
pub fn bans_active(n: usize) {
    gauge!("sluice_bans_active").set(n as f64);
}

/// A suppressed recipient was refused ("refuse") or dropped ("drop").
pub fn suppression_refused(action: &'static str) {
    counter!("sluice_suppression_refused_total", "action" => action).increment(1);
}

/// The delivery stage's filters refused an attempt (`verdict`: reject,
/// tempfail, discard or quarantine).
pub fn delivery_stage_refused(verdict: &'static str) {
    counter!("sluice_delivery_stage_refused_total", "verdict" => verdict).increment(1);
}

/// One DNSBL/DNSWL zone's answer ("listed", "clear", "failed").
pub fn dnsbl_lookup(zone: &str, result: &'static str) {
    counter!("sluice_dnsbl_lookups_total", "zone" => zone.to_string(), "result" => result)
        .increment(1);
}

/// The zones' verdict on a client.
pub fn dnsbl_decision(verdict: &'static str) {
    counter!("sluice_dnsbl_decisions_total", "verdict" => verdict).increment(1);
}

/// One recipient through greylisting.
pub fn greylist(result: &'static str) {
    counter!("sluice_greylist_total", "result" => result).increment(1);
}

/// A delivery status notification was queued.
/// `kind`: "failure", "delay" or "success".
pub fn dsn_queued(kind: &str) {
    let i = match kind {
        "failure" => 0,
        "delay" => 1,
        _ => 2,
    };
    global().dsn[i].increment(1);
}

/// A message was delivered (to the next hop) `secs` after it arrived.
pub fn delivered_after(secs: f64) {
    global().delay_seconds.record(secs);
}

// ---------------------------------------------------------------- per core

/// A destination's backlog on its owner core: (site, jobs, bytes).
pub type SiteBacklog = (String, u64, u64);

/// What each core last published: its top sites and the sum of the rest.
#[derive(Debug, Default, Clone)]
struct CoreSites {
    top: Vec<SiteBacklog>,
    rest: (u64, u64),
}

static SITES: Mutex<Vec<CoreSites>> = Mutex::new(Vec::new());

/// Keeps the `TOP_SITES` largest backlogs (by jobs, then bytes) and sums the rest.
fn split_top(mut all: Vec<SiteBacklog>) -> (Vec<SiteBacklog>, (u64, u64)) {
    all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
    let rest = all
        .iter()
        .skip(TOP_SITES)
        .fold((0, 0), |(m, b), s| (m + s.1, b + s.2));
    all.truncate(TOP_SITES);
    (all, rest)
}

fn publish_sites(core: usize, backlog: Vec<SiteBacklog>) {
    // The same destination may be split over cores (one site per source IP).
    let mut merged: HashMap<String, (u64, u64)> = HashMap::new();
    for (site, m, b) in backlog {
        let e = merged.entry(site).or_default();
        e.0 += m;
        e.1 += b;
    }
    let (top, rest) = split_top(merged.into_iter().map(|(s, (m, b))| (s, m, b)).collect());
    if let Ok(mut sites) = SITES.lock() {
        if sites.len() <= core {
            sites.resize(core + 1, CoreSites::default());
        }
        sites[core] = CoreSites { top, rest };
    }
}

/// The site gauges, written by hand: their label set changes as sites rise
/// and fall, and a registered gauge would linger after its site left the top.
fn render_sites(out: &mut String) {
    let Ok(sites) = SITES.lock() else { return };
    if sites.is_empty() {
        return;
    }
    let mut merged: HashMap<String, (u64, u64)> = HashMap::new();
    let mut rest = (0u64, 0u64);
    for core in sites.iter() {
        for (site, m, b) in &core.top {
            let e = merged.entry(site.clone()).or_default();
            e.0 += m;
            e.1 += b;
        }
        rest.0 += core.rest.0;
        rest.1 += core.rest.1;
    }
    drop(sites);
    let (top, more) = split_top(merged.into_iter().map(|(s, (m, b))| (s, m, b)).collect());
    rest.0 += more.0;
    rest.1 += more.1;
    for (name, column) in [
        ("sluice_site_queue_messages", 0usize),
        ("sluice_site_queue_bytes", 1),
    ] {
        let help = CATALOGUE.iter().find(|m| m.0 == name).map_or("", |m| m.3);
        let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (site, m, b) in &top {
            let v = if column == 0 { m } else { b };
            let _ = writeln!(out, "{name}{{site=\"{}\"}} {v}", escape_label(site));
        }
        let v = if column == 0 { rest.0 } else { rest.1 };
        let _ = writeln!(out, "{name}{{site=\"{OTHER_SITE}\"}} {v}");
        out.push('\n');
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// DNS counters as last added, to turn the resolver's totals into increments.
#[derive(Default)]
struct DnsSeen {
    total: sluice_dns::MetricsSnapshot,
    servers: HashMap<std::net::SocketAddr, (u64, u64)>,
}

struct DnsHandles {
    queries: Counter,
    hits: Counter,
    misses: Counter,
    timeouts: Counter,
    failures: Counter,
    entries: Gauge,
}

impl DnsHandles {
    fn new() -> DnsHandles {
        DnsHandles {
            queries: counter!("sluice_dns_queries_total"),
            hits: counter!("sluice_dns_cache_hits_total"),
            misses: counter!("sluice_dns_cache_misses_total"),
            timeouts: counter!("sluice_dns_timeouts_total"),
            failures: counter!("sluice_dns_failures_total"),
            entries: gauge!("sluice_dns_cache_entries"),
        }
    }

    /// Adds what changed since `seen` and remembers `now`.
    fn add(&self, seen: &mut DnsSeen, now: sluice_dns::MetricsSnapshot) {
        let d = |new: u64, old: u64| new.saturating_sub(old);
        let old = &seen.total;
        self.queries.increment(d(now.queries, old.queries));
        self.hits.increment(d(now.cache_hits, old.cache_hits));
        self.misses.increment(d(now.cache_misses, old.cache_misses));
        self.timeouts.increment(d(now.timeouts, old.timeouts));
        self.failures.increment(d(now.failures, old.failures));
        self.entries
            .increment(now.cache_entries as f64 - old.cache_entries as f64);
        for u in &now.upstreams {
            let (q, f) = seen.servers.entry(u.server).or_default();
            let server = u.server.to_string();
            if u.queries > *q {
                counter!("sluice_dns_upstream_queries_total", "server" => server.clone())
                    .increment(u.queries - *q);
            }
            if u.failures > *f {
                counter!("sluice_dns_upstream_failures_total", "server" => server)
                    .increment(u.failures - *f);
            }
            *q = u.queries;
            *f = u.failures;
        }
        seen.total = now;
    }
}

/// Starts this core's collector: executor utilisation, and with delivery on,
/// the DNS counters and the sites' backlog, every [`COLLECT_INTERVAL`].
pub fn spawn_core_collector(core: u16, delivery: Option<Rc<dyn DeliveryGauges>>) {
    glommio::spawn_local(async move {
        let label = core.to_string();
        let busy = gauge!("sluice_executor_busy_ratio", "core" => label.clone());
        let tasks = counter!("sluice_executor_tasks_total", "core" => label);
        let dns = DnsHandles::new();
        let mut dns_seen = DnsSeen::default();
        if delivery.is_some() {
            // The site gauges exist (empty) from the start.
            publish_sites(usize::from(core), Vec::new());
        }
        // The executor's counters are taken (reset) on each read.
        let _ = glommio::executor().executor_stats();
        let mut last = Instant::now();
        loop {
            glommio::timer::Timer::new(COLLECT_INTERVAL).await;
            let stats = glommio::executor().executor_stats();
            let now = Instant::now();
            let wall = now.duration_since(last).as_secs_f64();
            last = now;
            if wall > 0.0 {
                busy.set((stats.total_runtime().as_secs_f64() / wall).min(1.0));
            }
            tasks.increment(stats.tasks_executed());
            if let Some(d) = &delivery {
                dns.add(&mut dns_seen, d.dns_metrics());
                publish_sites(usize::from(core), d.site_backlog());
            }
        }
    })
    .detach();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders what `f` records into a private recorder.
    fn rendered(f: impl FnOnce()) -> String {
        let recorder = builder().expect("builder").build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe_all();
            f();
        });
        handle.render()
    }

    fn exposition() -> String {
        rendered(|| {
            let l = ListenerMetrics::new("smtp");
            l.connections.increment(3);
            l.current.set(2.0);
            l.rejected(Reject::PerIpLimit);
            l.tls_handshake(true);
            let mut counts = [0u64; 4];
            for code in [220, 250, 250, 354, 250, 452, 550, 221] {
                if let Some(i) = reply_class(code) {
                    counts[i] += 1;
                }
            }
            l.smtp.add_replies(&mut counts);
            assert_eq!(counts, [0; 4], "added counts are zeroed");
            l.smtp.tx_accepted.increment(1);
            let q = QueueMetrics::new("bulk");
            q.received.increment(5);
            q.delivered.increment(4);
            histogram!("sluice_spool_commit_seconds").record(0.002);
            histogram!("sluice_spool_commit_batch_size").record(7.0);
            histogram!("sluice_delivery_attempt_seconds").record(0.3);
            histogram!("sluice_delivery_delay_seconds").record(12.0);
            counter!("sluice_throttle_events_total", "kind" => Throttle::QueueQuota.label())
                .increment(1);
            gauge!("sluice_executor_busy_ratio", "core" => "0").set(0.25);
        })
    }

    /// Every metric the code records is in the catalogue (so it gets HELP and
    /// TYPE lines, which promtool insists on): scans the engine's sources for
    /// `counter!("sluice_…"`, `gauge!(…` and `histogram!(…`.
    #[test]
    fn every_recorded_metric_is_catalogued() {
        fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).expect("read engine/src") {
                let path = entry.expect("directory entry").path();
                if path.is_dir() {
                    sources(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path);
                }
            }
        }
        let mut files = Vec::new();
        sources(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        let mut missing = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read source");
            for macro_name in ["counter!(", "gauge!(", "histogram!("] {
                for (at, _) in text.match_indices(macro_name) {
                    let rest = text[at + macro_name.len()..].trim_start();
                    let Some(rest) = rest.strip_prefix("\"sluice_") else {
                        continue;
                    };
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if name.is_empty() {
                        continue; // this test's own comment
                    }
                    let name = format!("sluice_{name}");
                    if !CATALOGUE.iter().any(|m| m.0 == name) {
                        missing.push(format!("{name} ({})", file.display()));
                    }
                }
            }
        }
        assert!(
            missing.is_empty(),
            "recorded but not in CATALOGUE: {missing:?}"
        );
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        for (name, kind, labels, help) in CATALOGUE {
            assert!(name.starts_with("sluice_"), "{name}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{name}"
            );
            assert_eq!(*kind == Kind::Counter, name.ends_with("_total"), "{name}");
            assert!(!name.ends_with("_ms") && !name.contains("milli"), "{name}");
            assert!(!help.is_empty(), "{name}");
            assert!(!labels.contains(' '), "{name}");
        }
        let mut names: Vec<_> = CATALOGUE.iter().map(|m| m.0).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CATALOGUE.len(), "duplicate names");
        for (name, _) in BUCKETS {
            assert!(
                CATALOGUE
                    .iter()
                    .any(|m| m.0 == *name && m.1 == Kind::Histogram),
                "{name}"
            );
        }
    }

    #[test]
    fn exposition_has_labels_buckets_and_help() {
        let text = exposition();
        for line in [
            "sluice_connections_total{listener=\"smtp\"} 3",
            "sluice_connections_current{listener=\"smtp\"} 2",
            "sluice_connections_rejected_total{listener=\"smtp\",reason=\"per_ip_limit\"} 1",
            "sluice_connections_rejected_total{listener=\"smtp\",reason=\"connection_limit\"} 0",
            "sluice_tls_inbound_handshakes_total{listener=\"smtp\",result=\"ok\"} 1",
            "sluice_smtp_replies_total{listener=\"smtp\",class=\"2xx\"} 5",
            "sluice_smtp_replies_total{listener=\"smtp\",class=\"3xx\"} 1",
            "sluice_smtp_replies_total{listener=\"smtp\",class=\"4xx\"} 1",
            "sluice_smtp_replies_total{listener=\"smtp\",class=\"5xx\"} 1",
            "sluice_smtp_transactions_total{listener=\"smtp\",result=\"accepted\"} 1",
            "sluice_messages_received_total{queue=\"bulk\"} 5",
            "sluice_recipients_delivered_total{queue=\"bulk\"} 4",
            "sluice_throttle_events_total{kind=\"queue_quota\"} 1",
            "sluice_spool_commit_seconds_bucket{le=\"0.0025\"} 1",
            "sluice_spool_commit_batch_size_bucket{le=\"8\"} 1",
            "sluice_delivery_attempt_seconds_bucket{le=\"0.5\"} 1",
            "sluice_delivery_delay_seconds_bucket{le=\"30\"} 1",
            "sluice_delivery_delay_seconds_count 1",
            "sluice_executor_busy_ratio{core=\"0\"} 0.25",
            "# TYPE sluice_delivery_attempt_seconds histogram",
            "# TYPE sluice_messages_received_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert!(
            !text.contains("quantile="),
            "latencies are histograms:\n{text}"
        );
        // Every family has help text, and every family is in the catalogue.
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap_or_default();
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no help for {name}"
            );
            assert!(
                CATALOGUE.iter().any(|m| m.0 == name),
                "{name} not catalogued"
            );
        }
    }

    #[test]
    fn site_backlog_keeps_the_top_and_sums_the_rest() {
        let all: Vec<SiteBacklog> = (0..30u64)
            .map(|i| (format!("d{i}.example"), i, i * 100))
            .collect();
        let (top, rest) = split_top(all);
        assert_eq!(top.len(), TOP_SITES);
        assert_eq!(top[0], ("d29.example".to_string(), 29, 2900));
        assert_eq!(top[TOP_SITES - 1].1, 10);
        assert_eq!(rest, ((0..10).sum(), (0..10).map(|i| i * 100).sum()));
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn every_metric_is_documented() {
        let doc = include_str!("../../METRICS.md");
        for (name, ..) in CATALOGUE {
            assert!(
                doc.contains(&format!("`{name}`")),
                "{name} missing in METRICS.md"
            );
        }
    }
}
