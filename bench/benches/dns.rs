//! DNS: cached lookup cost, and cold lookups per second against a local NSD,
//! sluice's resolver (glommio) side by side with hickory-resolver (tokio,
//! current-thread runtime) asking the same server the same kind of question.
//!
//!     cargo bench -p sluice-bench --bench dns
//!
//! Starts NSD itself (the test kit's, tests/kit/src/nsd.rs), serving tests/dns/zones.
//! Cold lookups ask for a fresh name under the wildcard `*.wild.mail.test` each time, so
//! neither cache can answer.

use std::cell::Cell;
use std::future::Future;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::{LocalExecutor, LocalExecutorBuilder, Placement};
use hickory_resolver::config::{NameServerConfigGroup, ResolveHosts, ResolverConfig as HConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::Resolver as Hickory;
use sluice_dns::{QueryType, Record, Resolver, ResolverConfig};
use sluice_testkit::nsd;

const CONCURRENCY: usize = 64;

fn executor() -> LocalExecutor {
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 * 1024)
        .make()
        .expect("glommio executor")
}

fn sluice(nsd: &nsd::Nsd) -> Resolver {
    Resolver::new(ResolverConfig {
        servers: vec![nsd.addr],
        ..ResolverConfig::default()
    })
}

fn hickory(nsd: &nsd::Nsd) -> Hickory<TokioConnectionProvider> {
    let servers = NameServerConfigGroup::from_ips_clear(&[nsd.addr.ip()], nsd.addr.port(), true);
    let mut builder = Hickory::builder_with_config(
        HConfig::from_parts(None, Vec::new(), servers),
        TokioConnectionProvider::default(),
    );
    let opts = builder.options_mut();
    opts.use_hosts_file = ResolveHosts::Never;
    opts.edns0 = true;
    opts.cache_size = 1024;
    builder.build()
}

fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Poll futures concurrently on one task (works on either runtime).
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx| {
        let mut pending = false;
        for (fut, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(v) => *out = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(outputs.iter_mut().filter_map(Option::take).collect())
        }
    })
    .await
}

fn expect_wild(records: &[Record]) {
    assert!(
        records.contains(&Record::A(Ipv4Addr::new(192, 0, 2, 99), 300)),
        "{records:?}"
    );
}

fn cached(c: &mut Criterion, nsd: &nsd::Nsd) {
    let mut group = c.benchmark_group("dns_cached");
    let ex = executor();
    let ours = sluice(nsd);
    ex.run(async {
        ours.lookup("a.hosts.mail.test", QueryType::A)
            .await
            .expect("warm");
        let route = ours.resolve_route("unequal.mail.test").await;
        assert!(route.error.is_none());
    });
    // Per-call cost of a hit: many lookups awaited inside one task, so no
    // executor entry/exit is counted (the same for both resolvers).
    group.bench_function("sluice/lookup", |b| {
        b.iter_custom(|iters| {
            ex.run(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let l = ours
                        .lookup(black_box("a.hosts.mail.test"), QueryType::A)
                        .await
                        .expect("hit");
                    debug_assert!(l.from_cache);
                    black_box(l);
                }
                started.elapsed()
            })
        })
    });
    group.bench_function("sluice/lookup_cached", |b| {
        b.iter(|| {
            ours.lookup_cached(black_box("a.hosts.mail.test"), QueryType::A)
                .expect("hit")
        })
    });
    group.bench_function("sluice/route_3_hosts", |b| {
        b.iter_custom(|iters| {
            ex.run(async {
                let started = Instant::now();
                for _ in 0..iters {
                    black_box(ours.resolve_route(black_box("unequal.mail.test")).await);
                }
                started.elapsed()
            })
        })
    });

    let rt = tokio_rt();
    let theirs = hickory(nsd);
    rt.block_on(theirs.ipv4_lookup("a.hosts.mail.test."))
        .expect("warm");
    group.bench_function("hickory/lookup", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    black_box(
                        theirs
                            .ipv4_lookup(black_box("a.hosts.mail.test."))
                            .await
                            .expect("hit"),
                    );
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

fn cold(c: &mut Criterion, nsd: &nsd::Nsd) {
    let mut group = c.benchmark_group("dns_cold");
    group.measurement_time(Duration::from_secs(5));
    let serial = Cell::new(0u64);
    let fresh = || {
        serial.set(serial.get() + 1);
        format!("n{}.wild.mail.test", serial.get())
    };

    // One lookup at a time: latency-bound.
    group.throughput(Throughput::Elements(1));
    let ex = executor();
    let ours = sluice(nsd);
    group.bench_function(BenchmarkId::new("sluice", "serial"), |b| {
        b.iter_custom(|iters| {
            ex.run(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let l = ours.lookup(&fresh(), QueryType::A).await.expect("cold");
                    assert!(!l.from_cache);
                }
                started.elapsed()
            })
        })
    });
    let rt = tokio_rt();
    let theirs = hickory(nsd);
    group.bench_function(BenchmarkId::new("hickory", "serial"), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    theirs
                        .ipv4_lookup(format!("{}.", fresh()))
                        .await
                        .expect("cold");
                }
                started.elapsed()
            })
        })
    });

    // Many lookups in flight on one core: throughput-bound.
    group.throughput(Throughput::Elements(CONCURRENCY as u64));
    group.bench_function(BenchmarkId::new("sluice", "concurrent_64"), |b| {
        b.iter_custom(|iters| {
            ex.run(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let names: Vec<String> = (0..CONCURRENCY).map(|_| fresh()).collect();
                    let results =
                        join_all(names.iter().map(|n| ours.lookup(n, QueryType::A)).collect())
                            .await;
                    for r in results {
                        expect_wild(r.expect("cold").records());
                    }
                }
                started.elapsed()
            })
        })
    });
    group.bench_function(BenchmarkId::new("hickory", "concurrent_64"), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let names: Vec<String> =
                        (0..CONCURRENCY).map(|_| format!("{}.", fresh())).collect();
                    let results = join_all(
                        names
                            .iter()
                            .map(|n| theirs.ipv4_lookup(n.as_str()))
                            .collect(),
                    )
                    .await;
                    for r in results {
                        r.expect("cold");
                    }
                }
                started.elapsed()
            })
        })
    });
    group.finish();
    let m = ours.metrics();
    eprintln!(
        "sluice resolver: {} lookups, {} upstream queries, {} timeouts, mean upstream latency {:.1} µs",
        m.queries,
        m.upstream_queries,
        m.timeouts,
        m.upstreams[0].latency_sum_us as f64 / m.upstreams[0].latency_count().max(1) as f64
    );
}

fn benches(c: &mut Criterion) {
    let nsd = nsd::Nsd::fixture();
    cached(c, &nsd);
    cold(c, &nsd);
}

criterion_group!(dns, benches);
criterion_main!(dns);
