//! Phi-3 against llama.cpp on a tiny random-weight GGUF (F32 weights, made by
//! `tests/reference/tiny_phi3.py`): q, k, v fused in one projection and gate, up in another, a
//! head size of 24 (its `1/sqrt` is not a power of two: the query is scaled before its f16
//! rounding, as llama.cpp does), an untied LM head, and the sliding window llama.cpp ignores
//! for Phi-3. Every position's logits, prefilled at once and decoded one at a time, are
//! llama.cpp's to the rounding of its f16 steps, and two chained spans give the whole model's
//! bits.

mod common;

use serde::Deserialize;
use shoal_model_shards::{Architecture, DType, Device, LogitsMode, Model, Shard, StageInput, StageOutput};

#[derive(Deserialize)]
struct TinyReference {
    token_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

#[test]
fn tiny_random_phi3_matches_llama_cpp() -> anyhow::Result<()> {
    const TOL: f32 = 1e-2;
    let reference: TinyReference =
        serde_json::from_slice(&std::fs::read(common::fixture("tiny_gguf/phi3.json"))?)?;
    let model = Model::open(common::fixture("tiny_gguf/phi3.gguf"))?;
    let s = model.spec();
    assert_eq!(s.arch, Architecture::Phi3);
    assert_eq!((s.head_dim, s.n_heads, s.n_kv_heads, s.sliding_window), (24, 4, 2, None));
    assert!(!s.tie_word_embeddings);
    let n = s.n_layers;
    let ids = &reference.token_ids;
    let whole = Shard::load(&model, 0..n, &Device::Cpu, DType::F32)?;
    let mut cache = whole.new_cache(128);
    let prefill = whole.logits(&mut cache, ids, LogitsMode::All)?.to_vec2::<f32>()?;
    let mut cache = whole.new_cache(128);
    let mut worst = 0f32;
    for (pos, (&id, want)) in ids.iter().zip(&reference.logits).enumerate() {
        let decode = whole.logits(&mut cache, &[id], LogitsMode::Last)?.to_vec2::<f32>()?.remove(0);
        for (what, got) in [("prefill", &prefill[pos]), ("decode", &decode)] {
            let d = common::max_abs_diff(got, want);
            worst = worst.max(d);
            assert!(d < TOL, "{what}: position {pos}: max |Δlogit| {d} against llama.cpp");
        }
    }
    println!("tiny phi3: max |Δlogit| against llama.cpp {worst:.2e} over {} positions", ids.len());

    let spans = [
        Shard::load(&model, 0..1, &Device::Cpu, DType::F32)?,
        Shard::load(&model, 1..n, &Device::Cpu, DType::F32)?,
    ];
    let mut caches: Vec<_> = spans.iter().map(|s| s.new_cache(128)).collect();
    let StageOutput::Hidden(h) =
        spans[0].forward(&mut caches[0], StageInput::Tokens(ids.clone()), LogitsMode::All)?
    else {
        anyhow::bail!("the first span returned logits")
    };
    let StageOutput::Logits(l) = spans[1].forward(&mut caches[1], StageInput::Hidden(h), LogitsMode::All)?
    else {
        anyhow::bail!("the last span returned hidden states")
    };
    for (pos, (a, b)) in l.to_vec2::<f32>()?.iter().zip(&prefill).enumerate() {
        assert_eq!(common::max_abs_diff(a, b), 0.0, "position {pos}: two spans differ from the whole model");
    }
    Ok(())
}

/// An architecture shoal lacks is named in the error, with the list of those it has.
#[test]
fn unsupported_architecture_names_are_listed() {
    let err = shoal_model_shards::Architecture::from_name("mixtral_moe").unwrap_err().to_string();
    assert!(err.contains("mixtral_moe") && err.contains("phi3") && err.contains("gemma2"), "{err}");
}
