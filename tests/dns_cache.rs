//! The per-core cache, observed from outside: a scripted server counts the
//! queries that reach it while a manual clock moves time (no sleeping).

use std::net::Ipv4Addr;
use std::rc::Rc;
use std::time::Duration;

use glommio::timer::Timer;
use sluice_dns::{
    ManualClock, NegativeKind, QueryType, Record, Resolver, ResolverConfig, TtlPolicy,
};
use sluice_testkit::dns::rt::{block_on, config, join_all, quick};
use sluice_testkit::dns::script::*;

fn answering(ttl: u32) -> ScriptServer {
    ScriptServer::start(move |q| vec![Action::Send(a_answer(q, ttl, [192, 0, 2, 1]))])
}

#[test]
fn answers_expire_at_their_ttl() {
    let server = answering(30);
    let clock = Rc::new(ManualClock::new());
    block_on(async {
        let r = Resolver::with_clock(quick(&[server.addr], 500), clock.clone());
        let first = r
            .lookup("ttl.script.test", QueryType::A)
            .await
            .expect("answer");
        assert_eq!((first.ttl, first.from_cache), (30, false));
        clock.advance(Duration::from_secs(29));
        let hit = r
            .lookup("ttl.script.test", QueryType::A)
            .await
            .expect("cached");
        assert_eq!((hit.ttl, hit.from_cache), (1, true));
        assert_eq!(server.udp_queries(), 1);
        clock.advance(Duration::from_secs(1));
        let fresh = r
            .lookup("ttl.script.test", QueryType::A)
            .await
            .expect("again");
        assert_eq!((fresh.ttl, fresh.from_cache), (30, false));
        assert_eq!(server.udp_queries(), 2);
        let m = r.metrics();
        assert_eq!((m.queries, m.cache_hits, m.cache_misses), (3, 1, 2));
    });
}

#[test]
fn ttls_are_clamped() {
    let short = answering(5);
    let long = answering(100_000);
    let clock = Rc::new(ManualClock::new());
    block_on(async {
        let ttl = TtlPolicy {
            min: Duration::from_secs(60),
            max: Duration::from_secs(3600),
            negative_max: Duration::from_secs(300),
        };
        let r = Resolver::with_clock(
            ResolverConfig {
                ttl,
                ..quick(&[short.addr], 500)
            },
            clock.clone(),
        );
        assert_eq!(
            r.lookup("s.script.test", QueryType::A)
                .await
                .expect("a")
                .ttl,
            60
        );
        clock.advance(Duration::from_secs(59));
        assert!(
            r.lookup("s.script.test", QueryType::A)
                .await
                .expect("a")
                .from_cache
        );
        assert_eq!(short.udp_queries(), 1);

        let r = Resolver::with_clock(
            ResolverConfig {
                ttl,
                ..quick(&[long.addr], 500)
            },
            clock.clone(),
        );
        let l = r.lookup("l.script.test", QueryType::A).await.expect("a");
        assert_eq!(l.ttl, 3600);
        // The record keeps the TTL the server sent; the clamp is the cache's.
        assert_eq!(
            l.records(),
            &[Record::A(Ipv4Addr::new(192, 0, 2, 1), 100_000)]
        );
        clock.advance(Duration::from_secs(3600));
        assert!(
            !r.lookup("l.script.test", QueryType::A)
                .await
                .expect("a")
                .from_cache
        );
        assert_eq!(long.udp_queries(), 2);
    });
}

#[test]
fn nxdomain_and_nodata_are_cached_for_the_soa_minimum() {
    let server = ScriptServer::start(|q| {
        let (rcode, auth) = match q.name.split('.').next() {
            // SOA TTL 300, MINIMUM 45: cached for 45 s.
            Some("nx") => (NXDOMAIN, vec![soa(300, 45)]),
            Some("nodata") => (NOERROR, vec![soa(20, 600)]),
            // No SOA: RFC 2308 says do not cache.
            _ => (NXDOMAIN, Vec::new()),
        };
        let f = Flags {
            rcode,
            ..Flags::default()
        };
        vec![Action::Send(respond(q, f, &[], &auth))]
    });
    let clock = Rc::new(ManualClock::new());
    block_on(async {
        let r = Resolver::with_clock(quick(&[server.addr], 500), clock.clone());
        let nx = r
            .lookup("nx.script.test", QueryType::Mx)
            .await
            .expect("answer");
        assert_eq!(nx.negative(), Some(NegativeKind::NxDomain { ttl: 45 }));
        let nodata = r
            .lookup("nodata.script.test", QueryType::Mx)
            .await
            .expect("answer");
        assert_eq!(nodata.negative(), Some(NegativeKind::NoData { ttl: 20 }));
        let bare = r
            .lookup("nosoa.script.test", QueryType::Mx)
            .await
            .expect("answer");
        assert!(bare.is_nxdomain());
        assert_eq!(server.udp_queries(), 3);

        clock.advance(Duration::from_secs(19));
        for name in ["nx", "nodata"] {
            let l = r
                .lookup(&format!("{name}.script.test"), QueryType::Mx)
                .await
                .expect("a");
            assert!(l.from_cache, "{name}");
        }
        r.lookup("nosoa.script.test", QueryType::Mx)
            .await
            .expect("answer");
        assert_eq!(
            server.udp_queries(),
            4,
            "only the SOA-less answer asked again"
        );

        clock.advance(Duration::from_secs(1));
        assert!(
            !r.lookup("nodata.script.test", QueryType::Mx)
                .await
                .expect("a")
                .from_cache
        );
        clock.advance(Duration::from_secs(24));
        assert!(
            r.lookup("nx.script.test", QueryType::Mx)
                .await
                .expect("a")
                .from_cache
        );
        clock.advance(Duration::from_secs(1));
        assert!(
            !r.lookup("nx.script.test", QueryType::Mx)
                .await
                .expect("a")
                .from_cache
        );
        assert_eq!(server.udp_queries(), 6);
    });
}

#[test]
fn concurrent_identical_lookups_share_one_query() {
    // The server holds each answer until the test has started all lookups, so
    // an answer cannot come back before the last identical lookup is issued.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let server = ScriptServer::start(move |q| {
        if q.name == "shared.script.test" && q.qtype == TYPE_A {
            let _ = go_rx
                .lock()
                .expect("gate")
                .recv_timeout(Duration::from_secs(5));
        }
        vec![Action::Send(a_answer(q, 300, [192, 0, 2, 1]))]
    });
    block_on(async {
        for cache_size in [50_000, 0] {
            let r = Resolver::new(ResolverConfig {
                cache_size,
                ..quick(&[server.addr], 5000)
            });
            let lookups = (0..50)
                .map(|_| r.lookup("shared.script.test", QueryType::A))
                .collect();
            // zip polls the lookups first, then opens the gate.
            let (results, _) = futures_lite::future::zip(join_all(lookups), async {
                go_tx.send(()).expect("gate open");
            })
            .await;
            assert!(results
                .iter()
                .all(|r| r.as_ref().is_ok_and(|l| l.records().len() == 1)));
            let m = r.metrics();
            assert_eq!(m.upstream_queries, 1, "cache_size {cache_size}: {m:?}");
            assert_eq!(m.inflight_joins, 49);
            // A different question is not shared.
            let other = join_all(vec![
                r.lookup("shared.script.test", QueryType::Mx),
                r.lookup("other.script.test", QueryType::A),
            ])
            .await;
            assert!(other.iter().all(Result::is_ok));
        }
    });
    assert_eq!(server.udp_queries(), 6);
}

#[test]
fn a_cancelled_lookup_does_not_strand_the_ones_waiting_on_it() {
    // The first query is never answered; later ones are.
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = {
        let seen = seen.clone();
        ScriptServer::start(move |q| {
            if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                Vec::new()
            } else {
                vec![Action::Send(a_answer(q, 300, [192, 0, 2, 5]))]
            }
        })
    };
    block_on(async {
        let r = Resolver::new(quick(&[server.addr], 2000));
        let leader = async {
            let lookup = async { Some(r.lookup("c.script.test", QueryType::A).await) };
            let give_up = async {
                Timer::new(Duration::from_millis(100)).await;
                None
            };
            futures_lite::future::or(lookup, give_up).await
        };
        let follower = r.lookup("c.script.test", QueryType::A);
        let (led, followed) = futures_lite::future::zip(leader, follower).await;
        assert!(led.is_none(), "the leader gave up");
        let l = followed.expect("the follower asked again");
        assert_eq!(l.records(), &[Record::A(Ipv4Addr::new(192, 0, 2, 5), 300)]);
    });
    assert_eq!(server.udp_queries(), 2);
}

#[test]
fn cache_size_is_bounded() {
    let server = answering(300);
    block_on(async {
        let r = Resolver::new(ResolverConfig {
            cache_size: 3,
            ..quick(&[server.addr], 500)
        });
        for i in 0..5 {
            r.lookup(&format!("n{i}.script.test"), QueryType::A)
                .await
                .expect("a");
        }
        let m = r.metrics();
        assert_eq!((m.cache_entries, m.cache_evictions), (3, 2));
        // The newest are kept.
        assert!(r.lookup_cached("n4.script.test", QueryType::A).is_some());
    });
}

#[test]
fn short_ttl_from_a_real_server_expires() {
    let nsd = sluice_testkit::nsd::Nsd::fixture();
    let clock = Rc::new(ManualClock::new());
    block_on(async {
        let r = Resolver::with_clock(config(&[nsd.addr]), clock.clone());
        let l = r.lookup("short.mail.test", QueryType::A).await.expect("a");
        assert_eq!(l.ttl, 5);
        clock.advance(Duration::from_secs(4));
        assert!(
            r.lookup("short.mail.test", QueryType::A)
                .await
                .expect("a")
                .from_cache
        );
        clock.advance(Duration::from_secs(1));
        assert!(
            !r.lookup("short.mail.test", QueryType::A)
                .await
                .expect("a")
                .from_cache
        );
        assert_eq!(r.metrics().upstream_queries, 2);
    });
}
