use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::swarm::announce::Announcement;
use crate::swarm::view::{ViewConfig, ViewEvent, bottleneck};

const T0: u64 = 1_000_000;

/// A view holding the given peers `(start, len, throughput, state)`, ids 0, 1, 2, ...
fn view_of(n_layers: u32, peers: &[(u32, u32, f64, PeerState)]) -> SwarmView {
    let mut v = SwarmView::new([0; 32], n_layers, ViewConfig::default());
    for (i, &(start, len, t, state)) in peers.iter().enumerate() {
        let a = Announcement {
            node: [i as u8; 32],
            model: [0; 32],
            n_layers,
            start,
            end: start + len,
            state,
            throughput: t as f32,
            load: 0,
            free_kv_bytes: 0,
            version: String::new(),
            seq: 1,
            issued_at_ms: T0,
            ttl_ms: 60_000,
            addrs: Vec::new(),
            holds: Default::default(),
        };
        v.handle(ViewEvent::Announced(a), T0);
    }
    v
}

/// `choose_span` by its definition, the slow way.
fn choose_naive(cov: &[f64], len: u32, t: f64) -> u32 {
    let len = (len as usize).clamp(1, cov.len());
    let mut best: Option<(f64, f64, usize)> = None;
    for s in 0..=cov.len() - len {
        let after: Vec<f64> =
            cov.iter().enumerate().map(|(l, &c)| if (s..s + len).contains(&l) { c + t } else { c }).collect();
        let b = bottleneck(&after);
        let sum: f64 = cov[s..s + len].iter().sum();
        if best.is_none_or(|(bb, bs, _)| b > bb || (b == bb && sum < bs)) {
            best = Some((b, sum, s));
        }
    }
    best.map_or(0, |(_, _, s)| s as u32)
}

proptest! {
    #[test]
    fn choose_span_matches_its_definition(
        cov in proptest::collection::vec(0u8..6, 1..20),
        len in 0u32..25,
        t in 1u8..4,
    ) {
        // Small integers make exact ties common, which exercises the tie-breaks.
        let cov: Vec<f64> = cov.into_iter().map(f64::from).collect();
        prop_assert_eq!(choose_span(&cov, len, f64::from(t)), choose_naive(&cov, len, f64::from(t)));
    }
}

#[test]
fn choose_span_fills_the_weakest_window() {
    assert_eq!(choose_span(&[5.0, 5.0, 1.0, 1.0, 5.0, 5.0], 2, 1.0), 2);
    // All windows give the same bottleneck (1): smallest sum wins.
    assert_eq!(choose_span(&[1.0, 9.0, 9.0, 1.0, 2.0, 1.0], 3, 0.5), 3);
    // Full tie: lowest start.
    assert_eq!(choose_span(&[0.0; 6], 2, 1.0), 0);
    assert_eq!(choose_span(&[3.0, 3.0, 0.0], 2, 1.0), 1);
    assert_eq!(choose_span(&[1.0, 2.0], 10, 1.0), 0, "len is clamped");
    assert_eq!(choose_span(&[], 3, 1.0), 0);
}

#[test]
fn span_len_for_memory_is_clamped() {
    assert_eq!(span_len_for_memory(10 << 30, 1 << 30, 30), 10);
    assert_eq!(span_len_for_memory(100, 1 << 30, 30), 1, "at least one layer");
    assert_eq!(span_len_for_memory(u64::MAX, 1, 30), 30, "at most n_layers");
    assert_eq!(span_len_for_memory(5, 0, 30), 30);
    assert_eq!(span_len_for_memory(5, 1, 0), 1);
}

#[test]
fn never_leaves_a_layer_it_alone_serves() {
    // Peer 0 alone serves layers 0..4; peers 1 and 2 pile up on 4..8.
    let v = view_of(
        8,
        &[(0, 4, 1.0, PeerState::Serving), (4, 4, 1.0, PeerState::Serving), (4, 4, 1.0, PeerState::Serving)],
    );
    assert!(!can_leave(&v, [0; 32]));
    assert_eq!(should_move(&v, [0; 32], &RebalanceConfig::default()), None);
    assert!(can_leave(&v, [1; 32]));
}

#[test]
fn moves_to_fill_a_hole() {
    let v = view_of(
        8,
        &[(0, 4, 1.0, PeerState::Serving), (0, 4, 1.0, PeerState::Serving), (6, 2, 1.0, PeerState::Serving)],
    );
    // Layers 4 and 5 are uncovered; peer 1 can leave 0..4 safely and take 3..7 (or 2..6).
    let dest = should_move(&v, [1; 32], &RebalanceConfig::default());
    assert_eq!(dest, Some(2), "window 2..6 covers both holes with the smallest sum");
    // Peer 0 is symmetric to peer 1; peer 2 is alone on 6..8 and must stay.
    assert_eq!(should_move(&v, [2; 32], &RebalanceConfig::default()), None);
}

#[test]
fn hysteresis_blocks_small_gains() {
    // Coverage 4 on layers 0..4, 2 on 4..8; moving peer 1 (0.5) to 4..8 makes the bottleneck
    // 2.5: a gain of 1.25.
    let peers = [
        (0, 4, 3.0, PeerState::Serving),
        (0, 4, 0.5, PeerState::Serving),
        (4, 4, 1.5, PeerState::Serving),
        (0, 8, 0.5, PeerState::Serving),
    ];
    let v = view_of(8, &peers);
    assert_eq!(v.bottleneck(), 2.0);
    assert_eq!(
        should_move(
            &v,
            [1; 32],
            &RebalanceConfig { min_gain: 1.3, min_step: f64::INFINITY, min_step_gain: 1.0 }
        ),
        None
    );
    assert_eq!(
        should_move(
            &v,
            [1; 32],
            &RebalanceConfig { min_gain: 1.15, min_step: f64::INFINITY, min_step_gain: 1.0 }
        ),
        Some(4)
    );
}

#[test]
fn absolute_margin_moves_in_large_swarms_and_blocks_the_way_back() {
    let rc = RebalanceConfig::default();
    let s = PeerState::Serving;
    // 100 on layers 0..4 (a big peer and the mover of 10), 70 on 4..8: moving lifts the weak
    // side to 80 (1.14×, below the relative margin) by the mover's full throughput.
    let v = view_of(8, &[(0, 4, 90.0, s), (0, 4, 10.0, s), (4, 4, 70.0, s)]);
    assert_eq!(should_move(&v, [1; 32], &rc), Some(4));
    assert_eq!(should_move(&v, [1; 32], &RebalanceConfig { min_step: f64::INFINITY, ..rc.clone() }), None);
    // After the move (90 vs 80) going back would lower the changed layers' minimum.
    let v = view_of(8, &[(0, 4, 90.0, s), (4, 4, 10.0, s), (4, 4, 70.0, s)]);
    assert_eq!(should_move(&v, [1; 32], &rc), None);
    // Close enough (100 vs 85): a move would gain only 5 < 0.75 × 10.
    let v = view_of(8, &[(0, 4, 90.0, s), (0, 4, 10.0, s), (4, 4, 85.0, s)]);
    assert_eq!(should_move(&v, [1; 32], &rc), None);
}

#[test]
fn only_serving_peers_move_and_joining_counts_as_planned() {
    let rc = RebalanceConfig::default();
    let peers =
        [(0, 4, 1.0, PeerState::Joining), (0, 4, 1.0, PeerState::Serving), (0, 4, 1.0, PeerState::Serving)];
    assert_eq!(should_move(&view_of(8, &peers), [0; 32], &rc), None, "a joining peer does not move");
    assert_eq!(should_move(&view_of(8, &peers), [9; 32], &rc), None, "unknown peer");
    // Layers 4..8 are being loaded by a joining peer: nobody rushes there.
    let peers =
        [(0, 4, 1.0, PeerState::Serving), (0, 4, 1.0, PeerState::Serving), (4, 4, 1.0, PeerState::Joining)];
    assert_eq!(should_move(&view_of(8, &peers), [1; 32], &rc), None);
}

#[test]
fn next_check_is_jittered_within_bounds() {
    let mut rng = StdRng::seed_from_u64(7);
    let draws: Vec<u64> = (0..1000).map(|_| next_check_ms(&mut rng, 30_000)).collect();
    assert!(draws.iter().all(|&d| (15_000..=45_000).contains(&d)));
    let (lo, hi) = (draws.iter().min().copied().unwrap_or(0), draws.iter().max().copied().unwrap_or(0));
    assert!(lo < 17_000 && hi > 43_000, "spread {lo}..{hi}");
    assert_eq!(next_check_ms(&mut rng, 0), 0);
}

/// Largest bottleneck over every assignment of starts (the true optimum).
fn brute_force_optimum(n: u32, peers: &[(u32, f64)]) -> f64 {
    fn go(n: u32, peers: &[(u32, f64)], cov: &mut Vec<f64>) -> f64 {
        let Some((&(len, t), rest)) = peers.split_first() else { return bottleneck(cov) };
        let mut best: f64 = 0.0;
        for s in 0..=n - len {
            for c in &mut cov[s as usize..(s + len) as usize] {
                *c += t;
            }
            best = best.max(go(n, rest, cov));
            for c in &mut cov[s as usize..(s + len) as usize] {
                *c -= t;
            }
        }
        best
    }
    go(n, peers, &mut vec![0.0; n as usize])
}

/// Joins peers one by one with `choose_span`, then applies `should_move` in id order until no
/// peer wants to move. Returns (bottleneck, moves).
fn join_then_rebalance(n: u32, peers: &[(u32, f64)]) -> (f64, usize) {
    let mut placed: Vec<(u32, u32, f64, PeerState)> = Vec::new();
    for &(len, t) in peers {
        let cov = view_of(n, &placed).coverage();
        placed.push((choose_span(&cov, len, t), len, t, PeerState::Serving));
    }
    let mut moves = 0;
    for _round in 0..100 {
        let mut moved = false;
        for i in 0..placed.len() {
            if let Some(dest) = should_move(&view_of(n, &placed), [i as u8; 32], &RebalanceConfig::default())
            {
                placed[i].0 = dest;
                moves += 1;
                moved = true;
            }
        }
        if !moved {
            return (view_of(n, &placed).bottleneck(), moves);
        }
    }
    panic!("rebalancing did not converge: {placed:?}");
}

#[test]
fn small_swarms_against_the_true_optimum() {
    let mut rng = StdRng::seed_from_u64(42);
    let (mut ratios, mut total_moves) = (Vec::new(), 0);
    for _case in 0..150 {
        let n = rng.random_range(3..=8u32);
        let k = rng.random_range(2..=6usize);
        let peers: Vec<(u32, f64)> = (0..k)
            .map(|_| (rng.random_range(1..=n), f64::from((0.5 * 8f64.powf(rng.random::<f64>())) as f32)))
            .collect();
        let opt = brute_force_optimum(n, &peers);
        let (got, moves) = join_then_rebalance(n, &peers);
        total_moves += moves;
        assert!(got <= opt + 1e-9, "cannot beat the optimum");
        if opt > 0.0 {
            ratios.push(got / opt);
        }
    }
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let at_opt = ratios.iter().filter(|&&r| r > 1.0 - 1e-9).count();
    eprintln!(
        "small swarms: {} cases with a coverable optimum, mean ratio {mean:.3}, min {min:.3}, \
         {at_opt} at the optimum, {total_moves} moves",
        ratios.len()
    );
    // Measured with this seed: mean 0.987, min 0.706 (120 of 142 cases exactly optimal).
    assert!(mean >= 0.93, "mean ratio {mean}");
    assert!(min >= 0.6, "min ratio {min}");
}
