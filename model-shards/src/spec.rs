//! The validated model specification.
//!
//! Two config types, as in every careful model codebase: a serde struct that mirrors the file
//! ([`HfConfig`] for `config.json`; GGUF metadata is read key by key) and the validated runtime
//! [`ModelSpec`] built from it. A missing key is a typed error, never a silent default; defaults
//! are applied only where the source format itself defines one (for example Hugging Face's
//! `rms_norm_eps` for llama).

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::error::{Error, Result};

/// The transformer families shoal implements (all Llama-like: RMSNorm, rotary attention with
/// grouped-query heads, SwiGLU MLP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3, SmolLM, TinyLlama.
    Llama,
    /// Mistral (optional sliding-window attention).
    Mistral,
    /// Qwen2: bias on the q, k and v projections.
    Qwen2,
    /// Qwen3: RMSNorm on q and k per head, explicit head dimension.
    Qwen3,
    /// Gemma 3: sliding-window and global layers interleaved (each with its own rope base),
    /// RMSNorm on q and k per head, norms after attention and after the feed-forward, GELU
    /// (tanh) gated feed-forward, embeddings scaled by `sqrt(hidden)`. See [`crate::gemma3`].
    Gemma3,
    /// Gemma 2: Gemma 3's block without the q/k norms, every other layer on the sliding
    /// window, attention scores and final logits soft-capped (`cap · tanh(x / cap)`).
    Gemma2,
    /// Phi-3: q, k and v fused in one projection, gate and up fused in another.
    Phi3,
    /// Qwen3-MoE: Qwen3's attention with a mixture-of-experts feed-forward (see
    /// [`MoeSpec`]). Mixtral is a `Llama` with one.
    Qwen3Moe,
}

impl Architecture {
    /// Parses the name used by `config.json`'s `model_type` or GGUF's `general.architecture`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "mistral" => Ok(Self::Mistral),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            "gemma3" => Ok(Self::Gemma3),
            "gemma2" => Ok(Self::Gemma2),
            "phi3" => Ok(Self::Phi3),
            "qwen3moe" => Ok(Self::Qwen3Moe),
            other => Err(Error::UnsupportedArchitecture(other.to_string())),
        }
    }

    /// The canonical lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
            Self::Gemma2 => "gemma2",
            Self::Phi3 => "phi3",
            Self::Qwen3Moe => "qwen3moe",
        }
    }
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1): llama weights as converted to GGUF by llama.cpp (q and k permuted).
    Interleaved,
    /// Pairs (i, i + d/2): Hugging Face checkpoints, and qwen GGUFs.
    HalfSplit,
}

/// Llama 3 style frequency scaling of the rotary embedding.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Llama3RopeScaling {
    /// Overall scaling factor.
    pub factor: f32,
    /// Low-frequency factor.
    pub low_freq_factor: f32,
    /// High-frequency factor.
    pub high_freq_factor: f32,
    /// Context length the model was pre-trained with.
    pub original_max_position_embeddings: usize,
}

/// A mixture-of-experts feed-forward: each token runs `n_experts_used` of `n_experts` experts
/// (SwiGLU feed-forwards of `expert_intermediate_size`), chosen by a router.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MoeSpec {
    /// Experts per layer.
    pub n_experts: usize,
    /// Experts each token runs (top-k).
    pub n_experts_used: usize,
    /// Intermediate size of one expert.
    pub expert_intermediate_size: usize,
}

/// Most experts per layer accepted from a file (the largest published models have 384).
pub const MAX_EXPERTS: usize = 4096;

/// The validated runtime description of a model: everything needed to build and run any span.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelSpec {
    /// Architecture family.
    pub arch: Architecture,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when smaller than `n_heads`).
    pub n_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding and the LM head).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base frequency.
    pub rope_theta: f32,
    /// Pairing of rotary dimensions.
    pub rope_style: RopeStyle,
    /// Llama 3 rope scaling, when the model uses it.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Maximum sequence length.
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on the q, k, v projections (qwen2).
    pub attention_bias: bool,
    /// RMSNorm on q and k per head (qwen3).
    pub qk_norm: bool,
    /// Sliding attention window (mistral: every layer; gemma3: the layers
    /// [`ModelSpec::is_sliding`] names), if any.
    pub sliding_window: Option<usize>,
    /// Gemma: of every `p` layers the first `p - 1` use the sliding window and the last one is
    /// global (llama.cpp's `sliding_window_pattern`, 6 for Gemma 3).
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 3: the rotary base of the sliding-window layers (`rope_theta` is the global
    /// layers').
    #[serde(default)]
    pub rope_local_theta: Option<f32>,
    /// Gemma 3 4B and larger: linear rope scaling of the global layers (positions divided by
    /// this factor; the sliding-window layers are not scaled).
    #[serde(default)]
    pub rope_linear_factor: Option<f32>,
    /// Gemma: the query is multiplied by this after rope, before attention rounds it to the
    /// cache's precision (llama.cpp's order), and scores are not scaled again; `None`: scores
    /// are scaled by `1/sqrt(head_dim)`. Gemma 3: `1/sqrt(head_dim)`, `1/sqrt(hidden/heads)`
    /// on the 27B.
    #[serde(default)]
    pub query_scale: Option<f32>,
    /// Gemma 2: attention scores become `cap · tanh(score / cap)` before the softmax.
    #[serde(default)]
    pub attn_logit_softcap: Option<f32>,
    /// Gemma 2 (and Gemma 3 files that set it): logits become `cap · tanh(logit / cap)`.
    #[serde(default)]
    pub final_logit_softcap: Option<f32>,
    /// A mixture-of-experts feed-forward in every layer (Mixtral, Qwen3-MoE); `None`: dense.
    #[serde(default)]
    pub moe: Option<MoeSpec>,
}

impl ModelSpec {
    /// Checks the relations between dimensions.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: String| Err(Error::InvalidConfig { key: key.to_string(), reason });
        for (key, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.n_layers),
            ("num_attention_heads", self.n_heads),
            ("num_key_value_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(key, "must be positive".into());
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(
                "num_key_value_heads",
                format!("{} query heads are not a multiple of {} kv heads", self.n_heads, self.n_kv_heads),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad("head_dim", format!("{} is odd; rotary embeddings need pairs", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad("rms_norm_eps", format!("{} is not a positive number", self.rms_norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad("rope_theta", format!("{} is not a positive number", self.rope_theta));
        }
        if let Some(m) = &self.moe {
            if m.n_experts == 0 || m.n_experts > MAX_EXPERTS {
                return bad(
                    "expert_count",
                    format!("{} experts (1 to {MAX_EXPERTS} are accepted)", m.n_experts),
                );
            }
            if m.n_experts_used == 0 || m.n_experts_used > m.n_experts {
                return bad(
                    "expert_used_count",
                    format!("{} experts used per token of {}", m.n_experts_used, m.n_experts),
                );
            }
            if m.expert_intermediate_size == 0 {
                return bad("expert_feed_forward_length", "must be positive".into());
            }
        }
        if let Some(s) = &self.rope_scaling
            && (!(s.factor > 0.0 && s.low_freq_factor > 0.0 && s.high_freq_factor > s.low_freq_factor)
                || s.original_max_position_embeddings == 0)
        {
            return bad("rope_scaling", format!("{s:?} is not a valid llama3 scaling"));
        }
        Ok(())
    }

    /// Whether layer `i` attends through the sliding window only.
    pub fn is_sliding(&self, i: usize) -> bool {
        match (self.sliding_window, self.sliding_window_pattern) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(_), Some(p)) => p == 0 || i % p < p - 1,
        }
    }

    /// Bytes of K and V cache per token per layer, at `dtype_bytes` bytes per value.
    pub fn kv_bytes_per_token_per_layer(&self, dtype_bytes: usize) -> usize {
        2 * self.n_kv_heads * self.head_dim * dtype_bytes
    }

    /// Builds the spec from a Hugging Face `config.json`.
    pub fn from_hf_config(cfg: &HfConfig) -> Result<Self> {
        match cfg.model_type.as_str() {
            // A multimodal checkpoint (Gemma 3 4B and larger): shoal runs its language model.
            "gemma3" => match &cfg.text_config {
                Some(text) if text.model_type == "gemma3_text" => Self::from_hf_config(text),
                Some(text) => Err(Error::InvalidConfig {
                    key: "text_config.model_type".into(),
                    reason: format!("`{}` (expected gemma3_text)", text.model_type),
                }),
                None => Err(Error::MissingConfig { key: "text_config".into() }),
            },
            // The Hub's Gemma 3 configs leave out what equals transformers' defaults.
            "gemma3_text" => Self::from_hf_fields(&cfg.with_gemma3_text_defaults()),
            _ => Self::from_hf_fields(cfg),
        }
    }

    fn from_hf_fields(cfg: &HfConfig) -> Result<Self> {
        let mixtral = cfg.model_type == "mixtral";
        let arch = match cfg.model_type.as_str() {
            "gemma3_text" => Architecture::Gemma3,
            "mixtral" => Architecture::Llama,
            "qwen3_moe" => Architecture::Qwen3Moe,
            // GGUF's spelling, which no config.json uses.
            "qwen3moe" => return Err(Error::UnsupportedArchitecture(cfg.model_type.clone())),
            other => Architecture::from_name(other)?,
        };
        let gemma = matches!(arch, Architecture::Gemma3 | Architecture::Gemma2);
        let req =
            |v: Option<usize>, key: &str| v.ok_or_else(|| Error::MissingConfig { key: key.to_string() });
        let invalid = |key: &str, reason: String| Error::InvalidConfig { key: key.to_string(), reason };
        let hidden_size = req(cfg.hidden_size, "hidden_size")?;
        let n_heads = req(cfg.num_attention_heads, "num_attention_heads")?;
        if n_heads == 0 {
            return Err(invalid("num_attention_heads", "must be positive".into()));
        }
        let head_dim = match (arch, cfg.head_dim) {
            (_, Some(d)) => d,
            (
                Architecture::Qwen3 | Architecture::Qwen3Moe | Architecture::Gemma3 | Architecture::Gemma2,
                None,
            ) => {
                return Err(Error::MissingConfig { key: "head_dim".into() });
            }
            (_, None) => hidden_size / n_heads,
        };
        // The feed-forward's activation.
        let (act_key, act) = match (&cfg.hidden_activation, &cfg.hidden_act) {
            (Some(a), _) => ("hidden_activation", a.as_str()),
            (None, Some(a)) => ("hidden_act", a.as_str()),
            (None, None) => ("hidden_act", if gemma { "gelu_pytorch_tanh" } else { "silu" }),
        };
        let want = if gemma { "gelu_pytorch_tanh" } else { "silu" };
        if act != want {
            return Err(invalid(
                act_key,
                format!("`{act}` is not supported for {} (supported: {want})", cfg.model_type),
            ));
        }
        if let Some(f) = cfg.partial_rotary_factor
            && f != 1.0
        {
            return Err(invalid(
                "partial_rotary_factor",
                format!("{f}: rotary embeddings on part of a head are not supported"),
            ));
        }
        if cfg.use_bidirectional_attention == Some(true) {
            return Err(invalid("use_bidirectional_attention", "only causal attention is supported".into()));
        }
        let rope = HfRope::of(cfg)?;
        let sliding_window = match arch {
            Architecture::Mistral | Architecture::Phi3 | Architecture::Gemma3 | Architecture::Gemma2 => {
                cfg.sliding_window
            }
            Architecture::Llama if mixtral => cfg.sliding_window,
            Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Qwen3Moe
                if cfg.use_sliding_window == Some(true) =>
            {
                cfg.sliding_window
            }
            _ => None,
        }
        .filter(|&w| w > 0);
        let moe = match arch {
            Architecture::Llama if mixtral => Some(MoeSpec {
                n_experts: req(cfg.num_local_experts, "num_local_experts")?,
                n_experts_used: req(cfg.num_experts_per_tok, "num_experts_per_tok")?,
                expert_intermediate_size: req(cfg.intermediate_size, "intermediate_size")?,
            }),
            Architecture::Qwen3Moe => {
                // transformers' defaults: no renormalisation, every layer sparse.
                if cfg.norm_topk_prob != Some(true) {
                    return Err(invalid(
                        "norm_topk_prob",
                        "routing weights that are not renormalised over the top-k experts are not supported"
                            .into(),
                    ));
                }
                if cfg.decoder_sparse_step.unwrap_or(1) != 1
                    || cfg.mlp_only_layers.as_ref().is_some_and(|l| !l.is_empty())
                {
                    return Err(invalid(
                        "mlp_only_layers",
                        "dense layers between the mixture-of-experts layers are not supported".into(),
                    ));
                }
                Some(MoeSpec {
                    n_experts: req(cfg.num_experts.or(cfg.num_local_experts), "num_experts")?,
                    n_experts_used: req(cfg.num_experts_per_tok, "num_experts_per_tok")?,
                    expert_intermediate_size: req(cfg.moe_intermediate_size, "moe_intermediate_size")?,
                })
            }
            _ => None,
        };
        let intermediate_size = match &moe {
            Some(m) => m.expert_intermediate_size,
            None => req(cfg.intermediate_size, "intermediate_size")?,
        };
        let mut spec = Self {
            arch,
            hidden_size,
            intermediate_size,
            n_layers: req(cfg.num_hidden_layers, "num_hidden_layers")?,
            n_heads,
            n_kv_heads: cfg.num_key_value_heads.unwrap_or(n_heads),
            head_dim,
            vocab_size: req(cfg.vocab_size, "vocab_size")?,
            rms_norm_eps: cfg.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: rope.theta.unwrap_or(10_000.0),
            rope_style: RopeStyle::HalfSplit,
            rope_scaling: rope.llama3,
            max_position_embeddings: req(cfg.max_position_embeddings, "max_position_embeddings")?,
            // transformers ties Gemma's head to its embedding unless told otherwise.
            tie_word_embeddings: cfg.tie_word_embeddings.unwrap_or(gemma),
            attention_bias: match arch {
                Architecture::Qwen2 => true,
                _ => cfg.attention_bias.unwrap_or(false),
            },
            qk_norm: matches!(arch, Architecture::Qwen3 | Architecture::Qwen3Moe | Architecture::Gemma3),
            sliding_window,
            sliding_window_pattern: None,
            rope_local_theta: None,
            rope_linear_factor: None,
            query_scale: None,
            attn_logit_softcap: None,
            final_logit_softcap: None,
            moe,
        };
        if gemma {
            spec.gemma_from_hf(cfg, &rope)?;
        } else if rope.linear.is_some() {
            return Err(invalid(
                "rope_scaling.rope_type",
                format!("`linear` is not supported for {} (supported: default, llama3)", cfg.model_type),
            ));
        }
        spec.validate()?;
        Ok(spec)
    }

    /// Gemma 3's and Gemma 2's keys in `config.json`, with transformers' defaults where the file
    /// is silent (the configuration classes define them).
    fn gemma_from_hf(&mut self, cfg: &HfConfig, rope: &HfRope) -> Result<()> {
        let gemma2 = self.arch == Architecture::Gemma2;
        let invalid = |key: &str, reason: String| Error::InvalidConfig { key: key.to_string(), reason };
        if self.sliding_window.is_some() {
            let pattern = match &cfg.layer_types {
                Some(types) => pattern_of_layer_types(types, self.n_layers)?,
                // transformers reads `sliding_window_pattern` (not the `_sliding_window_pattern`
                // its Gemma 3 configs also write).
                None => cfg.sliding_window_pattern.unwrap_or(if gemma2 { 2 } else { 6 }),
            };
            self.sliding_window_pattern = Some(pattern);
            self.rope_local_theta =
                Some(if gemma2 { self.rope_theta } else { rope.local_theta.unwrap_or(10_000.0) });
        }
        if rope.llama3.is_some() {
            return Err(invalid(
                "rope_scaling.rope_type",
                format!("`llama3` is not supported for {} (supported: default, linear)", cfg.model_type),
            ));
        }
        if let Some(f) = rope.linear {
            if gemma2 {
                return Err(invalid(
                    "rope_scaling.rope_type",
                    "`linear` is not supported for gemma2 (supported: default)".into(),
                ));
            }
            self.rope_linear_factor = (f != 1.0).then_some(f);
        }
        let cap = |key: &str, v: Option<Option<f32>>, default: Option<f32>| -> Result<Option<f32>> {
            match v.unwrap_or(default) {
                Some(c) if !(c.is_finite() && c > 0.0) => {
                    Err(invalid(key, format!("{c} is not a positive number")))
                }
                c => Ok(c),
            }
        };
        let defaults = if gemma2 { (Some(50.0), Some(30.0)) } else { (None, None) };
        self.attn_logit_softcap = cap("attn_logit_softcapping", cfg.attn_logit_softcapping, defaults.0)?;
        self.final_logit_softcap = cap("final_logit_softcapping", cfg.final_logit_softcapping, defaults.1)?;
        let scalar = cfg.query_pre_attn_scalar.unwrap_or(256.0);
        if !(scalar.is_finite() && scalar > 0.0) {
            return Err(invalid("query_pre_attn_scalar", format!("{scalar} is not a positive number")));
        }
        self.query_scale = Some(1.0 / scalar.sqrt());
        Ok(())
    }

    /// Builds the spec from GGUF metadata. `tensor_names` tells what the file holds (tied
    /// embeddings, biases, rope frequency factors).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let arch_name = get_str(md, "general.architecture")?;
        let arch = Architecture::from_name(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let n_heads = get_usize(md, &key("attention.head_count"))?;
        let hidden_size = get_usize(md, &key("embedding_length"))?;
        if n_heads == 0 {
            return Err(Error::InvalidConfig {
                key: key("attention.head_count"),
                reason: "must be positive".into(),
            });
        }
        let head_dim = match opt_usize(md, &key("attention.key_length"))? {
            Some(d) => d,
            None => hidden_size / n_heads,
        };
        let has = |name: &str| content.tensor_infos.contains_key(name);
        let vocab_size = match opt_usize(md, &key("vocab_size"))? {
            Some(v) => v,
            None => match md.get("tokenizer.ggml.tokens") {
                Some(v) => v.to_vec().map_err(candle_err)?.len(),
                None => return Err(Error::MissingConfig { key: key("vocab_size") }),
            },
        };
        let moe = match opt_usize(md, &key("expert_count"))?.filter(|&e| e > 0) {
            None if arch == Architecture::Qwen3Moe => {
                return Err(Error::MissingConfig { key: key("expert_count") });
            }
            None => None,
            Some(n_experts) => {
                if !matches!(arch, Architecture::Llama | Architecture::Mistral | Architecture::Qwen3Moe) {
                    return Err(Error::InvalidConfig {
                        key: key("expert_count"),
                        reason: format!(
                            "a mixture of experts in {arch_name} is not supported (supported: Mixtral as llama, qwen3moe)"
                        ),
                    });
                }
                if let Some(name) =
                    ["blk.0.ffn_gate_shexp.weight", "blk.0.ffn_up_shexp.weight"].into_iter().find(|n| has(n))
                {
                    return Err(Error::InvalidConfig {
                        key: name.into(),
                        reason:
                            "shared experts (Qwen2-MoE, DeepSeek) are not supported (supported: Mixtral as \
                                 llama, qwen3moe)"
                                .into(),
                    });
                }
                let used = get_usize(md, &key("expert_used_count"))?;
                let ffn = match opt_usize(md, &key("expert_feed_forward_length"))? {
                    Some(f) => f,
                    None => get_usize(md, &key("feed_forward_length"))?,
                };
                Some(MoeSpec { n_experts, n_experts_used: used, expert_intermediate_size: ffn })
            }
        };
        let intermediate_size = match (opt_usize(md, &key("feed_forward_length"))?, &moe) {
            (Some(f), _) => f,
            (None, Some(m)) => m.expert_intermediate_size,
            (None, None) => return Err(Error::MissingConfig { key: key("feed_forward_length") }),
        };
        let spec = Self {
            arch,
            hidden_size,
            intermediate_size,
            n_layers: get_usize(md, &key("block_count"))?,
            n_heads,
            n_kv_heads: opt_usize(md, &key("attention.head_count_kv"))?.unwrap_or(n_heads),
            head_dim,
            vocab_size,
            rms_norm_eps: get_f64(md, &key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: opt_f64(md, &key("rope.freq_base"))?.unwrap_or(10_000.0) as f32,
            // llama.cpp permutes q/k of llama-type models for its "normal" (interleaved) rope;
            // qwen models keep the Hugging Face layout and use the neox (half-split) rope.
            rope_style: match arch {
                Architecture::Llama | Architecture::Mistral => RopeStyle::Interleaved,
                Architecture::Qwen2
                | Architecture::Qwen3
                | Architecture::Gemma3
                | Architecture::Gemma2
                | Architecture::Phi3
                | Architecture::Qwen3Moe => RopeStyle::HalfSplit,
            },
            // GGUF stores Llama 3 scaling as precomputed `rope_freqs.weight` factors instead.
            rope_scaling: None,
            max_position_embeddings: get_usize(md, &key("context_length"))?,
            tie_word_embeddings: !has("output.weight"),
            attention_bias: has("blk.0.attn_q.bias"),
            qk_norm: has("blk.0.attn_q_norm.weight"),
            sliding_window: opt_usize(md, &key("attention.sliding_window"))?.filter(|&w| w > 0),
            sliding_window_pattern: None,
            rope_local_theta: None,
            rope_linear_factor: None,
            query_scale: None,
            attn_logit_softcap: None,
            final_logit_softcap: None,
            moe,
        };
        let spec = match arch {
            Architecture::Gemma3 | Architecture::Gemma2 => Self::gemma_from_gguf(spec, md, arch_name)?,
            Architecture::Phi3 => {
                // llama.cpp: LongRoPE factors (the 128k variants) are not implemented here, and
                // Phi-3's sliding window is disabled (attention sees every position); the
                // query is scaled before its f16 rounding.
                for name in ["rope_factors_long.weight", "rope_factors_short.weight"] {
                    if has(name) {
                        return Err(Error::InvalidConfig {
                            key: name.into(),
                            reason: "Phi-3's LongRoPE scaling (128k context variants) is not supported"
                                .into(),
                        });
                    }
                }
                let mut spec = spec;
                spec.sliding_window = None;
                spec.query_scale = Some(1.0 / (spec.head_dim as f32).sqrt());
                spec
            }
            _ => spec,
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl ModelSpec {
    /// Gemma 3's and Gemma 2's additions, with llama.cpp's defaults where the file is silent:
    /// Gemma 3 has every 6th layer global and its sliding-window layers rotate with base
    /// 10 000; Gemma 2 has every other layer on a window of 4096 (one rope base) and soft-caps
    /// attention at 50 and logits at 30. The query is scaled by `1/sqrt(head_dim)`, or
    /// `1/sqrt(hidden/heads)` on the 27B models (62 layers for Gemma 3, 46 for Gemma 2).
    fn gemma_from_gguf(
        mut spec: Self,
        md: &HashMap<String, gguf_file::Value>,
        arch_name: &str,
    ) -> Result<Self> {
        let key = |k: &str| format!("{arch_name}.{k}");
        let gemma2 = spec.arch == Architecture::Gemma2;
        let pattern_key = key("attention.sliding_window_pattern");
        if matches!(md.get(&pattern_key), Some(gguf_file::Value::Array(_))) {
            return Err(Error::InvalidConfig {
                key: pattern_key,
                reason: "a per-layer list of sliding-window layers is not supported".into(),
            });
        }
        spec.sliding_window_pattern = opt_usize(md, &pattern_key)?;
        if gemma2 && spec.sliding_window.is_none() {
            spec.sliding_window = Some(4096);
        }
        if spec.sliding_window.is_some() {
            spec.sliding_window_pattern =
                Some(spec.sliding_window_pattern.unwrap_or(if gemma2 { 2 } else { 6 }));
            let default_local = if gemma2 { spec.rope_theta } else { 10_000.0 };
            spec.rope_local_theta =
                Some(opt_f64(md, &key("rope.freq_base_swa"))?.map_or(default_local, |v| v as f32));
        }
        match md.get(&key("rope.scaling.type")) {
            None => {}
            Some(gguf_file::Value::String(t)) if t == "linear" || t == "none" => {}
            Some(other) => {
                return Err(Error::InvalidConfig {
                    key: key("rope.scaling.type"),
                    reason: format!("{other:?} is not supported for {arch_name} (supported: linear)"),
                });
            }
        }
        if let Some(f) = opt_f64(md, &key("rope.scaling.factor"))? {
            if !(f.is_finite() && f > 0.0) {
                return Err(Error::InvalidConfig {
                    key: key("rope.scaling.factor"),
                    reason: format!("{f} is not a positive number"),
                });
            }
            spec.rope_linear_factor = (f != 1.0).then_some(f as f32);
        }
        let cap = |k: &str, default: Option<f64>| -> Result<Option<f32>> {
            match opt_f64(md, &key(k))?.or(default) {
                None => Ok(None),
                Some(c) if c.is_finite() && c > 0.0 => Ok(Some(c as f32)),
                Some(c) => {
                    Err(Error::InvalidConfig { key: key(k), reason: format!("{c} is not a positive number") })
                }
            }
        };
        if gemma2 {
            spec.attn_logit_softcap = cap("attn_logit_softcapping", Some(50.0))?;
            spec.final_logit_softcap = cap("final_logit_softcapping", Some(30.0))?;
        } else {
            spec.final_logit_softcap = cap("final_logit_softcapping", None)?;
        }
        let big = if gemma2 { 46 } else { 62 };
        spec.query_scale = Some(if spec.n_layers == big {
            1.0 / ((spec.hidden_size / spec.n_heads) as f32).sqrt()
        } else {
            1.0 / (spec.head_dim as f32).sqrt()
        });
        if !gemma2 && !spec.qk_norm {
            return Err(Error::MissingWeight("blk.0.attn_q_norm.weight".into()));
        }
        Ok(spec)
    }
}

/// Mirror of the fields shoal reads from a Hugging Face `config.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct HfConfig {
    /// `model_type`: llama, mistral, mixtral, qwen2, qwen3, qwen3_moe, gemma2, gemma3_text,
    /// gemma3 (multimodal: its `text_config` is used), phi3.
    pub model_type: String,
    /// `hidden_size`.
    pub hidden_size: Option<usize>,
    /// `intermediate_size`.
    pub intermediate_size: Option<usize>,
    /// `num_hidden_layers`.
    pub num_hidden_layers: Option<usize>,
    /// `num_attention_heads`.
    pub num_attention_heads: Option<usize>,
    /// `num_key_value_heads` (defaults to the query heads, as in transformers).
    pub num_key_value_heads: Option<usize>,
    /// `head_dim`.
    pub head_dim: Option<usize>,
    /// `vocab_size`.
    pub vocab_size: Option<usize>,
    /// `rms_norm_eps`.
    pub rms_norm_eps: Option<f64>,
    /// `rope_theta`.
    pub rope_theta: Option<f32>,
    /// `rope_scaling`.
    pub rope_scaling: Option<HfRopeScaling>,
    /// `rope_parameters` (transformers 5 layout: theta and scaling together, or one such
    /// entry per layer type).
    pub rope_parameters: Option<serde_json::Value>,
    /// `max_position_embeddings`.
    pub max_position_embeddings: Option<usize>,
    /// `tie_word_embeddings`.
    pub tie_word_embeddings: Option<bool>,
    /// `attention_bias` (llama variants with biased projections).
    pub attention_bias: Option<bool>,
    /// `sliding_window`.
    pub sliding_window: Option<usize>,
    /// `use_sliding_window` (qwen).
    pub use_sliding_window: Option<bool>,
    /// `bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`: one id or a list.
    pub eos_token_id: Option<OneOrMany>,
    /// `torch_dtype`.
    pub torch_dtype: Option<String>,
    /// `hidden_act` (llama and most others).
    pub hidden_act: Option<String>,
    /// `hidden_activation` (Gemma).
    pub hidden_activation: Option<String>,
    /// `partial_rotary_factor` (Phi-3 variants).
    pub partial_rotary_factor: Option<f32>,
    /// Gemma: `layer_types`, each `sliding_attention` or `full_attention`.
    pub layer_types: Option<Vec<String>>,
    /// Gemma: `sliding_window_pattern`.
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 3: `rope_local_base_freq`, the sliding-window layers' rotary base.
    pub rope_local_base_freq: Option<f32>,
    /// Gemma: `query_pre_attn_scalar` (queries are scaled by its inverse square root).
    pub query_pre_attn_scalar: Option<f32>,
    /// Gemma: `attn_logit_softcapping` (absent, `null` or a value).
    #[serde(default, deserialize_with = "present")]
    pub attn_logit_softcapping: Option<Option<f32>>,
    /// Gemma: `final_logit_softcapping` (absent, `null` or a value).
    #[serde(default, deserialize_with = "present")]
    pub final_logit_softcapping: Option<Option<f32>>,
    /// Gemma 3: `use_bidirectional_attention` (only causal attention is supported).
    pub use_bidirectional_attention: Option<bool>,
    /// Mixtral: `num_local_experts`.
    pub num_local_experts: Option<usize>,
    /// Qwen3-MoE: `num_experts` (transformers 5 writes it as `num_local_experts`).
    pub num_experts: Option<usize>,
    /// Mixtral, Qwen3-MoE: `num_experts_per_tok`.
    pub num_experts_per_tok: Option<usize>,
    /// Qwen3-MoE: `moe_intermediate_size`, one expert's.
    pub moe_intermediate_size: Option<usize>,
    /// Qwen3-MoE: `norm_topk_prob`.
    pub norm_topk_prob: Option<bool>,
    /// Qwen3-MoE: `decoder_sparse_step`.
    pub decoder_sparse_step: Option<usize>,
    /// Qwen3-MoE: `mlp_only_layers`.
    pub mlp_only_layers: Option<Vec<usize>>,
    /// Multimodal Gemma 3: the language model's configuration.
    pub text_config: Option<Box<HfConfig>>,
}

impl HfConfig {
    /// `Gemma3TextConfig`'s defaults (transformers 5.23) where the file is silent: the Hub's
    /// multimodal Gemma 3 configs list only a few keys of their `text_config`.
    fn with_gemma3_text_defaults(&self) -> Self {
        let mut c = self.clone();
        let fill = |v: &mut Option<usize>, d: usize| *v = v.or(Some(d));
        fill(&mut c.hidden_size, 2304);
        fill(&mut c.intermediate_size, 9216);
        fill(&mut c.num_hidden_layers, 26);
        fill(&mut c.num_attention_heads, 8);
        fill(&mut c.num_key_value_heads, 4);
        fill(&mut c.head_dim, 256);
        fill(&mut c.vocab_size, 262_208);
        fill(&mut c.max_position_embeddings, 131_072);
        fill(&mut c.sliding_window, 4096);
        c.rms_norm_eps = c.rms_norm_eps.or(Some(1e-6));
        if c.rope_parameters.is_none() {
            c.rope_theta = c.rope_theta.or(Some(1_000_000.0));
        }
        c
    }
}

/// A key that may be absent (`None`), `null` (`Some(None)`) or set.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Option<f32>>, D::Error> {
    Option::<f32>::deserialize(d).map(Some)
}

/// The layers' pattern from Gemma's `layer_types`: the first `p - 1` of every `p` layers slide,
/// the last is global.
fn pattern_of_layer_types(types: &[String], n_layers: usize) -> Result<usize> {
    let invalid = |reason: String| Error::InvalidConfig { key: "layer_types".into(), reason };
    if types.len() != n_layers {
        return Err(invalid(format!("{} entries for {n_layers} layers", types.len())));
    }
    if let Some(t) = types.iter().find(|t| !matches!(t.as_str(), "sliding_attention" | "full_attention")) {
        return Err(invalid(format!("`{t}` (supported: sliding_attention, full_attention)")));
    }
    // No global layer: every layer slides (pattern 0).
    let p = types.iter().position(|t| t == "full_attention").map_or(0, |f| f + 1);
    let expected = |i: usize| if p != 0 && i % p == p - 1 { "full_attention" } else { "sliding_attention" };
    if let Some(i) = (0..n_layers).find(|&i| types[i] != expected(i)) {
        return Err(invalid(format!(
            "layer {i} is {}: only a repeating pattern of sliding layers then one global layer is supported",
            types[i]
        )));
    }
    Ok(p)
}

/// The rotary settings of a `config.json`, from `rope_parameters` (transformers 5: flat, or
/// one entry per layer type) or `rope_theta`, `rope_scaling` and `rope_local_base_freq`.
struct HfRope {
    theta: Option<f32>,
    /// The sliding-window layers' base (Gemma 3).
    local_theta: Option<f32>,
    llama3: Option<Llama3RopeScaling>,
    /// Linear scaling factor (Gemma 3's global layers).
    linear: Option<f32>,
}

impl HfRope {
    fn of(cfg: &HfConfig) -> Result<Self> {
        let parse = |key: &str, v: &serde_json::Value| -> Result<HfRopeScaling> {
            serde_json::from_value(v.clone())
                .map_err(|e| Error::InvalidConfig { key: key.to_string(), reason: e.to_string() })
        };
        let (global, local) = match &cfg.rope_parameters {
            Some(v) if v.get("full_attention").is_some() || v.get("sliding_attention").is_some() => {
                let part = |k: &str| -> Result<Option<HfRopeScaling>> {
                    v.get(k).map(|p| parse(&format!("rope_parameters.{k}"), p)).transpose()
                };
                (part("full_attention")?, part("sliding_attention")?)
            }
            Some(v) => (Some(parse("rope_parameters", v)?), None),
            None => (cfg.rope_scaling.clone(), None),
        };
        let theta = global.as_ref().and_then(|p| p.rope_theta).or(cfg.rope_theta);
        let local_theta = local.as_ref().and_then(|p| p.rope_theta).or(cfg.rope_local_base_freq);
        if let Some(l) = &local
            && !matches!(l.kind(), "default")
        {
            return Err(Error::InvalidConfig {
                key: "rope_parameters.sliding_attention.rope_type".into(),
                reason: format!("`{}` is not supported (supported: default)", l.kind()),
            });
        }
        let mut out = Self { theta, local_theta, llama3: None, linear: None };
        let Some(s) = global else { return Ok(out) };
        let missing = |k: &str| Error::MissingConfig { key: format!("rope_scaling.{k}") };
        match s.kind() {
            "default" => {}
            "llama3" => {
                out.llama3 = Some(Llama3RopeScaling {
                    factor: s.factor.ok_or_else(|| missing("factor"))?,
                    low_freq_factor: s.low_freq_factor.ok_or_else(|| missing("low_freq_factor"))?,
                    high_freq_factor: s.high_freq_factor.ok_or_else(|| missing("high_freq_factor"))?,
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .ok_or_else(|| missing("original_max_position_embeddings"))?,
                })
            }
            "linear" => {
                let f = s.factor.ok_or_else(|| missing("factor"))?;
                if !(f.is_finite() && f > 0.0) {
                    return Err(Error::InvalidConfig {
                        key: "rope_scaling.factor".into(),
                        reason: format!("{f} is not a positive number"),
                    });
                }
                out.linear = Some(f);
            }
            other => {
                return Err(Error::InvalidConfig {
                    key: "rope_scaling.rope_type".into(),
                    reason: format!(
                        "`{other}` is not supported (supported: default, llama3, linear for gemma3)"
                    ),
                });
            }
        }
        Ok(out)
    }
}

/// A JSON value that is either one id or a list of ids.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl OneOrMany {
    /// All the ids.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(v) => vec![*v],
            Self::Many(v) => v.clone(),
        }
    }
}

/// Mirror of `config.json`'s `rope_scaling` (or `rope_parameters`).
#[derive(Clone, Debug, Deserialize)]
pub struct HfRopeScaling {
    /// `rope_theta` (only in `rope_parameters`).
    pub rope_theta: Option<f32>,
    /// `rope_type`.
    pub rope_type: Option<String>,
    /// `type` (older spelling).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// `factor`.
    pub factor: Option<f32>,
    /// `low_freq_factor`.
    pub low_freq_factor: Option<f32>,
    /// `high_freq_factor`.
    pub high_freq_factor: Option<f32>,
    /// `original_max_position_embeddings`.
    pub original_max_position_embeddings: Option<usize>,
}

impl HfRopeScaling {
    /// `rope_type`, or the older `type`, or `default`.
    fn kind(&self) -> &str {
        self.rope_type.as_deref().or(self.kind.as_deref()).unwrap_or("default")
    }
}

fn candle_err(e: candle_core::Error) -> Error {
    Error::Candle(e)
}

fn get_str<'a>(md: &'a HashMap<String, gguf_file::Value>, key: &str) -> Result<&'a str> {
    match md.get(key) {
        Some(v) => v
            .to_string()
            .map(String::as_str)
            .map_err(|e| Error::InvalidConfig { key: key.to_string(), reason: e.to_string() }),
        None => Err(Error::MissingConfig { key: key.to_string() }),
    }
}

/// Reads an unsigned integer metadata value of any integer width.
pub(crate) fn opt_usize(md: &HashMap<String, gguf_file::Value>, key: &str) -> Result<Option<usize>> {
    use gguf_file::Value as V;
    let v = match md.get(key) {
        None => return Ok(None),
        Some(v) => v,
    };
    let n: i128 = match v {
        V::U8(x) => (*x).into(),
        V::I8(x) => (*x).into(),
        V::U16(x) => (*x).into(),
        V::I16(x) => (*x).into(),
        V::U32(x) => (*x).into(),
        V::I32(x) => (*x).into(),
        V::U64(x) => (*x).into(),
        V::I64(x) => (*x).into(),
        other => {
            return Err(Error::InvalidConfig {
                key: key.to_string(),
                reason: format!("expected an integer, found {:?}", other.value_type()),
            });
        }
    };
    usize::try_from(n)
        .map(Some)
        .map_err(|_| Error::InvalidConfig { key: key.to_string(), reason: format!("{n} is out of range") })
}

fn get_usize(md: &HashMap<String, gguf_file::Value>, key: &str) -> Result<usize> {
    opt_usize(md, key)?.ok_or_else(|| Error::MissingConfig { key: key.to_string() })
}

fn opt_f64(md: &HashMap<String, gguf_file::Value>, key: &str) -> Result<Option<f64>> {
    use gguf_file::Value as V;
    match md.get(key) {
        None => Ok(None),
        Some(V::F32(x)) => Ok(Some(f64::from(*x))),
        Some(V::F64(x)) => Ok(Some(*x)),
        Some(other) => Err(Error::InvalidConfig {
            key: key.to_string(),
            reason: format!("expected a float, found {:?}", other.value_type()),
        }),
    }
}

fn get_f64(md: &HashMap<String, gguf_file::Value>, key: &str) -> Result<f64> {
    opt_f64(md, key)?.ok_or_else(|| Error::MissingConfig { key: key.to_string() })
}
