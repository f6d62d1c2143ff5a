//! DNSBL / DNSWL decisions (issue 14 item 7), sans-IO: the name to ask a
//! zone for a client address or a domain, and what the zones' answers mean
//! for the client. The engine does the lookups (through its resolver, with
//! a timeout) and hands the answers back here.
//!
//! Answers are A records in 127.0.0.0/8 (RFC 5782 §2.1). Values in
//! 127.255.255.0/24 are the "query refused / rate limited" codes large
//! lists return to resolvers they do not serve: they are not listings.
//! Anything outside 127/8 is not a listing either (a wildcarding resolver).
//! A lookup that fails (timeout, SERVFAIL) lists nothing: a broken list
//! must not reject mail.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

/// What a zone is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// The client address: reversed octets (v4) or nibbles (v6).
    Client,
    /// The HELO/EHLO name (an address literal is not asked).
    Helo,
    /// The domain of MAIL FROM (the null sender is not asked).
    Sender,
}

impl FromStr for Subject {
    type Err = String;
    fn from_str(s: &str) -> Result<Subject, String> {
        match s {
            "client" => Ok(Subject::Client),
            "helo" => Ok(Subject::Helo),
            "sender" => Ok(Subject::Sender),
            other => Err(format!(
                "`{other}` must be \"client\", \"helo\" or \"sender\""
            )),
        }
    }
}

/// What one listing does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListAction {
    /// 554 5.7.1 at RCPT.
    Reject,
    /// 451 4.7.1 at RCPT.
    Tempfail,
    /// Adds to the client's score; `reject_score` reached → reject.
    Score(u32),
    /// Logged only.
    Ignore,
}

impl FromStr for ListAction {
    type Err = String;
    fn from_str(s: &str) -> Result<ListAction, String> {
        match s {
            "reject" => Ok(ListAction::Reject),
            "tempfail" => Ok(ListAction::Tempfail),
            "ignore" => Ok(ListAction::Ignore),
            other => match other.strip_prefix("score:").map(str::parse::<u32>) {
                Some(Ok(n)) => Ok(ListAction::Score(n)),
                _ => Err(format!(
                    "`{other}` must be \"reject\", \"tempfail\", \"ignore\" or \"score:N\""
                )),
            },
        }
    }
}

/// One configured zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    /// Lowercase, no trailing dot.
    pub name: String,
    pub subject: Subject,
    /// A DNSWL: a listing exempts the client from DNSBL refusals and
    /// greylisting (its actions are not used).
    pub allow: bool,
    /// For a listed value not in `results`.
    pub action: ListAction,
    /// Per returned value (e.g. 127.0.0.2 → reject, 127.0.0.10 → score:2).
    pub results: Vec<(Ipv4Addr, ListAction)>,
}

/// Longest zone name accepted: leaves room for a v6 nibble name (72
/// bytes) within DNS's 253.
pub const MAX_ZONE_LEN: usize = 180;

impl Zone {
    /// Checks the name (config load): a DNS name of letters, digits, '-'
    /// and '_' labels, at most [`MAX_ZONE_LEN`] bytes.
    pub fn check_name(name: &str) -> Result<String, String> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() || name.len() > MAX_ZONE_LEN {
            return Err(format!("must be a DNS name of 1..={MAX_ZONE_LEN} bytes"));
        }
        if !name.split('.').all(valid_label) {
            return Err(format!("`{name}` is not a valid DNS name"));
        }
        Ok(name)
    }

    /// The action for one returned value; None when the value is not a
    /// listing (outside 127/8, or a 127.255.255.x error code).
    pub fn action_for(&self, value: Ipv4Addr) -> Option<ListAction> {
        let [a, b, c, _] = value.octets();
        if a != 127 || (b == 255 && c == 255) {
            return None;
        }
        Some(
            self.results
                .iter()
                .find(|(v, _)| *v == value)
                .map_or(self.action, |(_, act)| *act),
        )
    }

    /// The name to ask this zone about `ip` (for `Subject::Client`).
    pub fn client_query(&self, ip: IpAddr) -> String {
        let mut name = String::with_capacity(self.name.len() + 72);
        match ip {
            IpAddr::V4(v4) => {
                let [a, b, c, d] = v4.octets();
                name.push_str(&format!("{d}.{c}.{b}.{a}."));
            }
            IpAddr::V6(v6) => {
                // RFC 5782 §2.4: nibbles, least significant first.
                for byte in v6.octets().iter().rev() {
                    name.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
                }
            }
        }
        name.push_str(&self.name);
        name
    }

    /// The name to ask this zone about a domain (HELO name or the sender's
    /// domain); None when it cannot be asked (an address literal, a bare
    /// word, a name too long to prefix).
    pub fn domain_query(&self, domain: &str) -> Option<String> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if domain.starts_with('[')
            || !domain.contains('.')
            || domain.len() + 1 + self.name.len() > 253
            || !domain.split('.').all(valid_label)
        {
            return None;
        }
        Some(format!("{domain}.{}", self.name))
    }
}

fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The domain part of an address ("" for none).
pub fn address_domain(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, d)| d)
}

/// What one zone said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZoneAnswer {
    /// Not asked (nothing to ask: null sender, address literal…).
    Skipped,
    /// NXDOMAIN or no A records.
    NotListed,
    /// The A records returned.
    Listed(Vec<Ipv4Addr>),
    /// Timeout or server failure: lists nothing.
    Failed,
}

/// The verdict for a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Listed in a DNSWL zone: no DNSBL refusal, no greylisting.
    Allowed,
    Reject,
    Tempfail,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Allowed => "allowed",
            Verdict::Reject => "reject",
            Verdict::Tempfail => "tempfail",
        }
    }
}

/// The decision on all zones' answers, with what made it (for the reply,
/// the log line and the filters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// Zones that listed the subject (block and allow), in config order,
    /// with the first value each returned.
    pub listed: Vec<(String, Ipv4Addr)>,
    /// The zone the verdict names (the first rejecting / tempfailing /
    /// allowing one; none for a score reject).
    pub zone: Option<String>,
    pub score: u32,
    /// Zones whose lookup failed.
    pub failed: usize,
}

impl Decision {
    pub fn pass() -> Decision {
        Decision {
            verdict: Verdict::Pass,
            listed: Vec::new(),
            zone: None,
            score: 0,
            failed: 0,
        }
    }

    /// The listing zones, comma-separated ("" for none).
    pub fn listed_names(&self) -> String {
        let names: Vec<&str> = self.listed.iter().map(|(z, _)| z.as_str()).collect();
        names.join(",")
    }

    /// The SMTP refusal for a client at `ip`, None unless the verdict
    /// refuses.
    pub fn reply(&self, ip: IpAddr) -> Option<(u16, &'static str, String)> {
        let at = match &self.zone {
            Some(z) => z.clone(),
            None => format!("{} (score {})", self.listed_names(), self.score),
        };
        match self.verdict {
            Verdict::Reject => Some((554, "5.7.1", format!("Error: client [{ip}] listed at {at}"))),
            Verdict::Tempfail => Some((
                451,
                "4.7.1",
                format!("Error: client [{ip}] listed at {at}, try again later"),
            )),
            Verdict::Pass | Verdict::Allowed => None,
        }
    }
}

/// The zones and the score threshold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsblPolicy {
    pub zones: Vec<Zone>,
    /// 0: scores never reject.
    pub reject_score: u32,
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Subject::Client => "client",
            Subject::Helo => "helo",
            Subject::Sender => "sender",
        })
    }
}

impl DnsblPolicy {
    /// Whether any zone asks about this subject.
    pub fn asks(&self, subject: Subject) -> bool {
        self.zones.iter().any(|z| z.subject == subject)
    }

    /// Decides on `answers`, one per zone in config order (missing ones
    /// count as not listed). A DNSWL listing wins over every DNSBL one;
    /// then reject (an action, or the score reaching `reject_score`), then
    /// tempfail.
    pub fn decide(&self, answers: &[ZoneAnswer]) -> Decision {
        let mut d = Decision::pass();
        let mut reject: Option<&str> = None;
        let mut tempfail: Option<&str> = None;
        let mut allow: Option<&str> = None;
        for (zone, answer) in self.zones.iter().zip(answers) {
            let values = match answer {
                ZoneAnswer::Listed(v) => v,
                ZoneAnswer::Failed => {
                    d.failed += 1;
                    continue;
                }
                ZoneAnswer::Skipped | ZoneAnswer::NotListed => continue,
            };
            let acts: Vec<(Ipv4Addr, ListAction)> = values
                .iter()
                .filter_map(|v| zone.action_for(*v).map(|a| (*v, a)))
                .collect();
            let Some((first, _)) = acts.first() else {
                continue;
            };
            d.listed.push((zone.name.clone(), *first));
            if zone.allow {
                allow.get_or_insert(&zone.name);
                continue;
            }
            // A zone counts once: its strongest action over the values.
            let mut score = 0;
            for (_, act) in &acts {
                match act {
                    ListAction::Reject => {
                        reject.get_or_insert(&zone.name);
                    }
                    ListAction::Tempfail => {
                        tempfail.get_or_insert(&zone.name);
                    }
                    ListAction::Score(n) => score = score.max(*n),
                    ListAction::Ignore => {}
                }
            }
            d.score = d.score.saturating_add(score);
        }
        let (verdict, zone) = if let Some(z) = allow {
            (Verdict::Allowed, Some(z))
        } else if let Some(z) = reject {
            (Verdict::Reject, Some(z))
        } else if self.reject_score > 0 && d.score >= self.reject_score {
            (Verdict::Reject, None)
        } else if let Some(z) = tempfail {
            (Verdict::Tempfail, Some(z))
        } else {
            (Verdict::Pass, None)
        };
        d.verdict = verdict;
        d.zone = zone.map(str::to_string);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(name: &str, allow: bool, action: ListAction) -> Zone {
        Zone {
            name: name.into(),
            subject: Subject::Client,
            allow,
            action,
            results: Vec::new(),
        }
    }

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn query_names_reverse_octets_and_nibbles() {
        let z = zone("bl.example", false, ListAction::Reject);
        assert_eq!(
            z.client_query("192.0.2.99".parse().unwrap()),
            "99.2.0.192.bl.example"
        );
        // RFC 5782 §2.4's example.
        let v6 = z.client_query("2001:db8:1:2:3:4:567:89ab".parse().unwrap());
        assert_eq!(
            v6,
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.example"
        );
        assert_eq!(
            z.domain_query("Mail.Example.COM.").as_deref(),
            Some("mail.example.com.bl.example")
        );
        assert_eq!(z.domain_query("[192.0.2.1]"), None);
        assert_eq!(z.domain_query("localhost"), None);
        assert_eq!(z.domain_query("bad name.example"), None);
        assert_eq!(
            z.domain_query(&format!("{}.example", "a".repeat(250))),
            None
        );
    }

    #[test]
    fn zone_names_and_actions_parse() {
        assert_eq!(Zone::check_name("Zen.Example.").unwrap(), "zen.example");
        assert!(Zone::check_name("").is_err());
        assert!(Zone::check_name("a..b").is_err());
        assert!(Zone::check_name(&"a.".repeat(100)).is_err());
        assert_eq!("score:3".parse::<ListAction>(), Ok(ListAction::Score(3)));
        assert_eq!("reject".parse::<ListAction>(), Ok(ListAction::Reject));
        assert!("score:x".parse::<ListAction>().is_err());
        assert!("drop".parse::<ListAction>().is_err());
        assert_eq!("helo".parse::<Subject>(), Ok(Subject::Helo));
    }

    #[test]
    fn values_map_to_actions_and_error_codes_are_not_listings() {
        let mut z = zone("bl.example", false, ListAction::Tempfail);
        z.results = vec![(v4("127.0.0.2"), ListAction::Reject)];
        assert_eq!(z.action_for(v4("127.0.0.2")), Some(ListAction::Reject));
        assert_eq!(z.action_for(v4("127.0.0.4")), Some(ListAction::Tempfail));
        assert_eq!(z.action_for(v4("127.255.255.254")), None);
        assert_eq!(z.action_for(v4("192.0.2.1")), None);
    }

    #[test]
    fn allow_wins_then_reject_then_score_then_tempfail() {
        let policy = DnsblPolicy {
            zones: vec![
                zone("wl.example", true, ListAction::Ignore),
                zone("bl.example", false, ListAction::Reject),
                zone("soft.example", false, ListAction::Tempfail),
                zone("s1.example", false, ListAction::Score(2)),
                zone("s2.example", false, ListAction::Score(3)),
            ],
            reject_score: 5,
        };
        let listed = || ZoneAnswer::Listed(vec![v4("127.0.0.2")]);
        let no = || ZoneAnswer::NotListed;

        let d = policy.decide(&[listed(), listed(), no(), no(), no()]);
        assert_eq!(d.verdict, Verdict::Allowed);
        assert_eq!(d.zone.as_deref(), Some("wl.example"));
        assert_eq!(d.listed_names(), "wl.example,bl.example");
        assert_eq!(d.reply("192.0.2.1".parse().unwrap()), None);

        let d = policy.decide(&[no(), listed(), listed(), no(), no()]);
        assert_eq!(d.verdict, Verdict::Reject);
        assert_eq!(
            d.reply("192.0.2.1".parse().unwrap()),
            Some((
                554,
                "5.7.1",
                "Error: client [192.0.2.1] listed at bl.example".to_string()
            ))
        );

        let d = policy.decide(&[no(), no(), listed(), listed(), no()]);
        assert_eq!(d.verdict, Verdict::Tempfail);
        assert_eq!(d.score, 2);
        assert_eq!(
            d.reply("192.0.2.1".parse().unwrap()).map(|r| r.0),
            Some(451)
        );

        let d = policy.decide(&[no(), no(), no(), listed(), listed()]);
        assert_eq!(d.verdict, Verdict::Reject);
        assert_eq!(d.zone, None);
        assert_eq!(
            d.reply("192.0.2.1".parse().unwrap()).map(|r| r.2),
            Some("Error: client [192.0.2.1] listed at s1.example,s2.example (score 5)".into())
        );

        let d = policy.decide(&[no(), no(), no(), listed(), no()]);
        assert_eq!(d.verdict, Verdict::Pass);
        assert_eq!(d.score, 2);
    }

    #[test]
    fn failures_and_skips_list_nothing() {
        let policy = DnsblPolicy {
            zones: vec![
                zone("bl.example", false, ListAction::Reject),
                zone("b2.example", false, ListAction::Reject),
            ],
            reject_score: 0,
        };
        let d = policy.decide(&[ZoneAnswer::Failed, ZoneAnswer::Skipped]);
        assert_eq!(d.verdict, Verdict::Pass);
        assert_eq!(d.failed, 1);
        // Only an error code: not a listing.
        let d = policy.decide(&[
            ZoneAnswer::Listed(vec![v4("127.255.255.254")]),
            ZoneAnswer::NotListed,
        ]);
        assert_eq!(d.verdict, Verdict::Pass);
        assert!(d.listed.is_empty());
        // Fewer answers than zones: the rest are not listed.
        assert_eq!(policy.decide(&[]).verdict, Verdict::Pass);
    }
}
