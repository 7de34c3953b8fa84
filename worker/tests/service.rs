//! The stage service driven by hand: two stages (layers 0..2 and 2..4 of the tiny llama
//! fixture) chained into a ring whose actions the test routes itself.
//!
//! Proves that the ring reproduces `generate::generate` on the whole model, that hostile steps
//! get the right error code without disturbing other sessions (or their own session's cache),
//! and that the limits (KV budget, per-peer quota, session count, draining, idle timeout) hold
//! and free what they should.

use std::time::{Duration, Instant};

use shoal_model_shards::activation::WireDType;
use shoal_model_shards::generate::{self, Flow};
use shoal_model_shards::sampler::{Sampler, SamplingParams};
use shoal_model_shards::{DType, Device, LogitsMode, Model, Shard, StageInput, StageOutput};
use shoal_worker::protocol::seal::SealKey;
use shoal_worker::protocol::{
    CloseReason, CloseSession, ErrorCode, HiddenStates, Message, OpenSession, Payload, RouteHop, Sampling,
    StageError, Step, StepResult, Tap,
};
use shoal_worker::service::{Action, PeerId, StageConfig, StageService, StageStats};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny/llama");
const MODEL_ID: [u8; 32] = [7; 32];
const ORIGIN: PeerId = [1; 32];
const STAGE_A: PeerId = [2; 32];
const STAGE_B: PeerId = [3; 32];
const PROMPT: [u32; 6] = [1, 17, 42, 99, 5, 200];
const DECODE_STEPS: usize = 8;
const MAX_LEN: u32 = 32;

fn load(span: std::ops::Range<usize>) -> anyhow::Result<Shard> {
    let model = Model::open(FIXTURE)?;
    Ok(Shard::load(&model, span, &Device::Cpu, DType::F32)?)
}

fn config() -> StageConfig {
    StageConfig {
        max_sessions: 16,
        kv_budget_bytes: 1 << 30,
        per_peer_sessions: 16,
        per_forwarder_sessions: 64,
        idle_timeout: Duration::from_secs(60),
        max_seq_len: 64,
        model_id: MODEL_ID,
    }
}

fn route() -> Vec<RouteHop> {
    vec![RouteHop { node_id: STAGE_A, start: 0, end: 2 }, RouteHop { node_id: STAGE_B, start: 2, end: 4 }]
}

fn greedy() -> Sampling {
    Sampling::from(&SamplingParams::greedy())
}

fn open_msg(session_id: u64, wire_dtype: WireDType, top_logprobs: u8) -> OpenSession {
    OpenSession {
        session_id,
        model_id: MODEL_ID,
        origin: ORIGIN,
        route: route(),
        hop_index: 0,
        wire_dtype,
        max_len: MAX_LEN,
        sampling: greedy(),
        top_logprobs,
        prompt_len: PROMPT.len() as u32,
        address_book: Vec::new(),
        seal: None,
    }
}

fn tokens_step(session_id: u64, step_id: u64, start_pos: u32, sample_step: u64, ids: &[u32]) -> Step {
    Step {
        session_id,
        step_id,
        start_pos,
        sample_step,
        history_tail: ids.to_vec(),
        draft: Vec::new(),
        mask: None,
        sealed: None,
        payload: Payload::Tokens(ids.to_vec()),
    }
}

fn hidden_step(session_id: u64, step_id: u64, start_pos: u32, h: HiddenStates) -> Step {
    Step {
        session_id,
        step_id,
        start_pos,
        sample_step: 0,
        history_tail: Vec::new(),
        draft: Vec::new(),
        mask: None,
        sealed: None,
        payload: Payload::Hidden(h),
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Two stages and the routing between them.
struct Ring {
    a: StageService,
    b: StageService,
    now: Instant,
    /// `Closed` notices seen, as `(stage, session)`.
    closed: Vec<(PeerId, u64)>,
}

impl Ring {
    fn new(config_a: StageConfig, config_b: StageConfig) -> anyhow::Result<Self> {
        Ok(Self {
            a: StageService::new(load(0..2)?, config_a),
            b: StageService::new(load(2..4)?, config_b),
            now: Instant::now(),
            closed: Vec::new(),
        })
    }

    fn standard() -> anyhow::Result<Self> {
        Self::new(config(), config())
    }

    fn stage(&mut self, id: PeerId) -> &mut StageService {
        if id == STAGE_A { &mut self.a } else { &mut self.b }
    }

    /// Delivers `msg` from `from` to stage `to`, routes every `ToNext` on, and returns what
    /// reached the origin.
    fn deliver(&mut self, from: PeerId, to: PeerId, msg: Message) -> Vec<Message> {
        let now = self.now;
        let actions = self.stage(to).handle(from, msg, now);
        self.route_actions(to, actions)
    }

    fn route_actions(&mut self, at: PeerId, actions: Vec<Action>) -> Vec<Message> {
        let mut to_origin = Vec::new();
        for action in actions {
            match action {
                Action::ToNext { to, msg } => {
                    assert_eq!(at, STAGE_A, "only the first stage has a next hop");
                    assert_eq!(to, STAGE_B);
                    to_origin.extend(self.deliver(at, to, msg));
                }
                Action::ToOrigin { to, msg } => {
                    // The last stage answers the origin directly (a ring, not a star).
                    if matches!(msg, Message::StepResult(_)) {
                        assert_eq!(
                            (at, to),
                            (STAGE_B, ORIGIN),
                            "results go from the last stage to the origin"
                        );
                    }
                    to_origin.push(msg)
                }
                Action::Closed { session_id } => self.closed.push((at, session_id)),
            }
        }
        to_origin
    }

    /// Sends `msg` from the origin to stage 1.
    fn send(&mut self, msg: Message) -> Vec<Message> {
        self.deliver(ORIGIN, STAGE_A, msg)
    }

    fn open(&mut self, session_id: u64, wire: WireDType, top_logprobs: u8) -> Vec<Message> {
        self.send(Message::OpenSession(open_msg(session_id, wire, top_logprobs)))
    }

    /// Sends a token step and expects exactly one result.
    fn step(&mut self, step: Step) -> StepResult {
        let replies = self.send(Message::Step(step));
        match replies.as_slice() {
            [Message::StepResult(r)] => r.clone(),
            other => panic!("expected one StepResult, got {other:?}"),
        }
    }

    fn sweep(&mut self) -> Vec<Message> {
        let now = self.now;
        let a = self.a.sweep_idle(now);
        let mut out = self.route_actions(STAGE_A, a);
        let b = self.b.sweep_idle(now);
        out.extend(self.route_actions(STAGE_B, b));
        out
    }
}

/// Drives one session through the ring: the prompt in two chunks, then greedy decode steps.
/// Keeps the origin's side of the session (positions, ids).
struct Client {
    id: u64,
    next_step_id: u64,
    pos: u32,
    tokens: Vec<u32>,
}

impl Client {
    fn new(id: u64) -> Self {
        Self { id, next_step_id: 1, pos: 0, tokens: Vec::new() }
    }

    fn prefill(&mut self, ring: &mut Ring) -> StepResult {
        let (head, tail) = PROMPT.split_at(4);
        let _ = self.send(ring, head, 0);
        let r = self.send(ring, tail, 0);
        self.tokens.push(r.token);
        r
    }

    fn decode(&mut self, ring: &mut Ring) -> StepResult {
        let last = *self.tokens.last().expect("prefill first");
        let r = self.send(ring, &[last], self.tokens.len() as u64);
        self.tokens.push(r.token);
        r
    }

    fn send(&mut self, ring: &mut Ring, ids: &[u32], sample_step: u64) -> StepResult {
        let r = ring.step(tokens_step(self.id, self.next_step_id, self.pos, sample_step, ids));
        assert_eq!((r.session_id, r.step_id), (self.id, self.next_step_id));
        self.next_step_id += 1;
        self.pos += ids.len() as u32;
        r
    }
}

fn reference_tokens(n: usize) -> anyhow::Result<Vec<u32>> {
    let whole = [load(0..4)?];
    let g = generate::generate(&whole, &PROMPT, &SamplingParams::greedy(), n, &[], |_| Flow::Continue)?;
    assert_eq!(g.token_ids.len(), n);
    Ok(g.token_ids)
}

/// The stats of a stage of [`config`] with no session.
fn idle() -> StageStats {
    let block = load(0..2).expect("load").kv_pool(None).block_bytes();
    StageStats { kv_bytes_free: (1 << 30) / block * block, ..StageStats::default() }
}

fn expect_error(replies: &[Message], code: ErrorCode) -> StageError {
    match replies {
        [Message::Error(e)] => {
            assert_eq!(e.code, code, "unexpected error: {e:?}");
            assert!(!e.message.is_empty());
            e.clone()
        }
        other => panic!("expected one {code:?} error, got {other:?}"),
    }
}

#[test]
fn ring_matches_local_generation_f32_and_f16() -> anyhow::Result<()> {
    let reference = reference_tokens(DECODE_STEPS + 1)?;
    for (id, wire) in [(11, WireDType::F32), (12, WireDType::F16), (13, WireDType::Bf16)] {
        let mut ring = Ring::standard()?;
        assert!(ring.open(id, wire, 0).is_empty(), "a successful open sends nothing to the origin");
        assert_eq!(ring.a.stats().sessions, 1);
        assert_eq!(ring.b.stats().sessions, 1, "the open travels to the next stage");
        let mut c = Client::new(id);
        let first = c.prefill(&mut ring);
        assert!(first.top_logprobs.is_empty());
        for _ in 0..DECODE_STEPS {
            c.decode(&mut ring);
        }
        if wire == WireDType::Bf16 {
            // bf16 keeps 8 bits of mantissa: only the first token is required to agree.
            assert_eq!(c.tokens[0], reference[0]);
        } else {
            assert_eq!(c.tokens, reference, "wire {wire:?}");
        }
    }
    Ok(())
}

#[test]
fn top_logprobs_are_returned_and_match_the_sampler() -> anyhow::Result<()> {
    let mut ring = Ring::standard()?;
    assert!(ring.open(21, WireDType::F32, 5).is_empty());
    let mut c = Client::new(21);
    let r = c.prefill(&mut ring);

    let whole = load(0..4)?;
    let mut cache = whole.new_cache(MAX_LEN as usize);
    let StageOutput::Logits(logits) =
        whole.forward(&mut cache, StageInput::Tokens(PROMPT.to_vec()), LogitsMode::Last)?
    else {
        anyhow::bail!("whole model returned hidden states");
    };
    let row = logits.flatten_all()?.to_vec1::<f32>()?;
    let expected = Sampler::new(SamplingParams::greedy())?.sample(&row, &PROMPT, PROMPT.len(), 0, 5)?;

    assert_eq!(r.token, expected.token);
    assert_eq!(r.top_logprobs.len(), 5);
    assert_eq!(r.top_logprobs[0].0, r.token, "greedy picks the most likely token");
    assert!(r.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1), "sorted by logprob");
    assert!((r.logprob - expected.logprob).abs() < 1e-4);
    for (got, want) in r.top_logprobs.iter().zip(&expected.top_logprobs) {
        assert_eq!(got.0, want.0);
        assert!((got.1 - want.1).abs() < 1e-4, "{got:?} vs {want:?}");
    }
    Ok(())
}

#[test]
fn hostile_steps_get_the_right_codes_and_leave_sessions_intact() -> anyhow::Result<()> {
    let reference = reference_tokens(DECODE_STEPS + 1)?;
    let mut ring = Ring::standard()?;
    let (victim, good) = (31, 32);
    assert!(ring.open(victim, WireDType::F32, 0).is_empty());
    assert!(ring.open(good, WireDType::F32, 0).is_empty());
    let mut v = Client::new(victim);
    let mut g = Client::new(good);
    v.prefill(&mut ring);
    g.prefill(&mut ring);
    let allocated = (ring.a.stats().kv_bytes_used, ring.b.stats().kv_bytes_used);
    let hidden = ring.a.shard().spec().hidden_size as u32;
    let pos = v.pos;
    let sid = v.next_step_id;
    let row = |value: f32| f32_bytes(&vec![value; hidden as usize]);

    let mut hostile: Vec<(&str, PeerId, PeerId, Step, ErrorCode)> = vec![
        ("unknown session", ORIGIN, STAGE_A, tokens_step(999, sid, pos, 0, &[5]), ErrorCode::UnknownSession),
        (
            "wrong position",
            ORIGIN,
            STAGE_A,
            tokens_step(victim, sid, pos + 1, 0, &[5]),
            ErrorCode::BadPosition,
        ),
        ("stale step id", ORIGIN, STAGE_A, tokens_step(victim, 1, pos, 0, &[5]), ErrorCode::OutOfOrder),
        ("too long", ORIGIN, STAGE_A, tokens_step(victim, sid, pos, 0, &[5; 40]), ErrorCode::BadPosition),
        (
            "token outside vocab",
            ORIGIN,
            STAGE_A,
            tokens_step(victim, sid, pos, 0, &[256]),
            ErrorCode::BadShape,
        ),
        (
            "step from a stranger",
            [9; 32],
            STAGE_A,
            tokens_step(victim, sid, pos, 0, &[5]),
            ErrorCode::UnknownSession,
        ),
        (
            "tokens to a non-first stage",
            STAGE_A,
            STAGE_B,
            tokens_step(victim, sid, pos, 0, &[5]),
            ErrorCode::BadShape,
        ),
    ];
    let bad_hidden = [
        (
            "wrong hidden size",
            HiddenStates { t: 1, hidden: 32, dtype: WireDType::F32, bytes: f32_bytes(&[0.5; 32]) },
            ErrorCode::BadShape,
        ),
        (
            "wrong dtype",
            HiddenStates { t: 1, hidden, dtype: WireDType::F16, bytes: vec![0; 2 * hidden as usize] },
            ErrorCode::BadShape,
        ),
        (
            "NaN in hidden bytes",
            HiddenStates {
                t: 1,
                hidden,
                dtype: WireDType::F32,
                bytes: {
                    let mut b = row(0.5);
                    b[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
                    b
                },
            },
            ErrorCode::NonFinite,
        ),
        (
            "infinity in hidden bytes",
            HiddenStates { t: 1, hidden, dtype: WireDType::F32, bytes: row(f32::INFINITY) },
            ErrorCode::NonFinite,
        ),
        (
            "bytes that do not match the shape",
            HiddenStates { t: 2, hidden, dtype: WireDType::F32, bytes: row(0.5) },
            ErrorCode::BadShape,
        ),
    ];
    for (name, h, code) in bad_hidden {
        hostile.push((name, STAGE_A, STAGE_B, hidden_step(victim, sid, pos, h), code));
    }
    hostile.push((
        "hidden states to the first stage",
        ORIGIN,
        STAGE_A,
        hidden_step(victim, sid, pos, HiddenStates { t: 1, hidden, dtype: WireDType::F32, bytes: row(0.5) }),
        ErrorCode::BadShape,
    ));

    for (name, from, to, step, code) in hostile {
        let (session_id, step_id) = (step.session_id, step.step_id);
        let replies = ring.deliver(from, to, Message::Step(step));
        let e = expect_error(&replies, code);
        assert_eq!((e.session_id, e.step_id), (Some(session_id), Some(step_id)), "{name}");
        // Nothing moved: same memory, and the good session keeps producing the right tokens.
        assert_eq!((ring.a.stats().kv_bytes_used, ring.b.stats().kv_bytes_used), allocated, "{name}");
        assert_eq!(ring.a.stats().sessions, 2, "{name}");
        if g.tokens.len() < reference.len() {
            g.decode(&mut ring);
        }
    }
    // The victim's own cache is untouched by its failed steps: it carries on exactly.
    while v.tokens.len() < reference.len() {
        v.decode(&mut ring);
    }
    while g.tokens.len() < reference.len() {
        g.decode(&mut ring);
    }
    assert_eq!(v.tokens, reference);
    assert_eq!(g.tokens, reference);
    Ok(())
}

#[test]
fn open_checks_model_span_length_sampling_and_duplicates() -> anyhow::Result<()> {
    let mut ring = Ring::standard()?;
    let mut m = open_msg(41, WireDType::F32, 0);
    m.model_id = [8; 32];
    expect_error(&ring.send(Message::OpenSession(m)), ErrorCode::WrongModel);

    let mut m = open_msg(41, WireDType::F32, 0);
    m.route = vec![
        RouteHop { node_id: STAGE_A, start: 0, end: 1 },
        RouteHop { node_id: STAGE_B, start: 1, end: 4 },
    ];
    expect_error(&ring.send(Message::OpenSession(m)), ErrorCode::WrongSpan);

    // A route that ends at stage 1's span although the model goes on.
    let mut m = open_msg(41, WireDType::F32, 0);
    m.route.truncate(1);
    expect_error(&ring.send(Message::OpenSession(m)), ErrorCode::WrongSpan);

    let mut m = open_msg(41, WireDType::F32, 0);
    m.max_len = 65;
    expect_error(&ring.send(Message::OpenSession(m)), ErrorCode::TooLarge);

    // Sampling is checked by the last stage, which reports to the origin; stage 1 keeps its
    // session until the origin closes it.
    let mut m = open_msg(41, WireDType::F32, 0);
    m.sampling.top_p = 0.0;
    let e = expect_error(&ring.send(Message::OpenSession(m)), ErrorCode::Unsupported);
    assert!(e.message.contains("top_p"), "{}", e.message);
    assert_eq!((ring.a.stats().sessions, ring.b.stats().sessions), (1, 0));
    assert!(
        ring.send(Message::CloseSession(CloseSession { session_id: 41, reason: CloseReason::Error }))
            .is_empty()
    );
    assert_eq!(ring.a.stats(), idle());

    assert!(ring.open(42, WireDType::F32, 0).is_empty());
    expect_error(&ring.open(42, WireDType::F32, 0), ErrorCode::DuplicateSession);
    assert_eq!((ring.a.stats().sessions, ring.b.stats().sessions), (1, 1));

    // Ping is answered; replies sent to a stage are ignored.
    let info = ring.a.info();
    assert_eq!((info.start, info.end, info.n_layers, info.sessions, info.draining), (0, 2, 4, 1, false));
    assert_eq!(info.model_id, MODEL_ID);
    assert_eq!(ring.send(Message::Ping { nonce: 77 }), vec![Message::Pong { nonce: 77, info: Some(info) }]);
    assert!(ring.send(Message::Pong { nonce: 1, info: None }).is_empty());
    Ok(())
}

#[test]
fn kv_budget_is_paged_and_refuses_what_does_not_fit() -> anyhow::Result<()> {
    // Stage A's budget: 3 blocks of 16 positions. Sessions take blocks as they grow, so two
    // sessions of max_len 32 (2 blocks each, 4 in all, if reserved up front) both get in.
    let block = load(0..2)?.kv_pool(None).block_bytes();
    let mut cfg = config();
    cfg.kv_budget_bytes = 3 * block;
    let mut ring = Ring::new(cfg, config())?;
    assert!(ring.open(51, WireDType::F32, 0).is_empty());
    assert!(ring.open(52, WireDType::F32, 0).is_empty());
    assert_eq!(ring.a.stats().kv_bytes_used, 0, "opening takes no block");
    // 17 positions of session 51: 2 blocks.
    let prompt: Vec<u32> = (0..17).map(|i| 10 + i).collect();
    let replies = ring.deliver(ORIGIN, STAGE_A, Message::Step(tokens_step(51, 1, 0, 0, &prompt)));
    assert!(matches!(replies.as_slice(), [Message::StepResult(_)]), "{replies:?}");
    assert_eq!((ring.a.stats().kv_bytes_used, ring.a.stats().kv_bytes_free), (2 * block, block));
    assert_eq!(ring.a.info().free_kv_bytes, block as u64, "a Pong tells the free budget");
    // Session 52 needs 2 blocks for 17 positions: one is free, so the step is refused with the
    // budget's figures, and nothing changes.
    let replies = ring.deliver(ORIGIN, STAGE_A, Message::Step(tokens_step(52, 1, 0, 0, &prompt)));
    let e = expect_error(&replies, ErrorCode::CapacityExceeded);
    assert_eq!((e.session_id, e.step_id), (Some(52), Some(1)));
    assert!(e.message.contains("KV cache budget is full"), "{}", e.message);
    assert_eq!(ring.a.stats().kv_bytes_used, 2 * block);
    // A shorter step of 52 fits in the last block; then a third session cannot even open.
    let replies = ring.deliver(ORIGIN, STAGE_A, Message::Step(tokens_step(52, 2, 0, 0, &prompt[..6])));
    assert!(matches!(replies.as_slice(), [Message::StepResult(_)]), "{replies:?}");
    assert_eq!(ring.a.stats().kv_bytes_free, 0);
    let e = expect_error(&ring.open(53, WireDType::F32, 0), ErrorCode::CapacityExceeded);
    assert_eq!(e.session_id, Some(53));
    assert_eq!(ring.b.stats().sessions, 2, "a refused open does not travel on");
    // Closing 51 gives its blocks back to the others.
    ring.send(Message::CloseSession(CloseSession { session_id: 51, reason: CloseReason::Completed }));
    assert_eq!(ring.a.stats().kv_bytes_free, 2 * block);
    assert!(ring.open(53, WireDType::F32, 0).is_empty());
    Ok(())
}

#[test]
fn per_peer_quota_and_session_limit() -> anyhow::Result<()> {
    let mut cfg = config();
    cfg.per_peer_sessions = 2;
    cfg.max_sessions = 3;
    let mut ring = Ring::new(cfg, config())?;
    let other: PeerId = [5; 32];
    assert!(ring.open(61, WireDType::F32, 0).is_empty());
    assert!(ring.open(62, WireDType::F32, 0).is_empty());
    expect_error(&ring.open(63, WireDType::F32, 0), ErrorCode::QuotaExceeded);
    // Another origin still gets in, until the stage is full. (The quota is charged to the
    // origin the OpenSession names, so a stage forwarding several origins is not throttled.)
    let open = |id| {
        let mut m = open_msg(id, WireDType::F32, 0);
        m.origin = other;
        Message::OpenSession(m)
    };
    assert!(ring.deliver(other, STAGE_A, open(64)).is_empty());
    expect_error(&ring.deliver(other, STAGE_A, open(65)), ErrorCode::SessionLimit);
    assert_eq!(ring.a.stats().sessions, 3);
    // Closing one of the first origin's sessions frees its quota.
    ring.send(Message::CloseSession(CloseSession { session_id: 61, reason: CloseReason::Completed }));
    assert!(ring.open(63, WireDType::F32, 0).is_empty());
    assert_eq!(ring.a.opener(63), Some(ORIGIN));
    assert_eq!(ring.a.opener(64), Some(other));
    Ok(())
}

#[test]
fn draining_refuses_opens_and_serves_running_sessions() -> anyhow::Result<()> {
    let reference = reference_tokens(3)?;
    let mut ring = Ring::standard()?;
    assert!(ring.open(71, WireDType::F32, 0).is_empty());
    ring.a.drain();
    assert!(ring.a.stats().draining);
    expect_error(&ring.open(72, WireDType::F32, 0), ErrorCode::Draining);
    let mut c = Client::new(71);
    c.prefill(&mut ring);
    c.decode(&mut ring);
    c.decode(&mut ring);
    assert_eq!(c.tokens, reference);
    Ok(())
}

#[test]
fn close_frees_memory_on_every_stage() -> anyhow::Result<()> {
    let mut ring = Ring::standard()?;
    let baseline = (ring.a.stats(), ring.b.stats());
    assert_eq!((baseline.0.sessions, baseline.0.kv_bytes_used), (0, 0));
    assert!(ring.open(81, WireDType::F16, 0).is_empty());
    let mut c = Client::new(81);
    c.prefill(&mut ring);
    for stats in [ring.a.stats(), ring.b.stats()] {
        assert_eq!(stats.sessions, 1);
        assert!(stats.kv_bytes_used > 0);
        assert_eq!(
            stats.kv_bytes_used + stats.kv_bytes_free,
            idle().kv_bytes_free,
            "used and free make the budget"
        );
    }
    let close = Message::CloseSession(CloseSession { session_id: 81, reason: CloseReason::Completed });
    assert!(ring.send(close.clone()).is_empty());
    assert_eq!(ring.closed, vec![(STAGE_B, 81), (STAGE_A, 81)], "the close travelled down the chain");
    assert_eq!((ring.a.stats(), ring.b.stats()), baseline);
    // Idempotent, and the session is gone.
    assert!(ring.send(close).is_empty());
    assert_eq!(ring.closed.len(), 2);
    expect_error(&ring.send(Message::Step(tokens_step(81, 9, c.pos, 1, &[3]))), ErrorCode::UnknownSession);
    // A close from someone else than the opener is ignored.
    assert!(ring.open(82, WireDType::F16, 0).is_empty());
    let close = Message::CloseSession(CloseSession { session_id: 82, reason: CloseReason::Completed });
    assert!(ring.deliver([9; 32], STAGE_A, close).is_empty());
    assert_eq!(ring.a.stats().sessions, 1);
    Ok(())
}

#[test]
fn idle_sweep_closes_and_frees_sessions() -> anyhow::Result<()> {
    let mut ring = Ring::standard()?;
    assert!(ring.open(91, WireDType::F32, 0).is_empty());
    assert!(ring.open(92, WireDType::F32, 0).is_empty());
    let mut busy = Client::new(92);
    busy.prefill(&mut ring);
    ring.now += Duration::from_secs(40);
    assert!(ring.sweep().is_empty());
    assert!(ring.closed.is_empty(), "nothing is idle yet");
    busy.decode(&mut ring); // keeps 92 alive on both stages
    ring.now += Duration::from_secs(30);
    assert!(ring.sweep().is_empty(), "the sweep tells the next stage, not the origin");
    assert_eq!(ring.closed, vec![(STAGE_B, 91), (STAGE_A, 91)]);
    assert_eq!((ring.a.stats().sessions, ring.b.stats().sessions), (1, 1));
    ring.now += Duration::from_secs(61);
    ring.sweep();
    assert_eq!(ring.closed.len(), 4);
    assert_eq!((ring.a.stats(), ring.b.stats()), (idle(), idle()));
    Ok(())
}

/// `handle_many` (what the transport calls with the messages that arrived together) gives
/// exactly the actions of `handle` called on each in turn: decode steps of distinct sessions
/// run as one batched forward with the bits each gets alone (speculative steps among them in
/// the last round), and a close, a repeated step and a bad step in the middle of the batch
/// keep their place in the order.
#[test]
fn batched_steps_act_exactly_like_steps_one_by_one() -> anyhow::Result<()> {
    let whole = |_| -> anyhow::Result<StageService> { Ok(StageService::new(load(0..4)?, config())) };
    let (mut solo, mut batched) = (whole(0)?, whole(1)?);
    let now = Instant::now();
    let open = |id: u64| {
        let mut o = open_msg(id, WireDType::F32, 2);
        o.route = vec![RouteHop { node_id: STAGE_A, start: 0, end: 4 }];
        Message::OpenSession(o)
    };
    let prompts: [&[u32]; 4] = [&[1, 17, 42], &[5, 200, 99, 3, 8], &[7], &[42, 42]];
    let mut next = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let id = i as u64 + 1;
        for s in [&mut solo, &mut batched] {
            assert!(s.handle(ORIGIN, open(id), now).is_empty());
        }
        let step = Message::Step(tokens_step(id, 1, 0, 0, p));
        let a = solo.handle(ORIGIN, step.clone(), now);
        assert_eq!(a, batched.handle(ORIGIN, step, now));
        let Some(Action::ToOrigin { msg: Message::StepResult(r), .. }) = a.first() else { panic!("{a:?}") };
        next.push((r.token, p.len() as u32));
    }
    for round in 0..4u64 {
        let mut msgs: Vec<(PeerId, Message)> = Vec::new();
        for (i, &(token, pos)) in next.iter().enumerate() {
            let id = i as u64 + 1;
            if round == 3 && id != 2 {
                // Speculative steps (a draft of two ids), batched with session 2's decode step.
                let draft = [token, (token + id as u32) % 49_152];
                msgs.push((
                    ORIGIN,
                    Message::Step(spec_step(id, round + 2, pos, round + 1, &[token], token, &draft)),
                ));
                continue;
            }
            msgs.push((ORIGIN, Message::Step(tokens_step(id, round + 2, pos, round + 1, &[token]))));
            if round == 1 && id == 2 {
                // Session 2's step again (out of order now), and a step from a stranger.
                msgs.push((ORIGIN, Message::Step(tokens_step(id, round + 2, pos, round + 1, &[token]))));
                msgs.push(([9; 32], Message::Step(tokens_step(3, round + 2, 0, 1, &[token]))));
            }
        }
        if round == 2 {
            msgs.insert(
                2,
                (
                    ORIGIN,
                    Message::CloseSession(CloseSession { session_id: 4, reason: CloseReason::Completed }),
                ),
            );
        }
        let want: Vec<Action> =
            msgs.iter().flat_map(|(from, m)| solo.handle(*from, m.clone(), now)).collect();
        let got = batched.handle_many(msgs, now);
        assert_eq!(got, want, "round {round}");
        if round == 3 {
            let answered: Vec<u64> = got
                .iter()
                .filter_map(|a| match a {
                    Action::ToOrigin { msg: Message::StepResult(r), .. } => Some(r.session_id),
                    _ => None,
                })
                .collect();
            assert_eq!(answered, [1, 2, 3], "the speculative steps are verified, not refused: {got:?}");
        }
        for a in &got {
            if let Action::ToOrigin { msg: Message::StepResult(r), .. } = a {
                let i = (r.session_id - 1) as usize;
                next[i] = (r.token, next[i].1 + 1);
            }
        }
    }
    assert_eq!(solo.stats(), batched.stats());
    Ok(())
}

/// A stage's round: decode steps first (each the first message of its session), then the rest
/// in order until the prefill chunks reach the budget; the remainder waits for the next round.
#[test]
fn schedule_runs_decode_steps_first_and_prefill_chunks_up_to_a_budget() {
    let chunk =
        |id: u64, step: u64, n: usize| (ORIGIN, Message::Step(tokens_step(id, step, 0, 0, &vec![1; n])));
    let decode = |id: u64, step: u64| (ORIGIN, Message::Step(tokens_step(id, step, 0, 1, &[1])));
    let close = |id: u64| {
        (ORIGIN, Message::CloseSession(CloseSession { session_id: id, reason: CloseReason::Completed }))
    };
    let label = |msgs: &[(PeerId, Message)]| -> Vec<String> {
        msgs.iter()
            .map(|(_, m)| match m {
                Message::Step(s) => format!("{}.{}", s.session_id, s.step_id),
                Message::CloseSession(c) => format!("close {}", c.session_id),
                other => other.kind_name().to_string(),
            })
            .collect()
    };
    let msgs = vec![
        chunk(1, 1, 64),
        chunk(1, 2, 64),
        decode(2, 5),
        chunk(3, 1, 64),
        close(4),
        decode(4, 3),
        decode(1, 3),
        decode(5, 9),
        (ORIGIN, Message::Ping { nonce: 1 }),
    ];
    let (run, later) = shoal_worker::service::schedule(msgs, 64);
    assert_eq!(label(&run), ["2.5", "5.9", "1.1"]);
    assert_eq!(label(&later), ["1.2", "3.1", "close 4", "4.3", "1.3", "Ping"]);
    // Next round: session 1's next chunk; a decode behind a message of its own session waits.
    let (run, later) = shoal_worker::service::schedule(later, 64);
    assert_eq!(label(&run), ["1.2"]);
    assert_eq!(label(&later), ["3.1", "close 4", "4.3", "1.3", "Ping"]);
    // A chunk over the budget still runs when it is the round's first; two chunks fit 128.
    let (run, later) = shoal_worker::service::schedule(vec![chunk(6, 1, 200), chunk(7, 1, 10)], 64);
    assert_eq!((label(&run), label(&later)), (vec!["6.1".to_string()], vec!["7.1".to_string()]));
    let (run, later) = shoal_worker::service::schedule(vec![chunk(6, 1, 64), chunk(7, 1, 64)], 128);
    assert_eq!((run.len(), later.len()), (2, 0));
}

/// Delivers an `OpenSession` from `from` to `stage`; returns the replies and their addressees
/// (none when the session opened).
fn open_as(stage: &mut StageService, from: PeerId, msg: OpenSession) -> Vec<(PeerId, Message)> {
    stage
        .handle(from, Message::OpenSession(msg), Instant::now())
        .into_iter()
        .filter_map(|a| match a {
            Action::ToOrigin { to, msg } => Some((to, msg)),
            _ => None,
        })
        .collect()
}

fn made_up(i: u32) -> PeerId {
    let mut id = [0xee; 32];
    id[..4].copy_from_slice(&i.to_le_bytes());
    id
}

#[test]
fn one_peer_opening_1000_sessions_under_made_up_origins_is_held_to_its_quota() -> anyhow::Result<()> {
    let mut cfg = config();
    cfg.max_sessions = 5000;
    cfg.per_peer_sessions = 4;
    cfg.per_forwarder_sessions = 8;
    let mut a = StageService::new(load(0..2)?, cfg.clone());
    let mut b = StageService::new(load(2..4)?, cfg);
    let mallory: PeerId = [9; 32];
    let code = |replies: &[(PeerId, Message)]| match replies {
        [] => None,
        [(to, Message::Error(e))] => {
            assert_eq!(*to, mallory, "a refusal goes to the sender, never to an origin it named");
            Some(e.code)
        }
        other => panic!("{other:?}"),
    };

    // Hop 0 names made-up origins: every open is refused (an origin opens its own sessions).
    for i in 0..1000u32 {
        let mut m = open_msg(10_000 + u64::from(i), WireDType::F32, 0);
        m.origin = made_up(i);
        assert_eq!(code(&open_as(&mut a, mallory, m)), Some(ErrorCode::Malformed));
    }
    assert_eq!(a.stats().sessions, 0);
    // Under its own id: the quota.
    let mut opened = 0;
    for i in 0..1000u64 {
        let mut m = open_msg(20_000 + i, WireDType::F32, 0);
        m.origin = mallory;
        match code(&open_as(&mut a, mallory, m)) {
            None => opened += 1,
            Some(c) => assert_eq!(c, ErrorCode::QuotaExceeded),
        }
    }
    assert_eq!((opened, a.stats().sessions), (4, 4));

    // Hop 1, as if forwarding made-up origins' sessions: held to the forwarder quota.
    let mut opened = 0;
    for i in 0..1000u32 {
        let mut m = open_msg(30_000 + u64::from(i), WireDType::F32, 0);
        m.origin = made_up(i);
        m.route[0].node_id = mallory;
        m.hop_index = 1;
        let replies = b.handle(mallory, Message::OpenSession(m), Instant::now());
        match replies.as_slice() {
            [] => opened += 1,
            [Action::ToOrigin { to, msg: Message::Error(e) }] => {
                assert_eq!(*to, made_up(i), "the route's origin hears why its route failed");
                assert_eq!(e.code, ErrorCode::QuotaExceeded);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((opened, b.stats().sessions), (8, 8));
    // Naming another peer as the previous hop: refused, answered to the sender.
    let mut m = open_msg(40_000, WireDType::F32, 0);
    m.hop_index = 1;
    assert_eq!(code(&open_as(&mut b, mallory, m)), Some(ErrorCode::Malformed));

    // An honest origin still gets in on both stages.
    assert!(open_as(&mut a, ORIGIN, open_msg(50_000, WireDType::F32, 0)).is_empty());
    let mut m = open_msg(50_000, WireDType::F32, 0);
    m.hop_index = 1;
    assert!(b.handle(STAGE_A, Message::OpenSession(m), Instant::now()).is_empty());
    Ok(())
}

#[test]
fn only_valid_steps_keep_a_session_alive() -> anyhow::Result<()> {
    let mut ring = Ring::standard()?;
    assert!(ring.open(91, WireDType::F32, 0).is_empty());
    let idle = config().idle_timeout;
    // Refused steps (a stale position) keep arriving, but the session still idles out.
    for k in 1..=3u32 {
        ring.now += idle / 2;
        let replies = ring.send(Message::Step(tokens_step(91, u64::from(k), 5, 0, &[1])));
        expect_error(&replies, ErrorCode::BadPosition);
        let _ = ring.a.sweep_idle(ring.now);
    }
    assert_eq!(ring.a.stats().sessions, 0, "refused steps do not refresh the idle time");
    Ok(())
}

/// A speculative step of `session_id`: `last` then `draft` at `start_pos`.
fn spec_step(
    session_id: u64,
    step_id: u64,
    start_pos: u32,
    sample_step: u64,
    history_tail: &[u32],
    last: u32,
    draft: &[u32],
) -> Step {
    let mut ids = vec![last];
    ids.extend_from_slice(draft);
    Step {
        session_id,
        step_id,
        start_pos,
        sample_step,
        history_tail: history_tail.to_vec(),
        draft: draft.to_vec(),
        mask: None,
        sealed: None,
        payload: Payload::Tokens(ids),
    }
}

/// Speculative steps through the ring: each position gets the bits of a one-position step
/// (the tokens, logprobs and alternatives of ordinary decoding), the last stage keeps the
/// draft up to its first wrong id, and the next step rolls the rejected positions back out of
/// both stages' caches (their KV blocks freed); rewinding is refused outside the last
/// speculative step's draft.
#[test]
fn speculative_steps_verify_drafts_and_roll_back_rejected_positions() -> anyhow::Result<()> {
    let want = reference_tokens(9)?;
    // One-position decoding with two alternatives per token, for the logprobs.
    let mut reference = Ring::standard()?;
    assert!(reference.open(2, WireDType::F32, 2).is_empty());
    let mut plain = Client::new(2);
    let mut results = vec![plain.prefill(&mut reference)];
    for _ in 0..8 {
        results.push(plain.decode(&mut reference));
    }
    assert_eq!(plain.tokens, want);
    let same = |got: (u32, f32, &[(u32, f32)]), i: usize| {
        let r = &results[i];
        assert_eq!(got.0, want[i], "token {i}");
        assert_eq!(got.1.to_bits(), r.logprob.to_bits(), "logprob of token {i}");
        assert_eq!(got.2, r.top_logprobs.as_slice(), "alternatives of token {i}");
    };
    let wrong = |id: u32| if id == 5 { 6 } else { 5 };

    let mut ring = Ring::standard()?;
    assert!(ring.open(1, WireDType::F32, 2).is_empty());
    let mut c = Client::new(1);
    c.prefill(&mut ring);
    let one_block = (ring.a.stats().kv_bytes_used, ring.b.stats().kv_bytes_used);
    assert!(one_block.0 > 0 && one_block.1 > 0);

    // Positions 6..10: w0 then the draft w1 w2 X. Kept: w1 w2, then w3.
    let r = ring.step(spec_step(1, 3, 6, 1, &[want[0]], want[0], &[want[1], want[2], wrong(want[3])]));
    assert_eq!(r.accepted.iter().map(|c| c.token).collect::<Vec<_>>(), &want[1..3]);
    for (i, a) in r.accepted.iter().enumerate() {
        same((a.token, a.logprob, &a.top_logprobs), i + 1);
    }
    same((r.token, r.logprob, &r.top_logprobs), 3);

    // Position 9 held the rejected X: the next speculative step starts there.
    let r = ring.step(spec_step(1, 4, 9, 4, &want[1..4], want[3], &[want[4], wrong(want[5])]));
    assert_eq!(r.accepted.len(), 1);
    same((r.accepted[0].token, r.accepted[0].logprob, &r.accepted[0].top_logprobs), 4);
    same((r.token, r.logprob, &r.top_logprobs), 5);

    // An ordinary step may rewind too (over the rejected position 11), once.
    let r = ring.step(Step { history_tail: want[4..6].to_vec(), ..tokens_step(1, 5, 11, 6, &[want[5]]) });
    assert!(r.accepted.is_empty());
    same((r.token, r.logprob, &r.top_logprobs), 6);
    let replies = ring.send(Message::Step(tokens_step(1, 6, 11, 7, &[want[6]])));
    expect_error(&replies, ErrorCode::BadPosition);

    // A rejected draft across a block boundary: positions 12..18 take a second block ...
    let draft: Vec<u32> = (0..5).map(|i| wrong(want[7]) + i).collect();
    let r = ring.step(spec_step(1, 7, 12, 7, &[want[6]], want[6], &draft));
    assert!(r.accepted.is_empty(), "the first draft id is wrong");
    same((r.token, r.logprob, &r.top_logprobs), 7);
    let two_blocks = (ring.a.stats().kv_bytes_used, ring.b.stats().kv_bytes_used);
    assert_eq!(two_blocks, (2 * one_block.0, 2 * one_block.1));
    // ... rewinding below the draft, or skipping ahead, is refused and changes nothing ...
    for bad_start in [12, 19] {
        let replies = ring.send(Message::Step(tokens_step(1, 8, bad_start, 8, &[want[7]])));
        expect_error(&replies, ErrorCode::BadPosition);
        assert_eq!((ring.a.stats().kv_bytes_used, ring.b.stats().kv_bytes_used), two_blocks);
    }
    // ... and the next step drops it: back to one block on each stage.
    let r = ring.step(tokens_step(1, 9, 13, 8, &[want[7]]));
    same((r.token, r.logprob, &r.top_logprobs), 8);
    assert_eq!((ring.a.stats().kv_bytes_used, ring.b.stats().kv_bytes_used), one_block);

    // A draft that does not cover the payload is malformed.
    let mut bad = spec_step(1, 10, 14, 9, &[want[8]], want[8], &[1, 2]);
    bad.draft.pop();
    expect_error(&ring.send(Message::Step(bad)), ErrorCode::BadShape);
    Ok(())
}

#[test]
fn a_tapped_step_copies_what_each_stage_forwards_to_the_origin() -> anyhow::Result<()> {
    let mut ring = Ring::standard()?;
    assert!(ring.open(9, WireDType::F32, 0).is_empty());
    let mut c = Client::new(9);
    c.prefill(&mut ring);
    // An untapped step: the result alone.
    c.decode(&mut ring);
    // A tap from someone other than the opener is ignored.
    assert!(ring.deliver(STAGE_B, STAGE_A, Message::Tap(Tap { session_id: 9, step_id: 4 })).is_empty());
    let last = *c.tokens.last().expect("a token");
    let step = tokens_step(9, 4, c.pos, c.tokens.len() as u64, &[last]);
    assert!(ring.send(Message::Step(step.clone())).iter().all(|m| matches!(m, Message::StepResult(_))));
    // The tap travels down the chain; the tapped step gives stage A's output (this ring
    // delivers A's forward first, so the result comes before it) and the result.
    assert!(ring.send(Message::Tap(Tap { session_id: 9, step_id: 5 })).is_empty());
    let next = tokens_step(9, 5, c.pos + 1, c.tokens.len() as u64 + 1, &[last]);
    // What stage A forwards, computed by hand from a fresh shard.
    let replies = ring.send(Message::Step(next));
    let [Message::StepResult(r), Message::StageOutput(out)] = replies.as_slice() else {
        panic!("expected a StepResult and a StageOutput, got {replies:?}");
    };
    assert_eq!((out.session_id, out.step_id, r.step_id), (9, 5, 5));
    assert_eq!((out.hidden.t, out.hidden.dtype), (1, WireDType::F32));
    let shard = load(0..2)?;
    let mut cache = shard.new_cache(64);
    let mut history: Vec<u32> = PROMPT.to_vec();
    // The prompt, the two ids fed so far (the second is `last`), and `last` twice more.
    history.extend(&c.tokens);
    history.push(last);
    let StageOutput::Hidden(h) = shard.forward(&mut cache, StageInput::Tokens(history), LogitsMode::Last)?
    else {
        panic!("the first span returns hidden states");
    };
    let want: Vec<f32> = h.get(h.dim(0)? - 1)?.to_vec1()?;
    let got: Vec<f32> =
        out.hidden.bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let worst = want.iter().zip(&got).map(|(a, b)| (a - b).abs() / a.abs().max(1.0)).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "the copy is the stage's output (within prefill-vs-decode rounding): {worst}");
    // The next step is not tapped.
    let again = tokens_step(9, 6, c.pos + 2, c.tokens.len() as u64 + 2, &[r.token]);
    assert!(ring.send(Message::Step(again.clone())).iter().all(|m| matches!(m, Message::StepResult(_))));

    // A tap that follows its step (as the driver sends it: no stage knows a step is checked
    // while computing it) gets the copy of what the stage forwarded, the same bytes.
    let replies = ring.send(Message::Tap(Tap { session_id: 9, step_id: 6 }));
    let [Message::StageOutput(late)] = replies.as_slice() else {
        panic!("expected the copy of step 6, got {replies:?}");
    };
    assert_eq!((late.session_id, late.step_id, late.hidden.t), (9, 6, 1));
    let mut twin = Ring::standard()?;
    assert!(twin.open(9, WireDType::F32, 0).is_empty());
    let mut tc = Client::new(9);
    tc.prefill(&mut twin);
    tc.decode(&mut twin);
    let mut early = None;
    for s in [step, tokens_step(9, 5, c.pos + 1, c.tokens.len() as u64 + 1, &[last]), again] {
        let _ = twin.send(Message::Tap(Tap { session_id: 9, step_id: s.step_id }));
        for m in twin.send(Message::Step(s)) {
            if let Message::StageOutput(o) = m
                && o.step_id == 6
            {
                early = Some(o.hidden);
            }
        }
    }
    assert_eq!(early.as_ref(), Some(&late.hidden), "a late tap copies the bytes an early one would");
    // Only the step just forwarded can be tapped late: an older one gets nothing now (and a
    // later step with that id cannot come).
    assert!(ring.send(Message::Tap(Tap { session_id: 9, step_id: 5 })).is_empty());
    Ok(())
}

#[test]
fn a_tap_after_a_prefill_chunk_copies_the_last_row_it_forwarded() -> anyhow::Result<()> {
    // The driver checks the first token of a route, sampled from the prompt's last chunk.
    let mut ring = Ring::standard()?;
    assert!(ring.open(9, WireDType::F32, 0).is_empty());
    let mut c = Client::new(9);
    c.prefill(&mut ring);
    let replies = ring.send(Message::Tap(Tap { session_id: 9, step_id: 2 }));
    let [Message::StageOutput(late)] = replies.as_slice() else {
        panic!("expected the copy of the chunk, got {replies:?}");
    };
    assert_eq!((late.step_id, late.hidden.t), (2, 1), "one row: the one that samples");
    // An early tap copies the whole chunk, whose last row is the late copy.
    let mut twin = Ring::standard()?;
    assert!(twin.open(9, WireDType::F32, 0).is_empty());
    let _ = twin.send(Message::Tap(Tap { session_id: 9, step_id: 2 }));
    let (head, tail) = PROMPT.split_at(4);
    let _ = twin.send(Message::Step(tokens_step(9, 1, 0, 0, head)));
    let early = twin
        .send(Message::Step(tokens_step(9, 2, 4, 0, tail)))
        .into_iter()
        .find_map(|m| match m {
            Message::StageOutput(o) => Some(o.hidden),
            _ => None,
        })
        .expect("the early copy");
    assert!(early.t > 1, "the chunk has {} rows", early.t);
    let row = early.bytes.len() / early.t as usize;
    assert_eq!(late.hidden.bytes, early.bytes[early.bytes.len() - row..]);
    Ok(())
}

/// Two stages whose last one has a real node identity, recording every step the first one
/// forwards.
struct SealedRing {
    a: StageService,
    b: StageService,
    b_id: PeerId,
    forwarded: Vec<Step>,
    now: Instant,
}

impl SealedRing {
    fn new() -> anyhow::Result<Self> {
        let key = iroh::SecretKey::generate();
        let mut b = StageService::new(load(2..4)?, config());
        b.set_identity(&key);
        let b_id = *key.public().as_bytes();
        Ok(Self {
            a: StageService::new(load(0..2)?, config()),
            b,
            b_id,
            forwarded: vec![],
            now: Instant::now(),
        })
    }

    fn route(&self) -> Vec<RouteHop> {
        vec![
            RouteHop { node_id: STAGE_A, start: 0, end: 2 },
            RouteHop { node_id: self.b_id, start: 2, end: 4 },
        ]
    }

    /// Sends `msg` from the origin to the first stage and returns what reached the origin.
    fn send(&mut self, msg: Message) -> Vec<Message> {
        let mut out = Vec::new();
        for action in self.a.handle(ORIGIN, msg, self.now) {
            match action {
                Action::ToNext { to, msg } => {
                    assert_eq!(to, self.b_id);
                    out.extend(self.deliver_to_b(msg));
                }
                Action::ToOrigin { msg, .. } => out.push(msg),
                Action::Closed { .. } => {}
            }
        }
        out
    }

    /// Delivers `msg` to the last stage as if the first stage forwarded it.
    fn deliver_to_b(&mut self, msg: Message) -> Vec<Message> {
        if let Message::Step(s) = &msg {
            self.forwarded.push(s.clone());
        }
        let actions = self.b.handle(STAGE_A, msg, self.now);
        actions
            .into_iter()
            .filter_map(|a| match a {
                Action::ToOrigin { msg, .. } => Some(msg),
                _ => None,
            })
            .collect()
    }

    fn step(&mut self, step: Step) -> StepResult {
        match self.send(Message::Step(step)).as_slice() {
            [Message::StepResult(r)] => r.clone(),
            other => panic!("expected one StepResult, got {other:?}"),
        }
    }
}

/// Sealed sampler inputs (protocol `seal`): the ring gives the tokens of local generation,
/// speculative steps included, while every step the first stage forwards carries no history
/// id, draft id or mask in the clear. A changed box, a clear step in a sealed session and a
/// sealed step in a clear one are refused without harm to the session; a stage without a
/// node identity refuses a sealed session. Greedy, and sampled with penalties (which need
/// the history).
#[test]
fn sealed_sampler_inputs_are_opened_by_the_last_stage_only() -> anyhow::Result<()> {
    let penalized = SamplingParams {
        temperature: 0.8,
        repetition_penalty: 1.5,
        presence_penalty: 0.8,
        frequency_penalty: 0.5,
        seed: 5,
        ..SamplingParams::default()
    };
    for params in [SamplingParams::greedy(), penalized] {
        sealed_ring_run(&params)?;
    }
    Ok(())
}

fn sealed_ring_run(params: &SamplingParams) -> anyhow::Result<()> {
    let whole = [load(0..4)?];
    let want =
        generate::generate(&whole, &PROMPT, params, DECODE_STEPS + 1, &[], |_| Flow::Continue)?.token_ids;
    let mut ring = SealedRing::new()?;
    let (public, key) = SealKey::send_to(&ring.b_id)?;
    let open = OpenSession {
        route: ring.route(),
        seal: Some(public),
        sampling: Sampling::from(params),
        ..open_msg(21, WireDType::F32, 0)
    };
    assert!(ring.send(Message::OpenSession(open.clone())).is_empty());
    assert_eq!(ring.b.stats().sessions, 1);

    // The prompt in two chunks, then two decode steps.
    let (head, tail) = PROMPT.split_at(4);
    let _ = ring.send(Message::Step(key.seal_step(tokens_step(21, 1, 0, 0, head))));
    let mut tokens = vec![ring.step(key.seal_step(tokens_step(21, 2, 4, 0, tail))).token];
    let mut pos = PROMPT.len() as u32;
    let mut step_id = 3;
    for _ in 0..2 {
        let last = *tokens.last().expect("a token");
        tokens.push(
            ring.step(key.seal_step(tokens_step(21, step_id, pos, tokens.len() as u64, &[last]))).token,
        );
        step_id += 1;
        pos += 1;
    }
    // A speculative step whose draft is right: both ids kept, then the next choice.
    let n = tokens.len();
    let last = tokens[n - 1];
    let r = ring.step(key.seal_step(spec_step(21, step_id, pos, n as u64, &[last], last, &want[n..n + 2])));
    assert_eq!(r.accepted.iter().map(|c| c.token).collect::<Vec<_>>(), &want[n..n + 2]);
    tokens.extend(r.accepted.iter().map(|c| c.token));
    tokens.push(r.token);
    step_id += 1;
    pos += 3;
    // The rest one by one, with the ids the last step kept as its history tail.
    let mut tail_ids = Some(tokens[n..].to_vec());
    while tokens.len() < want.len() {
        let last = *tokens.last().expect("a token");
        let history_tail = tail_ids.take().unwrap_or(vec![last]);
        let step = Step { history_tail, ..tokens_step(21, step_id, pos, tokens.len() as u64, &[last]) };
        tokens.push(ring.step(key.seal_step(step)).token);
        step_id += 1;
        pos += 1;
    }
    assert_eq!(tokens, want, "sealed steps give the tokens of local generation");

    // What the stage in between saw: lengths, no ids.
    assert_eq!(ring.forwarded.len() as u64, step_id - 1);
    for s in &ring.forwarded {
        assert!(s.history_tail.is_empty() && s.mask.is_none(), "step {}: ids in the clear", s.step_id);
        assert!(s.draft.iter().all(|&id| id == 0), "step {}: draft ids in the clear", s.step_id);
        assert!(s.sealed.is_some(), "step {} is sealed", s.step_id);
    }
    assert!(ring.forwarded.iter().any(|s| s.draft.len() == 2), "the speculative step kept its length");

    // A changed box is refused by the last stage, and the session carries on.
    let last = *tokens.last().expect("a token");
    let good = key.seal_step(tokens_step(21, step_id, pos, tokens.len() as u64, &[last]));
    let mut bad = good.clone();
    if let Some(b) = bad.sealed.as_mut() {
        b[20] ^= 4;
    }
    let e = expect_error(&ring.send(Message::Step(bad)), ErrorCode::BadShape);
    assert!(e.message.contains("do not open"), "{}", e.message);
    // The first stage took that step: the retry goes to the last stage as the first stage
    // would forward it (the same step id is refused upstream).
    let Some(fwd) = ring.forwarded.last().cloned() else { unreachable!() };
    let retry = Step { sealed: good.sealed.clone(), ..fwd };
    assert!(matches!(ring.deliver_to_b(Message::Step(retry)).as_slice(), [Message::StepResult(_)]));
    step_id += 1;
    pos += 1;

    // A step in the clear in a sealed session.
    let clear = tokens_step(21, step_id, pos, tokens.len() as u64 + 1, &[want[0]]);
    let e = expect_error(&ring.send(Message::Step(clear)), ErrorCode::BadShape);
    assert!(e.message.contains("clear"), "{}", e.message);

    // A sealed step in a session opened without a seal.
    let plain = OpenSession { route: ring.route(), ..open_msg(22, WireDType::F32, 0) };
    assert!(ring.send(Message::OpenSession(plain)).is_empty());
    let e = expect_error(
        &ring.send(Message::Step(key.seal_step(tokens_step(22, 1, 0, 0, &PROMPT)))),
        ErrorCode::BadShape,
    );
    assert!(e.message.contains("without a seal"), "{}", e.message);
    assert_eq!(ring.b.stats().sessions, 2);

    // A last stage with no node identity cannot open a seal, so it refuses the session.
    let mut anonymous = StageService::new(load(2..4)?, config());
    let replies = anonymous.handle(
        STAGE_A,
        Message::OpenSession(OpenSession { hop_index: 1, session_id: 23, ..open }),
        ring.now,
    );
    let [Action::ToOrigin { msg, .. }] = replies.as_slice() else { panic!("one reply, got {replies:?}") };
    expect_error(std::slice::from_ref(msg), ErrorCode::Unsupported);
    Ok(())
}
