//! One generation's session logic as an I/O-free state machine, in the style of
//! quinn-proto's `Connection`: [`Generation::handle`] takes an [`Event`] and the time, reads
//! and updates the origin's [`Roster`], and returns [`Action`]s for its driver to carry out.
//! It chooses routes, opens sessions and replays the history after a failover, checks each
//! result, reports tokens, decides which steps are spot-checked and what a check's verdict
//! means, charges failures to the peers that caused them and bans them. It never sends,
//! sleeps or reads a clock: [`super::Driver`] runs it against the network, and
//! `super::sim` runs it against simulated peers with seeded faults, with no sockets.
//!
//! The events a generation waits for, by phase:
//! - after [`Action::Open`] and step sends: [`Event::Inbound`] (results, tapped outputs,
//!   errors), [`Event::Timeout`] once [`Generation::deadline`] passes, [`Event::SecondOpinion`]
//!   when a check runs, [`Event::SendFailed`];
//! - after [`Action::PingHops`]: [`Event::Silent`]; after [`Action::Refresh`]:
//!   [`Event::Refreshed`]; after [`Action::Draft`]: [`Event::Drafted`]; after
//!   [`Action::Judge`]: [`Event::Judged`]; after [`Action::Token`]: [`Event::Delivered`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shoal_model_shards::generate::{FinishReason, Flow};
use shoal_model_shards::token_mask::TokenMask;
use shoal_worker::net::short;
use shoal_worker::protocol::{
    CloseReason, ErrorCode, Message, OpenSession, Payload, RouteHop, Sampling, StageError, Step, StepResult,
    Tap,
};
use shoal_worker::service::PeerId;

use super::check::{CheckResult, Replay, conclude, observation};
use super::roster::Roster;
use super::{DriverConfig, DriverError, Failover, ModelInfo, Outcome, Request, Sealer, TapSet};
use crate::speculative::SpecStats;
use crate::verify::{Observation, Verdict, judge};

/// What happened, for [`Generation::handle`].
pub(super) enum Event {
    /// Begin: plan the first route.
    Start,
    /// A message for the current session.
    Inbound { from: PeerId, msg: Message },
    /// [`Generation::deadline`] passed with no result.
    Timeout,
    /// A send of the current session failed on this node.
    SendFailed(String),
    /// The hops of [`Action::PingHops`] that did not answer.
    Silent(Vec<PeerId>),
    /// [`Action::Refresh`] is done (the roster holds the answers).
    Refreshed,
    /// The draft [`Action::Draft`] asked for (empty: none).
    Drafted(Vec<u32>),
    /// The opinion [`Action::Opinion`] asked for.
    Opinion { which: Opinion, observed: Result<Observation, String> },
    /// The caller took the token of the last [`Action::Token`].
    Delivered(Flow),
}

/// What the driver is to do, in order.
pub(super) enum Action {
    /// Open a session's channel and send it `OpenSession` (the driver fills in the address
    /// book).
    Open { first: PeerId, open: OpenSession },
    /// Send a message of the current session to its first hop.
    Send { first: PeerId, session_id: u64, msg: Message },
    /// Close a session along its chain (errors ignored).
    Close { first: PeerId, session_id: u64, reason: CloseReason },
    /// Ping these hops; answer with [`Event::Silent`] (and record the answers in the roster).
    PingHops(Vec<PeerId>),
    /// Ping every known peer; answer with [`Event::Refreshed`].
    Refresh,
    /// Record a speculative step's outcome in the drafter.
    Record { drafted: usize, accepted: usize },
    /// Draft at most `limit` ids after `context`; answer with [`Event::Drafted`].
    Draft { context: Vec<u32>, limit: usize },
    /// Compute the checked step again through `route` (with the origin's weights when
    /// `local`) from `replay`; answer with [`Event::Opinion`]. A second opinion runs while
    /// other events go on, through the generation's kept check sessions; a third is awaited.
    Opinion { which: Opinion, route: Vec<RouteHop>, local: bool, replay: Arc<Replay> },
    /// Forget the second opinion in flight (its step failed).
    CancelCheck,
    /// A check caught these peers lying (each with the hop where it lied), already banned in
    /// the roster: for the logs and the metrics.
    Caught(Vec<(PeerId, usize)>),
    /// The tokens from index `from` on are withdrawn (see [`super::TokenEvent`]).
    Withdraw { from: usize },
    /// Give the caller a token; answer with [`Event::Delivered`].
    Token { index: usize, token: u32, logprob: f32, top_logprobs: Vec<(u32, f32)>, route: Vec<PeerId> },
    /// The generation is over (its `speculation` is the drafter's to fill in).
    Done(Result<Outcome, DriverError>),
}

/// Which opinion of a checked step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Opinion {
    /// Runs while the step does.
    Second,
    /// Breaks a disagreement.
    Third,
}

/// A checked step's other opinions.
struct Check {
    replay: Arc<Replay>,
    /// The route of the second opinion in flight or given.
    route: Vec<RouteHop>,
    local: bool,
    /// Second opinions that failed (the next one avoids their peers).
    failed: Vec<Vec<RouteHop>>,
    /// The second opinion, once it came (an error: the step stands unchecked).
    second: Option<Result<Observation, String>>,
    /// The observations judged so far (the step's own first), while a third is awaited.
    observations: Vec<Observation>,
    /// Whether the third opinion in flight is the origin's own.
    third_local: bool,
    /// Opinions asked for beyond the second.
    extra: usize,
}

/// Second opinions tried per check before the step stands unchecked (then the origin's own
/// weights, where it holds them).
const SECOND_TRIES: usize = 2;

/// A token of a result: id, logprob and the alternatives asked for.
type Chosen = (u32, f32, Vec<(u32, f32)>);

/// Why one attempt (one route) ended.
struct Failure {
    culprits: Vec<PeerId>,
    reason: String,
    /// When the failing step was sent.
    step_started: Instant,
}

/// A failure not yet recovered from.
struct PendingFailover {
    step_started: Instant,
    at_token: usize,
    reason: String,
    banned: Vec<String>,
    detected: Instant,
}

/// Where an attempt stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the result of the step in flight (and its taps and second opinion when it
    /// is checked).
    Awaiting,
    /// The step missed its deadline: the hops are being pinged.
    Pinging,
    /// A third opinion is awaited.
    Judging,
    /// A token is with the caller.
    Delivering,
    /// The next step's draft is awaited.
    Drafting,
}

/// One route's session.
struct Attempt {
    route: Vec<RouteHop>,
    ids: Vec<PeerId>,
    session_id: u64,
    sealer: Sealer,
    phase: Phase,
    step_id: u64,
    step_started: Instant,
    deadline: Instant,
    /// Whether a result has come (the next ones are decode steps).
    decoding: bool,
    /// The draft of the step in flight.
    draft: Vec<u32>,
    /// The mask of the token the step in flight samples.
    mask: Option<TokenMask>,
    /// Whether the step in flight is checked.
    checking: bool,
    taps: TapSet,
    check: Option<Check>,
    result: Option<StepResult>,
    /// The result's tokens not yet given to the caller.
    queue: VecDeque<Chosen>,
    /// Tokens before this result's.
    before: usize,
    /// Index of this attempt's route in [`Generation::routes`].
    number: usize,
}

/// One generation (see the module docs).
pub(super) struct Generation {
    request: Request,
    config: DriverConfig,
    model: ModelInfo,
    me: PeerId,
    rng: StdRng,
    speculate: bool,
    started: Instant,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    step_times: Vec<std::time::Duration>,
    first_token_at: Option<Instant>,
    failovers: Vec<Failover>,
    pending_failover: Option<PendingFailover>,
    spot_checks: usize,
    /// Tokens up to the last one a passed check confirmed.
    verified: usize,
    /// The route (index in `routes`) that produced each token.
    produced: Vec<usize>,
    /// The peers of each attempt's route.
    routes: Vec<Vec<PeerId>>,
    /// Tokens withdrawn because a peer caught lying had produced them.
    withdrawn: usize,
    /// The route error that made this generation refresh its peers.
    no_route: Option<DriverError>,
    attempt: Option<Attempt>,
    done: bool,
}

impl Generation {
    /// A generation of `request` (already validated) from node `me`, started at `now`;
    /// `speculate` says whether steps may carry drafts; `seed` draws session ids.
    pub(super) fn new(
        request: Request,
        config: DriverConfig,
        model: ModelInfo,
        me: PeerId,
        speculate: bool,
        seed: u64,
        now: Instant,
    ) -> Self {
        Self {
            speculate: speculate && request.constraint.is_none(),
            request,
            config,
            model,
            me,
            rng: StdRng::seed_from_u64(seed),
            started: now,
            tokens: Vec::new(),
            logprobs: Vec::new(),
            step_times: Vec::new(),
            first_token_at: None,
            failovers: Vec::new(),
            pending_failover: None,
            spot_checks: 0,
            verified: 0,
            produced: Vec::new(),
            routes: Vec::new(),
            withdrawn: 0,
            no_route: None,
            attempt: None,
            done: false,
        }
    }

    /// Until when the driver waits for [`Event::Inbound`] before it sends [`Event::Timeout`]
    /// (`None`: no deadline runs, as while waiting for a second opinion).
    pub(super) fn deadline(&self) -> Option<Instant> {
        let a = self.attempt.as_ref()?;
        let waiting_for_stages = a.phase == Phase::Awaiting && (a.result.is_none() || !a.taps_complete());
        waiting_for_stages.then_some(a.deadline)
    }

    /// The current session's id, if one is open.
    pub(super) fn session_id(&self) -> Option<u64> {
        self.attempt.as_ref().map(|a| a.session_id)
    }

    /// Whether [`Action::Done`] was returned.
    pub(super) fn is_done(&self) -> bool {
        self.done
    }

    /// The generation is abandoned (its caller went away): closes the session in flight.
    pub(super) fn abandon(&mut self, roster: &mut Roster) -> Vec<Action> {
        self.done = true;
        match self.attempt.take() {
            Some(a) => {
                roster.set_active(&a.ids, false);
                vec![Action::CancelCheck, close(&a, CloseReason::Error)]
            }
            None => Vec::new(),
        }
    }

    /// Handles `event` at `now` (see the module docs).
    pub(super) fn handle(&mut self, event: Event, now: Instant, roster: &mut Roster) -> Vec<Action> {
        let mut out = Vec::new();
        if self.done {
            return out;
        }
        let step = match event {
            Event::Start => {
                self.plan(now, roster, &mut out);
                return out;
            }
            Event::Refreshed => {
                self.replan(now, roster, &mut out);
                return out;
            }
            other => self.on_attempt_event(other, now, roster, &mut out),
        };
        if let Err(f) = step {
            self.fail(f, now, roster, &mut out);
        }
        out
    }

    fn on_attempt_event(
        &mut self,
        event: Event,
        now: Instant,
        roster: &mut Roster,
        out: &mut Vec<Action>,
    ) -> Result<(), Failure> {
        let Some(a) = self.attempt.as_mut() else { return Ok(()) };
        match event {
            Event::Inbound { from, msg } => {
                if !matches!(a.phase, Phase::Awaiting) {
                    return Ok(());
                }
                match msg {
                    Message::StepResult(r)
                        if from == a.last() && r.step_id == a.step_id && a.result.is_none() =>
                    {
                        a.taps.result_at = Some(now);
                        a.result = Some(r);
                    }
                    Message::StepResult(r) => {
                        tracing::debug!(from = %short(&from), step = r.step_id, "ignoring a result");
                        return Ok(());
                    }
                    Message::StageOutput(o) if o.step_id == a.step_id && a.ids.contains(&from) => {
                        a.taps.insert(from, o.hidden, now);
                    }
                    Message::Error(e) => return Err(blame(self.me, a, from, &e, roster)),
                    other => {
                        tracing::debug!(kind = other.kind_name(), "ignoring a message for a session");
                        return Ok(());
                    }
                }
                self.advance(now, roster, out)
            }
            Event::Timeout if a.phase == Phase::Awaiting => {
                if a.result.is_some() {
                    // The result came; some tapped outputs of the checked step did not.
                    let silent: Vec<PeerId> = a.ids[..a.ids.len() - 1]
                        .iter()
                        .filter(|p| !a.taps.outputs.contains_key(*p))
                        .copied()
                        .collect();
                    return Err(Failure {
                        reason: format!(
                            "no output of a checked step from [{}]",
                            silent.iter().map(short).collect::<Vec<_>>().join(", ")
                        ),
                        culprits: silent,
                        step_started: a.step_started,
                    });
                }
                a.phase = Phase::Pinging;
                out.push(Action::PingHops(a.ids.clone()));
                Ok(())
            }
            Event::Silent(silent) if a.phase == Phase::Pinging => {
                // Every hop answering pings: one may be dropping steps (`crate::blame`).
                let culprits = roster.strikes.timed_out(&a.ids, &silent, now);
                Err(Failure {
                    reason: format!(
                        "no result within {:?}; silent: [{}]; banned: [{}]",
                        a.deadline.saturating_duration_since(a.step_started),
                        silent.iter().map(short).collect::<Vec<_>>().join(", "),
                        culprits.iter().map(short).collect::<Vec<_>>().join(", ")
                    ),
                    culprits,
                    step_started: a.step_started,
                })
            }
            Event::SendFailed(reason) => {
                Err(Failure { culprits: vec![], reason, step_started: a.step_started })
            }
            Event::Opinion { which: Opinion::Second, observed } => {
                let Some(check) = a.check.as_mut().filter(|c| c.second.is_none()) else { return Ok(()) };
                match observed {
                    Ok(o) => check.second = Some(Ok(o)),
                    Err(e) => {
                        tracing::debug!("a second opinion failed: {e}");
                        check.failed.push(std::mem::take(&mut check.route));
                        if !retry_second(&mut self.rng, &a.route, check, roster, now, out) {
                            check.second = Some(Err(format!("the second opinion failed: {e}")));
                        }
                    }
                }
                self.advance(now, roster, out)
            }
            Event::Opinion { which: Opinion::Third, observed } if a.phase == Phase::Judging => {
                let Some(check) = a.check.as_mut() else { return Ok(()) };
                match observed {
                    Ok(o) => check.observations.push(o),
                    Err(e) if roster.has_local && !check.third_local && !check.local => {
                        // The origin's weights decide instead.
                        tracing::debug!("a third opinion failed ({e}); asking the origin's weights");
                        check.third_local = true;
                        let (route, replay) = (a.route.clone(), check.replay.clone());
                        out.push(Action::Opinion { which: Opinion::Third, route, local: true, replay });
                        return Ok(());
                    }
                    Err(e) => tracing::warn!("the third opinion failed: {e}"),
                }
                self.judge_check(now, roster, out)
            }
            Event::Delivered(flow) if a.phase == Phase::Delivering => {
                if flow == Flow::Stop {
                    self.finish(FinishReason::Stop, CloseReason::ClientDisconnected, now, roster, out);
                    return Ok(());
                }
                if self.tokens.len() >= self.request.max_tokens {
                    self.finish(FinishReason::Length, CloseReason::Completed, now, roster, out);
                    return Ok(());
                }
                self.next_token(now, roster, out)
            }
            Event::Drafted(draft) if a.phase == Phase::Drafting => {
                self.send_next_step(draft, now, roster, out)
            }
            _ => {
                tracing::debug!("an event the generation does not wait for");
                Ok(())
            }
        }
    }

    /// Plans a route and starts an attempt on it; without one, refreshes the peers once after
    /// a failure (banned peers may be all there is), else gives up.
    fn plan(&mut self, now: Instant, roster: &mut Roster, out: &mut Vec<Action>) {
        match roster.plan_route(now) {
            Ok(route) => self.start_attempt(route, now, roster, out),
            Err(e) if !self.failovers.is_empty() || self.pending_failover.is_some() => {
                self.no_route = Some(e);
                out.push(Action::Refresh);
            }
            Err(e) => self.give_up(e, out),
        }
    }

    /// After [`Action::Refresh`]: a route, or the first error and why the peers that are left
    /// were banned.
    fn replan(&mut self, now: Instant, roster: &mut Roster, out: &mut Vec<Action>) {
        let Some(first) = self.no_route.take() else { return };
        match roster.plan_route(now) {
            Ok(route) => self.start_attempt(route, now, roster, out),
            Err(_) => {
                let e = match (first, &self.pending_failover) {
                    (DriverError::NoRoute { n_layers, detail }, Some(p)) => DriverError::NoRoute {
                        n_layers,
                        detail: format!("{detail}; last failure: {}", p.reason),
                    },
                    (e, _) => e,
                };
                self.give_up(e, out);
            }
        }
    }

    fn give_up(&mut self, e: DriverError, out: &mut Vec<Action>) {
        self.done = true;
        out.push(Action::Done(Err(e)));
    }

    /// Opens a session on `route` and sends it the history: the prompt in chunks, then (after
    /// a failover) each generated token as the one-token step it was, back to back. Replaying
    /// exactly the steps of the first run keeps every kernel on the same path (a batched
    /// prefill of generated tokens rounds differently from one-token steps, which can flip a
    /// sampled token).
    fn start_attempt(
        &mut self,
        route: Vec<RouteHop>,
        now: Instant,
        roster: &mut Roster,
        out: &mut Vec<Action>,
    ) {
        let ids: Vec<PeerId> = route.iter().map(|h| h.node_id).collect();
        roster.set_active(&ids, true);
        let (first, last) = (ids[0], ids[ids.len() - 1]);
        let session_id: u64 = self.rng.random();
        let sealed = Sealer::new(self.config.seal_sampler_inputs, &last);
        let (seal, sealer) = match sealed {
            Ok(s) => s,
            Err(reason) => {
                roster.set_active(&ids, false);
                let f = Failure { culprits: vec![last], reason, step_started: now };
                return self.fail_over(f, now, roster, out);
            }
        };
        let request = &self.request;
        let max_len = request.prompt.len() + request.max_tokens;
        let open = OpenSession {
            session_id,
            model_id: self.model.model_id,
            origin: self.me,
            route: route.clone(),
            hop_index: 0,
            wire_dtype: self.config.wire_dtype,
            max_len: u32::try_from(max_len).unwrap_or(u32::MAX),
            sampling: Sampling::from(&request.params),
            top_logprobs: request.top_logprobs,
            prompt_len: u32::try_from(request.prompt.len()).unwrap_or(u32::MAX),
            address_book: Vec::new(),
            seal,
        };
        out.push(Action::Open { first, open });
        let history_len = request.prompt.len() + self.tokens.len();
        let prefill_budget = self.config.step_timeout
            + self
                .config
                .prefill_timeout_per_token
                .saturating_mul(u32::try_from(history_len).unwrap_or(u32::MAX));
        let mut steps: Vec<(u64, Vec<u32>)> =
            request.prompt.chunks(self.config.prefill_chunk.max(1)).map(|c| (0, c.to_vec())).collect();
        steps.extend(self.tokens.iter().enumerate().map(|(i, &t)| (i as u64 + 1, vec![t])));
        let mut a = Attempt {
            route,
            ids,
            session_id,
            sealer,
            phase: Phase::Awaiting,
            step_id: 0,
            step_started: now,
            deadline: now + prefill_budget,
            decoding: false,
            draft: Vec::new(),
            mask: None,
            checking: false,
            taps: TapSet::default(),
            check: None,
            result: None,
            queue: VecDeque::new(),
            before: 0,
            number: self.routes.len(),
        };
        self.routes.push(a.ids.clone());
        // The mask of the token the last of these steps samples.
        let mask = match next_mask(&self.request) {
            Ok(m) => m,
            Err(None) => {
                self.attempt = Some(a);
                return self.finish(FinishReason::Stop, CloseReason::Completed, now, roster, out);
            }
            Err(Some(reason)) => {
                self.attempt = Some(a);
                return self.fail(Failure { culprits: vec![], reason, step_started: now }, now, roster, out);
            }
        };
        a.mask = mask.clone();
        let n_steps = steps.len();
        let mut pos = 0u32;
        for (i, (sample_step, ids)) in steps.into_iter().enumerate() {
            a.step_id += 1;
            let len = ids.len() as u32;
            let step = a.sealer.step(Step {
                session_id,
                step_id: a.step_id,
                start_pos: pos,
                sample_step,
                history_tail: ids.clone(),
                draft: Vec::new(),
                mask: if i + 1 == n_steps { mask.clone() } else { None },
                sealed: None,
                payload: Payload::Tokens(ids),
            });
            out.push(Action::Send { first, session_id, msg: Message::Step(step) });
            pos += len;
        }
        // The first result through a route is checked like a decode step: it is the first
        // step through peers not checked yet, and the only one of a short generation.
        a.checking = self.config.spot_check.enabled()
            && roster.policy.should_check(&a.ids)
            && roster.can_check(&a.route, now);
        if a.checking {
            tap_and_check(
                &mut self.rng,
                &self.request,
                &self.tokens,
                self.config.prefill_chunk,
                &mut a,
                roster,
                now,
                out,
            );
        }
        self.attempt = Some(a);
    }

    /// Moves a step on once its result (and for a checked step, every tapped output and the
    /// second opinion) has come.
    fn advance(&mut self, now: Instant, roster: &mut Roster, out: &mut Vec<Action>) -> Result<(), Failure> {
        let Some(a) = self.attempt.as_mut() else { return Ok(()) };
        let Some(result) = a.result.as_ref() else { return Ok(()) };
        if !a.checking {
            return self.accept_result(now, roster, out);
        }
        if !a.taps_complete() {
            return Ok(());
        }
        let Some(check) = a.check.as_mut() else { return self.accept_result(now, roster, out) };
        let second = match &check.second {
            None => return Ok(()),
            Some(Err(why)) => {
                tracing::debug!("spot-check skipped: {why}");
                return self.accept_result(now, roster, out);
            }
            Some(Ok(o)) => o.clone(),
        };
        roster.measured(&a.route, &a.taps, a.step_started);
        let primary = observation(&a.ids, result, &a.taps.outputs).map_err(|reason| Failure {
            culprits: vec![],
            reason,
            step_started: a.step_started,
        })?;
        check.observations = vec![primary, second];
        self.judge_check(now, roster, out)
    }

    /// Judges the check's observations (the step's own first), asking for more opinions
    /// where they cannot decide, then acts on the verdict.
    fn judge_check(
        &mut self,
        now: Instant,
        roster: &mut Roster,
        out: &mut Vec<Action>,
    ) -> Result<(), Failure> {
        let Some(a) = self.attempt.as_mut() else { return Ok(()) };
        let Some(check) = a.check.as_mut() else { return Ok(()) };
        let verdict = loop {
            let verdict = judge(&check.observations, &self.config.spot_check);
            // The hops another opinion must settle: with a new peer at `hop`, or (`after`) at
            // any hop past it.
            let (hop, after) = match &verdict {
                Verdict::Unresolved { hop, .. } => (*hop, false),
                Verdict::Wrong { hop, wrong, liars } if !wrong.contains(&0) => {
                    // Another opinion lied at `hop`: its liars are banned, and the step's own
                    // hops after it still need another opinion to agree with.
                    roster.caught(liars, now);
                    out.push(Action::Caught(liars.iter().map(|id| (*id, *hop)).collect()));
                    let mut index = 0;
                    check.observations.retain(|_| {
                        index += 1;
                        !wrong.contains(&(index - 1))
                    });
                    if check.observations.len() >= 2 {
                        continue;
                    }
                    (*hop, true)
                }
                _ => break verdict,
            };
            if check.extra < MAX_EXTRA_OPINIONS
                && let Some((route, local)) =
                    another_opinion(&mut self.rng, &a.route, check, hop, after, roster, now)
            {
                check.extra += 1;
                check.third_local = local;
                a.phase = Phase::Judging;
                let replay = check.replay.clone();
                out.push(Action::Opinion { which: Opinion::Third, route, local, replay });
                return Ok(());
            }
            if after {
                // Nothing left to compare the step's last hops with: it stands unchecked.
                tracing::debug!("spot-check: no opinion left after a lying one; the step stands unchecked");
                a.check = None;
                return self.accept_result(now, roster, out);
            }
            break verdict;
        };
        self.conclude_check(verdict, now, roster, out)
    }

    /// Acts on a check's verdict: bans, then the step's result stands or the attempt fails.
    fn conclude_check(
        &mut self,
        verdict: Verdict,
        now: Instant,
        roster: &mut Roster,
        out: &mut Vec<Action>,
    ) -> Result<(), Failure> {
        let Some(a) = self.attempt.as_mut() else { return Ok(()) };
        let Some(check) = a.check.take() else { return Ok(()) };
        let (result, caught) = conclude(verdict, &a.ids, &check.route, roster, now);
        if !caught.is_empty() {
            out.push(Action::Caught(caught));
        }
        match result {
            CheckResult::Passed => {
                self.spot_checks += 1;
                // The checked step's token (the next one) is confirmed.
                self.verified = self.tokens.len() + 1;
            }
            CheckResult::Failed { culprits, reason } => {
                let f = Failure { culprits, reason, step_started: a.step_started };
                // No culprit on this route: an earlier step fed it something wrong.
                let suspects = if f.culprits.is_empty() { a.ids.clone() } else { f.culprits.clone() };
                self.withdraw(&suspects, out);
                return Err(f);
            }
        }
        self.accept_result(now, roster, out)
    }

    /// Takes the step's result: checks what the last stage can be held to, then reports its
    /// tokens one by one.
    fn accept_result(
        &mut self,
        now: Instant,
        roster: &mut Roster,
        out: &mut Vec<Action>,
    ) -> Result<(), Failure> {
        let vocab = self.model.vocab_size;
        let Some(a) = self.attempt.as_mut() else { return Ok(()) };
        let Some(result) = a.result.take() else { return Ok(()) };
        let lie = |reason: String| Failure { culprits: vec![a.last()], reason, step_started: a.step_started };
        if result.accepted.len() > a.draft.len()
            || result.accepted.iter().zip(&a.draft).any(|(c, &d)| c.token != d)
        {
            return Err(lie(format!(
                "the last stage accepted {} ids that are not a prefix of the draft of {}",
                result.accepted.len(),
                a.draft.len()
            )));
        }
        if result.token >= vocab {
            return Err(lie(format!("the last stage returned id {} outside the vocabulary", result.token)));
        }
        if let Some(m) = &a.mask
            && !m.allows(result.token)
        {
            return Err(lie(format!(
                "the last stage returned id {} that the step's mask forbids",
                result.token
            )));
        }
        // Every hop of the route served this step: none of them is dropping steps.
        roster.strikes.succeeded(&a.ids);
        out.push(Action::Record { drafted: a.draft.len(), accepted: result.accepted.len() });
        if a.decoding {
            self.step_times.push(now.saturating_duration_since(a.step_started));
        }
        a.decoding = true;
        if let Some(p) = self.pending_failover.take() {
            self.failovers.push(Failover {
                at_token: p.at_token,
                banned: p.banned,
                reason: p.reason,
                detection: p.detected.saturating_duration_since(p.step_started),
                stall: now.saturating_duration_since(p.step_started),
            });
        }
        self.first_token_at.get_or_insert(now);
        // The accepted draft ids, then the sampler's next choice: each as if it came alone.
        a.queue = result
            .accepted
            .into_iter()
            .map(|c| (c.token, c.logprob, c.top_logprobs))
            .chain(std::iter::once((result.token, result.logprob, result.top_logprobs)))
            .collect();
        a.before = self.tokens.len();
        self.next_token(now, roster, out)
    }

    /// Reports the next token of the result, or asks for the next step's draft.
    fn next_token(
        &mut self,
        now: Instant,
        roster: &mut Roster,
        out: &mut Vec<Action>,
    ) -> Result<(), Failure> {
        let Some(a) = self.attempt.as_mut() else { return Ok(()) };
        let Some((token, logprob, top_logprobs)) = a.queue.pop_front() else {
            let emitted = &self.tokens[a.before..];
            if emitted.is_empty() {
                return Err(Failure {
                    culprits: vec![a.last()],
                    reason: "the last stage returned no token".into(),
                    step_started: a.step_started,
                });
            }
            a.phase = Phase::Drafting;
            let context: Vec<u32> = self.request.prompt.iter().chain(&self.tokens).copied().collect();
            // The draft is useful only while it can be kept whole within max_tokens.
            let limit = self.request.max_tokens - self.tokens.len() - 1;
            if self.speculate && limit > 0 {
                out.push(Action::Draft { context, limit });
                return Ok(());
            }
            return self.send_next_step(Vec::new(), now, roster, out);
        };
        if self.request.stop_ids.contains(&token) {
            self.finish(FinishReason::Stop, CloseReason::Completed, now, roster, out);
            return Ok(());
        }
        if let Some(c) = &self.request.constraint
            && let Err(e) = c.advance(token)
        {
            tracing::warn!("the constraint refused id {token} it allowed: {e}");
            self.finish(FinishReason::Stop, CloseReason::Completed, now, roster, out);
            return Ok(());
        }
        let index = self.tokens.len();
        self.tokens.push(token);
        self.logprobs.push(logprob);
        self.produced.push(a.number);
        a.phase = Phase::Delivering;
        out.push(Action::Token { index, token, logprob, top_logprobs, route: a.ids.clone() });
        Ok(())
    }

    /// Sends the next decode step (the last token and `draft`), tapped and checked when the
    /// policy draws it.
    fn send_next_step(
        &mut self,
        draft: Vec<u32>,
        now: Instant,
        roster: &mut Roster,
        out: &mut Vec<Action>,
    ) -> Result<(), Failure> {
        let mask = match next_mask(&self.request) {
            Ok(m) => m,
            Err(None) => {
                self.finish(FinishReason::Stop, CloseReason::Completed, now, roster, out);
                return Ok(());
            }
            Err(Some(reason)) => {
                let started = self.attempt.as_ref().map_or(now, |a| a.step_started);
                return Err(Failure { culprits: vec![], reason, step_started: started });
            }
        };
        let Some(a) = self.attempt.as_mut() else { return Ok(()) };
        let emitted = self.tokens[a.before..].to_vec();
        let Some(&next) = emitted.last() else {
            let f =
                Failure { culprits: vec![a.last()], reason: "no token to send".into(), step_started: now };
            return Err(f);
        };
        // The cache holds the prompt and every token but the last; a speculative step needs
        // its draft plus one position.
        let start = self.request.prompt.len() + self.tokens.len() - 1;
        a.step_id += 1;
        a.step_started = now;
        a.deadline = now + self.config.step_timeout;
        a.phase = Phase::Awaiting;
        a.mask = mask.clone();
        a.taps.clear();
        a.check = None;
        a.result = None;
        // Every other session through a peer caught lying fails over at its next step.
        let liars = roster.liars_on(&a.ids, now);
        if !liars.is_empty() {
            let f = Failure {
                reason: format!(
                    "{} was caught returning wrong results",
                    liars.iter().map(short).collect::<Vec<_>>().join(", ")
                ),
                culprits: liars,
                step_started: now,
            };
            self.withdraw(&f.culprits, out);
            return Err(f);
        }
        a.checking = draft.is_empty()
            && self.config.spot_check.enabled()
            && roster.policy.should_check(&a.ids)
            && roster.can_check(&a.route, now);
        let mut payload = Vec::with_capacity(1 + draft.len());
        payload.push(next);
        payload.extend_from_slice(&draft);
        let step = a.sealer.step(Step {
            session_id: a.session_id,
            step_id: a.step_id,
            start_pos: u32::try_from(start).unwrap_or(u32::MAX),
            sample_step: self.tokens.len() as u64,
            history_tail: emitted,
            draft: draft.clone(),
            mask: mask.clone(),
            sealed: None,
            payload: Payload::Tokens(payload),
        });
        a.draft = draft;
        let (first, session_id) = (a.ids[0], a.session_id);
        out.push(Action::Send { first, session_id, msg: Message::Step(step) });
        if a.checking {
            tap_and_check(
                &mut self.rng,
                &self.request,
                &self.tokens,
                self.config.prefill_chunk,
                a,
                roster,
                now,
                out,
            );
        }
        Ok(())
    }

    /// Withdraws the tokens from the first one after the last confirmed by a check that a
    /// route through any of `suspects` produced: they may be lies, and the failover that
    /// follows replays the history without them, so the generation gives them again from an
    /// honest route. The caller learns it from the next token's index (see
    /// [`super::TokenEvent`]). A grammar's state cannot be rewound: constrained generations
    /// keep their tokens.
    fn withdraw(&mut self, suspects: &[PeerId], out: &mut Vec<Action>) {
        if self.request.constraint.is_some() {
            return;
        }
        let from = self.verified.min(self.tokens.len());
        let through = |n: usize| self.routes.get(n).is_some_and(|r| r.iter().any(|p| suspects.contains(p)));
        let Some(first) = (from..self.tokens.len()).find(|&i| through(self.produced[i])) else { return };
        let n = self.tokens.len() - first;
        self.tokens.truncate(first);
        self.logprobs.truncate(first);
        self.produced.truncate(first);
        self.withdrawn += n;
        tracing::warn!(from = first, tokens = n, "withdrew tokens that a peer caught lying produced");
        out.push(Action::Withdraw { from: first });
    }

    /// The generation is complete: closes the session with `close`.
    fn finish(
        &mut self,
        reason: FinishReason,
        close_reason: CloseReason,
        now: Instant,
        roster: &mut Roster,
        out: &mut Vec<Action>,
    ) {
        let Some(a) = self.attempt.take() else { return };
        out.push(close(&a, close_reason));
        roster.set_active(&a.ids, false);
        roster.succeeded(&a.ids);
        let first = self.first_token_at.unwrap_or(now);
        self.done = true;
        out.push(Action::Done(Ok(Outcome {
            tokens: std::mem::take(&mut self.tokens),
            logprobs: std::mem::take(&mut self.logprobs),
            finish_reason: reason,
            prefill_time: first.saturating_duration_since(self.started),
            decode_time: now.saturating_duration_since(first),
            step_times: std::mem::take(&mut self.step_times),
            speculation: SpecStats::default(),
            failovers: std::mem::take(&mut self.failovers),
            route: a.ids,
            spot_checks: self.spot_checks,
            withdrawn: self.withdrawn,
        })));
    }

    /// The attempt failed: closes its session and fails over.
    fn fail(&mut self, f: Failure, now: Instant, roster: &mut Roster, out: &mut Vec<Action>) {
        if let Some(a) = self.attempt.take() {
            if a.checking {
                out.push(Action::CancelCheck);
            }
            out.push(close(&a, CloseReason::Error));
            roster.set_active(&a.ids, false);
        }
        self.fail_over(f, now, roster, out);
    }

    /// Bans the culprits of `f`, then plans another route (the history is replayed on it), up
    /// to [`DriverConfig::max_failovers`] times.
    fn fail_over(&mut self, f: Failure, now: Instant, roster: &mut Roster, out: &mut Vec<Action>) {
        roster.ban(&f.culprits, now);
        tracing::warn!(at_token = self.tokens.len(), reason = %f.reason, "failing over");
        if self.failovers.len() + 1 > self.config.max_failovers {
            let e = DriverError::TooManyFailovers { failovers: self.failovers.len(), last: f.reason };
            return self.give_up(e, out);
        }
        let banned = f.culprits.iter().map(short).collect();
        // Keep the earliest start if one failover fails again before a token.
        let (step_started, at_token) = self
            .pending_failover
            .take()
            .map_or((f.step_started, self.tokens.len()), |p| (p.step_started, p.at_token));
        self.pending_failover =
            Some(PendingFailover { step_started, at_token, reason: f.reason, banned, detected: now });
        self.plan(now, roster, out);
    }
}

impl Attempt {
    fn last(&self) -> PeerId {
        self.ids[self.ids.len() - 1]
    }

    /// Whether every hop but the last sent its output of a checked step (trivially so for a
    /// step that is not checked).
    fn taps_complete(&self) -> bool {
        !self.checking || self.ids[..self.ids.len() - 1].iter().all(|p| self.taps.outputs.contains_key(p))
    }
}

/// Who is to blame for a stage's error in attempt `a` of origin `me`.
fn blame(me: PeerId, a: &Attempt, from: PeerId, e: &StageError, roster: &mut Roster) -> Failure {
    let culprit = if from == me {
        // This node could not reach stage 1.
        Some(a.ids[0])
    } else {
        // Bad input is charged to the hop that produced it (`crate::blame`).
        a.ids
            .iter()
            .position(|id| *id == from)
            .and_then(|i| crate::blame::culprit_of_error(&a.ids, i, e.code))
    };
    if e.code == ErrorCode::CapacityExceeded
        && let Some(id) = culprit
    {
        roster.cache_full(&id);
    }
    Failure {
        culprits: culprit.into_iter().collect(),
        reason: format!("{} from {}: {}", e.code, short(&from), e.message),
        step_started: a.step_started,
    }
}

/// Opinions a check asks for beyond the second (to break ties, or to replace one that lied).
const MAX_EXTRA_OPINIONS: usize = 3;

/// Another opinion of `check`'s step through `route`: with a peer at `hop` that no observation
/// had there (or, with `after`, a peer other than the step's own at some hop past `hop`), else
/// the origin's weights when it holds them and has not given an opinion yet.
fn another_opinion(
    rng: &mut StdRng,
    route: &[RouteHop],
    check: &Check,
    hop: usize,
    after: bool,
    roster: &Roster,
    now: Instant,
) -> Option<(Vec<RouteHop>, bool)> {
    let computed = |i: usize| -> Vec<PeerId> {
        check
            .observations
            .iter()
            .filter_map(|o| match o.hops.get(i) {
                Some(crate::verify::Computer::Peer(p)) => Some(*p),
                _ => None,
            })
            .collect()
    };
    let mut avoid = vec![Vec::new(); route.len()];
    if after {
        for (i, a) in avoid.iter_mut().enumerate().skip(hop + 1) {
            *a = vec![route[i].node_id];
        }
    } else {
        avoid[hop] = computed(hop);
    }
    let settles = |r: &[RouteHop]| {
        if after {
            (hop + 1..r.len()).any(|i| !avoid[i].contains(&r[i].node_id))
        } else {
            !avoid[hop].contains(&r[hop].node_id)
        }
    };
    if let Some(r) = roster.other_route(route, &avoid, rng, now).filter(|r| settles(r)) {
        return Some((r, false));
    }
    let origin_heard = check.observations.iter().any(|o| o.hops.contains(&crate::verify::Computer::Origin));
    (roster.has_local && !origin_heard && !check.third_local).then(|| (route.to_vec(), true))
}

/// Taps the step just sent through `a` and starts its second opinion: through other
/// replicas where there are some (the swarm's cores rather than the origin's), else the
/// origin's weights. The tap follows its step down the chain: every stage has computed and
/// forwarded the step before it learns that the step is checked. The second opinion needs
/// only the history: it runs while the step does.
#[allow(clippy::too_many_arguments)]
fn tap_and_check(
    rng: &mut StdRng,
    request: &Request,
    tokens: &[u32],
    chunk: usize,
    a: &mut Attempt,
    roster: &Roster,
    now: Instant,
    out: &mut Vec<Action>,
) {
    let tap = Message::Tap(Tap { session_id: a.session_id, step_id: a.step_id });
    out.push(Action::Send { first: a.ids[0], session_id: a.session_id, msg: tap });
    let replay = Arc::new(Replay::new(request, tokens, chunk, a.mask.clone()));
    let mut check = Check {
        replay,
        route: Vec::new(),
        local: false,
        failed: Vec::new(),
        second: None,
        observations: Vec::new(),
        third_local: false,
        extra: 0,
    };
    if !retry_second(rng, &a.route, &mut check, roster, now, out) {
        check.second = Some(Err("no other replica and no local weights".into()));
    }
    a.check = Some(check);
}

/// Asks for (another) second opinion of `check` on a step through `route`: other replicas,
/// avoiding the peers of the routes that failed, for up to [`SECOND_TRIES`] tries, then the
/// origin's weights. Returns whether one was asked for.
fn retry_second(
    rng: &mut StdRng,
    route: &[RouteHop],
    check: &mut Check,
    roster: &Roster,
    now: Instant,
    out: &mut Vec<Action>,
) -> bool {
    let tried_local = check.failed.iter().any(|r| r.as_slice() == route);
    let avoid: Vec<Vec<PeerId>> = (0..route.len())
        .map(|i| check.failed.iter().filter_map(|r| r.get(i).map(|h| h.node_id)).collect())
        .collect();
    let remote = (check.failed.len() < SECOND_TRIES)
        .then(|| roster.other_route(route, &avoid, rng, now))
        .flatten()
        // A hop that falls back to the checked route's own peer is fine; a route that only
        // repeats a failed one is not.
        .filter(|r| !check.failed.contains(r));
    let (second, local) = match remote {
        Some(r) => (r, false),
        None if roster.has_local && !tried_local => (route.to_vec(), true),
        None => return false,
    };
    check.route = second.clone();
    check.local = local;
    out.push(Action::Opinion { which: Opinion::Second, route: second, local, replay: check.replay.clone() });
    true
}

fn close(a: &Attempt, reason: CloseReason) -> Action {
    Action::Close { first: a.ids[0], session_id: a.session_id, reason }
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
