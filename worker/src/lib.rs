//! # shoal-worker
//!
//! The stage of a shoal node: it holds one contiguous span of a model's layers (loaded with
//! [`shoal_model_shards`]) and serves sessions through them.
//!
//! Shape (see `docs/architecture.md`, "One token's trip"): sessions with KV caches under a
//! memory budget, a scheduler that batches the steps of concurrent sessions, the versioned
//! stage wire protocol adapted to iroh by a thin `ProtocolHandler`, and forwarding of hidden
//! states straight to the next peer of the ring.
//!
//! - [`protocol`]: every message of the ring (session open, step, result, close, typed errors,
//!   ping) with its byte layout and the checks that make hostile input safe to decode;
//! - [`service`]: the stage as a pure state machine, `handle(from, message, now) -> actions`:
//!   sessions and their KV caches under a memory budget, per-peer quotas, idle timeouts,
//!   draining, and every check of a step against its session before any compute;
//! - [`admission`]: closed swarms: the swarm key and the admission handshake that every
//!   connection of a private swarm passes before any other protocol is accepted;
//! - [`net`]: the iroh transport: a node's endpoint, the stage protocol's handler under its
//!   ALPN, the stage's compute thread fed by a channel, per-peer ordered sending, and the
//!   origin's side of a session ([`net::SessionChannel`]) that the pipeline driver of
//!   `shoal-coordinator-free-router` uses.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admission;
pub mod net;
pub mod protocol;
pub mod service;

pub use shoal_model_shards as engine;
