//! Fault injection for the sink: configured shares of negative replies or
//! disconnects at RCPT, at end of data and in the middle of DATA, optionally limited
//! to a recipient domain or a recipient prefix; and greylisting.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where a fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// The reply to RCPT TO.
    Rcpt,
    /// The reply after the end of the message data (per recipient in LMTP).
    Data,
    /// While message data is arriving (disconnect only).
    MidData,
}

/// What an injected fault does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultAction {
    /// Reply with this code, enhanced status code and text. 421 also closes.
    Reply {
        code: u16,
        esc: String,
        text: String,
    },
    /// Close the connection without a reply.
    Disconnect,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub stage: Stage,
    pub action: FaultAction,
    /// Probability in [0, 1].
    pub share: f64,
    /// Lowercase recipient domain this fault is limited to.
    pub domain: Option<String>,
    /// Lowercase prefix of the recipient address this fault is limited to.
    pub prefix: Option<String>,
}

impl Fault {
    /// Parses `at=rcpt,code=451,share=20%[,domain=D][,prefix=P][,esc=4.7.1][,text=…]`
    /// or `at=data,disconnect,share=0.1` or `at=mid-data,share=5%`.
    pub fn parse<'a>(spec: &'a str) -> Result<Fault, String> {
        let mut stage = None;
        let mut code: Option<u16> = None;
        let mut disconnect = false;
        let mut share = None;
        let mut domain = None;
        let mut prefix = None;
        let mut esc = None;
        let mut text = None;
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (part, None),
            };
            let need = |v: Option<&'a str>| {
                v.ok_or_else(|| format!("fault {spec:?}: {key} needs a value"))
            };
            match key {
                "at" | "stage" => {
                    stage = Some(match need(value)? {
                        "rcpt" => Stage::Rcpt,
                        "data" | "eod" | "end-of-data" => Stage::Data,
                        "mid-data" | "mid_data" => Stage::MidData,
                        other => {
                            return Err(format!(
                                "fault {spec:?}: at={other} (expected rcpt, data or mid-data)"
                            ))
                        }
                    })
                }
                "code" => {
                    let v = need(value)?;
                    let c: u16 = v
                        .parse()
                        .map_err(|_| format!("fault {spec:?}: code={v} is not a number"))?;
                    if !(400..600).contains(&c) {
                        return Err(format!("fault {spec:?}: code={c} must be 4xx or 5xx"));
                    }
                    code = Some(c);
                }
                "disconnect" => disconnect = true,
                "share" => {
                    share = Some(
                        parse_share(need(value)?).map_err(|e| format!("fault {spec:?}: {e}"))?,
                    )
                }
                "domain" => domain = Some(need(value)?.to_ascii_lowercase()),
                "prefix" => prefix = Some(need(value)?.to_ascii_lowercase()),
                "esc" => esc = Some(need(value)?.to_string()),
                "text" => text = Some(need(value)?.to_string()),
                other => return Err(format!("fault {spec:?}: unknown key {other:?}")),
            }
        }
        let stage =
            stage.ok_or_else(|| format!("fault {spec:?}: at=rcpt|data|mid-data is required"))?;
        let share = share.ok_or_else(|| format!("fault {spec:?}: share= is required"))?;
        let action = match (stage, code, disconnect) {
            (Stage::MidData, None, _) => FaultAction::Disconnect,
            (Stage::MidData, Some(_), _) => {
                return Err(format!(
                    "fault {spec:?}: at=mid-data only disconnects (no code)"
                ))
            }
            (_, Some(_), true) => {
                return Err(format!(
                    "fault {spec:?}: code and disconnect exclude each other"
                ))
            }
            (_, None, true) => FaultAction::Disconnect,
            (_, None, false) => {
                return Err(format!("fault {spec:?}: code= or disconnect is required"))
            }
            (_, Some(code), false) => {
                let temp = code < 500;
                FaultAction::Reply {
                    code,
                    esc: esc.unwrap_or_else(|| if temp { "4.3.0" } else { "5.7.1" }.to_string()),
                    text: text.unwrap_or_else(|| {
                        if temp {
                            "Injected temporary failure"
                        } else {
                            "Injected permanent failure"
                        }
                        .to_string()
                    }),
                }
            }
        };
        Ok(Fault {
            stage,
            action,
            share,
            domain,
            prefix,
        })
    }

    /// Whether this fault applies to a recipient address.
    pub fn matches(&self, rcpt: &str) -> bool {
        if let Some(d) = &self.domain {
            let dom = rcpt.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
            if !dom.eq_ignore_ascii_case(d) {
                return false;
            }
        }
        if let Some(p) = &self.prefix {
            if rcpt.len() < p.len()
                || !rcpt.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            {
                return false;
            }
        }
        true
    }
}

/// "20%", "0.2" or "1" → a probability.
pub fn parse_share(v: &str) -> Result<f64, String> {
    let (num, scale) = match v.strip_suffix('%') {
        Some(n) => (n, 100.0),
        None => (v, 1.0),
    };
    let x: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("share={v} is not a number"))?;
    let x = x / scale;
    if !(0.0..=1.0).contains(&x) {
        return Err(format!(
            "share={v} must be between 0 and 1 (or 0% and 100%)"
        ));
    }
    Ok(x)
}

/// All configured faults. For one decision, one random draw is compared with the
/// running sum of the shares of the faults that match, in the order given, so
/// disjoint faults at the same stage (20% 451 and 10% 550) land exactly.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub list: Vec<Fault>,
}

impl Faults {
    pub fn any(&self, stage: Stage) -> bool {
        self.list.iter().any(|f| f.stage == stage)
    }

    /// Picks the fault (if any) for an event at `stage` concerning these recipients
    /// (a fault matches when it matches any of them).
    pub fn pick<S: AsRef<str>>(
        &self,
        stage: Stage,
        rcpts: &[S],
        rng: &mut Rng,
    ) -> Option<&FaultAction> {
        if !self.any(stage) {
            return None;
        }
        let draw = rng.next_f64();
        let mut acc = 0.0;
        for f in self.list.iter().filter(|f| f.stage == stage) {
            if rcpts.iter().any(|r| f.matches(r.as_ref())) {
                acc += f.share;
                if draw < acc {
                    return Some(&f.action);
                }
            }
        }
        None
    }
}

/// A small, fast PRNG (xorshift64* seeded through splitmix64). Not cryptographic.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Greylisting shared by all cores: the first attempt for a (sender, recipient)
/// pair is refused with 451 4.7.1; attempts at least `delay` later are accepted.
/// Sharded so cores rarely meet on a lock; only touched at RCPT when enabled.
pub struct Greylist {
    delay: Duration,
    shards: Vec<Mutex<HashMap<u64, Instant>>>,
}

impl Greylist {
    pub fn new(delay: Duration) -> Greylist {
        Greylist {
            delay,
            shards: (0..64).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// True when the pair may pass now.
    pub fn check(&self, sender: &str, rcpt: &str, now: Instant) -> bool {
        let mut h = DefaultHasher::new();
        sender.to_ascii_lowercase().hash(&mut h);
        rcpt.to_ascii_lowercase().hash(&mut h);
        let key = h.finish();
        let shard = &self.shards[(key % self.shards.len() as u64) as usize];
        let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&key) {
            None => {
                map.insert(key, now);
                false
            }
            Some(first) => now.duration_since(*first) >= self.delay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let f = Fault::parse("at=rcpt,code=451,share=20%,domain=Example.COM").unwrap();
        assert_eq!(f.stage, Stage::Rcpt);
        assert!((f.share - 0.2).abs() < 1e-9);
        assert_eq!(f.domain.as_deref(), Some("example.com"));
        assert!(
            matches!(f.action, FaultAction::Reply { code: 451, ref esc, .. } if esc == "4.3.0")
        );
        let f = Fault::parse("at=data,code=554,share=0.1,prefix=bad-,esc=5.6.0,text=no thanks")
            .unwrap();
        assert_eq!(f.stage, Stage::Data);
        assert_eq!(f.prefix.as_deref(), Some("bad-"));
        assert!(
            matches!(f.action, FaultAction::Reply { code: 554, ref text, .. } if text == "no thanks")
        );
        let f = Fault::parse("at=mid-data,share=1").unwrap();
        assert_eq!(f.action, FaultAction::Disconnect);
        let f = Fault::parse("at=data,disconnect,share=50%").unwrap();
        assert_eq!(f.action, FaultAction::Disconnect);
        for bad in [
            "at=rcpt,share=0.1",
            "at=rcpt,code=251,share=0.1",
            "at=rcpt,code=451",
            "at=helo,code=451,share=1",
            "at=rcpt,code=451,share=150%",
            "at=mid-data,code=451,share=1",
            "at=rcpt,code=451,share=1,colour=red",
        ] {
            assert!(Fault::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn matching_by_domain_and_prefix() {
        let f = Fault::parse("at=rcpt,code=550,share=1,domain=a.example,prefix=x").unwrap();
        assert!(f.matches("xy@A.Example"));
        assert!(!f.matches("yx@a.example"));
        assert!(!f.matches("xy@b.example"));
    }

    #[test]
    fn shares_add_up_in_order() {
        let faults = Faults {
            list: vec![
                Fault::parse("at=rcpt,code=451,share=20%").unwrap(),
                Fault::parse("at=rcpt,code=550,share=10%").unwrap(),
                Fault::parse("at=rcpt,code=552,share=100%,domain=never.example").unwrap(),
            ],
        };
        let mut rng = Rng::new(7);
        let (mut t, mut p, mut ok) = (0, 0, 0);
        for _ in 0..100_000 {
            match faults.pick(Stage::Rcpt, &["a@b.example"], &mut rng) {
                Some(FaultAction::Reply { code: 451, .. }) => t += 1,
                Some(FaultAction::Reply { code: 550, .. }) => p += 1,
                None => ok += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!((19_000..21_000).contains(&t), "{t}");
        assert!((9_000..11_000).contains(&p), "{p}");
        assert!((69_000..71_000).contains(&ok), "{ok}");
        assert!(faults
            .pick(Stage::Data, &["a@b.example"], &mut rng)
            .is_none());
    }

    #[test]
    fn greylist_first_attempt_only() {
        let g = Greylist::new(Duration::ZERO);
        let now = Instant::now();
        assert!(!g.check("a@x", "b@y", now));
        assert!(g.check("A@X", "b@y", now));
        assert!(!g.check("a@x", "c@y", now));
        let g = Greylist::new(Duration::from_secs(60));
        assert!(!g.check("a@x", "b@y", now));
        assert!(!g.check("a@x", "b@y", now + Duration::from_secs(10)));
        assert!(g.check("a@x", "b@y", now + Duration::from_secs(61)));
    }
}
