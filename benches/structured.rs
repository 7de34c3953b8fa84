//! Tokens per second with and without a JSON schema through the OpenAI-compatible API, in one
//! run: `cargo bench --bench structured`.
//!
//! SmolLM2 as three in-process stages (what `shoal run --stages 3` builds), one origin driver
//! and the API on a loopback socket. Each round sends, back to back, the same chat request
//! free (greedy, `ignore_eos`, `BENCH_TOKENS` tokens) and constrained by a schema whose
//! answer is long (an array of exactly 12 objects of 3 fields, about 200 tokens; capped at
//! `BENCH_TOKENS`), non-streamed. Throughput is completion tokens over the wall time of the
//! request. The grammar's cost per token is read from the server's own
//! `shoal_grammar_mask_seconds` histogram (time to compute each step's mask at the origin),
//! and also shown as the difference of the two times per token (the prompts are the same, so
//! prefill cancels out; within noise). The first constrained request also builds the
//! vocabulary's token trie: its extra time (a one-token request, against a second one) is
//! reported once. Prints a table and one JSON
//! line.
//!
//! Environment: `SHOAL_MODEL`, `SHOAL_THREADS`, `SHOAL_NET_THREADS`, `BENCH_TOKENS` (240),
//! `BENCH_REPEATS` (5).

use std::time::{Duration, Instant};

use api_bench::ApiBench;
use serde_json::{Value, json};
use support::{env_usize, setup};

#[path = "support/swarm.rs"]
mod support;

#[path = "support/api.rs"]
mod api_bench;

/// The value of metric `name` in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name))
        // The name, its labels if any, then the value.
        .find_map(|r| if r.starts_with('{') { r.split_once("} ").map(|x| x.1) } else { r.strip_prefix(' ') })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

fn main() {
    let tokens = env_usize("BENCH_TOKENS", 240);
    let rounds = env_usize("BENCH_REPEATS", 5);
    let (model, model_id, rt) = setup();
    rt.block_on(async move {
        let bench = ApiBench::start(&model, model_id, |_| {}).await;
        let post = |body: &Value| {
            let (bench, body) = (&bench, body.to_string());
            async move {
                serde_json::from_str::<Value>(&bench.http("POST", "/v1/chat/completions", &body).await).expect("JSON")
            }
        };

        let messages = json!([{"role": "user", "content": "List twelve fruits with their colors and prices, as JSON."}]);
        let free = json!({"messages": messages, "max_tokens": tokens, "temperature": 0, "ignore_eos": true});
        let schema = json!({"type": "array", "minItems": 12, "maxItems": 12, "items": {"type": "object",
            "properties": {"fruit": {"type": "string", "maxLength": 12}, "color": {"enum": ["red", "yellow", "green", "orange", "purple"]},
                           "price": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["fruit", "color", "price"], "additionalProperties": false}});
        let constrained = json!({"messages": messages, "max_tokens": tokens, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "fruits", "schema": schema}}});
        let completion = |v: &Value| v["usage"]["completion_tokens"].as_u64().expect("usage") as usize;

        post(&free).await;
        // One-token constrained requests: the first builds the trie.
        let mut one = constrained.clone();
        one["max_tokens"] = 1.into();
        let t = Instant::now();
        post(&one).await;
        let first_time = t.elapsed();
        let t = Instant::now();
        post(&one).await;
        let warm_time = t.elapsed();
        let first = post(&constrained).await;
        let text = first["choices"][0]["message"]["content"].as_str().expect("content").to_owned();

        let (mut t_free, mut t_schema, mut n_free, mut n_schema) = (Duration::ZERO, Duration::ZERO, 0, 0);
        for _ in 0..rounds {
            let t = Instant::now();
            let r = post(&free).await;
            t_free += t.elapsed();
            n_free += completion(&r);
            let t = Instant::now();
            let r = post(&constrained).await;
            t_schema += t.elapsed();
            n_schema += completion(&r);
        }
        let (f, s) = (n_free as f64 / t_free.as_secs_f64(), n_schema as f64 / t_schema.as_secs_f64());
        let per_token_ms = 1e3 * (1.0 / s - 1.0 / f);
        let metrics = bench.http("GET", "/metrics", "").await;
        let masks = metric(&metrics, "shoal_grammar_mask_seconds_count");
        let mask_ms = 1e3 * metric(&metrics, "shoal_grammar_mask_seconds_sum") / masks;
        let trie_ms = 1e3 * (first_time.as_secs_f64() - warm_time.as_secs_f64());
        println!("| chat, 3 stages, {rounds} rounds | tokens/request | tok/s | vs free |");
        println!("|---|---|---|---|");
        println!("| free text (ignore_eos) | {} | {f:.1} | 1.000x |", n_free / rounds);
        println!("| JSON schema (12 objects) | {} | {s:.1} | {:.3}x |", n_schema / rounds, s / f);
        println!(
            "token mask at the origin: {mask_ms:.3} ms mean over {masks} masks ({:.1}% of a free token's time); \
             difference of times per token: {per_token_ms:.3} ms; first constrained request: +{trie_ms:.0} ms",
            100.0 * mask_ms / (1e3 / f)
        );
        println!("constrained output: {text}");
        println!(
            "{}",
            json!({"rounds": rounds, "free_tokens": n_free / rounds, "schema_tokens": n_schema / rounds,
                   "free_tok_s": f, "schema_tok_s": s, "ratio": s / f, "mask_ms": mask_ms,
                   "per_token_difference_ms": per_token_ms,
                   "first_request_extra_ms": trie_ms})
        );
        bench.shutdown().await;
    });
}
