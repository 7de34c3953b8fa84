//! # shoal-api
//!
//! The OpenAI-compatible HTTP API that any shoal node can serve: axum endpoints
//! (`/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`, `/metrics`), admission
//! control and Prometheus metrics with vLLM's names under a `shoal_` prefix.
//!
//! This crate is filled by the API issue; today it only reserves its place in the workspace.
