//! x86_64 micro-kernels: AVX2 (`vpmaddubsw` + `vpmaddwd`) and AVX-512 VNNI (`vpdpbusd` on
//! 256-bit vectors, which also gives 32 vector registers for wider tiles).
//!
//! One block of a weight row is unpacked to 32 bytes in value order (4/5-bit values as unsigned
//! bytes, `Q8_0` as signed bytes, or offset by +128 for VNNI), multiplied with the 32 activation
//! bytes into 8 `i32` lanes, converted to `f32` and accumulated with the block's scale
//! `d_w · d_a` per lane. Signed formats are handled on their unsigned form with the per-block
//! correction `-offset · Σq_a` (precomputed with the activations) folded into the integer sum;
//! the `Q4_1`/`Q5_1` minimum term `m · s` is accumulated as `m · s/8` in each of the 8 lanes.
//!
//! The AVX-512 prefill path instead packs panels of 16 weight rows (see [`Panel`]) so that the
//! 16 lanes of a 512-bit `vpdpbusd` are 16 output columns, with no horizontal sums.

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::{
    Acts, Kernels, Level, PANEL, PanelFn, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, QK, TileFn, block_bytes, has_min,
    kquant,
};

/// Weight rows per main tile.
const R: usize = 4;
/// Activation rows per tile with AVX-512 (32 registers).
const T_AVX512: usize = 4;
/// Activation rows per tile with AVX2 (16 registers).
const T_AVX2: usize = 2;

/// The offset that makes format `f`'s values unsigned for the integer products (0: none).
const fn offset(f: u8, vnni: bool) -> i32 {
    match f {
        Q4_0 => 8,
        Q5_0 => 16,
        Q8_0 if vnni => 128,
        _ => 0,
    }
}

/// Kernels of `format` for `level` (`Avx2` or `Avx512`).
pub(super) fn kernels(level: Level, format: u8) -> Kernels {
    match format {
        Q4_0 => make::<Q4_0>(level),
        Q4_1 => make::<Q4_1>(level),
        Q5_0 => make::<Q5_0>(level),
        Q5_1 => make::<Q5_1>(level),
        _ => make::<Q8_0>(level),
    }
}

fn make<const F: u8>(level: Level) -> Kernels {
    if level >= Level::Avx512 {
        let main: [TileFn; 4] = [avx512::<F, R, 1>, avx512::<F, R, 2>, avx512::<F, R, 3>, avx512::<F, R, 4>];
        let tail: [TileFn; 4] = [avx512::<F, 1, 1>, avx512::<F, 1, 2>, avx512::<F, 1, 3>, avx512::<F, 1, 4>];
        let panel: PanelFn = panel::<F>;
        Kernels { r: R, main, tail, t_max: T_AVX512, offset: offset(F, true), simd: true, panel: Some(panel) }
    } else {
        let main: [TileFn; 4] = [avx2::<F, R, 1>, avx2::<F, R, 2>, avx2::<F, R, 3>, avx2::<F, R, 4>];
        let tail: [TileFn; 4] = [avx2::<F, 1, 1>, avx2::<F, 1, 2>, avx2::<F, 1, 3>, avx2::<F, 1, 4>];
        Kernels { r: R, main, tail, t_max: T_AVX2, offset: offset(F, false), simd: true, panel: None }
    }
}

/// AVX2 tile of `RR` weight rows × `T` activation rows (see [`TileFn`]).
///
/// # Safety
/// See [`TileFn`]; the CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2<const F: u8, const RR: usize, const T: usize>(
    w: *const u8,
    row_bytes: usize,
    acts: Acts,
    dst: *mut f32,
    ldd: usize,
) {
    // SAFETY: forwarded contract; the features `tile::<_, _, _, false>` uses are enabled.
    unsafe { tile::<F, RR, T, false>(w, row_bytes, acts, dst, ldd) }
}

/// AVX-512 VNNI tile of `RR` weight rows × `T` activation rows (see [`TileFn`]).
///
/// # Safety
/// See [`TileFn`]; the CPU must support AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn avx512<const F: u8, const RR: usize, const T: usize>(
    w: *const u8,
    row_bytes: usize,
    acts: Acts,
    dst: *mut f32,
    ldd: usize,
) {
    // SAFETY: forwarded contract; the features `tile::<_, _, _, true>` uses are enabled.
    unsafe { tile::<F, RR, T, true>(w, row_bytes, acts, dst, ldd) }
}

/// 32 nibbles of 16 bytes at `qs` in value order: low nibbles, then high nibbles.
#[inline(always)]
unsafe fn nibbles(qs: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes and AVX2.
    unsafe {
        let x = _mm256_broadcastsi128_si256(_mm_loadu_si128(qs.cast()));
        // shift the upper copy by 4 bits (across bytes; the mask drops what crossed)
        _mm256_and_si256(_mm256_srlv_epi64(x, _mm256_set_epi64x(4, 4, 0, 0)), _mm256_set1_epi8(0x0F))
    }
}

/// Adds bit `j` of the `u32` at `qh` as bit 4 of byte `j` of `lo`.
#[inline(always)]
unsafe fn high_bits<const VNNI: bool>(lo: __m256i, qh: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 4 readable bytes and AVX2 (AVX-512 BW/VL when `VNNI`).
    unsafe {
        let bits = qh.cast::<u32>().read_unaligned();
        if VNNI {
            _mm256_mask_add_epi8(lo, bits, lo, _mm256_set1_epi8(16))
        } else {
            // ggml's bytes_from_bits_32: byte j = 0xFF iff bit j is set
            let shuf =
                _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0);
            let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), shuf);
            let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
            let set = _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
            _mm256_or_si256(lo, _mm256_and_si256(set, _mm256_set1_epi8(16)))
        }
    }
}

/// The 32 weight bytes of the block at `blk` as used by the integer products: values plus
/// [`offset`] as unsigned bytes, or (`Q8_0` without VNNI) the raw signed values.
#[inline(always)]
unsafe fn unpack<const F: u8, const VNNI: bool>(blk: *const u8) -> __m256i {
    // SAFETY: the caller guarantees one readable block and the features.
    unsafe {
        match F {
            Q4_0 => nibbles(blk.add(2)),
            Q4_1 => nibbles(blk.add(4)),
            Q5_0 => high_bits::<VNNI>(nibbles(blk.add(6)), blk.add(2)),
            Q5_1 => high_bits::<VNNI>(nibbles(blk.add(8)), blk.add(4)),
            _ => {
                let q = _mm256_loadu_si256(blk.add(2).cast());
                if VNNI { _mm256_xor_si256(q, _mm256_set1_epi8(-128)) } else { q }
            }
        }
    }
}

/// The `f16` at `p` widened and broadcast to 8 lanes.
#[inline(always)]
unsafe fn f16_splat(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 2 readable bytes and F16C.
    unsafe { _mm256_cvtph_ps(_mm_set1_epi16(p.cast::<i16>().read_unaligned())) }
}

/// Sum of the 8 lanes.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: the caller guarantees AVX.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// The generic tile body, inlined into the `#[target_feature]` entry points.
///
/// # Safety
/// See [`TileFn`]; AVX2/FMA/F16C, plus AVX-512 F/BW/VL/VNNI when `VNNI`.
#[inline(always)]
unsafe fn tile<const F: u8, const RR: usize, const T: usize, const VNNI: bool>(
    w: *const u8,
    row_bytes: usize,
    a: Acts,
    dst: *mut f32,
    ldd: usize,
) {
    let bb = block_bytes(F);
    let off = offset(F, VNNI);
    let min = has_min(F);
    // SAFETY: the caller guarantees `RR` weight rows and `T` activation rows of `a.nb` blocks,
    // the scale buffers this format uses, and the `dst` elements.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); T]; RR];
        for b in 0..a.nb {
            let mut av = [_mm256_setzero_si256(); T];
            let mut da = [_mm256_setzero_ps(); T];
            let mut corr = [_mm256_setzero_si256(); T];
            let mut s8 = [_mm256_setzero_ps(); T];
            for t in 0..T {
                let at = t * a.nb + b;
                av[t] = _mm256_loadu_si256(a.qs.add(t * a.k + b * QK).cast());
                da[t] = _mm256_broadcast_ss(&*a.d.add(at));
                if off != 0 {
                    corr[t] = _mm256_zextsi128_si256(_mm_cvtsi32_si128(*a.corr.add(at)));
                }
                if min {
                    s8[t] = _mm256_broadcast_ss(&*a.s8.add(at));
                }
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let blk = w.add(r * row_bytes + b * bb);
                let wv = unpack::<F, VNNI>(blk);
                let dw = f16_splat(blk);
                let mw = if min { f16_splat(blk.add(2)) } else { _mm256_setzero_ps() };
                let signed = F == Q8_0 && !VNNI;
                let wu = if signed { _mm256_sign_epi8(wv, wv) } else { wv };
                for t in 0..T {
                    let p = if VNNI {
                        _mm256_dpbusd_epi32(corr[t], wu, av[t])
                    } else {
                        let at = if signed { _mm256_sign_epi8(av[t], wv) } else { av[t] };
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, at), ones);
                        if off != 0 { _mm256_add_epi32(p, corr[t]) } else { p }
                    };
                    let scale = _mm256_mul_ps(dw, da[t]);
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[t]);
                    if min {
                        acc[t] = _mm256_fmadd_ps(mw, s8[t], acc[t]);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (t, acc) in acc.iter().enumerate() {
                *dst.add(t * ldd + r) = hsum(*acc);
            }
        }
    }
}

/// Activation rows per panel micro-kernel call.
const PANEL_T: usize = 8;

/// A packed panel of up to [`PANEL`] weight rows: for block `b`, 4-value group `g` and row `r`,
/// the 4 unpacked (offset, unsigned) weight bytes at `qs[(b*8 + g)*16 + r]`; scales `d[b*16 + r]`
/// and minimums `m[b*16 + r]` (formats with a minimum) as `f32`. Missing rows are zeros.
#[derive(Default)]
struct Panel {
    qs: Vec<u32>,
    d: Vec<f32>,
    m: Vec<f32>,
}

/// Prefill on one panel: weight rows `0..rows` (`rows <= PANEL`) at `w` against all `m`
/// activation rows of `acts`, into `dst[t*ldd + r]` (see [`PanelFn`]).
///
/// The rows are unpacked once into a thread-local [`Panel`]; then one `vpdpbusd` on a 512-bit
/// vector multiplies 4 values of 16 weight rows with 4 broadcast activation values.
///
/// # Safety
/// See [`PanelFn`]; the CPU must support AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn panel<const F: u8>(
    w: *const u8,
    row_bytes: usize,
    rows: usize,
    acts: Acts,
    m: usize,
    dst: *mut f32,
    ldd: usize,
) {
    thread_local! {
        static PANEL_BUF: RefCell<Panel> = RefCell::new(Panel::default());
    }
    let run = |p: &mut Panel| {
        // SAFETY: forwarded contract; `pack` fills the panel `tiles` reads.
        unsafe {
            pack::<F>(w, row_bytes, rows, acts.nb, p);
            let mut t0 = 0;
            while t0 < m {
                let a = acts.row(t0);
                let out = dst.add(t0 * ldd);
                match m - t0 {
                    1 => panel_tile::<F, 1>(p, a, out, ldd, rows),
                    2 => panel_tile::<F, 2>(p, a, out, ldd, rows),
                    3 => panel_tile::<F, 3>(p, a, out, ldd, rows),
                    4 => panel_tile::<F, 4>(p, a, out, ldd, rows),
                    5 => panel_tile::<F, 5>(p, a, out, ldd, rows),
                    6 => panel_tile::<F, 6>(p, a, out, ldd, rows),
                    7 => panel_tile::<F, 7>(p, a, out, ldd, rows),
                    _ => panel_tile::<F, PANEL_T>(p, a, out, ldd, rows),
                }
                t0 += PANEL_T;
            }
        }
    };
    let mut run = Some(run);
    PANEL_BUF.with(|cell| {
        if let Ok(mut p) = cell.try_borrow_mut()
            && let Some(run) = run.take()
        {
            run(&mut p);
        }
    });
    if let Some(run) = run {
        run(&mut Panel::default());
    }
}

/// Unpacks `rows` weight rows of `nb` blocks into `p` (zero rows up to [`PANEL`]).
///
/// # Safety
/// `w` must point to `rows <= PANEL` rows of `row_bytes` bytes; AVX-512 features as [`panel`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn pack<const F: u8>(w: *const u8, row_bytes: usize, rows: usize, nb: usize, p: &mut Panel) {
    let bb = block_bytes(F);
    let (qs_len, sc_len) = (nb * 8 * PANEL, nb * PANEL);
    super::grow(&mut p.qs, qs_len, 0);
    super::grow(&mut p.d, sc_len, 0.0);
    if has_min(F) {
        super::grow(&mut p.m, sc_len, 0.0);
    }
    if rows < PANEL {
        p.qs[..qs_len].fill(0);
        p.d[..sc_len].fill(0.0);
        if has_min(F) {
            p.m[..sc_len].fill(0.0);
        }
    }
    for r in 0..rows {
        for b in 0..nb {
            // SAFETY: the caller guarantees `rows` rows of `nb` blocks; the panel was grown to size.
            unsafe {
                let blk = w.add(r * row_bytes + b * bb);
                let mut v = [0u32; 8];
                _mm256_storeu_si256(v.as_mut_ptr().cast(), unpack::<F, true>(blk));
                for (g, v) in v.into_iter().enumerate() {
                    *p.qs.get_unchecked_mut((b * 8 + g) * PANEL + r) = v;
                }
                *p.d.get_unchecked_mut(b * PANEL + r) = _mm256_cvtss_f32(f16_splat(blk));
                if has_min(F) {
                    *p.m.get_unchecked_mut(b * PANEL + r) = _mm256_cvtss_f32(f16_splat(blk.add(2)));
                }
            }
        }
    }
}

/// `T` activation rows against a packed panel: `dst[t*ldd + r]` for `r < rows`.
///
/// # Safety
/// `p` must be packed for `a.nb` blocks, `a` hold `T` rows, `dst` be writable as described.
#[inline(always)]
unsafe fn panel_tile<const F: u8, const T: usize>(
    p: &Panel,
    a: Acts,
    dst: *mut f32,
    ldd: usize,
    rows: usize,
) {
    // SAFETY: as documented; all reads are within the panel and the `T` activation rows.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); T];
        for b in 0..a.nb {
            let mut isum = panel_isum::<F, T>(a, b);
            let qs = p.qs.as_ptr().add(b * 8 * PANEL);
            for g in 0..8 {
                let wv = _mm512_loadu_si512(qs.add(g * PANEL).cast());
                for (t, isum) in isum.iter_mut().enumerate() {
                    let av = a.qs.add(t * a.k + b * QK + 4 * g).cast::<i32>().read_unaligned();
                    *isum = _mm512_dpbusd_epi32(*isum, wv, _mm512_set1_epi32(av));
                }
            }
            let dw = _mm512_loadu_ps(p.d.as_ptr().add(b * PANEL));
            let mw = if has_min(F) { _mm512_loadu_ps(p.m.as_ptr().add(b * PANEL)) } else { dw };
            panel_scale::<F, T>(&mut acc, &isum, dw, mw, a, b);
        }
        panel_store(&acc, dst, ldd, rows);
    }
}

/// Block `b`'s integer sums of `T` activation rows before its products: the format's
/// per-block correction `-offset · Σq_a` (zero without an offset).
///
/// # Safety
/// `a` must hold `T` rows of at least `b + 1` blocks; AVX-512 features as [`panel`].
#[inline(always)]
unsafe fn panel_isum<const F: u8, const T: usize>(a: Acts, b: usize) -> [__m512i; T] {
    // SAFETY: as documented.
    unsafe {
        let mut isum = [_mm512_setzero_si512(); T];
        if offset(F, true) != 0 {
            for (t, isum) in isum.iter_mut().enumerate() {
                *isum = _mm512_set1_epi32(*a.corr.add(t * a.nb + b));
            }
        }
        isum
    }
}

/// Adds block `b`'s integer sums, times the scales `d_w · d_a`, and (formats with a minimum)
/// the minimum term `m_w · s_a` to the accumulators of 16 columns × `T` rows. `dw` and `mw`
/// are the block's 16 weight scales and minimums (`mw` unused without a minimum).
///
/// # Safety
/// `a` as [`panel_isum`].
#[inline(always)]
unsafe fn panel_scale<const F: u8, const T: usize>(
    acc: &mut [__m512; T],
    isum: &[__m512i; T],
    dw: __m512,
    mw: __m512,
    a: Acts,
    b: usize,
) {
    // SAFETY: as documented.
    unsafe {
        for (t, acc) in acc.iter_mut().enumerate() {
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*a.d.add(t * a.nb + b)));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), scale, *acc);
        }
        if has_min(F) {
            for (t, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(*a.s8.add(t * a.nb + b) * 8.0), *acc);
            }
        }
    }
}

/// Stores columns `0..rows` of `T` accumulator rows at `dst[t*ldd + r]`.
///
/// # Safety
/// `dst` must be writable as described; AVX-512 features as [`panel`].
#[inline(always)]
unsafe fn panel_store<const T: usize>(acc: &[__m512; T], dst: *mut f32, ldd: usize, rows: usize) {
    let mask: __mmask16 = if rows >= PANEL { !0 } else { (1u16 << rows) - 1 };
    for (t, acc) in acc.iter().enumerate() {
        // SAFETY: as documented.
        unsafe { _mm512_mask_storeu_ps(dst.add(t * ldd), mask, *acc) };
    }
}

/// Weights packed once, at load, into panels of [`PANEL`] rows. 4-bit formats (`Q4_0`,
/// `Q4_1`): for panel `p`, block `b`, group `g < 4` and row `r`, the 4 raw bytes
/// `qs[4g..4g+4]` of that block at `qs[((p*nb + b)*4 + g)*PANEL + r]` (their low nibbles are
/// values `4g..4g+4`, their high nibbles values `16+4g..16+4g+4`). `Q8_0`: 8 groups per block,
/// the 4 values of group `g` offset by +128 (unsigned, as `vpdpbusd` takes them) at
/// `qs[((p*nb + b)*8 + g)*PANEL + r]`. Scales and minimums at `(p*nb + b)*PANEL + r`, the
/// file's `f16` bits (widened by one `vcvtph2ps` per block). Missing rows of the last panel are
/// zeros. The same bytes per 32 values as the file: 20 for `Q4_1`, 18 for `Q4_0`, 34 for `Q8_0`.
pub(super) struct Prepacked {
    pub(super) qs: Vec<u32>,
    pub(super) d: Vec<u16>,
    pub(super) m: Vec<u16>,
    /// `Q5_0`, `Q5_1`: bit 4 of each value, one word per block and row laid out as
    /// `kquant`'s `Q5_K` plane (byte `i` holds bit 4 of values `4g+i` at bit `g` and of
    /// `16+4g+i` at bit `4+g`), at `(p*nb + b)*PANEL + r`; empty for the other formats.
    pub(super) qh: Vec<u32>,
}

/// Groups of 4 values stored per block by [`prepack`].
const fn packed_groups(f: u8) -> usize {
    if f == Q8_0 { 8 } else { 4 }
}

/// Whether format `f` has a fifth bit per value (`Q5_0`, `Q5_1`).
const fn five_bit(f: u8) -> bool {
    matches!(f, Q5_0 | Q5_1)
}

/// Packs `n` rows of `nb` blocks of format `F` (`Q4_0`, `Q4_1`, `Q5_0`, `Q5_1` or `Q8_0`).
pub(super) fn prepack<const F: u8>(w: &[u8], n: usize, nb: usize) -> Prepacked {
    let bb = block_bytes(F);
    // Where the nibbles and (5-bit formats) the high bits start in a block.
    let (qs_at, qh_at) = match F {
        Q5_0 => (6, 2),
        Q5_1 => (8, 4),
        _ if has_min(F) => (4, 0),
        _ => (2, 0),
    };
    let groups = packed_groups(F);
    let panels = n.div_ceil(PANEL);
    let mut p = Prepacked {
        qs: vec![0; panels * nb * groups * PANEL],
        d: vec![0; panels * nb * PANEL],
        m: if has_min(F) { vec![0; panels * nb * PANEL] } else { Vec::new() },
        qh: if five_bit(F) { vec![0; panels * nb * PANEL] } else { Vec::new() },
    };
    let f16 = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]);
    for r in 0..n {
        let (pi, rr) = (r / PANEL, r % PANEL);
        for b in 0..nb {
            let blk = &w[(r * nb + b) * bb..(r * nb + b + 1) * bb];
            let at = (pi * nb + b) * PANEL + rr;
            for g in 0..groups {
                let q = &blk[qs_at + 4 * g..qs_at + 4 * g + 4];
                let q = [q[0], q[1], q[2], q[3]];
                let q = if F == Q8_0 { q.map(|v| v.wrapping_add(128)) } else { q };
                p.qs[((pi * nb + b) * groups + g) * PANEL + rr] = u32::from_le_bytes(q);
            }
            p.d[at] = f16(&blk[0..2]);
            if has_min(F) {
                p.m[at] = f16(&blk[2..4]);
            }
            if five_bit(F) {
                let qh = u32::from_le_bytes([blk[qh_at], blk[qh_at + 1], blk[qh_at + 2], blk[qh_at + 3]]);
                let bit = |j: usize| ((qh >> j) & 1) as u8;
                let bytes: [u8; 4] = std::array::from_fn(|i| {
                    (0..4).fold(0u8, |acc, g| acc | (bit(4 * g + i) << g) | (bit(16 + 4 * g + i) << (4 + g)))
                });
                p.qh[at] = u32::from_le_bytes(bytes);
            }
        }
    }
    p
}

/// [`panel`] on prepacked panel `pi` of `p` (rows `0..rows` of it, `rows <= PANEL`): the same
/// arithmetic as [`panel_tile`] on a panel packed per call, so the same bits, for any `m`.
///
/// # Safety
/// `p` must be packed for `acts.nb` blocks with panel `pi`; `acts` must hold `m` rows and `dst`
/// be writable at `dst[t*ldd + r]` for `t < m`, `r < rows`; the CPU must support AVX2, FMA,
/// F16C and AVX-512 F/BW/VL/VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn prepacked_panel<const F: u8>(
    p: &Prepacked,
    pi: usize,
    rows: usize,
    acts: Acts,
    m: usize,
    dst: *mut f32,
    ldd: usize,
) {
    // SAFETY: forwarded contract.
    unsafe {
        let mut t0 = 0;
        while t0 < m {
            let (a, out) = (acts.row(t0), dst.add(t0 * ldd));
            match m - t0 {
                1 => prepacked_tile::<F, 1, 1>(p, pi, a, out, ldd, rows),
                2 => prepacked_tile::<F, 2, 1>(p, pi, a, out, ldd, rows),
                3 => prepacked_tile::<F, 3, 1>(p, pi, a, out, ldd, rows),
                4 => prepacked_tile::<F, 4, 1>(p, pi, a, out, ldd, rows),
                5 => prepacked_tile::<F, 5, 1>(p, pi, a, out, ldd, rows),
                6 => prepacked_tile::<F, 6, 1>(p, pi, a, out, ldd, rows),
                7 => prepacked_tile::<F, 7, 1>(p, pi, a, out, ldd, rows),
                _ => prepacked_tile::<F, PANEL_T, 1>(p, pi, a, out, ldd, rows),
            }
            t0 += PANEL_T;
        }
    }
}

/// Activation rows per two-panel tile.
const PAIR_T: usize = 4;

/// [`prepacked_panel`] on panels `pi` (whole) and `pi + 1` (rows `0..rows` of it) together:
/// each broadcast activation group feeds both panels, half the loads per product. Every
/// column has the same arithmetic as alone, so the same bits.
///
/// # Safety
/// As [`prepacked_panel`], for columns `0..PANEL + rows` of `dst`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn prepacked_pair<const F: u8>(
    p: &Prepacked,
    pi: usize,
    rows: usize,
    acts: Acts,
    m: usize,
    dst: *mut f32,
    ldd: usize,
) {
    // SAFETY: forwarded contract.
    unsafe {
        let mut t0 = 0;
        while t0 < m {
            let (a, out) = (acts.row(t0), dst.add(t0 * ldd));
            match m - t0 {
                // One row (decode) reads the two panels one after the other (see
                // `kquant::panels`).
                1 => {
                    prepacked_tile::<F, 1, 1>(p, pi, a, out, ldd, PANEL);
                    prepacked_tile::<F, 1, 1>(p, pi + 1, a, out.add(PANEL), ldd, rows);
                }
                2 => prepacked_tile::<F, 2, 2>(p, pi, a, out, ldd, rows),
                3 => prepacked_tile::<F, 3, 2>(p, pi, a, out, ldd, rows),
                _ => prepacked_tile::<F, PAIR_T, 2>(p, pi, a, out, ldd, rows),
            }
            t0 += PAIR_T;
        }
    }
}

/// `T` activation rows against `P` consecutive prepacked panels from `pi` (see
/// [`prepacked_panel`]); the last panel's columns `0..rows`, the others whole.
///
/// # Safety
/// As [`prepacked_panel`], for `T` rows and `P` panels.
#[inline(always)]
unsafe fn prepacked_tile<const F: u8, const T: usize, const P: usize>(
    p: &Prepacked,
    pi: usize,
    a: Acts,
    dst: *mut f32,
    ldd: usize,
    rows: usize,
) {
    let nb = a.nb;
    let groups = packed_groups(F);
    // SAFETY: as documented; all reads are within the panels and the `T` activation rows.
    unsafe {
        let qs: [*const u32; P] = std::array::from_fn(|j| p.qs.as_ptr().add((pi + j) * nb * groups * PANEL));
        let d: [*const u16; P] = std::array::from_fn(|j| p.d.as_ptr().add((pi + j) * nb * PANEL));
        let mm: [*const u16; P] =
            if has_min(F) { std::array::from_fn(|j| p.m.as_ptr().add((pi + j) * nb * PANEL)) } else { d };
        let qh: [*const u32; P] = std::array::from_fn(|j| p.qh.as_ptr().wrapping_add((pi + j) * nb * PANEL));
        let low = _mm512_set1_epi8(0x0F);
        let mut acc = [[_mm512_setzero_ps(); T]; P];
        for b in 0..nb {
            let mut isum = [panel_isum::<F, T>(a, b); P];
            // Two integer sums per row and panel (nibble halves for 4-bit formats, group
            // parity for Q8_0), added at the end: independent chains for `vpdpbusd`'s latency,
            // exact, so the same bits.
            let mut part = [[_mm512_setzero_si512(); T]; P];
            // The panels stream from memory once per call: fetch 8 blocks ahead (the values,
            // and the scales and minimums every other block: a line holds two blocks' worth).
            for j in 0..P {
                let ahead = qs[j].wrapping_add((b + 8) * groups * PANEL).cast::<i8>();
                for line in 0..groups {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
                }
                if five_bit(F) {
                    _mm_prefetch::<_MM_HINT_T0>(qh[j].wrapping_add((b + 8) * PANEL).cast::<i8>());
                }
                if b % 2 == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(d[j].wrapping_add((b + 8) * PANEL).cast::<i8>());
                    if has_min(F) {
                        _mm_prefetch::<_MM_HINT_T0>(mm[j].wrapping_add((b + 8) * PANEL).cast::<i8>());
                    }
                }
            }
            if F == Q8_0 {
                for g in 0..8 {
                    let wv: [__m512i; P] =
                        std::array::from_fn(|j| _mm512_loadu_si512(qs[j].add((b * 8 + g) * PANEL).cast()));
                    for t in 0..T {
                        let av = a.qs.add(t * a.k + b * QK + 4 * g).cast::<i32>().read_unaligned();
                        let av = _mm512_set1_epi32(av);
                        for j in 0..P {
                            if g % 2 == 0 {
                                isum[j][t] = _mm512_dpbusd_epi32(isum[j][t], wv[j], av);
                            } else {
                                part[j][t] = _mm512_dpbusd_epi32(part[j][t], wv[j], av);
                            }
                        }
                    }
                }
            } else {
                let planes: [[__m512i; 2]; P] = std::array::from_fn(|j| {
                    let h = if five_bit(F) {
                        _mm512_loadu_si512(qh[j].add(b * PANEL).cast())
                    } else {
                        _mm512_setzero_si512()
                    };
                    [h, _mm512_setzero_si512()]
                });
                for g in 0..4 {
                    let raw: [__m512i; P] =
                        std::array::from_fn(|j| _mm512_loadu_si512(qs[j].add((b * 4 + g) * PANEL).cast()));
                    let lo: [__m512i; P] = std::array::from_fn(|j| {
                        let v = _mm512_and_si512(raw[j], low);
                        if five_bit(F) {
                            kquant::high_bits::<{ kquant::Q5_K }, false>(v, planes[j], g)
                        } else {
                            v
                        }
                    });
                    let hi: [__m512i; P] = std::array::from_fn(|j| {
                        let v = _mm512_and_si512(_mm512_srli_epi16(raw[j], 4), low);
                        if five_bit(F) {
                            kquant::high_bits::<{ kquant::Q5_K }, true>(v, planes[j], g)
                        } else {
                            v
                        }
                    });
                    for t in 0..T {
                        let row = a.qs.add(t * a.k + b * QK);
                        let a_lo = _mm512_set1_epi32(row.add(4 * g).cast::<i32>().read_unaligned());
                        let a_hi = _mm512_set1_epi32(row.add(16 + 4 * g).cast::<i32>().read_unaligned());
                        for j in 0..P {
                            isum[j][t] = _mm512_dpbusd_epi32(isum[j][t], lo[j], a_lo);
                            part[j][t] = _mm512_dpbusd_epi32(part[j][t], hi[j], a_hi);
                        }
                    }
                }
            }
            for j in 0..P {
                for t in 0..T {
                    isum[j][t] = _mm512_add_epi32(isum[j][t], part[j][t]);
                }
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(d[j].add(b * PANEL).cast()));
                let mw = if has_min(F) {
                    _mm512_cvtph_ps(_mm256_loadu_si256(mm[j].add(b * PANEL).cast()))
                } else {
                    dw
                };
                panel_scale::<F, T>(&mut acc[j], &isum[j], dw, mw, a, b);
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            let cols = if j + 1 == P { rows } else { PANEL };
            panel_store(acc, dst.add(j * PANEL), ldd, cols);
        }
    }
}
