//! GGUF loading for every supported tensor type.
//!
//! 1. The tiny llama fixture (Hugging Face safetensors) is written as a GGUF the way
//!    llama.cpp's converter writes one (q and k rows permuted for its interleaved rope, GGUF
//!    tensor names, metadata keys). The F32 file must give transformers' logits (up to the
//!    f16 precision of the KV cache that GGUF models use, as in llama.cpp).
//! 2. Every quantized type (F16, Q8_0, Q4_0, Q4_1 on the fixture; Q4_K, Q5_K, Q6_K, which need
//!    rows of 256 values, on a random llama of width 256) must compute what its weights say:
//!    its logits match those of an F32 GGUF holding the same weights dequantized, up to the
//!    8-bit quantization of activations inside the quantized dot products.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use shoal_model_shards::{LogitsMode, Model, Shard};

struct Dims {
    hidden: usize,
    ffn: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
}

/// llama.cpp's `permute` for q/k rows: HF's half-split rope layout to interleaved pairs.
fn permute(w: &Tensor, n_head: usize) -> anyhow::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((n_head, 2, out / n_head / 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// Writes a llama GGUF from HF-named f32 tensors, quantizing matrices to `dtype` (norms stay
/// F32, as llama.cpp keeps them).
fn write_gguf(
    path: &Path,
    dims: &Dims,
    get: &dyn Fn(&str) -> anyhow::Result<Tensor>,
    dtype: GgmlDType,
    dequantized: bool,
) -> anyhow::Result<()> {
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |name: String, t: Tensor, matrix: bool| -> anyhow::Result<()> {
        let q = if matrix { QTensor::quantize(&t, dtype)? } else { QTensor::quantize(&t, GgmlDType::F32)? };
        // The same weights stored as F32: the reference for the quantized kernels.
        let q =
            if dequantized { QTensor::quantize(&q.dequantize(&Device::Cpu)?, GgmlDType::F32)? } else { q };
        tensors.push((name, q));
        Ok(())
    };
    add("token_embd.weight".into(), get("model.embed_tokens.weight")?, true)?;
    add("output_norm.weight".into(), get("model.norm.weight")?, false)?;
    add("output.weight".into(), get("lm_head.weight")?, true)?;
    for i in 0..dims.layers {
        let hf = |s: &str| get(&format!("model.layers.{i}.{s}"));
        add(format!("blk.{i}.attn_norm.weight"), hf("input_layernorm.weight")?, false)?;
        add(format!("blk.{i}.ffn_norm.weight"), hf("post_attention_layernorm.weight")?, false)?;
        add(format!("blk.{i}.attn_q.weight"), permute(&hf("self_attn.q_proj.weight")?, dims.heads)?, true)?;
        add(
            format!("blk.{i}.attn_k.weight"),
            permute(&hf("self_attn.k_proj.weight")?, dims.kv_heads)?,
            true,
        )?;
        add(format!("blk.{i}.attn_v.weight"), hf("self_attn.v_proj.weight")?, true)?;
        add(format!("blk.{i}.attn_output.weight"), hf("self_attn.o_proj.weight")?, true)?;
        add(format!("blk.{i}.ffn_gate.weight"), hf("mlp.gate_proj.weight")?, true)?;
        add(format!("blk.{i}.ffn_up.weight"), hf("mlp.up_proj.weight")?, true)?;
        add(format!("blk.{i}.ffn_down.weight"), hf("mlp.down_proj.weight")?, true)?;
    }
    use gguf_file::Value as V;
    let meta: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("llama.block_count", V::U32(dims.layers as u32)),
        ("llama.embedding_length", V::U32(dims.hidden as u32)),
        ("llama.feed_forward_length", V::U32(dims.ffn as u32)),
        ("llama.attention.head_count", V::U32(dims.heads as u32)),
        ("llama.attention.head_count_kv", V::U32(dims.kv_heads as u32)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("llama.rope.freq_base", V::F32(10_000.0)),
        ("llama.context_length", V::U32(128)),
        ("llama.vocab_size", V::U32(dims.vocab as u32)),
    ];
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path)?;
    gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
    Ok(())
}

fn all_logits(path: &Path, ids: &[u32]) -> anyhow::Result<Vec<Vec<f32>>> {
    let model = Model::open(path)?;
    let n = model.spec().n_layers;
    let shard = Shard::load(&model, 0..n, &Device::Cpu, DType::F32)?;
    let mut cache = shard.new_cache(128);
    Ok(shard.logits(&mut cache, ids, LogitsMode::All)?.to_vec2::<f32>()?)
}

fn rms(v: &[Vec<f32>]) -> f32 {
    let n: usize = v.iter().map(Vec::len).sum();
    (v.iter().flatten().map(|x| x * x).sum::<f32>() / n as f32).sqrt()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().zip(b).map(|(x, y)| common::max_abs_diff(x, y)).fold(0.0, f32::max)
}

/// RMS of the difference over RMS of the reference.
fn rel_rms(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    let n: usize = want.iter().map(Vec::len).sum();
    let d = got.iter().flatten().zip(want.iter().flatten()).map(|(a, b)| (a - b) * (a - b)).sum::<f32>();
    (d / n as f32).sqrt() / rms(want)
}

/// Quantized file vs the same weights dequantized into an F32 file.
fn check_kernels(
    stem: &str,
    dims: &Dims,
    get: &dyn Fn(&str) -> anyhow::Result<Tensor>,
    ids: &[u32],
    dtype: GgmlDType,
) -> anyhow::Result<f32> {
    let q_path = scratch(&format!("{stem}-{dtype:?}.gguf"))?;
    let f_path = scratch(&format!("{stem}-{dtype:?}-dequantized.gguf"))?;
    write_gguf(&q_path, dims, get, dtype, false)?;
    write_gguf(&f_path, dims, get, dtype, true)?;
    let rel = rel_rms(&all_logits(&q_path, ids)?, &all_logits(&f_path, ids)?);
    println!("{stem} {dtype:?}: rms |Δlogit| vs dequantized weights / rms = {rel:.2e}");
    Ok(rel)
}

fn scratch(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("shoal-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir.join(name))
}

#[derive(Deserialize)]
struct Reference {
    input_ids: Vec<u32>,
    logits_all: Vec<Vec<f32>>,
}

#[test]
fn converted_fixture_matches_transformers_and_block32_types_their_weights() -> anyhow::Result<()> {
    let dir = common::fixture("tiny/llama");
    let reference: Reference = serde_json::from_slice(&std::fs::read(dir.join("reference.json"))?)?;
    let files: Vec<PathBuf> = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        .iter()
        .map(|f| dir.join(f))
        .collect();
    // SAFETY: read-only mapping of committed fixtures.
    let st = unsafe { MmapedSafetensors::multi(&files)? };
    let get =
        |name: &str| -> anyhow::Result<Tensor> { Ok(st.load(name, &Device::Cpu)?.to_dtype(DType::F32)?) };
    let dims = Dims { hidden: 64, ffn: 128, layers: 4, heads: 4, kv_heads: 2, vocab: 256 };
    let path = scratch("tiny-F32.gguf")?;
    write_gguf(&path, &dims, &get, GgmlDType::F32, false)?;
    let got = all_logits(&path, &reference.input_ids)?;
    let worst = max_diff(&got, &reference.logits_all);
    println!("F32 GGUF vs transformers: max |Δlogit| = {worst:.2e}");
    assert!(worst < 5e-3, "F32 GGUF: max |Δlogit| {worst} vs transformers");
    for dtype in [GgmlDType::F16, GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
        let rel = check_kernels("tiny", &dims, &get, &reference.input_ids, dtype)?;
        assert!(rel < 3e-2, "{dtype:?}: relative error {rel}");
    }
    Ok(())
}

#[test]
fn k_quants_compute_what_their_weights_say() -> anyhow::Result<()> {
    let dims = Dims { hidden: 256, ffn: 512, layers: 2, heads: 4, kv_heads: 2, vocab: 300 };
    let dev = Device::Cpu;
    let hd = dims.hidden / dims.heads;
    let mut weights = std::collections::HashMap::new();
    let mut put = |name: String, shape: (usize, usize), std: f64| -> anyhow::Result<()> {
        weights.insert(name, Tensor::randn(0f32, std as f32, shape, &dev)?);
        Ok(())
    };
    put("model.embed_tokens.weight".into(), (dims.vocab, dims.hidden), 1.0)?;
    put("lm_head.weight".into(), (dims.vocab, dims.hidden), 0.1)?;
    for i in 0..dims.layers {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        let s = 1.0 / (dims.hidden as f64).sqrt();
        put(p("self_attn.q_proj.weight"), (dims.heads * hd, dims.hidden), s)?;
        put(p("self_attn.k_proj.weight"), (dims.kv_heads * hd, dims.hidden), s)?;
        put(p("self_attn.v_proj.weight"), (dims.kv_heads * hd, dims.hidden), s)?;
        put(p("self_attn.o_proj.weight"), (dims.hidden, dims.heads * hd), s)?;
        put(p("mlp.gate_proj.weight"), (dims.ffn, dims.hidden), s)?;
        put(p("mlp.up_proj.weight"), (dims.ffn, dims.hidden), s)?;
        put(p("mlp.down_proj.weight"), (dims.hidden, dims.ffn), 1.0 / (dims.ffn as f64).sqrt())?;
    }
    let ones = Tensor::ones(dims.hidden, DType::F32, &dev)?;
    let get = |name: &str| -> anyhow::Result<Tensor> {
        if name.ends_with("norm.weight") {
            return Ok(ones.clone());
        }
        weights.get(name).cloned().ok_or_else(|| anyhow::anyhow!("no tensor {name}"))
    };
    // 40 positions: prefill with m ≥ 32 takes candle's large-batch K-quant paths (where an AMX
    // kernel exists; it must only run where the OS has granted AMX, or it dies with SIGILL).
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 37 + 1) % dims.vocab as u32).collect();
    for dtype in [GgmlDType::Q6K, GgmlDType::Q5K, GgmlDType::Q4K] {
        let rel = check_kernels("k", &dims, &get, &ids, dtype)?;
        assert!(rel < 3e-2, "{dtype:?}: relative error {rel}");
    }
    Ok(())
}
