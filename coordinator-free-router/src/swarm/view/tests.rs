use super::*;
use crate::swarm::announce::{MAX_ANNOUNCEMENT_BYTES, Signed, open};

const MODEL: ModelId = [0xAA; 32];
const T0: u64 = 1_000_000;

fn ann(node: u8, start: u32, end: u32, seq: u64, issued_at_ms: u64) -> Announcement {
    Announcement {
        node: [node; 32],
        model: MODEL,
        n_layers: 8,
        start,
        end,
        state: PeerState::Serving,
        throughput: 2.0,
        load: 0,
        free_kv_bytes: 1 << 20,
        version: "t".into(),
        seq,
        issued_at_ms,
        ttl_ms: 10_000,
        addrs: Vec::new(),
        holds: Default::default(),
    }
}

fn view() -> SwarmView {
    SwarmView::new(MODEL, 8, ViewConfig { max_clock_skew_ms: 1_000, ..ViewConfig::default() })
}

fn one(v: &mut SwarmView, a: Announcement, now: u64) -> ViewChange {
    let changes = v.handle(ViewEvent::Announced(a), now);
    assert_eq!(changes.len(), 1);
    changes[0]
}

#[test]
fn join_update_and_coverage() {
    let mut v = view();
    assert_eq!(one(&mut v, ann(1, 0, 4, 1, T0), T0), ViewChange::Joined([1; 32]));
    assert_eq!(one(&mut v, ann(2, 2, 8, 1, T0), T0), ViewChange::Joined([2; 32]));
    assert_eq!(v.coverage(), vec![2.0, 2.0, 4.0, 4.0, 2.0, 2.0, 2.0, 2.0]);
    assert_eq!(v.bottleneck(), 2.0);
    assert!(v.uncovered_layers().is_empty());
    assert_eq!(one(&mut v, ann(2, 5, 8, 2, T0 + 1), T0 + 1), ViewChange::Updated([2; 32]));
    assert_eq!(v.uncovered_layers(), vec![4]);
    assert_eq!(v.bottleneck(), 0.0);
    let ids: Vec<PeerId> = v.peers().map(|a| a.node).collect();
    assert_eq!(ids, vec![[1; 32], [2; 32]]);
}

#[test]
fn bad_announcements_are_ignored_with_the_right_reason() {
    let mut v = view();
    let mut other = ann(1, 0, 4, 1, T0);
    other.model = [0xBB; 32];
    assert_eq!(one(&mut v, other, T0), ViewChange::Ignored([1; 32], IgnoreReason::OtherModel));
    let mut other_layers = ann(1, 0, 4, 1, T0);
    other_layers.n_layers = 9;
    assert_eq!(one(&mut v, other_layers, T0), ViewChange::Ignored([1; 32], IgnoreReason::OtherLayerCount));
    let mut oversized = ann(1, 0, 4, 1, T0);
    oversized.version = "v".repeat(40);
    assert_eq!(
        one(&mut v, oversized, T0),
        ViewChange::Ignored([1; 32], IgnoreReason::Invalid(AnnounceError::VersionTooLong(40)))
    );
    // Skew is 1 s: 1 s ahead is tolerated, 1 s + 1 ms is not.
    assert_eq!(
        one(&mut v, ann(1, 0, 4, 1, T0 + 1_001), T0),
        ViewChange::Ignored([1; 32], IgnoreReason::FromFuture)
    );
    // ttl 10 s + skew 1 s: issued 11 s ago is expired on arrival.
    assert_eq!(
        one(&mut v, ann(1, 0, 4, 1, T0 - 11_000), T0),
        ViewChange::Ignored([1; 32], IgnoreReason::Expired)
    );
    assert!(v.is_empty(), "nothing refused may enter the view");
    assert_eq!(one(&mut v, ann(1, 0, 4, 5, T0 + 1_000), T0), ViewChange::Joined([1; 32]));
    assert_eq!(one(&mut v, ann(1, 0, 4, 5, T0), T0), ViewChange::Ignored([1; 32], IgnoreReason::Duplicate));
    assert_eq!(
        one(&mut v, ann(1, 4, 8, 4, T0), T0),
        ViewChange::Ignored([1; 32], IgnoreReason::Stale { seq: 4, newest: 5 })
    );
    assert_eq!(v.get(&[1; 32]).map(|a| (a.start, a.seq)), Some((0, 5)));
}

#[test]
fn forged_and_oversized_wire_input_never_reaches_the_view() {
    let mut v = view();
    let good = ann(1, 0, 4, 1, T0);
    let verify = |who: &PeerId, _: &[u8], sig: &[u8; 64]| sig[..32] == who[..];
    let mut sig = [0u8; 64];
    sig[..32].copy_from_slice(&[1; 32]);
    let forged = Signed { body: good.encode(), signature: [9; 64] };
    assert_eq!(open(&forged, verify), Err(AnnounceError::BadSignature));
    let oversized = Signed { body: vec![1; MAX_ANNOUNCEMENT_BYTES + 1], signature: sig };
    assert!(matches!(open(&oversized, verify), Err(AnnounceError::TooLarge { .. })));
    let wire = Signed { body: good.encode(), signature: sig }.encode();
    let opened = Signed::decode(&wire).and_then(|s| open(&s, verify));
    assert_eq!(opened.as_ref(), Ok(&good));
    if let Ok(a) = opened {
        assert_eq!(one(&mut v, a, T0), ViewChange::Joined([1; 32]));
    }
    assert_eq!(v.len(), 1);
}

#[test]
fn silent_peer_leaves_within_ttl_plus_skew() {
    let mut v = view();
    one(&mut v, ann(1, 0, 8, 1, T0), T0);
    let deadline = T0 + 10_000 + 1_000;
    let mut left_at = None;
    for now in (T0..T0 + 20_000).step_by(250) {
        let changes = v.handle(ViewEvent::Tick, now);
        if changes == vec![ViewChange::Left([1; 32], LeaveReason::Expired)] {
            left_at = Some(now);
            break;
        }
        assert!(changes.is_empty());
    }
    assert_eq!(left_at, Some(deadline));
    assert!(v.is_empty());
    assert_eq!(v.uncovered_layers().len(), 8);
}

#[test]
fn replay_cannot_resurrect_a_departed_node() {
    let mut v = view();
    one(&mut v, ann(1, 0, 8, 3, T0), T0);
    // Refresh with a long ttl, then let it expire.
    let mut long = ann(1, 0, 8, 4, T0);
    long.ttl_ms = 60_000;
    one(&mut v, long, T0);
    assert_eq!(v.handle(ViewEvent::Tick, T0 + 61_000), vec![ViewChange::Left([1; 32], LeaveReason::Expired)]);
    // A replay of seq 3 re-issued "now" by an attacker still carries the old seq.
    assert_eq!(
        one(&mut v, ann(1, 0, 8, 3, T0 + 61_000), T0 + 61_000),
        ViewChange::Ignored([1; 32], IgnoreReason::Stale { seq: 3, newest: 4 })
    );
    assert_eq!(v.newest_seq(&[1; 32]), Some(4));
    // A genuinely new announcement brings it back.
    assert_eq!(one(&mut v, ann(1, 0, 8, 5, T0 + 61_000), T0 + 61_000), ViewChange::Joined([1; 32]));
    assert_eq!(v.remembered(), 0);
}

#[test]
fn seq_memory_is_bounded_in_time_and_size() {
    let config = ViewConfig { max_remembered: 3, seq_memory_ms: 5_000, ..ViewConfig::default() };
    let mut v = SwarmView::new(MODEL, 8, config);
    for n in 1..=5u8 {
        one(&mut v, ann(n, 0, 8, 1, T0 + u64::from(n)), T0 + u64::from(n));
    }
    let left = v.handle(ViewEvent::Tick, T0 + 50_000);
    assert_eq!(left.len(), 5);
    assert_eq!(v.remembered(), 3, "size bound");
    assert_eq!(v.newest_seq(&[5; 32]), Some(1));
    v.handle(ViewEvent::Tick, T0 + 55_000);
    assert_eq!(v.remembered(), 0, "time bound");
}

#[test]
fn draining_and_joining_contribute_no_coverage() {
    let mut v = view();
    one(&mut v, ann(1, 0, 8, 1, T0), T0);
    let mut joining = ann(2, 0, 8, 1, T0);
    joining.state = PeerState::Joining;
    assert_eq!(one(&mut v, joining, T0), ViewChange::Joined([2; 32]));
    assert_eq!(v.coverage(), vec![2.0; 8]);
    let mut draining = ann(1, 0, 8, 2, T0);
    draining.state = PeerState::Draining;
    assert_eq!(one(&mut v, draining.clone(), T0), ViewChange::Left([1; 32], LeaveReason::Draining));
    assert_eq!(v.coverage(), vec![0.0; 8]);
    assert_eq!(v.bottleneck(), 0.0);
    draining.node = [3; 32];
    assert_eq!(one(&mut v, draining, T0), ViewChange::Ignored([3; 32], IgnoreReason::Draining));
    assert_eq!(v.len(), 1);
    assert_eq!(v.newest_seq(&[3; 32]), Some(2));
}

#[test]
fn full_view_refuses_newcomers_but_keeps_refreshing_members() {
    let config = ViewConfig { max_peers: 2, ..ViewConfig::default() };
    let mut v = SwarmView::new(MODEL, 8, config);
    one(&mut v, ann(1, 0, 8, 1, T0), T0);
    one(&mut v, ann(2, 0, 8, 1, T0), T0);
    assert_eq!(one(&mut v, ann(3, 0, 8, 1, T0), T0), ViewChange::Ignored([3; 32], IgnoreReason::ViewFull));
    assert_eq!(one(&mut v, ann(1, 0, 4, 2, T0), T0), ViewChange::Updated([1; 32]));
    assert_eq!(v.newest_seq(&[3; 32]), None, "a refused newcomer leaves no trace");
}

mod props {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Step {
        Announce { node: u8, start: u32, len: u32, seq: u64, age: u64, state: u8 },
        Tick { advance: u64 },
    }

    fn arb_step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..5, 0u32..8, 1u32..8, 0u64..12, 0u64..15_000, 0u8..3).prop_map(
                |(node, start, len, seq, age, state)| Step::Announce { node, start, len, seq, age, state }
            ),
            (0u64..8_000).prop_map(|advance| Step::Tick { advance }),
        ]
    }

    proptest! {
        #[test]
        fn random_event_sequences_keep_the_invariants(steps in proptest::collection::vec(arb_step(), 1..60)) {
            let config = ViewConfig { max_peers: 3, max_remembered: 2, seq_memory_ms: 20_000, max_clock_skew_ms: 1_000 };
            let mut v = SwarmView::new(MODEL, 8, config);
            let mut now = T0;
            for step in steps {
                match step {
                    Step::Announce { node, start, len, seq, age, state } => {
                        let before = v.newest_seq(&[node; 32]);
                        let mut a = ann(node, start, (start + len).min(8), seq, now.saturating_sub(age));
                        a.state = [PeerState::Joining, PeerState::Serving, PeerState::Draining][state as usize];
                        let change = one(&mut v, a, now);
                        let after = v.newest_seq(&[node; 32]);
                        // A node's known seq never goes down, and only a strictly newer one
                        // can change the view.
                        if let (Some(b), Some(a)) = (before, after) {
                            prop_assert!(a >= b);
                        }
                        if matches!(change, ViewChange::Joined(_) | ViewChange::Updated(_)) {
                            prop_assert!(before.is_none_or(|b| seq > b));
                            prop_assert_eq!(after, Some(seq));
                        }
                    }
                    Step::Tick { advance } => {
                        now += advance;
                        for c in v.handle(ViewEvent::Tick, now) {
                            prop_assert!(matches!(c, ViewChange::Left(_, LeaveReason::Expired)));
                        }
                    }
                }
                prop_assert!(v.len() <= 3);
                prop_assert!(v.remembered() <= 2);
                prop_assert!(v.peers().all(|a| a.state != PeerState::Draining));
                // Coverage equals a recomputation from the live Serving peers.
                let mut want = vec![0.0; 8];
                for a in v.peers().filter(|a| a.state == PeerState::Serving) {
                    for c in &mut want[a.start as usize..a.end as usize] {
                        *c += f64::from(a.throughput);
                    }
                }
                prop_assert_eq!(v.coverage(), want);
            }
            v.handle(ViewEvent::Tick, now + 20_000);
            prop_assert!(v.is_empty(), "every entry expires (ttl 10 s + skew 1 s)");
        }
    }
}
