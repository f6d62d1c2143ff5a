//! `[dnsbl]` (zones and how their answers act) and `[greylist]` (timings,
//! bounds, exemptions). Listeners switch them on with `dnsbl = true` and
//! `greylist = true`. The decisions are `sluice_policy::dnsbl` and
//! `sluice_policy::greylist`; `engine/src/antispam.rs` does the lookups and
//! the table I/O.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::Deserialize;
use sluice_policy::dnsbl::{DnsblPolicy, ListAction, Subject, Zone};
use sluice_policy::greylist::{Exemptions, GreylistPolicy};
use sluice_policy::lists::Lists;
use sluice_policy::NetworkList;

use super::HumanDuration;

/// At most this many zones (each is one lookup per client).
pub const MAX_ZONES: usize = 32;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsblSection {
    /// The longest all zones' lookups may take together; past it the zones
    /// not answered list nothing.
    pub timeout: HumanDuration,
    /// Scores of the DNSBL zones listing a client add up; this much
    /// rejects (0: scores never reject).
    pub reject_score: u32,
    pub zone: Vec<ZoneConfig>,
}

impl Default for DnsblSection {
    fn default() -> Self {
        DnsblSection {
            timeout: HumanDuration(Duration::from_secs(5)),
            reject_score: 0,
            zone: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    pub name: String,
    /// "client" (default), "helo" or "sender".
    #[serde(default = "client")]
    pub subject: String,
    /// A DNSWL: a listing exempts the client.
    #[serde(default)]
    pub allow: bool,
    /// For listed values not in `results`: reject, tempfail, ignore, score:N.
    #[serde(default = "reject")]
    pub action: String,
    /// Per returned value ("127.0.0.2" = "reject").
    #[serde(default)]
    pub results: BTreeMap<String, String>,
}

fn client() -> String {
    "client".into()
}

fn reject() -> String {
    "reject".into()
}

impl DnsblSection {
    /// The zones as the policy uses them; Err is (key inside `dnsbl`, why).
    pub fn policy(&self) -> Result<DnsblPolicy, (String, String)> {
        if self.zone.len() > MAX_ZONES {
            return Err(("zone".into(), format!("at most {MAX_ZONES} zones")));
        }
        if self.timeout.0.is_zero() || self.timeout.0 > Duration::from_secs(60) {
            return Err(("timeout".into(), "must be above 0 and at most 60s".into()));
        }
        let mut zones = Vec::with_capacity(self.zone.len());
        for (i, z) in self.zone.iter().enumerate() {
            let key = |k: &str| format!("zone[{i}].{k}");
            let name = Zone::check_name(&z.name).map_err(|e| (key("name"), e))?;
            let subject: Subject = z.subject.parse().map_err(|e| (key("subject"), e))?;
            let action: ListAction = z.action.parse().map_err(|e| (key("action"), e))?;
            let mut results = Vec::with_capacity(z.results.len());
            for (value, act) in &z.results {
                let ip: Ipv4Addr = value
                    .parse()
                    .map_err(|_| (key("results"), format!("`{value}` is not an IPv4 address")))?;
                let act: ListAction = act.parse().map_err(|e| (key("results"), e))?;
                results.push((ip, act));
            }
            zones.push(Zone {
                name,
                subject,
                allow: z.allow,
                action,
                results,
            });
        }
        Ok(DnsblPolicy {
            zones,
            reject_score: self.reject_score,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GreylistSection {
    pub delay: HumanDuration,
    pub expire: HumanDuration,
    pub pass_ttl: HumanDuration,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Entries the table may hold; past it new triplets are not greylisted
    /// (logged and counted) until the purge makes room.
    pub max_entries: usize,
    /// How often expired entries are removed.
    pub purge_interval: HumanDuration,
    pub skip_networks: Vec<String>,
    /// `[lists]` names: client addresses/networks, senders, recipients.
    pub skip_clients_list: Option<String>,
    pub skip_senders_list: Option<String>,
    pub skip_recipients_list: Option<String>,
}

impl Default for GreylistSection {
    fn default() -> Self {
        GreylistSection {
            delay: HumanDuration(Duration::from_secs(300)),
            expire: HumanDuration(Duration::from_secs(24 * 3600)),
            pass_ttl: HumanDuration(Duration::from_secs(35 * 86_400)),
            ipv4_prefix: 24,
            ipv6_prefix: 64,
            max_entries: 1_000_000,
            purge_interval: HumanDuration(Duration::from_secs(3600)),
            skip_networks: Vec::new(),
            skip_clients_list: None,
            skip_senders_list: None,
            skip_recipients_list: None,
        }
    }
}

fn ms(d: &HumanDuration) -> u64 {
    u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX)
}

impl GreylistSection {
    pub fn policy(&self) -> Result<GreylistPolicy, (String, String)> {
        if self.ipv4_prefix > 32 {
            return Err(("ipv4_prefix".into(), "must be 0..=32".into()));
        }
        if self.ipv6_prefix > 128 {
            return Err(("ipv6_prefix".into(), "must be 0..=128".into()));
        }
        if self.expire.0 <= self.delay.0 {
            return Err(("expire".into(), "must be longer than delay".into()));
        }
        if self.pass_ttl.0.is_zero() {
            return Err(("pass_ttl".into(), "must be above zero".into()));
        }
        if self.max_entries == 0 {
            return Err(("max_entries".into(), "must be at least 1".into()));
        }
        if self.purge_interval.0 < Duration::from_secs(1) {
            return Err(("purge_interval".into(), "must be at least 1s".into()));
        }
        Ok(GreylistPolicy {
            delay_ms: ms(&self.delay),
            expire_ms: ms(&self.expire),
            pass_ttl_ms: ms(&self.pass_ttl),
            ipv4_prefix: self.ipv4_prefix,
            ipv6_prefix: self.ipv6_prefix,
        })
    }

    /// The exemptions, with `skip_clients_list` read from `lists`; Err is
    /// (key inside `greylist`, why).
    pub fn exemptions(&self, lists: &Lists) -> Result<Exemptions, (String, String)> {
        let mut nets = self.skip_networks.clone();
        if let Some(name) = &self.skip_clients_list {
            let Some(entries) = lists.entries(name) else {
                return Err((
                    "skip_clients_list".into(),
                    format!("no list `{name}` in [lists]"),
                ));
            };
            nets.extend(entries.map(str::to_string));
        }
        let networks = NetworkList::parse(&nets).map_err(|e| {
            let key = if self.skip_clients_list.is_some() {
                "skip_clients_list"
            } else {
                "skip_networks"
            };
            (key.to_string(), e.to_string())
        })?;
        for (key, name) in [
            ("skip_senders_list", &self.skip_senders_list),
            ("skip_recipients_list", &self.skip_recipients_list),
        ] {
            if let Some(n) = name {
                if !lists.has(n) {
                    return Err((key.into(), format!("no list `{n}` in [lists]")));
                }
            }
        }
        Ok(Exemptions {
            networks,
            senders_list: self.skip_senders_list.clone(),
            recipients_list: self.skip_recipients_list.clone(),
        })
    }
}
