//! Per-session key/value cache of one span, in fixed-size blocks (paged).
//!
//! A session's cache is a list of blocks of [`KV_BLOCK`] positions each, taken from a
//! [`KvPool`] as the session grows and given back when it shrinks or ends: many sessions of
//! different lengths share one budget with no reservation of their maximum length and no
//! fragmentation (vLLM's paged attention, with the block table kept per session). A pool with
//! no block left refuses the step with [`Error::KvCacheFull`] and leaves the cache unchanged,
//! so a worker can say so and the origin can route elsewhere.
//!
//! Blocks live in host memory as f32 (attention reads them directly, see
//! [`crate::attention`]); values are rounded to the cache's precision first: f16 for GGUF
//! models, as llama.cpp's default cache does, the compute dtype otherwise. A block holds, for
//! each layer of the span, K then V as `[n_kv_heads][KV_BLOCK][head_dim]`.

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
    /// f32 values per block.
    block_floats: usize,
    /// Blocks the budget holds (`usize::MAX`: unlimited).
    max_blocks: usize,
    used: AtomicUsize,
    spare: Mutex<Vec<Box<[f32]>>>,
}

impl KvPool {
    /// A pool of `budget_bytes` for blocks of `block_floats` f32 values.
    pub(crate) fn new(block_floats: usize, budget_bytes: Option<usize>) -> Self {
        let block_bytes = block_floats * 4;
        let max_blocks = budget_bytes.map_or(usize::MAX, |b| b / block_bytes.max(1));
        Self {
            inner: Arc::new(PoolInner {
                block_floats,
                max_blocks,
                used: AtomicUsize::new(0),
                spare: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.inner.block_floats * 4
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
    fn take(&self, n: usize) -> Result<Vec<Box<[f32]>>> {
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
            .map(|_| spare.pop().unwrap_or_else(|| vec![0f32; inner.block_floats].into_boxed_slice()))
            .collect())
    }

    /// Gives blocks back.
    fn give(&self, blocks: impl ExactSizeIterator<Item = Box<[f32]>>) {
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
    blocks: Vec<Box<[f32]>>,
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
        debug_assert_eq!(pool.inner.block_floats, block_floats(n_layers, n_kv_heads, head_dim));
        Self { pool, blocks: Vec::new(), len: 0, max_len, n_kv_heads, head_dim, precision }
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
    /// no-op when shorter.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        let keep = self.len.div_ceil(KV_BLOCK);
        if self.blocks.len() > keep {
            self.pool.give(self.blocks.drain(keep..));
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
        let blocks = needed.div_ceil(KV_BLOCK);
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
        let (b, slot) = (pos / KV_BLOCK, pos % KV_BLOCK);
        for kind in 0..2 {
            let src = if kind == 0 { k } else { v };
            for h in 0..self.n_kv_heads {
                let at = self.offset(layer, kind, h) + slot * hd;
                round_into(&mut self.blocks[b][at..at + hd], &src[h * hd..(h + 1) * hd], precision);
            }
        }
    }

    /// K (kind 0) or V (kind 1) of `head` at positions `block * KV_BLOCK ..` of `layer`: up to
    /// [`KV_BLOCK`] rows of `head_dim` values.
    pub(crate) fn rows(&self, layer: usize, kind: usize, head: usize, block: usize) -> &[f32] {
        let at = self.offset(layer, kind, head);
        &self.blocks[block][at..at + KV_BLOCK * self.head_dim]
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

/// f32 values of one block for this geometry.
pub(crate) fn block_floats(n_layers: usize, n_kv_heads: usize, head_dim: usize) -> usize {
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
        let pool = KvPool::new(block_floats(2, 1, 4), Some(3 * block_floats(2, 1, 4) * 4));
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
        let pool = KvPool::new(block_floats(2, 1, 4), None);
        let mut c = KvCache::new(pool, 2, 1, 4, 100, DType::F16);
        c.reserve(KV_BLOCK + 2).unwrap();
        let k = [1.0f32, 1.0e-4 + 1.0, -3.0, 0.1];
        let v = [5.0f32, 6.0, 7.0, 8.0];
        c.write(1, KV_BLOCK + 1, &k, &v);
        let rows = c.rows(1, 0, 0, 1);
        assert_eq!(&rows[4..8], &k.map(|x| round_to(x, DType::F16)));
        assert_eq!(&c.rows(1, 1, 0, 1)[4..8], &v);
        assert_ne!(rows[5], k[1], "f16 rounding happened");
    }

    #[test]
    fn too_long_is_refused() {
        let pool = KvPool::new(block_floats(2, 1, 4), None);
        let mut c = cache(&pool, 10);
        assert!(matches!(c.reserve(11), Err(Error::SequenceTooLong { len: 11, max: 10 })));
    }
}
