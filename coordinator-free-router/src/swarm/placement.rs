//! Span choice at start-up and rebalancing later: Petals' block selection, made safe.
//!
//! # Choosing a span ([`choose_span`])
//!
//! Input: per-layer coverage (tokens/s), the span length, this node's throughput. Output: the
//! start of the window that maximises the resulting bottleneck (min over all layers after adding
//! this node's throughput to the window); ties go to the window with the smallest coverage sum,
//! then to the lowest start. Pure and deterministic.
//!
//! # Rebalancing ([`should_move`])
//!
//! Input: the node's own view (which must contain the node's own latest announcement), its id,
//! a [`RebalanceConfig`]. Output: `Some(new_start)` or `None`. Placement reasons about *planned*
//! coverage: `Serving` plus `Joining` peers (a joining peer will serve soon; ignoring it would
//! make every peer rush to the same gap while it loads). Safety reasons about *serving*
//! coverage. A node moves only when all hold:
//!
//! 1. it is `Serving` in its own view;
//! 2. **no hole**: every layer of its current span is still served by another `Serving` peer
//!    ([`can_leave`]), so, as far as the node's view goes, a move never uncovers a layer;
//! 3. the best other span, by [`choose_span`] over the planned coverage without this node,
//!    differs from the current one;
//! 4. **settled**: no other peer is `Joining` on a layer of the current or the new span (a
//!    region being loaded is in flux; concurrent movers would otherwise pile into the same gap);
//! 5. **clear progress**: let `before` / `after` be the minimum planned coverage, before and
//!    after the move, over the layers the move changes (those in exactly one of the two spans).
//!    The node moves when `after > before` and either `after >= min_gain × before` (relative
//!    hysteresis, e.g. 1.2×) or `after - before >= min_step × throughput` (the move lifts the
//!    weakest changed layer by most of the mover's own throughput, provided the gain is still
//!    at least `min_step_gain` (×) and `before` is within `min_gain` of the global bottleneck:
//!    a reload is worth it only for a real gain near the bottleneck).
//!
//! Why the *changed* layers and not the global bottleneck: every move that raises the global
//! bottleneck by `g` also raises the changed-layer minimum by at least `g` (all globally
//! weakest layers must be among the changed ones), so this rule allows every move the global
//! rule allows; but the global rule gets stuck whenever two weak regions lie further apart than
//! one span — no single move lifts both, so nobody moves, however weak they are (measured: a
//! correlated crash left the swarm at ~10% of its upper bound). The absolute margin matters in
//! large swarms, where one peer changes a layer's coverage by far less than 20%; it stops once
//! source and destination differ by less than ~(1 + `min_step`) × throughput, so a peer never
//! overshoots and the reverse move is blocked; `min_step_gain` keeps a large balanced swarm
//! from fine-tuning forever (measured with 1,000 peers: without it, 15-35 moves per minute
//! went on after joins and random churn and never died out; with it, there were no moves at
//! all then, and moves only where a correlated crash had left a weak region).
//!
//! **No oscillation.** Each move strictly raises the minimum over the layers it changes and
//! leaves all other layers alone, so it strictly improves the sorted coverage vector
//! lexicographically (leximin). In a consistent view no sequence of moves can return to an
//! earlier placement, and the number of moves is finite. Concurrent movers with stale views
//! are handled by the caller's move protocol: announce `Draining`, wait for gossip to settle,
//! re-check with [`move_target`] (safety and gain, with fresher gossip), then announce
//! `Joining` on the span it returns now, or go back to `Serving` on the old span if it returns
//! `None`; announce `Serving` once loaded. Checks run at jittered
//! intervals ([`next_check_ms`]) so peers do not all move at once.

use rand::Rng;

use crate::swarm::PeerId;
use crate::swarm::announce::{Announcement, PeerState};
use crate::swarm::view::SwarmView;

/// Rebalancing policy (hysteresis); see the module docs, rule 5.
#[derive(Debug, Clone, PartialEq)]
pub struct RebalanceConfig {
    /// Relative gain of the changed layers' bottleneck that justifies a move by itself, e.g. 1.2.
    pub min_gain: f64,
    /// Absolute gain, as a fraction of the mover's throughput, that justifies a move near the
    /// bottleneck, e.g. 0.75. `f64::INFINITY` gives the purely relative rule.
    pub min_step: f64,
    /// Relative gain an absolute-margin move must still reach, e.g. 1.02: in a large, balanced
    /// swarm a one-peer move changes a layer by a fraction of a percent, not worth a reload.
    pub min_step_gain: f64,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        RebalanceConfig { min_gain: 1.2, min_step: 0.75, min_step_gain: 1.02 }
    }
}

/// Start of the best window of `len` layers for a node of `throughput` (see the module docs).
/// `len` is clamped to `1..=coverage.len()`; an empty coverage gives 0. Coverage values must be
/// finite.
pub fn choose_span(coverage: &[f64], len: u32, throughput: f64) -> u32 {
    let n = coverage.len();
    if n == 0 {
        return 0;
    }
    let len = (len as usize).clamp(1, n);
    // prefix_min[i] = min of coverage[..i]; suffix_min[i] = min of coverage[i..].
    let mut prefix_min = vec![f64::INFINITY; n + 1];
    for i in 0..n {
        prefix_min[i + 1] = prefix_min[i].min(coverage[i]);
    }
    let mut suffix_min = vec![f64::INFINITY; n + 1];
    for i in (0..n).rev() {
        suffix_min[i] = suffix_min[i + 1].min(coverage[i]);
    }
    let mut best: Option<(f64, f64, usize)> = None;
    for s in 0..=n - len {
        let window = &coverage[s..s + len];
        let inside = window.iter().copied().fold(f64::INFINITY, f64::min) + throughput;
        let result = inside.min(prefix_min[s]).min(suffix_min[s + len]);
        let sum: f64 = window.iter().sum();
        let better = match best {
            None => true,
            Some((b, bs, _)) => result > b || (result == b && sum < bs),
        };
        if better {
            best = Some((result, sum, s));
        }
    }
    best.map_or(0, |(_, _, s)| s as u32)
}

/// Span length that fits a memory budget: `budget / bytes_per_layer`, clamped to
/// `1..=n_layers` (a zero `bytes_per_layer` means everything fits).
pub fn span_len_for_memory(budget_bytes: u64, bytes_per_layer: u64, n_layers: u32) -> u32 {
    let max = n_layers.max(1);
    let fit = budget_bytes.checked_div(bytes_per_layer).unwrap_or(u64::MAX);
    u32::try_from(fit).unwrap_or(u32::MAX).clamp(1, max)
}

/// Whether every layer of `me`'s span (as announced in `view`) is served by another `Serving`
/// peer, i.e. `me` can stop serving without uncovering a layer. `false` if `me` is unknown.
pub fn can_leave(view: &SwarmView, me: PeerId) -> bool {
    view.get(&me).is_some_and(|mine| served_without(view, me, mine.start, mine.end))
}

/// Whether every layer of `[start, end)` is served by a `Serving` peer other than `me`. Used to
/// re-check safety after draining, when `me` is no longer in its own view.
pub fn served_without(view: &SwarmView, me: PeerId, start: u32, end: u32) -> bool {
    let others = view.coverage_where(|a| a.node != me && a.state == PeerState::Serving);
    start < end && others.get(start as usize..end as usize).is_some_and(|span| span.iter().all(|&c| c > 0.0))
}

/// Per layer: throughput of `Serving` and `Joining` peers, i.e. what will soon be served.
pub fn planned_coverage(view: &SwarmView) -> Vec<f64> {
    view.coverage_where(|a| a.state != PeerState::Draining)
}

/// The new start `me` should move to, if any (see the module docs for the rules).
pub fn should_move(view: &SwarmView, me: PeerId, config: &RebalanceConfig) -> Option<u32> {
    let mine = view.get(&me)?;
    if mine.state != PeerState::Serving {
        return None;
    }
    move_target(view, me, mine.start, mine.end, f64::from(mine.throughput), config)
}

/// The rules of [`should_move`] for a node serving `[start, end)` at `throughput`, whatever its
/// own entry in `view` says. A node that announced `Draining` to move (and so is no longer in
/// its own view) calls this again before switching, to re-check the move with fresher gossip.
pub fn move_target(
    view: &SwarmView,
    me: PeerId,
    start: u32,
    end: u32,
    throughput: f64,
    config: &RebalanceConfig,
) -> Option<u32> {
    if !served_without(view, me, start, end) {
        return None;
    }
    let (from, len, t) = (start as usize, (end - start) as usize, throughput);
    let without = view.coverage_where(|a| a.node != me && a.state != PeerState::Draining);
    let dest = choose_span(&without, len as u32, t) as usize;
    if dest == from {
        return None;
    }
    // A region someone is loading is in flux: do not move into or out of it until it serves.
    let overlaps = |a: &Announcement, s: usize| (a.start as usize) < s + len && s < a.end as usize;
    if view
        .peers()
        .any(|a| a.node != me && a.state == PeerState::Joining && (overlaps(a, from) || overlaps(a, dest)))
    {
        return None;
    }
    // Only layers in exactly one of the two spans change.
    let (mut before, mut after, mut global) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    for (l, &c) in without.iter().enumerate() {
        let (in_old, in_new) = ((from..from + len).contains(&l), (dest..dest + len).contains(&l));
        let now = if in_old { c + t } else { c };
        global = global.min(now);
        if in_old != in_new {
            before = before.min(now);
            after = after.min(if in_new { c + t } else { c });
        }
    }
    let relative = after >= config.min_gain * before;
    // The absolute margin only for moves that lift a region near the swarm's bottleneck: a
    // reload is not worth it for layers that do not limit throughput.
    let absolute = after - before >= config.min_step * t
        && after >= config.min_step_gain * before
        && before <= config.min_gain * global;
    (after > before && (relative || absolute)).then_some(dest as u32)
}

/// Delay before the next rebalance check: uniform in `[base/2, 3·base/2]` ms.
pub fn next_check_ms<R: Rng + ?Sized>(rng: &mut R, base_ms: u64) -> u64 {
    let lo = base_ms / 2;
    let hi = base_ms.saturating_add(base_ms / 2);
    rng.random_range(lo..=hi)
}

#[cfg(test)]
mod tests;
