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
    /// Factor of every score (`1/sqrt(head_dim)`; 1 when the query was scaled before, as
    /// llama.cpp does for Gemma).
    pub scale: f32,
    /// Gemma 2: scores become `cap · tanh(score / cap)` before the softmax (llama.cpp's
    /// order: times `1/cap`, tanh, times `cap`).
    pub softcap: Option<f32>,
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
    let g = h.n_heads / h.n_kv_heads;
    // Units of work: (job, row * n_kv_heads + kv_head), each the `g` query heads sharing a KV
    // head, writing `g * hd` values of its job's result.
    let units: Vec<(usize, usize)> =
        jobs.iter().enumerate().flat_map(|(j, job)| (0..job.t * h.n_kv_heads).map(move |r| (j, r))).collect();
    let mut outs: Vec<Vec<f32>> = jobs.iter().map(|j| vec![0f32; j.t * h.n_heads * hd]).collect();
    let work: usize = jobs.iter().map(|j| j.t * (j.start + j.t)).sum::<usize>() * h.n_heads * hd;
    let ptrs: Vec<SyncPtr> = outs.iter_mut().map(|o| SyncPtr(o.as_mut_ptr())).collect();
    let run = |range: std::ops::Range<usize>| {
        for &(j, r) in &units[range] {
            let job = &jobs[j];
            let (i, kv_head) = (r / h.n_kv_heads, r % h.n_kv_heads);
            // The group's heads are `r*g..(r+1)*g` of the `t * n_heads` (row, head) pairs.
            let at = r * g * hd;
            // SAFETY: unit (j, r) is the only writer of values `at..at + g*hd` of result `j`,
            // which has `t * n_heads * hd` values; `outs` outlives the pool call.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptrs[j].0.add(at), g * hd) };
            attend_group(h, &job.q[at..at + g * hd], job.cache, layer, job.start + i, kv_head, dst);
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

/// The query heads sharing KV head `kv_head` at position `pos` (`q` and `out` hold `g = n_heads /
/// n_kv_heads` heads of `head_dim` values): with AVX-512 all of them in one pass over the
/// cached rows, else head by head with AVX2 or the portable body. The arithmetic is written
/// out in a fixed order (no fused multiply-adds), so every path gives the same bits.
fn attend_group(
    h: &Heads,
    q: &[f32],
    cache: &KvCache,
    layer: usize,
    pos: usize,
    kv_head: usize,
    out: &mut [f32],
) {
    let (hd, g) = (h.head_dim, h.n_heads / h.n_kv_heads);
    #[cfg(target_arch = "x86_64")]
    {
        use crate::kernels::{Level, level};
        if level() >= Level::Avx512 && matches!(cache.precision(), DType::F16 | DType::F32) {
            // SAFETY: the CPU supports AVX-512 F and F16C (checked at run time just above).
            unsafe {
                match cache.precision() {
                    DType::F16 => attend_group_avx512::<u16>(h, q, cache, layer, pos, kv_head, out),
                    _ => attend_group_avx512::<f32>(h, q, cache, layer, pos, kv_head, out),
                }
            }
            return;
        }
        if level() >= Level::Avx2 {
            for i in 0..g {
                let (q, out) = (&q[i * hd..(i + 1) * hd], &mut out[i * hd..(i + 1) * hd]);
                // SAFETY: the CPU supports AVX2 (checked at run time just above).
                unsafe { attend_one_avx2(h, q, cache, layer, pos, kv_head * g + i, out) };
            }
            return;
        }
    }
    for i in 0..g {
        let (q, out) = (&q[i * hd..(i + 1) * hd], &mut out[i * hd..(i + 1) * hd]);
        attend_one_body(h, q, cache, layer, pos, kv_head * g + i, out);
    }
}

/// Scratch of [`attend_group_avx512`]: the rounded queries and the scores, per head.
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct GroupScratch {
    q: Vec<f32>,
    scores: Vec<f32>,
}

/// [`attend_group`] with AVX-512 on a cache stored as `E`: every cached row is loaded (and
/// widened) once for the whole group, the next block of rows is prefetched, and the weighted
/// sum of V keeps up to 4 heads × 64 values in registers over all positions.
///
/// # Safety
/// The CPU must support AVX-512 F, AVX2 and F16C; the cache must be stored as `E`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c,avx512f")]
unsafe fn attend_group_avx512<E: Lane>(
    h: &Heads,
    q: &[f32],
    cache: &KvCache,
    layer: usize,
    pos: usize,
    kv_head: usize,
    out: &mut [f32],
) {
    thread_local! {
        static SCRATCH: std::cell::RefCell<GroupScratch> = std::cell::RefCell::new(GroupScratch::default());
    }
    let mut own = None;
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        // SAFETY: forwarded contract.
        Ok(mut scratch) => unsafe { group_avx512::<E>(h, q, cache, layer, pos, kv_head, out, &mut scratch) },
        Err(_) => own = Some(()),
    });
    if own.is_some() {
        // SAFETY: forwarded contract.
        unsafe { group_avx512::<E>(h, q, cache, layer, pos, kv_head, out, &mut GroupScratch::default()) };
    }
}

/// The body of [`attend_group_avx512`].
///
/// # Safety
/// As [`attend_group_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c,avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn group_avx512<E: Lane>(
    h: &Heads,
    q: &[f32],
    cache: &KvCache,
    layer: usize,
    pos: usize,
    kv_head: usize,
    out: &mut [f32],
    scratch: &mut GroupScratch,
) {
    let precision = cache.precision();
    let (hd, g) = (h.head_dim, h.n_heads / h.n_kv_heads);
    let lo = match h.window {
        Some(w) if pos >= w => pos + 1 - w,
        _ => 0,
    };
    let n = pos + 1 - lo;
    let scale = h.scale;
    scratch.q.clear();
    scratch.q.resize(g * hd, 0.0);
    round_into(&mut scratch.q, &q[..g * hd], precision);
    scratch.scores.clear();
    scratch.scores.resize(g * n, 0.0);
    let (qr, scores) = (&scratch.q[..], &mut scratch.scores[..]);
    let blocks = lo / KV_BLOCK..=pos / KV_BLOCK;
    let span = |block: usize| {
        let first = if block == lo / KV_BLOCK { lo % KV_BLOCK } else { 0 };
        let last = if block == pos / KV_BLOCK { pos % KV_BLOCK } else { KV_BLOCK - 1 };
        (first, last)
    };
    // Scores, 4 heads at a time.
    for h0 in (0..g).step_by(4) {
        let nh = (g - h0).min(4);
        for block in blocks.clone() {
            let rows = E::of(cache.rows(layer, 0, kv_head, block));
            if block < pos / KV_BLOCK {
                // SAFETY: SSE is enabled; a prefetch reads nothing.
                unsafe { prefetch(E::of(cache.rows(layer, 0, kv_head, block + 1))) };
            }
            let (first, last) = span(block);
            for slot in first..=last {
                let j = block * KV_BLOCK + slot - lo;
                let k = &rows[slot * hd..(slot + 1) * hd];
                // SAFETY: `k` and each head of `qr` hold `hd` values; AVX2 and F16C are enabled.
                let dots = unsafe {
                    match nh {
                        1 => dots::<E, 1>(&qr[h0 * hd..], k, hd),
                        2 => dots::<E, 2>(&qr[h0 * hd..], k, hd),
                        3 => dots::<E, 3>(&qr[h0 * hd..], k, hd),
                        _ => dots::<E, 4>(&qr[h0 * hd..], k, hd),
                    }
                };
                for (i, d) in dots.iter().enumerate().take(nh) {
                    scores[(h0 + i) * n + j] = d * scale;
                }
            }
        }
    }
    // Softmax per head, as the portable body.
    for s in scores.chunks_exact_mut(n) {
        softmax(s, precision, h.softcap);
    }
    // Weighted sums of V: up to 4 heads × 4 vectors (64 values) in registers.
    let c16 = hd / 16;
    for h0 in (0..g).step_by(4) {
        let nh = (g - h0).min(4);
        let mut c0 = 0;
        while c0 < c16 {
            let nc = (c16 - c0).min(4);
            let pass = PvPass { cache, layer, kv_head, lo, pos, hd, c0, scores: &scores[h0 * n..], n };
            let o = &mut out[h0 * hd..];
            // SAFETY: AVX-512 F is enabled; `o` holds `nh` heads of `hd >= 16 * (c0 + nc)` values.
            unsafe {
                match (nh, nc) {
                    (1, 1) => pass.run::<E, 1, 1>(o),
                    (1, 2) => pass.run::<E, 1, 2>(o),
                    (1, 3) => pass.run::<E, 1, 3>(o),
                    (1, _) => pass.run::<E, 1, 4>(o),
                    (2, 1) => pass.run::<E, 2, 1>(o),
                    (2, 2) => pass.run::<E, 2, 2>(o),
                    (2, 3) => pass.run::<E, 2, 3>(o),
                    (2, _) => pass.run::<E, 2, 4>(o),
                    (3, 1) => pass.run::<E, 3, 1>(o),
                    (3, 2) => pass.run::<E, 3, 2>(o),
                    (3, 3) => pass.run::<E, 3, 3>(o),
                    (3, _) => pass.run::<E, 3, 4>(o),
                    (_, 1) => pass.run::<E, 4, 1>(o),
                    (_, 2) => pass.run::<E, 4, 2>(o),
                    (_, 3) => pass.run::<E, 4, 3>(o),
                    (_, _) => pass.run::<E, 4, 4>(o),
                }
            }
            c0 += nc;
        }
        // Values past the last 16, in order (as the portable body).
        if c16 * 16 < hd {
            for i in 0..nh {
                let o = &mut out[(h0 + i) * hd..(h0 + i + 1) * hd];
                o[c16 * 16..].fill(0.0);
                for block in blocks.clone() {
                    let rows = E::of(cache.rows(layer, 1, kv_head, block));
                    let (first, last) = span(block);
                    for slot in first..=last {
                        let p = scores[(h0 + i) * n + block * KV_BLOCK + slot - lo];
                        for (o, &x) in
                            o[c16 * 16..].iter_mut().zip(&rows[slot * hd + c16 * 16..(slot + 1) * hd])
                        {
                            *o += p * x.widen();
                        }
                    }
                }
            }
        }
    }
}

/// [`dot`] of `N <= 4` query heads (`q`, head after head, `hd` values each) with one cached
/// row, in the first `N` entries: the row is loaded (and widened) once for all of them.
///
/// # Safety
/// `q` must hold `N * hd` values and `k` `hd`; AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dots<E: Lane, const N: usize>(q: &[f32], k: &[E], hd: usize) -> [f32; 4] {
    use std::arch::x86_64::*;
    let chunks = hd / 8;
    // SAFETY: as documented; every load reads 8 values inside `q` or `k`.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); N];
        for c in 0..chunks {
            let y = E::load8(k.as_ptr().add(8 * c));
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(q.as_ptr().add(i * hd + 8 * c));
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, y));
            }
        }
        let mut out = [0f32; 4];
        for i in 0..N {
            let mut a = [0f32; 8];
            _mm256_storeu_ps(a.as_mut_ptr(), acc[i]);
            let mut tail = 0f32;
            for (x, y) in q[i * hd + chunks * 8..(i + 1) * hd].iter().zip(&k[chunks * 8..hd]) {
                tail += x * y.widen();
            }
            out[i] = fold8(a) + tail;
        }
        out
    }
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
    /// Values `p..p + 16` widened to f32.
    ///
    /// # Safety
    /// 16 readable values at `p`; AVX-512 F.
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
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
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller guarantees 16 readable values and AVX-512 F.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
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
    unsafe fn load16(p: *const u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 16 readable values and AVX-512 F.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
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
    let scale = h.scale;
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
        softmax(scores, precision, h.softcap);
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
                    for (o, &x) in
                        out[chunks * 8..].iter_mut().zip(&rows[slot * hd + chunks * 8..(slot + 1) * hd])
                    {
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
    let precision = cache.precision();
    let kv_head = head / (h.n_heads / h.n_kv_heads);
    let lo = match h.window {
        Some(w) if pos >= w => pos + 1 - w,
        _ => 0,
    };
    let q: Vec<f32> = q.iter().map(|&x| round_to(x, precision)).collect();
    let scale = h.scale;
    let mut scores = Vec::with_capacity(pos + 1 - lo);
    for_rows(cache, layer, 0, kv_head, lo, pos, |k| scores.push(dot(&q, k) * scale));
    softmax(&mut scores, precision, h.softcap);
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

/// Scaled scores to probabilities, in place, the same way on every path: `det_exp` of each
/// score minus the maximum (a plain map, it vectorizes), the normaliser summed in f64 in order,
/// then each times its inverse and rounded to the cache's precision.
#[inline(always)]
fn softmax(s: &mut [f32], precision: DType, softcap: Option<f32>) {
    if let Some(cap) = softcap {
        let inv = 1.0 / cap;
        for s in s.iter_mut() {
            *s = (*s * inv).tanh() * cap;
        }
    }
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for s in s.iter_mut() {
        *s = det_exp(*s - max);
    }
    let sum: f64 = s.iter().fold(0f64, |sum, &s| sum + f64::from(s));
    let inv = (1.0 / sum) as f32;
    for s in s.iter_mut() {
        *s *= inv;
    }
    round_in_place(s, precision);
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

/// The fixed tree summing 8 lanes (as [`dot`] does).
#[inline(always)]
fn fold8(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// Asks for `rows` in the L1 cache: the next block of a pass, which is elsewhere in memory.
///
/// # Safety
/// SSE (any x86_64 CPU).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch<E>(rows: &[E]) {
    use std::arch::x86_64::*;
    let p = rows.as_ptr().cast::<i8>();
    for line in (0..std::mem::size_of_val(rows)).step_by(64) {
        // SAFETY: a prefetch of an address inside `rows` reads nothing and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(line)) };
    }
}

/// One pass of [`group_avx512`]'s weighted sum of V: values `16 * c0..` of a few heads.
#[cfg(target_arch = "x86_64")]
struct PvPass<'a> {
    cache: &'a KvCache,
    layer: usize,
    kv_head: usize,
    lo: usize,
    pos: usize,
    hd: usize,
    c0: usize,
    /// The probabilities of the pass's first head, then the next heads', `n` each.
    scores: &'a [f32],
    n: usize,
}

#[cfg(target_arch = "x86_64")]
impl PvPass<'_> {
    /// Values `16 * c0..16 * (c0 + NC)` of heads `0..NH` into `out` (`hd` values per head): for
    /// each, the sum over positions in order of `p · v`, from 0 (the portable body's order).
    ///
    /// # Safety
    /// AVX-512 F; `hd >= 16 * (c0 + NC)`, `out` holds `NH * hd` values, `scores` `NH * n`.
    #[inline(always)]
    unsafe fn run<E: Lane, const NH: usize, const NC: usize>(&self, out: &mut [f32]) {
        use std::arch::x86_64::*;
        let (hd, lo, pos) = (self.hd, self.lo, self.pos);
        // SAFETY: as documented; every load reads 16 values inside a cached row.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NC]; NH];
            for block in lo / KV_BLOCK..=pos / KV_BLOCK {
                let rows = E::of(self.cache.rows(self.layer, 1, self.kv_head, block));
                if block < pos / KV_BLOCK {
                    prefetch(E::of(self.cache.rows(self.layer, 1, self.kv_head, block + 1)));
                }
                let first = if block == lo / KV_BLOCK { lo % KV_BLOCK } else { 0 };
                let last = if block == pos / KV_BLOCK { pos % KV_BLOCK } else { KV_BLOCK - 1 };
                let rows = &rows[..(last + 1) * hd];
                for slot in first..=last {
                    let j = block * KV_BLOCK + slot - lo;
                    let v = rows.as_ptr().add(slot * hd + 16 * self.c0);
                    let mut x = [_mm512_setzero_ps(); NC];
                    for (c, x) in x.iter_mut().enumerate() {
                        *x = E::load16(v.add(16 * c));
                    }
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let p = _mm512_set1_ps(self.scores[i * self.n + j]);
                        for (acc, x) in acc.iter_mut().zip(&x) {
                            *acc = _mm512_add_ps(*acc, _mm512_mul_ps(p, *x));
                        }
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                for (c, acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(out[i * hd + 16 * (self.c0 + c)..][..16].as_mut_ptr(), *acc);
                }
            }
        }
    }
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
            let h = Heads {
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 12,
                window,
                scale: 1.0 / 12f32.sqrt(),
                softcap: None,
            };
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
        let h = Heads { n_heads: 2, n_kv_heads: 1, head_dim: 16, window: None, scale: 0.25, softcap: None };
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

    /// The SIMD bodies give the portable body's bits: AVX2 head by head, and (on a CPU with
    /// AVX-512) the whole group in one pass; head sizes with and without a scalar tail, groups
    /// of 1, 3 and 5 heads, f16 and f32 caches, windows, positions inside and across blocks.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_simd_bodies_have_the_portable_bits() {
        use crate::kernels::{Level, level};
        assert!(level() >= Level::Avx2, "this test needs a CPU with AVX2");
        for (hd, precision, window, n_heads) in [
            (12, DType::F16, None, 6),
            (16, DType::F32, None, 2),
            (64, DType::F16, None, 6),
            (64, DType::F16, Some(21), 10),
            (72, DType::F32, Some(3), 6),
            (44, DType::F16, None, 10),
            (128, DType::F16, None, 6),
        ] {
            let h = Heads {
                n_heads,
                n_kv_heads: 2,
                head_dim: hd,
                window,
                scale: 1.0 / (hd as f32).sqrt(),
                softcap: None,
            };
            let g = n_heads / 2;
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
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for pos in [0usize, 3, 15, 16, 17, 40, 69] {
                for kv_head in [0usize, 1] {
                    let q: Vec<f32> = (0..g * hd).map(|_| lcg(&mut seed) * 2.0).collect();
                    let mut portable = vec![2f32; g * hd];
                    for i in 0..g {
                        let head = kv_head * g + i;
                        attend_one_body(
                            &h,
                            &q[i * hd..][..hd],
                            &cache,
                            1,
                            pos,
                            head,
                            &mut portable[i * hd..][..hd],
                        );
                        let mut simd = vec![1f32; hd];
                        // SAFETY: the CPU has AVX2 (asserted above); F16C comes with it.
                        unsafe { attend_one_avx2(&h, &q[i * hd..][..hd], &cache, 1, pos, head, &mut simd) };
                        let what = format!("AVX2 hd {hd} {precision:?} {window:?} pos {pos} head {head}");
                        assert_eq!(bits(&simd), bits(&portable[i * hd..][..hd]), "{what}");
                    }
                    let mut group = vec![3f32; g * hd];
                    attend_group(&h, &q, &cache, 1, pos, kv_head, &mut group);
                    let what = format!("group ({:?}) hd {hd} {precision:?} {window:?} pos {pos}", level());
                    assert_eq!(bits(&group), bits(&portable), "{what}");
                }
            }
        }
    }
}
