//! The spot-check tolerance against measured honest differences, on the real SmolLM2 Q4_1
//! (quantized kernels) split at layers 10 and 20: how far two honest computations of a stage
//! drift apart through different kernel paths (the one-token decode steps of a session vs the
//! prefill chunks a check replays, which use other matmul tiles and attention paths) and
//! through different thread counts (1 vs 2, in a child process), against a liar's relative
//! perturbation of 1e-3.
//!
//! Prints the figures (`--no-capture`); BENCHMARKS.md quotes them.

use std::process::Command;

use shoal_coordinator_free_router::verify::{DEFAULT_TOLERANCE, distance};
use shoal_model_shards::{DType, Device, LogitsMode, Model, Shard, StageInput, StageOutput, Tensor};

const SMOLLM2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct.Q4_1.gguf");
const PROMPT: usize = 20;
const TOTAL: usize = 60;

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).expect("f32").to_vec2::<f32>().expect("rows")
}

fn hidden(o: StageOutput) -> Tensor {
    match o {
        StageOutput::Hidden(h) => h,
        StageOutput::Logits(_) => panic!("a middle span returns hidden states"),
    }
}

fn tokens() -> Vec<u32> {
    (0..TOTAL as u32).map(|i| (i * 977 + 13) % 40_000).collect()
}

fn spans() -> (Shard, Shard) {
    let model = Model::open(SMOLLM2).expect("SmolLM2 (deploy/fetch-model.sh)");
    (
        Shard::load(&model, 0..10, &Device::Cpu, DType::F32).expect("span"),
        Shard::load(&model, 10..20, &Device::Cpu, DType::F32).expect("span"),
    )
}

/// The outputs of both spans at every position, as a session computes them: the prompt in one
/// chunk, then one token per step.
fn decode_path(s1: &Shard, s2: &Shard) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let t = tokens();
    let (mut c1, mut c2) = (s1.new_cache(128), s2.new_cache(128));
    let (mut o1, mut o2) = (Vec::new(), Vec::new());
    let steps = std::iter::once(t[..PROMPT].to_vec()).chain(t[PROMPT..].iter().map(|&x| vec![x]));
    for ids in steps {
        let h = hidden(s1.forward(&mut c1, StageInput::Tokens(ids), LogitsMode::Last).expect("forward"));
        o1.extend(rows(&h));
        let h = hidden(s2.forward(&mut c2, StageInput::Hidden(h), LogitsMode::Last).expect("forward"));
        o2.extend(rows(&h));
    }
    (o1, o2)
}

/// Largest distance over the generated positions.
fn worst(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a[PROMPT..].iter().zip(&b[PROMPT..]).map(|(x, y)| distance(x, y)).fold(0.0, f64::max)
}

#[test]
fn honest_kernel_paths_agree_within_the_tolerance_and_a_lie_of_1e_3_does_not() {
    let (s1, s2) = spans();
    let (d1, d2) = decode_path(&s1, &s2);

    // What a check replays: everything before the last position as one prefill chunk, then
    // the last position alone; compare that position. And every position of one prefill.
    let t = tokens();
    let (mut c1, mut c2) = (s1.new_cache(128), s2.new_cache(128));
    let h = hidden(s1.forward(&mut c1, StageInput::Tokens(t.clone()), LogitsMode::Last).expect("forward"));
    let p1 = rows(&h);
    let p2 = rows(&hidden(s2.forward(&mut c2, StageInput::Hidden(h), LogitsMode::Last).expect("forward")));
    let prefill = worst(&d1, &p1).max(worst(&d2, &p2));

    // Same process, same path twice: bit for bit.
    let (e1, e2) = decode_path(&s1, &s2);
    assert_eq!((worst(&d1, &e1), worst(&d2, &e2)), (0.0, 0.0), "a span is deterministic");

    // One thread instead of the pool's two, in a child process (the pools are sized once).
    let dump = std::env::temp_dir().join(format!("shoal-tolerance-{}.bin", std::process::id()));
    let status = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--ignored", "--exact", "dump_outputs_with_one_thread", "--nocapture"])
        .env("SHOAL_TOLERANCE_DUMP", &dump)
        .env("CANDLE_NUM_THREADS", "1")
        .env("RAYON_NUM_THREADS", "1")
        .status()
        .expect("child runs");
    assert!(status.success());
    let bytes = std::fs::read(&dump).expect("child's dump");
    let _ = std::fs::remove_file(&dump);
    let values: Vec<f32> =
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let width = d2[0].len();
    let one_thread: Vec<Vec<f32>> = values.chunks_exact(width).map(<[f32]>::to_vec).collect();
    assert_eq!(one_thread.len(), d2.len());
    let threads = worst(&d2, &one_thread);

    // A liar's perturbation: every value times 1 ± 1e-3.
    let lied: Vec<f32> =
        d2[TOTAL - 1].iter().enumerate().map(|(i, v)| v * if i % 2 == 0 { 1.001 } else { 0.999 }).collect();
    let lie = distance(&lied, &d2[TOTAL - 1]);

    println!("relative L2 distance, worst over {} decode positions:", TOTAL - PROMPT);
    println!("  decode steps vs one prefill chunk (other kernel paths): {prefill:.3e}");
    println!("  2 threads vs 1 thread: {threads:.3e}");
    println!("  tolerance: {DEFAULT_TOLERANCE:.1e}; a lie of 1e-3: {lie:.3e}");
    assert!(prefill < DEFAULT_TOLERANCE / 4.0, "honest paths {prefill:e} too close to the tolerance");
    assert!(threads < DEFAULT_TOLERANCE / 4.0, "thread counts {threads:e} too close to the tolerance");
    assert!(lie > 5.0 * DEFAULT_TOLERANCE, "a lie of 1e-3 ({lie:e}) must stand out");
}

#[test]
#[ignore = "run by honest_kernel_paths_agree_within_the_tolerance_and_a_lie_of_1e_3_does_not in a child process"]
fn dump_outputs_with_one_thread() {
    let path = std::env::var_os("SHOAL_TOLERANCE_DUMP").expect("run by the parent test");
    let (s1, s2) = spans();
    let (_, d2) = decode_path(&s1, &s2);
    let bytes: Vec<u8> = d2.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).expect("dump written");
}
