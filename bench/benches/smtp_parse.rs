//! Command parsing (commands/s) and DATA ingestion (MB/s) through the sans-IO
//! server session, the same code the relay runs per connection.

use std::hint::black_box;
use std::rc::Rc;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_engine::auth_guard::AuthGuard;
use sluice_engine::config::AuthSection;
use sluice_engine::config::{BareNewline, NulBytes, Protocol};
use sluice_engine::smtp::data::DataDecoder;
use sluice_engine::smtp::server::{Action, PeerInfo, Session, SessionConfig};
use sluice_policy::{NetworkList, RelayPolicy};
use sluice_spool::IdGenerator;

fn session_config() -> Arc<SessionConfig> {
    let relay = RelayPolicy::new(&[], NetworkList::parse(&["127.0.0.0/8"]).expect("networks"))
        .expect("policy");
    Arc::new(SessionConfig {
        listener: "bench".into(),
        hostname: "bench.test".into(),
        greeting: "ESMTP".into(),
        protocol: Protocol::Smtp,
        starttls: false,
        auth_plaintext: false,
        auth_enabled: false,
        max_message_size: 64 << 20,
        max_recipients: 100_000,
        max_line_length: 2048,
        max_errors: usize::MAX,
        bare_newline: BareNewline::Reject,
        nul_bytes: NulBytes::Reject,
        max_message_line_length: 998,
        relay: Arc::new(relay),
        auth_guard: Arc::new(AuthGuard::new(&AuthSection::default())),
        untrusted: Default::default(),
        verify: None,
        honor_tls_required_no: false,
        filters: None,
        filter_stages: Default::default(),
        dnsbl: false,
        greylist: false,
        add_missing_headers: sluice_engine::config::AddMissingHeaders::No,
        sender_logins: None,
        rewrite: None,
    })
}

fn new_session(cfg: &Arc<SessionConfig>) -> Session {
    let mut s = Session::new(
        cfg.clone(),
        Rc::new(IdGenerator::new(0, None)),
        PeerInfo {
            ip: "127.0.0.1".parse().expect("ip"),
            port: 1,
            tls: None,
        },
    );
    s.greeting();
    s.clear_output();
    s
}

/// A body of `size` bytes in 78-byte lines, some dot-stuffed, ending in CRLF.CRLF.
fn wire_body(size: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(size + 100);
    let mut n = 0u64;
    while body.len() < size {
        if n.is_multiple_of(20) {
            body.push(b'.');
        }
        body.extend_from_slice(
            format!("{n:08} The quick brown fox jumps over the lazy dog, again and again..\r\n")
                .as_bytes(),
        );
        n += 1;
    }
    body.extend_from_slice(b".\r\n");
    body
}

fn bench_commands(c: &mut Criterion) {
    let cfg = session_config();
    // One pipelined group as a bulk client sends it.
    let mut block = Vec::new();
    let per_block = 100;
    for i in 0..per_block / 5 {
        block.extend_from_slice(
            format!("MAIL FROM:<sender{i}@example.org> SIZE=2048 BODY=8BITMIME\r\n").as_bytes(),
        );
        block.extend_from_slice(
            format!(
                "RCPT TO:<rcpt{i}@example.com> NOTIFY=FAILURE ORCPT=rfc822;rcpt{i}@example.com\r\n"
            )
            .as_bytes(),
        );
        block.extend_from_slice(format!("RCPT TO:<other{i}@example.net>\r\n").as_bytes());
        block.extend_from_slice(b"NOOP\r\n");
        block.extend_from_slice(b"RSET\r\n");
    }
    let mut group = c.benchmark_group("smtp_commands");
    group.throughput(Throughput::Elements(per_block as u64));
    group.bench_function("pipelined_mail_rcpt_rset", |b| {
        let mut s = new_session(&cfg);
        let (_, _) = s.receive(b"EHLO bench.client\r\n", 0);
        s.clear_output();
        b.iter(|| {
            let (used, action) = s.receive(black_box(&block), 0);
            assert!(matches!(action, Action::Read) && used == block.len());
            s.clear_output();
        })
    });
    group.finish();
}

fn bench_data(c: &mut Criterion) {
    let mut group = c.benchmark_group("data_ingestion");
    for size in [1usize << 10, 32 << 10, 1 << 20] {
        let body = wire_body(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(format!("decoder_{}KiB", size >> 10), |b| {
            let mut out = Vec::with_capacity(body.len());
            b.iter(|| {
                out.clear();
                let mut d = DataDecoder::new(u64::MAX, 0);
                // 16 KiB reads, as from a socket.
                let mut done = false;
                for chunk in body.chunks(16 << 10) {
                    if d.feed(black_box(chunk), &mut out).is_some() {
                        done = true;
                    }
                }
                assert!(done);
            })
        });
        let cfg = session_config();
        group.bench_function(format!("session_transaction_{}KiB", size >> 10), |b| {
            let mut s = new_session(&cfg);
            let (_, _) = s.receive(b"EHLO bench.client\r\n", 0);
            b.iter(|| {
                let (_, a) = s.receive(
                    b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n",
                    0,
                );
                assert!(matches!(a, Action::Read));
                let mut stored = None;
                for chunk in body.chunks(16 << 10) {
                    let (_, action) = s.receive(black_box(chunk), 0);
                    if let Action::Store(sub) = action {
                        stored = Some(sub);
                    }
                }
                let sub = stored.expect("message completed");
                black_box(&sub.body);
                let summary = sluice_engine::smtp::server::TxSummary::of(&sub.envelope);
                s.store_result(sub.id, &summary, Ok(()));
                s.clear_output();
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
    targets = bench_commands, bench_data
}
criterion_main!(benches);
