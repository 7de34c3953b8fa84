use std::collections::BTreeMap;

use super::*;

const SEC: u64 = 1_000;
const MIN: u64 = 60 * SEC;

/// Runs to `until` in one-second steps, recording whether ground-truth coverage is full.
fn run_sampled(sim: &mut Sim, until: u64, samples: &mut Vec<(u64, bool)>) {
    while sim.now < until {
        let t = (sim.now + SEC).min(until);
        sim.run_until(t);
        samples.push((t, sim.true_coverage().iter().all(|&c| c > 0.0)));
    }
}

/// Earliest sample time at or after `from` from which every sample up to `to` is full.
fn restored_at(samples: &[(u64, bool)], from: u64, to: u64) -> Option<u64> {
    let window: Vec<&(u64, bool)> = samples.iter().filter(|(t, _)| *t >= from && *t <= to).collect();
    let last_bad = window.iter().rposition(|(_, full)| !full);
    match last_bad {
        None => window.first().map(|(t, _)| *t),
        Some(k) => window.get(k + 1).map(|(t, _)| *t),
    }
}

fn ratio(sim: &Sim) -> f64 {
    crate::swarm::view::bottleneck(&sim.true_coverage()) / sim.upper_bound()
}

fn ttl_plus_skew(cfg: &SimConfig) -> u64 {
    3 * cfg.announce_interval_ms + cfg.view.max_clock_skew_ms + 2 * cfg.max_clock_offset_ms as u64
}

#[test]
fn thousand_peers_join_then_survive_churn() {
    // A slow announce rhythm (every 2 min, ttl 6 min) keeps 1,000 full views affordable: the
    // cost is one delivery per (announcement, live peer).
    let cfg = SimConfig { announce_interval_ms: 2 * MIN, check_base_ms: MIN, ..SimConfig::default() };
    let expiry = ttl_plus_skew(&cfg) + cfg.tick_ms;
    let mut sim = Sim::new(cfg, 1);
    let mut samples = Vec::new();

    // Phase 1: 1,000 peers join, one every 300 ms (5 virtual minutes), then settle.
    for k in 0..1000u64 {
        run_sampled(&mut sim, T0 + k * 300, &mut samples);
        sim.add_peer();
    }
    let joins_end = T0 + 7 * MIN;
    run_sampled(&mut sim, joins_end, &mut samples);
    let first_full = samples.iter().find(|(_, f)| *f).map(|(t, _)| *t);
    let first_full = first_full.unwrap_or(u64::MAX);
    assert!(first_full < joins_end, "full coverage never reached");
    let peers_then = sim.peers.len();
    let kept = restored_at(&samples, first_full, joins_end);
    assert_eq!(kept, Some(first_full), "coverage was lost during the join phase");
    let r_join = ratio(&sim);
    eprintln!(
        "1000 peers: full coverage at {:.1} s virtual ({} peers had joined); after joins ratio {r_join:.3}",
        (first_full - T0) as f64 / 1e3,
        (first_full - T0).div_ceil(300).min(peers_then as u64),
    );

    // Waves: (kind, joins during the wave, wave length). After a crash the wave lasts past the
    // moment every view must have dropped the crashed peers.
    let waves: [(&str, usize, u64); 3] = [
        ("crash 20%", 100, expiry + MIN),
        ("graceful 20%", 100, 3 * MIN),
        ("correlated crash", 0, expiry + 5 * MIN),
    ];
    let mut wave_start = joins_end;
    for (kind, joins, length) in waves {
        let live = sim.live();
        let victims: Vec<usize> = match kind {
            "correlated crash" => live
                .iter()
                .copied()
                .filter(|&i| (sim.peers[i].start..sim.peers[i].start + sim.peers[i].len).contains(&15))
                .collect(),
            _ => live.iter().copied().filter(|_| sim.rng().random::<f64>() < 0.2).collect(),
        };
        for &v in &victims {
            if kind == "graceful 20%" {
                sim.leave(v);
            } else {
                sim.crash(v);
            }
        }
        let hole_made = sim.true_coverage().iter().any(|&c| c <= 0.0);
        for k in 0..joins as u64 {
            run_sampled(&mut sim, wave_start + k * 300, &mut samples);
            sim.add_peer();
        }
        // Crashed peers vanish from every live view within ttl + skew (+ one tick).
        if kind != "graceful 20%" {
            run_sampled(&mut sim, wave_start + expiry, &mut samples);
            let crashed: Vec<PeerId> = victims.iter().map(|&v| sim.peers[v].id).collect();
            for i in sim.live() {
                let stale = crashed.iter().find_map(|id| sim.peers[i].view.get(id));
                assert!(stale.is_none(), "stale entry in view {i} at {}: {stale:?}", sim.now);
            }
        }
        let wave_end = wave_start + length;
        run_sampled(&mut sim, wave_end, &mut samples);
        let restored = restored_at(&samples, wave_start, wave_end);
        let Some(restored) = restored else { panic!("{kind}: coverage not restored") };
        // Restored well before the wave ends, so it was kept for a good while.
        assert!(restored + 2 * MIN <= wave_end, "{kind}: restored too late");
        eprintln!(
            "wave {kind}: {} peers left, hole made: {hole_made}, full coverage again after {:.1} s, \
             live {}, ratio {:.3}",
            victims.len(),
            (restored - wave_start) as f64 / 1e3,
            sim.live().len(),
            ratio(&sim)
        );
        wave_start = wave_end;
    }
    let st = &sim.stats;
    let minutes = ((sim.now - T0) / MIN + 1) as usize;
    let (mut moves_pm, mut aborts_pm) = (vec![0usize; minutes], vec![0usize; minutes]);
    st.moves.iter().for_each(|m| moves_pm[((m.at - T0) / MIN) as usize] += 1);
    st.aborts.iter().for_each(|&a| aborts_pm[((a - T0) / MIN) as usize] += 1);
    eprintln!("1000 peers: moves per minute {moves_pm:?}\n            aborts per minute {aborts_pm:?}");
    eprintln!(
        "1000 peers: {} moves, {} aborted, {} moves opened a serving gap, {} deliveries, {} lost",
        st.moves.len(),
        st.aborted_moves,
        st.move_serving_gaps,
        st.deliveries,
        st.lost
    );
    assert_eq!(st.move_holes, 0, "a rebalancing move uncovered a layer");
    assert_eq!(st.move_serving_gaps, 0, "a rebalancing move left a layer without a serving peer");
    assert!(st.moves.len() >= 10, "the correlated crash must be repaired by moves");
    // Measured with seed 1: 0.989 after the joins, 0.877 at the end (the correlated crash
    // removed 180 peers from the middle layers; no new peers joined after it).
    assert!(r_join >= 0.95, "ratio after joins {r_join}");
    assert!(ratio(&sim) >= 0.80, "final ratio {}", ratio(&sim));
}

#[test]
fn rebalancing_converges_without_oscillation() {
    let mut sim = Sim::new(SimConfig::default(), 7);
    // A thundering herd: 60 peers join within the same millisecond, each with a ticket snapshot
    // that knows almost nothing, so the initial placement is poor.
    for _ in 0..60 {
        sim.add_peer();
    }
    let mut samples = Vec::new();
    let end = T0 + 60 * MIN;
    run_sampled(&mut sim, end, &mut samples);
    let st = &sim.stats;
    let mut per_minute = vec![0usize; 60];
    for m in &st.moves {
        per_minute[((m.at - T0) / MIN) as usize] += 1;
    }
    eprintln!("herd of 60: moves per virtual minute {per_minute:?}, aborted {}", st.aborted_moves);
    assert!(st.moves.len() >= 5, "the herd must need rebalancing: {} moves", st.moves.len());
    let last = st.moves.iter().map(|m| m.at).max().unwrap_or(T0);
    eprintln!(
        "herd of 60: last move at {:.1} min, ratio {:.3}",
        (last - T0) as f64 / MIN as f64,
        ratio(&sim)
    );
    assert!(last < T0 + 20 * MIN, "still moving after 20 minutes");
    assert!(per_minute[20..].iter().all(|&m| m == 0));
    // No peer goes A→B and later B→A more than once.
    let mut by_peer: BTreeMap<usize, Vec<(u32, u32)>> = BTreeMap::new();
    for m in &st.moves {
        by_peer.entry(m.peer).or_default().push((m.from, m.to));
    }
    let mut back_and_forth = 0;
    for moves in by_peer.values() {
        let mut returns = 0;
        for (k, &(a, b)) in moves.iter().enumerate() {
            returns += moves[k + 1..].iter().filter(|&&(c, d)| (c, d) == (b, a)).count();
        }
        assert!(returns <= 1, "peer oscillates: {moves:?}");
        back_and_forth += returns;
    }
    eprintln!("herd of 60: {} peers moved, {back_and_forth} A→B→A returns", by_peer.len());
    assert_eq!(st.move_holes, 0);
    assert!(samples.iter().rev().take(30 * 60).all(|(_, f)| *f), "coverage must be full at the end");
    // Measured with seed 7: 0.913.
    assert!(ratio(&sim) >= 0.85, "ratio {}", ratio(&sim));
}
