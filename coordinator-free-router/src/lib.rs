//! # shoal-coordinator-free-router
//!
//! Swarm logic with no coordinator: each node's own view of the swarm, route planning over
//! (peer, layer) positions and the pipeline driver that runs a session through a route and
//! recovers it when a peer fails.
//!
//! Today:
//! - [`route`]: the cheapest chain of peers covering the model (pure, tested against brute
//!   force);
//! - [`driver`]: the client side of the stage protocol with deadlines, bans with backoff and
//!   failover by replaying the token history on a new route.
//!
//! Signed gossip membership, span choice and rebalancing come with the swarm issue (see
//! `DESIGN.md`, "Swarm membership and routing"); until then a driver learns its peers from
//! join tickets.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod driver;
pub mod route;
