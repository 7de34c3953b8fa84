//! Coordinator-free swarm logic for shoal: pure state machines, no I/O.
//!
//! Every volunteer worker serves a contiguous span `[start, end)` of a model's transformer
//! layers. Peers learn about each other from signed, expiring gossip [`announce::Announcement`]s;
//! each node keeps its own [`view::SwarmView`]; routes ([`plan`]) and layer placement
//! ([`placement`]) are computed locally from that view.
//!
//! The networking layer (gossip transport, ed25519 signing) wraps these pieces:
//!
//! 1. bytes from gossip → [`announce::Signed::decode`] → [`announce::open`] (with the real
//!    signature check injected) → [`view::SwarmView::handle`] with [`view::ViewEvent::Announced`];
//! 2. a timer calls [`view::SwarmView::handle`] with [`view::ViewEvent::Tick`];
//! 3. the node feeds its *own* announcements into its own view too (placement needs them);
//! 4. at start-up it picks a span with [`placement::choose_span`], and at jittered intervals
//!    ([`placement::next_check_ms`]) asks [`placement::should_move`] whether to move.
//!
//! Nothing here reads a clock, a socket or a random source on its own: time is passed in as
//! `now_ms`, randomness as an `&mut impl Rng`, so everything is deterministic and is exercised
//! by a seeded discrete-event simulator (the `sim` module, compiled for tests only).

pub mod announce;
pub mod placement;
pub mod plan;
pub mod view;

#[cfg(test)]
mod sim;

/// Identity of a peer: its ed25519 public key bytes.
pub type PeerId = [u8; 32];

/// Identity of a model (e.g. a hash of its weights manifest).
pub type ModelId = [u8; 32];
