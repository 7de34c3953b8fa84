use proptest::prelude::*;

use super::*;

fn cand(id: u8, start: u32, end: u32, throughput: f64) -> Candidate {
    Candidate {
        id: [id; 32],
        start,
        end,
        throughput,
        load: 0,
        rtt_ms: 20.0,
        has_free_cache: true,
        recent_failures: 0,
        partial: false,
    }
}

/// Exhaustive optimum by a different method: every set of cut points splits `0..n` into
/// segments, and given the cuts each segment independently takes its cheapest eligible peer.
/// Every chain is some cut set plus one peer per segment, so this is the true minimum.
fn brute_force(n: u32, cands: &[Candidate], cost: &CostModel) -> Option<f64> {
    let mut best: Option<f64> = None;
    for mask in 0u32..(1 << (n - 1)) {
        let mut cuts = vec![0];
        cuts.extend((1..n).filter(|p| mask & (1 << (p - 1)) != 0));
        cuts.push(n);
        let mut total = 0.0;
        let mut ok = true;
        for w in cuts.windows(2) {
            let seg = cands.iter().filter_map(|c| cost.hop_cost(c, w[0], w[1])).reduce(f64::min);
            match seg {
                Some(s) => total += s,
                None => {
                    ok = false;
                    break;
                }
            }
        }
        if ok && best.is_none_or(|b| total < b) {
            best = Some(total);
        }
    }
    best
}

fn check_route(n: u32, cands: &[Candidate], cost: &CostModel, r: &Route) {
    assert_eq!(r.hops.first().map(|h| h.start), Some(0));
    assert_eq!(r.hops.last().map(|h| h.end), Some(n));
    let mut total = 0.0;
    for (i, h) in r.hops.iter().enumerate() {
        if i > 0 {
            assert_eq!(r.hops[i - 1].end, h.start, "hops are contiguous");
        }
        let c = cands
            .iter()
            .filter(|c| c.id == h.id)
            .filter_map(|c| cost.hop_cost(c, h.start, h.end))
            .reduce(f64::min);
        total += c.unwrap_or(f64::NAN);
    }
    assert!((total - r.cost_ms).abs() < 1e-6 * r.cost_ms.max(1.0), "{total} vs {}", r.cost_ms);
}

prop_compose! {
    fn arb_swarm()(n in 1u32..=8, k in 1usize..=6, partial_mode in 0u8..3)
        (specs in proptest::collection::vec(
            (0u32..n, 1u32..=n, 0.5f64..8.0, 0u32..3, 0.0f64..100.0, any::<bool>(), 0u32..2, any::<bool>()),
            k),
         n in Just(n), partial_mode in Just(partial_mode)) -> (u32, Vec<Candidate>)
    {
        let cands = specs.into_iter().enumerate().map(|(i, (s, len, t, load, rtt, cache, fails, p))| {
            let end = (s + len).min(n);
            Candidate {
                id: [i as u8; 32], start: s, end, throughput: t, load, rtt_ms: rtt, has_free_cache: cache,
                recent_failures: fails,
                partial: match partial_mode { 0 => false, 1 => true, _ => p },
            }
        }).collect();
        (n, cands)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn route_equals_brute_force((n, cands) in arb_swarm()) {
        let cost = CostModel::default();
        let got = plan_route(n, &cands, &cost);
        let want = brute_force(n, &cands, &cost);
        prop_assert_eq!(got.is_some(), want.is_some());
        if let (Some(r), Some(w)) = (got, want) {
            prop_assert!((r.cost_ms - w).abs() < 1e-6 * w.max(1.0), "{} vs {}", r.cost_ms, w);
            check_route(n, &cands, &cost, &r);
            // Input order never changes the answer.
            let mut rev = cands.clone();
            rev.reverse();
            prop_assert_eq!(plan_route(n, &rev, &cost), Some(r));
        }
    }
}

#[test]
fn no_route_when_a_layer_is_uncovered() {
    let cost = CostModel::default();
    let cands = vec![cand(1, 0, 3, 1.0), cand(2, 4, 8, 1.0)];
    assert_eq!(plan_route(8, &cands, &cost), None);
    // Exact spans that overlap cannot be chained without partial serving.
    let cands = vec![cand(1, 0, 5, 1.0), cand(2, 3, 8, 1.0)];
    assert_eq!(plan_route(8, &cands, &cost), None);
    let partial: Vec<Candidate> = cands.into_iter().map(|c| Candidate { partial: true, ..c }).collect();
    let r = plan_route(8, &partial, &cost);
    assert_eq!(r.map(|r| r.hops.len()), Some(2));
    assert_eq!(plan_route(0, &partial, &cost), None);
}

#[test]
fn replicas_alternate_under_load_feedback() {
    let cost = CostModel::default();
    let cands = vec![cand(1, 0, 4, 2.0), cand(2, 0, 4, 2.0), cand(3, 4, 8, 4.0)];
    let routes = plan_many(8, &cands, &cost, 6);
    let first: Vec<u8> = routes.iter().map(|r| r.hops[0].id[0]).collect();
    assert_eq!(first, vec![1, 2, 1, 2, 1, 2]);
    assert!(routes.iter().all(|r| r.hops[1].id == [3; 32]));
    // Without feedback every session would take the same replica.
    let same: Vec<u8> =
        (0..3).filter_map(|_| plan_route(8, &cands, &cost)).map(|r| r.hops[0].id[0]).collect();
    assert_eq!(same, vec![1, 1, 1]);
}

#[test]
fn unhealthy_peers_are_avoided_but_used_as_a_last_resort() {
    let cost = CostModel::default();
    let flaky = Candidate { recent_failures: 2, ..cand(1, 0, 8, 8.0) };
    let full = Candidate { has_free_cache: false, ..cand(2, 0, 8, 8.0) };
    let slow = cand(3, 0, 8, 2.0);
    let r = plan_route(8, &[flaky.clone(), full.clone(), slow.clone()], &cost);
    assert_eq!(r.map(|r| r.hops[0].id), Some([3; 32]));
    for only in [flaky, full] {
        let r = plan_route(8, std::slice::from_ref(&only), &cost);
        assert_eq!(r.map(|r| r.hops[0].id), Some(only.id));
    }
}

#[test]
fn invalid_candidates_are_ignored() {
    let cost = CostModel::default();
    let bad = vec![
        cand(1, 0, 8, 0.0),
        cand(2, 0, 8, f64::NAN),
        Candidate { rtt_ms: f64::INFINITY, ..cand(3, 0, 8, 1.0) },
        cand(4, 0, 9, 1.0),
        cand(5, 3, 3, 1.0),
    ];
    assert_eq!(plan_route(8, &bad, &cost), None);
}

#[test]
fn cost_formula() {
    let cost = CostModel { per_hop_ms: 5.0, no_cache_penalty_ms: 100.0, failure_penalty_ms: 7.0 };
    let c = Candidate { load: 1, has_free_cache: false, recent_failures: 2, ..cand(1, 0, 8, 4.0) };
    // 8 layers * 1000 / (4 / 2) + 20 / 2 + 5 + 100 + 14
    assert_eq!(cost.hop_cost(&c, 0, 8), Some(4000.0 + 10.0 + 5.0 + 100.0 + 14.0));
    assert_eq!(cost.hop_cost(&c, 0, 4), None, "exact peers serve their whole span only");
}

#[test]
fn a_peer_claiming_1e9_tokens_per_second_but_measured_slow_stops_attracting_routes() {
    let cost = CostModel::default();
    // Two replicas of 0..8: one claims 1e9 tokens/s per layer, the other 1,000.
    let (liar_claim, honest_claim) = (1e9, 1000.0);
    let plan = |liar_measured: Option<f64>, honest_measured: Option<f64>| {
        let cands = [
            cand(1, 0, 8, believed_throughput(liar_claim, liar_measured)),
            cand(2, 0, 8, believed_throughput(honest_claim, honest_measured)),
        ];
        plan_route(8, &cands, &cost).map(|r| r.hops[0].id)
    };
    // Before any measurement the claim wins: it is only a prior.
    assert_eq!(plan(None, None), Some([1; 32]));
    // Measured at 100 tokens/s (the honest one at 900): the liar loses every route.
    assert_eq!(plan(Some(100.0), Some(900.0)), Some([2; 32]));
    // Even measured faster than the honest peer, an overclaim of 2x or more halves it.
    assert_eq!(believed_throughput(1e9, Some(1000.0)), 500.0);
    assert_eq!(plan(Some(1000.0), Some(900.0)), Some([2; 32]));
    // An honest claim is replaced by its measurement.
    assert_eq!(believed_throughput(1000.0, Some(900.0)), 900.0);
    assert_eq!(believed_throughput(1000.0, Some(f64::NAN)), 1000.0);
}
