//! A deterministic simulation of the generation state machine ([`super::machine`]) against
//! simulated peers, with seeded faults and no sockets, threads or clocks: peers serve spans of
//! a toy model whose next token and hidden states are hashes of the history, the network
//! delivers messages after fixed latencies on a virtual clock, and faults are drawn from a
//! seed: peers that crash, drop steps while answering pings, report errors, corrupt what
//! they forward, or lie on checked and unchecked steps alike. Whatever the faults, a
//! generation must give the tokens of an undisturbed run, and only faulty peers may be banned.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shoal_model_shards::generate::Flow;
use shoal_model_shards::sampler::SamplingParams;
use shoal_worker::protocol::{
    Chosen, ErrorCode, HiddenStates, Message, PeerInfo, RouteHop, StageError, StageOutput, Step, StepResult,
    Tap, WireDType,
};
use shoal_worker::service::PeerId;

use super::machine::{Action, Event, Generation, Opinion};
use super::roster::Roster;
use super::{DriverConfig, DriverError, ModelInfo, Outcome, PeerState, Request};
use crate::blame::Strikes;
use crate::verify::{Computer, Observation, SpotCheckConfig, SpotCheckPolicy};

const VOCAB: u32 = 1000;
const WIDTH: usize = 8;
const N_LAYERS: u32 = 6;
/// One-way latency between any two nodes.
const HOP: Duration = Duration::from_millis(5);
/// Compute time of one span.
const COMPUTE: Duration = Duration::from_millis(3);

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn digest(history: &[u32]) -> u64 {
    history.iter().fold(0x1234_5678, |h, &t| mix(h ^ u64::from(t)))
}

/// The toy model's choice after `history`.
fn next_token(history: &[u32]) -> u32 {
    (digest(history) % u64::from(VOCAB)) as u32
}

/// The toy model's hidden state after `history` at the boundary ending at layer `end`.
fn hidden(history: &[u32], end: u32) -> Vec<f32> {
    let d = digest(history);
    (0..WIDTH as u64).map(|i| (mix(d ^ (u64::from(end) << 32) ^ i) % 2000) as f32 / 1000.0 - 1.0).collect()
}

/// What a lying or corrupting hop makes of an output: off by 1e-2 relative, well over the
/// tolerance.
fn perturbed(mut h: Vec<f32>) -> Vec<f32> {
    h[0] += 0.05;
    h
}

fn wire(h: &[f32]) -> HiddenStates {
    HiddenStates {
        t: 1,
        hidden: WIDTH as u32,
        dtype: WireDType::F32,
        bytes: h.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// How a simulated peer misbehaves.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Honest,
    /// Stops answering anything (pings included) from this virtual time on.
    Crash(Duration),
    /// Answers pings but silently drops every step from this virtual time on.
    Drop(Duration),
    /// Reports an internal error on this share of steps.
    Errors(f64),
    /// Perturbs its output on this share of steps (first hops: the hidden states; the last:
    /// the token), consistently in what it forwards and what a tap shows.
    Lie(f64),
    /// Perturbs its output on every step from this virtual time on.
    LieFrom(Duration),
}

struct SimPeer {
    span: (u32, u32),
    fault: Fault,
}

/// A step as the route computed it: the history it saw and which hop lied (a lie at hop `i`
/// changes every output from `i` on).
struct Computed {
    history: Vec<u32>,
    first_lie: Option<usize>,
    /// Hops that answer (all, unless one dropped or crashed: then those before it).
    reached: usize,
}

struct SimSession {
    route: Vec<RouteHop>,
    history: Vec<u32>,
    /// The lowest position the next step may start at.
    floor: usize,
    steps: HashMap<u64, Computed>,
}

/// The simulated swarm and network, driving one generation.
struct Sim {
    peers: BTreeMap<PeerId, SimPeer>,
    sessions: HashMap<u64, SimSession>,
    rng: StdRng,
    start: Instant,
    now: Instant,
    /// Events to deliver, by (time, sequence), with the session of a message (the driver
    /// reads a session's messages from its own channel).
    queue: BTreeMap<(Instant, u64), (Option<u64>, Event)>,
    seq: u64,
    me: PeerId,
    /// Whether the origin holds the weights (checks fall back to its own computation).
    has_local: bool,
    /// Seeds the spot-check draws.
    policy_seed: u64,
    /// Tokens the caller holds (one past the last index given).
    delivered: usize,
    /// Whether steps carry drafts.
    speculate: bool,
    /// Draft ids sent and accepted.
    drafted: usize,
    accepted: usize,
    /// Second opinions asked for.
    second_opinions: usize,
    /// Peers a check caught lying ([`Action::Caught`]).
    caught: Vec<PeerId>,
}

fn id(n: u8) -> PeerId {
    let mut id = [0u8; 32];
    id[0] = n;
    id[31] = 0xAA;
    id
}

impl Sim {
    fn new(peers: Vec<(PeerId, (u32, u32), Fault)>, seed: u64) -> Self {
        let start = Instant::now();
        Self {
            peers: peers.into_iter().map(|(id, span, fault)| (id, SimPeer { span, fault })).collect(),
            sessions: HashMap::new(),
            rng: StdRng::seed_from_u64(seed),
            start,
            now: start,
            queue: BTreeMap::new(),
            seq: 0,
            me: id(0),
            has_local: false,
            policy_seed: seed,
            delivered: 0,
            speculate: false,
            drafted: 0,
            accepted: 0,
            second_opinions: 0,
            caught: Vec::new(),
        }
    }

    fn roster(&self, config: &DriverConfig) -> Roster {
        let mut roster = Roster::new(
            N_LAYERS,
            SpotCheckPolicy::new(config.spot_check, self.policy_seed),
            Strikes::new(super::TIMEOUT_STRIKES, config.step_timeout),
            config.ban_base,
            config.ban_max,
        );
        for (id, p) in &self.peers {
            let info = PeerInfo {
                model_id: [1; 32],
                start: p.span.0,
                end: p.span.1,
                n_layers: N_LAYERS,
                draining: false,
                sessions: 0,
                free_kv_bytes: 1 << 30,
            };
            roster.peers.insert(
                *id,
                PeerState {
                    info,
                    rtt: HOP * 2,
                    failures: 0,
                    banned_until: None,
                    active: 0,
                    throughput: 1000.0,
                    from_swarm: true,
                    measured: None,
                    liar: false,
                },
            );
        }
        roster
    }

    fn at(&mut self, delay: Duration, event: Event) {
        self.seq += 1;
        self.queue.insert((self.now + delay, self.seq), (None, event));
    }

    fn message(&mut self, delay: Duration, session_id: u64, from: PeerId, msg: Message) {
        self.seq += 1;
        self.queue.insert((self.now + delay, self.seq), (Some(session_id), Event::Inbound { from, msg }));
    }

    fn elapsed(&self) -> Duration {
        self.now.duration_since(self.start)
    }

    fn crashed(&self, p: &PeerId) -> bool {
        matches!(self.peers[p].fault, Fault::Crash(t) if self.elapsed() >= t)
    }

    fn drops(&self, p: &PeerId) -> bool {
        self.crashed(p) || matches!(self.peers[p].fault, Fault::Drop(t) if self.elapsed() >= t)
    }

    fn draw(&mut self, share: f64) -> bool {
        self.rng.random::<f64>() < share
    }

    /// A step of a session through its route.
    fn step(&mut self, step: Step) {
        let Some(s) = self.sessions.get_mut(&step.session_id) else { return };
        let shoal_worker::protocol::Payload::Tokens(ids) = &step.payload else {
            panic!("the origin sends ids")
        };
        // A step starts where the cache ends, or (after a speculative step) rewinds over the
        // draft's positions, never further.
        let start = step.start_pos as usize;
        assert!(start <= s.history.len() && start >= s.floor, "a step out of place");
        s.history.truncate(start);
        s.floor = if step.draft.is_empty() { start + ids.len() } else { start + 1 };
        if !step.draft.is_empty() {
            assert_eq!(
                &ids[1..],
                step.draft.as_slice(),
                "a speculative step's payload is its last id and its draft"
            );
        }
        s.history.extend_from_slice(ids);
        // The draft ids the model agrees with, then its own choice.
        let before_draft = s.history.len() - step.draft.len();
        let accepted = (0..step.draft.len())
            .take_while(|&i| next_token(&s.history[..before_draft + i]) == step.draft[i])
            .count();
        let history = s.history[..before_draft + accepted].to_vec();
        let route = s.route.clone();
        let mut first_lie = None;
        let mut reached = 0;
        for (i, hop) in route.iter().enumerate() {
            if self.drops(&hop.node_id) {
                break;
            }
            let fault = self.peers[&hop.node_id].fault;
            match fault {
                Fault::Errors(p) if self.draw(p) => {
                    let e = StageError {
                        session_id: Some(step.session_id),
                        step_id: Some(step.step_id),
                        code: ErrorCode::Internal,
                        message: "simulated".into(),
                    };
                    let delay = HOP * (i as u32 + 1) + COMPUTE;
                    self.message(delay, step.session_id, hop.node_id, Message::Error(e));
                    return;
                }
                Fault::Lie(p) if first_lie.is_none() && self.draw(p) => first_lie = Some(i),
                Fault::LieFrom(t) if first_lie.is_none() && self.elapsed() >= t => first_lie = Some(i),
                _ => {}
            }
            reached = i + 1;
        }
        let n = route.len();
        if reached == n {
            let mut token = next_token(&history);
            if first_lie.is_some() {
                token = (token + 1) % VOCAB;
            }
            let result = StepResult {
                session_id: step.session_id,
                step_id: step.step_id,
                token,
                logprob: -1.0,
                top_logprobs: Vec::new(),
                accepted: step.draft[..accepted]
                    .iter()
                    .map(|&token| Chosen { token, logprob: -1.0, top_logprobs: Vec::new() })
                    .collect(),
            };
            let last = route[n - 1].node_id;
            let delay = HOP * (n as u32 + 1) + COMPUTE * n as u32;
            self.message(delay, step.session_id, last, Message::StepResult(result));
        }
        let s = self.sessions.get_mut(&step.session_id).expect("looked up above");
        s.steps.insert(step.step_id, Computed { history, first_lie, reached });
    }

    /// A tap: each hop but the last that computed the step sends its output.
    fn tap(&mut self, tap: Tap) {
        let Some(s) = self.sessions.get(&tap.session_id) else { return };
        let Some(c) = s.steps.get(&tap.step_id) else { return };
        let mut deliveries = Vec::new();
        for (i, hop) in s.route.iter().enumerate().take(s.route.len() - 1) {
            if i >= c.reached {
                break;
            }
            let h = hidden(&c.history, hop.end);
            let h = if c.first_lie.is_some_and(|l| l <= i) { perturbed(h) } else { h };
            let out = StageOutput { session_id: tap.session_id, step_id: tap.step_id, hidden: wire(&h) };
            deliveries.push((HOP * (i as u32 + 2) + COMPUTE * (i as u32 + 1), hop.node_id, out));
        }
        for (delay, from, out) in deliveries {
            self.message(delay, tap.session_id, from, Message::StageOutput(out));
        }
    }

    /// An observation of `history`'s last step through `route` (a check's opinion).
    fn observe(&mut self, route: &[RouteHop], history: &[u32]) -> Result<Observation, String> {
        let mut first_lie = None;
        for (i, hop) in route.iter().enumerate() {
            if self.drops(&hop.node_id) {
                return Err(format!("hop {i} is silent"));
            }
            let lies = match self.peers[&hop.node_id].fault {
                Fault::Lie(p) => self.draw(p),
                Fault::LieFrom(t) => self.elapsed() >= t,
                _ => false,
            };
            if lies && first_lie.is_none() {
                first_lie = Some(i);
            }
        }
        let outputs = route[..route.len() - 1]
            .iter()
            .enumerate()
            .map(|(i, hop)| {
                let h = hidden(history, hop.end);
                if first_lie.is_some_and(|l| l <= i) { perturbed(h) } else { h }
            })
            .collect();
        let mut token = next_token(history);
        if first_lie.is_some() {
            token = (token + 1) % VOCAB;
        }
        Ok(Observation {
            hops: route.iter().map(|h| Computer::Peer(h.node_id)).collect(),
            outputs,
            token,
            logprob: -1.0,
        })
    }

    /// Runs `request` to its end; also returns the final roster.
    fn run(&mut self, request: Request, config: DriverConfig) -> (Result<Outcome, DriverError>, Roster) {
        let mut roster = self.roster(&config);
        roster.has_local = self.has_local;
        let model =
            ModelInfo { model_id: [1; 32], n_layers: N_LAYERS, vocab_size: VOCAB, max_positions: 4096 };
        let mut g = Generation::new(request, config.clone(), model, self.me, self.speculate, 11, self.now);
        let mut pending = vec![Event::Start];
        for _ in 0..100_000 {
            let event = match pending.pop() {
                Some(e) => e,
                None => {
                    let next = self.queue.first_key_value().map(|(k, _)| *k);
                    match (next, g.deadline()) {
                        (Some((t, _)), Some(d)) if d < t => {
                            self.now = self.now.max(d);
                            Event::Timeout
                        }
                        (Some(key), _) => {
                            self.now = self.now.max(key.0);
                            let (session, event) = self.queue.remove(&key).expect("a key just read");
                            if session.is_some() && session != g.session_id() {
                                // For a session closed since: its channel is gone.
                                continue;
                            }
                            event
                        }
                        (None, Some(d)) => {
                            self.now = self.now.max(d);
                            Event::Timeout
                        }
                        (None, None) => panic!("the generation waits for nothing"),
                    }
                }
            };
            for action in g.handle(event, self.now, &mut roster) {
                match action {
                    Action::Open { open, .. } => {
                        let s = SimSession {
                            route: open.route.clone(),
                            history: Vec::new(),
                            floor: 0,
                            steps: HashMap::new(),
                        };
                        self.sessions.insert(open.session_id, s);
                    }
                    Action::Send { msg: Message::Step(step), .. } => self.step(step),
                    Action::Send { msg: Message::Tap(tap), .. } => self.tap(tap),
                    Action::Send { msg, .. } => panic!("unexpected message {}", msg.kind_name()),
                    Action::Close { session_id, .. } => {
                        self.sessions.remove(&session_id);
                    }
                    Action::PingHops(ids) => {
                        let silent = ids.iter().filter(|p| self.crashed(p)).copied().collect();
                        self.at(HOP * 2, Event::Silent(silent));
                    }
                    Action::Refresh => pending.push(Event::Refreshed),
                    Action::Record { drafted, accepted } => {
                        assert!(accepted <= drafted);
                        self.drafted += drafted;
                        self.accepted += accepted;
                    }
                    Action::Draft { context, limit } => {
                        // Up to 4 ids of the model's own continuation, then (often) a wrong one.
                        let right = self.rng.random_range(0..=4usize).min(limit);
                        let mut draft = Vec::new();
                        let mut c = context;
                        for _ in 0..right {
                            let t = next_token(&c);
                            draft.push(t);
                            c.push(t);
                        }
                        if draft.len() < limit && self.draw(0.5) {
                            draft.push((next_token(&c) + 7) % VOCAB);
                        }
                        pending.push(Event::Drafted(draft));
                    }
                    Action::Opinion { which, route, local, replay } => {
                        let observed = if local {
                            Ok(origin(&route, &replay.history))
                        } else {
                            self.observe(&route, &replay.history)
                        };
                        self.at(HOP * 6, Event::Opinion { which, observed });
                        if which == Opinion::Second {
                            self.second_opinions += 1;
                        }
                    }
                    Action::CancelCheck => {
                        self.queue
                            .retain(|_, (_, e)| !matches!(e, Event::Opinion { which: Opinion::Second, .. }));
                    }
                    Action::Caught(liars) => self.caught.extend(liars.into_iter().map(|(id, _)| id)),
                    Action::Withdraw { from } => assert!(from < self.delivered, "withdraws tokens it gave"),
                    Action::Token { index, .. } => {
                        assert!(index <= self.delivered, "a token's index skips");
                        self.delivered = index + 1;
                        pending.push(Event::Delivered(Flow::Continue));
                    }
                    Action::Done(result) => return (result, roster),
                }
            }
        }
        panic!("the generation did not end");
    }
}

/// The origin's own computation of `history`'s last step with the spans of `route`.
fn origin(route: &[RouteHop], history: &[u32]) -> Observation {
    Observation {
        hops: vec![Computer::Origin; route.len()],
        outputs: route[..route.len() - 1].iter().map(|hop| hidden(history, hop.end)).collect(),
        token: next_token(history),
        logprob: -1.0,
    }
}

/// Three spans of two layers, `replicas` peers each (ids 1, 2, ... span by span).
fn swarm(replicas: u8, faults: &HashMap<u8, Fault>) -> Vec<(PeerId, (u32, u32), Fault)> {
    let mut out = Vec::new();
    for span in 0..3u8 {
        for r in 0..replicas {
            let n = 1 + span * replicas + r;
            let fault = faults.get(&n).copied().unwrap_or(Fault::Honest);
            out.push((id(n), (u32::from(span) * 2, u32::from(span) * 2 + 2), fault));
        }
    }
    out
}

fn request(max_tokens: usize) -> Request {
    Request {
        prompt: vec![5, 17, 42, 7],
        params: SamplingParams::greedy(),
        max_tokens,
        stop_ids: Vec::new(),
        top_logprobs: 0,
        constraint: None,
    }
}

/// The tokens of an undisturbed run.
fn reference(request: &Request) -> Vec<u32> {
    let mut history = request.prompt.clone();
    for _ in 0..request.max_tokens {
        history.push(next_token(&history));
    }
    history[request.prompt.len()..].to_vec()
}

fn config(share: f64) -> DriverConfig {
    DriverConfig {
        step_timeout: Duration::from_millis(500),
        prefill_timeout_per_token: Duration::from_millis(10),
        max_failovers: 32,
        prefill_chunk: 3,
        seal_sampler_inputs: false,
        spot_check: SpotCheckConfig { share, ..SpotCheckConfig::default() },
        ..DriverConfig::default()
    }
}

#[test]
fn an_undisturbed_generation_gives_the_models_tokens_without_failover() {
    let req = request(40);
    let mut sim = Sim::new(swarm(2, &HashMap::new()), 1);
    let (result, roster) = sim.run(req.clone(), config(0.1));
    let outcome = result.expect("completes");
    assert_eq!(outcome.tokens, reference(&req));
    assert!(outcome.failovers.is_empty(), "{:?}", outcome.failovers);
    assert!(outcome.spot_checks >= 3, "the first steps through new peers are checked");
    assert!(roster.peers.values().all(|p| p.banned_until.is_none() && p.active == 0));
    assert!(sim.sessions.is_empty(), "every session is closed");
}

/// Draws the faults of one seeded run: up to `per_span` faulty replicas of each span of three,
/// and at most one peer that drops steps while answering pings (the origin tells it from its
/// route neighbours only by trying other routes; with several, every route may hold one).
fn draw_faults(rng: &mut StdRng, per_span: u8) -> HashMap<u8, Fault> {
    let mut faults = HashMap::new();
    let mut dropper = false;
    for span in 0..3u8 {
        for r in 0..per_span {
            if rng.random::<f64>() < 0.5 {
                continue;
            }
            let at = Duration::from_millis(rng.random_range(0..800));
            let fault = match rng.random_range(0..4) {
                0 => Fault::Crash(at),
                1 if !dropper => {
                    dropper = true;
                    Fault::Drop(at)
                }
                1 | 2 => Fault::Errors(rng.random_range(0.02..0.3)),
                _ => Fault::Lie(rng.random_range(0.02..0.3)),
            };
            faults.insert(1 + span * 3 + r, fault);
        }
    }
    faults
}

#[test]
fn seeded_faults_never_change_the_tokens_and_only_faulty_peers_are_banned() {
    let req = request(30);
    let expected = reference(&req);
    let mut failovers = 0;
    let mut caught = 0;
    let mut fails = 0;
    let (mut drafted, mut accepted, mut speculative_failovers) = (0, 0, 0);
    for seed in 0..1000u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        // With the weights at the origin, any two of three replicas may be faulty: the
        // origin's own opinion decides. Without, at most one is: two honest replicas outvote
        // it.
        let has_local = seed % 2 == 0;
        let faults = draw_faults(&mut rng, if has_local { 2 } else { 1 });
        let mut sim = Sim::new(swarm(3, &faults), seed);
        sim.has_local = has_local;
        // Drafts on every third seed without liars: a step that carries a draft is not
        // spot-checked, so a lie on one goes unnoticed (docs/security.md).
        sim.speculate = seed % 3 == 0 && !faults.values().any(|f| matches!(f, Fault::Lie(_)));
        // Every step is checked: a lie on an unchecked step would go unnoticed.
        let (result, roster) = sim.run(req.clone(), config(1.0));
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                eprintln!("seed {seed}, faults {faults:?}: {e}");
                fails += 1;
                continue;
            }
        };
        assert_eq!(outcome.tokens, expected, "seed {seed}, faults {faults:?}");
        failovers += outcome.failovers.len();
        drafted += sim.drafted;
        accepted += sim.accepted;
        speculative_failovers += if sim.speculate { outcome.failovers.len() } else { 0 };
        for (n, p) in (1..=9u8).map(|n| (n, &roster.peers[&id(n)])) {
            let fault = faults.get(&n).copied().unwrap_or(Fault::Honest);
            assert!(
                !p.liar || matches!(fault, Fault::Lie(_)),
                "seed {seed}: peer {n} ({fault:?}) called a liar"
            );
            caught += usize::from(p.liar);
            assert_eq!(p.active, 0, "seed {seed}: peer {n} still counts a session");
        }
        assert!(sim.sessions.is_empty(), "seed {seed}: a session was left open");
    }
    eprintln!(
        "{failovers} failovers, {caught} liars caught; {drafted} ids drafted, {accepted} accepted, \
         {speculative_failovers} failovers while speculating"
    );
    assert_eq!(fails, 0);
    // The faults happened and were handled, not skipped.
    assert!(failovers > 100, "{failovers} failovers");
    assert!(caught > 20, "{caught} liars caught");
    assert!(accepted > 1000 && accepted < drafted && speculative_failovers > 20);
}

#[test]
fn a_peer_that_answers_pings_but_drops_steps_is_struck_and_avoided() {
    let req = request(20);
    let faults = HashMap::from([(1, Fault::Drop(Duration::ZERO))]);
    let mut sim = Sim::new(swarm(2, &faults), 3);
    let (result, roster) = sim.run(req.clone(), config(0.0));
    let outcome = result.expect("completes");
    assert_eq!(outcome.tokens, reference(&req));
    // Every hop of the route that timed out got a strike (the dropper cannot be told from its
    // neighbours yet); the next route avoided the struck peers, and its success cleared its
    // own. Nobody is banned for a first timeout.
    assert_eq!(outcome.failovers.len(), 1, "{:?}", outcome.failovers);
    assert!(!outcome.route.contains(&id(1)));
    assert_eq!(roster.strikes.of(&id(1)), 1);
    assert!(outcome.route.iter().all(|p| roster.strikes.of(p) == 0));
    assert!(roster.peers.values().all(|p| p.banned_until.is_none()));
}

#[test]
fn bad_input_is_charged_to_the_hop_that_produced_it() {
    // Peer 3 (span 2..4) forwards non-finite states: peer 5, after it, reports its input.
    let req = request(5);
    let sim = Sim::new(swarm(2, &HashMap::new()), 4);
    let mut roster = sim.roster(&config(0.0));
    let model = ModelInfo { model_id: [1; 32], n_layers: N_LAYERS, vocab_size: VOCAB, max_positions: 4096 };
    let mut g = Generation::new(req, config(0.0), model, sim.me, false, 1, sim.now);
    let actions = g.handle(Event::Start, sim.now, &mut roster);
    let Some(Action::Open { open, .. }) = actions.first() else { panic!("opens a session") };
    let route: Vec<PeerId> = open.route.iter().map(|h| h.node_id).collect();
    let e = StageError { session_id: None, step_id: None, code: ErrorCode::NonFinite, message: "NaN".into() };
    let actions = g.handle(Event::Inbound { from: route[2], msg: Message::Error(e) }, sim.now, &mut roster);
    assert!(roster.peers[&route[1]].banned_until.is_some(), "the producer is banned");
    assert!(roster.peers[&route[2]].banned_until.is_none(), "the reporter is not");
    // The failed session is closed and the next route avoids the banned peer.
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Close { session_id, .. } if *session_id == open.session_id))
    );
    let Some(Action::Open { open: next, .. }) = actions.iter().find(|a| matches!(a, Action::Open { .. }))
    else {
        panic!("fails over")
    };
    assert!(next.route.iter().all(|h| h.node_id != route[1]));
}

#[test]
fn an_abandoned_generation_closes_its_session_and_frees_its_peers() {
    let sim = Sim::new(swarm(1, &HashMap::new()), 5);
    let mut roster = sim.roster(&config(0.0));
    let model = ModelInfo { model_id: [1; 32], n_layers: N_LAYERS, vocab_size: VOCAB, max_positions: 4096 };
    let mut g = Generation::new(request(5), config(0.0), model, sim.me, false, 1, sim.now);
    g.handle(Event::Start, sim.now, &mut roster);
    assert!(roster.peers.values().all(|p| p.active == 1));
    let actions = g.abandon(&mut roster);
    assert!(actions.iter().any(|a| matches!(a, Action::Close { .. })));
    assert!(roster.peers.values().all(|p| p.active == 0));
    assert!(g.handle(Event::Timeout, sim.now, &mut roster).is_empty(), "nothing happens after");
}

#[test]
fn a_served_step_clears_the_strikes_of_its_route() {
    let sim = Sim::new(swarm(1, &HashMap::new()), 6);
    let mut roster = sim.roster(&config(0.0));
    let ids: Vec<PeerId> = (1..=3).map(id).collect();
    // A timeout earlier (every hop answered pings): one strike each.
    assert!(roster.strikes.timed_out(&ids, &[], sim.now).is_empty());
    let model = ModelInfo { model_id: [1; 32], n_layers: N_LAYERS, vocab_size: VOCAB, max_positions: 4096 };
    let mut g = Generation::new(request(5), config(0.0), model, sim.me, false, 1, sim.now);
    let actions = g.handle(Event::Start, sim.now, &mut roster);
    let Some(Action::Send { msg: Message::Step(last), .. }) = actions.last() else {
        panic!("sends the prompt")
    };
    let result = StepResult {
        session_id: last.session_id,
        step_id: last.step_id,
        token: 3,
        logprob: -1.0,
        top_logprobs: Vec::new(),
        accepted: Vec::new(),
    };
    assert!(ids.iter().all(|p| roster.strikes.of(p) == 1));
    let actions =
        g.handle(Event::Inbound { from: id(3), msg: Message::StepResult(result) }, sim.now, &mut roster);
    assert!(matches!(actions.last(), Some(Action::Token { token: 3, .. })));
    assert!(ids.iter().all(|p| roster.strikes.of(p) == 0), "the generation goes on with clean peers");
}

#[test]
fn tokens_a_caught_liar_produced_since_the_last_check_are_withdrawn_and_given_again() {
    // One peer starts lying on every step at a random time; 30% of steps are checked, so it
    // lies unnoticed for a few steps before a check catches it. Its tokens since the last
    // confirmed one are withdrawn and generated again through honest peers.
    let req = request(60);
    let expected = reference(&req);
    let (mut withdrawn, mut generations_with_lies) = (0, 0);
    for seed in 0..200u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let liar = rng.random_range(1..=9u8);
        let at = Duration::from_millis(rng.random_range(0..600));
        let faults = HashMap::from([(liar, Fault::LieFrom(at))]);
        let mut sim = Sim::new(swarm(3, &faults), seed);
        sim.has_local = seed % 2 == 0;
        let (result, roster) = sim.run(req.clone(), config(0.3));
        let outcome = result.unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(outcome.tokens, expected, "seed {seed}: liar {liar} from {at:?}");
        assert!(roster.peers.iter().all(|(p, s)| !s.liar || *p == id(liar)), "seed {seed}");
        withdrawn += outcome.withdrawn;
        generations_with_lies += usize::from(outcome.withdrawn > 0);
    }
    eprintln!("{withdrawn} tokens withdrawn in {generations_with_lies} generations");
    assert!(generations_with_lies > 20, "{generations_with_lies} generations withdrew tokens");
}
