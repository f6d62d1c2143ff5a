//! `[events]`: delivery events (docs/events.md) as JSON lines to a file and
//! in batches to an HTTP webhook, through a durable buffer in
//! `<spool.path>/events`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ByteSize, HumanDuration};

/// Longest header field name accepted for `tenant_header` / `campaign_header`.
const MAX_HEADER_NAME: usize = 64;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsSection {
    /// Off by default: no event is made.
    pub enabled: bool,
    /// JSON-lines file; none: no file.
    pub file: Option<PathBuf>,
    /// Rotate the file when it reaches this size (renamed to FILE.1, older
    /// ones shifted up to `file_keep`); 0: never (reopen on SIGHUP instead).
    pub file_max_size: ByteSize,
    /// Rotated files kept (FILE.1 .. FILE.N).
    pub file_keep: u32,
    /// Header field read at reception into `tenant`; "" reads none.
    pub tenant_header: String,
    /// Header field read at reception into `campaign`; "" reads none.
    pub campaign_header: String,
    /// Events the cores may hand to the events thread before it catches up;
    /// beyond, events are dropped and counted (never waited for).
    pub channel_capacity: usize,
    /// `http://` or `https://` URL the events are POSTed to; none: no webhook.
    pub webhook_url: Option<String>,
    /// Events per POST (a JSON array).
    pub webhook_batch_size: usize,
    /// How long a partial batch waits for more events before it is sent.
    pub webhook_max_delay: HumanDuration,
    /// Bound on each step (connect, send, answer) of a POST.
    pub webhook_timeout: HumanDuration,
    /// First wait after a failed POST; doubles per failure up to `webhook_retry_max`.
    pub webhook_retry_initial: HumanDuration,
    pub webhook_retry_max: HumanDuration,
    /// Events kept for the webhook at most; beyond, new events are dropped
    /// (counted as `sluice_events_dropped_total{reason="buffer_full"}`).
    pub max_buffered: u64,
    /// LMDB map size of `<spool.path>/events`.
    pub map_size: ByteSize,
    /// fsync each batch of the buffer: false keeps events across a crash or
    /// kill -9 of the relay but not across one of the machine.
    pub sync: bool,
}

impl Default for EventsSection {
    fn default() -> Self {
        EventsSection {
            enabled: false,
            file: None,
            file_max_size: ByteSize(0),
            file_keep: 5,
            tenant_header: "X-Tenant".into(),
            campaign_header: "X-Campaign".into(),
            channel_capacity: 65_536,
            webhook_url: None,
            webhook_batch_size: 100,
            webhook_max_delay: HumanDuration(Duration::from_secs(1)),
            webhook_timeout: HumanDuration(Duration::from_secs(10)),
            webhook_retry_initial: HumanDuration(Duration::from_secs(1)),
            webhook_retry_max: HumanDuration(Duration::from_secs(60)),
            max_buffered: 1_000_000,
            map_size: ByteSize(2 << 30),
            sync: true,
        }
    }
}

fn header_name_ok(name: &str) -> bool {
    name.len() <= MAX_HEADER_NAME && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

impl EventsSection {
    /// Cross-key checks: (dotted key, message) of the first problem.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !header_name_ok(&self.tenant_header) {
            return Err((
                "events.tenant_header",
                format!("must be a header field name (printable ASCII, no colon, at most {MAX_HEADER_NAME} characters)"),
            ));
        }
        if !header_name_ok(&self.campaign_header) {
            return Err((
                "events.campaign_header",
                format!("must be a header field name (printable ASCII, no colon, at most {MAX_HEADER_NAME} characters)"),
            ));
        }
        if !(16..=16_777_216).contains(&self.channel_capacity) {
            return Err(("events.channel_capacity", "must be 16 ..= 16777216".into()));
        }
        if self.file_keep > 1000 {
            return Err(("events.file_keep", "must be 0 ..= 1000".into()));
        }
        if self.file_max_size.0 != 0 && self.file_max_size.0 < 4096 {
            return Err((
                "events.file_max_size",
                "must be 0 (never rotate) or at least 4KiB".into(),
            ));
        }
        if let Some(url) = &self.webhook_url {
            if crate::events::webhook::Endpoint::parse(url).is_err() {
                return Err((
                    "events.webhook_url",
                    "must be an http:// or https:// URL with a host".into(),
                ));
            }
        }
        if !(1..=10_000).contains(&self.webhook_batch_size) {
            return Err(("events.webhook_batch_size", "must be 1 ..= 10000".into()));
        }
        if self.webhook_max_delay.0 > Duration::from_secs(3600) {
            return Err(("events.webhook_max_delay", "must be at most 1h".into()));
        }
        if self.webhook_timeout.0.is_zero() || self.webhook_timeout.0 > Duration::from_secs(600) {
            return Err(("events.webhook_timeout", "must be 1s ..= 10m".into()));
        }
        if self.webhook_retry_initial.0.is_zero() {
            return Err(("events.webhook_retry_initial", "must be above zero".into()));
        }
        if self.webhook_retry_max.0 < self.webhook_retry_initial.0 {
            return Err((
                "events.webhook_retry_max",
                "must be at least webhook_retry_initial".into(),
            ));
        }
        if self.max_buffered == 0 {
            return Err(("events.max_buffered", "must be at least 1".into()));
        }
        if self.map_size.0 < (1 << 20) {
            return Err(("events.map_size", "must be at least 1MiB".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_and_bad_values_name_their_key() {
        let s = EventsSection::default();
        assert!(s.check().is_ok());
        let bad = |f: &dyn Fn(&mut EventsSection)| {
            let mut s = EventsSection::default();
            f(&mut s);
            s.check().unwrap_err().0
        };
        assert_eq!(
            bad(&|s| s.tenant_header = "X-Tenant:".into()),
            "events.tenant_header"
        );
        assert_eq!(
            bad(&|s| s.webhook_url = Some("ftp://x/".into())),
            "events.webhook_url"
        );
        assert_eq!(
            bad(&|s| s.webhook_batch_size = 0),
            "events.webhook_batch_size"
        );
        assert_eq!(bad(&|s| s.channel_capacity = 1), "events.channel_capacity");
        assert_eq!(
            bad(&|s| s.webhook_retry_max = HumanDuration(Duration::from_millis(1))),
            "events.webhook_retry_max"
        );
    }
}
