//! The driver's side of spot-checks (the decisions are [`crate::verify`]'s): choosing the
//! routes that give a second and third opinion, running the same history through them, and
//! the origin's own computation when it holds the weights.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use shoal_model_shards::activation::{self, WireDType};
use shoal_model_shards::sampler::{Sampler, SamplingParams};
use shoal_model_shards::token_mask::TokenMask;
use shoal_model_shards::{DType, Device, LogitsMode, Model, Shard, StageInput, StageOutput};
use shoal_worker::net::{Inbound, Node, SessionChannel, short};
use shoal_worker::protocol::{
    CloseReason, CloseSession, HiddenStates, Message, OpenSession, Payload, RouteHop, Sampling,
    StageOutput as Tapped, Step, StepResult, Tap,
};
use shoal_worker::service::PeerId;

use super::roster::Roster;
use super::{Driver, Request, Sealer, lock};
use crate::verify::{Computer, Observation, Verdict};

/// The origin's own copy of the model, to check stages when no other replica exists and to
/// break ties between two (see [`Driver::set_local_weights`]).
pub struct LocalWeights {
    model: Arc<Model>,
    shards: std::sync::Mutex<HashMap<(u32, u32), Arc<Shard>>>,
}

impl LocalWeights {
    /// Checks with the weights of `model`, which must be whole (not a span fetched from the
    /// swarm); spans are loaded when first needed.
    pub fn new(model: impl Into<Arc<Model>>) -> Self {
        Self { model: model.into(), shards: std::sync::Mutex::new(HashMap::new()) }
    }

    fn shard(&self, span: Range<u32>) -> Result<Arc<Shard>, String> {
        let key = (span.start, span.end);
        if let Some(s) = lock(&self.shards).get(&key) {
            return Ok(s.clone());
        }
        let shard =
            Shard::load(&self.model, span.start as usize..span.end as usize, &Device::Cpu, DType::F32)
                .map_err(|e| e.to_string())?;
        let shard = Arc::new(shard);
        lock(&self.shards).insert(key, shard.clone());
        Ok(shard)
    }

    /// Runs `replay` (the steps a route gets, the checked one last) through spans `route`,
    /// rounding hidden states between spans to `wire` as the stages do. With `kept` caches of
    /// those spans holding a prefix of the history (an earlier check of the generation), only
    /// the rest is computed; the caches are returned for the next check.
    fn observe(
        &self,
        route: &[RouteHop],
        replay: &Replay,
        wire: WireDType,
        kept: Option<LocalShadow>,
    ) -> Result<(Observation, LocalShadow), String> {
        let spans: Vec<(u32, u32)> = route.iter().map(|h| (h.start, h.end)).collect();
        let mut kept = kept
            .filter(|k| k.spans == spans && k.pos < replay.history.len())
            .unwrap_or(LocalShadow { spans, caches: Vec::new(), pos: 0 });
        let mut input: Vec<StageInput> =
            replay.steps_from(kept.pos).into_iter().map(StageInput::Tokens).collect();
        kept.pos = replay.history.len();
        let fresh = kept.caches.is_empty();
        let mut outputs = Vec::new();
        for (i, hop) in route.iter().enumerate() {
            let shard = self.shard(hop.start..hop.end)?;
            if fresh {
                kept.caches.push(shard.new_cache(replay.max_len));
            }
            let cache = &mut kept.caches[i];
            let mut next = Vec::with_capacity(input.len());
            let last_hop = i + 1 == route.len();
            for step in input {
                match shard.forward(cache, step, LogitsMode::Last).map_err(|e| e.to_string())? {
                    StageOutput::Hidden(h) => next.push(StageInput::Hidden(on_the_wire(&h, wire)?)),
                    StageOutput::Logits(l) if last_hop => next.push(StageInput::Hidden(l)),
                    StageOutput::Logits(_) => return Err("logits before the last hop".into()),
                }
            }
            let Some(StageInput::Hidden(last)) = next.last() else {
                return Err("no output".into());
            };
            let row = last_row(last)?;
            if last_hop {
                let mut row = row;
                if let Some(mask) = &replay.mask {
                    mask.apply(&mut row).map_err(|e| e.to_string())?;
                }
                let sampler = Sampler::new(replay.params.clone()).map_err(|e| e.to_string())?;
                let s = sampler
                    .sample(&row, &replay.history, replay.prompt_len, replay.sample_step, 0)
                    .map_err(|e| e.to_string())?;
                let observation = Observation {
                    hops: vec![Computer::Origin; route.len()],
                    outputs,
                    token: s.token,
                    logprob: s.logprob,
                };
                return Ok((observation, kept));
            }
            outputs.push(row);
            input = next;
        }
        Err("an empty route".into())
    }
}

/// The origin's own caches of a generation's checks (see [`LocalWeights::observe`]).
pub(super) struct LocalShadow {
    spans: Vec<(u32, u32)>,
    caches: Vec<shoal_model_shards::KvCache>,
    /// History ids the caches hold.
    pos: usize,
}

/// Hidden states as the next stage receives them: rounded to the wire's dtype.
fn on_the_wire(
    h: &shoal_model_shards::Tensor,
    wire: WireDType,
) -> Result<shoal_model_shards::Tensor, String> {
    let (t, width) = h.dims2().map_err(|e| e.to_string())?;
    let bytes = activation::encode(h, wire).map_err(|e| e.to_string())?;
    activation::decode(&bytes, wire, t, width, &Device::Cpu).map_err(|e| e.to_string())
}

/// The last row of a `(t, width)` tensor as f32.
fn last_row(t: &shoal_model_shards::Tensor) -> Result<Vec<f32>, String> {
    let rows = t.dim(0).map_err(|e| e.to_string())?;
    t.get(rows.saturating_sub(1))
        .and_then(|r| r.to_dtype(DType::F32))
        .and_then(|r| r.flatten_all())
        .and_then(|r| r.to_vec1::<f32>())
        .map_err(|e| e.to_string())
}

/// The last row of tapped hidden states as f32.
pub(super) fn tapped_row(h: &HiddenStates) -> Option<Vec<f32>> {
    let t = activation::decode(&h.bytes, h.dtype, h.t as usize, h.hidden as usize, &Device::Cpu).ok()?;
    last_row(&t).ok()
}

/// What a route is sent to reproduce one checked step: the history before it as prefill
/// chunks (cheaper than the one-token steps of the first run; the kernels give each row the
/// bits it has alone, measured bit-identical in `tests/check_tolerance.rs`), then the checked
/// step's one token. A [`Shadow`] that holds a prefix of the history already gets only the
/// rest ([`Replay::steps_from`]).
pub(super) struct Replay {
    /// Most ids per prefill chunk.
    pub(super) chunk: usize,
    /// The history the last stage holds at the checked step (prompt, then the generated ids
    /// up to the checked step's input, which is the last id).
    pub(super) history: Vec<u32>,
    pub(super) prompt_len: usize,
    /// The sample step of the checked (last) step.
    pub(super) sample_step: u64,
    pub(super) max_len: usize,
    pub(super) params: SamplingParams,
    /// The checked step's token mask.
    pub(super) mask: Option<TokenMask>,
}

impl Replay {
    /// The replay of the step that feeds the last of `tokens` (the ids generated so far)
    /// after `request.prompt`; with no tokens yet, of the prompt's last chunk (whose last row
    /// samples the first token: the replay computes it as a row alone, which has the same
    /// bits).
    pub(super) fn new(request: &Request, tokens: &[u32], chunk: usize, mask: Option<TokenMask>) -> Self {
        let history: Vec<u32> = request.prompt.iter().chain(tokens).copied().collect();
        Self {
            chunk: chunk.max(1),
            history,
            prompt_len: request.prompt.len(),
            sample_step: tokens.len() as u64,
            max_len: request.prompt.len() + request.max_tokens,
            params: request.params.clone(),
            mask,
        }
    }

    /// The steps that take a route whose caches hold the first `pos` ids of the history to
    /// the checked step: the ids from `pos` up to the last as prefill chunks, then the last
    /// id alone (the checked step). `pos` must be below the history's length.
    pub(super) fn steps_from(&self, pos: usize) -> Vec<Vec<u32>> {
        let (before, last) = self.history.split_at(self.history.len().saturating_sub(1));
        let mut steps: Vec<Vec<u32>> =
            before.get(pos..).unwrap_or_default().chunks(self.chunk).map(<[u32]>::to_vec).collect();
        steps.push(last.to_vec());
        steps
    }
}

/// A check's session kept open on another route for the rest of a generation: the next check
/// through the same route sends only the ids generated since (a check's cost no longer grows
/// with the position). Closed when dropped: at the end of the generation, or when the
/// generation keeps [`MAX_SHADOWS`] newer ones.
pub(super) struct Shadow {
    node: Node,
    route: Vec<RouteHop>,
    session_id: u64,
    channel: SessionChannel,
    sealer: Sealer,
    /// History ids the route's caches hold.
    pos: usize,
    /// The last step id sent.
    step_id: u64,
}

impl Drop for Shadow {
    fn drop(&mut self) {
        let close = CloseSession { session_id: self.session_id, reason: CloseReason::Completed };
        if let Err(e) = self.node.send(self.route[0].node_id, &Message::CloseSession(close)) {
            tracing::debug!("close of a check's session: {e}");
        }
    }
}

/// The check sessions a generation keeps open (see [`Shadow`]), one per route that checked
/// it, the most recently used last.
#[derive(Default)]
pub(super) struct Shadows {
    remote: Vec<Shadow>,
    /// The origin's own caches, when it checks with its weights.
    local: Option<LocalShadow>,
}

/// Most check sessions a generation keeps open. Second opinions go to a random replica of
/// each span (a worker cannot tell when it will be asked), so with more than two replicas
/// the checking route changes from one check to the next.
const MAX_SHADOWS: usize = 3;

/// What a check found, for the generation that ran it.
pub(super) enum CheckResult {
    /// The step's result stands.
    Passed,
    /// These peers of the checked route lied (or could not be cleared): fail over.
    Failed { culprits: Vec<PeerId>, reason: String },
}

impl Driver {
    /// Opens a check's session on `route` (nothing sent through it yet).
    fn open_shadow(&self, route: &[RouteHop], replay: &Replay) -> Result<Shadow, String> {
        let ids: Vec<PeerId> = route.iter().map(|h| h.node_id).collect();
        let session_id: u64 = rand::random();
        let channel = self.node.open_session_channel(session_id);
        let mut address_book = vec![self.node.node_addrs()];
        address_book.extend(ids.iter().map(|id| self.node.known_addrs(id)));
        let (seal, sealer) = Sealer::new(self.config.seal_sampler_inputs, &ids[ids.len() - 1])?;
        let open = OpenSession {
            session_id,
            model_id: self.model.model_id,
            origin: self.node.id(),
            route: route.to_vec(),
            hop_index: 0,
            wire_dtype: self.config.wire_dtype,
            max_len: u32::try_from(replay.max_len).unwrap_or(u32::MAX),
            sampling: Sampling::from(&replay.params),
            top_logprobs: 0,
            prompt_len: u32::try_from(replay.prompt_len).unwrap_or(u32::MAX),
            address_book,
            seal,
        };
        self.node
            .send_for_session(ids[0], session_id, &Message::OpenSession(open))
            .map_err(|e| e.to_string())?;
        Ok(Shadow {
            node: self.node.clone(),
            route: route.to_vec(),
            session_id,
            channel,
            sealer,
            pos: 0,
            step_id: 0,
        })
    }

    /// Runs `replay` through `shadow`'s route from where its caches stand, tapping the
    /// checked step (the tap follows it, as in a generation).
    async fn observe_through(&self, shadow: &mut Shadow, replay: &Replay) -> Result<Observation, String> {
        let ids: Vec<PeerId> = shadow.route.iter().map(|h| h.node_id).collect();
        let (first, session_id) = (ids[0], shadow.session_id);
        let send =
            |msg: &Message| self.node.send_for_session(first, session_id, msg).map_err(|e| e.to_string());
        let steps = replay.steps_from(shadow.pos);
        let n = steps.len();
        let mut fed = 0u32;
        for (i, ids) in steps.into_iter().enumerate() {
            shadow.step_id += 1;
            let last = i + 1 == n;
            let len = ids.len();
            send(&Message::Step(shadow.sealer.step(Step {
                session_id,
                step_id: shadow.step_id,
                start_pos: u32::try_from(shadow.pos).unwrap_or(u32::MAX),
                // The chunks' samples are not used.
                sample_step: if last { replay.sample_step } else { 0 },
                history_tail: ids.clone(),
                draft: Vec::new(),
                mask: if last { replay.mask.clone() } else { None },
                sealed: None,
                payload: Payload::Tokens(ids),
            })))?;
            shadow.pos += len;
            fed += len as u32;
        }
        send(&Message::Tap(Tap { session_id, step_id: shadow.step_id }))?;
        let deadline = Instant::now()
            + self.config.step_timeout
            + self.config.prefill_timeout_per_token.saturating_mul(fed);
        let (result, taps) = collect_step(&mut shadow.channel, &ids, shadow.step_id, deadline).await?;
        observation(&ids, &result, &taps)
    }

    /// Runs `replay` through `route`: through the generation's check session on that route
    /// when `shadows` holds one (only the ids since its last check), else through a new one,
    /// kept in `shadows` for the next check when given.
    async fn observe_remote(
        &self,
        route: &[RouteHop],
        replay: &Replay,
        shadows: Option<&mut Shadows>,
    ) -> Result<Observation, String> {
        let Some(shadows) = shadows else {
            let mut shadow = self.open_shadow(route, replay)?;
            return self.observe_through(&mut shadow, replay).await;
        };
        // The generation's check session on this route, if it has one. A kept session may
        // have idled out on a stage since the last check: then a new one replays it all.
        let mut kept = shadows
            .remote
            .iter()
            .position(|s| s.route == route && s.pos < replay.history.len())
            .map(|i| shadows.remote.remove(i));
        loop {
            let (mut shadow, fresh) = match kept.take() {
                Some(s) => (s, false),
                None => (self.open_shadow(route, replay)?, true),
            };
            match self.observe_through(&mut shadow, replay).await {
                Ok(o) => {
                    // The most recently used last; the oldest goes (and closes) beyond the cap.
                    shadows.remote.push(shadow);
                    if shadows.remote.len() > MAX_SHADOWS {
                        shadows.remote.remove(0);
                    }
                    return Ok(o);
                }
                Err(e) if !fresh => tracing::debug!("the kept check session failed ({e}); opening another"),
                Err(e) => return Err(e),
            }
        }
    }

    /// Another opinion of the checked step through `route`: remote, or the origin's own
    /// computation when `local` is set; with `shadows`, through the generation's kept check
    /// sessions (kept for its next checks).
    pub(super) async fn observe(
        &self,
        route: &[RouteHop],
        replay: &Arc<Replay>,
        local: bool,
        shadows: Option<&mut Shadows>,
    ) -> Result<Observation, String> {
        if local {
            let Some(weights) = lock(&self.local).clone() else {
                return Err("the origin holds no weights".into());
            };
            let (route, replay, wire) = (route.to_vec(), replay.clone(), self.config.wire_dtype);
            let (shadows, kept) = match shadows {
                Some(s) => {
                    let kept = s.local.take();
                    (Some(s), kept)
                }
                None => (None, None),
            };
            let (observation, caches) =
                tokio::task::spawn_blocking(move || weights.observe(&route, &replay, wire, kept))
                    .await
                    .map_err(|e| e.to_string())??;
            if let Some(s) = shadows {
                s.local = Some(caches);
            }
            return Ok(observation);
        }
        self.observe_remote(route, replay, shadows).await
    }
}

/// What `verdict` on a step checked through route `ids` against `second_route` means for the
/// generation, with its bans applied to `roster` at `now`; also the liars caught, with the
/// hop where they lied.
pub(super) fn conclude(
    verdict: Verdict,
    ids: &[PeerId],
    second_route: &[RouteHop],
    roster: &mut Roster,
    now: Instant,
) -> (CheckResult, Vec<(PeerId, usize)>) {
    match verdict {
        Verdict::Agree => {
            let mut checked: Vec<PeerId> = ids.to_vec();
            checked.extend(second_route.iter().map(|h| h.node_id));
            roster.policy.passed(&checked);
            (CheckResult::Passed, Vec::new())
        }
        Verdict::Wrong { hop, wrong, liars } => {
            // Sessions through the liars fail over at their next step.
            roster.caught(&liars, now);
            let caught = liars.iter().map(|id| (*id, hop)).collect();
            if !wrong.contains(&0) {
                // The checked route was right: its result stands.
                roster.policy.passed(ids);
                return (CheckResult::Passed, caught);
            }
            let culprits: Vec<PeerId> = liars.iter().filter(|p| ids.contains(p)).copied().collect();
            let reason = if culprits.is_empty() {
                // Hop `hop` is served by the same peer on both sides: an earlier step fed this
                // session's route something wrong. Replay it.
                format!("spot-check: this route's result is wrong from hop {hop} on (an earlier step)")
            } else {
                format!(
                    "spot-check: {} returned a wrong result at hop {hop}",
                    culprits.iter().map(short).collect::<Vec<_>>().join(", ")
                )
            };
            (CheckResult::Failed { culprits, reason }, caught)
        }
        Verdict::Unresolved { hop, suspects } => {
            let names = suspects.iter().map(short).collect::<Vec<_>>().join(", ");
            // Two replicas that disagree with nothing to tell which is right: both are set
            // aside for a ban period (one peer on both sides is not to blame, see `judge`).
            let banned = if suspects.len() >= 2 { suspects.clone() } else { Vec::new() };
            tracing::warn!(hop, suspects = %names, "spot-check: replicas disagree and no third opinion exists");
            roster.ban(&banned, now);
            let reason = format!("spot-check: [{names}] disagree at hop {hop} and no third opinion exists");
            (
                CheckResult::Failed {
                    reason,
                    culprits: banned.into_iter().filter(|p| ids.contains(p)).collect(),
                },
                Vec::new(),
            )
        }
    }
}

/// Waits for step `step_id`'s result from the last hop of `route` and the tapped outputs of
/// the others.
pub(super) async fn collect_step(
    channel: &mut SessionChannel,
    route: &[PeerId],
    step_id: u64,
    deadline: Instant,
) -> Result<(StepResult, HashMap<PeerId, HiddenStates>), String> {
    let last = route[route.len() - 1];
    let mut result = None;
    let mut taps = HashMap::new();
    loop {
        if result.is_some() && route[..route.len() - 1].iter().all(|p| taps.contains_key(p)) {
            break;
        }
        let Some(Inbound { from, msg }) = channel.recv_until(deadline.into()).await else {
            return Err("no result within the deadline".into());
        };
        match msg {
            Message::StepResult(r) if from == last && r.step_id == step_id => result = Some(r),
            Message::StageOutput(Tapped { step_id: s, hidden, .. })
                if s == step_id && route.contains(&from) =>
            {
                taps.insert(from, hidden);
            }
            Message::Error(e) => return Err(format!("{} from {}: {}", e.code, short(&from), e.message)),
            _ => {}
        }
    }
    result.map(|r| (r, taps)).ok_or_else(|| "no result".into())
}

/// An observation from a route's result and taps.
pub(super) fn observation(
    route: &[PeerId],
    result: &StepResult,
    taps: &HashMap<PeerId, HiddenStates>,
) -> Result<Observation, String> {
    let mut outputs = Vec::with_capacity(route.len().saturating_sub(1));
    for p in &route[..route.len() - 1] {
        let h = taps.get(p).ok_or_else(|| format!("{} sent no output", short(p)))?;
        // Non-finite or misshapen: an output that cannot match any honest one.
        outputs.push(tapped_row(h).unwrap_or_default());
    }
    Ok(Observation {
        hops: route.iter().map(|p| Computer::Peer(*p)).collect(),
        outputs,
        token: result.token,
        logprob: result.logprob,
    })
}
