//! The Llama-family transformer block (llama, mistral, mixtral, qwen2, qwen3, qwen3moe, phi3).
//!
//! The families differ only by flags of the [`ModelSpec`]: bias on q/k/v (qwen2), RMSNorm of q
//! and k per head (qwen3), sliding-window attention (mistral), the rope pairing and Llama 3
//! frequency scaling, and a mixture-of-experts feed-forward (Mixtral, Qwen3-MoE: see
//! [`crate::moe`]). Weight names follow the source format (see [`crate::weights`]).

use candle_core::{DType, Device, Tensor};

use crate::attention::{self, Heads};
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::rope::Rope;
use crate::sampler::det_exp;
use crate::spec::ModelSpec;
use crate::weights::{LayerWeight as L, WeightName, Weights};

/// RMSNorm with a learned scale.
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub(crate) fn load(w: &Weights, name: WeightName, dim: usize, eps: f64, device: &Device) -> Result<Self> {
        Ok(Self { weight: w.load_norm(name, dim, device)?, eps: eps as f32 })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)?)
    }
}

/// Projections that read the same input: separate, or stacked into one product (see
/// [`Linear::stacked`]) whose output columns are theirs side by side.
pub(crate) enum Projections {
    Separate(Vec<Linear>),
    Stacked(Linear),
}

impl Projections {
    /// `parts` stacked when they can be.
    pub(crate) fn new(parts: Vec<Linear>) -> Self {
        match Linear::stacked(parts) {
            Ok(l) => Self::Stacked(l),
            Err(parts) => Self::Separate(parts),
        }
    }

    /// Each projection of the rows of `x` (`(t, in)`), `widths` its output sizes.
    pub(crate) fn apply(
        &self,
        x: &Tensor,
        widths: &[usize],
        project: impl Fn(&Linear, &Tensor) -> Result<Tensor>,
    ) -> Result<Vec<Tensor>> {
        match self {
            Self::Separate(parts) => parts.iter().map(|l| project(l, x)).collect(),
            Self::Stacked(l) => {
                let y = project(l, x)?;
                let last = y.rank() - 1;
                let mut at = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = y.narrow(last, at, w)?;
                        at += w;
                        Ok(part)
                    })
                    .collect()
            }
        }
    }
}

pub(crate) struct Attention {
    /// q, k, v.
    qkv: Projections,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    sliding_window: Option<usize>,
    /// Multiplies the rotated query (before attention rounds it to the cache's precision), as
    /// llama.cpp does for Gemma; attention then leaves the scores unscaled.
    q_scale: Option<f32>,
    softcap: Option<f32>,
}

impl Attention {
    pub(crate) fn load(
        w: &Weights,
        i: usize,
        spec: &ModelSpec,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let (h, hd) = (spec.hidden_size, spec.head_dim);
        let bias = |b| spec.attention_bias.then_some(WeightName::Layer(i, b));
        let lin = |name, b, shape| Linear::load(w, WeightName::Layer(i, name), b, shape, device, dtype);
        let norm = |name| RmsNorm::load(w, WeightName::Layer(i, name), hd, spec.rms_norm_eps, device);
        let (qw, kw) = (spec.n_heads * hd, spec.n_kv_heads * hd);
        let qkv = if w.contains(WeightName::Layer(i, L::Qkv)) {
            // Fused (Phi-3): its output columns are q, k, v side by side.
            Projections::Stacked(lin(L::Qkv, None, (qw + 2 * kw, h))?)
        } else {
            Projections::new(vec![
                lin(L::Q, bias(L::QBias), (qw, h))?,
                lin(L::K, bias(L::KBias), (kw, h))?,
                lin(L::V, bias(L::VBias), (kw, h))?,
            ])
        };
        Ok(Self {
            qkv,
            o: lin(L::O, None, (h, spec.n_heads * hd))?,
            q_norm: if spec.qk_norm { Some(norm(L::QNorm)?) } else { None },
            k_norm: if spec.qk_norm { Some(norm(L::KNorm)?) } else { None },
            n_heads: spec.n_heads,
            n_kv_heads: spec.n_kv_heads,
            head_dim: hd,
            sliding_window: if spec.is_sliding(i) { spec.sliding_window } else { None },
            q_scale: spec.query_scale,
            softcap: spec.attn_logit_softcap,
        })
    }

    fn heads(&self) -> Heads {
        Heads {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            window: self.sliding_window,
            scale: if self.q_scale.is_some() { 1.0 } else { 1.0 / (self.head_dim as f32).sqrt() },
            softcap: self.softcap,
        }
    }

    /// `x`: `(t, hidden)` at the positions `cache.len()..cache.len() + t`. With `rows`, each
    /// row gets exactly the bits it gets alone (as a one-position step).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cache: &mut KvCache,
        rope: &Rope,
        rows: bool,
    ) -> Result<Tensor> {
        let t = x.dim(0)?;
        let (mut q, k, v) = self.qkv(x, |l, x| if rows { l.forward_rows(x) } else { l.forward(x) })?;
        let start = cache.len();
        self.rope_and_store(&mut q, &k, &v, layer, cache, rope, t);
        let job = attention::Job { q: &q, cache, start, t };
        let out = attention::attend_many(&self.heads(), &[job], layer).remove(0);
        let out =
            Tensor::from_vec(out, (t, self.n_heads * self.head_dim), x.device())?.to_dtype(x.dtype())?;
        if rows { self.o.forward_rows(&out) } else { self.o.forward(&out) }
    }

    /// Steps of several sessions: `x` (`(sum of lens, hidden)`) holds session `i`'s `lens[i]`
    /// new positions after those of the sessions before it, appended to `caches[i]`. Every
    /// row gets exactly the bits [`Attention::forward`] with `rows` gives it alone.
    pub(crate) fn forward_batch(
        &self,
        x: &Tensor,
        layer: usize,
        caches: &mut [&mut KvCache],
        lens: &[usize],
        rope: &Rope,
    ) -> Result<Tensor> {
        let (mut q, k, v) = self.qkv(x, |l, x| l.forward_rows(x))?;
        let (qw, kw) = (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim);
        let starts: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let offsets: Vec<usize> = lens
            .iter()
            .scan(0, |at, &t| {
                let o = *at;
                *at += t;
                Some(o)
            })
            .collect();
        for ((cache, &o), &t) in caches.iter_mut().zip(&offsets).zip(lens) {
            let (k, v) = (&k[o * kw..(o + t) * kw], &v[o * kw..(o + t) * kw]);
            self.rope_and_store(&mut q[o * qw..(o + t) * qw], k, v, layer, cache, rope, t);
        }
        let jobs: Vec<attention::Job<'_>> = caches
            .iter()
            .zip(&starts)
            .zip(offsets.iter().zip(lens))
            .map(|((cache, &start), (&o, &t))| attention::Job {
                q: &q[o * qw..(o + t) * qw],
                cache,
                start,
                t,
            })
            .collect();
        let outs = attention::attend_many(&self.heads(), &jobs, layer);
        let rows: usize = lens.iter().sum();
        self.o.forward_rows(&Tensor::from_vec(outs.concat(), (rows, qw), x.device())?.to_dtype(x.dtype())?)
    }

    /// The q, k, v projections of `x` (with qwen3's per-head norms) as host rows.
    fn qkv(
        &self,
        x: &Tensor,
        project: impl Fn(&Linear, &Tensor) -> Result<Tensor>,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let t = x.dim(0)?;
        let hd = self.head_dim;
        let host = |y: Tensor, n: usize, norm: &Option<RmsNorm>| -> Result<Vec<f32>> {
            let y = match norm {
                Some(norm) => norm.forward(&y.reshape((t, n, hd))?)?,
                None => y,
            };
            Ok(y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let (qw, kw) = (self.n_heads * hd, self.n_kv_heads * hd);
        let mut ys = self.qkv.apply(x, &[qw, kw, kw], project)?.into_iter();
        let (Some(q), Some(k), Some(v)) = (ys.next(), ys.next(), ys.next()) else {
            return Err(crate::Error::InvalidInput("attention needs q, k and v projections".into()));
        };
        Ok((
            host(q, self.n_heads, &self.q_norm)?,
            host(k, self.n_kv_heads, &self.k_norm)?,
            host(v, self.n_kv_heads, &None)?,
        ))
    }

    /// Rotates one session's `t` new q and k rows (in place for q) and writes K and V into its
    /// cache at the positions `cache.len()..cache.len() + t`.
    #[allow(clippy::too_many_arguments)]
    fn rope_and_store(
        &self,
        q: &mut [f32],
        k: &[f32],
        v: &[f32],
        layer: usize,
        cache: &mut KvCache,
        rope: &Rope,
        t: usize,
    ) {
        let start = cache.len();
        let (qw, kw) = (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim);
        let mut k_row = vec![0f32; kw];
        for i in 0..t {
            rope.rotate(&mut q[i * qw..(i + 1) * qw], start + i);
            k_row.copy_from_slice(&k[i * kw..(i + 1) * kw]);
            rope.rotate(&mut k_row, start + i);
            cache.write(layer, start + i, &k_row, &v[i * kw..(i + 1) * kw]);
        }
        if let Some(s) = self.q_scale {
            q[..t * qw].iter_mut().for_each(|x| *x *= s);
        }
    }
}

/// The gate's activation of a gated feed-forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    /// `silu(gate) · up` (llama, mistral, qwen).
    Silu,
    /// `gelu_tanh(gate) · up` (gemma), as llama.cpp computes it (see [`crate::gemma3::geglu`]).
    GeluTanhGgml,
    /// `gelu_tanh(gate) · up` (gemma) in f32, as transformers computes it.
    GeluTanh,
}

pub(crate) struct Mlp {
    /// gate, up.
    gate_up: Projections,
    /// Intermediate size.
    f: usize,
    down: Linear,
    gate: Gate,
}

impl Mlp {
    pub(crate) fn load(
        w: &Weights,
        i: usize,
        spec: &ModelSpec,
        device: &Device,
        dtype: DType,
        gate: Gate,
    ) -> Result<Self> {
        let (h, f) = (spec.hidden_size, spec.intermediate_size);
        let lin = |name, shape| Linear::load(w, WeightName::Layer(i, name), None, shape, device, dtype);
        let gate_up = if spec.arch == crate::spec::Architecture::Phi3 {
            // Fused (Phi-3): `ffn_up` holds the gate's rows, then the up projection's.
            Projections::Stacked(lin(L::Up, (2 * f, h))?)
        } else {
            Projections::new(vec![lin(L::Gate, (f, h))?, lin(L::Up, (f, h))?])
        };
        Ok(Self { gate_up, f, down: lin(L::Down, (h, f))?, gate })
    }

    fn act(&self, g: &Tensor, u: &Tensor) -> Result<Tensor> {
        match self.gate {
            Gate::Silu => swiglu(g, u),
            Gate::GeluTanhGgml => crate::gemma3::geglu(g, u),
            Gate::GeluTanh => Ok((g.gelu()? * u)?),
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up.apply(x, &[self.f, self.f], |l, x| l.forward(x))?;
        self.down.forward(&self.act(&gu[0], &gu[1])?)
    }

    /// [`Mlp::forward`] on rows of independent sessions, each with the bits it gets alone.
    pub(crate) fn forward_rows(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up.apply(x, &[self.f, self.f], |l, x| l.forward_rows(x))?;
        self.down.forward_rows(&self.act(&gu[0], &gu[1])?)
    }
}

/// `silu(g) · u`. On the CPU in f32 one vectorized pass on the host (the sigmoid from the
/// sampler's deterministic [`det_exp`], the same bits on every instruction set); elsewhere
/// candle's ops.
pub(crate) fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if !(g.device().is_cpu() && g.dtype() == DType::F32 && u.dtype() == DType::F32 && g.dims() == u.dims()) {
        return Ok((candle_nn::ops::silu(g)? * u)?);
    }
    let (gv, uv) = (g.flatten_all()?.to_vec1::<f32>()?, u.flatten_all()?.to_vec1::<f32>()?);
    let mut out = vec![0f32; gv.len()];
    swiglu_rows(&gv, &uv, &mut out);
    Ok(Tensor::from_vec(out, g.dims(), g.device())?)
}

/// `out[i] = silu(g[i]) · u[i]` with `sigmoid(x) = 1 / (1 + e^-x)` for `x ≥ 0` and
/// `e^x / (1 + e^x)` below (so [`det_exp`] only sees `-|x|`).
fn swiglu_rows(g: &[f32], u: &[f32], out: &mut [f32]) {
    #[inline(always)]
    fn body(g: &[f32], u: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            let e = det_exp(-g.abs());
            let sigmoid = if g >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
            *o = g * sigmoid * u;
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        /// # Safety
        /// The CPU must support AVX-512 F.
        #[target_feature(enable = "avx2,avx512f")]
        unsafe fn avx512(g: &[f32], u: &[f32], out: &mut [f32]) {
            body(g, u, out)
        }
        /// # Safety
        /// The CPU must support AVX2.
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(g: &[f32], u: &[f32], out: &mut [f32]) {
            body(g, u, out)
        }
        use crate::kernels::{Level, level};
        if level() >= Level::Avx512 {
            // SAFETY: checked at run time just above.
            return unsafe { avx512(g, u, out) };
        }
        if level() >= Level::Avx2 {
            // SAFETY: checked at run time just above.
            return unsafe { avx2(g, u, out) };
        }
    }
    body(g, u, out)
}

/// A block's feed-forward: dense, or a mixture of experts.
pub(crate) enum Ffn {
    Dense(Mlp),
    Moe(crate::moe::Moe),
}

impl Ffn {
    fn load(w: &Weights, i: usize, spec: &ModelSpec, device: &Device, dtype: DType) -> Result<Self> {
        Ok(match spec.moe {
            Some(moe) => Self::Moe(crate::moe::Moe::load(w, i, spec, moe, device)?),
            None => Self::Dense(Mlp::load(w, i, spec, device, dtype, Gate::Silu)?),
        })
    }

    /// With `rows`, each row gets exactly the bits it gets alone.
    fn forward(&self, x: &Tensor, rows: bool) -> Result<Tensor> {
        match self {
            Self::Dense(m) if rows => m.forward_rows(x),
            Self::Dense(m) => m.forward(x),
            Self::Moe(m) => m.forward(x, rows),
        }
    }
}

/// One transformer block.
pub(crate) struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    mlp: Ffn,
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
            mlp: Ffn::load(w, i, spec, device, dtype)?,
        })
    }

    /// `x`: `(t, hidden)`; `layer` is the index inside the span's cache. With `rows`, each
    /// row gets exactly the bits it gets alone.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cache: &mut KvCache,
        rope: &Rope,
        rows: bool,
    ) -> Result<Tensor> {
        let h = self.attn.forward(&self.attn_norm.forward(x)?, layer, cache, rope, rows)?;
        let x = (x + h)?;
        let h = self.ffn_norm.forward(&x)?;
        let h = self.mlp.forward(&h, rows)?;
        Ok((x + h)?)
    }

    /// Steps of several sessions (see [`Attention::forward_batch`]).
    pub(crate) fn forward_batch(
        &self,
        x: &Tensor,
        layer: usize,
        caches: &mut [&mut KvCache],
        lens: &[usize],
        rope: &Rope,
    ) -> Result<Tensor> {
        let h = self.attn.forward_batch(&self.attn_norm.forward(x)?, layer, caches, lens, rope)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.ffn_norm.forward(&x)?, true)?;
        Ok((x + h)?)
    }
}

#[cfg(test)]
mod tests {
    /// The host SwiGLU is candle's `silu(g) · u` to f32 rounding, and every compiled version
    /// (the vectorized ones included: the length leaves a tail) gives the same bits.
    #[test]
    fn swiglu_matches_candle_and_has_the_same_bits_everywhere() {
        use candle_core::{Device, Tensor};
        let n = 3 * 1536 + 5;
        let g: Vec<f32> = (0..n).map(|i| ((i * 37 % 1001) as f32 / 1000.0 - 0.5) * 24.0).collect();
        let u: Vec<f32> = (0..n).map(|i| ((i * 53 % 997) as f32 / 996.0 - 0.5) * 3.0).collect();
        let mut ours = vec![0f32; n];
        super::swiglu_rows(&g, &u, &mut ours);
        let (gt, ut) =
            (Tensor::new(&g[..], &Device::Cpu).unwrap(), Tensor::new(&u[..], &Device::Cpu).unwrap());
        let candle = (candle_nn::ops::silu(&gt).unwrap() * &ut).unwrap().to_vec1::<f32>().unwrap();
        for i in 0..n {
            let tol = 1e-5 * candle[i].abs().max(1e-3);
            assert!(
                (ours[i] - candle[i]).abs() <= tol,
                "{i}: g {} u {}: {} vs {}",
                g[i],
                u[i],
                ours[i],
                candle[i]
            );
        }
        let via_tensor = super::swiglu(&gt, &ut).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(via_tensor, ours);
        // The portable loop (compiled without SIMD features) against the dispatched one.
        let mut portable = vec![0f32; n];
        for ((o, &g), &u) in portable.iter_mut().zip(&g).zip(&u) {
            let e = super::det_exp(-g.abs());
            *o = g * (if g >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) }) * u;
        }
        assert_eq!(
            portable.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            ours.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
}
