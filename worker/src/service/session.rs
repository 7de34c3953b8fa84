//! One open session on this stage: its KV cache, its reservation and, on the last stage, what
//! the sampler needs.

use std::time::Instant;

use shoal_model_shards::KvCache;
use shoal_model_shards::activation::WireDType;
use shoal_model_shards::sampler::Sampler;

use super::PeerId;
use crate::protocol::HiddenStates;
use crate::protocol::seal::SealKey;

/// What the last stage keeps to sample a session's tokens.
pub(super) struct SamplerState {
    /// The key of the session's sealed sampler inputs, when the origin sealed them.
    pub(super) seal: Option<SealKey>,
    /// The session's validated sampler.
    pub(super) sampler: Sampler,
    /// Every id of the session so far (prompt, then generated), built from `history_tail`s.
    pub(super) history: Vec<u32>,
    /// How many leading ids of `history` are prompt.
    pub(super) prompt_len: usize,
    /// Alternatives reported per result.
    pub(super) top_logprobs: usize,
}

/// A session open on this stage.
pub(super) struct Session {
    /// The peer that sent the `OpenSession` to this stage: the origin on hop 0, the previous
    /// hop otherwise. Only it may step or close the session; its quota is charged.
    pub(super) opener: PeerId,
    /// The origin named by the `OpenSession`: where results and errors go.
    pub(super) origin: PeerId,
    /// The next hop's node id, `None` on the last hop.
    pub(super) next: Option<PeerId>,
    /// Dtype of hidden states in and out of this stage.
    pub(super) wire_dtype: WireDType,
    /// Most positions the session may use.
    pub(super) max_len: usize,
    /// The session's KV cache for this span.
    pub(super) cache: KvCache,
    /// Highest step id served so far.
    pub(super) last_step: Option<u64>,
    /// After a speculative step: the lowest position the next step may rewind the cache to
    /// (its `start_pos + 1`; the positions from there on held draft ids). `None` otherwise.
    pub(super) rewind_floor: Option<usize>,
    /// The hidden states the last step forwarded (of a prefill chunk, its last row), with its
    /// step id: a `Tap` that arrives after its step is answered from here.
    pub(super) last_forwarded: Option<(u64, HiddenStates)>,
    /// Last time a message for this session arrived.
    pub(super) last_active: Instant,
    /// Sampling state, on the last stage only.
    pub(super) sampling: Option<SamplerState>,
    /// The step whose forwarded hidden states are also sent to the origin (a `Tap`).
    pub(super) tap: Option<u64>,
}
