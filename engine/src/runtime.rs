//! Thread-per-core runtime: one pinned glommio executor per core, each with its own
//! SO_REUSEPORT socket per listener address, so the kernel spreads connections and a
//! session lives and dies on the core that accepted it.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use arc_swap::ArcSwap;
use glommio::net::TcpListener;
use glommio::timer::Timer;
use glommio::{LocalExecutorBuilder, Placement};
use sluice_policy::Credentials;
use sluice_spool::{IdGenerator, RecoveryReport, Spool, SpoolConfig};

use crate::admin::{AdminServer, AdminState};
use crate::config::{Config, TlsMode};
use crate::conn::{self, CoreContext, ListenerShared};
use crate::delivery::outbound::OutboundTlsConfig;
use crate::delivery::{CoreDelivery, DeliveryShared, MeshMsg};
use crate::queue::admission::{QueueAdmission, QueueStats};
use crate::queue::CoreQueue;
use crate::reload::{ConfigSource, Reloader};
use crate::smtp::server::SessionConfig;
use glommio::channels::channel_mesh::{Full, MeshBuilder};

/// How long after `shutdown_grace` the process waits for executors that have
/// not stopped before it exits without them (a liveness bound; acknowledged
/// mail is already committed, so nothing acknowledged is lost by it).
const STOP_MARGIN: Duration = Duration::from_secs(10);

/// Most executors: one spool shard each, and a message id names at most
/// `MAX_SHARDS` (6 bits of shard).
pub const MAX_CORES: usize = sluice_spool::MAX_SHARDS as usize;

/// Executors to start: `server.cores`, or with 0 one per CPU up to
/// `MAX_CORES` (config validation refuses an explicit value above it).
pub fn executor_count(configured: usize, cpus: usize) -> usize {
    if configured == 0 {
        cpus.clamp(1, MAX_CORES)
    } else {
        configured
    }
}

/// The start-up walk of the spool, one part per core.
struct RecoveryTally {
    shards: u16,
    /// Cores still walking, and the sum of the parts so far.
    parts: std::sync::Mutex<(usize, RecoveryReport)>,
}

impl RecoveryTally {
    fn new(cores: usize, shards: u16) -> RecoveryTally {
        RecoveryTally {
            shards,
            parts: std::sync::Mutex::new((cores, RecoveryReport::default())),
        }
    }

    /// A core has walked its shards; the last one logs the whole.
    fn core_done(&self, part: &RecoveryReport) {
        let mut parts = self
            .parts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        parts.0 = parts.0.saturating_sub(1);
        parts.1.add(part);
        if parts.0 == 0 {
            let total = parts.1;
            tracing::info!(
                messages = total.messages,
                bytes = total.bytes,
                corrupt = total.corrupt,
                elapsed_ms = total.elapsed.as_secs_f64() * 1000.0,
                shards = self.shards,
                "spool recovered"
            );
        }
    }
}

/// Starts the relay and blocks until it has shut down (SIGTERM or SIGINT).
/// `source` is where `config` came from, for reloads (SIGHUP, the API).
pub fn run(config: Config, source: ConfigSource) -> anyhow::Result<()> {
    // First: metric handles made before the recorder would count nothing.
    crate::metrics::install()?;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let cores = executor_count(config.server.cores, cpus);
    if config.server.cores == 0 && cores < cpus {
        tracing::warn!(
            cpus,
            cores,
            "server.cores = 0: using {MAX_CORES} executors, the most message ids can name"
        );
    }
    crate::limits::check_memlock()?;
    crate::limits::check_io_uring()?;

    let spool = Arc::new(
        Spool::open(&SpoolConfig {
            path: config.spool.path.clone(),
            shards: cores as u16,
            map_size: config.spool.map_size.0 as usize,
            max_batch: config.spool.max_batch,
            sync: config.spool.sync,
            removal_linger: config.spool.removal_linger.0,
        })
        .with_context(|| format!("opening spool at {}", config.spool.path.display()))?,
    );
    // Cluster mode: join (a new epoch, the recovered spool reconciled with
    // the engine) before any core recovers its shards or opens a listener.
    let mut import_rx = Vec::new();
    let cluster = if config.cluster.enabled {
        let mut import_tx = Vec::with_capacity(cores);
        for _ in 0..cores {
            let (tx, rx) = async_channel::bounded(sluice_cluster::IMPORT_QUEUE);
            import_tx.push(tx);
            import_rx.push(rx);
        }
        // A fenced node's last log line says why it exits: write it out first.
        sluice_cluster::set_exit(crate::logging::exit);
        let c = sluice_cluster::start(config.cluster.settings(), spool.clone(), import_tx)
            .context("cluster: joining")?;
        Some(Arc::new(c))
    } else {
        None
    };
    let mut import_rx = import_rx.into_iter();
    // Bounce classification rules (shipped, plus delivery.bounce_rules).
    crate::bounce::install(
        crate::bounce::load(config.delivery.bounce_rules.as_deref()).map_err(anyhow::Error::msg)?,
    );
    // The suppression list: its own LMDB environment next to the shards.
    if config.suppression.enabled {
        let store = sluice_spool::SuppressionStore::open(&config.spool.path, config.spool.sync)
            .context("opening the suppression list")?;
        let list = Arc::new(crate::suppression::Suppressions::new(
            store,
            config.suppression.policy(),
        ));
        match list.purge_expired(crate::time::now_ms()) {
            Ok(n) if n > 0 => tracing::info!(purged = n, "expired suppressions removed"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "suppression list purge failed"),
        }
        crate::suppression::install(list);
    }
    // Inbound limits: one table for all cores (exact across them).
    if !config.limit.is_empty() {
        let names: Vec<&str> = config.server.listener.keys().map(String::as_str).collect();
        let rules = crate::config::limits::limit_rules(&config.limit, &names)
            .map_err(|e| anyhow::anyhow!("limit[{}].{}: {}", e.rule, e.key, e.reason))?;
        crate::inbound_limits::install(Arc::new(
            sluice_policy::inbound_limits::InboundLimits::new(
                rules,
                crate::config::limits::MAX_TRACKED_KEYS,
            ),
        ));
    }
    // Auto-bans: their own LMDB environment next to the shards.
    if config.ban.enabled {
        let policy = config
            .ban
            .policy(&config.relay.relay_networks)
            .map_err(|(k, why)| anyhow::anyhow!("ban.{k}: {why}"))?;
        let store = sluice_spool::BanStore::open(&config.spool.path, config.spool.sync)
            .context("opening the ban list")?;
        let bans = crate::bans::Bans::start(store, policy, crate::time::now_ms())
            .context("loading the ban list")?;
        crate::bans::install(bans);
    }
    // Delivery events (docs/events.md): the events and poster threads, and the
    // durable buffer next to the shards; before any core can make an event.
    if config.events.enabled {
        let tls = match config.events.webhook_url.as_deref() {
            Some(url)
                if url
                    .get(..6)
                    .is_some_and(|s| s.eq_ignore_ascii_case("https:")) =>
            {
                Some(
                    OutboundTlsConfig::new(config.delivery.tls_ca_file.as_deref(), &config.route)
                        .and_then(|t| t.verifying_client())
                        .context("TLS for the events webhook (delivery.tls_ca_file)")?,
                )
            }
            _ => None,
        };
        crate::events::start(&config.events, &config.spool.path, config.spool.sync, tls)?;
    }
    // Shaping actions and operator suspensions, kept across restarts.
    if config.delivery.enabled {
        let rules = config.shaping.rules().map_err(anyhow::Error::from)?;
        let slow_start = config
            .shaping
            .slow_start
            .then_some(config.shaping.slow_start_initial);
        let shaping = Arc::new(
            crate::delivery::shaping::Shaping::open(
                &config.spool.path,
                rules,
                slow_start,
                crate::time::now_ms(),
            )
            .context("opening the shaping store")?,
        );
        shaping
            .start_expiry()
            .context("starting the shaping expiry thread")?;
        crate::delivery::shaping::install(shaping);
        // Egress pools: warm-up counters kept across restarts.
        if !config.pools.pools.is_empty() {
            let pools =
                crate::delivery::pools::PoolState::open(&config.spool.path, crate::time::now_ms())
                    .context("opening the warm-up store")?;
            crate::delivery::pools::install(pools);
        }
    }
    // Each core walks the shards it schedules once (queue/recovery.rs); the
    // last to finish logs the whole ("spool recovered").
    let recovery = Arc::new(RecoveryTally::new(cores, spool.shard_count()));

    let relay = Arc::new(config.relay_policy()?);
    let credentials = Arc::new(ArcSwap::from_pointee(Credentials::new(
        config.auth.users.clone(),
    )?));
    let auth_guard = Arc::new(crate::auth_guard::AuthGuard::new(&config.auth));
    let sender_logins = Arc::new(
        sluice_policy::sender_login::SenderLogins::new(&config.auth.sender_login)
            .context("auth.sender_login")?,
    );
    let body_budget = Arc::new(crate::budget::BodyBudget::new(
        config.server.max_body_memory.0,
        config.server.max_body_memory_per_client.0,
    ));
    let mut listeners = Vec::new();
    for (name, l) in &config.server.listener {
        let tls = match (l.tls, &l.tls_cert, &l.tls_key) {
            (TlsMode::None, _, _) => None,
            (_, Some(cert), Some(key)) => Some(
                crate::tls::reloadable_server_config(cert, key)
                    .with_context(|| format!("server.listener.{name}: TLS"))?,
            ),
            _ => {
                return Err(anyhow!(
                    "server.listener.{name}: tls_cert and tls_key are required"
                ))
            }
        };
        let session = Arc::new(SessionConfig::from_listener(
            name,
            l,
            &config.server.hostname,
            relay.clone(),
            !credentials.load().is_empty(),
            auth_guard.clone(),
            &sender_logins,
        ));
        let shared = Arc::new(ListenerShared::new(
            name,
            l,
            session,
            tls,
            body_budget.clone(),
        )?);
        for addr in &l.bind {
            listeners.push((shared.clone(), *addr));
        }
    }

    // Rules pick each message's queue (at RCPT, for quotas) and each
    // recipient's route (at delivery); one compiled set serves both.
    let rules = Arc::new(config.rule_set()?);
    let queue_stats = Arc::new(QueueStats::new(
        config.queue.keys().map(String::as_str),
        cores,
    ));
    crate::metrics::watch_queues(queue_stats.clone());
    let admission = Arc::new(
        QueueAdmission::new(rules, &config.queue, queue_stats.clone())
            .with_tenants(config.tenant_policy()),
    );

    // DKIM signers with their keys: a bad key stops the start, naming it.
    let dkim: crate::queue::dkim::DkimSwap = Arc::new(ArcSwap::from_pointee(
        crate::queue::dkim::DkimState::new(config.dkim_policy().map_err(|e| anyhow!("{e}"))?),
    ));

    // Listeners that verify inbound mail need DNS even without delivery. The
    // verifier is made on every core whenever DNS is configured, so a reload
    // can switch `verify` on; without DNS it is an error only if a listener
    // asks for it now.
    let verify_dns = match config
        .dns
        .resolver_config(std::path::Path::new("/etc/resolv.conf"))
    {
        Ok(dns) => Some(dns),
        Err(e) if config.server.listener.values().any(|l| l.verify.is_some()) => {
            return Err(anyhow!(
                "dns (needed by server.listener.*.verify): no servers configured and /etc/resolv.conf unreadable: {e}"
            ));
        }
        Err(e) if config.server.listener.values().any(|l| l.dnsbl) => {
            return Err(anyhow!(
                "dns (needed by server.listener.*.dnsbl): no servers configured and /etc/resolv.conf unreadable: {e}"
            ));
        }
        Err(_) => None,
    };

    // Listeners' filters at the delivery stage; a reload swaps them.
    let stage_filters: crate::filters::delivery::DeliveryFiltersSwap =
        Arc::new(ArcSwap::from_pointee(
            crate::filters::delivery::DeliveryFilters::of_config(&config),
        ));
    // DNSBL/DNSWL and greylisting: made when a listener switches either on
    // at start (`[dnsbl]` and `[greylist]` are read then, not on reload).
    let antispam = if config
        .server
        .listener
        .values()
        .any(|l| l.dnsbl || l.greylist)
    {
        let greylist = if config.server.listener.values().any(|l| l.greylist) {
            let table =
                crate::antispam::Greylist::open(&config.spool.path, config.greylist.max_entries)
                    .context("opening the greylist table")?;
            Some(Arc::new(table))
        } else {
            None
        };
        let a = Arc::new(crate::antispam::Antispam::new(
            config.antispam.clone(),
            config.dnsbl.timeout.0,
            greylist,
        ));
        a.start_purge(config.greylist.purge_interval.0)
            .context("starting the greylist purge thread")?;
        Some(a)
    } else {
        None
    };

    // Routes, queues, destinations and limits: a reload stores a new snapshot.
    let delivery_cfg = Arc::new(ArcSwap::from_pointee(config.delivery_config()));
    let delivery = if config.delivery.enabled {
        let resolver = config
            .dns
            .resolver_config(std::path::Path::new("/etc/resolv.conf"))
            .context("dns: no servers configured and /etc/resolv.conf unreadable")?;
        let tls = OutboundTlsConfig::new(config.delivery.tls_ca_file.as_deref(), &config.route)
            .context("outbound TLS setup (delivery.tls_ca_file, route.*.tls_client_cert)")?;
        let mta_sts = crate::delivery::mta_sts::MtaSts::start(
            config.delivery.mta_sts,
            Some(config.spool.path.clone()),
            true,
            crate::delivery::mta_sts::FetchConfig {
                timeout: config.delivery.mta_sts_fetch_timeout.0,
                port: config.delivery.mta_sts_https_port,
                tls: tls.verifying_client().context("MTA-STS fetch TLS setup")?,
                dns: resolver.clone(),
                refresh_interval: Some(config.delivery.mta_sts_refresh_interval.0),
            },
        )
        .context("starting the MTA-STS thread")?;
        let tls_rpt = if config.tls_rpt.enabled {
            let table = sluice_spool::Table::open(&config.spool.path, "tls-rpt", 256 << 20)
                .context("opening the TLS-RPT store")?;
            Some(Arc::new(crate::delivery::tls_rpt_io::RptShared {
                table,
                submitter: config.tls_rpt.submitter(&config.server.hostname),
                cfg: config.tls_rpt.clone(),
                https: tls
                    .verifying_client()
                    .context("TLS for report uploads (tls_rpt)")?,
            }))
        } else {
            None
        };
        Some(Arc::new(DeliveryShared {
            spool: spool.clone(),
            cfg: delivery_cfg.clone(),
            hostname: config.server.hostname.clone(),
            ehlo_name: config
                .delivery
                .ehlo_name
                .clone()
                .unwrap_or_else(|| config.server.hostname.clone()),
            tls,
            dns: resolver,
            mta_sts,
            rules: admission.rules().clone(),
            admin: crate::delivery::admin::AdminChannels::new(cores),
            tls_rpt,
            stage_filters: stage_filters.clone(),
            lease: cluster.as_ref().map(|c| c.lease.clone()),
            limits: cluster.as_ref().and_then(|c| c.limits.clone()),
        }))
    } else {
        None
    };
    // Cluster mode with shared limits: other nodes' suspensions and shaping
    // actions applied here, and this node's shared.
    if let (Some(c), Some(d)) = (&cluster, &delivery) {
        if let Some(a) = &c.actions {
            crate::cluster_actions::install(a.clone(), &c.settings.node_id, d.admin.senders())
                .context("starting the cluster-actions thread")?;
        }
    }
    let mesh = MeshBuilder::<MeshMsg, Full>::full(cores, 1024);

    let shutdown = Arc::new(event_listener::Event::new());
    let shutting_down = Arc::new(AtomicBool::new(false));
    let stop_started = Arc::new(OnceLock::new());
    let shared_listeners: Vec<Arc<ListenerShared>> =
        listeners.iter().map(|(l, _)| l.clone()).collect();
    let reloader = Arc::new(
        Reloader::new(
            source,
            config.clone(),
            &shared_listeners,
            credentials.clone(),
            admission.rules().clone(),
        )
        .with_dkim(dkim.clone())
        .with_stage_filters(stage_filters.clone())
        .with_delivery(delivery_cfg)
        .with_admission(admission.clone()),
    );
    let signals = spawn_signal_thread(
        shutdown.clone(),
        shutting_down.clone(),
        stop_started.clone(),
        reloader.clone(),
    )?;

    // The management API reads the spool itself and asks the cores to act.
    let stop: Arc<dyn Fn() + Send + Sync> = {
        let (shutdown, shutting_down, stop_started) = (
            shutdown.clone(),
            shutting_down.clone(),
            stop_started.clone(),
        );
        Arc::new(move || begin_stop(&shutdown, &shutting_down, &stop_started))
    };
    let api = crate::admin::api::ApiContext {
        spool: Some(spool.clone()),
        cores: delivery.as_ref().map(|d| d.admin.senders()),
        cluster: cluster.clone(),
        stop: Some(stop),
    };
    let admin = start_admin(&config, &reloader, api)?;

    let grace = config.server.shutdown_grace.0;
    let mut handles = Vec::with_capacity(cores);
    // Each executor reports once its sockets are bound, so "listening" is logged
    // only when connections can really be accepted.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<u16, String>>();
    for core in 0..cores {
        let spool = spool.clone();
        let listeners = listeners.clone();
        let credentials = credentials.clone();
        let shutdown = shutdown.clone();
        let shutting_down = shutting_down.clone();
        let ready = ready_tx.clone();
        let delivery = delivery.clone();
        let mesh = mesh.clone();
        let admission = admission.clone();
        let recovery = recovery.clone();
        let dkim = dkim.clone();
        let verify_dns = verify_dns.clone();
        let antispam = antispam.clone();
        let import = import_rx.next();
        let handle = LocalExecutorBuilder::new(Placement::Fixed(core % cpus))
            .name(&format!("sluice-core-{core}"))
            .io_memory(config.server.io_memory.0 as usize)
            .ring_depth(config.server.ring_depth)
            .spawn(move || async move {
                let result = core_main(
                    core as u16,
                    cores,
                    delivery,
                    mesh,
                    admission,
                    spool,
                    recovery,
                    dkim,
                    verify_dns,
                    antispam,
                    import,
                    listeners,
                    credentials,
                    shutdown,
                    shutting_down,
                    grace,
                    ready,
                )
                .await;
                if let Err(e) = &result {
                    tracing::error!(core, "executor failed: {e:#}");
                }
                result
            })
            .map_err(|e| {
                let hint = crate::limits::startup_hint(&e.to_string())
                    .map_or(String::new(), |h| format!(" ({h})"));
                anyhow!("starting executor for core {core}: {e}{hint}")
            })?;
        handles.push(handle);
    }
    drop(ready_tx);
    let mut ready = 0;
    for msg in ready_rx.iter() {
        match msg {
            Ok(_) => ready += 1,
            Err(e) => {
                shutting_down.store(true, Ordering::SeqCst);
                shutdown.notify(usize::MAX);
                for h in handles {
                    let _ = h.join();
                }
                return Err(anyhow!(e));
            }
        }
        if ready == cores {
            let addrs: Vec<String> = listeners
                .iter()
                .map(|(l, a)| format!("{}={a}", l.name))
                .collect();
            tracing::info!(cores, listeners = %addrs.join(","), "sluice listening");
            break;
        }
    }

    let failed = join_executors(handles, &stop_started, grace + STOP_MARGIN);
    if let Some(admin) = admin {
        admin.stop();
    }
    // The events the cores made are written (file and buffer) before exit.
    crate::events::flush(Duration::from_secs(5));
    spool.shutdown();
    if let Some(c) = &cluster {
        // The writers have drained: the cluster thread writes the last
        // removals (and, after `sluice cluster leave`, marks the node left).
        // Bounded: a sync and a leave, each bounded by engine_timeout.
        if let Err(e) = c.stop(c.settings.engine_timeout * 2) {
            tracing::error!(target: "sluice::cluster", error = %e, "cluster: the stop's last sync failed");
        }
    }
    drop(signals);
    match failed {
        Some(e) => Err(e),
        None => {
            tracing::info!("sluice stopped");
            Ok(())
        }
    }
}

/// Waits for every executor thread. Once a shutdown has begun, waits at most
/// `bound` from its start: a core that has not stopped by then is logged and
/// left behind, so the exit stays bounded whatever holds it.
fn join_executors(
    handles: Vec<glommio::ExecutorJoinHandle<anyhow::Result<()>>>,
    stop_started: &OnceLock<Instant>,
    bound: Duration,
) -> Option<anyhow::Error> {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut remaining = 0;
    for (core, h) in handles.into_iter().enumerate() {
        let tx = done_tx.clone();
        let joiner = std::thread::Builder::new()
            .name(format!("sluice-join-{core}"))
            .spawn(move || {
                let _ = tx.send((core, h.join()));
            });
        match joiner {
            Ok(_) => remaining += 1,
            Err(e) => return Some(anyhow!("waiting for core {core}: {e}")),
        }
    }
    drop(done_tx);
    let mut failed = None;
    while remaining > 0 {
        match done_rx.recv_timeout(Duration::from_millis(100)) {
            Ok((_, Ok(Ok(())))) => remaining -= 1,
            Ok((core, Ok(Err(e)))) => {
                remaining -= 1;
                failed = Some(e.context(format!("core {core}")));
            }
            Ok((core, Err(e))) => {
                remaining -= 1;
                let e = e.to_string();
                let hint =
                    crate::limits::startup_hint(&e).map_or(String::new(), |h| format!(" ({h})"));
                failed = Some(anyhow!(
                    "core {core}: executor thread panicked or failed: {e}{hint}"
                ));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if stop_started.get().is_some_and(|t| t.elapsed() > bound) {
                    tracing::error!(
                        cores = remaining,
                        "executors still running {}s after the shutdown began; exiting without them",
                        bound.as_secs()
                    );
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    failed
}

/// Starts the operations listener (`admin.listen`), unless disabled.
fn start_admin(
    config: &Config,
    reloader: &Arc<Reloader>,
    api: crate::admin::api::ApiContext,
) -> anyhow::Result<Option<AdminServer>> {
    if config.admin.listen.is_empty() {
        return Ok(None);
    }
    let token = match (
        &config.admin.token_file,
        crate::admin::cli::token_path(config),
    ) {
        (Some(path), _) => Some(crate::admin::read_token(path)?),
        // The token `sluice run` made in the spool directory; if it could not
        // be made, the API answers 401 as with no token at all.
        (None, Some(path)) => crate::admin::read_token(&path).ok(),
        (None, None) => None,
    };
    let state = Arc::new(AdminState {
        token,
        metrics_auth: config.admin.metrics_auth,
        reload: Some({
            let reloader = reloader.clone();
            Arc::new(move || reloader.reload())
        }),
        api,
    });
    AdminServer::start(&config.admin.listen, state).map(Some)
}

#[allow(clippy::too_many_arguments)]
async fn core_main(
    core: u16,
    cores: usize,
    delivery: Option<Arc<DeliveryShared>>,
    mesh: MeshBuilder<MeshMsg, Full>,
    admission: Arc<QueueAdmission>,
    spool: Arc<Spool>,
    recovery: Arc<RecoveryTally>,
    dkim: crate::queue::dkim::DkimSwap,
    verify_dns: Option<sluice_dns::ResolverConfig>,
    antispam: Option<Arc<crate::antispam::Antispam>>,
    import: Option<async_channel::Receiver<sluice_cluster::Import>>,
    listeners: Vec<(Arc<ListenerShared>, std::net::SocketAddr)>,
    credentials: Arc<ArcSwap<Credentials>>,
    shutdown: Arc<event_listener::Event>,
    shutting_down: Arc<AtomicBool>,
    grace: Duration,
    ready: std::sync::mpsc::Sender<Result<u16, String>>,
) -> anyhow::Result<()> {
    let last = spool
        .last_id(core)
        .map_err(|e| anyhow!("spool shard {core}: {e}"))?;
    let ids = Rc::new(IdGenerator::new(core, last));
    // Every executor joins the mesh (it completes only when all have), so a
    // delivery hand-off always finds its peer.
    let (senders, receivers) = mesh
        .join()
        .await
        .map_err(|_| anyhow!("core {core}: joining the delivery mesh failed"))?;
    let queue =
        Rc::new(CoreQueue::new(core, spool.clone(), admission.stats.clone()).with_dkim(dkim));
    let delivery = match delivery {
        Some(shared) => {
            let d = CoreDelivery::new(core, cores, shared, ids.clone(), senders, queue.clone());
            let recovered = d
                .start(receivers)
                .map_err(|e| anyhow!("core {core}: delivery recovery: {e}"))?;
            recovery.core_done(&recovered);
            tracing::info!(core, scheduled = recovered.messages, "delivery started");
            Some(d)
        }
        None => {
            // No delivery to recover the schedule, but the queue quotas still
            // need what is queued: the same walk, counting only.
            let shards = crate::queue::recovery::core_shards(spool.shard_count(), core, cores);
            let recovered = crate::queue::recovery::recover(&queue, &shards, |_, _| {})
                .map_err(|e| anyhow!("core {core}: counting queued mail: {e}"))?;
            recovery.core_done(&recovered);
            None
        }
    };
    // Cluster mode: a dead node's messages come in here (after recovery, so
    // the scheduler takes them like any new message).
    if let Some(rx) = import {
        crate::cluster_io::spawn_importer(queue.clone(), ids.clone(), rx);
    }
    crate::metrics::spawn_core_collector(
        core,
        delivery
            .clone()
            .map(|d| d as Rc<dyn crate::metrics::DeliveryGauges>),
    );
    // The verifier shares delivery's resolver (one cache per core) when
    // there is one.
    // The DNSBL lookups use the same resolver (and cache).
    let resolver = verify_dns.map(|dns| match &delivery {
        Some(d) => d.resolver().clone(),
        None => sluice_dns::Resolver::new(dns),
    });
    let verify = match &resolver {
        Some(resolver) => {
            let v = crate::verify::CoreVerify::new(resolver.clone())
                .map_err(|e| anyhow!("core {core}: {e}"))?;
            Some(Rc::new(v))
        }
        None => None,
    };
    let antispam =
        antispam.map(|a| Rc::new(crate::antispam::CoreAntispam::new(a, resolver.clone())));
    let ctx = Rc::new(CoreContext {
        core,
        spool,
        queue,
        queues: admission,
        ids,
        credentials,
        shutdown: shutdown.clone(),
        shutting_down: shutting_down.clone(),
        sessions: Cell::new(0),
        verify,
        antispam,
    });

    let mut sockets = Vec::new();
    for (shared, addr) in &listeners {
        match TcpListener::bind(addr) {
            Ok(sock) => sockets.push((shared.clone(), Rc::new(sock))),
            Err(e) => {
                let msg = format!("server.listener.{}: cannot bind {addr}: {e}", shared.name);
                let _ = ready.send(Err(msg.clone()));
                return Err(anyhow!(msg));
            }
        }
    }
    let _ = ready.send(Ok(core));

    let mut accept_tasks = Vec::new();
    for (shared, sock) in sockets {
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let shutting_down = shutting_down.clone();
        accept_tasks.push(glommio::spawn_local(async move {
            loop {
                let stop = shutdown.listen();
                if shutting_down.load(Ordering::SeqCst) {
                    break;
                }
                let accepted =
                    futures_lite::future::or(async { Some(sock.accept().await) }, async {
                        stop.await;
                        None
                    })
                    .await;
                match accepted {
                    None => break,
                    Some(Ok(stream)) => {
                        glommio::spawn_local(conn::handle(stream, shared.clone(), ctx.clone()))
                            .detach();
                    }
                    Some(Err(e)) => {
                        // Usually EMFILE: back off briefly instead of spinning.
                        tracing::warn!(listener = %shared.name, "accept failed: {e}");
                        Timer::new(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    for task in accept_tasks {
        task.await;
    }
    // Stopped accepting: let sessions in flight finish, within the grace period.
    let deadline = Instant::now() + grace;
    while ctx.sessions.get() > 0 && Instant::now() < deadline {
        Timer::new(Duration::from_millis(20)).await;
    }
    if ctx.sessions.get() > 0 {
        tracing::warn!(
            core,
            sessions = ctx.sessions.get(),
            "shutdown grace over; closing sessions"
        );
    }
    // Delivery tasks still running are dropped with the executor: an attempt
    // not yet recorded leaves its recipients open in the spool (retried after
    // a restart); updates already handed to the spool writer are committed by
    // the spool's shutdown.
    if let Some(d) = &delivery {
        // TLS-RPT counts not yet in the store go there now.
        d.tls_rpt_flush().await;
        d.stop();
    }
    Ok(())
}

/// A plain thread turns SIGTERM/SIGINT into the shutdown event and SIGHUP into
/// a reload (run here, off the executors: it reads files and parses keys).
fn spawn_signal_thread(
    shutdown: Arc<event_listener::Event>,
    shutting_down: Arc<AtomicBool>,
    stop_started: Arc<OnceLock<Instant>>,
    reloader: Arc<Reloader>,
) -> anyhow::Result<signal_hook::iterator::Handle> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("installing signal handlers")?;
    let handle = signals.handle();
    std::thread::Builder::new()
        .name("sluice-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    tracing::info!("SIGHUP received: reloading the configuration");
                    crate::events::reopen_file();
                    // The outcome is logged by reload() itself.
                    let _ = reloader.reload();
                    continue;
                }
                tracing::info!(signal = sig, "stop asked by signal");
                begin_stop(&shutdown, &shutting_down, &stop_started);
            }
        })
        .context("starting signal thread")?;
    Ok(handle)
}

/// The stop: accept loops end, sessions drain, then the writers.
fn begin_stop(
    shutdown: &event_listener::Event,
    shutting_down: &AtomicBool,
    stop_started: &OnceLock<Instant>,
) {
    let _ = stop_started.set(Instant::now());
    tracing::info!("shutting down: no new connections, draining sessions");
    shutting_down.store(true, Ordering::SeqCst);
    shutdown.notify(usize::MAX);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_zero_is_one_per_cpu_capped_at_the_id_shard_bits() {
        assert_eq!(executor_count(0, 8), 8);
        assert_eq!(executor_count(0, 64), 64);
        // More CPUs than a message id can name shards for: capped.
        assert_eq!(executor_count(0, 96), MAX_CORES);
        assert_eq!(executor_count(0, 256), MAX_CORES);
        assert_eq!(executor_count(0, 0), 1);
        // An explicit value stands (validation caps it at 64).
        assert_eq!(executor_count(3, 96), 3);
        assert_eq!(MAX_CORES, 1 << 6);
    }
}
