//! Route planning: the cheapest chain of peers covering layers `0..n_layers`.
//!
//! # Model
//!
//! Positions are layer boundaries `0..=n_layers`. A [`Candidate`] is an edge from `a` to `b`
//! for every `start <= a < b <= end` when it is `partial`, and only `start -> end` otherwise.
//! The cost of using peer `p` for layers `[a, b)` is
//!
//! ```text
//! (b - a) * 1000 / (throughput / (1 + load))     compute, ms
//! + rtt_ms / 2 + per_hop_ms                       network, ms
//! + no_cache_penalty_ms   if !has_free_cache
//! + failure_penalty_ms * recent_failures
//! ```
//!
//! All costs are non-negative and edges only go forward, so a forward dynamic programme over
//! positions finds the optimum exactly (the positions are already in topological order).
//! A route may use the same peer for two non-adjacent hops (A, B, A) when that is cheapest;
//! the caller opens one session per hop.
//!
//! # Inputs, outputs, invariants
//!
//! * Input: `n_layers`, candidates (in any order), a [`CostModel`].
//! * Output: `Some(Route)` whose hops are contiguous, start at 0, end at `n_layers`, each hop
//!   allowed for its peer, and whose `cost_ms` is the sum of the hop costs; `None` when some
//!   layer cannot be covered.
//! * Deterministic: candidates are considered sorted by `(id, start, end)`, ties keep the
//!   first route found, so input order never changes the answer.
//! * Candidates with an empty or out-of-range span, a non-finite or non-positive throughput, or
//!   a non-finite or negative rtt are ignored.
//!
//! # Concurrent sessions
//!
//! [`plan_many`] plans `k` sessions in a row, adding 1 to the `load` of every peer a chosen
//! route uses before planning the next one, so replicas of the same span alternate instead of
//! one of them taking every session.

use crate::swarm::PeerId;

/// A peer that may serve part of a route.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The peer.
    pub id: PeerId,
    /// First layer it holds.
    pub start: u32,
    /// One past the last layer it holds.
    pub end: u32,
    /// Tokens per second through ONE layer at batch 1.
    pub throughput: f64,
    /// Sessions open on it.
    pub load: u32,
    /// Measured round trip from the origin, ms.
    pub rtt_ms: f64,
    /// Whether it has room for another session's KV cache.
    pub has_free_cache: bool,
    /// Recent failures observed by this node.
    pub recent_failures: u32,
    /// Whether it may serve a sub-span of its span.
    pub partial: bool,
}

/// Weights of the route cost (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct CostModel {
    /// Fixed overhead per hop, ms.
    pub per_hop_ms: f64,
    /// Penalty for a peer without free KV cache, ms (large but finite).
    pub no_cache_penalty_ms: f64,
    /// Penalty per recent failure, ms.
    pub failure_penalty_ms: f64,
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel { per_hop_ms: 5.0, no_cache_penalty_ms: 10_000.0, failure_penalty_ms: 2_000.0 }
    }
}

/// One hop of a route: `id` runs layers `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// The peer.
    pub id: PeerId,
    /// First layer of this hop.
    pub start: u32,
    /// One past the last layer of this hop.
    pub end: u32,
}

/// A chain of hops covering every layer, and its estimated cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Hops in layer order.
    pub hops: Vec<Hop>,
    /// Estimated cost, ms.
    pub cost_ms: f64,
}

impl CostModel {
    /// Cost of `c` running layers `[a, b)`, or `None` if `c` may not run exactly that span.
    pub fn hop_cost(&self, c: &Candidate, a: u32, b: u32) -> Option<f64> {
        let allowed =
            if c.partial { c.start <= a && a < b && b <= c.end } else { a == c.start && b == c.end };
        if !allowed || !usable(c) {
            return None;
        }
        let per_layer = 1000.0 * (1.0 + f64::from(c.load)) / c.throughput;
        let mut cost = f64::from(b - a) * per_layer + c.rtt_ms / 2.0 + self.per_hop_ms;
        if !c.has_free_cache {
            cost += self.no_cache_penalty_ms;
        }
        cost += self.failure_penalty_ms * f64::from(c.recent_failures);
        Some(cost)
    }
}

/// The per-layer throughput to plan with. An announcement is only a prior: once this node has
/// measured the peer (a moving average of the steps it served, see the driver), the
/// measurement decides, and a peer that claimed more than [`OVERCLAIM`] times its measurement
/// is planned at half its measurement, so inflating a claim costs routes instead of winning
/// them.
pub fn believed_throughput(announced: f64, measured: Option<f64>) -> f64 {
    match measured {
        Some(m) if m.is_finite() && m > 0.0 => {
            if announced > OVERCLAIM * m {
                m / 2.0
            } else {
                m
            }
        }
        _ => announced,
    }
}

/// How far an announcement may exceed a measurement before the peer is charged for it.
pub const OVERCLAIM: f64 = 2.0;

fn usable(c: &Candidate) -> bool {
    c.start < c.end
        && c.throughput.is_finite()
        && c.throughput > 0.0
        && c.rtt_ms.is_finite()
        && c.rtt_ms >= 0.0
}

/// The cheapest route over `0..n_layers`, or `None` if some layer cannot be covered.
pub fn plan_route(n_layers: u32, candidates: &[Candidate], cost: &CostModel) -> Option<Route> {
    let n = n_layers as usize;
    if n == 0 {
        return None;
    }
    let mut order: Vec<&Candidate> = candidates.iter().filter(|c| usable(c) && c.end <= n_layers).collect();
    order.sort_by_key(|c| (c.id, c.start, c.end));
    // best[p] = (cost to reach position p, (candidate index, hop start)).
    let mut best: Vec<Option<(f64, usize, u32)>> = vec![None; n + 1];
    let mut reached = vec![false; n + 1];
    reached[0] = true;
    for a in 0..n_layers {
        if !reached[a as usize] {
            continue;
        }
        let here = best[a as usize].map_or(0.0, |(c, _, _)| c);
        for (i, c) in order.iter().enumerate() {
            if a < c.start || a >= c.end || (!c.partial && a != c.start) {
                continue;
            }
            let first_b = if c.partial { a + 1 } else { c.end };
            for b in first_b..=c.end {
                let Some(h) = cost.hop_cost(c, a, b) else { continue };
                let total = here + h;
                let slot = &mut best[b as usize];
                if slot.is_none_or(|(old, _, _)| total < old) {
                    *slot = Some((total, i, a));
                    reached[b as usize] = true;
                }
            }
        }
    }
    let (cost_ms, _, _) = best[n]?;
    let mut hops = Vec::new();
    let mut pos = n_layers;
    while pos > 0 {
        let (_, i, a) = best[pos as usize]?;
        hops.push(Hop { id: order[i].id, start: a, end: pos });
        pos = a;
    }
    hops.reverse();
    Some(Route { hops, cost_ms })
}

/// Plans `k` sessions in a row; after each, every peer the route used gets `load += 1`.
/// Stops early (returning fewer routes) once no route exists.
pub fn plan_many(n_layers: u32, candidates: &[Candidate], cost: &CostModel, k: usize) -> Vec<Route> {
    let mut cands = candidates.to_vec();
    let mut routes = Vec::with_capacity(k);
    for _ in 0..k {
        let Some(route) = plan_route(n_layers, &cands, cost) else { break };
        add_load(&mut cands, &route);
        routes.push(route);
    }
    routes
}

/// Adds 1 to the load of every candidate (by id) that `route` uses, once per peer.
pub fn add_load(candidates: &mut [Candidate], route: &Route) {
    let mut used: Vec<PeerId> = route.hops.iter().map(|h| h.id).collect();
    used.sort_unstable();
    used.dedup();
    for c in candidates.iter_mut() {
        if used.binary_search(&c.id).is_ok() {
            c.load = c.load.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests;
