//! Who is to blame when a step fails, as pure code (the driver acts on the answers).
//!
//! - A stage that reports its **input** as non-finite or misshapen (`NonFinite`, `BadShape`)
//!   did not produce it: the hop before it did ([`culprit_of_error`]). A first stage's input
//!   comes from the origin itself, whose ids are checked before they leave, so there the
//!   reporter is charged.
//! - `NextHopUnreachable` charges the hop after the reporter; any other error the reporter.
//! - After a missed deadline the hops that do not answer a ping are the culprits. When every
//!   hop answers, one of them may be taking steps and dropping them: each hop of the route gets
//!   a strike ([`Strikes`]), the planner avoids struck peers where it can (so the next
//!   attempts separate the dropper from its neighbours), a success clears a peer's strikes,
//!   and a peer with [`Strikes::limit`] strikes in a row is banned. Timeouts through a peer
//!   within one window (the step deadline) count as one strike: when a slow link makes many
//!   sessions' steps miss their deadlines at once, that is one event, not a peer struck out
//!   (on the namespace bed at 25 ms with 1% loss, 32 streams timing out together used to ban
//!   every peer of the route at once).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use shoal_worker::protocol::ErrorCode;
use shoal_worker::service::PeerId;

/// The hop of `route` to charge for `code`, reported by the hop at `reporter`.
pub fn culprit_of_error(route: &[PeerId], reporter: usize, code: ErrorCode) -> Option<PeerId> {
    match code {
        ErrorCode::NextHopUnreachable => route.get(reporter + 1).copied(),
        ErrorCode::NonFinite | ErrorCode::BadShape if reporter > 0 => route.get(reporter - 1).copied(),
        _ => route.get(reporter).copied(),
    }
}

/// Unexplained timeouts per peer (see the module docs).
#[derive(Debug, Clone)]
pub struct Strikes {
    limit: u32,
    window: Duration,
    /// Strikes and when the last one was given.
    counts: HashMap<PeerId, (u32, Instant)>,
}

impl Strikes {
    /// Peers are banned at `limit` strikes in a row (at least 1), at most one strike per
    /// `window`.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self { limit: limit.max(1), window, counts: HashMap::new() }
    }

    /// Strikes that ban.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// A peer's strikes.
    pub fn of(&self, peer: &PeerId) -> u32 {
        self.counts.get(peer).map_or(0, |&(n, _)| n)
    }

    /// A step through `route` missed its deadline at `now` and `silent` hops did not answer a
    /// ping: returns the peers to ban (the silent ones, or those struck out). A peer struck
    /// less than a window ago is not struck again.
    pub fn timed_out(&mut self, route: &[PeerId], silent: &[PeerId], now: Instant) -> Vec<PeerId> {
        if !silent.is_empty() {
            return silent.to_vec();
        }
        let mut out = Vec::new();
        for p in route {
            let window = self.window;
            let (n, at) = self.counts.entry(*p).or_insert((0, now));
            if *n > 0 && now.saturating_duration_since(*at) < window {
                continue;
            }
            *n += 1;
            *at = now;
            if *n >= self.limit {
                out.push(*p);
            }
        }
        for p in &out {
            self.counts.remove(p);
        }
        out
    }

    /// Steps through these peers succeeded: their strikes are cleared.
    pub fn succeeded(&mut self, peers: &[PeerId]) {
        for p in peers {
            self.counts.remove(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u8) -> PeerId {
        [n; 32]
    }

    #[test]
    fn bad_input_is_charged_to_the_hop_that_produced_it() {
        let route = [p(1), p(2), p(3)];
        assert_eq!(culprit_of_error(&route, 2, ErrorCode::NonFinite), Some(p(2)));
        assert_eq!(culprit_of_error(&route, 1, ErrorCode::BadShape), Some(p(1)));
        // The first stage's input is the origin's own.
        assert_eq!(culprit_of_error(&route, 0, ErrorCode::NonFinite), Some(p(1)));
        assert_eq!(culprit_of_error(&route, 1, ErrorCode::NextHopUnreachable), Some(p(3)));
        assert_eq!(culprit_of_error(&route, 2, ErrorCode::NextHopUnreachable), None);
        assert_eq!(culprit_of_error(&route, 1, ErrorCode::Internal), Some(p(2)));
    }

    #[test]
    fn a_dropper_that_answers_pings_is_struck_out_and_its_neighbours_are_cleared() {
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let mut s = Strikes::new(3, Duration::from_secs(10));
        // Silent hops are the culprits at once.
        assert_eq!(s.timed_out(&[p(1), p(2)], &[p(2)], at(0)), vec![p(2)]);
        assert_eq!(s.of(&p(1)), 0);
        // Peer 9 drops steps but answers pings. Its neighbour on the first route succeeds on
        // another route in between; peer 9 does not.
        assert!(s.timed_out(&[p(1), p(9)], &[], at(0)).is_empty());
        s.succeeded(&[p(1), p(3)]);
        assert!(s.timed_out(&[p(4), p(9)], &[], at(20)).is_empty());
        s.succeeded(&[p(4), p(5)]);
        assert_eq!(s.timed_out(&[p(1), p(9)], &[], at(40)), vec![p(9)]);
        assert_eq!((s.of(&p(1)), s.of(&p(9))), (1, 0));
    }

    #[test]
    fn timeouts_within_one_window_are_one_strike() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut s = Strikes::new(3, Duration::from_secs(10));
        let route = [p(1), p(2), p(3)];
        // 32 sessions' steps miss their deadlines together on a slow link: one strike each.
        for i in 0..32 {
            assert!(s.timed_out(&route, &[], at(i * 10)).is_empty(), "timeout {i}");
        }
        assert_eq!(route.map(|q| s.of(&q)), [1, 1, 1]);
        // A window later, a second event; a third bans.
        assert!(s.timed_out(&route, &[], at(10_000)).is_empty());
        assert!(s.timed_out(&route, &[], at(15_000)).is_empty(), "within the second window");
        assert_eq!(s.timed_out(&route, &[], at(20_000)), route.to_vec());
        assert_eq!(s.of(&p(1)), 0, "a banned peer's strikes are cleared");
    }
}
