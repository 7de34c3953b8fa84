//! llama-bench style throughput of the engine on SmolLM2-135M Q4_1 (or the GGUF named by
//! `SHOAL_BENCH_MODEL`): `pp512` (prefill of a 512-token prompt) and `tg128` (128 tokens
//! decoded one at a time from an empty context), median of several repetitions, printed as one
//! JSON line, with the resident memory once the model is loaded and at its peak (Linux).
//! Threads follow `SHOAL_THREADS` (default: all cores). `benches/compare_llama_cpp.sh` runs this and llama.cpp back to back
//! and prints the ratios.
//!
//! `cargo bench --bench speed`

use std::path::PathBuf;
use std::time::Instant;

use shoal_model_shards::{DType, Device, LogitsMode, Model, Shard};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // SAFETY: first thing in main, before any other thread exists.
    let threads = unsafe {
        shoal_model_shards::threads::configure_threads(
            std::env::var("SHOAL_THREADS").ok().and_then(|s| s.parse().ok()),
        )
    };
    let reps: usize = std::env::var("SHOAL_BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let path = match std::env::var_os("SHOAL_BENCH_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    assert!(path.is_file(), "{} is missing: run `bash deploy/fetch-model.sh`", path.display());
    let model = Model::open(&path).expect("open model");
    let n = model.spec().n_layers;
    let shard = Shard::load(&model, 0..n, &Device::Cpu, DType::F32).expect("load model");
    let prompt: Vec<u32> = (0..512u32).map(|i| 100 + (i * 7919) % 40000).collect();
    let loaded_rss = rss_mib();

    // Warm-up: first touches of weights and thread pools.
    let mut cache = shard.new_cache(1024);
    shard.logits(&mut cache, &prompt[..64], LogitsMode::Last).expect("warm-up");

    let mut pp = Vec::new();
    for _ in 0..reps {
        let mut cache = shard.new_cache(1024);
        let t = Instant::now();
        shard.logits(&mut cache, &prompt, LogitsMode::Last).expect("prefill");
        pp.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
    }
    let mut tg = Vec::new();
    for _ in 0..reps {
        let mut cache = shard.new_cache(1024);
        let t = Instant::now();
        for &id in &prompt[..128] {
            shard.logits(&mut cache, &[id], LogitsMode::Last).expect("decode");
        }
        tg.push(128.0 / t.elapsed().as_secs_f64());
    }
    println!(
        "{{\"engine\": \"shoal\", \"threads\": {threads}, \"pp512_tok_s\": {:.1}, \"tg128_tok_s\": {:.1}, \"loaded_rss_mib\": {:.1}, \"peak_rss_mib\": {:.1}}}",
        median(pp),
        median(tg),
        loaded_rss,
        peak_rss_mib(),
    );
}

/// A `/proc/self/status` field in MiB (0 where there is none).
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Resident memory now, in MiB: the weights as loaded (packed), before any KV cache.
fn rss_mib() -> f64 {
    status_mib("VmRSS:")
}

/// Peak resident memory, in MiB: the load (a tensor read whole before it is packed or split)
/// and the caches.
fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}
