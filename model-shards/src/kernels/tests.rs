//! Tests of the quantized kernels against candle's `QMatMul` and between dispatch levels.

use candle_core::quantized::{GgmlDType, GgmlType, QMatMul, QTensor, k_quants};
use candle_core::{Device, Module, Tensor};
use half::f16;
use proptest::prelude::*;

use super::{KernelError, Level, level, matmul, matmul_at, matmul_row_invariant, q8, supports};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const DTYPES: [GgmlDType; 5] =
    [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q8_0];

/// Deterministic pseudo-random values roughly in `[-1, 1)`, with occasional outliers.
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            if i % 97 == 5 { u * 8.0 } else { u }
        })
        .collect()
}

/// `n × k` weights quantized by candle: (raw GGUF bytes, `QTensor`).
fn weights(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> candle_core::Result<(Vec<u8>, QTensor)> {
    let w = Tensor::from_vec(values(n * k, seed), (n, k), &Device::Cpu)?;
    let q = QTensor::quantize(&w, dtype)?;
    Ok((q.data()?.into_owned(), q))
}

/// candle's `QMatMul` forward of `m × k` activations.
fn candle_matmul(q: &QMatMul, lhs: &[f32], m: usize, k: usize) -> candle_core::Result<Vec<f32>> {
    let x = Tensor::from_slice(lhs, (m, k), &Device::Cpu)?;
    q.forward(&x)?.flatten_all()?.to_vec1()
}

/// candle's generic (ggml-numerics, never repacked) CPU matmul of raw blocks of type `B`.
fn candle_generic<B: GgmlType>(
    bytes: &[u8],
    m: usize,
    k: usize,
    n: usize,
    lhs: &[f32],
) -> candle_core::Result<Vec<f32>> {
    let mut blocks = vec![B::zeros(); bytes.len() / std::mem::size_of::<B>()];
    assert_eq!(blocks.len() * std::mem::size_of::<B>(), bytes.len());
    // SAFETY: `B` is a plain-old-data `repr(C)` ggml block and the lengths match.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), blocks.as_mut_ptr().cast::<u8>(), bytes.len()) };
    let mut dst = vec![0f32; m * n];
    k_quants::matmul((m, k, n), lhs, &blocks, &mut dst)?;
    Ok(dst)
}

/// [`candle_generic`] for a runtime dtype.
fn candle_reference(
    dtype: GgmlDType,
    bytes: &[u8],
    m: usize,
    k: usize,
    n: usize,
    lhs: &[f32],
) -> candle_core::Result<Vec<f32>> {
    match dtype {
        GgmlDType::Q4_0 => candle_generic::<k_quants::BlockQ4_0>(bytes, m, k, n, lhs),
        GgmlDType::Q4_1 => candle_generic::<k_quants::BlockQ4_1>(bytes, m, k, n, lhs),
        GgmlDType::Q5_0 => candle_generic::<k_quants::BlockQ5_0>(bytes, m, k, n, lhs),
        GgmlDType::Q5_1 => candle_generic::<k_quants::BlockQ5_1>(bytes, m, k, n, lhs),
        _ => candle_generic::<k_quants::BlockQ8_0>(bytes, m, k, n, lhs),
    }
}

/// `max |a - b| / (‖lhs row‖ · ‖weight row‖)` over all outputs: the error relative to the
/// Cauchy–Schwarz bound of each dot product, so cancelling sums do not inflate it.
fn rel_err(a: &[f32], b: &[f32], lhs: &[f32], w: &[f32], k: usize) -> f64 {
    let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let xn: Vec<f64> = lhs.chunks_exact(k).map(norm).collect();
    let wn: Vec<f64> = w.chunks_exact(k).map(norm).collect();
    let n = wn.len();
    a.iter()
        .zip(b)
        .enumerate()
        .map(|(i, (&x, &y))| (x as f64 - y as f64).abs() / (xn[i / n] * wn[i % n] + 1e-30))
        .fold(0.0, f64::max)
}

/// Levels available on this machine, lowest first.
fn levels() -> Vec<Level> {
    [Level::Scalar, Level::Avx2, Level::Avx512].into_iter().filter(|&l| l <= level()).collect()
}

/// Whether candle's `QMatMul` takes its repacked AVX-512 `Q8_0` path, which quantizes the
/// activations per 256 values (`q8_K`) instead of per 32 and so differs beyond rounding noise.
/// (candle looks at the CPU itself, whatever `SHOAL_CPU` says.)
fn candle_repacks(dtype: GgmlDType, k: usize, n: usize) -> bool {
    dtype == GgmlDType::Q8_0
        && k.is_multiple_of(256)
        && n.is_multiple_of(16)
        && super::detect() == Level::Avx512
}

/// Float summation-order noise allowed, relative to `‖x‖·‖w‖`.
const TOL: f64 = 2e-6;

/// Against candle for the `q8_1` users (`Q4_1`, `Q5_1`): these kernels round the block sum
/// `s = f16(Σq · d)` as ggml (llama.cpp) does, candle as `f16(f16(Σq) · f16(d))`; one f16 ulp
/// of `s` per block is well above summation noise.
const TOL_Q8_1: f64 = 4e-3;

fn candle_tol(dtype: GgmlDType) -> f64 {
    match dtype {
        GgmlDType::Q4_1 | GgmlDType::Q5_1 => TOL_Q8_1,
        _ => TOL,
    }
}

#[test]
fn matmul_matches_candle_on_every_level() -> TestResult {
    // candle's generic `Q4_1`/`Q5_*` dot products debug-assert an even block count, so odd ones
    // (which these kernels handle) are only checked between levels, in the proptest below
    let shapes = [(576, 576), (576, 1536), (1536, 576), (576, 1000), (64, 1003), (128, 7), (64, 1)];
    let mut worst = 0f64;
    for (di, dtype) in DTYPES.into_iter().enumerate() {
        for (si, &(k, n)) in shapes.iter().enumerate() {
            let (bytes, q) = weights(dtype, n, k, (di * 31 + si) as u64)?;
            let w = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            let q = QMatMul::from_qtensor(q)?;
            for m in [1, 2, 3, 7, 16, 33] {
                let lhs = values(m * k, (m * 7 + si) as u64 + 1000);
                let generic = candle_reference(dtype, &bytes, m, k, n, &lhs)?;
                let qmatmul = candle_matmul(&q, &lhs, m, k)?;
                let mut scalar = vec![f32::NAN; m * n];
                matmul_at(Level::Scalar, dtype, &bytes, m, k, n, &lhs, &mut scalar)?;
                for lvl in levels() {
                    let mut out = vec![f32::NAN; m * n];
                    matmul_at(lvl, dtype, &bytes, m, k, n, &lhs, &mut out)?;
                    let ctx = format!("{dtype:?} {lvl:?} m={m} k={k} n={n}");
                    let errs = [
                        rel_err(&out, &generic, &lhs, &w, k),
                        if candle_repacks(dtype, k, n) { 0.0 } else { rel_err(&out, &qmatmul, &lhs, &w, k) },
                    ];
                    assert!(errs.iter().all(|&e| e <= candle_tol(dtype)), "{ctx}: errors vs candle {errs:?}");
                    let vs_scalar = rel_err(&out, &scalar, &lhs, &w, k);
                    assert!(vs_scalar <= TOL, "{ctx}: error vs scalar {vs_scalar:e}");
                    worst = errs.into_iter().fold(worst.max(vs_scalar), f64::max);
                    if candle_repacks(dtype, k, n) {
                        let e = rel_err(&out, &qmatmul, &lhs, &w, k);
                        assert!(e <= 1e-2, "{ctx}: vs repacked QMatMul {e:e}");
                    }
                }
                let mut out = vec![f32::NAN; m * n];
                matmul(dtype, &bytes, m, k, n, &lhs, &mut out)?;
                assert!(rel_err(&out, &generic, &lhs, &w, k) <= candle_tol(dtype));
            }
        }
    }
    eprintln!("worst error relative to |x||w|: {worst:e}");
    Ok(())
}

/// The 32-value `q8` blocks of `xs` quantized by candle as raw bytes.
fn candle_q8(xs: &[f32], dtype: GgmlDType) -> candle_core::Result<Vec<u8>> {
    let t = Tensor::from_slice(xs, (1, xs.len()), &Device::Cpu)?;
    Ok(QTensor::quantize(&t, dtype)?.data()?.into_owned())
}

#[test]
fn activation_quantization_matches_candle() -> TestResult {
    let mut xs = values(32 * 64, 7);
    // exact ties of x / d at .5, zeros, and a block of equal magnitudes
    for (j, x) in xs[..32].iter_mut().enumerate() {
        *x = (j as f32 - 15.5) * 2.0;
    }
    xs[32..64].fill(0.0);
    for (j, x) in xs[64..96].iter_mut().enumerate() {
        *x = if j % 2 == 0 { 0.25 } else { -0.25 };
    }
    let q8_0 = candle_q8(&xs, GgmlDType::Q8_0)?;
    let q8_1 = candle_q8(&xs, GgmlDType::Q8_1)?;
    for simd in [false, level() >= Level::Avx2] {
        let nb = xs.len() / 32;
        let (mut qs, mut d, mut s8, mut corr) =
            (vec![0i8; xs.len()], vec![0f32; nb], vec![0f32; nb], vec![0; nb]);
        let out = q8::RowOut { qs: &mut qs, d: &mut d, s8: Some(&mut s8), corr: Some(&mut corr) };
        q8::quantize_row(&xs, out, 8, simd);
        for b in 0..nb {
            let blk = &q8_0[b * 34..(b + 1) * 34];
            assert_eq!(f16::from_le_bytes([blk[0], blk[1]]).to_f32(), d[b], "block {b} d");
            let want: Vec<i8> = blk[2..].iter().map(|&q| q as i8).collect();
            assert_eq!(want, qs[b * 32..(b + 1) * 32], "block {b} qs (simd {simd})");
            let blk1 = &q8_1[b * 36..(b + 1) * 36];
            let want1: Vec<i8> = blk1[4..].iter().map(|&q| q as i8).collect();
            assert_eq!(want1, want, "block {b} q8_1 qs");
            let sum: i32 = want.iter().map(|&q| q as i32).sum();
            assert_eq!(corr[b], -8 * sum);
            // ggml's `quantize_row_q8_1`: s = f16(Σq · d) with the unrounded d = amax / 127
            let amax = xs[b * 32..(b + 1) * 32].iter().fold(0f32, |a, x| a.max(x.abs()));
            let ggml_s = f16::from_f32(sum as f32 * (amax / 127.0)).to_f32();
            assert_eq!(s8[b] * 8.0, ggml_s, "block {b} s");
            assert_eq!(f16::from_le_bytes([blk1[0], blk1[1]]).to_f32(), d[b]);
        }
    }
    Ok(())
}

/// Per-superblock activation quantization for the K-quants is candle's `BlockQ8K` (ggml's
/// `quantize_row_q8_K`) bit for bit: the same values and scale, halves rounded away from
/// zero, an all-zero superblock, the sums of each half.
#[test]
fn k_activation_quantization_matches_candle() -> TestResult {
    let mut xs = values(256 * 6, 11);
    // exact ties of x · iscale at .5 (max 127 gives iscale -1 for a negative max), zeros
    for (j, x) in xs[..256].iter_mut().enumerate() {
        *x = (j % 200) as f32 - 100.5;
    }
    xs[0] = -127.0;
    xs[256..512].fill(0.0);
    let bytes = candle_q8(&xs, GgmlDType::Q8K)?;
    let nb = xs.len() / 32;
    let (mut qs, mut d, mut s8, mut corr) =
        (vec![0i8; xs.len()], vec![0f32; nb], vec![0f32; nb], vec![0; 2 * nb]);
    let out = q8::RowOut { qs: &mut qs, d: &mut d, s8: Some(&mut s8), corr: Some(&mut corr) };
    q8::quantize_row_k(&xs, out, 32);
    // candle's `BlockQ8K`: `f32 d`, `[i8; 256] qs`, `[i16; 16] bsums`.
    for (u, blk) in bytes.chunks_exact(4 + 256 + 32).enumerate() {
        let dd = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
        let want: Vec<i8> = blk[4..260].iter().map(|&q| q as i8).collect();
        assert_eq!(want, qs[u * 256..(u + 1) * 256], "superblock {u} qs");
        for b in 0..8 {
            assert_eq!(d[u * 8 + b].to_bits(), dd.to_bits(), "superblock {u} d");
            let half = |h: usize| {
                i16::from_le_bytes([blk[260 + 2 * (2 * b + h)], blk[261 + 2 * (2 * b + h)]]) as i32
            };
            assert_eq!(corr[2 * (u * 8 + b)], -32 * half(0), "superblock {u} block {b}");
            assert_eq!(corr[2 * (u * 8 + b) + 1], -32 * half(1), "superblock {u} block {b}");
            assert_eq!(s8[u * 8 + b] * 8.0, (half(0) + half(1)) as f32 * dd, "superblock {u} block {b} s");
        }
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
proptest! {
    #[test]
    fn simd_quantization_is_bit_exact(xs in proptest::collection::vec(-1e3f32..1e3, 32), scale in -20i32..20) {
        prop_assume!(level() >= Level::Avx2);
        let xs: Vec<f32> = xs.iter().map(|x| x * (scale as f32).exp2()).collect();
        let (mut a, mut b) = ([0i8; 32], [0i8; 32]);
        let want = q8::quantize_block_scalar(&xs, &mut a);
        // SAFETY: AVX2 is available (checked above) and both buffers hold 32 values.
        let got = unsafe { q8::quantize_block_avx2(xs.as_ptr(), b.as_mut_ptr()) };
        prop_assert_eq!(want, got);
        prop_assert_eq!(a, b);
    }

    #[test]
    fn levels_agree_on_small_shapes(
        dtype in proptest::sample::select(DTYPES.to_vec()),
        m in 1usize..6,
        kb in 1usize..9,
        n in 1usize..24,
        seed in 0u64..1000,
    ) {
        let k = kb * 32;
        let fail = |e: candle_core::Error| TestCaseError::fail(e.to_string());
        let (bytes, q) = weights(dtype, n, k, seed).map_err(fail)?;
        let w = q.dequantize(&Device::Cpu).and_then(|w| w.flatten_all()?.to_vec1::<f32>()).map_err(fail)?;
        let lhs = values(m * k, seed + 1);
        let mut want = vec![0.0; m * n];
        prop_assert!(matmul_at(Level::Scalar, dtype, &bytes, m, k, n, &lhs, &mut want).is_ok());
        for lvl in levels() {
            let mut got = vec![f32::NAN; m * n];
            prop_assert!(matmul_at(lvl, dtype, &bytes, m, k, n, &lhs, &mut got).is_ok());
            prop_assert!(rel_err(&got, &want, &lhs, &w, k) <= TOL, "{:?} {:?}", lvl, dtype);
        }
    }
}

#[test]
fn bad_sizes_are_errors() {
    let (m, k, n) = (2, 64, 3);
    let w = vec![0u8; n * 2 * 20];
    let lhs = vec![0f32; m * k];
    let mut dst = vec![0f32; m * n];
    let q41 = GgmlDType::Q4_1;
    assert!(matmul(q41, &w, m, k, n, &lhs, &mut dst).is_ok());
    let len = |what, expected, got| Err(KernelError::Len { what, expected, got });
    assert_eq!(matmul(q41, &w[1..], m, k, n, &lhs, &mut dst), len("weights", 120, 119));
    assert_eq!(matmul(GgmlDType::Q4_0, &w, m, k, n, &lhs, &mut dst), len("weights", 108, 120));
    assert_eq!(matmul(q41, &w, m, k, n, &lhs[1..], &mut dst), len("lhs", 128, 127));
    assert_eq!(matmul(q41, &w, m, k, n, &lhs, &mut dst[1..]), len("dst", 6, 5));
    assert_eq!(matmul(q41, &w, m, 48, n, &lhs, &mut dst), Err(KernelError::KNotBlockMultiple { k: 48 }));
    assert_eq!(
        matmul(GgmlDType::Q4K, &w, m, k, n, &lhs, &mut dst),
        Err(KernelError::Unsupported(GgmlDType::Q4K))
    );
    assert_eq!(matmul(q41, &w, usize::MAX, k, n, &lhs, &mut dst), Err(KernelError::Overflow));
    assert_eq!(matmul(q41, &[], 0, k, 0, &[], &mut []), Ok(()));
    let mut dst = vec![1f32; 6];
    assert_eq!(matmul(q41, &[], 2, 0, 3, &[], &mut dst), Ok(()));
    assert_eq!(dst, vec![0.0; 6]);
    assert!(!KernelError::Overflow.to_string().is_empty());
}

#[test]
fn supports_the_legacy_types_only() {
    for dtype in DTYPES {
        assert_eq!(supports(dtype), level() >= Level::Avx2);
    }
    for dtype in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::F32, GgmlDType::Q8_1] {
        assert!(!supports(dtype));
    }
}

/// Batched sessions: with `matmul_row_invariant`, every row of an m-row product has exactly
/// the bits of that row alone, at every level and for every format (the plain `matmul` may
/// not: the AVX-512 panel kernels for m >= 4 sum in another order).
#[test]
fn row_invariant_rows_equal_single_rows() -> TestResult {
    let (k, n) = (576, 1536);
    for (di, dtype) in DTYPES.into_iter().enumerate() {
        let (bytes, _) = weights(dtype, n, k, 5 + di as u64)?;
        for m in [2, 3, 4, 5, 8, 16, 33] {
            let lhs = values(m * k, 77 + m as u64);
            let mut all = vec![f32::NAN; m * n];
            matmul_row_invariant(dtype, &bytes, m, k, n, &lhs, &mut all)?;
            for r in 0..m {
                let mut one = vec![f32::NAN; n];
                matmul(dtype, &bytes, 1, k, n, &lhs[r * k..(r + 1) * k], &mut one)?;
                let same = one.iter().zip(&all[r * n..(r + 1) * n]).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{dtype:?} m={m} row {r} differs from the row alone");
            }
        }
    }
    Ok(())
}

#[test]
fn prepacked_panels_equal_the_panel_kernel_and_keep_rows_invariant() -> TestResult {
    if level() < Level::Avx512 {
        for dtype in DTYPES {
            assert!(super::prepack(dtype, &weights(dtype, 16, 64, 1)?.0, 16, 64).is_none());
        }
        return Ok(());
    }
    // k = 96: 3 blocks. n = 37: a pair of panels and a partial odd one; 20: a pair whose second
    // panel is partial; 64: two whole pairs.
    let k = 96;
    for (i, (dtype, n)) in DTYPES.into_iter().flat_map(|d| [(d, 37), (d, 20), (d, 64)]).enumerate() {
        let (raw, _) = weights(dtype, n, k, 20 + i as u64)?;
        let packed = super::prepack(dtype, &raw, n, k).ok_or("the format packs with AVX-512")?;
        let m = 11;
        let lhs = values(m * k, 40 + i as u64);
        // Against the panel kernel packing per call (m >= 4): the same bits.
        let (mut want, mut got) = (vec![0f32; m * n], vec![0f32; m * n]);
        matmul(dtype, &raw, m, k, n, &lhs, &mut want)?;
        super::matmul_prepacked(&packed, m, &lhs, &mut got)?;
        assert_eq!(got, want, "{dtype:?}");
        // Each row alone: the same bits again.
        for t in 0..m {
            let mut one = vec![0f32; n];
            super::matmul_prepacked(&packed, 1, &lhs[t * k..(t + 1) * k], &mut one)?;
            assert_eq!(one, &got[t * n..(t + 1) * n], "{dtype:?} row {t}");
        }
        // Bad sizes are errors, not panics.
        assert!(super::matmul_prepacked(&packed, 2, &lhs[..k], &mut got[..2 * n]).is_err());
    }
    // A type without a panel kernel is not packed.
    assert!(super::prepack(GgmlDType::F16, &[0; 16 * 64 * 2], 16, 64).is_none());
    Ok(())
}

#[test]
fn stacked_prepacked_weights_give_each_part_its_bits() -> TestResult {
    if level() < Level::Avx512 {
        // Nothing packs without AVX-512: stacking must refuse what is not there.
        assert!(super::prepack(GgmlDType::Q4_1, &weights(GgmlDType::Q4_1, 16, 64, 1)?.0, 16, 64).is_none());
        return Ok(());
    }
    let (k, m) = (96, 5);
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let ns = [48usize, 16, 32];
        let packed: Vec<_> = ns
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                super::prepack(dtype, &weights(dtype, n, k, 10 + i as u64).unwrap().0, n, k).unwrap()
            })
            .collect();
        let stacked = super::concat_prepacked(&packed.iter().collect::<Vec<_>>()).ok_or("stacks")?;
        let total: usize = ns.iter().sum();
        assert_eq!(stacked.shape(), (total, k));
        let lhs = values(m * k, 77);
        let mut all = vec![0f32; m * total];
        super::matmul_prepacked(&stacked, m, &lhs, &mut all)?;
        let mut col = 0;
        for (p, &n) in packed.iter().zip(&ns) {
            let mut one = vec![0f32; m * n];
            super::matmul_prepacked(p, m, &lhs, &mut one)?;
            for t in 0..m {
                assert_eq!(
                    &all[t * total + col..t * total + col + n],
                    &one[t * n..(t + 1) * n],
                    "{dtype:?} row {t}"
                );
            }
            col += n;
        }
        // A part that does not fill whole panels, or another k, is refused.
        let odd = super::prepack(dtype, &weights(dtype, 20, k, 3)?.0, 20, k).ok_or("packs")?;
        assert!(super::concat_prepacked(&[&packed[0], &odd]).is_none());
        let other_k = super::prepack(dtype, &weights(dtype, 16, 64, 4)?.0, 16, 64).ok_or("packs")?;
        assert!(super::concat_prepacked(&[&packed[0], &other_k]).is_none());
    }
    Ok(())
}

const K_DTYPES: [GgmlDType; 3] = [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K];

/// [`candle_generic`] for the K-quants (candle's `q8_K` dot products, as llama.cpp's).
fn candle_k_reference(
    dtype: GgmlDType,
    bytes: &[u8],
    m: usize,
    k: usize,
    n: usize,
    lhs: &[f32],
) -> candle_core::Result<Vec<f32>> {
    match dtype {
        GgmlDType::Q4K => candle_generic::<k_quants::BlockQ4K>(bytes, m, k, n, lhs),
        GgmlDType::Q5K => candle_generic::<k_quants::BlockQ5K>(bytes, m, k, n, lhs),
        _ => candle_generic::<k_quants::BlockQ6K>(bytes, m, k, n, lhs),
    }
}

/// The superblock decoder reads every value, scale and minimum where ggml puts them: its
/// values times scales give candle's dequantized weights, bit for bit.
#[cfg(target_arch = "x86_64")]
#[test]
fn k_quant_superblocks_decode_as_candle_dequantizes() -> TestResult {
    use super::kquant;
    for (i, dtype) in K_DTYPES.into_iter().enumerate() {
        let (n, k) = (3, 512);
        let (bytes, q) = weights(dtype, n, k, 90 + i as u64)?;
        let want = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let format = match dtype {
            GgmlDType::Q4K => kquant::Q4_K,
            GgmlDType::Q5K => kquant::Q5_K,
            _ => kquant::Q6_K,
        };
        let sbb = kquant::superblock_bytes(format);
        assert_eq!(bytes.len(), n * k / 256 * sbb);
        for (u, blk) in bytes.chunks_exact(sbb).enumerate() {
            let dec = kquant::decode(format, blk);
            for j in 0..256 {
                let got = if format == kquant::Q6_K {
                    dec.d * (dec.sc[j / 16] as i8) as f32 * (dec.q[j] as i32 - 32) as f32
                } else {
                    dec.d * dec.sc[j / 32] as f32 * dec.q[j] as f32 - dec.dmin * dec.mn[j / 32] as f32
                };
                assert_eq!(got.to_bits(), want[u * 256 + j].to_bits(), "{dtype:?} superblock {u} value {j}");
            }
        }
    }
    Ok(())
}

/// K-quant panels give candle's (llama.cpp's) products up to float summation order, every row
/// has the bits it has alone, the AVX2 kernel gives the AVX-512 kernel's bits, and the panels
/// stack like the legacy ones.
#[test]
fn k_quant_panels_match_candle_and_keep_rows_invariant() -> TestResult {
    if level() < Level::Avx2 {
        for dtype in K_DTYPES {
            assert!(super::prepack(dtype, &weights(dtype, 16, 256, 1)?.0, 16, 256).is_none());
            assert!(!super::packs(dtype));
        }
        return Ok(());
    }
    let caps: Vec<Level> = [Level::Avx512, Level::Avx2].into_iter().filter(|&c| c <= level()).collect();
    let mut worst = 0f64;
    // n = 37: a pair of panels and a partial odd one; 20: a pair whose second panel is
    // partial; 64: two whole pairs; 16: one panel.
    for (i, dtype) in K_DTYPES.into_iter().enumerate() {
        assert!(super::packs(dtype));
        for (si, &(k, n)) in [(256, 37), (768, 20), (512, 64), (1536, 16)].iter().enumerate() {
            let (bytes, q) = weights(dtype, n, k, (i * 7 + si) as u64 + 300)?;
            let w = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            let packed = super::prepack(dtype, &bytes, n, k).ok_or("K-quants pack with AVX2")?;
            assert_eq!(packed.shape(), (n, k));
            for m in [1, 2, 3, 5, 9, 13] {
                let lhs = values(m * k, (m * 13 + si) as u64 + 2000);
                let want = candle_k_reference(dtype, &bytes, m, k, n, &lhs)?;
                let mut first: Option<Vec<f32>> = None;
                for &cap in &caps {
                    let mut got = vec![f32::NAN; m * n];
                    super::matmul_prepacked_at(cap, &packed, m, &lhs, &mut got)?;
                    let e = rel_err(&got, &want, &lhs, &w, k);
                    assert!(e <= TOL, "{dtype:?} {cap:?} m={m} k={k} n={n}: error vs candle {e:e}");
                    worst = worst.max(e);
                    for t in 0..m {
                        let mut one = vec![f32::NAN; n];
                        super::matmul_prepacked_at(cap, &packed, 1, &lhs[t * k..(t + 1) * k], &mut one)?;
                        let same =
                            one.iter().zip(&got[t * n..(t + 1) * n]).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{dtype:?} {cap:?} m={m} k={k} n={n}: row {t} differs from the row alone"
                        );
                    }
                    match &first {
                        None => first = Some(got),
                        Some(f) => assert!(
                            f.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{dtype:?} m={m} k={k} n={n}: {cap:?} differs from {:?}",
                            caps[0]
                        ),
                    }
                }
            }
        }
        // Zero activations (a superblock with no magnitude) give zeros, not NaN.
        let (bytes, _) = weights(dtype, 16, 256, 5)?;
        let packed = super::prepack(dtype, &bytes, 16, 256).ok_or("packs")?;
        let mut out = vec![f32::NAN; 16];
        super::matmul_prepacked(&packed, 1, &[0.0; 256], &mut out)?;
        assert!(out.iter().all(|&v| v == 0.0), "{dtype:?}: {out:?}");
        // Shapes that do not fit are not packed, and bad sizes are errors.
        assert!(super::prepack(dtype, &bytes, 16, 512).is_none());
        assert!(super::prepack(dtype, &bytes[..bytes.len() - 1], 16, 256).is_none());
        assert!(super::matmul_prepacked(&packed, 2, &[0.0; 256], &mut out).is_err());
        // Stacked with another packing of the same format: each part keeps its bits.
        let (other, _) = weights(dtype, 32, 256, 6)?;
        let other = super::prepack(dtype, &other, 32, 256).ok_or("packs")?;
        let stacked = super::concat_prepacked(&[&packed, &other]).ok_or("stacks")?;
        let lhs = values(3 * 256, 8);
        let mut all = vec![0f32; 3 * 48];
        super::matmul_prepacked(&stacked, 3, &lhs, &mut all)?;
        let (mut a, mut b) = (vec![0f32; 3 * 16], vec![0f32; 3 * 32]);
        super::matmul_prepacked(&packed, 3, &lhs, &mut a)?;
        super::matmul_prepacked(&other, 3, &lhs, &mut b)?;
        for t in 0..3 {
            assert_eq!(&all[t * 48..t * 48 + 16], &a[t * 16..(t + 1) * 16]);
            assert_eq!(&all[t * 48 + 16..(t + 1) * 48], &b[t * 32..(t + 1) * 32]);
        }
        // Another format is never stacked with it.
        if level() >= Level::Avx512 {
            let q4_0 = super::prepack(GgmlDType::Q4_0, &weights(GgmlDType::Q4_0, 16, 256, 7)?.0, 16, 256)
                .ok_or("packs")?;
            assert!(super::concat_prepacked(&[&packed, &q4_0]).is_none());
        }
    }
    eprintln!("K-quants: worst error relative to |x||w|: {worst:e}");
    Ok(())
}
