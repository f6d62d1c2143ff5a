use std::net::{IpAddr, Ipv4Addr};

use serde_json::Value;

use super::*;
use crate::stage::ClientFacts;

fn client() -> ClientFacts {
    ClientFacts {
        listener: "smtp".into(),
        ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        port: 40123,
        ptr: None,
        helo: Some("client.example".into()),
        tls: Some(("TLSv1.3".into(), "TLS13_AES_128_GCM_SHA256".into())),
        auth_user: Some("alice".into()),
        server_name: "mx.example.net".into(),
    }
}

fn doc(event: &StageEvent<'_>, policy: MessagePolicy) -> Value {
    serde_json::from_slice(&request_document(event, policy)).expect("valid JSON")
}

const NO_MESSAGE: MessagePolicy = MessagePolicy {
    include: false,
    max_bytes: 0,
};

#[test]
fn rcpt_document_has_client_envelope_and_argument() {
    let c = client();
    let rcpts = vec!["a@example.com".to_string()];
    let params = vec!["SIZE=100".to_string()];
    let event = StageEvent {
        stage: Stage::Rcpt,
        client: &c,
        queue_id: None,
        sender: Some("s@example.org"),
        sender_params: &params,
        recipient: Some("b@example.com"),
        recipients: &rcpts,
        message: None,
    };
    let d = doc(&event, NO_MESSAGE);
    assert_eq!(d["version"], 1);
    assert_eq!(d["stage"], "rcpt");
    assert_eq!(d["client"]["ip"], "192.0.2.7");
    assert_eq!(d["client"]["port"], 40123);
    assert_eq!(d["client"]["helo"], "client.example");
    assert_eq!(d["client"]["ptr"], Value::Null);
    assert_eq!(d["tls"]["version"], "TLSv1.3");
    assert_eq!(d["auth"]["user"], "alice");
    assert_eq!(d["envelope"]["sender"], "s@example.org");
    assert_eq!(d["envelope"]["sender_params"][0], "SIZE=100");
    assert_eq!(d["envelope"]["recipients"][0], "a@example.com");
    assert_eq!(d["argument"], "b@example.com");
    assert!(d.get("message").is_none());
}

#[test]
fn connect_document_without_tls_or_auth() {
    let mut c = client();
    c.tls = None;
    c.auth_user = None;
    c.helo = None;
    let event = StageEvent {
        stage: Stage::Connect,
        client: &c,
        queue_id: None,
        sender: None,
        sender_params: &[],
        recipient: None,
        recipients: &[],
        message: None,
    };
    let d = doc(&event, NO_MESSAGE);
    assert_eq!(d["stage"], "connect");
    assert_eq!(d["tls"], Value::Null);
    assert_eq!(d["auth"], Value::Null);
    assert_eq!(d["argument"], Value::Null);
    assert_eq!(d["envelope"]["sender"], Value::Null);
}

fn data_event<'a>(c: &'a ClientFacts, message: &'a [u8]) -> StageEvent<'a> {
    StageEvent {
        stage: Stage::Data,
        client: c,
        queue_id: Some("0123ABCD"),
        sender: Some(""),
        sender_params: &[],
        recipient: None,
        recipients: &[],
        message: Some(message),
    }
}

#[test]
fn message_included_whole_cut_or_in_base64() {
    let c = client();
    let text = "Subject: h\u{e9}llo\r\n\r\nbody\r\n".as_bytes();
    let d = doc(
        &data_event(&c, text),
        MessagePolicy {
            include: true,
            max_bytes: 1000,
        },
    );
    assert_eq!(d["envelope"]["queue_id"], "0123ABCD");
    assert_eq!(d["envelope"]["sender"], "");
    let m = &d["message"];
    assert_eq!(m["size"], text.len());
    assert_eq!(m["truncated"], false);
    assert_eq!(m["encoding"], "utf-8");
    assert_eq!(m["content"], "Subject: h\u{e9}llo\r\n\r\nbody\r\n");

    // Cut inside the two-byte é: the text stops before it.
    let d = doc(
        &data_event(&c, text),
        MessagePolicy {
            include: true,
            max_bytes: 11,
        },
    );
    assert_eq!(d["message"]["truncated"], true);
    assert_eq!(d["message"]["content"], "Subject: h");
    assert_eq!(d["message"]["size"], text.len());

    // Not UTF-8: base64.
    let binary = b"Subject: x\r\n\r\n\xff\xfe\r\n";
    let d = doc(
        &data_event(&c, binary),
        MessagePolicy {
            include: true,
            max_bytes: 1000,
        },
    );
    assert_eq!(d["message"]["encoding"], "base64");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(d["message"]["content"].as_str().expect("str"))
        .expect("base64");
    assert_eq!(decoded, binary);

    // Not asked for: absent.
    let d = doc(&data_event(&c, text), NO_MESSAGE);
    assert!(d.get("message").is_none());
}

#[test]
fn empty_answers_accept() {
    for body in [&b""[..], b"  \n", b"{}", br#"{"action":"accept"}"#] {
        assert_eq!(parse_reply(body), Ok(FilterOutcome::accept()), "{body:?}");
    }
}

#[test]
fn refusals_carry_their_reply_or_a_default() {
    let o = parse_reply(
        br#"{"action":"reject","reply":{"code":554,"enhanced":"5.7.1","text":"no\r\nway"}}"#,
    )
    .expect("parse");
    assert_eq!(
        o.verdict,
        Verdict::Reject(FilterReply {
            code: 554,
            enhanced: Some("5.7.1".into()),
            text: "no  way".into()
        })
    );
    let o = parse_reply(br#"{"action":"tempfail"}"#).expect("parse");
    assert_eq!(
        o.verdict,
        Verdict::Tempfail(FilterReply {
            code: 451,
            enhanced: Some("4.7.1".into()),
            text: "Try again later".into()
        })
    );
    assert_eq!(
        parse_reply(br#"{"action":"discard"}"#).map(|o| o.verdict),
        Ok(Verdict::Discard)
    );
    assert_eq!(
        parse_reply(br#"{"action":"quarantine","reason":"looks odd"}"#).map(|o| o.verdict),
        Ok(Verdict::Quarantine {
            reason: "looks odd".into()
        })
    );
}

#[test]
fn bad_answers_are_errors() {
    assert!(matches!(
        parse_reply(b"<html>"),
        Err(HookReplyError::Json(_))
    ));
    assert!(matches!(
        parse_reply(br#"{"action":"maybe"}"#),
        Err(HookReplyError::Action(_))
    ));
    assert_eq!(
        parse_reply(br#"{"action":"reject","reply":{"code":451}}"#),
        Err(HookReplyError::Code(451))
    );
    assert_eq!(
        parse_reply(br#"{"action":"tempfail","reply":{"code":250}}"#),
        Err(HookReplyError::Code(250))
    );
    assert!(matches!(
        parse_reply(br#"{"action":"accept","extra":1}"#),
        Err(HookReplyError::Json(_))
    ));
    assert!(matches!(
        parse_reply(br#"{"modifications":[{"type":"explode"}]}"#),
        Err(HookReplyError::Json(_))
    ));
    assert!(matches!(
        parse_reply(br#"{"modifications":[{"type":"replace_body"}]}"#),
        Err(HookReplyError::Modification { index: 0, .. })
    ));
    assert!(matches!(
        parse_reply(br#"{"modifications":[{"type":"replace_body","body_base64":"@@"}]}"#),
        Err(HookReplyError::Modification { index: 0, .. })
    ));
}

#[test]
fn every_modification_is_read_in_order() {
    let o = parse_reply(
        br#"{"action":"accept","modifications":[
            {"type":"add_header","name":"X-Hook","value":"yes"},
            {"type":"add_header","name":"X-Top","value":"1","index":0},
            {"type":"change_header","name":"Subject","value":"[hook] hi"},
            {"type":"change_header","name":"Received","value":"x","occurrence":2},
            {"type":"remove_header","name":"X-Internal"},
            {"type":"add_recipient","address":"copy@example.com"},
            {"type":"remove_recipient","address":"b@example.com"},
            {"type":"change_sender","address":"bounce@example.org"},
            {"type":"replace_body","body":"new\nbody\r\n"},
            {"type":"replace_body","body_base64":"AAE="}
        ]}"#,
    )
    .expect("parse");
    assert_eq!(o.verdict, Verdict::Accept);
    assert_eq!(
        o.modifications,
        vec![
            Modification::AddHeader {
                name: "X-Hook".into(),
                value: "yes".into(),
                index: None
            },
            Modification::AddHeader {
                name: "X-Top".into(),
                value: "1".into(),
                index: Some(0)
            },
            Modification::ChangeHeader {
                name: "Subject".into(),
                occurrence: 1,
                value: "[hook] hi".into()
            },
            Modification::ChangeHeader {
                name: "Received".into(),
                occurrence: 2,
                value: "x".into()
            },
            Modification::RemoveHeader {
                name: "X-Internal".into()
            },
            Modification::AddRecipient {
                address: "copy@example.com".into()
            },
            Modification::RemoveRecipient {
                address: "b@example.com".into()
            },
            Modification::ChangeSender {
                address: "bounce@example.org".into()
            },
            Modification::ReplaceBody {
                body: b"new\r\nbody\r\n".to_vec()
            },
            Modification::ReplaceBody { body: vec![0, 1] },
        ]
    );
}
