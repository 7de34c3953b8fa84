//! # shoal-worker
//!
//! The stage service of a shoal node: it holds one contiguous span of a model's layers
//! (loaded with [`shoal_model_shards`]) and serves sessions through them.
//!
//! Shape (see `DESIGN.md`, "One token's trip"): sessions with KV caches under a memory budget,
//! a scheduler that batches the steps of concurrent sessions, the versioned stage wire
//! protocol adapted to iroh by a thin `ProtocolHandler`, and forwarding of hidden states
//! straight to the next peer of the ring.
//!
//! What exists today is the transport-free wire format, [`protocol`]: every message of the
//! ring (session open, step, result, close, typed errors, ping) with its byte layout and the
//! checks that make hostile input safe to decode. The service and the iroh adapter come with
//! the worker-pipeline issue.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod protocol;

pub use shoal_model_shards as engine;
