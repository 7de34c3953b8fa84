//! Activation quantization, bit-exact with ggml's `quantize_row_q8_0` / `quantize_row_q8_1`
//! reference code (and candle's `BlockQ8_0::from_float` / `BlockQ8_1::from_float` values and
//! scales): per 32-block `d = amax / 127`, `q = round(x · (1 / d))` rounding halves away from
//! zero, `d` kept as `f16`. For the `q8_1` users `s = d · Σq` is kept too (as `s / 8`), computed
//! as ggml does, `f16(Σq · d)` with the unrounded `d` (candle's `f16(f16(Σq) · f16(d))` can
//! differ by one `f16` ulp; llama.cpp is the reference shoal is tested against).

use half::f16;

use super::QK;

/// Where one quantized activation row goes (see `Acts` for the meaning of each buffer).
pub(super) struct RowOut<'a> {
    /// `k` 8-bit values.
    pub(super) qs: &'a mut [i8],
    /// `k / 32` scales (`f16`-rounded).
    pub(super) d: &'a mut [f32],
    /// `k / 32` values `f16(Σq · d) / 8`, when wanted.
    pub(super) s8: Option<&'a mut [f32]>,
    /// `k / 32` values `-offset · Σq`, when wanted.
    pub(super) corr: Option<&'a mut [i32]>,
}

/// Quantizes one row `x` (length a multiple of 32, equal to `out.qs.len()`) into `out`.
pub(super) fn quantize_row(x: &[f32], mut out: RowOut<'_>, offset: i32, simd: bool) {
    for (b, (xs, qs)) in x.chunks_exact(QK).zip(out.qs.chunks_exact_mut(QK)).enumerate() {
        let (d, sum) = quantize_block(xs, qs, simd);
        let d16 = f16::from_f32(d);
        out.d[b] = d16.to_f32();
        if let Some(s8) = out.s8.as_deref_mut() {
            // exactly ggml's `quantize_row_q8_1`
            s8[b] = f16::from_f32(sum as f32 * d).to_f32() * 0.125;
        }
        if let Some(corr) = out.corr.as_deref_mut() {
            corr[b] = -offset * sum;
        }
    }
}

/// Quantizes 32 values; returns the unrounded scale `d` and `Σq`.
fn quantize_block(xs: &[f32], qs: &mut [i8], simd: bool) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if simd && xs.len() == QK && qs.len() == QK {
        // SAFETY: `simd` is only set when AVX2/FMA/F16C were detected; both slices hold 32 values.
        return unsafe { quantize_block_avx2(xs.as_ptr(), qs.as_mut_ptr()) };
    }
    let _ = simd;
    quantize_block_scalar(xs, qs)
}

/// Portable [`quantize_block`].
pub(super) fn quantize_block_scalar(xs: &[f32], qs: &mut [i8]) -> (f32, i32) {
    let amax = xs.iter().fold(0f32, |a, x| a.max(x.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0;
    for (q, &x) in qs.iter_mut().zip(xs) {
        *q = (x * id).round() as i8;
        sum += *q as i32;
    }
    (d, sum)
}

/// AVX2 [`quantize_block`] on 32 values at `xs`, written to `qs`.
///
/// # Safety
/// The CPU must support AVX2; `xs` and `qs` must be valid for 32 elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_block_avx2(xs: *const f32, qs: *mut i8) -> (f32, i32) {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees 32 readable floats and 32 writable bytes.
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        let v = [
            _mm256_loadu_ps(xs),
            _mm256_loadu_ps(xs.add(8)),
            _mm256_loadu_ps(xs.add(16)),
            _mm256_loadu_ps(xs.add(24)),
        ];
        let a01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
        let a23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
        let a = _mm256_max_ps(a01, a23);
        let a = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let a = _mm_max_ps(a, _mm_movehl_ps(a, a));
        let a = _mm_max_ss(a, _mm_movehdup_ps(a));
        let amax = _mm_cvtss_f32(a);
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let half = _mm256_set1_ps(0.5);
        let one = _mm256_set1_ps(1.0);
        let i = v.map(|v| {
            // round half away from zero, exactly like `f32::round`
            let x = _mm256_mul_ps(v, id);
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(x);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(x, t));
            let up = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, half);
            let step = _mm256_or_ps(_mm256_and_ps(x, sign), one);
            _mm256_cvtps_epi32(_mm256_add_ps(t, _mm256_and_ps(up, step)))
        });
        let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<1>(s));
        let sum = _mm_cvtsi128_si32(s);
        let p01 = _mm256_packs_epi32(i[0], i[1]);
        let p23 = _mm256_packs_epi32(i[2], i[3]);
        let p = _mm256_packs_epi16(p01, p23);
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(qs.cast(), p);
        (d, sum)
    }
}

/// Quantizes one row `x` (length a multiple of 256, equal to `out.qs.len()`) per 256 values, as
/// ggml's `quantize_row_q8_K` (and candle's `BlockQ8K::from_float`): `iscale = −127 / max` of the
/// value of largest magnitude, `q = round(iscale · x)` (halves away from zero) clamped to
/// `−128..=127`, `d = 1 / iscale` kept as `f32`. Each 32-block gets the superblock's `d`; with
/// `s8`, `d · Σq / 8` of the block (unrounded, as ggml's K-quant dot products use integer block
/// sums); with `corr`, `−offset · Σq` of each 16-value half (`k / 16` values).
pub(super) fn quantize_row_k(x: &[f32], out: RowOut<'_>, offset: i32) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::{Level, level};
        /// # Safety
        /// The CPU must support AVX-512 F/BW and AVX2.
        #[target_feature(enable = "avx2,fma,avx512f,avx512bw")]
        unsafe fn avx512(x: &[f32], out: RowOut<'_>, offset: i32) {
            quantize_row_k_body(x, out, offset)
        }
        /// # Safety
        /// The CPU must support AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &[f32], out: RowOut<'_>, offset: i32) {
            quantize_row_k_body(x, out, offset)
        }
        if level() >= Level::Avx512 {
            // SAFETY: checked at run time just above.
            return unsafe { avx512(x, out, offset) };
        }
        if level() >= Level::Avx2 {
            // SAFETY: checked at run time just above.
            return unsafe { avx2(x, out, offset) };
        }
    }
    quantize_row_k_body(x, out, offset)
}

/// [`quantize_row_k`], written so that it vectorizes (every operation is exact or one IEEE
/// rounding, so every instruction set gives the same bits).
#[inline(always)]
fn quantize_row_k_body(x: &[f32], out: RowOut<'_>, offset: i32) {
    const QK_K: usize = 256;
    let RowOut { qs, d, mut s8, mut corr } = out;
    for (u, (xs, qs)) in x.chunks_exact(QK_K).zip(qs.chunks_exact_mut(QK_K)).enumerate() {
        // 16 running maxima (a chain per lane, so it vectorizes), then theirs: exact.
        let mut lanes = [0f32; 16];
        for c in xs.chunks_exact(16) {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l = l.max(v.abs());
            }
        }
        let amax = lanes.iter().fold(0f32, |a, &l| a.max(l));
        // The first value of largest magnitude, with its sign (ggml's `max`).
        let max = xs.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0);
        let dd = if amax == 0.0 {
            qs.fill(0);
            0.0
        } else {
            let iscale = -127f32 / max;
            for (q, &v) in qs.iter_mut().zip(xs) {
                *q = round_clamp_i8(iscale * v);
            }
            1.0 / iscale
        };
        for b in 0..QK_K / QK {
            let blk = u * (QK_K / QK) + b;
            d[blk] = dd;
            // (16 values of at most 128 in magnitude: the sum cannot overflow; wrapping adds
            // keep the overflow checks of the dev profile out of the loop, so it vectorizes.)
            let half = |h: usize| {
                qs[b * QK + 16 * h..b * QK + 16 * h + 16]
                    .iter()
                    .fold(0i32, |a, &q| a.wrapping_add(i32::from(q)))
            };
            let (h0, h1) = (half(0), half(1));
            if let Some(s8) = s8.as_deref_mut() {
                s8[blk] = (h0 + h1) as f32 * dd * 0.125;
            }
            if let Some(corr) = corr.as_deref_mut() {
                corr[2 * blk] = -offset * h0;
                corr[2 * blk + 1] = -offset * h1;
            }
        }
    }
}

/// `x.round().clamp(-128, 127) as i8` (halves away from zero; NaN gives 0), in plain
/// arithmetic that vectorizes (`f32::round` is a library call on baseline x86_64, and the
/// saturating casts and overflow checks would keep the loop scalar): after clamping, the
/// truncation and the fraction `x - trunc(x)` are exact.
#[inline(always)]
fn round_clamp_i8(x: f32) -> i8 {
    let x = if x.is_nan() { 0.0 } else { x.clamp(-128.0, 127.0) };
    // SAFETY: `x` is finite and within `-128.0..=127.0`, so it truncates to an `i32`.
    let t = unsafe { x.to_int_unchecked::<i32>() };
    let frac = x - t as f32;
    t.wrapping_add(i32::from(frac >= 0.5)).wrapping_sub(i32::from(frac <= -0.5)) as i8
}
