//! Tokens per second through the OpenAI-compatible HTTP API against the pipeline driver
//! called directly, in one run: `cargo bench --bench api`.
//!
//! SmolLM2 as three in-process stages, each its own iroh endpoint on 127.0.0.1 (what
//! `shoal run --stages 3` builds), one origin driver, and the API served by axum on a
//! loopback TCP socket in front of the same driver. Each round runs the same greedy
//! completion (`BENCH_TOKENS` tokens, stop ids off) three ways, back to back: the driver
//! directly, `POST /v1/completions` streamed (server-sent events, read to `[DONE]`), and
//! non-streamed (one JSON body). Throughput is completion tokens over the wall time of the
//! whole request (prefill included, identical in all three). Prints a table and one JSON
//! line: `{"tokens", "rounds", "direct_tok_s", "http_stream_tok_s", "http_json_tok_s",
//! "ratio_stream", "ratio_json"}`.
//!
//! Environment: `SHOAL_MODEL`, `SHOAL_THREADS`, `SHOAL_NET_THREADS`, `BENCH_TOKENS` (128),
//! `BENCH_REPEATS` (5).

use std::time::{Duration, Instant};

use api_bench::ApiBench;
use serde_json::json;
use shoal_coordinator_free_router::driver::Request;
use shoal_model_shards::generate::Flow;
use shoal_model_shards::sampler::SamplingParams;
use support::{env_usize, setup};

#[path = "support/swarm.rs"]
mod support;

#[path = "support/api.rs"]
mod api_bench;

const PROMPT: &str = "The history of the printing press begins";

fn main() {
    let tokens = env_usize("BENCH_TOKENS", 128);
    let rounds = env_usize("BENCH_REPEATS", 5);
    let (model, model_id, rt) = setup();
    rt.block_on(async move {
        // Stop ids off on both sides, so every run generates exactly `tokens` tokens.
        let bench = ApiBench::start(&model, model_id, |m| m.stop_ids.clear()).await;
        let driver = bench.driver.clone();
        let post = |path: &'static str, body: String| {
            let bench = &bench;
            async move { bench.http("POST", path, &body).await }
        };

        let prompt = model.tokenizer().expect("tokenizer").encode(PROMPT, true).expect("encode");
        let request = Request {
            prompt,
            params: SamplingParams::greedy(),
            max_tokens: tokens,
            stop_ids: vec![],
            top_logprobs: 0,
            constraint: None,
        };
        let body = |stream: bool| {
            json!({"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": stream}).to_string()
        };
        let (stream_body, json_body) = (body(true), body(false));
        // Warm-up, and a check that all three produce the same tokens' worth of text.
        let direct = driver.generate(&request, |_| Flow::Continue).await.expect("direct");
        assert_eq!(direct.tokens.len(), tokens);
        let j = post("/v1/completions", json_body.clone()).await;
        assert!(j.contains(&format!("\"completion_tokens\":{tokens}")), "{j}");
        let s = post("/v1/completions", stream_body.clone()).await;
        assert!(s.contains("data: [DONE]"), "{s}");

        let (mut t_direct, mut t_stream, mut t_json) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for _ in 0..rounds {
            let t = Instant::now();
            let out = driver.generate(&request, |_| Flow::Continue).await.expect("direct");
            t_direct += t.elapsed();
            assert_eq!(out.tokens.len(), tokens);
            let t = Instant::now();
            post("/v1/completions", stream_body.clone()).await;
            t_stream += t.elapsed();
            let t = Instant::now();
            post("/v1/completions", json_body.clone()).await;
            t_json += t.elapsed();
        }
        let rate = |t: Duration| (tokens * rounds) as f64 / t.as_secs_f64();
        let (d, s, j) = (rate(t_direct), rate(t_stream), rate(t_json));
        println!("| path (3 stages, {tokens} tokens, {rounds} rounds) | tok/s | vs driver |");
        println!("|---|---|---|");
        println!("| driver called directly | {d:.1} | 1.000x |");
        println!("| HTTP, streamed (SSE) | {s:.1} | {:.3}x |", s / d);
        println!("| HTTP, one JSON body | {j:.1} | {:.3}x |", j / d);
        println!(
            "{}",
            json!({"tokens": tokens, "rounds": rounds, "direct_tok_s": d, "http_stream_tok_s": s,
                   "http_json_tok_s": j, "ratio_stream": s / d, "ratio_json": j / d})
        );
        bench.shutdown().await;
    });
}
