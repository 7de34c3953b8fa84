//! Deterministic token sampler.
//!
//! # Determinism contract
//!
//! A session can be replayed on another route of peers after a failure, and
//! the replay must emit the same tokens. [`Sampler::sample`] is therefore a
//! pure function of `(params, logits, history, prompt_len, step)`:
//!
//! * there is no RNG state: the uniform number used by draw `t` is
//!   `u = (mix(mix(seed ^ SALT) + (t + 1) · φ) >> 11) · 2⁻⁵³`, i.e. output `t`
//!   of a SplitMix64 stream keyed by the seed (`mix` is the SplitMix64
//!   finalizer, `φ = 0x9E3779B97F4A7C15`, `SALT = "SHOAL_V1"`), so draws do
//!   not depend on call order, threads or on which peer performs them;
//! * the token choice uses only IEEE-754 basic operations (`+ − × /`,
//!   comparisons, no FMA) evaluated in a fixed order, with an `f32`
//!   exponential implemented here from those operations instead of the
//!   platform `libm`, and sums accumulated in `f64` in a fixed order, so it
//!   is bit-identical on every platform given bit-identical inputs (`f64::ln`
//!   only sizes a prefilter that cannot change the result);
//! * candidates are ranked by `(penalized logit desc, token id asc)`, a total
//!   order, so the result never depends on sort stability or on how equal
//!   logits happen to be laid out.
//!
//! Only the reported log-probabilities use `f64::ln` from `std`; they may
//! differ in the last bit between platforms, the token never does.
//! Callers that receive no seed from the client should pick one at random
//! once per session and store it with the session, so that a replay uses it.
//!
//! # Order of operations
//!
//! 1. Validation: the logits must be non-empty, contain no NaN or `+inf`
//!    (`-inf` marks a masked token) and keep at least one finite value;
//!    history ids must be inside the vocabulary.
//! 2. Penalties on the raw logits, in vLLM's order:
//!    * repetition penalty (Hugging Face / CTRL style) for every *distinct*
//!      token of the whole history, prompt included: a logit `> 0` is divided
//!      by the penalty, any other logit is multiplied by it;
//!    * frequency then presence penalty (OpenAI style) over the *generated*
//!      tokens only (`history[prompt_len..]`):
//!      `logit -= frequency · count; logit -= presence · (count > 0)`.
//!
//!    A finite logit stays finite (saturates at `±f32::MAX`), a masked logit
//!    stays masked.
//! 3. Log-probabilities: `logprob` and `top_logprobs` are the log-softmax of
//!    the *penalized* logits at temperature 1, before top-k / top-p / min-p
//!    (what vLLM calls "processed" logits; temperature and truncation are
//!    sampling choices, not part of the model's distribution).
//! 4. `temperature == 0`: greedy argmax of the penalized logits, ties to the
//!    lowest id. Nothing random happens, `seed` and `step` are ignored.
//! 5. Otherwise the penalized logits are scaled by `1 / temperature` and
//!    turned into weights `w = exp((logit − max) / T)` (so the best token has
//!    weight exactly 1), then, over the ranking above:
//!    * top-k keeps the first `k` tokens;
//!    * top-p keeps the shortest prefix whose cumulative probability
//!      (renormalized over the top-k survivors, as vLLM does) reaches
//!      `top_p`; `top_p == 1` disables it;
//!    * min-p drops tokens whose probability is below `min_p · max prob`
//!      (`min_p == 1` keeps exactly the tokens tied with the maximum).
//!
//!    All three keep a prefix of the ranking, so the candidates are the
//!    shortest of the three prefixes and always contain the top token.
//!    The candidates are renormalized and token `i` is chosen by inverse CDF:
//!    the first one, in ranking order, whose cumulative weight exceeds
//!    `u · total`.
//!
//! The ranking is built lazily (`select_nth_unstable` and a sort of the
//! selected prefix, growing geometrically), so typical calls on a 150k
//! vocabulary only sort a few dozen entries.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// Highest accepted temperature. OpenAI documents `[0, 2]`; larger values are
/// accepted for experimentation, they just flatten the distribution further.
pub const MAX_TEMPERATURE: f32 = 100.0;

/// Bound of the presence and frequency penalties (OpenAI accepts `[-2, 2]`).
pub const MAX_ABS_OPENAI_PENALTY: f32 = 2.0;

/// Parameters of one session's sampling, as an OpenAI/vLLM request gives them.
///
/// Missing fields deserialize to the [`Default`] (greedy, neutral) values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature in `[0, MAX_TEMPERATURE]`; `0` means greedy argmax.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`k ≥ 1`); `None` disables it.
    pub top_k: Option<u32>,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose
    /// probability mass reaches `top_p`, in `(0, 1]`; `1` disables it.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the probability
    /// of the most likely token, in `[0, 1]`; `0` disables it.
    pub min_p: f32,
    /// Hugging Face style repetition penalty over prompt and generated
    /// tokens, finite and `> 0`; `1` is neutral, `> 1` discourages repeats.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty in `[-2, 2]`, subtracted once from the logit
    /// of every token that was already generated; `0` is neutral.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty in `[-2, 2]`, subtracted from a token's logit
    /// once per time it was already generated; `0` is neutral.
    pub frequency_penalty: f32,
    /// Seed of the counter-based random stream; with the step index it fully
    /// determines each draw.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with neutral penalties (same as [`Default`]).
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Checks every field against the ranges OpenAI / vLLM accept.
    ///
    /// Returns [`SamplerError::InvalidParameter`] naming the first offending
    /// field, its value and the accepted range.
    pub fn validate(&self) -> Result<(), SamplerError> {
        fn invalid(name: &'static str, value: String, reason: &'static str) -> SamplerError {
            SamplerError::InvalidParameter { name, value, reason }
        }
        let t = self.temperature;
        if !(t.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&t)) {
            return Err(invalid("temperature", format!("{t:?}"), "must be finite and within [0, 100]"));
        }
        if self.top_k == Some(0) {
            return Err(invalid(
                "top_k",
                "0".to_owned(),
                "must be at least 1 (leave it unset to disable top-k)",
            ));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(invalid("top_p", format!("{p:?}"), "must be within (0, 1]"));
        }
        let m = self.min_p;
        if !(0.0..=1.0).contains(&m) {
            return Err(invalid("min_p", format!("{m:?}"), "must be within [0, 1]"));
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Err(invalid("repetition_penalty", format!("{r:?}"), "must be finite and greater than 0"));
        }
        let range = -MAX_ABS_OPENAI_PENALTY..=MAX_ABS_OPENAI_PENALTY;
        if !range.contains(&self.presence_penalty) {
            return Err(invalid(
                "presence_penalty",
                format!("{:?}", self.presence_penalty),
                "must be within [-2, 2]",
            ));
        }
        if !range.contains(&self.frequency_penalty) {
            return Err(invalid(
                "frequency_penalty",
                format!("{:?}", self.frequency_penalty),
                "must be within [-2, 2]",
            ));
        }
        Ok(())
    }
}

/// Why a sampling call was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SamplerError {
    /// A sampling parameter is outside its accepted range.
    #[error("invalid sampling parameter {name} = {value}: {reason}")]
    InvalidParameter {
        /// Field name, as in the OpenAI API.
        name: &'static str,
        /// The rejected value, formatted.
        value: String,
        /// The accepted range.
        reason: &'static str,
    },
    /// The logits row is empty.
    #[error("empty logits row")]
    EmptyLogits,
    /// The vocabulary does not fit token ids in `u32`.
    #[error("vocabulary of {len} entries does not fit u32 token ids")]
    VocabTooLarge {
        /// Length of the logits row.
        len: usize,
    },
    /// A logit is NaN or `+inf` (`-inf` is allowed and means "masked").
    #[error("logit {index} is NaN or +inf")]
    NonFiniteLogits {
        /// Index (token id) of the first offending logit.
        index: usize,
    },
    /// Every logit is `-inf`: no token can be sampled.
    #[error("every logit is -inf (all tokens masked)")]
    AllMasked,
    /// A history token id is outside the vocabulary.
    #[error("history[{position}] = {token} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfVocab {
        /// Position in the history.
        position: usize,
        /// The offending id.
        token: u32,
        /// Vocabulary size (length of the logits row).
        vocab: usize,
    },
    /// [`Sampler::verify`] got a number of logits rows other than the draft's length plus one.
    #[error("{rows} logits rows for a draft of {draft} ids (expected draft + 1)")]
    DraftMismatch {
        /// Rows given.
        rows: usize,
        /// Draft ids given.
        draft: usize,
    },
    /// `prompt_len` is longer than the history.
    #[error("prompt_len {prompt_len} exceeds the history length {history_len}")]
    PromptLenOutOfRange {
        /// The given prompt length.
        prompt_len: usize,
        /// The history length.
        history_len: usize,
    },
}

/// Result of one sampling step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sampled {
    /// The chosen token id.
    pub token: u32,
    /// Log-probability of `token` under the log-softmax of the penalized
    /// logits at temperature 1 (before temperature and truncation); `≤ 0`.
    pub logprob: f32,
    /// The most likely unmasked tokens with their log-probabilities (same
    /// definition as `logprob`), sorted by descending log-probability, ties by
    /// ascending id; `min(requested, unmasked tokens)` entries.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// A validated, immutable sampler for one session.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampler {
    params: SamplingParams,
}

impl Sampler {
    /// Validates `params` and builds the sampler.
    pub fn new(params: SamplingParams) -> Result<Self, SamplerError> {
        params.validate()?;
        Ok(Self { params })
    }

    /// The parameters this sampler uses.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the token at generation step `step`.
    ///
    /// * `logits`: one row, one entry per vocabulary token;
    /// * `history`: every token id of the session so far, prompt then
    ///   generated tokens;
    /// * `prompt_len`: how many leading `history` entries are prompt;
    /// * `step`: index of the token being generated (0 for the first one);
    /// * `top_logprobs`: how many alternatives to report (0 = none).
    ///
    /// The result is a pure function of the arguments and the parameters;
    /// see the module documentation for the exact contract.
    pub fn sample(
        &self,
        logits: &[f32],
        history: &[u32],
        prompt_len: usize,
        step: u64,
        top_logprobs: usize,
    ) -> Result<Sampled, SamplerError> {
        let finite = validate_row(logits)?;
        let x = penalized(&self.params, logits, history, prompt_len)?;
        let row = Row { x: &x, max: lane_max(&x), finite };
        // Log-normalizer of the temperature-1 distribution, for logprobs.
        let log_z1 = sum_weights(row.x, row.max, 1.0, 0.0).ln();
        let logprob_of = |v: f32| -> f32 {
            let lp = (f64::from(v) - f64::from(row.max) - log_z1).min(0.0);
            lp.max(f64::from(f32::MIN)) as f32
        };
        let n_top = top_logprobs.min(finite);
        let mut levels = None;
        let top_gap = if n_top > 0 {
            gap_for_count(levels.get_or_insert_with(|| level_counts(&row)), n_top)
        } else {
            0.0
        };

        let (token, mut ranked) = if self.params.temperature == 0.0 {
            let token = row.x.iter().position(|&v| v == row.max).unwrap_or(0) as u32;
            (token, None)
        } else {
            let (token, ranked) = self.draw(&row, step, top_gap, &mut levels);
            (token, Some(ranked))
        };

        let top_logprobs = if n_top == 0 {
            Vec::new()
        } else {
            let r = ranked.get_or_insert_with(|| Ranked::new(&row, top_gap));
            let mut top: Vec<(u32, f32)> =
                (0..n_top).filter_map(|i| r.get(i)).map(|(v, id)| (id, logprob_of(v))).collect();
            // Rounding to f32 may create new ties: order them by id.
            top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            top
        };

        let logprob = logprob_of(row.x[token as usize]);
        Ok(Sampled { token, logprob, top_logprobs })
    }

    /// Speculative decoding: verifies `draft`, the ids guessed to follow `history`, against
    /// `rows`, the logits of `draft.len() + 1` consecutive positions (row `i` predicts token
    /// `step + i`, after `history` and the draft's first `i` ids). Samples row `i` exactly as
    /// [`Sampler::sample`] would with those ids appended to the history, and stops after the
    /// first choice that differs from `draft[i]` or after the last row. Returns the choices:
    /// the accepted draft ids, then one more (the correction, or the token after a fully
    /// accepted draft).
    ///
    /// Every token is the one [`Sampler::sample`] gives for the same logits, history and step,
    /// so the output is that of ordinary decoding, greedy or sampled, and its distribution is
    /// unchanged. For a draft that proposes a single id (a point mass `q`), this is the
    /// speculative-sampling rejection scheme (Leviathan et al. 2023; Chen et al. 2023) with
    /// the draws coupled: the draft id `x` is accepted iff the seeded draw picks it, which has
    /// probability `p(x)` (= `min(1, p(x)/q(x))`), and on rejection the draw is the choice among
    /// the other ids with probability `p(y) / (1 − p(x))`, i.e. from `norm(max(0, p − q))`. The
    /// draw for token `t` still comes from `(seed, t)` alone, so a replay gives the same tokens.
    pub fn verify(
        &self,
        rows: &[&[f32]],
        history: &[u32],
        prompt_len: usize,
        step: u64,
        draft: &[u32],
        top_logprobs: usize,
    ) -> Result<Vec<Sampled>, SamplerError> {
        if rows.len() != draft.len() + 1 {
            return Err(SamplerError::DraftMismatch { rows: rows.len(), draft: draft.len() });
        }
        let mut history = Cow::Borrowed(history);
        let mut out = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let s = self.sample(row, &history, prompt_len, step + i as u64, top_logprobs)?;
            let accepted = draft.get(i) == Some(&s.token);
            out.push(s);
            if !accepted {
                break;
            }
            history.to_mut().push(draft[i]);
        }
        Ok(out)
    }

    /// Random draw among the candidates kept by top-k, top-p and min-p.
    /// `extra_gap` widens the prefilter so the ranking also serves the
    /// requested top logprobs.
    fn draw<'a>(
        &self,
        row: &'a Row<'a>,
        step: u64,
        extra_gap: f32,
        levels: &mut Option<[usize; LEVELS.len()]>,
    ) -> (u32, Ranked<'a>) {
        let p = &self.params;
        let max = row.max;
        let inv_t = 1.0 / p.temperature;
        let exact_max_only = p.min_p >= 1.0;
        let weight = |v: f32| det_exp((v - max) * inv_t);
        // min-p: prob ≥ min_p · max prob  ⇔  w ≥ min_p, since w(max) = 1.
        let keep = |v: f32, w: f32| if exact_max_only { v == max } else { w >= p.min_p };
        // Gaps below the maximum logit beyond which no token can be needed:
        // only a prefilter for speed, `Ranked` falls back to the full row.
        let t = f64::from(p.temperature);
        let min_p_gap = if exact_max_only {
            0.0
        } else if p.min_p > 0.0 {
            (-t * f64::from(p.min_p).ln() * 1.01 + 1e-3) as f32
        } else {
            f32::INFINITY
        };
        let tail_gap = |budget: f64| -> f32 {
            // Tokens more than `gap` below the max weigh ≤ finite · e^(−gap/T)
            // in total; keep that well under `budget`.
            let g = t * ((row.finite as f64 / budget).ln() + 1.0);
            if g.is_finite() && budget > 0.0 { g.max(0.0) as f32 } else { f32::INFINITY }
        };
        let top_p = f64::from(p.top_p);
        let u = uniform(p.seed, step);

        // Candidates: an explicit ranking prefix `[..len]` with its mass when
        // top-k or top-p is active, else every token passing min-p.
        let (mut ranked, limit, mass) = if let Some(k) = p.top_k {
            let k = (k as usize).min(row.finite);
            let gap = gap_for_count(levels.get_or_insert_with(|| level_counts(row)), k);
            let mut ranked = Ranked::new(row, gap.min(min_p_gap).max(extra_gap));
            let mass_k: f64 = (0..k).filter_map(|i| ranked.get(i)).map(|(v, _)| f64::from(weight(v))).sum();
            let stop = if top_p < 1.0 { top_p * mass_k } else { f64::INFINITY };
            let (len, mass) = prefix_while(&mut ranked, k, &weight, &keep, stop);
            (ranked, len, mass)
        } else if top_p < 1.0 {
            let z = sum_weights(row.x, max, inv_t, 0.0);
            let gap = tail_gap((1.0 - top_p) * z);
            let mut ranked = Ranked::new(row, gap.min(min_p_gap).max(extra_gap));
            let (len, mass) = prefix_while(&mut ranked, row.finite, &weight, &keep, top_p * z);
            (ranked, len, mass)
        } else {
            let mass = if exact_max_only {
                row.x.iter().filter(|&&v| v == max).count() as f64
            } else {
                sum_weights(row.x, max, inv_t, p.min_p)
            };
            let gap = tail_gap((1.0 - u) * mass);
            (Ranked::new(row, gap.min(min_p_gap).max(extra_gap)), row.finite, mass)
        };

        let target = u * mass;
        // The top token always has weight 1 and is always a candidate.
        let mut chosen = ranked.get(0).map_or(0, |(_, id)| id);
        let mut cum = 0.0f64;
        for i in 0..limit {
            let Some((v, id)) = ranked.get(i) else { break };
            let w = weight(v);
            if !keep(v, w) {
                break;
            }
            if w > 0.0 {
                chosen = id;
                cum += f64::from(w);
                if cum > target {
                    break;
                }
            }
        }
        // If rounding left `cum ≤ target` at the end, `chosen` is the last
        // candidate with a nonzero weight.
        (chosen, ranked)
    }
}

/// Walks the ranking up to `limit` entries while tokens pass min-p, stopping
/// after the cumulative weight reaches `stop`. Returns `(length, mass)`.
fn prefix_while(
    ranked: &mut Ranked<'_>,
    limit: usize,
    weight: &impl Fn(f32) -> f32,
    keep: &impl Fn(f32, f32) -> bool,
    stop: f64,
) -> (usize, f64) {
    let mut cum = 0.0f64;
    let mut len = 0;
    while len < limit {
        let Some((v, _)) = ranked.get(len) else { break };
        let w = weight(v);
        if !keep(v, w) {
            break;
        }
        cum += f64::from(w);
        len += 1;
        if cum >= stop {
            break;
        }
    }
    (len, cum)
}

/// Checks a raw logits row; returns how many entries are finite (unmasked).
fn validate_row(logits: &[f32]) -> Result<usize, SamplerError> {
    if logits.is_empty() {
        return Err(SamplerError::EmptyLogits);
    }
    if u32::try_from(logits.len()).is_err() {
        return Err(SamplerError::VocabTooLarge { len: logits.len() });
    }
    // Branch-free lane-wise folds on the bits (they vectorize); the culprit
    // is located only on error.
    const INF_BITS: u32 = 0x7F80_0000;
    let bad = |v: f32| (v.to_bits() & 0x7FFF_FFFF > INF_BITS) | (v.to_bits() == INF_BITS);
    let finite_bit = |v: f32| u32::from(v.to_bits() & 0x7FFF_FFFF < INF_BITS);
    const L: usize = 8;
    let (mut any_bad, mut finite) = ([false; L], [0u32; L]);
    let chunks = logits.chunks_exact(L);
    let tail = chunks.remainder();
    for chunk in chunks {
        for ((b, f), &v) in any_bad.iter_mut().zip(&mut finite).zip(chunk) {
            *b |= bad(v);
            *f += finite_bit(v);
        }
    }
    for ((b, f), &v) in any_bad.iter_mut().zip(&mut finite).zip(tail) {
        *b |= bad(v);
        *f += finite_bit(v);
    }
    if any_bad.contains(&true) {
        let index = logits.iter().position(|&v| bad(v)).unwrap_or(0);
        return Err(SamplerError::NonFiniteLogits { index });
    }
    let finite: usize = finite.iter().map(|&f| f as usize).sum();
    if finite == 0 {
        return Err(SamplerError::AllMasked);
    }
    Ok(finite)
}

/// Applies the penalties to a validated row; borrows it when they are neutral.
fn penalized<'a>(
    params: &SamplingParams,
    logits: &'a [f32],
    history: &[u32],
    prompt_len: usize,
) -> Result<Cow<'a, [f32]>, SamplerError> {
    let vocab = logits.len();
    if prompt_len > history.len() {
        return Err(SamplerError::PromptLenOutOfRange { prompt_len, history_len: history.len() });
    }
    if let Some((position, &token)) = history.iter().enumerate().find(|&(_, &t)| t as usize >= vocab) {
        return Err(SamplerError::TokenOutOfVocab { position, token, vocab });
    }
    let rep = params.repetition_penalty;
    let (freq, presence) = (params.frequency_penalty, params.presence_penalty);
    let use_rep = rep != 1.0 && !history.is_empty();
    let use_openai = (freq != 0.0 || presence != 0.0) && prompt_len < history.len();
    if !use_rep && !use_openai {
        return Ok(Cow::Borrowed(logits));
    }

    let mut x = logits.to_vec();
    // Keeps finite logits finite and masked logits masked.
    let saturate =
        |before: f32, after: f32| if before.is_finite() { after.clamp(f32::MIN, f32::MAX) } else { before };
    if use_rep {
        let mut seen = vec![0u64; vocab.div_ceil(64)];
        for &t in history {
            let (word, bit) = (t as usize / 64, 1u64 << (t % 64));
            if seen[word] & bit == 0 {
                seen[word] |= bit;
                let v = x[t as usize];
                let after = if v > 0.0 { v / rep } else { v * rep };
                x[t as usize] = saturate(v, after);
            }
        }
    }
    if use_openai {
        let mut generated = history[prompt_len..].to_vec();
        generated.sort_unstable();
        for run in generated.chunk_by(|a, b| a == b) {
            let t = run[0] as usize;
            let v = x[t];
            let after = v - freq * run.len() as f32 - presence;
            x[t] = saturate(v, after);
        }
    }
    Ok(Cow::Owned(x))
}

/// A validated, penalized row.
struct Row<'a> {
    /// Penalized logits: finite or `-inf`.
    x: &'a [f32],
    /// Largest logit (finite).
    max: f32,
    /// Number of finite logits (≥ 1).
    finite: usize,
}

/// Largest value, as a lane-wise fold that vectorizes (no NaN in input).
fn lane_max(x: &[f32]) -> f32 {
    const L: usize = 8;
    let mut acc = [f32::NEG_INFINITY; L];
    let chunks = x.chunks_exact(L);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = if v > *a { v } else { *a };
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a = if v > *a { v } else { *a };
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Gaps below the maximum logit at which [`level_counts`] counts tokens.
const LEVELS: [f32; 8] = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0];

/// For each gap `g` of [`LEVELS`], how many tokens have `max − logit ≤ g`.
fn level_counts(row: &Row<'_>) -> [usize; LEVELS.len()] {
    // u32 lanes vectorize; the vocabulary fits u32 (checked).
    let mut counts = [0u32; LEVELS.len()];
    for &v in row.x {
        let d = row.max - v;
        for (c, &g) in counts.iter_mut().zip(&LEVELS) {
            *c += u32::from(d <= g);
        }
    }
    counts.map(|c| c as usize)
}

/// Smallest level gap holding at least `n` tokens (infinite if none does).
fn gap_for_count(counts: &[usize; LEVELS.len()], n: usize) -> f32 {
    counts.iter().zip(&LEVELS).find(|&(&c, _)| c >= n).map_or(f32::INFINITY, |(_, &g)| g)
}

/// Sort key of a token: ascending keys follow the ranking (logit
/// descending, id ascending). `-0.0` ranks like `+0.0`.
fn rank_key(v: f32, id: u32) -> u64 {
    let bits = (v + 0.0).to_bits();
    // Monotone map of floats to unsigned integers, then reversed.
    let ordered = if bits >> 31 == 1 { !bits } else { bits | 0x8000_0000 };
    (u64::from(!ordered) << 32) | u64::from(id)
}

/// Unmasked tokens, ranked lazily. Holds the tokens within `gap` of the
/// maximum (a prefix of the ranking) and switches to the whole row if a
/// caller walks past them, so the gap never changes any result.
struct Ranked<'a> {
    row: &'a Row<'a>,
    keys: Vec<u64>,
    /// `keys[..sorted]` are the first `sorted` tokens of the ranking, in order.
    sorted: usize,
}

impl<'a> Ranked<'a> {
    /// Smallest prefix sorted at once.
    const MIN_CHUNK: usize = 64;

    fn new(row: &'a Row<'a>, gap: f32) -> Self {
        let mut ranked = Self { row, keys: Vec::new(), sorted: 0 };
        ranked.build(gap);
        ranked
    }

    fn build(&mut self, gap: f32) {
        let (x, max) = (self.row.x, self.row.max);
        // `-inf` fails `max - v <= gap` unless the gap is infinite.
        let inside = |v: f32| (max - v <= gap) & v.is_finite();
        // One bitmask per 64 tokens (a branch-free loop), then the set bits.
        let masks: Vec<u64> = x
            .chunks(64)
            .map(|block| block.iter().enumerate().fold(0u64, |m, (j, &v)| m | (u64::from(inside(v)) << j)))
            .collect();
        let count = masks.iter().map(|m| m.count_ones() as usize).sum();
        let mut keys = Vec::with_capacity(count);
        for (b, &mask) in masks.iter().enumerate() {
            let mut mask = mask;
            while mask != 0 {
                let i = b * 64 + mask.trailing_zeros() as usize;
                mask &= mask - 1;
                keys.push(rank_key(x[i], i as u32));
            }
        }
        self.keys = keys;
        self.sorted = 0;
    }

    /// Entry `i` of the ranking as `(logit, id)`; `None` past the unmasked
    /// tokens.
    fn get(&mut self, i: usize) -> Option<(f32, u32)> {
        if i >= self.keys.len() {
            if self.keys.len() == self.row.finite {
                return None;
            }
            self.build(f32::INFINITY);
        }
        self.ensure(i + 1);
        let id = *self.keys.get(i)? as u32;
        Some((self.row.x[id as usize], id))
    }

    /// Makes sure at least `min(n, len)` leading keys are in ranking order;
    /// grows geometrically so that walking the ranking costs `O(len log len)`
    /// at worst and `O(len)` when it stops early.
    fn ensure(&mut self, n: usize) {
        let len = self.keys.len();
        if n <= self.sorted || self.sorted == len {
            return;
        }
        let target = n.max(2 * self.sorted).max(Self::MIN_CHUNK).min(len);
        let rest = &mut self.keys[self.sorted..];
        let k = target - self.sorted;
        if k < rest.len() {
            rest.select_nth_unstable(k);
        }
        rest[..k].sort_unstable();
        self.sorted = target;
    }
}

/// Sum of `exp((x − max) · inv_t)` (as computed by [`det_exp`]) over the
/// logits whose weight is at least `threshold`, accumulated in `f64` in a
/// fixed order (8 interleaved partial sums per block of 256, combined left to
/// right at the end): deterministic, and it vectorizes (compiled for AVX-512 or
/// AVX2 when the CPU has them: the same operations, so the same bits).
fn sum_weights(x: &[f32], max: f32, inv_t: f32, threshold: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::kernels::{Level, level};
        if level() >= Level::Avx512 {
            // SAFETY: the CPU has AVX-512 F (checked at run time just above).
            return unsafe { sum_weights_avx512(x, max, inv_t, threshold) };
        }
        if level() >= Level::Avx2 {
            // SAFETY: the CPU has AVX2 (checked at run time just above).
            return unsafe { sum_weights_avx2(x, max, inv_t, threshold) };
        }
    }
    sum_weights_body(x, max, inv_t, threshold)
}

/// [`sum_weights_body`] for AVX-512 (no FMA: the same bits).
///
/// # Safety
/// The CPU must support AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f")]
unsafe fn sum_weights_avx512(x: &[f32], max: f32, inv_t: f32, threshold: f32) -> f64 {
    sum_weights_body(x, max, inv_t, threshold)
}

/// [`sum_weights_body`] for AVX2 (no FMA: the same bits).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_weights_avx2(x: &[f32], max: f32, inv_t: f32, threshold: f32) -> f64 {
    sum_weights_body(x, max, inv_t, threshold)
}

#[inline(always)]
fn sum_weights_body(x: &[f32], max: f32, inv_t: f32, threshold: f32) -> f64 {
    const BLOCK: usize = 256;
    const L: usize = 8;
    let mut acc = [0.0f64; L];
    let mut buf = [0.0f32; BLOCK];
    for block in x.chunks(BLOCK) {
        let w = &mut buf[..block.len()];
        // A plain map: the loop vectorizer turns it into SIMD code.
        for (w, &v) in w.iter_mut().zip(block) {
            let e = det_exp((v - max) * inv_t);
            *w = if e >= threshold { e } else { 0.0 };
        }
        let lanes = w.chunks_exact(L);
        let tail = lanes.remainder();
        for lane in lanes {
            for (a, &w) in acc.iter_mut().zip(lane) {
                *a += f64::from(w);
            }
        }
        for (a, &w) in acc.iter_mut().zip(tail) {
            *a += f64::from(w);
        }
    }
    acc.iter().sum()
}

/// `exp(x)` for `x ≤ 0` in `f32`, computed with IEEE-754 basic operations
/// only (no `libm`, no FMA), so the result is bit-identical on every
/// platform; relative error below 1e-6. Returns 0 below −87 (weights under
/// 1.6e−38 of the top token's) and for `-inf` or NaN; positive inputs are
/// clamped to 0. Branch-free so that loops over it vectorize.
#[inline(always)]
pub(crate) fn det_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Cody–Waite split of ln 2 (Cephes): C1 has 9 significant bits, so
    // k · C1 is exact for |k| ≤ 126.
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to the nearest integer, exactly.
    const SHIFTER: f32 = 12_582_912.0;
    // Taylor coefficients 1/n!, n = 7 down to 2.
    const C: [f32; 6] = [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5];
    // NaN and -inf fail `in_range` and give 0.
    let in_range = x >= -87.0;
    let xc = x.clamp(-87.0, 0.0);
    let shifted = xc * LOG2E + SHIFTER;
    let k = shifted - SHIFTER;
    // `shifted` lies in [2^23, 2^24), so its low mantissa bits hold k.
    let ki = (shifted.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    let r = (xc - k * C1) - k * C2;
    let mut p = C[0];
    for c in &C[1..] {
        p = p * r + c;
    }
    p = p * r + 1.0;
    p = p * r + 1.0;
    // k ∈ [-126, 0]: 2^k is a normal number.
    // (wrapping: no overflow check in the loop, which would keep it from vectorizing)
    let scale = f32::from_bits((ki.wrapping_add(127) as u32) << 23);
    if in_range { p * scale } else { 0.0 }
}

/// SplitMix64 finalizer (Stafford's mix 13).
fn splitmix64_mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform `u ∈ [0, 1)` with 53 random bits for draw `step` of stream `seed`.
///
/// Output `step` of the SplitMix64 generator whose state starts at a hash of
/// the seed: a counter-based generator, any draw is computed directly.
/// Part of the determinism contract: changing it changes every sampled token.
fn uniform(seed: u64, step: u64) -> f64 {
    const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
    const SEED_SALT: u64 = 0x5348_4F41_4C5F_5631; // "SHOAL_V1"
    let state = splitmix64_mix(seed ^ SEED_SALT);
    let bits = splitmix64_mix(state.wrapping_add(step.wrapping_add(1).wrapping_mul(GOLDEN)));
    (bits >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use proptest::prelude::*;

    /// Target distribution of a row at temperature `t` with top-k `k`, in f64 (independent
    /// of the sampler's arithmetic).
    fn target(row: &[f32], t: f64, k: usize) -> Vec<f64> {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let max = f64::from(row[order[0]]);
        let mut p = vec![0.0; row.len()];
        for &i in &order[..k] {
            p[i] = ((f64::from(row[i]) - max) / t).exp();
        }
        let z: f64 = p.iter().sum();
        p.iter().map(|w| w / z).collect()
    }

    /// Pearson's chi-square of `observed` counts against probabilities `expected` (categories
    /// of zero probability must be empty).
    fn chi_square(observed: &[u64], expected: &[f64], n: u64) -> f64 {
        let mut chi = 0.0;
        for (&o, &p) in observed.iter().zip(expected) {
            if p == 0.0 {
                assert_eq!(o, 0, "a token of zero probability was emitted");
                continue;
            }
            let e = p * n as f64;
            chi += (o as f64 - e).powi(2) / e;
        }
        chi
    }

    /// Speculative verification keeps the output distribution: over 20,000 seeds, the
    /// first two tokens emitted after a one-id draft (the first token; the second only when
    /// the draft was accepted) follow the target distribution `p0(x)` and `p0(d)·p1(y)` by a
    /// chi-square test at p = 1e-4, and a verifier that always accepted would fail it. Each
    /// emitted token is `sample`'s token for the same seed and step (the coupled draws).
    #[test]
    fn verify_keeps_the_target_distribution() {
        let rows: [&[f32]; 2] = [&[1.0, 2.5, 0.3, 2.0, -1.0, 1.7], &[0.5, 0.1, 1.2, -0.4, 0.9, 1.1]];
        let (t, k) = (0.8, 4);
        let (p0, p1) = (target(rows[0], t, k), target(rows[1], t, k));
        let vocab = rows[0].len();
        // Draft the second most likely id of row 0.
        let draft = 3u32;
        assert!(p0[draft as usize] > 0.2 && p0[draft as usize] < p0[1]);
        // Categories: first token x != draft (vocab), then (draft, y) (vocab).
        let mut counts = vec![0u64; 2 * vocab];
        let n = 20_000u64;
        let history = [0u32, 4];
        for seed in 0..n {
            let s = sampler(|p| {
                p.temperature = t as f32;
                p.top_k = Some(k as u32);
                p.seed = seed;
            });
            let out = s.verify(&rows, &history, 1, 7, &[draft], 0).unwrap();
            assert_eq!(out, s.verify(&rows, &history, 1, 7, &[draft], 0).unwrap(), "deterministic");
            assert_eq!(out[0], s.sample(rows[0], &history, 1, 7, 0).unwrap());
            match out.as_slice() {
                [x] => {
                    assert_ne!(x.token, draft);
                    counts[x.token as usize] += 1;
                }
                [x, y] => {
                    assert_eq!(x.token, draft);
                    assert_eq!(*y, s.sample(rows[1], &[0, 4, draft], 1, 8, 0).unwrap());
                    counts[vocab + y.token as usize] += 1;
                }
                other => panic!("{} tokens for a draft of one", other.len()),
            }
        }
        let mut expected = vec![0.0; 2 * vocab];
        for x in 0..vocab {
            if x != draft as usize {
                expected[x] = p0[x];
            }
            expected[vocab + x] = p0[draft as usize] * p1[x];
        }
        assert!((expected.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // 4 + 4 categories of nonzero probability: 7 degrees of freedom; the 1e-4 quantile
        // of chi-square(7) is 29.88.
        let chi = chi_square(&counts, &expected, n);
        assert!(chi < 29.88, "chi-square {chi:.2} over {counts:?}");
        // The same test rejects a verifier that accepts every draft (its expected counts).
        let always: Vec<u64> = (0..2 * vocab)
            .map(|i| if i < vocab { 0 } else { (p1[i - vocab] * n as f64).round() as u64 })
            .collect();
        assert!(chi_square_lenient(&always, &expected, always.iter().sum()) > 29.88);
    }

    /// [`chi_square`] that counts emitted tokens of zero probability as infinitely unlikely.
    fn chi_square_lenient(observed: &[u64], expected: &[f64], n: u64) -> f64 {
        observed
            .iter()
            .zip(expected)
            .map(|(&o, &p)| {
                let e = p * n as f64;
                if e == 0.0 { if o == 0 { 0.0 } else { f64::INFINITY } } else { (o as f64 - e).powi(2) / e }
            })
            .sum()
    }

    #[test]
    fn verify_stops_at_the_first_wrong_id_and_checks_its_rows() {
        let s = sampler(|_| {});
        let rows: [&[f32]; 3] = [&[0.0, 3.0, 1.0], &[2.0, 0.0, 1.0], &[0.0, 0.0, 5.0]];
        let ids = |d: &[u32]| {
            s.verify(&rows, &[0], 1, 0, d, 0).unwrap().iter().map(|x| x.token).collect::<Vec<_>>()
        };
        assert_eq!(ids(&[1, 0]), vec![1, 0, 2], "all accepted, then the bonus token");
        assert_eq!(ids(&[1, 2]), vec![1, 0], "the second id is wrong: the target's choice instead");
        assert_eq!(ids(&[2, 0]), vec![1], "the first id is wrong");
        assert_eq!(
            s.verify(&rows, &[0], 1, 0, &[1], 0),
            Err(SamplerError::DraftMismatch { rows: 3, draft: 1 })
        );
    }

    fn sampler(f: impl FnOnce(&mut SamplingParams)) -> Sampler {
        let mut p = SamplingParams::default();
        f(&mut p);
        Sampler::new(p).unwrap()
    }

    /// Greedy reference: first index of the maximum.
    fn argmax(x: &[f32]) -> u32 {
        let mut best = 0;
        for (i, &v) in x.iter().enumerate() {
            if v > x[best] {
                best = i;
            }
        }
        best as u32
    }

    fn pen(p: &SamplingParams, x: &[f32], history: &[u32], prompt_len: usize) -> Vec<f32> {
        validate_row(x).unwrap();
        penalized(p, x, history, prompt_len).unwrap().into_owned()
    }

    fn draw(s: &Sampler, logits: &[f32], step: u64) -> u32 {
        s.sample(logits, &[], 0, step, 0).unwrap().token
    }

    /// Deterministic pseudo-random logits, roughly normal with std `scale`.
    fn logits(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                let s: f64 = (0..4).map(|j| uniform(seed, i * 4 + j)).sum();
                ((s - 2.0) * 1.7) as f32 * scale
            })
            .collect()
    }

    #[test]
    fn greedy_is_argmax_with_ties_to_lowest_id() {
        let s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(draw(&s, &[0.1, 3.0, -1.0, 2.9], 0), 1);
        assert_eq!(draw(&s, &[0.1, 3.0, -1.0, 3.0, 3.0], 7), 1);
        assert_eq!(draw(&s, &[f32::NEG_INFINITY, -5.0, -5.0], 0), 1);
        let x = logits(1000, 3, 2.0);
        let want = argmax(&x);
        for step in 0..50 {
            let s = sampler(|p| p.seed = step);
            assert_eq!(draw(&s, &x, step), want);
        }
    }

    #[test]
    fn same_seed_and_step_same_token_in_any_call_order() {
        let x = logits(5000, 1, 1.0);
        let s = sampler(|p| {
            p.temperature = 1.0;
            p.seed = 42;
        });
        let forward: Vec<u32> = (0..200).map(|t| draw(&s, &x, t)).collect();
        let backward: Vec<u32> = (0..200).rev().map(|t| draw(&s, &x, t)).collect();
        let mut backward = backward;
        backward.reverse();
        assert_eq!(forward, backward);
        let again = sampler(|p| {
            p.temperature = 1.0;
            p.seed = 42;
        });
        assert_eq!(draw(&again, &x, 137), forward[137]);
        // Different steps and seeds do give different draws in aggregate.
        let mut distinct = forward.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 100, "{} distinct", distinct.len());
        let other = sampler(|p| {
            p.temperature = 1.0;
            p.seed = 43;
        });
        let differ = (0..200).filter(|&t| draw(&other, &x, t) != forward[t as usize]);
        assert!(differ.count() > 150);
    }

    #[test]
    fn uniform_is_in_range_and_spread() {
        let mut bins = [0u32; 10];
        for t in 0..100_000 {
            let u = uniform(7, t);
            assert!((0.0..1.0).contains(&u));
            bins[(u * 10.0) as usize] += 1;
        }
        for b in bins {
            assert!((b as i64 - 10_000).abs() < 400, "{bins:?}");
        }
        assert_ne!(uniform(0, 0), uniform(1, 0));
        assert_ne!(uniform(0, 0), uniform(0, 1));
    }

    /// 20k draws over steps 0..20000 against `expected`, per-bin 3 sigma and
    /// a chi-square test.
    fn check_distribution(s: &Sampler, x: &[f32], expected: &[f64]) {
        const N: u64 = 20_000;
        let mut counts = vec![0u64; x.len()];
        for t in 0..N {
            counts[draw(s, x, t) as usize] += 1;
        }
        let n = N as f64;
        let mut chi2 = 0.0;
        let mut dof = 0;
        for (i, (&c, &p)) in counts.iter().zip(expected).enumerate() {
            if p == 0.0 {
                assert_eq!(c, 0, "token {i} must never be drawn: {counts:?}");
                continue;
            }
            let mean = n * p;
            let sigma = (n * p * (1.0 - p)).sqrt();
            assert!(
                (c as f64 - mean).abs() <= 3.0 * sigma,
                "token {i}: {c} vs {mean:.0} ± {sigma:.0}; {counts:?}"
            );
            chi2 += (c as f64 - mean).powi(2) / mean;
            dof += 1;
        }
        // 99.9% quantiles of chi-square for 1..=5 degrees of freedom.
        let crit = [10.83, 13.82, 16.27, 18.47, 20.52][dof - 2];
        assert!(chi2 < crit, "chi2 {chi2} with {} dof", dof - 1);
    }

    fn normalize(w: &[f64]) -> Vec<f64> {
        let z: f64 = w.iter().sum();
        w.iter().map(|v| v / z).collect()
    }

    #[test]
    fn statistical_match_of_temperature_and_filters() {
        let p = [0.4, 0.25, 0.15, 0.12, 0.08];
        // Shuffled ids so the ranking differs from the id order.
        let order = [3usize, 0, 4, 1, 2];
        let mut x = vec![0.0f32; 5];
        let mut exp_t1 = vec![0.0; 5];
        for (rank, &id) in order.iter().enumerate() {
            x[id] = (p[rank] as f32).ln() + 1.5;
            exp_t1[id] = p[rank];
        }
        let t1 = sampler(|q| {
            q.temperature = 1.0;
            q.seed = 9;
        });
        check_distribution(&t1, &x, &exp_t1);

        let t05 = sampler(|q| {
            q.temperature = 0.5;
            q.seed = 10;
        });
        let sq: Vec<f64> = exp_t1.iter().map(|v| v * v).collect();
        check_distribution(&t05, &x, &normalize(&sq));

        // top_k = 2 keeps ids 3 and 0.
        let k2 = sampler(|q| {
            q.temperature = 1.0;
            q.top_k = Some(2);
            q.seed = 11;
        });
        let mut w = vec![0.0; 5];
        w[3] = 0.4;
        w[0] = 0.25;
        check_distribution(&k2, &x, &normalize(&w));

        // top_p = 0.7 keeps 0.4 + 0.25 + 0.15 (0.65 < 0.7).
        let p07 = sampler(|q| {
            q.temperature = 1.0;
            q.top_p = 0.7;
            q.seed = 12;
        });
        let mut w = vec![0.0; 5];
        w[3] = 0.4;
        w[0] = 0.25;
        w[4] = 0.15;
        check_distribution(&p07, &x, &normalize(&w));

        // min_p = 0.35 keeps p ≥ 0.14: 0.4, 0.25, 0.15.
        let mp = sampler(|q| {
            q.temperature = 1.0;
            q.min_p = 0.35;
            q.seed = 13;
        });
        check_distribution(&mp, &x, &normalize(&w));

        // top_k = 4 then top_p = 0.7 over the renormalized top 4:
        // 0.4/0.92 = 0.435, +0.25/0.92 = 0.707 ≥ 0.7 → two tokens.
        let kp = sampler(|q| {
            q.temperature = 1.0;
            q.top_k = Some(4);
            q.top_p = 0.7;
            q.seed = 14;
        });
        let mut w = vec![0.0; 5];
        w[3] = 0.4;
        w[0] = 0.25;
        check_distribution(&kp, &x, &normalize(&w));
    }

    #[test]
    fn truncations_to_one_token_equal_greedy() {
        for seed in 0..5u64 {
            let x = logits(3000, seed, 3.0);
            let want = argmax(&x);
            for temperature in [0.1f32, 1.0, 2.0, 50.0] {
                let k1 = sampler(|p| {
                    p.temperature = temperature;
                    p.top_k = Some(1);
                    p.seed = seed;
                });
                let tiny_p = sampler(|p| {
                    p.temperature = temperature;
                    p.top_p = 1e-9;
                    p.seed = seed;
                });
                let min_p1 = sampler(|p| {
                    p.temperature = temperature;
                    p.min_p = 1.0;
                    p.seed = seed;
                });
                for step in 0..20 {
                    assert_eq!(draw(&k1, &x, step), want);
                    assert_eq!(draw(&tiny_p, &x, step), want);
                    assert_eq!(draw(&min_p1, &x, step), want);
                }
            }
        }
        // Ties: top_k = 1 and tiny top_p keep the lowest id.
        let x = [1.0, 5.0, 5.0, 2.0];
        let k1 = sampler(|p| {
            p.temperature = 1.0;
            p.top_k = Some(1);
        });
        let tiny_p = sampler(|p| {
            p.temperature = 1.0;
            p.top_p = 1e-6;
        });
        for step in 0..50 {
            assert_eq!(draw(&k1, &x, step), 1);
            assert_eq!(draw(&tiny_p, &x, step), 1);
        }
    }

    #[test]
    fn repetition_penalty_hand_computed() {
        let params = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::default() };
        let raw = [4.0, -3.0, 0.0, 1.0, 6.0];
        // Token 0 appears in the prompt, 1 twice (distinct: penalized once),
        // 2 has logit 0, 4 is never seen.
        let history = [0, 1, 2, 1, 3];
        let x = pen(&params, &raw, &history, 2);
        assert_eq!(x, vec![2.0, -6.0, 0.0, 0.5, 6.0]);
        // Greedy flips from the repeated token 4 once it is in the history.
        let s =
            Sampler::new(SamplingParams { repetition_penalty: 1.6, ..SamplingParams::default() }).unwrap();
        let row = [5.0, 0.0, 0.0, 0.0, 6.0];
        assert_eq!(s.sample(&row, &[1, 2], 2, 0, 0).unwrap().token, 4);
        assert_eq!(s.sample(&row, &[1, 4], 1, 1, 0).unwrap().token, 0);
    }

    #[test]
    fn presence_and_frequency_penalties_hand_computed() {
        let params =
            SamplingParams { presence_penalty: 0.5, frequency_penalty: 0.25, ..SamplingParams::default() };
        let raw = [1.0, 1.0, 1.0, 1.0];
        // Prompt [0, 0, 3]: not counted. Generated: 1 ×3, 2 ×1, 0 ×1.
        let history = [0, 0, 3, 1, 2, 1, 1, 0];
        let x = pen(&params, &raw, &history, 3);
        assert_eq!(x, vec![1.0 - 0.25 - 0.5, 1.0 - 0.75 - 0.5, 0.25, 1.0]);
        // Negative penalties encourage repeats.
        let params =
            SamplingParams { presence_penalty: -1.0, frequency_penalty: -0.5, ..SamplingParams::default() };
        let x = pen(&params, &raw, &history, 3);
        assert_eq!(x, vec![2.5, 3.5, 2.5, 1.0]);
        // All three together: repetition first, then frequency, presence.
        let params = SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::default()
        };
        let raw = [2.0, -2.0, 0.5, 1.0];
        let x = pen(&params, &raw, &history, 3);
        assert_eq!(x, vec![1.0 - 0.75, -4.0 - 1.25, 0.25 - 0.75, 0.5]);
    }

    #[test]
    fn penalties_keep_masks_and_finiteness() {
        let params = SamplingParams {
            repetition_penalty: 1e-30,
            presence_penalty: -2.0,
            frequency_penalty: -2.0,
            ..SamplingParams::default()
        };
        let raw = [f32::NEG_INFINITY, 1e30, -1e30, 0.0];
        let x = pen(&params, &raw, &[0, 1, 2, 3], 0);
        assert_eq!(x[0], f32::NEG_INFINITY);
        assert_eq!(x[1], f32::MAX);
        assert!(x[2].is_finite() && x[3].is_finite());
        let s = Sampler::new(SamplingParams { temperature: 1.0, ..params }).unwrap();
        let out = s.sample(&raw, &[0, 1, 2, 3], 0, 0, 4).unwrap();
        assert_eq!(out.token, 1);
        assert_eq!(out.top_logprobs.len(), 3);
        assert!(out.top_logprobs.iter().all(|&(_, lp)| lp.is_finite()));
    }

    #[test]
    fn logprobs_are_log_softmax_of_penalized_logits() {
        let s = sampler(|p| {
            p.temperature = 0.7;
            p.top_k = Some(3);
            p.frequency_penalty = 1.0;
        });
        let raw = [0.5f32, 2.0, 2.0, -1.0, f32::NEG_INFINITY, 1.0];
        let history = [1u32, 5];
        let out = s.sample(&raw, &history, 1, 0, 10).unwrap();
        let pen = [0.5f64, 2.0, 2.0, -1.0, f64::NEG_INFINITY, 0.0];
        let lse = pen.iter().map(|v| v.exp()).sum::<f64>().ln();
        let want: Vec<(u32, f32)> = vec![
            (1, (2.0 - lse) as f32),
            (2, (2.0 - lse) as f32),
            (0, (0.5 - lse) as f32),
            (5, (0.0 - lse) as f32),
            (3, (-1.0 - lse) as f32),
        ];
        assert_eq!(out.top_logprobs.len(), 5, "masked token excluded");
        for ((id, lp), (wid, wlp)) in out.top_logprobs.iter().zip(&want) {
            assert_eq!(id, wid);
            assert!((lp - wlp).abs() < 1e-6);
        }
        let own = want.iter().find(|(id, _)| *id == out.token).unwrap().1;
        assert!((out.logprob - own).abs() < 1e-6);
        assert!([0, 1, 2].contains(&out.token));
        // Greedy also reports logprobs; none requested → empty list.
        let g = Sampler::new(SamplingParams::greedy()).unwrap();
        let out = g.sample(&raw, &[], 0, 0, 0).unwrap();
        assert_eq!(out.token, 1);
        assert!(out.top_logprobs.is_empty());
        let lse = [0.5f64, 2.0, 2.0, -1.0, 1.0].iter().map(|v| v.exp()).sum::<f64>().ln();
        assert!((f64::from(out.logprob) - (2.0 - lse)).abs() < 1e-6);
    }

    /// Every compiled version of `sum_weights` gives the portable bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sum_weights_has_the_same_bits_on_every_instruction_set() {
        use crate::kernels::{Level, level};
        let mut seed = 11u64;
        let x: Vec<f32> = (0..49_157)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32) * 30.0 - 20.0
            })
            .collect();
        let max = lane_max(&x);
        for (inv_t, threshold) in [(1.0, 0.0), (1.7, 0.0), (0.5, 1e-3)] {
            let want = sum_weights_body(&x, max, inv_t, threshold).to_bits();
            if level() >= Level::Avx2 {
                // SAFETY: the CPU has AVX2 (checked just above).
                assert_eq!(unsafe { sum_weights_avx2(&x, max, inv_t, threshold) }.to_bits(), want);
            }
            if level() >= Level::Avx512 {
                // SAFETY: the CPU has AVX-512 F (checked just above).
                assert_eq!(unsafe { sum_weights_avx512(&x, max, inv_t, threshold) }.to_bits(), want);
            }
            assert_eq!(sum_weights(&x, max, inv_t, threshold).to_bits(), want);
        }
    }

    #[test]
    fn det_exp_matches_std() {
        let mut x = 0.0f32;
        let mut worst = 0.0f64;
        while x > -90.0 {
            let got = f64::from(det_exp(x));
            if x < -87.0 {
                assert_eq!(got, 0.0);
            } else {
                let want = f64::from(x).exp();
                worst = worst.max(((got - want) / want).abs());
            }
            x -= 0.00173;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(det_exp(0.0), 1.0);
        assert_eq!(det_exp(-0.0), 1.0);
        assert_eq!(det_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(det_exp(f32::NAN), 0.0);
    }

    #[test]
    fn rank_key_orders_by_logit_desc_then_id() {
        let vals = [f32::MAX, 3.0, 1.0, 0.0, -0.0, -1e-40, -2.0, f32::MIN];
        let mut keys: Vec<u64> = vals.iter().enumerate().map(|(i, &v)| rank_key(v, i as u32)).collect();
        let sorted = keys.clone();
        keys.sort_unstable();
        assert_eq!(keys, sorted);
        assert!(rank_key(1.0, 2) < rank_key(1.0, 3));
        assert!(rank_key(-0.0, 2) < rank_key(0.0, 3));
    }

    #[test]
    fn ranked_prefilter_falls_back_to_the_full_ranking() {
        let mut x = logits(3000, 8, 3.0);
        x[10] = f32::NEG_INFINITY;
        x[11] = f32::NEG_INFINITY;
        x[20] = x[21];
        let max = lane_max(&x);
        let row = Row { x: &x, max, finite: 2998 };
        let mut ids: Vec<u32> = (0..3000).filter(|&i| x[i as usize].is_finite()).collect();
        ids.sort_by(|&a, &b| x[b as usize].total_cmp(&x[a as usize]).then(a.cmp(&b)));
        for gap in [0.0, 0.3, 2.0, f32::INFINITY] {
            let mut r = Ranked::new(&row, gap);
            let walked: Vec<u32> = (0..3000).map_while(|i| r.get(i)).map(|(_, id)| id).collect();
            assert_eq!(walked, ids, "gap {gap}");
        }
    }

    #[test]
    fn masked_tokens_are_never_drawn() {
        let mut x = vec![f32::NEG_INFINITY; 100];
        x[17] = -3.0;
        x[60] = -3.5;
        let s = sampler(|p| p.temperature = 2.0);
        for step in 0..200 {
            let t = draw(&s, &x, step);
            assert!(t == 17 || t == 60);
        }
    }

    #[test]
    fn invalid_inputs_give_typed_errors() {
        let bad = |f: fn(&mut SamplingParams), name: &str| {
            let mut p = SamplingParams::default();
            f(&mut p);
            match Sampler::new(p) {
                Err(SamplerError::InvalidParameter { name: n, .. }) => assert_eq!(n, name),
                other => panic!("{name}: {other:?}"),
            }
        };
        bad(|p| p.temperature = -0.1, "temperature");
        bad(|p| p.temperature = f32::NAN, "temperature");
        bad(|p| p.temperature = f32::INFINITY, "temperature");
        bad(|p| p.temperature = 101.0, "temperature");
        bad(|p| p.top_k = Some(0), "top_k");
        bad(|p| p.top_p = 0.0, "top_p");
        bad(|p| p.top_p = 1.01, "top_p");
        bad(|p| p.top_p = f32::NAN, "top_p");
        bad(|p| p.min_p = -0.1, "min_p");
        bad(|p| p.min_p = 1.5, "min_p");
        bad(|p| p.repetition_penalty = 0.0, "repetition_penalty");
        bad(|p| p.repetition_penalty = f32::INFINITY, "repetition_penalty");
        bad(|p| p.presence_penalty = 2.5, "presence_penalty");
        bad(|p| p.frequency_penalty = -2.5, "frequency_penalty");
        bad(|p| p.frequency_penalty = f32::NAN, "frequency_penalty");
        let err = SamplingParams { top_p: 1.5, ..SamplingParams::default() }.validate().unwrap_err();
        assert_eq!(err.to_string(), "invalid sampling parameter top_p = 1.5: must be within (0, 1]");
        assert!(SamplingParams::default().validate().is_ok());
        assert!(
            SamplingParams {
                temperature: 2.0,
                top_k: Some(1),
                top_p: 1e-6,
                min_p: 1.0,
                repetition_penalty: 1e-3,
                presence_penalty: -2.0,
                frequency_penalty: 2.0,
                seed: u64::MAX,
            }
            .validate()
            .is_ok()
        );

        let s = sampler(|p| p.temperature = 1.0);
        let e = |r: Result<Sampled, SamplerError>| r.unwrap_err();
        assert_eq!(e(s.sample(&[], &[], 0, 0, 0)), SamplerError::EmptyLogits);
        assert_eq!(e(s.sample(&[0.0, f32::NAN], &[], 0, 0, 0)), SamplerError::NonFiniteLogits { index: 1 });
        assert_eq!(
            e(s.sample(&[f32::INFINITY, 0.0], &[], 0, 0, 0)),
            SamplerError::NonFiniteLogits { index: 0 }
        );
        assert_eq!(e(s.sample(&[f32::NEG_INFINITY; 3], &[], 0, 0, 0)), SamplerError::AllMasked);
        assert_eq!(
            e(s.sample(&[0.0; 3], &[0, 3], 1, 0, 0)),
            SamplerError::TokenOutOfVocab { position: 1, token: 3, vocab: 3 }
        );
        assert_eq!(
            e(s.sample(&[0.0; 3], &[0], 2, 0, 0)),
            SamplerError::PromptLenOutOfRange { prompt_len: 2, history_len: 1 }
        );
        // -inf alone is fine.
        assert_eq!(draw(&s, &[f32::NEG_INFINITY, 0.0], 0), 1);
    }

    #[test]
    fn params_serde_defaults() {
        let p: SamplingParams = serde_json::from_str(r#"{"temperature":0.7,"top_k":40}"#).unwrap();
        assert_eq!(p, SamplingParams { temperature: 0.7, top_k: Some(40), ..SamplingParams::greedy() });
        let back: SamplingParams = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    /// Straightforward reference of the draw: full sort of the row, explicit
    /// filters, same weights and summation order as the implementation.
    /// Returns the token and the candidate `(id, weight)` list.
    fn reference_draw(p: &SamplingParams, x: &[f32], step: u64) -> (u32, Vec<(u32, f32)>) {
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut ids: Vec<u32> = (0..x.len() as u32).filter(|&i| x[i as usize].is_finite()).collect();
        ids.sort_by(|&a, &b| x[b as usize].total_cmp(&x[a as usize]).then(a.cmp(&b)));
        let inv_t = 1.0 / p.temperature;
        let w = |id: u32| det_exp((x[id as usize] - max) * inv_t);
        let keep = |id: u32| if p.min_p >= 1.0 { x[id as usize] == max } else { w(id) >= p.min_p };
        let top_p = f64::from(p.top_p);
        let (cands, mass): (Vec<u32>, f64) = if p.top_k.is_some() || top_p < 1.0 {
            let k = p.top_k.map_or(ids.len(), |k| (k as usize).min(ids.len()));
            let total: f64 = if p.top_k.is_some() {
                ids[..k].iter().map(|&id| f64::from(w(id))).sum()
            } else {
                sum_weights(x, max, inv_t, 0.0)
            };
            let stop = if top_p < 1.0 { top_p * total } else { f64::INFINITY };
            let mut cands = Vec::new();
            let mut cum = 0.0;
            for &id in &ids[..k] {
                if !keep(id) {
                    break;
                }
                cands.push(id);
                cum += f64::from(w(id));
                if cum >= stop {
                    break;
                }
            }
            (cands, cum)
        } else {
            let cands: Vec<u32> = ids.iter().copied().filter(|&id| keep(id)).collect();
            let mass = if p.min_p >= 1.0 { cands.len() as f64 } else { sum_weights(x, max, inv_t, p.min_p) };
            (cands, mass)
        };
        let target = uniform(p.seed, step) * mass;
        let mut chosen = ids[0];
        let mut cum = 0.0;
        for &id in &cands {
            if w(id) > 0.0 {
                chosen = id;
                cum += f64::from(w(id));
                if cum > target {
                    break;
                }
            }
        }
        (chosen, cands.iter().map(|&id| (id, w(id))).collect())
    }

    fn arb_params() -> impl Strategy<Value = SamplingParams> {
        (
            prop_oneof![Just(0.0f32), 0.05f32..3.0],
            prop_oneof![Just(None), (1u32..20).prop_map(Some)],
            prop_oneof![Just(1.0f32), 0.01f32..1.0],
            prop_oneof![Just(0.0f32), 0.0f32..=1.0],
            prop_oneof![Just(1.0f32), 0.5f32..2.0],
            -2.0f32..=2.0,
            -2.0f32..=2.0,
            any::<u64>(),
        )
            .prop_map(|(t, k, p, mp, rep, pres, freq, seed)| SamplingParams {
                temperature: t,
                top_k: k,
                top_p: p,
                min_p: mp,
                repetition_penalty: rep,
                presence_penalty: pres,
                frequency_penalty: freq,
                seed,
            })
    }

    fn arb_logit() -> impl Strategy<Value = f32> {
        prop_oneof![
            8 => -20.0f32..20.0,
            1 => Just(f32::NEG_INFINITY),
            1 => (-3i32..3).prop_map(|v| v as f32),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn sample_is_deterministic_and_valid(
            params in arb_params(),
            mut x in prop::collection::vec(arb_logit(), 1..300),
            hist in prop::collection::vec(any::<u32>(), 0..40),
            prompt_frac in 0.0f64..=1.0,
            step in any::<u64>(),
            n_top in 0usize..8,
        ) {
            x[0] = x[0].max(-20.0); // at least one unmasked token
            let vocab = x.len() as u32;
            let history: Vec<u32> = hist.iter().map(|t| t % vocab).collect();
            let prompt_len = (history.len() as f64 * prompt_frac) as usize;
            let s = Sampler::new(params.clone()).unwrap();
            let a = s.sample(&x, &history, prompt_len, step, n_top).unwrap();
            let b = Sampler::new(params.clone()).unwrap()
                .sample(&x, &history, prompt_len, step, n_top).unwrap();
            prop_assert_eq!(&a, &b);
            prop_assert!(a.token < vocab);
            prop_assert!(a.logprob <= 0.0 && a.logprob.is_finite());
            let pen = pen(&params, &x, &history, prompt_len);
            prop_assert!(pen[a.token as usize].is_finite());
            if params.temperature == 0.0 {
                prop_assert_eq!(a.token, argmax(&pen));
            } else {
                let (want, cands) = reference_draw(&params, &pen, step);
                let hit = cands.iter().find(|&&(id, _)| id == a.token);
                prop_assert!(hit.is_some_and(|&(_, w)| w > 0.0),
                    "token {} not among candidates {:?}", a.token, cands);
                prop_assert_eq!(a.token, want);
            }
            let unmasked = pen.iter().filter(|v| v.is_finite()).count();
            prop_assert_eq!(a.top_logprobs.len(), n_top.min(unmasked));
            for w in a.top_logprobs.windows(2) {
                prop_assert!(w[0].1 > w[1].1 || (w[0].1 == w[1].1 && w[0].0 < w[1].0));
            }
            if let Some(&(id, lp)) = a.top_logprobs.first() {
                prop_assert_eq!(id, argmax(&pen));
                prop_assert!(lp <= 0.0);
            }
        }
    }
}
