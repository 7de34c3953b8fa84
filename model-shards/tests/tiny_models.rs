//! Every architecture against Hugging Face transformers: tiny random-weight models (made and
//! scored by `tests/reference/tiny_models.py`) must give transformers' logits at every
//! position, the same greedy continuation, and the same logits when split into two spans.

mod common;

use serde::Deserialize;
use shoal_model_shards::generate::{Flow, generate};
use shoal_model_shards::sampler::SamplingParams;
use shoal_model_shards::{DType, Device, LogitsMode, Model, Shard, StageInput, StageOutput};

#[derive(Deserialize)]
struct Reference {
    input_ids: Vec<u32>,
    logits_all: Vec<Vec<f32>>,
    greedy: Greedy,
}

#[derive(Deserialize)]
struct Greedy {
    new_ids: Vec<u32>,
    steps: Vec<GreedyStep>,
}

#[derive(Deserialize)]
struct GreedyStep {
    gap_top1_top2: f32,
}

fn check(name: &str, tol: f32) -> anyhow::Result<()> {
    let dir = common::fixture(&format!("tiny/{name}"));
    let reference: Reference = serde_json::from_slice(&std::fs::read(dir.join("reference.json"))?)?;
    let model = Model::open(&dir)?;
    let n = model.spec().n_layers;

    // Whole model, prefill of every position at once.
    let whole = Shard::load(&model, 0..n, &Device::Cpu, DType::F32)?;
    let mut cache = whole.new_cache(128);
    let logits = whole.logits(&mut cache, &reference.input_ids, LogitsMode::All)?.to_vec2::<f32>()?;
    assert_eq!(logits.len(), reference.logits_all.len());
    let mut worst = 0f32;
    for (got, want) in logits.iter().zip(&reference.logits_all) {
        worst = worst.max(common::max_abs_diff(got, want));
    }
    println!("{name}: max |Δlogit| vs transformers = {worst:.2e}");
    assert!(worst < tol, "{name}: max |Δlogit| = {worst} ≥ {tol}");

    // Token by token (decode path with the KV cache) gives the same logits.
    let mut cache = whole.new_cache(128);
    for (i, &id) in reference.input_ids.iter().enumerate() {
        let row = whole.logits(&mut cache, &[id], LogitsMode::Last)?.to_vec2::<f32>()?;
        let d = common::max_abs_diff(&row[0], &reference.logits_all[i]);
        assert!(d < tol, "{name}: decode step {i}: |Δlogit| = {d}");
    }

    // Two spans chained give the same logits.
    let mid = n / 2;
    let a = Shard::load(&model, 0..mid, &Device::Cpu, DType::F32)?;
    let b = Shard::load(&model, mid..n, &Device::Cpu, DType::F32)?;
    let (mut ca, mut cb) = (a.new_cache(128), b.new_cache(128));
    let StageOutput::Hidden(h) =
        a.forward(&mut ca, StageInput::Tokens(reference.input_ids.clone()), LogitsMode::All)?
    else {
        anyhow::bail!("first span returned logits")
    };
    let StageOutput::Logits(l) = b.forward(&mut cb, StageInput::Hidden(h), LogitsMode::All)? else {
        anyhow::bail!("last span returned hidden states")
    };
    for (got, want) in l.to_vec2::<f32>()?.iter().zip(&logits) {
        assert_eq!(common::max_abs_diff(got, want), 0.0, "{name}: split model differs");
    }

    // Greedy continuation equals transformers' up to the first near tie.
    let generation = generate(
        std::slice::from_ref(&whole),
        &reference.input_ids,
        &SamplingParams::greedy(),
        reference.greedy.new_ids.len(),
        &[],
        |_| Flow::Continue,
    )?;
    for (i, (got, want)) in generation.token_ids.iter().zip(&reference.greedy.new_ids).enumerate() {
        assert_eq!(got, want, "{name}: greedy token {i}");
        if reference.greedy.steps[i].gap_top1_top2 < 10.0 * tol {
            break;
        }
    }
    Ok(())
}

#[test]
fn llama_sharded_safetensors() -> anyhow::Result<()> {
    check("llama", 1e-4)
}

#[test]
fn llama3_rope_scaling() -> anyhow::Result<()> {
    check("llama3", 1e-4)
}

#[test]
fn llama_tied_embeddings() -> anyhow::Result<()> {
    check("llama_tied", 1e-4)
}

#[test]
fn mistral() -> anyhow::Result<()> {
    check("mistral", 1e-4)
}

#[test]
fn mistral_f16_weights() -> anyhow::Result<()> {
    check("mistral_f16", 1e-4)
}

#[test]
fn qwen2_qkv_bias() -> anyhow::Result<()> {
    check("qwen2", 1e-4)
}

#[test]
fn qwen2_bf16_weights() -> anyhow::Result<()> {
    check("qwen2_bf16", 1e-4)
}

#[test]
fn qwen3_qk_norm() -> anyhow::Result<()> {
    check("qwen3", 1e-4)
}

#[test]
fn unknown_architecture_is_a_typed_error() -> anyhow::Result<()> {
    let dir = tempdir()?;
    let src = common::fixture("tiny/llama/config.json");
    let cfg =
        std::fs::read_to_string(src)?.replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt_neox\"");
    std::fs::write(dir.join("config.json"), cfg)?;
    match Model::open(&dir) {
        Err(shoal_model_shards::Error::UnsupportedArchitecture(name)) => assert_eq!(name, "gpt_neox"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("an unknown architecture was accepted"),
    }
    Ok(())
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("shoal-test-{}-{}", std::process::id(), line!()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[test]
fn model_ids_are_stable_and_tell_models_apart() -> anyhow::Result<()> {
    let id = |name: &str| -> anyhow::Result<[u8; 32]> {
        Ok(Model::open(common::fixture(&format!("tiny/{name}")))?.model_id()?)
    };
    let names = ["llama", "llama_tied", "llama3", "mistral", "mistral_f16", "qwen2", "qwen2_bf16", "qwen3"];
    let ids: Vec<[u8; 32]> = names.iter().map(|n| id(n)).collect::<anyhow::Result<_>>()?;
    for (i, a) in ids.iter().enumerate() {
        for b in &ids[i + 1..] {
            assert_ne!(a, b, "two fixtures share a model id");
        }
    }
    assert_eq!(id("llama")?, ids[0], "the id is a pure function of the files");
    Ok(())
}
