//! K-quant weights (`Q4_K`, `Q5_K`, `Q6_K`) on the panel kernel, in AVX-512 ([`panels`]) or
//! AVX2 ([`panels_avx2`], the same bits).
//!
//! # Layouts (ggml, 256-value superblocks)
//!
//! | type   | bytes | layout                                                        | value `x_j`                   |
//! |--------|-------|---------------------------------------------------------------|-------------------------------|
//! | `Q4_K` | 144   | `f16 d`, `f16 dmin`, `[u8; 12]` 6-bit scales/mins, `[u8; 128]` | `d·sc_b · q_j − dmin·m_b`     |
//! | `Q5_K` | 176   | as `Q4_K`, then `[u8; 32] qh` (bit 4), `[u8; 128]` nibbles    | `d·sc_b · q_j − dmin·m_b`     |
//! | `Q6_K` | 210   | `[u8; 128] ql`, `[u8; 64] qh`, `[i8; 16]` scales, `f16 d`      | `d·sc_h · (q_j − 32)`         |
//!
//! `b` is the 32-value block of `j` (8 per superblock), `h` its 16-value half (16 per
//! superblock). [`decode`] turns a superblock into its unsigned values and small scales.
//!
//! # Packing
//!
//! At load, every superblock is decoded and its rows packed into panels of [`PANEL`] weight
//! rows as the legacy panel kernel packs `Q4_1`: the low 4 bits of each value as nibbles, in
//! 4-value groups whose low nibbles are values `4g..4g+4` of a block and high nibbles values
//! `16+4g..`. The bits above go to planes, one 32-bit word per block and row: for `Q5_K`,
//! byte `i` holds bit 4 of values `4g+i` (bit `g`) and `16+4g+i` (bit `4+g`); for `Q6_K`,
//! one plane per half, byte `i` holding bits 4-5 of value `4g+i` (or `16+4g+i`) at bits
//! `2g..2g+2`. The kernel moves them into place with a shift and a mask per group. Scales
//! and minimums stay the file's 6- or 8-bit integers (one byte each per block, or per half
//! for `Q6_K`), `d` and `dmin` once per superblock as `f32`: 4.75 bits per value for `Q4_K`
//! (the file has 4.5), 5.75 for `Q5_K` (5.5) and 6.63 for `Q6_K` (6.56).
//!
//! # Numerics
//!
//! As in ggml, the activations are quantized per 256 values to 8 bits (`quantize_row_q8_K`:
//! `d = max / −127` of the value of largest magnitude, kept as `f32`). Each block's integer dot
//! product is exact, and `d·sc` is exact in `f32` (an `f16` times an integer below 2^8), so the
//! result equals llama.cpp's up to float summation order.

use std::arch::x86_64::*;

use super::{Acts, PANEL, QK};

/// Values per superblock.
pub(super) const QK_K: usize = 256;
/// 32-value blocks per superblock.
const BLOCKS: usize = QK_K / QK;

/// Format code of `Q4_K` weights.
pub(super) const Q4_K: u8 = 5;
/// Format code of `Q5_K` weights.
pub(super) const Q5_K: u8 = 6;
/// Format code of `Q6_K` weights.
pub(super) const Q6_K: u8 = 7;

/// Bytes of one superblock of format `f`.
pub(super) const fn superblock_bytes(f: u8) -> usize {
    match f {
        Q4_K => 144,
        Q5_K => 176,
        _ => 210,
    }
}

/// Whether `f` has a per-block minimum (`Q4_K`, `Q5_K`); `Q6_K` instead has an offset of 32.
pub(super) const fn has_min(f: u8) -> bool {
    f != Q6_K
}

/// Groups of 4 nibble pairs stored per block (every format keeps its low 4 bits as nibbles).
const GROUPS: usize = 4;

/// Planes of high bits per block: 0 for `Q4_K`, 1 for `Q5_K` (bit 4), 2 for `Q6_K` (bits
/// 4 and 5 of the low and of the high half).
const fn planes(f: u8) -> usize {
    match f {
        Q4_K => 0,
        Q5_K => 1,
        _ => 2,
    }
}

/// Scales per block (`Q6_K` has one per 16-value half).
const fn scales_per_block(f: u8) -> usize {
    if f == Q6_K { 2 } else { 1 }
}

/// The offset subtracted from `Q6_K`'s unsigned values.
pub(super) const Q6_K_OFFSET: i32 = 32;

/// One superblock decoded: values (unsigned: `0..16`, `0..32` or `0..64`), scales (per block,
/// or per half for `Q6_K`, as the file's bits: `Q6_K`'s are `i8`), minimums (per block), `d`,
/// `dmin`.
pub(super) struct Decoded {
    pub(super) q: [u8; QK_K],
    pub(super) sc: [u8; 16],
    pub(super) mn: [u8; BLOCKS],
    pub(super) d: f32,
    pub(super) dmin: f32,
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// ggml's `get_scale_min_k4`: 6-bit scale and minimum of block `j` from the 12 packed bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Decodes one superblock of format `f` (`blk` holds [`superblock_bytes`] bytes).
pub(super) fn decode(f: u8, blk: &[u8]) -> Decoded {
    let mut out = Decoded { q: [0; QK_K], sc: [0; 16], mn: [0; BLOCKS], d: 0.0, dmin: 0.0 };
    if f == Q6_K {
        let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
        out.d = f16_at(blk, 208);
        out.sc.copy_from_slice(sc);
        for n in 0..2 {
            let (ql, qh, q) = (&ql[64 * n..], &qh[32 * n..], &mut out.q[128 * n..]);
            for l in 0..32 {
                q[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                q[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                q[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                q[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
            }
        }
        return out;
    }
    out.d = f16_at(blk, 0);
    out.dmin = f16_at(blk, 2);
    let scales = &blk[4..16];
    for b in 0..BLOCKS {
        (out.sc[b], out.mn[b]) = scale_min_k4(b, scales);
    }
    let (qh, qs) = if f == Q5_K { (Some(&blk[16..48]), &blk[48..176]) } else { (None, &blk[16..144]) };
    for j in 0..4 {
        let qs = &qs[32 * j..32 * j + 32];
        for l in 0..32 {
            let (mut lo, mut hi) = (qs[l] & 0xF, qs[l] >> 4);
            if let Some(qh) = qh {
                lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
            }
            out.q[64 * j + l] = lo;
            out.q[64 * j + 32 + l] = hi;
        }
    }
    out
}

/// K-quant weights packed into panels (see the module docs). For panel `p`, block `b` (of
/// `nb` per row), group `g` and row `r`: nibbles at `qs[((p*nb + b)*4 + g)*PANEL + r]`, high
/// bit plane `h` at `qh[((p*nb + b)*H + h)*PANEL + r]`, scales at `sc[((p*nb + b)*S + s)*PANEL
/// + r]`, minimums at `mn[(p*nb + b)*PANEL + r]`; for superblock `u`, `d` and `−dmin` at
/// `(p*nb/8 + u)*PANEL + r`. Missing rows are zeros.
pub(super) struct KPacked {
    pub(super) qs: Vec<u32>,
    pub(super) qh: Vec<u32>,
    pub(super) sc: Vec<u8>,
    pub(super) mn: Vec<u8>,
    pub(super) d: Vec<f32>,
    pub(super) dmin: Vec<f32>,
}

impl KPacked {
    /// The panels of several packings of the same format and `k`, one after another.
    pub(super) fn concat(parts: &[&KPacked]) -> KPacked {
        KPacked {
            qs: parts.iter().flat_map(|p| p.qs.iter().copied()).collect(),
            qh: parts.iter().flat_map(|p| p.qh.iter().copied()).collect(),
            sc: parts.iter().flat_map(|p| p.sc.iter().copied()).collect(),
            mn: parts.iter().flat_map(|p| p.mn.iter().copied()).collect(),
            d: parts.iter().flat_map(|p| p.d.iter().copied()).collect(),
            dmin: parts.iter().flat_map(|p| p.dmin.iter().copied()).collect(),
        }
    }
}

/// Packs `n` rows of `nsb` superblocks of format `F` (`w` holds exactly that many bytes).
pub(super) fn prepack<const F: u8>(w: &[u8], n: usize, nsb: usize) -> KPacked {
    let (h_n, s_n, nb) = (planes(F), scales_per_block(F), nsb * BLOCKS);
    let panels = n.div_ceil(PANEL);
    let mut p = KPacked {
        qs: vec![0; panels * nb * GROUPS * PANEL],
        qh: vec![0; panels * nb * h_n * PANEL],
        sc: vec![0; panels * nb * s_n * PANEL],
        mn: if has_min(F) { vec![0; panels * nb * PANEL] } else { Vec::new() },
        d: vec![0.0; panels * nsb * PANEL],
        dmin: if has_min(F) { vec![0.0; panels * nsb * PANEL] } else { Vec::new() },
    };
    let sbb = superblock_bytes(F);
    for r in 0..n {
        let (pi, rr) = (r / PANEL, r % PANEL);
        for u in 0..nsb {
            let at = (r * nsb + u) * sbb;
            let dec = decode(F, &w[at..at + sbb]);
            p.d[(pi * nsb + u) * PANEL + rr] = dec.d;
            if has_min(F) {
                p.dmin[(pi * nsb + u) * PANEL + rr] = -dec.dmin;
            }
            for bl in 0..BLOCKS {
                let b = u * BLOCKS + bl;
                let q = &dec.q[bl * QK..(bl + 1) * QK];
                for g in 0..GROUPS {
                    let bytes: [u8; 4] =
                        std::array::from_fn(|i| (q[4 * g + i] & 0xF) | ((q[16 + 4 * g + i] & 0xF) << 4));
                    p.qs[((pi * nb + b) * GROUPS + g) * PANEL + rr] = u32::from_le_bytes(bytes);
                }
                for h in 0..h_n {
                    let bytes: [u8; 4] = std::array::from_fn(|i| {
                        (0..GROUPS).fold(0u8, |acc, g| {
                            if F == Q5_K {
                                acc | ((q[4 * g + i] >> 4) << g) | ((q[16 + 4 * g + i] >> 4) << (4 + g))
                            } else {
                                acc | ((q[16 * h + 4 * g + i] >> 4) << (2 * g))
                            }
                        })
                    });
                    p.qh[((pi * nb + b) * h_n + h) * PANEL + rr] = u32::from_le_bytes(bytes);
                }
                for s in 0..s_n {
                    p.sc[((pi * nb + b) * s_n + s) * PANEL + rr] = dec.sc[bl * s_n + s];
                }
                if has_min(F) {
                    p.mn[(pi * nb + b) * PANEL + rr] = dec.mn[bl];
                }
            }
        }
    }
    p
}

/// Activation rows per one-panel tile.
const PANEL_T: usize = 8;
/// Activation rows per two-panel tile.
const PAIR_T: usize = 4;

/// Panel `pi` of `p` (rows `0..rows` of it) against all `m` activation rows, into
/// `dst[t*ldd + r]`; with `pair`, panels `pi` (whole) and `pi + 1` (rows `0..rows`) together,
/// each column with the arithmetic it has alone.
///
/// # Safety
/// `p` must be packed in format `F` for `acts.nb` blocks with the panels used; `acts` must
/// hold `m` rows quantized per superblock (with the `Q6_K` corrections per half, or the block
/// sums for minimums) and `dst` be writable at those columns for `t < m`; the CPU must support
/// AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn panels<const F: u8>(
    p: &KPacked,
    pi: usize,
    pair: bool,
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
            if pair {
                match m - t0 {
                    // One row (decode) reads the two panels one after the other: two
                    // interleaved streams from memory made a decode step of a mixture of
                    // experts, whose weights are cold, 1.4x slower.
                    1 => {
                        tile::<F, 1, 1>(p, pi, a, out, ldd, PANEL);
                        tile::<F, 1, 1>(p, pi + 1, a, out.add(PANEL), ldd, rows);
                    }
                    2 => tile::<F, 2, 2>(p, pi, a, out, ldd, rows),
                    3 => tile::<F, 3, 2>(p, pi, a, out, ldd, rows),
                    _ => tile::<F, PAIR_T, 2>(p, pi, a, out, ldd, rows),
                }
                t0 += PAIR_T;
            } else {
                match m - t0 {
                    1 => tile::<F, 1, 1>(p, pi, a, out, ldd, rows),
                    2 => tile::<F, 2, 1>(p, pi, a, out, ldd, rows),
                    3 => tile::<F, 3, 1>(p, pi, a, out, ldd, rows),
                    4 => tile::<F, 4, 1>(p, pi, a, out, ldd, rows),
                    5 => tile::<F, 5, 1>(p, pi, a, out, ldd, rows),
                    6 => tile::<F, 6, 1>(p, pi, a, out, ldd, rows),
                    7 => tile::<F, 7, 1>(p, pi, a, out, ldd, rows),
                    _ => tile::<F, PANEL_T, 1>(p, pi, a, out, ldd, rows),
                }
                t0 += PANEL_T;
            }
        }
    }
}

/// Group `g`'s nibbles `v` of the low (`HIGH == false`: values `4g..4g+4`) or high half of a
/// block with their bits above 3 added from the block's `planes` (see the module docs).
#[inline(always)]
pub(super) unsafe fn high_bits<const F: u8, const HIGH: bool>(
    v: __m512i,
    planes: [__m512i; 2],
    g: usize,
) -> __m512i {
    // Shifts are on 16-bit lanes; each keeps the wanted bits within their byte, and the mask
    // drops what crossed from the neighbouring byte.
    // SAFETY: register operations only (the caller's target features).
    unsafe {
        match F {
            Q5_K => {
                // Bit `g` (low half) or `4 + g` (high half) of the byte to bit 4.
                let h = planes[0];
                let bit = match (HIGH, g) {
                    (false, 0) => _mm512_slli_epi16::<4>(h),
                    (false, 1) => _mm512_slli_epi16::<3>(h),
                    (false, 2) => _mm512_slli_epi16::<2>(h),
                    (false, _) => _mm512_slli_epi16::<1>(h),
                    (true, 0) => h,
                    (true, 1) => _mm512_srli_epi16::<1>(h),
                    (true, 2) => _mm512_srli_epi16::<2>(h),
                    (true, _) => _mm512_srli_epi16::<3>(h),
                };
                _mm512_or_si512(v, _mm512_and_si512(bit, _mm512_set1_epi8(0x10)))
            }
            Q6_K => {
                // Bits `2g..2g+2` of the half's plane to bits 4-5.
                let h = planes[usize::from(HIGH)];
                let bits = match g {
                    0 => _mm512_slli_epi16::<4>(h),
                    1 => _mm512_slli_epi16::<2>(h),
                    2 => h,
                    _ => _mm512_srli_epi16::<2>(h),
                };
                _mm512_or_si512(v, _mm512_and_si512(bits, _mm512_set1_epi8(0x30)))
            }
            _ => v,
        }
    }
}

/// 16 small integer scales at `p` widened to `f32` (`Q6_K`'s are signed).
#[inline(always)]
unsafe fn scales16<const SIGNED: bool>(p: *const u8) -> __m512 {
    // SAFETY: the caller guarantees 16 readable bytes.
    unsafe {
        let v = _mm_loadu_si128(p.cast());
        _mm512_cvtepi32_ps(if SIGNED { _mm512_cvtepi8_epi32(v) } else { _mm512_cvtepu8_epi32(v) })
    }
}

/// `T` activation rows against `P` consecutive panels from `pi`; the last panel's columns
/// `0..rows`, the others whole.
///
/// # Safety
/// As [`panels`], for `T` rows and `P` panels.
#[inline(always)]
unsafe fn tile<const F: u8, const T: usize, const P: usize>(
    p: &KPacked,
    pi: usize,
    a: Acts,
    dst: *mut f32,
    ldd: usize,
    rows: usize,
) {
    let nb = a.nb;
    let nsb = nb / BLOCKS;
    let (h_n, s_n) = (planes(F), scales_per_block(F));
    // SAFETY: as documented; all reads are within the panels and the `T` activation rows.
    unsafe {
        let qs: [*const u32; P] = std::array::from_fn(|j| p.qs.as_ptr().add((pi + j) * nb * GROUPS * PANEL));
        let qh: [*const u32; P] =
            std::array::from_fn(|j| p.qh.as_ptr().wrapping_add((pi + j) * nb * h_n * PANEL));
        let sc: [*const u8; P] = std::array::from_fn(|j| p.sc.as_ptr().add((pi + j) * nb * s_n * PANEL));
        let mn: [*const u8; P] =
            if has_min(F) { std::array::from_fn(|j| p.mn.as_ptr().add((pi + j) * nb * PANEL)) } else { sc };
        let dd: [*const f32; P] = std::array::from_fn(|j| p.d.as_ptr().add((pi + j) * nsb * PANEL));
        let dm: [*const f32; P] = if has_min(F) {
            std::array::from_fn(|j| p.dmin.as_ptr().add((pi + j) * nsb * PANEL))
        } else {
            dd
        };
        let low = _mm512_set1_epi8(0x0F);
        let mut acc = [[_mm512_setzero_ps(); T]; P];
        for u in 0..nsb {
            let dsup: [__m512; P] = std::array::from_fn(|j| _mm512_loadu_ps(dd[j].add(u * PANEL)));
            let dmin: [__m512; P] = std::array::from_fn(|j| _mm512_loadu_ps(dm[j].add(u * PANEL)));
            for b in u * BLOCKS..(u + 1) * BLOCKS {
                // Two integer sums per row and panel: nibble halves (`Q4_K`), or the block's
                // 16-value halves (`Q5_K`, `Q6_K`, whose halves have their own scales).
                let mut i0 = [[_mm512_setzero_si512(); T]; P];
                let mut i1 = [[_mm512_setzero_si512(); T]; P];
                if F == Q6_K {
                    for t in 0..T {
                        let c0 = _mm512_set1_epi32(*a.corr.add(t * a.corr_row + 2 * b));
                        let c1 = _mm512_set1_epi32(*a.corr.add(t * a.corr_row + 2 * b + 1));
                        for j in 0..P {
                            i0[j][t] = c0;
                            i1[j][t] = c1;
                        }
                    }
                }
                // The panels stream from memory once per call: fetch 4 blocks ahead.
                for j in 0..P {
                    let ahead = qs[j].wrapping_add((b + 4) * GROUPS * PANEL).cast::<i8>();
                    for line in 0..GROUPS {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
                    }
                    let ahead = qh[j].wrapping_add((b + 4) * h_n * PANEL).cast::<i8>();
                    for line in 0..h_n {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
                    }
                }
                let planes: [[__m512i; 2]; P] = std::array::from_fn(|j| {
                    std::array::from_fn(|h| {
                        if h < h_n {
                            _mm512_loadu_si512(qh[j].add((b * h_n + h) * PANEL).cast())
                        } else {
                            _mm512_setzero_si512()
                        }
                    })
                });
                for g in 0..GROUPS {
                    let raw: [__m512i; P] = std::array::from_fn(|j| {
                        _mm512_loadu_si512(qs[j].add((b * GROUPS + g) * PANEL).cast())
                    });
                    let lo: [__m512i; P] = std::array::from_fn(|j| {
                        let v = _mm512_and_si512(raw[j], low);
                        high_bits::<F, false>(v, planes[j], g)
                    });
                    let hi: [__m512i; P] = std::array::from_fn(|j| {
                        let v = _mm512_and_si512(_mm512_srli_epi16(raw[j], 4), low);
                        high_bits::<F, true>(v, planes[j], g)
                    });
                    for t in 0..T {
                        let row = a.qs.add(t * a.k + b * QK);
                        let a_lo = _mm512_set1_epi32(row.add(4 * g).cast::<i32>().read_unaligned());
                        let a_hi = _mm512_set1_epi32(row.add(16 + 4 * g).cast::<i32>().read_unaligned());
                        for j in 0..P {
                            i0[j][t] = _mm512_dpbusd_epi32(i0[j][t], lo[j], a_lo);
                            i1[j][t] = _mm512_dpbusd_epi32(i1[j][t], hi[j], a_hi);
                        }
                    }
                }
                for j in 0..P {
                    if F == Q6_K {
                        let s = sc[j].add(b * 2 * PANEL);
                        let dw0 = _mm512_mul_ps(dsup[j], scales16::<true>(s));
                        let dw1 = _mm512_mul_ps(dsup[j], scales16::<true>(s.add(PANEL)));
                        for t in 0..T {
                            let da = _mm512_set1_ps(*a.d.add(t * a.nb + b));
                            let acc = &mut acc[j][t];
                            *acc =
                                _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0[j][t]), _mm512_mul_ps(dw0, da), *acc);
                            *acc =
                                _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1[j][t]), _mm512_mul_ps(dw1, da), *acc);
                        }
                    } else {
                        let dw = _mm512_mul_ps(dsup[j], scales16::<false>(sc[j].add(b * PANEL)));
                        let mw = _mm512_mul_ps(dmin[j], scales16::<false>(mn[j].add(b * PANEL)));
                        for t in 0..T {
                            let da = _mm512_set1_ps(*a.d.add(t * a.nb + b));
                            let isum = _mm512_add_epi32(i0[j][t], i1[j][t]);
                            let acc = &mut acc[j][t];
                            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, da), *acc);
                            let s = _mm512_set1_ps(*a.s8.add(t * a.nb + b) * 8.0);
                            *acc = _mm512_fmadd_ps(mw, s, *acc);
                        }
                    }
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            let cols = if j + 1 == P { rows } else { PANEL };
            let mask: __mmask16 = if cols >= PANEL { !0 } else { (1u16 << cols) - 1 };
            for (t, acc) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(dst.add(j * PANEL + t * ldd), mask, *acc);
            }
        }
    }
}

/// Activation rows per tile of the AVX2 kernel.
const AVX2_T: usize = 2;

/// [`panels`] for CPUs with AVX2 but not AVX-512: the same panels, each as two halves of 8
/// rows on 256-bit vectors, with `vpdpbusd` done as `vpmaddubsw` then `vpmaddwd` by ones. That
/// is exact (the weights are below 64 and the activations within ±128, so no 16-bit pair sum
/// saturates), and the float arithmetic per column is the AVX-512 kernel's, so both give the
/// same bits.
///
/// # Safety
/// As [`panels`], but the CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn panels_avx2<const F: u8>(
    p: &KPacked,
    pi: usize,
    pair: bool,
    rows: usize,
    acts: Acts,
    m: usize,
    dst: *mut f32,
    ldd: usize,
) {
    let count = if pair { 2 } else { 1 };
    // SAFETY: forwarded contract; panel `pi + j` is whole unless it is the last one.
    unsafe {
        for j in 0..count {
            let cols = if j + 1 == count { rows } else { PANEL };
            let mut t0 = 0;
            while t0 < m {
                let (a, out) = (acts.row(t0), dst.add(t0 * ldd + j * PANEL));
                match m - t0 {
                    1 => tile_avx2::<F, 1>(p, pi + j, a, out, ldd, cols),
                    _ => tile_avx2::<F, AVX2_T>(p, pi + j, a, out, ldd, cols),
                }
                t0 += AVX2_T;
            }
        }
    }
}

/// [`high_bits`] on 256-bit vectors.
#[inline(always)]
unsafe fn high_bits_avx2<const F: u8, const HIGH: bool>(
    v: __m256i,
    planes: [__m256i; 2],
    g: usize,
) -> __m256i {
    // SAFETY: register operations only (the caller's target features).
    unsafe {
        match F {
            Q5_K => {
                let h = planes[0];
                let bit = match (HIGH, g) {
                    (false, 0) => _mm256_slli_epi16::<4>(h),
                    (false, 1) => _mm256_slli_epi16::<3>(h),
                    (false, 2) => _mm256_slli_epi16::<2>(h),
                    (false, _) => _mm256_slli_epi16::<1>(h),
                    (true, 0) => h,
                    (true, 1) => _mm256_srli_epi16::<1>(h),
                    (true, 2) => _mm256_srli_epi16::<2>(h),
                    (true, _) => _mm256_srli_epi16::<3>(h),
                };
                _mm256_or_si256(v, _mm256_and_si256(bit, _mm256_set1_epi8(0x10)))
            }
            Q6_K => {
                let h = planes[usize::from(HIGH)];
                let bits = match g {
                    0 => _mm256_slli_epi16::<4>(h),
                    1 => _mm256_slli_epi16::<2>(h),
                    2 => h,
                    _ => _mm256_srli_epi16::<2>(h),
                };
                _mm256_or_si256(v, _mm256_and_si256(bits, _mm256_set1_epi8(0x30)))
            }
            _ => v,
        }
    }
}

/// 8 small integer scales at `p` widened to `f32` (`Q6_K`'s are signed).
#[inline(always)]
unsafe fn scales8<const SIGNED: bool>(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 8 readable bytes.
    unsafe {
        let v = _mm_loadl_epi64(p.cast());
        _mm256_cvtepi32_ps(if SIGNED { _mm256_cvtepi8_epi32(v) } else { _mm256_cvtepu8_epi32(v) })
    }
}

/// `acc + Σ` of each 4 products of unsigned `w` and signed `a` bytes (`vpdpbusd`, exact when no
/// pair of products sums beyond an `i16`).
#[inline(always)]
unsafe fn dot4_avx2(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
    // SAFETY: register operations only (the caller's target features).
    unsafe { _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))) }
}

/// `T` activation rows against panel `pi`'s columns `0..cols`, as two halves of 8 rows.
///
/// # Safety
/// As [`panels_avx2`], for `T` rows and one panel.
#[inline(always)]
unsafe fn tile_avx2<const F: u8, const T: usize>(
    p: &KPacked,
    pi: usize,
    a: Acts,
    dst: *mut f32,
    ldd: usize,
    cols: usize,
) {
    const HALF: usize = PANEL / 2;
    let nb = a.nb;
    let nsb = nb / BLOCKS;
    let (h_n, s_n) = (planes(F), scales_per_block(F));
    // SAFETY: as documented; all reads are within the panel and the `T` activation rows.
    unsafe {
        let qs = p.qs.as_ptr().add(pi * nb * GROUPS * PANEL);
        let qh = p.qh.as_ptr().wrapping_add(pi * nb * h_n * PANEL);
        let sc = p.sc.as_ptr().add(pi * nb * s_n * PANEL);
        let mn = if has_min(F) { p.mn.as_ptr().add(pi * nb * PANEL) } else { sc };
        let dd = p.d.as_ptr().add(pi * nsb * PANEL);
        let dm = if has_min(F) { p.dmin.as_ptr().add(pi * nsb * PANEL) } else { dd };
        let low = _mm256_set1_epi8(0x0F);
        let mut acc = [[_mm256_setzero_ps(); T]; 2];
        for u in 0..nsb {
            let dsup: [__m256; 2] = std::array::from_fn(|h| _mm256_loadu_ps(dd.add(u * PANEL + HALF * h)));
            let dmin: [__m256; 2] = std::array::from_fn(|h| _mm256_loadu_ps(dm.add(u * PANEL + HALF * h)));
            for b in u * BLOCKS..(u + 1) * BLOCKS {
                let mut i0 = [[_mm256_setzero_si256(); T]; 2];
                let mut i1 = [[_mm256_setzero_si256(); T]; 2];
                if F == Q6_K {
                    for t in 0..T {
                        let c0 = _mm256_set1_epi32(*a.corr.add(t * a.corr_row + 2 * b));
                        let c1 = _mm256_set1_epi32(*a.corr.add(t * a.corr_row + 2 * b + 1));
                        for h in 0..2 {
                            i0[h][t] = c0;
                            i1[h][t] = c1;
                        }
                    }
                }
                let ahead = qs.wrapping_add((b + 4) * GROUPS * PANEL).cast::<i8>();
                for line in 0..GROUPS {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
                }
                let ahead = qh.wrapping_add((b + 4) * h_n * PANEL).cast::<i8>();
                for line in 0..h_n {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
                }
                let planes: [[__m256i; 2]; 2] = std::array::from_fn(|h| {
                    std::array::from_fn(|plane| {
                        if plane < h_n {
                            _mm256_loadu_si256(qh.add((b * h_n + plane) * PANEL + HALF * h).cast())
                        } else {
                            _mm256_setzero_si256()
                        }
                    })
                });
                for g in 0..GROUPS {
                    let raw: [__m256i; 2] = std::array::from_fn(|h| {
                        _mm256_loadu_si256(qs.add((b * GROUPS + g) * PANEL + HALF * h).cast())
                    });
                    let lo: [__m256i; 2] = std::array::from_fn(|h| {
                        high_bits_avx2::<F, false>(_mm256_and_si256(raw[h], low), planes[h], g)
                    });
                    let hi: [__m256i; 2] = std::array::from_fn(|h| {
                        let v = _mm256_and_si256(_mm256_srli_epi16::<4>(raw[h]), low);
                        high_bits_avx2::<F, true>(v, planes[h], g)
                    });
                    for t in 0..T {
                        let row = a.qs.add(t * a.k + b * QK);
                        let a_lo = _mm256_set1_epi32(row.add(4 * g).cast::<i32>().read_unaligned());
                        let a_hi = _mm256_set1_epi32(row.add(16 + 4 * g).cast::<i32>().read_unaligned());
                        for h in 0..2 {
                            i0[h][t] = dot4_avx2(i0[h][t], lo[h], a_lo);
                            i1[h][t] = dot4_avx2(i1[h][t], hi[h], a_hi);
                        }
                    }
                }
                for h in 0..2 {
                    if F == Q6_K {
                        let s = sc.add(b * 2 * PANEL + HALF * h);
                        let dw0 = _mm256_mul_ps(dsup[h], scales8::<true>(s));
                        let dw1 = _mm256_mul_ps(dsup[h], scales8::<true>(s.add(PANEL)));
                        for t in 0..T {
                            let da = _mm256_set1_ps(*a.d.add(t * a.nb + b));
                            let acc = &mut acc[h][t];
                            *acc =
                                _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0[h][t]), _mm256_mul_ps(dw0, da), *acc);
                            *acc =
                                _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1[h][t]), _mm256_mul_ps(dw1, da), *acc);
                        }
                    } else {
                        let dw = _mm256_mul_ps(dsup[h], scales8::<false>(sc.add(b * PANEL + HALF * h)));
                        let mw = _mm256_mul_ps(dmin[h], scales8::<false>(mn.add(b * PANEL + HALF * h)));
                        for t in 0..T {
                            let da = _mm256_set1_ps(*a.d.add(t * a.nb + b));
                            let isum = _mm256_add_epi32(i0[h][t], i1[h][t]);
                            let acc = &mut acc[h][t];
                            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, da), *acc);
                            let s = _mm256_set1_ps(*a.s8.add(t * a.nb + b) * 8.0);
                            *acc = _mm256_fmadd_ps(mw, s, *acc);
                        }
                    }
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            let n = cols.saturating_sub(HALF * h).min(HALF);
            for (t, acc) in acc.iter().enumerate() {
                let mut lanes = [0f32; HALF];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *acc);
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst.add(HALF * h + t * ldd), n);
            }
        }
    }
}
