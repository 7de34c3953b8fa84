//! Rotary position embeddings, computed for exactly the positions of each step.

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

    /// Linear scaling: every angle divided by `factor` (positions interpolated).
    pub(crate) fn scale_linear(mut self, factor: f32) -> Self {
        let scale = 1.0 / factor;
        self.inv_freq.iter_mut().for_each(|f| *f *= scale);
        self
    }

    /// Rotates, in place, the heads of one position `pos`: `x` holds `n × head_dim` values
    /// (head-major). The same arithmetic as candle's `rope_i` / `rope` kernels.
    pub(crate) fn rotate(&self, x: &mut [f32], pos: usize) {
        let half = self.inv_freq.len();
        let (cos, sin): (Vec<f32>, Vec<f32>) = self
            .inv_freq
            .iter()
            .map(|&f| {
                let a = pos as f32 * f;
                (a.cos(), a.sin())
            })
            .unzip();
        for head in x.chunks_exact_mut(2 * half) {
            for i in 0..half {
                let (i1, i2) = match self.style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::HalfSplit => (i, i + half),
                };
                let (a, b) = (head[i1], head[i2]);
                head[i1] = a * cos[i] - b * sin[i];
                head[i2] = a * sin[i] + b * cos[i];
            }
        }
    }
}
