//! Batched decode: several sessions' next positions in one forward (`Shard::forward_batch`)
//! give each session exactly the bits it gets alone (`Shard::forward`), on the real model,
//! as one span and as two (hidden states between them), whoever the session is batched with;
//! and a multi-position step through `Shard::forward_rows` (speculative decoding's verify
//! step) gives each position exactly the bits of one-position steps.

mod common;

use shoal_model_shards::{DType, Device, KvCache, LogitsMode, Model, Shard, StageInput, StageOutput, Tensor};

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

/// Runs one step of `input` through `shards` alone; returns the logits.
fn alone(shards: &[Shard], caches: &mut [KvCache], tokens: Vec<u32>) -> Tensor {
    let mut input = StageInput::Tokens(tokens);
    for (shard, cache) in shards.iter().zip(caches.iter_mut()) {
        match shard.forward(cache, input, LogitsMode::Last).unwrap() {
            StageOutput::Hidden(h) => input = StageInput::Hidden(h),
            StageOutput::Logits(l) => return l,
        }
    }
    unreachable!("the last span returns logits")
}

/// The model as one span and as two: the span sets every test here runs on.
fn span_sets(model: &Model) -> anyhow::Result<Vec<Vec<Shard>>> {
    let n = model.spec().n_layers;
    #[allow(clippy::single_range_in_vec_init)] // one span holding every layer
    let sets: [Vec<std::ops::Range<usize>>; 2] = [vec![0..n], vec![0..13, 13..n]];
    let load = |spans: &Vec<std::ops::Range<usize>>| -> anyhow::Result<Vec<Shard>> {
        Ok(spans
            .iter()
            .map(|s| Shard::load(model, s.clone(), &Device::Cpu, DType::F32))
            .collect::<Result<_, _>>()?)
    };
    sets.iter().map(load).collect()
}

/// A fresh cache on every span for each of `sessions` sessions.
fn fresh_caches(shards: &[Shard], sessions: usize) -> Vec<Vec<KvCache>> {
    (0..sessions).map(|_| shards.iter().map(|s| s.new_cache(64)).collect()).collect()
}

#[test]
fn batched_decode_equals_each_session_alone() -> anyhow::Result<()> {
    let model = Model::open(common::smollm2_path())?;
    let prompts: Vec<Vec<u32>> = vec![
        vec![504, 3575, 282],
        vec![2, 9, 1345, 28, 253, 1155, 314, 4649],
        vec![1],
        vec![4649, 314, 2, 9, 1345, 28, 253, 1155, 504, 3575, 282, 4649, 314],
        vec![28, 253],
    ];
    for shards in span_sets(&model)? {
        let (mut solo, mut batched) =
            (fresh_caches(&shards, prompts.len()), fresh_caches(&shards, prompts.len()));
        let mut next: Vec<u32> = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let a = alone(&shards, &mut solo[i], p.clone());
            let b = alone(&shards, &mut batched[i], p.clone());
            assert_eq!(bits(&a), bits(&b));
            next.push(a.argmax(1)?.to_vec1::<u32>()?[0]);
        }
        // Decode steps with changing company: all five, then subsets (in session order).
        let groups: [&[usize]; 5] = [&[0, 1, 2, 3, 4], &[1, 3], &[0, 2, 4], &[0, 1, 2, 3, 4], &[2]];
        for group in groups {
            let mut input: Vec<StageInput> =
                group.iter().map(|&i| StageInput::Tokens(vec![next[i]])).collect();
            let mut logits = Vec::new();
            for (h, shard) in shards.iter().enumerate() {
                let mut caches: Vec<&mut KvCache> = batched
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| group.contains(i))
                    .map(|(_, c)| &mut c[h])
                    .collect();
                let outs = shard.forward_batch(&mut caches, std::mem::take(&mut input))?;
                for out in outs {
                    match out {
                        StageOutput::Hidden(x) => input.push(StageInput::Hidden(x)),
                        StageOutput::Logits(l) => logits.push(l),
                    }
                }
            }
            assert_eq!(logits.len(), group.len());
            for (&i, got) in group.iter().zip(&logits) {
                let want = alone(&shards, &mut solo[i], vec![next[i]]);
                assert_eq!(bits(got), bits(&want), "{} spans: session {i} in batch {group:?}", shards.len());
                next[i] = got.argmax(1)?.to_vec1::<u32>()?[0];
            }
        }
    }
    Ok(())
}

/// A step of several positions through `forward_rows` (the verify step of speculative
/// decoding) gives every position's logits the bits of one-position steps, on one span and on
/// two; `forward` (a prefill's products) does not promise that.
#[test]
fn forward_rows_gives_each_position_the_bits_of_one_position_steps() -> anyhow::Result<()> {
    let model = Model::open(common::smollm2_path())?;
    let prompt = vec![2u32, 9, 1345, 28, 253, 1155, 314, 4649];
    let steps = vec![504u32, 3575, 282, 4649, 314, 2, 9];
    for shards in span_sets(&model)? {
        let fresh = || fresh_caches(&shards, 1).remove(0);
        let (mut one, mut rows) = (fresh(), fresh());
        alone(&shards, &mut one, prompt.clone());
        alone(&shards, &mut rows, prompt.clone());
        let want: Vec<Vec<u32>> = steps.iter().map(|&t| bits(&alone(&shards, &mut one, vec![t]))).collect();
        let mut input = StageInput::Tokens(steps.clone());
        let mut logits = None;
        for (shard, cache) in shards.iter().zip(rows.iter_mut()) {
            match shard.forward_rows(cache, input, LogitsMode::All)? {
                StageOutput::Hidden(h) => input = StageInput::Hidden(h),
                StageOutput::Logits(l) => {
                    logits = Some(l);
                    break;
                }
            }
        }
        let logits = logits.expect("the last span returns logits");
        assert_eq!(logits.dims2()?.0, steps.len());
        for (i, w) in want.iter().enumerate() {
            assert_eq!(&bits(&logits.narrow(0, i, 1)?), w, "{} spans: position {i}", shards.len());
        }
        assert_eq!(
            rows.iter().map(KvCache::len).collect::<Vec<_>>(),
            one.iter().map(KvCache::len).collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// Sessions' multi-position steps (speculative verify rows) batched with one another and with
/// one-position steps: every row of every session has the bits `forward_rows` gives that
/// session's step alone, on one span and on two; each cache grows by its own step.
#[test]
fn batched_multi_position_steps_equal_each_session_alone() -> anyhow::Result<()> {
    let model = Model::open(common::smollm2_path())?;
    let prompts: Vec<Vec<u32>> = vec![vec![504, 3575, 282], vec![2, 9, 1345, 28, 253], vec![1]];
    let steps: Vec<Vec<u32>> = vec![vec![4649, 314, 2, 9], vec![1155], vec![28, 253, 504]];
    for shards in span_sets(&model)? {
        let (mut solo, mut batched) =
            (fresh_caches(&shards, prompts.len()), fresh_caches(&shards, prompts.len()));
        for (i, p) in prompts.iter().enumerate() {
            alone(&shards, &mut solo[i], p.clone());
            alone(&shards, &mut batched[i], p.clone());
        }
        // Each session's step alone, every row's logits.
        let mut want = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            let mut input = StageInput::Tokens(step.clone());
            for (shard, cache) in shards.iter().zip(solo[i].iter_mut()) {
                match shard.forward_rows(cache, input, LogitsMode::All)? {
                    StageOutput::Hidden(h) => input = StageInput::Hidden(h),
                    StageOutput::Logits(l) => {
                        want.push(l);
                        break;
                    }
                }
            }
        }
        // The three together.
        let mut input: Vec<StageInput> = steps.iter().map(|s| StageInput::Tokens(s.clone())).collect();
        let mut logits = Vec::new();
        for (h, shard) in shards.iter().enumerate() {
            let mut caches: Vec<&mut KvCache> = batched.iter_mut().map(|c| &mut c[h]).collect();
            for out in shard.forward_batch(&mut caches, std::mem::take(&mut input))? {
                match out {
                    StageOutput::Hidden(x) => input.push(StageInput::Hidden(x)),
                    StageOutput::Logits(l) => logits.push(l),
                }
            }
        }
        assert_eq!(logits.len(), steps.len());
        for (i, (got, want)) in logits.iter().zip(&want).enumerate() {
            assert_eq!(got.dims2()?.0, steps[i].len(), "session {i}: a row per position");
            assert_eq!(bits(got), bits(want), "{} spans: session {i}", shards.len());
        }
        for (i, (s, b)) in solo.iter().zip(&batched).enumerate() {
            let lens = |c: &[KvCache]| c.iter().map(KvCache::len).collect::<Vec<_>>();
            assert_eq!(lens(s), lens(b), "session {i}");
            assert!(lens(b).iter().all(|&l| l == prompts[i].len() + steps[i].len()), "session {i}");
        }
    }
    Ok(())
}
