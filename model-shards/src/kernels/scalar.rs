//! Portable scalar micro-kernels (one weight row × one activation row), the fallback for CPUs
//! without AVX2 and the reference the SIMD paths are tested against.

use half::f16;

use super::{Acts, Kernels, Q4_0, Q4_1, Q5_0, Q5_1, QK, TileFn, block_bytes, has_min};

/// Scalar kernels for format `format`.
pub(super) fn kernels(format: u8) -> Kernels {
    let tile: TileFn = match format {
        Q4_0 => tile::<Q4_0>,
        Q4_1 => tile::<Q4_1>,
        Q5_0 => tile::<Q5_0>,
        Q5_1 => tile::<Q5_1>,
        _ => tile::<{ super::Q8_0 }>,
    };
    Kernels { r: 1, main: [tile; 4], tail: [tile; 4], t_max: 1, offset: 0, simd: false, panel: None }
}

/// Reads the little-endian `f16` at `b[at..at + 2]` as `f32`.
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Integer value `j` (`0..32`) of one block of format `F`, offsets included.
#[inline(always)]
fn value<const F: u8>(blk: &[u8], j: usize) -> i32 {
    let nib = |qs: usize| {
        let byte = blk[qs + (j % 16)];
        (if j < 16 { byte & 0x0F } else { byte >> 4 }) as i32
    };
    let high = |qh: usize| {
        let bits = u32::from_le_bytes([blk[qh], blk[qh + 1], blk[qh + 2], blk[qh + 3]]);
        (((bits >> j) & 1) << 4) as i32
    };
    match F {
        Q4_0 => nib(2) - 8,
        Q4_1 => nib(4),
        Q5_0 => (nib(6) | high(2)) - 16,
        Q5_1 => nib(8) | high(4),
        _ => blk[2 + j] as i8 as i32,
    }
}

/// Dot product of one weight row of format `F` with one activation row.
///
/// # Safety
/// See [`TileFn`] with `R = T = 1`.
unsafe fn tile<const F: u8>(w: *const u8, _row_bytes: usize, acts: Acts, dst: *mut f32, _ldd: usize) {
    let bb = block_bytes(F);
    let nb = acts.nb;
    // SAFETY: the caller guarantees one weight row of `nb` blocks and one activation row.
    let (row, qs, d, s8) = unsafe {
        (
            std::slice::from_raw_parts(w, nb * bb),
            std::slice::from_raw_parts(acts.qs, acts.k),
            std::slice::from_raw_parts(acts.d, nb),
            has_min(F).then(|| std::slice::from_raw_parts(acts.s8, nb)),
        )
    };
    let mut sum = 0f32;
    for (b, (blk, a)) in row.chunks_exact(bb).zip(qs.chunks_exact(QK)).enumerate() {
        let sumi: i32 = a.iter().enumerate().map(|(j, &a)| value::<F>(blk, j) * a as i32).sum();
        sum += sumi as f32 * f16_at(blk, 0) * d[b];
        if let Some(s8) = s8 {
            sum += f16_at(blk, 2) * (s8[b] * 8.0);
        }
    }
    // SAFETY: the caller guarantees `dst` is writable.
    unsafe { *dst = sum };
}
