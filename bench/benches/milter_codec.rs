//! The milter client's protocol work for one 10 KiB message, no sockets:
//! encoding the Data stage (macros, 20 header fields, EOH, body, EOM) and
//! decoding an end-of-message answer (5 modifications and a 10 KiB body
//! replacement). `sluice_policy::milter`, the code the engine runs per milter.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_policy::milter::codec::{self, action, proto};
use sluice_policy::milter::{MilterLimits, MilterProtocol, Poll, SessionExtras};
use sluice_policy::stage::{ClientFacts, Stage, StageEvent};

const ENVELOPE_SKIPPED: u32 = proto::NOCONNECT | proto::NOHELO | proto::NOMAIL | proto::NORCPT;

fn frame(code: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    codec::encode_frame(&mut out, code, data);
    out
}

fn negotiated(protocol: u32) -> MilterProtocol {
    let mut p = MilterProtocol::new(MilterLimits::default());
    p.negotiate();
    let mut data = Vec::new();
    for w in [6u32, action::ALL, protocol] {
        data.extend_from_slice(&w.to_be_bytes());
    }
    let reply = frame(b'O', &data);
    loop {
        match p.poll().expect("negotiation") {
            Poll::Write(_) => {}
            Poll::Read => p.feed(&reply),
            Poll::Done(_) => return p,
        }
    }
}

fn message_10k() -> Vec<u8> {
    let mut m = Vec::new();
    for i in 0..20 {
        m.extend_from_slice(
            format!("X-Header-{i}: value number {i} of the header block\r\n").as_bytes(),
        );
    }
    m.extend_from_slice(b"\r\n");
    while m.len() < 10 * 1024 {
        m.extend_from_slice(
            b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n",
        );
    }
    m
}

/// One Data stage: everything written, then `reply` fed; bytes written.
fn run(p: &mut MilterProtocol, event: &StageEvent<'_>, reply: &[u8]) -> usize {
    p.begin(event, &SessionExtras::default()).expect("begin");
    let mut written = 0;
    loop {
        match p.poll().expect("poll") {
            Poll::Write(b) => written += b.len(),
            Poll::Read => p.feed(reply),
            Poll::Done(o) => {
                black_box(o);
                return written;
            }
        }
    }
}

fn bench(c: &mut Criterion) {
    let facts = ClientFacts {
        listener: "smtp".into(),
        ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        port: 40000,
        ptr: None,
        helo: Some("client.example".into()),
        tls: None,
        auth_user: None,
        server_name: "mx.example.net".into(),
    };
    let msg = message_10k();
    let rcpts = vec!["b@example.com".to_string()];
    let event = StageEvent {
        stage: Stage::Data,
        client: &facts,
        queue_id: Some("Q1"),
        sender: Some("a@example.org"),
        sender_params: &[],
        recipient: None,
        recipients: &rcpts,
        message: Some(&msg),
    };
    let mut g = c.benchmark_group("milter_codec");
    g.throughput(Throughput::Bytes(msg.len() as u64));

    // Encode: headers and body not answered (NR_*), one 'c' at EOM.
    let nr = ENVELOPE_SKIPPED | proto::NR_DATA | proto::NR_HDR | proto::NR_EOH | proto::NR_BODY;
    let mut p = negotiated(nr);
    let accept = frame(b'c', &[]);
    assert!(run(&mut p, &event, &accept) > msg.len());
    g.bench_function("encode_10k_message", |b| {
        b.iter(|| black_box(run(&mut p, &event, &accept)))
    });

    // Decode: only EOM sent; the answer carries the changes.
    let only_eom = ENVELOPE_SKIPPED | proto::NODATA | proto::NOHDRS | proto::NOEOH | proto::NOBODY;
    let mut p = negotiated(only_eom);
    let mut answer = Vec::new();
    answer.extend(frame(b'h', b"X-Spam-Score\x001.5\0"));
    answer.extend(frame(b'h', b"X-Filtered\0yes\0"));
    answer.extend(frame(b'm', b"\0\0\0\x01Subject\0[tagged] hello\0"));
    answer.extend(frame(b'+', b"<archive@example.com>\0"));
    answer.extend(frame(b'e', b"<bounce@example.org>\0"));
    let body = &msg[msg.len() - 10 * 1024..];
    for chunk in body.chunks(4096) {
        answer.extend(frame(b'b', chunk));
    }
    answer.extend(frame(b'a', &[]));
    g.bench_function("decode_10k_eom_answer", |b| {
        b.iter(|| black_box(run(&mut p, &event, &answer)))
    });

    // Both: the whole 10 KiB message out, the 10 KiB answer in.
    let mut p = negotiated(nr);
    g.bench_function("encode_and_decode_10k", |b| {
        b.iter(|| black_box(run(&mut p, &event, &answer)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
