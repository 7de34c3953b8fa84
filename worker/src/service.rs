//! The stage service: the sessions of one span of layers, as a pure, synchronous state machine.
//!
//! # Main loop
//! The transport (an iroh `ProtocolHandler`, on a blocking thread) decodes a frame into a
//! [`Message`], calls [`StageService::handle`] with the sender's node id and the current time,
//! and sends every returned [`Action`] in order. It also calls [`StageService::sweep_idle`]
//! now and then (every few seconds) and sends what that returns. The service does no I/O,
//! spawns nothing and reads no clock: the same inputs give the same actions, so tests drive
//! whole rings by hand.
//!
//! ```text
//! origin ──OpenSession/Step/Close──▶ stage k ──Action::ToNext──▶ stage k+1 ──▶ … ──▶ last stage
//!    ▲                                  │                                              │
//!    └──────── Action::ToOrigin (errors from any stage; StepResult from the last) ◀────┘
//! ```
//!
//! # Where the actions go
//! - [`Action::ToNext`] carries the node id of `route[hop_index + 1]`, taken from the
//!   session's `OpenSession`, so the transport needs no session table to forward.
//! - [`Action::ToOrigin`] carries the address too: the origin named in the session's
//!   `OpenSession` for results and errors about a session (a refused `OpenSession` included),
//!   the sender for anything else (`Pong`, an error about a session that is not open here or
//!   belongs to another opener). The last stage thus answers the origin directly: a ring.
//! - [`Action::Closed`] tells the transport it may drop its per-session state.
//!
//! # What is checked where
//! The codec ([`crate::protocol`]) checks what a frame says about itself; `handle` re-runs
//! [`Message::validate`] (cheap) so in-process callers get the same guarantees. Then:
//! - **OpenSession**: not draining; `model_id`; the sender is the origin on hop 0 and
//!   `route[hop_index - 1]` on later hops (senders are QUIC-authenticated node ids);
//!   `route[hop_index]` is exactly this shard's span
//!   (so hop 0 is the first span) and this is the last hop iff the shard holds the last layer;
//!   `max_len ≤ min(max_seq_len, model max)`; sampling (on the last stage) through
//!   `SamplingParams::validate`; no open session with that id; then the limits: total sessions
//!   ([`StageConfig::max_sessions`]), sessions of one origin
//!   ([`StageConfig::per_peer_sessions`], charged to the `OpenSession`'s origin on every hop,
//!   so a stage forwarding many origins' sessions is not throttled as one peer), sessions one
//!   upstream peer opened for other origins ([`StageConfig::per_forwarder_sessions`], charged
//!   to its authenticated id, so naming made-up origins does not escape a quota) and the KV budget:
//!   the stage's [`KvPool`] of [`StageConfig::kv_budget_bytes`] must have a block free. Nothing
//!   is reserved for `max_len`: sessions take blocks of 16 positions as they grow (paged), so
//!   many sessions of different lengths share the budget.
//! - **Step**: the session exists *and was opened by the sender* (anyone else gets
//!   `UnknownSession`, which reveals nothing); `step_id` increases; `start_pos` equals the
//!   cache length; the payload kind fits the stage (token ids on the first, hidden states
//!   elsewhere) with `hidden == hidden_size` and the session's wire dtype; token ids are in the
//!   vocabulary; the step fits `max_len`; the KV budget has the blocks the step needs
//!   (`CapacityExceeded` otherwise: the origin routes the session elsewhere); hidden states are
//!   finite (checked while decoding).
//! - **CloseSession**: only from the opener; an unknown id is ignored (closing is idempotent).
//!
//! Every failure is answered with one [`Message::Error`] and touches nothing else: a failed
//! step leaves its session's cache and history as they were (the engine's forward is atomic
//! and the cache is truncated back if sampling fails), and other sessions never notice.
//! When a later stage refuses a forwarded `OpenSession`, this stage keeps its session until
//! the origin closes it (or it idles out).
//!
//! [`StageService::handle_many`] takes the messages that arrived together: one-position
//! (decode) steps of distinct sessions among them run as one batched forward, each session
//! getting exactly the bits it would get alone; everything else is handled in order as by
//! [`StageService::handle`].

mod session;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use shoal_model_shards::activation::{self, WireDType};
use shoal_model_shards::sampler::{Sampler, SamplerError, SamplingParams};
use shoal_model_shards::{
    DType, Error as EngineError, KvPool, LogitsMode, Shard, StageInput, StageOutput, Tensor,
};

use crate::protocol::seal::{self, SealKey};
use crate::protocol::{
    Chosen, CloseReason, CloseSession, ErrorCode, HiddenStates, Message, OpenSession, Payload, PeerInfo,
    StageError, StageOutput as Copied, Step, StepResult, Tap,
};
use session::{SamplerState, Session};

/// A peer's iroh node id (its ed25519 public key).
pub type PeerId = [u8; 32];

/// Limits and identity of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageConfig {
    /// Most sessions open at once.
    pub max_sessions: usize,
    /// Bytes of KV cache the stage may reserve across all sessions.
    pub kv_budget_bytes: usize,
    /// Most sessions one origin may hold open at once.
    pub per_peer_sessions: usize,
    /// Most sessions one upstream peer may open here on behalf of origins other than itself
    /// (hop > 0: the stage before this one in their routes). Counted by the peer's
    /// authenticated node id, so a peer naming made-up origins is held to it.
    pub per_forwarder_sessions: usize,
    /// A session with no message for longer than this is closed by [`StageService::sweep_idle`].
    pub idle_timeout: Duration,
    /// Largest `max_len` a session may ask for (further capped by the model's maximum).
    pub max_seq_len: usize,
    /// Identity of the model this stage serves (must match `OpenSession::model_id`).
    pub model_id: [u8; 32],
}

/// What the transport must do after a call into the service.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send `msg` to the next hop of the session's route, `to` = `route[hop_index + 1]`.
    ToNext {
        /// Node id of the next hop.
        to: PeerId,
        /// The message (an `OpenSession` with `hop_index + 1`, a `Step` or a `CloseSession`).
        msg: Message,
    },
    /// Send `msg` to `to`: the session's origin (from its `OpenSession`), or the sender when
    /// the message concerns no session open here (see the module docs, "Where the actions go").
    ToOrigin {
        /// Node id of the origin (or of the sender).
        to: PeerId,
        /// A `StepResult`, an `Error` or a `Pong`.
        msg: Message,
    },
    /// The session is closed here and its memory freed.
    Closed {
        /// The session.
        session_id: u64,
    },
}

/// A snapshot of the stage's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StageStats {
    /// Sessions open.
    pub sessions: usize,
    /// KV bytes held by open sessions (whole blocks, counted against the budget).
    pub kv_bytes_used: usize,
    /// KV bytes of the budget still free.
    pub kv_bytes_free: usize,
    /// Whether the stage refuses new sessions.
    pub draining: bool,
}

/// Why a message was refused: becomes a [`StageError`].
struct Refusal {
    code: ErrorCode,
    message: String,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal { code, message: message.into() }
}

/// The stage service of one shard: sessions, their KV caches under a budget, and the forward
/// step. See the module docs.
pub struct StageService {
    shard: Shard,
    config: StageConfig,
    sessions: HashMap<u64, Session>,
    per_peer: HashMap<PeerId, usize>,
    /// Sessions each upstream peer opened here for other origins (see
    /// [`StageConfig::per_forwarder_sessions`]).
    per_forwarder: HashMap<PeerId, usize>,
    /// The KV budget, in blocks shared by the sessions.
    pool: KvPool,
    draining: bool,
    /// This node's id and the X25519 secret of its identity, to open the sampler inputs
    /// that origins seal for it ([`crate::protocol::seal`]).
    identity: Option<([u8; 32], [u8; 32])>,
}

impl StageService {
    /// A service for `shard` with the limits of `config`.
    pub fn new(shard: Shard, config: StageConfig) -> Self {
        let pool = shard.kv_pool(Some(config.kv_budget_bytes));
        Self {
            shard,
            config,
            sessions: HashMap::new(),
            per_peer: HashMap::new(),
            per_forwarder: HashMap::new(),
            pool,
            draining: false,
            identity: None,
        }
    }

    /// Gives the service its node's identity, so that as the last stage it can open the
    /// sampler inputs origins seal for it. [`crate::net::Node::serve`] sets it; without it,
    /// sealed sessions are refused.
    pub fn set_identity(&mut self, key: &iroh::SecretKey) {
        self.identity = Some((*key.public().as_bytes(), seal::x25519_secret(key)));
    }

    /// The shard this stage serves.
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// The stage's configuration.
    pub fn config(&self) -> &StageConfig {
        &self.config
    }

    /// The peer that opened `session_id` on this stage (the origin on hop 0, the previous
    /// hop otherwise), if the session is open.
    pub fn opener(&self, session_id: u64) -> Option<PeerId> {
        self.sessions.get(&session_id).map(|s| s.opener)
    }

    /// The origin named by `session_id`'s `OpenSession`, if the session is open.
    pub fn origin(&self, session_id: u64) -> Option<PeerId> {
        self.sessions.get(&session_id).map(|s| s.origin)
    }

    /// The transport could not deliver a message of `session_id` to the next hop: the session
    /// is closed here (its downstream is gone) and its origin is told with
    /// `NextHopUnreachable`, so it can reroute without waiting for a deadline.
    #[must_use = "the actions must be sent"]
    pub fn next_hop_failed(&mut self, session_id: u64, detail: &str) -> Vec<Action> {
        let Some(origin) = self.origin(session_id) else {
            return Vec::new();
        };
        let mut actions = vec![error_action(
            origin,
            Some(session_id),
            None,
            refuse(ErrorCode::NextHopUnreachable, format!("the next hop is unreachable: {detail}")),
        )];
        // The next hop is the one that failed: do not send it a close.
        actions.extend(
            self.remove(session_id, CloseReason::Error)
                .into_iter()
                .filter(|a| !matches!(a, Action::ToNext { .. })),
        );
        actions
    }

    /// The connection to `peer` was lost: every session whose next hop it is gets
    /// [`Self::next_hop_failed`] (frames sent to it just before may never have arrived).
    #[must_use = "the actions must be sent"]
    pub fn peer_gone(&mut self, peer: PeerId) -> Vec<Action> {
        let mut ids: Vec<u64> =
            self.sessions.iter().filter(|(_, s)| s.next == Some(peer)).map(|(&id, _)| id).collect();
        ids.sort_unstable();
        let mut actions = Vec::new();
        for id in ids {
            actions.extend(self.next_hop_failed(id, "the connection to it was lost"));
        }
        actions
    }

    /// Closes every session because the stage is leaving: each origin gets a `Draining`
    /// error for its session (so it reroutes at once) and the next hops get a close.
    #[must_use = "the actions must be sent"]
    pub fn shutdown_sessions(&mut self) -> Vec<Action> {
        self.draining = true;
        let mut ids: Vec<u64> = self.sessions.keys().copied().collect();
        ids.sort_unstable();
        let mut actions = Vec::new();
        for session_id in ids {
            if let Some(origin) = self.origin(session_id) {
                actions.push(error_action(
                    origin,
                    Some(session_id),
                    None,
                    refuse(ErrorCode::Draining, "the stage is shutting down"),
                ));
            }
            actions.extend(self.remove(session_id, CloseReason::Shutdown));
        }
        actions
    }

    /// Handles one message from peer `from` received at `now`; returns what to send.
    #[must_use = "the actions must be sent"]
    pub fn handle(&mut self, from: PeerId, msg: Message, now: Instant) -> Vec<Action> {
        let mut actions = self.handle_one(from, msg, now);
        self.copy_tapped(&mut actions);
        actions
    }

    fn handle_one(&mut self, from: PeerId, msg: Message, now: Instant) -> Vec<Action> {
        if let Err(e) = msg.validate() {
            let (session_id, step_id) = match &msg {
                Message::OpenSession(m) => (Some(m.session_id), None),
                Message::Step(m) => (Some(m.session_id), Some(m.step_id)),
                _ => (None, None),
            };
            return vec![error_action(from, session_id, step_id, refuse(e.code(), e.to_string()))];
        }
        match msg {
            Message::OpenSession(open) => self.open(from, open, now),
            Message::Step(step) => self.step(from, step, now),
            Message::CloseSession(close) => self.close(from, close),
            Message::Tap(tap) => self.tap(from, tap),
            Message::Ping { nonce } => {
                vec![Action::ToOrigin { to: from, msg: Message::Pong { nonce, info: Some(self.info()) } }]
            }
            // Replies are for origins, not stages: ignore them rather than answer with an
            // error, which could make two stages bounce errors forever.
            other @ (Message::StepResult(_)
            | Message::Error(_)
            | Message::Pong { .. }
            | Message::StageOutput(_)) => {
                tracing::debug!(kind = other.kind_name(), "ignoring a reply sent to a stage");
                Vec::new()
            }
        }
    }

    /// Closes every session idle for longer than the idle timeout at `now`, forwarding a
    /// `CloseSession` (reason `IdleTimeout`) down the chain.
    #[must_use = "the actions must be sent"]
    pub fn sweep_idle(&mut self, now: Instant) -> Vec<Action> {
        let timeout = self.config.idle_timeout;
        let mut idle: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last_active) > timeout)
            .map(|(&id, _)| id)
            .collect();
        idle.sort_unstable();
        let mut actions = Vec::new();
        for session_id in idle {
            tracing::info!(session_id, "closing an idle session");
            actions.extend(self.remove(session_id, CloseReason::IdleTimeout));
        }
        actions
    }

    /// Stops accepting sessions (`Draining`); open sessions keep being served.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Current load.
    pub fn stats(&self) -> StageStats {
        StageStats {
            sessions: self.sessions.len(),
            kv_bytes_used: self.pool.used_bytes(),
            kv_bytes_free: self.pool.free_bytes(),
            draining: self.draining,
        }
    }

    /// What this stage says about itself in a `Pong`: model, span, load and free KV budget.
    pub fn info(&self) -> PeerInfo {
        let span = self.shard.span();
        PeerInfo {
            model_id: self.config.model_id,
            start: span.start as u32,
            end: span.end as u32,
            n_layers: self.shard.spec().n_layers as u32,
            draining: self.draining,
            sessions: u32::try_from(self.sessions.len()).unwrap_or(u32::MAX),
            free_kv_bytes: self.pool.free_bytes() as u64,
        }
    }

    fn open(&mut self, from: PeerId, open: OpenSession, now: Instant) -> Vec<Action> {
        let session_id = open.session_id;
        match self.admit(from, &open, now) {
            Ok(()) => {
                tracing::debug!(session_id, hop = open.hop_index, "session opened");
                let next = self.sessions.get(&session_id).and_then(|s| s.next);
                match next {
                    Some(to) => {
                        let msg = Message::OpenSession(OpenSession { hop_index: open.hop_index + 1, ..open });
                        vec![Action::ToNext { to, msg }]
                    }
                    None => Vec::new(),
                }
            }
            Err(r) => {
                // The origin hears why its route failed, unless the sender is not who may
                // open this hop: then the sender does (never a node it named).
                let prev = (open.hop_index as usize).checked_sub(1).and_then(|p| open.route.get(p));
                let authorized = match prev {
                    None => open.origin == from,
                    Some(prev) => prev.node_id == from,
                };
                let to = if authorized { open.origin } else { from };
                vec![error_action(to, Some(session_id), None, r)]
            }
        }
    }

    /// Runs every check of an `OpenSession` and, when all pass, opens the session.
    fn admit(&mut self, from: PeerId, open: &OpenSession, now: Instant) -> Result<(), Refusal> {
        if self.draining {
            return Err(refuse(ErrorCode::Draining, "this stage is draining and takes no new sessions"));
        }
        if open.model_id != self.config.model_id {
            return Err(refuse(ErrorCode::WrongModel, "this stage does not serve the requested model"));
        }
        let span = self.shard.span();
        let hop = open.hop_index as usize;
        let Some(this_hop) = open.route.get(hop) else {
            return Err(refuse(ErrorCode::Malformed, format!("hop_index {hop} is outside the route")));
        };
        // Who opens is authenticated (`from`, the QUIC peer): an origin opens hop 0 itself,
        // and hop k only from the previous hop of the route.
        match hop.checked_sub(1).and_then(|prev| open.route.get(prev)) {
            None if open.origin != from => {
                return Err(refuse(ErrorCode::Malformed, "hop 0 of a session is opened by its origin only"));
            }
            Some(prev) if prev.node_id != from => {
                return Err(refuse(
                    ErrorCode::Malformed,
                    format!("hop {hop} of a session is opened by the route's hop {} only", hop - 1),
                ));
            }
            _ => {}
        }
        if (this_hop.start as usize, this_hop.end as usize) != (span.start, span.end) {
            return Err(refuse(
                ErrorCode::WrongSpan,
                format!(
                    "route hop {hop} asks for layers {}..{}, this stage serves {}..{}",
                    this_hop.start, this_hop.end, span.start, span.end
                ),
            ));
        }
        let last_hop = hop + 1 == open.route.len();
        if last_hop != self.shard.is_last() {
            return Err(refuse(
                ErrorCode::WrongSpan,
                format!(
                    "the route {} after layer {} but the model has {} layers",
                    if last_hop { "ends" } else { "continues" },
                    span.end,
                    self.shard.spec().n_layers
                ),
            ));
        }
        let max_len = open.max_len as usize;
        let limit = self.config.max_seq_len.min(self.shard.spec().max_position_embeddings);
        if max_len > limit {
            return Err(refuse(
                ErrorCode::TooLarge,
                format!("max_len {max_len} exceeds this stage's limit of {limit} positions"),
            ));
        }
        let sampling = if self.shard.is_last() {
            let params = SamplingParams::from(&open.sampling);
            let sampler = Sampler::new(params).map_err(|e| refuse(ErrorCode::Unsupported, e.to_string()))?;
            let seal = match (&open.seal, &self.identity) {
                (None, _) => None,
                (Some(_), None) => {
                    return Err(refuse(
                        ErrorCode::Unsupported,
                        "this stage has no node identity to open sealed sampler inputs",
                    ));
                }
                (Some(ephemeral), Some((node_id, secret))) => Some(
                    SealKey::receive(ephemeral, secret, node_id)
                        .map_err(|e| refuse(ErrorCode::BadShape, e.to_string()))?,
                ),
            };
            Some(SamplerState {
                seal,
                sampler,
                history: Vec::new(),
                prompt_len: open.prompt_len as usize,
                top_logprobs: usize::from(open.top_logprobs),
            })
        } else {
            None
        };
        if self.sessions.contains_key(&open.session_id) {
            return Err(refuse(ErrorCode::DuplicateSession, "a session with this id is already open"));
        }
        if self.sessions.len() >= self.config.max_sessions {
            return Err(refuse(
                ErrorCode::SessionLimit,
                format!("this stage serves its limit of {} sessions", self.config.max_sessions),
            ));
        }
        // The quota is charged to the origin the session serves (authenticated on hop 0):
        // a stage forwarding many origins' sessions is not one greedy peer; but what one
        // upstream peer forwards for origins other than itself is bounded by its own quota,
        // so it cannot take the stage by naming made-up origins.
        let held = self.per_peer.get(&open.origin).copied().unwrap_or(0);
        if held >= self.config.per_peer_sessions {
            return Err(refuse(
                ErrorCode::QuotaExceeded,
                format!("this peer holds its quota of {} sessions", self.config.per_peer_sessions),
            ));
        }
        let forwarded = self.per_forwarder.get(&from).copied().unwrap_or(0);
        if open.origin != from && forwarded >= self.config.per_forwarder_sessions {
            return Err(refuse(
                ErrorCode::QuotaExceeded,
                format!(
                    "the previous hop holds its quota of {} forwarded sessions",
                    self.config.per_forwarder_sessions
                ),
            ));
        }
        if self.pool.free_blocks() == 0 {
            return Err(refuse(
                ErrorCode::CapacityExceeded,
                format!(
                    "the KV budget of {} bytes is full (blocks of {} bytes)",
                    self.config.kv_budget_bytes,
                    self.pool.block_bytes()
                ),
            ));
        }
        let cache = self.shard.new_cache_in(&self.pool, max_len).map_err(engine_refusal)?;
        let next = open.route.get(hop + 1).map(|h| h.node_id);
        *self.per_peer.entry(open.origin).or_insert(0) += 1;
        if open.origin != from {
            *self.per_forwarder.entry(from).or_insert(0) += 1;
        }
        let session = Session {
            opener: from,
            origin: open.origin,
            next,
            wire_dtype: open.wire_dtype,
            max_len,
            cache,
            last_step: None,
            rewind_floor: None,
            last_forwarded: None,
            last_active: now,
            sampling,
            tap: None,
        };
        self.sessions.insert(open.session_id, session);
        Ok(())
    }

    fn step(&mut self, from: PeerId, step: Step, now: Instant) -> Vec<Action> {
        let (session_id, step_id) = (step.session_id, step.step_id);
        // Errors about a session go to its origin; about anything else, back to the sender.
        let reply_to = match self.sessions.get(&session_id) {
            Some(s) if s.opener == from => s.origin,
            _ => from,
        };
        match self.run_step(from, step, now) {
            Ok(action) => vec![action],
            Err(r) => vec![error_action(reply_to, Some(session_id), Some(step_id), r)],
        }
    }

    fn run_step(&mut self, from: PeerId, step: Step, now: Instant) -> Result<Action, Refusal> {
        let mut step = step;
        let (input, pos) = self.prepare_step(from, &mut step, now)?;
        let shard = &self.shard;
        let Some(session) = self.sessions.get_mut(&step.session_id) else {
            return Err(refuse(ErrorCode::UnknownSession, "no such session on this stage"));
        };
        let out = forward_one(shard, session, input, &step)?;
        finish_step(session, out, step, pos)
    }

    /// Checks a step against its session (see the module docs) and decodes its input;
    /// returns the input and the session's position before the step.
    fn prepare_step(
        &mut self,
        from: PeerId,
        step: &mut Step,
        now: Instant,
    ) -> Result<(StageInput, usize), Refusal> {
        let shard = &self.shard;
        let spec = shard.spec();
        let session = match self.sessions.get_mut(&step.session_id) {
            Some(s) if s.opener == from => s,
            _ => return Err(refuse(ErrorCode::UnknownSession, "no such session on this stage")),
        };
        if let Some(last) = session.last_step
            && step.step_id <= last
        {
            return Err(refuse(
                ErrorCode::OutOfOrder,
                format!("step id {} does not follow step id {last}", step.step_id),
            ));
        }
        unseal(session, step)?;
        let held = session.cache.len();
        let pos = step.start_pos as usize;
        // After a speculative step the cache may hold rejected draft positions: a step that
        // starts inside them drops them first (see the protocol's "Speculative decoding").
        let rewind = session.rewind_floor.is_some_and(|floor| floor <= pos && pos < held);
        if pos != held && !rewind {
            return Err(refuse(
                ErrorCode::BadPosition,
                format!("step starts at position {pos}, the session's cache holds {held}"),
            ));
        }
        let t = step.payload.len();
        if pos + t > session.max_len {
            return Err(refuse(
                ErrorCode::BadPosition,
                format!("positions {pos}..{} exceed the session's max_len {}", pos + t, session.max_len),
            ));
        }
        let input = match (&step.payload, shard.is_first()) {
            (Payload::Tokens(ids), true) => {
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= spec.vocab_size) {
                    return Err(refuse(
                        ErrorCode::BadShape,
                        format!("token id {bad} is outside the vocabulary of {}", spec.vocab_size),
                    ));
                }
                StageInput::Tokens(ids.clone())
            }
            (Payload::Hidden(h), false) => {
                if h.hidden as usize != spec.hidden_size {
                    return Err(refuse(
                        ErrorCode::BadShape,
                        format!("hidden width {} does not match the model's {}", h.hidden, spec.hidden_size),
                    ));
                }
                if h.dtype != session.wire_dtype {
                    return Err(refuse(
                        ErrorCode::BadShape,
                        format!("hidden dtype {:?}, the session uses {:?}", h.dtype, session.wire_dtype),
                    ));
                }
                let x = activation::decode(&h.bytes, h.dtype, t, spec.hidden_size, shard.device())
                    .map_err(|e| refuse(ErrorCode::NonFinite, e.to_string()))?;
                StageInput::Hidden(x)
            }
            (Payload::Tokens(_), false) => {
                return Err(refuse(ErrorCode::BadShape, "this stage takes hidden states, not token ids"));
            }
            (Payload::Hidden(_), true) => {
                return Err(refuse(
                    ErrorCode::BadShape,
                    "the first stage takes token ids, not hidden states",
                ));
            }
        };
        if let Some(s) = &session.sampling
            && s.history.len() + step.history_tail.len() > session.max_len
        {
            return Err(refuse(
                ErrorCode::TooLarge,
                format!("the history would exceed the session's max_len {}", session.max_len),
            ));
        }
        if rewind {
            // The origin says these positions are stale: they go whatever the step's fate.
            session.cache.truncate(pos);
            session.rewind_floor = None;
        }
        // The blocks the step needs, now: in a batch, only the session that does not fit is
        // refused.
        session.cache.reserve(t).map_err(engine_refusal)?;
        // Only a step that passed every check keeps the session alive.
        session.last_active = now;
        Ok((input, pos))
    }

    /// Handles several messages received together, in order, with the same actions in the
    /// same order as calling [`StageService::handle`] on each, except that decode and
    /// speculative steps ([`batchable`]) of distinct sessions are computed in one batched forward (`Shard::forward_batch`: each session's result
    /// has the bits it would have alone). Any other message first completes the batch so far,
    /// so every session sees its messages in order.
    #[must_use = "the actions must be sent"]
    pub fn handle_many(&mut self, msgs: Vec<(PeerId, Message)>, now: Instant) -> Vec<Action> {
        let mut actions = self.handle_many_untapped(msgs, now);
        self.copy_tapped(&mut actions);
        actions
    }

    /// After each hidden-state step forwarded for a tapped step, a copy to the origin (a
    /// [`StageOutput`]): exactly the bytes the next hop gets.
    fn copy_tapped(&self, actions: &mut Vec<Action>) {
        let tapped = |a: &Action| match a {
            Action::ToNext { msg: Message::Step(s), .. } => {
                self.sessions.get(&s.session_id).is_some_and(|x| x.tap == Some(s.step_id))
            }
            _ => false,
        };
        if !actions.iter().any(tapped) {
            return;
        }
        let mut out = Vec::with_capacity(actions.len() + 1);
        for a in actions.drain(..) {
            let copy = match &a {
                Action::ToNext { msg: Message::Step(s), .. } if tapped(&a) => {
                    match (&s.payload, self.origin(s.session_id)) {
                        (Payload::Hidden(h), Some(to)) => Some(Action::ToOrigin {
                            to,
                            msg: Message::StageOutput(Copied {
                                session_id: s.session_id,
                                step_id: s.step_id,
                                hidden: h.clone(),
                            }),
                        }),
                        _ => None,
                    }
                }
                _ => None,
            };
            out.push(a);
            out.extend(copy);
        }
        *actions = out;
    }

    fn handle_many_untapped(&mut self, msgs: Vec<(PeerId, Message)>, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut batch: Vec<Pending> = Vec::new();
        for (from, msg) in msgs {
            let step = match msg {
                Message::Step(step)
                    if batchable(&step)
                        && msg_is_valid(&step)
                        && !batch.iter().any(|p| p.step.session_id == step.session_id) =>
                {
                    step
                }
                other => {
                    self.run_batch(std::mem::take(&mut batch), &mut actions);
                    actions.extend(self.handle(from, other, now));
                    continue;
                }
            };
            let reply_to = match self.sessions.get(&step.session_id) {
                Some(s) if s.opener == from => s.origin,
                _ => from,
            };
            let mut step = step;
            match self.prepare_step(from, &mut step, now) {
                Ok((input, pos)) => batch.push(Pending { step, input, pos, reply_to }),
                Err(r) => {
                    // Keep the order of the replies: what came before the refused step first.
                    self.run_batch(std::mem::take(&mut batch), &mut actions);
                    actions.push(error_action(reply_to, Some(step.session_id), Some(step.step_id), r));
                }
            }
        }
        self.run_batch(batch, &mut actions);
        actions
    }

    /// Computes prepared decode and speculative steps (alone when there is one) and finishes
    /// each.
    fn run_batch(&mut self, batch: Vec<Pending>, actions: &mut Vec<Action>) {
        if batch.len() <= 1 {
            for p in batch {
                let (session_id, step_id) = (p.step.session_id, p.step.step_id);
                let result = match self.sessions.get_mut(&session_id) {
                    Some(session) => forward_one(&self.shard, session, p.input, &p.step)
                        .and_then(|out| finish_step(session, out, p.step, p.pos)),
                    None => Err(refuse(ErrorCode::UnknownSession, "no such session on this stage")),
                };
                actions.push(
                    result.unwrap_or_else(|r| error_action(p.reply_to, Some(session_id), Some(step_id), r)),
                );
            }
            return;
        }
        // Take the sessions out of the map for disjoint mutable access to their caches.
        let mut sessions: Vec<Session> = Vec::with_capacity(batch.len());
        let mut steps = Vec::with_capacity(batch.len());
        let mut inputs = Vec::with_capacity(batch.len());
        for p in batch {
            let Some(session) = self.sessions.remove(&p.step.session_id) else {
                let (session_id, step_id) = (p.step.session_id, p.step.step_id);
                let r = refuse(ErrorCode::UnknownSession, "no such session on this stage");
                actions.push(error_action(p.reply_to, Some(session_id), Some(step_id), r));
                continue;
            };
            sessions.push(session);
            inputs.push(p.input);
            steps.push((p.step, p.pos, p.reply_to));
        }
        let outs = {
            let mut caches: Vec<&mut shoal_model_shards::KvCache> =
                sessions.iter_mut().map(|s| &mut s.cache).collect();
            self.shard.forward_batch(&mut caches, inputs)
        };
        match outs {
            Ok(outs) => {
                // Sampling (last stage) or encoding of each session, spread over the cores.
                let work: Vec<_> = sessions.into_iter().zip(outs).zip(steps).collect();
                let done = shoal_model_shards::threads::parallel_map(
                    work,
                    |((mut session, out), (step, pos, reply_to))| {
                        let (session_id, step_id) = (step.session_id, step.step_id);
                        let result = finish_step(&mut session, out, step, pos);
                        let action = result
                            .unwrap_or_else(|r| error_action(reply_to, Some(session_id), Some(step_id), r));
                        (session_id, session, action)
                    },
                );
                for (session_id, session, action) in done {
                    actions.push(action);
                    self.sessions.insert(session_id, session);
                }
            }
            Err(e) => {
                let r = engine_refusal(e);
                for (session, (step, _, reply_to)) in sessions.into_iter().zip(steps) {
                    let (session_id, step_id) = (step.session_id, step.step_id);
                    actions.push(error_action(
                        reply_to,
                        Some(session_id),
                        Some(step_id),
                        refuse(r.code, r.message.clone()),
                    ));
                    self.sessions.insert(session_id, session);
                }
            }
        }
    }

    /// A `Tap` from the session's opener: the copy of the step this stage just forwarded
    /// when the tap names it (a tap sent after its step), otherwise remember the step for
    /// later (a tap sent before it); either way pass the tap on.
    fn tap(&mut self, from: PeerId, tap: Tap) -> Vec<Action> {
        match self.sessions.get_mut(&tap.session_id) {
            Some(s) if s.opener == from => {
                let mut actions = Vec::new();
                match &s.last_forwarded {
                    Some((step_id, hidden)) if *step_id == tap.step_id => {
                        actions.push(Action::ToOrigin {
                            to: s.origin,
                            msg: Message::StageOutput(Copied {
                                session_id: tap.session_id,
                                step_id: tap.step_id,
                                hidden: hidden.clone(),
                            }),
                        });
                        s.tap = None;
                    }
                    _ => s.tap = Some(tap.step_id),
                }
                actions.extend(s.next.map(|to| Action::ToNext { to, msg: Message::Tap(tap) }));
                actions
            }
            Some(_) => {
                tracing::info!(
                    session_id = tap.session_id,
                    "ignoring a tap from a peer that did not open the session"
                );
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    fn close(&mut self, from: PeerId, close: CloseSession) -> Vec<Action> {
        let session_id = close.session_id;
        match self.sessions.get(&session_id) {
            Some(s) if s.opener == from => {
                tracing::debug!(session_id, reason = ?close.reason, "closing a session");
                self.remove(session_id, close.reason)
            }
            Some(_) => {
                tracing::info!(session_id, "ignoring a close from a peer that did not open the session");
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    /// Frees a session and returns the close to forward and the `Closed` notice.
    fn remove(&mut self, session_id: u64, reason: CloseReason) -> Vec<Action> {
        let Some(session) = self.sessions.remove(&session_id) else {
            return Vec::new();
        };
        release(&mut self.per_peer, session.origin);
        if session.opener != session.origin {
            release(&mut self.per_forwarder, session.opener);
        }
        let mut actions = Vec::with_capacity(2);
        if let Some(to) = session.next {
            actions
                .push(Action::ToNext { to, msg: Message::CloseSession(CloseSession { session_id, reason }) });
        }
        actions.push(Action::Closed { session_id });
        actions
    }
}

/// On the last stage of a sealed session, replaces the step's placeholders with the sampler
/// inputs sealed in it; elsewhere, checks only that the step is sealed iff the session is.
fn unseal(session: &Session, step: &mut Step) -> Result<(), Refusal> {
    let key = session.sampling.as_ref().and_then(|s| s.seal.as_ref());
    match (key, step.sealed.take()) {
        (None, None) => Ok(()),
        (Some(key), Some(sealed)) => {
            let inputs = key
                .open(step.session_id, step.step_id, &sealed)
                .map_err(|e| refuse(ErrorCode::BadShape, e.to_string()))?;
            if inputs.draft.len() != step.draft.len() {
                return Err(refuse(
                    ErrorCode::BadShape,
                    format!(
                        "the sealed draft has {} ids, the step {} positions",
                        inputs.draft.len(),
                        step.draft.len()
                    ),
                ));
            }
            // A refused step is dropped whole, so filling it in place is safe.
            step.history_tail = inputs.history_tail;
            step.draft = inputs.draft;
            step.mask = inputs.mask;
            crate::protocol::validate_step(step).map_err(|e| refuse(e.code(), e.to_string()))
        }
        (None, Some(sealed)) if session.sampling.is_none() => {
            // A forwarding stage passes the box on.
            step.sealed = Some(sealed);
            Ok(())
        }
        (None, Some(_)) => {
            Err(refuse(ErrorCode::BadShape, "a sealed step in a session opened without a seal"))
        }
        (Some(_), None) => Err(refuse(
            ErrorCode::BadShape,
            "the session is sealed but the step carries its ids in the clear",
        )),
    }
}

/// Gives back one session of `peer`'s quota.
fn release(quota: &mut HashMap<PeerId, usize>, peer: PeerId) {
    if let Some(n) = quota.get_mut(&peer) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            quota.remove(&peer);
        }
    }
}

/// The `Error` action answering a refused message, with a tracing event.
fn error_action(to: PeerId, session_id: Option<u64>, step_id: Option<u64>, r: Refusal) -> Action {
    if r.code == ErrorCode::Internal {
        tracing::warn!(?session_id, ?step_id, code = %r.code, message = %r.message, "stage failure");
    } else {
        tracing::info!(?session_id, ?step_id, code = %r.code, message = %r.message, "refused a message");
    }
    Action::ToOrigin { to, msg: Message::Error(StageError::new(r.code, session_id, step_id, &r.message)) }
}

/// Maps an engine error of a forward step to the code the origin sees.
fn engine_refusal(e: EngineError) -> Refusal {
    let code = match &e {
        EngineError::SequenceTooLong { .. } => ErrorCode::BadPosition,
        EngineError::KvCacheFull { .. } => ErrorCode::CapacityExceeded,
        EngineError::InvalidInput(_) => ErrorCode::BadShape,
        _ => ErrorCode::Internal,
    };
    refuse(code, e.to_string())
}

/// The step to send down the chain: the same step with this stage's output as its payload.
/// A checked one-position step waiting for its batch.
struct Pending {
    step: Step,
    input: StageInput,
    pos: usize,
    reply_to: PeerId,
}

/// A message and its sender.
pub type Received = (PeerId, Message);

/// Orders messages received together for one round of a stage, as vLLM's scheduler does:
/// decode and speculative steps first ([`batchable`]; the first message of their session in the
/// list, so each session still sees its messages in order), then everything else in order,
/// until the multi-token steps (prefill chunks) taken reach `prefill_budget` tokens. At least one chunk runs per round; the
/// messages from the first chunk over the budget on are returned to run next round, ahead of
/// what arrives meanwhile. A long prompt then delays the other sessions' decode steps by one
/// chunk, not by the whole prompt.
pub fn schedule(msgs: Vec<Received>, prefill_budget: usize) -> (Vec<Received>, Vec<Received>) {
    let mut seen = std::collections::HashSet::new();
    let (mut run, mut rest) = (Vec::with_capacity(msgs.len()), Vec::new());
    for (from, msg) in msgs {
        let session = match &msg {
            Message::Step(s) => Some(s.session_id),
            Message::OpenSession(o) => Some(o.session_id),
            Message::CloseSession(c) => Some(c.session_id),
            Message::Tap(t) => Some(t.session_id),
            _ => None,
        };
        let first = session.is_none_or(|id| seen.insert(id));
        match &msg {
            Message::Step(s) if batchable(s) && first => run.push((from, msg)),
            _ => rest.push((from, msg)),
        }
    }
    let mut tokens = 0usize;
    let mut later = Vec::new();
    for (from, msg) in rest {
        if !later.is_empty() {
            later.push((from, msg));
            continue;
        }
        let t = match &msg {
            Message::Step(s) if s.payload.len() > 1 => s.payload.len(),
            _ => 0,
        };
        if t > 0 && tokens > 0 && tokens + t > prefill_budget {
            later.push((from, msg));
        } else {
            tokens += t;
            run.push((from, msg));
        }
    }
    (run, later)
}

/// Whether a step joins a batched forward: a decode step (one position) or a speculative
/// step (its draft plus one position, computed row by row as a batch computes every row).
/// Prefill chunks run on their own, through the faster whole-chunk products.
pub fn batchable(step: &Step) -> bool {
    step.payload.len() == 1 || !step.draft.is_empty()
}

/// Whether a step passes the message's own checks (as [`StageService::handle`] runs them).
fn msg_is_valid(step: &Step) -> bool {
    Message::Step(step.clone()).validate().is_ok()
}

/// Turns a step's output into its action: hidden states to the next hop, or a sampled token
/// to the origin. On failure the positions the step wrote are forgotten, so the session is as
/// it was.
fn finish_step(session: &mut Session, out: StageOutput, step: Step, pos: usize) -> Result<Action, Refusal> {
    let step_id = step.step_id;
    let speculative = !step.draft.is_empty();
    let result = match (out, session.next) {
        (StageOutput::Hidden(h), Some(to)) => {
            forward_hidden(&h, session.wire_dtype, step).map(|msg| Action::ToNext { to, msg })
        }
        (StageOutput::Logits(logits), None) => {
            let to = session.origin;
            sample(session, &logits, &step).map(|r| Action::ToOrigin { to, msg: Message::StepResult(r) })
        }
        _ => Err(refuse(ErrorCode::Internal, "the shard's output does not fit its place in the route")),
    };
    if let Ok(action) = &result {
        session.last_step = Some(step_id);
        session.rewind_floor = speculative.then_some(pos + 1);
        // What the step forwarded, for a tap that names it afterwards: a decode or speculative
        // step's rows, the last row of a prefill chunk (the row that samples; the origin
        // compares last rows only).
        session.last_forwarded = match action {
            Action::ToNext { msg: Message::Step(s), .. } => match &s.payload {
                Payload::Hidden(h) if batchable(s) => Some((step_id, h.clone())),
                Payload::Hidden(h) => Some((step_id, last_row(h))),
                Payload::Tokens(_) => None,
            },
            _ => None,
        };
    } else {
        session.cache.truncate(pos);
    }
    result
}

/// The last row of `h`.
fn last_row(h: &HiddenStates) -> HiddenStates {
    let row = h.bytes.len() / (h.t.max(1) as usize);
    HiddenStates {
        t: h.t.min(1),
        hidden: h.hidden,
        dtype: h.dtype,
        bytes: h.bytes[h.bytes.len() - row..].to_vec(),
    }
}

/// The forward pass of one session's step: a speculative step (one with a draft) computes
/// each row with the bits of a one-position step, and the last stage keeps the logits of
/// every row for the verification.
fn forward_one(
    shard: &Shard,
    session: &mut Session,
    input: StageInput,
    step: &Step,
) -> Result<StageOutput, Refusal> {
    let out = if step.draft.is_empty() {
        shard.forward(&mut session.cache, input, LogitsMode::Last)
    } else {
        shard.forward_rows(&mut session.cache, input, LogitsMode::All)
    };
    out.map_err(engine_refusal)
}

fn forward_hidden(h: &Tensor, dtype: WireDType, step: Step) -> Result<Message, Refusal> {
    let internal = |e: EngineError| refuse(ErrorCode::Internal, e.to_string());
    let (t, hidden) = h.dims2().map_err(|e| internal(e.into()))?;
    let bytes = activation::encode(h, dtype).map_err(internal)?;
    let (Ok(t), Ok(hidden)) = (u32::try_from(t), u32::try_from(hidden)) else {
        return Err(refuse(ErrorCode::Internal, "hidden states too large for the wire"));
    };
    Ok(Message::Step(Step { payload: Payload::Hidden(HiddenStates { t, hidden, dtype, bytes }), ..step }))
}

/// Appends the step's history tail and samples the next token (on a speculative step, the
/// choices at each position up to the first that differs from the draft); on failure the
/// history is left as it was.
fn sample(session: &mut Session, logits: &Tensor, step: &Step) -> Result<StepResult, Refusal> {
    let Some(state) = session.sampling.as_mut() else {
        return Err(refuse(ErrorCode::Internal, "the last stage has no sampler for this session"));
    };
    fn internal(e: impl std::fmt::Display) -> Refusal {
        refuse(ErrorCode::Internal, e.to_string())
    }
    let (rows, vocab) = logits.dims2().map_err(internal)?;
    let values = logits.flatten_all().and_then(|l| l.to_dtype(DType::F32)).and_then(|l| l.to_vec1::<f32>());
    let values = values.map_err(internal)?;
    let rows: Vec<&[f32]> = values.chunks_exact(vocab.max(1)).take(rows).collect();
    if rows.len() != step.draft.len() + 1 {
        return Err(refuse(ErrorCode::Internal, "the logits do not cover the step's positions"));
    }
    let base = state.history.len();
    state.history.extend_from_slice(&step.history_tail);
    // During a chunked prefill the history is still shorter than the prompt.
    let prompt_len = state.prompt_len.min(state.history.len());
    let (sampler, history, top) = (&state.sampler, &state.history, state.top_logprobs);
    let chosen = if let Some(mask) = &step.mask {
        let mut row = rows[0].to_vec();
        if let Err(e) = mask.apply(&mut row) {
            state.history.truncate(base);
            return Err(refuse(ErrorCode::BadShape, e.to_string()));
        }
        sampler.sample(&row, history, prompt_len, step.sample_step, top).map(|s| vec![s])
    } else if step.draft.is_empty() {
        sampler.sample(rows[0], history, prompt_len, step.sample_step, top).map(|s| vec![s])
    } else {
        sampler.verify(&rows, history, prompt_len, step.sample_step, &step.draft, top)
    };
    match chosen {
        Ok(mut chosen) => {
            let Some(last) = chosen.pop() else {
                return Err(refuse(ErrorCode::Internal, "the sampler chose nothing"));
            };
            let accepted = chosen
                .into_iter()
                .map(|s| Chosen { token: s.token, logprob: s.logprob, top_logprobs: s.top_logprobs })
                .collect();
            Ok(StepResult {
                session_id: step.session_id,
                step_id: step.step_id,
                token: last.token,
                logprob: last.logprob,
                top_logprobs: last.top_logprobs,
                accepted,
            })
        }
        Err(e) => {
            state.history.truncate(base);
            let code = match e {
                SamplerError::TokenOutOfVocab { .. } | SamplerError::DraftMismatch { .. } => {
                    ErrorCode::BadShape
                }
                _ => ErrorCode::Internal,
            };
            Err(refuse(code, e.to_string()))
        }
    }
}
