//! A worker's moves between spans: the steps that carry out the placement rules of
//! [`crate::swarm::placement`] on a live node.
//!
//! At jittered intervals ([`next_check_ms`]) a [`Rebalancer`] asks [`should_move`] whether the
//! swarm would clearly gain from this worker serving other layers. If so it moves by the
//! drain → re-check → join protocol:
//! 1. fetch the destination's weights while still serving the old span ([`SpanHost::prefetch`]),
//!    so coverage never drops for a download;
//! 2. announce `Draining` (origins stop routing new sessions here) and wait two gossip
//!    intervals for the swarm to settle;
//! 3. re-check on the view as it is then: the swarm may have changed (another worker moved
//!    first, a peer joined); if the move no longer helps, announce `Serving` and stay;
//! 4. hand running sessions back ([`drain`], then stop serving), announce `Joining`, load the
//!    new span ([`SpanHost::load`]) and serve it; a load that fails falls back to the old span.
//!
//! What the node announces about itself lives in an [`Own`] shared with the announcement
//! source ([`announcer`]). Progress is logged through `tracing`.

use std::future::Future;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use shoal_worker::net::Node;
use shoal_worker::service::StageService;

use crate::membership::{Membership, OwnSpan};
use crate::swarm::announce::{Holdings, PeerState};
use crate::swarm::placement::{RebalanceConfig, move_target, next_check_ms, should_move};

/// An error of the node's side of a move (fetching or loading weights).
pub type HostError = Box<dyn std::error::Error + Send + Sync>;

/// What a worker says about itself in its announcements.
#[derive(Debug, Clone)]
pub struct Own {
    /// The span it serves or is about to serve (`None` before it chose one).
    pub span: Option<Range<usize>>,
    /// Joining, serving or draining.
    pub state: PeerState,
    /// Its measured speed on the span, in tokens per second per layer.
    pub throughput: f64,
    /// The pieces of weights it holds and serves to peers.
    pub holds: Holdings,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The announcement source of a worker: its [`Own`] with the stage's current load and free
/// KV cache; nothing until it has a span.
pub fn announcer(own: Arc<Mutex<Own>>, node: Node) -> impl Fn() -> Option<OwnSpan> + Send + Sync + 'static {
    move || {
        let o = lock(&own).clone();
        let span = o.span?;
        let info = node.stage_info();
        Some(OwnSpan {
            start: span.start as u32,
            end: span.end as u32,
            state: o.state,
            throughput: o.throughput as f32,
            load: info.as_ref().map_or(0, |i| i.sessions),
            free_kv_bytes: info.map_or(0, |i| i.free_kv_bytes),
            holds: o.holds,
        })
    }
}

/// Refuses new sessions and waits at most `timeout` for the running ones to end (those left
/// are handed back to their origins when the stage stops).
pub async fn drain(node: &Node, timeout: Duration) {
    node.drain();
    let until = Instant::now() + timeout;
    while node.stage_stats().is_some_and(|s| s.sessions > 0) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = node.stage_stats().map_or(0, |s| s.sessions);
    if left > 0 {
        tracing::info!(sessions = left, "handing sessions back to their origins");
    }
}

/// The parts of a move that depend on where the node's weights come from.
pub trait SpanHost: Send + Sync + 'static {
    /// Makes the weights of `span` local, fetching the pieces this node lacks; returns what it
    /// holds now when that changed (to announce), `None` when it already held them all.
    fn prefetch(
        &self,
        span: Range<usize>,
    ) -> impl Future<Output = Result<Option<Holdings>, HostError>> + Send;

    /// Loads `span` into a stage and measures its speed (tokens per second per layer). Blocking:
    /// it computes.
    fn load(&self, span: Range<usize>) -> Result<(StageService, f64), HostError>;
}

/// What one rebalancing check did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to gain: the node did not start a move.
    Unneeded,
    /// The node drained, but the re-check (or fetching the destination) kept it where it was.
    Stayed(Range<usize>),
    /// The node moved.
    Moved {
        /// The span it left.
        from: Range<usize>,
        /// The span it serves now.
        to: Range<usize>,
    },
    /// Loading the destination failed; the node serves its old span again.
    FellBack(Range<usize>),
}

/// Rebalancing of one worker (see the module's documentation).
pub struct Rebalancer<H> {
    /// Fetching and loading spans.
    pub host: H,
    /// The node whose stage moves.
    pub node: Node,
    /// Its membership in the swarm (the view, and its announcements).
    pub membership: Arc<Membership>,
    /// What it announces.
    pub own: Arc<Mutex<Own>>,
    /// The placement rules' thresholds.
    pub config: RebalanceConfig,
    /// How long running sessions may take to end before they are handed back.
    pub drain_timeout: Duration,
    /// Mean time between checks (each jittered by ±50%).
    pub mean_interval: Duration,
}

impl<H: SpanHost> Rebalancer<H> {
    /// Checks at jittered intervals forever, calling `on_move` after each move.
    pub async fn run(self, on_move: impl Fn(&Range<usize>, &Range<usize>) + Send) {
        let mut rng = StdRng::from_os_rng();
        let base_ms = self.mean_interval.as_millis().min(u128::from(u64::MAX)) as u64;
        loop {
            tokio::time::sleep(Duration::from_millis(next_check_ms(&mut rng, base_ms))).await;
            match self.check().await {
                Ok(Outcome::Moved { from, to }) => on_move(&from, &to),
                Ok(_) => {}
                Err(e) => tracing::warn!("rebalancing failed: {e}"),
            }
        }
    }

    fn set(&self, span: Range<usize>, state: PeerState) {
        {
            let mut o = lock(&self.own);
            o.span = Some(span);
            o.state = state;
        }
        self.membership.announce_now();
    }

    async fn prefetch(&self, span: Range<usize>) -> Result<(), HostError> {
        if let Some(holds) = self.host.prefetch(span).await? {
            lock(&self.own).holds = holds;
        }
        Ok(())
    }

    fn destination(&self, old: &Range<usize>, throughput: f64) -> Option<Range<usize>> {
        let me = self.node.id();
        let dest = self
            .membership
            .with_view(|v| move_target(v, me, old.start as u32, old.end as u32, throughput, &self.config))?
            as usize;
        Some(dest..dest + old.len())
    }

    /// One check: moves when the placement rules say so (see the module's documentation).
    pub async fn check(&self) -> Result<Outcome, HostError> {
        let me = self.node.id();
        if self.membership.with_view(|v| should_move(v, me, &self.config)).is_none() {
            return Ok(Outcome::Unneeded);
        }
        let (old, throughput) = {
            let o = lock(&self.own);
            (o.span.clone().ok_or("this node serves no span yet")?, o.throughput)
        };
        if let Some(dest) = self.destination(&old, throughput) {
            self.prefetch(dest).await?;
        }
        tracing::info!(from = ?old, "rebalancing: the span may move; draining to re-check");
        self.set(old.clone(), PeerState::Draining);
        tokio::time::sleep(self.membership.interval() * 2).await;
        let Some(new) = self.destination(&old, throughput) else {
            tracing::info!(span = ?old, "rebalancing: staying (the swarm changed)");
            self.set(old.clone(), PeerState::Serving);
            return Ok(Outcome::Stayed(old));
        };
        // Normally fetched already; the re-check may have chosen another destination.
        if let Err(e) = self.prefetch(new.clone()).await {
            tracing::warn!(span = ?old, to = ?new, "rebalancing: staying (fetching the destination: {e})");
            self.set(old.clone(), PeerState::Serving);
            return Ok(Outcome::Stayed(old));
        }
        drain(&self.node, self.drain_timeout).await;
        self.node.stop_serving().await;
        self.set(new.clone(), PeerState::Joining);
        let (stage, throughput, outcome) = match tokio::task::block_in_place(|| self.host.load(new.clone())) {
            Ok((stage, t)) => (stage, t, Outcome::Moved { from: old.clone(), to: new.clone() }),
            Err(e) => {
                tracing::warn!(to = ?new, back = ?old, "rebalancing: loading the destination failed: {e}");
                self.set(old.clone(), PeerState::Joining);
                let (stage, t) = tokio::task::block_in_place(|| self.host.load(old.clone()))?;
                (stage, t, Outcome::FellBack(old.clone()))
            }
        };
        let span = match &outcome {
            Outcome::Moved { to, .. } => to.clone(),
            _ => old,
        };
        self.node.serve(stage);
        lock(&self.own).throughput = throughput;
        self.set(span, PeerState::Serving);
        Ok(outcome)
    }
}
