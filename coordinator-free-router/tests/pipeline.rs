//! The pipeline over real iroh endpoints on loopback, in one process: stages of the tiny
//! llama fixture (4 layers) served by `worker::net::Node`s, driven by the router's `Driver`.
//!
//! Proves: any split into 1-4 stages gives the tokens of local generation (greedy and
//! seeded sampling); a stage that goes away mid-generation is replaced and the tokens do not
//! change, constrained (a token mask per step) or not; hostile frames get typed errors while another session keeps running; sessions
//! are freed on completion, on cancellation and when their origin vanishes.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iroh::endpoint::{Connection, RecvStream, presets};
use iroh::{Endpoint, RelayMode};
use shoal_coordinator_free_router::constraint::{Constraint, TokenConstraint};
use shoal_coordinator_free_router::driver::{Driver, DriverConfig, DriverError, ModelInfo, Request};
use shoal_coordinator_free_router::verify::SpotCheckConfig;
use shoal_model_shards::generate::{self, FinishReason, Flow, LocalPipeline};
use shoal_model_shards::sampler::{Sampler, SamplingParams};
use shoal_model_shards::token_mask::TokenMask;
use shoal_model_shards::{DType, Device, LogitsMode, Model, Shard};
use shoal_worker::net::{Node, NodeOptions, peer_id};
use shoal_worker::protocol::{
    self, ALPN, ErrorCode, HiddenStates, MAX_FRAME, Message, OpenSession, Payload, RouteHop, Sampling, Step,
    WireDType,
};
use shoal_worker::service::{Action, StageConfig, StageService};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny/llama");
const PROMPT: [u32; 7] = [1, 17, 42, 99, 5, 200, 31];
const BUDGET: usize = 64 << 20;

fn model() -> Model {
    Model::open(FIXTURE).expect("the tiny llama fixture opens")
}

fn model_id() -> [u8; 32] {
    model().model_id().expect("the fixture hashes")
}

fn stage_config(idle: Duration) -> StageConfig {
    StageConfig {
        max_sessions: 16,
        kv_budget_bytes: BUDGET,
        per_peer_sessions: 16,
        per_forwarder_sessions: 64,
        idle_timeout: idle,
        max_seq_len: 128,
        model_id: model_id(),
    }
}

fn options() -> NodeOptions {
    NodeOptions { sweep_interval: Duration::from_millis(100), ..NodeOptions::loopback() }
}

async fn stage(span: Range<usize>, idle: Duration) -> Node {
    let model = model();
    let shard = Shard::load(&model, span, &Device::Cpu, DType::F32).expect("span loads");
    let node = Node::bind(options()).await.expect("endpoint binds");
    assert!(node.serve(StageService::new(shard, stage_config(idle))));
    node
}

fn driver_config() -> DriverConfig {
    DriverConfig {
        step_timeout: Duration::from_secs(5),
        ping_timeout: Duration::from_millis(500),
        ..DriverConfig::default()
    }
}

async fn driver_for(stages: &[&Node], config: DriverConfig) -> Driver {
    let origin = Node::bind(options()).await.expect("origin binds");
    let d = Driver::new(origin, ModelInfo::of(&model()).expect("model info"), config);
    for s in stages {
        d.add_peer(s.addr()).await.expect("peer answers");
    }
    d
}

fn local(params: &SamplingParams, max_tokens: usize) -> Vec<u32> {
    let model = model();
    let shard = Shard::load(&model, 0..4, &Device::Cpu, DType::F32).expect("model loads");
    generate::generate(std::slice::from_ref(&shard), &PROMPT, params, max_tokens, &[], |_| Flow::Continue)
        .expect("local generation")
        .token_ids
}

fn request(params: &SamplingParams, max_tokens: usize) -> Request {
    Request {
        prompt: PROMPT.to_vec(),
        params: params.clone(),
        max_tokens,
        stop_ids: vec![],
        top_logprobs: 0,
        constraint: None,
    }
}

fn sampled() -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: Some(50),
        repetition_penalty: 1.1,
        seed: 1234,
        ..SamplingParams::default()
    }
}

/// Waits until every stage holds no session and no KV block.
async fn wait_all_freed(stages: &[&Node]) {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let busy: Vec<_> = stages.iter().filter_map(|s| s.stage_stats()).filter(|s| s.sessions > 0).collect();
        if busy.is_empty() {
            for s in stages {
                let stats = s.stage_stats().expect("a stage");
                assert_eq!(stats.kv_bytes_used, 0);
            }
            return;
        }
        assert!(Instant::now() < until, "sessions still open: {busy:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_split_equals_local_generation() {
    let greedy = SamplingParams::greedy();
    let want_greedy = local(&greedy, 24);
    let want_sampled = local(&sampled(), 24);
    assert_ne!(want_greedy, want_sampled, "the sampled run should differ from greedy");
    #[allow(clippy::single_range_in_vec_init)] // one stage holding layers 0..4
    let splits: [&[Range<usize>]; 4] =
        [&[0..4], &[0..2, 2..4], &[0..1, 1..3, 3..4], &[0..1, 1..2, 2..3, 3..4]];
    for spans in splits {
        let mut nodes = Vec::new();
        for span in spans {
            nodes.push(stage(span.clone(), Duration::from_secs(60)).await);
        }
        let refs: Vec<&Node> = nodes.iter().collect();
        let d = driver_for(&refs, driver_config()).await;
        let out = d.generate(&request(&greedy, 24), |_| Flow::Continue).await.expect("greedy run");
        assert_eq!(out.tokens, want_greedy, "greedy through {spans:?}");
        assert_eq!(out.route.len(), spans.len());
        assert_eq!(out.step_times.len(), 23, "one round trip per decode step");
        let out = d.generate(&request(&sampled(), 24), |_| Flow::Continue).await.expect("sampled run");
        assert_eq!(out.tokens, want_sampled, "seeded sampling through {spans:?}");
        assert!(out.failovers.is_empty());
        wait_all_freed(&refs).await;
        d.node().shutdown().await;
        for n in &nodes {
            n.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_shuts_down_mid_generation_is_replaced_without_changing_tokens() {
    let want = local(&sampled(), 40);
    let a = stage(0..2, Duration::from_secs(60)).await;
    let b1 = stage(2..4, Duration::from_secs(60)).await;
    let b2 = stage(2..4, Duration::from_secs(60)).await;
    let d = driver_for(&[&a, &b1, &b2], driver_config()).await;
    let (b1_id, b2_id) = (b1.id(), b2.id());
    let mut killed = None;
    let mut b1 = Some(b1);
    let mut b2 = Some(b2);
    let out = d
        .generate(&request(&sampled(), 40), |ev| {
            if ev.index == 15 {
                // Shut down whichever replica of 2..4 this session uses: it hands the
                // session back (`Draining`) and leaves.
                let victim = if ev.route.contains(&b1_id) { b1.take() } else { b2.take() };
                let victim = victim.expect("the route uses a replica");
                killed = Some(victim.id());
                tokio::spawn(async move { victim.shutdown().await });
            }
            Flow::Continue
        })
        .await
        .expect("generation survives");
    assert_eq!(out.tokens, want);
    assert_eq!(out.failovers.len(), 1, "{:?}", out.failovers);
    let killed = killed.expect("a replica was stopped");
    assert!(!out.route.contains(&killed));
    assert!(out.route.contains(if killed == b1_id { &b2_id } else { &b1_id }));
    let f = &out.failovers[0];
    assert_eq!(f.at_token, 16);
    eprintln!("recovered: {} after {:?} (detected after {:?})", f.reason, f.stall, f.detection);
    let survivors: Vec<&Node> = [Some(&a), b1.as_ref(), b2.as_ref()].into_iter().flatten().collect();
    wait_all_freed(&survivors).await;
}

/// A toy grammar: token `i` of the output is an id `≡ i (mod 3)`, and the output is complete
/// after `len` tokens.
struct Residues {
    vocab: u32,
    at: u32,
    len: u32,
}

impl TokenConstraint for Residues {
    fn next_mask(&mut self) -> Result<Option<TokenMask>, String> {
        if self.at == self.len {
            return Ok(None);
        }
        Ok(Some(TokenMask::Allow((0..self.vocab).filter(|id| id % 3 == self.at % 3).collect())))
    }

    fn advance(&mut self, token: u32) -> Result<(), String> {
        if token % 3 != self.at % 3 {
            return Err(format!("{token} at {}", self.at));
        }
        self.at += 1;
        Ok(())
    }
}

/// Local generation with the [`Residues`] mask applied before the sampler, as the last stage
/// applies it.
fn local_residues(params: &SamplingParams, len: u32) -> Vec<u32> {
    let model = model();
    let shard = Shard::load(&model, 0..4, &Device::Cpu, DType::F32).expect("model loads");
    let shards = [shard];
    let mut pipe = LocalPipeline::new(&shards, PROMPT.len() + len as usize).expect("pipeline");
    let sampler = Sampler::new(params.clone()).expect("sampler");
    let mut logits = pipe.step(&PROMPT, LogitsMode::Last).expect("prefill");
    let mut history = PROMPT.to_vec();
    let mut grammar = Residues { vocab: model.spec().vocab_size as u32, at: 0, len };
    let mut out = Vec::new();
    while let Some(mask) = grammar.next_mask().expect("mask") {
        let mut row = logits.flatten_all().and_then(|l| l.to_vec1::<f32>()).expect("logits");
        mask.apply(&mut row).expect("the mask fits");
        let token = sampler.sample(&row, &history, PROMPT.len(), out.len() as u64, 0).expect("sample").token;
        grammar.advance(token).expect("the sampler keeps to the mask");
        out.push(token);
        history.push(token);
        logits = pipe.step(&[token], LogitsMode::Last).expect("decode");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_constrained_generation_keeps_to_its_masks_through_a_failover() {
    let params = sampled();
    let want = local_residues(&params, 20);
    assert_eq!(want.len(), 20);
    assert!(want.iter().enumerate().all(|(i, t)| t % 3 == i as u32 % 3));
    assert_ne!(want, local(&params, 20), "the mask changes the output");
    let a = stage(0..2, Duration::from_secs(60)).await;
    let b1 = stage(2..4, Duration::from_secs(60)).await;
    let b2 = stage(2..4, Duration::from_secs(60)).await;
    let d = driver_for(&[&a, &b1, &b2], driver_config()).await;
    let vocab = model().spec().vocab_size as u32;
    let constrained = || Request {
        constraint: Some(Constraint::new(Residues { vocab, at: 0, len: 20 })),
        ..request(&params, 30)
    };
    let out = d.generate(&constrained(), |_| Flow::Continue).await.expect("constrained run");
    assert_eq!(out.tokens, want);
    assert_eq!(out.finish_reason, FinishReason::Stop, "a complete grammar ends the generation");

    // The same, with the replica of 2..4 in use shut down at token 8.
    let b1_id = b1.id();
    let (mut b1, mut b2) = (Some(b1), Some(b2));
    let out = d
        .generate(&constrained(), |ev| {
            if ev.index == 8 {
                let victim = if ev.route.contains(&b1_id) { b1.take() } else { b2.take() };
                let victim = victim.expect("the route uses a replica");
                tokio::spawn(async move { victim.shutdown().await });
            }
            Flow::Continue
        })
        .await
        .expect("the constrained generation survives");
    assert_eq!(out.tokens, want, "the replay sends the same masks");
    assert_eq!(out.failovers.len(), 1, "{:?}", out.failovers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_of_a_constrained_generation_passes_its_spot_check() {
    // A check replays the step with its mask: without it the other replica would sample
    // another id and an honest peer would be banned.
    let params = sampled();
    let want = local_residues(&params, 20);
    let a1 = stage(0..2, Duration::from_secs(60)).await;
    let a2 = stage(0..2, Duration::from_secs(60)).await;
    let b1 = stage(2..4, Duration::from_secs(60)).await;
    let b2 = stage(2..4, Duration::from_secs(60)).await;
    let config = DriverConfig {
        spot_check: SpotCheckConfig { share: 1.0, ..SpotCheckConfig::default() },
        ..driver_config()
    };
    let d = driver_for(&[&a1, &a2, &b1, &b2], config).await;
    let vocab = model().spec().vocab_size as u32;
    let request = Request {
        constraint: Some(Constraint::new(Residues { vocab, at: 0, len: 20 })),
        ..request(&params, 30)
    };
    let out = d.generate(&request, |_| Flow::Continue).await.expect("checked run");
    assert_eq!(out.tokens, want);
    assert!(out.failovers.is_empty(), "{:?}", out.failovers);
    assert_eq!(out.spot_checks, 20, "every step that samples is checked and passes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_and_completing_free_every_stage() {
    let a = stage(0..1, Duration::from_secs(60)).await;
    let b = stage(1..3, Duration::from_secs(60)).await;
    let c = stage(3..4, Duration::from_secs(60)).await;
    let d = driver_for(&[&a, &b, &c], driver_config()).await;
    let mut seen = 0;
    let out = d
        .generate(&request(&SamplingParams::greedy(), 30), |_| {
            seen += 1;
            if seen == 3 { Flow::Stop } else { Flow::Continue }
        })
        .await
        .expect("cancelled run");
    assert_eq!(out.tokens.len(), 3);
    wait_all_freed(&[&a, &b, &c]).await;
    // Dropping the future mid-generation (a client that goes away) closes the chain too.
    let long = request(&SamplingParams::greedy(), 100);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    let fut = d.generate(&long, |ev| {
        if ev.index == 5
            && let Some(tx) = tx.take()
        {
            let _ = tx.send(());
        }
        Flow::Continue
    });
    tokio::select! {
        r = fut => panic!("the generation should have been dropped, got {r:?}"),
        _ = rx => {}
    }
    assert!(a.stage_stats().expect("stage").sessions <= 1);
    wait_all_freed(&[&a, &b, &c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_a_vanished_origin_idle_out_and_free_their_memory() {
    let a = stage(0..2, Duration::from_millis(400)).await;
    let b = stage(2..4, Duration::from_millis(400)).await;
    let origin = Node::bind(options()).await.expect("origin binds");
    let session_id = 77;
    let open = OpenSession {
        session_id,
        model_id: model_id(),
        origin: origin.id(),
        route: vec![
            RouteHop { node_id: a.id(), start: 0, end: 2 },
            RouteHop { node_id: b.id(), start: 2, end: 4 },
        ],
        hop_index: 0,
        wire_dtype: WireDType::F16,
        max_len: 64,
        sampling: Sampling::from(&SamplingParams::greedy()),
        top_logprobs: 0,
        prompt_len: PROMPT.len() as u32,
        address_book: vec![origin.node_addrs(), a.node_addrs(), b.node_addrs()],
        seal: None,
    };
    origin.add_peer_addr(a.addr());
    let mut channel = origin.open_session_channel(session_id);
    origin.send(a.id(), &Message::OpenSession(open)).expect("open sent");
    let step = Step {
        session_id,
        step_id: 1,
        start_pos: 0,
        sample_step: 0,
        history_tail: PROMPT.to_vec(),
        draft: Vec::new(),
        mask: None,
        sealed: None,
        payload: Payload::Tokens(PROMPT.to_vec()),
    };
    origin.send(a.id(), &Message::Step(step)).expect("step sent");
    let reply = channel.recv_until(tokio::time::Instant::now() + Duration::from_secs(5)).await;
    assert!(matches!(reply, Some(ref r) if matches!(r.msg, Message::StepResult(_))), "{reply:?}");
    let busy = (a.stage_stats().expect("stage"), b.stage_stats().expect("stage"));
    assert_eq!((busy.0.sessions, busy.1.sessions), (1, 1));
    assert!(busy.0.kv_bytes_used > 0 && busy.1.kv_bytes_used > 0);
    // The origin disappears without closing anything.
    origin.shutdown().await;
    drop(channel);
    wait_all_freed(&[&a, &b]).await;
    // What a peer sees: the full budget is free again.
    let observer = Node::bind(options()).await.expect("observer binds");
    observer.add_peer_addr(b.addr());
    let (_, info) = observer.ping(b.id(), Duration::from_secs(2)).await.expect("pong");
    let info = info.expect("a stage describes itself");
    assert_eq!((info.sessions, info.free_kv_bytes, info.start, info.end), (0, BUDGET as u64, 2, 4));
}

/// Reads one frame from a raw stream.
async fn read_frame(recv: &mut RecvStream) -> Message {
    let mut header = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut header))
        .await
        .expect("a reply in time")
        .expect("a frame header");
    let mut body = vec![0u8; protocol::frame_len(header).expect("valid header")];
    recv.read_exact(&mut body).await.expect("a frame body");
    protocol::decode_body(&body).expect("a valid reply")
}

fn expect_error(m: &Message, code: ErrorCode) {
    match m {
        Message::Error(e) => assert_eq!(e.code, code, "{e:?}"),
        other => panic!("expected {code} error, got {other:?}"),
    }
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_get_typed_errors_while_other_sessions_run() {
    let a = stage(0..2, Duration::from_secs(60)).await;
    let b = stage(2..4, Duration::from_secs(60)).await;
    let d = driver_for(&[&a, &b], driver_config()).await;
    let want = local(&SamplingParams::greedy(), 60);

    let hostile = async {
        let ep = Endpoint::builder(presets::Minimal)
            .relay_mode(RelayMode::Disabled)
            .clear_ip_transports()
            .bind_addr("127.0.0.1:0")
            .expect("bind address")
            .bind()
            .await
            .expect("raw endpoint");
        let conn: Connection = ep.connect(b.addr(), ALPN).await.expect("connects to stage b");
        let me = peer_id(&ep.id());
        let mut send = conn.open_uni().await.expect("a stream");
        let hidden = model().spec().hidden_size as u32;
        // Open a session on stage b (the last hop) as if this peer were stage a (a stage
        // takes a later hop only from the route's previous hop).
        let open = OpenSession {
            session_id: 9,
            model_id: model_id(),
            origin: me,
            route: vec![
                RouteHop { node_id: me, start: 0, end: 2 },
                RouteHop { node_id: b.id(), start: 2, end: 4 },
            ],
            hop_index: 1,
            wire_dtype: WireDType::F32,
            max_len: 16,
            sampling: Sampling::from(&SamplingParams::greedy()),
            top_logprobs: 0,
            prompt_len: 1,
            address_book: vec![],
            seal: None,
        };
        send.write_all(&protocol::encode(&Message::OpenSession(open))).await.expect("write");
        let hidden_step = |session_id, values: Vec<f32>, width: u32| {
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            Message::Step(Step {
                session_id,
                step_id: 1,
                start_pos: 0,
                sample_step: 0,
                history_tail: vec![1],
                draft: Vec::new(),
                mask: None,
                sealed: None,
                payload: Payload::Hidden(HiddenStates { t: 1, hidden: width, dtype: WireDType::F32, bytes }),
            })
        };
        // 1. An unknown kind.
        send.write_all(&frame(&[99, 1, 2, 3])).await.expect("write");
        // 2. A step of the wrong width.
        send.write_all(&protocol::encode(&hidden_step(9, vec![0.5; 8], 8))).await.expect("write");
        // 3. A step with a NaN.
        let mut nan = vec![0.25; hidden as usize];
        nan[3] = f32::NAN;
        send.write_all(&protocol::encode(&hidden_step(9, nan, hidden))).await.expect("write");
        // 4. A step for a session that does not exist.
        send.write_all(&protocol::encode(&hidden_step(1234, vec![0.25; hidden as usize], hidden)))
            .await
            .expect("write");
        // 5. The session still works.
        send.write_all(&protocol::encode(&hidden_step(9, vec![0.25; hidden as usize], hidden)))
            .await
            .expect("write");
        let mut recv = conn.accept_uni().await.expect("the stage answers on the same connection");
        expect_error(&read_frame(&mut recv).await, ErrorCode::Malformed);
        // The stage keeps each session's order; across sessions it may run a decode step
        // first (its scheduler), so session 1234's refusal can come before session 9's replies.
        let mut of_9 = Vec::new();
        for _ in 0..4 {
            match read_frame(&mut recv).await {
                Message::Error(e) if e.session_id == Some(1234) => {
                    assert_eq!(e.code, ErrorCode::UnknownSession, "{e:?}")
                }
                other => of_9.push(other),
            }
        }
        assert_eq!(of_9.len(), 3, "{of_9:?}");
        expect_error(&of_9[0], ErrorCode::BadShape);
        expect_error(&of_9[1], ErrorCode::NonFinite);
        match &of_9[2] {
            Message::StepResult(r) => assert_eq!((r.session_id, r.step_id), (9, 1)),
            other => panic!("expected a result, got {other:?}"),
        }
        // 6. An oversized frame header: refused before any allocation, the stream is dropped.
        send.write_all(&((MAX_FRAME as u32) + 1).to_le_bytes()).await.expect("write");
        expect_error(&read_frame(&mut recv).await, ErrorCode::TooLarge);
        // The connection still serves new streams.
        let mut send2 = conn.open_uni().await.expect("a new stream");
        send2.write_all(&protocol::encode(&Message::Ping { nonce: 5 })).await.expect("write");
        match read_frame(&mut recv).await {
            Message::Pong { nonce: 5, info: Some(info) } => assert!(info.sessions >= 1),
            other => panic!("expected a pong, got {other:?}"),
        }
        conn.close(0u32.into(), b"done");
        ep.close().await;
    };
    let honest_request = request(&SamplingParams::greedy(), 60);
    let honest = d.generate(&honest_request, |_| Flow::Continue);
    let ((), out) = tokio::join!(hostile, honest);
    let out = out.expect("the honest session completes");
    assert_eq!(out.tokens, want);
    assert!(out.failovers.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_missing_spans_are_refused_with_reasons() {
    let a = stage(0..2, Duration::from_secs(60)).await;
    let d = driver_for(&[&a], driver_config()).await;
    let greedy = SamplingParams::greedy();
    let refused = |r: Result<_, DriverError>| match r {
        Err(e @ DriverError::InvalidRequest(_)) => e.to_string(),
        other => panic!("expected an invalid request, got {other:?}"),
    };
    let mut r = request(&greedy, 8);
    r.prompt.clear();
    assert!(refused(d.generate(&r, |_| Flow::Continue).await).contains("empty"));
    let mut r = request(&greedy, 8);
    r.prompt.push(256);
    assert!(refused(d.generate(&r, |_| Flow::Continue).await).contains("vocabulary"));
    let r = request(&greedy, 128);
    assert!(refused(d.generate(&r, |_| Flow::Continue).await).contains("context of 128"));
    let r = request(&SamplingParams { temperature: -1.0, ..greedy.clone() }, 8);
    refused(d.generate(&r, |_| Flow::Continue).await);
    // Layers 2..4 are served by nobody.
    match d.generate(&request(&greedy, 8), |_| Flow::Continue).await {
        Err(e @ DriverError::NoRoute { .. }) => assert!(e.to_string().contains("0..2"), "{e}"),
        other => panic!("expected no route, got {other:?}"),
    }
    assert_eq!(a.stage_stats().expect("stage").sessions, 0, "nothing was opened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_kv_budget_is_refused_and_the_origin_routes_elsewhere() {
    let model = model();
    let shard = Shard::load(&model, 0..4, &Device::Cpu, DType::F32).expect("span loads");
    // One block: 16 positions; the prompt (7) plus 20 tokens does not fit.
    let mut cfg = stage_config(Duration::from_secs(60));
    cfg.kv_budget_bytes = shard.kv_pool(None).block_bytes();
    let small = Node::bind(options()).await.expect("endpoint binds");
    assert!(small.serve(StageService::new(shard, cfg)));
    let params = SamplingParams::greedy();
    let d = driver_for(&[&small], driver_config()).await;
    let err =
        d.generate(&request(&params, 20), |_| Flow::Continue).await.expect_err("the budget is too small");
    let msg = err.to_string();
    assert!(msg.contains("CapacityExceeded") && msg.contains("KV cache budget is full"), "{msg}");
    // A replica with room joins: the same origin now routes there, with local generation's tokens.
    let big = stage(0..4, Duration::from_secs(60)).await;
    d.add_peer(big.addr()).await.expect("peer answers");
    let out = d.generate(&request(&params, 20), |_| Flow::Continue).await.expect("generation on the replica");
    assert_eq!(out.tokens, local(&params, 20));
    assert_eq!(out.route, vec![big.id()]);
    wait_all_freed(&[&small, &big]).await;
}

/// A stage that serves honestly and keeps a copy of every step it forwards: what the next
/// stage receives.
async fn recording_stage(span: Range<usize>, seen: Arc<Mutex<Vec<Step>>>) -> Node {
    let model = model();
    let shard = Shard::load(&model, span, &Device::Cpu, DType::F32).expect("span loads");
    let node = Node::bind(options()).await.expect("endpoint binds");
    let record = move |actions: &mut Vec<Action>| {
        for a in actions.iter() {
            if let Action::ToNext { msg: Message::Step(s), .. } = a {
                seen.lock().expect("not poisoned").push(s.clone());
            }
        }
    };
    let service = StageService::new(shard, stage_config(Duration::from_secs(60)));
    assert!(node.serve_tampered(service, record));
    node
}

/// Privacy of the token history: with sealing (the default) the stages before the last one
/// forward steps that carry no history id, draft id or mask in the clear, and the last stage
/// still samples with penalties over the whole history (tokens of local generation), through
/// a constrained generation too. Without sealing, the same recorders see every id, so they
/// would catch a leak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_before_the_last_see_no_token_ids_in_the_steps_they_relay() {
    let params = sampled();
    let want = local(&params, 24);
    let want_masked = local_residues(&params, 12);
    let vocab = model().spec().vocab_size as u32;
    for seal in [true, false] {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let a = recording_stage(0..1, seen.clone()).await;
        let b = recording_stage(1..3, seen.clone()).await;
        let c = stage(3..4, Duration::from_secs(60)).await;
        let config = DriverConfig { seal_sampler_inputs: seal, ..driver_config() };
        let d = driver_for(&[&a, &b, &c], config).await;
        let out = d.generate(&request(&params, 24), |_| Flow::Continue).await.expect("sampled run");
        assert_eq!(out.tokens, want, "seal {seal}");
        let constrained = Request {
            constraint: Some(Constraint::new(Residues { vocab, at: 0, len: 12 })),
            ..request(&params, 30)
        };
        let out = d.generate(&constrained, |_| Flow::Continue).await.expect("constrained run");
        assert_eq!(out.tokens, want_masked, "seal {seal}");

        let steps = std::mem::take(&mut *seen.lock().expect("not poisoned"));
        // Each of the two recorders saw every step of both generations.
        assert!(steps.len() >= 2 * (24 + 12), "{} steps recorded", steps.len());
        let clear_ids: usize = steps.iter().map(|s| s.history_tail.len()).sum();
        let masks = steps.iter().filter(|s| s.mask.is_some()).count();
        if seal {
            assert_eq!((clear_ids, masks), (0, 0), "ids in the clear between stages");
            assert!(steps.iter().all(|s| s.sealed.is_some()));
        } else {
            assert!(clear_ids >= 2 * (PROMPT.len() + 23), "the recorders see the history in the clear");
            assert!(masks >= 2 * 12);
            assert!(steps.iter().all(|s| s.sealed.is_none()));
        }
        d.node().shutdown().await;
        for n in [&a, &b, &c] {
            n.shutdown().await;
        }
    }
}
