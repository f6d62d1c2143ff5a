//! `[[server.listener.NAME.milter]]`: milters a listener's sessions consult
//! (issue 14). Each entry is one milter: where it listens, how long to wait
//! for it, what to do when it cannot answer, and at which stages it is asked.
//! The protocol is `sluice_policy::milter`; the connections `crate::milter`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use sluice_policy::stage::{OnFailure, Stage};

use super::HumanDuration;

/// Where a milter listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MilterSocket {
    /// `inet:HOST:PORT` (or Sendmail's `inet:PORT@HOST`); HOST is an IP
    /// address or `localhost` (no DNS lookup on the executors).
    Inet(SocketAddr),
    /// `unix:/path/to/socket` (`local:` is the same).
    Unix(PathBuf),
}

impl std::fmt::Display for MilterSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MilterSocket::Inet(a) => write!(f, "inet:{a}"),
            MilterSocket::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl MilterSocket {
    pub fn parse(text: &str) -> Result<MilterSocket, String> {
        let bad = || {
            format!(
                "`{text}` is not a milter socket like \"inet:127.0.0.1:11332\", \
                 \"inet:[::1]:8891\", \"inet:8891@127.0.0.1\" or \"unix:/run/milter.sock\""
            )
        };
        let (kind, rest) = text.split_once(':').ok_or_else(bad)?;
        match kind {
            "unix" | "local" => {
                if !rest.starts_with('/') || rest.len() > 107 {
                    return Err(format!(
                        "`{text}`: a unix socket needs an absolute path of at most 107 bytes"
                    ));
                }
                Ok(MilterSocket::Unix(PathBuf::from(rest)))
            }
            "inet" | "inet6" => {
                let (host, port) = if let Some((port, host)) = rest.split_once('@') {
                    (host, port)
                } else {
                    rest.rsplit_once(':').ok_or_else(bad)?
                };
                let port: u16 = port.parse().map_err(|_| bad())?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let ip: IpAddr = if host == "localhost" {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    host.parse().map_err(|_| {
                        format!("`{text}`: the host must be an IP address or localhost")
                    })?
                };
                if port == 0 {
                    return Err(format!("`{text}`: port 0"));
                }
                Ok(MilterSocket::Inet(SocketAddr::new(ip, port)))
            }
            _ => Err(bad()),
        }
    }
}

/// One milter of a listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MilterConfig {
    /// Names the milter in logs and metrics; unique within the listener.
    pub name: String,
    #[serde(deserialize_with = "socket")]
    pub socket: MilterSocket,
    /// Connecting and option negotiation together.
    #[serde(default = "connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Waiting for one reply (SMFIR_PROGRESS restarts it) or one write.
    #[serde(default = "command_timeout")]
    pub command_timeout: HumanDuration,
    /// All of one stage's exchange (at DATA: the whole message and the
    /// milter's answer, progress replies included).
    #[serde(default = "stage_timeout")]
    pub stage_timeout: HumanDuration,
    /// "tempfail" (451 4.3.0, default) or "accept" when the milter cannot answer.
    #[serde(default, deserialize_with = "on_failure")]
    pub on_failure: OnFailure,
    /// Stages whose answer is asked: connect, ehlo, mail, rcpt, data. The
    /// milter still sees the earlier steps (sent when it is next asked).
    #[serde(default = "all_stages", deserialize_with = "stages")]
    pub stages: Vec<Stage>,
}

/// Stages a milter can be asked at (it has no AUTH or delivery step).
pub const MILTER_STAGES: [Stage; 5] = [
    Stage::Connect,
    Stage::Ehlo,
    Stage::Mail,
    Stage::Rcpt,
    Stage::Data,
];

/// Most milters one listener may have.
pub const MAX_MILTERS: usize = 16;

fn connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn command_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn stage_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn all_stages() -> Vec<Stage> {
    MILTER_STAGES.to_vec()
}

impl MilterConfig {
    /// Cross-key checks: (key, why).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        check_filter_name(&self.name)?;
        for (key, t) in [
            ("connect_timeout", self.connect_timeout.0),
            ("command_timeout", self.command_timeout.0),
            ("stage_timeout", self.stage_timeout.0),
        ] {
            if t.is_zero() || t > Duration::from_secs(3600) {
                return Err((key, "must be above zero and at most 1h".into()));
            }
        }
        if self.stage_timeout.0 < self.command_timeout.0 {
            return Err(("stage_timeout", "must be at least command_timeout".into()));
        }
        if self.stages.is_empty() {
            return Err(("stages", "name at least one stage".into()));
        }
        Ok(())
    }

    /// Whether the milter's answer is asked at `stage`.
    pub fn asked_at(&self, stage: Stage) -> bool {
        self.stages.contains(&stage)
    }
}

fn socket<'de, D: Deserializer<'de>>(d: D) -> Result<MilterSocket, D::Error> {
    MilterSocket::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

pub(super) fn on_failure<'de, D: Deserializer<'de>>(d: D) -> Result<OnFailure, D::Error> {
    match String::deserialize(d)?.as_str() {
        "tempfail" => Ok(OnFailure::Tempfail),
        "accept" => Ok(OnFailure::Accept),
        other => Err(serde::de::Error::custom(format!(
            "`{other}` must be \"tempfail\" or \"accept\""
        ))),
    }
}

fn stages<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Stage>, D::Error> {
    stage_list(d, &MILTER_STAGES, "milter")
}

/// A milter's or hook's `name`: it appears in logs, metrics and the
/// config's error keys, so it is kept short and plain.
pub(super) fn check_filter_name(name: &str) -> Result<(), (&'static str, String)> {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if name.is_empty() || name.len() > 64 || !plain {
        return Err(("name", "1 to 64 letters, digits, '-' or '_'".to_string()));
    }
    Ok(())
}

/// A list of stage names, each one of `allowed` (duplicates dropped); the
/// error names the `kind` of filter and the stages it can be asked at.
pub(super) fn stage_list<'de, D: Deserializer<'de>>(
    d: D,
    allowed: &[Stage],
    kind: &str,
) -> Result<Vec<Stage>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    let mut out = Vec::new();
    for name in names {
        let stage = Stage::from_name(&name)
            .filter(|s| allowed.contains(s))
            .ok_or_else(|| {
                let choices: Vec<&str> = allowed.iter().map(|s| s.name()).collect();
                serde::de::Error::custom(format!(
                    "`{name}` is not a {kind} stage ({})",
                    choices.join(", ")
                ))
            })?;
        if !out.contains(&stage) {
            out.push(stage);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets() {
        assert_eq!(
            MilterSocket::parse("inet:127.0.0.1:11332"),
            Ok(MilterSocket::Inet("127.0.0.1:11332".parse().unwrap()))
        );
        assert_eq!(
            MilterSocket::parse("inet:[::1]:8891"),
            Ok(MilterSocket::Inet("[::1]:8891".parse().unwrap()))
        );
        assert_eq!(
            MilterSocket::parse("inet:8891@localhost"),
            Ok(MilterSocket::Inet("127.0.0.1:8891".parse().unwrap()))
        );
        assert_eq!(
            MilterSocket::parse("unix:/run/m.sock"),
            Ok(MilterSocket::Unix("/run/m.sock".into()))
        );
        for bad in [
            "127.0.0.1:25",
            "inet:mail.example:25",
            "inet:127.0.0.1:0",
            "inet:127.0.0.1:x",
            "unix:relative",
            "tcp:1.2.3.4:5",
        ] {
            assert!(MilterSocket::parse(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod config_tests {
    use crate::config::{Config, ConfigError};
    use sluice_policy::stage::{OnFailure, Stage};

    use super::MilterSocket;

    const BASE: &str = "[server.listener.smtp]\nbind = [\"127.0.0.1:2525\"]\n";

    fn load(extra: &str) -> Result<Config, ConfigError> {
        Config::load("test.toml", &format!("{BASE}{extra}"), &[])
    }

    fn invalid(extra: &str) -> (String, Option<usize>, String) {
        match load(extra) {
            Err(ConfigError::Invalid {
                key, line, message, ..
            }) => (key, line, message),
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn milters_load_with_defaults() {
        let cfg = load(
            "[[server.listener.smtp.milter]]\nname = \"rspamd\"\nsocket = \"inet:127.0.0.1:11332\"\n\
             [[server.listener.smtp.milter]]\nname = \"dkim\"\nsocket = \"unix:/run/opendkim.sock\"\n\
             on_failure = \"accept\"\nstages = [\"data\"]\ncommand_timeout = \"5s\"\n",
        )
        .unwrap();
        let m = &cfg.server.listener["smtp"].milter;
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0].socket,
            MilterSocket::Inet("127.0.0.1:11332".parse().unwrap())
        );
        assert_eq!(m[0].on_failure, OnFailure::Tempfail);
        assert_eq!(m[0].stages.len(), 5);
        assert_eq!(m[1].on_failure, OnFailure::Accept);
        assert_eq!(m[1].stages, vec![Stage::Data]);
        assert!(m[1].asked_at(Stage::Data) && !m[1].asked_at(Stage::Rcpt));
        assert_eq!(m[1].command_timeout.0, std::time::Duration::from_secs(5));
    }

    #[test]
    fn milter_errors_name_key_and_line() {
        let head = "[[server.listener.smtp.milter]]\nname = \"m\"\n";
        // Values serde refuses: the key path and the value's line.
        for (extra, key_part, line) in [
            ("socket = \"tcp:1.2.3.4:5\"\n", "socket", 5),
            (
                "socket = \"inet:127.0.0.1:1\"\non_failure = \"maybe\"\n",
                "on_failure",
                6,
            ),
            (
                "socket = \"inet:127.0.0.1:1\"\nstages = [\"auth\"]\n",
                "stages",
                6,
            ),
            ("socket = \"inet:127.0.0.1:1\"\nbogus = 1\n", "milter", 6),
        ] {
            let (key, l, message) = invalid(&format!("{head}{extra}"));
            assert!(
                key.contains("server.listener.smtp.milter"),
                "{key}: {message}"
            );
            assert!(
                key.contains(key_part) || message.contains(key_part),
                "{key}: {message}"
            );
            assert_eq!(l, Some(line), "{key}: {message}");
        }
        // Cross-key checks after loading.
        let (key, line, _) = invalid(&format!(
            "{head}socket = \"inet:127.0.0.1:1\"\ncommand_timeout = \"0s\"\n"
        ));
        assert_eq!(
            (key.as_str(), line),
            ("server.listener.smtp.milter[0].command_timeout", Some(6))
        );
        let (key, line, message) = invalid(&format!(
            "{head}socket = \"inet:127.0.0.1:1\"\n{head}socket = \"inet:127.0.0.1:2\"\n"
        ));
        assert_eq!(
            (key.as_str(), line),
            ("server.listener.smtp.milter[1].name", Some(7)),
            "{message}"
        );
        let (key, line, _) = invalid(
            "[[server.listener.smtp.milter]]\nname = \"a b\"\nsocket = \"inet:127.0.0.1:1\"\n",
        );
        assert_eq!(
            (key.as_str(), line),
            ("server.listener.smtp.milter[0].name", Some(4))
        );
        // A required key missing.
        let (key, line, message) = invalid(head);
        assert!(
            key.contains("milter") && message.contains("socket"),
            "{key}: {message}"
        );
        assert!(line.is_some());
    }
}
