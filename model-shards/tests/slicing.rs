//! Slicing equivalence on the real model: SmolLM2 run as 1, 2, 3 and 30 chained spans, with
//! hidden states crossing each boundary as bytes in the wire dtype, gives the logits of the
//! whole model.

mod common;

use shoal_model_shards::activation::{self, WireDType};
use shoal_model_shards::{DType, Device, LogitsMode, Model, Shard, StageInput, StageOutput};

/// Runs `tokens` (prefill) and then one decode token through `shards`, re-encoding hidden
/// states at each boundary; returns the logits of every prefill position and of the decode
/// step.
fn run_chain(shards: &[Shard], tokens: &[u32], next: u32, wire: WireDType) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut caches: Vec<_> = shards.iter().map(|s| s.new_cache(256)).collect();
    let mut out = Vec::new();
    for (step, mode) in [(tokens.to_vec(), LogitsMode::All), (vec![next], LogitsMode::Last)] {
        let mut input = StageInput::Tokens(step.clone());
        for (shard, cache) in shards.iter().zip(caches.iter_mut()) {
            match shard.forward(cache, input, mode)? {
                StageOutput::Hidden(h) => {
                    let (t, hidden) = h.dims2()?;
                    let bytes = activation::encode(&h, wire)?;
                    assert_eq!(bytes.len(), t * hidden * wire.size());
                    input = StageInput::Hidden(activation::decode(&bytes, wire, t, hidden, &Device::Cpu)?);
                }
                StageOutput::Logits(l) => {
                    out.extend(l.to_vec2::<f32>()?);
                    break;
                }
            }
        }
    }
    Ok(out)
}

fn spans(n_layers: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    (0..parts).map(|i| (i * n_layers / parts)..((i + 1) * n_layers / parts)).collect()
}

#[test]
fn chained_spans_match_the_whole_model() -> anyhow::Result<()> {
    let model = Model::open(common::smollm2_path())?;
    let n = model.spec().n_layers;
    assert_eq!(n, 30);
    let tokens: Vec<u32> = vec![504, 3575, 282, 4649, 314, 2, 9, 1345, 28, 253, 1155];
    let whole = [Shard::load(&model, 0..n, &Device::Cpu, DType::F32)?];
    let reference = run_chain(&whole, &tokens, 42, WireDType::F32)?;
    assert_eq!(reference.len(), tokens.len() + 1);

    for parts in [2, 3, 30] {
        let shards: Vec<Shard> = spans(n, parts)
            .into_iter()
            .map(|s| Shard::load(&model, s, &Device::Cpu, DType::F32))
            .collect::<Result<_, _>>()?;
        // f32 on the wire: the same arithmetic, so the same bits.
        let exact = run_chain(&shards, &tokens, 42, WireDType::F32)?;
        for (a, b) in exact.iter().zip(&reference) {
            assert_eq!(common::max_abs_diff(a, b), 0.0, "{parts} spans, f32 wire");
        }
        // f16 and bf16 on the wire round the residual stream at each boundary. Q4_1 matmuls
        // quantize their input to 8 bits per block, so a rounding that flips one int8 step
        // moves logits by up to ~1 (llama.cpp shows the same size of change between batched
        // and one-by-one evaluation); the greedy choice must not change.
        for (wire, tol, mean_tol) in [(WireDType::F16, 1.5, 0.3), (WireDType::Bf16, 2.0, 0.4)] {
            let got = run_chain(&shards, &tokens, 42, wire)?;
            let worst =
                got.iter().zip(&reference).map(|(a, b)| common::max_abs_diff(a, b)).fold(0.0, f32::max);
            let mean =
                got.iter().zip(&reference).map(|(a, b)| mean_abs_diff(a, b)).sum::<f32>() / got.len() as f32;
            println!("{parts} spans, {wire:?} wire: max |Δlogit| = {worst:.5}, mean {mean:.5}");
            assert!(mean < mean_tol, "{parts} spans, {wire:?} wire: mean |Δlogit| = {mean} ≥ {mean_tol}");
            assert!(worst < tol, "{parts} spans, {wire:?} wire: max |Δlogit| = {worst} ≥ {tol}");
            for (a, b) in got.iter().zip(&reference) {
                assert_eq!(argmax(a), argmax(b), "{parts} spans, {wire:?}: greedy token changed");
            }
        }
    }
    Ok(())
}

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) })
        .0
}

/// A layer's size, as memory budgets count it: the GGUF's per-layer tensors. The whole file
/// is the layers, the embedding (also the tied LM head) and a small header, so the layers plus
/// the embedding must account for nearly all of it.
#[test]
fn layer_bytes_account_for_the_file() -> anyhow::Result<()> {
    let path = common::smollm2_path();
    let model = shoal_model_shards::Model::open(&path)?;
    let content = model.gguf_content().expect("a GGUF");
    let emb = &content.tensor_infos["token_embd.weight"];
    let emb_bytes =
        (emb.shape.elem_count() / emb.ggml_dtype.block_size() * emb.ggml_dtype.type_size()) as u64;
    let layers = model.layer_bytes() * model.spec().n_layers as u64;
    let file = std::fs::metadata(&path)?.len();
    let share = (layers + emb_bytes) as f64 / file as f64;
    eprintln!("layer {} bytes; layers + embedding = {share:.4} of the file", model.layer_bytes());
    assert!((0.97..=1.0).contains(&share), "{share}");
    Ok(())
}
