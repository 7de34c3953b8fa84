//! Per-session key/value cache of one span, in fixed-size blocks (paged).
//!
//! A session's cache is a list of blocks of [`KV_BLOCK`] positions each, taken from a
//! [`KvPool`] as the session grows and given back when it shrinks or ends: many sessions of
//! different lengths share one budget with no reservation of their maximum length and no
//! fragmentation (vLLM's paged attention, with the block table kept per session). A pool with
//! no block left refuses the step with [`Error::KvCacheFull`] and leaves the cache unchanged,
//! so a worker can say so and the origin can route elsewhere.
//!
//! Blocks live in host memory in the cache's precision (attention reads them directly, see
//! [`crate::attention`]): f16 for GGUF models, as llama.cpp's default cache, 2 bytes a value;
//! the compute dtype otherwise (f32 on the CPU, 4 bytes; bf16 and f16 as 2). A block holds,
//! for each layer of the span, K then V as `[n_kv_heads][KV_BLOCK][head_dim]`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::DType;

use crate::error::{Error, Result};

/// Positions per block.
pub const KV_BLOCK: usize = 16;

/// Blocks given back and kept for reuse, at most (the rest are freed).
const MAX_SPARE_BLOCKS: usize = 256;

/// A budget of KV blocks shared by the sessions of one span. Cloning shares the budget.
#[derive(Clone, Debug)]
pub struct KvPool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    /// Values per block.
    block_values: usize,
    /// How the values are stored.
    precision: DType,
    /// Blocks the budget holds (`usize::MAX`: unlimited).
    max_blocks: usize,
    used: AtomicUsize,
    spare: Mutex<Vec<Block>>,
}

/// One block's values: f32, or the bits of f16 / bf16 values.
#[derive(Debug)]
enum Block {
    F32(Box<[f32]>),
    Half(Box<[u16]>),
}

/// Bytes of one value stored in `precision`.
fn value_bytes(precision: DType) -> usize {
    match precision {
        DType::F16 | DType::BF16 => 2,
        _ => 4,
    }
}

/// The rows of one block of K or V, in the cache's storage (see [`KvCache::rows`]).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    Bf16(&'a [u16]),
}

impl Rows<'_> {
    /// Row `slot` (of `hd` values) as f32: borrowed when stored as f32, else widened into `buf`
    /// (exactly: every f16 and bf16 value is an f32).
    pub(crate) fn row<'b>(&'b self, slot: usize, hd: usize, buf: &'b mut Vec<f32>) -> &'b [f32] {
        let range = slot * hd..(slot + 1) * hd;
        match self {
            Rows::F32(r) => &r[range],
            Rows::F16(r) => {
                buf.clear();
                buf.extend(r[range].iter().map(|&b| half::f16::from_bits(b).to_f32()));
                buf
            }
            Rows::Bf16(r) => {
                buf.clear();
                buf.extend(r[range].iter().map(|&b| half::bf16::from_bits(b).to_f32()));
                buf
            }
        }
    }
}

impl KvPool {
    /// A pool of `budget_bytes` for blocks of `block_values` values stored in `precision`.
    pub(crate) fn new(block_values: usize, precision: DType, budget_bytes: Option<usize>) -> Self {
        let block_bytes = block_values * value_bytes(precision);
        let max_blocks = budget_bytes.map_or(usize::MAX, |b| b / block_bytes.max(1));
        Self {
            inner: Arc::new(PoolInner {
                block_values,
                precision,
                max_blocks,
                used: AtomicUsize::new(0),
                spare: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.inner.block_values * value_bytes(self.inner.precision)
    }

    /// Whether this pool's blocks fit caches of `block_values` values in `precision`.
    pub(crate) fn fits(&self, block_values: usize, precision: DType) -> bool {
        self.inner.block_values == block_values && value_bytes(self.inner.precision) == value_bytes(precision)
    }

    /// Blocks the budget holds (`usize::MAX` when unlimited).
    pub fn capacity_blocks(&self) -> usize {
        self.inner.max_blocks
    }

    /// Blocks held by caches now.
    pub fn used_blocks(&self) -> usize {
        self.inner.used.load(Ordering::Acquire)
    }

    /// Blocks still free.
    pub fn free_blocks(&self) -> usize {
        self.inner.max_blocks.saturating_sub(self.used_blocks())
    }

    /// Bytes of the budget still free.
    pub fn free_bytes(&self) -> usize {
        self.free_blocks().saturating_mul(self.block_bytes())
    }

    /// Bytes held by caches now.
    pub fn used_bytes(&self) -> usize {
        self.used_blocks() * self.block_bytes()
    }

    /// Takes `n` blocks, all or none.
    fn take(&self, n: usize) -> Result<Vec<Block>> {
        let inner = &self.inner;
        let mut used = inner.used.load(Ordering::Acquire);
        loop {
            let want = used.saturating_add(n);
            if want > inner.max_blocks {
                return Err(Error::KvCacheFull {
                    needed: n * self.block_bytes(),
                    free: inner.max_blocks.saturating_sub(used) * self.block_bytes(),
                });
            }
            match inner.used.compare_exchange(used, want, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => used = now,
            }
        }
        let mut spare = inner.spare.lock().unwrap_or_else(|e| e.into_inner());
        Ok((0..n)
            .map(|_| {
                spare.pop().unwrap_or_else(|| match value_bytes(inner.precision) {
                    2 => Block::Half(vec![0u16; inner.block_values].into_boxed_slice()),
                    _ => Block::F32(vec![0f32; inner.block_values].into_boxed_slice()),
                })
            })
            .collect())
    }

    /// Gives blocks back.
    fn give(&self, blocks: impl ExactSizeIterator<Item = Block>) {
        let n = blocks.len();
        let mut spare = self.inner.spare.lock().unwrap_or_else(|e| e.into_inner());
        for b in blocks {
            if spare.len() < MAX_SPARE_BLOCKS {
                spare.push(b);
            }
        }
        drop(spare);
        self.inner.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// The KV cache of one session on one span.
#[derive(Debug)]
pub struct KvCache {
    pool: KvPool,
    /// The blocks held: block `first + i` of the session is `blocks[i]`.
    blocks: Vec<Block>,
    /// Leading blocks given back because no later position can see them (sliding window).
    first: usize,
    len: usize,
    max_len: usize,
    n_kv_heads: usize,
    head_dim: usize,
    precision: DType,
}

impl KvCache {
    /// An empty cache for `n_layers` layers drawing blocks from `pool` (whose blocks must have
    /// this geometry: the shard checks it).
    pub(crate) fn new(
        pool: KvPool,
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        max_len: usize,
        precision: DType,
    ) -> Self {
        debug_assert!(pool.fits(block_values(n_layers, n_kv_heads, head_dim), precision));
        Self { pool, blocks: Vec::new(), first: 0, len: 0, max_len, n_kv_heads, head_dim, precision }
    }

    /// Positions already cached: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maximum positions this cache accepts.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Bytes of the blocks this cache holds now.
    pub fn bytes(&self) -> usize {
        self.blocks.len() * self.pool.block_bytes()
    }

    /// Bytes of the blocks `positions` tokens take.
    pub fn bytes_for(&self, positions: usize) -> usize {
        positions.div_ceil(KV_BLOCK) * self.pool.block_bytes()
    }

    /// Forgets every position and gives the blocks back.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Forgets the positions from `len` on and gives back the blocks no longer needed; a
    /// no-op when shorter. Going back before the first position still held (see
    /// [`KvCache::first_position`]) forgets everything: those positions are gone.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        if self.len < self.first_position() {
            self.len = 0;
        }
        if self.len == 0 {
            self.first = 0;
        }
        let keep = self.len.div_ceil(KV_BLOCK).saturating_sub(self.first);
        if self.blocks.len() > keep {
            self.pool.give(self.blocks.drain(keep..));
        }
    }

    /// The first position whose K and V are still held (0 unless a sliding window let the
    /// cache give blocks back).
    pub fn first_position(&self) -> usize {
        self.first * KV_BLOCK
    }

    /// Gives back the whole blocks of positions before `pos` (the span's layers all attend
    /// through a sliding window, and no position from `pos` on can see them).
    pub(crate) fn release_before(&mut self, pos: usize) {
        let drop = (pos.min(self.len) / KV_BLOCK).saturating_sub(self.first).min(self.blocks.len());
        if drop > 0 {
            self.pool.give(self.blocks.drain(..drop));
            self.first += drop;
        }
    }

    /// Makes room for `extra` more positions, taking blocks from the pool ([`crate::Shard`]'s
    /// forward calls it; a worker may call it first to refuse one session of a batch). On
    /// error (too long, budget full) nothing changes.
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        if needed > self.max_len {
            return Err(Error::SequenceTooLong { len: needed, max: self.max_len });
        }
        let blocks = needed.div_ceil(KV_BLOCK) - self.first;
        if blocks > self.blocks.len() {
            let fresh = self.pool.take(blocks - self.blocks.len())?;
            self.blocks.extend(fresh);
        }
        Ok(())
    }

    /// Offset of `(layer, kind, head)` inside a block; kind 0 is K, 1 is V.
    fn offset(&self, layer: usize, kind: usize, head: usize) -> usize {
        ((layer * 2 + kind) * self.n_kv_heads + head) * KV_BLOCK * self.head_dim
    }

    /// Writes K and V of one position (`n_kv_heads * head_dim` values each, head-major) of
    /// `layer`, rounded to the cache's precision. The position must be reserved.
    pub(crate) fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        let precision = self.precision;
        let (b, slot) = (pos / KV_BLOCK - self.first, pos % KV_BLOCK);
        for kind in 0..2 {
            let src = if kind == 0 { k } else { v };
            for h in 0..self.n_kv_heads {
                let at = self.offset(layer, kind, h) + slot * hd;
                let src = &src[h * hd..(h + 1) * hd];
                match &mut self.blocks[b] {
                    Block::F32(d) => round_into(&mut d[at..at + hd], src, precision),
                    Block::Half(d) if precision == DType::F16 => f16_bits_into(&mut d[at..at + hd], src),
                    Block::Half(d) => {
                        for (d, &s) in d[at..at + hd].iter_mut().zip(src) {
                            *d = half::bf16::from_f32(s).to_bits();
                        }
                    }
                }
            }
        }
    }

    /// K (kind 0) or V (kind 1) of `head` at positions `block * KV_BLOCK ..` of `layer`: up to
    /// [`KV_BLOCK`] rows of `head_dim` values. The block must still be held.
    pub(crate) fn rows(&self, layer: usize, kind: usize, head: usize, block: usize) -> Rows<'_> {
        let range = self.offset(layer, kind, head)..self.offset(layer, kind, head) + KV_BLOCK * self.head_dim;
        match &self.blocks[block - self.first] {
            Block::F32(b) => Rows::F32(&b[range]),
            Block::Half(b) if self.precision == DType::F16 => Rows::F16(&b[range]),
            Block::Half(b) => Rows::Bf16(&b[range]),
        }
    }

    /// The precision values are rounded to.
    pub(crate) fn precision(&self) -> DType {
        self.precision
    }

    /// Commits `t` written positions.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Values per cached row.
    pub(crate) fn head_dim(&self) -> usize {
        self.head_dim
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Values of one block for this geometry.
pub(crate) fn block_values(n_layers: usize, n_kv_heads: usize, head_dim: usize) -> usize {
    n_layers * 2 * n_kv_heads * KV_BLOCK * head_dim
}

/// `x` rounded to `precision` (and back to f32).
pub(crate) fn round_to(x: f32, precision: DType) -> f32 {
    match precision {
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// `dst = src` rounded to `precision` (the two of one length).
pub(crate) fn round_into(dst: &mut [f32], src: &[f32], precision: DType) {
    dst.copy_from_slice(src);
    round_in_place(dst, precision);
}

/// `x[i] = round_to(x[i], precision)`; with F16C, f16 rounding runs 8 values per instruction
/// (the same round-to-nearest-even, so the same bits).
pub(crate) fn round_in_place(x: &mut [f32], precision: DType) {
    #[cfg(target_arch = "x86_64")]
    if precision == DType::F16 && crate::kernels::level() >= crate::kernels::Level::Avx2 {
        // SAFETY: `Level::Avx2` includes F16C (checked at run time just above).
        unsafe { round_f16_f16c(x) };
        return;
    }
    if precision != DType::F32 {
        for v in x {
            *v = round_to(*v, precision);
        }
    }
}

/// `dst[i]` = the f16 bits of `src[i]` (round to nearest even), 8 at a time with F16C.
fn f16_bits_into(dst: &mut [u16], src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::level() >= crate::kernels::Level::Avx2 {
        // SAFETY: `Level::Avx2` includes F16C (checked at run time just above).
        unsafe { f16_bits_f16c(dst, src) };
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_f32(s).to_bits();
    }
}

/// [`f16_bits_into`] with F16C.
///
/// # Safety
/// The CPU must support AVX and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_bits_f16c(dst: &mut [u16], src: &[f32]) {
    use std::arch::x86_64::*;
    let (d8, d_tail) = dst.as_chunks_mut::<8>();
    let (s8, s_tail) = src.as_chunks::<8>();
    for (d, s) in d8.iter_mut().zip(s8) {
        // SAFETY: 8 readable values and 8 writable ones; the features are enabled.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(s.as_ptr()));
            _mm_storeu_si128(d.as_mut_ptr().cast(), h);
        }
    }
    for (d, &s) in d_tail.iter_mut().zip(s_tail) {
        *d = half::f16::from_f32(s).to_bits();
    }
}

/// [`round_in_place`] to f16 with F16C.
///
/// # Safety
/// The CPU must support AVX and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn round_f16_f16c(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let (x8, tail) = x.as_chunks_mut::<8>();
    for c in x8 {
        // SAFETY: 8 readable and writable values; the features are enabled.
        unsafe {
            let v = _mm256_loadu_ps(c.as_ptr());
            let r = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v));
            _mm256_storeu_ps(c.as_mut_ptr(), r);
        }
    }
    for v in tail {
        *v = round_to(*v, DType::F16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(pool: &KvPool, max_len: usize) -> KvCache {
        KvCache::new(pool.clone(), 2, 1, 4, max_len, DType::F32)
    }

    #[test]
    fn blocks_come_from_the_pool_and_go_back() {
        let pool = KvPool::new(block_values(2, 1, 4), DType::F32, Some(3 * block_values(2, 1, 4) * 4));
        assert_eq!(pool.capacity_blocks(), 3);
        let mut a = cache(&pool, 1000);
        a.reserve(KV_BLOCK + 1).unwrap();
        assert_eq!((pool.used_blocks(), a.bytes()), (2, 2 * pool.block_bytes()));
        let mut b = cache(&pool, 1000);
        b.reserve(1).unwrap();
        let err = b.reserve(KV_BLOCK + 1).map(|_| ()).unwrap_err();
        assert!(matches!(err, Error::KvCacheFull { .. }), "{err}");
        assert_eq!(b.bytes(), pool.block_bytes(), "a refused reserve changes nothing");
        a.advance(KV_BLOCK + 1);
        a.truncate(3);
        assert_eq!(pool.used_blocks(), 2);
        drop(a);
        drop(b);
        assert_eq!(pool.used_blocks(), 0);
    }

    #[test]
    fn written_values_are_read_back_rounded() {
        for precision in [DType::F16, DType::BF16, DType::F32] {
            let pool = KvPool::new(block_values(2, 1, 4), precision, None);
            let mut c = KvCache::new(pool.clone(), 2, 1, 4, 100, precision);
            c.reserve(KV_BLOCK + 2).unwrap();
            assert_eq!(c.bytes(), 2 * block_values(2, 1, 4) * value_bytes(precision));
            // 10 values: a vector of 8 and a tail for the F16C path.
            let k = [1.0f32, 1.0e-4 + 1.0, -3.0, 0.1, 7.7, -1.0e-3, 65504.0, 1.0e6, 0.3, -0.7];
            let v = [5.0f32, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0];
            let mut c =
                KvCache::new(KvPool::new(block_values(2, 1, 10), precision, None), 2, 1, 10, 100, precision);
            c.reserve(KV_BLOCK + 2).unwrap();
            c.write(1, KV_BLOCK + 1, &k, &v);
            let mut buf = Vec::new();
            let rows = c.rows(1, 0, 0, 1);
            let got = rows.row(1, 10, &mut buf).to_vec();
            assert_eq!(got, k.map(|x| round_to(x, precision)), "{precision:?}");
            let mut rounded = k;
            round_in_place(&mut rounded, precision);
            assert_eq!(rounded, k.map(|x| round_to(x, precision)), "{precision:?}: in place");
            assert_eq!(c.rows(1, 1, 0, 1).row(1, 10, &mut buf), &v, "{precision:?}");
            assert_eq!(got[1] != k[1], precision != DType::F32, "{precision:?}: rounding");
            assert_eq!(pool.used_blocks(), 2);
        }
    }

    #[test]
    fn released_blocks_go_back_and_positions_keep_their_blocks() {
        let pool = KvPool::new(block_values(2, 1, 4), DType::F32, None);
        let mut c = cache(&pool, 1000);
        c.reserve(3 * KV_BLOCK + 5).unwrap();
        for pos in 0..3 * KV_BLOCK + 5 {
            c.write(0, pos, &[pos as f32; 4], &[-(pos as f32); 4]);
        }
        c.advance(3 * KV_BLOCK + 5);
        assert_eq!(pool.used_blocks(), 4);
        c.release_before(2 * KV_BLOCK + 3);
        assert_eq!((pool.used_blocks(), c.first_position()), (2, 2 * KV_BLOCK));
        let mut buf = Vec::new();
        assert_eq!(c.rows(0, 0, 0, 2).row(3, 4, &mut buf), &[(2 * KV_BLOCK + 3) as f32; 4]);
        assert_eq!(c.rows(0, 1, 0, 3).row(4, 4, &mut buf), &[-((3 * KV_BLOCK + 4) as f32); 4]);
        // Growing takes blocks for the new positions only.
        c.reserve(KV_BLOCK).unwrap();
        assert_eq!(pool.used_blocks(), 3);
        c.write(0, 4 * KV_BLOCK + 2, &[7.0; 4], &[8.0; 4]);
        assert_eq!(c.rows(0, 0, 0, 4).row(2, 4, &mut buf), &[7.0; 4]);
        // Going back inside what is held keeps it; before it, forgets everything.
        c.truncate(2 * KV_BLOCK + 1);
        assert_eq!((c.len(), pool.used_blocks()), (2 * KV_BLOCK + 1, 1));
        c.truncate(KV_BLOCK);
        assert_eq!((c.len(), c.first_position(), pool.used_blocks()), (0, 0, 0));
        c.reserve(1).unwrap();
        assert_eq!(pool.used_blocks(), 1);
    }

    #[test]
    fn too_long_is_refused() {
        let pool = KvPool::new(block_values(2, 1, 4), DType::F32, None);
        let mut c = cache(&pool, 10);
        assert!(matches!(c.reserve(11), Err(Error::SequenceTooLong { len: 11, max: 10 })));
    }
}
