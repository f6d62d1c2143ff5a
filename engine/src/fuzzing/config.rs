//! The configuration loader under arbitrary TOML text and `--set` strings:
//! loading is deterministic, a loaded configuration satisfies the cross-key
//! rules the relay relies on, and an error names a line inside the text.

use std::sync::Arc;

use crate::auth_guard::AuthGuard;
use crate::config::{Config, ConfigError, TlsMode};
use crate::smtp::server::SessionConfig;

/// Most `--set` arguments taken from one input.
const MAX_OVERRIDES: usize = 4;

/// Fuzz target `config_load`. Input: the file text, then up to four `--set`
/// arguments, each after a NUL byte. Invalid UTF-8 is replaced (the loader takes
/// a `&str`, as read from a file or the command line).
pub fn config_load(input: &[u8]) {
    let mut parts = input.split(|&b| b == 0);
    let text = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let overrides: Vec<String> = parts
        .take(MAX_OVERRIDES)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let first = Config::load("fuzz.toml", &text, &overrides);
    let again = Config::load("fuzz.toml", &text, &overrides);
    assert_eq!(
        format!("{first:?}"),
        format!("{again:?}"),
        "loading is not deterministic"
    );
    match first {
        Ok(config) => check_config(&config),
        Err(e) => check_error(&e, &text, overrides.is_empty()),
    }
}

fn check_config(c: &Config) {
    assert!(!c.server.listener.is_empty(), "no listener");
    assert!(c.server.cores <= 64);
    assert!(c.spool.max_batch >= 1);
    assert!(c.spool.map_size.0 >= 1 << 20);
    for (name, l) in &c.server.listener {
        assert!(!l.bind.is_empty(), "listener {name} binds nothing");
        assert!(l.max_line_length >= 512);
        assert!((1..=100_000).contains(&l.max_recipients));
        assert!(l.max_connections >= 1 && l.max_errors >= 1);
        assert!(!l.idle_timeout.0.is_zero() && !l.session_timeout.0.is_zero());
        if l.tls != TlsMode::None {
            assert!(l.tls_cert.is_some() && l.tls_key.is_some());
        }
    }
    // What the runtime builds from a loaded configuration must not fail.
    let relay = match c.relay_policy() {
        Ok(p) => Arc::new(p),
        Err(e) => panic!("loaded config with a bad relay policy: {e}"),
    };
    if let Err(e) = c.rule_set() {
        panic!("loaded config with bad rules: {e}");
    }
    for (name, l) in &c.server.listener {
        let guard = Arc::new(AuthGuard::new(&c.auth));
        let logins = match sluice_policy::sender_login::SenderLogins::new(&c.auth.sender_login) {
            Ok(l) => Arc::new(l),
            Err(e) => panic!("loaded config with a bad sender_login map: {e}"),
        };
        let s =
            SessionConfig::from_listener(name, l, "mx.test", relay.clone(), false, guard, &logins);
        assert_eq!(s.max_line_length, l.max_line_length);
    }
    let _ = c.delivery_config();
}

fn check_error(e: &ConfigError, text: &str, file_only: bool) {
    let shown = e.to_string();
    assert!(!shown.is_empty());
    let line = match e {
        ConfigError::Invalid { line, .. } | ConfigError::Syntax { line, .. } => *line,
        _ => None,
    };
    if let (Some(line), true) = (line, file_only) {
        let lines = text.bytes().filter(|&b| b == b'\n').count() + 1;
        assert!(
            (1..=lines).contains(&line),
            "error at line {line} of a {lines}-line text: {shown}"
        );
    }
}
