//! Spot-checks: the decisions of the origin's verification of its workers, as pure code.
//!
//! # What is checked
//! On a share of decode steps ([`SpotCheckPolicy`]: a seeded draw, and always the first
//! [`SpotCheckConfig::first_steps`] steps through a peer the origin has not checked yet), the
//! driver asks every stage of the route for a copy of its output of that step (a `Tap`: each
//! stage sends the hidden states it forwards to the origin too, and the last stage's answer
//! is its sampled token) and runs the same history through another route: the same layer
//! boundaries, another replica of each span where one exists, or the origin's own copy of
//! the weights ([`crate::driver::Driver::set_local_weights`]). Each side of the comparison is
//! an [`Observation`]: the output at every boundary of the route and the sampled token.
//!
//! # What is compared
//! Hidden states by their relative L2 distance, `‖a − b‖ / ‖b‖`, against
//! [`SpotCheckConfig::tolerance`], and the sampled token exactly (with its logprob within
//! [`SpotCheckConfig::logprob_tolerance`]). Two honest replicas agree far within the
//! tolerance (the kernels are deterministic and row-invariant; what differs between CPUs is
//! the order of float sums); the measured figures are in BENCHMARKS.md.
//!
//! # Who is blamed
//! Outputs of honest stages downstream of a liar differ too (their input differs), so only the
//! **first** hop where the observations diverge is judged ([`judge`]): the inputs of that hop
//! agreed. Among the opinions at that hop, the origin's own computation is trusted; otherwise
//! a strict majority of distinct peers decides. Peers outside the majority are liars (the
//! driver bans them, counts and logs the ban, and replays every session that went through
//! them). Without a majority (two replicas and no weights at the origin) the verdict is
//! [`Verdict::Unresolved`]: the driver sets both suspects aside for a ban period.

use std::collections::HashMap;

use shoal_worker::service::PeerId;

/// Settings of the spot-checks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpotCheckConfig {
    /// Share of decode steps checked, `0.0..=1.0`.
    pub share: f64,
    /// Steps checked through a peer before the draw alone decides (0: none).
    pub first_steps: u32,
    /// Largest relative L2 distance between two honest outputs of a stage.
    pub tolerance: f64,
    /// Largest difference between two honest logprobs of the sampled token.
    pub logprob_tolerance: f32,
}

/// The default share of steps checked.
pub const DEFAULT_SHARE: f64 = 0.02;

/// The default tolerance. Honest replicas on one machine measured bit-identical (0.0) through
/// the decode and prefill kernel paths and with 1 or 2 threads (`tests/check_tolerance.rs`);
/// a liar's perturbation of 1e-3 is ten times over it. CPUs with other SIMD levels sum floats
/// in another order: not measured here (see docs/security.md).
pub const DEFAULT_TOLERANCE: f64 = 1e-4;

impl Default for SpotCheckConfig {
    fn default() -> Self {
        Self { share: DEFAULT_SHARE, first_steps: 2, tolerance: DEFAULT_TOLERANCE, logprob_tolerance: 1e-2 }
    }
}

impl SpotCheckConfig {
    /// Whether checks happen at all.
    pub fn enabled(&self) -> bool {
        self.share > 0.0 || self.first_steps > 0
    }
}

/// Which steps are checked: a seeded draw per step, plus the first steps through each peer.
#[derive(Debug, Clone)]
pub struct SpotCheckPolicy {
    config: SpotCheckConfig,
    state: u64,
    /// Checks passed per peer.
    checked: HashMap<PeerId, u32>,
}

impl SpotCheckPolicy {
    /// A policy drawing from `seed` (the driver seeds it at random: a worker cannot predict
    /// which steps are checked).
    pub fn new(config: SpotCheckConfig, seed: u64) -> Self {
        Self { config, state: seed, checked: HashMap::new() }
    }

    /// The settings.
    pub fn config(&self) -> &SpotCheckConfig {
        &self.config
    }

    /// Whether the next step through `route` is checked.
    pub fn should_check(&mut self, route: &[PeerId]) -> bool {
        let draw = self.next_unit();
        let fresh = route.iter().any(|p| self.checked.get(p).copied().unwrap_or(0) < self.config.first_steps);
        fresh || draw < self.config.share
    }

    /// A check through these peers passed.
    pub fn passed(&mut self, peers: &[PeerId]) {
        for p in peers {
            let n = self.checked.entry(*p).or_insert(0);
            *n = n.saturating_add(1);
        }
    }

    /// A peer was banned: it counts as new again if it ever comes back.
    pub fn forget(&mut self, peer: &PeerId) {
        self.checked.remove(peer);
    }

    /// A uniform draw in `[0, 1)` (splitmix64).
    fn next_unit(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Who computed one hop of an observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Computer {
    /// A peer.
    Peer(PeerId),
    /// The origin itself, from its own copy of the weights (trusted).
    Origin,
}

/// One route's outputs of a checked step.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Who computed each hop.
    pub hops: Vec<Computer>,
    /// The hidden states each hop but the last forwarded (f32, the step's last row).
    pub outputs: Vec<Vec<f32>>,
    /// The last hop's sampled token.
    pub token: u32,
    /// Its logprob.
    pub logprob: f32,
}

/// Relative L2 distance `‖a − b‖ / ‖b‖` (infinite when the lengths differ or a value is not
/// finite; 0 when both are zero).
pub fn distance(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        num += (f64::from(x) - f64::from(y)).powi(2);
        den += f64::from(y).powi(2);
    }
    if num == 0.0 {
        0.0
    } else if den == 0.0 {
        f64::INFINITY
    } else {
        (num / den).sqrt()
    }
}

/// Whether two observations agree at hop `hop`.
fn agree_at(a: &Observation, b: &Observation, hop: usize, config: &SpotCheckConfig) -> bool {
    match (a.outputs.get(hop), b.outputs.get(hop)) {
        (Some(x), Some(y)) => distance(x, y) <= config.tolerance,
        // The last hop: its token.
        _ => a.token == b.token && (a.logprob - b.logprob).abs() <= config.logprob_tolerance,
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every observation agrees.
    Agree,
    /// At `hop` (the first where observations diverge) the observations `wrong` (indices) are
    /// outvoted; `liars` are the peers that computed that hop for them and for no observation
    /// of the majority (a peer that is on both sides did not cause the difference: its input
    /// history did, see the module docs).
    Wrong {
        /// The hop.
        hop: usize,
        /// Indices of the observations in the minority.
        wrong: Vec<usize>,
        /// The peers to ban.
        liars: Vec<PeerId>,
    },
    /// The observations diverge at `hop` and no majority (nor the origin) tells which is
    /// right: another opinion is needed.
    Unresolved {
        /// The hop.
        hop: usize,
        /// The distinct peers that computed that hop.
        suspects: Vec<PeerId>,
    },
}

/// Judges observations of one step through routes with the same boundaries (see the module
/// docs): the first hop where any two disagree decides.
pub fn judge(observations: &[Observation], config: &SpotCheckConfig) -> Verdict {
    let Some(first) = observations.first() else {
        return Verdict::Agree;
    };
    for hop in 0..first.hops.len() {
        if observations.iter().all(|o| agree_at(o, first, hop, config)) {
            continue;
        }
        let who = |o: &Observation| o.hops.get(hop).copied().unwrap_or(Computer::Origin);
        let mut computers: Vec<Computer> = Vec::new();
        for o in observations {
            if !computers.contains(&who(o)) {
                computers.push(who(o));
            }
        }
        // The reference: the origin's own computation, else the largest agreeing group.
        let reference = observations.iter().find(|o| who(o) == Computer::Origin).or_else(|| {
            observations
                .iter()
                .max_by_key(|r| observations.iter().filter(|o| agree_at(o, r, hop, config)).count())
        });
        let Some(reference) = reference else {
            return Verdict::Agree;
        };
        let trusted = who(reference) == Computer::Origin;
        let (mut right, mut wrong) = (Vec::new(), Vec::new());
        for (i, o) in observations.iter().enumerate() {
            if agree_at(o, reference, hop, config) { right.push(i) } else { wrong.push(i) }
        }
        let right_computers: Vec<Computer> = right.iter().map(|&i| who(&observations[i])).collect();
        let wrong_computers: Vec<Computer> = wrong.iter().map(|&i| who(&observations[i])).collect();
        let clean = right_computers.iter().filter(|c| !wrong_computers.contains(c));
        let mut distinct_clean: Vec<Computer> = Vec::new();
        for c in clean {
            if !distinct_clean.contains(c) {
                distinct_clean.push(*c);
            }
        }
        if !trusted && 2 * distinct_clean.len() <= computers.len() {
            let suspects = computers
                .iter()
                .filter_map(|c| match c {
                    Computer::Peer(p) => Some(*p),
                    Computer::Origin => None,
                })
                .collect();
            return Verdict::Unresolved { hop, suspects };
        }
        let mut liars: Vec<PeerId> = Vec::new();
        for c in &wrong_computers {
            if let Computer::Peer(p) = c
                && !right_computers.contains(c)
                && !liars.contains(p)
            {
                liars.push(*p);
            }
        }
        return Verdict::Wrong { hop, wrong, liars };
    }
    Verdict::Agree
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        [n; 32]
    }

    fn obs(peers: &[u8], outputs: &[f32], token: u32) -> Observation {
        Observation {
            hops: peers
                .iter()
                .map(|&p| if p == 0 { Computer::Origin } else { Computer::Peer(peer(p)) })
                .collect(),
            outputs: outputs.iter().map(|&v| vec![1.0, 2.0, v]).collect(),
            token,
            logprob: -0.5,
        }
    }

    #[test]
    fn distance_is_relative_l2() {
        assert_eq!(distance(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
        assert!((distance(&[3.0, 4.005], &[3.0, 4.0]) - 1e-3).abs() < 1e-6);
        assert_eq!(distance(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(distance(&[f32::NAN], &[1.0]), f64::INFINITY);
        assert_eq!(distance(&[1.0], &[0.0]), f64::INFINITY);
    }

    #[test]
    fn honest_noise_agrees_and_a_perturbation_of_1e_3_does_not() {
        let c = SpotCheckConfig::default();
        let base: Vec<f32> = (0..576).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let noisy: Vec<f32> =
            base.iter().enumerate().map(|(i, v)| v * (1.0 + 1e-6 * (i % 3) as f32)).collect();
        let lied: Vec<f32> =
            base.iter().enumerate().map(|(i, v)| v * if i % 2 == 0 { 1.001 } else { 0.999 }).collect();
        assert!(distance(&noisy, &base) <= c.tolerance);
        assert!(distance(&lied, &base) > c.tolerance);
    }

    #[test]
    fn agreeing_observations_pass() {
        let c = SpotCheckConfig::default();
        assert_eq!(judge(&[obs(&[1, 2], &[3.0], 7), obs(&[3, 2], &[3.0], 7)], &c), Verdict::Agree);
    }

    #[test]
    fn the_first_divergent_hop_is_judged_and_a_majority_decides() {
        let c = SpotCheckConfig::default();
        // Peer 1 lies at hop 0; downstream (hop 1, the token) differs as a consequence.
        let primary = obs(&[1, 4], &[3.5], 8);
        let shadow = obs(&[2, 4], &[3.0], 7);
        let third = obs(&[3, 4], &[3.0], 7);
        assert_eq!(
            judge(&[primary.clone(), shadow.clone()], &c),
            Verdict::Unresolved { hop: 0, suspects: vec![peer(1), peer(2)] }
        );
        assert_eq!(
            judge(&[primary.clone(), shadow.clone(), third], &c),
            Verdict::Wrong { hop: 0, wrong: vec![0], liars: vec![peer(1)] }
        );
        // The origin's own computation is trusted, even alone against a peer.
        let local = obs(&[0, 0], &[3.0], 7);
        assert_eq!(
            judge(&[primary, local.clone()], &c),
            Verdict::Wrong { hop: 0, wrong: vec![0], liars: vec![peer(1)] }
        );
        // A liar in the shadow route is caught the same way.
        assert_eq!(
            judge(&[obs(&[1, 4], &[3.0], 7), obs(&[2, 4], &[9.0], 7), local], &c),
            Verdict::Wrong { hop: 0, wrong: vec![1], liars: vec![peer(2)] }
        );
    }

    #[test]
    fn the_last_hop_is_judged_by_its_token() {
        let c = SpotCheckConfig::default();
        let v = judge(&[obs(&[1, 4], &[3.0], 8), obs(&[1, 5], &[3.0], 7), obs(&[1, 6], &[3.0], 7)], &c);
        assert_eq!(v, Verdict::Wrong { hop: 1, wrong: vec![0], liars: vec![peer(4)] });
    }

    #[test]
    fn a_peer_on_both_sides_is_not_blamed_for_the_difference() {
        let c = SpotCheckConfig::default();
        // Peer 4 computes hop 1 in both routes; the routes differ before it (peers 1 and 2)
        // and its outputs differ: an earlier step fed it different inputs.
        let v = judge(&[obs(&[1, 4], &[3.0], 8), obs(&[2, 4], &[3.0], 7)], &c);
        assert_eq!(v, Verdict::Unresolved { hop: 1, suspects: vec![peer(4)] });
        // With the origin's weights the wrong observation is known, but peer 4 is not a liar.
        let v = judge(&[obs(&[1, 4], &[3.0], 8), obs(&[2, 4], &[3.0], 7), obs(&[0, 0], &[3.0], 7)], &c);
        assert_eq!(v, Verdict::Wrong { hop: 1, wrong: vec![0], liars: vec![] });
    }

    #[test]
    fn the_draw_checks_about_the_share_and_new_peers_always() {
        let config = SpotCheckConfig { share: 0.1, first_steps: 2, ..SpotCheckConfig::default() };
        let mut p = SpotCheckPolicy::new(config, 42);
        let route = [peer(1), peer(2)];
        assert!(p.should_check(&route));
        p.passed(&route);
        assert!(p.should_check(&route));
        p.passed(&route);
        let checked = (0..10_000).filter(|_| p.should_check(&route)).count();
        assert!((800..1200).contains(&checked), "{checked} of 10000 at a share of 0.1");
        // A new peer on the route is checked at once.
        assert!(p.should_check(&[peer(1), peer(3)]));
        // Nothing when disabled.
        let off = SpotCheckConfig { share: 0.0, first_steps: 0, ..SpotCheckConfig::default() };
        let mut p = SpotCheckPolicy::new(off, 1);
        assert!(!off.enabled());
        assert!((0..1000).all(|_| !p.should_check(&route)));
    }
}
