use crate::Record;

/// Where to deliver mail for a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxPlan {
    /// MX hosts in the order to try them, with their preference.
    Hosts(Vec<(u16, String)>),
    /// No MX records: deliver to the domain's own address records (RFC 5321 §5.1).
    Implicit(String),
    /// RFC 7505 null MX: the domain accepts no mail; bounce at once.
    NullMx,
}

/// Order MX records by preference (RFC 5321 §5.1), shuffling hosts of equal
/// preference so load spreads across them. The shuffle depends only on
/// `shuffle_seed` and the set of hosts, never on the order the resolver returned.
///
/// Exchanges are lowercased without a trailing dot; a host listed twice keeps its
/// best preference. A "." exchange (null MX) is unusable: if nothing else is
/// listed the plan is [`MxPlan::NullMx`]; a misconfigured domain that lists both
/// (RFC 7505 §3 forbids it) gets its real hosts. Dropping our own host names
/// and anything less preferred (§5.1) is the caller's job; it knows them.
pub fn plan_mx(domain: &str, records: &[Record], shuffle_seed: u64) -> MxPlan {
    let mut saw_mx = false;
    let mut hosts: Vec<(u16, String)> = Vec::new();
    for record in records {
        let Record::Mx {
            preference,
            exchange,
            ..
        } = record
        else {
            continue;
        };
        saw_mx = true;
        let name = exchange.trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() {
            continue;
        }
        match hosts.iter_mut().find(|(_, h)| *h == name) {
            Some(existing) => existing.0 = existing.0.min(*preference),
            None => hosts.push((*preference, name)),
        }
    }
    if !saw_mx {
        return MxPlan::Implicit(domain.trim_end_matches('.').to_string());
    }
    if hosts.is_empty() {
        return MxPlan::NullMx;
    }
    // Canonical order first, so the shuffle below is independent of input order.
    hosts.sort_unstable();
    let mut rng = SplitMix64(shuffle_seed);
    let mut start = 0;
    while start < hosts.len() {
        let pref = hosts[start].0;
        let end = start + hosts[start..].iter().take_while(|h| h.0 == pref).count();
        shuffle(&mut hosts[start..end], &mut rng);
        start = end;
    }
    MxPlan::Hosts(hosts)
}

/// Fisher–Yates. Modulo bias is irrelevant for a handful of MX hosts.
fn shuffle<T>(items: &mut [T], rng: &mut SplitMix64) {
    for i in (1..items.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// Tiny deterministic generator: the caller supplies the seed, keeping this sans-IO
/// and the tests reproducible.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn mx(preference: u16, exchange: &str) -> Record {
        Record::Mx {
            preference,
            exchange: exchange.to_string(),
            ttl: 300,
        }
    }

    fn hosts(plan: MxPlan) -> Vec<(u16, String)> {
        match plan {
            MxPlan::Hosts(h) => h,
            other => panic!("expected hosts, got {other:?}"),
        }
    }

    #[test]
    fn unequal_preferences_sorted_ascending() {
        let recs = [
            mx(30, "c.example"),
            mx(10, "a.example"),
            mx(20, "b.example"),
        ];
        let plan = hosts(plan_mx("example", &recs, 7));
        assert_eq!(
            plan,
            vec![
                (10, "a.example".to_string()),
                (20, "b.example".to_string()),
                (30, "c.example".to_string())
            ]
        );
    }

    #[test]
    fn equal_preferences_shuffled_within_group_only() {
        let recs = [
            mx(20, "backup.example"),
            mx(10, "a.example"),
            mx(10, "b.example"),
            mx(10, "c.example"),
            mx(10, "d.example"),
        ];
        let mut first_seen = HashSet::new();
        let mut orders = HashSet::new();
        for seed in 0..200 {
            let plan = hosts(plan_mx("example", &recs, seed));
            assert_eq!(plan.len(), 5);
            assert!(plan[..4].iter().all(|h| h.0 == 10));
            assert_eq!(plan[4], (20, "backup.example".to_string()));
            first_seen.insert(plan[0].1.clone());
            orders.insert(plan);
        }
        // Every equal host gets to be first, and many orders occur.
        assert_eq!(first_seen.len(), 4);
        assert!(orders.len() > 10, "{}", orders.len());
    }

    #[test]
    fn shuffle_is_deterministic_and_input_order_independent() {
        let a = [
            mx(10, "x.example"),
            mx(10, "y.example"),
            mx(10, "z.example"),
        ];
        let b = [
            mx(10, "z.example"),
            mx(10, "x.example"),
            mx(10, "y.example"),
        ];
        for seed in [0, 1, 42, u64::MAX] {
            assert_eq!(plan_mx("d", &a, seed), plan_mx("d", &a, seed));
            assert_eq!(plan_mx("d", &a, seed), plan_mx("d", &b, seed));
        }
    }

    #[test]
    fn names_normalised_and_duplicates_merged() {
        let recs = [
            mx(20, "MX.Example.COM."),
            mx(10, "mx.example.com"),
            mx(30, "other.example"),
        ];
        let plan = hosts(plan_mx("example.com", &recs, 1));
        assert_eq!(
            plan,
            vec![
                (10, "mx.example.com".to_string()),
                (30, "other.example".to_string())
            ]
        );
    }

    #[test]
    fn null_mx() {
        assert_eq!(plan_mx("example", &[mx(0, ".")], 1), MxPlan::NullMx);
        assert_eq!(plan_mx("example", &[mx(0, "")], 1), MxPlan::NullMx);
        // A null MX mixed with real hosts is misconfigured; use the real ones.
        let mixed = hosts(plan_mx("example", &[mx(0, "."), mx(10, "mx.example")], 1));
        assert_eq!(mixed, vec![(10, "mx.example".to_string())]);
    }

    #[test]
    fn implicit_mx_when_no_mx_records() {
        assert_eq!(
            plan_mx("Example.org.", &[], 1),
            MxPlan::Implicit("Example.org".to_string())
        );
        // Other record types (e.g. the CNAME of the chain) do not count as MX.
        let recs = [Record::Cname("alias.example".into(), 60)];
        assert_eq!(
            plan_mx("example.org", &recs, 1),
            MxPlan::Implicit("example.org".to_string())
        );
    }
}
