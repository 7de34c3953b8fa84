//! # shoal-coordinator-free-router
//!
//! Swarm logic with no coordinator: each node's own view of the swarm, route planning over
//! (peer, layer) positions and the pipeline driver that runs a session through a route and
//! recovers it when a peer fails.
//!
//! - [`swarm`]: the swarm's decision logic as pure state machines, driven by a seeded
//!   simulator in its tests: signed, expiring announcements and their byte format, each
//!   node's view of the swarm, Petals-style route planning over (peer, layer) positions,
//!   span choice and rebalancing with hysteresis;
//! - [`membership`]: the swarm over iroh-gossip (one topic per model; signed announcements,
//!   checked against their author, feed each node's [`swarm::view::SwarmView`]); a driver
//!   follows a node's view to find its routes;
//! - [`rebalance`]: a worker's moves between spans on a live node (drain, re-check, fetch,
//!   load, serve), carrying out the placement rules of [`swarm::placement`];
//! - [`driver`]: the client side of the stage protocol with deadlines, bans with backoff,
//!   failover by replaying the token history on a new route, and spot-checks of the workers'
//!   results on other replicas;
//! - [`verify`]: the spot-checks' decisions (which steps, what agrees, who lied) as pure code.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod blame;
pub mod constraint;
pub mod driver;
pub mod membership;
pub mod rebalance;
pub mod speculative;
pub mod swarm;
pub mod verify;
pub mod weights;
