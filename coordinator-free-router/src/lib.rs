//! # shoal-coordinator-free-router
//!
//! Swarm logic with no coordinator: signed, expiring announcements over iroh-gossip, each
//! node's own view of the swarm, route planning over (peer, layer) positions, span choice and
//! rebalancing as pure state machines driven by a virtual clock, and the pipeline driver that
//! runs a session through a route and recovers it when a peer fails.
//!
//! This crate is filled by the worker-pipeline and swarm issues (see `DESIGN.md`, "Swarm
//! membership and routing"); today it only reserves its place in the workspace.
