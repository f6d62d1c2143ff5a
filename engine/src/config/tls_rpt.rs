//! `[tls_rpt]`: SMTP TLS reporting (RFC 8460) of outbound sessions.

use std::time::Duration;

use serde::Deserialize;

use super::HumanDuration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsRptSection {
    /// Count sessions to destinations that publish `_smtp._tls` and send them
    /// daily reports.
    pub enabled: bool,
    /// `organization-name` of the reports; empty: `server.hostname`.
    pub organization_name: String,
    /// `contact-info` of the reports; empty: `mailto:postmaster@<hostname>`.
    pub contact_info: String,
    /// From address of mailed reports; empty: `tls-reports@<hostname>`.
    pub sender: String,
    /// UTC time of day ("HH:MM") at which the previous days' reports go out.
    pub send_at: String,
    /// How often each core writes its counters to the store.
    pub flush_interval: HumanDuration,
    /// Bound on one HTTPS report upload (connect, send, answer).
    pub https_timeout: HumanDuration,
    /// Distinct policies (domain, policy, MX host) counted per core between
    /// flushes; sessions of further ones are not counted (and logged).
    pub max_policies: usize,
}

impl Default for TlsRptSection {
    fn default() -> Self {
        TlsRptSection {
            enabled: false,
            organization_name: String::new(),
            contact_info: String::new(),
            sender: String::new(),
            send_at: "00:30".into(),
            flush_interval: HumanDuration(Duration::from_secs(60)),
            https_timeout: HumanDuration(Duration::from_secs(30)),
            max_policies: 10_000,
        }
    }
}

impl TlsRptSection {
    /// `send_at` as minutes after midnight UTC.
    pub fn send_at_minutes(&self) -> Result<u32, String> {
        let bad = || format!("`{}` is not a UTC time like \"00:30\"", self.send_at);
        let (h, m) = self.send_at.trim().split_once(':').ok_or_else(bad)?;
        let h: u32 = h.parse().map_err(|_| bad())?;
        let m: u32 = m.parse().map_err(|_| bad())?;
        if h > 23 || m > 59 {
            return Err(bad());
        }
        Ok(h * 60 + m)
    }

    /// Cross-key checks: (dotted key, message) of the first problem.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        self.send_at_minutes().map_err(|e| ("tls_rpt.send_at", e))?;
        if self.flush_interval.0.is_zero() {
            return Err(("tls_rpt.flush_interval", "must be above zero".into()));
        }
        if self.https_timeout.0.is_zero() || self.https_timeout.0 > Duration::from_secs(600) {
            return Err(("tls_rpt.https_timeout", "must be 1s ..= 10m".into()));
        }
        if !self.sender.is_empty()
            && !self
                .sender
                .split_once('@')
                .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
        {
            return Err((
                "tls_rpt.sender",
                "must be an address like user@domain".into(),
            ));
        }
        if self.max_policies == 0 || self.max_policies > 1_000_000 {
            return Err(("tls_rpt.max_policies", "must be 1 ..= 1000000".into()));
        }
        Ok(())
    }

    /// Who the reports come from, with the defaults filled in from `hostname`.
    pub fn submitter(&self, hostname: &str) -> crate::delivery::tls_rpt::Submitter {
        let or = |v: &str, d: String| if v.is_empty() { d } else { v.to_string() };
        crate::delivery::tls_rpt::Submitter {
            organization: or(&self.organization_name, hostname.to_string()),
            contact: or(&self.contact_info, format!("mailto:postmaster@{hostname}")),
            sender: or(&self.sender, format!("tls-reports@{hostname}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_at_and_checks() {
        let mut s = TlsRptSection::default();
        assert_eq!(s.send_at_minutes(), Ok(30));
        assert!(s.check().is_ok());
        s.send_at = "24:00".into();
        assert_eq!(s.check().unwrap_err().0, "tls_rpt.send_at");
        s.send_at = "7:05".into();
        assert_eq!(s.send_at_minutes(), Ok(425));
        s.sender = "nobody".into();
        assert_eq!(s.check().unwrap_err().0, "tls_rpt.sender");
        let sub = TlsRptSection::default().submitter("mx.example.net");
        assert_eq!(sub.sender, "tls-reports@mx.example.net");
        assert_eq!(sub.contact, "mailto:postmaster@mx.example.net");
        assert_eq!(sub.organization, "mx.example.net");
    }
}
