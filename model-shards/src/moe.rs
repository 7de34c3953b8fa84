//! Mixture-of-experts feed-forward (Mixtral, Qwen3-MoE), following llama.cpp's `build_moe_ffn`.
//!
//! A router (`ffn_gate_inp`, `[experts, hidden]`) scores every expert for each token; the
//! softmax of the scores picks the `top_k` most probable experts, whose probabilities are
//! renormalised to sum to one (both Mixtral and Qwen3-MoE do). Each expert is a SwiGLU
//! feed-forward of its own; a token's output is the weighted sum of its experts' outputs, in
//! the order of their rank (llama.cpp's order of additions).
//!
//! GGUF stores the experts of a layer stacked (`ffn_{gate,up,down}_exps`, `[experts, out,
//! in]`); a span splits them into one matrix per expert at load, quantized as in the file (and
//! packed for shoal's kernels like any dense weight). Hugging Face checkpoints store one
//! matrix per expert already. A step groups its tokens by expert: each
//! expert runs once on the rows that chose it.

use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::llama::{Projections, swiglu};
use crate::spec::{ModelSpec, MoeSpec};
use crate::weights::{ExpertPart, LayerWeight as L, Loaded, WeightName, Weights};

/// One expert: `down(silu(gate x) · up x)`.
struct Expert {
    gate_up: Projections,
    down: Linear,
}

/// The mixture-of-experts feed-forward of one layer.
pub(crate) struct Moe {
    /// The router's `[experts, hidden]` weights in `f32` (scored on the host: every row the
    /// same arithmetic, whatever the batch).
    router: Vec<f32>,
    experts: Vec<Expert>,
    top_k: usize,
    /// An expert's intermediate size.
    f: usize,
}

/// The experts of a stacked `[experts, rows, cols]` tensor, one `[rows, cols]` matrix each.
fn split(
    w: &Weights,
    name: WeightName,
    (e, rows, cols): (usize, usize, usize),
    device: &Device,
) -> Result<Vec<Loaded>> {
    match w.load(name, &[e, rows, cols], device, DType::F32)? {
        Loaded::Quantized(q) => {
            let dtype = q.dtype();
            let data = q.data()?;
            let bytes = rows * cols / dtype.block_size() * dtype.type_size();
            if data.len() != e * bytes {
                return Err(Error::InvalidInput(format!(
                    "{name:?}: {} bytes of {dtype:?} for {e} experts of [{rows}, {cols}]",
                    data.len()
                )));
            }
            (0..e)
                .map(|i| {
                    let part = qtensor_from_ggml(
                        dtype,
                        &data[i * bytes..(i + 1) * bytes],
                        vec![rows, cols],
                        device,
                    )?;
                    Ok(Loaded::Quantized(Arc::new(part)))
                })
                .collect()
        }
        Loaded::Dense(t) => (0..e).map(|i| Ok(Loaded::Dense(t.get(i)?))).collect(),
    }
}

impl Moe {
    pub(crate) fn load(
        w: &Weights,
        i: usize,
        spec: &ModelSpec,
        moe: MoeSpec,
        device: &Device,
    ) -> Result<Self> {
        let (h, f, e) = (spec.hidden_size, moe.expert_intermediate_size, moe.n_experts);
        let router = w.load_dense(WeightName::Layer(i, L::Router), &[e, h], &Device::Cpu)?;
        let router = router.flatten_all()?.to_vec1::<f32>()?;
        let (gates, ups, downs) = if w.is_gguf() {
            (
                split(w, WeightName::Layer(i, L::GateExps), (e, f, h), device)?,
                split(w, WeightName::Layer(i, L::UpExps), (e, f, h), device)?,
                split(w, WeightName::Layer(i, L::DownExps), (e, h, f), device)?,
            )
        } else {
            // Hugging Face checkpoints store each expert's matrices apart.
            let part = |p, shape: [usize; 2]| -> Result<Vec<Loaded>> {
                (0..e)
                    .map(|x| w.load(WeightName::Layer(i, L::Expert(x, p)), &shape, device, DType::F32))
                    .collect()
            };
            (part(ExpertPart::Gate, [f, h])?, part(ExpertPart::Up, [f, h])?, part(ExpertPart::Down, [h, f])?)
        };
        let experts = gates
            .into_iter()
            .zip(ups)
            .zip(downs)
            .map(|((g, u), d)| {
                Ok(Expert {
                    gate_up: Projections::new(vec![Linear::new(g, None)?, Linear::new(u, None)?]),
                    down: Linear::new(d, None)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { router, experts, top_k: moe.n_experts_used, f })
    }

    /// The feed-forward of the rows of `x` (`(.., hidden)`). With `rows`, each row gets the bits
    /// it gets alone (its experts run on it with row-invariant products).
    pub(crate) fn forward(&self, x: &Tensor, rows: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let h = *dims.last().ok_or_else(|| Error::InvalidInput("empty feed-forward input".into()))?;
        let x = x.reshape(((), h))?.contiguous()?;
        let t = x.dim(0)?;
        let xv = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let routes: Vec<Vec<(usize, f32)>> = xv
            .chunks_exact(h)
            .map(|row| {
                let scores: Vec<f32> = self.router.chunks_exact(h).map(|w| dot(row, w)).collect();
                route(&scores, self.top_k)
            })
            .collect();
        // (token, rank) of every row routed to each expert.
        let mut chosen: Vec<Vec<(usize, usize)>> = vec![Vec::new(); self.experts.len()];
        for (tok, r) in routes.iter().enumerate() {
            for (rank, &(e, _)) in r.iter().enumerate() {
                chosen[e].push((tok, rank));
            }
        }
        let k = self.top_k;
        let mut outs = vec![0f32; t * k * h];
        for (expert, picks) in self.experts.iter().zip(&chosen) {
            if picks.is_empty() {
                continue;
            }
            let idx: Vec<u32> = picks.iter().map(|&(tok, _)| tok as u32).collect();
            // Every row, in order (always so in decode): no gather.
            let all = idx.len() == t && idx.iter().enumerate().all(|(i, &r)| i == r as usize);
            let xs =
                if all { x.clone() } else { x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 0)? };
            let project = |l: &Linear, x: &Tensor| if rows { l.forward_rows(x) } else { l.forward(x) };
            let gu = expert.gate_up.apply(&xs, &[self.f, self.f], project)?;
            let y = project(&expert.down, &swiglu(&gu[0], &gu[1])?)?;
            let y = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            for (row, &(tok, rank)) in y.chunks_exact(h).zip(picks) {
                outs[(tok * k + rank) * h..(tok * k + rank + 1) * h].copy_from_slice(row);
            }
        }
        let mut out = vec![0f32; t * h];
        for (tok, r) in routes.iter().enumerate() {
            let o = &mut out[tok * h..(tok + 1) * h];
            for (rank, &(_, weight)) in r.iter().enumerate() {
                let y = &outs[(tok * k + rank) * h..(tok * k + rank + 1) * h];
                for (o, &y) in o.iter_mut().zip(y) {
                    // llama.cpp: each expert's output times its weight, then added in rank order.
                    *o = if rank == 0 { y * weight } else { *o + y * weight };
                }
            }
        }
        Ok(Tensor::from_vec(out, dims, x.device())?.to_dtype(x.dtype())?)
    }
}

/// `Σ a·b` in a fixed order (8 partial sums, then added pairwise), which vectorizes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// The `k` experts of one token by descending probability (the lower index first on ties),
/// each with its probability renormalised over the `k`.
fn route(scores: &[f32], k: usize) -> Vec<(usize, f32)> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = scores.iter().map(|&s| (s - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
    order.truncate(k);
    let picked: Vec<(usize, f32)> = order.iter().map(|&e| (e, exp[e] / sum)).collect();
    let total: f32 = picked.iter().map(|&(_, p)| p).sum();
    picked.into_iter().map(|(e, p)| (e, p / total)).collect()
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn routing_picks_the_most_probable_experts_and_renormalises() {
        let r = route(&[0.1, 2.0, -1.0, 1.5], 2);
        assert_eq!(r.iter().map(|&(e, _)| e).collect::<Vec<_>>(), vec![1, 3]);
        let (a, b) = (2.0f32.exp(), 1.5f32.exp());
        assert!((r[0].1 - a / (a + b)).abs() < 1e-6 && (r[1].1 - b / (a + b)).abs() < 1e-6, "{r:?}");
        // Ties go to the lower index; all experts used sum to one.
        let r = route(&[1.0, 1.0, 1.0], 3);
        assert_eq!(r.iter().map(|&(e, _)| e).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!((r.iter().map(|&(_, p)| p).sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
