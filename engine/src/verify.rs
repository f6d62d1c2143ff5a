//! Inbound authentication on a listener (ARCHITECTURE.md "Inbound
//! authentication"): the per-core resolver as the DNS bridge's source, iprev
//! when a client connects, SPF when MAIL FROM arrives, and the message
//! checks between the end of DATA and the store (large bodies hashed on the
//! blocking pool), with their metrics.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use metrics::{counter, histogram, Counter, Histogram};
use sluice_dns::{QueryType, Record, Resolver};
use sluice_policy::auth::{
    decide, decide_spf, Answer, BodyHashes, Checks, Decision, DnsSource, Envelope, Query, Sealer,
    SpfResults, Verdict, Verifier, VerifyConfig,
};
use sluice_spool::MessageId;

pub use sluice_policy::auth::IprevOutput;

/// Answers the bridge's queries through this core's resolver (and its
/// cache): all of a round's queries at once.
pub struct ResolverSource<'a>(pub &'a Resolver);

impl DnsSource for ResolverSource<'_> {
    async fn resolve(&self, queries: Vec<Query>) -> Vec<(Query, Answer)> {
        let resolver = self.0;
        let lookups = queries
            .into_iter()
            .map(|q| async move {
                let a = lookup(resolver, &q).await;
                (q, a)
            })
            .collect();
        sluice_dns::join_all(lookups).await
    }
}

async fn lookup(resolver: &Resolver, q: &Query) -> Answer {
    let (name, qtype) = match q {
        Query::Txt(n) => (n.clone(), QueryType::Txt),
        Query::A(n) => (n.clone(), QueryType::A),
        Query::Aaaa(n) => (n.clone(), QueryType::Aaaa),
        Query::Mx(n) => (n.clone(), QueryType::Mx),
        Query::Ptr(ip) => (sluice_dns::reverse_name(*ip), QueryType::Ptr),
    };
    let found = match resolver.lookup(&name, qtype).await {
        Ok(l) => l,
        // A name that cannot be asked (bad label) does not exist.
        Err(e) if !e.is_temporary() => return Answer::NotFound,
        Err(e) => return Answer::TempFail(e.to_string()),
    };
    let records = found.records();
    let answer = match qtype {
        QueryType::Txt => Answer::Txt(
            records
                .iter()
                .filter_map(|r| match r {
                    Record::Txt(t, _) => Some(t.as_bytes().to_vec()),
                    _ => None,
                })
                .collect(),
        ),
        QueryType::A => Answer::A(
            records
                .iter()
                .filter_map(|r| match r {
                    Record::A(a, _) => Some(*a),
                    _ => None,
                })
                .collect(),
        ),
        QueryType::Aaaa => Answer::Aaaa(
            records
                .iter()
                .filter_map(|r| match r {
                    Record::Aaaa(a, _) => Some(*a),
                    _ => None,
                })
                .collect(),
        ),
        QueryType::Mx => Answer::Mx(
            records
                .iter()
                .filter_map(|r| match r {
                    Record::Mx {
                        preference,
                        exchange,
                        ..
                    } => Some((*preference, exchange.clone())),
                    _ => None,
                })
                .collect(),
        ),
        QueryType::Ptr => Answer::Ptr(
            records
                .iter()
                .filter_map(|r| match r {
                    Record::Ptr(n, _) => Some(n.clone()),
                    _ => None,
                })
                .collect(),
        ),
        QueryType::Tlsa => Answer::NotFound,
    };
    let empty = match &answer {
        Answer::Txt(v) => v.is_empty(),
        Answer::A(v) => v.is_empty(),
        Answer::Aaaa(v) => v.is_empty(),
        Answer::Mx(v) => v.is_empty(),
        Answer::Ptr(v) => v.is_empty(),
        _ => false,
    };
    if empty {
        Answer::NotFound
    } else {
        answer
    }
}

/// Result counters made once (counting is an atomic add).
struct AuthMetrics {
    results: HashMap<(&'static str, Verdict), Counter>,
    accept: Counter,
    reject: Counter,
    tempfail: Counter,
    seconds: Histogram,
    sealed: Counter,
    seal_failed: Counter,
    /// Where DKIM/ARC body hashes were made: on the executor, or on the
    /// blocking pool (messages of `offload_size` or more).
    hash_inline: Counter,
    hash_blocking: Counter,
}

/// The longest SPF may take at MAIL FROM (RFC 7208 §4.6.4 asks for at
/// least 20 seconds); past it both identities are temperror.
const SPF_TIMEOUT: Duration = Duration::from_secs(20);

const METHODS: &[&str] = &["iprev", "spf_helo", "spf_mailfrom", "dkim", "arc", "dmarc"];
const VERDICTS: &[Verdict] = &[
    Verdict::Pass,
    Verdict::Fail,
    Verdict::SoftFail,
    Verdict::Neutral,
    Verdict::None,
    Verdict::TempError,
    Verdict::PermError,
];

impl AuthMetrics {
    fn new() -> AuthMetrics {
        let mut results = HashMap::new();
        for m in METHODS {
            for v in VERDICTS {
                results.insert(
                    (*m, *v),
                    counter!("sluice_auth_results_total", "method" => *m, "result" => v.as_str()),
                );
            }
        }
        AuthMetrics {
            results,
            accept: counter!("sluice_auth_decisions_total", "decision" => "accept"),
            reject: counter!("sluice_auth_decisions_total", "decision" => "reject"),
            tempfail: counter!("sluice_auth_decisions_total", "decision" => "tempfail"),
            seconds: histogram!("sluice_auth_verify_seconds"),
            sealed: counter!("sluice_arc_seals_total", "result" => "sealed"),
            seal_failed: counter!("sluice_arc_seals_total", "result" => "failed"),
            hash_inline: counter!("sluice_auth_body_hash_total", "path" => "inline"),
            hash_blocking: counter!("sluice_auth_body_hash_total", "path" => "blocking"),
        }
    }
}

/// One core's verifier: mail-auth (never resolving itself) and the
/// resolver it is fed from.
pub struct CoreVerify {
    verifier: Verifier,
    resolver: Resolver,
    metrics: AuthMetrics,
    /// Picks the DMARC `pct` sample: random keys per core.
    sampler: std::collections::hash_map::RandomState,
}

/// What the checks say about a message about to be stored.
pub enum Outcome {
    /// Store it, with these header fields before it (Authentication-Results,
    /// an ARC set…) and this body (own A-R fields removed when there were
    /// any).
    Accept {
        headers: Vec<u8>,
        body: Vec<u8>,
        summary: String,
    },
    /// Refuse with this reply.
    Refuse {
        code: u16,
        esc: &'static str,
        text: String,
        summary: String,
    },
}

impl CoreVerify {
    pub fn new(resolver: Resolver) -> Result<CoreVerify, sluice_policy::auth::SetupError> {
        Ok(CoreVerify {
            verifier: Verifier::new()?,
            resolver,
            metrics: AuthMetrics::new(),
            sampler: std::collections::hash_map::RandomState::new(),
        })
    }

    /// iprev for a client that just connected.
    pub async fn iprev(&self, ip: IpAddr) -> IprevOutput {
        self.verifier
            .verify_iprev(&ResolverSource(&self.resolver), ip)
            .await
    }

    /// SPF when MAIL FROM arrives: the results (kept for the checks after
    /// DATA) and the refusal the listener's actions make of them, if any
    /// (550 5.7.23/5.7.24, or 451 4.7.24 for a temporary DNS error).
    pub async fn check_spf(
        &self,
        cfg: &VerifyConfig,
        hostname: &str,
        client_ip: IpAddr,
        helo: &str,
        sender: &str,
    ) -> (SpfResults, Option<(u16, &'static str, String)>) {
        let started = Instant::now();
        let e = Envelope {
            client_ip,
            helo: helo.trim_start_matches('[').trim_end_matches(']'),
            mail_from: sender,
            hostname,
        };
        let spf = crate::time::within(
            SPF_TIMEOUT,
            self.verifier
                .verify_spf(&ResolverSource(&self.resolver), &e),
        )
        .await
        .unwrap_or_else(|| {
            tracing::info!(target: "sluice::auth", %client_ip, "SPF check timed out");
            SpfResults::temperror(&e)
        });
        self.metrics.seconds.record(started.elapsed().as_secs_f64());
        for (m, v) in spf.report().pairs() {
            if let Some(c) = self.metrics.results.get(&(m, v)) {
                c.increment(1);
            }
        }
        let refusal = match decide_spf(&spf, &cfg.action) {
            Decision::Accept => None,
            Decision::Reject(code, esc, text) => {
                self.metrics.reject.increment(1);
                Some((code, esc, text))
            }
            Decision::TempFail(code, esc, text) => {
                self.metrics.tempfail.increment(1);
                Some((code, esc, text))
            }
        };
        (spf, refusal)
    }

    /// Judges a received message for its listener. `iprev` is what the
    /// connection found (when the listener checks it), `spf` what MAIL FROM
    /// found (None: not checked).
    #[allow(clippy::too_many_arguments)]
    pub async fn check(
        &self,
        cfg: &VerifyConfig,
        hostname: &str,
        id: MessageId,
        env: &sluice_spool::Envelope,
        body: Vec<u8>,
        spf: Option<SpfResults>,
        iprev: Option<&IprevOutput>,
        sealer: Option<Sealer<'_>>,
    ) -> Outcome {
        let started = Instant::now();
        let authserv_id = cfg.authserv_id.as_deref().unwrap_or(hostname);
        let body = sluice_policy::auth::strip_own_results(&body, authserv_id).unwrap_or(body);
        let Some(client_ip) = env.client_ip else {
            // Written by the relay itself: nothing to verify.
            return Outcome::Accept {
                headers: Vec::new(),
                body,
                summary: String::new(),
            };
        };
        let helo = env.helo.trim_start_matches('[').trim_end_matches(']');
        let e = Envelope {
            client_ip,
            helo,
            mail_from: &env.sender,
            hostname,
        };
        let pct_sample = (self.sampler.hash_one(id.to_string()) % 100) as u8;
        let checks: Checks = cfg.checks();
        let spf = spf.unwrap_or_default();
        // A large body is hashed on the blocking pool (moved there and back,
        // not copied); the executor then only parses the header.
        let (body, hashes) = if body.len() as u64 >= cfg.offload_bytes() {
            let seal = sealer.is_some();
            let (body, hashes) = glommio::executor()
                .spawn_blocking(move || {
                    let hashes = BodyHashes::compute(&body, seal);
                    (body, hashes)
                })
                .await;
            self.metrics.hash_blocking.increment(1);
            tracing::debug!(target: "sluice::auth", id = %id, size = body.len(), "body hashed on the blocking pool");
            (body, hashes)
        } else {
            self.metrics.hash_inline.increment(1);
            (body, None)
        };
        let report = self
            .verifier
            .verify_message(
                &ResolverSource(&self.resolver),
                &e,
                &body,
                hashes.as_ref(),
                &spf,
                checks,
                authserv_id,
                iprev,
                sealer,
                cfg.received_spf,
                pct_sample,
            )
            .await;
        self.metrics.seconds.record(started.elapsed().as_secs_f64());
        // SPF was counted when MAIL FROM was checked.
        for (m, v) in report.pairs() {
            if m.starts_with("spf") {
                continue;
            }
            if let Some(c) = self.metrics.results.get(&(m, v)) {
                c.increment(1);
            }
        }
        if sealer.is_some() {
            match &report.seal_error {
                None => self.metrics.sealed.increment(1),
                Some(why) => {
                    self.metrics.seal_failed.increment(1);
                    tracing::info!(target: "sluice::auth", id = %id, "ARC seal not added: {why}");
                }
            }
        }
        let summary = report.summary();
        match decide(&report, &cfg.action) {
            Decision::Accept => {
                self.metrics.accept.increment(1);
                Outcome::Accept {
                    headers: report.headers,
                    body,
                    summary,
                }
            }
            Decision::Reject(code, esc, text) => {
                self.metrics.reject.increment(1);
                Outcome::Refuse {
                    code,
                    esc,
                    text,
                    summary,
                }
            }
            Decision::TempFail(code, esc, text) => {
                self.metrics.tempfail.increment(1);
                Outcome::Refuse {
                    code,
                    esc,
                    text,
                    summary,
                }
            }
        }
    }
}
