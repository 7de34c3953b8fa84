//! # shoal-model-shards
//!
//! shoal's engine, with no networking: model formats (GGUF, and Hugging Face directories of
//! `config.json` + `*.safetensors` + `tokenizer.json`), the validated [`ModelSpec`], loading
//! only a span `[start, end)` of a model's layers ([`Shard`]), the Llama-family blocks (llama,
//! mistral, qwen2, qwen3) Gemma 3 and 2, and Phi-3, the per-session [`KvCache`], the tokenizer and chat template, the
//! deterministic [`sampler`], and the byte encoding of hidden states that cross the wire
//! ([`activation`]).
//!
//! The main loop of a span is [`Shard::forward`]: given a session's cache and either token ids
//! (first span) or hidden states (any other span), it runs its layers and returns hidden states
//! for the next span, or logits on the last span. [`generate::generate`] chains spans in one
//! process; the worker and router crates chain them across peers.
//!
//! On the CPU, quantized matrix products of the common GGUF types use shoal's own SIMD
//! kernels ([`kernels`] is private; dispatch happens at run time from the CPU's features), and
//! candle's quantized matmul otherwise. CUDA and Metal come from candle's cargo features; there the
//! matrix products run on the device, but attention over the paged KV cache ([`KvCache`]) runs
//! on the host (q, k and v are copied per layer).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod activation;
mod attention;
pub mod chat_template;
mod error;
mod gemma3;
pub mod generate;
mod kernels;
mod kv_cache;
mod linear;
mod llama;
pub mod manifest;
mod model;
mod moe;
mod rope;
pub mod sampler;
mod shard;
pub mod spec;
pub mod threads;
pub mod token_mask;
pub mod tokenizer;
mod weights;

pub use candle_core::{DType, Device, Tensor};
pub use error::{Error, Result};
pub use kv_cache::{KV_BLOCK, KvCache, KvPool};
pub use model::{Model, ModelFormat};
pub use shard::{LogitsMode, Shard, StageInput, StageOutput};
pub use spec::{Architecture, ModelSpec};
