//! What an origin knows of its peers, shared by its generations, as pure code: spans, round
//! trips, bans, measured throughput, timeout strikes and the spot-check policy. The
//! generation's state machine ([`super::machine`]) reads and updates it on every event; the
//! driver keeps it behind one lock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use shoal_worker::net::short;
use shoal_worker::protocol::{PeerInfo, RouteHop};
use shoal_worker::service::PeerId;

use super::{DriverError, PeerState, TapSet};
use crate::blame::Strikes;
use crate::swarm::plan::{Candidate, CostModel, plan_route};
use crate::verify::SpotCheckPolicy;

/// Weight of a new measurement in a peer's moving average of throughput.
const MEASURE_WEIGHT: f64 = 0.25;

/// The peers an origin knows (see the module docs).
#[derive(Debug, Clone)]
pub struct Roster {
    pub(super) peers: HashMap<PeerId, PeerState>,
    pub(super) policy: SpotCheckPolicy,
    pub(super) strikes: Strikes,
    n_layers: u32,
    ban_base: Duration,
    ban_max: Duration,
    /// Whether the origin holds the model's weights (it can check any span itself).
    pub(super) has_local: bool,
}

impl Roster {
    /// An empty roster for a model of `n_layers` layers.
    pub fn new(
        n_layers: u32,
        policy: SpotCheckPolicy,
        strikes: Strikes,
        ban_base: Duration,
        ban_max: Duration,
    ) -> Self {
        Self { peers: HashMap::new(), policy, strikes, n_layers, ban_base, ban_max, has_local: false }
    }

    /// A peer answered a ping with `info` after `rtt`.
    pub fn pinged(&mut self, id: &PeerId, rtt: Duration, info: PeerInfo) {
        if let Some(p) = self.peers.get_mut(id) {
            p.info = info;
            p.rtt = rtt;
        }
    }

    /// The route a new session would take at `now`.
    pub fn plan_route(&self, now: Instant) -> Result<Vec<RouteHop>, DriverError> {
        let usable = |p: &PeerState| !p.info.draining && p.banned_until.is_none_or(|t| t <= now);
        let candidates: Vec<Candidate> = self
            .peers
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
                recent_failures: p.failures + self.strikes.of(id),
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
                let mut known: Vec<(&PeerId, &PeerState)> = self.peers.iter().collect();
                known.sort_by_key(|(id, p)| (p.info.start, p.info.end, **id));
                let known: Vec<String> = known
                    .into_iter()
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

    /// Bans `culprits` of a failure at `now`: for the base ban, doubling with each failure in a
    /// row, at most the longest.
    pub fn ban(&mut self, culprits: &[PeerId], now: Instant) {
        for id in culprits {
            if let Some(p) = self.peers.get_mut(id) {
                p.failures += 1;
                let factor = 1u32 << (p.failures - 1).min(16);
                let ban = self.ban_base.saturating_mul(factor).min(self.ban_max);
                // A longer ban already running (a liar's) stays.
                p.banned_until = Some(p.banned_until.map_or(now + ban, |t| t.max(now + ban)));
                tracing::warn!(peer = %short(id), ?ban, failures = p.failures, "banned a peer");
            }
        }
    }

    /// Bans peers a check caught lying, for the longest ban; sessions through them fail over
    /// at their next step ([`Roster::liars_on`]).
    pub fn caught(&mut self, liars: &[PeerId], now: Instant) {
        for id in liars {
            self.policy.forget(id);
            if let Some(p) = self.peers.get_mut(id) {
                p.failures = p.failures.saturating_add(1);
                p.banned_until = Some(now + self.ban_max);
                p.liar = true;
            }
        }
    }

    /// A generation through `route` completed.
    pub fn succeeded(&mut self, route: &[PeerId]) {
        self.strikes.succeeded(route);
        for id in route {
            if let Some(p) = self.peers.get_mut(id) {
                p.failures = 0;
            }
        }
    }

    /// Counts (`+1`) or uncounts a session of this origin through each peer of `route`.
    pub fn set_active(&mut self, route: &[PeerId], on: bool) {
        for id in route {
            if let Some(p) = self.peers.get_mut(id) {
                p.active = if on { p.active + 1 } else { p.active.saturating_sub(1) };
            }
        }
    }

    /// The peers of `route` caught lying whose ban still runs at `now`.
    pub fn liars_on(&self, route: &[PeerId], now: Instant) -> Vec<PeerId> {
        let caught = |p: &PeerState| p.liar && p.banned_until.is_some_and(|t| t > now);
        route.iter().filter(|id| self.peers.get(*id).is_some_and(caught)).copied().collect()
    }

    /// Plans around `id` until it says its KV budget has room again (its next pong or
    /// announcement).
    pub fn cache_full(&mut self, id: &PeerId) {
        if let Some(p) = self.peers.get_mut(id) {
            p.info.free_kv_bytes = 0;
        }
    }

    /// Whether a step through `route` can be checked at `now`: another replica of one of its
    /// spans, or the origin's own weights.
    pub fn can_check(&self, route: &[RouteHop], now: Instant) -> bool {
        self.has_local || route.iter().any(|h| !self.replicas(h, &[], now).is_empty())
    }

    /// Usable peers at `now` other than `hop`'s own serving exactly its span, except `avoid`,
    /// in id order.
    pub fn replicas(&self, hop: &RouteHop, avoid: &[PeerId], now: Instant) -> Vec<PeerId> {
        let mut out: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(id, p)| {
                p.info.start == hop.start
                    && p.info.end == hop.end
                    && !p.info.draining
                    && p.banned_until.is_none_or(|t| t <= now)
                    && !avoid.contains(id)
                    && **id != hop.node_id
            })
            .map(|(id, _)| *id)
            .collect();
        out.sort();
        out
    }

    /// A route with `route`'s boundaries through other peers where they exist at `now`,
    /// avoiding `avoid[i]` at hop `i`: at each hop a replica drawn from `rng` (a worker cannot
    /// tell when it will be asked for a second opinion, and the checks spread over the
    /// replicas). `None` when it would be `route` itself.
    pub fn other_route(
        &self,
        route: &[RouteHop],
        avoid: &[Vec<PeerId>],
        rng: &mut impl rand::Rng,
        now: Instant,
    ) -> Option<Vec<RouteHop>> {
        let mut changed = false;
        let out = route
            .iter()
            .enumerate()
            .map(|(i, hop)| {
                let choices = self.replicas(hop, avoid.get(i).map_or(&[], Vec::as_slice), now);
                if choices.is_empty() {
                    return hop.clone();
                }
                changed = true;
                let pick = choices[rng.random_range(0..choices.len())];
                RouteHop { node_id: pick, start: hop.start, end: hop.end }
            })
            .collect();
        changed.then_some(out)
    }

    /// Measures each hop of a tapped step: the time between the arrival of its output (or the
    /// result, for the last) and of the previous hop's (or the step's start, for the first) is
    /// its compute plus a hop; its span's layers over that time go into the peer's moving
    /// average ([`PeerState::measured`]), which routing believes over the announcement.
    pub(super) fn measured(&mut self, route: &[RouteHop], taps: &TapSet, step_started: Instant) {
        let mut prev = step_started;
        for (i, hop) in route.iter().enumerate() {
            let at = if i + 1 == route.len() { taps.result_at } else { taps.at.get(&hop.node_id).copied() };
            let Some(at) = at else { return };
            let secs = at.saturating_duration_since(prev).as_secs_f64().max(1e-6);
            prev = at.max(prev);
            let sample = f64::from(hop.end - hop.start) / secs;
            if let Some(p) = self.peers.get_mut(&hop.node_id) {
                p.measured =
                    Some(p.measured.map_or(sample, |m| (1.0 - MEASURE_WEIGHT) * m + MEASURE_WEIGHT * sample));
            }
        }
    }
}
