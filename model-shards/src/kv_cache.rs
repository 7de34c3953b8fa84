//! Per-session key/value cache of one span.
//!
//! Each layer of the span keeps K and V as `(n_kv_heads, capacity, head_dim)` buffers that grow
//! by doubling (amortised O(1) appends, no re-concatenation per token), up to the model's
//! maximum length. Values are rounded to the cache's precision: f16 for GGUF models, as
//! llama.cpp's default cache does, the compute dtype otherwise. [`KvCache::bytes`] reports what is allocated, so a worker can hold sessions
//! under a memory budget.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Smallest allocation, in positions.
const MIN_CAPACITY: usize = 64;

/// K and V buffers of one layer.
#[derive(Debug, Default)]
pub(crate) struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

/// The KV cache of one session on one span.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
    capacity: usize,
    max_len: usize,
    n_kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    precision: DType,
    device: Device,
}

impl KvCache {
    /// An empty cache for `n_layers` layers.
    pub(crate) fn new(
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        max_len: usize,
        dtype: DType,
        precision: DType,
        device: Device,
    ) -> Self {
        Self {
            layers: (0..n_layers).map(|_| LayerKv::default()).collect(),
            len: 0,
            capacity: 0,
            max_len,
            n_kv_heads,
            head_dim,
            dtype,
            precision,
            device,
        }
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

    /// Bytes currently allocated for K and V across the span's layers.
    pub fn bytes(&self) -> usize {
        self.layers.len() * 2 * self.capacity * self.n_kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }

    /// Bytes the cache would hold with room for `positions` tokens (for admission control).
    pub fn bytes_for(&self, positions: usize) -> usize {
        self.layers.len() * 2 * positions * self.n_kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }

    /// Forgets every position (keeps the allocation).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Forgets the positions from `len` on (keeps the allocation); a no-op when shorter.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Makes room for `extra` more positions; called once per step before the layers run.
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        if needed > self.max_len {
            return Err(Error::SequenceTooLong { len: needed, max: self.max_len });
        }
        if needed <= self.capacity {
            return Ok(());
        }
        let new_cap = needed.max(self.capacity * 2).max(MIN_CAPACITY).min(self.max_len);
        let shape = (self.n_kv_heads, new_cap, self.head_dim);
        for layer in &mut self.layers {
            for slot in [&mut layer.k, &mut layer.v] {
                let fresh = Tensor::zeros(shape, self.dtype, &self.device)?;
                if let Some(old) = slot.take()
                    && self.len > 0
                {
                    fresh.slice_set(&old.narrow(1, 0, self.len)?, 1, 0)?;
                }
                *slot = Some(fresh);
            }
        }
        self.capacity = new_cap;
        Ok(())
    }

    /// Writes `k` and `v` (`(n_kv_heads, t, head_dim)`) of layer `layer` at the current end and
    /// returns views of all cached positions including them. The caller advances the length
    /// with [`KvCache::advance`] once every layer has been written.
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(1)?;
        let total = self.len + t;
        let slot = self
            .layers
            .get(layer)
            .ok_or_else(|| Error::InvalidInput(format!("layer {layer} is not in this cache")))?;
        let (Some(kc), Some(vc)) = (&slot.k, &slot.v) else {
            return Err(Error::InvalidInput("kv cache used before reserve".into()));
        };
        kc.slice_set(&self.store(k)?, 1, self.len)?;
        vc.slice_set(&self.store(v)?, 1, self.len)?;
        Ok((kc.narrow(1, 0, total)?, vc.narrow(1, 0, total)?))
    }

    /// Converts new K or V values to what the cache holds: values rounded to the cache's
    /// precision, stored in its dtype (f32 on the CPU, so attention reads them without
    /// conversion).
    fn store(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.precision != self.dtype { x.to_dtype(self.precision)? } else { x.clone() };
        Ok(x.to_dtype(self.dtype)?.contiguous()?)
    }

    /// Commits `t` appended positions.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
