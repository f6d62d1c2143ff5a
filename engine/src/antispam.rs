//! DNSBL/DNSWL lookups and greylisting at RCPT (ARCHITECTURE.md "DNSBL,
//! DNSWL and greylisting"): the I/O around `sluice_policy::dnsbl` and
//! `sluice_policy::greylist`. Zones are asked through the core's resolver
//! (its cache keeps answers for their TTLs), all at once, within
//! `dnsbl.timeout`; the greylist lives in `<spool.path>/greylist` (LMDB),
//! read on the executor (memory-mapped) and written on the blocking pool.
//!
//! The connection driver calls [`CoreAntispam::check_rcpt`] before the
//! listener's filters at each RCPT; a refusal is answered like a filter's.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice_dns::{QueryType, Record, Resolver};
use sluice_policy::dnsbl::{address_domain, Decision, Subject, Verdict as ListVerdict, ZoneAnswer};
use sluice_policy::greylist::{Entry, Outcome};
use sluice_policy::stage::{FilterReply, Verdict};
use sluice_spool::Table;

use crate::config::AntispamPolicy;

/// Directory of the greylist table under the spool path.
pub const GREYLIST_DIR: &str = "greylist";
/// Map size: room for ~4 million triplets of ~250 bytes.
const GREYLIST_MAP: usize = 1 << 30;

/// The greylist table with its bounds.
pub struct Greylist {
    table: Table,
    max_entries: u64,
    /// Entries now (counted at open and by each purge, raised by each new
    /// triplet): the bound's check costs no read transaction.
    entries: AtomicU64,
}

impl Greylist {
    /// Opens (creating) `<spool>/greylist`. Commits skip the fsync: an entry
    /// lost to a system crash only greylists that triplet once more.
    pub fn open(spool: &std::path::Path, max_entries: usize) -> anyhow::Result<Greylist> {
        let table = Table::open_with(spool, GREYLIST_DIR, GREYLIST_MAP, false)?;
        let entries = table.count()?;
        Ok(Greylist {
            table,
            max_entries: max_entries as u64,
            entries: AtomicU64::new(entries),
        })
    }

    /// Removes expired entries; how many. Blocking (one write transaction).
    pub fn purge(
        &self,
        policy: &sluice_policy::greylist::GreylistPolicy,
        now_ms: u64,
    ) -> anyhow::Result<usize> {
        let n = self
            .table
            .remove_where(|_, v| policy.is_expired(Entry::decode(v), now_ms))?;
        self.entries.store(self.table.count()?, Ordering::Relaxed);
        Ok(n)
    }
}

/// What every core shares: the policy and the greylist table.
pub struct Antispam {
    policy: AntispamPolicy,
    timeout: Duration,
    greylist: Option<Arc<Greylist>>,
}

impl Antispam {
    pub fn new(
        policy: AntispamPolicy,
        timeout: Duration,
        greylist: Option<Arc<Greylist>>,
    ) -> Antispam {
        Antispam {
            policy,
            timeout,
            greylist,
        }
    }

    /// Purges expired greylist entries every `interval`, on a thread of its own.
    pub fn start_purge(self: &Arc<Self>, interval: Duration) -> std::io::Result<()> {
        let (Some(table), Some(policy)) = (self.greylist.clone(), self.policy.greylist.clone())
        else {
            return Ok(());
        };
        std::thread::Builder::new()
            .name("greylist-purge".into())
            .spawn(move || loop {
                match table.purge(&policy, crate::time::now_ms()) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(target: "sluice::greylist", purged = n, "expired greylist entries removed"),
                    Err(e) => tracing::warn!(target: "sluice::greylist", error = %e, "greylist purge failed"),
                }
                std::thread::sleep(interval);
            })
            .map(|_| ())
    }
}

/// One core's view: the shared part and the core's resolver.
pub struct CoreAntispam {
    shared: Arc<Antispam>,
    resolver: Option<Resolver>,
}

/// What the RCPT check knows.
pub struct RcptFacts<'a> {
    pub ip: IpAddr,
    pub helo: &'a str,
    pub sender: &'a str,
    pub recipient: &'a str,
    /// Authenticated or in the relay networks: never checked.
    pub trusted: bool,
    /// The listener's `dnsbl` and `greylist` switches.
    pub dnsbl: bool,
    pub greylist: bool,
}

/// One session's memory of the zones' decision: looked up at its first
/// RCPT, again only when the HELO name or sender domain asked about changes.
#[derive(Default)]
pub struct SessionMemo {
    dnsbl: Option<((String, String), Decision)>,
}

impl SessionMemo {
    /// The listing zones the session's last decision found ("" for none).
    pub fn listed(&self) -> String {
        self.dnsbl
            .as_ref()
            .map(|(_, d)| d.listed_names())
            .unwrap_or_default()
    }
}

impl CoreAntispam {
    pub fn new(shared: Arc<Antispam>, resolver: Option<Resolver>) -> CoreAntispam {
        CoreAntispam { shared, resolver }
    }

    /// The DNSBL and greylisting verdict for one recipient (accept: go on
    /// to the filters).
    pub async fn check_rcpt(
        &self,
        memo: &mut SessionMemo,
        facts: &RcptFacts<'_>,
        now_ms: u64,
    ) -> Verdict {
        if facts.trusted {
            return Verdict::Accept;
        }
        let mut allowed = false;
        if facts.dnsbl {
            let decision = self.dnsbl(memo, facts).await;
            if let Some((code, esc, text)) = decision.reply(facts.ip) {
                tracing::info!(
                    target: "sluice::dnsbl",
                    client_ip = %facts.ip,
                    sender = %crate::smtp::server::printable(facts.sender),
                    recipient = %crate::smtp::server::printable(facts.recipient),
                    listed = %decision.listed_names(),
                    score = decision.score,
                    result = code,
                    "client refused by DNSBL"
                );
                let reply = FilterReply {
                    code,
                    enhanced: Some(esc.to_string()),
                    text,
                };
                return if code >= 500 {
                    Verdict::Reject(reply)
                } else {
                    Verdict::Tempfail(reply)
                };
            }
            allowed = decision.verdict == ListVerdict::Allowed;
        }
        if facts.greylist {
            return self.greylist(facts, allowed, now_ms).await;
        }
        Verdict::Accept
    }

    /// The zones' decision for this session (memo first).
    async fn dnsbl(&self, memo: &mut SessionMemo, facts: &RcptFacts<'_>) -> Decision {
        let policy = &self.shared.policy.dnsbl;
        let sender_domain = if policy.asks(Subject::Sender) {
            address_domain(facts.sender).to_ascii_lowercase()
        } else {
            String::new()
        };
        let helo = if policy.asks(Subject::Helo) {
            facts.helo.to_ascii_lowercase()
        } else {
            String::new()
        };
        let key = (helo, sender_domain);
        if let Some((k, d)) = &memo.dnsbl {
            if *k == key {
                return d.clone();
            }
        }
        let Some(resolver) = &self.resolver else {
            // No DNS configured (refused at start when a listener asks for
            // it; a reload may still switch it on): nothing is listed.
            return Decision::pass();
        };
        let names: Vec<Option<String>> = policy
            .zones
            .iter()
            .map(|z| match z.subject {
                Subject::Client => Some(z.client_query(facts.ip)),
                Subject::Helo => z.domain_query(&key.0),
                Subject::Sender => z.domain_query(&key.1),
            })
            .collect();
        let lookups = names
            .iter()
            .map(|n| async move {
                match n {
                    Some(name) => lookup(resolver, name).await,
                    None => ZoneAnswer::Skipped,
                }
            })
            .collect();
        let answers = crate::time::within(self.shared.timeout, sluice_dns::join_all(lookups))
            .await
            .unwrap_or_else(|| {
                tracing::info!(target: "sluice::dnsbl", client_ip = %facts.ip, "DNSBL lookups timed out");
                vec![ZoneAnswer::Failed; names.len()]
            });
        for (zone, answer) in policy.zones.iter().zip(&answers) {
            let result = match answer {
                ZoneAnswer::Skipped => continue,
                ZoneAnswer::NotListed => "clear",
                ZoneAnswer::Listed(_) => "listed",
                ZoneAnswer::Failed => "failed",
            };
            crate::metrics::dnsbl_lookup(&zone.name, result);
        }
        let decision = policy.decide(&answers);
        crate::metrics::dnsbl_decision(decision.verdict.name());
        if decision.failed > 0 {
            tracing::info!(target: "sluice::dnsbl", client_ip = %facts.ip, failed = decision.failed, "DNSBL lookups failed (not listed)");
        }
        if !decision.listed.is_empty() {
            tracing::info!(
                target: "sluice::dnsbl",
                client_ip = %facts.ip,
                listed = %decision.listed_names(),
                score = decision.score,
                verdict = decision.verdict.name(),
                "client listed"
            );
        }
        memo.dnsbl = Some((key, decision.clone()));
        decision
    }

    async fn greylist(&self, facts: &RcptFacts<'_>, allowed: bool, now_ms: u64) -> Verdict {
        let (Some(table), Some(policy)) = (&self.shared.greylist, &self.shared.policy.greylist)
        else {
            return Verdict::Accept;
        };
        let ex = &self.shared.policy.exemptions;
        if allowed
            || ex
                .reason(
                    facts.ip,
                    facts.sender,
                    facts.recipient,
                    &self.shared.policy.lists,
                )
                .is_some()
        {
            crate::metrics::greylist("exempt");
            return Verdict::Accept;
        }
        let key = policy.key(facts.ip, facts.sender, facts.recipient);
        let stored = match table.table.get(&key) {
            Ok(v) => v.as_deref().and_then(Entry::decode),
            Err(e) => {
                // A broken table must not stop mail.
                tracing::warn!(target: "sluice::greylist", error = %e, "greylist read failed (not greylisted)");
                crate::metrics::greylist("error");
                return Verdict::Accept;
            }
        };
        let (outcome, write) = policy.decide(stored, now_ms);
        if stored.is_none() && table.entries.load(Ordering::Relaxed) >= table.max_entries {
            tracing::warn!(target: "sluice::greylist", client_ip = %facts.ip, "greylist full (greylist.max_entries): not greylisted");
            crate::metrics::greylist("full");
            return Verdict::Accept;
        }
        if let Some(entry) = write {
            if stored.is_none() {
                table.entries.fetch_add(1, Ordering::Relaxed);
            }
            let t = table.clone();
            let written = glommio::executor()
                .spawn_blocking(move || t.table.put(&key, &entry.encode()))
                .await;
            if let Err(e) = written {
                tracing::warn!(target: "sluice::greylist", error = %e, "greylist write failed (not greylisted)");
                crate::metrics::greylist("error");
                return Verdict::Accept;
            }
        }
        match outcome {
            Outcome::Pass => {
                crate::metrics::greylist("passed");
                Verdict::Accept
            }
            Outcome::Defer { retry_after_ms } => {
                tracing::info!(
                    target: "sluice::greylist",
                    client_ip = %facts.ip,
                    sender = %crate::smtp::server::printable(facts.sender),
                    recipient = %crate::smtp::server::printable(facts.recipient),
                    retry_in_s = retry_after_ms.saturating_sub(now_ms) / 1000,
                    "greylisted"
                );
                crate::metrics::greylist("deferred");
                Verdict::Tempfail(FilterReply {
                    code: 451,
                    enhanced: Some("4.7.1".into()),
                    text: "Error: greylisted, try again later".into(),
                })
            }
        }
    }
}

/// One zone's answer through the resolver: A records (NXDOMAIN/NODATA →
/// not listed, any error → failed).
async fn lookup(resolver: &Resolver, name: &str) -> ZoneAnswer {
    match resolver.lookup(name, QueryType::A).await {
        Ok(found) => {
            let values: Vec<_> = found
                .records()
                .iter()
                .filter_map(|r| match r {
                    Record::A(a, _) => Some(*a),
                    _ => None,
                })
                .collect();
            if values.is_empty() {
                ZoneAnswer::NotListed
            } else {
                ZoneAnswer::Listed(values)
            }
        }
        Err(e) if !e.is_temporary() => ZoneAnswer::NotListed,
        Err(_) => ZoneAnswer::Failed,
    }
}
