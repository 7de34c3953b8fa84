//! Causal attention of one session over its paged KV cache, on the host.
//!
//! One pass per (position, query head): scores against every visible cached position (block
//! by block, no copy of the cache), softmax, weighted sum of V. Precision follows llama.cpp's
//! CPU path for a GGUF model (its cache is f16): the query is rounded to the cache's precision
//! before it meets K (ggml converts the f32 operand of an f16 matmul), scores and their
//! softmax are f32 with the normaliser summed in f64 (ggml's `ggml_float`), and the
//! probabilities are rounded to that precision before they meet V. For a Hugging Face model
//! the precision is the compute dtype (f32 on the CPU), so nothing is rounded.
//!
//! A position's result depends only on its own query and the cache, never on how many other
//! positions or sessions are computed with it: batched decode keeps each session's bits.

use candle_core::DType;

use crate::kv_cache::{KV_BLOCK, KvCache, round_to};

/// Shape of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Mistral's sliding window: a position sees the last `w` positions, itself included.
    pub window: Option<usize>,
}

/// Below this many multiply-adds a call runs on the calling thread.
const PARALLEL_WORK: usize = 1 << 17;

/// The new positions of one session for [`attend_many`]: `q` is `t × n_heads × head_dim`
/// (after rope) for the positions `start..start + t`, whose K and V are already in `cache`.
pub(crate) struct Job<'a> {
    pub q: &'a [f32],
    pub cache: &'a KvCache,
    pub start: usize,
    pub t: usize,
}

/// Attention of several sessions' new positions at `layer`, on candle's barrier pool (the pool
/// the matrix products use, so the two never compete for the cores): one result per job, with
/// the layout of its `q`.
pub(crate) fn attend_many(h: &Heads, jobs: &[Job<'_>], layer: usize) -> Vec<Vec<f32>> {
    let hd = h.head_dim;
    // Units of work: (job, row * n_heads + head), each writing `hd` values of its job's result.
    let units: Vec<(usize, usize)> =
        jobs.iter().enumerate().flat_map(|(j, job)| (0..job.t * h.n_heads).map(move |r| (j, r))).collect();
    let mut outs: Vec<Vec<f32>> = jobs.iter().map(|j| vec![0f32; j.t * h.n_heads * hd]).collect();
    let work: usize = jobs.iter().map(|j| j.t * (j.start + j.t)).sum::<usize>() * h.n_heads * hd;
    let ptrs: Vec<SyncPtr> = outs.iter_mut().map(|o| SyncPtr(o.as_mut_ptr())).collect();
    let run = |range: std::ops::Range<usize>| {
        for &(j, r) in &units[range] {
            let job = &jobs[j];
            let (i, head) = (r / h.n_heads, r % h.n_heads);
            // SAFETY: unit (j, r) is the only writer of values `r*hd..(r+1)*hd` of result `j`,
            // which has `t * n_heads * hd` values; `outs` outlives the pool call.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptrs[j].0.add(r * hd), hd) };
            attend_one(h, &job.q[r * hd..(r + 1) * hd], job.cache, layer, job.start + i, head, dst);
        }
    };
    if work >= PARALLEL_WORK {
        candle_core::utils::barrier_pool().execute_chunked(units.len(), run);
    } else {
        run(0..units.len());
    }
    outs
}

/// [`attend_many`] for one session.
#[cfg(test)]
fn attend(h: &Heads, q: &[f32], cache: &KvCache, layer: usize, start: usize, t: usize) -> Vec<f32> {
    attend_many(h, &[Job { q, cache, start, t }], layer).remove(0)
}

/// A pointer to a result buffer shared by the pool's workers, each writing its own part.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: the workers write disjoint parts (see `attend_many`).
unsafe impl Send for SyncPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncPtr {}

/// One query head at position `pos`: the portable body compiled for AVX2 when the CPU has it.
/// The arithmetic is written out in a fixed order (no fused multiply-adds), so both builds
/// give the same bits.
fn attend_one(h: &Heads, q: &[f32], cache: &KvCache, layer: usize, pos: usize, head: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::level() >= crate::kernels::Level::Avx2 {
        // SAFETY: the CPU supports AVX2 (checked at run time just above).
        unsafe { attend_one_avx2(h, q, cache, layer, pos, head, out) };
        return;
    }
    attend_one_body(h, q, cache, layer, pos, head, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn attend_one_avx2(
    h: &Heads,
    q: &[f32],
    cache: &KvCache,
    layer: usize,
    pos: usize,
    head: usize,
    out: &mut [f32],
) {
    attend_one_body(h, q, cache, layer, pos, head, out);
}

#[inline(always)]
fn attend_one_body(
    h: &Heads,
    q: &[f32],
    cache: &KvCache,
    layer: usize,
    pos: usize,
    head: usize,
    out: &mut [f32],
) {
    let hd = h.head_dim;
    let precision = cache.precision();
    let kv_head = head / (h.n_heads / h.n_kv_heads);
    let lo = match h.window {
        Some(w) if pos >= w => pos + 1 - w,
        _ => 0,
    };
    let q: Vec<f32> = q.iter().map(|&x| round_to(x, precision)).collect();
    let scale = 1.0 / (hd as f32).sqrt();
    let mut scores = Vec::with_capacity(pos + 1 - lo);
    for_rows(cache, layer, 0, kv_head, lo, pos, |k| scores.push(dot(&q, k) * scale));
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for s in &mut scores {
        *s = (*s - max).exp();
        sum += f64::from(*s);
    }
    let inv = (1.0 / sum) as f32;
    let rounded = precision != DType::F32;
    for s in &mut scores {
        *s *= inv;
        if rounded {
            *s = round_to(*s, precision);
        }
    }
    out.fill(0.0);
    let mut j = 0;
    for_rows(cache, layer, 1, kv_head, lo, pos, |v| {
        let p = scores[j];
        j += 1;
        let (o8, o_tail) = out.as_chunks_mut::<8>();
        let (v8, v_tail) = v.as_chunks::<8>();
        for (o, x) in o8.iter_mut().zip(v8) {
            for l in 0..8 {
                o[l] += p * x[l];
            }
        }
        for (o, &x) in o_tail.iter_mut().zip(v_tail) {
            *o += p * x;
        }
    });
}

/// Calls `f` on the K (kind 0) or V (kind 1) row of `kv_head` at each position `lo..=hi`.
#[inline(always)]
fn for_rows(
    cache: &KvCache,
    layer: usize,
    kind: usize,
    kv_head: usize,
    lo: usize,
    hi: usize,
    mut f: impl FnMut(&[f32]),
) {
    let hd = cache.head_dim();
    for block in lo / KV_BLOCK..=hi / KV_BLOCK {
        let rows = cache.rows(layer, kind, kv_head, block);
        let first = if block == lo / KV_BLOCK { lo % KV_BLOCK } else { 0 };
        let last = if block == hi / KV_BLOCK { hi % KV_BLOCK } else { KV_BLOCK - 1 };
        for slot in first..=last {
            f(&rows[slot * hd..(slot + 1) * hd]);
        }
    }
}

/// Dot product with 8 independent accumulators (vectorises; a fixed order for a given length).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, a_tail) = a.as_chunks::<8>();
    let (b8, b_tail) = b.as_chunks::<8>();
    for (x, y) in a8.iter().zip(b8) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in a_tail.iter().zip(b_tail) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::{KvPool, block_floats};

    /// Straightforward attention in f64 over dense K/V.
    #[allow(clippy::too_many_arguments)]
    fn naive(h: &Heads, q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], start: usize, t: usize) -> Vec<f32> {
        let hd = h.head_dim;
        let mut out = vec![0f32; t * h.n_heads * hd];
        for i in 0..t {
            let pos = start + i;
            for head in 0..h.n_heads {
                let g = head / (h.n_heads / h.n_kv_heads);
                let qv = &q[(i * h.n_heads + head) * hd..][..hd];
                let lo = h.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let s: Vec<f64> = (lo..=pos)
                    .map(|j| {
                        (0..hd).map(|d| f64::from(qv[d]) * f64::from(k[j][g * hd + d])).sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    let y: f64 = (lo..=pos).zip(&e).map(|(j, p)| p / z * f64::from(v[j][g * hd + d])).sum();
                    out[(i * h.n_heads + head) * hd + d] = y as f32;
                }
            }
        }
        out
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn matches_naive_attention_across_blocks_windows_and_chunks() {
        for window in [None, Some(5), Some(KV_BLOCK + 3)] {
            let h = Heads { n_heads: 4, n_kv_heads: 2, head_dim: 12, window };
            let kvw = h.n_kv_heads * h.head_dim;
            let pool = KvPool::new(block_floats(2, h.n_kv_heads, h.head_dim), None);
            let mut cache = KvCache::new(pool, 2, h.n_kv_heads, h.head_dim, 200, DType::F32);
            let mut seed = 7u64;
            let (mut ks, mut vs) = (Vec::new(), Vec::new());
            // Steps of 1, 7, 20 and 1 positions: partial blocks, a step across blocks.
            for t in [1usize, 7, 20, 1] {
                let start = cache.len();
                cache.reserve(t).unwrap();
                let q: Vec<f32> = (0..t * h.n_heads * h.head_dim).map(|_| lcg(&mut seed)).collect();
                for i in 0..t {
                    let k: Vec<f32> = (0..kvw).map(|_| lcg(&mut seed)).collect();
                    let v: Vec<f32> = (0..kvw).map(|_| lcg(&mut seed)).collect();
                    cache.write(1, start + i, &k, &v);
                    ks.push(k);
                    vs.push(v);
                }
                let got = attend(&h, &q, &cache, 1, start, t);
                let want = naive(&h, &q, &ks, &vs, start, t);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-5, "window {window:?} step {t}: {g} vs {w}");
                }
                cache.advance(t);
            }
        }
    }

    #[test]
    fn a_position_has_the_same_bits_in_a_chunk_and_alone() {
        let h = Heads { n_heads: 2, n_kv_heads: 1, head_dim: 16, window: None };
        let pool = KvPool::new(block_floats(1, 1, 16), None);
        let mut cache = KvCache::new(pool, 1, 1, 16, 100, DType::F16);
        let mut seed = 3u64;
        cache.reserve(40).unwrap();
        for p in 0..40 {
            let k: Vec<f32> = (0..16).map(|_| lcg(&mut seed)).collect();
            let v: Vec<f32> = (0..16).map(|_| lcg(&mut seed)).collect();
            cache.write(0, p, &k, &v);
        }
        let q: Vec<f32> = (0..40 * 2 * 16).map(|_| lcg(&mut seed)).collect();
        let all = attend(&h, &q, &cache, 0, 0, 40);
        for p in [0usize, 15, 16, 39] {
            let alone = attend(&h, &q[p * 32..(p + 1) * 32], &cache, 0, p, 1);
            assert_eq!(&all[p * 32..(p + 1) * 32], &alone[..], "position {p}");
        }
    }
}
