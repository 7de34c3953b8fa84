//! Golden test on the real model against llama.cpp: SmolLM2-135M-Instruct Q4_1 greedy
//! continuations (32 tokens) and top-5 logits for six prompts, recorded by
//! `tests/reference/golden_smollm2.py` with llama-cpp-python (prompt evaluated as one batch,
//! then one token at a time: shoal decodes the same way).
//!
//! Ids must be equal up to the first step where llama.cpp's top-2 logits are within
//! `NEAR_TIE` of each other; before that step, every top-5 logit must be within `LOGIT_TOL`.
//! The tolerance is wide because llama.cpp itself moves these logits by up to 1.3 between
//! batched and one-by-one evaluation of the same tokens (8-bit activation quantization inside
//! the Q4_1 dot products amplifies any rounding difference); the mean error is reported.

mod common;

use serde::Deserialize;
use shoal_model_shards::generate::{Flow, generate};
use shoal_model_shards::sampler::SamplingParams;
use shoal_model_shards::{DType, Device, LogitsMode, Model, Shard};

// 0.25, not 0.1: on an AVX2 CPU (sums in another order than AVX-512's) plain_capital's step
// 14, gap 0.19, flips.
const NEAR_TIE: f32 = 0.25;
const LOGIT_TOL: f32 = 1.5;
const MEAN_TOL: f32 = 0.25;

#[derive(Deserialize)]
struct Golden {
    prompts: Vec<Prompt>,
}

#[derive(Deserialize)]
struct Prompt {
    name: String,
    prompt: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Step {
    token: u32,
    top5: Vec<(u32, f32)>,
    gap_top1_top2: f32,
}

fn golden() -> Golden {
    let path = common::fixture("golden/smollm2_q4_1.json");
    serde_json::from_slice(&std::fs::read(path).expect("read golden")).expect("parse golden")
}

#[test]
fn tokenization_matches_llama_cpp() -> anyhow::Result<()> {
    let model = Model::open(common::smollm2_path())?;
    let tok = model.tokenizer()?;
    for p in golden().prompts {
        assert_eq!(tok.encode(&p.prompt, true)?, p.prompt_ids, "prompt {}", p.name);
    }
    Ok(())
}

#[test]
fn greedy_ids_and_logits_match_llama_cpp() -> anyhow::Result<()> {
    let model = Model::open(common::smollm2_path())?;
    let n = model.spec().n_layers;
    let shard = Shard::load(&model, 0..n, &Device::Cpu, DType::F32)?;
    let mut compared_steps = 0;
    let (mut sum_err, mut n_err, mut worst) = (0f64, 0usize, 0f32);
    for p in golden().prompts {
        // Greedy ids through the same generation loop `shoal generate` uses.
        let generation = generate(
            std::slice::from_ref(&shard),
            &p.prompt_ids,
            &SamplingParams::greedy(),
            p.greedy_ids.len(),
            &[],
            |_| Flow::Continue,
        )?;
        let mut cache = shard.new_cache(1024);
        let mut logits =
            shard.logits(&mut cache, &p.prompt_ids, LogitsMode::Last)?.to_vec2::<f32>()?.remove(0);
        for (i, step) in p.steps.iter().enumerate() {
            for &(id, want) in &step.top5 {
                let got = logits[id as usize];
                let err = (got - want).abs();
                sum_err += f64::from(err);
                n_err += 1;
                worst = worst.max(err);
                assert!(err < LOGIT_TOL, "{}: step {i}: logit of {id} is {got}, llama.cpp {want}", p.name);
            }
            compared_steps += 1;
            if step.gap_top1_top2 < NEAR_TIE {
                // At a near tie either choice is right; the continuations diverge from here.
                println!("{}: stopping at step {i}, a near tie (gap {:.4})", p.name, step.gap_top1_top2);
                break;
            }
            assert_eq!(
                generation.token_ids[i], step.token,
                "{}: greedy token {i} differs from llama.cpp (gap {:.3})",
                p.name, step.gap_top1_top2
            );
            logits = shard.logits(&mut cache, &[step.token], LogitsMode::Last)?.to_vec2::<f32>()?.remove(0);
        }
    }
    let mean = (sum_err / n_err as f64) as f32;
    println!(
        "compared {compared_steps} steps; top-5 logits vs llama.cpp: mean |Δ| {mean:.4}, max {worst:.4}"
    );
    assert!(compared_steps >= 100, "too few steps compared: {compared_steps}");
    assert!(mean < MEAN_TOL, "mean |Δlogit| {mean} ≥ {MEAN_TOL}");
    Ok(())
}
