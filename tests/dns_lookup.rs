//! The resolver against a real authoritative server (NSD on loopback): every
//! record type sluice asks for, CNAME chains and loops, negative answers with
//! their SOA TTL, the TCP fallback for a big answer, and real answers cut and
//! mutated byte by byte into the parser.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, TcpStream, UdpSocket};
use std::time::Duration;

use sluice_dns::{
    build_query, parse_answer, reverse_name, DnsError, NegativeKind, QueryType, Record,
    ResolveError, Resolver,
};
use sluice_testkit::dns::rt::{block_on, config};
use sluice_testkit::nsd::Nsd;

#[test]
fn mx_records_and_cache_hit() {
    let nsd = Nsd::fixture();
    block_on(async {
        let r = Resolver::new(config(&[nsd.addr]));
        let first = r
            .lookup("unequal.mail.test", QueryType::Mx)
            .await
            .expect("mx");
        assert!(!first.from_cache);
        assert_eq!(first.ttl, 300);
        let mut prefs: Vec<(u16, String)> = first
            .records()
            .iter()
            .map(|rec| match rec {
                Record::Mx {
                    preference,
                    exchange,
                    ..
                } => (*preference, exchange.clone()),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        prefs.sort();
        assert_eq!(
            prefs,
            vec![
                (10, "a.hosts.mail.test".to_string()),
                (20, "b.hosts.mail.test".to_string()),
                (30, "c.hosts.mail.test".to_string()),
            ]
        );
        // Same question in another spelling: served from the cache.
        let second = r
            .lookup("UNEQUAL.Mail.Test.", QueryType::Mx)
            .await
            .expect("mx");
        assert!(second.from_cache);
        assert_eq!(second.records(), first.records());
        let m = r.metrics();
        assert_eq!((m.queries, m.cache_hits, m.cache_misses), (2, 1, 1));
        assert_eq!(m.upstream_queries, 1);
        assert_eq!(m.upstreams.len(), 1);
        assert_eq!(m.upstreams[0].server, nsd.addr);
        assert_eq!(m.upstreams[0].answers, 1);
        assert!(m.upstreams[0].latency_sum_us > 0);
        assert_eq!(m.cache_entries, 1);
    });
}

#[test]
fn address_txt_ptr_and_tlsa_records() {
    let nsd = Nsd::fixture();
    block_on(async {
        let r = Resolver::new(config(&[nsd.addr]));
        let a = r
            .lookup("c.hosts.mail.test", QueryType::A)
            .await
            .expect("a");
        assert_eq!(a.records(), &[Record::A(Ipv4Addr::new(192, 0, 2, 3), 300)]);
        let aaaa = r
            .lookup("c.hosts.mail.test", QueryType::Aaaa)
            .await
            .expect("aaaa");
        assert_eq!(
            aaaa.records(),
            &[Record::Aaaa(
                "2001:db8::3".parse::<Ipv6Addr>().unwrap(),
                300
            )]
        );

        // Three 200-byte character-strings joined with nothing between them.
        let txt = r
            .lookup("longtxt.mail.test", QueryType::Txt)
            .await
            .expect("txt");
        let expected = format!("{}{}{}", "a".repeat(200), "b".repeat(200), "c".repeat(200));
        assert_eq!(txt.records(), &[Record::Txt(expected, 300)]);

        let ptr_name = reverse_name("192.0.2.1".parse().unwrap());
        let ptr = r.lookup(&ptr_name, QueryType::Ptr).await.expect("ptr");
        assert_eq!(
            ptr.records(),
            &[Record::Ptr("a.hosts.mail.test".into(), 300)]
        );

        let tlsa = r
            .lookup("_25._tcp.a.hosts.mail.test", QueryType::Tlsa)
            .await
            .expect("tlsa");
        let digest: Vec<u8> = (0..32)
            .map(|i| [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef][i % 8])
            .collect();
        assert_eq!(
            tlsa.records(),
            &[Record::Tlsa {
                usage: 3,
                selector: 1,
                matching: 1,
                data: digest,
                ttl: 300
            }]
        );
        // NSD is not a validating resolver: no AD bit.
        assert!(!tlsa.secure());
    });
}

#[test]
fn cname_chain_in_one_answer() {
    let nsd = Nsd::fixture();
    block_on(async {
        let r = Resolver::new(config(&[nsd.addr]));
        let l = r
            .lookup("chain1.mail.test", QueryType::A)
            .await
            .expect("chain");
        assert_eq!(
            l.records(),
            &[
                Record::Cname("chain2.mail.test".into(), 300),
                Record::Cname("chain3.mail.test".into(), 300),
                Record::A(Ipv4Addr::new(192, 0, 2, 60), 300),
            ]
        );
        assert_eq!(r.metrics().upstream_queries, 1);
    });
}

#[test]
fn cname_into_another_zone() {
    let nsd = Nsd::fixture();
    block_on(async {
        let r = Resolver::new(config(&[nsd.addr]));
        // NSD serves both zones and follows the chain into other.test itself.
        // (Chains a server leaves unfinished are chased with further queries:
        // tests/dns_faults.rs covers that with a scripted server.)
        let l = r
            .lookup("cross.mail.test", QueryType::A)
            .await
            .expect("cross");
        assert_eq!(
            l.records(),
            &[
                Record::Cname("www.other.test".into(), 300),
                Record::Cname("web.other.test".into(), 600),
                Record::A(Ipv4Addr::new(192, 0, 2, 80), 600),
            ]
        );
        assert_eq!(l.ttl, 300, "lowest TTL on the chain");
    });
}

#[test]
fn cname_loops_end_in_an_error() {
    let nsd = Nsd::fixture();
    block_on(async {
        let r = Resolver::new(config(&[nsd.addr]));
        // Loop inside one answer.
        let err = r.lookup("loop1.mail.test", QueryType::A).await.unwrap_err();
        assert!(matches!(err, ResolveError::CnameLoop(_)), "{err:?}");
        // Loop across zones, found over several queries.
        let err = r.lookup("xloop.mail.test", QueryType::A).await.unwrap_err();
        assert!(matches!(err, ResolveError::CnameLoop(_)), "{err:?}");
        assert!(err.is_temporary());
        assert!(r.lookup_cached("loop1.mail.test", QueryType::A).is_none());
    });
}

#[test]
fn nxdomain_and_nodata_use_the_soa_ttl() {
    let nsd = Nsd::fixture();
    block_on(async {
        let r = Resolver::new(config(&[nsd.addr]));
        let nx = r
            .lookup("missing.mail.test", QueryType::A)
            .await
            .expect("answer");
        assert!(nx.is_nxdomain());
        assert_eq!(nx.negative(), Some(NegativeKind::NxDomain { ttl: 60 }));
        assert_eq!(nx.ttl, 60);
        assert!(nx.records().is_empty());

        let nodata = r
            .lookup("implicit.mail.test", QueryType::Mx)
            .await
            .expect("answer");
        assert_eq!(nodata.negative(), Some(NegativeKind::NoData { ttl: 60 }));

        // other.test: SOA TTL 600, MINIMUM 120 → 120.
        let nx = r
            .lookup("nothing.other.test", QueryType::Mx)
            .await
            .expect("answer");
        assert_eq!(nx.negative(), Some(NegativeKind::NxDomain { ttl: 120 }));

        // In-zone CNAME to a name without MX: the SOA proves NODATA, no chase.
        let before = r.metrics().upstream_queries;
        let l = r
            .lookup("alias.hosts.mail.test", QueryType::Mx)
            .await
            .expect("answer");
        assert_eq!(
            l.records(),
            &[Record::Cname("a.hosts.mail.test".into(), 300)]
        );
        assert!(matches!(l.negative(), Some(NegativeKind::NoData { .. })));
        assert_eq!(r.metrics().upstream_queries, before + 1);

        // Negative answers are cached.
        let again = r
            .lookup("missing.mail.test", QueryType::A)
            .await
            .expect("answer");
        assert!(again.from_cache && again.is_nxdomain());
    });
}

#[test]
fn big_answer_falls_back_to_tcp() {
    let nsd = Nsd::fixture();
    block_on(async {
        let r = Resolver::new(config(&[nsd.addr]));
        let l = r.lookup("big.mail.test", QueryType::A).await.expect("big");
        assert_eq!(l.records().len(), 120);
        assert!(l
            .records()
            .contains(&Record::A(Ipv4Addr::new(198, 18, 0, 120), 300)));
        let m = r.metrics();
        assert_eq!(m.tcp_queries, 1, "{m:?}");
        assert_eq!(m.upstream_queries, 2, "UDP then TCP");
    });
}

#[test]
fn bad_names_fail_without_network() {
    let nsd = Nsd::fixture();
    block_on(async {
        let r = Resolver::new(config(&[nsd.addr]));
        for bad in [
            "",
            "a..b",
            &"x".repeat(300),
            &format!("{}.test", "l".repeat(64)),
        ] {
            let err = r.lookup(bad, QueryType::A).await.unwrap_err();
            assert!(
                matches!(err, ResolveError::InvalidName { .. }),
                "{bad:?}: {err:?}"
            );
            assert!(!err.is_temporary());
        }
        assert_eq!(r.metrics().upstream_queries, 0);
    });
}

/// Raw answers from NSD for a spread of questions (UDP, and TCP for the big one).
fn real_answers(nsd: &Nsd) -> Vec<(u16, &'static str, QueryType, Vec<u8>)> {
    let questions: &[(&str, QueryType)] = &[
        ("equal.mail.test", QueryType::Mx),
        ("nullmx.mail.test", QueryType::Mx),
        ("longtxt.mail.test", QueryType::Txt),
        ("chain1.mail.test", QueryType::A),
        ("loop1.mail.test", QueryType::A),
        ("missing.mail.test", QueryType::A),
        ("implicit.mail.test", QueryType::Mx),
        ("c.hosts.mail.test", QueryType::Aaaa),
        ("_25._tcp.a.hosts.mail.test", QueryType::Tlsa),
        ("1.2.0.192.in-addr.arpa", QueryType::Ptr),
        ("big.mail.test", QueryType::A),
    ];
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind");
    udp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut out = Vec::new();
    for (i, &(name, qtype)) in questions.iter().enumerate() {
        let id = 0x1000 + i as u16;
        let query = build_query(id, name, qtype).expect("query");
        udp.send_to(&query, nsd.addr).expect("send");
        let mut buf = [0u8; 4096];
        let (n, _) = udp.recv_from(&mut buf).expect("nsd answers");
        out.push((id, name, qtype, buf[..n].to_vec()));
        if buf[2] & 0x02 != 0 {
            let mut tcp = TcpStream::connect(nsd.addr).expect("tcp");
            tcp.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut framed = (query.len() as u16).to_be_bytes().to_vec();
            framed.extend(&query);
            tcp.write_all(&framed).expect("write");
            let mut len = [0u8; 2];
            tcp.read_exact(&mut len).expect("len");
            let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
            tcp.read_exact(&mut msg).expect("msg");
            out.push((id, name, qtype, msg));
        }
    }
    out
}

#[test]
fn real_answers_cut_and_mutated_never_panic() {
    let nsd = Nsd::fixture();
    let answers = real_answers(&nsd);
    assert!(
        answers.iter().any(|a| a.3.len() > 1232),
        "the TCP answer is in the set"
    );
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (id, name, qtype, wire) in &answers {
        match parse_answer(*id, name, *qtype, wire) {
            Ok(_) | Err(DnsError::CnameLoop(_)) => {}
            Err(e) => panic!("{name} {qtype}: {e}"),
        }
        // A cut answer is never taken for a complete one: it is an error, or
        // (when the TC bit survives) a truncated answer that goes to TCP.
        for len in 0..wire.len() {
            match parse_answer(*id, name, *qtype, &wire[..len]) {
                Err(_) => {}
                Ok(a) => assert!(a.truncated, "{name} cut at {len} parsed as complete"),
            }
        }
        for i in 0..wire.len() {
            for flip in [0x01u8, 0x20, 0x80, 0xff] {
                let mut bad = wire.clone();
                bad[i] ^= flip;
                let _ = parse_answer(*id, name, *qtype, &bad);
            }
        }
        for _ in 0..2000 {
            let mut bad = wire.clone();
            for _ in 0..1 + rand() % 8 {
                let at = (rand() as usize) % bad.len();
                bad[at] = rand() as u8;
            }
            if rand() % 4 == 0 {
                bad.truncate((rand() as usize) % (bad.len() + 1));
            }
            let _ = parse_answer(*id, name, *qtype, &bad);
        }
    }
}
