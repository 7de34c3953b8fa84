//! Batched decode: several sessions' next positions in one forward (`Shard::forward_batch`)
//! give each session exactly the bits it gets alone (`Shard::forward`), on the real model,
//! as one span and as two (hidden states between them), whoever the session is batched with.

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

#[test]
fn batched_decode_equals_each_session_alone() -> anyhow::Result<()> {
    let model = Model::open(common::smollm2_path())?;
    let n = model.spec().n_layers;
    let prompts: Vec<Vec<u32>> = vec![
        vec![504, 3575, 282],
        vec![2, 9, 1345, 28, 253, 1155, 314, 4649],
        vec![1],
        vec![4649, 314, 2, 9, 1345, 28, 253, 1155, 504, 3575, 282, 4649, 314],
        vec![28, 253],
    ];
    let whole: Vec<std::ops::Range<usize>> = std::iter::once(0..n).collect();
    for spans in [whole, vec![0..13, 13..n]] {
        let shards: Vec<Shard> = spans
            .iter()
            .map(|s| Shard::load(&model, s.clone(), &Device::Cpu, DType::F32))
            .collect::<Result<_, _>>()?;
        let fresh = || -> Vec<Vec<KvCache>> {
            prompts.iter().map(|_| shards.iter().map(|s| s.new_cache(64)).collect()).collect()
        };
        let (mut solo, mut batched) = (fresh(), fresh());
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
                assert_eq!(bits(got), bits(&want), "{} spans: session {i} in batch {group:?}", spans.len());
                next[i] = got.argmax(1)?.to_vec1::<u32>()?[0];
            }
        }
    }
    Ok(())
}
