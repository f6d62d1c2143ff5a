//! TLS reporting (RFC 8460) on the delivery cores: counting sessions, the
//! store, and sending the daily reports. The decisions and formats are
//! `tls_rpt.rs` (sans-IO).
//!
//! - **Counting** is per core, in memory (a thread-local map: every executor
//!   is one thread), keyed by (UTC day, the session's [`Target`]). The site
//!   makes one `Rc<Target>` per MX host when it plans a connection, so a
//!   session's count is a hash lookup and an `Rc` clone; only the first
//!   session of a key allocates. Only destinations whose `_smtp._tls` record
//!   names a report address are counted.
//! - **Flushing**: every `tls_rpt.flush_interval` (and when the core stops)
//!   the map is taken and merged into the store — an LMDB table beside the
//!   spool's shards (`<spool.path>/tls-rpt`) — on a blocking thread.
//! - **Sending** runs on core 0: at `tls_rpt.send_at` (UTC) every day, and on
//!   demand (`POST /api/v1/tls-rpt/send`, `sluice tls-rpt send-now`, which
//!   first has every core flush and then reports today's counts too). One
//!   report per policy domain and day, gzipped: a `mailto:` address gets a
//!   message queued like any other (DKIM-signed when a `[[dkim.rule]]`
//!   matches), an `https:` address an HTTP POST made on a blocking thread,
//!   bounded by `tls_rpt.https_timeout`, the server's certificate verified
//!   against the web PKI plus `delivery.tls_ca_file`. A report's counters are
//!   removed once one of its addresses took it (queued, or 2xx), or when they
//!   are a week old.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use glommio::timer::Timer;
use serde_json::{json, Value};
use sluice_dns::{QueryType, Record};

use super::tls_rpt::{self, Counts, ResultType, Rua, Submitter, Target};
use super::{generated_envelope, now_ms, queue_generated, CoreDelivery};
use crate::config::tls_rpt::TlsRptSection;

/// Longest HTTP answer read from a report server.
const MAX_ANSWER: usize = 16 * 1024;
/// Counters not taken by any report address for this many days are dropped.
const KEEP_DAYS: u32 = 7;

/// What every core shares: the store and the settings.
pub struct RptShared {
    pub table: sluice_spool::Table,
    pub cfg: TlsRptSection,
    pub submitter: Submitter,
    /// Verifies report servers (web PKI plus `delivery.tls_ca_file`).
    pub https: Arc<rustls::ClientConfig>,
}

#[derive(Default)]
struct Counters {
    map: HashMap<(u32, Rc<Target>), Counts>,
    max: usize,
    dropped: u64,
}

thread_local! {
    static COUNTERS: RefCell<Counters> = RefCell::new(Counters::default());
}

/// Sets this core's bound on distinct keys between flushes.
pub fn init_core(max_policies: usize) {
    COUNTERS.with(|c| c.borrow_mut().max = max_policies);
}

fn with_counts(target: &Rc<Target>, f: impl FnOnce(&mut Counts)) {
    let day = tls_rpt::day_of(now_ms() / 1000);
    COUNTERS.with(|c| {
        let mut c = c.borrow_mut();
        let key = (day, target.clone());
        if let Some(counts) = c.map.get_mut(&key) {
            f(counts);
            return;
        }
        if c.map.len() >= c.max {
            c.dropped += 1;
            if c.dropped == 1 {
                tracing::warn!(
                    max = c.max,
                    "tls_rpt.max_policies reached: sessions of further policies are not counted until the next flush"
                );
            }
            return;
        }
        let mut counts = Counts::default();
        f(&mut counts);
        c.map.insert(key, counts);
    });
}

/// A session to a reporting destination met its policy over TLS.
pub fn record_success(target: &Rc<Target>) {
    with_counts(target, |c| c.success += 1);
}

/// A session (or an MX host before any session) failed: `ip` is the address
/// connected to, if any; `why` the reason in the delivery log.
pub fn record_failure(target: &Rc<Target>, result: ResultType, ip: Option<IpAddr>, why: &str) {
    let ip = ip.map(|i| i.to_string()).unwrap_or_default();
    with_counts(target, |c| {
        c.fail(result, &target.key.mx_host, &ip, why, 1);
    });
}

/// Takes this core's counters, encoded for the store.
fn take_batch() -> Vec<(Vec<u8>, Vec<u8>)> {
    COUNTERS.with(|c| {
        let mut c = c.borrow_mut();
        c.dropped = 0;
        std::mem::take(&mut c.map)
            .into_iter()
            .map(|((day, target), mut counts)| {
                counts.rua = target.rua.clone();
                (
                    tls_rpt::encode_key(day, &target.key),
                    tls_rpt::encode_counts(&counts),
                )
            })
            .collect()
    })
}

/// The destination's report addresses from its `_smtp._tls` record, looked
/// up through the core's (caching) resolver; None when it publishes none.
pub async fn lookup_rua(resolver: &sluice_dns::Resolver, domain: &str) -> Option<Vec<Rua>> {
    let name = format!("_smtp._tls.{}", domain.trim_end_matches('.'));
    let lookup = resolver.lookup(&name, QueryType::Txt).await.ok()?;
    match tls_rpt::parse_record(lookup.txt_strings()) {
        Ok(rua) => Some(rua),
        Err(tls_rpt::RecordError::None) => None,
        Err(e) => {
            tracing::debug!(domain, error = %e, "_smtp._tls record not used");
            None
        }
    }
}

/// The TLS client config for report uploads: certificates verified.
pub fn https_config(
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth(),
    ))
}

/// What happened to one report.
struct Sent {
    domain: String,
    day: u32,
    report_id: String,
    deliveries: Vec<Value>,
    removed: bool,
}

impl CoreDelivery {
    fn rpt(&self) -> Option<Arc<RptShared>> {
        self.shared.tls_rpt.clone()
    }

    /// Starts the flush loop (every core) and the daily report (core 0).
    pub(super) fn start_tls_rpt(self: &Rc<Self>) {
        let Some(rpt) = self.rpt() else {
            return;
        };
        init_core(rpt.cfg.max_policies);
        let me = self.clone();
        glommio::spawn_local(async move {
            loop {
                Timer::new(rpt.cfg.flush_interval.0).await;
                if me.stopped.get() {
                    return;
                }
                me.tls_rpt_flush().await;
            }
        })
        .detach();
        if self.core != 0 {
            return;
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            let Some(rpt) = me.rpt() else {
                return;
            };
            let at = rpt.cfg.send_at_minutes().unwrap_or(30);
            loop {
                let now = now_ms() / 1000;
                let next = tls_rpt::next_send(now, at);
                Timer::new(Duration::from_secs(next.saturating_sub(now).max(1))).await;
                if me.stopped.get() {
                    return;
                }
                me.tls_rpt_flush().await;
                let today = tls_rpt::day_of(now_ms() / 1000);
                me.tls_rpt_send(today).await;
            }
        })
        .detach();
    }

    /// Merges this core's counters into the store (on a blocking thread).
    pub async fn tls_rpt_flush(&self) {
        let Some(rpt) = self.rpt() else {
            return;
        };
        let batch = take_batch();
        if batch.is_empty() {
            return;
        }
        let n = batch.len();
        let written = glommio::executor()
            .spawn_blocking(move || rpt.table.merge(&batch, tls_rpt::merge_encoded))
            .await;
        match written {
            Ok(()) => tracing::debug!(core = self.core, policies = n, "tls-rpt counters flushed"),
            Err(e) => {
                tracing::error!(core = self.core, error = %e, "tls-rpt counters lost: store write failed")
            }
        }
    }

    /// Sends the reports of the days before `until_day` (u32::MAX: all,
    /// today's too); the JSON summary of what was sent.
    pub async fn tls_rpt_send(self: &Rc<Self>, until_day: u32) -> Value {
        let Some(rpt) = self.rpt() else {
            return json!({ "error": "tls_rpt is not enabled" });
        };
        let table = rpt.clone();
        let entries = match glommio::executor()
            .spawn_blocking(move || table.table.entries())
            .await
        {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "tls-rpt store unreadable");
                return json!({ "error": e.to_string() });
            }
        };
        let mut raw_keys: HashMap<(u32, String), Vec<Vec<u8>>> = HashMap::new();
        let mut decoded = Vec::new();
        for (k, v) in entries {
            let (Some((day, key)), Some(counts)) =
                (tls_rpt::decode_key(&k), tls_rpt::decode_counts(&v))
            else {
                tracing::warn!("tls-rpt store: undecodable entry dropped");
                raw_keys
                    .entry((u32::MAX, String::new()))
                    .or_default()
                    .push(k);
                continue;
            };
            raw_keys
                .entry((day, key.domain.clone()))
                .or_default()
                .push(k);
            decoded.push((day, key, counts));
        }
        let mut sent = Vec::new();
        let today = tls_rpt::day_of(now_ms() / 1000);
        for ((day, domain), policies) in tls_rpt::group_reports(decoded, until_day) {
            sent.push(self.tls_rpt_one(&rpt, day, &domain, &policies).await);
            let done = sent.last().is_some_and(|s| s.removed) || day + KEEP_DAYS < today;
            if let (true, Some(keys)) = (done, raw_keys.remove(&(day, domain.clone()))) {
                let table = rpt.clone();
                let removed = glommio::executor()
                    .spawn_blocking(move || table.table.remove(&keys))
                    .await;
                if let Err(e) = removed {
                    tracing::error!(error = %e, "tls-rpt store: reported counters not removed");
                }
            }
        }
        if let Some(bad) = raw_keys.remove(&(u32::MAX, String::new())) {
            let table = rpt.clone();
            let _ = glommio::executor()
                .spawn_blocking(move || table.table.remove(&bad))
                .await;
        }
        json!({
            "reports": sent.iter().map(|s| json!({
                "policy_domain": s.domain,
                "day": tls_rpt::day_name(s.day),
                "report_id": s.report_id,
                "deliveries": s.deliveries,
                "removed": s.removed,
            })).collect::<Vec<_>>(),
        })
    }

    /// Builds, gzips and delivers one report to every address of its record.
    async fn tls_rpt_one(
        self: &Rc<Self>,
        rpt: &RptShared,
        day: u32,
        domain: &str,
        policies: &[(tls_rpt::PolicyKey, Counts)],
    ) -> Sent {
        let now = now_ms();
        let report_id = format!(
            "{}.{}.{now}@{}",
            tls_rpt::day_name(day),
            domain,
            self.shared.hostname
        );
        let report = tls_rpt::report_json(&rpt.submitter, &report_id, day, policies);
        let gz = gzip(report.to_string().as_bytes());
        let rua: Vec<Rua> = policies
            .iter()
            .rev()
            .find(|(_, c)| !c.rua.is_empty())
            .map(|(_, c)| c.rua.clone())
            .unwrap_or_default();
        let mut deliveries = Vec::new();
        let mut taken = false;
        for r in rua {
            let (to, result) = match &r {
                Rua::Mailto(addr) => (
                    format!("mailto:{addr}"),
                    self.tls_rpt_mail(rpt, addr, domain, &report_id, day, &gz, now)
                        .await,
                ),
                Rua::Https(url) => (url.clone(), self.tls_rpt_post(rpt, url, gz.clone()).await),
            };
            match &result {
                Ok(what) => {
                    taken = true;
                    tracing::info!(policy_domain = domain, report_id = %report_id, to = %to, result = %what, "tls-rpt report sent");
                }
                Err(why) => {
                    tracing::warn!(policy_domain = domain, report_id = %report_id, to = %to, error = %why, "tls-rpt report not sent");
                }
            }
            crate::metrics::tls_rpt_report(if result.is_ok() { "sent" } else { "failed" });
            deliveries.push(json!({
                "to": to,
                "ok": result.is_ok(),
                "result": result.unwrap_or_else(|e| e),
            }));
        }
        Sent {
            domain: domain.to_string(),
            day,
            report_id,
            deliveries,
            removed: taken,
        }
    }

    /// Queues the report mail to `to`, the way notices are queued.
    #[allow(clippy::too_many_arguments)]
    async fn tls_rpt_mail(
        &self,
        rpt: &RptShared,
        to: &str,
        domain: &str,
        report_id: &str,
        day: u32,
        gz: &[u8],
        now: u64,
    ) -> Result<String, String> {
        let id = self.ids.next(now);
        let filename = tls_rpt::report_filename(&rpt.submitter, domain, day, now);
        let body = tls_rpt::report_mail(
            &rpt.submitter,
            to,
            domain,
            report_id,
            day,
            &filename,
            gz,
            &crate::queue::dsn::rfc5322_date(now),
            report_id,
        );
        let envelope = generated_envelope(
            rpt.submitter.sender.clone(),
            to,
            "tls-rpt",
            "default".into(),
            &body,
            now,
        );
        queue_generated(&self.queue, id, id, "queuing a TLS report", envelope, body)
            .await
            .map_err(|e| e.to_string())?;
        Ok(format!("queued as {id}"))
    }

    /// POSTs the report to an `https:` address: the host resolved through
    /// our resolver, the upload on a blocking thread.
    async fn tls_rpt_post(
        &self,
        rpt: &RptShared,
        url: &str,
        gz: Vec<u8>,
    ) -> Result<String, String> {
        let (host, port, path) =
            split_https(url).ok_or_else(|| format!("{url}: not a usable https URL"))?;
        let ip = match host.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => {
                let mut found = None;
                for qt in [QueryType::A, QueryType::Aaaa] {
                    if let Ok(l) = self.resolver.lookup(&host, qt).await {
                        found = l.records().iter().find_map(|r| match r {
                            Record::A(ip, _) => Some(IpAddr::V4(*ip)),
                            Record::Aaaa(ip, _) => Some(IpAddr::V6(*ip)),
                            _ => None,
                        });
                    }
                    if found.is_some() {
                        break;
                    }
                }
                found.ok_or_else(|| format!("cannot resolve {host}"))?
            }
        };
        let config = rpt.https.clone();
        let timeout = rpt.cfg.https_timeout.0;
        let addr = SocketAddr::new(ip, port);
        glommio::executor()
            .spawn_blocking(move || post(addr, &host, &path, &gz, timeout, config))
            .await
            .and_then(|status| {
                if (200..300).contains(&status) {
                    Ok(format!("HTTP {status}"))
                } else {
                    Err(format!("HTTP {status}"))
                }
            })
    }
}

/// (host, port, path) of an `https://host[:port]/path` URL.
fn split_https(url: &str) -> Option<(String, u16, String)> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("HTTPS://"))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') || authority.is_empty() {
        return None;
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && p.chars().all(|c| c.is_ascii_digit()) => {
            (h, p.parse().ok()?)
        }
        _ => (authority, 443),
    };
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    Some((host.to_string(), port, path))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(data);
    enc.finish().unwrap_or_default()
}

/// The blocking upload: one HTTP/1.1 POST over TLS, every step bounded by
/// `timeout`; answers the status code.
fn post(
    addr: SocketAddr,
    host: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
    config: Arc<rustls::ClientConfig>,
) -> Result<u16, String> {
    let host_name = host.trim_matches(['[', ']']);
    let name = match host_name.parse::<IpAddr>() {
        Ok(ip) => rustls::pki_types::ServerName::IpAddress(ip.into()),
        Err(_) => rustls::pki_types::ServerName::try_from(host_name.to_string())
            .map_err(|e| format!("{host}: {e}"))?,
    };
    let tcp =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = tcp.set_read_timeout(Some(timeout));
    let _ = tcp.set_write_timeout(Some(timeout));
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/tlsrpt+gzip\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: sluice\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes())
        .and_then(|()| tls.write_all(body))
        .and_then(|()| tls.flush())
        .map_err(|e| format!("sending to {addr}: {e}"))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 2048];
    while answer.len() < MAX_ANSWER && !answer.windows(2).any(|w| w == b"\r\n") {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("reading the answer of {addr}: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&answer);
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| line.starts_with("HTTP/"))
        .ok_or_else(|| format!("{addr}: not an HTTP answer"))?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_urls() {
        assert_eq!(
            split_https("https://127.0.0.1:8443/tlsrpt"),
            Some(("127.0.0.1".into(), 8443, "/tlsrpt".into()))
        );
        assert_eq!(
            split_https("https://reports.example"),
            Some(("reports.example".into(), 443, "/".into()))
        );
        assert_eq!(split_https("https://u@h/"), None);
        assert_eq!(split_https("http://h/"), None);
    }

    #[test]
    fn gzip_round_trips() {
        let gz = gzip(b"{\"a\":1}");
        let mut out = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "{\"a\":1}");
    }
}
