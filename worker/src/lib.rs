//! # shoal-worker
//!
//! The stage service of a shoal node: it holds one contiguous span of a model's layers
//! (loaded with [`shoal_model_shards`]) and serves sessions through them.
//!
//! Planned shape (see `DESIGN.md`, "One token's trip"): sessions with KV caches under a memory
//! budget, a scheduler that batches the steps of concurrent sessions, a versioned stage wire
//! protocol adapted to iroh by a thin `ProtocolHandler`, and forwarding of hidden states
//! straight to the next peer of the ring. This crate is filled by the worker-pipeline issue;
//! today it only reserves its place in the workspace and re-exports the engine it builds on.

pub use shoal_model_shards as engine;
