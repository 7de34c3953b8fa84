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
//!   and a peer with [`Strikes::limit`] strikes in a row is banned.

use std::collections::HashMap;

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
    counts: HashMap<PeerId, u32>,
}

impl Strikes {
    /// Peers are banned at `limit` strikes in a row (at least 1).
    pub fn new(limit: u32) -> Self {
        Self { limit: limit.max(1), counts: HashMap::new() }
    }

    /// Strikes that ban.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// A peer's strikes.
    pub fn of(&self, peer: &PeerId) -> u32 {
        self.counts.get(peer).copied().unwrap_or(0)
    }

    /// A step through `route` missed its deadline and `silent` hops did not answer a ping:
    /// returns the peers to ban (the silent ones, or those struck out).
    pub fn timed_out(&mut self, route: &[PeerId], silent: &[PeerId]) -> Vec<PeerId> {
        if !silent.is_empty() {
            return silent.to_vec();
        }
        let mut out = Vec::new();
        for p in route {
            let n = self.counts.entry(*p).or_insert(0);
            *n += 1;
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
        let mut s = Strikes::new(3);
        // Silent hops are the culprits at once.
        assert_eq!(s.timed_out(&[p(1), p(2)], &[p(2)]), vec![p(2)]);
        assert_eq!(s.of(&p(1)), 0);
        // Peer 9 drops steps but answers pings. Its neighbour on the first route succeeds on
        // another route in between; peer 9 does not.
        assert!(s.timed_out(&[p(1), p(9)], &[]).is_empty());
        s.succeeded(&[p(1), p(3)]);
        assert!(s.timed_out(&[p(4), p(9)], &[]).is_empty());
        s.succeeded(&[p(4), p(5)]);
        assert_eq!(s.timed_out(&[p(1), p(9)], &[]), vec![p(9)]);
        assert_eq!((s.of(&p(1)), s.of(&p(9))), (1, 0));
    }
}
