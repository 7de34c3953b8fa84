//! The pipeline driver: the client side of the stage protocol. It runs a session through a
//! route of peers, keeps the session's token history, and recovers from a failed peer by
//! banning it, planning another route, replaying the history as a prefill and carrying on.
//!
//! The logic below is an I/O-free state machine, [`machine`]'s `Generation`, over the peer
//! table the origin's generations share ([`Roster`]); [`Driver::generate_with`] is the thin
//! async loop that carries out its actions (sends, pings, drafts, other opinions of a checked
//! step, tokens to the caller) and feeds it what comes back. `sim` (tests) runs the same
//! machine against simulated peers with seeded faults on a virtual clock.
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
//! On a share of steps ([`DriverConfig::spot_check`]; always on the first steps through a
//! peer not checked yet, the first result of a route included: the last prompt chunk's, or
//! after a failover the last replayed step's) the driver taps the step right after sending it (every stage
//! also sends the origin the hidden states it forwarded; no stage knows a step is checked
//! while computing it) and runs the same history through another route: other
//! replicas of the same spans, or the origin's own weights ([`Driver::set_local_weights`]).
//! The generation keeps that route's session (or the origin's caches) for its next checks,
//! which send only the ids generated since. The second opinion needs only the history, so it
//! runs while the checked step itself is computed (a step that fails does not wait for it).
//! A second opinion that fails is asked again through other replicas, then the origin's
//! weights. The token of a checked step is reported only once the outputs agree. When they
//! do not, a third opinion decides (where it was a checking opinion that lied, the checked
//! route's later hops still need one to agree with) and the peers in the minority are
//! banned for
//! [`DriverConfig::ban_max`] ([`crate::verify`] holds the decisions); the generation fails over
//! without the token, and every other session through a banned liar fails over at its next
//! step, replaying its history on an honest route. Tokens of unchecked steps are reported at
//! once. When a check catches a liar, the tokens that routes through it produced since the
//! last confirmed one (the token of the last passed check) are withdrawn: the replay leaves
//! them out, and the caller sees the next token's index go back ([`TokenEvent`];
//! [`Outcome::withdrawn`] counts them). A lie on an unchecked step before the last passed
//! check stays, as does any lie in a constrained generation (a grammar's state cannot be
//! rewound).

mod check;
mod machine;
mod roster;
#[cfg(test)]
mod sim;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use iroh::EndpointAddr;
use shoal_model_shards::generate::{FinishReason, Flow};
use shoal_model_shards::sampler::SamplingParams;

use crate::constraint::Constraint;
use shoal_worker::net::{Inbound, NetError, Node, SessionChannel, peer_id, short};
use shoal_worker::protocol::seal::SealKey;
use shoal_worker::protocol::{
    CloseReason, CloseSession, HiddenStates, Message, PeerInfo, RouteHop, Step, WireDType,
};
use shoal_worker::service::PeerId;

use crate::speculative::{Drafter, SpecStats, Speculation};
use crate::swarm::announce::{Announcement, PeerState as SwarmState};
use crate::verify::{Observation, SpotCheckConfig, SpotCheckPolicy};
use machine::{Action, Event, Generation, Opinion};
pub use roster::Roster;

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
type PendingCheck<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = (Result<Observation, String>, check::Shadows)> + Send + 'a>,
>;

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
///
/// Indices count up from 0, except after a spot-check caught a peer lying: the tokens that
/// routes through it produced since the last confirmed one are withdrawn, and the next
/// token's index is that of the first withdrawn one (at or below an index already seen).
/// The generation's [`Outcome`] holds the tokens that stand.
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
    /// Tokens withdrawn because a peer caught lying had produced them (see [`TokenEvent`]).
    pub withdrawn: usize,
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
    model: ModelInfo,
    config: DriverConfig,
    roster: Mutex<Roster>,
    local: Mutex<Option<Arc<LocalWeights>>>,
    checks: AtomicU64,
    liars_banned: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A generation the driver runs: closes its session when dropped before it is done (the
/// caller went away).
struct Running<'a> {
    driver: &'a Driver,
    machine: Generation,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if self.machine.is_done() {
            return;
        }
        let actions = self.machine.abandon(&mut lock(&self.driver.roster));
        for action in actions {
            if let Action::Close { first, session_id, reason } = action {
                self.driver.close(first, session_id, reason);
            }
        }
    }
}

impl Driver {
    /// A driver for `model` that sends from `node`.
    pub fn new(node: Node, model: ModelInfo, config: DriverConfig) -> Self {
        let roster = Roster::new(
            model.n_layers,
            SpotCheckPolicy::new(config.spot_check, rand::random()),
            crate::blame::Strikes::new(TIMEOUT_STRIKES, config.step_timeout),
            config.ban_base,
            config.ban_max,
        );
        Self {
            node,
            model,
            config,
            roster: Mutex::new(roster),
            local: Mutex::new(None),
            checks: AtomicU64::new(0),
            liars_banned: AtomicU64::new(0),
        }
    }

    /// Lets spot-checks use this node's own copy of the model: to check a span no other peer
    /// serves, and to break a tie between two replicas.
    pub fn set_local_weights(&self, weights: LocalWeights) {
        *lock(&self.local) = Some(Arc::new(weights));
        lock(&self.roster).has_local = true;
    }

    /// Ids the model's logits cover.
    pub fn vocab_size(&self) -> u32 {
        self.model.vocab_size
    }

    /// Spot-checks run so far (second opinions asked for) and peers banned for wrong results.
    pub fn spot_check_counts(&self) -> (u64, u64) {
        (self.checks.load(Ordering::Relaxed), self.liars_banned.load(Ordering::Relaxed))
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
        if info.model_id != self.model.model_id || info.n_layers != self.model.n_layers {
            return Err(DriverError::Peer {
                peer: short(&id),
                reason: "it serves a different model (model ids differ)".into(),
            });
        }
        let mut roster = lock(&self.roster);
        let entry = roster.peers.entry(id).or_insert(PeerState {
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
        let mut roster = lock(&self.roster);
        let peers = &mut roster.peers;
        let mut seen = std::collections::HashSet::new();
        for a in view {
            if a.model != self.model.model_id
                || a.n_layers != self.model.n_layers
                || a.node == me
                || a.start >= a.end
            {
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
        let ids: Vec<PeerId> = lock(&self.roster).peers.keys().copied().collect();
        self.refresh_peers(&ids).await
    }

    /// Pings these peers (those this driver knows) for their state and round trip; returns
    /// those that answered.
    pub async fn refresh_peers(&self, ids: &[PeerId]) -> Vec<(PeerId, Duration)> {
        let mut answered = Vec::with_capacity(ids.len());
        for &id in ids {
            if let Ok((rtt, Some(info))) = self.node.ping(id, self.config.ping_timeout).await {
                let mut roster = lock(&self.roster);
                if roster.peers.contains_key(&id) {
                    roster.pinged(&id, rtt, info);
                    answered.push((id, rtt));
                }
            }
        }
        answered
    }

    /// What the driver knows of each peer.
    pub fn peers(&self) -> Vec<(PeerId, PeerState)> {
        let mut v: Vec<_> = lock(&self.roster).peers.iter().map(|(k, v)| (*k, v.clone())).collect();
        v.sort_by_key(|(_, p)| (p.info.start, p.info.end));
        v
    }

    /// The route a new session would take now.
    pub fn plan_route(&self) -> Result<Vec<RouteHop>, DriverError> {
        lock(&self.roster).plan_route(Instant::now())
    }

    /// Closes a session along its chain (errors are only logged: the stages drop idle
    /// sessions anyway).
    fn close(&self, first: PeerId, session_id: u64, reason: CloseReason) {
        let msg = Message::CloseSession(CloseSession { session_id, reason });
        if let Err(e) = self.node.send(first, &msg) {
            tracing::debug!("close: {e}");
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
        if let Some(&bad) = request.prompt.iter().find(|&&t| t >= self.model.vocab_size) {
            return Err(DriverError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {} ids",
                self.model.vocab_size
            )));
        }
        request.params.validate().map_err(|e| DriverError::InvalidRequest(e.to_string()))?;
        let needed = request.prompt.len().saturating_add(request.max_tokens);
        if needed > self.model.max_positions {
            return Err(DriverError::InvalidRequest(format!(
                "the prompt ({} tokens) plus max_tokens ({}) exceeds the model's context of {} positions",
                request.prompt.len(),
                request.max_tokens,
                self.model.max_positions
            )));
        }
        if request.max_tokens == 0 {
            return Err(DriverError::InvalidRequest("max_tokens must be at least 1".into()));
        }
        if let Speculation::Draft(m) = &speculation
            && m.vocab_size() != self.model.vocab_size as usize
        {
            return Err(DriverError::InvalidRequest(format!(
                "the draft model {} has a vocabulary of {} ids, the model {}",
                m.path().display(),
                m.vocab_size(),
                self.model.vocab_size
            )));
        }
        if usize::from(request.top_logprobs) > shoal_worker::protocol::MAX_TOP_LOGPROBS {
            return Err(DriverError::InvalidRequest("top_logprobs is at most 20".into()));
        }
        let mut drafter =
            Drafter::new(if request.constraint.is_some() { Speculation::Off } else { speculation });
        let speculate = !matches!(drafter.mode(), Speculation::Off);
        let machine = Generation::new(
            request.clone(),
            self.config.clone(),
            self.model,
            self.node.id(),
            speculate,
            rand::random(),
            Instant::now(),
        );
        let mut run = Running { driver: self, machine };
        // The generation's kept check sessions (lent to a second opinion while it runs).
        let mut shadows = check::Shadows::default();
        let mut channel: Option<SessionChannel> = None;
        let mut pending_check: Option<PendingCheck<'_>> = None;
        let mut events = std::collections::VecDeque::from([Event::Start]);
        loop {
            let event = match events.pop_front() {
                Some(e) => e,
                None => {
                    self.next_event(&run.machine, channel.as_mut(), &mut pending_check, &mut shadows).await
                }
            };
            let actions = run.machine.handle(event, Instant::now(), &mut lock(&self.roster));
            for action in actions {
                let sent = match action {
                    Action::Open { first, mut open } => {
                        open.address_book = vec![self.node.node_addrs()];
                        open.address_book
                            .extend(open.route.iter().map(|h| self.node.known_addrs(&h.node_id)));
                        channel = Some(self.node.open_session_channel(open.session_id));
                        self.node.send_for_session(first, open.session_id, &Message::OpenSession(open))
                    }
                    Action::Send { first, session_id, msg } => {
                        self.node.send_for_session(first, session_id, &msg)
                    }
                    Action::Close { first, session_id, reason } => {
                        self.close(first, session_id, reason);
                        Ok(())
                    }
                    Action::PingHops(ids) => {
                        events.push_back(Event::Silent(self.silent_hops(&ids).await));
                        Ok(())
                    }
                    Action::Refresh => {
                        self.refresh().await;
                        events.push_back(Event::Refreshed);
                        Ok(())
                    }
                    Action::Record { drafted, accepted } => {
                        drafter.record(drafted, accepted);
                        Ok(())
                    }
                    Action::Draft { context, limit } => {
                        events.push_back(Event::Drafted(drafter.propose(&context, limit).await));
                        Ok(())
                    }
                    Action::Opinion { which: Opinion::Second, route, local, replay } => {
                        self.checks.fetch_add(1, Ordering::Relaxed);
                        let mut lent = std::mem::take(&mut shadows);
                        pending_check = Some(Box::pin(async move {
                            let observed = self.observe(&route, &replay, local, Some(&mut lent)).await;
                            (observed, lent)
                        }));
                        Ok(())
                    }
                    Action::Opinion { which: Opinion::Third, route, local, replay } => {
                        let observed = self.observe(&route, &replay, local, None).await;
                        events.push_back(Event::Opinion { which: Opinion::Third, observed });
                        Ok(())
                    }
                    Action::Withdraw { from } => {
                        tracing::debug!(from, "tokens withdrawn");
                        Ok(())
                    }
                    Action::Caught(liars) => {
                        for (id, hop) in liars {
                            tracing::warn!(peer = %short(&id), hop, ban = ?self.config.ban_max, "spot-check: banned a peer that returned wrong results");
                            self.liars_banned.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(())
                    }
                    Action::CancelCheck => {
                        // Its kept sessions close with it.
                        pending_check = None;
                        Ok(())
                    }
                    Action::Token { index, token, logprob, top_logprobs, route } => {
                        let flow = on_token(TokenEvent {
                            index,
                            token,
                            logprob,
                            top_logprobs: &top_logprobs,
                            route: &route,
                        });
                        events.push_back(Event::Delivered(flow));
                        Ok(())
                    }
                    Action::Done(result) => {
                        return result.map(|mut outcome| {
                            outcome.speculation = drafter.stats();
                            outcome
                        });
                    }
                };
                if let Err(e) = sent {
                    // The rest of the batch belongs to the attempt that failed.
                    events.clear();
                    events.push_back(Event::SendFailed(e.to_string()));
                    break;
                }
            }
        }
    }

    /// Waits for the next event of a generation from the network: a message for its session,
    /// its deadline, or the second opinion in flight.
    async fn next_event(
        &self,
        machine: &Generation,
        channel: Option<&mut SessionChannel>,
        pending_check: &mut Option<PendingCheck<'_>>,
        shadows: &mut check::Shadows,
    ) -> Event {
        let deadline = machine.deadline();
        let recv = async {
            match (channel, deadline) {
                (Some(channel), Some(d)) if machine.session_id().is_some() => {
                    channel.recv_until(d.into()).await
                }
                // Only the second opinion is awaited.
                _ => std::future::pending().await,
            }
        };
        let check = async {
            match pending_check.as_mut() {
                Some(f) => f.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            inbound = recv => match inbound {
                Some(Inbound { from, msg }) => Event::Inbound { from, msg },
                None => Event::Timeout,
            },
            (observed, kept) = check => {
                *pending_check = None;
                *shadows = kept;
                Event::Opinion { which: Opinion::Second, observed }
            }
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
                Ok((rtt, Some(info))) => lock(&self.roster).pinged(&id, rtt, info),
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
    fn insert(&mut self, from: PeerId, hidden: HiddenStates, now: Instant) {
        self.outputs.insert(from, hidden);
        self.at.insert(from, now);
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}
