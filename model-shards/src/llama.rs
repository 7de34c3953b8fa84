//! The Llama-family transformer block (llama, mistral, qwen2, qwen3).
//!
//! The families differ only by flags of the [`ModelSpec`]: bias on q/k/v (qwen2), RMSNorm of q
//! and k per head (qwen3), sliding-window attention (mistral), the rope pairing and Llama 3
//! frequency scaling. Weight names follow the source format (see [`crate::weights`]).

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::rope::Rope;
use crate::spec::ModelSpec;
use crate::weights::{LayerWeight as L, WeightName, Weights};

/// RMSNorm with a learned scale.
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub(crate) fn load(w: &Weights, name: WeightName, dim: usize, eps: f64, device: &Device) -> Result<Self> {
        Ok(Self { weight: w.load_dense(name, &[dim], device)?, eps: eps as f32 })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)?)
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    sliding_window: Option<usize>,
}

impl Attention {
    fn load(w: &Weights, i: usize, spec: &ModelSpec, device: &Device, dtype: DType) -> Result<Self> {
        let (h, hd) = (spec.hidden_size, spec.head_dim);
        let bias = |b| spec.attention_bias.then_some(WeightName::Layer(i, b));
        let lin = |name, b, shape| Linear::load(w, WeightName::Layer(i, name), b, shape, device, dtype);
        let norm = |name| RmsNorm::load(w, WeightName::Layer(i, name), hd, spec.rms_norm_eps, device);
        Ok(Self {
            q: lin(L::Q, bias(L::QBias), (spec.n_heads * hd, h))?,
            k: lin(L::K, bias(L::KBias), (spec.n_kv_heads * hd, h))?,
            v: lin(L::V, bias(L::VBias), (spec.n_kv_heads * hd, h))?,
            o: lin(L::O, None, (h, spec.n_heads * hd))?,
            q_norm: if spec.qk_norm { Some(norm(L::QNorm)?) } else { None },
            k_norm: if spec.qk_norm { Some(norm(L::KNorm)?) } else { None },
            n_heads: spec.n_heads,
            n_kv_heads: spec.n_kv_heads,
            head_dim: hd,
            sliding_window: spec.sliding_window,
        })
    }

    /// `x`: `(t, hidden)` at positions `start..start + t`.
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cache: &mut KvCache,
        rope: &Rope,
        cos_sin: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let out = self.attend(
            self.q.forward(x)?,
            self.k.forward(x)?,
            self.v.forward(x)?,
            layer,
            cache,
            rope,
            cos_sin,
        )?;
        self.o.forward(&out)
    }

    /// One new position for each of several sessions: row `i` of `x` (`(b, hidden)`) is the
    /// next position of `caches[i]`, with rope tables `cos_sin[i]`. Every row gets exactly the
    /// bits [`Attention::forward`] gives it alone.
    fn forward_batch(
        &self,
        x: &Tensor,
        layer: usize,
        caches: &mut [&mut KvCache],
        rope: &Rope,
        cos_sin: &[(Tensor, Tensor)],
    ) -> Result<Tensor> {
        let (q, k, v) = (self.q.forward_rows(x)?, self.k.forward_rows(x)?, self.v.forward_rows(x)?);
        let mut outs = Vec::with_capacity(caches.len());
        for (i, (cache, cs)) in caches.iter_mut().zip(cos_sin).enumerate() {
            let row = |y: &Tensor| y.narrow(0, i, 1);
            outs.push(self.attend(row(&q)?, row(&k)?, row(&v)?, layer, cache, rope, cs)?);
        }
        self.o.forward_rows(&Tensor::cat(&outs, 0)?)
    }

    /// Attention of one session from its q, k, v projections (`(t, heads * head_dim)`), before
    /// the output projection.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        layer: usize,
        cache: &mut KvCache,
        rope: &Rope,
        cos_sin: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let (t, _) = q.dims2()?;
        let start = cache.len();
        let hd = self.head_dim;
        let heads = |y: Tensor, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let mut y = y.reshape((t, n, hd))?;
            if let Some(norm) = norm {
                y = norm.forward(&y)?;
            }
            Ok(y.transpose(0, 1)?.unsqueeze(0)?)
        };
        let q = heads(q, self.n_heads, &self.q_norm)?;
        let k = heads(k, self.n_kv_heads, &self.k_norm)?;
        let v = v.reshape((t, self.n_kv_heads, hd))?.transpose(0, 1)?;
        let (cos, sin) = cos_sin;
        let q = rope.apply(&q, cos, sin)?.squeeze(0)?;
        let k = rope.apply(&k, cos, sin)?.squeeze(0)?;

        let (k_all, v_all) = cache.append(layer, &k, &v)?;
        let total = start + t;
        // Grouped-query attention without copying K/V: the query heads sharing a kv head are
        // stacked along the row axis.
        let n_rep = self.n_heads / self.n_kv_heads;
        let q = q.reshape((self.n_kv_heads, n_rep * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k_all.t()?)? * scale)?;
        let needs_mask = t > 1 || self.sliding_window.is_some_and(|w| total > w);
        let scores = if needs_mask {
            let mask = attention_mask(t, start, self.sliding_window, q.device())?;
            scores.reshape((self.n_kv_heads, n_rep, t, total))?.broadcast_add(&mask)?.reshape((
                self.n_kv_heads,
                n_rep * t,
                total,
            ))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v_all.contiguous()?)?; // (n_kv, n_rep * t, hd)
        Ok(out.reshape((self.n_heads, t, hd))?.transpose(0, 1)?.reshape((t, self.n_heads * hd))?)
    }
}

/// Additive mask `(t, start + t)`: 0 where query i may see key j, -inf elsewhere.
fn attention_mask(t: usize, start: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let total = start + t;
    let mut m = vec![0f32; t * total];
    for i in 0..t {
        let pos = start + i;
        for j in 0..total {
            let future = j > pos;
            let too_old = window.is_some_and(|w| pos >= w && j <= pos - w);
            if future || too_old {
                m[i * total + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(m, (t, total), device)?)
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn load(w: &Weights, i: usize, spec: &ModelSpec, device: &Device, dtype: DType) -> Result<Self> {
        let (h, f) = (spec.hidden_size, spec.intermediate_size);
        let lin = |name, shape| Linear::load(w, WeightName::Layer(i, name), None, shape, device, dtype);
        Ok(Self { gate: lin(L::Gate, (f, h))?, up: lin(L::Up, (f, h))?, down: lin(L::Down, (h, f))? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate.forward(x)?;
        let u = self.up.forward(x)?;
        self.down.forward(&(candle_nn::ops::silu(&g)? * u)?)
    }

    /// [`Mlp::forward`] on rows of independent sessions, each with the bits it gets alone.
    fn forward_rows(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate.forward_rows(x)?;
        let u = self.up.forward_rows(x)?;
        self.down.forward_rows(&(candle_nn::ops::silu(&g)? * u)?)
    }
}

/// One transformer block.
pub(crate) struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    pub(crate) fn load(
        w: &Weights,
        i: usize,
        spec: &ModelSpec,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let norm =
            |name| RmsNorm::load(w, WeightName::Layer(i, name), spec.hidden_size, spec.rms_norm_eps, device);
        Ok(Self {
            attn_norm: norm(L::AttnNorm)?,
            attn: Attention::load(w, i, spec, device, dtype)?,
            ffn_norm: norm(L::FfnNorm)?,
            mlp: Mlp::load(w, i, spec, device, dtype)?,
        })
    }

    /// `x`: `(t, hidden)`; `layer` is the index inside the span's cache.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cache: &mut KvCache,
        rope: &Rope,
        cos_sin: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let h = self.attn.forward(&self.attn_norm.forward(x)?, layer, cache, rope, cos_sin)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.ffn_norm.forward(&x)?)?;
        Ok((x + h)?)
    }

    /// One new position for each of several sessions (see [`Attention::forward_batch`]).
    pub(crate) fn forward_batch(
        &self,
        x: &Tensor,
        layer: usize,
        caches: &mut [&mut KvCache],
        rope: &Rope,
        cos_sin: &[(Tensor, Tensor)],
    ) -> Result<Tensor> {
        let h = self.attn.forward_batch(&self.attn_norm.forward(x)?, layer, caches, rope, cos_sin)?;
        let x = (x + h)?;
        let h = self.mlp.forward_rows(&self.ffn_norm.forward(&x)?)?;
        Ok((x + h)?)
    }
}
