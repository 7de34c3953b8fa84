//! Causal attention of one session over its paged KV cache, on the host.
//!
//! One pass per (position, query head): scores against every visible cached position (block
//! by block, no copy of the cache), softmax, weighted sum of V. Precision follows llama.cpp's
//! CPU path for a GGUF model (its cache is f16): the query is rounded to the cache's precision
//! before it meets K (ggml converts the f32 operand of an f16 matmul), scores and their
//! softmax are f32 (the exponential is the sampler's deterministic `det_exp`, which
//! vectorizes) with the normaliser summed in f64 (ggml's `ggml_float`), and the
//! probabilities are rounded to that precision before they meet V. For a Hugging Face model
//! the precision is the compute dtype (f32 on the CPU), so nothing is rounded.
//!
//! A position's result depends only on its own query and the cache, never on how many other
//! positions or sessions are computed with it: batched decode keeps each session's bits.

use candle_core::DType;

use crate::kv_cache::{KV_BLOCK, KvCache, Rows, round_in_place, round_into, round_to};
use crate::sampler::det_exp;

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

/// A stored cache value the AVX2 body reads 8 at a time.
#[cfg(target_arch = "x86_64")]
trait Lane: Copy {
    /// The rows of one block, when stored as `Self`.
    fn of(rows: Rows<'_>) -> &[Self];
    /// Values `p..p + 8` widened to f32.
    ///
    /// # Safety
    /// 8 readable values at `p`; AVX and F16C.
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// One value widened to f32.
    fn widen(self) -> f32;
}

#[cfg(target_arch = "x86_64")]
impl Lane for f32 {
    fn of(rows: Rows<'_>) -> &[f32] {
        match rows {
            Rows::F32(r) => r,
            _ => &[],
        }
    }
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 8 readable values.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

/// f16 bits.
#[cfg(target_arch = "x86_64")]
impl Lane for u16 {
    fn of(rows: Rows<'_>) -> &[u16] {
        match rows {
            Rows::F16(r) => r,
            _ => &[],
        }
    }
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable values and F16C.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        half::f16::from_bits(self).to_f32()
    }
}

/// [`attend_one_body`] with explicit AVX2 vectors, operation for operation (the same bits):
/// each lane of a vector is one of the portable code's 8 interleaved accumulators, 4 cached
/// rows are scored at once for independent chains, f16 values are widened and rounded with
/// F16C. BF16 caches take the portable body.
///
/// # Safety
/// The CPU must support AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn attend_one_avx2(
    h: &Heads,
    q: &[f32],
    cache: &KvCache,
    layer: usize,
    pos: usize,
    head: usize,
    out: &mut [f32],
) {
    // SAFETY: forwarded contract.
    unsafe {
        match cache.precision() {
            DType::F16 => attend_lanes::<u16>(h, q, cache, layer, pos, head, out),
            DType::F32 => attend_lanes::<f32>(h, q, cache, layer, pos, head, out),
            _ => attend_one_body(h, q, cache, layer, pos, head, out),
        }
    }
}

/// [`attend_one_avx2`] on a cache stored as `E`.
///
/// # Safety
/// As [`attend_one_avx2`]; the cache must be stored as `E`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn attend_lanes<E: Lane>(
    h: &Heads,
    q: &[f32],
    cache: &KvCache,
    layer: usize,
    pos: usize,
    head: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    thread_local! {
        static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const {
            std::cell::RefCell::new((Vec::new(), Vec::new()))
        };
    }
    let precision = cache.precision();
    let hd = h.head_dim;
    let kv_head = head / (h.n_heads / h.n_kv_heads);
    let lo = match h.window {
        Some(w) if pos >= w => pos + 1 - w,
        _ => 0,
    };
    let scale = 1.0 / (hd as f32).sqrt();
    let chunks = hd / 8;
    // Calls `f` on the K (kind 0) or V (kind 1) rows of each position `lo..=pos`, as `E`.
    let each_block = |kind: usize, f: &mut dyn FnMut(&[E], usize, usize)| {
        for block in lo / KV_BLOCK..=pos / KV_BLOCK {
            let rows = E::of(cache.rows(layer, kind, kv_head, block));
            let first = if block == lo / KV_BLOCK { lo % KV_BLOCK } else { 0 };
            let last = if block == pos / KV_BLOCK { pos % KV_BLOCK } else { KV_BLOCK - 1 };
            f(&rows[..(last + 1) * hd], first, last);
        }
    };
    let mut body = |(qr, scores): &mut (Vec<f32>, Vec<f32>)| {
        qr.clear();
        qr.resize(hd, 0.0);
        round_into(qr, q, precision);
        let qr = &qr[..];
        scores.clear();
        // SAFETY (all blocks below): every row read is `hd` values inside a cached block (the
        // slices `each_block` passes), every vector load reads 8 values of a row or of `qr`.
        let dot_tail = |k: &[E]| {
            let mut tail = 0f32;
            for (x, y) in qr[chunks * 8..].iter().zip(&k[chunks * 8..hd]) {
                tail += x * y.widen();
            }
            tail
        };
        let reduce = |acc: __m256| {
            let mut a = [0f32; 8];
            // SAFETY: 8 writable values; AVX is enabled.
            unsafe { _mm256_storeu_ps(a.as_mut_ptr(), acc) };
            ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
        };
        each_block(0, &mut |rows, first, last| {
            let mut slot = first;
            while slot + 4 <= last + 1 {
                let k: [&[E]; 4] = std::array::from_fn(|i| &rows[(slot + i) * hd..(slot + i + 1) * hd]);
                let mut acc = [_mm256_setzero_ps(); 4];
                for c in 0..chunks {
                    // SAFETY: see above.
                    unsafe {
                        let x = _mm256_loadu_ps(qr.as_ptr().add(8 * c));
                        for (acc, k) in acc.iter_mut().zip(&k) {
                            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, E::load8(k.as_ptr().add(8 * c))));
                        }
                    }
                }
                for (acc, k) in acc.iter().zip(&k) {
                    scores.push((reduce(*acc) + dot_tail(k)) * scale);
                }
                slot += 4;
            }
            for slot in slot..=last {
                let k = &rows[slot * hd..(slot + 1) * hd];
                let mut acc = _mm256_setzero_ps();
                for c in 0..chunks {
                    // SAFETY: see above.
                    unsafe {
                        let x = _mm256_loadu_ps(qr.as_ptr().add(8 * c));
                        acc = _mm256_add_ps(acc, _mm256_mul_ps(x, E::load8(k.as_ptr().add(8 * c))));
                    }
                }
                scores.push((reduce(acc) + dot_tail(k)) * scale);
            }
        });
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // A plain map (it vectorizes), then the normaliser in order.
        for s in scores.iter_mut() {
            *s = det_exp(*s - max);
        }
        let sum: f64 = scores.iter().fold(0f64, |sum, &s| sum + f64::from(s));
        let inv = (1.0 / sum) as f32;
        for s in scores.iter_mut() {
            *s *= inv;
        }
        round_in_place(scores, precision);
        // The weighted sum of V, 4 vectors (32 values) of the output at a time, each kept in a
        // register over all positions (per value the same additions in the same order).
        out.fill(0.0);
        let mut c0 = 0;
        while c0 < chunks {
            let n = (chunks - c0).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut j = 0;
            each_block(1, &mut |rows, first, last| {
                for slot in first..=last {
                    // SAFETY: see above; `c0 + n <= chunks`.
                    unsafe {
                        let p = _mm256_set1_ps(scores[j]);
                        let v = rows.as_ptr().add(slot * hd);
                        for (i, acc) in acc.iter_mut().enumerate().take(n) {
                            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(p, E::load8(v.add(8 * (c0 + i)))));
                        }
                    }
                    j += 1;
                }
            });
            for (i, acc) in acc.iter().enumerate().take(n) {
                // SAFETY: `out` has `hd >= 8 * (c0 + n)` values.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * (c0 + i)), *acc) };
            }
            c0 += n;
        }
        if chunks * 8 < hd {
            let mut j = 0;
            each_block(1, &mut |rows, first, last| {
                for slot in first..=last {
                    let p = scores[j];
                    j += 1;
                    for (o, &x) in out[chunks * 8..].iter_mut().zip(&rows[slot * hd + chunks * 8..(slot + 1) * hd]) {
                        *o += p * x.widen();
                    }
                }
            });
        }
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => body(&mut scratch),
        Err(_) => body(&mut (Vec::new(), Vec::new())),
    });
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
    for s in &mut scores {
        *s = det_exp(*s - max);
    }
    let sum: f64 = scores.iter().fold(0f64, |sum, &s| sum + f64::from(s));
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
    let mut buf = Vec::with_capacity(hd);
    for block in lo / KV_BLOCK..=hi / KV_BLOCK {
        let rows = cache.rows(layer, kind, kv_head, block);
        let first = if block == lo / KV_BLOCK { lo % KV_BLOCK } else { 0 };
        let last = if block == hi / KV_BLOCK { hi % KV_BLOCK } else { KV_BLOCK - 1 };
        for slot in first..=last {
            f(rows.row(slot, hd, &mut buf));
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
    use crate::kv_cache::{KvPool, block_values};

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
            let pool = KvPool::new(block_values(2, h.n_kv_heads, h.head_dim), DType::F32, None);
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
        let pool = KvPool::new(block_values(1, 1, 16), DType::F16, None);
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

    /// The AVX2 body gives the portable body's bits: head sizes with and without a scalar
    /// tail and a partial group of vectors, f16 and f32 caches, windows, positions inside and
    /// across blocks.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_body_has_the_portable_bits() {
        assert!(crate::kernels::level() >= crate::kernels::Level::Avx2, "this test needs a CPU with AVX2");
        for (hd, precision, window) in [
            (12, DType::F16, None),
            (16, DType::F32, None),
            (64, DType::F16, None),
            (64, DType::F16, Some(21)),
            (72, DType::F32, Some(3)),
            (44, DType::F16, None),
        ] {
            let h = Heads { n_heads: 6, n_kv_heads: 2, head_dim: hd, window };
            let kvw = h.n_kv_heads * hd;
            let pool = KvPool::new(block_values(2, h.n_kv_heads, hd), precision, None);
            let mut cache = KvCache::new(pool, 2, h.n_kv_heads, hd, 100, precision);
            let mut seed = hd as u64;
            cache.reserve(70).unwrap();
            for p in 0..70 {
                let k: Vec<f32> = (0..kvw).map(|_| lcg(&mut seed) * 3.0).collect();
                let v: Vec<f32> = (0..kvw).map(|_| lcg(&mut seed)).collect();
                cache.write(1, p, &k, &v);
            }
            for pos in [0usize, 3, 15, 16, 17, 40, 69] {
                for head in [0usize, 4] {
                    let q: Vec<f32> = (0..hd).map(|_| lcg(&mut seed) * 2.0).collect();
                    let (mut simd, mut portable) = (vec![1f32; hd], vec![2f32; hd]);
                    // SAFETY: the CPU has AVX2 (asserted above); F16C comes with it (`Level::Avx2`).
                    unsafe { attend_one_avx2(&h, &q, &cache, 1, pos, head, &mut simd) };
                    attend_one_body(&h, &q, &cache, 1, pos, head, &mut portable);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&simd),
                        bits(&portable),
                        "hd {hd} {precision:?} {window:?} pos {pos} head {head}"
                    );
                }
            }
        }
    }
}
