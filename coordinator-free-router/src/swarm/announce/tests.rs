use proptest::prelude::*;

use super::*;

pub(crate) fn sample() -> Announcement {
    Announcement {
        node: [0x11; 32],
        model: [0x22; 32],
        n_layers: 30,
        start: 4,
        end: 10,
        state: PeerState::Serving,
        throughput: 12.5,
        load: 3,
        free_kv_bytes: 1 << 30,
        version: "shoal/0.1.0".to_owned(),
        seq: 7,
        issued_at_ms: 1_700_000_000_000,
        ttl_ms: 90_000,
        addrs: vec!["127.0.0.1:4433".parse().unwrap(), "[::1]:4434".parse().unwrap()],
        holds: Holdings { layers: vec![(4, 10), (20, 30)], header: true, embedding: false, output: true },
    }
}

fn arb_addr() -> impl Strategy<Value = std::net::SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| (std::net::Ipv4Addr::from(ip), port).into()),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| (std::net::Ipv6Addr::from(ip), port).into()),
    ]
}

fn arb_state() -> impl Strategy<Value = PeerState> {
    prop_oneof![Just(PeerState::Joining), Just(PeerState::Serving), Just(PeerState::Draining)]
}

prop_compose! {
    fn arb_announcement()(
        node in any::<[u8; 32]>(),
        model in any::<[u8; 32]>(),
        n_layers in 1u32..=MAX_LAYERS,
        a in any::<u32>(),
        b in any::<u32>(),
        state in arb_state(),
        throughput in 1e-6f32..1e9f32,
        load in any::<u32>(),
        free_kv_bytes in any::<u64>(),
        version in "\\PC{0,8}",
        seq in any::<u64>(),
        issued_at_ms in any::<u64>(),
        ttl_ms in MIN_TTL_MS..=MAX_TTL_MS,
        addrs in proptest::collection::vec(arb_addr(), 0..=MAX_ADDRS),
        held in proptest::collection::vec((any::<u32>(), any::<u32>()), 0..=MAX_HELD_RANGES),
        flags in 0u8..8,
    ) -> Announcement {
        let start = a % n_layers;
        let end = start + 1 + b % (n_layers - start);
        let mut version = version;
        while version.len() > MAX_VERSION_BYTES {
            version.pop();
        }
        let layers = held
            .into_iter()
            .map(|(a, b)| {
                let s = a % n_layers;
                (s, s + 1 + b % (n_layers - s))
            })
            .collect();
        let holds =
            Holdings { layers, header: flags & 1 != 0, embedding: flags & 2 != 0, output: flags & 4 != 0 };
        Announcement {
            node, model, n_layers, start, end, state, throughput, load, free_kv_bytes, version, seq,
            issued_at_ms, ttl_ms, addrs, holds,
        }
    }
}

proptest! {
    #[test]
    fn round_trip(a in arb_announcement()) {
        let bytes = a.encode();
        prop_assert!(bytes.len() <= MAX_ANNOUNCEMENT_BYTES);
        prop_assert_eq!(Announcement::decode(&bytes), Ok(a.clone()));
        let signed = Signed { body: bytes, signature: [9; 64] };
        prop_assert_eq!(Signed::decode(&signed.encode()), Ok(signed.clone()));
        prop_assert_eq!(open(&signed, |_, _, _| true), Ok(a));
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = Announcement::decode(&bytes);
        let _ = Signed::decode(&bytes);
    }

    #[test]
    fn mutated_valid_bytes_never_panic(a in arb_announcement(), pos in any::<usize>(), byte in any::<u8>()) {
        let mut bytes = a.encode();
        let i = pos % bytes.len();
        bytes[i] = byte;
        if let Ok(b) = Announcement::decode(&bytes) {
            prop_assert!(b.validate().is_ok());
            prop_assert_eq!(b.encode(), bytes);
        }
    }
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample().encode();
    for n in 0..bytes.len() {
        assert_eq!(Announcement::decode(&bytes[..n]), Err(AnnounceError::Truncated), "prefix {n}");
    }
    let signed = Signed { body: bytes, signature: [1; 64] }.encode();
    for n in 0..signed.len() {
        assert_eq!(Signed::decode(&signed[..n]), Err(AnnounceError::Truncated), "prefix {n}");
    }
}

#[test]
fn trailing_and_oversized_input_refused() {
    let mut bytes = sample().encode();
    bytes.push(0);
    assert_eq!(Announcement::decode(&bytes), Err(AnnounceError::TrailingBytes { extra: 1 }));
    let huge = vec![FORMAT_VERSION; MAX_ANNOUNCEMENT_BYTES + 1];
    assert_eq!(
        Announcement::decode(&huge),
        Err(AnnounceError::TooLarge { len: MAX_ANNOUNCEMENT_BYTES + 1, max: MAX_ANNOUNCEMENT_BYTES })
    );
    let mut signed = Signed { body: sample().encode(), signature: [1; 64] }.encode();
    signed.push(0);
    assert_eq!(Signed::decode(&signed), Err(AnnounceError::TrailingBytes { extra: 1 }));
    let mut big_body = vec![0u8; 2 + 10];
    big_body[..2].copy_from_slice(&400u16.to_le_bytes());
    assert_eq!(Signed::decode(&big_body), Err(AnnounceError::BodyTooLarge(400)));
    assert!(matches!(Signed::decode(&[0u8; MAX_SIGNED_BYTES + 1]), Err(AnnounceError::TooLarge { .. })));
}

#[test]
fn each_invalid_field_is_refused() {
    type Case = (fn(&mut Announcement), AnnounceError);
    let cases: Vec<Case> = vec![
        (|a| a.n_layers = 0, AnnounceError::BadLayerCount(0)),
        (|a| a.n_layers = MAX_LAYERS + 1, AnnounceError::BadLayerCount(MAX_LAYERS + 1)),
        (|a| a.start = a.end, AnnounceError::EmptySpan { start: 10, end: 10 }),
        (|a| a.start = 11, AnnounceError::EmptySpan { start: 11, end: 10 }),
        (|a| a.end = 31, AnnounceError::SpanBeyondModel { end: 31, n_layers: 30 }),
        (|a| a.throughput = 0.0, AnnounceError::BadThroughput(0.0)),
        (|a| a.throughput = -1.0, AnnounceError::BadThroughput(-1.0)),
        (|a| a.throughput = f32::INFINITY, AnnounceError::BadThroughput(f32::INFINITY)),
        (|a| a.ttl_ms = MIN_TTL_MS - 1, AnnounceError::BadTtl(MIN_TTL_MS - 1)),
        (|a| a.ttl_ms = MAX_TTL_MS + 1, AnnounceError::BadTtl(MAX_TTL_MS + 1)),
        (|a| a.version = "x".repeat(33), AnnounceError::VersionTooLong(33)),
        (
            |a| a.version = "x".repeat(300),
            // 115 fixed + 255 version + 1 count + 7 (IPv4) + 19 (IPv6) + 1 + 2 * 8 held + 1 flags.
            AnnounceError::TooLarge { len: 115 + 255 + 1 + 7 + 19 + 1 + 16 + 1, max: MAX_ANNOUNCEMENT_BYTES },
        ),
        (|a| a.addrs = vec!["10.0.0.1:1".parse().unwrap(); MAX_ADDRS + 1], AnnounceError::TooManyAddrs(9)),
        (|a| a.holds.layers = vec![(0, 1); MAX_HELD_RANGES + 1], AnnounceError::TooManyHeldRanges(5)),
        (|a| a.holds.layers = vec![(3, 3)], AnnounceError::BadHeldRange { start: 3, end: 3 }),
        (|a| a.holds.layers = vec![(29, 31)], AnnounceError::BadHeldRange { start: 29, end: 31 }),
    ];
    for (i, (mutate, want)) in cases.into_iter().enumerate() {
        let mut a = sample();
        mutate(&mut a);
        assert!(a.validate().is_err(), "case {i}");
        assert_eq!(Announcement::decode(&a.encode()), Err(want), "case {i}");
    }
    // NaN cannot be compared with ==, so check it by pattern.
    let mut a = sample();
    a.throughput = f32::NAN;
    assert!(matches!(Announcement::decode(&a.encode()), Err(AnnounceError::BadThroughput(t)) if t.is_nan()));
    // Bytes that no encoder produces.
    let mut bytes = sample().encode();
    bytes[0] = 1;
    assert_eq!(Announcement::decode(&bytes), Err(AnnounceError::UnknownFormat(1)));
    let mut bytes = sample().encode();
    bytes[77] = 3;
    assert_eq!(Announcement::decode(&bytes), Err(AnnounceError::UnknownState(3)));
    let mut bytes = sample().encode();
    bytes[115] = 0xff;
    assert_eq!(Announcement::decode(&bytes), Err(AnnounceError::VersionNotUtf8));
    // The first address's family byte: after the 11-byte version and the count.
    let mut bytes = sample().encode();
    bytes[115 + 11 + 1] = 5;
    assert_eq!(Announcement::decode(&bytes), Err(AnnounceError::UnknownAddrFamily(5)));
    // The held flags are the last byte.
    let mut bytes = sample().encode();
    *bytes.last_mut().unwrap() = 0x08;
    assert_eq!(Announcement::decode(&bytes), Err(AnnounceError::UnknownHeldFlags(0x08)));
}

#[test]
fn signature_is_checked_against_the_author() {
    let body = sample().encode();
    let signed = Signed { body: body.clone(), signature: [7; 64] };
    // A verifier that only accepts the author's key over exactly this body.
    let verify = |who: &PeerId, msg: &[u8], sig: &[u8; 64]| *who == [0x11; 32] && msg == body && sig[0] == 7;
    assert_eq!(open(&signed, verify), Ok(sample()));
    let forged = Signed { body: body.clone(), signature: [8; 64] };
    assert_eq!(open(&forged, verify), Err(AnnounceError::BadSignature));
    // Same signature, but the body claims another author: refused.
    let mut other = sample();
    other.node = [0x33; 32];
    let relabelled = Signed { body: other.encode(), signature: [7; 64] };
    assert_eq!(open(&relabelled, verify), Err(AnnounceError::BadSignature));
    // A body that does not decode is refused before the verifier runs.
    let garbage = Signed { body: vec![FORMAT_VERSION, 2, 3], signature: [7; 64] };
    assert_eq!(open(&garbage, |_, _, _| panic!("verify must not run")), Err(AnnounceError::Truncated));
}

#[test]
fn byte_snapshot() {
    let hex: String = sample().encode().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, SNAPSHOT);
}

/// Format version 2 of `sample()`: 02 | node | model | n_layers | start | end | state |
/// throughput | load | free_kv_bytes | seq | issued_at_ms | ttl_ms | version_len | version |
/// n_addrs | (family, ip, port) per address | n_held | (start, end) per range | held flags.
const SNAPSHOT: &str = concat!(
    "02",
    "1111111111111111111111111111111111111111111111111111111111111111",
    "2222222222222222222222222222222222222222222222222222222222222222",
    "1e000000",
    "04000000",
    "0a000000",
    "01",
    "00004841",
    "03000000",
    "0000004000000000",
    "0700000000000000",
    "0068e5cf8b010000",
    "905f0100",
    "0b",
    "73686f616c2f302e312e30",
    "02",
    "04",
    "7f000001",
    "5111",
    "06",
    "00000000000000000000000000000001",
    "5211",
    "02",
    "04000000",
    "0a000000",
    "14000000",
    "1e000000",
    "05",
);

#[test]
fn errors_display() {
    let msg = AnnounceError::BadTtl(5).to_string();
    assert!(msg.contains('5') && msg.contains("ttl"), "{msg}");
    let e: &dyn std::error::Error = &AnnounceError::Truncated;
    assert_eq!(e.to_string(), "input is truncated");
}
