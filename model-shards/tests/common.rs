//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The real model; fails (never skips) when it has not been fetched.
pub fn smollm2_path() -> PathBuf {
    let p = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", p.display());
    p
}

/// A committed fixture file or directory.
pub fn fixture(rel: &str) -> PathBuf {
    let p = repo_root().join("tests/fixtures").join(rel);
    assert!(p.exists(), "fixture {} is missing", p.display());
    p
}

/// Largest absolute difference between two equal-length slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The real Gemma 3 270M Q4_K_M; fails (never skips) when it has not been fetched.
pub fn gemma3_path() -> PathBuf {
    let p = repo_root().join("models/gemma-3-270m-q4_k_m.gguf");
    assert!(p.is_file(), "{} is missing: run `bash deploy/fetch-gemma3.sh` first", p.display());
    p
}
