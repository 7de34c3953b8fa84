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
    /// Mixture of experts: one expert's matrix, as Hugging Face checkpoints store them.
    Expert(usize, ExpertPart),
}

/// A matrix of one expert's feed-forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ExpertPart {
    /// `[ffn, hidden]` (Mixtral's `w1`).
    Gate,
    /// `[ffn, hidden]` (Mixtral's `w3`).
    Up,
    /// `[hidden, ffn]` (Mixtral's `w2`).
    Down,
}

/// How a Hugging Face checkpoint names its tensors: families that share llama's names, and
/// those that differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HfNames {
    /// llama, mistral, qwen2, qwen3.
    Llama,
    /// Gemma 2 and 3: `post_attention_layernorm` is the attention's output norm, and the
    /// feed-forward's input norm is `pre_feedforward_layernorm`.
    Gemma,
    /// Phi-3: `qkv_proj` and `gate_up_proj` fused.
    Phi3,
    /// Mixtral: `block_sparse_moe.gate` and `block_sparse_moe.experts.E.w1/w3/w2`.
    Mixtral,
    /// Qwen3-MoE: `mlp.gate` and `mlp.experts.E.gate_proj/up_proj/down_proj`.
    Qwen3Moe,
}

impl HfNames {
    /// The naming of a model with this spec.
    pub(crate) fn of(spec: &crate::spec::ModelSpec) -> Self {
        use crate::spec::Architecture as A;
        match spec.arch {
            A::Gemma2 | A::Gemma3 => Self::Gemma,
            A::Phi3 => Self::Phi3,
            A::Qwen3Moe => Self::Qwen3Moe,
            A::Llama | A::Mistral if spec.moe.is_some() => Self::Mixtral,
            A::Llama | A::Mistral | A::Qwen2 | A::Qwen3 => Self::Llama,
        }
    }
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
                    // GGUF stacks the experts; this names the stack the expert comes from.
                    L::Expert(_, ExpertPart::Gate) => "ffn_gate_exps.weight",
                    L::Expert(_, ExpertPart::Up) => "ffn_up_exps.weight",
                    L::Expert(_, ExpertPart::Down) => "ffn_down_exps.weight",
                };
                format!("blk.{i}.{s}")
            }
        }
    }

    fn hf(self, names: HfNames) -> String {
        use LayerWeight as L;
        match self {
            Self::Embedding => "model.embed_tokens.weight".into(),
            Self::OutputNorm => "model.norm.weight".into(),
            Self::LmHead => "lm_head.weight".into(),
            Self::RopeFreqs => "rope_freqs.weight".into(),
            Self::Layer(i, w) => {
                let gemma = names == HfNames::Gemma;
                let s: String = match w {
                    L::AttnNorm => "input_layernorm.weight".into(),
                    L::Q => "self_attn.q_proj.weight".into(),
                    L::Qkv => "self_attn.qkv_proj.weight".into(),
                    L::K => "self_attn.k_proj.weight".into(),
                    L::V => "self_attn.v_proj.weight".into(),
                    L::O => "self_attn.o_proj.weight".into(),
                    L::QBias => "self_attn.q_proj.bias".into(),
                    L::KBias => "self_attn.k_proj.bias".into(),
                    L::VBias => "self_attn.v_proj.bias".into(),
                    L::QNorm => "self_attn.q_norm.weight".into(),
                    L::KNorm => "self_attn.k_norm.weight".into(),
                    L::FfnNorm if gemma => "pre_feedforward_layernorm.weight".into(),
                    L::FfnNorm => "post_attention_layernorm.weight".into(),
                    L::PostAttnNorm => "post_attention_layernorm.weight".into(),
                    L::PostFfnNorm => "post_feedforward_layernorm.weight".into(),
                    L::Gate => "mlp.gate_proj.weight".into(),
                    L::Up if names == HfNames::Phi3 => "mlp.gate_up_proj.weight".into(),
                    L::Up => "mlp.up_proj.weight".into(),
                    L::Down => "mlp.down_proj.weight".into(),
                    L::Router if names == HfNames::Mixtral => "block_sparse_moe.gate.weight".into(),
                    L::Router => "mlp.gate.weight".into(),
                    // Checkpoints store one tensor per expert (`Expert`); these name the stacks
                    // a GGUF file would hold, for error messages.
                    L::GateExps => "mlp.experts.gate_proj.weight".into(),
                    L::UpExps => "mlp.experts.up_proj.weight".into(),
                    L::DownExps => "mlp.experts.down_proj.weight".into(),
                    L::Expert(e, part) if names == HfNames::Mixtral => {
                        let m = match part {
                            ExpertPart::Gate => "w1",
                            ExpertPart::Up => "w3",
                            ExpertPart::Down => "w2",
                        };
                        format!("block_sparse_moe.experts.{e}.{m}.weight")
                    }
                    L::Expert(e, part) => {
                        let m = match part {
                            ExpertPart::Gate => "gate_proj",
                            ExpertPart::Up => "up_proj",
                            ExpertPart::Down => "down_proj",
                        };
                        format!("mlp.experts.{e}.{m}.weight")
                    }
                };
                format!("model.layers.{i}.{s}")
            }
        }
    }
}

/// Where a checkpoint keeps its language model: alone, or beside a vision tower in a multimodal
/// checkpoint (Gemma 3 4B and larger; transformers 4 and 5 both write this layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HfPrefix {
    /// `model.…` and `lm_head.weight`.
    Plain,
    /// `language_model.model.…` and `language_model.lm_head.weight`.
    Multimodal,
}

impl HfPrefix {
    const ALL: [Self; 2] = [Self::Plain, Self::Multimodal];

    /// The name of a language-model tensor `name` (as `WeightName::hf` gives it).
    fn apply(self, name: &str) -> String {
        match self {
            Self::Plain => name.to_string(),
            Self::Multimodal => format!("language_model.{name}"),
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
    Gguf {
        path: PathBuf,
        content: Arc<gguf_file::Content>,
        file: Mutex<BufReader<File>>,
    },
    Safetensors {
        tensors: MmapedSafetensors,
        names: HfNames,
        /// Where the language model's tensors are: `model.` and `lm_head.weight`, or inside a
        /// multimodal checkpoint (see [`HfPrefix`]).
        prefix: HfPrefix,
        /// Added to every RMSNorm weight: 1 for Gemma, whose checkpoints store `w` of
        /// `x · (1 + w)` (llama.cpp's converter adds the 1 to GGUF files).
        norm_offset: f32,
    },
}

impl Weights {
    /// Opens a GGUF file whose header was already parsed.
    pub(crate) fn gguf(path: &Path, content: Arc<gguf_file::Content>) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Ok(Self::Gguf { path: path.to_path_buf(), content, file: Mutex::new(BufReader::new(file)) })
    }

    /// Memory-maps the safetensors files of a model with this spec.
    pub(crate) fn safetensors(paths: &[PathBuf], spec: &crate::spec::ModelSpec) -> Result<Self> {
        // SAFETY: the files are mapped read-only; shoal never writes them, and like every
        // safetensors loader we rely on nobody truncating a model file while it is served.
        let tensors = unsafe { MmapedSafetensors::multi(paths)? };
        let names = HfNames::of(spec);
        let norm_offset = if names == HfNames::Gemma { 1.0 } else { 0.0 };
        let prefix = HfPrefix::ALL
            .into_iter()
            .find(|p| tensors.get(&p.apply(&WeightName::Embedding.hf(names))).is_ok())
            .unwrap_or(HfPrefix::Plain);
        Ok(Self::Safetensors { tensors, names, prefix, norm_offset })
    }

    /// Whether the weights come from a GGUF file (computed as llama.cpp does) rather than a
    /// Hugging Face checkpoint (computed as transformers does).
    pub(crate) fn is_gguf(&self) -> bool {
        matches!(self, Self::Gguf { .. })
    }

    fn name(&self, w: WeightName) -> String {
        match self {
            Self::Gguf { .. } => w.gguf(),
            Self::Safetensors { names, prefix, .. } => prefix.apply(&w.hf(*names)),
        }
    }

    /// Whether the file holds this tensor.
    pub(crate) fn contains(&self, w: WeightName) -> bool {
        let name = self.name(w);
        match self {
            Self::Gguf { content, .. } => content.tensor_infos.contains_key(&name),
            Self::Safetensors { tensors, .. } => tensors.get(&name).is_ok(),
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
            Self::Safetensors { tensors, .. } => {
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

    /// Loads an RMSNorm weight as the scale it multiplies by (see `norm_offset`).
    pub(crate) fn load_norm(&self, w: WeightName, dim: usize, device: &Device) -> Result<Tensor> {
        let t = self.load_dense(w, &[dim], device)?;
        match self {
            Self::Safetensors { norm_offset, .. } if *norm_offset != 0.0 => {
                Ok(t.affine(1.0, f64::from(*norm_offset))?)
            }
            _ => Ok(t),
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
