//! Faults from a scripted DNS server (real sockets on loopback, answers built by
//! hand): truncation, SERVFAIL/REFUSED, silence, wrong ids, wrong questions,
//! answers from the wrong address, garbage. Each must end in an answer, a typed
//! error or a fallback — never a panic, never a wait past the timeout.

use std::net::Ipv4Addr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use sluice_dns::{
    ManualClock, QueryType, Record, ResolveError, Resolver, ResolverConfig, ResponseCode,
};
use sluice_testkit::dns::rt::{block_on, config, join_all, quick};
use sluice_testkit::dns::script::*;

fn ok_a(q: &Query) -> Vec<Action> {
    vec![Action::Send(a_answer(q, 300, [192, 0, 2, 1]))]
}

fn first_a(records: &[Record]) -> Option<Ipv4Addr> {
    records.iter().find_map(|r| match r {
        Record::A(a, _) => Some(*a),
        _ => None,
    })
}

#[test]
fn truncated_udp_answer_is_retried_over_tcp() {
    let server = ScriptServer::start(|q| {
        if q.tcp {
            let records: Vec<Rr> = (1..=3).map(|i| a(300, [192, 0, 2, i])).collect();
            vec![Action::Send(respond(q, Flags::default(), &records, &[]))]
        } else {
            // TC with one record: the partial answer must not be used.
            let tc = Flags {
                tc: true,
                ..Flags::default()
            };
            vec![Action::Send(respond(
                q,
                tc,
                &[a(300, [203, 0, 113, 1])],
                &[],
            ))]
        }
    });
    block_on(async {
        let r = Resolver::new(config(&[server.addr]));
        let l = r
            .lookup("tc.script.test", QueryType::A)
            .await
            .expect("answer");
        assert_eq!(l.records().len(), 3);
        assert_eq!(first_a(l.records()), Some(Ipv4Addr::new(192, 0, 2, 1)));
    });
    assert_eq!((server.udp_queries(), server.tcp_queries()), (1, 1));
}

#[test]
fn silent_tcp_after_truncation_times_out() {
    let server = ScriptServer::start(|q| {
        if q.tcp {
            Vec::new()
        } else {
            let tc = Flags {
                tc: true,
                ..Flags::default()
            };
            vec![Action::Send(respond(q, tc, &[], &[]))]
        }
    });
    block_on(async {
        let r = Resolver::new(quick(&[server.addr], 300));
        let started = Instant::now();
        let err = r.lookup("tc.script.test", QueryType::A).await.unwrap_err();
        assert_eq!(err, ResolveError::Timeout);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    });
    assert_eq!(server.tcp_queries(), 1);
}

#[test]
fn servfail_is_temporary_and_the_next_server_is_asked() {
    let failing = ScriptServer::start(|q| {
        let f = Flags {
            rcode: SERVFAIL,
            ..Flags::default()
        };
        vec![Action::Send(respond(q, f, &[], &[]))]
    });
    let good = ScriptServer::start(ok_a);
    block_on(async {
        let alone = Resolver::new(quick(&[failing.addr], 500));
        let err = alone
            .lookup("x.script.test", QueryType::A)
            .await
            .unwrap_err();
        assert_eq!(err, ResolveError::ServerFailure(ResponseCode::ServFail));
        assert!(err.is_temporary());
        let route = alone.resolve_route("sf.script.test").await;
        let route_err = route.error.expect("no route");
        assert!(!route_err.is_permanent(), "{route_err}");

        let pair = Resolver::new(quick(&[failing.addr, good.addr], 500));
        let l = pair
            .lookup("y.script.test", QueryType::A)
            .await
            .expect("failover");
        assert_eq!(first_a(l.records()), Some(Ipv4Addr::new(192, 0, 2, 1)));
        // SERVFAIL is about the domain, not the server: it stays first.
        pair.lookup("z.script.test", QueryType::A)
            .await
            .expect("failover");
    });
    // alone: one lookup + one MX route lookup; pair: two lookups.
    assert_eq!(failing.udp_queries(), 4);
    assert_eq!(good.udp_queries(), 2);
}

#[test]
fn refused_server_is_held_down_then_tried_again() {
    let refusing = ScriptServer::start(|q| {
        let f = Flags {
            rcode: REFUSED,
            ..Flags::default()
        };
        vec![Action::Send(respond(q, f, &[], &[]))]
    });
    let good = ScriptServer::start(ok_a);
    let clock = Rc::new(ManualClock::new());
    block_on(async {
        let cfg = ResolverConfig {
            server_holddown: Duration::from_secs(30),
            ..quick(&[refusing.addr, good.addr], 500)
        };
        let r = Resolver::with_clock(cfg, clock.clone());
        r.lookup("a.script.test", QueryType::A)
            .await
            .expect("failover");
        assert_eq!(refusing.udp_queries(), 1);
        // Held down: the good server is asked first.
        r.lookup("b.script.test", QueryType::A)
            .await
            .expect("answer");
        assert_eq!(refusing.udp_queries(), 1);
        assert_eq!(good.udp_queries(), 2);
        // After the hold-down it is first again.
        clock.advance(Duration::from_secs(31));
        r.lookup("c.script.test", QueryType::A)
            .await
            .expect("answer");
        assert_eq!(refusing.udp_queries(), 2);
        let m = r.metrics();
        assert_eq!(m.upstreams[0].failures, 2);
        assert_eq!(m.upstreams[1].answers, 3);
    });
}

#[test]
fn silent_server_times_out_and_fails_over() {
    let silent = ScriptServer::start(|_| Vec::new());
    let good = ScriptServer::start(ok_a);
    block_on(async {
        let r = Resolver::new(quick(&[silent.addr, good.addr], 300));
        let started = Instant::now();
        let l = r
            .lookup("a.script.test", QueryType::A)
            .await
            .expect("failover");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        assert_eq!(first_a(l.records()), Some(Ipv4Addr::new(192, 0, 2, 1)));
        // The silent server is now tried last: no second timeout.
        let started = Instant::now();
        r.lookup("b.script.test", QueryType::A)
            .await
            .expect("answer");
        assert!(started.elapsed() < Duration::from_millis(300));
        assert_eq!(r.metrics().timeouts, 1);
    });
    assert_eq!(silent.udp_queries(), 1);
}

#[test]
fn silence_everywhere_is_a_timeout_after_the_attempts() {
    let silent = ScriptServer::start(|_| Vec::new());
    block_on(async {
        let cfg = ResolverConfig {
            attempts: 2,
            ..quick(&[silent.addr], 200)
        };
        let r = Resolver::new(cfg);
        let started = Instant::now();
        let err = r.lookup("a.script.test", QueryType::A).await.unwrap_err();
        assert_eq!(err, ResolveError::Timeout);
        assert!(err.is_temporary());
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(400), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        let m = r.metrics();
        assert_eq!((m.timeouts, m.failures), (2, 1));
    });
    assert_eq!(silent.udp_queries(), 2);
}

#[test]
fn wrong_id_is_ignored_and_the_right_answer_taken() {
    let server = ScriptServer::start(|q| {
        let f = Flags::default();
        let bogus = [a(300, [203, 0, 113, 66])];
        let mut actions = vec![Action::Send(respond_with_id(
            q.id ^ 0x5555,
            q,
            f,
            &bogus,
            &[],
        ))];
        if q.name.starts_with("good") {
            actions.push(Action::Send(a_answer(q, 300, [192, 0, 2, 7])));
        }
        actions
    });
    block_on(async {
        let r = Resolver::new(quick(&[server.addr], 300));
        let l = r
            .lookup("good.script.test", QueryType::A)
            .await
            .expect("answer");
        assert_eq!(first_a(l.records()), Some(Ipv4Addr::new(192, 0, 2, 7)));
        let err = r
            .lookup("only-wrong.script.test", QueryType::A)
            .await
            .unwrap_err();
        assert_eq!(err, ResolveError::Timeout);
    });
}

#[test]
fn wrong_question_is_ignored() {
    let server = ScriptServer::start(|q| {
        // Same id, another name in the question.
        let mut other = q.clone();
        other.question = encode_name("attacker.example");
        other.question.extend([0, 1, 0, 1]);
        let mut actions = vec![Action::Send(respond(
            &other,
            Flags::default(),
            &[a(300, [203, 0, 113, 9])],
            &[],
        ))];
        if q.name.starts_with("good") {
            actions.push(Action::Send(a_answer(q, 300, [192, 0, 2, 8])));
        }
        actions
    });
    block_on(async {
        let r = Resolver::new(quick(&[server.addr], 300));
        let l = r
            .lookup("good.script.test", QueryType::A)
            .await
            .expect("answer");
        assert_eq!(first_a(l.records()), Some(Ipv4Addr::new(192, 0, 2, 8)));
        let err = r.lookup("bad.script.test", QueryType::A).await.unwrap_err();
        assert_eq!(err, ResolveError::Timeout);
    });
}

#[test]
fn answers_from_the_wrong_address_are_ignored() {
    let server = ScriptServer::start(|q| {
        let bogus = a_answer(q, 300, [203, 0, 113, 99]);
        let mut actions = vec![
            Action::SendFromOtherIp(bogus.clone()),
            Action::SendFromOtherPort(bogus),
        ];
        if q.name.starts_with("good") {
            actions.push(Action::Send(a_answer(q, 300, [192, 0, 2, 9])));
        }
        actions
    });
    block_on(async {
        let r = Resolver::new(quick(&[server.addr], 300));
        let l = r
            .lookup("good.script.test", QueryType::A)
            .await
            .expect("answer");
        assert_eq!(first_a(l.records()), Some(Ipv4Addr::new(192, 0, 2, 9)));
        let err = r
            .lookup("spoofed.script.test", QueryType::A)
            .await
            .unwrap_err();
        assert_eq!(err, ResolveError::Timeout);
    });
}

#[test]
fn garbage_answers_end_in_typed_errors_within_the_timeout() {
    let server = ScriptServer::start(|q| {
        let id = q.id.to_be_bytes();
        let good = a_answer(q, 300, [192, 0, 2, 1]);
        let label = q.name.split('.').next().unwrap_or("");
        let bytes = match label {
            // Our id, then noise.
            "garbage" => [
                &id[..],
                &[0x81, 0x80, 0xde, 0xad, 0xbe, 0xef][..],
                &[0x55; 40][..],
            ]
            .concat(),
            // A good answer cut short, no TC bit.
            "cut" => good[..good.len() - 3].to_vec(),
            // Header only.
            "header" => good[..12].to_vec(),
            // The answer's owner name is a pointer to itself.
            "ptrloop" => {
                let mut b = good.clone();
                let at = 12 + q.question.len();
                let here = at as u16 | 0xc000;
                b[at..at + 2].copy_from_slice(&here.to_be_bytes());
                b
            }
            // More records claimed than present.
            "counts" => {
                let mut b = good.clone();
                b[7] = 9;
                b
            }
            // FORMERR without a question section.
            "formerr" => {
                let mut b = vec![id[0], id[1], 0x81, 0x81];
                b.extend([0; 8]);
                b
            }
            _ => good,
        };
        vec![Action::Send(bytes)]
    });
    block_on(async {
        let r = Resolver::new(quick(&[server.addr], 300));
        let names = ["garbage", "cut", "header", "ptrloop", "counts", "formerr"];
        let started = Instant::now();
        let lookups = names
            .iter()
            .map(|&n| {
                let r = r.clone();
                async move { (n, r.lookup(&format!("{n}.script.test"), QueryType::A).await) }
            })
            .collect();
        let results = join_all(lookups).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        for (name, result) in results {
            let err = result.expect_err(name);
            assert!(err.is_temporary(), "{name}: {err}");
            match name {
                "formerr" => assert_eq!(err, ResolveError::ServerFailure(ResponseCode::FormErr)),
                _ => assert!(matches!(err, ResolveError::Malformed(_)), "{name}: {err:?}"),
            }
        }
        // The server still works for a sane question.
        r.lookup("fine.script.test", QueryType::A)
            .await
            .expect("fine");
    });
}

#[test]
fn oversized_udp_answer_goes_to_tcp() {
    // 300 A records over UDP with no TC bit: more than our 4096-byte buffer.
    let server = ScriptServer::start(|q| {
        let n = if q.tcp { 2 } else { 300 };
        let records: Vec<Rr> = (0..n)
            .map(|i| a(60, [198, 18, (i / 250) as u8, (i % 250) as u8]))
            .collect();
        vec![Action::Send(respond(q, Flags::default(), &records, &[]))]
    });
    block_on(async {
        let r = Resolver::new(quick(&[server.addr], 500));
        let l = r
            .lookup("huge.script.test", QueryType::A)
            .await
            .expect("answer");
        assert_eq!(l.records().len(), 2, "the TCP answer");
    });
    assert_eq!(server.tcp_queries(), 1);
}

#[test]
fn ad_bit_is_kept_through_lookup_and_route() {
    let server = ScriptServer::start(|q| {
        let f = Flags {
            ad: true,
            ..Flags::default()
        };
        let rr = match q.qtype {
            TYPE_MX => vec![mx(300, 10, "mx.signed.test")],
            TYPE_A => vec![a(120, [192, 0, 2, 44])],
            _ => Vec::new(),
        };
        let soa_rr = [soa(300, 60)];
        let auth: &[Rr] = if rr.is_empty() { &soa_rr } else { &[] };
        vec![Action::Send(respond(q, f, &rr, auth))]
    });
    block_on(async {
        // The same answers from a resolver not declared validating: the bit
        // is seen but not believed.
        let untrusted = Resolver::new(quick(&[server.addr], 500));
        let l = untrusted
            .lookup("signed.test", QueryType::Mx)
            .await
            .expect("mx");
        assert!(l.authentic_data() && !l.secure());
        let route = untrusted.resolve_route("signed.test").await;
        assert!(!route.hosts[0].secure, "{route:?}");

        let r = Resolver::new(ResolverConfig {
            dnssec_validating: true,
            ..quick(&[server.addr], 500)
        });
        let l = r.lookup("signed.test", QueryType::Mx).await.expect("mx");
        assert!(l.secure());
        let route = r.resolve_route("signed.test").await;
        assert_eq!(route.error, None);
        let host = &route.hosts[0];
        assert_eq!(host.name, "mx.signed.test");
        assert!(host.secure, "{host:?}");
        assert_eq!(host.ttl, 120);
        assert_eq!(
            host.addrs,
            vec!["192.0.2.44".parse::<std::net::IpAddr>().unwrap()]
        );
    });
}

#[test]
fn cname_left_unfinished_is_chased_with_more_queries() {
    let server = ScriptServer::start(|q| {
        let f = Flags::default();
        let answer: Vec<Rr> = match q.name.as_str() {
            "start.script.test" => vec![cname(300, "middle.script.test")],
            "middle.script.test" => vec![cname(200, "end.script.test")],
            "end.script.test" => vec![a(100, [192, 0, 2, 55])],
            "la.script.test" => vec![cname(300, "lb.script.test")],
            "lb.script.test" => vec![cname(300, "la.script.test")],
            n => match n
                .strip_prefix('c')
                .and_then(|r| r.split('.').next()?.parse::<u32>().ok())
            {
                Some(i) => vec![cname(300, &format!("c{}.script.test", i + 1))],
                None => Vec::new(),
            },
        };
        vec![Action::Send(respond(q, f, &answer, &[]))]
    });
    block_on(async {
        let r = Resolver::new(quick(&[server.addr], 500));
        let l = r
            .lookup("start.script.test", QueryType::A)
            .await
            .expect("chased");
        assert_eq!(
            l.records(),
            &[
                Record::Cname("middle.script.test".into(), 300),
                Record::Cname("end.script.test".into(), 200),
                Record::A(Ipv4Addr::new(192, 0, 2, 55), 100),
            ]
        );
        assert_eq!(l.ttl, 100);
        assert_eq!(r.metrics().upstream_queries, 3);

        let err = r.lookup("la.script.test", QueryType::A).await.unwrap_err();
        assert!(matches!(err, ResolveError::CnameLoop(_)), "{err:?}");

        let before = r.metrics().upstream_queries;
        let err = r.lookup("c0.script.test", QueryType::A).await.unwrap_err();
        assert_eq!(err, ResolveError::CnameChainTooLong);
        assert!(r.metrics().upstream_queries - before <= 10);
    });
}

#[test]
fn query_ids_and_source_ports_vary() {
    let server = ScriptServer::start(ok_a);
    block_on(async {
        let r = Resolver::new(quick(&[server.addr], 500));
        for i in 0..20 {
            r.lookup(&format!("n{i}.script.test"), QueryType::A)
                .await
                .expect("answer");
        }
    });
    let queries = server.queries();
    assert_eq!(queries.len(), 20);
    let mut ids: Vec<u16> = queries.iter().map(|q| q.id).collect();
    let mut ports: Vec<u16> = queries.iter().map(|q| q.from.port()).collect();
    ids.sort();
    ids.dedup();
    ports.sort();
    ports.dedup();
    // Random 16-bit values: a repeat or two is possible, a pattern is not.
    assert!(ids.len() >= 15, "{ids:?}");
    assert!(ports.len() >= 15, "{ports:?}");
    assert!(queries.iter().all(|q| q.rd && !q.tcp));
}

#[test]
fn no_servers_is_a_typed_error() {
    block_on(async {
        let r = Resolver::new(quick(&[], 100));
        let err = r.lookup("a.script.test", QueryType::A).await.unwrap_err();
        assert_eq!(err, ResolveError::NoServers);
    });
}
