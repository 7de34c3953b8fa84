//! The pipeline driver: the client side of the stage protocol. It runs a session through a
//! route of peers, keeps the session's token history, and recovers from a failed peer by
//! banning it, planning another route, replaying the history as a prefill and carrying on.
//!
//! # One generation
//! 1. Plan a route over the peers this driver knows, skipping banned, draining and joining
//!    ones: the swarm's announcements ([`Driver::sync_view`], kept up to date by
//!    [`crate::membership::Membership::follow`]) or peers added one by one
//!    ([`Driver::add_peer`] pings a peer to learn its span). [`crate::swarm::plan::plan_route`]
//!    picks the chain: compute cost from each peer's throughput (announced, until this driver
//!    has measured it on checked steps: then the measurement, halved for a peer that claimed
//!    more than twice it) and load, network cost from measured round trips, penalties for
//!    full caches, recent failures and unexplained timeouts ([`crate::blame`]).
//! 2. Send `OpenSession` to stage 1 (it travels down the chain, with an address book so each
//!    stage can dial the next), then the prompt as prefill steps of at most
//!    [`DriverConfig::prefill_chunk`] tokens and, after a failover, each token generated so far
//!    as the one-token step it was in the first run, all sent back to back without waiting.
//! 3. Wait for the last chunk's `StepResult` from the last stage, then loop: report the token,
//!    stop on a stop id, the token budget or the caller's [`Flow::Stop`], otherwise send the
//!    token as the next step.
//! 4. Close the session along the chain (`CloseSession` to stage 1, which forwards it), also
//!    when the future is dropped (a client that goes away frees every KV cache).
//!
//! # Speculative decoding
//! With [`Speculation::Ngram`] or [`Speculation::Draft`] ([`DriverConfig::speculation`], or per call with
//! [`Driver::generate_with`]) each decode step may carry a draft ([`crate::speculative`]): the
//! last token and up to 8 guessed ids, which the last stage verifies. The result lists the
//! accepted ids and then the stage's next choice; the driver reports them one by one exactly
//! as it reports single tokens (stop ids, `max_tokens` and [`Flow::Stop`] cut at the same
//! token) and starts the next step where the accepted ids end, which makes every stage drop
//! the rejected positions. The tokens and logprobs are those of ordinary decoding. A draft
//! never runs past `max_tokens`; the replay after a failover sends ordinary one-token steps.
//!
//! # Failures
//! Every step has a deadline ([`DriverConfig::step_timeout`], plus
//! [`DriverConfig::prefill_timeout_per_token`] for each prefilled token). A typed error from
//! a stage, an undeliverable frame or a passed deadline ends the attempt: the culprit is the
//! stage that reported (or the next hop for `NextHopUnreachable`); after a deadline, each hop
//! is pinged and the silent ones are the culprits. Culprits are banned for
//! [`DriverConfig::ban_base`], doubling with each repeated failure up to
//! [`DriverConfig::ban_max`]. The old session is closed, a new route is planned and the history
//! replayed. Sampling is deterministic (the draw for token `t` depends on the seed and `t`) and
//! the replay repeats the first run's steps exactly (prompt chunks, then one token per step:
//! a batched prefill of generated tokens would round differently in quantized kernels and
//! could flip a sampled token), so the tokens are those of an undisturbed run. At most [`DriverConfig::max_failovers`]
//! failovers per generation.
//!
//! # Spot-checks
//! On a share of decode steps ([`DriverConfig::spot_check`]; always on the first steps through
//! a peer not checked yet) the driver taps the step right after sending it (every stage
//! also sends the origin the hidden states it forwarded; no stage knows a step is checked
//! while computing it) and runs the same history through another route: other
//! replicas of the same spans, or the origin's own weights ([`Driver::set_local_weights`]).
//! The generation keeps that route's session (or the origin's caches) for its next checks,
//! which send only the ids generated since. The second opinion needs only the history, so it
//! runs while the checked step itself is computed (a step that fails does not wait for it).
//! The token of a checked step is reported only once the outputs agree. When they do not, a
//! third opinion decides and the peers in the minority are banned for
//! [`DriverConfig::ban_max`] ([`crate::verify`] holds the decisions); the generation fails over
//! without the token, and every other session through a banned liar fails over at its next
//! step, replaying its history on an honest route. Tokens of unchecked steps are reported at
//! once: a lie on a step that is not checked goes unnoticed.

mod check;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use iroh::EndpointAddr;
use shoal_model_shards::generate::{FinishReason, Flow};
use shoal_model_shards::sampler::SamplingParams;
use shoal_model_shards::token_mask::TokenMask;

use crate::constraint::Constraint;
use shoal_worker::net::{Inbound, NetError, Node, SessionChannel, peer_id, short};
use shoal_worker::protocol::seal::SealKey;
use shoal_worker::protocol::{
    CloseReason, CloseSession, ErrorCode, HiddenStates, Message, OpenSession, Payload, PeerInfo, RouteHop,
    Sampling, StageError, Step, StepResult, Tap, WireDType,
};
use shoal_worker::service::PeerId;

use crate::speculative::{Drafter, SpecStats, Speculation};
use crate::swarm::announce::{Announcement, PeerState as SwarmState};
use crate::swarm::plan::{Candidate, CostModel, plan_route};
use crate::verify::{SpotCheckConfig, SpotCheckPolicy};

pub use check::LocalWeights;

/// Tokens per second through one layer assumed for a peer added by ticket, whose
/// announcement this driver has not seen (such peers all look alike to the planner).
pub const ASSUMED_LAYER_THROUGHPUT: f64 = 1000.0;

/// Timeouts in a row, with every hop answering pings, after which a peer is banned (it may be
/// taking steps and dropping them; see [`crate::blame`]); timeouts within one step deadline
/// of each other count once.
pub const TIMEOUT_STRIKES: u32 = 3;

/// Timeouts, bans and wire settings of a driver.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Dtype of hidden states between stages (f32: bit-identical to one process; f16/bf16:
    /// half the bytes, logits within about 1.3 of f32 on SmolLM2 at 30 hops).
    pub wire_dtype: WireDType,
    /// Deadline of one decode step, end to end around the ring.
    pub step_timeout: Duration,
    /// Extra deadline per prefilled or replayed token.
    pub prefill_timeout_per_token: Duration,
    /// Deadline of a ping (peer discovery, finding the culprit after a timeout).
    pub ping_timeout: Duration,
    /// Most failovers in one generation before giving up.
    pub max_failovers: usize,
    /// First ban of a failed peer; doubles with each further failure.
    pub ban_base: Duration,
    /// Longest ban.
    pub ban_max: Duration,
    /// Most tokens per prefill step. Stages compute about this many prefill tokens per round
    /// before they run the decode steps that arrived meanwhile
    /// (`shoal_worker::net::PREFILL_BUDGET`), so a long prompt delays other sessions by one
    /// chunk at a time.
    pub prefill_chunk: usize,
    /// Speculative decoding of [`Driver::generate`] (see [`crate::speculative`]).
    pub speculation: Speculation,
    /// Which steps are checked on another replica, and how closely they must agree.
    pub spot_check: SpotCheckConfig,
    /// Seal each step's token history, draft ids and token mask for the route's last stage
    /// (`shoal_worker::protocol::seal`), so that the stages in between see hidden states and
    /// step lengths only. On by default; off sends them in the clear (protocol tests).
    pub seal_sampler_inputs: bool,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            wire_dtype: WireDType::F32,
            step_timeout: Duration::from_secs(10),
            prefill_timeout_per_token: Duration::from_millis(50),
            ping_timeout: Duration::from_secs(2),
            max_failovers: 8,
            ban_base: Duration::from_secs(15),
            ban_max: Duration::from_secs(600),
            prefill_chunk: shoal_worker::net::PREFILL_BUDGET,
            speculation: Speculation::Off,
            spot_check: SpotCheckConfig::default(),
            seal_sampler_inputs: true,
        }
    }
}

/// Seals the sampler inputs of one session's steps for its last hop, or leaves them in the
/// clear.
struct Sealer(Option<SealKey>);

impl Sealer {
    /// The `OpenSession::seal` of a session whose last hop is `last`, and its sealer.
    fn new(enabled: bool, last: &PeerId) -> Result<(Option<[u8; 32]>, Self), String> {
        if !enabled {
            return Ok((None, Self(None)));
        }
        let (public, key) = SealKey::send_to(last).map_err(|e| e.to_string())?;
        Ok((Some(public), Self(Some(key))))
    }

    /// `step` as it goes on the wire: with a seal, its history tail, draft ids and mask move
    /// into the box and the draft keeps only its length (zeros).
    fn step(&self, step: Step) -> Step {
        match &self.0 {
            Some(key) => key.seal_step(step),
            None => step,
        }
    }
}

/// A check's second opinion in flight, and the generation's kept check sessions it borrowed.
type PendingCheck<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = (check::SecondOpinion, check::Shadows)> + Send + 'a>>;

/// What to generate.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt token ids (not empty).
    pub prompt: Vec<u32>,
    /// Sampling parameters (a fixed seed makes failover invisible).
    pub params: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Ids that end the generation (not reported, as with `shoal generate`).
    pub stop_ids: Vec<u32>,
    /// Alternatives reported per token (0..=20).
    pub top_logprobs: u8,
    /// A grammar the generated tokens follow (structured outputs, tool calls); turns
    /// speculation off for the request.
    pub constraint: Option<Constraint>,
}

/// One generated token, as the callback sees it.
#[derive(Debug)]
pub struct TokenEvent<'a> {
    /// Index among the generated tokens.
    pub index: usize,
    /// The token id.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely alternatives, when asked for.
    pub top_logprobs: &'a [(u32, f32)],
    /// The route that produced it.
    pub route: &'a [PeerId],
}

/// A recovered failure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failover {
    /// Tokens generated before the failure.
    pub at_token: usize,
    /// Peers banned for it (empty when no culprit was found).
    pub banned: Vec<String>,
    /// What went wrong.
    pub reason: String,
    /// From the failed step's start to the failure's detection.
    pub detection: Duration,
    /// From the failed step's start until the next token arrived on the new route.
    pub stall: Duration,
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Generated ids (stop id excluded).
    pub tokens: Vec<u32>,
    /// Log-probability of each generated id.
    pub logprobs: Vec<f32>,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Until the first token.
    pub prefill_time: Duration,
    /// After the first token.
    pub decode_time: Duration,
    /// Round-trip time of each decode step (token in, token out), in order. With speculation
    /// a step may bring several tokens.
    pub step_times: Vec<Duration>,
    /// What speculative decoding drafted and kept.
    pub speculation: SpecStats,
    /// Failures recovered from.
    pub failovers: Vec<Failover>,
    /// The route of the last attempt.
    pub route: Vec<PeerId>,
    /// Steps checked on another replica (or the origin's weights) that passed.
    pub spot_checks: usize,
}

/// Why a generation failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The request is invalid.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// No chain of known, unbanned peers covers the model.
    #[error("no route covers layers 0..{n_layers}: {detail}")]
    NoRoute {
        /// Layers of the model.
        n_layers: u32,
        /// What is known.
        detail: String,
    },
    /// Too many failovers.
    #[error("gave up after {failovers} failovers; last: {last}")]
    TooManyFailovers {
        /// How many.
        failovers: usize,
        /// The last failure.
        last: String,
    },
    /// A peer could not be added.
    #[error("peer {peer}: {reason}")]
    Peer {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// Transport failure on this node.
    #[error(transparent)]
    Net(#[from] NetError),
}

/// What the driver knows of a peer.
#[derive(Debug, Clone)]
pub struct PeerState {
    /// Its latest self-description.
    pub info: PeerInfo,
    /// Latest ping round trip.
    pub rtt: Duration,
    /// Failures since its last success.
    pub failures: u32,
    /// Not used for new routes until then.
    pub banned_until: Option<Instant>,
    /// Sessions this driver runs through it now.
    pub active: usize,
    /// Tokens per second through one of its layers (announced, or
    /// [`ASSUMED_LAYER_THROUGHPUT`]).
    pub throughput: f64,
    /// Whether it was learned from the swarm's view (and is forgotten when it leaves it) or
    /// added by hand.
    pub from_swarm: bool,
    /// Tokens per second through one of its layers as this node measured it (a moving average
    /// over the checked steps it served); routing believes it over `throughput`
    /// ([`crate::swarm::plan::believed_throughput`]).
    pub measured: Option<f64>,
    /// Whether a spot-check caught it returning wrong results: while its ban lasts, sessions
    /// through it fail over; once it ends the peer is checked on its first steps again.
    pub liar: bool,
}

/// What the driver needs to know of the model it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelInfo {
    /// The model's identity (`Model::model_id`): peers must serve the same.
    pub model_id: [u8; 32],
    /// Layers of the model.
    pub n_layers: u32,
    /// Size of the vocabulary.
    pub vocab_size: u32,
    /// Most positions a session may use (prompt and generated tokens).
    pub max_positions: usize,
}

impl ModelInfo {
    /// The facts of an opened model (hashes its files for the id).
    pub fn of(model: &shoal_model_shards::Model) -> Result<Self, shoal_model_shards::Error> {
        let spec = model.spec();
        Ok(Self {
            model_id: model.model_id()?,
            n_layers: spec.n_layers as u32,
            vocab_size: spec.vocab_size as u32,
            max_positions: spec.max_position_embeddings,
        })
    }
}

/// Runs sessions through the peers it knows (see the module docs).
pub struct Driver {
    node: Node,
    model_id: [u8; 32],
    n_layers: u32,
    vocab_size: u32,
    max_positions: usize,
    config: DriverConfig,
    peers: Mutex<HashMap<PeerId, PeerState>>,
    policy: Mutex<SpotCheckPolicy>,
    strikes: Mutex<crate::blame::Strikes>,
    local: Mutex<Option<Arc<LocalWeights>>>,
    checks: AtomicU64,
    liars_banned: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why one attempt (one route) ended.
struct AttemptFailure {
    culprits: Vec<PeerId>,
    reason: String,
    /// When the failing step was sent.
    step_started: Instant,
}

/// Closes a session along its chain when dropped (completion, failure or cancellation).
struct SessionGuard<'a> {
    node: &'a Node,
    first_hop: PeerId,
    session_id: u64,
    reason: CloseReason,
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        let msg = Message::CloseSession(CloseSession { session_id: self.session_id, reason: self.reason });
        if let Err(e) = self.node.send(self.first_hop, &msg) {
            tracing::debug!("close: {e}");
        }
    }
}

/// Decrements the driver's per-peer session counts when an attempt ends.
struct ActiveGuard<'a> {
    driver: &'a Driver,
    route: Vec<PeerId>,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        let mut peers = lock(&self.driver.peers);
        for id in &self.route {
            if let Some(p) = peers.get_mut(id) {
                p.active = p.active.saturating_sub(1);
            }
        }
    }
}

impl Driver {
    /// A driver for `model` that sends from `node`.
    pub fn new(node: Node, model: ModelInfo, config: DriverConfig) -> Self {
        let step_timeout = config.step_timeout;
        Self {
            node,
            model_id: model.model_id,
            n_layers: model.n_layers,
            vocab_size: model.vocab_size,
            max_positions: model.max_positions,
            policy: Mutex::new(SpotCheckPolicy::new(config.spot_check, rand::random())),
            config,
            peers: Mutex::new(HashMap::new()),
            strikes: Mutex::new(crate::blame::Strikes::new(TIMEOUT_STRIKES, step_timeout)),
            local: Mutex::new(None),
            checks: AtomicU64::new(0),
            liars_banned: AtomicU64::new(0),
        }
    }

    /// Lets spot-checks use this node's own copy of the model: to check a span no other peer
    /// serves, and to break a tie between two replicas.
    pub fn set_local_weights(&self, weights: LocalWeights) {
        *lock(&self.local) = Some(Arc::new(weights));
    }

    /// Ids the model's logits cover.
    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    /// Spot-checks run so far (second opinions asked for) and peers banned for wrong results.
    pub fn spot_check_counts(&self) -> (u64, u64) {
        (self.checks.load(Ordering::Relaxed), self.liars_banned.load(Ordering::Relaxed))
    }

    fn spot_config(&self) -> &SpotCheckConfig {
        &self.config.spot_check
    }

    /// The node sessions are sent from.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The configuration.
    pub fn config(&self) -> &DriverConfig {
        &self.config
    }

    /// Learns a peer: remembers its address, pings it and checks that it serves a span of
    /// this model.
    pub async fn add_peer(&self, addr: EndpointAddr) -> Result<PeerInfo, DriverError> {
        let id = peer_id(&addr.id);
        self.node.add_peer_addr(addr);
        let (rtt, info) = self
            .node
            .ping(id, self.config.ping_timeout)
            .await
            .map_err(|e| DriverError::Peer { peer: short(&id), reason: e.to_string() })?;
        let Some(info) = info else {
            return Err(DriverError::Peer { peer: short(&id), reason: "it serves no layers".into() });
        };
        if info.model_id != self.model_id || info.n_layers != self.n_layers {
            return Err(DriverError::Peer {
                peer: short(&id),
                reason: "it serves a different model (model ids differ)".into(),
            });
        }
        let mut peers = lock(&self.peers);
        let entry = peers.entry(id).or_insert(PeerState {
            info: info.clone(),
            rtt,
            failures: 0,
            banned_until: None,
            active: 0,
            throughput: ASSUMED_LAYER_THROUGHPUT,
            from_swarm: false,
            measured: None,
            liar: false,
        });
        entry.info = info.clone();
        entry.rtt = rtt;
        Ok(info)
    }

    /// Makes the swarm peers of this driver those of `view` (announcements, as a
    /// [`crate::membership::Membership`] holds them): newcomers are added with the addresses
    /// they announce, known peers get their new span, state, load and throughput, and swarm
    /// peers missing from `view` are forgotten (peers added with [`Driver::add_peer`] stay).
    /// Announcements of another model or layout are ignored. Returns the newcomers, whose
    /// round trip is not known yet (see [`Driver::refresh_peers`]).
    pub fn sync_view(&self, view: &[Announcement]) -> Vec<PeerId> {
        let me = self.node.id();
        let mut fresh = Vec::new();
        let mut peers = lock(&self.peers);
        let mut seen = std::collections::HashSet::new();
        for a in view {
            if a.model != self.model_id || a.n_layers != self.n_layers || a.node == me || a.start >= a.end {
                continue;
            }
            seen.insert(a.node);
            if !a.addrs.is_empty()
                && let Some(endpoint) = shoal_worker::net::endpoint_id(&a.node)
            {
                let mut addr = EndpointAddr::new(endpoint);
                for s in &a.addrs {
                    addr.addrs.insert(iroh::TransportAddr::Ip(*s));
                }
                self.node.add_peer_addr(addr);
            }
            let info = PeerInfo {
                model_id: a.model,
                start: a.start,
                end: a.end,
                n_layers: a.n_layers,
                // Joining peers are loading: no new sessions either.
                draining: a.state != SwarmState::Serving,
                sessions: a.load,
                free_kv_bytes: a.free_kv_bytes,
            };
            let throughput = f64::from(a.throughput);
            match peers.get_mut(&a.node) {
                Some(p) => {
                    p.info = info;
                    p.throughput = throughput;
                    p.from_swarm = true;
                }
                None => {
                    peers.insert(
                        a.node,
                        PeerState {
                            info,
                            rtt: Duration::ZERO,
                            failures: 0,
                            banned_until: None,
                            active: 0,
                            throughput,
                            from_swarm: true,
                            measured: None,
                            liar: false,
                        },
                    );
                    fresh.push(a.node);
                }
            }
        }
        peers.retain(|id, p| !p.from_swarm || seen.contains(id));
        fresh
    }

    /// Pings every known peer again (span, load, draining, round trip); returns the peers
    /// that answered, with their round trips.
    pub async fn refresh(&self) -> Vec<(PeerId, Duration)> {
        let ids: Vec<PeerId> = lock(&self.peers).keys().copied().collect();
        self.refresh_peers(&ids).await
    }

    /// Pings these peers (those this driver knows) for their state and round trip; returns
    /// those that answered.
    pub async fn refresh_peers(&self, ids: &[PeerId]) -> Vec<(PeerId, Duration)> {
        let mut answered = Vec::with_capacity(ids.len());
        for &id in ids {
            if let Ok((rtt, Some(info))) = self.node.ping(id, self.config.ping_timeout).await
                && let Some(p) = lock(&self.peers).get_mut(&id)
            {
                p.info = info;
                p.rtt = rtt;
                answered.push((id, rtt));
            }
        }
        answered
    }

    /// What the driver knows of each peer.
    pub fn peers(&self) -> Vec<(PeerId, PeerState)> {
        let mut v: Vec<_> = lock(&self.peers).iter().map(|(k, v)| (*k, v.clone())).collect();
        v.sort_by_key(|(_, p)| (p.info.start, p.info.end));
        v
    }

    /// The route a new session would take now.
    pub fn plan_route(&self) -> Result<Vec<RouteHop>, DriverError> {
        let now = Instant::now();
        let strikes = lock(&self.strikes).clone();
        let peers = lock(&self.peers);
        let usable = |p: &PeerState| !p.info.draining && p.banned_until.is_none_or(|t| t <= now);
        let candidates: Vec<Candidate> = peers
            .iter()
            .filter(|(_, p)| usable(p))
            .map(|(id, p)| Candidate {
                id: *id,
                start: p.info.start,
                end: p.info.end,
                throughput: crate::swarm::plan::believed_throughput(p.throughput, p.measured),
                // Sessions of this driver count at once, before the peer reports them.
                load: u32::try_from(p.active).unwrap_or(u32::MAX).saturating_add(p.info.sessions),
                rtt_ms: p.rtt.as_secs_f64() * 1000.0,
                has_free_cache: p.info.free_kv_bytes > 0,
                // Unexplained timeouts count too: the next routes avoid the struck peers where
                // they can, which tells a dropper from its neighbours.
                recent_failures: p.failures + strikes.of(id),
                // A stage serves exactly its span.
                partial: false,
            })
            .collect();
        match plan_route(self.n_layers, &candidates, &CostModel::default()) {
            Some(route) => Ok(route
                .hops
                .into_iter()
                .map(|h| RouteHop { node_id: h.id, start: h.start, end: h.end })
                .collect()),
            None => {
                let known: Vec<String> = peers
                    .iter()
                    .map(|(id, p)| {
                        let state = if p.info.draining {
                            " draining"
                        } else if !usable(p) {
                            " banned"
                        } else {
                            ""
                        };
                        format!("{} {}..{}{state}", short(id), p.info.start, p.info.end)
                    })
                    .collect();
                Err(DriverError::NoRoute {
                    n_layers: self.n_layers,
                    detail: if known.is_empty() { "no peers known".into() } else { known.join(", ") },
                })
            }
        }
    }

    fn ban(&self, culprits: &[PeerId]) {
        let now = Instant::now();
        let mut peers = lock(&self.peers);
        for id in culprits {
            if let Some(p) = peers.get_mut(id) {
                p.failures += 1;
                let factor = 1u32 << (p.failures - 1).min(16);
                let ban = self.config.ban_base.saturating_mul(factor).min(self.config.ban_max);
                // A longer ban already running (a liar's) stays.
                p.banned_until = Some(p.banned_until.map_or(now + ban, |t| t.max(now + ban)));
                tracing::warn!(peer = %short(id), ?ban, failures = p.failures, "banned a peer");
            }
        }
    }

    fn succeeded(&self, route: &[PeerId]) {
        lock(&self.strikes).succeeded(route);
        let mut peers = lock(&self.peers);
        for id in route {
            if let Some(p) = peers.get_mut(id) {
                p.failures = 0;
            }
        }
    }

    /// Generates for `request`, calling `on_token` for each token (return [`Flow::Stop`] to
    /// cancel; the session is then closed along its chain). Dropping the future also closes
    /// the session. Speculates as [`DriverConfig::speculation`] says.
    pub async fn generate(
        &self,
        request: &Request,
        on_token: impl FnMut(TokenEvent<'_>) -> Flow,
    ) -> Result<Outcome, DriverError> {
        self.generate_with(request, self.config.speculation.clone(), on_token).await
    }

    /// [`Driver::generate`] with the speculation mode `speculation`. The tokens are the same
    /// in every mode.
    pub async fn generate_with(
        &self,
        request: &Request,
        speculation: Speculation,
        mut on_token: impl FnMut(TokenEvent<'_>) -> Flow,
    ) -> Result<Outcome, DriverError> {
        if request.prompt.is_empty() {
            return Err(DriverError::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(&bad) = request.prompt.iter().find(|&&t| t >= self.vocab_size) {
            return Err(DriverError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {} ids",
                self.vocab_size
            )));
        }
        request.params.validate().map_err(|e| DriverError::InvalidRequest(e.to_string()))?;
        let needed = request.prompt.len().saturating_add(request.max_tokens);
        if needed > self.max_positions {
            return Err(DriverError::InvalidRequest(format!(
                "the prompt ({} tokens) plus max_tokens ({}) exceeds the model's context of {} positions",
                request.prompt.len(),
                request.max_tokens,
                self.max_positions
            )));
        }
        if request.max_tokens == 0 {
            return Err(DriverError::InvalidRequest("max_tokens must be at least 1".into()));
        }
        if let Speculation::Draft(m) = &speculation
            && m.vocab_size() != self.vocab_size as usize
        {
            return Err(DriverError::InvalidRequest(format!(
                "the draft model {} has a vocabulary of {} ids, the model {}",
                m.path().display(),
                m.vocab_size(),
                self.vocab_size
            )));
        }
        if usize::from(request.top_logprobs) > shoal_worker::protocol::MAX_TOP_LOGPROBS {
            return Err(DriverError::InvalidRequest("top_logprobs is at most 20".into()));
        }
        let started = Instant::now();
        let mut state = RunState {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            step_times: Vec::new(),
            first_token_at: None,
            finish: None,
            pending_failover: None,
            drafter: Drafter::new(if request.constraint.is_some() { Speculation::Off } else { speculation }),
            spot_checks: 0,
            shadows: check::Shadows::default(),
        };
        let mut failovers = Vec::new();
        loop {
            let route = match self.plan_route() {
                Ok(r) => r,
                Err(e) if !failovers.is_empty() || state.pending_failover.is_some() => {
                    // Banned peers may be all there is: look again at who answers.
                    self.refresh().await;
                    match self.plan_route() {
                        Ok(r) => r,
                        // Say why the peers that are left were banned.
                        Err(_) => {
                            return Err(match (e, &state.pending_failover) {
                                (DriverError::NoRoute { n_layers, detail }, Some(p)) => {
                                    DriverError::NoRoute {
                                        n_layers,
                                        detail: format!("{detail}; last failure: {}", p.2),
                                    }
                                }
                                (e, _) => e,
                            });
                        }
                    }
                }
                Err(e) => return Err(e),
            };
            let ids: Vec<PeerId> = route.iter().map(|h| h.node_id).collect();
            match self.attempt(request, &route, &mut state, &mut on_token, &mut failovers).await {
                Ok(()) => {
                    self.succeeded(&ids);
                    let first = state.first_token_at.unwrap_or_else(Instant::now);
                    return Ok(Outcome {
                        tokens: state.tokens,
                        logprobs: state.logprobs,
                        finish_reason: state.finish.unwrap_or(FinishReason::Length),
                        prefill_time: first.saturating_duration_since(started),
                        decode_time: first.elapsed(),
                        step_times: state.step_times,
                        speculation: state.drafter.stats(),
                        failovers,
                        route: ids,
                        spot_checks: state.spot_checks,
                    });
                }
                Err(f) => {
                    self.ban(&f.culprits);
                    tracing::warn!(at_token = state.tokens.len(), reason = %f.reason, "failing over");
                    if failovers.len() + 1 > self.config.max_failovers {
                        return Err(DriverError::TooManyFailovers {
                            failovers: failovers.len(),
                            last: f.reason,
                        });
                    }
                    let banned = f.culprits.iter().map(short).collect();
                    // Keep the earliest start if one failover fails again before a token.
                    let pending = state.pending_failover.take();
                    let (step_started, at_token) =
                        pending.as_ref().map_or((f.step_started, state.tokens.len()), |p| (p.0, p.1));
                    state.pending_failover = Some((step_started, at_token, f.reason, banned, Instant::now()));
                }
            }
        }
    }

    /// One route: open, prefill the history, decode until done or failure.
    async fn attempt(
        &self,
        request: &Request,
        route: &[RouteHop],
        state: &mut RunState,
        on_token: &mut impl FnMut(TokenEvent<'_>) -> Flow,
        failovers: &mut Vec<Failover>,
    ) -> Result<(), AttemptFailure> {
        let ids: Vec<PeerId> = route.iter().map(|h| h.node_id).collect();
        let first = ids[0];
        let last = ids[ids.len() - 1];
        {
            let mut peers = lock(&self.peers);
            for id in &ids {
                if let Some(p) = peers.get_mut(id) {
                    p.active += 1;
                }
            }
        }
        let _active = ActiveGuard { driver: self, route: ids.clone() };
        let session_id: u64 = rand::random();
        let mut channel = self.node.open_session_channel(session_id);
        let mut address_book = vec![self.node.node_addrs()];
        address_book.extend(ids.iter().map(|id| self.node.known_addrs(id)));
        let history: Vec<u32> = request.prompt.iter().chain(state.tokens.iter()).copied().collect();
        let max_len = request.prompt.len() + request.max_tokens;
        let (seal, sealer) = Sealer::new(self.config.seal_sampler_inputs, &last)
            .map_err(|e| AttemptFailure { culprits: vec![last], reason: e, step_started: Instant::now() })?;
        let open = OpenSession {
            session_id,
            model_id: self.model_id,
            origin: self.node.id(),
            route: route.to_vec(),
            hop_index: 0,
            wire_dtype: self.config.wire_dtype,
            max_len: u32::try_from(max_len).unwrap_or(u32::MAX),
            sampling: Sampling::from(&request.params),
            top_logprobs: request.top_logprobs,
            prompt_len: u32::try_from(request.prompt.len()).unwrap_or(u32::MAX),
            address_book,
            seal,
        };
        let mut guard =
            SessionGuard { node: &self.node, first_hop: first, session_id, reason: CloseReason::Error };
        let sent_at = Instant::now();
        let fail_now = |reason: String, culprits: Vec<PeerId>| AttemptFailure {
            culprits,
            reason,
            step_started: sent_at,
        };
        self.node
            .send_for_session(first, session_id, &Message::OpenSession(open))
            .map_err(|e| fail_now(e.to_string(), vec![]))?;

        // Prefill: the prompt in chunks, then (after a failover) each generated token as the
        // one-token step it was, all sent back to back. Replaying exactly the steps of the
        // first run keeps every kernel on the same path (a batched prefill of generated
        // tokens rounds differently from one-token steps, which can flip a sampled token).
        let mut step_id = 0u64;
        let mut pos = 0u32;
        let mut steps: Vec<(u64, Vec<u32>)> =
            request.prompt.chunks(self.config.prefill_chunk.max(1)).map(|c| (0, c.to_vec())).collect();
        steps.extend(state.tokens.iter().enumerate().map(|(i, &t)| (i as u64 + 1, vec![t])));
        // The mask of the token the last of these steps samples.
        let mut mask = match Self::next_mask(request) {
            Ok(m) => m,
            Err(None) => {
                state.finish = Some(FinishReason::Stop);
                guard.reason = CloseReason::Completed;
                return Ok(());
            }
            Err(Some(e)) => return Err(fail_now(e, vec![])),
        };
        let n_steps = steps.len();
        for (i, (sample_step, ids)) in steps.into_iter().enumerate() {
            step_id += 1;
            let len = ids.len() as u32;
            let step = sealer.step(Step {
                session_id,
                step_id,
                start_pos: pos,
                sample_step,
                history_tail: ids.clone(),
                draft: Vec::new(),
                mask: if i + 1 == n_steps { mask.clone() } else { None },
                sealed: None,
                payload: Payload::Tokens(ids),
            });
            self.node
                .send_for_session(first, session_id, &Message::Step(step))
                .map_err(|e| fail_now(e.to_string(), vec![]))?;
            pos += len;
        }
        let prefill_budget = self.config.step_timeout
            + self
                .config
                .prefill_timeout_per_token
                .saturating_mul(u32::try_from(history.len()).unwrap_or(u32::MAX));
        let mut step_started = sent_at;
        let mut decoding = false;
        let mut deadline = step_started + prefill_budget;
        // The draft of the step in flight.
        let mut draft: Vec<u32> = Vec::new();
        // The second opinion of the checked step in flight, with the generation's kept check
        // sessions (given back when it is done).
        let mut pending_check: Option<PendingCheck<'_>> = None;
        let mut taps = TapSet::default();
        loop {
            let waited = self.await_result(&mut channel, &ids, step_id, step_started, deadline, &mut taps);
            let (result, second) = match pending_check.take() {
                Some(check) => {
                    // A failed step does not wait for its check (whose kept sessions close).
                    let check = async { Ok::<_, AttemptFailure>(check.await) };
                    let (result, (second, shadows)) = tokio::try_join!(waited, check)?;
                    state.shadows = shadows;
                    (result, Some(second))
                }
                None => (waited.await?, None),
            };
            taps.result_at = Some(Instant::now());
            if let Some(second) = second {
                self.check_step(
                    route,
                    state,
                    &mut channel,
                    step_id,
                    &result,
                    &mut taps,
                    step_started,
                    deadline,
                    second,
                )
                .await?;
            }
            let step_time = step_started.elapsed();
            let lie = |reason: String| AttemptFailure { culprits: vec![last], reason, step_started };
            if result.accepted.len() > draft.len()
                || result.accepted.iter().zip(&draft).any(|(c, &d)| c.token != d)
            {
                return Err(lie(format!(
                    "the last stage accepted {} ids that are not a prefix of the draft of {}",
                    result.accepted.len(),
                    draft.len()
                )));
            }
            if result.token >= self.vocab_size {
                return Err(lie(format!(
                    "the last stage returned id {} outside the vocabulary",
                    result.token
                )));
            }
            if let Some(m) = &mask
                && !m.allows(result.token)
            {
                return Err(lie(format!(
                    "the last stage returned id {} that the step's mask forbids",
                    result.token
                )));
            }
            state.drafter.record(draft.len(), result.accepted.len());
            if decoding {
                state.step_times.push(step_time);
            }
            decoding = true;
            if let Some((started, at_token, reason, banned, detected)) = state.pending_failover.take() {
                failovers.push(Failover {
                    at_token,
                    banned,
                    reason,
                    detection: detected.saturating_duration_since(started),
                    stall: started.elapsed(),
                });
            }
            if state.first_token_at.is_none() {
                state.first_token_at = Some(Instant::now());
            }
            // The accepted draft ids, then the sampler's next choice: each as if it came alone.
            let chosen = result
                .accepted
                .iter()
                .map(|c| (c.token, c.logprob, c.top_logprobs.as_slice()))
                .chain(std::iter::once((result.token, result.logprob, result.top_logprobs.as_slice())));
            let before = state.tokens.len();
            for (token, logprob, top_logprobs) in chosen {
                if request.stop_ids.contains(&token) {
                    state.finish = Some(FinishReason::Stop);
                    guard.reason = CloseReason::Completed;
                    return Ok(());
                }
                if let Some(c) = &request.constraint
                    && let Err(e) = c.advance(token)
                {
                    tracing::warn!("the constraint refused id {token} it allowed: {e}");
                    state.finish = Some(FinishReason::Stop);
                    guard.reason = CloseReason::Completed;
                    return Ok(());
                }
                let index = state.tokens.len();
                state.tokens.push(token);
                state.logprobs.push(logprob);
                let flow = on_token(TokenEvent { index, token, logprob, top_logprobs, route: &ids });
                if flow == Flow::Stop {
                    state.finish = Some(FinishReason::Stop);
                    guard.reason = CloseReason::ClientDisconnected;
                    return Ok(());
                }
                if state.tokens.len() >= request.max_tokens {
                    state.finish = Some(FinishReason::Length);
                    guard.reason = CloseReason::Completed;
                    return Ok(());
                }
            }
            let emitted = state.tokens[before..].to_vec();
            let Some(&next) = emitted.last() else {
                return Err(lie("the last stage returned no token".into()));
            };
            // The cache holds the prompt and every token but the last; a speculative step
            // needs its draft plus one position, and the draft is useful only while it can
            // be kept whole within max_tokens.
            let start = request.prompt.len() + state.tokens.len() - 1;
            let context: Vec<u32> = request.prompt.iter().chain(&state.tokens).copied().collect();
            draft = state.drafter.propose(&context, request.max_tokens - state.tokens.len() - 1).await;
            mask = match Self::next_mask(request) {
                Ok(m) => m,
                Err(None) => {
                    state.finish = Some(FinishReason::Stop);
                    guard.reason = CloseReason::Completed;
                    return Ok(());
                }
                Err(Some(e)) => return Err(AttemptFailure { culprits: vec![], reason: e, step_started }),
            };
            step_id += 1;
            step_started = Instant::now();
            deadline = step_started + self.config.step_timeout;
            self.fail_over_from_liars(&ids, step_started)?;
            let checking = draft.is_empty()
                && self.spot_config().enabled()
                && lock(&self.policy).should_check(&ids)
                && self.can_check(route);
            let mut payload = Vec::with_capacity(1 + draft.len());
            payload.push(next);
            payload.extend_from_slice(&draft);
            let step = sealer.step(Step {
                session_id,
                step_id,
                start_pos: u32::try_from(start).unwrap_or(u32::MAX),
                sample_step: state.tokens.len() as u64,
                history_tail: emitted,
                draft: draft.clone(),
                mask: mask.clone(),
                sealed: None,
                payload: Payload::Tokens(payload),
            });
            self.node
                .send_for_session(first, session_id, &Message::Step(step))
                .map_err(|e| AttemptFailure { culprits: vec![], reason: e.to_string(), step_started })?;
            if checking {
                // The tap follows its step down the chain: every stage has computed and
                // forwarded the step before it learns that the step is checked.
                taps.clear();
                self.node
                    .send_for_session(first, session_id, &Message::Tap(Tap { session_id, step_id }))
                    .map_err(|e| AttemptFailure { culprits: vec![], reason: e.to_string(), step_started })?;
                // The second opinion needs only the history: it runs while the step does.
                let replay = Arc::new(check::Replay::new(
                    request,
                    &state.tokens,
                    self.config.prefill_chunk,
                    mask.clone(),
                ));
                let mut shadows = std::mem::take(&mut state.shadows);
                let route = route.to_vec();
                pending_check = Some(Box::pin(async move {
                    let second = self.second_opinion(&route, replay, &mut shadows).await;
                    (second, shadows)
                }));
            }
        }
    }

    /// Waits for the result of `step_id`; errors and silence become an [`AttemptFailure`].
    async fn await_result(
        &self,
        channel: &mut SessionChannel,
        route: &[PeerId],
        step_id: u64,
        step_started: Instant,
        deadline: Instant,
        taps: &mut TapSet,
    ) -> Result<shoal_worker::protocol::StepResult, AttemptFailure> {
        let last = route[route.len() - 1];
        loop {
            let Some(Inbound { from, msg }) = channel.recv_until(deadline.into()).await else {
                let silent = self.silent_hops(route).await;
                // Every hop answering pings: one may be dropping steps (`crate::blame`).
                let culprits = lock(&self.strikes).timed_out(route, &silent, Instant::now());
                return Err(AttemptFailure {
                    reason: format!(
                        "no result within {:?}; silent: [{}]; banned: [{}]",
                        deadline.saturating_duration_since(step_started),
                        silent.iter().map(short).collect::<Vec<_>>().join(", "),
                        culprits.iter().map(short).collect::<Vec<_>>().join(", ")
                    ),
                    culprits,
                    step_started,
                });
            };
            match msg {
                Message::StepResult(r) if from == last && r.step_id == step_id => return Ok(r),
                Message::StepResult(r) if from == last && r.step_id < step_id => {} // an earlier chunk
                Message::StepResult(r) => {
                    tracing::debug!(from = %short(&from), step = r.step_id, "ignoring an unexpected result");
                }
                Message::StageOutput(o) if o.step_id == step_id && route.contains(&from) => {
                    taps.insert(from, o.hidden);
                }
                Message::Error(e) => return Err(self.blame(route, from, &e, step_started)),
                other => tracing::debug!(kind = other.kind_name(), "ignoring a message for a session"),
            }
        }
    }

    /// Measures each hop of a tapped step: the time between the arrival of its output (or the
    /// result, for the last) and of the previous hop's (or the step's start, for the first) is
    /// its compute plus a hop; its span's layers over that time go into the peer's moving
    /// average ([`PeerState::measured`]), which routing believes over the announcement.
    fn measured(&self, route: &[RouteHop], taps: &TapSet, step_started: Instant) {
        let mut prev = step_started;
        let mut peers = lock(&self.peers);
        for (i, hop) in route.iter().enumerate() {
            let at = if i + 1 == route.len() { taps.result_at } else { taps.at.get(&hop.node_id).copied() };
            let Some(at) = at else { return };
            let secs = at.saturating_duration_since(prev).as_secs_f64().max(1e-6);
            prev = at.max(prev);
            let sample = f64::from(hop.end - hop.start) / secs;
            if let Some(p) = peers.get_mut(&hop.node_id) {
                p.measured =
                    Some(p.measured.map_or(sample, |m| (1.0 - MEASURE_WEIGHT) * m + MEASURE_WEIGHT * sample));
            }
        }
    }

    /// Ends the attempt when a peer of its route was caught lying (by any session's check):
    /// the session replays its history on an honest route.
    fn fail_over_from_liars(&self, route: &[PeerId], step_started: Instant) -> Result<(), AttemptFailure> {
        let liars: Vec<PeerId> = {
            let peers = lock(&self.peers);
            let now = Instant::now();
            let caught = |p: &PeerState| p.liar && p.banned_until.is_some_and(|t| t > now);
            route.iter().filter(|id| peers.get(*id).is_some_and(caught)).copied().collect()
        };
        if liars.is_empty() {
            return Ok(());
        }
        Err(AttemptFailure {
            reason: format!(
                "{} was caught returning wrong results",
                liars.iter().map(short).collect::<Vec<_>>().join(", ")
            ),
            culprits: liars,
            step_started,
        })
    }

    /// Checks a tapped step (see the module docs): waits for the outputs of every stage, then
    /// judges them against the `second` opinion (and a third when they disagree); a lie on
    /// this route ends the attempt before its token is used.
    #[allow(clippy::too_many_arguments)]
    async fn check_step(
        &self,
        route: &[RouteHop],
        state: &mut RunState,
        channel: &mut SessionChannel,
        step_id: u64,
        result: &StepResult,
        taps: &mut TapSet,
        step_started: Instant,
        deadline: Instant,
        second: check::SecondOpinion,
    ) -> Result<(), AttemptFailure> {
        let ids: Vec<PeerId> = route.iter().map(|h| h.node_id).collect();
        let wanted = &ids[..ids.len() - 1];
        while !wanted.iter().all(|p| taps.outputs.contains_key(p)) {
            let Some(Inbound { from, msg }) = channel.recv_until(deadline.into()).await else {
                let silent: Vec<PeerId> =
                    wanted.iter().filter(|p| !taps.outputs.contains_key(*p)).copied().collect();
                return Err(AttemptFailure {
                    reason: format!(
                        "no output of a checked step from [{}]",
                        silent.iter().map(short).collect::<Vec<_>>().join(", ")
                    ),
                    culprits: silent,
                    step_started,
                });
            };
            match msg {
                Message::StageOutput(o) if o.step_id == step_id && ids.contains(&from) => {
                    taps.insert(from, o.hidden);
                }
                Message::Error(e) => return Err(self.blame(&ids, from, &e, step_started)),
                _ => {}
            }
        }
        self.measured(route, taps, step_started);
        let primary = match check::observation(&ids, result, &taps.outputs) {
            Ok(o) => o,
            Err(reason) => return Err(AttemptFailure { culprits: vec![], reason, step_started }),
        };
        match self.spot_check(route, primary, second).await {
            check::CheckResult::Passed => {
                state.spot_checks += 1;
                Ok(())
            }
            check::CheckResult::Skipped(why) => {
                tracing::debug!("spot-check skipped: {why}");
                Ok(())
            }
            check::CheckResult::Failed { culprits, reason } => {
                Err(AttemptFailure { culprits, reason, step_started })
            }
        }
    }

    /// The mask of the next token: `Ok(None)` for an unconstrained request, `Err(None)` when
    /// the request's grammar is complete, `Err(Some(reason))` when it failed.
    fn next_mask(request: &Request) -> Result<Option<TokenMask>, Option<String>> {
        match &request.constraint {
            None => Ok(None),
            Some(c) => match c.next_mask() {
                Ok(Some(m)) => Ok(Some(m)),
                Ok(None) => Err(None),
                Err(e) => Err(Some(e)),
            },
        }
    }

    /// Who is to blame for a stage's error.
    fn blame(&self, route: &[PeerId], from: PeerId, e: &StageError, step_started: Instant) -> AttemptFailure {
        let culprit = if from == self.node.id() {
            // This node could not reach stage 1.
            Some(route[0])
        } else {
            // Bad input is charged to the hop that produced it (`crate::blame`).
            route
                .iter()
                .position(|id| *id == from)
                .and_then(|i| crate::blame::culprit_of_error(route, i, e.code))
        };
        if e.code == ErrorCode::CapacityExceeded
            && let Some(id) = culprit
            && let Some(p) = lock(&self.peers).get_mut(&id)
        {
            // Its KV budget is full: plan around it until it says otherwise (its next pong or
            // announcement).
            p.info.free_kv_bytes = 0;
        }
        AttemptFailure {
            culprits: culprit.into_iter().collect(),
            reason: format!("{} from {}: {}", e.code, short(&from), e.message),
            step_started,
        }
    }

    /// The hops of `route` that do not answer a ping.
    async fn silent_hops(&self, route: &[PeerId]) -> Vec<PeerId> {
        let pings = route.iter().map(|id| {
            let node = self.node.clone();
            let id = *id;
            let timeout = self.config.ping_timeout;
            async move { (id, node.ping(id, timeout).await) }
        });
        let mut silent = Vec::new();
        for (id, result) in futures_join_all(pings).await {
            match result {
                Ok((rtt, Some(info))) => {
                    if let Some(p) = lock(&self.peers).get_mut(&id) {
                        p.rtt = rtt;
                        p.info = info;
                    }
                }
                _ => silent.push(id),
            }
        }
        silent
    }
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// The copies of a tapped step's outputs and when each arrived.
#[derive(Default)]
struct TapSet {
    outputs: HashMap<PeerId, HiddenStates>,
    at: HashMap<PeerId, Instant>,
    result_at: Option<Instant>,
}

impl TapSet {
    fn insert(&mut self, from: PeerId, hidden: HiddenStates) {
        self.outputs.insert(from, hidden);
        self.at.insert(from, Instant::now());
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// Weight of a new measurement in a peer's moving average of throughput.
const MEASURE_WEIGHT: f64 = 0.25;

/// What a generation has produced so far, across attempts.
struct RunState {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    step_times: Vec<Duration>,
    first_token_at: Option<Instant>,
    finish: Option<FinishReason>,
    /// A failure not yet recovered: (failed step's start, tokens before it, reason, banned,
    /// detected at).
    pending_failover: Option<(Instant, usize, String, Vec<String>, Instant)>,
    /// Drafts of speculative steps (its draft length carries over a failover).
    drafter: Drafter,
    /// Checks passed.
    spot_checks: usize,
    /// The check sessions kept for the generation's next checks.
    shadows: check::Shadows,
}
