//! The throughput cost of spot-checks: single-stream decode through 3 stages on loopback, each
//! span served by two replicas, with 0%, 2% and 10% of decode steps checked on the other
//! replicas, in one run: `cargo bench -p shoal-coordinator-free-router --bench spot_check`
//! (the router's own bench: it builds without the API and the CLI; `SHOAL_MODEL` names the
//! model, default `models/SmolLM2-135M-Instruct.Q4_1.gguf` of the workspace).
//!
//! A check taps every stage's output of the step and replays the session's history through
//! the other replicas (a prefill, then the checked step), so its cost grows with the
//! position; with checks on, the first two steps through each peer are checked too, as in the
//! default configuration. The shares are interleaved (one generation of each per round) so
//! drift on a shared machine hits them alike. Prints a table and one JSON line:
//! `{"tokens", "runs": [{"share", "decode_tok_s", "checks", "ratio_to_0"}]}`.
//!
//! Environment: as `benches/pipeline.rs` (`SHOAL_MODEL`, `SHOAL_THREADS`, `BENCH_TOKENS`
//! (default 128), `BENCH_REPEATS` (default 3)).

use std::time::Duration;

use shoal_coordinator_free_router::driver::{Driver, DriverConfig, ModelInfo, Request};
use shoal_coordinator_free_router::verify::SpotCheckConfig;
use shoal_model_shards::generate::Flow;
use shoal_model_shards::sampler::SamplingParams;
use shoal_worker::net::{Node, NodeOptions};
use support::{env_usize, setup, start_stages};

#[path = "../../benches/support/swarm.rs"]
mod support;

const SHARES: [f64; 3] = [0.0, 0.02, 0.10];

fn main() {
    let tokens = env_usize("BENCH_TOKENS", 128);
    let repeats = env_usize("BENCH_REPEATS", 3);
    let (model, model_id, rt) = setup();
    let prompt = model
        .tokenizer()
        .expect("tokenizer")
        .encode("The history of the printing press begins", true)
        .expect("encode");
    let request = Request {
        prompt,
        params: SamplingParams::greedy(),
        max_tokens: tokens,
        stop_ids: vec![],
        top_logprobs: 0,
        constraint: None,
    };
    let (rates, checks) = rt.block_on(async {
        let mut nodes = start_stages(&model, model_id, 3).await;
        nodes.extend(start_stages(&model, model_id, 3).await);
        let mut drivers = Vec::new();
        for share in SHARES {
            let origin = Node::bind(NodeOptions::loopback()).await.expect("origin binds");
            let spot_check = SpotCheckConfig {
                share,
                first_steps: if share > 0.0 { SpotCheckConfig::default().first_steps } else { 0 },
                ..SpotCheckConfig::default()
            };
            let config =
                DriverConfig { step_timeout: Duration::from_secs(60), spot_check, ..DriverConfig::default() };
            let d = Driver::new(origin, ModelInfo::of(&model).expect("model info"), config);
            for n in &nodes {
                d.add_peer(n.addr()).await.expect("stage answers");
            }
            d.generate(&request, |_| Flow::Continue).await.expect("warm-up");
            drivers.push(d);
        }
        let mut time = vec![Duration::ZERO; SHARES.len()];
        let mut decoded = vec![0usize; SHARES.len()];
        let mut checks = vec![0usize; SHARES.len()];
        for _ in 0..repeats {
            for (i, d) in drivers.iter().enumerate() {
                let out = d.generate(&request, |_| Flow::Continue).await.expect("generation");
                assert_eq!(out.tokens.len(), tokens);
                assert!(out.failovers.is_empty(), "honest replicas: {:?}", out.failovers);
                time[i] += out.decode_time;
                decoded[i] += out.tokens.len() - 1;
                checks[i] += out.spot_checks;
            }
        }
        for d in &drivers {
            d.node().shutdown().await;
        }
        for n in &nodes {
            n.shutdown().await;
        }
        let rates: Vec<f64> = time.iter().zip(&decoded).map(|(t, &n)| n as f64 / t.as_secs_f64()).collect();
        (rates, checks)
    });
    println!("| steps checked | decode tok/s | checks per generation | vs 0% |");
    println!("|---|---|---|---|");
    let mut runs = Vec::new();
    for (i, share) in SHARES.iter().enumerate() {
        let ratio = rates[i] / rates[0];
        let per_gen = checks[i] as f64 / repeats as f64;
        println!("| {:.0}% | {:.1} | {per_gen:.1} | {ratio:.3}x |", share * 100.0, rates[i]);
        runs.push(serde_json::json!({
            "share": share, "decode_tok_s": rates[i], "checks": per_gen, "ratio_to_0": ratio,
        }));
    }
    println!("{}", serde_json::json!({ "tokens": tokens, "runs": runs }));
}
