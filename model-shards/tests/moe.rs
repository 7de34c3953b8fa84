//! Mixture-of-experts models against llama.cpp on tiny random-weight GGUFs made by
//! `tests/reference/tiny_moe.py`: a Qwen3-MoE (8 experts, 2 per token, F32) and a Mixtral (a
//! `llama` file with 4 experts, 2 per token, experts and attention in Q8_0). Every position's
//! logits, prefilled at once and decoded one at a time, are llama.cpp's within a small
//! tolerance; any split into spans gives the whole model's bits; a batch of sessions gives
//! each session the bits it has alone.

mod common;

use serde::Deserialize;
use shoal_model_shards::spec::MoeSpec;
use shoal_model_shards::{Architecture, DType, Device, LogitsMode, Model, Shard, StageInput, StageOutput};

#[derive(Deserialize)]
struct TinyReference {
    token_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

/// Whole-model logits of every position, prefilled at once and decoded one at a time, against
/// llama.cpp's; returns the prefill logits.
fn check_against_llama_cpp(
    name: &str,
    model: &Model,
    tol: f32,
    mean_tol: f32,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let reference: TinyReference =
        serde_json::from_slice(&std::fs::read(common::fixture(&format!("tiny_gguf/{name}.json")))?)?;
    let ids = &reference.token_ids;
    let whole = Shard::load(model, 0..model.spec().n_layers, &Device::Cpu, DType::F32)?;
    let mut cache = whole.new_cache(128);
    let prefill = whole.logits(&mut cache, ids, LogitsMode::All)?.to_vec2::<f32>()?;
    let mut cache = whole.new_cache(128);
    let (mut worst, mut sum) = (0f32, 0f32);
    for (pos, (&id, want)) in ids.iter().zip(&reference.logits).enumerate() {
        let decode = whole.logits(&mut cache, &[id], LogitsMode::Last)?.to_vec2::<f32>()?.remove(0);
        for (what, got) in [("prefill", &prefill[pos]), ("decode", &decode)] {
            let d = common::max_abs_diff(got, want);
            worst = worst.max(d);
            if what == "prefill" {
                sum += d;
            }
            assert!(d < tol, "{name} {what}: position {pos}: max |Δlogit| {d} against llama.cpp");
        }
    }
    let mean = sum / ids.len() as f32;
    println!(
        "tiny {name}: max |Δlogit| against llama.cpp {worst:.2e} (mean over positions {mean:.2e}) over {} positions",
        ids.len()
    );
    assert!(mean < mean_tol, "{name}: mean max |Δlogit| {mean} ≥ {mean_tol}");
    Ok(prefill)
}

/// Every split point of the model into two spans gives the whole model's prefill logits, bit
/// for bit.
fn check_spans(model: &Model, ids: &[u32], whole: &[Vec<f32>]) -> anyhow::Result<()> {
    let n = model.spec().n_layers;
    for cut in 1..n {
        let spans = [
            Shard::load(model, 0..cut, &Device::Cpu, DType::F32)?,
            Shard::load(model, cut..n, &Device::Cpu, DType::F32)?,
        ];
        let mut caches: Vec<_> = spans.iter().map(|s| s.new_cache(128)).collect();
        let StageOutput::Hidden(h) =
            spans[0].forward(&mut caches[0], StageInput::Tokens(ids.to_vec()), LogitsMode::All)?
        else {
            anyhow::bail!("the first span returned logits")
        };
        let StageOutput::Logits(l) =
            spans[1].forward(&mut caches[1], StageInput::Hidden(h), LogitsMode::All)?
        else {
            anyhow::bail!("the last span returned hidden states")
        };
        for (pos, (a, b)) in l.to_vec2::<f32>()?.iter().zip(whole).enumerate() {
            assert_eq!(
                common::max_abs_diff(a, b),
                0.0,
                "cut {cut}, position {pos}: spans differ from the whole"
            );
        }
    }
    Ok(())
}

#[test]
fn tiny_random_qwen3_moe_matches_llama_cpp() -> anyhow::Result<()> {
    let model = Model::open(common::fixture("tiny_gguf/qwen3moe.gguf"))?;
    let s = model.spec();
    assert_eq!(s.arch, Architecture::Qwen3Moe);
    assert_eq!(s.moe, Some(MoeSpec { n_experts: 8, n_experts_used: 2, expert_intermediate_size: 48 }));
    assert!(s.qk_norm && !s.tie_word_embeddings && s.head_dim == 32);
    let prefill = check_against_llama_cpp("qwen3moe", &model, 1e-2, 1e-3)?;
    let reference: TinyReference =
        serde_json::from_slice(&std::fs::read(common::fixture("tiny_gguf/qwen3moe.json"))?)?;
    check_spans(&model, &reference.token_ids, &prefill)?;
    Ok(())
}

#[test]
fn tiny_random_mixtral_with_q8_0_experts_matches_llama_cpp() -> anyhow::Result<()> {
    let model = Model::open(common::fixture("tiny_gguf/mixtral.gguf"))?;
    let s = model.spec();
    assert_eq!(s.arch, Architecture::Llama);
    assert_eq!(s.moe, Some(MoeSpec { n_experts: 4, n_experts_used: 2, expert_intermediate_size: 96 }));
    assert!(s.tie_word_embeddings);
    // Q8_0 weights: both engines quantize the activations to 8 bits inside their products, so
    // the first 16 positions agree within 1e-5. Past them, attention's f16 roundings differ
    // from llama.cpp's by about 1e-3 (as on the F32 Qwen3-MoE), enough to flip some 8-bit
    // roundings of the experts' inputs, which this random model amplifies: llama.cpp's own
    // Q8_0 logits differ from its F32 logits on the dequantized weights by 0.10 to 0.34 per
    // position. shoal stays within about half of that (max 0.18, mean 0.05).
    let prefill = check_against_llama_cpp("mixtral", &model, 0.25, 0.1)?;
    let reference: TinyReference =
        serde_json::from_slice(&std::fs::read(common::fixture("tiny_gguf/mixtral.json"))?)?;
    check_spans(&model, &reference.token_ids, &prefill)?;
    Ok(())
}

/// Sessions batched together (one new position each, different experts per row) get the
/// bits each gets decoded alone.
#[test]
fn batched_moe_sessions_get_their_lone_bits() -> anyhow::Result<()> {
    let model = Model::open(common::fixture("tiny_gguf/mixtral.gguf"))?;
    let n = model.spec().n_layers;
    let shard = Shard::load(&model, 0..n, &Device::Cpu, DType::F32)?;
    let prompts: [&[u32]; 3] = [&[1, 40, 41, 200], &[1, 7, 99], &[1, 150, 3, 260, 12]];
    let next = [17u32, 230, 64];
    // Alone.
    let mut alone = Vec::new();
    for (p, &t) in prompts.iter().zip(&next) {
        let mut cache = shard.new_cache(64);
        shard.logits(&mut cache, p, LogitsMode::Last)?;
        alone.push(shard.logits(&mut cache, &[t], LogitsMode::Last)?.to_vec2::<f32>()?.remove(0));
    }
    // Batched.
    let mut caches: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut c = shard.new_cache(64);
            shard.logits(&mut c, p, LogitsMode::Last).map(|_| c)
        })
        .collect::<Result<_, _>>()?;
    let mut refs: Vec<&mut shoal_model_shards::KvCache> = caches.iter_mut().collect();
    let input = next.iter().map(|&t| StageInput::Tokens(vec![t])).collect();
    let outs = shard.forward_batch(&mut refs, input)?;
    assert_eq!(outs.len(), alone.len());
    for (i, (a, out)) in alone.iter().zip(outs).enumerate() {
        let StageOutput::Logits(l) = out else { anyhow::bail!("the whole model returned hidden states") };
        let b = l.flatten_all()?.to_vec1::<f32>()?;
        let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "session {i}: batched differs from alone");
    }
    Ok(())
}

/// The Qwen3-MoE fixture rewritten with `edit` applied to its metadata and `extra` tensors
/// added; returns the error of opening it.
fn open_edited(
    name: &str,
    edit: impl Fn(&mut Vec<(String, candle_core::quantized::gguf_file::Value)>),
    extra: &[&str],
) -> anyhow::Result<String> {
    use candle_core::quantized::{QTensor, gguf_file};
    let src = common::fixture("tiny_gguf/qwen3moe.gguf");
    let mut file = std::fs::File::open(&src)?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut meta: Vec<(String, gguf_file::Value)> = content.metadata.clone().into_iter().collect();
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut meta);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for tname in content.tensor_infos.keys() {
        tensors.push((tname.clone(), content.tensor(&mut file, tname, &Device::Cpu)?));
    }
    for &e in extra {
        let like = content.tensor(&mut file, "blk.0.ffn_gate_inp.weight", &Device::Cpu)?;
        tensors.push((e.to_string(), like));
    }
    let path = std::env::temp_dir().join(format!("shoal-moe-{}-{name}.gguf", std::process::id()));
    {
        let meta_refs: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut out = std::fs::File::create(&path)?;
        gguf_file::write(&mut out, &meta_refs, &tensor_refs)?;
    }
    let opened = Model::open(&path);
    std::fs::remove_file(&path)?;
    match opened {
        Ok(_) => anyhow::bail!("{name}: the edited file opened"),
        Err(e) => Ok(e.to_string()),
    }
}

/// A file whose experts do not add up, or that needs what shoal lacks (shared experts), is
/// refused at open with an error naming the key or the feature.
#[test]
fn malformed_or_unsupported_moe_files_are_refused_by_name() -> anyhow::Result<()> {
    use candle_core::quantized::gguf_file::Value as V;
    let set = |key: &'static str, v: V| {
        move |meta: &mut Vec<(String, V)>| {
            meta.retain(|(k, _)| k != key);
            meta.push((key.to_string(), v.clone()));
        }
    };
    let err = open_edited("used", set("qwen3moe.expert_used_count", V::U32(9)), &[])?;
    assert!(err.contains("expert_used_count") && err.contains("9"), "{err}");
    let err = open_edited("huge", set("qwen3moe.expert_count", V::U32(1 << 20)), &[])?;
    assert!(err.contains("expert_count"), "{err}");
    let err = open_edited("none", set("qwen3moe.expert_count", V::U32(0)), &[])?;
    assert!(err.contains("qwen3moe.expert_count"), "{err}");
    let err = open_edited("shared", |_| {}, &["blk.0.ffn_gate_shexp.weight"])?;
    assert!(err.contains("shared experts"), "{err}");
    Ok(())
}
