//! Gemma 3 on the real model (270M, Q4_K_M) against llama.cpp: the tokenizer on a mixed
//! corpus, greedy continuations and top-5 logits of seven prompts (one longer than the
//! 512-position sliding window), recorded by `tests/reference/golden_gemma3.py` with
//! llama-cpp-python; spans chained give the whole model's logits, also past the window with
//! a span of sliding-window layers that gives its old cache blocks back.
//!
//! Activations are quantized to 8 bits inside every quantized product (as llama.cpp does), so
//! small rounding differences move logits: llama.cpp itself, evaluating the same tokens in one
//! batch instead of one at a time, moves the compared top-5 logits by 0.19 on average and up
//! to 1.08; shoal differs from llama.cpp's one-at-a-time logits by 0.24 on average and up to
//! 1.86 (at a step whose best logit is -5.1, a flat distribution; with shoal's own K-quant
//! kernels, which quantize activations per 256 values as llama.cpp does). So, with llama.cpp's tokens fed back, every
//! top-5 logit must be within `LOGIT_TOL` (mean within `MEAN_TOL`) up to the first step
//! where llama.cpp's top-2 logits are within `NEAR_TIE`; shoal's own greedy continuation must
//! be llama.cpp's up to the first step where they are within `GREEDY_TIE`, a gap inside that
//! batched-versus-sequential variation.

mod common;

use serde::Deserialize;
use shoal_model_shards::chat_template::ChatMessage;
use shoal_model_shards::generate::{Flow, generate};
use shoal_model_shards::sampler::SamplingParams;
use shoal_model_shards::{
    Architecture, DType, Device, KV_BLOCK, LogitsMode, Model, Shard, StageInput, StageOutput,
};

const NEAR_TIE: f32 = 0.1;
const GREEDY_TIE: f32 = 0.5;
const LOGIT_TOL: f32 = 2.0;
const MEAN_TOL: f32 = 0.3;

#[derive(Deserialize)]
struct Golden {
    prompts: Vec<Prompt>,
    tokenizer_corpus: Vec<Tokenized>,
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

#[derive(Deserialize)]
struct Tokenized {
    text: String,
    ids: Vec<u32>,
}

fn golden() -> Golden {
    let path = common::fixture("golden/gemma3_270m_q4_k_m.json");
    serde_json::from_slice(&std::fs::read(path).expect("read golden")).expect("parse golden")
}

#[test]
fn spec_reads_gemma3() -> anyhow::Result<()> {
    let model = Model::open(common::gemma3_path())?;
    let s = model.spec();
    assert_eq!(s.arch, Architecture::Gemma3);
    assert_eq!((s.n_layers, s.hidden_size, s.n_heads, s.n_kv_heads, s.head_dim), (18, 640, 4, 1, 256));
    assert_eq!(
        (s.sliding_window, s.sliding_window_pattern, s.rope_local_theta),
        (Some(512), Some(6), Some(10_000.0))
    );
    let globals: Vec<usize> = (0..18).filter(|&i| !s.is_sliding(i)).collect();
    assert_eq!(globals, [5, 11, 17]);
    assert!(s.tie_word_embeddings && s.qk_norm);
    Ok(())
}

#[test]
fn tokenization_matches_llama_cpp() -> anyhow::Result<()> {
    let model = Model::open(common::gemma3_path())?;
    let tok = model.tokenizer()?;
    let g = golden();
    for p in &g.prompts {
        assert_eq!(tok.encode(&p.prompt, true)?, p.prompt_ids, "prompt {}", p.name);
    }
    for c in &g.tokenizer_corpus {
        assert_eq!(tok.encode(&c.text, false)?, c.ids, "corpus text {:?}", c.text);
    }
    // Decoding gives the text back (the corpus has no unknown characters).
    for c in g.tokenizer_corpus.iter().filter(|c| !c.text.contains('<')) {
        assert_eq!(tok.decode(&c.ids)?, c.text, "decode {:?}", c.text);
    }
    Ok(())
}

#[test]
fn chat_template_renders_gemma_turns() -> anyhow::Result<()> {
    let model = Model::open(common::gemma3_path())?;
    let template = model.chat_template()?.expect("gemma has a chat template");
    let text = template.render(
        &[
            ChatMessage::new("system", "Answer briefly."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello!"),
            ChatMessage::new("user", "Name a colour."),
        ],
        true,
    )?;
    assert_eq!(
        text,
        "<bos><start_of_turn>user\nAnswer briefly.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n\
         <start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n"
    );
    let tok = model.tokenizer()?;
    let ids = tok.encode(&text, false)?;
    assert_eq!(ids[0], 2, "one <bos>, written by the template");
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 1);
    let end_of_turn = tok.token_to_id("<end_of_turn>").expect("<end_of_turn>");
    assert!(tok.is_eos(end_of_turn), "<end_of_turn> ends generation");
    let err = template.render(&[ChatMessage::new("assistant", "x")], true).unwrap_err();
    assert!(err.to_string().contains("alternate"), "{err}");
    Ok(())
}

#[test]
fn greedy_ids_and_logits_match_llama_cpp() -> anyhow::Result<()> {
    let model = Model::open(common::gemma3_path())?;
    let n = model.spec().n_layers;
    let shard = Shard::load(&model, 0..n, &Device::Cpu, DType::F32)?;
    let (mut compared_steps, mut past_window, mut greedy_compared) = (0, 0, 0);
    let mut bad = Vec::new();
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
        // Logits with llama.cpp's tokens fed back.
        let mut cache = shard.new_cache(2048);
        let mut logits =
            shard.logits(&mut cache, &p.prompt_ids, LogitsMode::Last)?.to_vec2::<f32>()?.remove(0);
        let mut prompt_worst = 0f32;
        let mut greedy_tied = false;
        for (i, step) in p.steps.iter().enumerate() {
            for &(id, want) in &step.top5 {
                let got = logits[id as usize];
                let err = (got - want).abs();
                sum_err += f64::from(err);
                n_err += 1;
                worst = worst.max(err);
                prompt_worst = prompt_worst.max(err);
                if err >= LOGIT_TOL {
                    bad.push(format!("{}: step {i}: logit of {id} is {got}, llama.cpp {want}", p.name));
                }
            }
            compared_steps += 1;
            if p.prompt_ids.len() + i > 512 {
                past_window += 1;
            }
            greedy_tied |= step.gap_top1_top2 < GREEDY_TIE;
            if !greedy_tied {
                assert_eq!(
                    generation.token_ids[i], step.token,
                    "{}: greedy token {i} differs from llama.cpp (gap {:.3})",
                    p.name, step.gap_top1_top2
                );
                greedy_compared += 1;
            }
            if step.gap_top1_top2 < NEAR_TIE {
                println!("{}: stopping at step {i}, a near tie (gap {:.4})", p.name, step.gap_top1_top2);
                break;
            }
            logits = shard.logits(&mut cache, &[step.token], LogitsMode::Last)?.to_vec2::<f32>()?.remove(0);
        }
        println!("{}: top-5 logits max |Δ| {prompt_worst:.4}", p.name);
    }
    let mean = (sum_err / n_err as f64) as f32;
    println!(
        "compared {compared_steps} steps ({past_window} past the window), {greedy_compared} greedy ids; \
         top-5 logits vs llama.cpp: mean |Δ| {mean:.4}, max {worst:.4}"
    );
    assert!(bad.is_empty(), "top-5 logits off by {LOGIT_TOL} or more:\n{}", bad.join("\n"));
    assert!(greedy_compared >= 60, "too few greedy ids compared: {greedy_compared}");
    assert!(compared_steps >= 100, "too few steps compared: {compared_steps}");
    assert!(past_window >= 8, "too few steps past the sliding window: {past_window}");
    assert!(mean < MEAN_TOL, "mean |Δlogit| {mean} ≥ {MEAN_TOL}");
    Ok(())
}

/// Runs `prompt` then `decode` (one token at a time) through chained `shards` (f32 hidden
/// states between them); returns the logits of the last prompt position and of each decode
/// step, and the KV bytes the first shard held at the end.
fn run_chain(shards: &[Shard], prompt: &[u32], decode: &[u32]) -> anyhow::Result<(Vec<Vec<f32>>, usize)> {
    let mut caches: Vec<_> = shards.iter().map(|s| s.new_cache(2048)).collect();
    let mut out = Vec::new();
    let steps = std::iter::once(prompt.to_vec()).chain(decode.iter().map(|&t| vec![t]));
    for step in steps {
        let mut input = StageInput::Tokens(step);
        for (shard, cache) in shards.iter().zip(caches.iter_mut()) {
            match shard.forward(cache, input, LogitsMode::Last)? {
                StageOutput::Hidden(h) => input = StageInput::Hidden(h),
                StageOutput::Logits(l) => {
                    out.push(l.to_vec2::<f32>()?.remove(0));
                    break;
                }
            }
        }
    }
    Ok((out, caches[0].bytes()))
}

/// Spans chained give the whole model's bits, before and past the sliding window; the span
/// of sliding-window layers only (0..5) keeps at most the window's blocks (plus the partial
/// ones at both ends) while the whole model keeps every position.
#[test]
fn chained_spans_match_the_whole_model_past_the_window() -> anyhow::Result<()> {
    let model = Model::open(common::gemma3_path())?;
    let n = model.spec().n_layers;
    let window = model.spec().sliding_window.expect("a window");
    let load = |r: std::ops::Range<usize>| Shard::load(&model, r, &Device::Cpu, DType::F32);
    let whole = [load(0..n)?];
    let chained = [load(0..5)?, load(5..12)?, load(12..n)?];
    // A prompt past the window, then decode steps further on.
    let prompt: Vec<u32> = (0..window as u32 + 40).map(|i| 1000 + (i * 7919) % 200_000).collect();
    let decode = [5000, 6000, 7000, 8000];
    let (reference, whole_bytes) = run_chain(&whole, &prompt, &decode)?;
    let (got, first_bytes) = run_chain(&chained, &prompt, &decode)?;
    assert_eq!(got.len(), reference.len());
    for (i, (a, b)) in got.iter().zip(&reference).enumerate() {
        assert_eq!(common::max_abs_diff(a, b), 0.0, "step {i}: chained spans differ from the whole model");
    }
    let positions = prompt.len() + decode.len() - 1;
    let block_bytes_whole = whole_bytes / positions.div_ceil(KV_BLOCK);
    assert_eq!(whole_bytes, positions.div_ceil(KV_BLOCK) * block_bytes_whole);
    let max_blocks = window.div_ceil(KV_BLOCK) + 2;
    let block_bytes_first = block_bytes_whole * 5 / n;
    assert!(
        first_bytes <= max_blocks * block_bytes_first,
        "the sliding span holds {first_bytes} bytes, more than {max_blocks} blocks of {block_bytes_first}"
    );
    Ok(())
}

#[derive(Deserialize)]
struct TinyReference {
    token_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

/// A tiny random-weight Gemma 3 (F32 weights, made by `tests/reference/tiny_gemma3.py`) with
/// what the 270M does not exercise: head_dim unlike hidden/heads, grouped-query heads, and the
/// linear rope scaling of the global layers (4B and larger). Every position's logits, past the
/// 8-position window, prefilled at once and decoded one at a time, and through two chained
/// spans, are llama.cpp's to the rounding of its f16 steps.
#[test]
fn tiny_random_gemma3_matches_llama_cpp() -> anyhow::Result<()> {
    let model = Model::open(common::fixture("tiny_gguf/gemma3.gguf"))?;
    let s = model.spec();
    assert_eq!((s.head_dim, s.n_heads, s.n_kv_heads, s.sliding_window), (32, 4, 2, Some(8)));
    assert_eq!((s.rope_linear_factor, s.attn_logit_softcap, s.final_logit_softcap), (Some(8.0), None, None));
    assert_eq!((0..7).filter(|&i| !s.is_sliding(i)).collect::<Vec<_>>(), [5]);
    check_tiny(&model, "gemma3")
}

/// The tiny Gemma 2 (same script, `--arch gemma2`): no q/k norms, every other layer on the
/// window, attention scores soft-capped at 5 and logits at 10 (small caps that bite on random
/// weights): llama.cpp's logits at every position, prefilled and decoded, and two spans.
#[test]
fn tiny_random_gemma2_matches_llama_cpp() -> anyhow::Result<()> {
    let model = Model::open(common::fixture("tiny_gguf/gemma2.gguf"))?;
    let s = model.spec();
    assert_eq!(s.arch, Architecture::Gemma2);
    assert_eq!((s.qk_norm, s.sliding_window, s.sliding_window_pattern), (false, Some(8), Some(2)));
    assert_eq!(
        (s.attn_logit_softcap, s.final_logit_softcap, s.rope_linear_factor),
        (Some(5.0), Some(10.0), None)
    );
    assert_eq!((0..7).filter(|&i| !s.is_sliding(i)).collect::<Vec<_>>(), [1, 3, 5]);
    check_tiny(&model, "gemma2")
}

fn check_tiny(model: &Model, name: &str) -> anyhow::Result<()> {
    // f16 rounding of q, K, V and the probabilities turns f32 summation-order differences
    // into f16 steps here and there: up to 6e-3 on logits of magnitude ~25 (our own prefill
    // and decode differ by as much). Without the rope scaling the error is 0.1 to 1.7.
    const TOL: f32 = 1e-2;
    let path = common::fixture(&format!("tiny_gguf/{name}.json"));
    let reference: TinyReference = serde_json::from_slice(&std::fs::read(path)?)?;
    let n = model.spec().n_layers;
    let ids = &reference.token_ids;
    let whole = Shard::load(model, 0..n, &Device::Cpu, DType::F32)?;

    let mut cache = whole.new_cache(128);
    let prefill = whole.logits(&mut cache, ids, LogitsMode::All)?.to_vec2::<f32>()?;
    let mut cache = whole.new_cache(128);
    let mut decode = Vec::new();
    for &id in ids {
        decode.push(whole.logits(&mut cache, &[id], LogitsMode::Last)?.to_vec2::<f32>()?.remove(0));
    }
    let mut worst = 0f32;
    for (pos, want) in reference.logits.iter().enumerate() {
        for (what, got) in [("prefill", &prefill[pos]), ("decode", &decode[pos])] {
            let d = common::max_abs_diff(got, want);
            worst = worst.max(d);
            assert!(d < TOL, "{what}: position {pos}: max |Δlogit| {d} against llama.cpp");
        }
    }
    println!("tiny {name}: max |Δlogit| against llama.cpp {worst:.2e} over {} positions", ids.len());

    let spans = [
        Shard::load(model, 0..3, &Device::Cpu, DType::F32)?,
        Shard::load(model, 3..n, &Device::Cpu, DType::F32)?,
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
