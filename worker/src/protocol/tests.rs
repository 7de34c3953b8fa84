//! Round trips, byte snapshots and hostile-input tests of the stage wire protocol.

use super::*;
use proptest::prelude::*;

// --- strategies ---------------------------------------------------------------------

fn finite() -> impl Strategy<Value = f32> {
    prop_oneof![Just(0.0f32), Just(1.0f32), -1.0e6f32..1.0e6f32]
}

fn logprob() -> impl Strategy<Value = f32> {
    prop_oneof![Just(f32::NEG_INFINITY), Just(0.0f32), -1.0e4f32..=0.0f32]
}

fn dtype() -> impl Strategy<Value = WireDType> {
    prop_oneof![Just(WireDType::F16), Just(WireDType::Bf16), Just(WireDType::F32)]
}

fn sampling() -> impl Strategy<Value = Sampling> {
    (finite(), any::<u32>(), finite(), finite(), finite(), finite(), finite(), any::<u64>()).prop_map(
        |(
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            seed,
        )| {
            Sampling {
                temperature,
                top_k,
                top_p,
                min_p,
                repetition_penalty,
                presence_penalty,
                frequency_penalty,
                seed,
            }
        },
    )
}

fn route() -> impl Strategy<Value = Vec<RouteHop>> {
    prop::collection::vec((any::<[u8; 32]>(), 1u32..1000), 1..=16).prop_map(|hops| {
        let mut start = 0;
        hops.into_iter()
            .map(|(node_id, width)| {
                let hop = RouteHop { node_id, start, end: start + width };
                start += width;
                hop
            })
            .collect()
    })
}

fn socket_addr() -> impl Strategy<Value = std::net::SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| (std::net::Ipv4Addr::from(ip), port).into()),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| (std::net::Ipv6Addr::from(ip), port).into()),
    ]
}

fn address_book() -> impl Strategy<Value = Vec<NodeAddrs>> {
    prop::collection::vec(
        (any::<[u8; 32]>(), prop::collection::vec(socket_addr(), 0..=MAX_NODE_ADDRS))
            .prop_map(|(node_id, addrs)| NodeAddrs { node_id, addrs }),
        0..6,
    )
}

fn peer_info() -> impl Strategy<Value = Option<PeerInfo>> {
    prop::option::of(
        (any::<[u8; 32]>(), 0u32..100, 1u32..100, 0u32..10, any::<bool>(), any::<u32>(), any::<u64>())
            .prop_map(|(model_id, start, width, extra, draining, sessions, free_kv_bytes)| PeerInfo {
                model_id,
                start,
                end: start + width,
                n_layers: start + width + extra,
                draining,
                sessions,
                free_kv_bytes,
            }),
    )
}

fn open_session() -> impl Strategy<Value = OpenSession> {
    (
        any::<u64>(),
        (any::<[u8; 32]>(), any::<[u8; 32]>()),
        route(),
        any::<u32>(),
        dtype(),
        1u32..,
        sampling(),
        0u8..=20,
        (any::<u32>(), address_book(), prop::option::of(any::<[u8; 32]>())),
    )
        .prop_map(
            |(
                session_id,
                (model_id, origin),
                route,
                hop,
                wire_dtype,
                max_len,
                sampling,
                top,
                (prompt, book, seal),
            )| {
                OpenSession {
                    session_id,
                    model_id,
                    origin,
                    hop_index: hop % route.len() as u32,
                    route,
                    wire_dtype,
                    max_len,
                    sampling,
                    top_logprobs: top,
                    prompt_len: prompt % (max_len + 1).max(1).min(max_len),
                    address_book: book,
                    seal,
                }
            },
        )
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        prop::collection::vec(any::<u32>(), 1..200).prop_map(Payload::Tokens),
        (1u32..6, 1u32..64, dtype()).prop_flat_map(|(t, hidden, dtype)| {
            let n = t as usize * hidden as usize * dtype.size();
            prop::collection::vec(any::<u8>(), n..=n)
                .prop_map(move |bytes| Payload::Hidden(HiddenStates { t, hidden, dtype, bytes }))
        }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    (
        any::<u64>(),
        any::<u64>(),
        0u32..=u32::MAX - MAX_STEP_TOKENS as u32,
        any::<u64>(),
        prop::collection::vec(any::<u32>(), 0..100),
        payload(),
        any::<bool>(),
        any::<u32>(),
        (0u8..3, prop::collection::vec(any::<u32>(), 1..64)),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..80)),
    )
        .prop_map(
            |(session_id, step_id, start_pos, sample_step, history_tail, payload, spec, id, mask, sealed)| {
                // A draft covers every position of the payload but the first.
                let n = payload.len() - 1;
                let draft: Vec<u32> = if spec && n <= MAX_DRAFT {
                    (0..n as u32).map(|i| id.wrapping_add(i)).collect()
                } else {
                    vec![]
                };
                // A masked step has no draft.
                let mask = match mask {
                    (1, ids) if draft.is_empty() => Some(TokenMask::Allow(ids)),
                    (2, bits) if draft.is_empty() => Some(TokenMask::Bits(bits)),
                    _ => None,
                };
                // A sealed step carries its ids in the box only (zeros hold the draft's length).
                let (history_tail, draft, mask) = match sealed {
                    Some(_) => (vec![], vec![0; draft.len()], None),
                    None => (history_tail, draft, mask),
                };
                Step {
                    session_id,
                    step_id,
                    start_pos,
                    sample_step,
                    history_tail,
                    draft,
                    mask,
                    sealed,
                    payload,
                }
            },
        )
}

fn chosen() -> impl Strategy<Value = Chosen> {
    (any::<u32>(), logprob(), prop::collection::vec((any::<u32>(), logprob()), 0..=20))
        .prop_map(|(token, logprob, top_logprobs)| Chosen { token, logprob, top_logprobs })
}

fn step_result() -> impl Strategy<Value = StepResult> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        logprob(),
        prop::collection::vec((any::<u32>(), logprob()), 0..=20),
        prop::collection::vec(chosen(), 0..4),
    )
        .prop_map(|(session_id, step_id, token, logprob, top_logprobs, accepted)| StepResult {
            session_id,
            step_id,
            token,
            logprob,
            top_logprobs,
            accepted,
        })
}

fn close_reason() -> impl Strategy<Value = CloseReason> {
    (1u8..=6).prop_map(|c| CloseReason::from_code(c).unwrap())
}

fn stage_error() -> impl Strategy<Value = StageError> {
    (any::<Option<u64>>(), any::<Option<u64>>(), 1u16..=18, "\\PC{0,250}").prop_map(
        |(session_id, step_id, code, message)| StageError {
            session_id,
            step_id,
            code: ErrorCode::from_code(code).unwrap(),
            message,
        },
    )
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        open_session().prop_map(Message::OpenSession),
        step().prop_map(Message::Step),
        step_result().prop_map(Message::StepResult),
        (any::<u64>(), close_reason())
            .prop_map(|(session_id, reason)| Message::CloseSession(CloseSession { session_id, reason })),
        stage_error().prop_map(Message::Error),
        any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
        (any::<u64>(), peer_info()).prop_map(|(nonce, info)| Message::Pong { nonce, info }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(session_id, step_id)| Message::Tap(Tap { session_id, step_id })),
        stage_output().prop_map(Message::StageOutput),
    ]
}

fn stage_output() -> impl Strategy<Value = StageOutput> {
    (any::<u64>(), any::<u64>(), payload()).prop_filter_map("hidden payloads", |(session_id, step_id, p)| {
        match p {
            Payload::Hidden(hidden) => Some(StageOutput { session_id, step_id, hidden }),
            Payload::Tokens(_) => None,
        }
    })
}

fn round_trip(m: &Message) -> Result<(), TestCaseError> {
    let frame = try_encode(m).map_err(|e| TestCaseError::fail(format!("try_encode: {e}")))?;
    prop_assert_eq!(&frame, &encode(m));
    prop_assert_eq!(frame.len(), HEADER_LEN + m.body_len());
    prop_assert_eq!(frame[HEADER_LEN], m.kind());
    prop_assert_eq!(frame_len(frame[..4].try_into().unwrap()), Ok(m.body_len()));
    prop_assert_eq!(&decode(&frame).unwrap(), m);
    prop_assert_eq!(&decode_body(&frame[HEADER_LEN..]).unwrap(), m);
    Ok(())
}

proptest! {
    #[test]
    fn open_session_round_trips(m in open_session()) { round_trip(&Message::OpenSession(m))?; }

    #[test]
    fn step_round_trips(m in step()) { round_trip(&Message::Step(m))?; }

    #[test]
    fn step_result_round_trips(m in step_result()) { round_trip(&Message::StepResult(m))?; }

    #[test]
    fn close_session_round_trips(session_id in any::<u64>(), reason in close_reason()) {
        round_trip(&Message::CloseSession(CloseSession { session_id, reason }))?;
    }

    #[test]
    fn error_round_trips(m in stage_error()) { round_trip(&Message::Error(m))?; }

    #[test]
    fn tap_round_trips(session_id in any::<u64>(), step_id in any::<u64>()) {
        round_trip(&Message::Tap(Tap { session_id, step_id }))?;
    }

    #[test]
    fn stage_output_round_trips(m in stage_output()) { round_trip(&Message::StageOutput(m))?; }

    #[test]
    fn ping_pong_round_trip(nonce in any::<u64>(), info in peer_info()) {
        round_trip(&Message::Ping { nonce })?;
        round_trip(&Message::Pong { nonce, info })?;
    }

    #[test]
    fn random_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_body(&body);
        let _ = decode(&body);
    }

    #[test]
    fn random_bodies_with_valid_kind_never_panic(
        kind in 1u8..=7,
        rest in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut body = vec![kind];
        body.extend(rest);
        let _ = decode_body(&body);
    }

    /// Valid frames with a few bytes overwritten: the decoder sees plausible counts and
    /// codes, so this reaches deeper than uniform noise.
    #[test]
    fn mutated_frames_never_panic(
        m in message(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut body = encode(&m).split_off(HEADER_LEN);
        for (at, byte) in edits {
            let i = at.index(body.len());
            body[i] = byte;
        }
        let _ = decode_body(&body);
        let _ = decode_body(&body[..cut.index(body.len() + 1)]);
    }

    #[test]
    fn every_strict_prefix_is_rejected(m in message()) {
        let frame = encode(&m);
        for i in 0..frame.len() {
            prop_assert!(decode(&frame[..i]).is_err());
            if i >= HEADER_LEN {
                prop_assert!(decode_body(&frame[HEADER_LEN..i]).is_err());
            }
        }
    }
}

// --- fixed examples and byte snapshots ----------------------------------------------

fn example_open() -> Message {
    Message::OpenSession(OpenSession {
        session_id: 0x0102_0304_0506_0708,
        model_id: [0xAA; 32],
        origin: [0xCC; 32],
        route: vec![
            RouteHop { node_id: [0x11; 32], start: 0, end: 15 },
            RouteHop { node_id: [0x22; 32], start: 15, end: 30 },
        ],
        hop_index: 1,
        wire_dtype: WireDType::F16,
        max_len: 2048,
        sampling: Sampling {
            temperature: 0.75,
            top_k: 40,
            top_p: 0.5,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: -2.0,
            frequency_penalty: 0.25,
            seed: 42,
        },
        top_logprobs: 5,
        prompt_len: 12,
        address_book: vec![
            NodeAddrs { node_id: [0x22; 32], addrs: vec!["127.0.0.1:4433".parse().unwrap()] },
            NodeAddrs { node_id: [0xCC; 32], addrs: vec!["[::1]:258".parse().unwrap()] },
        ],
        seal: Some([0x5E; 32]),
    })
}

fn example_tokens_step() -> Message {
    Message::Step(Step {
        session_id: 7,
        step_id: 1,
        start_pos: 0,
        sample_step: 0,
        history_tail: vec![1, 2, 3],
        draft: vec![],
        mask: None,
        sealed: None,
        payload: Payload::Tokens(vec![1, 2, 3]),
    })
}

fn example_speculative_step() -> Message {
    Message::Step(Step {
        session_id: 7,
        step_id: 5,
        start_pos: 9,
        sample_step: 4,
        history_tail: vec![8, 6],
        draft: vec![4, 5],
        mask: None,
        sealed: None,
        payload: Payload::Tokens(vec![6, 4, 5]),
    })
}

/// The speculative step with its sampler inputs sealed: no ids in the clear, the draft's
/// length as zeros.
fn example_sealed_step() -> Message {
    Message::Step(Step {
        session_id: 7,
        step_id: 5,
        start_pos: 9,
        sample_step: 4,
        history_tail: vec![],
        draft: vec![0, 0],
        mask: None,
        sealed: Some(vec![0xAB; 30]),
        payload: Payload::Tokens(vec![6, 4, 5]),
    })
}

fn example_hidden_step() -> Message {
    let values = [1.0f32, -2.0, 0.5, 0.0];
    let bytes = values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
    Message::Step(Step {
        session_id: 7,
        step_id: 2,
        start_pos: 3,
        sample_step: 1,
        history_tail: vec![9],
        draft: vec![],
        mask: None,
        sealed: None,
        payload: Payload::Hidden(HiddenStates { t: 1, hidden: 4, dtype: WireDType::F16, bytes }),
    })
}

fn example_result() -> Message {
    Message::StepResult(StepResult {
        session_id: 7,
        step_id: 2,
        token: 9,
        logprob: -0.25,
        top_logprobs: vec![(9, -0.25), (4, -1.5)],
        accepted: vec![],
    })
}

fn example_speculative_result() -> Message {
    Message::StepResult(StepResult {
        session_id: 7,
        step_id: 5,
        token: 3,
        logprob: -2.0,
        top_logprobs: vec![],
        accepted: vec![Chosen { token: 4, logprob: -0.5, top_logprobs: vec![(4, -0.5)] }],
    })
}

fn example_close() -> Message {
    Message::CloseSession(CloseSession { session_id: 7, reason: CloseReason::Completed })
}

fn example_error() -> Message {
    Message::Error(StageError::new(ErrorCode::CapacityExceeded, Some(7), None, "kv budget"))
}

fn examples() -> Vec<(Message, &'static str)> {
    vec![
        (example_open(), OPEN_HEX),
        (example_tokens_step(), TOKENS_STEP_HEX),
        (example_hidden_step(), HIDDEN_STEP_HEX),
        (example_result(), RESULT_HEX),
        (example_speculative_step(), SPECULATIVE_STEP_HEX),
        (example_sealed_step(), SEALED_STEP_HEX),
        (example_speculative_result(), SPECULATIVE_RESULT_HEX),
        (example_close(), CLOSE_HEX),
        (example_error(), ERROR_HEX),
        (Message::Ping { nonce: 0x1122_3344_5566_7788 }, PING_HEX),
        (Message::Pong { nonce: 0x1122_3344_5566_7788, info: None }, PONG_HEX),
        (
            Message::Pong {
                nonce: 1,
                info: Some(PeerInfo {
                    model_id: [0xAA; 32],
                    start: 15,
                    end: 30,
                    n_layers: 30,
                    draining: true,
                    sessions: 2,
                    free_kv_bytes: 0x0100,
                }),
            },
            PONG_INFO_HEX,
        ),
        (Message::Tap(Tap { session_id: 7, step_id: 2 }), TAP_HEX),
        (
            Message::StageOutput(StageOutput {
                session_id: 7,
                step_id: 2,
                hidden: HiddenStates {
                    t: 1,
                    hidden: 2,
                    dtype: WireDType::F16,
                    bytes: vec![0x00, 0x3c, 0x00, 0xc0],
                },
            }),
            OUTPUT_HEX,
        ),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// Wraps a body in a frame header.
fn frame_of(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

const OPEN_HEX: &str = "\
    50010000010807060504030201aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa \
    aaaaaaaaaaaacccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc02 \
    000000111111111111111111111111111111111111111111111111111111111111111100000000 \
    0f00000022222222222222222222222222222222222222222222222222222222222222220f0000 \
    001e0000000100000001000800000000403f280000000000003f000000000000803f000000c000 \
    00803e2a00000000000000050c0000000200000022222222222222222222222222222222222222 \
    2222222222222222222222222201047f0000015111cccccccccccccccccccccccccccccccccccc \
    cccccccccccccccccccccccccccc0106000000000000000000000000000000010201015e5e5e5e \
    5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e";
const TOKENS_STEP_HEX: &str = "440000000207000000000000000100000000000000000000000000000000000000030000000100000002000000030000000000000000000103000000010000000200000003000000";
const HIDDEN_STEP_HEX: &str = "41000000020700000000000000020000000000000003000000010000000000000001000000090000000000000000000201000000040000000108000000003c00c000380000";
const SEALED_STEP_HEX: &str = "6200000002070000000000000005000000000000000900000004000000000000000000000002000000000000000000000000011e000000abababababababababababababababababababababababababababababab0103000000060000000400000005000000";
const RESULT_HEX: &str = "31000000030700000000000000020000000000000009000000000080be0200000009000000000080be040000000000c0bf00000000";
const SPECULATIVE_STEP_HEX: &str = "48000000020700000000000000050000000000000009000000040000000000000002000000080000000600000002000000040000000500000000000103000000060000000400000005000000";
const SPECULATIVE_RESULT_HEX: &str = "35000000030700000000000000050000000000000003000000000000c0000000000100000004000000000000bf0100000004000000000000bf";
const CLOSE_HEX: &str = "0a00000004070000000000000001";
const ERROR_HEX: &str = "1a00000005010700000000000000000700090000006b7620627564676574";
const PING_HEX: &str = "09000000068877665544332211";
const PONG_HEX: &str = "0a00000007887766554433221100";
const PONG_INFO_HEX: &str = "\
    4300000007010000000000000001aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa \
    aaaaaaaaaaaaaa0f0000001e0000001e00000001020000000001000000000000";

const TAP_HEX: &str = "110000000807000000000000000200000000000000";
const OUTPUT_HEX: &str = "\
    22000000090700000000000000020000000000000001000000020000000104000000003c00c0";

#[test]
fn byte_snapshots() {
    for (m, expected) in examples() {
        let frame = encode(&m);
        assert_eq!(hex(&frame), hex(&unhex(expected)), "{} changed on the wire", m.kind_name());
        assert_eq!(decode(&frame).unwrap(), m);
    }
}

// --- rejection ----------------------------------------------------------------------

/// The body of a fixed example, to corrupt.
fn body(m: &Message) -> Vec<u8> {
    encode(m).split_off(HEADER_LEN)
}

fn put(body: &mut [u8], at: usize, bytes: &[u8]) {
    body[at..at + bytes.len()].copy_from_slice(bytes);
}

#[test]
fn every_prefix_of_every_example_is_an_error() {
    for (m, _) in examples() {
        let frame = encode(&m);
        for i in 0..frame.len() {
            assert!(decode(&frame[..i]).is_err(), "{} prefix {i} accepted", m.kind_name());
            if i >= HEADER_LEN {
                let err = decode_body(&frame[HEADER_LEN..i]).unwrap_err();
                assert!(matches!(err, ProtocolError::Truncated { .. }), "{}: {err}", m.kind_name());
                // The same prefix announced by a header that matches it is still truncated.
                if i > HEADER_LEN {
                    assert!(decode(&frame_of(&frame[HEADER_LEN..i])).is_err());
                }
            }
        }
    }
}

#[test]
fn frame_len_checks_the_header() {
    assert_eq!(frame_len([0; 4]), Err(ProtocolError::EmptyFrame));
    assert_eq!(frame_len(1u32.to_le_bytes()), Ok(1));
    assert_eq!(frame_len((MAX_FRAME as u32).to_le_bytes()), Ok(MAX_FRAME));
    for len in [MAX_FRAME as u32 + 1, u32::MAX] {
        let err = frame_len(len.to_le_bytes()).unwrap_err();
        assert_eq!(err, ProtocolError::FrameTooLarge { len: u64::from(len), max: MAX_FRAME });
        assert_eq!(err.code(), ErrorCode::TooLarge);
    }
}

#[test]
fn oversized_or_inconsistent_headers_are_rejected() {
    let mut frame = encode(&Message::Ping { nonce: 1 });
    frame[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(decode(&frame), Err(ProtocolError::FrameTooLarge { .. })));
    frame[..4].copy_from_slice(&100u32.to_le_bytes());
    assert_eq!(decode(&frame), Err(ProtocolError::LengthMismatch { declared: 100, actual: 9 }));
    assert!(matches!(decode(&[9, 0]), Err(ProtocolError::Truncated { field: "frame header", .. })));
    assert_eq!(decode(&[0, 0, 0, 0]), Err(ProtocolError::EmptyFrame));
    assert!(matches!(decode_body(&[]), Err(ProtocolError::Truncated { field: "kind", .. })));
}

#[test]
fn huge_counts_fail_before_allocating() {
    // A route count of u32::MAX with 10 bytes of body after it (the count sits at body
    // offset 73: kind, session_id, model_id, origin).
    let mut b = body(&example_open());
    b.truncate(73);
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    b.extend_from_slice(&[0; 10]);
    assert_eq!(
        decode_body(&b),
        Err(ProtocolError::TooMany { field: "route", count: u64::from(u32::MAX), max: 256 })
    );
    // Within the limit, but more than the bytes that remain.
    put(&mut b, 73, &200u32.to_le_bytes());
    assert_eq!(
        decode_body(&b),
        Err(ProtocolError::Truncated { field: "route", needed: 8000, remaining: 10 })
    );

    // Tokens: the limit, then the remaining bytes.
    let mut b = body(&example_tokens_step());
    // kind, ids and positions, 3 history ids, an empty draft, no mask, not sealed, the tag.
    let tokens_at = 1 + 28 + 4 + 12 + 4 + 1 + 1 + 1;
    put(&mut b, tokens_at, &u32::MAX.to_le_bytes());
    assert!(matches!(decode_body(&b), Err(ProtocolError::TooMany { field: "tokens", .. })));
    put(&mut b, tokens_at, &(MAX_STEP_TOKENS as u32).to_le_bytes());
    assert!(matches!(decode_body(&b), Err(ProtocolError::Truncated { field: "tokens", .. })));

    // A sealed box: over its limit, then longer than the bytes that remain.
    let mut b = body(&example_sealed_step());
    let sealed_at = 1 + 28 + 4 + 4 + 8 + 1 + 1;
    put(&mut b, sealed_at, &u32::MAX.to_le_bytes());
    assert!(matches!(decode_body(&b), Err(ProtocolError::TooMany { field: "sealed", .. })));
    put(&mut b, sealed_at, &1000u32.to_le_bytes());
    assert!(matches!(decode_body(&b), Err(ProtocolError::Truncated { field: "sealed", .. })));

    // History tail.
    let mut b = body(&example_tokens_step());
    put(&mut b, 29, &u32::MAX.to_le_bytes());
    assert!(matches!(decode_body(&b), Err(ProtocolError::TooMany { field: "history_tail", .. })));

    // Draft: over its limit of 64 ids.
    let mut b = body(&example_tokens_step());
    put(&mut b, 1 + 28 + 4 + 12, &(MAX_DRAFT as u32 + 1).to_le_bytes());
    assert!(matches!(decode_body(&b), Err(ProtocolError::TooMany { field: "draft", .. })));

    // Top logprobs: 21 is over the limit, 3 is more than the bytes left.
    let mut b = body(&example_result());
    put(&mut b, 25, &21u32.to_le_bytes());
    assert!(matches!(decode_body(&b), Err(ProtocolError::TooMany { field: "top_logprobs", .. })));
    put(&mut b, 25, &3u32.to_le_bytes());
    assert!(matches!(decode_body(&b), Err(ProtocolError::Truncated { field: "top_logprobs", .. })));

    // Error message length.
    let mut b = body(&example_error());
    put(&mut b, 13, &u32::MAX.to_le_bytes());
    assert!(matches!(decode_body(&b), Err(ProtocolError::TooMany { field: "message", .. })));

    // Hidden bytes: a shape that asks for more bytes than the frame holds.
    let mut b = body(&example_hidden_step());
    let t_at = 1 + 28 + 4 + 4 + 4 + 1 + 1 + 1;
    put(&mut b, t_at, &(MAX_STEP_TOKENS as u32).to_le_bytes());
    put(&mut b, t_at + 4, &8192u32.to_le_bytes());
    put(&mut b, t_at + 9, &(MAX_STEP_TOKENS as u32 * 8192 * 2).to_le_bytes());
    assert!(matches!(decode_body(&b), Err(ProtocolError::Truncated { field: "hidden.bytes", .. })));
}

#[test]
fn unknown_kinds_are_rejected() {
    for kind in [0u8, 10, 0x7f, 0xff] {
        let mut b = body(&Message::Ping { nonce: 3 });
        b[0] = kind;
        assert_eq!(decode_body(&b), Err(ProtocolError::UnknownKind(kind)));
    }
}

#[test]
fn unknown_dtypes_are_rejected() {
    let dtype_at = 77 + 80 + 4;
    for code in [0u8, 4, 0xff] {
        let mut b = body(&example_open());
        b[dtype_at] = code;
        assert_eq!(decode_body(&b), Err(ProtocolError::UnknownDtype { field: "wire_dtype", code }));
        let mut b = body(&example_hidden_step());
        b[1 + 28 + 8 + 4 + 1 + 1 + 1 + 8] = code;
        assert_eq!(decode_body(&b), Err(ProtocolError::UnknownDtype { field: "hidden.dtype", code }));
    }
}

#[test]
fn other_unknown_codes_are_rejected() {
    let mut b = body(&example_tokens_step());
    b[1 + 28 + 16 + 4 + 1 + 1] = 3;
    assert_eq!(decode_body(&b), Err(ProtocolError::UnknownPayload(3)));
    b[1 + 28 + 16 + 4] = 3;
    assert_eq!(decode_body(&b), Err(ProtocolError::UnknownMask(3)));

    let mut b = body(&example_close());
    b[9] = 0;
    assert_eq!(decode_body(&b), Err(ProtocolError::UnknownCloseReason(0)));

    let mut b = body(&example_error());
    put(&mut b, 11, &19u16.to_le_bytes());
    assert_eq!(decode_body(&b), Err(ProtocolError::UnknownErrorCode(19)));
    b[1] = 2;
    assert_eq!(decode_body(&b), Err(ProtocolError::InvalidFlag { field: "session_id", value: 2 }));

    let mut b = body(&example_error());
    let last = b.len() - 1;
    b[last] = 0xff;
    assert_eq!(decode_body(&b), Err(ProtocolError::InvalidUtf8 { field: "message" }));
}

#[test]
fn hidden_byte_count_must_match_the_shape() {
    let mut b = body(&example_hidden_step());
    let count_at = 1 + 28 + 8 + 4 + 1 + 1 + 1 + 9;
    put(&mut b, count_at, &7u32.to_le_bytes());
    let err = decode_body(&b).unwrap_err();
    assert_eq!(
        err,
        ProtocolError::HiddenSizeMismatch { t: 1, hidden: 4, dtype_size: 2, expected: Some(8), actual: 7 }
    );
    assert_eq!(err.code(), ErrorCode::BadShape);

    // t × hidden × 4 exceeds any u32 byte count, so no count can match it.
    let mut b = body(&example_hidden_step());
    let t_at = 1 + 28 + 8 + 4 + 1 + 1 + 1;
    put(&mut b, t_at, &(MAX_STEP_TOKENS as u32).to_le_bytes());
    put(&mut b, t_at + 4, &u32::MAX.to_le_bytes());
    b[t_at + 8] = WireDType::F32.code();
    assert!(matches!(decode_body(&b), Err(ProtocolError::HiddenSizeMismatch { .. })));

    // Zero rows or zero width is not a step.
    let mut b = body(&example_hidden_step());
    put(&mut b, t_at, &0u32.to_le_bytes());
    put(&mut b, count_at, &0u32.to_le_bytes());
    b.truncate(count_at + 4);
    assert_eq!(decode_body(&b), Err(ProtocolError::Empty { field: "hidden.t" }));

    // The encoder's check agrees.
    let Message::Step(mut s) = example_hidden_step() else { unreachable!() };
    if let Payload::Hidden(h) = &mut s.payload {
        h.bytes.pop();
    }
    assert!(matches!(try_encode(&Message::Step(s)), Err(ProtocolError::HiddenSizeMismatch { .. })));
}

#[test]
fn trailing_garbage_is_rejected() {
    for (m, _) in examples() {
        let mut b = body(&m);
        b.push(0);
        assert_eq!(
            decode(&frame_of(&b)),
            Err(ProtocolError::TrailingBytes { kind: m.kind_name(), count: 1 }),
        );
    }
}

#[test]
fn non_finite_sampling_parameters_are_rejected() {
    let sampling_at = 77 + 80 + 4 + 1 + 4;
    // temperature, top_p, min_p, repetition, presence, frequency
    for offset in [0, 8, 12, 16, 20, 24] {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut b = body(&example_open());
            put(&mut b, sampling_at + offset, &bad.to_le_bytes());
            let err = decode_body(&b).unwrap_err();
            assert!(matches!(err, ProtocolError::NonFinite { .. }), "offset {offset}: {err}");
            assert_eq!(err.code(), ErrorCode::NonFinite);
        }
    }
    let mut b = body(&example_open());
    put(&mut b, sampling_at, &f32::NAN.to_le_bytes());
    assert!(matches!(decode_body(&b), Err(ProtocolError::NonFinite { field: "sampling.temperature", .. })));

    let mut b = body(&example_result());
    put(&mut b, 21, &f32::NAN.to_le_bytes());
    assert!(matches!(decode_body(&b), Err(ProtocolError::NonFinite { field: "logprob", .. })));
}

#[test]
fn error_messages_are_limited_to_1_kib() {
    let long = Message::Error(StageError {
        session_id: None,
        step_id: None,
        code: ErrorCode::Internal,
        message: "x".repeat(MAX_ERROR_MESSAGE + 1),
    });
    let err = decode(&encode(&long)).unwrap_err();
    assert_eq!(err, ProtocolError::TooMany { field: "message", count: 1025, max: 1024 });
    assert_eq!(try_encode(&long), Err(err));

    let exact = StageError::new(ErrorCode::Internal, None, None, &"y".repeat(MAX_ERROR_MESSAGE));
    assert!(decode(&encode(&Message::Error(exact))).is_ok());

    // `new` cuts at a character boundary: 'é' is 2 bytes, so 1 + 2·600 bytes cut to 1023.
    let cut = StageError::new(ErrorCode::Internal, None, None, &format!("a{}", "é".repeat(600)));
    assert_eq!(cut.message.len(), 1023);
    assert!(decode(&encode(&Message::Error(cut))).is_ok());
}

fn open_with(f: impl FnOnce(&mut OpenSession)) -> Message {
    let Message::OpenSession(mut m) = example_open() else { unreachable!() };
    f(&mut m);
    Message::OpenSession(m)
}

#[test]
fn routes_are_checked() {
    let hop = |start, end| RouteHop { node_id: [1; 32], start, end };
    let cases: Vec<(Message, &str)> = vec![
        (open_with(|m| m.route.clear()), "route must not be empty"),
        (open_with(|m| m.route[1] = hop(15, 15)), "empty span"),
        (open_with(|m| m.route[1] = hop(16, 30)), "gap"),
        (open_with(|m| m.route[0] = hop(1, 15)), "not from 0"),
        (open_with(|m| m.hop_index = 2), "hop_index outside"),
        (open_with(|m| m.prompt_len = 4096), "prompt longer than max_len"),
        (open_with(|m| m.max_len = 0), "max_len 0"),
        (open_with(|m| m.top_logprobs = 21), "top_logprobs over 20"),
    ];
    for (m, why) in cases {
        assert!(decode(&encode(&m)).is_err(), "{why}");
        assert!(try_encode(&m).is_err(), "{why}");
    }
    let full = open_with(|m| {
        m.route = (0..MAX_ROUTE_HOPS as u32).map(|i| hop(i, i + 1)).collect();
        m.hop_index = 255;
    });
    assert_eq!(decode(&encode(&full)).unwrap(), full);
    let over = open_with(|m| m.route = (0..=MAX_ROUTE_HOPS as u32).map(|i| hop(i, i + 1)).collect());
    assert!(matches!(decode(&encode(&over)), Err(ProtocolError::TooMany { field: "route", .. })));
}

#[test]
fn steps_are_checked() {
    let Message::Step(s) = example_tokens_step() else { unreachable!() };
    let empty = Message::Step(Step { payload: Payload::Tokens(vec![]), ..s.clone() });
    assert_eq!(decode(&encode(&empty)), Err(ProtocolError::Empty { field: "tokens" }));
    let overflow = Message::Step(Step { start_pos: u32::MAX - 1, ..s.clone() });
    let err = decode(&encode(&overflow)).unwrap_err();
    assert_eq!(err, ProtocolError::PositionOverflow { start_pos: u32::MAX - 1, len: 3 });
    assert_eq!(err.code(), ErrorCode::BadPosition);
    let max = Message::Step(Step { payload: Payload::Tokens(vec![5; MAX_STEP_TOKENS]), ..s.clone() });
    assert_eq!(decode(&encode(&max)).unwrap(), max);
    let over = Message::Step(Step { payload: Payload::Tokens(vec![5; MAX_STEP_TOKENS + 1]), ..s.clone() });
    assert!(matches!(decode(&encode(&over)), Err(ProtocolError::TooMany { field: "tokens", .. })));
    // A draft must cover every position of the payload but the first, and stay short.
    let short = Message::Step(Step { draft: vec![4], ..s.clone() });
    let err = decode(&encode(&short)).unwrap_err();
    assert_eq!(err, ProtocolError::DraftMismatch { draft: 1, positions: 3 });
    assert_eq!(err.code(), ErrorCode::BadShape);
    let n = MAX_DRAFT + 1;
    let long = Message::Step(Step { draft: vec![4; n], payload: Payload::Tokens(vec![4; n + 1]), ..s });
    assert!(matches!(decode(&encode(&long)), Err(ProtocolError::TooMany { field: "draft", .. })));
}

#[test]
fn token_masks_are_checked() {
    let Message::Step(s) = example_tokens_step() else { unreachable!() };
    let masked = Message::Step(Step { mask: Some(TokenMask::Allow(vec![1, 5, 9])), ..s.clone() });
    assert_eq!(decode(&encode(&masked)).unwrap(), masked);
    let empty = Message::Step(Step { mask: Some(TokenMask::Bits(vec![])), ..s.clone() });
    assert_eq!(decode(&encode(&empty)), Err(ProtocolError::Empty { field: "mask" }));
    let huge = Message::Step(Step { mask: Some(TokenMask::Bits(vec![1; MAX_MASK_WORDS + 1])), ..s.clone() });
    assert!(matches!(decode(&encode(&huge)), Err(ProtocolError::TooMany { field: "mask", .. })));
    // A speculative step carries no mask.
    let n = 2;
    let both = Message::Step(Step {
        draft: vec![4; n],
        payload: Payload::Tokens(vec![4; n + 1]),
        mask: Some(TokenMask::Allow(vec![4])),
        ..s.clone()
    });
    assert_eq!(decode(&encode(&both)), Err(ProtocolError::MaskedDraft));
    // An unknown mask tag.
    let mut bytes = encode(&masked);
    let tag_at = 4 + 37 + 4 * s.history_tail.len() + 4 * s.draft.len();
    assert_eq!(bytes[tag_at], 1);
    bytes[tag_at] = 7;
    assert_eq!(decode(&bytes), Err(ProtocolError::UnknownMask(7)));
}

#[test]
fn smollm2_decode_step_costs_1213_bytes_and_1254_sealed() {
    let step = Message::Step(Step {
        session_id: 1,
        step_id: 100,
        start_pos: 99,
        sample_step: 90,
        history_tail: vec![42],
        draft: vec![],
        mask: None,
        sealed: None,
        payload: Payload::Hidden(HiddenStates {
            t: 1,
            hidden: 576,
            dtype: WireDType::Bf16,
            bytes: vec![0; 1152],
        }),
    });
    assert_eq!(encode(&step).len(), 1152 + 61);
    // Sealed, the history id moves into a box of 13 bytes plus 28 of nonce and tag.
    let Message::Step(s) = step else { unreachable!() };
    let sealed = Message::Step(Step { history_tail: vec![], sealed: Some(vec![0; 41]), ..s });
    assert_eq!(encode(&sealed).len(), 1152 + 61 - 4 + 4 + 41);
}

#[test]
fn a_sealed_step_carries_no_ids_in_the_clear() {
    let Message::Step(s) = example_sealed_step() else { unreachable!() };
    assert!(Message::Step(s.clone()).validate().is_ok());
    for bad in [
        Step { history_tail: vec![3], ..s.clone() },
        Step { draft: vec![0, 4], ..s.clone() },
        Step {
            draft: vec![],
            payload: Payload::Tokens(vec![6]),
            mask: Some(TokenMask::Allow(vec![2])),
            ..s.clone()
        },
    ] {
        let m = Message::Step(bad);
        assert_eq!(m.validate(), Err(ProtocolError::UnsealedIds));
        assert_eq!(decode(&encode(&m)), Err(ProtocolError::UnsealedIds));
    }
    // An unknown sealed flag.
    let mut bytes = encode(&example_sealed_step());
    let flag_at = 4 + 29 + 4 + 4 + 8 + 1;
    assert_eq!(bytes[flag_at], 1);
    bytes[flag_at] = 2;
    assert_eq!(decode(&bytes), Err(ProtocolError::InvalidFlag { field: "sealed flag", value: 2 }));
}

#[test]
fn codes_round_trip_and_zero_is_never_valid() {
    for code in 1..=18u16 {
        assert_eq!(ErrorCode::from_code(code).map(ErrorCode::code), Some(code));
    }
    for code in 1..=6u8 {
        assert_eq!(CloseReason::from_code(code).map(CloseReason::code), Some(code));
    }
    for code in 1..=3u8 {
        assert_eq!(WireDType::from_code(code).ok().map(WireDType::code), Some(code));
    }
    assert_eq!(ErrorCode::from_code(0), None);
    assert_eq!(ErrorCode::from_code(19), None);
    assert_eq!(CloseReason::from_code(0), None);
    assert!(WireDType::from_code(0).is_err());
    assert_eq!(ALPN, b"shoal/stage/5");
}
