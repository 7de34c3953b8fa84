//! SIMD quantized matrix multiply for the GGUF 32-value block formats on the CPU.
//!
//! # What
//!
//! [`matmul`] computes `dst[m×n] = lhs[m×k] · Wᵀ`, where `lhs` is row-major `f32` and `W` is `n`
//! rows of `k` values stored as raw GGUF blocks (the exact byte layout of ggml and candle, so a
//! memory-mapped tensor can be passed as is). It replaces candle's scalar `Q4_1`/`Q5_0`/`Q5_1`
//! (and its `Q4_0`/`Q8_0` single-row AVX2) dot products with multi-row AVX2 / AVX-512 VNNI kernels.
//! The K-quants `Q4_K`, `Q5_K` and `Q6_K` (256-value superblocks) are decoded at load into the
//! same panels ([`prepack`], see `kquant`), run with AVX-512 or AVX2; without AVX2 they stay on
//! candle's paths.
//!
//! # Layouts (ggml, little endian, 32 values per block)
//!
//! | type   | bytes | layout                                   | value `x_j`                    |
//! |--------|-------|------------------------------------------|--------------------------------|
//! | `Q4_0` | 18    | `f16 d`, `[u8; 16] qs`                   | `(q_j - 8) · d`                |
//! | `Q4_1` | 20    | `f16 d`, `f16 m`, `[u8; 16] qs`          | `q_j · d + m`                  |
//! | `Q5_0` | 22    | `f16 d`, `u32 qh`, `[u8; 16] qs`         | `(q_j - 16) · d`               |
//! | `Q5_1` | 24    | `f16 d`, `f16 m`, `u32 qh`, `[u8; 16] qs`| `q_j · d + m`                  |
//! | `Q8_0` | 34    | `f16 d`, `[i8; 32] qs`                   | `q_j · d`                      |
//!
//! For the 4- and 5-bit types, the low nibbles of `qs[0..16]` are values `0..16` and the high
//! nibbles values `16..32`; for the 5-bit types bit `j` of `qh` is bit 4 of value `j`.
//!
//! # Numerics
//!
//! As in ggml, each activation row is first quantized per 32-block to 8 bits
//! (`quantize_row_q8_0`: `d = amax / 127`, `q = round(x / d)`, `d` stored as `f16`; for `Q4_1` and
//! `Q5_1` also `s = d · Σq` as in `quantize_row_q8_1`, rounded like candle's `BlockQ8_1`). Each
//! block pair is then an exact integer dot product scaled in `f32`, so results match candle's
//! generic quantized matmul (and llama.cpp) up to float summation order.
//!
//! # Dispatch
//!
//! The instruction set is detected once at run time ([`Level`], cached in a `OnceLock`):
//! AVX-512 (F, BW, VL, VNNI: `vpdpbusd` on 256-bit vectors, with 32 registers for bigger tiles),
//! else AVX2 + FMA + F16C (`vpmaddubsw`/`vpmaddwd`), else portable scalar code. AMX is never used.
//! Work is split over output columns (weight rows) on candle's persistent barrier pool, and the
//! activations are quantized once per call into thread-local scratch (no per-call allocation
//! once warm). Decode (`m == 1`) streams every weight row once, 4 rows at a time sharing the
//! activation loads. Prefill is weight-stationary: with AVX-512 and `m >= 4`, each panel of 16
//! weight rows is unpacked once into a thread-local buffer interleaved so that one 512-bit
//! `vpdpbusd` multiplies 4 values of all 16 rows with 4 broadcast activation values, and is then
//! swept over all `m` activation rows, 8 at a time; otherwise (AVX2, or `m < 4`) tiles of 4
//! weight rows × up to 4 (AVX-512) or 2 (AVX2) activation rows decode each weight block once per
//! tile, swept over tiles of 16 activation rows.
//!
//! With AVX-512, `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1` and `Q8_0` weights are also packed into those panels once, at
//! load ([`prepack`], [`matmul_prepacked`]; 4-bit values stay nibbles and scales `f16`, so a
//! packed matrix has the file's size): then every product, decode and prefill, batch 1 or 64,
//! runs the panel kernel with no per-call unpacking, and each output row has the bits it has
//! alone.

use std::cell::RefCell;
use std::fmt;
use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;

#[cfg(target_arch = "x86_64")]
mod kquant;
mod q8;
mod scalar;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Values per quantization block, for every format handled here.
const QK: usize = 32;

/// Format code of `Q4_0` weights (const generic parameter of the kernels).
const Q4_0: u8 = 0;
/// Format code of `Q4_1` weights.
const Q4_1: u8 = 1;
/// Format code of `Q5_0` weights.
const Q5_0: u8 = 2;
/// Format code of `Q5_1` weights.
const Q5_1: u8 = 3;
/// Format code of `Q8_0` weights.
const Q8_0: u8 = 4;

/// Bytes of one 32-value block of format `f`.
const fn block_bytes(f: u8) -> usize {
    match f {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        Q5_1 => 24,
        _ => 34,
    }
}

/// Whether format `f` has a per-block minimum `m` (and so uses `q8_1` activations with `s`).
const fn has_min(f: u8) -> bool {
    matches!(f, Q4_1 | Q5_1)
}

/// Format code for a GGUF dtype, if handled here.
fn format_of(dtype: GgmlDType) -> Option<u8> {
    match dtype {
        GgmlDType::Q4_0 => Some(Q4_0),
        GgmlDType::Q4_1 => Some(Q4_1),
        GgmlDType::Q5_0 => Some(Q5_0),
        GgmlDType::Q5_1 => Some(Q5_1),
        GgmlDType::Q8_0 => Some(Q8_0),
        _ => None,
    }
}

/// Why [`matmul`] refused its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KernelError {
    /// The weight type has no kernel here (only `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0` do).
    Unsupported(GgmlDType),
    /// `k` is not a multiple of the 32-value block size.
    KNotBlockMultiple {
        /// The inner dimension given.
        k: usize,
    },
    /// A buffer length does not match the shape.
    Len {
        /// Which buffer: `"weights"`, `"lhs"` or `"dst"`.
        what: &'static str,
        /// Length implied by `m`, `k`, `n` and the dtype.
        expected: usize,
        /// Length given.
        got: usize,
    },
    /// `m`, `k` or `n` are so large that a buffer length overflows `usize`.
    Overflow,
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unsupported(dtype) => write!(f, "no quantized CPU kernel for {dtype:?} weights"),
            Self::KNotBlockMultiple { k } => {
                write!(f, "inner dimension k = {k} is not a multiple of the block size {QK}")
            }
            Self::Len { what, expected, got } => {
                write!(f, "{what} has {got} elements, the shape needs {expected}")
            }
            Self::Overflow => write!(f, "matmul shape overflows usize"),
        }
    }
}

impl std::error::Error for KernelError {}

/// Instruction-set level of the kernels, ordered from least to most capable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    /// Portable scalar code.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL/VNNI (plus AVX2 + FMA + F16C).
    Avx512,
}

/// The best level this CPU supports, detected once, capped by the environment variable
/// `SHOAL_CPU` (`avx2` or `scalar`: to compare the paths on one machine, or to avoid an
/// instruction set; a level the CPU lacks is never used, and other values are ignored).
pub(crate) fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("SHOAL_CPU").as_deref() {
            Ok("scalar") => Level::Scalar,
            Ok("avx2") => Level::Avx2,
            _ => Level::Avx512,
        };
        detect().min(cap)
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    let avx2 = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    let avx512 = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni");
    match (avx2, avx512) {
        (true, true) => Level::Avx512,
        (true, false) => Level::Avx2,
        _ => Level::Scalar,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Scalar
}

/// Whether [`matmul`] has a SIMD fast path for weights of this type on this CPU.
///
/// [`matmul`] also accepts the same types without one (through portable scalar code, which is no
/// faster than candle's own), so callers should only route to it when this is true.
pub(crate) fn supports(dtype: GgmlDType) -> bool {
    format_of(dtype).is_some() && level() >= Level::Avx2
}

/// `dst[m*n] = lhs[m*k] · Wᵀ`, where `W` is `n` rows × `k` values stored as raw GGUF blocks of
/// `dtype` (row-major, each row `k / 32` blocks), `lhs` and `dst` row-major `f32`.
///
/// Runs on candle's barrier pool with the best kernels for this CPU. Errors, without touching
/// `dst`, when `dtype` is not one of `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0` or a buffer length
/// does not match the shape; never panics on bad sizes.
pub(crate) fn matmul(
    dtype: GgmlDType,
    weights: &[u8],
    m: usize,
    k: usize,
    n: usize,
    lhs: &[f32],
    dst: &mut [f32],
) -> Result<(), KernelError> {
    matmul_impl(level(), false, dtype, weights, m, k, n, lhs, dst)
}

/// [`matmul`] where every output row has exactly the bits it would have with that row alone
/// (`m == 1`): the rows are independent sessions batched together, and a session's result
/// must not depend on who it was batched with (a failover replays it alone). The row-tile
/// kernels have this property; the AVX-512 panel kernels (faster for prefill) sum in another
/// order and are not used.
pub(crate) fn matmul_row_invariant(
    dtype: GgmlDType,
    weights: &[u8],
    m: usize,
    k: usize,
    n: usize,
    lhs: &[f32],
    dst: &mut [f32],
) -> Result<(), KernelError> {
    matmul_impl(level(), true, dtype, weights, m, k, n, lhs, dst)
}

/// `Ok` when a buffer of `got` values has the `expected` length (`None`: the shape overflows).
fn check_len(what: &'static str, expected: Option<usize>, got: usize) -> Result<(), KernelError> {
    match expected {
        None => Err(KernelError::Overflow),
        Some(expected) if expected != got => Err(KernelError::Len { what, expected, got }),
        Some(_) => Ok(()),
    }
}

/// Weights packed once, at load, for the AVX-512 panel kernel (`Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`): every
/// product then runs on panels of 16 weight rows with no per-call unpacking, at any `m`, and
/// each output row has the bits it has alone (the panel kernel sums each (row, column) over
/// the blocks in order, whatever `m` is). See [`prepack`].
///
/// K-quants (`Q4_K`, `Q5_K`, `Q6_K`) pack only this way: see `kquant`.
pub(crate) struct Prepacked {
    #[cfg(target_arch = "x86_64")]
    inner: Packing,
    format: u8,
    n: usize,
    k: usize,
}

/// The two packings behind [`Prepacked`].
#[cfg(target_arch = "x86_64")]
enum Packing {
    /// `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`.
    Legacy(x86::Prepacked),
    /// `Q4_K`, `Q5_K`, `Q6_K`.
    K(kquant::KPacked),
}

/// Format code of a K-quant dtype packed by [`prepack`].
#[cfg(target_arch = "x86_64")]
fn k_format_of(dtype: GgmlDType) -> Option<u8> {
    match dtype {
        GgmlDType::Q4K => Some(kquant::Q4_K),
        GgmlDType::Q5K => Some(kquant::Q5_K),
        GgmlDType::Q6K => Some(kquant::Q6_K),
        _ => None,
    }
}

/// Whether [`prepack`] packs weights of this type on this CPU (shapes allowing): the legacy
/// `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0` with AVX-512, and the K-quants `Q4_K`, `Q5_K`,
/// `Q6_K` with AVX2.
pub(crate) fn packs(dtype: GgmlDType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        (level() >= Level::Avx2 && k_format_of(dtype).is_some())
            || (level() >= Level::Avx512 && format_of(dtype).is_some())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = dtype;
        false
    }
}

/// Packs `n` weight rows of `k` values of `dtype` when this CPU has a panel kernel for it (see
/// [`packs`]; `k` a multiple of the block size); `None` otherwise (use [`matmul`] for the other
/// legacy types, candle for the rest).
pub(crate) fn prepack(dtype: GgmlDType, weights: &[u8], n: usize, k: usize) -> Option<Prepacked> {
    #[cfg(target_arch = "x86_64")]
    if let Some(format) = k_format_of(dtype) {
        if level() < Level::Avx2 || k == 0 || !k.is_multiple_of(kquant::QK_K) {
            return None;
        }
        let nsb = k / kquant::QK_K;
        if weights.len() != n.checked_mul(nsb * kquant::superblock_bytes(format))? {
            return None;
        }
        let inner = match format {
            kquant::Q4_K => kquant::prepack::<{ kquant::Q4_K }>(weights, n, nsb),
            kquant::Q5_K => kquant::prepack::<{ kquant::Q5_K }>(weights, n, nsb),
            _ => kquant::prepack::<{ kquant::Q6_K }>(weights, n, nsb),
        };
        return Some(Prepacked { inner: Packing::K(inner), format, n, k });
    }
    let format = format_of(dtype)?;
    if level() < Level::Avx512 || k == 0 || !k.is_multiple_of(QK) {
        return None;
    }
    if weights.len() != n.checked_mul(k / QK * block_bytes(format))? {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let inner = match format {
            Q4_0 => x86::prepack::<Q4_0>(weights, n, k / QK),
            Q4_1 => x86::prepack::<Q4_1>(weights, n, k / QK),
            Q5_0 => x86::prepack::<Q5_0>(weights, n, k / QK),
            Q5_1 => x86::prepack::<Q5_1>(weights, n, k / QK),
            _ => x86::prepack::<Q8_0>(weights, n, k / QK),
        };
        Some(Prepacked { inner: Packing::Legacy(inner), format, n, k })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (weights, n);
        None
    }
}

/// The weights of several matrices of `k` columns stacked as one, rows of the first, then of
/// the next (`q`, `k`, `v` as one projection): each output column keeps its bits, as it comes
/// from its own panel. `None` unless every part has the same format and `k` and a row count
/// that fills whole panels.
pub(crate) fn concat_prepacked(parts: &[&Prepacked]) -> Option<Prepacked> {
    let first = parts.first()?;
    if parts.iter().any(|p| p.format != first.format || p.k != first.k || !p.n.is_multiple_of(PANEL)) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let inner = match &first.inner {
            Packing::Legacy(_) => {
                let legacy: Vec<&x86::Prepacked> = parts
                    .iter()
                    .map(|p| match &p.inner {
                        Packing::Legacy(l) => Some(l),
                        Packing::K(_) => None,
                    })
                    .collect::<Option<_>>()?;
                let cat = |f: &dyn Fn(&x86::Prepacked) -> &[u32]| {
                    legacy.iter().flat_map(|p| f(p).iter().copied()).collect()
                };
                let cat16 = |f: &dyn Fn(&x86::Prepacked) -> &[u16]| {
                    legacy.iter().flat_map(|p| f(p).iter().copied()).collect()
                };
                Packing::Legacy(x86::Prepacked {
                    qs: cat(&|p| &p.qs),
                    d: cat16(&|p| &p.d),
                    m: cat16(&|p| &p.m),
                    qh: cat(&|p| &p.qh),
                })
            }
            Packing::K(_) => {
                let k: Vec<&kquant::KPacked> = parts
                    .iter()
                    .map(|p| match &p.inner {
                        Packing::K(k) => Some(k),
                        Packing::Legacy(_) => None,
                    })
                    .collect::<Option<_>>()?;
                Packing::K(kquant::KPacked::concat(&k))
            }
        };
        Some(Prepacked { inner, format: first.format, n: parts.iter().map(|p| p.n).sum(), k: first.k })
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

impl Prepacked {
    /// Output columns (weight rows) and inner dimension: `(n, k)`.
    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }
}

/// `dst[m*n] = lhs[m*k] · Wᵀ` on prepacked weights (see [`Prepacked`]).
pub(crate) fn matmul_prepacked(
    w: &Prepacked,
    m: usize,
    lhs: &[f32],
    dst: &mut [f32],
) -> Result<(), KernelError> {
    matmul_prepacked_impl(level(), w, m, lhs, dst)
}

/// [`matmul_prepacked`] with the instruction-set level capped at `cap` (see [`matmul_at`]).
#[cfg(test)]
pub(crate) fn matmul_prepacked_at(
    cap: Level,
    w: &Prepacked,
    m: usize,
    lhs: &[f32],
    dst: &mut [f32],
) -> Result<(), KernelError> {
    matmul_prepacked_impl(cap.min(level()), w, m, lhs, dst)
}

fn matmul_prepacked_impl(
    level: Level,
    w: &Prepacked,
    m: usize,
    lhs: &[f32],
    dst: &mut [f32],
) -> Result<(), KernelError> {
    let (n, k) = (w.n, w.k);
    check_len("lhs", m.checked_mul(k), lhs.len())?;
    check_len("dst", m.checked_mul(n), dst.len())?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    {
        let inner = match &w.inner {
            Packing::Legacy(inner) => inner,
            Packing::K(packed) => {
                matmul_k(packed, w.format, level >= Level::Avx512, m, n, k, lhs, dst);
                return Ok(());
            }
        };
        let kernels = Kernels::new(Level::Avx512, w.format);
        let out = DstPtr(dst.as_mut_ptr());
        with_scratch(|scratch| {
            let acts = scratch.quantize(lhs, m, k, w.format, &kernels);
            // Work items are pairs of panels (32 columns), run together; a last odd panel alone.
            let panels = n.div_ceil(PANEL);
            candle_core::utils::barrier_pool().execute_chunked(panels.div_ceil(2), |items| {
                for item in items {
                    let pi = 2 * item;
                    let r0 = pi * PANEL;
                    // SAFETY: `prepack` checked AVX-512 and the shape; panels `pi` (and `pi + 1`
                    // when it exists) hold rows `r0..` of `n`, the `m` activation rows are
                    // quantized, and each item writes only its own columns of `dst` (`m × n`).
                    unsafe {
                        let (p, out) = (inner, out.get().add(r0));
                        if pi + 1 < panels {
                            let rows = PANEL.min(n - r0 - PANEL);
                            match w.format {
                                Q4_0 => x86::prepacked_pair::<Q4_0>(p, pi, rows, acts, m, out, n),
                                Q4_1 => x86::prepacked_pair::<Q4_1>(p, pi, rows, acts, m, out, n),
                                Q5_0 => x86::prepacked_pair::<Q5_0>(p, pi, rows, acts, m, out, n),
                                Q5_1 => x86::prepacked_pair::<Q5_1>(p, pi, rows, acts, m, out, n),
                                _ => x86::prepacked_pair::<Q8_0>(p, pi, rows, acts, m, out, n),
                            }
                        } else {
                            let rows = PANEL.min(n - r0);
                            match w.format {
                                Q4_0 => x86::prepacked_panel::<Q4_0>(p, pi, rows, acts, m, out, n),
                                Q4_1 => x86::prepacked_panel::<Q4_1>(p, pi, rows, acts, m, out, n),
                                Q5_0 => x86::prepacked_panel::<Q5_0>(p, pi, rows, acts, m, out, n),
                                Q5_1 => x86::prepacked_panel::<Q5_1>(p, pi, rows, acts, m, out, n),
                                _ => x86::prepacked_panel::<Q8_0>(p, pi, rows, acts, m, out, n),
                            }
                        }
                    }
                }
            });
        });
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (lhs, dst);
        Err(KernelError::Unsupported(GgmlDType::Q4_0))
    }
}

/// [`matmul_prepacked`] on K-quant panels (shapes checked by the caller), with the AVX-512
/// kernel or the AVX2 one.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn matmul_k(
    w: &kquant::KPacked,
    format: u8,
    avx512: bool,
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    dst: &mut [f32],
) {
    let out = DstPtr(dst.as_mut_ptr());
    with_scratch(|scratch| {
        let acts = scratch.quantize_k(lhs, m, k, format);
        // Work items are pairs of panels (32 columns), run together; a last odd panel alone.
        let panels = n.div_ceil(PANEL);
        candle_core::utils::barrier_pool().execute_chunked(panels.div_ceil(2), |items| {
            for item in items {
                let pi = 2 * item;
                let r0 = pi * PANEL;
                let pair = pi + 1 < panels;
                let rows = if pair { PANEL.min(n - r0 - PANEL) } else { PANEL.min(n - r0) };
                // SAFETY: `prepack` checked AVX2 and the shape, and `avx512` is set only when
                // the CPU has it; panels `pi` (and `pi + 1` with `pair`) hold rows `r0..` of
                // `n`, the `m` activation rows are quantized per superblock for `format`, and
                // each item writes only its own columns.
                unsafe {
                    let out = out.get().add(r0);
                    match (format, avx512) {
                        (kquant::Q4_K, true) => {
                            kquant::panels::<{ kquant::Q4_K }>(w, pi, pair, rows, acts, m, out, n)
                        }
                        (kquant::Q5_K, true) => {
                            kquant::panels::<{ kquant::Q5_K }>(w, pi, pair, rows, acts, m, out, n)
                        }
                        (_, true) => kquant::panels::<{ kquant::Q6_K }>(w, pi, pair, rows, acts, m, out, n),
                        (kquant::Q4_K, false) => {
                            kquant::panels_avx2::<{ kquant::Q4_K }>(w, pi, pair, rows, acts, m, out, n)
                        }
                        (kquant::Q5_K, false) => {
                            kquant::panels_avx2::<{ kquant::Q5_K }>(w, pi, pair, rows, acts, m, out, n)
                        }
                        (_, false) => {
                            kquant::panels_avx2::<{ kquant::Q6_K }>(w, pi, pair, rows, acts, m, out, n)
                        }
                    }
                }
            }
        });
    });
}

/// [`matmul`] with the instruction-set level capped at `cap` (used to test and benchmark every
/// path on one machine); levels the CPU lacks are never used.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_at(
    cap: Level,
    dtype: GgmlDType,
    weights: &[u8],
    m: usize,
    k: usize,
    n: usize,
    lhs: &[f32],
    dst: &mut [f32],
) -> Result<(), KernelError> {
    matmul_impl(cap, false, dtype, weights, m, k, n, lhs, dst)
}

#[allow(clippy::too_many_arguments)]
fn matmul_impl(
    cap: Level,
    row_invariant: bool,
    dtype: GgmlDType,
    weights: &[u8],
    m: usize,
    k: usize,
    n: usize,
    lhs: &[f32],
    dst: &mut [f32],
) -> Result<(), KernelError> {
    let format = format_of(dtype).ok_or(KernelError::Unsupported(dtype))?;
    if !k.is_multiple_of(QK) {
        return Err(KernelError::KNotBlockMultiple { k });
    }
    let nb = k / QK;
    let row_bytes = nb * block_bytes(format);
    check_len("weights", n.checked_mul(row_bytes), weights.len())?;
    check_len("lhs", m.checked_mul(k), lhs.len())?;
    check_len("dst", m.checked_mul(n), dst.len())?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        dst.fill(0.0);
        return Ok(());
    }
    let kernels = Kernels::new(cap.min(level()), format);
    with_scratch(|scratch| {
        let acts = scratch.quantize(lhs, m, k, format, &kernels);
        run(&kernels, row_invariant, weights, row_bytes, acts, m, n, dst);
    });
    Ok(())
}

/// Quantized activation rows (`m` rows of `k` values) as the micro-kernels read them.
///
/// Row `t`, block `b`: values at `qs + t*k + 32*b`, scale at `d + t*nb + b`; the optional
/// per-block terms `s` (`s / 8`, for formats with a minimum) and `corr` (`-offset · Σq`, for
/// kernels that work on unsigned weights) use the same indexing as `d`.
#[derive(Clone, Copy)]
struct Acts {
    /// 8-bit values, row-major.
    qs: *const i8,
    /// Per-block scales (`f16`-rounded, widened).
    d: *const f32,
    /// Per-block `s / 8` with `s = d · Σq` (as an `f16`); only valid for formats with a minimum.
    s8: *const f32,
    /// Per-block `-offset · Σq`; only valid when the kernels have a nonzero offset. For `Q6_K`
    /// one per 16-value half.
    corr: *const i32,
    /// Entries of `corr` per row (`nb`, or `2 · nb` for `Q6_K`; 0 when there are none).
    corr_row: usize,
    /// Values per row.
    k: usize,
    /// Blocks per row.
    nb: usize,
}

// SAFETY: `Acts` points into a scratch buffer that outlives the pool call using it and is only
// read while the workers run.
unsafe impl Send for Acts {}
// SAFETY: as above, shared read-only.
unsafe impl Sync for Acts {}

impl Acts {
    /// The same view starting at activation row `t`.
    ///
    /// # Safety
    /// `t` must be a row of the buffers.
    unsafe fn row(self, t: usize) -> Self {
        // SAFETY: the caller guarantees `t` is in bounds.
        unsafe {
            Self {
                qs: self.qs.add(t * self.k),
                d: self.d.add(t * self.nb),
                s8: self.s8.add(t * self.nb),
                corr: self.corr.add(t * self.corr_row),
                ..self
            }
        }
    }
}

/// A micro-kernel computing an `R × T` tile (`R` weight rows, `T` activation rows, fixed per
/// function): `dst[t*ldd + r] = Σ_k W[r] · lhs[t]`.
///
/// # Safety
/// `w` must point to `R` rows of `row_bytes` bytes of `acts.nb` blocks each, `acts` to `T` valid
/// rows and `dst` to a buffer where every `t*ldd + r` is in bounds and written by no one else.
type TileFn = unsafe fn(w: *const u8, row_bytes: usize, acts: Acts, dst: *mut f32, ldd: usize);

/// A prefill kernel computing `rows <= PANEL` weight rows against all `m` activation rows:
/// `dst[t*ldd + r] = Σ_k W[r] · lhs[t]`.
///
/// # Safety
/// `w` must point to `rows` rows of `row_bytes` bytes of `acts.nb` blocks each, `acts` to `m`
/// valid rows and `dst` to a buffer where every `t*ldd + r` is in bounds and written by no one
/// else.
type PanelFn =
    unsafe fn(w: *const u8, row_bytes: usize, rows: usize, acts: Acts, m: usize, dst: *mut f32, ldd: usize);

/// Weight rows per prefill panel (one 512-bit vector of `i32`/`f32` lanes).
const PANEL: usize = 16;
/// Smallest `m` for which the panel kernels (when present) beat the row-tile kernels.
const PANEL_MIN_M: usize = 4;

/// The micro-kernels of one (level, format) pair.
struct Kernels {
    /// Weight rows of the main kernels.
    r: usize,
    /// `main[t - 1]` computes `r × t` tiles.
    main: [TileFn; 4],
    /// `tail[t - 1]` computes `1 × t` tiles (leftover weight rows).
    tail: [TileFn; 4],
    /// Tile activation rows (`1..=4`).
    t_max: usize,
    /// Offset of the unsigned weight values the kernels use (`corr` term), 0 when none.
    offset: i32,
    /// Whether the activations may be quantized with AVX2.
    simd: bool,
    /// Prefill kernel on packed panels of [`PANEL`] weight rows, if this level has one.
    panel: Option<PanelFn>,
}

impl Kernels {
    fn new(level: Level, format: u8) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if level >= Level::Avx2 {
                return x86::kernels(level, format);
            }
        }
        let _ = level;
        scalar::kernels(format)
    }
}

/// Thread-local buffers of the quantized activations, reused across calls.
#[derive(Default)]
struct Scratch {
    qs: Vec<i8>,
    d: Vec<f32>,
    s8: Vec<f32>,
    corr: Vec<i32>,
}

/// Runs `f` on this thread's scratch buffers (or on fresh ones if they are already in use).
fn with_scratch(f: impl FnOnce(&mut Scratch)) {
    thread_local! {
        static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    }
    let mut f = Some(f);
    SCRATCH.with(|cell| {
        if let Ok(mut scratch) = cell.try_borrow_mut()
            && let Some(f) = f.take()
        {
            f(&mut scratch);
        }
    });
    if let Some(f) = f {
        f(&mut Scratch::default());
    }
}

/// `*mut f32` that may cross to pool workers (each writes disjoint elements).
#[derive(Clone, Copy)]
struct DstPtr(*mut f32);
// SAFETY: workers write disjoint elements of the destination, which outlives the pool call.
unsafe impl Send for DstPtr {}
// SAFETY: as above.
unsafe impl Sync for DstPtr {}

impl DstPtr {
    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl Scratch {
    /// Quantizes `m` rows of `k` values of `lhs` (`k` a nonzero multiple of 32) into the buffers.
    fn quantize(&mut self, lhs: &[f32], m: usize, k: usize, format: u8, kernels: &Kernels) -> Acts {
        let (offset, simd) = (kernels.offset, kernels.simd);
        let corr_row = if offset != 0 { k / QK } else { 0 };
        self.quantize_rows(lhs, m, k, has_min(format), corr_row, &|x, out| {
            q8::quantize_row(x, out, offset, simd)
        })
    }

    /// Quantizes `m` rows of `k` values of `lhs` (`k` a nonzero multiple of 256) per superblock
    /// for K-quant weights of `format` (see `kquant`): the block sums for a minimum, the
    /// per-half corrections for `Q6_K`.
    #[cfg(target_arch = "x86_64")]
    fn quantize_k(&mut self, lhs: &[f32], m: usize, k: usize, format: u8) -> Acts {
        let with_s = kquant::has_min(format);
        let corr_row = if with_s { 0 } else { 2 * k / QK };
        self.quantize_rows(lhs, m, k, with_s, corr_row, &|x, out| {
            q8::quantize_row_k(x, out, kquant::Q6_K_OFFSET)
        })
    }

    /// Sizes the buffers for `m` rows of `k` values (with `s8` when `with_s`, and `corr_row`
    /// corrections per row, none when 0) and fills them row by row with `quantize_row`, on
    /// the pool when there are many.
    fn quantize_rows(
        &mut self,
        lhs: &[f32],
        m: usize,
        k: usize,
        with_s: bool,
        corr_row: usize,
        quantize_row: &(dyn Fn(&[f32], q8::RowOut<'_>) + Sync),
    ) -> Acts {
        let nb = k / QK;
        grow(&mut self.qs, m * k, 0);
        grow(&mut self.d, m * nb, 0.0);
        grow(&mut self.s8, if with_s { m * nb } else { 1 }, 0.0);
        grow(&mut self.corr, (m * corr_row).max(1), 0);
        let qs = DstPtr(self.qs.as_mut_ptr().cast());
        let d = DstPtr(self.d.as_mut_ptr());
        let s8 = DstPtr(self.s8.as_mut_ptr());
        let corr = DstPtr(self.corr.as_mut_ptr().cast());
        let acts = Acts {
            qs: qs.0.cast_const().cast(),
            d: d.0.cast_const(),
            s8: s8.0.cast_const(),
            corr: corr.0.cast_const().cast(),
            corr_row,
            k,
            nb,
        };
        let rows = |rows: std::ops::Range<usize>| {
            for t in rows {
                // SAFETY: the buffers hold `m` rows; each row is written by one worker only.
                let out = unsafe {
                    q8::RowOut {
                        qs: std::slice::from_raw_parts_mut(qs.get().cast::<i8>().add(t * k), k),
                        d: std::slice::from_raw_parts_mut(d.get().add(t * nb), nb),
                        s8: with_s.then(|| std::slice::from_raw_parts_mut(s8.get().add(t * nb), nb)),
                        corr: (corr_row != 0).then(|| {
                            std::slice::from_raw_parts_mut(
                                corr.get().cast::<i32>().add(t * corr_row),
                                corr_row,
                            )
                        }),
                    }
                };
                quantize_row(&lhs[t * k..(t + 1) * k], out);
            }
        };
        if m > 1 && m * k >= 1 << 15 {
            candle_core::utils::barrier_pool().execute_chunked(m, rows);
        } else {
            rows(0..m);
        }
        acts
    }
}

/// Grows `v` to at least `len` elements.
fn grow<T: Copy>(v: &mut Vec<T>, len: usize, fill: T) {
    if v.len() < len {
        v.resize(len, fill);
    }
}

/// Activation rows per prefill tile swept against each group of weight rows.
const PREFILL_ROWS: usize = 16;
/// Micro-kernel tiles (of `Kernels::r` weight rows) per prefill work item.
const PREFILL_GROUPS: usize = 4;

/// Computes all of `dst` (`m × n`) from quantized activations on the barrier pool.
#[allow(clippy::too_many_arguments)]
fn run(
    kernels: &Kernels,
    row_invariant: bool,
    weights: &[u8],
    row_bytes: usize,
    acts: Acts,
    m: usize,
    n: usize,
    dst: &mut [f32],
) {
    let w = weights.as_ptr() as usize;
    let dst = DstPtr(dst.as_mut_ptr());
    let r = kernels.r;
    // One tile: weight rows `r0..r0 + rc` (rc <= r) against activation rows `t0..t0 + tc`.
    let tile = |r0: usize, rc: usize, t0: usize, tc: usize| {
        // SAFETY: `r0 + rc <= n`, `t0 + tc <= m` and `1 <= tc <= t_max`, so every weight row,
        // activation row and `dst` element touched is in bounds; each (row, column) of `dst`
        // belongs to exactly one tile, and tiles are split disjointly over workers.
        unsafe {
            let acts = acts.row(t0);
            let out = dst.get().add(t0 * n + r0);
            let wrow = (w as *const u8).add(r0 * row_bytes);
            if rc == r {
                (kernels.main[tc - 1])(wrow, row_bytes, acts, out, n);
            } else {
                for i in 0..rc {
                    (kernels.tail[tc - 1])(wrow.add(i * row_bytes), row_bytes, acts, out.add(i), n);
                }
            }
        }
    };
    let pool = candle_core::utils::barrier_pool();
    if m == 1 {
        pool.execute_chunked(n.div_ceil(r), |groups| {
            for g in groups {
                let r0 = g * r;
                tile(r0, r.min(n - r0), 0, 1);
            }
        });
        return;
    }
    if let Some(panel) = kernels.panel.filter(|_| !row_invariant)
        && m >= PANEL_MIN_M
    {
        pool.execute_chunked(n.div_ceil(PANEL), |items| {
            for item in items {
                let r0 = item * PANEL;
                // SAFETY: rows `r0..r0 + rows` are in bounds, and so are the `m` activation
                // rows and the `dst` columns; each column belongs to exactly one item.
                unsafe {
                    let wrow = (w as *const u8).add(r0 * row_bytes);
                    panel(wrow, row_bytes, PANEL.min(n - r0), acts, m, dst.get().add(r0), n);
                }
            }
        });
        return;
    }
    let rows_per_item = r * PREFILL_GROUPS;
    let t_max = kernels.t_max;
    pool.execute_chunked(n.div_ceil(rows_per_item), |items| {
        for item in items {
            let r_lo = item * rows_per_item;
            let r_hi = n.min(r_lo + rows_per_item);
            for m0 in (0..m).step_by(PREFILL_ROWS) {
                let m1 = m.min(m0 + PREFILL_ROWS);
                for r0 in (r_lo..r_hi).step_by(r) {
                    for t0 in (m0..m1).step_by(t_max) {
                        tile(r0, r.min(r_hi - r0), t0, t_max.min(m1 - t0));
                    }
                }
            }
        }
    });
}
