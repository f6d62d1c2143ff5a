//! One Sieve system script run per stage, as the filter chain runs it on the
//! executor (`SieveSet::run`): a 20-line script at RCPT (no message) and at
//! DATA on messages of 10 KiB to 1 MiB (the message is parsed for every run:
//! that is what grows). The figures decide `SIEVE_OFFLOAD_BYTES` in
//! engine/src/filters: BENCHMARKS.md "Sieve".

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_policy::lists::Lists;
use sluice_policy::sieve::{SieveConfig, SieveExtras, SieveSet};
use sluice_policy::stage::{ClientFacts, Stage, StageEvent};

/// 20 lines: envelope and header tests, a list lookup, variables, editheader.
const SCRIPT: &str = r#"require ["envelope", "reject", "fileinto", "variables", "editheader", "extlists", "regex", "environment"];
if envelope :list "from" "blocked" { reject "sender blocked"; stop; }
if envelope :domain :is "to" "closed.example" { reject "domain closed"; stop; }
if envelope :localpart :regex "to" "^(postmaster|abuse)$" { keep; stop; }
if address :domain :is "from" "spam.example" { fileinto "Quarantine"; stop; }
if header :contains "Subject" ["viagra", "lottery", "winner"] { fileinto "Quarantine"; stop; }
if header :regex "Subject" "^\\[(SPAM|BULK)\\]" { discard; stop; }
if exists "X-Spam-Flag" { deleteheader "X-Spam-Flag"; }
if size :over 5M { reject "too big for this route"; stop; }
if environment :is "remote-ip" "192.0.2.66" { reject "bad client"; stop; }
set "ip" "${env.remote_ip}";
set "helo" "${env.helo}";
if string :matches "${helo}" "*.dynamic.example" { fileinto "Quarantine"; stop; }
if header :matches "From" "*<*@*>" { set "fromdomain" "${3}"; }
if string :is "${fromdomain}" "forged.example" { reject "forged"; stop; }
if envelope :matches "to" "*+*@*" { set "detail" "${2}"; }
if string :is "${detail}" "nospam" { discard; stop; }
if header :contains "List-Id" "announce" { keep; }
addheader "X-Policy" "checked ${ip}";
keep;
"#;

fn message(size: usize) -> Vec<u8> {
    let mut m = b"Received: from client.example ([192.0.2.9])\r\n\tby relay.example (sluice) with ESMTP id 1;\r\n\tSun, 6 Dec 2026 04:00:00 +0000\r\nFrom: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: quarterly report\r\nMessage-ID: <1@example.org>\r\nDate: Sun, 6 Dec 2026 04:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n".to_vec();
    let line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n";
    while m.len() < size {
        m.extend_from_slice(line);
    }
    m
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.sieve");
    std::fs::write(&path, SCRIPT).expect("script");
    let cfg = SieveConfig {
        rcpt: Some(path.clone()),
        data: Some(path),
        ..Default::default()
    };
    let lists = Lists::from_entries([("blocked", vec!["@blocked.example"])]);
    let set = SieveSet::load(&cfg, "relay.example", Arc::new(lists)).expect("compile");
    let client = ClientFacts {
        listener: "smtp".into(),
        ip: "192.0.2.9".parse().expect("ip"),
        port: 40000,
        ptr: None,
        helo: Some("client.example".into()),
        tls: None,
        auth_user: None,
        server_name: "relay.example".into(),
    };
    let recipients = vec!["bob@example.net".to_string()];
    let extras = SieveExtras::default();

    let mut g = c.benchmark_group("sieve_stage");
    g.bench_function("rcpt", |b| {
        let event = StageEvent {
            stage: Stage::Rcpt,
            client: &client,
            queue_id: None,
            sender: Some("alice@example.org"),
            sender_params: &[],
            recipient: Some("bob@example.net"),
            recipients: &[],
            message: None,
        };
        b.iter(|| black_box(set.run(black_box(&event), &extras).expect("run")))
    });
    for size in [10 << 10, 64 << 10, 256 << 10, 1 << 20] {
        let msg = message(size);
        g.throughput(Throughput::Bytes(msg.len() as u64));
        g.bench_with_input(BenchmarkId::new("data", size), &msg, |b, msg| {
            let event = StageEvent {
                stage: Stage::Data,
                client: &client,
                queue_id: Some("1"),
                sender: Some("alice@example.org"),
                sender_params: &[],
                recipient: None,
                recipients: &recipients,
                message: Some(msg),
            };
            b.iter(|| black_box(set.run(black_box(&event), &extras).expect("run")))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
