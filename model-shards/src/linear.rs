//! Linear layers and embeddings over quantized or dense weights.
//!
//! On the CPU, quantized matrix products of the types in [`crate::kernels`] go through shoal's
//! own SIMD kernels (runtime CPU-feature dispatch); every other case uses candle's `QMatMul`
//! or a dense matmul.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, ggml_file::qtensor_from_ggml};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Tensor};

use crate::error::Result;
use crate::kernels;
use crate::weights::{Loaded, WeightName, Weights};

/// `y = x Wᵀ (+ b)` for x of shape `(.., in)`.
pub(crate) struct Linear {
    inner: LinearKind,
    bias: Option<Tensor>,
}

enum LinearKind {
    /// Quantized weights on the CPU with a shoal kernel.
    Fast(FastQMatMul),
    /// candle's quantized (or dequantized-at-load float) matmul.
    Candle(QMatMul),
    /// Dense weights `[out, in]`.
    Dense(Tensor),
}

impl Linear {
    /// Wraps loaded weights of shape `[out, in]`.
    pub(crate) fn new(weight: Loaded, bias: Option<Tensor>) -> Result<Self> {
        let inner = match weight {
            Loaded::Dense(t) => LinearKind::Dense(t),
            Loaded::Quantized(q) => {
                let dtype = q.dtype();
                if q.device().is_cpu() && (kernels::supports(dtype) || kernels::packs(dtype)) {
                    let (n, k) = q.shape().dims2()?;
                    // Packed weights replace the file's (nothing reads those again).
                    match kernels::prepack(dtype, &q.data()?, n, k).map(Arc::new) {
                        Some(packed) => LinearKind::Fast(FastQMatMul::Packed(packed)),
                        None if kernels::supports(dtype) => {
                            LinearKind::Fast(FastQMatMul::Blocks { q, row_invariant: false })
                        }
                        None => LinearKind::Candle(QMatMul::from_arc(q)?),
                    }
                } else {
                    LinearKind::Candle(QMatMul::from_arc(q)?)
                }
            }
        };
        Ok(Self { inner, bias })
    }

    /// Loads `name` (and `bias` when given) with shape `[out, in]`.
    pub(crate) fn load(
        w: &Weights,
        name: WeightName,
        bias: Option<WeightName>,
        (out_dim, in_dim): (usize, usize),
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let weight = w.load(name, &[out_dim, in_dim], device, dtype)?;
        let bias = match bias {
            Some(b) => Some(w.load_dense(b, &[out_dim], device)?.to_dtype(dtype)?),
            None => None,
        };
        Self::new(weight, bias)
    }

    /// The layers of `parts` (quantized, packed, without bias, of one input size) as one whose
    /// outputs are theirs side by side, each with the bits it has alone; `Err(parts)` when they
    /// cannot be stacked. One product then quantizes the input once and fills the cores once.
    pub(crate) fn stacked(parts: Vec<Linear>) -> std::result::Result<Linear, Vec<Linear>> {
        let packed: Option<Vec<&kernels::Prepacked>> = parts
            .iter()
            .map(|l| match (&l.inner, &l.bias) {
                (LinearKind::Fast(FastQMatMul::Packed(p)), None) => Some(&**p),
                _ => None,
            })
            .collect();
        match packed.and_then(|p| kernels::concat_prepacked(&p)) {
            Some(p) => Ok(Linear { inner: LinearKind::Fast(FastQMatMul::Packed(Arc::new(p))), bias: None }),
            None => Err(parts),
        }
    }

    /// Applies the layer to the rows of `x` (`(m, in)`), each row with exactly the bits it
    /// would get alone: the rows are independent sessions batched together.
    pub(crate) fn forward_rows(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.inner {
            LinearKind::Fast(FastQMatMul::Blocks { q, .. }) => {
                let op = FastQMatMul::Blocks { q: q.clone(), row_invariant: true };
                x.contiguous()?.apply_op1_no_bwd(&op)?
            }
            // Packed products give every row its lone bits at any batch size.
            LinearKind::Fast(op) => x.contiguous()?.apply_op1_no_bwd(op)?,
            // candle's quantized matmul computes each (row, column) dot product on its own.
            LinearKind::Candle(m) => m.forward(x)?,
            // A dense GEMM blocks over rows: one row at a time keeps each row's summation order.
            LinearKind::Dense(w) => {
                let wt = w.t()?;
                let rows = (0..x.dim(0)?)
                    .map(|r| x.narrow(0, r, 1)?.matmul(&wt))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)?
            }
        };
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// Applies the layer.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.inner {
            LinearKind::Fast(op) => x.contiguous()?.apply_op1_no_bwd(op)?,
            LinearKind::Candle(m) => m.forward(x)?,
            LinearKind::Dense(w) => match x.dims() {
                [b, t, k] => x.reshape((b * t, *k))?.matmul(&w.t()?)?.reshape((*b, *t, ()))?,
                _ => x.matmul(&w.t()?)?,
            },
        };
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }
}

/// candle custom op running shoal's kernels on a quantized weight.
enum FastQMatMul {
    /// The file's blocks, through [`kernels::matmul`].
    Blocks {
        q: Arc<QTensor>,
        /// Use [`kernels::matmul_row_invariant`].
        row_invariant: bool,
    },
    /// Packed for the panel kernel (AVX-512: `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`; AVX2 too: `Q4_K`, `Q5_K`, `Q6_K`):
    /// every product runs on them, and every row has its lone bits at any batch size.
    Packed(Arc<kernels::Prepacked>),
}

impl CustomOp1 for FastQMatMul {
    fn name(&self) -> &'static str {
        "shoal-qmatmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = match self {
            Self::Blocks { q, .. } => q.shape().dims2()?,
            Self::Packed(p) => p.shape(),
        };
        let dims = layout.shape().dims();
        let Some((&last, lead)) = dims.split_last() else {
            candle_core::bail!("qmatmul input must have at least one dimension")
        };
        if last != k {
            candle_core::bail!("qmatmul input {dims:?} does not match weight [{n}, {k}]")
        }
        let m: usize = lead.iter().product();
        let CpuStorage::F32(data) = storage else { candle_core::bail!("qmatmul expects f32 input") };
        let Some(lhs) = data.get(layout.start_offset()..layout.start_offset() + m * k) else {
            candle_core::bail!("qmatmul input storage is shorter than its layout")
        };
        let mut dst = vec![0f32; m * n];
        let done = match self {
            Self::Packed(p) => kernels::matmul_prepacked(p, m, lhs, &mut dst),
            Self::Blocks { q, row_invariant } => {
                let weights = q.data()?;
                let matmul = if *row_invariant { kernels::matmul_row_invariant } else { kernels::matmul };
                matmul(q.dtype(), &weights, m, k, n, lhs, &mut dst)
            }
        };
        done.map_err(|e| candle_core::Error::Msg(format!("quantized kernel: {e}")))?;
        let mut out_dims = lead.to_vec();
        out_dims.push(n);
        Ok((CpuStorage::F32(dst), Shape::from(out_dims)))
    }
}

/// Token embedding lookup.
pub(crate) enum Embedding {
    /// Quantized table: rows are dequantized on lookup, never the whole table.
    Quantized(Arc<QTensor>),
    /// Dense table `[vocab, hidden]`.
    Dense(Tensor),
}

impl Embedding {
    pub(crate) fn new(weight: Loaded) -> Result<Self> {
        Ok(match weight {
            Loaded::Dense(t) => Self::Dense(t),
            Loaded::Quantized(q) => match q.dtype() {
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                    let device = q.device();
                    Self::Dense(q.dequantize(&device)?)
                }
                _ => Self::Quantized(q),
            },
        })
    }

    /// Looks up `ids` (already checked against the vocabulary) and returns `(len, hidden)` f32.
    pub(crate) fn forward(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Self::Dense(t) => {
                let idx = Tensor::new(ids, device)?;
                Ok(t.index_select(&idx, 0)?.to_dtype(DType::F32)?)
            }
            Self::Quantized(q) => {
                let (_, hidden) = q.shape().dims2()?;
                let dtype = q.dtype();
                let row_bytes = hidden / dtype.block_size() * dtype.type_size();
                let data = q.data()?;
                let mut rows = Vec::with_capacity(ids.len() * row_bytes);
                for &id in ids {
                    let start = id as usize * row_bytes;
                    let Some(row) = data.get(start..start + row_bytes) else {
                        return Err(crate::Error::InvalidInput(format!(
                            "token id {id} is outside the embedding"
                        )));
                    };
                    rows.extend_from_slice(row);
                }
                let rows = qtensor_from_ggml(dtype, &rows, vec![ids.len(), hidden], &Device::Cpu)?;
                Ok(rows.dequantize(&Device::Cpu)?.to_device(device)?)
            }
        }
    }

    /// The table as an LM head (tied embeddings).
    pub(crate) fn as_linear(&self) -> Result<Linear> {
        match self {
            Self::Dense(t) => Linear::new(Loaded::Dense(t.clone()), None),
            Self::Quantized(q) => Linear::new(Loaded::Quantized(q.clone()), None),
        }
    }
}
