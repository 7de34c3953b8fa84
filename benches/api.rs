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

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use shoal_api::{ApiConfig, ApiState, ServedModel, router};
use shoal_coordinator_free_router::driver::{Driver, DriverConfig, ModelInfo, Request};
use shoal_model_shards::generate::Flow;
use shoal_model_shards::sampler::SamplingParams;
use shoal_worker::net::{Node, NodeOptions};
use support::{env_usize, setup, start_stages};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "support/swarm.rs"]
mod support;

const PROMPT: &str = "The history of the printing press begins";

/// One HTTP/1.1 request on a fresh connection, read to the end; returns the body.
async fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8(out).expect("utf-8");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

fn main() {
    let tokens = env_usize("BENCH_TOKENS", 128);
    let rounds = env_usize("BENCH_REPEATS", 5);
    let (model, model_id, rt) = setup();
    rt.block_on(async move {
        let nodes = start_stages(&model, model_id, 3).await;
        let origin = Node::bind(NodeOptions::loopback()).await.expect("origin binds");
        let driver = Arc::new(Driver::new(
            origin.clone(),
            ModelInfo::of(&model).expect("model info"),
            DriverConfig { step_timeout: Duration::from_secs(60), ..DriverConfig::default() },
        ));
        for node in &nodes {
            driver.add_peer(node.addr()).await.expect("stage answers");
        }
        let mut served = ServedModel::of(&model, "bench").expect("tokenizer");
        // Stop ids off on both sides, so every run generates exactly `tokens` tokens.
        served.stop_ids.clear();
        let state = Arc::new(ApiState::new(driver.clone(), served, ApiConfig::default()).expect("metrics"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move { axum::serve(listener, router(state)).await });

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
        let j = post(addr, "/v1/completions", &json_body).await;
        assert!(j.contains(&format!("\"completion_tokens\":{tokens}")), "{j}");
        let s = post(addr, "/v1/completions", &stream_body).await;
        assert!(s.contains("data: [DONE]"), "{s}");

        let (mut t_direct, mut t_stream, mut t_json) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for _ in 0..rounds {
            let t = Instant::now();
            let out = driver.generate(&request, |_| Flow::Continue).await.expect("direct");
            t_direct += t.elapsed();
            assert_eq!(out.tokens.len(), tokens);
            let t = Instant::now();
            post(addr, "/v1/completions", &stream_body).await;
            t_stream += t.elapsed();
            let t = Instant::now();
            post(addr, "/v1/completions", &json_body).await;
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
        server.abort();
        origin.shutdown().await;
        for node in &nodes {
            node.shutdown().await;
        }
    });
}
