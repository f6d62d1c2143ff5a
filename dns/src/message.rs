use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use crate::{Answer, DnsError, NegativeKind, QueryType, Record};

/// Advertised UDP payload size: the DNS Flag Day 2020 value, small enough to avoid
/// IP fragmentation on common paths.
pub const EDNS_PAYLOAD: u16 = 1232;

/// Longest CNAME chain followed inside one answer; real chains are 1–3 long.
const MAX_CNAME_CHAIN: usize = 16;

impl QueryType {
    fn record_type(self) -> RecordType {
        match self {
            QueryType::Mx => RecordType::MX,
            QueryType::A => RecordType::A,
            QueryType::Aaaa => RecordType::AAAA,
            QueryType::Txt => RecordType::TXT,
            QueryType::Ptr => RecordType::PTR,
            QueryType::Tlsa => RecordType::TLSA,
        }
    }
}

/// Wire bytes of a recursive query for `name`/`rtype` with EDNS0.
///
/// AD is set in the query so a validating resolver reports whether the answer was
/// DNSSEC-validated (RFC 6840 §5.7); DANE depends on that bit.
pub fn build_query(id: u16, name: &str, rtype: QueryType) -> Result<Vec<u8>, DnsError> {
    let qname = to_name(name)?;
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD).set_version(0);
    let mut message = Message::new();
    message
        .set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .set_authentic_data(true)
        .add_query(Query::query(qname, rtype.record_type()))
        .set_edns(edns);
    message
        .to_vec()
        .map_err(|e| DnsError::Encode(e.to_string()))
}

/// Interpret the response to a query made with [`build_query`].
///
/// Only a response with our id and our question (name compared case-insensitively)
/// is accepted. Records are taken from the answer section along the CNAME chain that
/// starts at the question name.
pub fn parse_answer(
    query_id: u16,
    name: &str,
    rtype: QueryType,
    wire: &[u8],
) -> Result<Answer, DnsError> {
    let qname = to_name(name)?;

    // Header first: a foreign id is reported as such even when the rest is garbage,
    // and a truncated UDP answer that does not parse is still worth a TCP retry.
    let header =
        Header::read(&mut BinDecoder::new(wire)).map_err(|e| DnsError::Malformed(e.to_string()))?;
    if header.id() != query_id {
        return Err(DnsError::IdMismatch {
            expected: query_id,
            got: header.id(),
        });
    }
    if header.message_type() != MessageType::Response {
        return Err(DnsError::Malformed("not a response".into()));
    }
    let message = match Message::from_vec(wire) {
        Ok(m) => m,
        Err(_) if header.truncated() => return Ok(truncated_only(&header)),
        Err(e) => return Err(DnsError::Malformed(e.to_string())),
    };
    if message.op_code() != OpCode::Query {
        return Err(DnsError::Malformed(format!(
            "unexpected opcode {:?}",
            message.op_code()
        )));
    }

    let rcode = message.response_code();
    let rcode_ok = matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain);
    match message.queries() {
        [q] => {
            if q.name() != &qname
                || q.query_type() != rtype.record_type()
                || q.query_class() != DNSClass::IN
            {
                return Err(DnsError::QuestionMismatch);
            }
        }
        // Error replies (notably FORMERR) and some truncated replies omit the question.
        [] if !rcode_ok => return Err(DnsError::ServerFailure(rcode)),
        [] if message.truncated() => return Ok(truncated_only(message.header())),
        _ => return Err(DnsError::QuestionMismatch),
    }
    if !rcode_ok {
        return Err(DnsError::ServerFailure(rcode));
    }

    // Follow the CNAME chain from the question name.
    let mut records = Vec::new();
    let mut owner = qname;
    let mut seen = vec![owner.clone()];
    while let Some((target, ttl)) = cname_of(&message, &owner) {
        if seen.contains(&target) {
            return Err(DnsError::CnameLoop(name_string(&target)));
        }
        if seen.len() > MAX_CNAME_CHAIN {
            return Err(DnsError::CnameChainTooLong);
        }
        records.push(Record::Cname(name_string(&target), clamp_ttl(ttl)));
        seen.push(target.clone());
        owner = target;
    }
    let owner = &owner;

    let want = rtype.record_type();
    let mut found = false;
    for r in message.answers() {
        if r.record_type() != want || r.name() != owner {
            continue;
        }
        if let Some(rec) = convert(r.data(), clamp_ttl(r.ttl())) {
            records.push(rec);
            found = true;
        }
    }

    let negative = if rcode == ResponseCode::NXDomain {
        Some(NegativeKind::NxDomain {
            ttl: negative_ttl(&message, owner),
        })
    } else if !found && !message.truncated() {
        // A truncated reply may just have lost its records: not proof of NODATA.
        Some(NegativeKind::NoData {
            ttl: negative_ttl(&message, owner),
        })
    } else {
        None
    };

    let record_min = records.iter().map(Record::ttl).min();
    let neg_ttl = negative.map(|n| match n {
        NegativeKind::NxDomain { ttl } | NegativeKind::NoData { ttl } => ttl,
    });
    let min_ttl = match (record_min, neg_ttl) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => 0,
    };

    Ok(Answer {
        records,
        truncated: message.truncated(),
        authentic_data: message.authentic_data(),
        negative,
        min_ttl,
    })
}

fn cname_of(message: &Message, owner: &Name) -> Option<(Name, u32)> {
    message.answers().iter().find_map(|r| match r.data() {
        RData::CNAME(target) if r.name() == owner => Some((target.0.clone(), r.ttl())),
        _ => None,
    })
}

fn truncated_only(header: &Header) -> Answer {
    Answer {
        records: Vec::new(),
        truncated: true,
        authentic_data: header.authentic_data(),
        negative: None,
        min_ttl: 0,
    }
}

/// RFC 2308 §5: the lower of the SOA record's TTL and its MINIMUM field. Only an SOA
/// for a zone enclosing the name counts; without one the answer is not cached.
fn negative_ttl(message: &Message, owner: &Name) -> u32 {
    message
        .name_servers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::SOA(soa) if r.name().zone_of(owner) => {
                Some(clamp_ttl(r.ttl()).min(clamp_ttl(soa.minimum())))
            }
            _ => None,
        })
        .min()
        .unwrap_or(0)
}

/// RFC 2181 §8: a TTL with the top bit set is treated as zero.
fn clamp_ttl(ttl: u32) -> u32 {
    if ttl > i32::MAX as u32 {
        0
    } else {
        ttl
    }
}

fn convert(data: &RData, ttl: u32) -> Option<Record> {
    Some(match data {
        RData::MX(mx) => Record::Mx {
            preference: mx.preference(),
            exchange: name_string(mx.exchange()),
            ttl,
        },
        RData::A(a) => Record::A(a.0, ttl),
        RData::AAAA(a) => Record::Aaaa(a.0, ttl),
        RData::TXT(txt) => {
            let joined: Vec<u8> = txt
                .txt_data()
                .iter()
                .flat_map(|s| s.iter().copied())
                .collect();
            // SPF/DKIM/DMARC are ASCII; anything else is not ours to interpret.
            Record::Txt(String::from_utf8_lossy(&joined).into_owned(), ttl)
        }
        RData::PTR(ptr) => Record::Ptr(name_string(&ptr.0), ttl),
        RData::TLSA(tlsa) => Record::Tlsa {
            usage: u8::from(tlsa.cert_usage()),
            selector: u8::from(tlsa.selector()),
            matching: u8::from(tlsa.matching()),
            data: tlsa.cert_data().to_vec(),
            ttl,
        },
        _ => return None,
    })
}

/// Presentation form without the trailing dot; the root is ".".
fn name_string(name: &Name) -> String {
    if name.is_root() {
        return ".".to_string();
    }
    let mut s = name.to_ascii();
    if name.is_fqdn() && s.ends_with('.') {
        s.pop();
    }
    s
}

fn to_name(name: &str) -> Result<Name, DnsError> {
    let bad = |reason: String| DnsError::InvalidName {
        name: name.to_string(),
        reason,
    };
    let trimmed = name.trim();
    if trimmed.is_empty() {
        return Err(bad("empty".into()));
    }
    // IDNA only for non-ASCII input: ASCII names keep underscores ("_25._tcp…").
    let parsed = if trimmed.is_ascii() {
        Name::from_ascii(trimmed)
    } else {
        Name::from_utf8(trimmed)
    };
    let mut qname = parsed.map_err(|e| bad(e.to_string()))?;
    qname.set_fqdn(true);
    Ok(qname)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, PTR, SOA, TLSA, TXT};
    use hickory_proto::rr::Record as WireRecord;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn n(s: &str) -> Name {
        Name::from_ascii(s).expect("test name")
    }

    fn response(id: u16, qname: &str, rtype: RecordType) -> Message {
        let mut m = Message::new();
        m.set_id(id)
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .set_recursion_available(true)
            .add_query(Query::query(n(qname), rtype));
        m
    }

    fn rec(name: &str, ttl: u32, data: RData) -> WireRecord {
        WireRecord::from_rdata(n(name), ttl, data)
    }

    fn soa(zone: &str, ttl: u32, minimum: u32) -> WireRecord {
        let data = SOA::new(
            n(&format!("ns1.{zone}")),
            n(&format!("hostmaster.{zone}")),
            2024010101,
            3600,
            600,
            86400,
            minimum,
        );
        rec(zone, ttl, RData::SOA(data))
    }

    fn wire(m: &Message) -> Vec<u8> {
        m.to_vec().expect("encode test message")
    }

    fn mx_answer() -> Message {
        let mut m = response(0x1234, "example.com.", RecordType::MX);
        m.add_answer(rec(
            "example.com.",
            3600,
            RData::MX(MX::new(10, n("mx1.example.com."))),
        ))
        .add_answer(rec(
            "example.com.",
            300,
            RData::MX(MX::new(20, n("MX2.example.net."))),
        ))
        // Unrelated owner: must be dropped.
        .add_answer(rec(
            "evil.example.",
            9999,
            RData::MX(MX::new(0, n("attacker.example."))),
        ))
        .add_additional(rec(
            "mx1.example.com.",
            3600,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
        m
    }

    #[test]
    fn query_bytes_roundtrip() {
        let bytes = build_query(0xbeef, "Example.COM", QueryType::Mx).expect("query");
        let m = Message::from_vec(&bytes).expect("parse our query");
        assert_eq!(m.id(), 0xbeef);
        assert_eq!(m.message_type(), MessageType::Query);
        assert!(m.recursion_desired());
        assert!(m.authentic_data());
        assert_eq!(m.queries().len(), 1);
        assert_eq!(m.queries()[0].name(), &n("example.com."));
        assert_eq!(m.queries()[0].query_type(), RecordType::MX);
        assert_eq!(m.queries()[0].query_class(), DNSClass::IN);
        let edns = m.extensions().as_ref().expect("EDNS present");
        assert_eq!(edns.max_payload(), 1232);
        assert_eq!(edns.version(), 0);
    }

    #[test]
    fn query_types_map() {
        for (qt, rt) in [
            (QueryType::Mx, RecordType::MX),
            (QueryType::A, RecordType::A),
            (QueryType::Aaaa, RecordType::AAAA),
            (QueryType::Txt, RecordType::TXT),
            (QueryType::Ptr, RecordType::PTR),
            (QueryType::Tlsa, RecordType::TLSA),
        ] {
            let bytes = build_query(1, "_25._tcp.mx.example.", qt).expect("query");
            let m = Message::from_vec(&bytes).expect("parse");
            assert_eq!(m.queries()[0].query_type(), rt);
        }
    }

    #[test]
    fn query_names_validated() {
        let long_label = format!("{}.example", "a".repeat(64));
        for bad in ["", "  ", long_label.as_str(), "a..b"] {
            match build_query(1, bad, QueryType::A) {
                Err(DnsError::InvalidName { name, .. }) => assert_eq!(name, bad),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
        // IDN is sent as A-labels.
        let bytes = build_query(1, "bücher.example", QueryType::Mx).expect("idn");
        let m = Message::from_vec(&bytes).expect("parse");
        assert_eq!(m.queries()[0].name(), &n("xn--bcher-kva.example."));
    }

    #[test]
    fn good_mx_set() {
        let a = parse_answer(0x1234, "example.com", QueryType::Mx, &wire(&mx_answer()))
            .expect("answer");
        assert_eq!(
            a.records,
            vec![
                Record::Mx {
                    preference: 10,
                    exchange: "mx1.example.com".into(),
                    ttl: 3600
                },
                Record::Mx {
                    preference: 20,
                    exchange: "MX2.example.net".into(),
                    ttl: 300
                },
            ]
        );
        assert!(!a.truncated);
        assert!(!a.authentic_data);
        assert_eq!(a.negative, None);
        assert_eq!(a.min_ttl, 300);
    }

    #[test]
    fn question_name_case_insensitive_and_trailing_dot() {
        let bytes = wire(&mx_answer());
        assert!(parse_answer(0x1234, "EXAMPLE.com.", QueryType::Mx, &bytes).is_ok());
    }

    #[test]
    fn wrong_id_rejected() {
        let err = parse_answer(0x1235, "example.com", QueryType::Mx, &wire(&mx_answer()))
            .expect_err("wrong id");
        assert!(matches!(
            err,
            DnsError::IdMismatch {
                expected: 0x1235,
                got: 0x1234
            }
        ));
        // The id is judged before the body: garbage under a foreign id is not ours.
        let mut garbage = wire(&mx_answer());
        garbage.truncate(20);
        assert!(matches!(
            parse_answer(0x9999, "example.com", QueryType::Mx, &garbage),
            Err(DnsError::IdMismatch { .. })
        ));
    }

    #[test]
    fn wrong_question_rejected() {
        let bytes = wire(&mx_answer());
        for (name, qt) in [
            ("example.org", QueryType::Mx),
            ("sub.example.com", QueryType::Mx),
            ("example.com", QueryType::A),
        ] {
            assert!(
                matches!(
                    parse_answer(0x1234, name, qt, &bytes),
                    Err(DnsError::QuestionMismatch)
                ),
                "{name} {qt:?}"
            );
        }
        // Two questions are not an answer to our one.
        let mut two = mx_answer();
        two.add_query(Query::query(n("example.com."), RecordType::MX));
        assert!(matches!(
            parse_answer(0x1234, "example.com", QueryType::Mx, &wire(&two)),
            Err(DnsError::QuestionMismatch)
        ));
        // A question of class CH is not ours either.
        let mut chaos = response(7, "example.com.", RecordType::MX);
        chaos.queries_mut()[0].set_query_class(DNSClass::CH);
        assert!(matches!(
            parse_answer(7, "example.com", QueryType::Mx, &wire(&chaos)),
            Err(DnsError::QuestionMismatch)
        ));
    }

    #[test]
    fn query_is_not_a_response() {
        let bytes = build_query(9, "example.com", QueryType::Mx).expect("query");
        assert!(matches!(
            parse_answer(9, "example.com", QueryType::Mx, &bytes),
            Err(DnsError::Malformed(_))
        ));
    }

    #[test]
    fn truncated_flag_surfaced() {
        let mut m = mx_answer();
        m.set_truncated(true);
        let a = parse_answer(0x1234, "example.com", QueryType::Mx, &wire(&m)).expect("answer");
        assert!(a.truncated);
        assert_eq!(a.records.len(), 2);

        // TC with no records left is not NODATA: the caller must retry over TCP.
        let mut empty = response(0x1234, "example.com.", RecordType::MX);
        empty.set_truncated(true);
        let a = parse_answer(0x1234, "example.com", QueryType::Mx, &wire(&empty)).expect("tc");
        assert!(a.truncated);
        assert_eq!(a.negative, None);

        // Cut mid-record with TC set: still a truncated answer, not an error.
        let bytes = wire(&m);
        let cut = &bytes[..bytes.len() - 5];
        let a = parse_answer(0x1234, "example.com", QueryType::Mx, cut).expect("cut answer");
        assert!(a.truncated);
        assert!(a.records.is_empty());

        // TC with an empty question section.
        let mut bare = Message::new();
        bare.set_id(3)
            .set_message_type(MessageType::Response)
            .set_truncated(true);
        let a = parse_answer(3, "example.com", QueryType::Mx, &wire(&bare)).expect("bare TC");
        assert!(a.truncated);
    }

    #[test]
    fn nxdomain_with_soa() {
        for (soa_ttl, minimum, expect) in [(3600, 300, 300), (60, 900, 60)] {
            let mut m = response(5, "nope.example.com.", RecordType::MX);
            m.set_response_code(ResponseCode::NXDomain)
                .add_name_server(soa("example.com.", soa_ttl, minimum));
            let a = parse_answer(5, "nope.example.com", QueryType::Mx, &wire(&m)).expect("nx");
            assert!(a.records.is_empty());
            assert_eq!(a.negative, Some(NegativeKind::NxDomain { ttl: expect }));
            assert_eq!(a.min_ttl, expect);
        }
    }

    #[test]
    fn soa_for_unrelated_zone_ignored() {
        let mut m = response(5, "nope.example.com.", RecordType::MX);
        m.set_response_code(ResponseCode::NXDomain)
            .add_name_server(soa("other.example.", 3600, 3600));
        let a = parse_answer(5, "nope.example.com", QueryType::Mx, &wire(&m)).expect("nx");
        assert_eq!(a.negative, Some(NegativeKind::NxDomain { ttl: 0 }));
    }

    #[test]
    fn nodata_with_and_without_soa() {
        let mut m = response(6, "example.com.", RecordType::AAAA);
        m.add_name_server(soa("example.com.", 1800, 120));
        let a = parse_answer(6, "example.com", QueryType::Aaaa, &wire(&m)).expect("nodata");
        assert!(a.records.is_empty());
        assert_eq!(a.negative, Some(NegativeKind::NoData { ttl: 120 }));
        assert_eq!(a.min_ttl, 120);

        let bare = response(6, "example.com.", RecordType::AAAA);
        let a = parse_answer(6, "example.com", QueryType::Aaaa, &wire(&bare)).expect("nodata");
        assert_eq!(a.negative, Some(NegativeKind::NoData { ttl: 0 }));

        // Only records of another type at the name: still NODATA for ours.
        let mut other = response(6, "example.com.", RecordType::AAAA);
        other.add_answer(rec(
            "example.com.",
            60,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 9))),
        ));
        let a = parse_answer(6, "example.com", QueryType::Aaaa, &wire(&other)).expect("nodata");
        assert!(a.records.is_empty());
        assert!(matches!(a.negative, Some(NegativeKind::NoData { .. })));
    }

    #[test]
    fn server_failures() {
        for rcode in [
            ResponseCode::ServFail,
            ResponseCode::Refused,
            ResponseCode::FormErr,
            ResponseCode::NotImp,
        ] {
            let mut m = response(8, "example.com.", RecordType::MX);
            m.set_response_code(rcode);
            match parse_answer(8, "example.com", QueryType::Mx, &wire(&m)) {
                Err(DnsError::ServerFailure(got)) => assert_eq!(got, rcode),
                other => panic!("{rcode:?} gave {other:?}"),
            }
            // Without the question section (common for FORMERR).
            let mut bare = Message::new();
            bare.set_id(8)
                .set_message_type(MessageType::Response)
                .set_response_code(rcode);
            assert!(matches!(
                parse_answer(8, "example.com", QueryType::Mx, &wire(&bare)),
                Err(DnsError::ServerFailure(_))
            ));
        }
    }

    #[test]
    fn authentic_data_kept() {
        let mut m = mx_answer();
        m.set_authentic_data(true);
        let a = parse_answer(0x1234, "example.com", QueryType::Mx, &wire(&m)).expect("answer");
        assert!(a.authentic_data);
    }

    #[test]
    fn cname_chain_followed() {
        let mut m = response(11, "www.example.com.", RecordType::A);
        m.add_answer(rec(
            "www.example.com.",
            600,
            RData::CNAME(CNAME(n("web.example.net."))),
        ))
        .add_answer(rec(
            "web.example.net.",
            120,
            RData::CNAME(CNAME(n("host.example.net."))),
        ))
        .add_answer(rec(
            "host.example.net.",
            3600,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 80))),
        ))
        // Records at intermediate names or elsewhere are not answers.
        .add_answer(rec(
            "www.example.com.",
            3600,
            RData::A(A(Ipv4Addr::new(203, 0, 113, 1))),
        ))
        .add_answer(rec(
            "elsewhere.example.",
            3600,
            RData::A(A(Ipv4Addr::new(203, 0, 113, 2))),
        ));
        let a = parse_answer(11, "www.example.com", QueryType::A, &wire(&m)).expect("chain");
        assert_eq!(
            a.records,
            vec![
                Record::Cname("web.example.net".into(), 600),
                Record::Cname("host.example.net".into(), 120),
                Record::A(Ipv4Addr::new(192, 0, 2, 80), 3600),
            ]
        );
        assert_eq!(a.min_ttl, 120);
        assert_eq!(a.negative, None);
    }

    #[test]
    fn cname_to_nxdomain() {
        let mut m = response(12, "alias.example.com.", RecordType::MX);
        m.set_response_code(ResponseCode::NXDomain)
            .add_answer(rec(
                "alias.example.com.",
                600,
                RData::CNAME(CNAME(n("gone.example.net."))),
            ))
            .add_name_server(soa("example.net.", 900, 600));
        let a = parse_answer(12, "alias.example.com", QueryType::Mx, &wire(&m)).expect("nx");
        assert_eq!(
            a.records,
            vec![Record::Cname("gone.example.net".into(), 600)]
        );
        assert_eq!(a.negative, Some(NegativeKind::NxDomain { ttl: 600 }));
        assert_eq!(a.min_ttl, 600);
    }

    #[test]
    fn cname_loop_is_reported() {
        let mut m = response(13, "a.example.", RecordType::A);
        m.add_answer(rec("a.example.", 60, RData::CNAME(CNAME(n("b.example.")))))
            .add_answer(rec("b.example.", 60, RData::CNAME(CNAME(n("a.example.")))));
        assert!(matches!(
            parse_answer(13, "a.example", QueryType::A, &wire(&m)),
            Err(DnsError::CnameLoop(_))
        ));
    }

    #[test]
    fn other_record_types() {
        let mut m = response(14, "x.example.", RecordType::TXT);
        m.add_answer(rec(
            "x.example.",
            60,
            RData::TXT(TXT::new(vec![
                "v=spf1 ip4:192.0.2.0/24 ".into(),
                "-all".into(),
            ])),
        ));
        let a = parse_answer(14, "x.example", QueryType::Txt, &wire(&m)).expect("txt");
        assert_eq!(
            a.records,
            vec![Record::Txt("v=spf1 ip4:192.0.2.0/24 -all".into(), 60)]
        );

        let mut m = response(15, "x.example.", RecordType::AAAA);
        m.add_answer(rec(
            "x.example.",
            70,
            RData::AAAA(AAAA(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))),
        ));
        let a = parse_answer(15, "x.example", QueryType::Aaaa, &wire(&m)).expect("aaaa");
        assert_eq!(
            a.records,
            vec![Record::Aaaa(
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
                70
            )]
        );

        let ptr_name = "1.2.0.192.in-addr.arpa.";
        let mut m = response(16, ptr_name, RecordType::PTR);
        m.add_answer(rec(ptr_name, 80, RData::PTR(PTR(n("mail.example.")))));
        let a = parse_answer(16, ptr_name, QueryType::Ptr, &wire(&m)).expect("ptr");
        assert_eq!(a.records, vec![Record::Ptr("mail.example".into(), 80)]);

        let tlsa_name = "_25._tcp.mx.example.";
        let mut m = response(17, tlsa_name, RecordType::TLSA);
        m.add_answer(rec(
            tlsa_name,
            90,
            RData::TLSA(TLSA::new(
                CertUsage::DaneEe,
                Selector::Spki,
                Matching::Sha256,
                vec![0xab; 32],
            )),
        ));
        m.set_authentic_data(true);
        let a = parse_answer(17, tlsa_name, QueryType::Tlsa, &wire(&m)).expect("tlsa");
        assert_eq!(
            a.records,
            vec![Record::Tlsa {
                usage: 3,
                selector: 1,
                matching: 1,
                data: vec![0xab; 32],
                ttl: 90
            }]
        );
        assert!(a.authentic_data);
    }

    #[test]
    fn null_mx_exchange_is_dot() {
        let mut m = response(18, "nomail.example.", RecordType::MX);
        m.add_answer(rec(
            "nomail.example.",
            60,
            RData::MX(MX::new(0, Name::root())),
        ));
        let a = parse_answer(18, "nomail.example", QueryType::Mx, &wire(&m)).expect("mx");
        assert_eq!(
            a.records,
            vec![Record::Mx {
                preference: 0,
                exchange: ".".into(),
                ttl: 60
            }]
        );
        assert_eq!(
            crate::plan_mx("nomail.example", &a.records, 0),
            crate::MxPlan::NullMx
        );
    }

    #[test]
    fn ttl_with_top_bit_is_zero() {
        let mut m = response(19, "x.example.", RecordType::A);
        m.add_answer(rec(
            "x.example.",
            0x8000_0000,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
        let a = parse_answer(19, "x.example", QueryType::A, &wire(&m)).expect("a");
        assert_eq!(a.records, vec![Record::A(Ipv4Addr::new(192, 0, 2, 1), 0)]);
        assert_eq!(a.min_ttl, 0);
    }

    #[test]
    fn every_prefix_never_panics() {
        let mut m = mx_answer();
        m.add_name_server(soa("example.com.", 60, 60));
        let bytes = wire(&m);
        for len in 0..bytes.len() {
            let _ = parse_answer(0x1234, "example.com", QueryType::Mx, &bytes[..len]);
        }
        // Shorter than a header is malformed, not a panic or an id mismatch.
        assert!(matches!(
            parse_answer(0x1234, "example.com", QueryType::Mx, &bytes[..11]),
            Err(DnsError::Malformed(_))
        ));
        // Without TC a cut message is malformed.
        assert!(matches!(
            parse_answer(
                0x1234,
                "example.com",
                QueryType::Mx,
                &bytes[..bytes.len() - 3]
            ),
            Err(DnsError::Malformed(_))
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // Deterministic xorshift so failures reproduce.
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for len in 0..600 {
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = parse_answer(0, "example.com", QueryType::Mx, &buf);
            // Also with a plausible header (our id, QR set, one question) so the
            // decoder gets past the first checks.
            if buf.len() >= 12 {
                buf[..6].copy_from_slice(&[0, 0, 0x81, 0x80, 0, 1]);
                let _ = parse_answer(0, "example.com", QueryType::Mx, &buf);
            }
        }
        // Flip every byte of a valid answer in turn.
        let good = wire(&mx_answer());
        for i in 0..good.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= flip;
                let _ = parse_answer(0x1234, "example.com", QueryType::Mx, &bad);
            }
        }
    }

    #[test]
    fn compression_loops_never_panic() {
        // Header: id 0x0001, QR+RD+RA, 1 question, 1 answer.
        let header = [0x00, 0x01, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        let cases: Vec<Vec<u8>> = vec![
            // Question name points at itself.
            [&header[..], &[0xc0, 0x0c, 0, 15, 0, 1]].concat(),
            // Two pointers pointing at each other.
            [&header[..], &[0xc0, 0x0e, 0xc0, 0x0c, 0, 15, 0, 1]].concat(),
            // A label then a pointer back to the start of the name.
            [&header[..], &[3, b'f', b'o', b'o', 0xc0, 0x0c, 0, 15, 0, 1]].concat(),
            // Valid question; the answer's owner and MX exchange loop.
            [
                &header[..],
                &[7],
                b"example",
                &[3],
                b"com",
                &[0, 0, 15, 0, 1],
                &[
                    0xc0, 0x1d, 0, 15, 0, 1, 0, 0, 0, 60, 0, 4, 0, 10, 0xc0, 0x2b,
                ],
            ]
            .concat(),
            // Pointer past the end.
            [&header[..], &[0xc0, 0xff, 0, 15, 0, 1]].concat(),
        ];
        for bytes in cases {
            assert!(
                parse_answer(1, "example.com", QueryType::Mx, &bytes).is_err(),
                "{bytes:02x?}"
            );
        }
    }
}
