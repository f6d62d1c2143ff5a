//! SRS encode/decode, byte for byte against vectors made by an independent
//! implementation: Debian's python3-srs (pysrs 1.0.4, `SRS.new(secret=
//! ["sluice-test-secret", "old-secret"], maxage=21, hashlength=4)`, the
//! "guarded" scheme, with `time.time` fixed at day 20000).

use super::*;

const DAY: u64 = 20_000;

fn srs() -> Srs {
    Srs::new(
        "srs.forward.test",
        &["sluice-test-secret".to_string(), "old-secret".to_string()],
        21,
        4,
    )
}

#[test]
fn timestamps_are_base32_days_mod_1024() {
    assert_eq!(timestamp(DAY), "RA");
    assert_eq!(stamp_value("RA"), Some(DAY % 1024));
    assert_eq!(stamp_value("ra"), Some(DAY % 1024));
    assert_eq!(timestamp(1024), "AA");
    assert_eq!(stamp_value("A1"), None);
}

#[test]
fn srs0_matches_pysrs() {
    let s = srs();
    assert_eq!(
        s.forward("alice@example.org", DAY).as_deref(),
        Some("SRS0=PH7Y=RA=example.org=alice@srs.forward.test")
    );
    // Case is kept in the address and folded in the hash.
    assert_eq!(
        s.forward("Bob.Smith@Sub.Example.COM", DAY).as_deref(),
        Some("SRS0=iKMa=RA=Sub.Example.COM=Bob.Smith@srs.forward.test")
    );
}

#[test]
fn srs1_matches_pysrs() {
    let s = srs();
    assert_eq!(
        s.forward("SRS0=abcd=XY=orig.test=user@other.test", DAY)
            .as_deref(),
        Some("SRS1=E2PV=other.test==abcd=XY=orig.test=user@srs.forward.test")
    );
    assert_eq!(
        s.forward(
            "SRS1=wxyz=first.test==abcd=XY=orig.test=user@second.test",
            DAY
        )
        .as_deref(),
        Some("SRS1=ovSk=first.test==abcd=XY=orig.test=user@srs.forward.test")
    );
}

#[test]
fn reverse_matches_pysrs() {
    let s = srs();
    assert_eq!(
        s.reverse("SRS0=PH7Y=RA=example.org=alice@srs.forward.test", DAY),
        Ok("alice@example.org".to_string())
    );
    assert_eq!(
        s.reverse(
            "SRS1=E2PV=other.test==abcd=XY=orig.test=user@srs.forward.test",
            DAY
        ),
        Ok("SRS0=abcd=XY=orig.test=user@other.test".to_string())
    );
    // Signed by pysrs with the old secret alone: rotation keeps it valid.
    assert_eq!(
        s.reverse("SRS0=i+tf=RA=example.net=carol@srs.forward.test", DAY),
        Ok("carol@example.net".to_string())
    );
    // A relay that smashed case still reverses.
    assert_eq!(
        s.reverse("srs0=ph7y=ra=example.org=alice@SRS.forward.test", DAY),
        Ok("alice@example.org".to_string())
    );
}

#[test]
fn tampering_age_and_shape_are_refused() {
    let s = srs();
    let good = "SRS0=PH7Y=RA=example.org=alice@srs.forward.test";
    assert_eq!(s.reverse(good, DAY + 21), Ok("alice@example.org".into()));
    assert_eq!(s.reverse(good, DAY + 22), Err(SrsError::Expired));
    // From the future: nearly a whole cycle old.
    assert_eq!(s.reverse(good, DAY - 1), Err(SrsError::Expired));
    assert_eq!(
        s.reverse("SRS0=PH7Y=RA=example.org=mallory@srs.forward.test", DAY),
        Err(SrsError::BadHash)
    );
    assert_eq!(
        s.reverse("SRS0=PH7Z=RA=example.org=alice@srs.forward.test", DAY),
        Err(SrsError::BadHash)
    );
    assert_eq!(
        s.reverse("SRS0=PH7=RA=example.org=alice@srs.forward.test", DAY),
        Err(SrsError::BadHash)
    );
    assert_eq!(
        s.reverse("SRS0=PH7Y=RA=example.org@srs.forward.test", DAY),
        Err(SrsError::Malformed)
    );
    assert_eq!(
        s.reverse(good.replace("srs.forward", "x").as_str(), DAY),
        Err(SrsError::NotSrs)
    );
    assert_eq!(
        s.reverse("alice@srs.forward.test", DAY),
        Err(SrsError::NotSrs)
    );
    // Only the new secret: the old one's address no longer verifies.
    let rotated_out = Srs::new("srs.forward.test", &["sluice-test-secret".into()], 21, 4);
    assert_eq!(
        rotated_out.reverse("SRS0=i+tf=RA=example.net=carol@srs.forward.test", DAY),
        Err(SrsError::BadHash)
    );
}

#[test]
fn forward_leaves_what_it_cannot_rewrite() {
    let s = srs();
    assert_eq!(s.forward("", DAY), None);
    assert_eq!(s.forward("postmaster", DAY), None);
    assert_eq!(s.forward("x@srs.forward.test", DAY), None);
    let long = format!("{}@example.org", "a".repeat(250));
    assert_eq!(s.forward(&long, DAY), None);
    assert!(s.is_srs_address("SRS0=PH7Y=RA=example.org=alice@srs.forward.test"));
    assert!(!s.is_srs_address("SRS0=PH7Y=RA=example.org=alice@other.test"));
    assert!(!s.is_srs_address("SRSX=a@srs.forward.test"));
}
