//! Rotary position embeddings, computed for exactly the positions of each step.

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::spec::{ModelSpec, RopeStyle};

/// Inverse frequencies of one model's rotary embedding.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    inv_freq: Vec<f32>,
    style: RopeStyle,
}

impl Rope {
    /// Builds the frequencies; `freq_factors` are llama.cpp's `rope_freqs.weight` (Llama 3).
    pub(crate) fn new(spec: &ModelSpec, freq_factors: Option<Vec<f32>>) -> Self {
        let d = spec.head_dim;
        let mut inv_freq: Vec<f32> =
            (0..d / 2).map(|i| 1.0 / spec.rope_theta.powf((2 * i) as f32 / d as f32)).collect();
        if let Some(s) = &spec.rope_scaling {
            // Llama 3: keep high frequencies, divide low ones by `factor`, interpolate between.
            let old_ctx = s.original_max_position_embeddings as f32;
            let low_wavelen = old_ctx / s.low_freq_factor;
            let high_wavelen = old_ctx / s.high_freq_factor;
            for f in &mut inv_freq {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                *f = if wavelen < high_wavelen {
                    *f
                } else if wavelen > low_wavelen {
                    *f / s.factor
                } else {
                    let smooth =
                        (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * *f / s.factor + smooth * *f
                };
            }
        }
        if let Some(factors) = freq_factors {
            for (f, k) in inv_freq.iter_mut().zip(factors) {
                *f /= k;
            }
        }
        Self { inv_freq, style: spec.rope_style }
    }

    /// `cos` and `sin` tables of shape `(t, head_dim / 2)` for positions `start..start + t`.
    pub(crate) fn tables(&self, start: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in start..start + t {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((Tensor::from_vec(cos, (t, half), device)?, Tensor::from_vec(sin, (t, half), device)?))
    }

    /// Rotates `x` of shape `(1, heads, t, head_dim)`.
    pub(crate) fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        Ok(match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, cos, sin)?,
            RopeStyle::HalfSplit => candle_nn::rotary_emb::rope(&x, cos, sin)?,
        })
    }
}
