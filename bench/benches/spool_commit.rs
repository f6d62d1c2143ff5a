//! Spool commit throughput (messages/s) with real fsync, for 1 KiB and 32 KiB
//! bodies and 1, 8 and 64 concurrent writers. Each writer is an OS thread that
//! stores in a loop and blocks on the future, like a session awaiting its 250.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_lite::future::block_on;
use sluice_spool::{
    BodyType, Envelope, MessageId, Notify, Recipient, RecipientStatus, Spool, SpoolConfig,
};

fn envelope(size: usize) -> Envelope {
    Envelope {
        sender: "sender@example.org".into(),
        recipients: vec![Recipient {
            address: "rcpt@example.net".into(),
            orcpt: None,
            notify: Notify::default(),
            status: RecipientStatus::Pending,
            local: false,
        }],
        ret: None,
        envid: None,
        body_type: BodyType::EightBitMime,
        smtputf8: false,
        arrival_unix_ms: 1_700_000_000_000,
        listener: "mx".into(),
        client_ip: "192.0.2.1".parse().ok(),
        helo: "client.example.org".into(),
        auth_user: None,
        tls: Some("TLSv1.3 TLS13_AES_256_GCM_SHA384".into()),
        size: size as u64,
        priority: 0,
        queue: "default".into(),
        hold_until_unix: 0,
        deliver_by: None,
        tls_request: Default::default(),
        tenant: None,
        header_facts: None,
        schedule: Default::default(),
    }
}

/// Unique, increasing ids in shard 0 without a shared (non-Sync) IdGenerator.
fn id(n: u64) -> MessageId {
    MessageId((n >> 16) << 22 | (n & 0xFFFF))
}

fn scratch_dir() -> PathBuf {
    // On the real disk (not tmpfs) so that fsync costs what it costs.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
    std::fs::create_dir_all(&dir).expect("create bench scratch dir");
    dir
}

fn spool_commit(c: &mut Criterion) {
    let mut group = c.benchmark_group("spool_commit");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(1));
    for size in [1024usize, 32 * 1024] {
        for writers in [1u64, 8, 64] {
            let dir = tempfile::Builder::new()
                .prefix("spool-bench-")
                .tempdir_in(scratch_dir())
                .expect("tempdir");
            let spool = Arc::new(
                Spool::open(&SpoolConfig {
                    path: dir.path().to_path_buf(),
                    shards: 1,
                    map_size: 32 << 30,
                    max_batch: 1024,
                    sync: true,
                    removal_linger: std::time::Duration::ZERO,
                })
                .expect("open spool"),
            );
            let next = Arc::new(AtomicU64::new(0));
            let env = envelope(size);
            let body = vec![b'x'; size];
            let name = format!("{}KiB", size / 1024);
            group.bench_function(BenchmarkId::new(name, writers), |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for t in 0..writers {
                            let n = iters / writers + u64::from(t < iters % writers);
                            let (spool, next, env, body) = (&spool, &next, &env, &body);
                            s.spawn(move || {
                                for _ in 0..n {
                                    let id = id(next.fetch_add(1, Ordering::Relaxed));
                                    block_on(spool.store(0, id, env, body.clone())).expect("store");
                                }
                            });
                        }
                    });
                    start.elapsed()
                })
            });
            let stats = spool.stats().expect("stats");
            eprintln!(
                "{size} B x {writers} writers: {} messages in {} commits ({:.1} msg/commit)",
                stats.messages,
                stats.commits,
                stats.messages as f64 / stats.commits.max(1) as f64
            );
        }
    }
    group.finish();
}

criterion_group!(benches, spool_commit);
criterion_main!(benches);
