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
fn gemma3_sliding_window_and_linear_rope() -> anyhow::Result<()> {
    check("gemma3", 1e-4)
}

#[test]
fn gemma2_soft_capping() -> anyhow::Result<()> {
    check("gemma2", 1e-4)
}

#[test]
fn phi3_fused_projections() -> anyhow::Result<()> {
    check("phi3", 1e-4)
}

#[test]
fn gemma3_multimodal_checkpoint_runs_its_language_model() -> anyhow::Result<()> {
    check("gemma3_mm", 1e-4)
}

/// The Hub's multimodal Gemma 3 configs list few keys of their `text_config` (this is
/// google/gemma-3-4b-it's); the rest are `Gemma3TextConfig`'s defaults, which transformers
/// 5.23 fills in as asserted here (`Gemma3TextConfig(**text_config)`).
#[test]
fn a_sparse_gemma3_text_config_takes_transformers_defaults() -> anyhow::Result<()> {
    let dir = edited_config("gemma3_mm", |c| {
        c["text_config"] = serde_json::json!({
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024
        });
    })?;
    std::fs::copy(common::fixture("tiny/gemma3_mm/model.safetensors"), dir.join("model.safetensors"))?;
    let spec = Model::open(&dir)?.spec().clone();
    assert_eq!(
        (
            spec.hidden_size,
            spec.intermediate_size,
            spec.n_layers,
            spec.n_heads,
            spec.n_kv_heads,
            spec.head_dim
        ),
        (2560, 10240, 34, 8, 4, 256)
    );
    assert_eq!(
        (spec.vocab_size, spec.max_position_embeddings, spec.sliding_window),
        (262_208, 131_072, Some(1024))
    );
    assert_eq!(
        (spec.rope_theta, spec.rope_local_theta, spec.rope_linear_factor),
        (1e6, Some(1e4), Some(8.0))
    );
    assert_eq!((spec.sliding_window_pattern, spec.query_scale), (Some(6), Some(1.0 / 16.0)));
    assert!(spec.tie_word_embeddings && spec.rms_norm_eps == 1e-6 && spec.final_logit_softcap.is_none());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn mixtral_experts() -> anyhow::Result<()> {
    check("mixtral", 1e-4)
}

#[test]
fn qwen3_moe_experts() -> anyhow::Result<()> {
    check("qwen3_moe", 1e-4)
}

/// A fixture's `config.json` with `edit` applied, alone in a fresh directory (the settings
/// below are refused before any weight is read).
fn edited_config(
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> anyhow::Result<std::path::PathBuf> {
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(common::fixture(&format!("tiny/{name}/config.json")))?)?;
    edit(&mut cfg);
    let dir =
        std::env::temp_dir().join(format!("shoal-test-{}-{name}-{}", std::process::id(), next_dir_id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&cfg)?)?;
    Ok(dir)
}

/// A number no other call in this process gets (tests running at once use other directories).
fn next_dir_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// transformers 5 writes `config.json` in its own layout (`rope_parameters`, per layer type for
/// Gemma 3); the fixtures carry the Hub's older layout. Both must give the same spec.
#[test]
fn both_config_layouts_give_the_same_spec() -> anyhow::Result<()> {
    for name in ["gemma3", "gemma3_mm", "gemma2", "phi3", "mixtral", "llama3", "mistral"] {
        let fixture = common::fixture(&format!("tiny/{name}"));
        let reference: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture.join("reference.json"))?)?;
        let native = reference["config_as_saved_by_transformers"].clone();
        let text = native.get("text_config").unwrap_or(&native);
        assert!(text.get("rope_parameters").is_some(), "{name}: not the transformers 5 layout");
        let dir = edited_config(name, |c| *c = native)?;
        std::fs::copy(fixture.join("model.safetensors"), dir.join("model.safetensors"))?;
        let (a, b) = (Model::open(&dir)?, Model::open(&fixture)?);
        assert_eq!(a.spec(), b.spec(), "{name}: the two layouts disagree");
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

#[test]
fn checkpoint_settings_shoal_cannot_run_are_named_in_the_error() -> anyhow::Result<()> {
    use serde_json::json;
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let set = |key: &'static str, v: serde_json::Value| -> Edit { Box::new(move |c| c[key] = v) };
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("qwen3_moe", set("norm_topk_prob", json!(false)), "norm_topk_prob"),
        ("qwen3_moe", set("mlp_only_layers", json!([1])), "mlp_only_layers"),
        ("qwen3_moe", set("decoder_sparse_step", json!(2)), "mlp_only_layers"),
        ("phi3", set("partial_rotary_factor", json!(0.75)), "partial_rotary_factor"),
        (
            "phi3",
            set("rope_scaling", json!({"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]})),
            "longrope",
        ),
        ("gemma3", set("hidden_activation", json!("gelu")), "hidden_activation"),
        ("llama", set("hidden_act", json!("gelu")), "hidden_act"),
        ("llama", set("rope_scaling", json!({"rope_type": "linear", "factor": 2.0})), "linear"),
        (
            "gemma3",
            set(
                "layer_types",
                json!([
                    "sliding_attention",
                    "full_attention",
                    "full_attention",
                    "sliding_attention",
                    "sliding_attention",
                    "full_attention"
                ]),
            ),
            "layer 2",
        ),
        ("gemma3", set("use_bidirectional_attention", json!(true)), "use_bidirectional_attention"),
        ("gemma3", set("model_type", json!("gemma3")), "text_config"),
        (
            "mixtral",
            Box::new(|c: &mut serde_json::Value| {
                c.as_object_mut().map(|o| o.remove("num_local_experts"));
            }),
            "num_local_experts",
        ),
        ("gemma2", set("final_logit_softcapping", json!(-1.0)), "final_logit_softcapping"),
    ];
    for (name, edit, needle) in cases {
        let dir = edited_config(name, edit)?;
        let err = match Model::open(&dir) {
            Ok(_) => panic!("{name}: a config that needs `{needle}` was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(needle), "{name}: the error `{err}` does not name `{needle}`");
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
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
    let names = [
        "llama",
        "llama_tied",
        "llama3",
        "mistral",
        "mistral_f16",
        "qwen2",
        "qwen2_bf16",
        "qwen3",
        "gemma3",
        "gemma3_mm",
        "gemma2",
        "phi3",
        "mixtral",
        "qwen3_moe",
    ];
    let ids: Vec<[u8; 32]> = names.iter().map(|n| id(n)).collect::<anyhow::Result<_>>()?;
    for (i, a) in ids.iter().enumerate() {
        for b in &ids[i + 1..] {
            assert_ne!(a, b, "two fixtures share a model id");
        }
    }
    assert_eq!(id("llama")?, ids[0], "the id is a pure function of the files");
    Ok(())
}
