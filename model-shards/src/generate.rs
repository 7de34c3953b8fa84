//! Local generation through a chain of spans in one process: the engine behind
//! `shoal generate`, and the reference that the distributed pipeline must reproduce.

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::sampler::{Sampler, SamplingParams};
use crate::shard::{LogitsMode, Shard, StageInput, StageOutput};

/// Prompt tokens per prefill step.
pub const PREFILL_CHUNK: usize = 512;

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-generation token (or the caller) stopped it.
    Stop,
    /// `max_tokens` was reached.
    Length,
}

/// One generated token, as seen by the per-token callback.
#[derive(Clone, Debug)]
pub struct GeneratedToken {
    /// The token id.
    pub id: u32,
    /// Its log-probability under the processed distribution.
    pub logprob: f32,
}

/// What the callback tells the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep generating.
    Continue,
    /// Stop now (for example a stop string matched); finish reason `stop`.
    Stop,
}

/// The result of [`generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// Generated ids (without the prompt; an end token that stopped generation is excluded).
    pub token_ids: Vec<u32>,
    /// Why it stopped.
    pub finish_reason: FinishReason,
    /// Time spent on the prompt (until the first token's logits).
    pub prefill_time: Duration,
    /// Time spent on the remaining tokens.
    pub decode_time: Duration,
}

/// A chain of shards covering every layer, each with its own cache for one session.
pub struct LocalPipeline<'a> {
    shards: &'a [Shard],
    caches: Vec<KvCache>,
}

impl<'a> LocalPipeline<'a> {
    /// Checks that `shards` chain from layer 0 to the last layer without gaps.
    pub fn new(shards: &'a [Shard], max_len: usize) -> Result<Self> {
        let mut next = 0;
        for s in shards {
            if s.span().start != next {
                return Err(Error::InvalidInput(format!(
                    "spans do not chain: expected one starting at layer {next}, got {:?}",
                    s.span()
                )));
            }
            next = s.span().end;
        }
        match shards.last() {
            Some(s) if s.is_last() => {}
            _ => return Err(Error::InvalidInput("the spans do not reach the last layer".into())),
        }
        Ok(Self { shards, caches: shards.iter().map(|s| s.new_cache(max_len)).collect() })
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.caches.first().map_or(0, KvCache::len)
    }

    /// Whether nothing has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Feeds `tokens` through every span and returns the logits (rows per `mode`).
    pub fn step(&mut self, tokens: &[u32], mode: LogitsMode) -> Result<Tensor> {
        let mut input = StageInput::Tokens(tokens.to_vec());
        for (shard, cache) in self.shards.iter().zip(self.caches.iter_mut()) {
            match shard.forward(cache, input, mode)? {
                StageOutput::Hidden(h) => input = StageInput::Hidden(h),
                StageOutput::Logits(l) => return Ok(l),
            }
        }
        Err(Error::InvalidInput("the spans do not reach the last layer".into()))
    }
}

/// Generates up to `max_tokens` tokens after `prompt`, stopping at any of `stop_ids`.
/// `on_token` sees each token as it is produced.
pub fn generate(
    shards: &[Shard],
    prompt: &[u32],
    params: &SamplingParams,
    max_tokens: usize,
    stop_ids: &[u32],
    mut on_token: impl FnMut(&GeneratedToken) -> Flow,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::InvalidInput("the prompt is empty".into()));
    }
    let sampler = Sampler::new(params.clone())?;
    let max_len = prompt.len() + max_tokens;
    let mut pipe = LocalPipeline::new(shards, max_len)?;
    if let Some(s) = shards.first()
        && max_len > s.spec().max_position_embeddings
    {
        return Err(Error::SequenceTooLong { len: max_len, max: s.spec().max_position_embeddings });
    }
    let start = Instant::now();
    let mut logits = None;
    for chunk in prompt.chunks(PREFILL_CHUNK) {
        logits = Some(pipe.step(chunk, LogitsMode::Last)?);
    }
    let mut logits = logits.ok_or_else(|| Error::InvalidInput("the prompt is empty".into()))?;
    let mut history = prompt.to_vec();
    let mut generated = Vec::new();
    let mut prefill_time = None;
    let mut finish_reason = FinishReason::Length;
    for step in 0..max_tokens {
        let row = logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let sampled = sampler.sample(&row, &history, prompt.len(), step as u64, 0)?;
        if prefill_time.is_none() {
            prefill_time = Some(start.elapsed());
        }
        if stop_ids.contains(&sampled.token) {
            finish_reason = FinishReason::Stop;
            break;
        }
        generated.push(sampled.token);
        history.push(sampled.token);
        if on_token(&GeneratedToken { id: sampled.token, logprob: sampled.logprob }) == Flow::Stop {
            finish_reason = FinishReason::Stop;
            break;
        }
        if step + 1 < max_tokens {
            logits = pipe.step(&[sampled.token], LogitsMode::Last)?;
        }
    }
    let prefill_time = prefill_time.unwrap_or_else(|| start.elapsed());
    let decode_time = start.elapsed().saturating_sub(prefill_time);
    Ok(Generation { token_ids: generated, finish_reason, prefill_time, decode_time })
}
