//! Byte-level tests of the milter client: what goes out for each stage, what
//! each reply and modification means, frames split anywhere, bounds.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::codec::{self, action, cmd, proto, reply, FrameDecoder};
use super::*;
use crate::stage::{
    ClientFacts, FilterOutcome, FilterReply, Modification, Stage, StageEvent, Verdict,
};

fn frame(code: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    codec::encode_frame(&mut out, code, data);
    out
}

fn optneg_reply(actions: u32, protocol: u32, symlists: &[(u32, &str)]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&6u32.to_be_bytes());
    data.extend_from_slice(&actions.to_be_bytes());
    data.extend_from_slice(&protocol.to_be_bytes());
    for (i, names) in symlists {
        data.extend_from_slice(&i.to_be_bytes());
        data.extend_from_slice(names.as_bytes());
        data.push(0);
    }
    frame(b'O', &data)
}

/// Run the current stage to Done, answering Reads from `replies` `step`
/// bytes at a time. Returns everything written and the outcome.
fn drive_split(p: &mut MilterProtocol, replies: &[u8], step: usize) -> (Vec<u8>, FilterOutcome) {
    let mut written = Vec::new();
    let mut at = 0;
    loop {
        match p.poll().expect("protocol") {
            Poll::Write(b) => written.extend_from_slice(&b),
            Poll::Read => {
                assert!(at < replies.len(), "client wants more than the milter said");
                let end = (at + step).min(replies.len());
                p.feed(&replies[at..end]);
                at = end;
            }
            Poll::Done(o) => {
                assert_eq!(at, replies.len(), "replies left unread");
                return (written, o);
            }
        }
    }
}

fn drive(p: &mut MilterProtocol, replies: &[u8]) -> (Vec<u8>, FilterOutcome) {
    drive_split(p, replies, usize::MAX / 2)
}

fn connected(actions: u32, protocol: u32) -> MilterProtocol {
    let mut p = MilterProtocol::new(MilterLimits::default());
    p.negotiate();
    let (_, o) = drive(&mut p, &optneg_reply(actions, protocol, &[]));
    assert_eq!(o, FilterOutcome::accept());
    p
}

fn facts() -> ClientFacts {
    ClientFacts {
        listener: "smtp".into(),
        ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        port: 40000,
        ptr: Some("client.example".into()),
        helo: Some("client.example".into()),
        tls: Some(("TLSv1.3".into(), "TLS13_AES_128_GCM_SHA256".into())),
        auth_user: Some("alice".into()),
        server_name: "mx.example.net".into(),
    }
}

fn event<'a>(
    stage: Stage,
    c: &'a ClientFacts,
    rcpts: &'a [String],
    msg: Option<&'a [u8]>,
) -> StageEvent<'a> {
    StageEvent {
        stage,
        client: c,
        queue_id: Some("Q1"),
        sender: Some("a@example.org"),
        sender_params: &[],
        recipient: if stage == Stage::Rcpt {
            rcpts.last().map(|s| s.as_str())
        } else {
            None
        },
        recipients: rcpts,
        message: msg,
    }
}

/// Split written bytes into (code, data) frames.
fn frames(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut d = FrameDecoder::new(usize::MAX);
    d.push(bytes);
    let mut out = Vec::new();
    while let Some(f) = d.next_frame().expect("frame") {
        out.push((f.code, f.data));
    }
    assert_eq!(d.pending(), 0);
    out
}

fn codes(bytes: &[u8]) -> String {
    frames(bytes).iter().map(|(c, _)| char::from(*c)).collect()
}

const C: u8 = reply::CONTINUE;

#[test]
fn optneg_offers_version_6_all_actions_and_flags() {
    let mut p = MilterProtocol::new(MilterLimits::default());
    p.negotiate();
    let Poll::Write(out) = p.poll().unwrap() else {
        panic!("write first")
    };
    let mut want = vec![0, 0, 0, 13, b'O', 0, 0, 0, 6];
    want.extend_from_slice(&0x1FFu32.to_be_bytes());
    want.extend_from_slice(&proto::OFFERED.to_be_bytes());
    assert_eq!(out, want);
    assert_eq!(p.poll().unwrap(), Poll::Read);
    p.feed(&optneg_reply(
        action::ADDHDRS,
        proto::NR_HDR | proto::NOHELO,
        &[(2, "{mail_addr} i")],
    ));
    assert_eq!(p.poll().unwrap(), Poll::Done(FilterOutcome::accept()));
    let n = p.negotiated().unwrap();
    assert_eq!((n.version, n.actions), (6, action::ADDHDRS));
    assert!(n.has(proto::NR_HDR) && n.has(proto::NOHELO) && !n.has(proto::NOMAIL));
    assert_eq!(
        n.symlists[2],
        Some(vec!["{mail_addr}".to_string(), "i".to_string()])
    );
}

#[test]
fn optneg_refuses_what_was_not_offered() {
    for (actions, protocol, version) in [
        (0x200, 0, 6),
        (0, proto::RCPT_REJ, 6),
        (0, proto::HDR_LEADSPC, 6),
        (0, 0, 1),
        (0, 0, 7),
    ] {
        let mut data = Vec::new();
        for w in [version, actions, protocol] {
            data.extend_from_slice(&u32::to_be_bytes(w));
        }
        let mut p = MilterProtocol::new(MilterLimits::default());
        p.negotiate();
        assert!(matches!(p.poll().unwrap(), Poll::Write(_)));
        p.feed(&frame(b'O', &data));
        let e = p.poll().unwrap_err();
        assert!(
            matches!(e, MilterError::NotOffered { .. } | MilterError::Version(_)),
            "{e}"
        );
    }
    // Truncated, and something that is not OPTNEG at all.
    for bad in [frame(b'O', &[0, 0, 0, 6, 0, 0]), frame(b'c', &[])] {
        let mut p = MilterProtocol::new(MilterLimits::default());
        p.negotiate();
        p.poll().unwrap();
        p.feed(&bad);
        assert!(p.poll().is_err());
    }
}

#[test]
fn connect_sends_macros_and_address() {
    let mut p = connected(0, 0);
    let c = facts();
    let extras = SessionExtras {
        local_addr: Some(SocketAddr::from(([198, 51, 100, 1], 25))),
        auth_type: None,
    };
    p.begin(&event(Stage::Connect, &c, &[], None), &extras)
        .unwrap();
    let (out, o) = drive(&mut p, &frame(C, &[]));
    assert_eq!(o.verdict, Verdict::Accept);
    let f = frames(&out);
    assert_eq!(f.len(), 2);
    assert_eq!(f[0].0, cmd::MACRO);
    assert_eq!(f[0].1[0], b'C');
    let macros = String::from_utf8_lossy(&f[0].1[1..]).to_string();
    for pair in [
        "j\0mx.example.net\0",
        "_\0client.example [192.0.2.7]\0",
        "{daemon_name}\0smtp\0",
        "{if_addr}\x00198.51.100.1\0",
    ] {
        assert!(macros.contains(pair), "{pair:?} in {macros:?}");
    }
    let mut want = b"client.example\x004".to_vec();
    want.extend_from_slice(&40000u16.to_be_bytes());
    want.extend_from_slice(b"192.0.2.7\0");
    assert_eq!(f[1], (cmd::CONNECT, want));
}

#[test]
fn symlist_limits_macros_sent() {
    let mut p = MilterProtocol::new(MilterLimits::default());
    p.negotiate();
    drive(
        &mut p,
        &optneg_reply(0, 0, &[(0, "j"), (2, "{auth_authen}")]),
    );
    let c = facts();
    let extras = SessionExtras {
        auth_type: Some("PLAIN".into()),
        ..Default::default()
    };
    p.begin(&event(Stage::Mail, &c, &[], None), &extras)
        .unwrap();
    let replies = [frame(C, &[]), frame(C, &[]), frame(C, &[])].concat();
    let (out, _) = drive_split(&mut p, &replies, 5);
    let f = frames(&out);
    // connect (caught up), helo, mail; macros for connect and mail only as asked.
    assert_eq!(codes(&out), "DCDHDM");
    assert_eq!(f[0].1, b"Cj\0mx.example.net\0");
    // HELO's macros: TLS ones (no list asked for that step).
    assert!(String::from_utf8_lossy(&f[2].1).contains("{tls_version}\0TLSv1.3\0"));
    assert_eq!(f[4].1, b"M{auth_authen}\0alice\0");
    assert_eq!(f[5].1, b"<a@example.org>\0");
}

#[test]
fn mail_macros_by_default() {
    let mut p = connected(0, proto::NOCONNECT | proto::NOHELO);
    let c = facts();
    let extras = SessionExtras {
        auth_type: Some("PLAIN".into()),
        ..Default::default()
    };
    p.begin(&event(Stage::Mail, &c, &[], None), &extras)
        .unwrap();
    let (out, o) = drive(&mut p, &frame(C, &[]));
    assert_eq!(o.verdict, Verdict::Accept);
    assert_eq!(codes(&out), "DM", "connect and helo skipped as asked");
    let m = String::from_utf8_lossy(&frames(&out)[0].1).to_string();
    for pair in [
        "i\0Q1\0",
        "{auth_authen}\0alice\0",
        "{auth_type}\0PLAIN\0",
        "{mail_addr}\0a@example.org\0",
    ] {
        assert!(m.contains(pair), "{pair:?} in {m:?}");
    }
}

#[test]
fn no_reply_flags_skip_waiting() {
    let all_nr = proto::NR_CONN | proto::NR_HELO | proto::NR_MAIL | proto::NR_RCPT;
    let mut p = connected(0, all_nr);
    let c = facts();
    let rcpts = vec!["b@example.com".to_string()];
    p.begin(
        &event(Stage::Rcpt, &c, &rcpts, None),
        &SessionExtras::default(),
    )
    .unwrap();
    let (out, o) = drive(&mut p, &[]);
    assert_eq!(o.verdict, Verdict::Accept);
    assert_eq!(codes(&out), "DCDHDMDR");
}

#[test]
fn each_reply_maps_to_a_verdict() {
    let reject = FilterReply {
        code: 550,
        enhanced: Some("5.7.1".into()),
        text: "Command rejected".into(),
    };
    let cases: Vec<(Vec<u8>, Verdict)> = vec![
        (frame(b'a', &[]), Verdict::Accept),
        (frame(b'c', &[]), Verdict::Accept),
        (frame(b'r', &[]), Verdict::Reject(reject)),
        (
            frame(b't', &[]),
            Verdict::Tempfail(FilterReply {
                code: 451,
                enhanced: Some("4.7.1".into()),
                text: "Service unavailable - try again later".into(),
            }),
        ),
        (
            frame(b'y', b"554 5.7.0 Go away\0"),
            Verdict::Reject(FilterReply {
                code: 554,
                enhanced: Some("5.7.0".into()),
                text: "Go away".into(),
            }),
        ),
        (
            frame(b'y', b"421 later\0"),
            Verdict::Tempfail(FilterReply {
                code: 421,
                enhanced: None,
                text: "later".into(),
            }),
        ),
        // Progress first, then the answer.
        (
            [frame(b'p', &[]), frame(b'r', &[])].concat(),
            Verdict::Reject(FilterReply {
                code: 550,
                enhanced: Some("5.7.1".into()),
                text: "Command rejected".into(),
            }),
        ),
    ];
    let c = facts();
    for (replies, want) in cases {
        let mut p = connected(0, proto::NOCONNECT | proto::NOHELO);
        p.begin(
            &event(Stage::Mail, &c, &[], None),
            &SessionExtras::default(),
        )
        .unwrap();
        let (_, o) = drive(&mut p, &replies);
        assert_eq!(o.verdict, want, "{replies:?}");
    }
}

#[test]
fn replycode_parsing() {
    let r = codec::parse_replycode(b"550-5.7.1 first line\r\n550 5.7.1 second\0").unwrap();
    assert_eq!(
        r,
        FilterReply {
            code: 550,
            enhanced: Some("5.7.1".into()),
            text: "first line second".into()
        }
    );
    let r = codec::parse_replycode(b"451 4.3.0\0").unwrap();
    assert_eq!(
        (r.code, r.enhanced.as_deref(), r.text.as_str()),
        (451, Some("4.3.0"), "")
    );
    for bad in [
        &b"250 ok\0"[..],
        b"55 x\0",
        b"abc\0",
        b"550 4.7.1 mixed\0",
        b"\0",
        b"550-a\r\n451 b\0",
    ] {
        assert!(
            codec::parse_replycode(bad).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn accept_at_connect_ends_filtering_for_the_connection() {
    let mut p = connected(0, 0);
    let c = facts();
    p.begin(
        &event(Stage::Connect, &c, &[], None),
        &SessionExtras::default(),
    )
    .unwrap();
    assert_eq!(drive(&mut p, &frame(b'a', &[])).1.verdict, Verdict::Accept);
    p.begin(
        &event(Stage::Mail, &c, &[], None),
        &SessionExtras::default(),
    )
    .unwrap();
    let (out, o) = drive(&mut p, &[]);
    assert!(out.is_empty());
    assert_eq!(o.verdict, Verdict::Accept);
}

#[test]
fn reject_at_connect_sticks() {
    let mut p = connected(0, 0);
    let c = facts();
    p.begin(
        &event(Stage::Connect, &c, &[], None),
        &SessionExtras::default(),
    )
    .unwrap();
    assert!(matches!(
        drive(&mut p, &frame(b'r', &[])).1.verdict,
        Verdict::Reject(_)
    ));
    p.begin(
        &event(Stage::Ehlo, &c, &[], None),
        &SessionExtras::default(),
    )
    .unwrap();
    let (out, o) = drive(&mut p, &[]);
    assert!(out.is_empty());
    assert!(matches!(o.verdict, Verdict::Reject(_)));
}

#[test]
fn rcpt_reject_is_for_that_recipient_and_discard_waits_for_data() {
    let mut p = connected(0, proto::NOCONNECT | proto::NOHELO);
    let c = facts();
    let x = SessionExtras::default();
    p.begin(&event(Stage::Mail, &c, &[], None), &x).unwrap();
    drive(&mut p, &frame(C, &[]));
    let r1 = vec!["bad@example.com".to_string()];
    p.begin(&event(Stage::Rcpt, &c, &r1, None), &x).unwrap();
    assert!(matches!(
        drive(&mut p, &frame(b't', &[])).1.verdict,
        Verdict::Tempfail(_)
    ));
    let r2 = vec!["ok@example.com".to_string()];
    p.begin(&event(Stage::Rcpt, &c, &r2, None), &x).unwrap();
    assert_eq!(drive(&mut p, &frame(b'd', &[])).1.verdict, Verdict::Accept);
    let msg = b"Subject: x\r\n\r\nbody\r\n";
    p.begin(&event(Stage::Data, &c, &r2, Some(msg)), &x)
        .unwrap();
    let (out, o) = drive(&mut p, &[]);
    assert_eq!(o.verdict, Verdict::Discard);
    assert_eq!(
        codes(&out),
        "A",
        "the message is not sent; the transaction aborted"
    );
}

#[test]
fn data_sends_headers_eoh_body_chunks_eom() {
    let mut p = connected(
        0,
        proto::NOCONNECT | proto::NOHELO | proto::NOMAIL | proto::NORCPT,
    );
    let c = facts();
    let body = vec![b'x'; 70_000];
    let mut msg = b"Subject: hello\r\nX-Folded: a\r\n\tb\r\n\r\n".to_vec();
    msg.extend_from_slice(&body);
    let r = vec!["b@example.com".to_string()];
    p.begin(
        &event(Stage::Data, &c, &r, Some(&msg)),
        &SessionExtras::default(),
    )
    .unwrap();
    let replies = vec![frame(C, &[]); 7].concat();
    let (out, o) = drive(&mut p, &replies);
    assert_eq!(o, FilterOutcome::accept());
    let f = frames(&out);
    assert_eq!(codes(&out), "DTLLDNBBDE");
    assert_eq!(f[2].1, b"Subject\0hello\0");
    assert_eq!(f[3].1, b"X-Folded\0a\n\tb\0");
    assert_eq!(f[6].1.len(), 65_535);
    assert_eq!(f[7].1.len(), 70_000 - 65_535);
}

#[test]
fn skip_and_nr_hdr_and_no_body() {
    // NR_HDR: headers unanswered; SKIP during body drops the rest of it.
    let mut p = connected(
        0,
        proto::NOCONNECT
            | proto::NOHELO
            | proto::NOMAIL
            | proto::NORCPT
            | proto::NR_HDR
            | proto::NODATA,
    );
    let c = facts();
    let mut msg = b"A: 1\r\nB: 2\r\n\r\n".to_vec();
    msg.extend_from_slice(&vec![b'y'; 200_000]);
    p.begin(
        &event(Stage::Data, &c, &[], Some(&msg)),
        &SessionExtras::default(),
    )
    .unwrap();
    let replies = [frame(C, &[]), frame(b's', &[]), frame(C, &[])].concat();
    let (out, _) = drive(&mut p, &replies);
    assert_eq!(codes(&out), "LLDNBDE");
    // NOBODY/NOHDRS/NOEOH: only end of message.
    let mut p = connected(
        0,
        proto::NOCONNECT
            | proto::NOHELO
            | proto::NOMAIL
            | proto::NORCPT
            | proto::NODATA
            | proto::NOHDRS
            | proto::NOBODY
            | proto::NOEOH,
    );
    p.begin(
        &event(Stage::Data, &c, &[], Some(&msg)),
        &SessionExtras::default(),
    )
    .unwrap();
    let (out, _) = drive(&mut p, &frame(C, &[]));
    assert_eq!(codes(&out), "DE");
}

fn eom_with(actions: u32, replies: &[u8]) -> Result<FilterOutcome, MilterError> {
    let mut p = connected(
        actions,
        proto::NOCONNECT
            | proto::NOHELO
            | proto::NOMAIL
            | proto::NORCPT
            | proto::NODATA
            | proto::NOHDRS
            | proto::NOBODY
            | proto::NOEOH,
    );
    let c = facts();
    p.begin(
        &event(Stage::Data, &c, &[], Some(b"S: x\r\n\r\nb\r\n")),
        &SessionExtras::default(),
    )
    .unwrap();
    let mut p_out = Vec::new();
    let mut fed = false;
    loop {
        match p.poll()? {
            Poll::Write(b) => p_out.extend(b),
            Poll::Read => {
                assert!(!fed);
                p.feed(replies);
                fed = true;
            }
            Poll::Done(o) => return Ok(o),
        }
    }
}

#[test]
fn each_modification() {
    let mut r = Vec::new();
    r.extend(frame(b'h', b"X-Added\0yes\0"));
    let mut ins = 0u32.to_be_bytes().to_vec();
    ins.extend_from_slice(b"X-First\0one\ntwo\0");
    r.extend(frame(b'i', &ins));
    let mut chg = 2u32.to_be_bytes().to_vec();
    chg.extend_from_slice(b"Subject\0new\0");
    r.extend(frame(b'm', &chg));
    let mut del = 0u32.to_be_bytes().to_vec();
    del.extend_from_slice(b"X-Gone\0\0");
    r.extend(frame(b'm', &del));
    r.extend(frame(b'+', b"<new@example.com>\0"));
    r.extend(frame(b'2', b"par@example.com\0NOTIFY=NEVER\0"));
    r.extend(frame(b'-', b"<old@example.com>\0"));
    r.extend(frame(b'e', b"<bounce@example.org>\0SIZE=10\0"));
    r.extend(frame(b'b', b"new body\nline 2\n"));
    r.extend(frame(b'b', b"more\r\n"));
    r.extend(frame(b'a', &[]));
    let o = eom_with(action::ALL, &r).unwrap();
    assert_eq!(o.verdict, Verdict::Accept);
    assert_eq!(
        o.modifications,
        vec![
            Modification::AddHeader {
                name: "X-Added".into(),
                value: "yes".into(),
                index: Some(usize::MAX)
            },
            Modification::AddHeader {
                name: "X-First".into(),
                value: "one\r\ntwo".into(),
                index: Some(0)
            },
            Modification::ChangeHeader {
                name: "Subject".into(),
                occurrence: 2,
                value: "new".into()
            },
            Modification::ChangeHeader {
                name: "X-Gone".into(),
                occurrence: 1,
                value: String::new()
            },
            Modification::AddRecipient {
                address: "new@example.com".into()
            },
            Modification::AddRecipient {
                address: "par@example.com".into()
            },
            Modification::RemoveRecipient {
                address: "old@example.com".into()
            },
            Modification::ChangeSender {
                address: "bounce@example.org".into()
            },
            Modification::ReplaceBody {
                body: b"new body\r\nline 2\r\nmore\r\n".to_vec()
            },
        ]
    );
}

#[test]
fn quarantine_and_reject_at_eom() {
    let r = [frame(b'q', b"looks odd\0"), frame(b'c', &[])].concat();
    let o = eom_with(action::QUARANTINE, &r).unwrap();
    assert_eq!(
        o.verdict,
        Verdict::Quarantine {
            reason: "looks odd".into()
        }
    );
    let r = [frame(b'h', b"X\0y\0"), frame(b'y', b"550 5.7.1 spam\0")].concat();
    let o = eom_with(action::ADDHDRS, &r).unwrap();
    assert!(matches!(o.verdict, Verdict::Reject(ref r) if r.text == "spam"));
    assert!(
        o.modifications.is_empty(),
        "a refused message is not changed"
    );
}

#[test]
fn modification_errors() {
    // Not negotiated.
    assert_eq!(
        eom_with(action::ADDHDRS, &frame(b'-', b"a@b\0")).unwrap_err(),
        MilterError::ActionNotNegotiated('-')
    );
    // Malformed: no NUL, bad header name, truncated index, empty address.
    for bad in [
        frame(b'h', b"X"),
        frame(b'h', b"Bad Name\0v\0"),
        frame(b'i', &[0, 0]),
        frame(b'+', b"<>\0"),
    ] {
        assert!(
            matches!(
                eom_with(action::ALL, &bad),
                Err(MilterError::Malformed { .. })
            ),
            "{bad:?}"
        );
    }
    // A modification before end of message.
    let mut p = connected(action::ALL, proto::NOCONNECT | proto::NOHELO);
    let c = facts();
    p.begin(
        &event(Stage::Mail, &c, &[], None),
        &SessionExtras::default(),
    )
    .unwrap();
    assert!(matches!(p.poll().unwrap(), Poll::Write(_)));
    p.feed(&frame(b'h', b"X\0y\0"));
    assert!(matches!(p.poll(), Err(MilterError::Unexpected { .. })));
    // Shutdown.
    assert_eq!(
        eom_with(0, &frame(b'4', &[])).unwrap_err(),
        MilterError::Shutdown('4')
    );
}

#[test]
fn body_replacement_is_bounded() {
    let limits = MilterLimits {
        max_body_replacement: 10,
        ..MilterLimits::default()
    };
    let mut p = MilterProtocol::new(limits);
    p.negotiate();
    drive(
        &mut p,
        &optneg_reply(
            action::CHGBODY,
            proto::NOCONNECT
                | proto::NOHELO
                | proto::NOMAIL
                | proto::NORCPT
                | proto::NODATA
                | proto::NOHDRS
                | proto::NOBODY
                | proto::NOEOH,
            &[],
        ),
    );
    let c = facts();
    p.begin(
        &event(Stage::Data, &c, &[], Some(b"\r\n")),
        &SessionExtras::default(),
    )
    .unwrap();
    p.poll().unwrap();
    p.feed(&[frame(b'b', b"123456"), frame(b'b', b"789012")].concat());
    assert_eq!(p.poll().unwrap_err(), MilterError::BodyTooLarge(10));
}

#[test]
fn too_many_modifications() {
    let limits = MilterLimits {
        max_modifications: 2,
        ..MilterLimits::default()
    };
    let mut p = MilterProtocol::new(limits);
    p.negotiate();
    drive(
        &mut p,
        &optneg_reply(
            action::ADDHDRS,
            proto::NOCONNECT
                | proto::NOHELO
                | proto::NOMAIL
                | proto::NORCPT
                | proto::NODATA
                | proto::NOHDRS
                | proto::NOBODY
                | proto::NOEOH,
            &[],
        ),
    );
    let c = facts();
    p.begin(
        &event(Stage::Data, &c, &[], Some(b"\r\n")),
        &SessionExtras::default(),
    )
    .unwrap();
    p.poll().unwrap();
    p.feed(
        &[
            frame(b'h', b"A\0b\0"),
            frame(b'h', b"A\0b\0"),
            frame(b'h', b"A\0b\0"),
        ]
        .concat(),
    );
    assert_eq!(p.poll().unwrap_err(), MilterError::TooManyModifications(2));
}

#[test]
fn replies_split_at_every_byte() {
    let mut r = Vec::new();
    r.extend(frame(b'p', &[]));
    r.extend(frame(b'h', b"X-Added\0yes\0"));
    r.extend(frame(b'-', b"<old@example.com>\0"));
    r.extend(frame(b'b', b"replaced\r\n"));
    r.extend(frame(b'y', b"451 4.7.1 not now\0"));
    // Whole, then one byte at a time, then every two-piece split.
    let whole = eom_with(action::ALL, &r).unwrap();
    assert!(matches!(whole.verdict, Verdict::Tempfail(_)));
    for step in [1usize, 2, 3, 7] {
        let mut p = connected(
            action::ALL,
            proto::NOCONNECT
                | proto::NOHELO
                | proto::NOMAIL
                | proto::NORCPT
                | proto::NODATA
                | proto::NOHDRS
                | proto::NOBODY
                | proto::NOEOH,
        );
        let c = facts();
        p.begin(
            &event(Stage::Data, &c, &[], Some(b"\r\n")),
            &SessionExtras::default(),
        )
        .unwrap();
        assert_eq!(drive_split(&mut p, &r, step).1, whole);
    }
    for cut in 0..=r.len() {
        let mut d = FrameDecoder::new(1 << 20);
        d.push(&r[..cut]);
        let mut n = 0;
        while d.next_frame().unwrap().is_some() {
            n += 1;
        }
        d.push(&r[cut..]);
        while d.next_frame().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 5, "cut at {cut}");
        assert_eq!(d.pending(), 0);
    }
}

#[test]
fn oversize_and_empty_frames() {
    let mut d = FrameDecoder::new(1024);
    d.push(&1025u32.to_be_bytes());
    assert_eq!(
        d.next_frame().unwrap_err(),
        MilterError::FrameTooLarge {
            len: 1025,
            max: 1024
        }
    );
    let mut d = FrameDecoder::new(1024);
    d.push(&[0, 0, 0]);
    assert_eq!(d.next_frame().unwrap(), None, "length not yet whole");
    d.push(&[0]);
    assert_eq!(d.next_frame().unwrap_err(), MilterError::EmptyFrame);
    // A frame of exactly the limit is fine.
    let mut d = FrameDecoder::new(4);
    d.push(&frame(b'b', b"abc"));
    assert_eq!(
        d.next_frame().unwrap().map(|f| f.data),
        Some(b"abc".to_vec())
    );
}

#[test]
fn abort_only_when_a_transaction_is_open() {
    let mut p = connected(0, proto::NOCONNECT | proto::NOHELO);
    assert!(p.abort().is_empty());
    let c = facts();
    p.begin(
        &event(Stage::Mail, &c, &[], None),
        &SessionExtras::default(),
    )
    .unwrap();
    drive(&mut p, &frame(C, &[]));
    assert_eq!(p.abort(), frame(b'A', &[]));
    assert!(p.abort().is_empty());
    assert_eq!(p.quit(), frame(b'Q', &[]));
}

#[test]
fn mail_after_rejected_message_aborts_first() {
    let mut p = connected(0, proto::NOCONNECT | proto::NOHELO);
    let c = facts();
    let x = SessionExtras::default();
    p.begin(&event(Stage::Mail, &c, &[], None), &x).unwrap();
    assert!(matches!(
        drive(&mut p, &frame(b'r', &[])).1.verdict,
        Verdict::Reject(_)
    ));
    p.begin(&event(Stage::Mail, &c, &[], None), &x).unwrap();
    let (out, _) = drive(&mut p, &frame(C, &[]));
    assert_eq!(codes(&out), "ADM");
}

#[test]
fn busy_while_a_stage_runs() {
    let mut p = connected(0, 0);
    let c = facts();
    p.begin(
        &event(Stage::Connect, &c, &[], None),
        &SessionExtras::default(),
    )
    .unwrap();
    p.poll().unwrap();
    assert_eq!(
        p.begin(
            &event(Stage::Ehlo, &c, &[], None),
            &SessionExtras::default()
        )
        .unwrap_err(),
        MilterError::Busy
    );
}
