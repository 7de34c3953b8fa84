//! A loaded span of layers and its forward step.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, KvPool, block_values};
use crate::linear::{Embedding, Linear};
use crate::llama::RmsNorm;
use crate::model::Model;
use crate::rope::Rope;
use crate::spec::Architecture;
use crate::spec::ModelSpec;
use crate::weights::{Loaded, WeightName};

/// What a step feeds into a span.
#[derive(Debug, Clone)]
pub enum StageInput {
    /// Token ids: only the first span (which holds the embedding) accepts them.
    Tokens(Vec<u32>),
    /// Hidden states `(t, hidden)` from the previous span.
    Hidden(Tensor),
}

impl StageInput {
    /// Number of positions in the step.
    pub fn len(&self) -> Result<usize> {
        Ok(match self {
            Self::Tokens(ids) => ids.len(),
            Self::Hidden(h) => h.dim(0)?,
        })
    }

    /// Whether the step is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// Which positions of a step the last span turns into logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// Only the last position (generation).
    Last,
    /// Every position of the step (scoring, tests).
    All,
}

/// What a step returns.
#[derive(Debug, Clone)]
pub enum StageOutput {
    /// Hidden states `(t, hidden)` for the next span.
    Hidden(Tensor),
    /// Logits `(rows, vocab)` from the last span.
    Logits(Tensor),
}

/// One transformer block of any supported family.
enum Block {
    Llama(crate::llama::Block),
    Gemma3(crate::gemma3::Block),
}

impl Block {
    fn load(
        w: &crate::weights::Weights,
        i: usize,
        spec: &ModelSpec,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Ok(match spec.arch {
            Architecture::Gemma3 | Architecture::Gemma2 => {
                Self::Gemma3(crate::gemma3::Block::load(w, i, spec, device, dtype)?)
            }
            Architecture::Llama
            | Architecture::Mistral
            | Architecture::Qwen2
            | Architecture::Qwen3
            | Architecture::Qwen3Moe
            | Architecture::Phi3 => Self::Llama(crate::llama::Block::load(w, i, spec, device, dtype)?),
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cache: &mut KvCache,
        rope: &Rope,
        rows: bool,
    ) -> Result<Tensor> {
        match self {
            Self::Llama(b) => b.forward(x, layer, cache, rope, rows),
            Self::Gemma3(b) => b.forward(x, layer, cache, rows),
        }
    }

    fn forward_batch(
        &self,
        x: &Tensor,
        layer: usize,
        caches: &mut [&mut KvCache],
        lens: &[usize],
        rope: &Rope,
    ) -> Result<Tensor> {
        match self {
            Self::Llama(b) => b.forward_batch(x, layer, caches, lens, rope),
            Self::Gemma3(b) => b.forward_batch(x, layer, caches, lens),
        }
    }
}

/// A contiguous span `[start, end)` of a model's layers, with the embedding when it starts at
/// layer 0 and the final norm and LM head when it ends at the last layer.
pub struct Shard {
    spec: ModelSpec,
    span: Range<usize>,
    embedding: Option<Embedding>,
    blocks: Vec<Block>,
    head: Option<(RmsNorm, Linear)>,
    rope: Rope,
    device: Device,
    kv_precision: DType,
    /// The window, when every layer of the span attends through it.
    sliding_only: Option<usize>,
}

impl Shard {
    /// Loads the layers `span` of `model` onto `device`. Dense weights are converted to
    /// `dtype`; quantized weights stay quantized.
    pub fn load(model: &Model, span: Range<usize>, device: &Device, dtype: DType) -> Result<Self> {
        let spec = model.spec().clone();
        if span.start >= span.end || span.end > spec.n_layers {
            return Err(Error::InvalidSpan { start: span.start, end: span.end, n_layers: spec.n_layers });
        }
        let w = model.weights();
        let (v, h) = (spec.vocab_size, spec.hidden_size);
        let first = span.start == 0;
        let last = span.end == spec.n_layers;
        let embedding = if first || (last && spec.tie_word_embeddings) {
            Some(Embedding::new(w.load(WeightName::Embedding, &[v, h], device, dtype)?)?)
        } else {
            None
        };
        let blocks =
            span.clone().map(|i| Block::load(w, i, &spec, device, dtype)).collect::<Result<Vec<_>>>()?;
        let head = if last {
            let norm = RmsNorm::load(w, WeightName::OutputNorm, h, spec.rms_norm_eps, device)?;
            let lm_head = match (&embedding, spec.tie_word_embeddings) {
                (Some(e), true) => e.as_linear()?,
                _ => Linear::new(w.load(WeightName::LmHead, &[v, h], device, dtype)?, None)?,
            };
            Some((norm, lm_head))
        } else {
            None
        };
        // A tied model's last span needs the table only as its head.
        let embedding = if first { embedding } else { None };
        let freq_factors = if w.contains(WeightName::RopeFreqs) {
            let half = spec.head_dim / 2;
            match w.load(WeightName::RopeFreqs, &[half], device, DType::F32)? {
                Loaded::Dense(t) => Some(t.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                Loaded::Quantized(q) => Some(q.dequantize(&Device::Cpu)?.to_vec1::<f32>()?),
            }
        } else {
            None
        };
        let rope = Rope::new(&spec, freq_factors);
        // GGUF models follow llama.cpp, whose default KV cache is f16; Hugging Face models
        // follow transformers, whose cache has the compute dtype.
        let kv_precision = match model.format() {
            crate::ModelFormat::Gguf => DType::F16,
            crate::ModelFormat::HuggingFace => dtype,
        };
        let sliding_only = spec.sliding_window.filter(|_| span.clone().all(|i| spec.is_sliding(i)));
        Ok(Self {
            spec,
            span,
            embedding,
            blocks,
            head,
            rope,
            device: device.clone(),
            kv_precision,
            sliding_only,
        })
    }

    /// The model's spec.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The layers this shard holds.
    pub fn span(&self) -> Range<usize> {
        self.span.clone()
    }

    /// Whether this shard starts at layer 0 (takes token ids).
    pub fn is_first(&self) -> bool {
        self.span.start == 0
    }

    /// Whether this shard ends at the last layer (returns logits).
    pub fn is_last(&self) -> bool {
        self.span.end == self.spec.n_layers
    }

    /// The device the shard runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A pool of KV blocks for this span's sessions holding `budget_bytes` (`None`:
    /// unlimited). See [`KvCache`].
    pub fn kv_pool(&self, budget_bytes: Option<usize>) -> KvPool {
        KvPool::new(self.kv_block_values(), self.kv_precision, budget_bytes)
    }

    /// A new, empty KV cache for one session with a budget of its own (unlimited), limited to
    /// `max_len` positions (capped at the model's maximum).
    pub fn new_cache(&self, max_len: usize) -> KvCache {
        self.cache_from(self.kv_pool(None), max_len)
    }

    /// A new, empty KV cache drawing its blocks from `pool` (made by [`Shard::kv_pool`] of a
    /// span of the same length), limited to `max_len` positions.
    pub fn new_cache_in(&self, pool: &KvPool, max_len: usize) -> Result<KvCache> {
        if !pool.fits(self.kv_block_values(), self.kv_precision) {
            return Err(Error::InvalidInput("the KV pool was made for another span".into()));
        }
        Ok(self.cache_from(pool.clone(), max_len))
    }

    /// Values of one KV block of this span.
    fn kv_block_values(&self) -> usize {
        block_values(self.blocks.len(), self.spec.n_kv_heads, self.spec.head_dim)
    }

    fn cache_from(&self, pool: KvPool, max_len: usize) -> KvCache {
        KvCache::new(
            pool,
            self.blocks.len(),
            self.spec.n_kv_heads,
            self.spec.head_dim,
            max_len.min(self.spec.max_position_embeddings),
            self.kv_precision,
        )
    }

    /// Runs one step of a session: the positions `cache.len()..cache.len() + t`. Returns
    /// hidden states, or logits on the last span. On error the cache is left unchanged.
    pub fn forward(&self, cache: &mut KvCache, input: StageInput, logits: LogitsMode) -> Result<StageOutput> {
        self.forward_impl(cache, input, logits, false)
    }

    /// [`Shard::forward`] where every row (position) gets exactly the bits a one-position
    /// step gives it: the products use the row-invariant kernels, as a batch of sessions does
    /// (slower than a prefill's for many rows). Speculative decoding verifies its drafts this
    /// way, so the tokens it keeps are those of one-position decoding.
    pub fn forward_rows(
        &self,
        cache: &mut KvCache,
        input: StageInput,
        logits: LogitsMode,
    ) -> Result<StageOutput> {
        self.forward_impl(cache, input, logits, true)
    }

    fn forward_impl(
        &self,
        cache: &mut KvCache,
        input: StageInput,
        logits: LogitsMode,
        rows: bool,
    ) -> Result<StageOutput> {
        let t = input.len()?;
        if t == 0 {
            return Err(Error::InvalidInput("empty step".into()));
        }
        let mut x = self.input_rows(input, t)?;
        self.release_outside_window(cache);
        cache.reserve(t)?;
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, i, cache, &self.rope, rows)?;
        }
        cache.advance(t);
        match &self.head {
            None => Ok(StageOutput::Hidden(x)),
            Some((norm, lm_head)) => {
                let x = match logits {
                    LogitsMode::Last => x.narrow(0, t - 1, 1)?,
                    LogitsMode::All => x,
                };
                let x = norm.forward(&x)?;
                let y = if rows { lm_head.forward_rows(&x)? } else { lm_head.forward(&x)? };
                Ok(StageOutput::Logits(self.softcap(y)?))
            }
        }
    }

    /// When every layer of the span attends through a sliding window of `w` positions, gives
    /// back the cache blocks no coming position can see (those before `len + 1 - w`): the
    /// session's cache stays bounded by the window however long it grows. A block holds
    /// every layer of the span, so a span with a global layer keeps all of its blocks.
    fn release_outside_window(&self, cache: &mut KvCache) {
        if let Some(w) = self.sliding_only {
            cache.release_before((cache.len() + 1).saturating_sub(w));
        }
    }

    /// Gemma's final soft-capping of logits, `cap · tanh(logit / cap)`, when the model has it.
    fn softcap(&self, logits: Tensor) -> Result<Tensor> {
        match self.spec.final_logit_softcap {
            None => Ok(logits),
            Some(cap) => Ok(((logits * f64::from(1.0 / cap))?.tanh()? * f64::from(cap))?),
        }
    }

    /// The rows of a step's input as f32 hidden states `(t, hidden)`: token ids embedded (first
    /// span only, ids in the vocabulary), hidden states checked for shape (other spans only).
    fn input_rows(&self, input: StageInput, t: usize) -> Result<Tensor> {
        Ok(match input {
            StageInput::Tokens(ids) => {
                let Some(emb) = &self.embedding else {
                    return Err(Error::InvalidInput(format!(
                        "span {:?} does not start at layer 0 and cannot take token ids",
                        self.span
                    )));
                };
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.spec.vocab_size) {
                    return Err(Error::InvalidInput(format!(
                        "token id {bad} is outside the vocabulary of {}",
                        self.spec.vocab_size
                    )));
                }
                let x = emb.forward(&ids, &self.device)?;
                match self.spec.arch {
                    // llama.cpp: `ggml_scale(inpL, sqrtf(n_embd))`, in f32.
                    Architecture::Gemma3 | Architecture::Gemma2 => {
                        (x * f64::from((self.spec.hidden_size as f32).sqrt()))?
                    }
                    _ => x,
                }
            }
            StageInput::Hidden(h) => {
                if self.is_first() {
                    return Err(Error::InvalidInput(
                        "the first span takes token ids, not hidden states".into(),
                    ));
                }
                if h.dims() != [t, self.spec.hidden_size] {
                    return Err(Error::InvalidInput(format!(
                        "hidden states of shape {:?}, expected [{t}, {}]",
                        h.dims(),
                        self.spec.hidden_size
                    )));
                }
                h.to_device(&self.device)?.to_dtype(DType::F32)?
            }
        })
    }

    /// One step for each of several sessions in one forward: `inputs[i]` is one or more
    /// positions (token ids on the first span, hidden rows elsewhere) appended to `caches[i]`:
    /// a decode step, or a speculative step's verify rows. The matrix products run once over
    /// all rows (each weight block is read once per tile of rows instead of once per session);
    /// attention stays per session. Each session's output, every row of it (logits of every
    /// row on the last span, as [`LogitsMode::All`]), has exactly the bits
    /// [`Shard::forward_rows`] gives it alone, and so a one-position session those of
    /// [`Shard::forward`]: who a session is batched with never changes its tokens. On error no
    /// cache changes.
    pub fn forward_batch(
        &self,
        caches: &mut [&mut KvCache],
        inputs: Vec<StageInput>,
    ) -> Result<Vec<StageOutput>> {
        let b = caches.len();
        if b == 0 || inputs.len() != b {
            return Err(Error::InvalidInput(format!("{} caches for {} inputs", b, inputs.len())));
        }
        let lens = inputs.iter().map(StageInput::len).collect::<Result<Vec<usize>>>()?;
        if lens.contains(&0) {
            return Err(Error::InvalidInput("empty step".into()));
        }
        let total: usize = lens.iter().sum();
        let mut x = if inputs.iter().all(|i| matches!(i, StageInput::Tokens(_))) {
            let ids: Vec<u32> = inputs
                .into_iter()
                .flat_map(|i| if let StageInput::Tokens(t) = i { t } else { Vec::new() })
                .collect();
            self.input_rows(StageInput::Tokens(ids), total)?
        } else if inputs.iter().all(|i| matches!(i, StageInput::Hidden(_))) {
            let rows = inputs
                .into_iter()
                .zip(&lens)
                .map(|(i, &t)| self.input_rows(i, t))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&rows, 0)?
        } else {
            return Err(Error::InvalidInput("a batch mixes token ids and hidden states".into()));
        };
        for (cache, &t) in caches.iter_mut().zip(&lens) {
            self.release_outside_window(cache);
            cache.reserve(t)?;
        }
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward_batch(&x, i, caches, &lens, &self.rope)?;
        }
        for (cache, &t) in caches.iter_mut().zip(&lens) {
            cache.advance(t);
        }
        let out = match &self.head {
            None => x,
            Some((norm, lm_head)) => self.softcap(lm_head.forward_rows(&norm.forward(&x)?)?)?,
        };
        let mut at = 0;
        lens.iter()
            .map(|&t| {
                let rows = out.narrow(0, at, t)?;
                at += t;
                Ok(if self.head.is_some() { StageOutput::Logits(rows) } else { StageOutput::Hidden(rows) })
            })
            .collect()
    }

    /// Measures this span's speed at batch 1: runs `steps` one-token forwards (after one
    /// warm-up) on a scratch cache and returns tokens per second through ONE layer (span
    /// length / median step time), the figure a swarm announcement carries. Embedding and
    /// LM head, when the span has them, count against it.
    pub fn measure_layer_throughput(&self, steps: usize) -> Result<f64> {
        let steps = steps.max(1);
        let mut cache = self.new_cache(steps + 1);
        let mut times = Vec::with_capacity(steps);
        for i in 0..=steps {
            let input = if self.is_first() {
                StageInput::Tokens(vec![(i % self.spec.vocab_size) as u32])
            } else {
                StageInput::Hidden(Tensor::zeros((1, self.spec.hidden_size), DType::F32, &self.device)?)
            };
            let t0 = std::time::Instant::now();
            self.forward(&mut cache, input, LogitsMode::Last)?;
            if i > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2].max(1e-9);
        Ok(self.blocks.len() as f64 / median)
    }

    /// Convenience for a whole-model shard: the logits of `tokens` appended to `cache`.
    pub fn logits(&self, cache: &mut KvCache, tokens: &[u32], mode: LogitsMode) -> Result<Tensor> {
        match self.forward(cache, StageInput::Tokens(tokens.to_vec()), mode)? {
            StageOutput::Logits(l) => Ok(l),
            StageOutput::Hidden(_) => {
                Err(Error::InvalidInput(format!("span {:?} does not end at the last layer", self.span)))
            }
        }
    }
}
