//! MTA-STS (RFC 8461), the pure parts: the `_mta-sts` TXT record (§3.1), the
//! policy file (§3.2), MX pattern matching (§4.1), the HTTP response that
//! carries the policy (§3.3: 200 only, no redirects, bounded), and what a
//! sender does with a TXT answer and a cached policy (§5.1, [`plan`]), and
//! when a cached policy is re-fetched before it expires ([`should_refresh`],
//! [`refresh_sweep`]).
//!
//! Nothing here does I/O or reads a clock: times are Unix seconds passed in.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Most a policy may be cached (§3.2: max_age ≤ 31557600, about a year).
pub const MAX_AGE_LIMIT: u64 = 31_557_600;
/// Most bytes of policy body accepted (the RFC suggests 64 KiB, §3.3).
pub const MAX_BODY: usize = 64 * 1024;
/// Most bytes of HTTP status line and headers accepted.
pub const MAX_HEAD: usize = 16 * 1024;

/// Why a TXT record, a policy or an HTTP response was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StsError {
    #[error("TXT record: {0}")]
    Txt(String),
    #[error("policy: {0}")]
    Policy(String),
    #[error("HTTP: {0}")]
    Http(String),
}

/// `mode` of a policy (§5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// MX hosts must match and present a verified certificate.
    Enforce,
    /// Failures are reported only; delivery goes on as configured.
    Testing,
    /// The domain withdrew its policy.
    None,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A parsed policy file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub mode: Mode,
    /// MX patterns, lower case, without a trailing dot: `mx.example.com` or
    /// `*.example.com`.
    pub mx: Vec<String>,
    /// Seconds the policy may be cached (already capped at [`MAX_AGE_LIMIT`]).
    pub max_age: u64,
}

/// The policy id of a `_mta-sts` TXT record (`v=STSv1; id=...;`, §3.1).
/// Unknown fields are ignored; the id is 1–32 letters and digits.
pub fn parse_txt(record: &str) -> Result<String, StsError> {
    let bad = |m: &str| StsError::Txt(m.to_string());
    let mut fields = record.split(';').map(str::trim).filter(|f| !f.is_empty());
    match fields.next() {
        Some("v=STSv1") => {}
        _ => return Err(bad("does not start with v=STSv1")),
    }
    let mut id = None;
    for field in fields {
        let Some((key, value)) = field.split_once('=') else {
            return Err(bad("field without '='"));
        };
        if key.trim() == "id" {
            let value = value.trim();
            if value.is_empty()
                || value.len() > 32
                || !value.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return Err(bad("id must be 1 to 32 letters and digits"));
            }
            if id.replace(value.to_string()).is_some() {
                return Err(bad("more than one id"));
            }
        }
    }
    id.ok_or_else(|| bad("no id"))
}

/// Of the TXT strings at `_mta-sts.DOMAIN`, the id of the one STSv1 record.
/// `Ok(None)` when none starts with `v=STSv1` (the domain has no policy);
/// more than one STSv1 record, or a malformed one, is an error (§3.1: the
/// sender treats it as no policy, but says why).
pub fn txt_id<'a>(records: impl IntoIterator<Item = &'a str>) -> Result<Option<String>, StsError> {
    let sts: Vec<&str> = records
        .into_iter()
        .filter(|r| r.trim_start().starts_with("v=STSv1"))
        .collect();
    match sts.as_slice() {
        [] => Ok(None),
        [one] => parse_txt(one).map(Some),
        _ => Err(StsError::Txt("more than one v=STSv1 record".into())),
    }
}

/// Parses a policy file (§3.2): `key: value` lines ending in LF or CRLF;
/// `version: STSv1`, `mode`, `max_age` and (unless mode is none) at least
/// one `mx` are required. Unknown keys are ignored; a repeated key other
/// than mx is an error.
pub fn parse_policy(body: &str) -> Result<Policy, StsError> {
    let bad = |m: String| StsError::Policy(m);
    let mut version = None;
    let mut mode = None;
    let mut max_age = None;
    let mut mx = Vec::new();
    for (n, line) in body.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(bad(format!("line {}: no ':'", n + 1)));
        };
        let (key, value) = (key.trim(), value.trim());
        let twice = || bad(format!("line {}: {key} given twice", n + 1));
        match key {
            "version" => {
                if version.is_some() {
                    return Err(twice());
                }
                version = Some(value.to_string());
            }
            "mode" => {
                if mode.is_some() {
                    return Err(twice());
                }
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    other => return Err(bad(format!("line {}: unknown mode {other:?}", n + 1))),
                });
            }
            "max_age" => {
                if max_age.is_some() {
                    return Err(twice());
                }
                if value.is_empty()
                    || value.len() > 10
                    || !value.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(bad(format!("line {}: max_age {value:?}", n + 1)));
                }
                let secs: u64 = value
                    .parse()
                    .map_err(|_| bad(format!("line {}: max_age {value:?}", n + 1)))?;
                max_age = Some(secs.min(MAX_AGE_LIMIT));
            }
            "mx" => mx.push(parse_pattern(value).map_err(|m| bad(format!("line {}: {m}", n + 1)))?),
            _ => {}
        }
    }
    match version.as_deref() {
        Some("STSv1") => {}
        Some(v) => return Err(bad(format!("version {v:?}, not STSv1"))),
        None => return Err(bad("no version".into())),
    }
    let mode = mode.ok_or_else(|| bad("no mode".into()))?;
    let max_age = max_age.ok_or_else(|| bad("no max_age".into()))?;
    if mx.is_empty() && mode != Mode::None {
        return Err(bad("no mx".into()));
    }
    Ok(Policy { mode, mx, max_age })
}

/// An `mx` value: a host name, optionally with a leading `*.` (§3.2).
fn parse_pattern(value: &str) -> Result<String, String> {
    let v = value.trim_end_matches('.').to_ascii_lowercase();
    let name = v.strip_prefix("*.").unwrap_or(&v);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || v.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!("mx {value:?} is not a host name or *.name"));
    }
    Ok(v)
}

impl Policy {
    /// Whether MX host `host` matches one of the patterns (§4.1): exactly,
    /// or `*.rest` for a host of one more label in front of `rest`
    /// (`*.example.com` matches `mx.example.com`, not `a.mx.example.com`
    /// nor `example.com`). Case and a trailing dot do not matter.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|p| match p.strip_prefix("*.") {
            Some(rest) => host
                .split_once('.')
                .is_some_and(|(first, tail)| !first.is_empty() && tail == rest),
            None => *p == host,
        })
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mode {}, mx {}, max_age {}s",
            self.mode,
            self.mx.join(" "),
            self.max_age
        )
    }
}

/// A policy as cached (in memory and in LMDB).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cached {
    /// The TXT id it was fetched under.
    pub id: String,
    pub policy: Policy,
    /// Unix seconds it was fetched.
    pub fetched: u64,
}

impl Cached {
    /// Unix seconds the policy stops being usable.
    pub fn expires(&self) -> u64 {
        self.fetched.saturating_add(self.policy.max_age)
    }

    pub fn is_fresh(&self, now: u64) -> bool {
        now < self.expires()
    }

    /// Unix seconds from which the policy is re-fetched: half its max_age
    /// after it was fetched (RFC 8461 §5.1 asks senders to refresh cached
    /// policies before they expire, so a domain's policy never lapses while
    /// it still publishes one).
    pub fn refresh_at(&self) -> u64 {
        self.fetched.saturating_add(self.policy.max_age / 2)
    }

    /// Past [`Self::refresh_at`] and not yet expired. An expired policy is
    /// not refreshed: it is dropped, and the next use fetches like a new one.
    pub fn refresh_due(&self, now: u64) -> bool {
        now >= self.refresh_at() && self.is_fresh(now)
    }

    /// Seconds between two refresh attempts after one failed: an eighth of
    /// max_age, from 1 s to an hour, so a policy server that is down is asked
    /// a few times before the policy expires, not at every delivery.
    pub fn refresh_retry(&self) -> u64 {
        (self.policy.max_age / 8).clamp(1, 3600)
    }
}

/// Whether to re-fetch `cached` now, given when its last refresh was tried
/// (Unix seconds; None: never since it was fetched). Due ([`Cached::refresh_due`])
/// and no attempt within [`Cached::refresh_retry`] seconds.
pub fn should_refresh(cached: &Cached, last_attempt: Option<u64>, now: u64) -> bool {
    let retried_recently = last_attempt
        .is_some_and(|t| t >= cached.fetched && now < t.saturating_add(cached.refresh_retry()));
    cached.refresh_due(now) && !retried_recently
}

/// The proactive sweep over the cache (`domain`, policy, last refresh
/// attempt): the domains to re-fetch now ([`should_refresh`]), soonest
/// expiry first, at most `limit` of them (the rest wait for the next sweep).
pub fn refresh_sweep<'a>(
    entries: impl IntoIterator<Item = (&'a str, &'a Cached, Option<u64>)>,
    now: u64,
    limit: usize,
) -> Vec<&'a str> {
    let mut due: Vec<(u64, &str)> = entries
        .into_iter()
        .filter(|(_, c, tried)| should_refresh(c, *tried, now))
        .map(|(d, c, _)| (c.expires(), d))
        .collect();
    due.sort_unstable();
    due.into_iter().take(limit).map(|(_, d)| d).collect()
}

/// The TXT lookup at `_mta-sts.DOMAIN`, as [`plan`] needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Txt {
    /// One STSv1 record with this id.
    Id(String),
    /// No STSv1 record (NXDOMAIN, NODATA, or only other TXT records).
    Absent,
    /// The lookup failed, or the record is malformed (why).
    Failed(String),
}

/// What to do for a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Use the cached policy as it is.
    UseCached,
    /// Fetch the policy (the TXT id is new or changed, or the cache expired);
    /// if the fetch fails, use the cached policy while it is fresh (§5.1).
    Fetch { id: String },
    /// No policy applies (why); an expired cache entry can be dropped.
    NoPolicy(&'static str),
}

/// The sender's decision for one domain (§3.3, §5.1), given its TXT answer
/// and its cached policy, at `now` (Unix seconds):
/// - a TXT id equal to the fresh cached one: use the cache;
/// - a new or changed id, or an expired cache: fetch;
/// - no TXT record, or the lookup failed: a fresh cached policy still
///   applies (a domain cannot switch MTA-STS off by removing the record
///   before max_age runs out, nor can an attacker who blocks DNS);
///   otherwise no policy.
pub fn plan(txt: &Txt, cached: Option<&Cached>, now: u64) -> Plan {
    let fresh = cached.filter(|c| c.is_fresh(now));
    match (txt, fresh) {
        (Txt::Id(id), Some(c)) if *id == c.id => Plan::UseCached,
        (Txt::Id(id), _) => Plan::Fetch { id: id.clone() },
        (_, Some(_)) => Plan::UseCached,
        (Txt::Absent, None) => Plan::NoPolicy("no _mta-sts TXT record"),
        (Txt::Failed(_), None) => Plan::NoPolicy("_mta-sts TXT lookup failed"),
    }
}

/// The policy body out of a complete HTTP/1.x response (the bytes read
/// until the server closed, at most [`MAX_HEAD`] + [`MAX_BODY`] of them;
/// `complete`: whether the server closed before that bound). Only 200 is
/// accepted: a redirect or any other status is a fetch failure (§3.3). The
/// body may be sized by Content-Length, chunked, or end at the close; over
/// [`MAX_BODY`] is refused. The media type must be text/plain.
pub fn http_body(response: &[u8], complete: bool) -> Result<String, StsError> {
    let bad = |m: String| StsError::Http(m);
    let head_end = find(response, b"\r\n\r\n").ok_or_else(|| bad("no end of headers".into()))?;
    if head_end > MAX_HEAD {
        return Err(bad("headers too long".into()));
    }
    let head =
        std::str::from_utf8(&response[..head_end]).map_err(|_| bad("headers not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let mut parts = status.splitn(3, ' ');
    let (version, code) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("status line {status:?}")));
    }
    if code != "200" {
        return Err(bad(format!(
            "status {code} (only 200 is accepted, no redirects)"
        )));
    }
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut content_type = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad(format!("header line {line:?}")));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                length = Some(
                    value
                        .parse()
                        .map_err(|_| bad(format!("Content-Length {value:?}")))?,
                )
            }
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "content-type" => content_type = Some(value.to_ascii_lowercase()),
            _ => {}
        }
    }
    match content_type {
        Some(t) if t.split(';').next().map(str::trim) == Some("text/plain") => {}
        other => return Err(bad(format!("Content-Type {other:?}, not text/plain"))),
    }
    let rest = &response[head_end + 4..];
    let body: Vec<u8> = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        if n > MAX_BODY {
            return Err(bad(format!("body of {n} bytes (limit {MAX_BODY})")));
        }
        rest.get(..n)
            .ok_or_else(|| bad(format!("body shorter than Content-Length {n}")))?
            .to_vec()
    } else {
        if !complete {
            return Err(bad(format!("body over {MAX_BODY} bytes")));
        }
        rest.to_vec()
    };
    if body.len() > MAX_BODY {
        return Err(bad(format!("body over {MAX_BODY} bytes")));
    }
    String::from_utf8(body).map_err(|_| bad("body not UTF-8".into()))
}

/// Whether a response read so far needs no more bytes: its headers are in
/// and it is not a 200 (refused whatever follows), or [`http_body`] accepts
/// it as complete by its length or last chunk.
pub fn http_done(response: &[u8]) -> bool {
    let Some(end) = find(response, b"\r\n\r\n") else {
        return false;
    };
    let status = response[..end].split(|b| *b == b' ').nth(1);
    status != Some(&b"200"[..]) || http_body(response, false).is_ok()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, StsError> {
    let bad = |m: &str| StsError::Http(format!("chunked body: {m}"));
    let mut out = Vec::new();
    loop {
        let end = find(data, b"\r\n").ok_or_else(|| bad("no chunk size"))?;
        let line = std::str::from_utf8(&data[..end]).map_err(|_| bad("chunk size"))?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| bad("chunk size"))?;
        data = &data[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if out.len().saturating_add(size) > MAX_BODY {
            return Err(bad("over the size limit"));
        }
        let chunk = data.get(..size).ok_or_else(|| bad("truncated"))?;
        out.extend_from_slice(chunk);
        data = data
            .get(size..)
            .and_then(|d| d.strip_prefix(b"\r\n"))
            .ok_or_else(|| bad("truncated"))?;
    }
}

#[cfg(test)]
#[path = "mta_sts_tests.rs"]
mod tests;
