//! Speculative decoding on the origin: drafting the tokens a speculative step proposes, and
//! the adaptive draft length.
//!
//! Through a pipeline of N stages every decode step pays a round trip (N + 1 one-way delays),
//! whatever the compute costs. A speculative step pays it once for several tokens: the origin
//! guesses the next `k` ids, sends them with the last sampled id as one step of `k + 1`
//! positions, and the last stage keeps the longest prefix of the guess that the sampler
//! itself chooses, plus the sampler's next choice (see `shoal_worker::protocol`, "Speculative
//! decoding", and `Sampler::verify`). The tokens are exactly those of ordinary decoding,
//! greedy or sampled: a wrong guess costs compute (`k` extra positions on every stage), never
//! a different token.
//!
//! # Drafting
//! [`Speculation::Ngram`] is prompt-lookup decoding (Saxena 2023; vLLM's `ngram` method):
//! the last `n` ids of the context (prompt and generated tokens), for `n` from
//! [`NGRAM_MAX`] down to [`NGRAM_MIN`], are looked up in the context before them; at the
//! most recent match the ids that followed it are the draft. Text that quotes, rewrites or
//! edits the prompt (and code) repeats long runs, which this catches for free; free-form text
//! rarely matches, and then no draft is sent (an ordinary step).
//!
//! [`Speculation::Draft`] runs a small model with the same tokenizer (a GGUF file, all its
//! layers) on the origin: it drafts `k` ids greedily after the context. Its KV cache follows
//! the generation: at each step it keeps the positions it already holds of the context (the
//! accepted ids), drops the rest (rejected ids) and feeds what is new. It drafts for any
//! text, at the cost of `k` forwards of the draft model per step on the origin, which pays
//! where the round trip costs more than they do (links with delay). Drafting runs on a
//! blocking thread, off the origin's network runtime.
//!
//! # Adaptive draft length
//! [`Drafter`] keeps `k` in `1..=`[`MAX_K`], starting at [`START_K`]: a fully accepted draft
//! grows it by 2, a rejected one shrinks it to one more than the ids accepted, so a stream
//! whose guesses fail drafts one id at a time (one extra position per wrong guess).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use shoal_model_shards::{DType, Device, KvCache, LogitsMode, Model, Shard, StageInput, StageOutput};

/// Longest draft.
pub const MAX_K: usize = 8;
/// First draft length.
pub const START_K: usize = 4;
/// Longest suffix of the context looked up.
pub const NGRAM_MAX: usize = 4;
/// Shortest suffix of the context looked up.
pub const NGRAM_MIN: usize = 2;

/// How the origin drafts tokens.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Speculation {
    /// No speculation: one position per step.
    #[default]
    Off,
    /// Prompt lookup: drafts from n-gram matches in the context.
    Ngram,
    /// A draft model on the origin (`draft:PATH`).
    Draft(Arc<DraftModel>),
}

impl Speculation {
    /// The mode's name without the draft model's path: `off`, `ngram` or `draft`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Ngram => "ngram",
            Self::Draft(_) => "draft",
        }
    }
}

impl FromStr for Speculation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Self::Off),
            "ngram" => Ok(Self::Ngram),
            other => match other.strip_prefix("draft:") {
                Some(path) => DraftModel::open(Path::new(path)).map(|m| Self::Draft(Arc::new(m))),
                None => {
                    Err(format!("unknown speculation mode {other:?} (expected off, ngram or draft:PATH)"))
                }
            },
        }
    }
}

impl fmt::Display for Speculation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Draft(m) => write!(f, "draft:{}", m.path.display()),
            other => f.write_str(other.name()),
        }
    }
}

/// A draft model: a small model with the target's tokenizer, loaded whole on the origin.
pub struct DraftModel {
    path: PathBuf,
    shard: Shard,
    vocab_size: usize,
    max_positions: usize,
}

impl DraftModel {
    /// Loads the model at `path` (a GGUF file or a Hugging Face directory), all its layers.
    pub fn open(path: &Path) -> Result<Self, String> {
        let fail = |e: &dyn fmt::Display| format!("draft model {}: {e}", path.display());
        let model = Model::open(path).map_err(|e| fail(&e))?;
        let spec = model.spec();
        let shard = Shard::load(&model, 0..spec.n_layers, &Device::Cpu, DType::F32).map_err(|e| fail(&e))?;
        Ok(Self {
            path: path.to_owned(),
            vocab_size: spec.vocab_size,
            max_positions: spec.max_position_embeddings,
            shard,
        })
    }

    /// The size of its vocabulary (a target with another one cannot use its drafts).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Up to `k` ids drafted greedily after `context`, with `state` caching the context's
    /// positions between calls; empty when the context does not fit or a forward fails.
    fn draft(&self, state: &mut DraftState, context: &[u32], k: usize) -> Vec<u32> {
        if context.is_empty() || k == 0 || context.len() + k > self.max_positions {
            return Vec::new();
        }
        // Keep the positions of the context's prefix already held (never the last id: its
        // logits are needed); a sliding window may have dropped them all.
        let held = state.ids.iter().zip(context).take_while(|(a, b)| a == b).count().min(context.len() - 1);
        let cache = state.cache.get_or_insert_with(|| self.shard.new_cache(self.max_positions));
        cache.truncate(held);
        let held = cache.len();
        state.ids.truncate(held);
        let mut input = context[held..].to_vec();
        let mut draft = Vec::with_capacity(k);
        while draft.len() < k {
            let next = match self.shard.forward(cache, StageInput::Tokens(input.clone()), LogitsMode::Last) {
                Ok(StageOutput::Logits(l)) => {
                    l.flatten_all().and_then(|l| l.to_vec1::<f32>()).ok().and_then(|l| argmax(&l))
                }
                _ => None,
            };
            state.ids.extend_from_slice(&input);
            let Some(next) = next else {
                tracing::warn!(model = %self.path.display(), "the draft model failed; no draft this step");
                // The cache may hold part of the input: start again from nothing next time.
                state.ids.clear();
                cache.truncate(0);
                return Vec::new();
            };
            draft.push(next);
            input = vec![next];
        }
        draft
    }
}

/// The first index of the largest value.
fn argmax(values: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in values.iter().enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.and_then(|(i, _)| u32::try_from(i).ok())
}

impl fmt::Debug for DraftModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DraftModel").field("path", &self.path).field("vocab_size", &self.vocab_size).finish()
    }
}

/// Two draft models are the same mode when they come from the same file.
impl PartialEq for DraftModel {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path
    }
}

impl Eq for DraftModel {}

/// A draft model's KV cache for one generation and the ids whose positions it holds.
#[derive(Default)]
struct DraftState {
    cache: Option<KvCache>,
    ids: Vec<u32>,
}

impl fmt::Debug for DraftState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DraftState").field("held", &self.ids.len()).finish()
    }
}

/// What speculation did during one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpecStats {
    /// Steps that carried a draft.
    pub drafts: usize,
    /// Draft ids sent.
    pub draft_tokens: usize,
    /// Draft ids the last stage accepted.
    pub accepted_tokens: usize,
}

/// Drafts for one generation and adapts the draft length (see the module docs).
#[derive(Debug)]
pub struct Drafter {
    mode: Speculation,
    k: usize,
    stats: SpecStats,
    /// The draft model's cache ([`Speculation::Draft`]); `None` while a draft is computed.
    state: Option<DraftState>,
}

impl Drafter {
    /// A drafter in `mode`.
    pub fn new(mode: Speculation) -> Self {
        Self { mode, k: START_K, stats: SpecStats::default(), state: Some(DraftState::default()) }
    }

    /// The mode it drafts in.
    pub fn mode(&self) -> &Speculation {
        &self.mode
    }

    /// The current draft length.
    pub fn k(&self) -> usize {
        self.k
    }

    /// What was drafted and accepted so far.
    pub fn stats(&self) -> SpecStats {
        self.stats
    }

    /// The draft to send after `context` (prompt and generated ids, the last one not yet
    /// sent), at most `limit` ids; empty when speculation is off or nothing matches. A draft
    /// model runs on a blocking thread (tokio's `spawn_blocking`).
    pub async fn propose(&mut self, context: &[u32], limit: usize) -> Vec<u32> {
        let k = self.k.min(limit);
        match &self.mode {
            Speculation::Off => Vec::new(),
            _ if k == 0 => Vec::new(),
            Speculation::Ngram => ngram_draft(context, k, NGRAM_MIN, NGRAM_MAX),
            Speculation::Draft(model) => {
                let (model, context) = (Arc::clone(model), context.to_vec());
                let mut state = self.state.take().unwrap_or_default();
                let drafted = tokio::task::spawn_blocking(move || {
                    let draft = model.draft(&mut state, &context, k);
                    (state, draft)
                })
                .await;
                match drafted {
                    Ok((state, draft)) => {
                        self.state = Some(state);
                        draft
                    }
                    Err(e) => {
                        tracing::warn!("drafting failed: {e}");
                        Vec::new()
                    }
                }
            }
        }
    }

    /// Records a step that sent `drafted` ids of which `accepted` were kept, and adapts `k`.
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.stats.drafts += 1;
        self.stats.draft_tokens += drafted;
        self.stats.accepted_tokens += accepted;
        self.k = if accepted >= drafted { (self.k + 2).min(MAX_K) } else { (accepted + 1).clamp(1, MAX_K) };
    }
}

/// Prompt lookup: for `n` from `max_n` down to `min_n`, finds the latest earlier occurrence
/// of the context's last `n` ids and returns up to `k` ids that followed it (empty when no
/// suffix matches).
pub fn ngram_draft(context: &[u32], k: usize, min_n: usize, max_n: usize) -> Vec<u32> {
    let len = context.len();
    if k == 0 {
        return Vec::new();
    }
    for n in (min_n.max(1)..=max_n).rev() {
        if n >= len {
            continue;
        }
        let pattern = &context[len - n..];
        // Latest start `i` with `i + n < len`: something follows the match.
        if let Some(i) = (0..len - n).rev().find(|&i| &context[i..i + n] == pattern) {
            let from = i + n;
            return context[from..(from + k).min(len)].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngram_drafts_what_followed_the_latest_match() {
        // "a b c d a b" -> the suffix "a b" was followed by "c d a b".
        let ctx = [1, 2, 3, 4, 1, 2];
        assert_eq!(ngram_draft(&ctx, 3, 2, 4), vec![3, 4, 1]);
        assert_eq!(ngram_draft(&ctx, 8, 2, 4), vec![3, 4, 1, 2]);
        // The latest of two matches wins, longer suffixes first.
        let ctx = [7, 1, 2, 9, 5, 1, 2, 8, 1, 2];
        assert_eq!(ngram_draft(&ctx, 2, 2, 4), vec![8, 1]);
        let ctx = [5, 1, 2, 9, 6, 1, 2, 8, 5, 1, 2];
        assert_eq!(ngram_draft(&ctx, 1, 2, 4), vec![9], "the 3-gram 5 1 2 beats the later 2-gram");
        // No match, too short, or k = 0: nothing.
        assert!(ngram_draft(&[1, 2, 3, 4], 4, 2, 4).is_empty());
        assert!(ngram_draft(&[1], 4, 2, 4).is_empty());
        assert!(ngram_draft(&[1, 2, 1, 2], 0, 2, 4).is_empty());
    }

    #[test]
    fn k_grows_on_full_acceptance_and_backs_off_on_rejection() {
        let mut d = Drafter::new(Speculation::Ngram);
        assert_eq!(d.k(), START_K);
        d.record(4, 4);
        assert_eq!(d.k(), 6);
        d.record(6, 6);
        d.record(8, 8);
        assert_eq!(d.k(), MAX_K);
        d.record(8, 2);
        assert_eq!(d.k(), 3);
        d.record(3, 0);
        assert_eq!(d.k(), 1);
        d.record(0, 0);
        assert_eq!(d.k(), 1, "a step without a draft changes nothing");
        assert_eq!(d.stats(), SpecStats { drafts: 5, draft_tokens: 29, accepted_tokens: 20 });
        let ctx = [1, 2, 3, 4, 5, 6, 1, 2];
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(rt.block_on(d.propose(&ctx, 10)), vec![3]);
        assert!(rt.block_on(d.propose(&ctx, 0)).is_empty(), "no room left");
        assert!(rt.block_on(Drafter::new(Speculation::Off).propose(&ctx, 10)).is_empty());
    }

    #[test]
    fn modes_parse_and_print() {
        for m in [Speculation::Off, Speculation::Ngram] {
            assert_eq!(m.to_string().parse::<Speculation>().as_ref(), Ok(&m));
        }
        assert!("draft".parse::<Speculation>().is_err());
        let missing = "draft:/nonexistent/draft.gguf".parse::<Speculation>().unwrap_err();
        assert!(missing.starts_with("draft model /nonexistent/draft.gguf: "), "{missing}");
    }
}
