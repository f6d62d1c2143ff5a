//! SMTP TLS Reporting (RFC 8460), sans-IO: what goes into the counters and
//! what comes out as a report. No sockets, no clock (days and times are
//! arguments).
//!
//! - [`parse_record`]: a destination's `_smtp._tls` TXT record (`v=TLSRPTv1;
//!   rua=…`) into where its reports go.
//! - [`result_of`], [`result_of_dane_skip`]: a session's outcome under its TLS
//!   policy into the RFC's result types (§4.3).
//! - [`Counts`]: the counters of one policy on one UTC day — successful
//!   sessions, failed sessions by result type with a bounded set of
//!   receiving host/IP samples — and their merge (per core in memory, then in
//!   the store, `tls_rpt_io.rs`).
//! - [`report_json`], [`report_mail`], [`report_filename`]: the report (§4.4)
//!   and how it is mailed (§5.3).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::tls_policy::{Basis, Failure, Level};

/// Failure details kept per policy and day (distinct result type, host and
/// IP); further failures are still counted, in the first detail of their
/// result type.
pub const MAX_FAILURE_DETAILS: usize = 32;
/// Report addresses taken from one record.
pub const MAX_RUA: usize = 4;
/// Longest `additional-information` kept.
const MAX_INFO: usize = 200;
/// Longest `_smtp._tls` record read.
const MAX_RECORD: usize = 2048;

/// `policy-type` (RFC 8460 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PolicyType {
    Sts,
    Tlsa,
    NoPolicyFound,
}

impl PolicyType {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyType::Sts => "sts",
            PolicyType::Tlsa => "tlsa",
            PolicyType::NoPolicyFound => "no-policy-found",
        }
    }
}

/// `result-type` of a failure (RFC 8460 §4.3.1–4.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ResultType {
    StarttlsNotSupported,
    CertificateHostMismatch,
    CertificateExpired,
    CertificateNotTrusted,
    ValidationFailure,
    TlsaInvalid,
    DnssecInvalid,
    DaneRequired,
    StsPolicyFetchError,
    StsPolicyInvalid,
    StsWebpkiInvalid,
}

impl ResultType {
    pub const ALL: [ResultType; 11] = [
        ResultType::StarttlsNotSupported,
        ResultType::CertificateHostMismatch,
        ResultType::CertificateExpired,
        ResultType::CertificateNotTrusted,
        ResultType::ValidationFailure,
        ResultType::TlsaInvalid,
        ResultType::DnssecInvalid,
        ResultType::DaneRequired,
        ResultType::StsPolicyFetchError,
        ResultType::StsPolicyInvalid,
        ResultType::StsWebpkiInvalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResultType::StarttlsNotSupported => "starttls-not-supported",
            ResultType::CertificateHostMismatch => "certificate-host-mismatch",
            ResultType::CertificateExpired => "certificate-expired",
            ResultType::CertificateNotTrusted => "certificate-not-trusted",
            ResultType::ValidationFailure => "validation-failure",
            ResultType::TlsaInvalid => "tlsa-invalid",
            ResultType::DnssecInvalid => "dnssec-invalid",
            ResultType::DaneRequired => "dane-required",
            ResultType::StsPolicyFetchError => "sts-policy-fetch-error",
            ResultType::StsPolicyInvalid => "sts-policy-invalid",
            ResultType::StsWebpkiInvalid => "sts-webpki-invalid",
        }
    }
}

/// The policy a session ran under, as a report names it: one `policies[]`
/// entry per policy domain, type, policy strings and MX host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyKey {
    /// The recipient domain whose policy applied.
    pub domain: String,
    pub kind: PolicyType,
    /// `policy-string`: the TLSA records in presentation form, the MTA-STS
    /// policy's lines; empty for `no-policy-found`.
    pub strings: Vec<String>,
    /// `mx-host`: the MX host the session went to.
    pub mx_host: String,
}

/// What a delivery to a reporting destination carries: the policy key and
/// where reports go (the `rua` of its record when the session was made).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub key: PolicyKey,
    pub rua: Vec<Rua>,
}

/// The reporting target of a session to MX host `mx` of `domain`: the
/// policy it runs under is the one `tls_policy::select` picks (DANE's, when
/// the host's TLSA records apply; else the configured one, reported as
/// `no-policy-found`).
pub fn target(
    domain: &str,
    mx: &str,
    dane: &super::dane::Dane,
    configured: &super::tls_policy::TlsPolicy,
    sts: Option<&sluice_policy::mta_sts::Policy>,
    rua: &[Rua],
) -> Target {
    let dane_policy = super::dane::policy(dane, configured);
    let dane_decides = dane_policy.as_ref().is_some_and(|p| p.basis == Basis::Dane);
    // MTA-STS (enforce or testing) is reported for hosts DANE does not decide,
    // its policy file's fields as the `policy-string` (RFC 8460 §4.3).
    let sts = sts.filter(|p| p.mode != sluice_policy::mta_sts::Mode::None && !dane_decides);
    if let Some(policy) = sts {
        let mut strings = vec![
            "version: STSv1".to_string(),
            format!("mode: {}", policy.mode),
        ];
        strings.extend(policy.mx.iter().map(|mx| format!("mx: {mx}")));
        strings.push(format!("max_age: {}", policy.max_age));
        return Target {
            key: PolicyKey {
                domain: domain.trim_end_matches('.').to_ascii_lowercase(),
                kind: PolicyType::Sts,
                strings,
                mx_host: mx.trim_end_matches('.').to_ascii_lowercase(),
            },
            rua: rua.to_vec(),
        };
    }
    let (kind, strings) = match (dane_policy, dane) {
        (Some(p), super::dane::Dane::Records { records, .. }) if p.basis == Basis::Dane => (
            PolicyType::Tlsa,
            records
                .iter()
                .map(|r| {
                    let hex: String = r.data.iter().map(|b| format!("{b:02x}")).collect();
                    format!("{} {} {} {hex}", r.usage, r.selector, r.matching)
                })
                .collect(),
        ),
        (Some(p), _) => (policy_type(&p.basis), Vec::new()),
        (None, _) => (policy_type(&configured.basis), Vec::new()),
    };
    Target {
        key: PolicyKey {
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            kind,
            strings,
            mx_host: mx.trim_end_matches('.').to_ascii_lowercase(),
        },
        rua: rua.to_vec(),
    }
}

/// The reporting target of a destination whose MTA-STS policy could not be
/// fetched or parsed (and none is cached): policy type `sts`, no policy
/// string (there is none) and no MX host (no session was made for it).
pub fn sts_fetch_target(domain: &str, rua: &[Rua]) -> Target {
    Target {
        key: PolicyKey {
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            kind: PolicyType::Sts,
            strings: Vec::new(),
            mx_host: String::new(),
        },
        rua: rua.to_vec(),
    }
}

/// The result type of a failed MTA-STS policy fetch (RFC 8460 §4.3.2):
/// `sts-policy-invalid` when a policy came back and did not parse, else
/// `sts-policy-fetch-error` (no address, connection, TLS, HTTP, timeout).
pub fn result_of_sts_fetch(invalid_policy: bool) -> ResultType {
    if invalid_policy {
        ResultType::StsPolicyInvalid
    } else {
        ResultType::StsPolicyFetchError
    }
}

/// A report address (`rua`, RFC 8460 §3).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Rua {
    /// The mailbox of a `mailto:` URI.
    Mailto(String),
    /// An `https:` URI, as published.
    Https(String),
}

/// Why a `_smtp._tls` record is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("no v=TLSRPTv1 record")]
    None,
    #[error("{0} v=TLSRPTv1 records (exactly one is allowed)")]
    Several(usize),
    #[error("record longer than {MAX_RECORD} bytes")]
    TooLong,
    #[error("no rua field")]
    NoRua,
    #[error("no usable rua URI (mailto: or https:)")]
    NoUsableRua,
}

/// The report addresses of a domain from its `_smtp._tls` TXT records (RFC
/// 8460 §3): records not starting with `v=TLSRPTv1` are ignored; anything but
/// exactly one left means the domain does not take reports. Unknown fields are
/// ignored; URIs other than `mailto:` and `https:` are skipped.
pub fn parse_record<'a>(txts: impl IntoIterator<Item = &'a str>) -> Result<Vec<Rua>, RecordError> {
    let ours: Vec<&str> = txts
        .into_iter()
        .filter(|t| {
            let t = t.trim_start();
            t.strip_prefix("v=TLSRPTv1")
                .is_some_and(|rest| rest.trim_start().starts_with(';') || rest.trim().is_empty())
        })
        .collect();
    let record = match ours.as_slice() {
        [] => return Err(RecordError::None),
        [one] => *one,
        many => return Err(RecordError::Several(many.len())),
    };
    if record.len() > MAX_RECORD {
        return Err(RecordError::TooLong);
    }
    let rua = record
        .split(';')
        .skip(1)
        .filter_map(|field| field.split_once('='))
        .find(|(name, _)| name.trim() == "rua")
        .map(|(_, value)| value)
        .ok_or(RecordError::NoRua)?;
    let mut out = Vec::new();
    for uri in rua.split(',').map(str::trim) {
        if out.len() == MAX_RUA {
            break;
        }
        let (scheme, rest) = uri.split_once(':').unwrap_or(("", ""));
        let entry = if scheme.eq_ignore_ascii_case("mailto") {
            // The address, without any ?header part; %-escapes of '@' and ','
            // are what RFC 6068 needs at most here.
            let addr = rest.split('?').next().unwrap_or("");
            let addr = addr
                .replace("%40", "@")
                .replace("%2C", ",")
                .replace("%2c", ",");
            let ok = addr.split_once('@').is_some_and(|(l, d)| {
                !l.is_empty() && !d.is_empty() && !addr.contains(char::is_whitespace)
            });
            ok.then_some(Rua::Mailto(addr))
        } else if scheme.eq_ignore_ascii_case("https") && rest.starts_with("//") && rest.len() > 2 {
            Some(Rua::Https(uri.to_string()))
        } else {
            None
        };
        if let Some(e) = entry {
            if !out.contains(&e) {
                out.push(e);
            }
        }
    }
    if out.is_empty() {
        return Err(RecordError::NoUsableRua);
    }
    Ok(out)
}

/// The policy type of a session's policy basis: DANE is `tlsa`, MTA-STS is
/// `sts`, a configured level is `no-policy-found` (the destination published
/// neither).
pub fn policy_type(basis: &Basis) -> PolicyType {
    match basis {
        Basis::Dane => PolicyType::Tlsa,
        Basis::MtaSts => PolicyType::Sts,
        _ => PolicyType::NoPolicyFound,
    }
}

/// The result type of a session that failed its policy (RFC 8460 §4.3).
/// Web PKI failures are told apart by the verifier's reason (rustls names the
/// certificate error: `NotValidForName…`, `Expired…`, `UnknownIssuer`…).
///
/// `None` when TLS itself succeeded and only the message's REQUIRETLS was not
/// met: RFC 8460 has no result type for that, so the session counts as a success.
pub fn result_of(failure: &Failure, basis: &Basis, level: Level) -> Option<ResultType> {
    Some(match failure {
        // REQUIRETLS's own terms, not a TLS failure (and the MX check is
        // made before any session).
        Failure::NoRequireTls | Failure::MxNotAuthenticated => return None,
        Failure::NoStartTls | Failure::StartTlsRefused(_) => ResultType::StarttlsNotSupported,
        Failure::Handshake(_) => ResultType::ValidationFailure,
        Failure::NotVerified(why) => {
            if *basis == Basis::Dane {
                return Some(ResultType::TlsaInvalid);
            }
            if level == Level::Dane {
                // Mandatory DANE, and the host had no usable TLSA records.
                return Some(ResultType::DaneRequired);
            }
            let why = why.to_ascii_lowercase();
            if why.contains("notvalidforname") || why.contains("not valid for name") {
                ResultType::CertificateHostMismatch
            } else if why.contains("expired") {
                ResultType::CertificateExpired
            } else {
                ResultType::CertificateNotTrusted
            }
        }
    })
}

/// The result type of an MX host DANE made unusable before any connection:
/// its TLSA lookup failed (a bogus signature) → `dnssec-invalid`; DANE is
/// mandatory and the host has no secure TLSA records → `dane-required`.
pub fn result_of_dane_skip(lookup_failed: bool) -> ResultType {
    if lookup_failed {
        ResultType::DnssecInvalid
    } else {
        ResultType::DaneRequired
    }
}

/// One `failure-details[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureDetail {
    pub result: ResultType,
    /// `receiving-mx-hostname` (empty: none).
    pub mx: String,
    /// `receiving-ip` (empty: no connection was made).
    pub ip: String,
    /// `additional-information`: the first reason seen, bounded.
    pub info: String,
    pub count: u64,
}

/// The counters of one policy on one day.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Where reports go (the latest record seen).
    pub rua: Vec<Rua>,
    pub success: u64,
    pub failures: Vec<FailureDetail>,
}

impl Counts {
    pub fn failed_sessions(&self) -> u64 {
        self.failures.iter().map(|f| f.count).sum()
    }

    /// Counts `n` failures of `result` at `mx`/`ip`. A new (result, host, IP)
    /// gets its own detail while there are fewer than [`MAX_FAILURE_DETAILS`];
    /// after that the failure goes to the first detail of its result type, or
    /// the last detail.
    pub fn fail(&mut self, result: ResultType, mx: &str, ip: &str, why: &str, n: u64) {
        if let Some(d) = self
            .failures
            .iter_mut()
            .find(|d| d.result == result && d.mx == mx && d.ip == ip)
        {
            d.count += n;
            return;
        }
        if self.failures.len() < MAX_FAILURE_DETAILS {
            let mut info = why.to_string();
            if info.len() > MAX_INFO {
                let mut end = MAX_INFO;
                while !info.is_char_boundary(end) {
                    end -= 1;
                }
                info.truncate(end);
            }
            self.failures.push(FailureDetail {
                result,
                mx: mx.to_string(),
                ip: ip.to_string(),
                info,
                count: n,
            });
            return;
        }
        let i = self
            .failures
            .iter()
            .position(|d| d.result == result)
            .unwrap_or(self.failures.len() - 1);
        self.failures[i].count += n;
    }

    /// Adds `other` (a later batch) to these counters; the later `rua` wins.
    pub fn merge(&mut self, other: &Counts) {
        if !other.rua.is_empty() {
            self.rua = other.rua.clone();
        }
        self.success += other.success;
        for d in &other.failures {
            self.fail(d.result, &d.mx, &d.ip, &d.info, d.count);
        }
    }
}

/// The store key of a policy's counters on `day` (days since the Unix epoch):
/// the day first (big-endian), so keys sort by day.
pub fn encode_key(day: u32, key: &PolicyKey) -> Vec<u8> {
    let mut out = day.to_be_bytes().to_vec();
    // Serializing owned strings and enums to a Vec cannot fail.
    out.extend(postcard::to_allocvec(key).unwrap_or_default());
    out
}

/// The day and policy of a store key (None: not ours, or corrupt).
pub fn decode_key(bytes: &[u8]) -> Option<(u32, PolicyKey)> {
    let (day, rest) = bytes.split_first_chunk::<4>()?;
    let key = postcard::from_bytes(rest).ok()?;
    Some((u32::from_be_bytes(*day), key))
}

pub fn encode_counts(counts: &Counts) -> Vec<u8> {
    postcard::to_allocvec(counts).unwrap_or_default()
}

pub fn decode_counts(bytes: &[u8]) -> Option<Counts> {
    postcard::from_bytes(bytes).ok()
}

/// The store's merge: stored counters plus a batch.
pub fn merge_encoded(old: Option<&[u8]>, new: &[u8]) -> Vec<u8> {
    let mut total = old.and_then(decode_counts).unwrap_or_default();
    match decode_counts(new) {
        Some(n) => total.merge(&n),
        None => return old.map(<[u8]>::to_vec).unwrap_or_default(),
    }
    encode_counts(&total)
}

/// The UTC day (days since the epoch) of a Unix time in seconds.
pub fn day_of(unix_secs: u64) -> u32 {
    u32::try_from(unix_secs / 86_400).unwrap_or(u32::MAX)
}

/// The next daily send time (Unix seconds) after `now`, `at_minutes` after
/// midnight UTC.
pub fn next_send(now: u64, at_minutes: u32) -> u64 {
    let at = u64::from(at_minutes) * 60;
    let today = now - now % 86_400 + at;
    if today > now {
        today
    } else {
        today + 86_400
    }
}

/// "2026-12-05" for a day.
pub fn day_name(day: u32) -> String {
    chrono::DateTime::from_timestamp(i64::from(day) * 86_400, 0)
        .unwrap_or_default()
        .format("%Y-%m-%d")
        .to_string()
}

/// Who sends the reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitter {
    /// `organization-name` (and `TLS-Report-Submitter`).
    pub organization: String,
    /// `contact-info`.
    pub contact: String,
    /// The report mail's From address.
    pub sender: String,
}

impl Submitter {
    /// The domain of the sender address (the first field of the file name).
    pub fn domain(&self) -> &str {
        self.sender.rsplit_once('@').map_or("", |(_, d)| d)
    }
}

/// The report of one policy domain for one day (RFC 8460 §4.4): every
/// policy it had, with its summary and failure details.
pub fn report_json(
    submitter: &Submitter,
    report_id: &str,
    day: u32,
    policies: &[(PolicyKey, Counts)],
) -> Value {
    let day = day_name(day);
    let entries: Vec<Value> = policies
        .iter()
        .map(|(key, counts)| {
            let mut policy = json!({
                "policy-type": key.kind.as_str(),
                "policy-domain": key.domain,
            });
            if !key.strings.is_empty() {
                policy["policy-string"] = json!(key.strings);
            }
            if !key.mx_host.is_empty() {
                policy["mx-host"] = json!([key.mx_host]);
            }
            let details: Vec<Value> = counts
                .failures
                .iter()
                .map(|d| {
                    let mut v = json!({
                        "result-type": d.result.as_str(),
                        "failed-session-count": d.count,
                    });
                    if !d.mx.is_empty() {
                        v["receiving-mx-hostname"] = json!(d.mx);
                    }
                    if !d.ip.is_empty() {
                        v["receiving-ip"] = json!(d.ip);
                    }
                    if !d.info.is_empty() {
                        v["additional-information"] = json!(d.info);
                    }
                    v
                })
                .collect();
            let mut entry = json!({
                "policy": policy,
                "summary": {
                    "total-successful-session-count": counts.success,
                    "total-failure-session-count": counts.failed_sessions(),
                },
            });
            if !details.is_empty() {
                entry["failure-details"] = Value::Array(details);
            }
            entry
        })
        .collect();
    json!({
        "organization-name": submitter.organization,
        "date-range": {
            "start-datetime": format!("{day}T00:00:00Z"),
            "end-datetime": format!("{day}T23:59:59Z"),
        },
        "contact-info": submitter.contact,
        "report-id": report_id,
        "policies": entries,
    })
}

/// Groups the stored counters of the days before `until_day` (all of them
/// with `until_day` = u32::MAX) by (day, policy domain): one report each.
pub fn group_reports(
    entries: Vec<(u32, PolicyKey, Counts)>,
    until_day: u32,
) -> BTreeMap<(u32, String), Vec<(PolicyKey, Counts)>> {
    let mut out: BTreeMap<(u32, String), Vec<(PolicyKey, Counts)>> = BTreeMap::new();
    for (day, key, counts) in entries {
        if day < until_day {
            out.entry((day, key.domain.clone()))
                .or_default()
                .push((key, counts));
        }
    }
    out
}

/// The report's file name (RFC 8460 §5.1):
/// `sender!policy-domain!begin!end!unique.json.gz`, times in Unix seconds.
pub fn report_filename(submitter: &Submitter, domain: &str, day: u32, unique: u64) -> String {
    let begin = u64::from(day) * 86_400;
    format!(
        "{}!{domain}!{begin}!{}!{unique}.json.gz",
        submitter.domain(),
        begin + 86_399
    )
}

/// The report mail (RFC 8460 §5.3): `multipart/report; report-type="tlsrpt"`
/// with a short text part and the gzipped report as
/// `application/tlsrpt+gzip`; Subject, `TLS-Report-Domain` and
/// `TLS-Report-Submitter` as the RFC gives them.
#[allow(clippy::too_many_arguments)]
pub fn report_mail(
    submitter: &Submitter,
    to: &str,
    domain: &str,
    report_id: &str,
    day: u32,
    filename: &str,
    gzipped: &[u8],
    date: &str,
    message_id: &str,
) -> Vec<u8> {
    use mail_builder::headers::address::Address;
    use mail_builder::headers::content_type::ContentType;
    use mail_builder::headers::raw::Raw;
    use mail_builder::mime::{BodyPart, MimePart};
    use mail_builder::MessageBuilder;

    let text = format!(
        "This is an aggregate TLS report (RFC 8460) from {} for {domain}, covering {} (UTC).\r\n",
        submitter.organization,
        day_name(day)
    );
    let parts = vec![
        MimePart::new("text/plain", text),
        MimePart::new(
            ContentType::new("application/tlsrpt+gzip"),
            BodyPart::Binary(gzipped.to_vec().into()),
        )
        .attachment(filename.to_string()),
    ];
    let report = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "tlsrpt"),
        parts,
    );
    MessageBuilder::new()
        .from(Address::new_address(None::<&str>, submitter.sender.clone()))
        .to(Address::new_address(None::<&str>, to.to_string()))
        .subject(format!(
            "Report Domain: {domain} Submitter: {} Report-ID: <{report_id}>",
            submitter.organization
        ))
        .header("Date", Raw::new(date.to_string()))
        .message_id(message_id.to_string())
        .header("TLS-Report-Domain", Raw::new(domain.to_string()))
        .header(
            "TLS-Report-Submitter",
            Raw::new(submitter.organization.clone()),
        )
        .header("Auto-Submitted", Raw::new("auto-generated"))
        .body(report)
        .write_to_vec()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sts_policies_are_reported_as_sts_with_their_fields_unless_dane_decides() {
        use sluice_policy::mta_sts::{Mode, Policy};
        let configured = super::super::tls_policy::TlsPolicy::global(
            super::super::config::OutboundTls::Opportunistic,
        );
        let policy = Policy {
            mode: Mode::Enforce,
            mx: vec!["mx.example.net".into(), "*.example.net".into()],
            max_age: 86400,
        };
        let off = super::super::dane::Dane::Off("no TLSA records");
        let rua = [Rua::Mailto("r@example.net".into())];
        let t = target(
            "Example.NET.",
            "MX.example.net.",
            &off,
            &configured,
            Some(&policy),
            &rua,
        );
        assert_eq!(t.key.kind, PolicyType::Sts);
        assert_eq!(t.key.domain, "example.net");
        assert_eq!(
            t.key.strings,
            [
                "version: STSv1",
                "mode: enforce",
                "mx: mx.example.net",
                "mx: *.example.net",
                "max_age: 86400"
            ]
        );
        // Mode none is no policy; without MTA-STS the configured policy's type.
        let none = Policy {
            mode: Mode::None,
            ..policy.clone()
        };
        let t = target(
            "example.net",
            "mx.example.net",
            &off,
            &configured,
            Some(&none),
            &rua,
        );
        assert_eq!(t.key.kind, PolicyType::NoPolicyFound);
        let t = target(
            "example.net",
            "mx.example.net",
            &off,
            &configured,
            None,
            &rua,
        );
        assert_eq!(t.key.kind, PolicyType::NoPolicyFound);
    }

    fn key(domain: &str, kind: PolicyType) -> PolicyKey {
        PolicyKey {
            domain: domain.into(),
            kind,
            strings: if kind == PolicyType::Tlsa {
                vec!["3 1 1 abcd".into()]
            } else {
                vec![]
            },
            mx_host: format!("mx.{domain}"),
        }
    }

    #[test]
    fn record_parsing() {
        assert_eq!(
            parse_record(["v=TLSRPTv1; rua=mailto:tls@example.com"]),
            Ok(vec![Rua::Mailto("tls@example.com".into())])
        );
        assert_eq!(
            parse_record([
                "v=spf1 -all",
                "v=TLSRPTv1;rua=mailto:a%40example.com?subject=x, https://r.example/v1 ,ftp://x"
            ]),
            Ok(vec![
                Rua::Mailto("a@example.com".into()),
                Rua::Https("https://r.example/v1".into())
            ])
        );
        assert_eq!(parse_record(["v=spf1 -all"]), Err(RecordError::None));
        assert_eq!(
            parse_record(["v=TLSRPTv1; rua=mailto:a@b", "v=TLSRPTv1; rua=mailto:c@d"]),
            Err(RecordError::Several(2))
        );
        assert_eq!(parse_record(["v=TLSRPTv1;"]), Err(RecordError::NoRua));
        assert_eq!(
            parse_record(["v=TLSRPTv1; rua=ftp://x,mailto:nobody"]),
            Err(RecordError::NoUsableRua)
        );
        // Not our version tag.
        assert_eq!(
            parse_record(["v=TLSRPTv10; rua=mailto:a@b"]),
            Err(RecordError::None)
        );
        let long = format!("v=TLSRPTv1; rua=mailto:a@b; x={}", "y".repeat(3000));
        assert_eq!(parse_record([long.as_str()]), Err(RecordError::TooLong));
        let many = format!(
            "v=TLSRPTv1; rua={}",
            (0..10)
                .map(|i| format!("mailto:r{i}@x"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert_eq!(parse_record([many.as_str()]).map(|r| r.len()), Ok(MAX_RUA));
    }

    #[test]
    fn result_mapping() {
        let g = Basis::Global;
        let cases = [
            (
                Failure::NoStartTls,
                g.clone(),
                Level::Verify,
                "starttls-not-supported",
            ),
            (
                Failure::StartTlsRefused("454 no".into()),
                g.clone(),
                Level::Required,
                "starttls-not-supported",
            ),
            (
                Failure::Handshake("eof".into()),
                g.clone(),
                Level::Verify,
                "validation-failure",
            ),
            (
                Failure::NotVerified("invalid peer certificate: NotValidForName".into()),
                g.clone(),
                Level::Verify,
                "certificate-host-mismatch",
            ),
            (
                Failure::NotVerified("invalid peer certificate: Expired".into()),
                Basis::MtaSts,
                Level::Verify,
                "certificate-expired",
            ),
            (
                Failure::NotVerified("invalid peer certificate: UnknownIssuer".into()),
                g.clone(),
                Level::Verify,
                "certificate-not-trusted",
            ),
            (
                Failure::NotVerified("no TLSA record matched".into()),
                Basis::Dane,
                Level::Verify,
                "tlsa-invalid",
            ),
            (
                Failure::NotVerified("DANE: no usable TLSA records".into()),
                g,
                Level::Dane,
                "dane-required",
            ),
        ];
        for (f, basis, level, want) in cases {
            assert_eq!(
                result_of(&f, &basis, level).map(|r| r.as_str()),
                Some(want),
                "{f:?}"
            );
        }
        assert_eq!(result_of_dane_skip(true).as_str(), "dnssec-invalid");
        assert_eq!(result_of_dane_skip(false).as_str(), "dane-required");
        assert_eq!(policy_type(&Basis::Dane).as_str(), "tlsa");
        assert_eq!(policy_type(&Basis::MtaSts).as_str(), "sts");
        assert_eq!(policy_type(&Basis::Rule(1)).as_str(), "no-policy-found");
        // Every result type has its RFC name, all distinct.
        let names: std::collections::HashSet<_> =
            ResultType::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), 11);
    }

    #[test]
    fn counts_bound_their_details_and_merge() {
        let mut c = Counts::default();
        for i in 0..100 {
            c.fail(
                ResultType::CertificateNotTrusted,
                "mx.example",
                &format!("192.0.2.{i}"),
                &"x".repeat(500),
                1,
            );
        }
        assert_eq!(c.failures.len(), MAX_FAILURE_DETAILS);
        assert_eq!(c.failed_sessions(), 100);
        assert!(c.failures.iter().all(|d| d.info.len() <= MAX_INFO));
        let mut other = Counts {
            rua: vec![Rua::Mailto("a@b".into())],
            success: 7,
            ..Counts::default()
        };
        other.fail(ResultType::StarttlsNotSupported, "mx", "192.0.2.1", "no", 2);
        c.merge(&other);
        assert_eq!(c.success, 7);
        assert_eq!(c.failed_sessions(), 102);
        assert_eq!(c.rua, other.rua);
        // Same detail again: counted in place.
        let mut d = Counts::default();
        d.fail(ResultType::TlsaInvalid, "mx", "192.0.2.1", "a", 1);
        d.fail(ResultType::TlsaInvalid, "mx", "192.0.2.1", "b", 4);
        assert_eq!(d.failures.len(), 1);
        assert_eq!((d.failures[0].count, d.failures[0].info.as_str()), (5, "a"));
    }

    #[test]
    fn store_encoding_round_trips_and_merges() {
        let k = key("example.org", PolicyType::Tlsa);
        let bytes = encode_key(20_000, &k);
        assert_eq!(decode_key(&bytes), Some((20_000, k)));
        assert!(
            encode_key(1, &key("z", PolicyType::Sts)) < encode_key(2, &key("a", PolicyType::Sts))
        );
        assert_eq!(decode_key(&[1, 2]), None);
        let mut a = Counts {
            success: 3,
            ..Counts::default()
        };
        a.fail(ResultType::DaneRequired, "mx", "", "", 1);
        let merged = merge_encoded(Some(&encode_counts(&a)), &encode_counts(&a));
        let m = decode_counts(&merged).unwrap();
        assert_eq!((m.success, m.failed_sessions()), (6, 2));
        assert_eq!(
            decode_counts(&merge_encoded(None, &encode_counts(&a))),
            Some(a.clone())
        );
        // A corrupt batch leaves what was stored.
        assert_eq!(
            merge_encoded(Some(&encode_counts(&a)), &[0xff; 3]),
            encode_counts(&a)
        );
    }

    fn submitter() -> Submitter {
        Submitter {
            organization: "Relay Org".into(),
            contact: "mailto:postmaster@relay.example".into(),
            sender: "tls-reports@relay.example".into(),
        }
    }

    #[test]
    fn report_has_the_rfc_fields() {
        let mut c = Counts {
            success: 5,
            ..Counts::default()
        };
        c.fail(
            ResultType::CertificateHostMismatch,
            "mx.example.org",
            "192.0.2.1",
            "NotValidForName",
            2,
        );
        let none = Counts {
            success: 1,
            ..Counts::default()
        };
        let day = day_of(1_764_979_200); // 2025-12-06
        let r = report_json(
            &submitter(),
            "id-1@relay.example",
            day,
            &[
                (key("example.org", PolicyType::Tlsa), c),
                (key("example.org", PolicyType::NoPolicyFound), none),
            ],
        );
        assert_eq!(r["organization-name"], "Relay Org");
        assert_eq!(r["contact-info"], "mailto:postmaster@relay.example");
        assert_eq!(r["report-id"], "id-1@relay.example");
        assert_eq!(r["date-range"]["start-datetime"], "2025-12-06T00:00:00Z");
        assert_eq!(r["date-range"]["end-datetime"], "2025-12-06T23:59:59Z");
        let p = &r["policies"][0];
        assert_eq!(p["policy"]["policy-type"], "tlsa");
        assert_eq!(p["policy"]["policy-domain"], "example.org");
        assert_eq!(p["policy"]["policy-string"][0], "3 1 1 abcd");
        assert_eq!(p["policy"]["mx-host"][0], "mx.example.org");
        assert_eq!(p["summary"]["total-successful-session-count"], 5);
        assert_eq!(p["summary"]["total-failure-session-count"], 2);
        let d = &p["failure-details"][0];
        assert_eq!(d["result-type"], "certificate-host-mismatch");
        assert_eq!(d["receiving-mx-hostname"], "mx.example.org");
        assert_eq!(d["receiving-ip"], "192.0.2.1");
        assert_eq!(d["failed-session-count"], 2);
        let p = &r["policies"][1];
        assert_eq!(p["policy"]["policy-type"], "no-policy-found");
        assert!(p["policy"].get("policy-string").is_none());
        assert!(p.get("failure-details").is_none());
    }

    #[test]
    fn daily_send_time() {
        let midnight = 86_400 * 20_000;
        assert_eq!(next_send(midnight, 30), midnight + 1800);
        assert_eq!(next_send(midnight + 1800, 30), midnight + 86_400 + 1800);
        assert_eq!(next_send(midnight + 3600, 30), midnight + 86_400 + 1800);
        assert_eq!(next_send(midnight + 100, 0), midnight + 86_400);
    }

    #[test]
    fn grouping_and_mail() {
        let entries = vec![
            (10, key("a.example", PolicyType::Tlsa), Counts::default()),
            (
                10,
                key("a.example", PolicyType::NoPolicyFound),
                Counts::default(),
            ),
            (10, key("b.example", PolicyType::Sts), Counts::default()),
            (11, key("a.example", PolicyType::Tlsa), Counts::default()),
        ];
        let g = group_reports(entries.clone(), 11);
        assert_eq!(g.len(), 2);
        assert_eq!(g[&(10, "a.example".to_string())].len(), 2);
        assert_eq!(group_reports(entries, u32::MAX).len(), 3);

        let s = submitter();
        let name = report_filename(&s, "a.example", 10, 7);
        assert_eq!(name, "relay.example!a.example!864000!950399!7.json.gz");
        let mail = report_mail(
            &s,
            "tls@a.example",
            "a.example",
            "rid@relay.example",
            10,
            &name,
            b"\x1f\x8b gz",
            "Sun, 6 Dec 2026 00:00:00 +0000",
            "rid@relay.example",
        );
        let text = String::from_utf8_lossy(&mail);
        assert!(text.contains("Subject: Report Domain: a.example Submitter: Relay Org Report-ID: <rid@relay.example>"), "{text}");
        assert!(text.contains("TLS-Report-Domain: a.example"), "{text}");
        assert!(text.contains("TLS-Report-Submitter: Relay Org"), "{text}");
        assert!(text.contains("multipart/report"), "{text}");
        assert!(text.contains("report-type=\"tlsrpt\""), "{text}");
        assert!(text.contains("application/tlsrpt+gzip"), "{text}");
        assert!(text.contains(&name), "{text}");
    }

    #[test]
    fn a_failed_policy_fetch_is_an_sts_failure_without_policy_string_or_host() {
        use crate::delivery::mta_sts::FetchError;
        let rua = vec![Rua::Mailto("r@example.net".into())];
        let t = sts_fetch_target("Example.COM.", &rua);
        assert_eq!(t.key.domain, "example.com");
        assert_eq!(t.key.kind, PolicyType::Sts);
        assert!(t.key.strings.is_empty() && t.key.mx_host.is_empty());
        assert_eq!(t.rua, rua);
        let cases = [
            (
                FetchError::Policy("no version".into()),
                "sts-policy-invalid",
            ),
            (
                FetchError::Connect("refused".into()),
                "sts-policy-fetch-error",
            ),
            (
                FetchError::Tls("unknown issuer".into()),
                "sts-policy-fetch-error",
            ),
            (FetchError::Http("404".into()), "sts-policy-fetch-error"),
            (
                FetchError::NoAddress("mta-sts.x".into()),
                "sts-policy-fetch-error",
            ),
            (
                FetchError::Timeout(std::time::Duration::from_secs(3)),
                "sts-policy-fetch-error",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(
                result_of_sts_fetch(e.invalid_policy()).as_str(),
                want,
                "{e:?}"
            );
        }
    }
}
