use std::path::Path;
use std::sync::{Arc, Barrier};

use futures_lite::future::block_on;

use crate::*;

fn cfg(path: &Path, shards: u16) -> SpoolConfig {
    SpoolConfig {
        path: path.to_path_buf(),
        shards,
        map_size: 64 << 20,
        max_batch: 256,
        sync: true,
        removal_linger: std::time::Duration::ZERO,
    }
}

fn envelope(size: usize) -> Envelope {
    Envelope {
        sender: "alice@example.org".into(),
        recipients: vec![
            Recipient {
                address: "bob@example.net".into(),
                orcpt: Some("rfc822;bob@example.net".into()),
                notify: Notify::FAILURE | Notify::DELAY,
                status: RecipientStatus::Pending,
                local: false,
            },
            Recipient {
                address: "carol@example.net".into(),
                orcpt: None,
                notify: Notify::default(),
                status: RecipientStatus::Deferred {
                    reply: "451 4.7.1 later".into(),
                    attempts: 2,
                },
                local: true,
            },
        ],
        ret: Some(Ret::Headers),
        envid: Some("QQ314159".into()),
        body_type: BodyType::EightBitMime,
        smtputf8: true,
        arrival_unix_ms: 1_700_000_000_000,
        listener: "mx".into(),
        client_ip: "192.0.2.1".parse().ok(),
        helo: "client.example.org".into(),
        auth_user: None,
        tls: Some("TLSv1.3 TLS13_AES_256_GCM_SHA384".into()),
        size: size as u64,
        priority: -3,
        queue: "default".into(),
        hold_until_unix: 0,
        deliver_by: None,
        tls_request: Default::default(),
        tenant: None,
        header_facts: None,
        schedule: Default::default(),
    }
}

fn body(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

#[test]
fn store_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(dir.path(), 2)).unwrap();
    assert_eq!(spool.shard_count(), 2);
    assert_eq!(spool.last_id(1).unwrap(), None);
    let id = IdGenerator::new(1, None).next(1_700_000_000_000);
    let env = envelope(4000);
    let data = body(4000);
    block_on(spool.store(1, id, &env, data.clone())).unwrap();
    assert_eq!(spool.envelope(id).unwrap(), env);
    assert!(spool.with_body(id, |b| b == data.as_slice()).unwrap());
    assert_eq!(spool.count().unwrap(), 1);
    assert_eq!(spool.last_id(1).unwrap(), Some(id));
    assert_eq!(spool.last_id(0).unwrap(), None);
    assert_eq!(
        spool.stats().unwrap(),
        SpoolStats {
            commits: 1,
            messages: 1
        }
    );
    let report = spool.recover().unwrap();
    assert_eq!(
        (report.messages, report.bytes, report.corrupt),
        (1, 4000, 0)
    );
}

/// A header prefix and the body go in as one value, in that order, and a
/// duplicate id still refuses without touching the stored message.
#[test]
fn store_prefixed_joins_prefix_and_body() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(dir.path(), 1)).unwrap();
    let ids = IdGenerator::new(0, None);
    let prefix = b"DKIM-Signature: v=1; a=ed25519-sha256;\r\n".to_vec();
    let data = body(70_000);
    let id = ids.next(1_700_000_000_000);
    let env = envelope(prefix.len() + data.len());
    block_on(spool.store_prefixed(0, id, &env, prefix.clone(), data.clone())).unwrap();
    let mut want = prefix.clone();
    want.extend_from_slice(&data);
    assert!(spool.with_body(id, |b| b == want.as_slice()).unwrap());
    // An empty prefix is a plain store.
    let plain = ids.next(1_700_000_000_001);
    block_on(spool.store_prefixed(0, plain, &envelope(5), Vec::new(), b"hello".to_vec())).unwrap();
    assert!(spool.with_body(plain, |b| b == b"hello").unwrap());
    let again = block_on(spool.store_prefixed(0, id, &env, b"X: y\r\n".to_vec(), Vec::new()));
    assert_eq!(again, Err(SpoolError::Duplicate(id)));
    assert!(spool.with_body(id, |b| b == want.as_slice()).unwrap());
    assert_eq!(spool.count().unwrap(), 2);
}

#[test]
fn list_in_id_order_per_shard() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(dir.path(), 2)).unwrap();
    let g0 = IdGenerator::new(0, None);
    let g1 = IdGenerator::new(1, None);
    let a: Vec<_> = (0..3).map(|i| g0.next(1000 + i)).collect();
    let b: Vec<_> = (0..3).map(|i| g1.next(1000 + i)).collect();
    // Stored out of order; list must still come back sorted.
    for &(shard, id) in &[
        (1, b[2]),
        (0, a[1]),
        (1, b[0]),
        (0, a[2]),
        (0, a[0]),
        (1, b[1]),
    ] {
        block_on(spool.store(shard, id, &envelope(10), body(10))).unwrap();
    }
    let mut seen = Vec::new();
    spool
        .list(|id, env| {
            assert_eq!(env.size, 10);
            seen.push(id);
            true
        })
        .unwrap();
    let expected: Vec<_> = a.iter().chain(b.iter()).copied().collect();
    assert_eq!(seen, expected);

    let mut first_two = Vec::new();
    spool
        .list(|id, _| {
            first_two.push(id);
            first_two.len() < 2
        })
        .unwrap();
    assert_eq!(first_two, &expected[..2]);
    assert_eq!(spool.count().unwrap(), 6);
}

#[test]
fn remove_message() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(dir.path(), 1)).unwrap();
    let g = IdGenerator::new(0, None);
    let (a, b) = (g.next(1), g.next(1));
    block_on(spool.store(0, a, &envelope(5), body(5))).unwrap();
    block_on(spool.store(0, b, &envelope(5), body(5))).unwrap();
    block_on(spool.remove(a)).unwrap();
    assert_eq!(spool.envelope(a), Err(SpoolError::NotFound(a)));
    assert_eq!(spool.with_body(a, |_| ()), Err(SpoolError::NotFound(a)));
    assert_eq!(block_on(spool.remove(a)), Err(SpoolError::NotFound(a)));
    assert_eq!(spool.count().unwrap(), 1);
    assert!(spool.envelope(b).is_ok());
    // An id naming a shard this spool does not have.
    let far = IdGenerator::new(9, None).next(1);
    assert_eq!(block_on(spool.remove(far)), Err(SpoolError::NotFound(far)));
}

#[test]
fn group_commit_from_one_thread() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(dir.path(), 1)).unwrap();
    let g = IdGenerator::new(0, None);
    // Requests are queued when store() is called, before anyone awaits.
    let pending: Vec<_> = (0..64)
        .map(|_| spool.store(0, g.next(7), &envelope(1024), body(1024)))
        .collect();
    for f in pending {
        block_on(f).unwrap();
    }
    let stats = spool.stats().unwrap();
    assert_eq!(stats.messages, 64);
    assert!(stats.commits < 64, "{stats:?}");
}

#[test]
fn group_commit_from_many_threads() {
    const THREADS: usize = 64;
    const EACH: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(&cfg(dir.path(), 1)).unwrap());
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let spool = spool.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..EACH {
                    // Distinct ids without sharing a (non-Sync) generator.
                    let id = MessageId((1_000u64 << 22) | (t * EACH + i) as u64);
                    block_on(spool.store(0, id, &envelope(1024), body(1024))).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let stats = spool.stats().unwrap();
    let total = (THREADS * EACH) as u64;
    assert_eq!(stats.messages, total);
    assert_eq!(spool.count().unwrap(), total);
    assert!(stats.commits < total, "{stats:?}");
    assert!(stats.commits < 64 * EACH as u64 / 2, "{stats:?}");
}

#[test]
fn map_full_is_transient() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path(), 1);
    c.map_size = 1 << 20;
    let spool = Spool::open(&c).unwrap();
    let g = IdGenerator::new(0, None);
    let err = block_on(spool.store(0, g.next(1), &envelope(2 << 20), body(2 << 20))).unwrap_err();
    assert!(err.is_full(), "{err:?}");
    assert_eq!(spool.count().unwrap(), 0);
    assert!(!spool.is_failed());
    block_on(spool.store(0, g.next(1), &envelope(1024), body(1024))).unwrap();
    assert_eq!(spool.count().unwrap(), 1);
}

#[test]
fn map_full_only_fails_the_big_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path(), 1);
    c.map_size = 1 << 20;
    let spool = Spool::open(&c).unwrap();
    let g = IdGenerator::new(0, None);
    let ids: Vec<_> = (0..5).map(|_| g.next(1)).collect();
    let sizes = [1024, 2 << 20, 1024, 2 << 20, 1024];
    let pending: Vec<_> = ids
        .iter()
        .zip(sizes)
        .map(|(&id, n)| spool.store(0, id, &envelope(n), body(n)))
        .collect();
    let results: Vec<_> = pending.into_iter().map(block_on).collect();
    for (r, n) in results.iter().zip(sizes) {
        if n > 1024 {
            assert_eq!(r, &Err(SpoolError::Full));
        } else {
            assert_eq!(r, &Ok(()));
        }
    }
    assert_eq!(spool.count().unwrap(), 3);
    assert!(!spool.is_failed());
}

#[test]
fn survives_drop_without_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let id = IdGenerator::new(0, None).next(42);
    {
        let spool = Spool::open(&cfg(dir.path(), 1)).unwrap();
        block_on(spool.store(0, id, &envelope(100), body(100))).unwrap();
    }
    let spool = Spool::open(&cfg(dir.path(), 1)).unwrap();
    assert_eq!(spool.envelope(id).unwrap(), envelope(100));
    assert_eq!(spool.last_id(0).unwrap(), Some(id));
    assert_eq!(spool.stats().unwrap().messages, 1);
    // A generator seeded from the spool never reuses an id, even with an old clock.
    let g = IdGenerator::new(0, spool.last_id(0).unwrap());
    block_on(spool.store(0, g.next(1), &envelope(1), body(1))).unwrap();
}

#[test]
fn fewer_shards_keeps_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let id = IdGenerator::new(3, None).next(42);
    {
        let spool = Spool::open(&cfg(dir.path(), 4)).unwrap();
        block_on(spool.store(3, id, &envelope(100), body(100))).unwrap();
    }
    let spool = Spool::open(&cfg(dir.path(), 2)).unwrap();
    assert_eq!(spool.shard_count(), 4);
    assert_eq!(spool.count().unwrap(), 1);
    assert!(spool.with_body(id, |b| b == body(100).as_slice()).unwrap());
    block_on(spool.remove(id)).unwrap();
}

#[test]
fn readonly() {
    let dir = tempfile::tempdir().unwrap();
    assert!(Spool::open_readonly(dir.path()).is_err());
    let id = IdGenerator::new(1, None).next(42);
    {
        let spool = Spool::open(&cfg(dir.path(), 2)).unwrap();
        block_on(spool.store(1, id, &envelope(100), body(100))).unwrap();
    }
    let ro = Spool::open_readonly(dir.path()).unwrap();
    assert_eq!(ro.shard_count(), 2);
    assert_eq!(ro.count().unwrap(), 1);
    assert_eq!(ro.envelope(id).unwrap(), envelope(100));
    assert!(ro.with_body(id, |b| b == body(100).as_slice()).unwrap());
    let mut n = 0;
    ro.list(|_, _| {
        n += 1;
        true
    })
    .unwrap();
    assert_eq!(n, 1);
    assert_eq!(ro.stats().unwrap().messages, 1);
    let other = IdGenerator::new(1, Some(id)).next(42);
    assert_eq!(
        block_on(ro.store(1, other, &envelope(1), body(1))),
        Err(SpoolError::ReadOnly)
    );
    ro.shutdown();
}

#[test]
fn rejects_duplicates_and_wrong_shard() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(dir.path(), 2)).unwrap();
    let id = IdGenerator::new(0, None).next(1);
    block_on(spool.store(0, id, &envelope(3), body(3))).unwrap();
    assert_eq!(
        block_on(spool.store(0, id, &envelope(9), body(9))),
        Err(SpoolError::Duplicate(id))
    );
    assert_eq!(spool.envelope(id).unwrap().size, 3);
    assert!(matches!(
        block_on(spool.store(1, id, &envelope(3), body(3))),
        Err(SpoolError::BadId(_))
    ));
    let far = IdGenerator::new(5, None).next(1);
    assert_eq!(
        block_on(spool.store(5, far, &envelope(3), body(3))),
        Err(SpoolError::NoShard(5))
    );
}

#[test]
fn closed_after_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(dir.path(), 1)).unwrap();
    let g = IdGenerator::new(0, None);
    let queued = spool.store(0, g.next(1), &envelope(3), body(3));
    spool.shutdown();
    // Queued before shutdown: committed, not dropped.
    block_on(queued).unwrap();
    assert_eq!(
        block_on(spool.store(0, g.next(1), &envelope(3), body(3))),
        Err(SpoolError::Closed)
    );
    assert_eq!(spool.count().unwrap(), 1);
    spool.shutdown();
}

#[test]
fn failed_spool_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(dir.path(), 1)).unwrap();
    assert!(!spool.is_failed());
    spool.health.fail("injected".into());
    assert!(spool.is_failed());
    let g = IdGenerator::new(0, None);
    assert_eq!(
        block_on(spool.store(0, g.next(1), &envelope(3), body(3))),
        Err(SpoolError::Failed("injected".into()))
    );
    assert_eq!(spool.count().unwrap(), 0);
}

#[test]
fn undecodable_envelope_is_corrupt() {
    let id = MessageId(0xABCD);
    let good = envelope(1).encode().unwrap();
    assert_eq!(Envelope::decode(id, &good).unwrap(), envelope(1));
    for bad in [&[][..], &[9, 1, 2][..], &good[..good.len() / 2]] {
        match Envelope::decode(id, bad) {
            Err(SpoolError::Corrupt(msg)) => assert!(msg.contains(&id.to_string()), "{msg}"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn corrupt_envelope_is_skipped_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(dir.path(), 1)).unwrap();
    let g = IdGenerator::new(0, None);
    let (good, bad) = (g.next(1), g.next(1));
    block_on(spool.store(0, good, &envelope(7), body(7))).unwrap();
    // Bypass encoding to plant bytes that do not decode.
    let rx = spool
        .submit(
            0,
            crate::writer::OpKind::Store {
                id: bad,
                envelope: vec![1, 0xFF, 0xFF],
                prefix: Vec::new(),
                body: body(7),
            },
        )
        .unwrap();
    block_on(rx).unwrap().unwrap();
    match spool.envelope(bad) {
        Err(SpoolError::Corrupt(msg)) => assert!(msg.contains(&bad.to_string())),
        other => panic!("{other:?}"),
    }
    let report = spool.recover().unwrap();
    assert_eq!((report.messages, report.bytes, report.corrupt), (1, 7, 1));
    let mut seen = Vec::new();
    spool
        .list(|id, _| {
            seen.push(id);
            true
        })
        .unwrap();
    assert_eq!(seen, vec![good]);
    assert!(!spool.is_failed());
}

#[test]
fn shareable_across_threads() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send_static<T: Send + 'static>(_: &T) {}
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(dir.path(), 1)).unwrap();
    send_sync(&spool);
    let id = IdGenerator::new(0, None).next(1);
    let fut = spool.store(0, id, &envelope(1), body(1));
    send_static(&fut);
    block_on(fut).unwrap();
    let fut = spool.remove(id);
    send_static(&fut);
    block_on(fut).unwrap();
}

#[test]
fn update_replaces_envelope_and_fails_for_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(&SpoolConfig {
        path: dir.path().to_path_buf(),
        shards: 1,
        map_size: 16 << 20,
        max_batch: 64,
        sync: false,
        removal_linger: std::time::Duration::ZERO,
    })
    .expect("open");
    let ids = IdGenerator::new(0, None);
    let id = ids.next(1_700_000_000_000);
    let mut env = envelope(4);
    futures_lite::future::block_on(spool.store(0, id, &env, b"body".to_vec())).expect("store");
    env.schedule.attempts = 3;
    env.schedule.next_attempt_unix_ms = 42;
    env.recipients[0].status = RecipientStatus::Deferred {
        reply: "451 later".into(),
        attempts: 3,
    };
    futures_lite::future::block_on(spool.update(id, &env)).expect("update");
    assert_eq!(spool.envelope(id).expect("read"), env);
    spool
        .with_body(id, |b| assert_eq!(b, b"body"))
        .expect("body kept");
    futures_lite::future::block_on(spool.remove(id)).expect("remove");
    let err = futures_lite::future::block_on(spool.update(id, &env)).expect_err("gone");
    assert_eq!(err, SpoolError::NotFound(id));
}

/// A spool whose removals wait up to `linger` for a commit to ride.
fn lingering(path: &Path, linger: std::time::Duration) -> Spool {
    Spool::open(&SpoolConfig {
        removal_linger: linger,
        ..cfg(path, 1)
    })
    .expect("open")
}

#[test]
fn a_removal_rides_the_next_store_commit_instead_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    // Far longer than the test: the removal can only end by riding the store.
    let spool = lingering(dir.path(), std::time::Duration::from_secs(10));
    let g = IdGenerator::new(0, None);
    let done = g.next(1);
    block_on(spool.store(0, done, &envelope(3), body(3))).unwrap();
    let before = spool.stats().unwrap().commits;
    let removal = spool.remove(done);
    let started = std::time::Instant::now();
    block_on(spool.store(0, g.next(1), &envelope(3), body(3))).unwrap();
    block_on(removal).unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "the removal waited for its linger instead of riding the store"
    );
    assert_eq!(
        spool.stats().unwrap().commits - before,
        1,
        "the store and the removal were one commit"
    );
    assert_eq!(spool.count().unwrap(), 1);
    assert_eq!(spool.envelope(done), Err(SpoolError::NotFound(done)));
}

#[test]
fn a_lone_removal_commits_by_itself_once_its_linger_is_over() {
    let dir = tempfile::tempdir().unwrap();
    let linger = std::time::Duration::from_millis(100);
    let spool = lingering(dir.path(), linger);
    let id = IdGenerator::new(0, None).next(1);
    block_on(spool.store(0, id, &envelope(3), body(3))).unwrap();
    let before = spool.stats().unwrap().commits;
    let started = std::time::Instant::now();
    block_on(spool.remove(id)).unwrap();
    assert!(
        started.elapsed() >= linger,
        "a removal with nothing to ride committed before its linger was over"
    );
    assert_eq!(spool.stats().unwrap().commits - before, 1);
    assert_eq!(spool.count().unwrap(), 0);
}

#[test]
fn held_removals_are_committed_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let g = IdGenerator::new(0, None);
    let ids: Vec<MessageId> = (0..3).map(|_| g.next(1)).collect();
    {
        let spool = lingering(dir.path(), std::time::Duration::from_secs(10));
        for &id in &ids {
            block_on(spool.store(0, id, &envelope(3), body(3))).unwrap();
        }
        let removals: Vec<_> = ids[..2].iter().map(|&id| spool.remove(id)).collect();
        spool.shutdown();
        for removal in removals {
            block_on(removal).expect("a held removal is committed, not dropped, at shutdown");
        }
    }
    let reopened = Spool::open(&cfg(dir.path(), 1)).unwrap();
    assert_eq!(reopened.count().unwrap(), 1, "both removals are on disk");
    assert!(reopened.envelope(ids[2]).is_ok());
}

#[test]
fn a_batch_full_of_removals_commits_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&SpoolConfig {
        removal_linger: std::time::Duration::from_secs(10),
        max_batch: 4,
        ..cfg(dir.path(), 1)
    })
    .unwrap();
    let g = IdGenerator::new(0, None);
    let ids: Vec<MessageId> = (0..4).map(|_| g.next(1)).collect();
    for &id in &ids {
        block_on(spool.store(0, id, &envelope(3), body(3))).unwrap();
    }
    let started = std::time::Instant::now();
    let removals: Vec<_> = ids.iter().map(|&id| spool.remove(id)).collect();
    for removal in removals {
        block_on(removal).unwrap();
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "four removals fill a batch of four and commit at once"
    );
    assert_eq!(spool.count().unwrap(), 0);
}
