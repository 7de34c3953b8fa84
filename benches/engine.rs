//! Engine micro-benchmarks on SmolLM2-135M Q4_1: prefill (512-token prompt) and decode
//! (one token at position ~128) through the whole model, one stage's forward at batch 1,
//! activation encode/decode, and one sampling step over 49,152 logits. `cargo bench --bench engine`; the threads follow
//! `SHOAL_THREADS` (default: all cores). `benches/compare_llama_cpp.sh` puts these figures
//! beside llama.cpp's, measured in the same run.

use std::path::PathBuf;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_main};
use shoal_model_shards::activation::{self, WireDType};
use shoal_model_shards::sampler::{Sampler, SamplingParams};
use shoal_model_shards::{DType, Device, LogitsMode, Model, Shard, StageInput, Tensor};

fn model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `bash deploy/fetch-model.sh`", p.display());
    p
}

fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 100 + (i * 7919) % 40000).collect()
}

fn engine(c: &mut Criterion) {
    // SAFETY: runs before any thread pool or other thread exists.
    unsafe {
        shoal_model_shards::threads::configure_threads(
            std::env::var("SHOAL_THREADS").ok().and_then(|s| s.parse().ok()),
        )
    };
    let model = Model::open(model_path()).expect("open model");
    let n_layers = model.spec().n_layers;
    let whole = Shard::load(&model, 0..n_layers, &Device::Cpu, DType::F32).expect("load");

    let mut g = c.benchmark_group("smollm2_q4_1");
    g.sample_size(10).measurement_time(Duration::from_secs(10));

    let pp = prompt(512);
    g.throughput(Throughput::Elements(pp.len() as u64));
    g.bench_function("prefill_512", |b| {
        b.iter(|| {
            let mut cache = whole.new_cache(1024);
            whole.logits(&mut cache, &pp, LogitsMode::Last).expect("prefill")
        })
    });

    // Decode: one token after a 128-token context; the cache is rolled back each iteration.
    let ctx = prompt(128);
    let mut cache = whole.new_cache(1024);
    whole.logits(&mut cache, &ctx, LogitsMode::Last).expect("context");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_token_at_128", |b| {
        b.iter(|| {
            let out = whole.logits(&mut cache, &[42], LogitsMode::Last).expect("decode");
            cache.truncate(128);
            out
        })
    });

    // One middle stage (layers 10..20) at batch 1, hidden states in and out.
    let stage = Shard::load(&model, 10..20, &Device::Cpu, DType::F32).expect("load stage");
    let mut cache = stage.new_cache(1024);
    let h = Tensor::randn(0f32, 1.0, (128, model.spec().hidden_size), &Device::Cpu).expect("randn");
    stage.forward(&mut cache, StageInput::Hidden(h), LogitsMode::Last).expect("context");
    let h1 = Tensor::randn(0f32, 1.0, (1, model.spec().hidden_size), &Device::Cpu).expect("randn");
    g.bench_function("stage_10_layers_batch1", |b| {
        b.iter(|| {
            let out =
                stage.forward(&mut cache, StageInput::Hidden(h1.clone()), LogitsMode::Last).expect("step");
            cache.truncate(128);
            out
        })
    });

    // The same stage, one decode step of b sessions (each at position 128) in one batched
    // forward; throughput counts session-steps, so batch 16 at 16x batch 1's time is no gain.
    for batch in [1usize, 4, 16] {
        let mut caches: Vec<_> = (0..batch)
            .map(|_| {
                let mut c = stage.new_cache(1024);
                let h =
                    Tensor::randn(0f32, 1.0, (128, model.spec().hidden_size), &Device::Cpu).expect("randn");
                stage.forward(&mut c, StageInput::Hidden(h), LogitsMode::Last).expect("context");
                c
            })
            .collect();
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("stage_10_layers_decode_batch{batch}"), |b| {
            b.iter(|| {
                let inputs = (0..batch).map(|_| StageInput::Hidden(h1.clone())).collect();
                let mut refs: Vec<_> = caches.iter_mut().collect();
                let out = stage.forward_batch(&mut refs, inputs).expect("batched step");
                for c in caches.iter_mut() {
                    c.truncate(128);
                }
                out
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("activation");
    let x = Tensor::randn(0f32, 1.0, (16, model.spec().hidden_size), &Device::Cpu).expect("randn");
    for wire in [WireDType::F16, WireDType::Bf16] {
        let bytes = activation::encode(&x, wire).expect("encode");
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(format!("encode_16x576_{wire:?}"), |b| b.iter(|| activation::encode(&x, wire)));
        g.bench_function(format!("decode_16x576_{wire:?}"), |b| {
            b.iter(|| activation::decode(&bytes, wire, 16, 576, &Device::Cpu))
        });
    }
    g.finish();

    // One sampling step over SmolLM2's 49,152 logits.
    let mut g = c.benchmark_group("sampler");
    let logits: Vec<f32> =
        (0..49_152u32).map(|i| ((i.wrapping_mul(2_654_435_761u32)) >> 16) as f32 / 4096.0).collect();
    let history: Vec<u32> = (0..512u32).map(|i| (i * 97) % 49_152).collect();
    for (name, params) in [
        ("greedy", SamplingParams::greedy()),
        ("top_p_0.9", SamplingParams { temperature: 0.7, top_p: 0.9, ..SamplingParams::default() }),
        ("top_k_40", SamplingParams { temperature: 0.7, top_k: Some(40), ..SamplingParams::default() }),
    ] {
        let sampler = Sampler::new(params).expect("valid params");
        let mut step = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                step += 1;
                sampler.sample(&logits, &history, 256, step, 0).expect("sample")
            })
        });
    }
    g.finish();
}

#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::engine);
}
use group::benches;
criterion_main!(benches);
