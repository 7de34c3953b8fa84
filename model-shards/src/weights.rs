//! Access to a model's weight tensors, by logical name, in either source format.
//!
//! GGUF tensors are read one at a time from the file, so a span holds only its own layers in
//! memory, and quantized tensors stay quantized (no dequantization at load). Safetensors are
//! memory-mapped; a span copies out only the tensors it uses, converted to the compute dtype.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{QTensor, gguf_file};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Tensors of one transformer block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LayerWeight {
    AttnNorm,
    Q,
    /// Phi-3: q, k and v as one matrix (rows of q, then k, then v).
    Qkv,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    QNorm,
    KNorm,
    FfnNorm,
    /// Gemma: RMSNorm of the attention's output, before the residual add.
    PostAttnNorm,
    /// Gemma: RMSNorm of the feed-forward's output, before the residual add.
    PostFfnNorm,
    Gate,
    Up,
    Down,
    /// Mixture of experts: the router, `[experts, hidden]`.
    Router,
    /// Mixture of experts: every expert's gate, `[experts, ffn, hidden]`.
    GateExps,
    /// Mixture of experts: every expert's up projection, `[experts, ffn, hidden]`.
    UpExps,
    /// Mixture of experts: every expert's down projection, `[experts, hidden, ffn]`.
    DownExps,
}

/// A tensor of the model, named independently of the file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WeightName {
    Embedding,
    OutputNorm,
    LmHead,
    /// Llama 3 rope frequency factors as stored by llama.cpp.
    RopeFreqs,
    Layer(usize, LayerWeight),
}

impl WeightName {
    fn gguf(self) -> String {
        use LayerWeight as L;
        match self {
            Self::Embedding => "token_embd.weight".into(),
            Self::OutputNorm => "output_norm.weight".into(),
            Self::LmHead => "output.weight".into(),
            Self::RopeFreqs => "rope_freqs.weight".into(),
            Self::Layer(i, w) => {
                let s = match w {
                    L::AttnNorm => "attn_norm.weight",
                    L::Q => "attn_q.weight",
                    L::Qkv => "attn_qkv.weight",
                    L::K => "attn_k.weight",
                    L::V => "attn_v.weight",
                    L::O => "attn_output.weight",
                    L::QBias => "attn_q.bias",
                    L::KBias => "attn_k.bias",
                    L::VBias => "attn_v.bias",
                    L::QNorm => "attn_q_norm.weight",
                    L::KNorm => "attn_k_norm.weight",
                    L::FfnNorm => "ffn_norm.weight",
                    L::PostAttnNorm => "post_attention_norm.weight",
                    L::PostFfnNorm => "post_ffw_norm.weight",
                    L::Gate => "ffn_gate.weight",
                    L::Up => "ffn_up.weight",
                    L::Down => "ffn_down.weight",
                    L::Router => "ffn_gate_inp.weight",
                    L::GateExps => "ffn_gate_exps.weight",
                    L::UpExps => "ffn_up_exps.weight",
                    L::DownExps => "ffn_down_exps.weight",
                };
                format!("blk.{i}.{s}")
            }
        }
    }

    fn hf(self) -> String {
        use LayerWeight as L;
        match self {
            Self::Embedding => "model.embed_tokens.weight".into(),
            Self::OutputNorm => "model.norm.weight".into(),
            Self::LmHead => "lm_head.weight".into(),
            Self::RopeFreqs => "rope_freqs.weight".into(),
            Self::Layer(i, w) => {
                let s = match w {
                    L::AttnNorm => "input_layernorm.weight",
                    L::Q => "self_attn.q_proj.weight",
                    L::Qkv => "self_attn.qkv_proj.weight",
                    L::K => "self_attn.k_proj.weight",
                    L::V => "self_attn.v_proj.weight",
                    L::O => "self_attn.o_proj.weight",
                    L::QBias => "self_attn.q_proj.bias",
                    L::KBias => "self_attn.k_proj.bias",
                    L::VBias => "self_attn.v_proj.bias",
                    L::QNorm => "self_attn.q_norm.weight",
                    L::KNorm => "self_attn.k_norm.weight",
                    L::FfnNorm => "post_attention_layernorm.weight",
                    // Gemma's names (its GGUF-only support never reads them; note that Gemma
                    // calls its post-attention norm what llama calls its pre-MLP norm).
                    L::PostAttnNorm => "post_attention_norm.weight",
                    L::PostFfnNorm => "post_feedforward_layernorm.weight",
                    L::Gate => "mlp.gate_proj.weight",
                    L::Up => "mlp.up_proj.weight",
                    L::Down => "mlp.down_proj.weight",
                    // Mixture-of-experts models load from GGUF only (the spec refuses them
                    // from safetensors); these name the stacked tensors for error messages.
                    L::Router => "mlp.gate.weight",
                    L::GateExps => "mlp.experts.gate_proj.weight",
                    L::UpExps => "mlp.experts.up_proj.weight",
                    L::DownExps => "mlp.experts.down_proj.weight",
                };
                format!("model.layers.{i}.{s}")
            }
        }
    }
}

/// A loaded tensor: quantized (GGUF) or dense.
pub(crate) enum Loaded {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
}

/// An open model's weights.
pub(crate) enum Weights {
    Gguf { path: PathBuf, content: Arc<gguf_file::Content>, file: Mutex<BufReader<File>> },
    Safetensors { tensors: MmapedSafetensors },
}

impl Weights {
    /// Opens a GGUF file whose header was already parsed.
    pub(crate) fn gguf(path: &Path, content: Arc<gguf_file::Content>) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Ok(Self::Gguf { path: path.to_path_buf(), content, file: Mutex::new(BufReader::new(file)) })
    }

    /// Memory-maps safetensors files.
    pub(crate) fn safetensors(paths: &[PathBuf]) -> Result<Self> {
        // SAFETY: the files are mapped read-only; shoal never writes them, and like every
        // safetensors loader we rely on nobody truncating a model file while it is served.
        let tensors = unsafe { MmapedSafetensors::multi(paths)? };
        Ok(Self::Safetensors { tensors })
    }

    fn name(&self, w: WeightName) -> String {
        match self {
            Self::Gguf { .. } => w.gguf(),
            Self::Safetensors { .. } => w.hf(),
        }
    }

    /// Whether the file holds this tensor.
    pub(crate) fn contains(&self, w: WeightName) -> bool {
        let name = self.name(w);
        match self {
            Self::Gguf { content, .. } => content.tensor_infos.contains_key(&name),
            Self::Safetensors { tensors } => tensors.get(&name).is_ok(),
        }
    }

    /// Loads a tensor and checks its shape (in the Hugging Face orientation: `[out, in]` for a
    /// matrix). Dense tensors are converted to `dtype`.
    pub(crate) fn load(
        &self,
        w: WeightName,
        shape: &[usize],
        device: &Device,
        dtype: DType,
    ) -> Result<Loaded> {
        let name = self.name(w);
        match self {
            Self::Gguf { content, file, path } => {
                if !content.tensor_infos.contains_key(&name) {
                    return Err(Error::MissingWeight(name));
                }
                let q = {
                    let mut guard = file.lock().map_err(|_| Error::Io {
                        path: path.clone(),
                        source: std::io::Error::other("model file lock poisoned"),
                    })?;
                    content.tensor(&mut *guard, &name, device)?
                };
                check_shape(&name, q.shape().dims(), shape)?;
                Ok(Loaded::Quantized(Arc::new(q)))
            }
            Self::Safetensors { tensors } => {
                if tensors.get(&name).is_err() {
                    return Err(Error::MissingWeight(name));
                }
                let t = tensors.load(&name, device)?;
                check_shape(&name, t.dims(), shape)?;
                Ok(Loaded::Dense(t.to_dtype(dtype)?))
            }
        }
    }

    /// Loads a small tensor (norm weights, biases) as a dense f32 tensor.
    pub(crate) fn load_dense(&self, w: WeightName, shape: &[usize], device: &Device) -> Result<Tensor> {
        match self.load(w, shape, device, DType::F32)? {
            Loaded::Dense(t) => Ok(t),
            Loaded::Quantized(q) => Ok(q.dequantize(device)?.to_dtype(DType::F32)?),
        }
    }
}

fn check_shape(name: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
    if actual != expected {
        return Err(Error::WeightShape {
            name: name.to_string(),
            actual: actual.to_vec(),
            expected: expected.to_vec(),
        });
    }
    Ok(())
}
