//! DNS answer handling under hostile or broken servers: the sans-IO
//! `parse_answer` (id and question checks, CNAME chains, negative answers, TTLs)
//! and the MX plan built from what it returns.

use sluice_dns::{
    parse_answer, plan_mx, Answer, DnsError, MxPlan, NegativeKind, QueryType, Record,
};

const NAMES: [&str; 4] = [
    "example.com",
    "mx.example.net",
    "_25._tcp.mx.example.com",
    "2.0.192.in-addr.arpa",
];
const TYPES: [QueryType; 6] = [
    QueryType::Mx,
    QueryType::A,
    QueryType::Aaaa,
    QueryType::Txt,
    QueryType::Ptr,
    QueryType::Tlsa,
];
/// `parse_answer` follows at most this many CNAMEs.
const MAX_CNAMES: usize = 16;

fn of_type(r: &Record, t: QueryType) -> bool {
    matches!(
        (r, t),
        (Record::Mx { .. }, QueryType::Mx)
            | (Record::A(..), QueryType::A)
            | (Record::Aaaa(..), QueryType::Aaaa)
            | (Record::Txt(..), QueryType::Txt)
            | (Record::Ptr(..), QueryType::Ptr)
            | (Record::Tlsa { .. }, QueryType::Tlsa)
    )
}

fn check_answer(a: &Answer, rtype: QueryType, wire: &[u8]) {
    // Header bits are reported as sent.
    assert_eq!(a.truncated, wire[2] & 0x02 != 0, "TC bit");
    assert_eq!(a.authentic_data, wire[3] & 0x20 != 0, "AD bit");
    let mut cnames = 0;
    let mut wanted = 0;
    for r in &a.records {
        assert!(r.ttl() <= i32::MAX as u32, "TTL above 2^31-1 kept: {r:?}");
        assert!(a.min_ttl <= r.ttl(), "min_ttl above a record's TTL");
        match r {
            Record::Cname(..) => {
                // The chain comes first, then the records at its end.
                assert_eq!(wanted, 0, "CNAME after the answer records");
                cnames += 1;
            }
            other => {
                assert!(of_type(other, rtype), "{other:?} in a {rtype} answer");
                wanted += 1;
            }
        }
        let _ = r.to_string();
    }
    assert!(cnames <= MAX_CNAMES, "{cnames} CNAMEs followed");
    match a.negative {
        Some(NegativeKind::NoData { ttl }) => {
            assert_eq!(wanted, 0, "NODATA with records");
            assert!(ttl <= i32::MAX as u32);
        }
        Some(NegativeKind::NxDomain { ttl }) => assert!(ttl <= i32::MAX as u32),
        None => {
            assert!(
                wanted > 0 || a.truncated,
                "no records, not negative, not truncated"
            );
            let min = a.records.iter().map(Record::ttl).min().unwrap_or(0);
            assert_eq!(a.min_ttl, min);
        }
    }
    if rtype == QueryType::Mx {
        check_plan(&a.records, wanted);
    }
}

fn check_plan(records: &[Record], mx_count: usize) {
    for seed in [0, 7] {
        match plan_mx("example.com", records, seed) {
            MxPlan::Implicit(domain) => {
                assert_eq!(mx_count, 0);
                assert_eq!(domain, "example.com");
            }
            MxPlan::NullMx => assert!(mx_count > 0),
            MxPlan::Hosts(hosts) => {
                assert!(!hosts.is_empty() && hosts.len() <= mx_count);
                for pair in hosts.windows(2) {
                    assert!(pair[0].0 <= pair[1].0, "MX hosts not by preference");
                }
                for (i, (_, h)) in hosts.iter().enumerate() {
                    assert!(!h.is_empty() && !h.ends_with('.'), "host {h:?}");
                    assert_eq!(*h, h.to_ascii_lowercase());
                    assert!(
                        hosts[..i].iter().all(|(_, o)| o != h),
                        "host {h} listed twice"
                    );
                }
            }
        }
    }
}

/// Fuzz target `dns_answer`. Input: a selector byte (low 2 bits: the query name,
/// next 3 bits: the record type, 0x20: answer for a different query id), then
/// the response as it came off the wire.
pub fn dns_answer(input: &[u8]) {
    let [sel, wire @ ..] = input else {
        return;
    };
    let name = NAMES[usize::from(sel & 3)];
    let rtype = TYPES[usize::from((sel >> 2) & 7) % TYPES.len()];
    let wire_id = match wire {
        [a, b, ..] => u16::from_be_bytes([*a, *b]),
        _ => 0,
    };
    let id = if sel & 0x20 != 0 {
        wire_id ^ 0x5a5a
    } else {
        wire_id
    };
    let result = parse_answer(id, name, rtype, wire);
    // Names compare case-insensitively; the result must not depend on case.
    let upper = parse_answer(id, &name.to_ascii_uppercase(), rtype, wire);
    assert_eq!(
        format!("{result:?}"),
        format!("{upper:?}"),
        "case changes the answer"
    );
    if wire.len() < 12 {
        assert!(matches!(result, Err(DnsError::Malformed(_))), "{result:?}");
        return;
    }
    if id != wire_id {
        assert!(
            matches!(result, Err(DnsError::IdMismatch { expected, got }) if expected == id && got == wire_id),
            "foreign id accepted: {result:?}"
        );
        return;
    }
    if wire[2] & 0x80 == 0 {
        assert!(
            matches!(result, Err(DnsError::Malformed(_))),
            "query taken as answer"
        );
        return;
    }
    match &result {
        Ok(answer) => check_answer(answer, rtype, wire),
        Err(e) => {
            let _ = e.to_string();
        }
    }
}
