//! Route planning: the cheapest chain of peers whose spans cover layers `0..n_layers`.
//!
//! Pure logic, no I/O. A route is a shortest path over layer boundaries: each candidate peer
//! is an edge from its span's start to its end with a cost (one per hop plus what the caller
//! derives from round trips, load and recent failures). Spans must chain exactly (a stage
//! serves its whole span); the swarm issue's planner generalises this.

use shoal_worker::service::PeerId;

/// A peer that may serve one hop.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The peer.
    pub id: PeerId,
    /// First layer of its span.
    pub start: u32,
    /// One past its last layer.
    pub end: u32,
    /// Cost of using it for one hop (≥ 0; the planner adds 1 per hop).
    pub cost: f64,
}

/// The cheapest route over `candidates` from layer 0 to `n_layers`, as indices into
/// `candidates` in route order; `None` when the spans cannot cover the model. Ties go to
/// the candidate listed first.
pub fn plan(n_layers: u32, candidates: &[Candidate]) -> Option<Vec<usize>> {
    let n = n_layers as usize;
    if n == 0 {
        return None;
    }
    // best[pos] = (cost, candidate index that reached pos)
    let mut best: Vec<Option<(f64, usize)>> = vec![None; n + 1];
    let mut reached = vec![false; n + 1];
    reached[0] = true;
    let mut cost_at = vec![0.0f64; n + 1];
    for pos in 0..n {
        if !reached[pos] {
            continue;
        }
        for (i, c) in candidates.iter().enumerate() {
            if c.start as usize != pos || c.end as usize > n || c.end <= c.start || !c.cost.is_finite() {
                continue;
            }
            let end = c.end as usize;
            let cost = cost_at[pos] + 1.0 + c.cost.max(0.0);
            if best[end].is_none_or(|(b, _)| cost < b) {
                best[end] = Some((cost, i));
                cost_at[end] = cost;
                reached[end] = true;
            }
        }
    }
    let mut route = Vec::new();
    let mut pos = n;
    while pos > 0 {
        let (_, i) = best[pos]?;
        route.push(i);
        pos = candidates[i].start as usize;
    }
    route.reverse();
    Some(route)
}

/// Total cost of a route as [`plan`] counts it.
pub fn route_cost(candidates: &[Candidate], route: &[usize]) -> f64 {
    route.iter().map(|&i| 1.0 + candidates[i].cost.max(0.0)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cand(id: u8, start: u32, end: u32, cost: f64) -> Candidate {
        Candidate { id: [id; 32], start, end, cost }
    }

    #[test]
    fn picks_the_cheaper_replica_and_fewer_hops() {
        let c = vec![cand(1, 0, 15, 0.5), cand(2, 15, 30, 0.9), cand(3, 15, 30, 0.1), cand(4, 0, 30, 1.5)];
        // Two hops cost 2 + 0.5 + 0.1 = 2.6; one hop costs 2.5.
        assert_eq!(plan(30, &c), Some(vec![3]));
        let c = vec![cand(1, 0, 15, 0.5), cand(2, 15, 30, 0.9), cand(3, 15, 30, 0.1), cand(4, 0, 30, 2.0)];
        assert_eq!(plan(30, &c), Some(vec![0, 2]));
    }

    #[test]
    fn gaps_and_bad_spans_give_no_route() {
        assert_eq!(plan(30, &[cand(1, 0, 10, 0.0), cand(2, 11, 30, 0.0)]), None);
        assert_eq!(plan(30, &[cand(1, 0, 31, 0.0)]), None);
        assert_eq!(plan(30, &[cand(1, 0, 30, f64::NAN)]), None);
        assert_eq!(plan(0, &[cand(1, 0, 30, 0.0)]), None);
        assert_eq!(plan(30, &[]), None);
    }

    /// Every chain of candidates that covers 0..n, by exhaustive search.
    fn brute_force(n: u32, c: &[Candidate]) -> Option<f64> {
        fn go(pos: u32, n: u32, c: &[Candidate], acc: f64, best: &mut Option<f64>) {
            if pos == n {
                if best.is_none_or(|b| acc < b) {
                    *best = Some(acc);
                }
                return;
            }
            for x in c.iter().filter(|x| x.start == pos && x.end > x.start && x.end <= n) {
                go(x.end, n, c, acc + 1.0 + x.cost, best);
            }
        }
        let mut best = None;
        go(0, n, c, 0.0, &mut best);
        best
    }

    proptest! {
        #[test]
        fn equals_brute_force(
            n in 1u32..10,
            spans in prop::collection::vec((0u32..10, 1u32..6, 0u32..100), 0..12),
        ) {
            let c: Vec<Candidate> = spans
                .iter()
                .enumerate()
                .map(|(i, &(s, w, cost))| cand(i as u8, s, s + w, f64::from(cost) / 10.0))
                .collect();
            let planned = plan(n, &c);
            let brute = brute_force(n, &c);
            prop_assert_eq!(planned.is_some(), brute.is_some());
            if let (Some(route), Some(best)) = (planned, brute) {
                prop_assert!((route_cost(&c, &route) - best).abs() < 1e-9);
                let mut pos = 0;
                for &i in &route {
                    prop_assert_eq!(c[i].start, pos);
                    pos = c[i].end;
                }
                prop_assert_eq!(pos, n);
            }
        }
    }
}
