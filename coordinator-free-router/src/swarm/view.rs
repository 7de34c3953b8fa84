//! One node's view of one model's swarm, built from gossip announcements.
//!
//! # State machine
//!
//! * **Input**: [`ViewEvent::Announced`] (an announcement whose signature the caller has
//!   already checked, e.g. with [`crate::swarm::announce::open`]) or [`ViewEvent::Tick`], each
//!   with the local clock `now_ms` (unix ms).
//! * **Output**: the list of [`ViewChange`]s the event caused, in a deterministic order.
//! * **State**: the live peers (latest accepted announcement per node, keyed by id), a lazy
//!   expiry heap (superseded entries are skipped; rebuilt when it exceeds 4 × peers + 64), and
//!   a bounded memory of the highest `seq` of recently departed nodes.
//!
//! # Admission, in this order
//!
//! 1. other model or other `n_layers` → [`IgnoreReason::OtherModel`] / [`IgnoreReason::OtherLayerCount`];
//! 2. fails [`Announcement::validate`] (hand-built structs) → [`IgnoreReason::Invalid`];
//! 3. `issued_at_ms > now + max_clock_skew_ms` → [`IgnoreReason::FromFuture`];
//! 4. already expired (see below) → [`IgnoreReason::Expired`];
//! 5. `seq` equal to the newest seen from that node → [`IgnoreReason::Duplicate`] (normal in
//!    gossip), lower → [`IgnoreReason::Stale`] (late or replayed);
//! 6. a new node while the view holds `max_peers` → [`IgnoreReason::ViewFull`]. Policy: *refuse
//!    newcomers*, never evict. Known peers keep refreshing, so flooding the view with fake
//!    identities cannot push honest serving peers out; it can only delay newcomers until
//!    entries expire.
//!
//! An accepted `Draining` announcement removes the node from the live set
//! ([`ViewChange::Left`] with [`LeaveReason::Draining`]; for a node not in the view,
//! [`IgnoreReason::Draining`]) and remembers its `seq`. Otherwise a new node gives
//! [`ViewChange::Joined`] and a known one [`ViewChange::Updated`].
//!
//! # Expiry
//!
//! A peer expires when `now_ms >= issued_at_ms + ttl_ms + max_clock_skew_ms` of its latest
//! announcement; [`ViewEvent::Tick`] removes expired peers ([`LeaveReason::Expired`]). So a
//! node that stops announcing leaves within `ttl + skew` plus one tick period.
//!
//! # Invariants
//!
//! * every live entry has passed admission and is not `Draining`;
//! * a node's `seq` as known to the view never decreases while it is live or remembered; a
//!   departed node is remembered for `seq_memory_ms` (default: longest ttl + 2 × skew, so any
//!   older announcement of it has expired by the time it is forgotten), at most
//!   `max_remembered` of them (the soonest-forgotten is dropped first when full);
//! * [`SwarmView::coverage`] counts only `Serving` peers.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use crate::swarm::announce::{AnnounceError, Announcement, MAX_TTL_MS, PeerState};
use crate::swarm::{ModelId, PeerId};

/// Limits of a [`SwarmView`].
#[derive(Debug, Clone, PartialEq)]
pub struct ViewConfig {
    /// Most live peers kept; newcomers beyond it are refused.
    pub max_peers: usize,
    /// Tolerated difference between an author's clock and ours.
    pub max_clock_skew_ms: u64,
    /// How long the `seq` of a departed node is remembered.
    pub seq_memory_ms: u64,
    /// Most departed nodes remembered.
    pub max_remembered: usize,
}

impl Default for ViewConfig {
    fn default() -> Self {
        let skew = 30_000;
        ViewConfig {
            max_peers: 10_000,
            max_clock_skew_ms: skew,
            seq_memory_ms: u64::from(MAX_TTL_MS) + 2 * skew,
            max_remembered: 20_000,
        }
    }
}

/// Input of [`SwarmView::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum ViewEvent {
    /// A signature-checked announcement arrived.
    Announced(Announcement),
    /// Time passed; expire peers.
    Tick,
}

/// Why a peer left the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveReason {
    /// Its latest announcement expired.
    Expired,
    /// It announced `Draining`.
    Draining,
}

/// Why an announcement was not applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum IgnoreReason {
    /// It is about another model.
    OtherModel,
    /// Same model id but another layer count.
    OtherLayerCount,
    /// Its fields are invalid.
    Invalid(AnnounceError),
    /// Issued further in the future than the tolerated clock skew.
    FromFuture,
    /// Already expired on arrival.
    Expired,
    /// Same `seq` as the newest seen from that node.
    Duplicate,
    /// Lower `seq` than the newest seen from that node (late or replayed).
    Stale {
        /// The refused seq.
        seq: u64,
        /// The newest seq seen.
        newest: u64,
    },
    /// A newcomer while the view is full.
    ViewFull,
    /// A `Draining` announcement from a node that is not in the view.
    Draining,
}

/// Output of [`SwarmView::handle`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ViewChange {
    /// A node entered the view.
    Joined(PeerId),
    /// A live node's announcement was refreshed or changed.
    Updated(PeerId),
    /// A node left the view.
    Left(PeerId, LeaveReason),
    /// An announcement was not applied.
    Ignored(PeerId, IgnoreReason),
}

/// Internal map key: the id as two big-endian 128-bit words, which sorts exactly like the bytes
/// but compares as two integers instead of a `memcmp` call (the hot path of a busy view).
type Key = (u128, u128);

fn key(id: &PeerId) -> Key {
    let (mut hi, mut lo) = ([0u8; 16], [0u8; 16]);
    hi.copy_from_slice(&id[..16]);
    lo.copy_from_slice(&id[16..]);
    (u128::from_be_bytes(hi), u128::from_be_bytes(lo))
}

#[derive(Debug, Clone)]
struct Entry {
    ann: Announcement,
    expires_at: u64,
}

#[derive(Debug, Clone, Copy)]
struct Remembered {
    seq: u64,
    forget_at: u64,
}

/// One node's view of one model's swarm. See the module docs.
#[derive(Debug, Clone)]
pub struct SwarmView {
    model: ModelId,
    n_layers: u32,
    config: ViewConfig,
    live: BTreeMap<Key, Entry>,
    by_expiry: BinaryHeap<Reverse<(u64, Key)>>,
    departed: BTreeMap<Key, Remembered>,
    by_forget: BTreeSet<(u64, Key)>,
}

impl SwarmView {
    /// An empty view of `model`, which has `n_layers` layers.
    pub fn new(model: ModelId, n_layers: u32, config: ViewConfig) -> SwarmView {
        SwarmView {
            model,
            n_layers,
            config,
            live: BTreeMap::new(),
            by_expiry: BinaryHeap::new(),
            departed: BTreeMap::new(),
            by_forget: BTreeSet::new(),
        }
    }

    /// The model this view is about.
    pub fn model(&self) -> ModelId {
        self.model
    }

    /// Layer count of the model.
    pub fn n_layers(&self) -> u32 {
        self.n_layers
    }

    /// The configuration.
    pub fn config(&self) -> &ViewConfig {
        &self.config
    }

    /// Applies one event; returns what changed.
    pub fn handle(&mut self, event: ViewEvent, now_ms: u64) -> Vec<ViewChange> {
        match event {
            ViewEvent::Announced(a) => vec![self.announced(a, now_ms)],
            ViewEvent::Tick => self.tick(now_ms),
        }
    }

    fn announced(&mut self, a: Announcement, now: u64) -> ViewChange {
        let id = a.node;
        let k = key(&id);
        let skew = self.config.max_clock_skew_ms;
        if a.model != self.model {
            return ViewChange::Ignored(id, IgnoreReason::OtherModel);
        }
        if a.n_layers != self.n_layers {
            return ViewChange::Ignored(id, IgnoreReason::OtherLayerCount);
        }
        if let Err(e) = a.validate() {
            return ViewChange::Ignored(id, IgnoreReason::Invalid(e));
        }
        if a.issued_at_ms > now.saturating_add(skew) {
            return ViewChange::Ignored(id, IgnoreReason::FromFuture);
        }
        let expires_at = a.expires_at_ms().saturating_add(skew);
        if expires_at <= now {
            return ViewChange::Ignored(id, IgnoreReason::Expired);
        }
        if let Some(entry) = self.live.get_mut(&k) {
            // Known, live node: the common case (a periodic refresh), one map search.
            let newest = entry.ann.seq;
            if a.seq == newest {
                return ViewChange::Ignored(id, IgnoreReason::Duplicate);
            }
            if a.seq < newest {
                return ViewChange::Ignored(id, IgnoreReason::Stale { seq: a.seq, newest });
            }
            if a.state == PeerState::Draining {
                let seq = a.seq;
                self.live.remove(&k);
                self.remember(k, seq, now);
                return ViewChange::Left(id, LeaveReason::Draining);
            }
            let refresh = entry.expires_at != expires_at;
            *entry = Entry { ann: a, expires_at };
            if refresh {
                self.push_expiry(expires_at, k);
            }
            return ViewChange::Updated(id);
        }
        if let Some(r) = self.departed.get(&k) {
            if a.seq == r.seq {
                return ViewChange::Ignored(id, IgnoreReason::Duplicate);
            }
            if a.seq < r.seq {
                return ViewChange::Ignored(id, IgnoreReason::Stale { seq: a.seq, newest: r.seq });
            }
        }
        if a.state == PeerState::Draining {
            self.remember(k, a.seq, now);
            return ViewChange::Ignored(id, IgnoreReason::Draining);
        }
        if self.live.len() >= self.config.max_peers {
            return ViewChange::Ignored(id, IgnoreReason::ViewFull);
        }
        self.forget(&k);
        self.live.insert(k, Entry { ann: a, expires_at });
        self.push_expiry(expires_at, k);
        ViewChange::Joined(id)
    }

    /// Adds to the lazy expiry heap; entries superseded by a refresh are skipped when popped.
    /// The heap is rebuilt from the live set when stale entries pile up, so it stays O(peers).
    fn push_expiry(&mut self, at: u64, k: Key) {
        self.by_expiry.push(Reverse((at, k)));
        if self.by_expiry.len() > 4 * self.live.len() + 64 {
            self.by_expiry = self.live.iter().map(|(k, e)| Reverse((e.expires_at, *k))).collect();
        }
    }

    fn tick(&mut self, now: u64) -> Vec<ViewChange> {
        let mut changes = Vec::new();
        while let Some(&Reverse((at, k))) = self.by_expiry.peek() {
            if at > now {
                break;
            }
            self.by_expiry.pop();
            // Only the entry matching the peer's current expiry counts; others are superseded.
            if self.live.get(&k).is_some_and(|e| e.expires_at == at)
                && let Some(e) = self.live.remove(&k)
            {
                self.remember(k, e.ann.seq, now);
                changes.push(ViewChange::Left(e.ann.node, LeaveReason::Expired));
            }
        }
        while let Some(&(at, k)) = self.by_forget.first() {
            if at > now {
                break;
            }
            self.forget(&k);
        }
        changes
    }

    fn remember(&mut self, k: Key, seq: u64, now: u64) {
        if self.config.max_remembered == 0 {
            return;
        }
        self.forget(&k);
        while self.departed.len() >= self.config.max_remembered {
            match self.by_forget.first() {
                Some(&(_, victim)) => self.forget(&victim),
                None => break,
            }
        }
        let forget_at = now.saturating_add(self.config.seq_memory_ms);
        self.departed.insert(k, Remembered { seq, forget_at });
        self.by_forget.insert((forget_at, k));
    }

    fn forget(&mut self, k: &Key) {
        if let Some(r) = self.departed.remove(k) {
            self.by_forget.remove(&(r.forget_at, *k));
        }
    }

    /// Live peers (any state but `Draining`), sorted by id.
    pub fn peers(&self) -> impl Iterator<Item = &Announcement> {
        self.live.values().map(|e| &e.ann)
    }

    /// The latest announcement of a live peer.
    pub fn get(&self, id: &PeerId) -> Option<&Announcement> {
        self.live.get(&key(id)).map(|e| &e.ann)
    }

    /// Number of live peers.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// No live peers.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Number of departed nodes whose `seq` is remembered.
    pub fn remembered(&self) -> usize {
        self.departed.len()
    }

    /// Newest `seq` known for a node, live or remembered.
    pub fn newest_seq(&self, id: &PeerId) -> Option<u64> {
        let k = key(id);
        self.live.get(&k).map(|e| e.ann.seq).or_else(|| self.departed.get(&k).map(|r| r.seq))
    }

    /// Per layer: sum of the throughput of `Serving` peers whose span holds that layer.
    pub fn coverage(&self) -> Vec<f64> {
        self.coverage_where(|a| a.state == PeerState::Serving)
    }

    /// Per layer: sum of the throughput of the peers accepted by `keep` whose span holds it.
    pub fn coverage_where(&self, mut keep: impl FnMut(&Announcement) -> bool) -> Vec<f64> {
        let mut cov = vec![0.0; self.n_layers as usize];
        for a in self.peers().filter(|a| keep(a)) {
            for c in cov.iter_mut().take(a.end as usize).skip(a.start as usize) {
                *c += f64::from(a.throughput);
            }
        }
        cov
    }

    /// Layers no `Serving` peer holds, ascending.
    pub fn uncovered_layers(&self) -> Vec<u32> {
        (0..self.n_layers).zip(self.coverage()).filter(|&(_, c)| c <= 0.0).map(|(l, _)| l).collect()
    }

    /// Minimum of [`SwarmView::coverage`] over layers (0 for a model without layers).
    pub fn bottleneck(&self) -> f64 {
        bottleneck(&self.coverage())
    }
}

/// Minimum over a coverage vector (0 when empty).
pub fn bottleneck(coverage: &[f64]) -> f64 {
    coverage.iter().copied().reduce(f64::min).unwrap_or(0.0)
}

#[cfg(test)]
mod tests;
