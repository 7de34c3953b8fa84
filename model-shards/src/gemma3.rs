//! Gemma 3 and Gemma 2, following llama.cpp's graphs for `gemma3` and `gemma2` (GGUF files) and
//! transformers' `Gemma3ForCausalLM` and `Gemma2ForCausalLM` (checkpoints; the arithmetic is the
//! same but for the GELU, see [`gelu_gate`]).
//!
//! Gemma 2's block is Gemma 3's without the q/k norms (its files have none), with attention
//! scores soft-capped ([`ModelSpec::attn_logit_softcap`], in [`crate::attention`]); its final
//! logits are soft-capped too ([`crate::Shard`]).
//!
//! A block is a llama block with two extra RMSNorms, one on the attention's output and one on
//! the feed-forward's output (each before its residual add), q and k normalised per head, a
//! GELU (tanh) gated feed-forward, and its own rotary base: of every
//! [`ModelSpec::sliding_window_pattern`] layers the first ones attend through the sliding
//! window and rotate with [`ModelSpec::rope_local_theta`], the last one attends to everything
//! and rotates with [`ModelSpec::rope_theta`] (divided by [`ModelSpec::rope_linear_factor`]
//! on the 4B and larger). The embedding is scaled by `sqrt(hidden)`
//! ([`crate::Shard`] does it for the first span) and the LM head is the embedding (tied).
//! Gemma's norms scale by `1 + w`: llama.cpp's converter adds the 1 to GGUF files, and the
//! loader adds it to a checkpoint's weights.

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use half::f16;

use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::llama::{Attention, Gate, Mlp, RmsNorm};
use crate::rope::Rope;
use crate::spec::ModelSpec;
use crate::weights::{LayerWeight as L, WeightName, Weights};

/// One Gemma 3 transformer block.
pub(crate) struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    mlp: Mlp,
    post_ffn_norm: RmsNorm,
    /// This layer's rotary embedding (local or global base).
    rope: Rope,
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
        let mut rope_spec = spec.clone();
        let sliding = spec.is_sliding(i);
        if sliding && let Some(theta) = spec.rope_local_theta {
            rope_spec.rope_theta = theta;
        }
        let mut rope = Rope::new(&rope_spec, None);
        if !sliding && let Some(factor) = spec.rope_linear_factor {
            rope = rope.scale_linear(factor);
        }
        Ok(Self {
            attn_norm: norm(L::AttnNorm)?,
            attn: Attention::load(w, i, spec, device, dtype)?,
            post_attn_norm: norm(L::PostAttnNorm)?,
            ffn_norm: norm(L::FfnNorm)?,
            mlp: Mlp::load(w, i, spec, device, dtype, gelu_gate(w))?,
            post_ffn_norm: norm(L::PostFfnNorm)?,
            rope,
        })
    }

    /// `x`: `(t, hidden)`; `layer` is the index inside the span's cache. With `rows`, each
    /// row gets exactly the bits it gets alone.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cache: &mut KvCache,
        rows: bool,
    ) -> Result<Tensor> {
        let h = self.attn.forward(&self.attn_norm.forward(x)?, layer, cache, &self.rope, rows)?;
        let x = (x + self.post_attn_norm.forward(&h)?)?;
        let h = self.ffn_norm.forward(&x)?;
        let h = if rows { self.mlp.forward_rows(&h)? } else { self.mlp.forward(&h)? };
        Ok((x + self.post_ffn_norm.forward(&h)?)?)
    }

    /// Steps of several sessions (`lens[i]` rows for `caches[i]`, one after another), each
    /// row with the bits it gets alone.
    pub(crate) fn forward_batch(
        &self,
        x: &Tensor,
        layer: usize,
        caches: &mut [&mut KvCache],
        lens: &[usize],
    ) -> Result<Tensor> {
        let h = self.attn.forward_batch(&self.attn_norm.forward(x)?, layer, caches, lens, &self.rope)?;
        let x = (x + self.post_attn_norm.forward(&h)?)?;
        let h = self.mlp.forward_rows(&self.ffn_norm.forward(&x)?)?;
        Ok((x + self.post_ffn_norm.forward(&h)?)?)
    }
}

/// The feed-forward's GELU: llama.cpp's table for a GGUF file, transformers' tanh formula for a
/// checkpoint.
pub(crate) fn gelu_gate(w: &Weights) -> Gate {
    if w.is_gguf() { Gate::GeluTanhGgml } else { Gate::GeluTanh }
}

/// `gelu_tanh(g) · u` as llama.cpp's CPU backend computes it (`ggml_vec_geglu_f32` with
/// `GGML_GELU_FP16`): `g` rounded to f16 and looked up in a table of f16 GELU values, 0 at or
/// below -10, the identity at or above 10. On other devices or dtypes, candle's tanh GELU.
pub(crate) fn geglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if !(g.device().is_cpu() && g.dtype() == DType::F32 && u.dtype() == DType::F32 && g.dims() == u.dims()) {
        return Ok((g.gelu()? * u)?);
    }
    let (gv, uv) = (g.flatten_all()?.to_vec1::<f32>()?, u.flatten_all()?.to_vec1::<f32>()?);
    let table = gelu_table();
    let out: Vec<f32> = gv.iter().zip(&uv).map(|(&g, &u)| gelu_ggml(g, table) * u).collect();
    Ok(Tensor::from_vec(out, g.dims(), g.device())?)
}

/// ggml's tanh GELU of one value (`ggml_gelu_f32`).
fn gelu_f32(x: f32) -> f32 {
    const GELU_COEF_A: f32 = 0.044715;
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x)).tanh())
}

/// The GELU of every f16 value, as f16 bits (ggml's `ggml_table_gelu_f16`).
fn gelu_table() -> &'static [u16] {
    static TABLE: OnceLock<Vec<u16>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX).map(|b| f16::from_f32(gelu_f32(f16::from_bits(b).to_f32())).to_bits()).collect()
    })
}

/// One value's GELU through the f16 table.
fn gelu_ggml(x: f32, table: &[u16]) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        f16::from_bits(table[usize::from(f16::from_f32(x).to_bits())]).to_f32()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table GELU is the exact tanh GELU to f16 precision, and the gated product is
    /// candle's `gelu(g) · u` to that precision.
    #[test]
    fn geglu_is_the_tanh_gelu_to_f16_precision() {
        let n = 4099;
        let g: Vec<f32> = (0..n).map(|i| (i as f32 / n as f32 - 0.5) * 30.0).collect();
        let u: Vec<f32> = (0..n).map(|i| ((i * 53 % 997) as f32 / 996.0 - 0.5) * 3.0).collect();
        let (gt, ut) =
            (Tensor::new(&g[..], &Device::Cpu).unwrap(), Tensor::new(&u[..], &Device::Cpu).unwrap());
        let ours = geglu(&gt, &ut).unwrap().to_vec1::<f32>().unwrap();
        let candle = (gt.gelu().unwrap() * &ut).unwrap().to_vec1::<f32>().unwrap();
        for i in 0..n {
            // f16 rounding of the input and of the output: ~2^-10 relative each, plus the
            // slope of GELU (at most ~1.13).
            let tol = 3e-3 * (g[i].abs() * u[i].abs()).max(1e-3) + 1e-6;
            assert!(
                (ours[i] - candle[i]).abs() <= tol,
                "{i}: g {} u {}: {} vs {}",
                g[i],
                u[i],
                ours[i],
                candle[i]
            );
        }
        assert_eq!(gelu_ggml(-10.0, gelu_table()), 0.0);
        assert_eq!(gelu_ggml(12.5, gelu_table()), 12.5);
        // Values of the table are themselves f16 values of the input's f16 rounding.
        let x = 0.1234f32;
        let xh = f16::from_f32(x).to_f32();
        assert_eq!(gelu_ggml(x, gelu_table()), f16::from_f32(gelu_f32(xh)).to_f32());
    }
}
