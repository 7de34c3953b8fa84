//! Seeded discrete-event simulator of a swarm (tests only): no real time, threads or I/O.
//!
//! * Virtual clock in ms starting at [`T0`]; every peer has its own clock offset (± a bound),
//!   so views see mildly skewed `issued_at_ms`.
//! * Peers have log-uniform throughput (0.5..4 × 10 tok/s) and a random span length; each keeps
//!   its own [`SwarmView`] and feeds its own announcements into it.
//! * Every announcement is delivered to every other live peer after a uniform random delay,
//!   or lost with a small probability. Peers announce every `announce_interval_ms`, with
//!   `ttl = 3 × interval`, and immediately on every state change.
//! * **Joining**: a new peer learns the swarm from one random live "ticket" peer by taking a
//!   snapshot of that peer's view (a stand-in for the join handshake), picks its span with
//!   [`choose_span`] over the snapshot's planned coverage, announces `Joining`, and `Serving`
//!   after `load_ms`.
//! * **Leaving**: a crash just stops the peer (it vanishes from views on expiry); a graceful
//!   leave announces `Draining` and stops after `drain_ms`.
//! * **Moving**: at jittered intervals ([`next_check_ms`]) a serving peer asks
//!   [`should_move`]. If told to move it announces `Draining`, waits `drain_ms`, re-checks with
//!   [`move_target`] (old span still served by others, move still worth it), then announces
//!   `Joining` on the span the re-check returns (`Serving` after `load_ms`), or aborts back to
//!   `Serving` on the old span.
//!
//! Ground truth (what the test asserts on) is computed from the peers' real states, not from
//! any view.

use std::collections::BTreeMap;
use std::rc::Rc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::swarm::PeerId;
use crate::swarm::announce::{Announcement, PeerState};
use crate::swarm::placement::{
    RebalanceConfig, choose_span, move_target, next_check_ms, planned_coverage, should_move,
};
use crate::swarm::view::{SwarmView, ViewConfig, ViewEvent};

/// Virtual start time (unix ms).
pub const T0: u64 = 1_700_000_000_000;
const MODEL: [u8; 32] = [0x5A; 32];

/// Simulation parameters.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub n_layers: u32,
    pub announce_interval_ms: u64,
    pub delay_ms: (u64, u64),
    pub loss: f64,
    pub tick_ms: u64,
    pub check_base_ms: u64,
    pub drain_ms: u64,
    pub load_ms: u64,
    pub max_clock_offset_ms: i64,
    pub span_len: (u32, u32),
    pub view: ViewConfig,
    pub rebalance: RebalanceConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            n_layers: 30,
            announce_interval_ms: 30_000,
            delay_ms: (5, 200),
            loss: 0.01,
            tick_ms: 1_000,
            check_base_ms: 30_000,
            drain_ms: 1_000,
            load_ms: 5_000,
            max_clock_offset_ms: 1_000,
            span_len: (3, 10),
            view: ViewConfig { max_clock_skew_ms: 5_000, ..ViewConfig::default() },
            rebalance: RebalanceConfig::default(),
        }
    }
}

/// One completed move (switch of span after draining).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Move {
    pub at: u64,
    pub peer: usize,
    pub from: u32,
    pub to: u32,
}

/// Counters kept by the simulator.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub moves: Vec<Move>,
    pub aborted_moves: usize,
    /// Virtual times of the aborted moves.
    pub aborts: Vec<u64>,
    /// Switches that left a layer of the old span with no other live peer holding it
    /// (`Serving` or `Draining`): a rebalancing move that uncovered a layer.
    pub move_holes: usize,
    /// Switches that left a layer of the old span with no other `Serving` live peer.
    pub move_serving_gaps: usize,
    pub deliveries: u64,
    pub lost: u64,
}

pub struct Peer {
    pub id: PeerId,
    pub throughput: f32,
    pub len: u32,
    pub start: u32,
    pub state: PeerState,
    pub alive: bool,
    pub view: SwarmView,
    seq: u64,
    offset_ms: i64,
    pending: Option<u32>,
    leaving: bool,
}

enum Ev {
    Announce(usize),
    Deliver(usize, Rc<Announcement>),
    Tick(usize),
    Check(usize),
    DrainDone(usize),
    Loaded(usize),
    Stop(usize),
}

/// Slots of the timing wheel (1 ms each): every delay the simulator uses is shorter, and longer
/// ones go to `overflow`. Events in one slot run in the order they were scheduled.
const WHEEL: usize = 1 << 17;

pub struct Sim {
    pub cfg: SimConfig,
    pub now: u64,
    pub peers: Vec<Peer>,
    pub stats: Stats,
    rng: StdRng,
    wheel: Vec<Vec<Ev>>,
    overflow: BTreeMap<u64, Vec<Ev>>,
}

impl Sim {
    pub fn new(cfg: SimConfig, seed: u64) -> Sim {
        Sim {
            cfg,
            now: T0,
            peers: Vec::new(),
            stats: Stats::default(),
            rng: StdRng::seed_from_u64(seed),
            wheel: (0..WHEEL).map(|_| Vec::new()).collect(),
            overflow: BTreeMap::new(),
        }
    }

    fn at(&mut self, delay: u64, ev: Ev) {
        let delay = delay.max(1);
        if delay < WHEEL as u64 {
            self.wheel[((self.now + delay) % WHEEL as u64) as usize].push(ev);
        } else {
            self.overflow.entry(self.now + delay).or_default().push(ev);
        }
    }

    fn local(&self, i: usize) -> u64 {
        self.now.saturating_add_signed(self.peers[i].offset_ms)
    }

    /// Adds a peer with random throughput and span length; returns its index.
    pub fn add_peer(&mut self) -> usize {
        let (lo, hi) = self.cfg.span_len;
        let len = self.rng.random_range(lo..=hi).min(self.cfg.n_layers);
        let throughput = (10.0 * 0.5 * 8f64.powf(self.rng.random::<f64>())) as f32;
        self.add_peer_with(throughput, len)
    }

    /// Adds a peer with the given throughput and span length; returns its index.
    pub fn add_peer_with(&mut self, throughput: f32, len: u32) -> usize {
        let i = self.peers.len();
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&(i as u64).to_be_bytes());
        id[8..16].copy_from_slice(&self.rng.random::<u64>().to_le_bytes());
        let live: Vec<usize> = (0..i).filter(|&j| self.peers[j].alive).collect();
        let view = if live.is_empty() {
            SwarmView::new(MODEL, self.cfg.n_layers, self.cfg.view.clone())
        } else {
            let ticket = live[self.rng.random_range(0..live.len())];
            self.peers[ticket].view.clone()
        };
        let start = choose_span(&planned_coverage(&view), len, f64::from(throughput));
        let m = self.cfg.max_clock_offset_ms;
        let offset_ms = if m > 0 { self.rng.random_range(-m..=m) } else { 0 };
        self.peers.push(Peer {
            id,
            throughput,
            len,
            start,
            state: PeerState::Joining,
            alive: true,
            view,
            seq: 0,
            offset_ms,
            pending: None,
            leaving: false,
        });
        self.announce_now(i);
        self.at(self.cfg.load_ms, Ev::Loaded(i));
        let phase = self.rng.random_range(1..=self.cfg.announce_interval_ms);
        self.at(phase, Ev::Announce(i));
        let tick = self.rng.random_range(1..=self.cfg.tick_ms);
        self.at(tick, Ev::Tick(i));
        let check = next_check_ms(&mut self.rng, self.cfg.check_base_ms);
        self.at(check, Ev::Check(i));
        i
    }

    /// Stops a peer abruptly.
    pub fn crash(&mut self, i: usize) {
        self.peers[i].alive = false;
    }

    /// Announces `Draining` and stops after `drain_ms`. Only for a live, serving, non-moving peer.
    pub fn leave(&mut self, i: usize) -> bool {
        let p = &self.peers[i];
        if !p.alive || p.state != PeerState::Serving || p.pending.is_some() || p.leaving {
            return false;
        }
        self.peers[i].leaving = true;
        self.peers[i].state = PeerState::Draining;
        self.announce_now(i);
        self.at(self.cfg.drain_ms, Ev::Stop(i));
        true
    }

    fn announce_now(&mut self, i: usize) {
        let p = &mut self.peers[i];
        p.seq += 1;
        let issued_at_ms = self.now.saturating_add_signed(p.offset_ms);
        let a = Rc::new(Announcement {
            node: p.id,
            model: MODEL,
            n_layers: self.cfg.n_layers,
            start: p.start,
            end: p.start + p.len,
            state: p.state,
            throughput: p.throughput,
            load: 0,
            free_kv_bytes: 1 << 30,
            version: "sim".into(),
            seq: p.seq,
            issued_at_ms,
            ttl_ms: (3 * self.cfg.announce_interval_ms) as u32,
            addrs: Vec::new(),
            holds: Default::default(),
        });
        p.view.handle(ViewEvent::Announced((*a).clone()), issued_at_ms);
        let (dmin, dmax) = self.cfg.delay_ms;
        for j in 0..self.peers.len() {
            if j == i || !self.peers[j].alive {
                continue;
            }
            if self.rng.random::<f64>() < self.cfg.loss {
                self.stats.lost += 1;
                continue;
            }
            let d = self.rng.random_range(dmin..=dmax);
            self.at(d, Ev::Deliver(j, Rc::clone(&a)));
        }
    }

    /// Processes every event up to and including `until`, then sets the clock to `until`.
    pub fn run_until(&mut self, until: u64) {
        while self.now < until {
            self.now += 1;
            if let Some(evs) = self.overflow.remove(&self.now) {
                self.wheel[(self.now % WHEEL as u64) as usize].extend(evs);
            }
            // Every delay is at least 1 ms, so nothing lands in the slot being drained.
            let evs = std::mem::take(&mut self.wheel[(self.now % WHEEL as u64) as usize]);
            for ev in evs {
                self.step(ev);
            }
        }
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver(j, a) if self.peers[j].alive => {
                self.stats.deliveries += 1;
                let now = self.local(j);
                self.peers[j].view.handle(ViewEvent::Announced((*a).clone()), now);
            }
            Ev::Announce(i) if self.peers[i].alive => {
                self.announce_now(i);
                self.at(self.cfg.announce_interval_ms, Ev::Announce(i));
            }
            Ev::Tick(i) if self.peers[i].alive => {
                let now = self.local(i);
                self.peers[i].view.handle(ViewEvent::Tick, now);
                self.at(self.cfg.tick_ms, Ev::Tick(i));
            }
            Ev::Check(i) if self.peers[i].alive => {
                let p = &self.peers[i];
                let idle = p.state == PeerState::Serving && p.pending.is_none() && !p.leaving;
                if let Some(dest) = should_move(&p.view, p.id, &self.cfg.rebalance).filter(|_| idle) {
                    self.peers[i].pending = Some(dest);
                    self.peers[i].state = PeerState::Draining;
                    self.announce_now(i);
                    self.at(self.cfg.drain_ms, Ev::DrainDone(i));
                }
                let next = next_check_ms(&mut self.rng, self.cfg.check_base_ms);
                self.at(next, Ev::Check(i));
            }
            Ev::DrainDone(i) if self.peers[i].alive => self.finish_drain(i),
            Ev::Loaded(i) if self.peers[i].alive && self.peers[i].state == PeerState::Joining => {
                self.peers[i].state = PeerState::Serving;
                self.announce_now(i);
            }
            Ev::Stop(i) => self.peers[i].alive = false,
            _ => {}
        }
    }

    fn finish_drain(&mut self, i: usize) {
        if self.peers[i].pending.take().is_none() {
            return;
        }
        let p = &self.peers[i];
        let (from, end) = (p.start, p.start + p.len);
        let recheck = move_target(&p.view, p.id, from, end, f64::from(p.throughput), &self.cfg.rebalance);
        let Some(dest) = recheck else {
            self.stats.aborted_moves += 1;
            self.stats.aborts.push(self.now);
            self.peers[i].state = PeerState::Serving;
            self.announce_now(i);
            return;
        };
        let held = |q: &Peer| q.alive && matches!(q.state, PeerState::Serving | PeerState::Draining);
        let serving = |q: &Peer| q.alive && q.state == PeerState::Serving;
        let covered_by = |l: u32, f: &dyn Fn(&Peer) -> bool| {
            self.peers.iter().enumerate().any(|(j, q)| j != i && f(q) && q.start <= l && l < q.start + q.len)
        };
        if (from..end).any(|l| !covered_by(l, &held)) {
            self.stats.move_holes += 1;
        }
        if (from..end).any(|l| !covered_by(l, &serving)) {
            self.stats.move_serving_gaps += 1;
        }
        self.stats.moves.push(Move { at: self.now, peer: i, from, to: dest });
        self.peers[i].start = dest;
        self.peers[i].state = PeerState::Joining;
        self.announce_now(i);
        self.at(self.cfg.load_ms, Ev::Loaded(i));
    }

    /// Ground truth: per layer, throughput of live `Serving` peers.
    pub fn true_coverage(&self) -> Vec<f64> {
        let mut cov = vec![0.0; self.cfg.n_layers as usize];
        for p in self.peers.iter().filter(|p| p.alive && p.state == PeerState::Serving) {
            for c in &mut cov[p.start as usize..(p.start + p.len) as usize] {
                *c += f64::from(p.throughput);
            }
        }
        cov
    }

    /// No assignment of spans to the live peers can beat `sum(throughput × len) / n_layers`.
    pub fn upper_bound(&self) -> f64 {
        let total: f64 =
            self.peers.iter().filter(|p| p.alive).map(|p| f64::from(p.throughput) * f64::from(p.len)).sum();
        total / f64::from(self.cfg.n_layers)
    }

    pub fn live(&self) -> Vec<usize> {
        (0..self.peers.len()).filter(|&i| self.peers[i].alive).collect()
    }

    /// A random number generator derived from the simulation's, for the test's own choices.
    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }
}

#[cfg(test)]
mod tests;
