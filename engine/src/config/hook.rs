//! `[[server.listener.NAME.hook]]`: HTTP hooks a listener's sessions consult
//! (issue 14 item 4; docs/hooks.md). Each entry is one URL, the stages it is
//! asked at, how long to wait, what to do when it cannot answer, whether it
//! gets the message, and how many requests may be in flight at once.

use std::time::Duration;

use serde::{Deserialize, Deserializer};
use sluice_policy::stage::{OnFailure, Stage};

use super::{ByteSize, HumanDuration};

/// One hook of a listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// Names the hook in logs and metrics; unique within the listener.
    pub name: String,
    /// `http://` or `https://` (verified against the web PKI).
    pub url: String,
    /// Stages asked: connect, ehlo, auth, mail, rcpt, data (default data).
    #[serde(default = "data_only", deserialize_with = "stages")]
    pub stages: Vec<Stage>,
    /// The whole request: connecting, sending, the answer.
    #[serde(default = "timeout")]
    pub timeout: HumanDuration,
    /// "tempfail" (451 4.3.0, default) or "accept" when the hook cannot answer.
    #[serde(default, deserialize_with = "super::milter::on_failure")]
    pub on_failure: OnFailure,
    /// Send the message at data (`message` in the document).
    #[serde(default)]
    pub include_message: bool,
    /// Most bytes of the message sent; a longer one is cut (`truncated`).
    #[serde(default = "max_message_size")]
    pub max_message_size: ByteSize,
    /// Requests in flight at once (all sessions of the process together).
    #[serde(default = "max_concurrency")]
    pub max_concurrency: usize,
    /// Requests waiting for a free slot at most; beyond, a call fails at
    /// once (counted as busy) and `on_failure` applies.
    #[serde(default = "max_queued")]
    pub max_queued: usize,
}

/// Stages a hook can be asked at: every one.
pub const HOOK_STAGES: [Stage; 7] = [
    Stage::Connect,
    Stage::Ehlo,
    Stage::Auth,
    Stage::Mail,
    Stage::Rcpt,
    Stage::Data,
    Stage::Delivery,
];

/// Most hooks one listener may have.
pub const MAX_HOOKS: usize = 16;

fn data_only() -> Vec<Stage> {
    vec![Stage::Data]
}
fn timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn max_message_size() -> ByteSize {
    ByteSize(1 << 20)
}
fn max_concurrency() -> usize {
    8
}
fn max_queued() -> usize {
    64
}

impl HookConfig {
    /// Cross-key checks: (key, why).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        super::milter::check_filter_name(&self.name)?;
        if let Err(why) = crate::events::webhook::Endpoint::parse(&self.url) {
            return Err(("url", format!("`{}`: {why}", self.url)));
        }
        if self.timeout.0.is_zero() || self.timeout.0 > Duration::from_secs(300) {
            return Err(("timeout", "must be above zero and at most 5m".into()));
        }
        if self.max_message_size.0 == 0 || self.max_message_size.0 > 64 << 20 {
            return Err(("max_message_size", "must be 1 byte ..= 64MiB".into()));
        }
        if !(1..=256).contains(&self.max_concurrency) {
            return Err(("max_concurrency", "must be 1 ..= 256".into()));
        }
        if self.max_queued > 100_000 {
            return Err(("max_queued", "must be at most 100000".into()));
        }
        if self.stages.is_empty() {
            return Err(("stages", "name at least one stage".into()));
        }
        Ok(())
    }

    /// Whether the hook is asked at `stage`.
    pub fn asked_at(&self, stage: Stage) -> bool {
        self.stages.contains(&stage)
    }
}

fn stages<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Stage>, D::Error> {
    super::milter::stage_list(d, &HOOK_STAGES, "hook")
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};
    use sluice_policy::stage::{OnFailure, Stage};

    const BASE: &str = "[server.listener.smtp]\nbind = [\"127.0.0.1:2525\"]\n";

    fn load(extra: &str) -> Result<Config, ConfigError> {
        Config::load("test.toml", &format!("{BASE}{extra}"), &[])
    }

    #[test]
    fn hooks_load_with_defaults() {
        let cfg = load(
            "[[server.listener.smtp.hook]]\nname = \"policy\"\nurl = \"http://127.0.0.1:8080/hook\"\n\
             [[server.listener.smtp.hook]]\nname = \"scan\"\nurl = \"https://scan.example/v1\"\n\
             stages = [\"rcpt\", \"data\"]\non_failure = \"accept\"\ninclude_message = true\n\
             max_message_size = \"64KiB\"\nmax_concurrency = 2\ntimeout = \"2s\"\n",
        )
        .expect("load");
        let h = &cfg.server.listener["smtp"].hook;
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].stages, vec![Stage::Data]);
        assert_eq!(h[0].on_failure, OnFailure::Tempfail);
        assert!(!h[0].include_message);
        assert_eq!(h[0].max_concurrency, 8);
        assert_eq!(h[1].stages, vec![Stage::Rcpt, Stage::Data]);
        assert_eq!(h[1].on_failure, OnFailure::Accept);
        assert!(h[1].include_message);
        assert_eq!(h[1].max_message_size.0, 64 << 10);
        assert_eq!(h[1].timeout.0, std::time::Duration::from_secs(2));
        assert!(cfg.server.listener["smtp"].filters.is_some());
    }

    #[test]
    fn hook_errors_name_the_key() {
        let head = "[[server.listener.smtp.hook]]\nname = \"h\"\n";
        for (extra, want) in [
            ("url = \"ftp://x/\"\n", "hook[0].url"),
            (
                "url = \"http://127.0.0.1:1/\"\nmax_concurrency = 0\n",
                "hook[0].max_concurrency",
            ),
            (
                "url = \"http://127.0.0.1:1/\"\ntimeout = \"0s\"\n",
                "hook[0].timeout",
            ),
            (
                "url = \"http://127.0.0.1:1/\"\nstages = [\"delivery\"]\n",
                "stages",
            ),
            ("url = \"http://127.0.0.1:1/\"\nbogus = 1\n", "hook"),
            (
                "url = \"http://127.0.0.1:1/\"\n[[server.listener.smtp.hook]]\nname = \"h\"\nurl = \"http://127.0.0.1:2/\"\n",
                "hook[1].name",
            ),
        ] {
            match load(&format!("{head}{extra}")) {
                Err(ConfigError::Invalid {
                    key, line, message, ..
                }) => {
                    assert!(
                        key.contains(want) || message.contains(want),
                        "{extra}: {key}: {message}"
                    );
                    assert!(line.is_some(), "{extra}: {key}: {message}");
                }
                other => panic!("{extra}: expected an invalid key, got {other:?}"),
            }
        }
    }
}
