//! Single-stream decode through a pipeline of stages on loopback against the same model in
//! one stage (and in-process `generate()` with no network), in one run:
//! `cargo bench --bench pipeline`.
//!
//! For each configuration (1 stage, 3 stages, and 3 stages with the sampler's inputs in the
//! clear instead of sealed for the last stage) the model is split evenly into in-process
//! stages, each its own iroh endpoint on 127.0.0.1 with its own compute thread (what
//! `shoal run` does), and an origin drives greedy generations of `TOKENS` tokens (stop ids
//! off) after a warm-up. While the stages decode, a task pings every link of the ring
//! (origin → stage 1 → … → stage N → origin) every `BENCH_PING_MS` milliseconds (50); half a round trip is
//! the one-way latency of a hop. Prints a table and one JSON line:
//! `{"tokens", "local_decode_tok_s", "runs": [{"stages", "sealed", "decode_tok_s", "step_ms_p50", "step_ms_p99"}],
//!   "ratio_3_over_1", "ratio_sealed_over_clear", "hop_ms_p50", "hop_ms_p99", "overhead_ms_per_hop"}`.
//!
//! Environment: `SHOAL_NET_THREADS` (the async runtime's threads, default 1 on ≤ 4 cores),
//! `SHOAL_MODEL` (default `models/SmolLM2-135M-Instruct.Q4_1.gguf`),
//! `SHOAL_THREADS` (compute threads), `BENCH_TOKENS` (default 128), `BENCH_REPEATS`
//! (default 3).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use shoal_coordinator_free_router::driver::{Driver, DriverConfig, ModelInfo, Request};
use shoal_model_shards::generate::Flow;
use shoal_model_shards::sampler::SamplingParams;
use shoal_model_shards::{DType, Device, Model, Shard};
use shoal_worker::net::{Node, NodeOptions};
use support::{env_usize, setup, start_stages};

#[path = "support/swarm.rs"]
mod support;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sorted_ms(v: impl IntoIterator<Item = Duration>) -> Vec<f64> {
    let mut v: Vec<f64> = v.into_iter().map(|d| d.as_secs_f64() * 1e3).collect();
    v.sort_by(f64::total_cmp);
    v
}

struct RunResult {
    stages: usize,
    sealed: bool,
    decode_tok_s: f64,
    steps_ms: Vec<f64>,
    hops_ms: Vec<f64>,
}

async fn run(
    model: &Model,
    model_id: [u8; 32],
    stages: usize,
    sealed: bool,
    tokens: usize,
    repeats: usize,
) -> RunResult {
    let nodes = start_stages(model, model_id, stages).await;
    let origin = Node::bind(NodeOptions::loopback()).await.expect("origin binds");
    let driver = Driver::new(
        origin.clone(),
        ModelInfo::of(model).expect("model info"),
        DriverConfig {
            step_timeout: Duration::from_secs(60),
            seal_sampler_inputs: sealed,
            ..DriverConfig::default()
        },
    );
    for node in &nodes {
        driver.add_peer(node.addr()).await.expect("stage answers");
    }
    // Every link of the ring: origin → s1, s_i → s_i+1, sN → origin.
    for (i, node) in nodes.iter().enumerate() {
        let next = nodes.get(i + 1).map_or(origin.addr(), Node::addr);
        node.add_peer_addr(next);
    }
    let mut links: Vec<(Node, [u8; 32])> = vec![(origin.clone(), nodes[0].id())];
    for w in nodes.windows(2) {
        links.push((w[0].clone(), w[1].id()));
    }
    links.push((nodes[stages - 1].clone(), origin.id()));

    let tokenizer = model.tokenizer().expect("tokenizer");
    let prompt = tokenizer.encode("The history of the printing press begins", true).expect("encode");
    let request = Request {
        prompt,
        params: SamplingParams::greedy(),
        max_tokens: tokens,
        stop_ids: vec![],
        top_logprobs: 0,
        constraint: None,
    };
    driver.generate(&request, |_| Flow::Continue).await.expect("warm-up");

    let ping_every = Duration::from_millis(env_usize("BENCH_PING_MS", 50) as u64);
    let running = Arc::new(AtomicBool::new(true));
    let pinger = {
        let running = running.clone();
        tokio::spawn(async move {
            let mut hops = Vec::new();
            while running.load(Ordering::Relaxed) {
                for (from, to) in &links {
                    if let Ok((rtt, _)) = from.ping(*to, Duration::from_secs(5)).await {
                        hops.push(rtt / 2);
                    }
                }
                tokio::time::sleep(ping_every).await;
            }
            hops
        })
    };
    let mut steps = Vec::new();
    let mut decode_time = Duration::ZERO;
    let mut decoded = 0usize;
    for _ in 0..repeats {
        let out = driver.generate(&request, |_| Flow::Continue).await.expect("generation");
        assert_eq!(out.tokens.len(), tokens);
        decode_time += out.decode_time;
        decoded += out.tokens.len() - 1;
        steps.extend(out.step_times);
    }
    running.store(false, Ordering::Relaxed);
    let hops = pinger.await.expect("pinger");
    origin.shutdown().await;
    for node in &nodes {
        node.shutdown().await;
    }
    RunResult {
        stages,
        sealed,
        decode_tok_s: decoded as f64 / decode_time.as_secs_f64(),
        steps_ms: sorted_ms(steps),
        hops_ms: sorted_ms(hops),
    }
}

/// The same generations with no network: `generate()` over the whole model in this thread.
fn local(model: &Model, tokens: usize, repeats: usize) -> f64 {
    let n = model.spec().n_layers;
    let shard = Shard::load(model, 0..n, &Device::Cpu, DType::F32).expect("model loads");
    let tokenizer = model.tokenizer().expect("tokenizer");
    let prompt = tokenizer.encode("The history of the printing press begins", true).expect("encode");
    let params = SamplingParams::greedy();
    let run = || {
        shoal_model_shards::generate::generate(
            std::slice::from_ref(&shard),
            &prompt,
            &params,
            tokens,
            &[],
            |_| Flow::Continue,
        )
        .expect("local generation")
    };
    run();
    let (mut time, mut decoded) = (Duration::ZERO, 0);
    for _ in 0..repeats {
        let g = run();
        time += g.decode_time;
        decoded += g.token_ids.len() - 1;
    }
    decoded as f64 / time.as_secs_f64()
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let tokens = env_usize("BENCH_TOKENS", 128);
    let repeats = env_usize("BENCH_REPEATS", 3);
    let (model, model_id, rt) = setup();
    let local_tok_s = local(&model, tokens, repeats);
    let results: Vec<RunResult> = [(1, true), (3, true), (3, false)]
        .into_iter()
        .map(|(stages, sealed)| rt.block_on(run(&model, model_id, stages, sealed, tokens, repeats)))
        .collect();
    println!("| stages | decode tok/s | step ms p50 | step ms p99 | hop ms p50 | hop ms p99 |");
    println!("|---|---|---|---|---|---|");
    println!("| local `generate()`, no network | {local_tok_s:.1} | | | | |");
    for r in &results {
        println!(
            "| {}{} | {:.1} | {:.2} | {:.2} | {:.3} | {:.3} |",
            r.stages,
            if r.sealed { "" } else { ", sampler inputs in the clear" },
            r.decode_tok_s,
            percentile(&r.steps_ms, 0.5),
            percentile(&r.steps_ms, 0.99),
            percentile(&r.hops_ms, 0.5),
            percentile(&r.hops_ms, 0.99)
        );
    }
    let (one, three, clear) = (&results[0], &results[1], &results[2]);
    let ratio = three.decode_tok_s / one.decode_tok_s;
    let sealing = three.decode_tok_s / clear.decode_tok_s;
    // Three stages add two hops to the ring of one stage (2 → 4 hops).
    let overhead = (percentile(&three.steps_ms, 0.5) - percentile(&one.steps_ms, 0.5)) / 2.0;
    println!(
        "3 stages / 1 stage decode: {ratio:.3}x; hop latency (ping/2 on the ring's links while decoding) p50 {:.3} ms, p99 {:.3} ms; median step grows by {overhead:.3} ms per added hop",
        percentile(&three.hops_ms, 0.5),
        percentile(&three.hops_ms, 0.99)
    );
    println!("3 stages, sealed / in the clear: {sealing:.3}x");
    let runs: Vec<serde_json::Value> = results
        .iter()
        .map(|r| {
            serde_json::json!({
                "stages": r.stages,
                "sealed": r.sealed,
                "decode_tok_s": r.decode_tok_s,
                "step_ms_p50": percentile(&r.steps_ms, 0.5),
                "step_ms_p99": percentile(&r.steps_ms, 0.99),
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "tokens": tokens,
            "local_decode_tok_s": local_tok_s,
            "runs": runs,
            "ratio_3_over_1": ratio,
            "ratio_sealed_over_clear": sealing,
            "hop_ms_p50": percentile(&three.hops_ms, 0.5),
            "hop_ms_p99": percentile(&three.hops_ms, 0.99),
            "overhead_ms_per_hop": overhead,
        })
    );
}
