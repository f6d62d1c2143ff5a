//! Counters. Each core counts into its own `Stats` (no atomics, no locks per
//! message); a core merges what it counted into the shared totals when a reader
//! asks for a fresh view (a flush request) and once a second otherwise. Only the
//! session gauge (current and maximum concurrent sessions) is a shared atomic,
//! touched once per connection.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::faults::Stage;
use super::session::Received;

/// At most this many duplicated tokens are listed in the summary.
const DUPLICATES_LISTED: usize = 10_000;

#[derive(Default, Debug)]
pub struct Stats {
    pub connections: u64,
    pub messages: u64,
    pub bytes: u64,
    pub recipients: u64,
    pub bdat_messages: u64,
    pub tls_sessions: u64,
    pub max_messages_per_connection: u64,
    pub greylisted: u64,
    pub messages_without_token: u64,
    /// Negative replies by (stage, code).
    pub rejected: HashMap<(Stage, u16), u64>,
    /// Injected disconnects by stage.
    pub disconnects: HashMap<Stage, u64>,
    /// Accepted recipients by (lowercase) domain.
    pub domains: HashMap<String, u64>,
    /// Accepted messages by listen address (index into the listen list).
    pub listeners: Vec<u64>,
    /// Accepted messages per token.
    pub tokens: HashMap<Box<str>, u32>,
    pub first_message_ms: Option<u64>,
    pub last_message_ms: Option<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Stats {
    pub fn new(listeners: usize) -> Stats {
        Stats {
            listeners: vec![0; listeners],
            ..Stats::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.connections == 0
            && self.messages == 0
            && self.rejected.is_empty()
            && self.disconnects.is_empty()
            && self.tls_sessions == 0
            && self.greylisted == 0
            && self.max_messages_per_connection == 0
    }

    pub fn message(&mut self, m: &Received, listener: usize, track_tokens: bool) {
        self.messages += 1;
        self.bytes += m.bytes;
        self.recipients += m.rcpts.len() as u64;
        if m.bdat {
            self.bdat_messages += 1;
        }
        for r in &m.rcpts {
            let domain = r.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
            let domain: Cow<str> = if domain.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Owned(domain.to_ascii_lowercase())
            } else {
                Cow::Borrowed(domain)
            };
            if let Some(n) = self.domains.get_mut(&*domain) {
                *n += 1;
            } else {
                self.domains.insert(domain.into_owned(), 1);
            }
        }
        if let Some(n) = self.listeners.get_mut(listener) {
            *n += 1;
        }
        match &m.token {
            Some(t) if track_tokens => *self.tokens.entry(t.as_str().into()).or_insert(0) += 1,
            Some(_) => {}
            None => self.messages_without_token += 1,
        }
        let now = now_ms();
        self.first_message_ms.get_or_insert(now);
        self.last_message_ms = Some(now);
    }

    /// Adds another core's counts (and empties nothing: `other` is consumed).
    pub fn merge(&mut self, other: Stats) {
        self.connections += other.connections;
        self.messages += other.messages;
        self.bytes += other.bytes;
        self.recipients += other.recipients;
        self.bdat_messages += other.bdat_messages;
        self.tls_sessions += other.tls_sessions;
        self.greylisted += other.greylisted;
        self.messages_without_token += other.messages_without_token;
        self.max_messages_per_connection = self
            .max_messages_per_connection
            .max(other.max_messages_per_connection);
        for (k, v) in other.rejected {
            *self.rejected.entry(k).or_insert(0) += v;
        }
        for (k, v) in other.disconnects {
            *self.disconnects.entry(k).or_insert(0) += v;
        }
        for (k, v) in other.domains {
            *self.domains.entry(k).or_insert(0) += v;
        }
        if self.listeners.len() < other.listeners.len() {
            self.listeners.resize(other.listeners.len(), 0);
        }
        for (i, v) in other.listeners.into_iter().enumerate() {
            self.listeners[i] += v;
        }
        if self.tokens.is_empty() {
            self.tokens = other.tokens;
        } else {
            for (k, v) in other.tokens {
                *self.tokens.entry(k).or_insert(0) += v;
            }
        }
        self.first_message_ms = match (self.first_message_ms, other.first_message_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_message_ms = self.last_message_ms.max(other.last_message_ms);
    }

    /// Takes the counts out, leaving zeroes (the per-message-per-connection maximum
    /// is kept, since open connections still build on it).
    pub fn take(&mut self) -> Stats {
        let listeners = self.listeners.len();
        let max = self.max_messages_per_connection;
        let mut out = std::mem::replace(self, Stats::new(listeners));
        self.max_messages_per_connection = max;
        out.max_messages_per_connection = max;
        out
    }
}

/// What the sink reports besides the counters.
pub struct Info {
    pub listen: Vec<SocketAddr>,
    pub cores: usize,
    pub lmtp: bool,
    pub report_tokens: bool,
    pub track_tokens: bool,
}

/// State shared by the cores and the reporting threads.
pub struct Shared {
    pub info: Info,
    pub totals: Mutex<Stats>,
    pub flushed: Condvar,
    /// Raised by a reader that wants every core's counts merged.
    pub flush_request: AtomicU64,
    /// Per core: the last flush request it has merged.
    pub flush_done: Vec<AtomicU64>,
    /// Resets so far (changed only under the totals lock), and per core the
    /// last one it has seen, so a core drops its per-connection maximum once.
    pub resets: AtomicU64,
    pub resets_seen: Vec<AtomicU64>,
    pub sessions_current: AtomicU64,
    pub sessions_max: AtomicU64,
    pub started: Instant,
}

impl Shared {
    pub fn new(info: Info) -> Shared {
        let listeners = info.listen.len();
        let cores = info.cores;
        Shared {
            info,
            totals: Mutex::new(Stats::new(listeners)),
            flushed: Condvar::new(),
            flush_request: AtomicU64::new(0),
            flush_done: (0..cores).map(|_| AtomicU64::new(0)).collect(),
            resets: AtomicU64::new(0),
            resets_seen: (0..cores).map(|_| AtomicU64::new(0)).collect(),
            sessions_current: AtomicU64::new(0),
            sessions_max: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    pub fn session_opened(&self) {
        let now = self.sessions_current.fetch_add(1, Ordering::SeqCst) + 1;
        self.sessions_max.fetch_max(now, Ordering::SeqCst);
    }

    pub fn session_closed(&self) {
        self.sessions_current.fetch_sub(1, Ordering::SeqCst);
    }

    /// A core merges its counts; `request` is the flush request it answers.
    /// Returns true when the counters were reset since this core last merged: the
    /// core must then forget its per-connection maximum.
    pub fn merge_from_core(&self, core: usize, mut delta: Stats, request: u64) -> bool {
        let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        let resets = self.resets.load(Ordering::SeqCst);
        let reset = self.resets_seen[core].swap(resets, Ordering::SeqCst) != resets;
        if reset {
            delta.max_messages_per_connection = 0;
        }
        totals.merge(delta);
        self.flush_done[core].fetch_max(request, Ordering::SeqCst);
        drop(totals);
        self.flushed.notify_all();
        reset
    }

    /// Asks every core to merge and waits (bounded) until they all have; then
    /// runs `f` on the totals.
    pub fn with_fresh_totals<T>(&self, f: impl FnOnce(&mut Stats) -> T) -> T {
        let request = self.flush_request.fetch_add(1, Ordering::SeqCst) + 1;
        let guard = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        let (mut guard, _) = self
            .flushed
            .wait_timeout_while(guard, Duration::from_secs(5), |_| {
                self.flush_done
                    .iter()
                    .any(|d| d.load(Ordering::SeqCst) < request)
            })
            .unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    pub fn summary(&self) -> Value {
        let (cur, max) = (
            self.sessions_current.load(Ordering::SeqCst),
            self.sessions_max.load(Ordering::SeqCst),
        );
        self.with_fresh_totals(|t| self.to_json(t, cur, max.max(cur)))
    }

    /// "token count" lines, sorted by token.
    pub fn tokens_text(&self) -> String {
        self.with_fresh_totals(|t| {
            let sorted: BTreeMap<&str, u32> = t.tokens.iter().map(|(k, v)| (&**k, *v)).collect();
            let mut out = String::with_capacity(sorted.len() * 24);
            for (k, v) in sorted {
                out.push_str(k);
                out.push(' ');
                out.push_str(&v.to_string());
                out.push('\n');
            }
            out
        })
    }

    /// Zeroes the counters (the session gauge's current value stays).
    pub fn reset(&self) {
        self.with_fresh_totals(|t| {
            *t = Stats::new(self.info.listen.len());
            self.resets.fetch_add(1, Ordering::SeqCst);
        });
        self.sessions_max.store(
            self.sessions_current.load(Ordering::SeqCst),
            Ordering::SeqCst,
        );
    }

    fn to_json(&self, t: &Stats, sessions_current: u64, sessions_max: u64) -> Value {
        let mut rcpt = Map::new();
        let mut data = Map::new();
        let mut rejected: Vec<_> = t.rejected.iter().collect();
        rejected.sort();
        for ((stage, code), n) in rejected {
            let map = if *stage == Stage::Rcpt {
                &mut rcpt
            } else {
                &mut data
            };
            map.insert(code.to_string(), json!(n));
        }
        let disconnects = json!({
            "rcpt": t.disconnects.get(&Stage::Rcpt).copied().unwrap_or(0),
            "data": t.disconnects.get(&Stage::Data).copied().unwrap_or(0),
            "mid_data": t.disconnects.get(&Stage::MidData).copied().unwrap_or(0),
        });
        let domains: BTreeMap<&String, &u64> = t.domains.iter().collect();
        let listeners: Map<String, Value> = self
            .info
            .listen
            .iter()
            .zip(&t.listeners)
            .map(|(a, n)| (a.to_string(), json!(n)))
            .collect();
        let mut duplicated = 0u64;
        let mut dups = BTreeMap::new();
        for (k, v) in &t.tokens {
            if *v > 1 {
                duplicated += 1;
                if dups.len() < DUPLICATES_LISTED {
                    dups.insert(&**k, *v);
                }
            }
        }
        let mut out = json!({
            "uptime_secs": self.started.elapsed().as_secs_f64(),
            "cores": self.info.cores,
            "lmtp": self.info.lmtp,
            "listen": self.info.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "connections": t.connections,
            "sessions_current": sessions_current,
            "sessions_max": sessions_max,
            "messages": t.messages,
            "bytes": t.bytes,
            "recipients": t.recipients,
            "bdat_messages": t.bdat_messages,
            "tls_sessions": t.tls_sessions,
            "max_messages_per_connection": t.max_messages_per_connection,
            "rcpt_rejected": rcpt,
            "data_rejected": data,
            "greylisted": t.greylisted,
            "disconnects": disconnects,
            "domains": domains,
            "listeners": listeners,
            "tokens_tracked": self.info.track_tokens,
            "tokens_unique": t.tokens.len(),
            "tokens_duplicated": duplicated,
            "duplicates": dups,
            "messages_without_token": t.messages_without_token,
            "first_message_unix_ms": t.first_message_ms,
            "last_message_unix_ms": t.last_message_ms,
        });
        if self.info.report_tokens {
            let tokens: BTreeMap<&str, u32> = t.tokens.iter().map(|(k, v)| (&**k, *v)).collect();
            out["tokens"] = json!(tokens);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(token: Option<&str>, rcpts: &[&str]) -> Received {
        Received {
            from: "a@x".into(),
            rcpts: rcpts.iter().map(|s| s.to_string()).collect(),
            bytes: 10,
            token: token.map(str::to_string),
            body: Vec::new(),
            bdat: false,
        }
    }

    #[test]
    fn merge_and_report() {
        let shared = Shared::new(Info {
            listen: vec![
                "127.0.0.2:25".parse().unwrap(),
                "127.0.0.3:25".parse().unwrap(),
            ],
            cores: 2,
            lmtp: false,
            report_tokens: true,
            track_tokens: true,
        });
        let mut a = Stats::new(2);
        a.message(
            &received(Some("t1"), &["u@A.example", "v@b.example"]),
            0,
            true,
        );
        a.max_messages_per_connection = 3;
        let mut b = Stats::new(2);
        b.message(&received(Some("t1"), &["u@a.example"]), 1, true);
        b.message(&received(None, &["u@a.example"]), 1, true);
        b.rejected.insert((Stage::Rcpt, 451), 2);
        b.max_messages_per_connection = 2;
        shared.merge_from_core(0, a.take(), 1);
        assert_eq!(a.max_messages_per_connection, 3);
        assert_eq!(a.messages, 0);
        shared.merge_from_core(1, b.take(), 1);
        shared.session_opened();
        shared.session_opened();
        shared.session_closed();
        let j = shared.summary();
        assert_eq!(j["messages"], 3);
        assert_eq!(j["recipients"], 4);
        assert_eq!(j["bytes"], 30);
        assert_eq!(j["domains"]["a.example"], 3);
        assert_eq!(j["listeners"]["127.0.0.3:25"], 2);
        assert_eq!(j["tokens"]["t1"], 2);
        assert_eq!(j["tokens_duplicated"], 1);
        assert_eq!(j["duplicates"]["t1"], 2);
        assert_eq!(j["messages_without_token"], 1);
        assert_eq!(j["rcpt_rejected"]["451"], 2);
        assert_eq!(j["max_messages_per_connection"], 3);
        assert_eq!(
            (j["sessions_current"].clone(), j["sessions_max"].clone()),
            (json!(1), json!(2))
        );
        // Pretend both cores answered the next flush request.
        shared.merge_from_core(0, Stats::new(2), 2);
        shared.merge_from_core(1, Stats::new(2), 2);
        assert_eq!(shared.tokens_text(), "t1 2\n");
    }
}
