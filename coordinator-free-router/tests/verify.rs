//! Spot-checks over real iroh endpoints on loopback: stages of the tiny llama fixture (4
//! layers, split 0..2 and 2..4), one of them a liar: the library's stage service behind
//! `Node::serve_tampered` (the `fault-injection` feature, which the binary never enables),
//! perturbing the hidden states it forwards on a few percent of its one-position steps by a
//! relative 1e-3.
//!
//! Proves: the origin detects the liar, bans it and the completion equals local generation,
//! with two replicas and the origin's weights as the tie-breaker, and with three replicas by
//! majority; a single replica is checked against the origin's own weights; honest replicas
//! pass every check, and every tap reaches a stage after the step it names.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_coordinator_free_router::driver::{
    Driver, DriverConfig, DriverError, LocalWeights, ModelInfo, Request,
};
use shoal_coordinator_free_router::swarm::announce::{Announcement, PeerState as SwarmState};
use shoal_coordinator_free_router::verify::SpotCheckConfig;
use shoal_model_shards::generate::{self, Flow};
use shoal_model_shards::sampler::SamplingParams;
use shoal_model_shards::{DType, Device, Model, Shard};
use shoal_worker::net::{Node, NodeOptions, peer_id};
use shoal_worker::protocol::{Message, Payload};
use shoal_worker::service::{Action, StageConfig, StageService};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny/llama");
const PROMPT: [u32; 7] = [1, 17, 42, 99, 5, 200, 31];
const TOKENS: usize = 24;

fn model() -> Model {
    Model::open(FIXTURE).expect("the tiny llama fixture opens")
}

fn stage_config() -> StageConfig {
    StageConfig {
        max_sessions: 64,
        kv_budget_bytes: 64 << 20,
        per_peer_sessions: 64,
        per_forwarder_sessions: 64,
        idle_timeout: Duration::from_secs(30),
        max_seq_len: 128,
        model_id: model().model_id().expect("the fixture hashes"),
    }
}

fn service(span: Range<usize>) -> StageService {
    let shard = Shard::load(&model(), span, &Device::Cpu, DType::F32).expect("span loads");
    StageService::new(shard, stage_config())
}

async fn bind() -> Node {
    Node::bind(NodeOptions { sweep_interval: Duration::from_millis(100), ..NodeOptions::loopback() })
        .await
        .expect("endpoint binds")
}

async fn honest(span: Range<usize>) -> Node {
    let node = bind().await;
    assert!(node.serve(service(span)));
    node
}

/// Multiplies every f32 of `bytes` by `1 ± 1e-3` (alternating): a relative L2 error of 1e-3.
fn perturb(bytes: &mut [u8]) {
    for (i, c) in bytes.chunks_exact_mut(4).enumerate() {
        let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        let v = v * if i % 2 == 0 { 1.001 } else { 0.999 };
        c.copy_from_slice(&v.to_le_bytes());
    }
}

/// A stage that lies on one in `every` of the one-position steps it forwards from the
/// `first + 1`-th on (the first lie on that one), consistently: the copy a tapped step sends the origin (in the same
/// batch of actions, or in a later one when the tap follows the step) carries the same lie.
/// Counts its lies in `lies`.
async fn liar(span: Range<usize>, every: usize, first: usize, lies: Arc<AtomicUsize>) -> Node {
    let node = bind().await;
    let mut forwarded = 0usize;
    let mut lied = std::collections::HashSet::new();
    let tamper = move |actions: &mut Vec<Action>| {
        for a in actions.iter_mut() {
            if let Action::ToNext { msg: Message::Step(s), .. } = a
                && let Payload::Hidden(h) = &mut s.payload
                && h.t == 1
            {
                if forwarded >= first && (forwarded - first).is_multiple_of(every) {
                    perturb(&mut h.bytes);
                    lied.insert((s.session_id, s.step_id));
                    lies.fetch_add(1, Ordering::SeqCst);
                }
                forwarded += 1;
            }
        }
        for a in actions.iter_mut() {
            if let Action::ToOrigin { msg: Message::StageOutput(o), .. } = a
                && lied.contains(&(o.session_id, o.step_id))
            {
                perturb(&mut o.hidden.bytes);
            }
        }
    };
    assert!(node.serve_tampered(service(span), tamper));
    node
}

fn config(share: f64) -> DriverConfig {
    DriverConfig {
        step_timeout: Duration::from_secs(10),
        ping_timeout: Duration::from_millis(500),
        spot_check: SpotCheckConfig { share, ..SpotCheckConfig::default() },
        ..DriverConfig::default()
    }
}

async fn driver(stages: &[&Node], config: DriverConfig, local_weights: bool) -> Driver {
    let d = Driver::new(bind().await, ModelInfo::of(&model()).expect("model info"), config);
    if local_weights {
        d.set_local_weights(LocalWeights::new(model()));
    }
    for s in stages {
        d.add_peer(s.addr()).await.expect("peer answers");
    }
    d
}

fn local(params: &SamplingParams) -> Vec<u32> {
    let shard = Shard::load(&model(), 0..4, &Device::Cpu, DType::F32).expect("model loads");
    generate::generate(std::slice::from_ref(&shard), &PROMPT, params, TOKENS, &[], |_| Flow::Continue)
        .expect("local generation")
        .token_ids
}

fn request(params: &SamplingParams) -> Request {
    Request {
        prompt: PROMPT.to_vec(),
        params: params.clone(),
        max_tokens: TOKENS,
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
        seed: 99,
        ..SamplingParams::default()
    }
}

/// Whether the driver holds `node` banned now.
fn banned(d: &Driver, node: &Node) -> bool {
    let id = peer_id(&node.endpoint_id());
    d.peers().iter().any(|(p, s)| *p == id && s.liar && s.banned_until.is_some_and(|t| t > Instant::now()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_worker_of_two_replicas_is_banned_and_the_completion_is_unchanged() {
    for params in [SamplingParams::greedy(), sampled()] {
        let lies = Arc::new(AtomicUsize::new(0));
        let a1 = honest(0..2).await;
        let a2 = liar(0..2, 25, 3, lies.clone()).await;
        let b = honest(2..4).await;
        // Two replicas of 0..2: the origin's own weights break the tie.
        let d = driver(&[&a1, &a2, &b], config(1.0), true).await;
        let outcome = d.generate(&request(&params), |_| Flow::Continue).await.expect("generation");
        assert_eq!(outcome.tokens, local(&params), "the completion of an undisturbed run");
        assert!(lies.load(Ordering::SeqCst) >= 1, "the liar lied");
        assert!(banned(&d, &a2), "the liar is banned");
        assert!(!banned(&d, &a1) && !banned(&d, &b), "honest peers are not");
        assert_eq!(d.spot_check_counts().1, 1, "one ban counted");
        assert!(outcome.spot_checks > 0);
        for n in [a1, a2, b] {
            n.shutdown().await;
        }
        d.node().shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_worker_of_three_replicas_is_outvoted() {
    let lies = Arc::new(AtomicUsize::new(0));
    // It lies on its first one-position step, and then on one in 25: the second opinions go
    // to a random replica, so it is asked within a few steps.
    let a1 = liar(0..2, 25, 0, lies.clone()).await;
    let a2 = honest(0..2).await;
    let a3 = honest(0..2).await;
    let b = honest(2..4).await;
    // No weights at the origin: the third replica decides.
    let d = driver(&[&a1, &a2, &a3, &b], config(1.0), false).await;
    let params = SamplingParams::greedy();
    let outcome = d.generate(&request(&params), |_| Flow::Continue).await.expect("generation");
    assert_eq!(outcome.tokens, local(&params));
    assert!(lies.load(Ordering::SeqCst) >= 1);
    assert!(banned(&d, &a1), "the liar is banned");
    assert!(!banned(&d, &a2) && !banned(&d, &a3) && !banned(&d, &b));
    assert_eq!(d.spot_check_counts().1, 1);
    // A later generation avoids it and still agrees.
    let again = d.generate(&request(&params), |_| Flow::Continue).await.expect("generation");
    assert_eq!(again.tokens, outcome.tokens);
    assert!(!again.route.contains(&peer_id(&a1.endpoint_id())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_replica_is_checked_against_the_origins_weights() {
    // Honest: every check passes and nothing changes.
    let a = honest(0..2).await;
    let b = honest(2..4).await;
    let d = driver(&[&a, &b], config(0.5), true).await;
    let params = sampled();
    let outcome = d.generate(&request(&params), |_| Flow::Continue).await.expect("generation");
    assert_eq!(outcome.tokens, local(&params));
    assert!(outcome.spot_checks >= 2, "{} checks", outcome.spot_checks);
    assert_eq!(d.spot_check_counts().1, 0);
    assert!(outcome.failovers.is_empty());

    // A lying single replica is caught by the origin's own computation; with no honest
    // replica left, the generation ends with an error that says why.
    let lies = Arc::new(AtomicUsize::new(0));
    let liar_a = liar(0..2, 25, 0, lies.clone()).await;
    let d = driver(&[&liar_a, &b], config(1.0), true).await;
    let err = d.generate(&request(&params), |_| Flow::Continue).await.expect_err("no honest route");
    assert!(matches!(err, DriverError::NoRoute { .. }), "{err}");
    assert!(err.to_string().contains("wrong result"), "{err}");
    assert!(banned(&d, &liar_a));
    assert_eq!(d.spot_check_counts().1, 1);
}

/// What a [`logging`] stage forwarded: `(session, step id, is_tap, positions)`.
type Log = Arc<Mutex<Vec<(u64, u64, bool, usize)>>>;

/// A stage of `span` that serves honestly and logs what it forwards, in order.
async fn logging(span: Range<usize>, log: Log) -> Node {
    let node = bind().await;
    let tamper = move |actions: &mut Vec<Action>| {
        let mut log = log.lock().expect("not poisoned");
        for a in actions.iter() {
            match a {
                Action::ToNext { msg: Message::Step(s), .. } => {
                    log.push((s.session_id, s.step_id, false, s.payload.len()))
                }
                Action::ToNext { msg: Message::Tap(t), .. } => log.push((t.session_id, t.step_id, true, 0)),
                _ => {}
            }
        }
    };
    assert!(node.serve_tampered(service(span), tamper));
    node
}

/// Honest replicas pass every check, and a stage learns that a step is checked only after
/// it computed and forwarded it: in the generation's own session every tap follows its step
/// down the chain (a liar cannot save its lies for unchecked steps). Checks catch up a kept
/// session rather than replaying the history each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_replicas_pass_every_check_and_see_each_tap_after_its_step() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let a1 = logging(0..2, log.clone()).await;
    let a2 = logging(0..2, log.clone()).await;
    let b1 = honest(2..4).await;
    let b2 = honest(2..4).await;
    let d = driver(&[&a1, &a2, &b1, &b2], config(1.0), false).await;
    let params = sampled();
    let outcome = d.generate(&request(&params), |_| Flow::Continue).await.expect("generation");
    assert_eq!(outcome.tokens, local(&params));
    // Every step was checked on the other replicas and passed: the decode steps and the
    // prompt's last chunk, which samples the first token.
    assert_eq!(outcome.spot_checks, TOKENS);
    assert!(outcome.failovers.is_empty());
    assert_eq!(d.spot_check_counts(), (TOKENS as u64, 0));
    let log = std::mem::take(&mut *log.lock().expect("not poisoned"));
    // The generation's session is the one with the most steps (a check's replay is a few
    // prefill chunks).
    let mut steps: HashMap<u64, usize> = HashMap::new();
    for &(session, _, tap, _) in &log {
        if !tap {
            *steps.entry(session).or_default() += 1;
        }
    }
    let main = steps.iter().max_by_key(|(_, n)| **n).map(|(s, _)| *s).expect("steps were forwarded");
    let events: Vec<(u64, bool)> =
        log.iter().filter(|(s, ..)| *s == main).map(|&(_, step, tap, _)| (step, tap)).collect();
    let taps: Vec<u64> = events.iter().filter(|(_, tap)| *tap).map(|(s, _)| *s).collect();
    assert_eq!(taps.len(), TOKENS, "every step that sampled was tapped");
    for step in taps {
        let forwarded =
            events.iter().position(|&e| e == (step, false)).expect("the tapped step was forwarded");
        let tapped = events.iter().position(|&e| e == (step, true)).expect("the tap was forwarded");
        assert!(forwarded < tapped, "the tap of step {step} came before the step");
    }
    // The checks ran through one session kept open on the other replicas, each sending only
    // what was generated since the previous one: span 0..2 computed the history about twice
    // (the generation and its checker), not once per check (about 470 positions).
    let positions: usize = log.iter().map(|e| e.3).sum();
    assert!(positions <= 2 * (PROMPT.len() + TOKENS), "span 0..2 computed {positions} positions");
}

/// An announcement of `node` serving `span` of the fixture at `throughput` tokens/s per layer.
fn announced(node: &Node, span: Range<u32>, throughput: f32) -> Announcement {
    Announcement {
        node: peer_id(&node.endpoint_id()),
        model: model().model_id().expect("the fixture hashes"),
        n_layers: 4,
        start: span.start,
        end: span.end,
        state: SwarmState::Serving,
        throughput,
        load: 0,
        free_kv_bytes: 1 << 30,
        version: "0.1.0".into(),
        seq: 1,
        issued_at_ms: 0,
        ttl_ms: 60_000,
        addrs: node.addr().ip_addrs().copied().collect(),
        holds: Default::default(),
    }
}

/// A peer on the route that starts lying on every step and is caught a few steps later by a
/// check: the tokens its route produced since the last confirmed one are withdrawn (the
/// caller sees the next token's index go back) and given again by an honest route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_through_a_caught_liar_since_the_last_check_are_withdrawn_and_given_again() {
    let params = SamplingParams::greedy();
    let want = local(&params);
    let mut withdrawals = 0;
    // Whether tokens are left to withdraw depends on the checks' seeded draw (a check right
    // after a passed one leaves none): a few generations.
    for _ in 0..6 {
        let lies = Arc::new(AtomicUsize::new(0));
        let a1 = honest(0..2).await;
        // Lies on every step from its 6th one-position step on.
        let a2 = liar(0..2, 1, 5, lies.clone()).await;
        let b = honest(2..4).await;
        let d = Driver::new(bind().await, ModelInfo::of(&model()).expect("model info"), config(0.25));
        d.set_local_weights(LocalWeights::new(model()));
        // The liar announces itself as much faster than its replica: routes go through it.
        let view = [announced(&a1, 0..2, 1.0), announced(&a2, 0..2, 1e6), announced(&b, 2..4, 1e3)];
        assert_eq!(d.sync_view(&view).len(), 3);
        d.refresh().await;
        let mut seen: Vec<u32> = Vec::new();
        let outcome = d
            .generate(&request(&params), |ev| {
                assert!(ev.index <= seen.len(), "index {} after {} tokens", ev.index, seen.len());
                seen.truncate(ev.index);
                seen.push(ev.token);
                Flow::Continue
            })
            .await
            .expect("generation");
        assert_eq!(outcome.tokens, want, "the completion of an undisturbed run");
        assert_eq!(seen, outcome.tokens, "the tokens the caller holds are those that stand");
        assert!(lies.load(Ordering::SeqCst) >= 1, "the liar lied");
        assert!(banned(&d, &a2), "the liar is caught");
        assert!(outcome.withdrawn < TOKENS);
        withdrawals += outcome.withdrawn;
        for n in [a1, a2, b] {
            n.shutdown().await;
        }
        d.node().shutdown().await;
        if withdrawals > 0 {
            break;
        }
    }
    assert!(withdrawals > 0, "no generation withdrew tokens");
}
